/* Paged decode attention at the Llama-3-8B shape (32 query heads, 8 KV
 * heads, head_dim 128, bf16 K/V, blocks of 16): one layer of a decode batch
 * whose blocks are scattered over the pool, no scores (plus the same with
 * decode scores, for their cost). Then causal prefill of fresh prompts
 * (8 x 1,024 and 2 x 6,000 tokens), in TFLOP/s (4 * q heads * head_dim per
 * visible query-key pair), by the kernel PRESSD_CUDA_PREFILL selects.
 * Each case is timed on the backend's stream (CUDA events) over ITERS calls
 * after warm-up, REPS times; achieved bandwidth = K and V bytes read /
 * median time, reported beside the device-to-device copy bandwidth of the
 * same run (1 GiB, bytes read + written, best of several). One JSON object
 * on stdout; exit 77 without a GPU (1 when PRESSD_REQUIRE_GPU=1). */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda.h"
#include "paged/pool.h"
#include "tests/cuda/gpu-test.h"
#include "tests/test.h"

#define QH 32
#define KVH 8
#define HD 128
#define BS 16
#define ITERS 50
#define REPS 7
#define TARGET 0.70

typedef struct bench_case {
  int32_t batch, ctx, n_obs;
} bench_case_t;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static float unit(uint64_t *s) { return (float)((double)(rng_next(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0); }

/* Fill n bf16 elements at dst with small values. */
static void fill_kv(k_backend_t *be, void *dst, int64_t n, uint32_t tensor) {
  if (be->ops->fill_dummy) {
    CHECK_INT_EQ(be->ops->fill_dummy(be, dst, K_BF16, 0, n, 42, tensor, 0.5f, 0.0f), 0);
    return;
  }
  enum { CHUNK = 1 << 20 };
  uint16_t *buf = malloc(CHUNK * sizeof *buf);
  CHECK(buf);
  uint64_t rng = tensor;
  for (int64_t i = 0; i < CHUNK; i++) {
    float f = unit(&rng) * 0.5f;
    uint32_t x;
    memcpy(&x, &f, 4);
    buf[i] = (uint16_t)(x >> 16);
  }
  for (int64_t i = 0; i < n; i += CHUNK) {
    int64_t m = n - i < CHUNK ? n - i : CHUNK;
    CHECK_INT_EQ(be->ops->upload(be, (uint16_t *)dst + i, buf, (size_t)m * sizeof *buf), 0);
  }
  free(buf);
}

/* ids[0..n) = a random permutation of the block ids: tables scattered
 * over the pool. */
static void shuffle_ids(int32_t *ids, int32_t n, uint64_t *rng) {
  for (int32_t b = 0; b < n; b++) ids[b] = b;
  for (int32_t b = n - 1; b > 0; b--) {
    int32_t j = rng_int(rng, b + 1), t = ids[b];
    ids[b] = ids[j];
    ids[j] = t;
  }
}

/* us[REPS], sorted: one attention call's time (CUDA events over iters
 * calls), after attn_prepare and warm calls. */
static void time_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a,
                           int warm, int iters, double *us) {
  CHECK_INT_EQ(be->ops->attn_prepare(be, a), 0);
  for (int i = 0; i < warm; i++) CHECK_INT_EQ(be->ops->attention(be, kv, a), 0);
  CHECK_INT_EQ(be->ops->sync(be), 0);
  for (int r = 0; r < REPS; r++) {
    double ms = 0.0;
    CHECK_INT_EQ(k_cuda_timer_start(be), 0);
    for (int i = 0; i < iters; i++) CHECK_INT_EQ(be->ops->attention(be, kv, a), 0);
    CHECK_INT_EQ(k_cuda_timer_stop(be, &ms), 0);
    us[r] = ms * 1e3 / iters;
  }
  qsort(us, REPS, sizeof *us, cmp_double);
}

static void run_case(k_backend_t *be, const bench_case_t *bc, double copy_bps, bool first) {
  const int32_t S = bc->batch, ctx = bc->ctx, per_head = ctx / BS;
  const int32_t n_blocks = S * KVH * per_head + 64;
  k_kv_arena_t kv;
  CHECK_INT_EQ(kv_arena_init(&kv, be, n_blocks, BS, HD), 0);
  const int64_t n_slots = (int64_t)n_blocks * BS;
  fill_kv(be, kv.k, n_slots * HD, 1);
  fill_kv(be, kv.v, n_slots * HD, 2);
  int32_t *zeros = calloc((size_t)n_slots, sizeof(int32_t));
  CHECK(zeros);
  CHECK_INT_EQ(be->ops->upload(be, kv.pos, zeros, (size_t)n_slots * 4), 0);   /* all visible */
  CHECK_INT_EQ(be->ops->upload(be, kv.score, zeros, (size_t)n_slots * 4), 0); /* 0.0f */
  free(zeros);

  /* tables [S][1 layer][KVH][per_head] over a shuffled pool */
  uint64_t rng = 7 + (uint64_t)S;
  int32_t *ids = malloc((size_t)n_blocks * sizeof *ids);
  int32_t *tables = malloc((size_t)S * KVH * per_head * sizeof *tables);
  int32_t *lens = malloc((size_t)S * KVH * sizeof *lens);
  k_seq_kv_t *seqs = malloc((size_t)S * sizeof *seqs);
  int32_t *q_start = malloc((size_t)(S + 1) * sizeof *q_start);
  int32_t *q_pos = malloc((size_t)S * sizeof *q_pos);
  float *q = malloc((size_t)S * QH * HD * sizeof *q);
  CHECK(ids && tables && lens && seqs && q_start && q_pos && q);
  shuffle_ids(ids, n_blocks, &rng);
  for (int64_t i = 0; i < (int64_t)S * KVH * per_head; i++) tables[i] = ids[i];
  for (int32_t i = 0; i < S * KVH; i++) lens[i] = ctx;
  for (int32_t s = 0; s < S; s++) {
    seqs[s] = (k_seq_kv_t){tables + (int64_t)s * KVH * per_head, lens + s * KVH, per_head,
                           bc->n_obs, NULL, NULL, 1};
    q_start[s] = s;
    q_pos[s] = ctx - 1;
  }
  q_start[S] = S;
  for (int64_t i = 0; i < (int64_t)S * QH * HD; i++) q[i] = unit(&rng);
  float *dq = be->ops->alloc(be, (size_t)S * QH * HD * sizeof(float));
  float *dout = be->ops->alloc(be, (size_t)S * QH * HD * sizeof(float));
  int32_t *dpos = be->ops->alloc(be, (size_t)S * sizeof(int32_t));
  CHECK(dq && dout && dpos);
  CHECK_INT_EQ(be->ops->upload(be, dq, q, (size_t)S * QH * HD * sizeof(float)), 0);
  CHECK_INT_EQ(be->ops->upload(be, dpos, q_pos, (size_t)S * sizeof(int32_t)), 0);

  k_attn_args_t a = {.n_seqs = S, .layer = 0, .n_q_heads = QH, .n_kv_heads = KVH,
                     .head_dim = HD, .scale = 0.08838834764831845f, .q = dq, .out = dout,
                     .q_start = q_start, .q_pos = dpos, .seqs = seqs};
  double us[REPS];
  time_attention(be, &kv, &a, 5, ITERS, us);
  const double med = us[REPS / 2];
  const double bytes = (double)S * KVH * ctx * HD * 2.0 /* bf16 */ * 2.0 /* K and V */;
  const double bps = bytes / (med * 1e-6);
  printf("%s    {\"batch\": %d, \"ctx\": %d, \"scores\": %s, \"kv_bytes\": %.0f, \"us_median\": %.2f, "
         "\"us_min\": %.2f, \"us_max\": %.2f, \"gbps\": %.1f, \"frac_of_copy\": %.3f}",
         first ? "" : ",\n", S, ctx, bc->n_obs ? "true" : "false", bytes, med, us[0],
         us[REPS - 1], bps / 1e9, bps / copy_bps);
  fflush(stdout);

  be->ops->free(be, dq);
  be->ops->free(be, dout);
  be->ops->free(be, dpos);
  kv_arena_destroy(&kv, be);
  free(ids);
  free(tables);
  free(lens);
  free(seqs);
  free(q_start);
  free(q_pos);
  free(q);
}

/* Causal prefill of S fresh prompts of L tokens: every query row against
 * the keys at or before its position, in the same scattered pool. */
static void run_prefill(k_backend_t *be, int32_t S, int32_t L) {
  const int32_t per_head = (L + BS - 1) / BS, n_blocks = S * KVH * per_head + 64;
  k_kv_arena_t kv;
  CHECK_INT_EQ(kv_arena_init(&kv, be, n_blocks, BS, HD), 0);
  const int64_t n_slots = (int64_t)n_blocks * BS;
  fill_kv(be, kv.k, n_slots * HD, 3);
  fill_kv(be, kv.v, n_slots * HD, 4);
  uint64_t rng = 11 + (uint64_t)L;
  int32_t *ids = malloc((size_t)n_blocks * sizeof *ids);
  int32_t *pos = calloc((size_t)n_slots, sizeof *pos);
  int32_t *tables = malloc((size_t)S * KVH * per_head * sizeof *tables);
  int32_t *lens = malloc((size_t)S * KVH * sizeof *lens);
  k_seq_kv_t *seqs = malloc((size_t)S * sizeof *seqs);
  int32_t *q_start = malloc((size_t)(S + 1) * sizeof *q_start);
  int32_t *q_pos = malloc((size_t)S * L * sizeof *q_pos);
  const int64_t nq = (int64_t)S * L * QH * HD;
  float *q = malloc((size_t)nq * sizeof *q);
  CHECK(ids && pos && tables && lens && seqs && q_start && q_pos && q);
  shuffle_ids(ids, n_blocks, &rng);
  for (int64_t i = 0; i < (int64_t)S * KVH * per_head; i++) tables[i] = ids[i];
  for (int32_t s = 0; s < S; s++) {
    for (int32_t h = 0; h < KVH; h++) {
      lens[s * KVH + h] = L;
      const int32_t *tab = tables + ((int64_t)s * KVH + h) * per_head;
      for (int32_t k = 0; k < L; k++) pos[(int64_t)tab[k / BS] * BS + k % BS] = k;
    }
    seqs[s] = (k_seq_kv_t){tables + (int64_t)s * KVH * per_head, lens + s * KVH, per_head, 0,
                           NULL, NULL, 1};
    q_start[s] = s * L;
    for (int32_t k = 0; k < L; k++) q_pos[s * L + k] = k;
  }
  q_start[S] = S * L;
  for (int64_t i = 0; i < nq; i++) q[i] = unit(&rng);
  CHECK_INT_EQ(be->ops->upload(be, kv.pos, pos, (size_t)n_slots * 4), 0);
  float *dq = be->ops->alloc(be, (size_t)nq * sizeof(float));
  float *dout = be->ops->alloc(be, (size_t)nq * sizeof(float));
  int32_t *dpos = be->ops->alloc(be, (size_t)S * L * sizeof(int32_t));
  CHECK(dq && dout && dpos);
  CHECK_INT_EQ(be->ops->upload(be, dq, q, (size_t)nq * sizeof(float)), 0);
  CHECK_INT_EQ(be->ops->upload(be, dpos, q_pos, (size_t)S * L * sizeof(int32_t)), 0);
  k_attn_args_t a = {.n_seqs = S, .layer = 0, .n_q_heads = QH, .n_kv_heads = KVH,
                     .head_dim = HD, .scale = 0.08838834764831845f, .q = dq, .out = dout,
                     .q_start = q_start, .q_pos = dpos, .seqs = seqs};
  double us[REPS];
  time_attention(be, &kv, &a, 2, 5, us);
  const double med = us[REPS / 2];
  const double flops = 4.0 * QH * HD * (double)S * ((double)L * (L + 1) / 2.0);
  const char *kern = getenv("PRESSD_CUDA_PREFILL");
  printf(",\n    {\"prefill\": true, \"kernel\": \"%s\", \"seqs\": %d, \"tokens\": %d, "
         "\"us_median\": %.1f, \"us_min\": %.1f, \"tflops\": %.1f}",
         kern && !strcmp(kern, "mma") ? "mma" : "fma", S, L, med, us[0],
         flops / (med * 1e-6) / 1e12);
  fflush(stdout);
  be->ops->free(be, dq);
  be->ops->free(be, dout);
  be->ops->free(be, dpos);
  kv_arena_destroy(&kv, be);
  free(ids);
  free(pos);
  free(tables);
  free(lens);
  free(seqs);
  free(q_start);
  free(q_pos);
  free(q);
}

int main(void) {
  k_backend_t *be = NULL;
  char err[256];
  int rc = gpu_test_open("bench-cuda-attn", &be);
  if (rc) return rc;
  char name[128] = "";
  CHECK_INT_EQ(k_cuda_device_name(be, name, sizeof name), 0);
  double copy_bps = 0.0;
  CHECK_INT_EQ(k_cuda_copy_bandwidth(be, (size_t)1 << 30, 5, &copy_bps), 0);
  CHECK(copy_bps > 0.0);
  printf("{\"bench\": \"cuda-attn\", \"device\": \"%s\", \"shape\": {\"q_heads\": %d, \"kv_heads\": %d, "
         "\"head_dim\": %d, \"block_size\": %d, \"kv_type\": \"bf16\"},\n \"iters\": %d, \"reps\": %d, "
         "\"copy_gbps\": %.1f, \"target_frac\": %.2f,\n \"cases\": [\n",
         name, QH, KVH, HD, BS, ITERS, REPS, copy_bps / 1e9, TARGET);
  static const bench_case_t cases[] = {{64, 2048, 0}, {16, 8192, 0}, {64, 2048, -1}};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    run_case(be, &cases[i], copy_bps, i == 0);
  run_prefill(be, 8, 1024);
  run_prefill(be, 2, 6000);
  printf("\n]}\n");
  CHECK_INT_EQ(k_cuda_error_string(be, err, sizeof err), 0);
  k_backend_free(be);
  return 0;
}
