/* Decode speed of the CUDA backend against the memory bound: a model of
 * Llama 3 8B's shape (all 32 layers) with dummy bf16 weights generated on
 * the device, one sequence, batch 1, 512 tokens of context before the timed
 * steps. A decode step must read every weight matrix once (the embedding
 * table excepted: one row), so its floor is those bytes over the device's
 * copy bandwidth (bytes read plus bytes written per second of a large
 * device-to-device copy); the ratio step / bound is the figure of merit
 * (target <= 1.3).
 *
 * The step is timed op by op and then as CUDA graphs (model_set_graphs:
 * everything but the attention calls replayed; step_graphs_ms, and its
 * ratio to the bound).
 *
 * Also timed: the step with every matmul through cuBLASLt, and the decode's
 * matmuls alone (our matrix-vector kernel, then cuBLASLt), which separates
 * the matmuls from everything else a step does; and the sample op drawing
 * SAMPLE_ROWS tokens from rows of the vocabulary's width (logits uniform in
 * [-8, 8]): argmax, temperature, top-p 0.9, top-k 50 with top-p 0.95.
 *
 * Prints one JSON object on stdout (progress on stderr). Exits 77 without a
 * GPU (1 when PRESSD_REQUIRE_GPU=1), 1 on a failure (the JSON then carries
 * "error" and whatever was measured before it). */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda.h"
#include "model/weights.h"
#include "scheduler/single.h"
#include "tests/cuda/gpu-test.h"

#define CONTEXT 512
#define WARMUP 10
#define STEPS 50
#define STEPS_CUBLASLT 20
#define STEPS_GRAPHS 50
#define CHUNK 128
#define COPY_BYTES ((size_t)1 << 30)
#define COPY_REPS 10
#define MATMUL_REPS 5
#define SAMPLE_ROWS 256
#define SAMPLE_REPS 5
#define N_DRAWS 4

typedef struct result {
  char device[256];
  int32_t layers;
  double copy_bps;       /* bytes read + written per second */
  double weight_bytes;   /* read per decode step */
  double weight_total;   /* held on the device */
  double load_s;         /* dummy weights generated */
  double step_ms, step_wall_ms, step_cublaslt_ms, step_graphs_ms, step_graphs_wall_ms;
  double matmul_ms, matmul_cublaslt_ms;
  double sample_ms[N_DRAWS]; /* SAMPLE_ROWS rows, per draw kind */
  double penalize_ms;        /* SAMPLE_ROWS rows of 2,000 seen ids */
  double logprobs_ms;        /* SAMPLE_ROWS rows, top 5, wall (the results come back) */
  char error[512];
} result_t;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void print_json(const result_t *r) {
  const double bound_ms = r->copy_bps > 0 ? r->weight_bytes / r->copy_bps * 1e3 : 0.0;
  printf("{\"bench\": \"cuda-decode\", \"device\": \"");
  for (const char *p = r->device; *p; p++)
    if (*p != '"' && *p != '\\' && (unsigned char)*p >= 32) putchar(*p);
  printf("\", \"model\": \"llama3-8b shape, dummy bf16 weights\", \"layers\": %d, \"batch\": 1, "
         "\"context\": %d, \"steps\": %d, \"weight_bytes\": %.0f, \"weight_bytes_total\": %.0f, "
         "\"copy_bytes_per_s\": %.4g, \"bound_ms\": %.4f, \"step_ms\": %.4f, "
         "\"step_wall_ms\": %.4f, \"ratio\": %.4f, \"target_ratio\": 1.3, \"tokens_per_s\": %.2f, "
         "\"step_cublaslt_ms\": %.4f, \"matmul_ms\": %.4f, \"matmul_cublaslt_ms\": %.4f, "
         "\"load_s\": %.3f, \"step_graphs_ms\": %.4f, \"step_graphs_wall_ms\": %.4f, "
         "\"ratio_graphs\": %.4f",
         r->layers, CONTEXT, STEPS, r->weight_bytes, r->weight_total, r->copy_bps, bound_ms, r->step_ms,
         r->step_wall_ms, bound_ms > 0 && r->step_ms > 0 ? r->step_ms / bound_ms : 0.0,
         r->step_ms > 0 ? 1e3 / r->step_ms : 0.0, r->step_cublaslt_ms, r->matmul_ms,
         r->matmul_cublaslt_ms, r->load_s, r->step_graphs_ms, r->step_graphs_wall_ms,
         bound_ms > 0 && r->step_graphs_ms > 0 ? r->step_graphs_ms / bound_ms : 0.0);
  printf(", \"sample_rows\": %d, \"sample_ms\": {\"argmax\": %.4f, \"temperature\": %.4f, "
         "\"top_p\": %.4f, \"top_k_top_p\": %.4f}, \"penalize_ms\": %.4f, "
         "\"logprobs_wall_ms\": %.4f",
         SAMPLE_ROWS, r->sample_ms[0], r->sample_ms[1], r->sample_ms[2], r->sample_ms[3],
         r->penalize_ms, r->logprobs_ms);
  if (r->error[0]) {
    printf(", \"error\": \"");
    for (const char *p = r->error; *p; p++)
      if (*p != '"' && *p != '\\' && (unsigned char)*p >= 32) putchar(*p);
    printf("\"");
  }
  printf("}\n");
  fflush(stdout);
}

static int fail(result_t *r, k_backend_t *be, const char *what, int rc) {
  char e[256] = "";
  if (be) k_cuda_error_string(be, e, sizeof e);
  snprintf(r->error, sizeof r->error, "%s: %d %s", what, rc, e);
  fprintf(stderr, "bench-cuda-decode: %s\n", r->error);
  return 1;
}

static size_t matrix_bytes(const k_weight_t *w) { return (size_t)w->rows * k_row_bytes(w->type, w->cols); }

/* Every matmul of one decode step, back to back, best of MATMUL_REPS. */
static int time_matmuls(k_backend_t *be, const model_weights_t *w, float *x, float *y, double *ms) {
  *ms = 0.0;
  for (int rep = 0; rep <= MATMUL_REPS; rep++) { /* rep 0: warm-up */
    int rc = k_cuda_timer_start(be);
    for (int32_t l = 0; !rc && l < w->cfg.n_layers; l++) {
      const model_layer_t *ly = &w->layers[l];
      const k_weight_t *ms7[] = {&ly->wq, &ly->wk, &ly->wv, &ly->wo, &ly->w_gate, &ly->w_up,
                                 &ly->w_down};
      for (int i = 0; !rc && i < 7; i++) rc = be->ops->matmul(be, y, x, ms7[i], 1);
    }
    if (!rc) rc = be->ops->matmul(be, y, x, &w->output, 1);
    double t = 0.0;
    if (!rc) rc = k_cuda_timer_stop(be, &t);
    if (rc) return rc;
    if (rep > 0 && (*ms == 0.0 || t < *ms)) *ms = t;
  }
  return 0;
}

/* The sample op over SAMPLE_ROWS rows of n logits, per kind of draw, best
 * of SAMPLE_REPS. */
static int time_sample(k_backend_t *be, int64_t n, double *ms) {
  const int64_t m = SAMPLE_ROWS;
  float *x = be->ops->alloc(be, (size_t)(m * n) * sizeof(float));
  int32_t *ids = be->ops->alloc(be, (size_t)m * sizeof(int32_t));
  k_draw_t d[SAMPLE_ROWS];
  int rc = x && ids ? be->ops->fill_dummy(be, x, K_F32, 0, m * n, 5, 1, 8.0f, 0.0f) : -ENOMEM;
  for (int k = 0; !rc && k < N_DRAWS; k++) {
    for (int64_t i = 0; i < m; i++)
      d[i] = (k_draw_t){.temperature = k ? 1.0f : 0.0f, .top_p = k == 2 ? 0.9f : k == 3 ? 0.95f : 1,
                        .top_k = k == 3 ? 50 : 0, .key = 1000u + (uint64_t)i};
    ms[k] = 0.0;
    for (int rep = 0; !rc && rep <= SAMPLE_REPS; rep++) { /* rep 0: warm-up */
      double t = 0.0;
      rc = k_cuda_timer_start(be);
      if (!rc) rc = be->ops->sample(be, ids, x, m, n, d);
      if (!rc) rc = k_cuda_timer_stop(be, &t);
      if (!rc && rep > 0 && (ms[k] == 0.0 || t < ms[k])) ms[k] = t;
    }
  }
  if (x) be->ops->free(be, x);
  if (ids) be->ops->free(be, ids);
  return rc;
}

/* The penalize op (2,000 seen ids a row) and the logprobs op (top 5, the
 * results brought back) over SAMPLE_ROWS rows, best of SAMPLE_REPS. */
static int time_penalize_logprobs(k_backend_t *be, int64_t n, double *pen_ms, double *lp_ms) {
  enum { SEEN = 2000 };
  const int64_t m = SAMPLE_ROWS;
  float *x = be->ops->alloc(be, (size_t)(m * n) * sizeof(float));
  int32_t *ids = be->ops->alloc(be, (size_t)m * sizeof(int32_t));
  k_penalty_t rows[SAMPLE_ROWS];
  int32_t *pid = malloc((size_t)m * SEEN * sizeof *pid);
  int32_t *seen = malloc((size_t)m * SEEN * sizeof *seen);
  int32_t want[SAMPLE_ROWS], zero[SAMPLE_ROWS];
  k_logprobs_t *out = malloc((size_t)m * sizeof *out);
  int rc = x && ids && pid && seen && out
               ? be->ops->fill_dummy(be, x, K_F32, 0, m * n, 6, 1, 8.0f, 0.0f)
               : -ENOMEM;
  for (int64_t r = 0; r < m; r++) {
    rows[r] = (k_penalty_t){.first = r * SEEN, .n = SEEN, .rep = 1.1f, .pres = 0.2f, .freq = 0.3f};
    for (int32_t j = 0; j < SEEN && pid; j++) {
      pid[r * SEEN + j] = (int32_t)(((int64_t)j * 61 + r) % n); /* distinct in a row */
      seen[r * SEEN + j] = 2 * (j % 4) + (j % 3 == 0);
    }
    want[r] = 5;
    zero[r] = 0;
  }
  if (!rc) rc = be->ops->upload(be, ids, zero, sizeof zero);
  *pen_ms = *lp_ms = 0.0;
  for (int rep = 0; !rc && rep <= SAMPLE_REPS; rep++) { /* rep 0: warm-up */
    double t = 0.0, t0;
    rc = k_cuda_timer_start(be);
    if (!rc) rc = be->ops->penalize(be, x, m, n, rows, pid, seen);
    if (!rc) rc = k_cuda_timer_stop(be, &t);
    if (!rc && rep > 0 && (*pen_ms == 0.0 || t < *pen_ms)) *pen_ms = t;
    if (!rc) rc = be->ops->sync(be);
    t0 = now_s();
    if (!rc) rc = be->ops->logprobs(be, out, x, m, n, ids, want);
    t = (now_s() - t0) * 1e3;
    if (!rc && rep > 0 && (*lp_ms == 0.0 || t < *lp_ms)) *lp_ms = t;
  }
  if (x) be->ops->free(be, x);
  if (ids) be->ops->free(be, ids);
  free(pid);
  free(seen);
  free(out);
  return rc;
}

/* n decode steps of one token each; ms per step by the stream's clock and
 * by the wall clock. */
static int time_steps(k_backend_t *be, sched_single_t *s, const int32_t *tokens, int32_t n,
                      float *logits, double *ms, double *wall_ms) {
  double t0 = now_s(), t = 0.0;
  int rc = k_cuda_timer_start(be);
  for (int32_t i = 0; !rc && i < n; i++) rc = sched_single_feed(s, tokens + i, 1, false, logits);
  if (!rc) rc = k_cuda_timer_stop(be, &t);
  *ms = t / n;
  *wall_ms = (now_s() - t0) * 1e3 / n;
  return rc;
}

int main(void) {
  result_t r;
  memset(&r, 0, sizeof r);
  char err[256];
  k_backend_t *be = NULL;
  int rc = gpu_test_open("bench-cuda-decode", &be);
  if (rc) return rc;
  k_cuda_device_name(be, r.device, sizeof r.device);

  model_config_t c = {.arch = "llama", .n_layers = 32, .n_embd = 4096, .n_ff = 14336,
                      .n_heads = 32, .n_kv_heads = 8, .head_dim = 128, .n_vocab = 128256,
                      .n_ctx_train = 8192, .rms_eps = 1e-5f, .rope_theta = 500000.0f,
                      .rope_factor = 8.0f, .rope_low_freq_factor = 1.0f,
                      .rope_high_freq_factor = 4.0f, .rope_orig_ctx = 8192};
  model_weights_t w;
  sched_single_t s;
  memset(&w, 0, sizeof w);
  memset(&s, 0, sizeof s);
  float *logits = NULL, *x = NULL, *y = NULL;
  int32_t *tokens = NULL;
  const int32_t max_len = CONTEXT + WARMUP + STEPS + 2 * STEPS_CUBLASLT + WARMUP + STEPS_GRAPHS;
  double t0 = now_s();
  if ((rc = model_weights_dummy(&w, &c, 8, be, err, sizeof err))) {
    fail(&r, be, err, rc);
    goto out;
  }
  r.load_s = now_s() - t0;
  r.layers = c.n_layers;
  r.weight_total = (double)w.bytes;
  for (int32_t l = 0; l < c.n_layers; l++) {
    const model_layer_t *ly = &w.layers[l];
    r.weight_bytes += (double)(matrix_bytes(&ly->wq) + matrix_bytes(&ly->wk) +
                               matrix_bytes(&ly->wv) + matrix_bytes(&ly->wo) +
                               matrix_bytes(&ly->w_gate) + matrix_bytes(&ly->w_up) +
                               matrix_bytes(&ly->w_down) + 2 * (size_t)c.n_embd * sizeof(float));
  }
  r.weight_bytes += (double)(matrix_bytes(&w.output) + (size_t)c.n_embd * sizeof(float));
  fprintf(stderr, "bench-cuda-decode: %s, weights %.2f GB (%.2f GB read per step), made in %.2f s\n",
          r.device, r.weight_total * 1e-9, r.weight_bytes * 1e-9, r.load_s);

  if ((rc = k_cuda_copy_bandwidth(be, COPY_BYTES, COPY_REPS, &r.copy_bps))) {
    fail(&r, be, "copy bandwidth", rc);
    goto out;
  }
  fprintf(stderr, "bench-cuda-decode: copy %.3g TB/s (read + written)\n", r.copy_bps * 1e-12);

  /* the matmuls alone, on activations of ones-ish values */
  x = be->ops->alloc(be, (size_t)c.n_ff * sizeof(float));
  y = be->ops->alloc(be, (size_t)(c.n_vocab > c.n_ff ? c.n_vocab : c.n_ff) * sizeof(float));
  if (!x || !y) {
    fail(&r, be, "out of device memory", -ENOMEM);
    goto out;
  }
  if ((rc = be->ops->fill_dummy(be, x, K_F32, 0, c.n_ff, 1, 1, 1.0f, 0.0f)) ||
      (rc = time_matmuls(be, &w, x, y, &r.matmul_ms))) {
    fail(&r, be, "matmuls", rc);
    goto out;
  }
  k_cuda_set_gemv_max_m(be, 0);
  rc = time_matmuls(be, &w, x, y, &r.matmul_cublaslt_ms);
  k_cuda_set_gemv_max_m(be, 4);
  if (rc) {
    fail(&r, be, "matmuls (cuBLASLt)", rc);
    goto out;
  }
  fprintf(stderr, "bench-cuda-decode: a step's matmuls %.3f ms (cuBLASLt %.3f ms)\n", r.matmul_ms,
          r.matmul_cublaslt_ms);

  /* the model: prefill the context, warm up, then time decode steps */
  logits = malloc((size_t)c.n_vocab * sizeof *logits);
  tokens = malloc((size_t)max_len * sizeof *tokens);
  if (!logits || !tokens) {
    fail(&r, NULL, "out of host memory", -ENOMEM);
    goto out;
  }
  uint64_t st = 88172645463325252ull;
  for (int32_t i = 0; i < max_len; i++) {
    st ^= st << 13, st ^= st >> 7, st ^= st << 17;
    tokens[i] = (int32_t)(st % (uint64_t)c.n_vocab);
  }
  if ((rc = sched_single_init(&s, &w, be, max_len, CHUNK, 0, err, sizeof err))) {
    fail(&r, be, err, rc);
    goto out;
  }
  if ((rc = sched_single_feed(&s, tokens, CONTEXT, false, logits))) {
    fail(&r, be, "prefill", rc);
    goto out;
  }
  const int32_t *next = tokens + CONTEXT;
  double ms, wall;
  if ((rc = time_steps(be, &s, next, WARMUP, logits, &ms, &wall))) {
    fail(&r, be, "warm-up steps", rc);
    goto out;
  }
  next += WARMUP;
  if ((rc = time_steps(be, &s, next, STEPS, logits, &r.step_ms, &r.step_wall_ms))) {
    fail(&r, be, "decode steps", rc);
    goto out;
  }
  next += STEPS;
  fprintf(stderr, "bench-cuda-decode: step %.3f ms (wall %.3f ms)\n", r.step_ms, r.step_wall_ms);
  k_cuda_set_gemv_max_m(be, 0);
  if ((rc = time_steps(be, &s, next, STEPS_CUBLASLT, logits, &ms, &wall)) ||
      (rc = time_steps(be, &s, next + STEPS_CUBLASLT, STEPS_CUBLASLT, logits,
                       &r.step_cublaslt_ms, &wall))) {
    fail(&r, be, "decode steps (cuBLASLt)", rc);
    goto out;
  }
  k_cuda_set_gemv_max_m(be, 4);
  fprintf(stderr, "bench-cuda-decode: step through cuBLASLt %.3f ms\n", r.step_cublaslt_ms);
  next += 2 * STEPS_CUBLASLT;
  model_group_set_graphs(&s.model, true); /* captured in the warm-up */
  if ((rc = time_steps(be, &s, next, WARMUP, logits, &ms, &wall)) ||
      (rc = time_steps(be, &s, next + WARMUP, STEPS_GRAPHS, logits, &r.step_graphs_ms,
                       &r.step_graphs_wall_ms))) {
    fail(&r, be, "decode steps (graphs)", rc);
    goto out;
  }
  fprintf(stderr, "bench-cuda-decode: step as CUDA graphs %.3f ms (wall %.3f ms), %d captured\n",
          r.step_graphs_ms, r.step_graphs_wall_ms, k_cuda_graphs_captured(be));
  if ((rc = time_sample(be, c.n_vocab, r.sample_ms))) {
    fail(&r, be, "sample", rc);
    goto out;
  }
  fprintf(stderr,
          "bench-cuda-decode: %d draws: argmax %.3f ms, temperature %.3f, top-p %.3f, "
          "top-k + top-p %.3f\n",
          SAMPLE_ROWS, r.sample_ms[0], r.sample_ms[1], r.sample_ms[2], r.sample_ms[3]);
  if ((rc = time_penalize_logprobs(be, c.n_vocab, &r.penalize_ms, &r.logprobs_ms))) {
    fail(&r, be, "penalize, logprobs", rc);
    goto out;
  }
  fprintf(stderr, "bench-cuda-decode: %d rows: penalize %.3f ms, logprobs %.3f ms (wall)\n",
          SAMPLE_ROWS, r.penalize_ms, r.logprobs_ms);
out:
  print_json(&r);
  sched_single_destroy(&s);
  if (x) be->ops->free(be, x);
  if (y) be->ops->free(be, y);
  if (w.be) model_weights_destroy(&w);
  free(logits);
  free(tokens);
  k_backend_free(be);
  return r.error[0] ? 1 : 0;
}
