/* Paged KV bookkeeping: the block pool (alloc, release, reference counts,
 * consistency check), per-sequence block tables (all-or-nothing appends,
 * block arithmetic, slot mapping, giving blocks back), the flat batch view
 * the kernels read, and a randomized stress run over a shuffled pool. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "paged/pool.h"
#include "paged/seq.h"
#include "tests/test.h"



static int32_t cdiv(int32_t a, int32_t b) { return (a + b - 1) / b; }

/* ---- pool ------------------------------------------------------------------ */

static void test_pool_basic(void) {
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 0), -EINVAL);
  kv_pool_destroy(&p);
  CHECK_INT_EQ(kv_pool_init(&p, -5), -EINVAL);
  kv_pool_destroy(&p);
  kv_pool_destroy(NULL);

  enum { N = 10 };
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  CHECK_INT_EQ(kv_pool_free_count(&p), N);
  CHECK_INT_EQ(kv_pool_used_count(&p), 0);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  bool seen[N] = {false};
  for (int i = 0; i < N; i++) {
    int32_t id = kv_pool_alloc(&p);
    CHECK_INT_EQ(id, i); /* a fresh pool hands out the lowest ids first */
    CHECK(!seen[id]);
    seen[id] = true;
    CHECK_INT_EQ(p.refs[id], 1);
    CHECK_INT_EQ(kv_pool_free_count(&p), N - 1 - i);
    CHECK_INT_EQ(kv_pool_stranded_count(&p), 0); /* one part: nothing stranded */
    CHECK_INT_EQ(kv_pool_used_count(&p), i + 1);
    CHECK_INT_EQ(kv_pool_check(&p), 0);
  }
  CHECK_INT_EQ(kv_pool_alloc(&p), -1);
  CHECK_INT_EQ(kv_pool_alloc(&p), -1);
  CHECK_INT_EQ(kv_pool_free_count(&p), 0);
  CHECK_INT_EQ(kv_pool_check(&p), 0);

  kv_pool_release(&p, 3);
  kv_pool_release(&p, 7);
  CHECK_INT_EQ(kv_pool_free_count(&p), 2);
  CHECK_INT_EQ(p.refs[3], 0);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* a stack: last released, first reused */
  CHECK_INT_EQ(kv_pool_alloc(&p), 7);
  CHECK_INT_EQ(kv_pool_alloc(&p), 3);
  CHECK_INT_EQ(kv_pool_alloc(&p), -1);

  for (int i = 0; i < N; i++) kv_pool_release(&p, i);
  CHECK_INT_EQ(kv_pool_free_count(&p), N);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
  CHECK(p.free_ids == NULL && p.refs == NULL && p.n_blocks == 0);
  kv_pool_destroy(&p);
}

static void test_pool_refcounts(void) {
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 4), 0);
  int32_t a = kv_pool_alloc(&p), b = kv_pool_alloc(&p);
  /* a second owner of a (a shared prefix block) */
  p.refs[a]++;
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_release(&p, a);
  CHECK_INT_EQ(p.refs[a], 1);
  CHECK_INT_EQ(kv_pool_free_count(&p), 2); /* still held by the other owner */
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_release(&p, a);
  CHECK_INT_EQ(p.refs[a], 0);
  CHECK_INT_EQ(kv_pool_free_count(&p), 3);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* the freed block comes back before the untouched ones */
  CHECK_INT_EQ(kv_pool_alloc(&p), a);
  kv_pool_release(&p, a);
  kv_pool_release(&p, b);
  CHECK_INT_EQ(kv_pool_free_count(&p), 4);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}

static void test_pool_check_detects(void) {
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 8), 0);
  int32_t a = kv_pool_alloc(&p);
  int32_t b = kv_pool_alloc(&p);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* a lost block: unreferenced but not on the free stack */
  p.refs[a] = 0;
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  p.refs[a] = 1;
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* a block on the free stack that is also referenced */
  int32_t top = p.free_ids[p.n_free - 1];
  p.refs[top] = 1;
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  p.refs[top] = 0;
  /* the same id twice on the free stack */
  int32_t save = p.free_ids[0];
  p.free_ids[0] = p.free_ids[1];
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  p.free_ids[0] = save;
  /* an id out of range */
  p.free_ids[0] = 8;
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  p.free_ids[0] = -1;
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  p.free_ids[0] = save;
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_release(&p, a);
  kv_pool_release(&p, b);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}

static void test_pool_shuffle(void) {
  enum { N = 200 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  int32_t *before = malloc(N * sizeof *before);
  CHECK(before);
  memcpy(before, p.free_ids, N * sizeof *before);
  kv_pool_shuffle(&p, 42);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  CHECK_INT_EQ(kv_pool_free_count(&p), N);
  int moved = 0;
  for (int i = 0; i < N; i++) moved += p.free_ids[i] != before[i];
  CHECK(moved > N / 2);
  /* deterministic per seed, different across seeds */
  int32_t *again = malloc(N * sizeof *again);
  CHECK(again);
  memcpy(again, p.free_ids, N * sizeof *again);
  kv_pool_destroy(&p);
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  kv_pool_shuffle(&p, 42);
  CHECK(memcmp(again, p.free_ids, N * sizeof *again) == 0);
  kv_pool_shuffle(&p, 43);
  CHECK(memcmp(again, p.free_ids, N * sizeof *again) != 0);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* shuffling a partly used pool touches only the free ids */
  for (int i = 0; i < 150; i++) CHECK(kv_pool_alloc(&p) >= 0);
  kv_pool_shuffle(&p, 7);
  CHECK_INT_EQ(kv_pool_free_count(&p), 50);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
  free(before);
  free(again);
}

/* A pool cut in parts (tensor-parallel ranks): each part lends only its own
 * ids; the free count is what an even spread can use; a sequence's heads
 * draw from their rank's part, and an append fails when one part is short
 * even though the pool as a whole is not. */
static void test_pool_parts(void) {
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init_parts(&p, 10, 3), -EINVAL); /* not equal parts */
  CHECK_INT_EQ(kv_pool_init_parts(&p, 12, 0), -EINVAL);
  CHECK_INT_EQ(kv_pool_init_parts(&p, 12, 3), 0);
  CHECK_INT_EQ(p.part_blocks, 4);
  CHECK_INT_EQ(kv_pool_free_count(&p), 12);
  kv_pool_shuffle(&p, 3);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  int32_t got[4];
  for (int i = 0; i < 4; i++) {
    got[i] = kv_pool_alloc_in(&p, 1);
    CHECK(got[i] >= 4 && got[i] < 8);
  }
  CHECK_INT_EQ(kv_pool_alloc_in(&p, 1), -1); /* part 1 is empty, the others are not */
  CHECK_INT_EQ(kv_pool_part_free(&p, 0), 4);
  CHECK_INT_EQ(kv_pool_used_count(&p), 4);
  CHECK_INT_EQ(kv_pool_free_count(&p), 0); /* an even spread can use nothing more */
  CHECK_INT_EQ(kv_pool_stranded_count(&p), 8);
  int32_t a = kv_pool_alloc(&p);           /* from a part with the most free */
  CHECK(a >= 0 && kv_pool_part_of(&p, a) != 1);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_release(&p, got[2]);
  CHECK_INT_EQ(kv_pool_part_free(&p, 1), 1);
  CHECK_INT_EQ(kv_pool_free_count(&p), 3);
  CHECK_INT_EQ(kv_pool_alloc_in(&p, 1), got[2]);
  /* a snapshot */
  kv_pool_t q;
  CHECK_INT_EQ(kv_pool_init_parts(&q, 12, 3), 0);
  kv_pool_copy(&q, &p);
  CHECK_INT_EQ(kv_pool_check(&q), 0);
  CHECK_INT_EQ(kv_pool_used_count(&q), 5);
  for (int32_t k = 0; k < 3; k++) CHECK_INT_EQ(kv_pool_part_free(&q, k), kv_pool_part_free(&p, k));
  kv_pool_destroy(&q);
  /* free ids swapped between two parts' stacks: each once, yet caught */
  int32_t *top0 = &p.free_ids[kv_pool_part_free(&p, 0) - 1];
  int32_t *top2 = &p.free_ids[2 * p.part_blocks + kv_pool_part_free(&p, 2) - 1];
  int32_t t = *top0;
  *top0 = *top2;
  *top2 = t;
  CHECK_INT_EQ(kv_pool_check(&p), -EFAULT);
  *top2 = *top0;
  *top0 = t;
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  for (int i = 0; i < 4; i++) kv_pool_release(&p, got[i]);
  kv_pool_release(&p, a);
  CHECK_INT_EQ(kv_pool_free_count(&p), 12);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);

  /* 2 layers x 4 heads over 2 ranks: heads 0-1 on part 0, 2-3 on part 1 */
  const int32_t L = 2, H = 4, B = 16;
  CHECK_INT_EQ(kv_pool_init_parts(&p, 2 * 20, 2), 0);
  kv_pool_shuffle(&p, 11);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, 400), 0);
  CHECK_INT_EQ(kv_seq_set_parts(&s, 3), -EINVAL); /* does not divide 4 heads */
  CHECK_INT_EQ(kv_seq_append(&s, &p, 1), -EINVAL); /* one part; the pool has two */
  CHECK_INT_EQ(kv_pool_used_count(&p), 0);
  CHECK_INT_EQ(kv_seq_set_parts(&s, 2), 0);
  CHECK_INT_EQ(kv_seq_part_of(&s, 1), 0);
  CHECK_INT_EQ(kv_seq_part_of(&s, 2), 1);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 33), L * H * 3);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 33), 0); /* 12 blocks from each part */
  for (int32_t l = 0; l < L; l++)
    for (int32_t h = 0; h < H; h++)
      for (int32_t b = 0; b < 3; b++)
        CHECK_INT_EQ(kv_pool_part_of(&p, kv_seq_table(&s, l, h)[b]), h / 2);
  CHECK_INT_EQ(kv_pool_part_free(&p, 0), 8);
  CHECK_INT_EQ(kv_pool_part_free(&p, 1), 8);
  /* part 1 loses 5 blocks elsewhere: 3 left there, 8 in part 0 */
  int32_t held[5];
  for (int i = 0; i < 5; i++) held[i] = kv_pool_alloc_in(&p, 1);
  CHECK_INT_EQ(kv_pool_free_count(&p), 6);
  /* 16 more tokens need 4 blocks of each part: 11 free in all, yet no */
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), 8);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 16), -ENOSPC);
  CHECK_INT_EQ(kv_pool_part_free(&p, 0), 8); /* all or nothing */
  CHECK_INT_EQ(kv_pool_part_free(&p, 1), 3);
  /* a head of part 1 shorter (as after compression): the most of any part counts */
  kv_pool_release(&p, held[0]);
  kv_pool_release(&p, held[1]);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), 8);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 16), 0);
  CHECK_INT_EQ(kv_pool_part_free(&p, 0), 4);
  CHECK_INT_EQ(kv_pool_part_free(&p, 1), 1);
  for (int i = 2; i < 5; i++) kv_pool_release(&p, held[i]);
  CHECK_INT_EQ(kv_pool_used_count(&p), kv_seq_blocks_held(&s));
  kv_seq_destroy(&s, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 40);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}


static void test_block_bytes_and_arena(void) {
  CHECK_INT_EQ(kv_block_bytes(K_F32, 16, 64), 16 * (2 * 64 * 4 + 4 + 4));
  CHECK_INT_EQ(kv_block_bytes(K_F32, 1, 1), 2 * 4 + 4 + 4);
  CHECK_INT_EQ(kv_block_bytes(K_BF16, 16, 128), 16 * (2 * 128 * 2 + 4 + 4));
  k_backend_t *be = NULL;
  CHECK_INT_EQ(k_cpu_backend_new(&be, 1), 0);
  k_kv_arena_t a;
  CHECK_INT_EQ(kv_arena_init(&a, be, 10, 16, 64), 0);
  CHECK_INT_EQ(a.n_blocks, 10);
  CHECK_INT_EQ(a.block_size, 16);
  CHECK_INT_EQ(a.head_dim, 64);
  CHECK(a.k && a.v && a.score && a.pos);
  /* every slot is writable (ASan checks the sizes) */
  for (int s = 0; s < 160; s++) {
    a.k[s * 64 + 63] = 1.0f;
    a.v[s * 64] = 2.0f;
    a.score[s] = 0.0f;
    a.pos[s] = s;
  }
  kv_arena_destroy(&a, be);
  CHECK(a.k == NULL && a.v == NULL);
  kv_arena_destroy(&a, be);
  kv_arena_destroy(NULL, be);
  k_backend_free(be);
}

/* The pool and an arena per part: arena q holds exactly part q's blocks. */
static void test_pool_arenas(void) {
  k_backend_t *be[3] = {NULL, NULL, NULL};
  for (int r = 0; r < 3; r++) CHECK_INT_EQ(k_cpu_backend_new(&be[r], 1), 0);
  kv_pool_t p;
  k_kv_arena_t a[3];
  CHECK_INT_EQ(kv_pool_arenas_init(&p, a, be, 10, 3, 16, 8), -EINVAL); /* unequal parts */
  CHECK_INT_EQ(p.n_parts, 0);
  kv_pool_arenas_destroy(&p, a, be); /* nothing to do */
  CHECK_INT_EQ(kv_pool_arenas_init(&p, a, be, 12, 3, 16, 8), 0);
  for (int32_t q = 0; q < 3; q++) {
    CHECK_INT_EQ(a[q].n_blocks, 4);
    CHECK_INT_EQ(a[q].first_block, 4 * q);
    CHECK(a[q].k && a[q].pos);
    a[q].pos[4 * 16 - 1] = q; /* the part's last slot is the arena's (ASan checks) */
  }
  CHECK_INT_EQ(kv_pool_free_count(&p), 12);
  kv_pool_arenas_destroy(&p, a, be);
  CHECK(p.n_parts == 0 && a[0].k == NULL && a[2].pos == NULL);
  CHECK_INT_EQ(kv_pool_arenas_init(&p, a, be, 5, 1, 16, 8), 0); /* unpartitioned: one arena */
  CHECK(a[0].n_blocks == 5 && a[0].first_block == 0);
  kv_pool_arenas_destroy(&p, a, be);
  for (int r = 0; r < 3; r++) k_backend_free(be[r]);
}

/* ---- sequences -------------------------------------------------------------- */

/* Invariants of one sequence: each head holds exactly the blocks its
 * context needs, every block is referenced in the pool. */
static void check_seq(const kv_seq_t *s, const kv_pool_t *p) {
  for (int32_t l = 0; l < s->n_layers; l++)
    for (int32_t h = 0; h < s->n_heads; h++) {
      int32_t i = l * s->n_heads + h;
      CHECK(s->ctx[i] >= 0);
      CHECK_INT_EQ(s->n_blocks[i], cdiv(s->ctx[i], s->block_size));
      CHECK(s->n_blocks[i] <= s->max_blocks);
      const int32_t *t = kv_seq_table(s, l, h);
      for (int32_t b = 0; b < s->n_blocks[i]; b++) {
        CHECK(t[b] >= 0 && t[b] < p->n_blocks);
        CHECK(p->refs[t[b]] >= 1);
      }
    }
}

static void test_seq_init(void) {
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, 0, 1, 16, 10), -EINVAL);
  CHECK_INT_EQ(kv_seq_init(&s, 1, 0, 16, 10), -EINVAL);
  CHECK_INT_EQ(kv_seq_init(&s, 1, 1, 0, 10), -EINVAL);
  CHECK_INT_EQ(kv_seq_init(&s, 1, 1, 16, 0), -EINVAL);
  CHECK_INT_EQ(kv_seq_init(&s, 1, 1, 16, -1), -EINVAL);
  kv_seq_destroy(&s, NULL);
  kv_seq_destroy(NULL, NULL);
  static const int32_t toks[][2] = {{1, 1}, {15, 1}, {16, 1}, {17, 2}, {32, 2}, {33, 3},
                                    {8192, 512}};
  for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
    CHECK_INT_EQ(kv_seq_init(&s, 2, 3, 16, toks[k][0]), 0);
    CHECK_INT_EQ(s.max_blocks, toks[k][1]);
    CHECK_INT_EQ(kv_seq_blocks_held(&s), 0);
    for (int32_t l = 0; l < 2; l++)
      for (int32_t h = 0; h < 3; h++) CHECK_INT_EQ(kv_seq_ctx(&s, l, h), 0);
    kv_seq_destroy(&s, NULL);
  }
}

static void test_seq_blocks_needed(void) {
  enum { L = 2, H = 3, B = 16 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 1000), 0);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, 1024), 0);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 0), 0);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 1), L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 17), 2 * L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 100), 7 * L * H);

  CHECK_INT_EQ(kv_seq_append(&s, &p, 15), 0); /* ctx 15 */
  CHECK_INT_EQ(kv_seq_blocks_held(&s), L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 1), 0); /* slot 15 is still in block 0 */
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 2), L * H);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 1), 0); /* ctx 16: block 0 full */
  CHECK_INT_EQ(kv_pool_used_count(&p), L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 0), 0);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 1), L * H); /* one new block per head */
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), L * H);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 17), 2 * L * H);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 1), 0); /* ctx 17 */
  CHECK_INT_EQ(kv_seq_blocks_held(&s), 2 * L * H);
  CHECK_INT_EQ(kv_pool_used_count(&p), 2 * L * H);
  for (int32_t l = 0; l < L; l++)
    for (int32_t h = 0; h < H; h++) CHECK_INT_EQ(kv_seq_ctx(&s, l, h), 17);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 15), 0);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), L * H);
  /* appending nothing changes nothing */
  CHECK_INT_EQ(kv_seq_append(&s, &p, 0), 0);
  CHECK_INT_EQ(kv_seq_blocks_held(&s), 2 * L * H);

  /* ragged heads (as after compression): head (1, 2) keeps 3 tokens */
  int32_t i = 1 * H + 2;
  kv_pool_release(&p, s.blocks[(int64_t)i * s.max_blocks + 1]);
  s.n_blocks[i] = 1;
  s.ctx[i] = 3;
  check_seq(&s, &p);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 13), 0);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 14), 1); /* others reach 31 (2 blocks), this one 17 */
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 16), L * H - 1 + 1);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 16), 0);
  CHECK_INT_EQ(kv_seq_ctx(&s, 1, 2), 19);
  CHECK_INT_EQ(kv_seq_ctx(&s, 0, 0), 33);
  check_seq(&s, &p);
  CHECK_INT_EQ(kv_seq_blocks_held(&s), (L * H - 1) * 3 + 2);
  CHECK_INT_EQ(kv_pool_used_count(&p), kv_seq_blocks_held(&s));
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_seq_destroy(&s, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 1000);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}

typedef struct snap {
  int32_t n_free;
  int32_t *free_ids, *refs;
  int32_t *blocks, *n_blocks, *ctx;
} snap_t;

static void snap_take(snap_t *sn, const kv_pool_t *p, const kv_seq_t *s) {
  int32_t heads = s->n_layers * s->n_heads;
  sn->n_free = p->n_free;
  sn->free_ids = malloc((size_t)p->n_blocks * sizeof(int32_t));
  sn->refs = malloc((size_t)p->n_blocks * sizeof(int32_t));
  sn->blocks = malloc((size_t)heads * (size_t)s->max_blocks * sizeof(int32_t));
  sn->n_blocks = malloc((size_t)heads * sizeof(int32_t));
  sn->ctx = malloc((size_t)heads * sizeof(int32_t));
  CHECK(sn->free_ids && sn->refs && sn->blocks && sn->n_blocks && sn->ctx);
  memcpy(sn->free_ids, p->free_ids, (size_t)p->n_free * sizeof(int32_t));
  for (int32_t i = 0; i < p->n_blocks; i++) sn->refs[i] = p->refs[i];
  memcpy(sn->n_blocks, s->n_blocks, (size_t)heads * sizeof(int32_t));
  memcpy(sn->ctx, s->ctx, (size_t)heads * sizeof(int32_t));
  for (int32_t i = 0; i < heads; i++)
    memcpy(sn->blocks + (int64_t)i * s->max_blocks, s->blocks + (int64_t)i * s->max_blocks,
           (size_t)s->n_blocks[i] * sizeof(int32_t));
}

/* The pool and the sequence are exactly as in the snapshot. */
static void snap_same(const snap_t *sn, const kv_pool_t *p, const kv_seq_t *s) {
  int32_t heads = s->n_layers * s->n_heads;
  CHECK_INT_EQ(p->n_free, sn->n_free);
  CHECK(memcmp(sn->free_ids, p->free_ids, (size_t)p->n_free * sizeof(int32_t)) == 0);
  for (int32_t i = 0; i < p->n_blocks; i++) CHECK_INT_EQ(p->refs[i], sn->refs[i]);
  CHECK(memcmp(sn->n_blocks, s->n_blocks, (size_t)heads * sizeof(int32_t)) == 0);
  CHECK(memcmp(sn->ctx, s->ctx, (size_t)heads * sizeof(int32_t)) == 0);
  for (int32_t i = 0; i < heads; i++)
    CHECK(memcmp(sn->blocks + (int64_t)i * s->max_blocks, s->blocks + (int64_t)i * s->max_blocks,
                 (size_t)s->n_blocks[i] * sizeof(int32_t)) == 0);
}

static void snap_free(snap_t *sn) {
  free(sn->free_ids);
  free(sn->refs);
  free(sn->blocks);
  free(sn->n_blocks);
  free(sn->ctx);
}

static void test_seq_append_all_or_nothing(void) {
  enum { L = 2, H = 2, B = 16 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 10), 0);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, 160), 0); /* 10 blocks per head */
  CHECK_INT_EQ(kv_seq_append(&s, &p, 20), 0);     /* 2 blocks per head: 8 */
  CHECK_INT_EQ(kv_pool_free_count(&p), 2);

  /* 13 more tokens need 1 block per head = 4 > 2 free: nothing happens */
  snap_t sn;
  snap_take(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, 13), 4);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 13), -ENOSPC);
  snap_same(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 100), -ENOSPC);
  snap_same(&sn, &p, &s);
  /* still room within the held blocks */
  CHECK_INT_EQ(kv_seq_append(&s, &p, 12), 0);
  CHECK_INT_EQ(kv_pool_free_count(&p), 2);
  snap_free(&sn);

  /* a second sequence takes the last two blocks only if it needs exactly
   * that many: L*H = 4 heads each need a block, so it cannot start */
  kv_seq_t s2;
  CHECK_INT_EQ(kv_seq_init(&s2, L, H, B, 160), 0);
  snap_take(&sn, &p, &s2);
  CHECK_INT_EQ(kv_seq_append(&s2, &p, 1), -ENOSPC);
  snap_same(&sn, &p, &s2);
  snap_free(&sn);
  kv_seq_t s3;
  CHECK_INT_EQ(kv_seq_init(&s3, 1, 2, B, 160), 0);
  CHECK_INT_EQ(kv_seq_append(&s3, &p, 16), 0); /* exactly the last two */
  CHECK_INT_EQ(kv_pool_free_count(&p), 0);
  CHECK_INT_EQ(kv_seq_append(&s3, &p, 0), 0);
  CHECK_INT_EQ(kv_seq_append(&s3, &p, 1), -ENOSPC);
  CHECK_INT_EQ(kv_pool_check(&p), 0);

  /* the pool refills when a sequence goes */
  kv_seq_destroy(&s, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 8);
  CHECK_INT_EQ(kv_seq_append(&s2, &p, 1), 0);
  kv_seq_destroy(&s2, &p);
  kv_seq_destroy(&s3, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 10);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}

static void test_seq_append_too_big(void) {
  enum { L = 2, H = 2, B = 16, MAXT = 64 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 1000), 0);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, MAXT), 0);
  snap_t sn;
  snap_take(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, MAXT + 1), -E2BIG);
  snap_same(&sn, &p, &s);
  snap_free(&sn);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 50), 0);
  snap_take(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 15), -E2BIG);
  snap_same(&sn, &p, &s);
  /* absurd counts must not wrap around */
  CHECK_INT_EQ(kv_seq_blocks_needed(&s, INT32_MAX), L * H * ((50 + (int64_t)INT32_MAX + 15) / B - 4));
  CHECK_INT_EQ(kv_seq_append(&s, &p, INT32_MAX), -E2BIG);
  snap_same(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, INT32_MAX - 20), -E2BIG);
  snap_same(&sn, &p, &s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, -1), -EINVAL);
  snap_same(&sn, &p, &s);
  snap_free(&sn);
  /* -E2BIG wins over -ENOSPC: the request can never fit */
  kv_pool_t small;
  CHECK_INT_EQ(kv_pool_init(&small, 1), 0);
  kv_seq_t s2;
  CHECK_INT_EQ(kv_seq_init(&s2, L, H, B, MAXT), 0);
  CHECK_INT_EQ(kv_seq_append(&s2, &small, MAXT + 1), -E2BIG);
  CHECK_INT_EQ(kv_seq_append(&s2, &small, 1), -ENOSPC);
  kv_seq_destroy(&s2, &small);
  kv_pool_destroy(&small);
  /* filling to exactly max_tokens works */
  CHECK_INT_EQ(kv_seq_append(&s, &p, MAXT - 50), 0);
  CHECK_INT_EQ(kv_seq_ctx(&s, 1, 1), MAXT);
  CHECK_INT_EQ(kv_seq_blocks_held(&s), L * H * (MAXT / B));
  CHECK_INT_EQ(kv_seq_append(&s, &p, 1), -E2BIG);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 0), 0);
  kv_seq_destroy(&s, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 1000);
  kv_pool_destroy(&p);
}

static void test_seq_slots(void) {
  enum { L = 3, H = 2, B = 16, N = 600 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  kv_pool_shuffle(&p, 1234);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, 200), 0);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 37), 0);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 1), 0);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 26), 0); /* ctx 64: exactly 4 blocks */
  CHECK_INT_EQ(kv_seq_append(&s, &p, 3), 0);  /* ctx 67 */
  uint8_t *used = calloc((size_t)N * B, 1);
  CHECK(used);
  for (int32_t l = 0; l < L; l++)
    for (int32_t h = 0; h < H; h++) {
      CHECK_INT_EQ(kv_seq_ctx(&s, l, h), 67);
      const int32_t *t = kv_seq_table(&s, l, h);
      CHECK(t == s.blocks + ((int64_t)l * H + h) * s.max_blocks);
      for (int32_t i = 0; i < 67; i++) {
        int32_t slot = kv_seq_slot(&s, l, h, i);
        CHECK_INT_EQ(slot, t[i / B] * B + i % B);
        CHECK(slot >= 0 && slot < N * B);
        CHECK(!used[slot]); /* no two (head, slot) pairs share a slot */
        used[slot] = 1;
      }
    }
  /* the shuffled pool scattered the blocks: not one contiguous run */
  const int32_t *t0 = kv_seq_table(&s, 0, 0);
  CHECK(t0[1] != t0[0] + 1 || t0[2] != t0[1] + 1 || t0[3] != t0[2] + 1);
  free(used);
  kv_seq_destroy(&s, &p);
  kv_pool_destroy(&p);
}

static void test_seq_reset_destroy(void) {
  enum { L = 4, H = 3, B = 16, N = 500 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  kv_pool_shuffle(&p, 99);
  kv_seq_t a, b;
  CHECK_INT_EQ(kv_seq_init(&a, L, H, B, 512), 0);
  CHECK_INT_EQ(kv_seq_init(&b, L, H, B, 512), 0);
  CHECK_INT_EQ(kv_seq_append(&a, &p, 100), 0);
  CHECK_INT_EQ(kv_seq_append(&b, &p, 33), 0);
  CHECK_INT_EQ(kv_pool_used_count(&p), L * H * (7 + 3));
  kv_seq_reset(&a, &p);
  CHECK_INT_EQ(kv_seq_blocks_held(&a), 0);
  for (int32_t l = 0; l < L; l++)
    for (int32_t h = 0; h < H; h++) CHECK_INT_EQ(kv_seq_ctx(&a, l, h), 0);
  CHECK_INT_EQ(kv_pool_used_count(&p), L * H * 3);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  /* reusable after a reset */
  CHECK_INT_EQ(kv_seq_append(&a, &p, 17), 0);
  CHECK_INT_EQ(kv_seq_blocks_held(&a), L * H * 2);
  check_seq(&a, &p);
  kv_seq_reset(&a, &p);
  kv_seq_reset(&a, &p); /* twice is harmless */
  kv_seq_destroy(&b, &p);
  CHECK(b.blocks == NULL && b.ctx == NULL);
  kv_seq_destroy(&a, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), N);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  kv_pool_destroy(&p);
}

/* ---- the kernels' view ------------------------------------------------------ */

/* The view reads the sequence's bookkeeping in place: the same table and
 * length for every head, through the accessors the kernels use. */
static void check_view(const kv_seq_t *s) {
  k_seq_kv_t v = kv_seq_view(s);
  CHECK_INT_EQ(v.n_obs, 0);
  CHECK(v.obs_mass == NULL && v.obs_last == NULL);
  for (int32_t l = 0; l < s->n_layers; l++)
    for (int32_t h = 0; h < s->n_heads; h++) {
      CHECK(k_seq_table(&v, l, s->n_heads, h) == kv_seq_table(s, l, h));
      CHECK_INT_EQ(k_seq_ctx(&v, l, s->n_heads, h), kv_seq_ctx(s, l, h));
    }
}

static void test_view(void) {
  enum { L = 2, H = 3, B = 16 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, 64), 0);
  kv_pool_shuffle(&p, 5);
  kv_seq_t s;
  CHECK_INT_EQ(kv_seq_init(&s, L, H, B, 64), 0);
  check_view(&s);
  CHECK_INT_EQ(kv_seq_append(&s, &p, 10), 0);
  /* heads of different lengths, as after compression */
  s.ctx[1 * H + 2] = 3;
  check_view(&s);
  k_seq_kv_t v = kv_seq_view(&s);
  CHECK_INT_EQ(k_seq_ctx(&v, 1, H, 2), 3);
  CHECK_INT_EQ(k_seq_ctx(&v, 1, H, 1), 10);
  CHECK_INT_EQ(k_seq_table(&v, 1, H, 2)[0], kv_seq_table(&s, 1, 2)[0]);
  CHECK_INT_EQ(v.stride, 4);
  kv_seq_destroy(&s, &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), 64);
  kv_pool_destroy(&p);
}

/* ---- stress ------------------------------------------------------------------ */

static void test_stress(void) {
  enum { NS = 12, L = 2, H = 2, B = 16, MAXT = 256, N = 300, STEPS = 20000 };
  kv_pool_t p;
  CHECK_INT_EQ(kv_pool_init(&p, N), 0);
  kv_pool_shuffle(&p, 2024);
  kv_seq_t *seqs = calloc(NS, sizeof *seqs);
  CHECK(seqs);
  for (int i = 0; i < NS; i++) CHECK_INT_EQ(kv_seq_init(&seqs[i], L, H, B, MAXT), 0);
  int32_t *owner = malloc(N * sizeof *owner);
  CHECK(owner);
  uint64_t rng = 31337;
  int n_ok = 0, n_nospc = 0, n_big = 0;
  for (int step = 0; step < STEPS; step++) {
    kv_seq_t *s = &seqs[rng_int(&rng, NS)];
    int32_t op = rng_int(&rng, 100);
    if (op < 70) { /* append */
      int32_t n = rng_int(&rng, 4) == 0 ? rng_int(&rng, 80) : 1 + rng_int(&rng, 3);
      int32_t need = kv_seq_blocks_needed(s, n), free_before = kv_pool_free_count(&p);
      int32_t held = kv_seq_blocks_held(s);
      bool too_big = false;
      for (int32_t i = 0; i < L * H; i++) too_big |= s->ctx[i] + n > MAXT;
      int rc = kv_seq_append(s, &p, n);
      if (too_big) {
        CHECK_INT_EQ(rc, -E2BIG);
        n_big++;
      } else if (need > free_before) {
        CHECK_INT_EQ(rc, -ENOSPC);
        n_nospc++;
      } else {
        CHECK_INT_EQ(rc, 0);
        n_ok++;
      }
      if (rc) {
        CHECK_INT_EQ(kv_pool_free_count(&p), free_before);
        CHECK_INT_EQ(kv_seq_blocks_held(s), held);
      } else {
        CHECK_INT_EQ(kv_pool_free_count(&p), free_before - need);
        CHECK_INT_EQ(kv_seq_blocks_held(s), held + need);
      }
    } else if (op < 78) { /* finish */
      kv_seq_reset(s, &p);
    } else if (op < 95) { /* compression: one head drops some trailing tokens */
      int32_t i = rng_int(&rng, L * H);
      int32_t keep = s->ctx[i] ? rng_int(&rng, s->ctx[i] + 1) : 0, nb = cdiv(keep, B);
      int32_t *t = s->blocks + (int64_t)i * s->max_blocks;
      for (int32_t k = nb; k < s->n_blocks[i]; k++) kv_pool_release(&p, t[k]);
      s->n_blocks[i] = nb;
      s->ctx[i] = keep;
    } else { /* scatter what is free */
      kv_pool_shuffle(&p, (uint64_t)step);
    }

    CHECK_INT_EQ(kv_pool_check(&p), 0);
    int32_t held = 0;
    for (int32_t k = 0; k < N; k++) owner[k] = -1;
    for (int i = 0; i < NS; i++) {
      check_seq(&seqs[i], &p);
      held += kv_seq_blocks_held(&seqs[i]);
      for (int32_t h = 0; h < L * H; h++)
        for (int32_t k = 0; k < seqs[i].n_blocks[h]; k++) {
          int32_t id = seqs[i].blocks[(int64_t)h * seqs[i].max_blocks + k];
          if (owner[id] != -1) FAIL_AT("step %d: block %d held twice", step, id);
          owner[id] = i;
          CHECK_INT_EQ(p.refs[id], 1);
        }
    }
    CHECK_INT_EQ(held, kv_pool_used_count(&p));

    if (step % 50 == 0)
      for (int i = 0; i < NS; i++) check_view(&seqs[i]);
  }
  fprintf(stderr, "   appends: %d ok, %d -ENOSPC, %d -E2BIG\n", n_ok, n_nospc, n_big);
  CHECK(n_ok > 1000 && n_nospc > 10 && n_big > 10);
  for (int i = 0; i < NS; i++) kv_seq_destroy(&seqs[i], &p);
  CHECK_INT_EQ(kv_pool_free_count(&p), N);
  CHECK_INT_EQ(kv_pool_check(&p), 0);
  free(owner);
  free(seqs);
  kv_pool_destroy(&p);
}

int main(void) {
  RUN(test_pool_basic);
  RUN(test_pool_refcounts);
  RUN(test_pool_check_detects);
  RUN(test_pool_shuffle);
  RUN(test_pool_parts);
  RUN(test_block_bytes_and_arena);
  RUN(test_pool_arenas);
  RUN(test_seq_init);
  RUN(test_seq_blocks_needed);
  RUN(test_seq_append_all_or_nothing);
  RUN(test_seq_append_too_big);
  RUN(test_seq_slots);
  RUN(test_seq_reset_destroy);
  RUN(test_view);
  RUN(test_stress);
  return 0;
}
