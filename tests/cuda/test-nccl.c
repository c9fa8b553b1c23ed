/* NCCL through the communicator interface on CUDA backends: N = 1 (every
 * GPU machine), and where two or more devices are visible N = 2: the
 * all-reduce sums bit-identically on every rank, and a model sharded over
 * two GPUs gives the logits of one GPU (each rank with a KV arena of its
 * own holding its part of the pool, as the engine keeps them).
 *
 * Exits 77 (skip) when no CUDA device is visible; PRESSD_REQUIRE_GPU=1
 * turns that into a failure. */
#include <errno.h>
#include <pthread.h>

#include "kernels/comm.h"
#include "kernels/cuda/cuda.h"
#include "model/group.h"
#include "paged/pool.h"
#include "paged/seq.h"
#include "tests/cuda/gpu-test.h"
#include "tests/test.h"

static int skip(const char *why) { return gpu_test_absent("test-nccl", why); }

typedef struct ar {
  k_comm_t *c;
  k_backend_t *be;
  int32_t rank;
  float *buf;
  int64_t n;
  int rc;
} ar_t;

static void *ar_main(void *p) {
  ar_t *a = p;
  a->rc = a->c->ops->all_reduce_sum(a->c, a->rank, a->buf, a->n);
  if (!a->rc) a->rc = a->be->ops->sync(a->be);
  return NULL;
}

static void all_reduce(int32_t N, k_backend_t **bes) {
  char err[256];
  k_comm_t *c;
  if (k_comm_nccl_new(&c, N, bes, err, sizeof err)) FAIL_AT("nccl %d: %s", N, err);
  const int64_t n = 1 << 20;
  float *host = malloc((size_t)n * sizeof(float)), *back = malloc((size_t)n * sizeof(float));
  ar_t a[8];
  pthread_t th[8];
  for (int32_t r = 0; r < N; r++) {
    for (int64_t i = 0; i < n; i++) host[i] = (float)(r + 1) * 0.25f + (float)(i % 1000);
    a[r] = (ar_t){c, bes[r], r, bes[r]->ops->alloc(bes[r], (size_t)n * sizeof(float)), n, 0};
    CHECK(a[r].buf);
    CHECK_INT_EQ(bes[r]->ops->upload(bes[r], a[r].buf, host, (size_t)n * sizeof(float)), 0);
  }
  for (int32_t r = 0; r < N; r++) pthread_create(&th[r], NULL, ar_main, &a[r]);
  for (int32_t r = 0; r < N; r++) pthread_join(th[r], NULL);
  for (int32_t r = 0; r < N; r++) {
    CHECK_INT_EQ(a[r].rc, 0);
    CHECK_INT_EQ(bes[r]->ops->download(bes[r], back, a[r].buf, (size_t)n * sizeof(float)), 0);
    for (int64_t i = 0; i < n; i += 997) {
      float want = 0;
      for (int32_t q = 0; q < N; q++) want += (float)(q + 1) * 0.25f + (float)(i % 1000);
      if (back[i] != want) FAIL_AT("N=%d rank %d [%lld]: %g != %g", N, r, (long long)i, back[i], want);
    }
    bes[r]->ops->free(bes[r], a[r].buf);
  }
  fprintf(stderr, "   all-reduce over %d rank(s) of %lld floats: ok\n", N, (long long)n);
  free(host);
  free(back);
  k_comm_free(c);
}

/* Logits of a dummy model fed tokens teacher-forced, split over N GPUs. */
static void run_model(const model_weights_t *host_w, int32_t N, k_backend_t **bes,
                      const int32_t *tokens, int32_t n, float *logits) {
  char err[256];
  const model_config_t *c = &host_w->cfg;
  const int32_t B = 16, per_head = (n + B - 1) / B;
  const int32_t n_blocks = (per_head * c->n_layers * c->n_kv_heads / N + 2) * N;
  kv_pool_t pool;
  kv_seq_t seq;
  k_kv_arena_t arenas[8];
  const k_kv_arena_t *kvs[8];
  model_weights_t shards[8];
  k_comm_t *comm = NULL;
  CHECK_INT_EQ(kv_pool_init_parts(&pool, n_blocks, N), 0);
  kv_pool_shuffle(&pool, 5);
  CHECK_INT_EQ(kv_seq_init(&seq, c->n_layers, c->n_kv_heads, B, n), 0);
  CHECK_INT_EQ(kv_seq_set_parts(&seq, N), 0);
  if (N > 1 && k_comm_nccl_new(&comm, N, bes, err, sizeof err)) FAIL_AT("%s", err);
  for (int32_t r = 0; r < N; r++) {
    if (model_weights_shard(&shards[r], host_w, r, N, bes[r], err, sizeof err)) FAIL_AT("%s", err);
    CHECK_INT_EQ(kv_arena_init_part(&arenas[r], bes[r], &pool, r, B, c->head_dim), 0);
    kvs[r] = &arenas[r];
  }
  model_group_t g;
  if (model_group_init(&g, N, shards, bes, kvs, comm, 64, 64, err, sizeof err)) FAIL_AT("%s", err);
  int32_t pos[64], rows[64];
  for (int32_t done = 0; done < n;) {
    /* prefill chunks of up to 64, then the last 8 tokens one by one */
    int32_t m = done < n - 8 ? (n - 8 - done < 64 ? n - 8 - done : 64) : 1;
    CHECK_INT_EQ(kv_seq_append(&seq, &pool, m), 0);
    k_seq_kv_t view = kv_seq_view(&seq);
    for (int32_t i = 0; i < m; i++) pos[i] = done + i, rows[i] = i;
    int32_t q_start[2] = {0, m};
    model_batch_t b = {.n_seqs = 1, .n_tokens = m, .tokens = tokens + done, .pos = pos,
                       .q_start = q_start, .seqs = &view, .n_logits = m, .logit_rows = rows};
    CHECK_INT_EQ(model_group_forward(&g, &b, logits + (int64_t)done * c->n_vocab), 0);
    done += m;
  }
  model_group_destroy(&g);
  for (int32_t r = 0; r < N; r++) {
    kv_arena_destroy(&arenas[r], bes[r]);
    model_weights_destroy(&shards[r]);
  }
  kv_seq_destroy(&seq, &pool);
  kv_pool_destroy(&pool);
  k_comm_free(comm);
}

static void tp_model(int32_t N, k_backend_t **bes) {
  /* 12 query heads, 6 KV heads: N = 2 divides; host weights sharded per GPU */
  model_config_t c = {.arch = "llama", .n_layers = 4, .n_embd = 512, .n_ff = 1024,
                      .n_heads = 12, .n_kv_heads = 6, .head_dim = 64, .n_vocab = 4096,
                      .n_ctx_train = 4096, .rms_eps = 1e-5f, .rope_theta = 10000.0f,
                      .tied_embeddings = true};
  k_backend_t *cpu;
  CHECK_INT_EQ(k_cpu_backend_new(&cpu, 0), 0);
  model_weights_t w;
  char err[256];
  if (model_weights_dummy(&w, &c, 7, cpu, err, sizeof err)) FAIL_AT("%s", err);
  enum { N_TOK = 80 };
  int32_t tokens[N_TOK];
  for (int32_t i = 0; i < N_TOK; i++) tokens[i] = (i * 7919 + 3) % c.n_vocab;
  float *one = malloc((size_t)N_TOK * c.n_vocab * sizeof(float));
  float *many = malloc((size_t)N_TOK * c.n_vocab * sizeof(float));
  run_model(&w, 1, bes, tokens, N_TOK, one);
  run_model(&w, N, bes, tokens, N_TOK, many);
  double d = 0;
  int agree = 0;
  for (int32_t t = 0; t < N_TOK; t++) {
    int32_t a = 0, b = 0;
    for (int32_t v = 0; v < c.n_vocab; v++) {
      const float *x = one + (int64_t)t * c.n_vocab, *y = many + (int64_t)t * c.n_vocab;
      double e = fabs((double)x[v] - y[v]);
      d = e > d ? e : d;
      if (x[v] > x[a]) a = v;
      if (y[v] > y[b]) b = v;
    }
    agree += a == b;
  }
  /* bf16 weights on both sides; the ranks' partial sums add in another order */
  fprintf(stderr, "   model over %d GPUs vs 1: max |logit diff| %.3g, top-1 %d/%d\n", N, d, agree,
          N_TOK);
  CHECK(d <= 2e-2);
  CHECK(agree >= N_TOK - 1);
  free(one);
  free(many);
  model_weights_destroy(&w);
  k_backend_free(cpu);
}

int main(void) {
  char err[256];
  int n_dev = k_cuda_device_count(err, sizeof err);
  if (n_dev <= 0) return skip(n_dev < 0 ? err : "no CUDA device");
  k_backend_t *bes[8] = {0};
  int32_t N = n_dev >= 2 ? 2 : 1;
  for (int32_t r = 0; r < N; r++)
    if (k_backend_new_cuda(&bes[r], r, err, sizeof err)) return skip(err);
  k_comm_t *probe;
  if (k_comm_nccl_new(&probe, 1, bes, err, sizeof err)) {
    fprintf(stderr, "nccl: %s\n", err);
    return 1; /* a GPU machine without NCCL is a finding, not a skip */
  }
  k_comm_free(probe);
  fprintf(stderr, "-- all_reduce 1\n");
  all_reduce(1, bes);
  if (N > 1) {
    fprintf(stderr, "-- all_reduce %d\n", N);
    all_reduce(N, bes);
    fprintf(stderr, "-- tp_model %d\n", N);
    tp_model(N, bes);
  } else {
    fprintf(stderr, "   one device: the two-GPU cases are not run\n");
  }
  for (int32_t r = 0; r < N; r++) k_backend_free(bes[r]);
  fprintf(stderr, "nccl: all passed\n");
  return 0;
}
