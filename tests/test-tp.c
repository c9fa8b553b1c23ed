/* Tensor parallelism on the CPU: the thread communicator's all-reduce and
 * its abort, the weight shards, and a sharded forward at N = 2 and 3 giving
 * the logits of N = 1 (dummy weights of a shape both divide; the real
 * SmolLM2 GGUF, quantised, at N = 3). */
#include <errno.h>
#include <pthread.h>

#include "kernels/comm.h"
#include "model/gguf.h"
#include "model/group.h"
#include "paged/pool.h"
#include "paged/seq.h"
#include "test.h"

/* ---- the communicator ---------------------------------------------------- */

typedef struct ar_arg {
  k_comm_t *c;
  int32_t rank;
  float *buf;
  int64_t n;
  int rounds;
  bool fail; /* this rank aborts instead of reducing */
  int rc;
} ar_arg_t;

static void *ar_main(void *p) {
  ar_arg_t *a = p;
  for (int i = 0; i < a->rounds && !a->rc; i++) {
    if (a->fail) {
      a->c->ops->abort(a->c);
      a->rc = -EIO;
      break;
    }
    a->rc = a->c->ops->all_reduce_sum(a->c, a->rank, a->buf, a->n);
  }
  return NULL;
}

static void test_all_reduce(void) {
  for (int32_t N = 1; N <= 4; N++) {
    k_comm_t *c;
    CHECK_INT_EQ(k_comm_cpu_new(&c, N), 0);
    const int64_t n = 1001; /* not a multiple of N */
    float *bufs = malloc((size_t)(N * n) * sizeof(float));
    pthread_t th[4];
    ar_arg_t args[4];
    for (int32_t r = 0; r < N; r++) {
      for (int64_t i = 0; i < n; i++) bufs[r * n + i] = (float)(r + 1) * 0.5f + (float)i;
      args[r] = (ar_arg_t){c, r, bufs + r * n, n, 1, false, 0};
      CHECK_INT_EQ(pthread_create(&th[r], NULL, ar_main, &args[r]), 0);
    }
    for (int32_t r = 0; r < N; r++) pthread_join(th[r], NULL);
    for (int32_t r = 0; r < N; r++) {
      CHECK_INT_EQ(args[r].rc, 0);
      for (int64_t i = 0; i < n; i++) {
        float want = 0;
        for (int32_t q = 0; q < N; q++) want += (float)(q + 1) * 0.5f + (float)i;
        CHECK(bufs[r * n + i] == want); /* rank order: bit-identical */
      }
    }
    /* many rounds back to back (generations), then one rank failing: the
     * others return -ECANCELED instead of waiting forever; reset recovers */
    for (int32_t r = 0; r < N; r++) {
      args[r] = (ar_arg_t){c, r, bufs + r * n, n, 200, false, 0};
      pthread_create(&th[r], NULL, ar_main, &args[r]);
    }
    for (int32_t r = 0; r < N; r++) pthread_join(th[r], NULL);
    for (int32_t r = 0; r < N; r++) CHECK_INT_EQ(args[r].rc, 0);
    if (N > 1) {
      for (int32_t r = 0; r < N; r++) {
        args[r] = (ar_arg_t){c, r, bufs + r * n, n, 1, r == N - 1, 0};
        pthread_create(&th[r], NULL, ar_main, &args[r]);
      }
      for (int32_t r = 0; r < N; r++) pthread_join(th[r], NULL);
      for (int32_t r = 0; r < N - 1; r++) CHECK_INT_EQ(args[r].rc, -ECANCELED);
      c->ops->reset(c);
      for (int32_t r = 0; r < N; r++) {
        args[r] = (ar_arg_t){c, r, bufs + r * n, n, 3, false, 0};
        pthread_create(&th[r], NULL, ar_main, &args[r]);
      }
      for (int32_t r = 0; r < N; r++) pthread_join(th[r], NULL);
      for (int32_t r = 0; r < N; r++) CHECK_INT_EQ(args[r].rc, 0);
    }
    free(bufs);
    k_comm_free(c);
  }
}

/* ---- sharded forward ----------------------------------------------------- */

typedef struct tp_run {
  int32_t n;
  k_backend_t *bes[4];
  model_weights_t shards[4];
  const k_kv_arena_t *kvs[4];
  k_comm_t *comm;
  model_group_t g;
  kv_pool_t pool;
  k_kv_arena_t arenas[4]; /* one shared, or one per rank */
  int32_t n_arenas;
  kv_seq_t seq;
} tp_run_t;

/* Teacher-forced logits of tokens[0..n) (prefill in chunks of `chunk`, then
 * one token per step) from the weights w (on a CPU backend) split over N
 * ranks; all[n][V]. per_rank: each rank keeps its KV heads' blocks in an
 * arena of its own (the pool cut in N parts), as on devices; else the
 * ranks share one. */
static void run_tp(const model_weights_t *w, int32_t N, bool per_rank, const int32_t *tokens,
                   int32_t n, int32_t prefill, int32_t chunk, float *all) {
  tp_run_t t = {.n = N, .n_arenas = per_rank ? N : 1};
  const model_config_t *c = &w->cfg;
  char err[256];
  const int32_t V = c->n_vocab, B = 16, per_head = (n + B - 1) / B;
  const int32_t n_blocks = per_head * c->n_layers * c->n_kv_heads + 3 * t.n_arenas;
  CHECK_INT_EQ(kv_seq_init(&t.seq, c->n_layers, c->n_kv_heads, B, n), 0);
  CHECK_INT_EQ(kv_seq_set_parts(&t.seq, t.n_arenas), 0);
  if (N > 1) CHECK_INT_EQ(k_comm_cpu_new(&t.comm, N), 0);
  for (int32_t r = 0; r < N; r++) {
    CHECK_INT_EQ(k_cpu_backend_new(&t.bes[r], 1), 0);
    t.bes[r]->numerics = w->be->numerics;
    if (N > 1 && model_weights_shard(&t.shards[r], w, r, N, t.bes[r], err, sizeof err))
      FAIL_AT("shard %d/%d: %s", r, N, err);
    t.kvs[r] = &t.arenas[per_rank ? r : 0];
  }
  CHECK_INT_EQ(kv_pool_arenas_init(&t.pool, t.arenas, t.bes, n_blocks, t.n_arenas, B, c->head_dim),
               0);
  kv_pool_shuffle(&t.pool, 7);
  if (model_group_init(&t.g, N, N > 1 ? t.shards : w, t.bes, t.kvs, t.comm, chunk, chunk, err,
                       sizeof err))
    FAIL_AT("group: %s", err);
  int32_t pos[256], rows[256];
  for (int32_t done = 0; done < n;) {
    int32_t m = done < prefill ? (prefill - done < chunk ? prefill - done : chunk) : 1;
    CHECK(m <= 256);
    CHECK_INT_EQ(kv_seq_append(&t.seq, &t.pool, m), 0);
    k_seq_kv_t view = kv_seq_view(&t.seq);
    for (int32_t i = 0; i < m; i++) pos[i] = done + i, rows[i] = i;
    int32_t q_start[2] = {0, m};
    model_batch_t b = {.n_seqs = 1, .n_tokens = m, .tokens = tokens + done, .pos = pos,
                       .q_start = q_start, .seqs = &view, .n_logits = m, .logit_rows = rows};
    CHECK_INT_EQ(model_group_forward(&t.g, &b, all + (int64_t)done * V), 0);
    done += m;
  }
  /* every head's blocks in its rank's part */
  for (int32_t l = 0; l < c->n_layers; l++)
    for (int32_t h = 0; h < c->n_kv_heads; h++)
      for (int32_t b = 0; b < t.seq.n_blocks[l * c->n_kv_heads + h]; b++)
        CHECK_INT_EQ(kv_pool_part_of(&t.pool, kv_seq_table(&t.seq, l, h)[b]),
                     per_rank ? h / (c->n_kv_heads / N) : 0);
  model_group_destroy(&t.g);
  kv_seq_destroy(&t.seq, &t.pool);
  kv_pool_arenas_destroy(&t.pool, t.arenas, t.bes);
  for (int32_t r = 0; r < N; r++) {
    if (N > 1) model_weights_destroy(&t.shards[r]);
    k_backend_free(t.bes[r]);
  }
  k_comm_free(t.comm);
}

/* max |a - b| over n values, and top-1 agreement per row of V */
static double max_diff(const float *a, const float *b, int64_t rows, int32_t V, int *agree) {
  double d = 0;
  *agree = 0;
  for (int64_t r = 0; r < rows; r++) {
    int32_t ia = 0, ib = 0;
    for (int32_t v = 0; v < V; v++) {
      double x = fabs((double)a[r * V + v] - b[r * V + v]);
      d = x > d ? x : d;
      if (a[r * V + v] > a[r * V + ia]) ia = v;
      if (b[r * V + v] > b[r * V + ib]) ib = v;
    }
    *agree += ia == ib;
  }
  return d;
}

static void test_dummy_shards(void) {
  /* 12 query heads, 6 KV heads, 384 MLP columns: N = 2 and 3 both divide,
   * and every column slice falls on 32-element blocks */
  model_config_t c = {.arch = "llama", .n_layers = 3, .n_embd = 192, .n_ff = 384,
                      .n_heads = 12, .n_kv_heads = 6, .head_dim = 32, .n_vocab = 1001,
                      .n_ctx_train = 4096, .rms_eps = 1e-5f, .rope_theta = 10000.0f,
                      .tied_embeddings = true};
  k_backend_t *be;
  CHECK_INT_EQ(k_cpu_backend_new(&be, 1), 0);
  be->numerics = K_NUMERICS_EXACT;
  for (int tied = 1; tied >= 0; tied--) {
    c.tied_embeddings = tied;
    model_weights_t w;
    char err[256];
    if (model_weights_dummy(&w, &c, 42, be, err, sizeof err)) FAIL_AT("%s", err);
    enum { N_TOK = 70 };
    int32_t tokens[N_TOK];
    for (int32_t i = 0; i < N_TOK; i++) tokens[i] = (i * 7919 + 13) % c.n_vocab;
    float *ref = malloc((size_t)N_TOK * (size_t)c.n_vocab * sizeof(float));
    float *got = malloc((size_t)N_TOK * (size_t)c.n_vocab * sizeof(float));
    run_tp(&w, 1, false, tokens, N_TOK, 50, 20, ref);
    for (int32_t N = 2; N <= 3; N++)
      for (int per_rank = 0; per_rank <= 1; per_rank++) {
        memset(got, 0, (size_t)N_TOK * (size_t)c.n_vocab * sizeof(float));
        run_tp(&w, N, per_rank, tokens, N_TOK, 50, 20, got);
        int agree;
        double d = max_diff(ref, got, N_TOK, c.n_vocab, &agree);
        fprintf(stderr, "   dummy (tied %d) N=%d, %s: max |logit diff| %.3g, top-1 %d/%d\n",
                tied, N, per_rank ? "an arena per rank" : "one arena", d, agree, N_TOK);
        CHECK(d <= 1e-4);
        CHECK_INT_EQ(agree, N_TOK);
      }
    /* what cannot be split says so */
    model_weights_t bad;
    CHECK_INT_EQ(model_weights_shard(&bad, &w, 0, 4, be, err, sizeof err), -EINVAL);
    CHECK(strstr(err, "must divide the model's 6 KV heads"));
    CHECK_INT_EQ(model_weights_shard(&bad, &w, 3, 3, be, err, sizeof err), -EINVAL);
    free(ref);
    free(got);
    model_weights_destroy(&w);
  }
  k_backend_free(be);
}

static void test_gguf_shards(void) {
  const char *path = getenv("PRESSD_MODEL");
  model_gguf_t g;
  char err[256];
  if (!path || model_gguf_open(&g, path, err, sizeof err)) {
    fprintf(stderr, "   (no model file: skipped)\n");
    return;
  }
  k_backend_t *be;
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  be->numerics = K_NUMERICS_EXACT;
  model_weights_t w;
  if (model_weights_from_gguf(&w, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  const int32_t V = w.cfg.n_vocab;
  enum { N_TOK = 40 };
  int32_t tokens[N_TOK];
  for (int32_t i = 0; i < N_TOK; i++) tokens[i] = (i * 104729 + 1) % V;
  float *ref = malloc((size_t)N_TOK * (size_t)V * sizeof(float));
  float *got = malloc((size_t)N_TOK * (size_t)V * sizeof(float));
  run_tp(&w, 1, false, tokens, N_TOK, 32, 16, ref);
  run_tp(&w, 3, true, tokens, N_TOK, 32, 16, got); /* 3 KV heads, 1536 MLP columns */
  int agree;
  double d = max_diff(ref, got, N_TOK, V, &agree);
  fprintf(stderr, "   SmolLM2 Q4_1 N=3, an arena per rank: max |logit diff| %.3g, top-1 %d/%d\n",
          d, agree, N_TOK);
  CHECK(d <= 1e-4);
  CHECK_INT_EQ(agree, N_TOK);
  model_weights_t bad;
  CHECK_INT_EQ(model_weights_shard(&bad, &w, 0, 2, be, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "3 KV heads"));
  free(ref);
  free(got);
  model_weights_destroy(&w);
  model_gguf_close(&g);
  k_backend_free(be);
}

int main(void) {
  RUN(test_all_reduce);
  RUN(test_dummy_shards);
  RUN(test_gguf_shards);
  fprintf(stderr, "tp: all passed\n");
  return 0;
}
