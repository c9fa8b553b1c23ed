/* The KV compression planner: the budget formula, KV-Compress's block costs
 * and global greedy on hand-set scores, hanging blocks, protected window and
 * sinks, uniform and ZigZagKV layer quotas, DBudgetKV's stop, memory
 * pressure, the StreamingLLM and random baselines, the compaction moves run
 * on a fake arena, and a randomized run checking the invariants. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "paged/compress.h"
#include "paged/pool.h"
#include "paged/seq.h"
#include "tests/test.h"


static float rng_float(uint64_t *s) { return (float)(rng_next(s) >> 40) / (float)(1 << 24); }

static int32_t cdiv(int32_t a, int32_t b) { return (a + b - 1) / b; }

/* ---- a sequence over a fake arena ------------------------------------------------ */

/* K and V are one float per slot: K = the KV's id (head * max_tokens +
 * logical slot at fill time), V = -id. */
typedef struct fx {
  int32_t L, H, B, T;
  kv_pool_t pool;
  kv_seq_t seq;
  int32_t n_slots;
  float *k, *v, *score; /* owns: [n_slots] */
  int32_t *pos;         /* owns: [n_slots] */
  /* a snapshot of the logical slots before compression */
  int32_t *ctx0;        /* owns: [L*H] */
  float *score0;        /* owns: [L*H][T] */
  int32_t *pos0;        /* owns: [L*H][T] */
  bool *gone;           /* owns: [L*H][T] evicted, by logical slot at fill time */
} fx_t;

static void fx_init(fx_t *f, int32_t L, int32_t H, int32_t B, int32_t T, uint64_t shuffle) {
  memset(f, 0, sizeof *f);
  f->L = L;
  f->H = H;
  f->B = B;
  f->T = T;
  CHECK_INT_EQ(kv_pool_init(&f->pool, L * H * cdiv(T, B) + 5), 0);
  if (shuffle) kv_pool_shuffle(&f->pool, shuffle);
  CHECK_INT_EQ(kv_seq_init(&f->seq, L, H, B, T), 0);
  f->n_slots = f->pool.n_blocks * B;
  f->k = malloc((size_t)f->n_slots * sizeof *f->k);
  f->v = malloc((size_t)f->n_slots * sizeof *f->v);
  f->score = malloc((size_t)f->n_slots * sizeof *f->score);
  f->pos = malloc((size_t)f->n_slots * sizeof *f->pos);
  size_t lht = (size_t)L * H * T;
  f->ctx0 = malloc((size_t)L * H * sizeof *f->ctx0);
  f->score0 = malloc(lht * sizeof *f->score0);
  f->pos0 = malloc(lht * sizeof *f->pos0);
  f->gone = malloc(lht * sizeof *f->gone);
  CHECK(f->k && f->v && f->score && f->pos && f->ctx0 && f->score0 && f->pos0 && f->gone);
  for (int32_t s = 0; s < f->n_slots; s++) {
    f->k[s] = f->v[s] = NAN;
    f->score[s] = NAN;
    f->pos[s] = -12345;
  }
}

static void fx_destroy(fx_t *f) {
  kv_seq_destroy(&f->seq, &f->pool);
  CHECK_INT_EQ(kv_pool_free_count(&f->pool), f->pool.n_blocks);
  CHECK_INT_EQ(kv_pool_check(&f->pool), 0);
  kv_pool_destroy(&f->pool);
  free(f->k);
  free(f->v);
  free(f->score);
  free(f->pos);
  free(f->ctx0);
  free(f->score0);
  free(f->pos0);
  free(f->gone);
}

static int32_t fx_slot(const fx_t *f, int32_t i, int32_t j) {
  return kv_seq_slot(&f->seq, i / f->H, i % f->H, j);
}

/* Every head gets n tokens at positions 0..n-1, then head i is cut to
 * ctx[i] (NULL: all keep n). Scores start at 0. */
static void fx_fill(fx_t *f, int32_t n, const int32_t *ctx) {
  CHECK_INT_EQ(kv_seq_append(&f->seq, &f->pool, n), 0);
  kv_seq_t *s = &f->seq;
  for (int32_t i = 0; i < f->L * f->H; i++) {
    if (ctx) {
      int32_t keep = cdiv(ctx[i], f->B);
      int32_t *t = s->blocks + (int64_t)i * s->max_blocks;
      for (int32_t b = keep; b < s->n_blocks[i]; b++) kv_pool_release(&f->pool, t[b]);
      s->n_blocks[i] = keep;
      s->ctx[i] = ctx[i];
    }
    for (int32_t j = 0; j < s->ctx[i]; j++) {
      int32_t slot = fx_slot(f, i, j);
      f->k[slot] = (float)(i * f->T + j);
      f->v[slot] = -f->k[slot];
      f->pos[slot] = j;
      f->score[slot] = 0.0f;
    }
  }
}

static void fx_set_score(fx_t *f, int32_t i, int32_t j, float x) { f->score[fx_slot(f, i, j)] = x; }

static kv_compress_input_t fx_input(const fx_t *f, int32_t n_tokens, int32_t last_pos) {
  return (kv_compress_input_t){.seq = &f->seq, .score = f->score, .pos = f->pos,
                               .n_tokens = n_tokens, .last_pos = last_pos, .group = 1};
}

static void fx_snapshot(fx_t *f) {
  for (int32_t i = 0; i < f->L * f->H; i++) {
    f->ctx0[i] = f->seq.ctx[i];
    for (int32_t j = 0; j < f->seq.ctx[i]; j++) {
      int32_t slot = fx_slot(f, i, j);
      CHECK_INT_EQ((int32_t)f->k[slot], i * f->T + j); /* ids as filled */
      f->score0[(size_t)i * f->T + j] = f->score[slot];
      f->pos0[(size_t)i * f->T + j] = f->pos[slot];
    }
  }
}

/* Run the plan's moves on the arena (as the backend would), apply it, and
 * check: moves disjoint, each survivor (K, V, position, score) exactly once
 * in logical slots [0, ctx'), the evicted ones gone, evict[] and block
 * counts consistent, the pool delta equal to blocks_freed. Fills gone[]. */
static void fx_run(fx_t *f, const kv_compress_plan_t *pl) {
  int32_t LH = f->L * f->H, B = f->B;
  fx_snapshot(f);
  CHECK_INT_EQ(pl->n_heads_total, LH);
  uint8_t *role = calloc((size_t)f->n_slots, 1);
  CHECK(role);
  for (int64_t m = 0; m < pl->n_moves; m++) {
    int32_t s = pl->src[m], d = pl->dst[m];
    CHECK(s >= 0 && s < f->n_slots && d >= 0 && d < f->n_slots);
    CHECK(!(role[s] & 1) && !(role[d] & 2)); /* each slot a source once, a target once */
    role[s] |= 1;
    role[d] |= 2;
  }
  for (int32_t s = 0; s < f->n_slots; s++) CHECK(role[s] != 3); /* never both */
  free(role);
  CHECK(pl->n_moves <= pl->tokens_evicted);
  for (int64_t m = 0; m < pl->n_moves; m++) {
    int32_t s = pl->src[m], d = pl->dst[m];
    f->k[d] = f->k[s];
    f->v[d] = f->v[s];
    f->score[d] = f->score[s];
    f->pos[d] = f->pos[s];
  }
  int32_t free0 = kv_pool_free_count(&f->pool);
  int64_t evicted = 0, freed = 0;
  for (int32_t i = 0; i < LH; i++) {
    int32_t e = pl->evict[i], c = f->seq.ctx[i];
    int32_t hang = c % B ? c % B : B;
    CHECK(e >= 0 && e <= c);
    if (e) CHECK_INT_EQ((e - hang) % B, 0); /* (n-1)*B + hang */
    evicted += e;
    freed += f->seq.n_blocks[i] - cdiv(c - e, B);
  }
  CHECK_INT_EQ(pl->tokens_evicted, evicted);
  CHECK_INT_EQ(pl->blocks_freed, freed);
  kv_compress_apply(pl, &f->seq, &f->pool);
  CHECK_INT_EQ(kv_pool_free_count(&f->pool), free0 + pl->blocks_freed);
  CHECK_INT_EQ(kv_pool_check(&f->pool), 0);
  CHECK_INT_EQ(kv_pool_used_count(&f->pool), kv_seq_blocks_held(&f->seq));
  for (int32_t i = 0; i < LH; i++) {
    int32_t c = f->seq.ctx[i];
    CHECK_INT_EQ(c, f->ctx0[i] - pl->evict[i]);
    CHECK_INT_EQ(f->seq.n_blocks[i], cdiv(c, B));
    if (pl->evict[i]) CHECK_INT_EQ(c % B, 0); /* every remaining block is full */
    bool *gone = f->gone + (size_t)i * f->T;
    for (int32_t j = 0; j < f->ctx0[i]; j++) gone[j] = true;
    for (int32_t j = 0; j < c; j++) {
      int32_t slot = fx_slot(f, i, j);
      int32_t id = (int32_t)f->k[slot], j0 = id - i * f->T;
      CHECK(j0 >= 0 && j0 < f->ctx0[i]);
      CHECK(gone[j0]); /* not seen twice */
      gone[j0] = false;
      CHECK(f->v[slot] == -f->k[slot]);
      CHECK_INT_EQ(f->pos[slot], f->pos0[(size_t)i * f->T + j0]);
      float s0 = f->score0[(size_t)i * f->T + j0];
      CHECK(f->score[slot] == s0 || (isnan(s0) && isnan(f->score[slot])));
    }
    int32_t n_gone = 0;
    for (int32_t j = 0; j < f->ctx0[i]; j++) n_gone += gone[j];
    CHECK_INT_EQ(n_gone, pl->evict[i]);
  }
}

static bool fx_gone(const fx_t *f, int32_t i, int32_t j) { return f->gone[(size_t)i * f->T + j]; }

/* ---- budget ------------------------------------------------------------------------ */

static void test_params_default(void) {
  kv_compress_params_t p;
  memset(&p, 0xAB, sizeof p);
  kv_compress_params_default(&p);
  CHECK_INT_EQ(p.policy, KV_POLICY_KVCOMPRESS);
  CHECK_INT_EQ(p.layer_budget, KV_LAYER_GLOBAL);
  CHECK(p.ratio == 0.0);
  CHECK_INT_EQ(p.max_cache_tokens, 0);
  CHECK_INT_EQ(p.min_tokens, 128);
  CHECK_INT_EQ(p.protected_window, 32);
  CHECK_INT_EQ(p.sinks, 4);
  CHECK_NEAR(p.dbudget_threshold, 0.01, 1e-7);
  CHECK(p.dbudget_mass);
  CHECK_NEAR(p.zigzag_tau, 0.9, 1e-7);
  CHECK_NEAR(p.zigzag_bound, 0.2, 1e-7);
  CHECK_INT_EQ(p.seed, 0);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK(pl.evict == NULL && pl.src == NULL && pl.scratch == NULL && pl.n_moves == 0);
  kv_compress_plan_destroy(&pl);
  kv_compress_plan_destroy(NULL);
}

static void test_budget_tokens(void) {
  kv_compress_params_t p;
  kv_compress_params_default(&p);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 1000); /* no ratio: no limit */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 0, 16), 0);
  p.ratio = 1; /* keeps everything */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 1000);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1024, 16), 1024);
  p.ratio = 1.25; /* floor((floor(1000 / 1.25) - 1) / 16) * 16 */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 784);
  p.ratio = 2;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 496); /* floor(499/16)*16 */
  p.ratio = 4;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 240);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 4000, 16), 992);
  p.ratio = 8;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 128); /* 112, floored at min_tokens */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 8000, 16), 992);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 10, 16), 128);
  p.ratio = 3;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 320); /* floor(332/16)*16 */
  p.ratio = 2.5;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 384); /* 400-1 -> 384 */
  p.min_tokens = 0;
  p.ratio = 8;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 112);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 16, 16), 0); /* floor(1/16)*16 */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 0, 16), 0);  /* floor(-1/16) = -1: max with 0 */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 4), 124);
  p.min_tokens = 128;
  p.max_cache_tokens = 300; /* wins over the ratio */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 300);
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 10, 16), 300);
  p.max_cache_tokens = 0;
  p.ratio = 0.5; /* invalid: no limit */
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 1000, 16), 1000);
  p.ratio = 0;
  CHECK_INT_EQ(kv_compress_budget_tokens(&p, 777, 16), 777);
}

/* ---- KV-Compress --------------------------------------------------------------------- */

/* Sorted scores and block costs of the heads below (B = 4):
 *   head 0 (l0 h0) ctx 10, hang 2: 1..10 scrambled    costs 2, 6, 10
 *   head 1 (l0 h1) ctx 10, hang 2: 0.5..9.5           costs 1.5, 5.5, 9.5
 *   head 2 (l1 h0) ctx  8, hang 4: .3 .35 .4 .45 30.. costs 0.45, 33
 *   head 3 (l1 h1) ctx 10, hang 2: .1 .. .9, 50       costs 0.2, 0.6, 50 */
static const float tiny_scores[4][10] = {
    {5, 1, 9, 2, 8, 3, 7, 4, 6, 10},
    {1.5f, 0.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f, 8.5f, 9.5f},
    {0.3f, 0.35f, 0.4f, 0.45f, 30, 31, 32, 33, 0, 0},
    {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f, 50},
};
static const int32_t tiny_ctx[4] = {10, 10, 8, 10};

static void tiny_setup(fx_t *f) {
  fx_init(f, 2, 2, 4, 12, 3);
  fx_fill(f, 10, tiny_ctx);
  for (int32_t i = 0; i < 4; i++)
    for (int32_t j = 0; j < tiny_ctx[i]; j++) fx_set_score(f, i, j, tiny_scores[i][j]);
}

static void tiny_params(kv_compress_params_t *p, int32_t max_cache_tokens) {
  kv_compress_params_default(p);
  p->max_cache_tokens = max_cache_tokens;
  p->protected_window = 0;
  p->sinks = 0;
}

static void test_global_exact(void) {
  fx_t f;
  tiny_setup(&f);
  kv_compress_params_t p;
  tiny_params(&p, 6); /* budget: ceil(6 * 4 / 4) = 6 of 11 blocks: 5 go */
  kv_compress_input_t in = fx_input(&f, 10, 9);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  /* cheapest five: 0.2 (h3), 0.45 (h2), 0.6 (h3), 1.5 (h1), 2 (h0) */
  CHECK_INT_EQ(pl.budget_blocks, 6);
  CHECK_INT_EQ(pl.evict[0], 2);     /* n=1, hang 2 */
  CHECK_INT_EQ(pl.evict[1], 2);
  CHECK_INT_EQ(pl.evict[2], 4);     /* n=1, hang 4 (full last block) */
  CHECK_INT_EQ(pl.evict[3], 4 + 2); /* n=2 */
  CHECK_INT_EQ(pl.tokens_evicted, 14);
  CHECK_INT_EQ(pl.blocks_freed, 5);
  CHECK(!pl.pressure_overrode);
  /* head 0 evicts scores 1, 2 = logical 1, 3; survivors 9, 8 fill them */
  int32_t m0 = -1;
  for (int64_t m = 0; m < pl.n_moves; m++)
    if (pl.src[m] == fx_slot(&f, 0, 9)) m0 = (int32_t)m;
  CHECK(m0 >= 0);
  CHECK_INT_EQ(pl.dst[m0], fx_slot(&f, 0, 1));
  CHECK_INT_EQ(pl.src[m0 + 1], fx_slot(&f, 0, 8));
  CHECK_INT_EQ(pl.dst[m0 + 1], fx_slot(&f, 0, 3));
  fx_run(&f, &pl);
  for (int32_t j = 0; j < 10; j++) {
    CHECK(fx_gone(&f, 0, j) == (j == 1 || j == 3)); /* scores 1, 2 */
    CHECK(fx_gone(&f, 1, j) == (j == 0 || j == 1)); /* scores 1.5, 0.5 */
    CHECK(fx_gone(&f, 3, j) == (j < 6));            /* scores 0.1 .. 0.6 */
  }
  for (int32_t j = 0; j < 8; j++) CHECK(fx_gone(&f, 2, j) == (j < 4));
  CHECK_INT_EQ(f.seq.ctx[0], 8);
  CHECK_INT_EQ(f.seq.ctx[1], 8);
  CHECK_INT_EQ(f.seq.ctx[2], 4);
  CHECK_INT_EQ(f.seq.ctx[3], 4);
  CHECK_INT_EQ(kv_seq_blocks_held(&f.seq), 6);
  /* head 3's survivors 9, 8, 7, 6 fill 0, 1, 2, 3, the tail first */
  for (int32_t j = 0; j < 4; j++) CHECK_INT_EQ(f.pos[fx_slot(&f, 3, j)], 9 - j);
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

/* per_query: a KV's score is divided by the queries that saw it
 * (last_pos + 1 - max(pos, obs_start)), so an old KV with a large sum can
 * rank below a young one with a smaller sum; raw sums keep the old one. */
static void test_per_query(void) {
  enum { L = 1, H = 1, B = 4, N = 16 };
  for (int pq = 0; pq < 2; pq++) {
    fx_t f;
    fx_init(&f, L, H, B, N, 0);
    fx_fill(&f, N, NULL);
    /* positions 0..15, last 15: seen by 16 - p queries (obs_start 0) */
    for (int32_t j = 0; j < N; j++) fx_set_score(&f, 0, j, 1.0f);
    fx_set_score(&f, 0, 1, 1.8f); /* 1.8 / 15 = 0.12 per query, below 8's 1 / 8 */
    fx_set_score(&f, 0, 9, 2.0f); /* 2 / 7 = 0.29 */
    kv_compress_params_t p;
    kv_compress_params_default(&p);
    p.max_cache_tokens = 8; /* 2 of 4 blocks go: 8 KVs */
    p.min_tokens = 0;
    p.sinks = 0;
    p.protected_window = 0;
    p.per_query = pq;
    kv_compress_input_t in = fx_input(&f, N, N - 1);
    kv_compress_plan_t pl;
    kv_compress_plan_init(&pl);
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
    CHECK_INT_EQ(pl.evict[0], 8);
    fx_run(&f, &pl);
    for (int32_t j = 0; j < N; j++) {
      if (pq) /* per query, 1 / (16 - p) and 0.12 for 1: the oldest eight go, 1 among them */
        CHECK(fx_gone(&f, 0, j) == (j < 8));
      else /* raw sums: 1 and 9 stay; the 1.0 ties go in slot order */
        CHECK(fx_gone(&f, 0, j) == (j == 0 || (j >= 2 && j <= 8)));
    }
    kv_compress_plan_destroy(&pl);
    fx_destroy(&f);
  }
}

/* Ratio 1 keeps every KV, whatever the policy: ctx 10 per head would
 * otherwise give up its hanging blocks to the global budget. */
static void test_ratio_one(void) {
  const kv_policy_t pols[] = {KV_POLICY_KVCOMPRESS, KV_POLICY_STREAMING, KV_POLICY_RANDOM};
  for (int k = 0; k < 3; k++) {
    fx_t f;
    fx_init(&f, 2, 3, 4, 40, 5);
    fx_fill(&f, 30, NULL);
    for (int32_t i = 0; i < 6; i++)
      for (int32_t j = 0; j < 30; j++) fx_set_score(&f, i, j, (float)((i * 7 + j * 13) % 11));
    kv_compress_params_t p;
    kv_compress_params_default(&p);
    p.policy = pols[k];
    p.ratio = 1;
    p.min_tokens = 0;
    p.protected_window = 0;
    p.sinks = 0;
    kv_compress_input_t in = fx_input(&f, 30, 29);
    kv_compress_plan_t pl;
    kv_compress_plan_init(&pl);
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
    CHECK_INT_EQ(pl.tokens_evicted, 0);
    CHECK_INT_EQ(pl.blocks_freed, 0);
    p.ratio = 1.5; /* a real budget does take blocks */
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
    CHECK(pl.blocks_freed > 0);
    kv_compress_plan_destroy(&pl);
    fx_destroy(&f);
  }
}

/* The global order, block by block: as the budget shrinks, each head gives
 * up a growing prefix of its cost list, one block at a time. */
static void test_global_monotone(void) {
  static const int32_t order[] = {3, 2, 3, 1, 0, 1, 0, 1, 0, 2, 3}; /* by cost */
  int32_t want[4] = {0, 0, 0, 0};
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  for (int32_t need = 0; need <= 11; need++) {
    fx_t f;
    tiny_setup(&f);
    kv_compress_params_t p;
    tiny_params(&p, 11 - need); /* budget 11 - need blocks */
    if (need == 11) { /* a zero budget: by a huge ratio, no floor */
      p.max_cache_tokens = 0;
      p.ratio = 1000;
      p.min_tokens = 0;
    }
    kv_compress_input_t in = fx_input(&f, 10, 9);
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0); /* the plan is reused */
    if (need > 0) want[order[need - 1]]++;
    for (int32_t i = 0; i < 4; i++) {
      int32_t hang = tiny_ctx[i] % 4 ? tiny_ctx[i] % 4 : 4;
      CHECK_INT_EQ(pl.evict[i], want[i] ? (want[i] - 1) * 4 + hang : 0);
    }
    CHECK_INT_EQ(pl.blocks_freed, need);
    fx_run(&f, &pl);
    fx_destroy(&f);
  }
  kv_compress_plan_destroy(&pl);
}

/* Ties in cost go to the lower head, then the earlier block. */
static void test_global_ties(void) {
  fx_t f;
  fx_init(&f, 1, 3, 4, 8, 0);
  fx_fill(&f, 8, NULL); /* all scores 0 */
  kv_compress_params_t p;
  tiny_params(&p, 4); /* 6 blocks held, budget 3 */
  kv_compress_input_t in = fx_input(&f, 8, 7);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 4);
  CHECK_INT_EQ(pl.evict[2], 0);
  /* within a head, equal scores go by logical slot */
  fx_run(&f, &pl);
  for (int32_t j = 0; j < 8; j++) CHECK(fx_gone(&f, 1, j) == (j < 4));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

static void test_protected(void) {
  fx_t f;
  fx_init(&f, 1, 1, 4, 16, 0);
  fx_fill(&f, 16, NULL);
  /* the lowest scores on the sinks (0, 1) and the window (12..15) */
  for (int32_t j = 0; j < 16; j++)
    fx_set_score(&f, 0, j, j < 2 || j >= 12 ? -100.0f : (float)j);
  kv_compress_params_t p;
  tiny_params(&p, 4); /* keep 1 of 4 blocks */
  p.sinks = 2;
  p.protected_window = 4; /* pos > 15 - 4 */
  kv_compress_input_t in = fx_input(&f, 16, 15);
  in.min_free_blocks = 4; /* not even pressure breaks the rule */
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  /* 10 evictable, hang 4: at most 2 blocks */
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.blocks_freed, 2);
  CHECK(!pl.pressure_overrode); /* nothing more could be taken */
  fx_run(&f, &pl);
  for (int32_t j = 0; j < 16; j++) CHECK(fx_gone(&f, 0, j) == (j >= 2 && j < 10));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);

  /* +inf and NaN scores stay; only the rest can go */
  fx_init(&f, 1, 1, 4, 16, 0);
  fx_fill(&f, 16, NULL);
  for (int32_t j = 0; j < 16; j++) fx_set_score(&f, 0, j, (float)j);
  fx_set_score(&f, 0, 0, INFINITY);
  fx_set_score(&f, 0, 5, NAN);
  fx_set_score(&f, 0, 6, -INFINITY);
  tiny_params(&p, 1);
  in = fx_input(&f, 16, 15);
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 12); /* 14 evictable: 3 blocks */
  fx_run(&f, &pl);
  CHECK(!fx_gone(&f, 0, 0) && !fx_gone(&f, 0, 5) && fx_gone(&f, 0, 6));
  CHECK(!fx_gone(&f, 0, 15) && !fx_gone(&f, 0, 14) && fx_gone(&f, 0, 13));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);

  /* one +inf: 15 evictable, 3 blocks of 4 at most even when all are asked */
  fx_init(&f, 1, 1, 4, 16, 0);
  fx_fill(&f, 16, NULL);
  fx_set_score(&f, 0, 9, INFINITY);
  in = fx_input(&f, 16, 15);
  in.min_free_blocks = 100;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 12);
  fx_run(&f, &pl);
  CHECK(!fx_gone(&f, 0, 9));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

/* -0 and +0 are the same score: the lower slot goes first. */
static void test_signed_zero(void) {
  fx_t f;
  fx_init(&f, 1, 1, 1, 8, 0);
  fx_fill(&f, 8, NULL);
  for (int32_t j = 0; j < 8; j++) fx_set_score(&f, 0, j, 1.0f);
  fx_set_score(&f, 0, 2, 0.0f);
  fx_set_score(&f, 0, 5, -0.0f);
  kv_compress_params_t p;
  tiny_params(&p, 7); /* B = 1: one KV goes */
  kv_compress_input_t in = fx_input(&f, 8, 7);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 1);
  fx_run(&f, &pl);
  for (int32_t j = 0; j < 8; j++) CHECK(fx_gone(&f, 0, j) == (j == 2));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

/* Layer 0 cheap, layer 1 dear. Global takes most from layer 0, uniform the
 * same from both. */
static void test_uniform(void) {
  for (int mode = 0; mode < 2; mode++) {
    fx_t f;
    fx_init(&f, 2, 2, 4, 16, 9);
    fx_fill(&f, 16, NULL);
    for (int32_t i = 0; i < 4; i++)
      for (int32_t j = 0; j < 16; j++)
        fx_set_score(&f, i, j, (i >= 2 ? 100.0f : 0.0f) + (float)j + (i % 2 ? 0.5f : 0.0f));
    kv_compress_params_t p;
    tiny_params(&p, 6);
    p.layer_budget = mode ? KV_LAYER_UNIFORM : KV_LAYER_GLOBAL;
    kv_compress_input_t in = fx_input(&f, 16, 15);
    kv_compress_plan_t pl;
    kv_compress_plan_init(&pl);
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
    if (mode) {
      /* quota ceil(6 * 2 / 4) = 3 per layer: 5 of 8 go in each;
       * costs h0 3, 7, 11, 15 against h1 3.5, 7.5, 11.5, 15.5 */
      CHECK_INT_EQ(pl.budget_blocks, 6);
      CHECK_INT_EQ(pl.evict[0], 12);
      CHECK_INT_EQ(pl.evict[1], 8);
      CHECK_INT_EQ(pl.evict[2], 12);
      CHECK_INT_EQ(pl.evict[3], 8);
      CHECK_INT_EQ(pl.blocks_freed, 10);
    } else {
      /* budget 6 of 16: 10 go, the 8 of layer 0 first */
      CHECK_INT_EQ(pl.budget_blocks, 6);
      CHECK_INT_EQ(pl.evict[0], 16);
      CHECK_INT_EQ(pl.evict[1], 16);
      CHECK_INT_EQ(pl.evict[2], 4);
      CHECK_INT_EQ(pl.evict[3], 4);
      CHECK_INT_EQ(pl.blocks_freed, 10);
    }
    fx_run(&f, &pl);
    kv_compress_plan_destroy(&pl);
    fx_destroy(&f);
  }
}

/* ---- ZigZagKV ------------------------------------------------------------------------- */

/* Layer 0 puts all its mass on one slot (MBA 1), layer 1 spreads it evenly
 * over 32 (MBA 1 + #{(i+1)/32 < 0.9} = 29). */
static void test_zigzag(void) {
  enum { L = 2, H = 1, B = 4, T = 32 };
  size_t span = (size_t)cdiv(T, B) * B;
  float *mass = calloc((size_t)L * H * span, sizeof *mass);
  CHECK(mass);
  mass[7] = 1.0f;
  for (int32_t j = 0; j < T; j++) mass[span + j] = 1.0f / 32;
  for (int round = 0; round < 3; round++) {
    fx_t f;
    fx_init(&f, L, H, B, T, 5);
    fx_fill(&f, T, NULL);
    for (int32_t i = 0; i < L * H; i++)
      for (int32_t j = 0; j < T; j++) fx_set_score(&f, i, j, (float)((j * 7) % T));
    kv_compress_params_t p;
    tiny_params(&p, 12);
    p.layer_budget = KV_LAYER_ZIGZAG;
    kv_compress_input_t in = fx_input(&f, T, T - 1);
    in.obs_mass = round == 2 ? NULL : mass;
    if (round == 1) p.protected_window = 8;
    kv_compress_plan_t pl;
    kv_compress_plan_init(&pl);
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
    if (round == 0) {
      /* B = 2.4 + 9.6 * 2 * {1, 29} / 30 = 3.04, 20.96: quotas 1 and 6 */
      CHECK_INT_EQ(pl.budget_blocks, 7);
      CHECK_INT_EQ(pl.evict[0], 28);
      CHECK_INT_EQ(pl.evict[1], 8);
    } else if (round == 1) {
      /* layer 0 clamped up to the window (8), layer 1 gets 24 - 8 = 16 */
      CHECK_INT_EQ(pl.budget_blocks, 6);
      CHECK_INT_EQ(pl.evict[0], 24);
      CHECK_INT_EQ(pl.evict[1], 16);
    } else {
      /* no mass: uniform, quota ceil(12 / 4) = 3 each */
      CHECK_INT_EQ(pl.budget_blocks, 6);
      CHECK_INT_EQ(pl.evict[0], 20);
      CHECK_INT_EQ(pl.evict[1], 20);
    }
    fx_run(&f, &pl);
    if (round < 2) CHECK(f.seq.ctx[1] > f.seq.ctx[0]); /* the diffuse layer keeps more */
    kv_compress_plan_destroy(&pl);
    fx_destroy(&f);
  }
  free(mass);
}

/* MBA counts the sorted prefix strictly below tau * total: with tau 0.5,
 * layer 0 (0.5 on two slots) has MBA 1, layer 1 (1/128 each) MBA 64.
 * B = 8 + 32 * 2 * {1, 64} / 65 = 8.98, 71.02 tokens; B = 1: quotas 9, 72. */
static void test_zigzag_mba(void) {
  enum { L = 2, H = 1, B = 1, T = 128 };
  float *mass = calloc((size_t)L * T, sizeof *mass);
  CHECK(mass);
  mass[17] = mass[90] = 0.5f;
  for (int32_t j = 0; j < T; j++) mass[T + j] = 1.0f / T;
  fx_t f;
  fx_init(&f, L, H, B, T, 0);
  fx_fill(&f, T, NULL);
  kv_compress_params_t p;
  tiny_params(&p, 40);
  p.layer_budget = KV_LAYER_ZIGZAG;
  p.zigzag_tau = 0.5f;
  kv_compress_input_t in = fx_input(&f, T, T - 1);
  in.obs_mass = mass;
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], T - 9);
  CHECK_INT_EQ(pl.evict[1], T - 72);
  CHECK_INT_EQ(pl.budget_blocks, 81);
  fx_run(&f, &pl);
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
  free(mass);
}

/* Two layers' budgets are clamped at n_tokens; the rest goes to the others
 * in proportion. */
static void test_zigzag_clamp_high(void) {
  enum { L = 4, H = 1, B = 4, T = 64 };
  size_t span = (size_t)T;
  float *mass = calloc((size_t)L * span, sizeof *mass);
  CHECK(mass);
  /* layers 0, 1 diffuse over 64 (MBA 58), layers 2, 3 on one slot (MBA 1) */
  for (int32_t l = 0; l < 2; l++)
    for (int32_t j = 0; j < T; j++) mass[l * span + j] = 1.0f / 64;
  mass[2 * span + 3] = 1.0f;
  mass[3 * span + 9] = 1.0f;
  fx_t f;
  fx_init(&f, L, H, B, T, 0);
  fx_fill(&f, T, NULL);
  kv_compress_params_t p;
  tiny_params(&p, 40);
  p.layer_budget = KV_LAYER_ZIGZAG;
  kv_compress_input_t in = fx_input(&f, T, T - 1);
  in.obs_mass = mass;
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  /* B = 8 + 32 * 4 * {58, 58, 1, 1} / 118 = 70.9, 70.9, 9.08, 9.08: the two
   * first clamp to 64, the 160 - 128 = 32 left split evenly: 16, 16 */
  CHECK_INT_EQ(pl.evict[0], 0);
  CHECK_INT_EQ(pl.evict[1], 0);
  CHECK_INT_EQ(pl.evict[2], 48);
  CHECK_INT_EQ(pl.evict[3], 48);
  CHECK_INT_EQ(pl.budget_blocks, 16 + 16 + 4 + 4);
  fx_run(&f, &pl);
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
  free(mass);
}

/* ---- DBudgetKV -------------------------------------------------------------------------- */

/* L = 2, H = 1, G = 2, B = 4, 16 tokens, window 4: 12 evictable, 3 blocks
 * at most, scores rank by position. Layer 0: a^2 tiny on 0..7 and 0.25 on
 * 8..11, so two blocks cost nothing and the third everything. Layer 1: a^2
 * even (0.0625), a block costs 1 - sqrt(8/12) = 0.18 at once. */
typedef struct dfx {
  fx_t f;
  float *a2;
  size_t span;
} dfx_t;

static void dfx_init(dfx_t *d) {
  enum { L = 2, H = 1, G = 2, B = 4, T = 16 };
  fx_init(&d->f, L, H, B, T, 11);
  fx_fill(&d->f, T, NULL);
  for (int32_t i = 0; i < L * H; i++)
    for (int32_t j = 0; j < T; j++) fx_set_score(&d->f, i, j, (float)j + (float)i * 0.5f);
  d->span = (size_t)cdiv(T, B) * B;
  d->a2 = calloc((size_t)L * H * G * d->span, sizeof *d->a2);
  CHECK(d->a2);
  for (int32_t g = 0; g < G; g++)
    for (int32_t j = 0; j < T; j++) {
      d->a2[(size_t)(0 * G + g) * d->span + j] = j < 8 ? 1e-6f : j < 12 ? 0.25f : 5.0f;
      d->a2[(size_t)(1 * G + g) * d->span + j] = j < 12 ? 0.0625f : 7.0f;
    }
}

static void dfx_params(kv_compress_params_t *p, kv_compress_input_t *in, dfx_t *d) {
  kv_compress_params_default(p);
  p->policy = KV_POLICY_DBUDGET;
  p->protected_window = 4;
  p->sinks = 0;
  p->dbudget_threshold = 0.05f;
  p->dbudget_mass = false; /* the norm, unless a case says otherwise */
  *in = fx_input(&d->f, 16, 15);
  in->group = 2;
  in->obs_last = d->a2;
}

static void dfx_destroy(dfx_t *d) {
  fx_destroy(&d->f);
  free(d->a2);
}

static void test_dbudget(void) {
  kv_compress_params_t p;
  kv_compress_input_t in;
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  dfx_t d;

  /* T = 0.05: layer 0 drops two blocks, layer 1 none */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 0);
  CHECK_INT_EQ(pl.budget_blocks, 8 - 2);
  CHECK(!pl.pressure_overrode);
  fx_run(&d.f, &pl);
  for (int32_t j = 0; j < 16; j++) CHECK(fx_gone(&d.f, 0, j) == (j < 8));
  dfx_destroy(&d);

  /* T = 0.2: layer 1 gives one block (drop 0.18), not two (0.42) */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  p.dbudget_threshold = 0.2f;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 4);
  fx_run(&d.f, &pl);
  dfx_destroy(&d);

  /* a budget caps the pruning: 14 tokens = 7 blocks of 8, so one goes */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  p.max_cache_tokens = 14;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 4);
  CHECK_INT_EQ(pl.evict[1], 0);
  CHECK_INT_EQ(pl.budget_blocks, 7);
  fx_run(&d.f, &pl);
  dfx_destroy(&d);
  /* ... but never beyond DBudget's own stop */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  p.max_cache_tokens = 4;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 0);
  fx_run(&d.f, &pl);
  dfx_destroy(&d);

  /* memory pressure: 4 blocks wanted, DBudget gives 2; the next cheapest
   * are layer 1's first two (costs 3.5, 7.5 < layer 0's third, 11) */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  in.min_free_blocks = 4;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 8);
  CHECK_INT_EQ(pl.blocks_freed, 4);
  CHECK_INT_EQ(pl.budget_blocks, 6); /* what DBudget alone would keep */
  CHECK(pl.pressure_overrode);
  fx_run(&d.f, &pl);
  dfx_destroy(&d);
  /* pressure already met: nothing overridden */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  in.min_free_blocks = 2;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.blocks_freed, 2);
  CHECK(!pl.pressure_overrode);
  dfx_destroy(&d);

  /* no attention on the evictable KVs: everything evictable may go */
  dfx_init(&d);
  for (int32_t g = 0; g < 2; g++)
    for (int32_t j = 0; j < 12; j++) d.a2[(size_t)g * d.span + j] = 0.0f;
  dfx_params(&p, &in, &d);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 12);
  CHECK_INT_EQ(pl.evict[1], 0);
  fx_run(&d.f, &pl);
  for (int32_t j = 0; j < 16; j++) CHECK(fx_gone(&d.f, 0, j) == (j < 12));
  dfx_destroy(&d);

  /* the mean runs over all query heads of the layer: g 1 of layer 1 has no
   * mass on evictable KVs, the drop is still 1 - sqrt(8/12) */
  dfx_init(&d);
  for (int32_t j = 0; j < 12; j++) d.a2[(size_t)3 * d.span + j] = 0.0f;
  dfx_params(&p, &in, &d);
  p.dbudget_threshold = 0.19f;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[1], 4);
  p.dbudget_threshold = 0.18f;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[1], 0);
  dfx_destroy(&d);

  /* the mass criterion: layer 1's a = 0.25 each over 12 evictable KVs, so a
   * block costs 1 - 8/12 = 0.33 of the mass (0.18 of the norm); layer 0's
   * first two blocks hold 0.008 of 2.008, the third the rest */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  p.dbudget_mass = true;
  p.dbudget_threshold = 0.2f; /* the norm lets a block of layer 1 go (above), the mass not */
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 0);
  p.dbudget_threshold = 0.34f;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[1], 4);
  p.dbudget_threshold = 0.33f;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[1], 0);
  p.dbudget_threshold = 0.003f; /* below layer 0's 0.004 */
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 4); /* one block: 0.002 */
  fx_run(&d.f, &pl);
  dfx_destroy(&d);

  /* obs_last is required */
  dfx_init(&d);
  dfx_params(&p, &in, &d);
  in.obs_last = NULL;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  in.obs_last = d.a2;
  in.group = 0;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  dfx_destroy(&d);
  kv_compress_plan_destroy(&pl);
}

/* ---- memory pressure --------------------------------------------------------------------- */

static void test_pressure(void) {
  fx_t f;
  tiny_setup(&f);
  kv_compress_params_t p;
  tiny_params(&p, 0); /* no ratio: KV-Compress alone plans nothing */
  kv_compress_input_t in = fx_input(&f, 10, 9);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.tokens_evicted, 0);
  CHECK_INT_EQ(pl.n_moves, 0);
  CHECK_INT_EQ(pl.blocks_freed, 0);
  CHECK_INT_EQ(pl.budget_blocks, 11);
  /* three blocks asked: 0.2 (h3), 0.45 (h2), 0.6 (h3) */
  in.min_free_blocks = 3;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK(pl.pressure_overrode);
  CHECK_INT_EQ(pl.evict[0], 0);
  CHECK_INT_EQ(pl.evict[1], 0);
  CHECK_INT_EQ(pl.evict[2], 4);
  CHECK_INT_EQ(pl.evict[3], 6);
  CHECK_INT_EQ(pl.blocks_freed, 3);
  /* the budget already frees enough (5 >= 3): no override */
  tiny_params(&p, 6);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK(!pl.pressure_overrode);
  CHECK_INT_EQ(pl.blocks_freed, 5);
  /* more than the budget: the next cheapest, 5.5 (h1) and 6 (h0) */
  in.min_free_blocks = 7;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK(pl.pressure_overrode);
  CHECK_INT_EQ(pl.blocks_freed, 7);
  CHECK_INT_EQ(pl.budget_blocks, 6);
  CHECK_INT_EQ(pl.evict[0], 6);
  CHECK_INT_EQ(pl.evict[1], 6);
  /* more than can go: all of it, and no more */
  in.min_free_blocks = 100;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.blocks_freed, 11);
  fx_run(&f, &pl);
  for (int32_t i = 0; i < 4; i++) CHECK_INT_EQ(f.seq.ctx[i], 0);
  /* KV_POLICY_NONE plans nothing */
  p.policy = KV_POLICY_NONE;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.blocks_freed, 0);
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

/* ---- baselines ------------------------------------------------------------------------ */

static void test_streaming(void) {
  fx_t f;
  fx_init(&f, 1, 2, 4, 20, 2);
  fx_fill(&f, 20, NULL);
  uint64_t rng = 99;
  for (int32_t i = 0; i < 2; i++)
    for (int32_t j = 0; j < 20; j++) fx_set_score(&f, i, j, rng_float(&rng)); /* ignored */
  kv_compress_params_t p;
  tiny_params(&p, 8); /* quota ceil(8 * 2 / 4) = 4 of 10 */
  p.policy = KV_POLICY_STREAMING;
  p.sinks = 2;
  p.protected_window = 4;
  kv_compress_input_t in = fx_input(&f, 20, 19);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 12);
  CHECK_INT_EQ(pl.evict[1], 12);
  fx_run(&f, &pl);
  /* the sinks and the 6 newest stay */
  for (int32_t i = 0; i < 2; i++)
    for (int32_t j = 0; j < 20; j++) CHECK(fx_gone(&f, i, j) == (j >= 2 && j < 14));
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);

  /* a smaller cut: the oldest go first, head by head */
  fx_init(&f, 1, 2, 4, 20, 2);
  fx_fill(&f, 20, NULL);
  tiny_params(&p, 14); /* quota 7 of 10: 3 go */
  p.policy = KV_POLICY_STREAMING;
  p.sinks = 2;
  p.protected_window = 4;
  in = fx_input(&f, 20, 19);
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.evict[0], 8);
  CHECK_INT_EQ(pl.evict[1], 4);
  fx_run(&f, &pl);
  for (int32_t j = 0; j < 20; j++) {
    CHECK(fx_gone(&f, 0, j) == (j >= 2 && j < 10));
    CHECK(fx_gone(&f, 1, j) == (j >= 2 && j < 6));
  }
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

static void random_run(uint64_t seed, bool *gone_out) {
  fx_t f;
  fx_init(&f, 2, 2, 4, 24, 4);
  fx_fill(&f, 24, NULL);
  kv_compress_params_t p;
  tiny_params(&p, 12); /* quota 6 of 12 per layer */
  p.policy = KV_POLICY_RANDOM;
  p.sinks = 3;
  p.protected_window = 5;
  p.seed = seed;
  kv_compress_input_t in = fx_input(&f, 24, 23);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.blocks_freed, 12);
  fx_run(&f, &pl);
  for (int32_t i = 0; i < 4; i++)
    for (int32_t j = 0; j < 24; j++) {
      if (j < 3 || j > 18) CHECK(!fx_gone(&f, i, j));
      gone_out[i * 24 + j] = fx_gone(&f, i, j);
    }
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

static void test_random(void) {
  bool a[96], b[96], c[96];
  random_run(1, a);
  random_run(1, b);
  random_run(2, c);
  CHECK(memcmp(a, b, sizeof a) == 0); /* seeded */
  CHECK(memcmp(a, c, sizeof a) != 0);
  /* not just the oldest */
  bool oldest = true;
  for (int32_t i = 0; i < 4; i++)
    for (int32_t j = 3; j < 19; j++) oldest &= a[i * 24 + j] == (j < 15);
  CHECK(!oldest);
  /* heads of a layer are shuffled differently */
  CHECK(memcmp(a, a + 24, 24 * sizeof *a) != 0);
}

/* ---- bad input ---------------------------------------------------------------------- */

/* Scores across prefill chunks: set aside before a window (the fresh slots
 * and the rest of each row 0 in prev, the old scores zeroed), then the
 * larger of the two per slot. Heads of different lengths, shuffled blocks. */
static void test_scores_across_chunks(void) {
  fx_t f;
  fx_init(&f, 2, 2, 4, 24, 99);
  const int32_t ctx[4] = {10, 7, 13, 4};
  fx_fill(&f, 13, ctx);
  const int32_t L = 2 * 2, per_head = f.seq.max_blocks * f.B;
  for (int32_t i = 0; i < L; i++)
    for (int32_t j = 0; j < ctx[i]; j++) fx_set_score(&f, i, j, (float)(i * 100 + j));
  float *prev = malloc((size_t)L * per_head * sizeof *prev);
  for (int32_t x = 0; x < L * per_head; x++) prev[x] = NAN; /* stale */
  const int32_t fresh = 3;
  kv_scores_set_aside(&f.seq, f.score, fresh, prev);
  for (int32_t i = 0; i < L; i++)
    for (int32_t j = 0; j < per_head; j++) {
      bool old = j < ctx[i] - fresh;
      CHECK(prev[(size_t)i * per_head + j] == (old ? (float)(i * 100 + j) : 0.0f));
      if (j < ctx[i] && old) CHECK(f.score[fx_slot(&f, i, j)] == 0.0f);
      if (j < ctx[i] && !old) CHECK(f.score[fx_slot(&f, i, j)] == (float)(i * 100 + j));
    }
  /* the window scores every slot; half above what was set aside */
  for (int32_t i = 0; i < L; i++)
    for (int32_t j = 0; j < ctx[i]; j++) fx_set_score(&f, i, j, j % 2 ? 1000.0f : 0.5f);
  kv_scores_merge_max(&f.seq, f.score, prev);
  for (int32_t i = 0; i < L; i++)
    for (int32_t j = 0; j < ctx[i]; j++) {
      float before = j < ctx[i] - fresh ? (float)(i * 100 + j) : 0.0f;
      float now = j % 2 ? 1000.0f : 0.5f;
      CHECK(f.score[fx_slot(&f, i, j)] == (before > now ? before : now));
    }
  free(prev);
  fx_destroy(&f);
}

static void test_invalid(void) {
  fx_t f;
  tiny_setup(&f);
  kv_compress_params_t p;
  tiny_params(&p, 6);
  kv_compress_input_t in = fx_input(&f, 10, 9);
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  CHECK_INT_EQ(kv_compress_plan(&pl, NULL, &in), -EINVAL);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, NULL), -EINVAL);
  in.score = NULL;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  in = fx_input(&f, 10, 9);
  in.pos = NULL;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  in = fx_input(&f, 10, 9);
  p.ratio = 0.5;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  p.ratio = -1;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  p.ratio = NAN;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  tiny_params(&p, -1);
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  tiny_params(&p, 6);
  p.policy = (kv_policy_t)42;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  tiny_params(&p, 6);
  in.min_free_blocks = -1;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  in = fx_input(&f, 10, 9);
  f.seq.ctx[1] = 13; /* more than its 3 blocks hold */
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), -EINVAL);
  f.seq.ctx[1] = 10;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.blocks_freed, 5);
  kv_compress_plan_destroy(&pl);
  fx_destroy(&f);
}

/* ---- randomized -------------------------------------------------------------------------- */

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

/* A parallel loop for the planner that runs on this thread, last head
 * first, as three threads would share it out. */
static void reverse_run(void *ctx, int64_t n, kv_par_fn fn, void *arg) {
  (void)ctx;
  for (int64_t i = n - 1; i >= 0; i--) fn(arg, i, (int32_t)(i % 3));
}

static void test_randomized(void) {
  uint64_t rng = 2024;
  kv_compress_plan_t pl, pl_par;
  kv_compress_plan_init(&pl);
  kv_compress_plan_init(&pl_par);
  pl_par.par = (kv_par_t){.run = reverse_run, .threads = 3};
  int32_t counts[5] = {0};
  for (int iter = 0; iter < 600; iter++) {
    int32_t L = 1 + rng_int(&rng, 3), H = 1 + rng_int(&rng, 3);
    static const int32_t bs[] = {1, 2, 4, 16};
    int32_t B = bs[rng_int(&rng, 4)], T = 1 + rng_int(&rng, 80), G = 1 + rng_int(&rng, 3);
    fx_t f;
    fx_init(&f, L, H, B, T, rng_next(&rng) | 1);
    int32_t n = rng_int(&rng, T + 1);
    int32_t *ctx = malloc((size_t)L * H * sizeof *ctx);
    CHECK(ctx);
    for (int32_t i = 0; i < L * H; i++) ctx[i] = rng_int(&rng, 4) ? n : rng_int(&rng, n + 1);
    fx_fill(&f, n, ctx);
    free(ctx);
    int32_t levels = 1 + rng_int(&rng, 20); /* few levels: many ties */
    for (int32_t i = 0; i < L * H; i++)
      for (int32_t j = 0; j < f.seq.ctx[i]; j++)
        fx_set_score(&f, i, j, (float)rng_int(&rng, levels) - 3.0f);
    kv_compress_params_t p;
    kv_compress_params_default(&p);
    p.policy = (kv_policy_t)(1 + rng_int(&rng, 4));
    p.layer_budget = (kv_layer_budget_t)rng_int(&rng, 3);
    p.sinks = rng_int(&rng, 4);
    p.protected_window = rng_int(&rng, 10);
    p.min_tokens = rng_int(&rng, 20);
    p.seed = rng_next(&rng);
    p.dbudget_threshold = rng_float(&rng) * 0.3f;
    switch (rng_int(&rng, 4)) {
    case 0: break;
    case 1: p.ratio = 1.0 + rng_float(&rng) * 7; break;
    default: p.max_cache_tokens = 1 + rng_int(&rng, T); break;
    }
    kv_compress_input_t in = fx_input(&f, n, n - 1 + rng_int(&rng, 3));
    in.min_free_blocks = rng_int(&rng, 3) ? 0 : rng_int(&rng, L * H * cdiv(T, B) + 2);
    size_t span = (size_t)f.seq.max_blocks * B;
    float *mass = malloc((size_t)L * H * span * sizeof *mass);
    float *a2 = malloc((size_t)L * H * G * span * sizeof *a2);
    CHECK(mass && a2);
    for (size_t k = 0; k < (size_t)L * H * span; k++) mass[k] = rng_float(&rng);
    for (size_t k = 0; k < (size_t)L * H * G * span; k++) {
      float x = rng_float(&rng);
      a2[k] = x * x * x * x;
    }
    in.obs_mass = mass;
    in.obs_last = a2;
    in.group = G;
    counts[p.policy]++;

    int rc = kv_compress_plan(&pl, &p, &in);
    CHECK_INT_EQ(rc, 0);
    /* the heads ranked through a parallel loop: the same plan */
    CHECK_INT_EQ(kv_compress_plan(&pl_par, &p, &in), 0);
    CHECK_INT_EQ(pl_par.n_moves, pl.n_moves);
    CHECK(!memcmp(pl_par.evict, pl.evict, (size_t)L * H * sizeof *pl.evict));
    for (int64_t m = 0; m < pl.n_moves; m++)
      CHECK(pl_par.src[m] == pl.src[m] && pl_par.dst[m] == pl.dst[m]);
    /* what the test expects of each head */
    int32_t LH = L * H;
    int64_t sum_nmax = 0, sum_cnt = 0, sum_full = 0;
    bool all_at_max = true;
    bool rank_score = p.policy == KV_POLICY_KVCOMPRESS || p.policy == KV_POLICY_DBUDGET;
    float max_taken_cost = -INFINITY, min_next_cost = INFINITY;
    float *sorted = malloc((size_t)(T + 1) * sizeof *sorted);
    CHECK(sorted);
    for (int32_t i = 0; i < LH; i++) {
      int32_t c = f.seq.ctx[i], hang = c % B ? c % B : B, e = 0;
      for (int32_t j = 0; j < c; j++) {
        int32_t slot = fx_slot(&f, i, j), ps = f.pos[slot];
        if ((int64_t)ps > (int64_t)in.last_pos - p.protected_window || ps < p.sinks) continue;
        sorted[e++] = f.score[slot];
      }
      qsort(sorted, (size_t)e, sizeof *sorted, cmp_float);
      int32_t nmax = c > 0 && e >= hang ? (e - hang) / B + 1 : 0;
      int32_t ev = pl.evict[i], cnt = ev ? (ev - hang) / B + 1 : 0;
      CHECK(cnt <= nmax);
      sum_nmax += nmax;
      sum_cnt += cnt;
      sum_full += cdiv(c, B);
      all_at_max &= cnt == nmax;
      if (cnt > 0 && sorted[(cnt - 1) * B + hang - 1] > max_taken_cost)
        max_taken_cost = sorted[(cnt - 1) * B + hang - 1];
      if (cnt < nmax && sorted[cnt * B + hang - 1] < min_next_cost)
        min_next_cost = sorted[cnt * B + hang - 1];
    }
    free(sorted);
    CHECK_INT_EQ(pl.blocks_freed, sum_cnt);
    if (in.min_free_blocks) CHECK(sum_cnt >= in.min_free_blocks || all_at_max);
    if (pl.pressure_overrode) CHECK(sum_cnt <= in.min_free_blocks);
    bool budget = p.max_cache_tokens > 0 || p.ratio >= 1;
    int32_t bt = kv_compress_budget_tokens(&p, n, B);
    if (p.policy == KV_POLICY_KVCOMPRESS && p.layer_budget == KV_LAYER_GLOBAL) {
      /* the cheapest blocks: no block left is cheaper than one taken */
      CHECK(max_taken_cost <= min_next_cost);
      int64_t need = budget ? sum_full - ((int64_t)bt * LH + B - 1) / B : 0;
      if (need < 0) need = 0;
      if (need > sum_nmax) need = sum_nmax;
      int64_t want = need > in.min_free_blocks ? need : in.min_free_blocks;
      CHECK_INT_EQ(sum_cnt, want < sum_nmax ? want : sum_nmax);
      CHECK(!pl.pressure_overrode || want > need);
    }
    if (!budget && p.policy != KV_POLICY_DBUDGET && !in.min_free_blocks)
      CHECK_INT_EQ(sum_cnt, 0);

    fx_run(&f, &pl);
    /* protected kept; the evicted are the lowest ranked of their head */
    for (int32_t i = 0; i < LH; i++) {
      float max_gone = -INFINITY, min_kept = INFINITY;
      for (int32_t j = 0; j < f.ctx0[i]; j++) {
        int32_t ps = f.pos0[(size_t)i * T + j];
        float sc = f.score0[(size_t)i * T + j];
        bool prot = (int64_t)ps > (int64_t)in.last_pos - p.protected_window || ps < p.sinks;
        if (prot) {
          CHECK(!fx_gone(&f, i, j));
          continue;
        }
        float key = p.policy == KV_POLICY_STREAMING ? (float)ps : sc;
        if (fx_gone(&f, i, j)) max_gone = key > max_gone ? key : max_gone;
        else min_kept = key < min_kept ? key : min_kept;
      }
      if (rank_score || p.policy == KV_POLICY_STREAMING) CHECK(max_gone <= min_kept);
      if (p.policy == KV_POLICY_STREAMING && max_gone > -INFINITY) CHECK(max_gone < min_kept);
    }
    free(mass);
    free(a2);
    fx_destroy(&f);
  }
  for (int k = 1; k < 5; k++) CHECK(counts[k] > 50);
  kv_compress_plan_destroy(&pl);
  kv_compress_plan_destroy(&pl_par);
}

/* ---- cost ------------------------------------------------------------------------------ */

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void test_timing(void) {
  enum { L = 30, H = 3, B = 16, T = 2000, G = 3 };
  fx_t f;
  fx_init(&f, L, H, B, T, 77);
  fx_fill(&f, T, NULL);
  uint64_t rng = 5;
  for (int32_t i = 0; i < L * H; i++)
    for (int32_t j = 0; j < T; j++) fx_set_score(&f, i, j, rng_float(&rng));
  size_t span = (size_t)f.seq.max_blocks * B;
  float *mass = malloc((size_t)L * H * span * sizeof *mass);
  float *a2 = malloc((size_t)L * H * G * span * sizeof *a2);
  CHECK(mass && a2);
  for (size_t k = 0; k < (size_t)L * H * span; k++) mass[k] = rng_float(&rng);
  for (size_t k = 0; k < (size_t)L * H * G * span; k++) a2[k] = rng_float(&rng) * 1e-4f;
  kv_compress_params_t p;
  kv_compress_params_default(&p);
  p.ratio = 8;
  kv_compress_input_t in = fx_input(&f, T, T - 1);
  in.obs_mass = mass;
  in.obs_last = a2;
  in.group = G;
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  static const struct {
    kv_policy_t policy;
    kv_layer_budget_t split;
    const char *name;
  } runs[] = {
      {KV_POLICY_KVCOMPRESS, KV_LAYER_GLOBAL, "kvcompress/global"},
      {KV_POLICY_KVCOMPRESS, KV_LAYER_UNIFORM, "kvcompress/uniform"},
      {KV_POLICY_KVCOMPRESS, KV_LAYER_ZIGZAG, "kvcompress/zigzag"},
      {KV_POLICY_DBUDGET, KV_LAYER_GLOBAL, "dbudget"},
      {KV_POLICY_STREAMING, KV_LAYER_GLOBAL, "streaming"},
      {KV_POLICY_RANDOM, KV_LAYER_GLOBAL, "random"},
  };
  for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
    p.policy = runs[r].policy;
    p.layer_budget = runs[r].split;
    p.ratio = p.policy == KV_POLICY_DBUDGET ? 0 : 8;
    CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0); /* warm: scratch sized */
    enum { REPS = 5 };
    double best = 1e30;
    for (int k = 0; k < REPS; k++) {
      double t0 = now_ms();
      CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
      double t = now_ms() - t0;
      best = t < best ? t : best;
    }
    fprintf(stderr, "   plan %dx%dx%d %-20s %.2f ms, %d blocks freed, %lld moves\n", T, L, H,
            runs[r].name, best, pl.blocks_freed, (long long)pl.n_moves);
    if (p.policy != KV_POLICY_DBUDGET) {
      /* 8x: budget floor(249/16)*16 = 240 tokens a head */
      CHECK(pl.blocks_freed >= L * H * (cdiv(T, B) - 15) - L);
    }
  }
  /* and the whole thing run once */
  p.policy = KV_POLICY_KVCOMPRESS;
  p.layer_budget = KV_LAYER_GLOBAL;
  p.ratio = 8;
  CHECK_INT_EQ(kv_compress_plan(&pl, &p, &in), 0);
  CHECK_INT_EQ(pl.budget_blocks, 240 * L * H / B);
  fx_run(&f, &pl);
  CHECK_INT_EQ(kv_seq_blocks_held(&f.seq), 240 * L * H / B);
  kv_compress_plan_destroy(&pl);
  free(mass);
  free(a2);
  fx_destroy(&f);
}

/* ---- through the backend ---------------------------------------------------
 * A sequence prefilled on the CPU backend, compressed (plan, kv_move,
 * apply), then queried: each head's attention equals dense attention, in
 * double, over exactly the KVs that survived, taken from a copy of the cache
 * made before compaction. */
static void test_attention_after_compaction(void) {
  enum { L = 2, H = 2, G = 2, D = 32, B = 16, N = 150, NB = 64 };
  k_backend_t *be = NULL;
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  /* fp32 attention (the int8 arithmetic may round to bf16): what is checked
   * here is which keys survive and where, against a dense reference */
  be->numerics = K_NUMERICS_EXACT;
  k_kv_arena_t a;
  CHECK_INT_EQ(kv_arena_init(&a, be, NB, B, D), 0);
  kv_pool_t pool;
  CHECK_INT_EQ(kv_pool_init(&pool, NB), 0);
  kv_pool_shuffle(&pool, 99);
  kv_seq_t seq;
  CHECK_INT_EQ(kv_seq_init(&seq, L, H, B, 256), 0);
  CHECK_INT_EQ(kv_seq_append(&seq, &pool, N), 0);
  uint64_t rng = 2024;
  /* the original cache: per head, K, V, score of position t (slot t) */
  float *k0 = malloc(sizeof(float) * L * H * N * D), *v0 = malloc(sizeof(float) * L * H * N * D);
  float *sc0 = malloc(sizeof(float) * L * H * N);
  CHECK(k0 && v0 && sc0);
  for (int32_t i = 0; i < L * H; i++)
    for (int32_t t = 0; t < N; t++) {
      int32_t sl = kv_seq_slot(&seq, i / H, i % H, t);
      for (int32_t d = 0; d < D; d++) {
        k0[((int64_t)i * N + t) * D + d] = a.k[(int64_t)sl * D + d] = rng_float(&rng) * 2 - 1;
        v0[((int64_t)i * N + t) * D + d] = a.v[(int64_t)sl * D + d] = rng_float(&rng) * 2 - 1;
      }
      a.pos[sl] = t;
      a.score[sl] = sc0[i * N + t] = rng_float(&rng);
    }
  kv_compress_params_t prm;
  kv_compress_params_default(&prm);
  prm.ratio = 3;
  prm.min_tokens = 16;
  prm.protected_window = 8;
  kv_compress_plan_t pl;
  kv_compress_plan_init(&pl);
  kv_compress_input_t in = {.seq = &seq, .score = a.score, .pos = a.pos, .n_tokens = N,
                            .last_pos = N - 1, .group = G};
  CHECK_INT_EQ(kv_compress_plan(&pl, &prm, &in), 0);
  CHECK(pl.blocks_freed > 0);
  CHECK_INT_EQ(be->ops->kv_move(be, &a, pl.src, pl.dst, pl.n_moves), 0);
  int32_t used = kv_pool_used_count(&pool);
  kv_compress_apply(&pl, &seq, &pool);
  CHECK_INT_EQ(used - kv_pool_used_count(&pool), pl.blocks_freed);

  /* survivors: the positions each head still holds, each once, every
   * evicted one scoring no more than every evictable survivor */
  bool *alive = calloc((size_t)L * H * N, 1);
  CHECK(alive);
  for (int32_t i = 0; i < L * H; i++) {
    int32_t c = kv_seq_ctx(&seq, i / H, i % H);
    CHECK_INT_EQ(c, N - pl.evict[i]);
    for (int32_t j = 0; j < c; j++) {
      int32_t sl = kv_seq_slot(&seq, i / H, i % H, j), p = a.pos[sl];
      CHECK(p >= 0 && p < N && !alive[i * N + p]);
      alive[i * N + p] = true;
      CHECK_NEAR(a.score[sl], sc0[i * N + p], 0);
      for (int32_t d = 0; d < D; d++) CHECK_NEAR(a.k[(int64_t)sl * D + d], k0[((int64_t)i * N + p) * D + d], 0);
    }
    float max_evicted = -1, min_kept = 2;
    for (int32_t p = prm.sinks; p < N - prm.protected_window; p++) {
      if (alive[i * N + p]) min_kept = sc0[i * N + p] < min_kept ? sc0[i * N + p] : min_kept;
      else max_evicted = sc0[i * N + p] > max_evicted ? sc0[i * N + p] : max_evicted;
    }
    CHECK(max_evicted <= min_kept);
  }

  /* one query row at position N - 1, both layers */
  float q[H * G * D], out[H * G * D];
  for (int32_t t = 0; t < H * G * D; t++) q[t] = (rng_float(&rng) * 2 - 1) * 3;
  const int32_t q_start[2] = {0, 1}, q_pos[1] = {N - 1};
  k_seq_kv_t view = kv_seq_view(&seq);
  for (int32_t l = 0; l < L; l++) {
    k_attn_args_t args = {.n_seqs = 1, .layer = l, .n_q_heads = H * G, .n_kv_heads = H,
                          .head_dim = D, .scale = 0.25f, .q = q, .out = out,
                          .q_start = q_start, .q_pos = q_pos, .seqs = &view};
    CHECK_INT_EQ(be->ops->attention(be, &a, &args), 0);
    for (int32_t qh = 0; qh < H * G; qh++) {
      int32_t i = l * H + qh / G;
      double w[N], mx = -1e300, sum = 0;
      for (int32_t p = 0; p < N; p++) {
        if (!alive[i * N + p]) continue;
        double dot = 0;
        for (int32_t d = 0; d < D; d++) dot += (double)q[qh * D + d] * k0[((int64_t)i * N + p) * D + d];
        w[p] = dot * 0.25;
        mx = w[p] > mx ? w[p] : mx;
      }
      for (int32_t p = 0; p < N; p++)
        if (alive[i * N + p]) sum += (w[p] = exp(w[p] - mx));
      for (int32_t d = 0; d < D; d++) {
        double want = 0;
        for (int32_t p = 0; p < N; p++)
          if (alive[i * N + p]) want += w[p] / sum * v0[((int64_t)i * N + p) * D + d];
        CHECK_NEAR(out[qh * D + d], want, 1e-5);
      }
    }
  }
  free(alive);
  free(k0);
  free(v0);
  free(sc0);
  kv_compress_plan_destroy(&pl);
  kv_seq_destroy(&seq, &pool);
  CHECK_INT_EQ(kv_pool_free_count(&pool), NB);
  kv_pool_destroy(&pool);
  kv_arena_destroy(&a, be);
  k_backend_free(be);
}

int main(void) {
  RUN(test_params_default);
  RUN(test_budget_tokens);
  RUN(test_global_exact);
  RUN(test_per_query);
  RUN(test_ratio_one);
  RUN(test_global_monotone);
  RUN(test_global_ties);
  RUN(test_protected);
  RUN(test_signed_zero);
  RUN(test_uniform);
  RUN(test_zigzag);
  RUN(test_zigzag_mba);
  RUN(test_zigzag_clamp_high);
  RUN(test_dbudget);
  RUN(test_pressure);
  RUN(test_streaming);
  RUN(test_random);
  RUN(test_scores_across_chunks);
  RUN(test_invalid);
  RUN(test_randomized);
  RUN(test_attention_after_compaction);
  RUN(test_timing);
  fprintf(stderr, "all compress tests passed\n");
  return 0;
}
