/* The CPU backend against naive references: matmul, rmsnorm, rope, silu_mul,
 * add, embed, kv_write, and paged attention over a shuffled arena with GQA,
 * per-head ragged context lengths, slots out of position order and causal
 * masking by position, compared with dense attention in double. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu-internal.h"
#include "kernels/profile.h"
#include "model/quant.h"
#include "tests/penalty-case.h"
#include "tests/test.h"

static k_backend_t *g_be;  /* 2 threads */
static k_backend_t *g_be1; /* 1 thread */

static void fill_nan(float *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = NAN;
}

/* |got - want| <= rel * max(1, |want|), NaN fails */
static void check_close(const char *what, size_t i, double got, double want, double rel) {
  double tol = rel * (fabs(want) > 1.0 ? fabs(want) : 1.0);
  if (!(fabs(got - want) <= tol))
    FAIL_AT("%s[%zu]: %.9g vs reference %.9g (tol %g)", what, i, got, want, tol);
}

/* ---- weights of every type the backend takes ------------------------------ */

static double half_val(uint16_t h) {
  int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
  return (h & 0x8000) ? -v : v;
}
static void put16(uint8_t *p, uint16_t x) {
  p[0] = (uint8_t)x;
  p[1] = (uint8_t)(x >> 8);
}
static uint16_t rand_scale(uint64_t *rng) { /* a half in about [2^-9, 2^-4] */
  return (uint16_t)(0x1800 + rng_int(rng, 0x1400));
}

static const char *dtype_name(k_dtype_t t) {
  switch (t) {
  case K_F32: return "F32";
  case K_F16: return "F16";
  case K_BF16: return "BF16";
  case K_Q8_0: return "Q8_0";
  case K_Q4_0: return "Q4_0";
  case K_Q4_1: return "Q4_1";
  }
  return "?";
}

/* Random weights of type t, [rows][cols], and their values as the GGML block
 * layouts define them (computed here from the bytes, in double). */
static void *rand_weights(uint64_t *rng, k_dtype_t t, int64_t rows, int64_t cols, double *ref) {
  size_t rb = k_row_bytes(t, cols);
  uint8_t *w = test_xmalloc((size_t)rows * rb);
  for (int64_t r = 0; r < rows; r++) {
    uint8_t *p = w + (size_t)r * rb;
    double *o = ref + r * cols;
    switch (t) {
    case K_F32:
      for (int64_t c = 0; c < cols; c++) {
        float f = test_rng_unit(rng);
        memcpy(p + 4 * c, &f, 4);
        o[c] = f;
      }
      break;
    case K_F16:
      for (int64_t c = 0; c < cols; c++) {
        uint16_t h = (uint16_t)(0x2000 + rng_int(rng, 0x1c00)) | (rng_int(rng, 2) ? 0x8000 : 0);
        put16(p + 2 * c, h);
        o[c] = half_val(h);
      }
      break;
    case K_BF16:
      for (int64_t c = 0; c < cols; c++) {
        float f = test_rng_unit(rng);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        uint16_t h = (uint16_t)(bits >> 16);
        put16(p + 2 * c, h);
        bits = (uint32_t)h << 16;
        memcpy(&f, &bits, 4);
        o[c] = f;
      }
      break;
    case K_Q8_0:
      for (int64_t b = 0; b < cols / 32; b++, p += 34, o += 32) {
        uint16_t d = rand_scale(rng) | (rng_int(rng, 2) ? 0x8000 : 0);
        put16(p, d);
        for (int j = 0; j < 32; j++) {
          int8_t q = (int8_t)(rng_int(rng, 256) - 128);
          p[2 + j] = (uint8_t)q;
          o[j] = q * half_val(d);
        }
      }
      break;
    case K_Q4_0:
      for (int64_t b = 0; b < cols / 32; b++, p += 18, o += 32) {
        uint16_t d = rand_scale(rng);
        put16(p, d);
        for (int j = 0; j < 16; j++) {
          int lo = rng_int(rng, 16), hi = rng_int(rng, 16);
          p[2 + j] = (uint8_t)(lo | hi << 4);
          o[j] = (lo - 8) * half_val(d);
          o[j + 16] = (hi - 8) * half_val(d);
        }
      }
      break;
    case K_Q4_1:
      for (int64_t b = 0; b < cols / 32; b++, p += 20, o += 32) {
        uint16_t d = rand_scale(rng), m = (uint16_t)(rand_scale(rng) | 0x8000);
        put16(p, d);
        put16(p + 2, m);
        for (int j = 0; j < 16; j++) {
          int lo = rng_int(rng, 16), hi = rng_int(rng, 16);
          p[4 + j] = (uint8_t)(lo | hi << 4);
          o[j] = lo * half_val(d) + half_val(m);
          o[j + 16] = hi * half_val(d) + half_val(m);
        }
      }
      break;
    }
  }
  return w;
}

static const k_dtype_t k_all_types[] = {K_F32, K_F16, K_BF16, K_Q8_0, K_Q4_0, K_Q4_1};
#define N_TYPES (sizeof k_all_types / sizeof k_all_types[0])

static bool backend_takes(k_dtype_t t) { return (g_be->weight_types >> t) & 1u; }

/* ---- element-wise and dense ops ------------------------------------------ */

/* y (m rows) against the double reference of the weights ref. */
static void check_matmul(const char *what, k_dtype_t type, int64_t m, int64_t rows, int64_t cols,
                         const float *x, const double *ref, const float *y) {
  /* Quantised weight types run on int8 activations (per 32-block scale
   * d = amax/127 kept at fp16 precision, round to nearest even): the exact
   * reference uses those activations; a looser check against the float
   * activations bounds the quantisation error itself. */
  bool q8 = type == K_Q4_0 || type == K_Q4_1 || type == K_Q8_0;
  float *xq = test_xmalloc((size_t)(m * cols) * sizeof *xq);
  for (int64_t b = 0; b < m * cols / 32; b++) {
    float amax = 0;
    for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(x[b * 32 + k]));
    float d = amax / 127.0f, id = amax != 0 ? 127.0f / amax : 0.0f;
    float dh = model_f16_to_f32(model_f32_to_f16(d));
    for (int k = 0; k < 32; k++)
      xq[b * 32 + k] = q8 ? nearbyintf(x[b * 32 + k] * id) * dh : x[b * 32 + k];
  }
  for (int64_t i = 0; i < m; i++)
    for (int64_t r = 0; r < rows; r++) {
      double acc = 0, acc_f = 0, mag = 0;
      for (int64_t c = 0; c < cols; c++) {
        acc += (double)xq[i * cols + c] * ref[r * cols + c];
        acc_f += (double)x[i * cols + c] * ref[r * cols + c];
        mag += fabs((double)x[i * cols + c] * ref[r * cols + c]);
      }
      check_close(what, (size_t)(i * rows + r), y[i * rows + r], acc, q8 ? 2e-3 : 1e-4);
      if (q8 && fabs(y[i * rows + r] - acc_f) > 0.01 * mag + 1e-4)
        FAIL_AT("%s[%lld]: %.6g vs float activations %.6g: quantisation error too large", what,
                (long long)(i * rows + r), y[i * rows + r], acc_f);
    }
  free(xq);
}

/* The backend's packed copy of wt (weight_pack), where it makes one: the
 * same results within the reference's tolerance, the same bits one row at a
 * time as in the batch (batch invariance) and on one thread as on two. */
static void matmul_packed(k_weight_t *wt, int64_t m, const float *x, const double *ref,
                          const char *what) {
  if (!g_be->ops->weight_pack) return;
  const int64_t rows = wt->rows, cols = wt->cols;
  CHECK_INT_EQ(g_be->ops->weight_pack(g_be, wt, false), 0);
  if (!wt->packed) return; /* no packed layout for this type, shape or build */
  char pw[80];
  snprintf(pw, sizeof pw, "packed %s", what);
  float *y = test_xmalloc((size_t)(m * rows + 1) * sizeof *y), *y1 = test_xmalloc((size_t)rows * sizeof *y1);
  fill_nan(y, (size_t)(m * rows));
  y[m * rows] = 777.0f;
  CHECK_INT_EQ(g_be->ops->matmul(g_be, y, x, wt, m), 0);
  CHECK_INT_EQ(y[m * rows], 777.0f);
  check_matmul(pw, wt->type, m, rows, cols, x, ref, y);
  for (int64_t i = 0; i < m; i++) {
    CHECK_INT_EQ(g_be1->ops->matmul(g_be1, y1, x + i * cols, wt, 1), 0);
    if (memcmp(y1, y + i * rows, (size_t)rows * sizeof *y1))
      FAIL_AT("%s: row %lld alone on one thread differs from the batch", pw, (long long)i);
  }
  g_be->ops->free(g_be, wt->packed);
  wt->packed = NULL;
  free(y);
  free(y1);
}

static void matmul_case(k_dtype_t type, int64_t m, int64_t rows, int64_t cols, uint64_t seed) {
  uint64_t rng = seed;
  float *x = test_rand_floats(&rng, (size_t)(m * cols), 1.0f);
  double *ref = test_xmalloc((size_t)(rows * cols) * sizeof *ref);
  void *w = rand_weights(&rng, type, rows, cols, ref);
  float *y = test_xmalloc((size_t)(m * rows + 1) * sizeof *y);
  fill_nan(y, (size_t)(m * rows));
  y[m * rows] = 777.0f;
  k_weight_t wt = {.type = type, .rows = rows, .cols = cols, .data = w};
  CHECK_INT_EQ(g_be->ops->matmul(g_be, y, x, &wt, m), 0);
  CHECK_INT_EQ(y[m * rows], 777.0f);
  char what[64];
  snprintf(what, sizeof what, "matmul %s %lldx%lldx%lld", dtype_name(type), (long long)m,
           (long long)rows, (long long)cols);
  check_matmul(what, type, m, rows, cols, x, ref, y);
  matmul_packed(&wt, m, x, ref, what);
  free(x);
  free(w);
  free(ref);
  free(y);
}

static void test_matmul(void) {
  CHECK(backend_takes(K_F32));
  fprintf(stderr, "   packed matmuls of 16 rows or more: %s\n",
          k__cpu_amx() ? "on AMX tiles, checked against one row at a time"
                       : "no AMX on this CPU (or PRESSD_CPU_AMX=0): its path is not run");
  for (size_t k = 0; k < N_TYPES; k++) {
    k_dtype_t t = k_all_types[k];
    if (!backend_takes(t)) {
      fprintf(stderr, "   %s weights not taken by this backend\n", dtype_name(t));
      continue;
    }
    uint64_t seed = 10 * (uint64_t)k;
    matmul_case(t, 1, 1, 32, seed + 1);
    matmul_case(t, 1, 37, 64, seed + 2);     /* a decode row (GEMV) */
    matmul_case(t, 5, 37, 96, seed + 3);     /* a ragged tile */
    matmul_case(t, 64, 192, 576, seed + 4);  /* q/k/v-sized */
    matmul_case(t, 3, 1536, 576, seed + 5);  /* MLP up */
    matmul_case(t, 9, 576, 1536, seed + 6);  /* MLP down */
    matmul_case(t, 7, 16, 64, seed + 7);     /* one group of 16 rows, ragged tiles */
    matmul_case(t, 37, 48, 800, seed + 8);   /* AMX: two tiles of 16 rows and 5 more, odd blocks */
  }
  /* The packed copy is for the int8 arithmetic: none in the others. */
  if (g_be->ops->weight_pack) {
    uint64_t rng = 77;
    double *ref = test_xmalloc(32 * 64 * sizeof *ref);
    void *w = rand_weights(&rng, K_Q4_1, 32, 64, ref);
    k_weight_t wt = {.type = K_Q4_1, .rows = 32, .cols = 64, .data = w};
    g_be->numerics = K_NUMERICS_EXACT;
    CHECK_INT_EQ(g_be->ops->weight_pack(g_be, &wt, false), 0);
    CHECK(wt.packed == NULL);
    g_be->numerics = K_NUMERICS_INT8;
    free(w);
    free(ref);
  }
  /* m = 0 does nothing */
  float x[32] = {0}, w[64] = {0}, y[2] = {5, 6};
  k_weight_t wt = {.type = K_F32, .rows = 2, .cols = 32, .data = w};
  CHECK_INT_EQ(g_be->ops->matmul(g_be, y, x, &wt, 0), 0);
  CHECK_NEAR(y[0], 5, 0);
  CHECK_NEAR(y[1], 6, 0);
}

/* matmul_n over weights ws[0..n) of one cols: every product bit-equal to
 * its own matmul call, nothing written past a product's end. */
static void matmul_n_case(const k_dtype_t *types, const int64_t *rows, const bool *pack, int n,
                          int64_t m, int64_t cols, uint64_t seed) {
  uint64_t rng = seed;
  float *x = test_rand_floats(&rng, (size_t)(m * cols), 1.0f);
  k_weight_t ws[8];
  const k_weight_t *wp[8];
  float *y[8], *want[8];
  void *data[8];
  CHECK(n <= 8);
  for (int i = 0; i < n; i++) {
    double *ref = test_xmalloc((size_t)(rows[i] * cols) * sizeof *ref);
    data[i] = rand_weights(&rng, types[i], rows[i], cols, ref);
    free(ref);
    ws[i] = (k_weight_t){.type = types[i], .rows = rows[i], .cols = cols, .data = data[i]};
    if (pack[i] && g_be->ops->weight_pack) CHECK_INT_EQ(g_be->ops->weight_pack(g_be, &ws[i], false), 0);
    wp[i] = &ws[i];
    y[i] = test_xmalloc((size_t)(m * rows[i] + 1) * sizeof *y[i]);
    want[i] = test_xmalloc((size_t)(m * rows[i]) * sizeof *want[i]);
    fill_nan(y[i], (size_t)(m * rows[i]));
    y[i][m * rows[i]] = 777.0f;
    CHECK_INT_EQ(g_be->ops->matmul(g_be, want[i], x, &ws[i], m), 0);
  }
  CHECK_INT_EQ(g_be->ops->matmul_n(g_be, y, x, wp, n, m), 0);
  for (int i = 0; i < n; i++) {
    CHECK_INT_EQ(y[i][m * rows[i]], 777.0f);
    if (memcmp(y[i], want[i], (size_t)(m * rows[i]) * sizeof *y[i]))
      FAIL_AT("matmul_n: product %d of %d (%s %lldx%lld, m %lld%s) differs from its matmul", i, n,
              dtype_name(types[i]), (long long)rows[i], (long long)cols, (long long)m,
              ws[i].packed ? ", packed" : "");
    if (ws[i].packed) g_be->ops->free(g_be, ws[i].packed);
    free(data[i]);
    free(y[i]);
    free(want[i]);
  }
  free(x);
}

static void test_matmul_n(void) {
  CHECK(g_be->ops->matmul_n != NULL);
  const k_numerics_t nums[] = {K_NUMERICS_INT8, K_NUMERICS_EXACT, K_NUMERICS_LLAMA};
  for (size_t k = 0; k < sizeof nums / sizeof *nums; k++) {
    g_be->numerics = nums[k];
    uint64_t seed = 100 * (uint64_t)(k + 1);
    const int64_t ms[] = {1, 3, 17, 40};
    for (size_t a = 0; a < sizeof ms / sizeof *ms; a++) {
      /* q/k/v: one type, packed (AMX from 16 rows where the CPU has it) */
      k_dtype_t t3[] = {K_Q4_1, K_Q4_1, K_Q4_1};
      int64_t r3[] = {192, 48, 64};
      bool all[] = {true, true, true, true, true}, some[] = {true, false, true};
      matmul_n_case(t3, r3, all, 3, ms[a], 576, seed + a);
      matmul_n_case(t3, r3, some, 3, ms[a], 576, seed + 10 + a);
      /* quantised types mixed: activations still shared */
      k_dtype_t tq[] = {K_Q4_0, K_Q8_0, K_Q4_1};
      matmul_n_case(tq, r3, some, 3, ms[a], 96, seed + 20 + a);
      /* a float type among them: one by one */
      k_dtype_t tf[] = {K_Q4_1, K_F32, K_F16};
      int64_t rf[] = {32, 5, 37};
      matmul_n_case(tf, rf, all, 3, ms[a], 64, seed + 30 + a);
      /* more products than one pool run serves */
      k_dtype_t t5[] = {K_Q8_0, K_Q4_1, K_Q4_0, K_Q4_1, K_Q8_0};
      int64_t r5[] = {16, 33, 48, 1, 64};
      matmul_n_case(t5, r5, all, 5, ms[a], 128, seed + 40 + a);
    }
  }
  g_be->numerics = K_NUMERICS_INT8;
  /* m = 0 and n = 0 do nothing */
  float x[32] = {0}, w[64] = {0}, y0[2] = {5, 6};
  k_weight_t wt = {.type = K_F32, .rows = 2, .cols = 32, .data = w};
  const k_weight_t *wp[] = {&wt};
  float *ys[] = {y0};
  CHECK_INT_EQ(g_be->ops->matmul_n(g_be, ys, x, wp, 1, 0), 0);
  CHECK_INT_EQ(g_be->ops->matmul_n(g_be, ys, x, wp, 0, 1), 0);
  CHECK_NEAR(y0[0], 5, 0);
  CHECK_NEAR(y0[1], 6, 0);
}

static void test_rmsnorm(void) {
  static const int64_t shapes[][2] = {{1, 1}, {1, 576}, {3, 576}, {17, 64}, {2, 1000}};
  uint64_t rng = 10;
  for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
    int64_t m = shapes[k][0], n = shapes[k][1];
    float *x = test_rand_floats(&rng, (size_t)(m * n), 3.0f);
    float *g = test_rand_floats(&rng, (size_t)n, 2.0f);
    float *y = test_xmalloc((size_t)(m * n) * sizeof *y);
    fill_nan(y, (size_t)(m * n));
    const float eps = 1e-5f;
    CHECK_INT_EQ(g_be->ops->rmsnorm(g_be, y, x, g, m, n, eps), 0);
    for (int64_t r = 0; r < m; r++) {
      double ss = 0;
      for (int64_t i = 0; i < n; i++) ss += (double)x[r * n + i] * x[r * n + i];
      double inv = 1.0 / sqrt(ss / (double)n + eps);
      for (int64_t i = 0; i < n; i++)
        check_close("rmsnorm", (size_t)(r * n + i), y[r * n + i], x[r * n + i] * inv * g[i],
                    1e-5);
    }
    free(x);
    free(g);
    free(y);
  }
  /* eps matters for a zero row: the output is zero, not NaN */
  float x0[8] = {0}, g1[8] = {1, 1, 1, 1, 1, 1, 1, 1}, y0[8];
  CHECK_INT_EQ(g_be->ops->rmsnorm(g_be, y0, x0, g1, 1, 8, 1e-6f), 0);
  for (int i = 0; i < 8; i++) CHECK_NEAR(y0[i], 0, 0);
  /* a constant row normalises to +-1 (times g) */
  float xc[4] = {-5, -5, -5, -5}, gc[4] = {1, 2, 3, 4}, yc[4];
  CHECK_INT_EQ(g_be->ops->rmsnorm(g_be, yc, xc, gc, 1, 4, 0.0f), 0);
  for (int i = 0; i < 4; i++) CHECK_NEAR(yc[i], -gc[i], 1e-6);
}

static void test_rope(void) {
  enum { M = 5, NH = 3, D = 64 };
  static const int32_t pos[M] = {0, 1, 17, 4095, 8191};
  float inv_freq[D / 2];
  for (int i = 0; i < D / 2; i++) inv_freq[i] = (float)pow(10000.0, -2.0 * i / D);
  uint64_t rng = 20;
  float *x = test_rand_floats(&rng, M * NH * D, 1.0f);
  float *y = test_xmalloc(M * NH * D * sizeof *y);
  memcpy(y, x, M * NH * D * sizeof *y);
  CHECK_INT_EQ(g_be->ops->rope(g_be, y, pos, M, NH, D, inv_freq), 0);
  for (int r = 0; r < M; r++)
    for (int h = 0; h < NH; h++)
      for (int i = 0; i < D / 2; i++) {
        size_t o = ((size_t)r * NH + h) * D;
        /* the angle as GGML forms it (fp32 product), the rotation in double */
        double th = (double)((float)pos[r] * inv_freq[i]);
        double x0 = x[o + 2 * i], x1 = x[o + 2 * i + 1];
        check_close("rope", o + 2 * i, y[o + 2 * i], x0 * cos(th) - x1 * sin(th), 2e-6);
        check_close("rope", o + 2 * i + 1, y[o + 2 * i + 1], x0 * sin(th) + x1 * cos(th), 2e-6);
      }
  /* position 0 is the identity; the norm of every pair is kept */
  for (int i = 0; i < NH * D; i++) CHECK_NEAR(y[i], x[i], 0);
  for (int i = 0; i < M * NH * D; i += 2) {
    double a = hypot(x[i], x[i + 1]), b = hypot(y[i], y[i + 1]);
    CHECK_NEAR(a, b, 1e-6);
  }
  /* by hand: pos 1, inv_freq 1 rotates (1, 0) by one radian */
  float v[2] = {1, 0}, f1[1] = {1};
  int32_t p1[1] = {1};
  CHECK_INT_EQ(g_be->ops->rope(g_be, v, p1, 1, 1, 2, f1), 0);
  CHECK_NEAR(v[0], cos(1.0), 1e-7);
  CHECK_NEAR(v[1], sin(1.0), 1e-7);
  /* bad head sizes */
  CHECK_INT_EQ(g_be->ops->rope(g_be, y, pos, M, NH, 63, inv_freq), -EINVAL);
  CHECK_INT_EQ(g_be->ops->rope(g_be, y, pos, 1, 1, 2048, inv_freq), -EINVAL);
  free(x);
  free(y);
}

static void test_silu_mul_add(void) {
  static const int64_t sizes[] = {1, 7, 16384, 16385, 40000};
  uint64_t rng = 30;
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    int64_t n = sizes[k];
    float *gate = test_rand_floats(&rng, (size_t)n, 20.0f);
    float *up = test_rand_floats(&rng, (size_t)n, 3.0f);
    if (n > 4) {
      gate[0] = 0.0f;
      gate[1] = -100.0f;
      gate[2] = 100.0f;
      gate[3] = -1e30f;
    }
    float *y = test_xmalloc((size_t)(n + 1) * sizeof *y);
    fill_nan(y, (size_t)n);
    y[n] = 321.0f;
    CHECK_INT_EQ(g_be->ops->silu_mul(g_be, y, gate, up, n), 0);
    CHECK_NEAR(y[n], 321.0, 0);
    for (int64_t i = 0; i < n; i++) {
      double g = gate[i];
      double want = g / (1.0 + exp(-g)) * up[i];
      check_close("silu_mul", (size_t)i, y[i], want, 1e-5);
    }
    /* add */
    float *x = test_rand_floats(&rng, (size_t)n, 5.0f);
    float *before = test_xmalloc((size_t)n * sizeof *before);
    memcpy(before, up, (size_t)n * sizeof *before);
    CHECK_INT_EQ(g_be->ops->add(g_be, up, x, n), 0);
    for (int64_t i = 0; i < n; i++)
      if (up[i] != before[i] + x[i]) FAIL_AT("add[%lld]", (long long)i);
    free(gate);
    free(up);
    free(y);
    free(x);
    free(before);
  }
}

/* sample without draws: the first maximum of each row; NaN never wins; a
 * row with nothing above -inf gives 0. Crafted rows, then random ones
 * against a plain scan. With draws: temperature 0 is the argmax, min-p 1
 * the maximum, one key one token, and the frequencies over many keys are
 * softmax(l / T), min-p's cut included. */
/* penalize: the listed ids of each row rewritten by k_draw_penalise, the
 * rest untouched; an id outside the row refused before anything changes. */
static void test_penalize(void) {
  enum { M = 12, N = 1000 };
  uint64_t rng = 3;
  float *x = test_rand_floats(&rng, (size_t)M * N, 5.0f), *want = test_xmalloc((size_t)M * N * 4);
  k_penalty_t rows[M];
  int32_t *ids = test_xmalloc(M * 300 * sizeof *ids), *seen = test_xmalloc(M * 300 * sizeof *seen);
  penalty_case(&rng, M, N, rows, ids, seen);
  memcpy(want, x, (size_t)M * N * 4);
  for (int64_t r = 0; r < M; r++)
    for (int32_t j = 0; j < rows[r].n; j++) {
      float *l = &want[r * N + ids[rows[r].first + j]];
      const int32_t s = seen[rows[r].first + j];
      *l = k_draw_penalise(*l, s >> 1, s & 1, rows[r].rep, rows[r].pres, rows[r].freq);
    }
  CHECK(memcmp(x, want, (size_t)M * N * 4) != 0); /* the case changes something */
  CHECK_INT_EQ(g_be->ops->penalize(g_be, x, M, N, rows, ids, seen), 0);
  CHECK(memcmp(x, want, (size_t)M * N * 4) == 0);
  CHECK_NEAR(k_draw_penalise(2.0f, 0, true, 2.0f, 0.5f, 0.5f), 1.0, 0);    /* prompt only */
  CHECK_NEAR(k_draw_penalise(-2.0f, 3, false, 2.0f, 0.5f, 0.5f), -6.0, 0); /* -4 - 1.5 - 0.5 */
  CHECK_NEAR(k_draw_penalise(2.0f, 0, false, 2.0f, 0.5f, 0.5f), 2.0, 0);   /* unseen */
  ids[rows[0].first] = N;
  CHECK_INT_EQ(g_be->ops->penalize(g_be, x, M, N, rows, ids, seen), -EINVAL);
  CHECK(memcmp(x, want, (size_t)M * N * 4) == 0);
  free(x);
  free(want);
  free(ids);
  free(seen);
}

/* logprobs: log-softmax of the raw row (NaN and -inf weigh nothing), the
 * top ids larger first and the lower id first on ties; rows not asked
 * untouched; a drawn id outside the row refused. */
static void test_logprobs(void) {
  const float l2 = (float)M_LN2;
  const float x[2][5] = {{0.0f, l2, l2, -INFINITY, NAN}, {1.0f, 1.0f, 1.0f, 1.0f, 1.0f}};
  const int32_t ids[2] = {3, 4}, want[2] = {4, -1};
  k_logprobs_t out[2];
  memset(out, 0x5a, sizeof out);
  CHECK_INT_EQ(g_be->ops->logprobs(g_be, out, &x[0][0], 2, 5, ids, want), 0);
  CHECK_INT_EQ(out[0].n_top, 3); /* -inf and NaN are not candidates */
  CHECK_INT_EQ(out[0].top[0], 1);
  CHECK_INT_EQ(out[0].top[1], 2);
  CHECK_INT_EQ(out[0].top[2], 0);
  CHECK_NEAR(out[0].top_lp[0], log(2.0 / 5.0), 1e-6);
  CHECK_NEAR(out[0].top_lp[1], log(2.0 / 5.0), 1e-6);
  CHECK_NEAR(out[0].top_lp[2], log(1.0 / 5.0), 1e-6);
  CHECK(out[0].chosen == -INFINITY);
  unsigned char z[sizeof out[1]];
  memset(z, 0x5a, sizeof z);
  CHECK(memcmp(&out[1], z, sizeof z) == 0);
  const int32_t bad[2] = {5, 0};
  CHECK_INT_EQ(g_be->ops->logprobs(g_be, out, &x[0][0], 2, 5, bad, want), -EINVAL);
}

static void test_sample(void) {
  enum { M = 9, N = 1000 };
  uint64_t rng = 31;
  float *x = test_rand_floats(&rng, (size_t)M * N, 10.0f);
  int32_t want[M];
  float *r = x + 1 * N; /* ties: the lower column */
  for (int i = 0; i < N; i++) r[i] = 1.0f;
  r[900] = r[5] = 3.0f;
  want[1] = 5;
  r = x + 2 * N; /* NaN around the maximum */
  for (int i = 0; i < N; i++) r[i] = -5.0f;
  r[0] = r[8] = NAN;
  r[7] = 2.0f;
  want[2] = 7;
  r = x + 3 * N; /* all -inf */
  for (int i = 0; i < N; i++) r[i] = -INFINITY;
  want[3] = 0;
  r = x + 4 * N; /* one finite value, last */
  for (int i = 0; i < N; i++) r[i] = -INFINITY;
  r[N - 1] = -1e30f;
  want[4] = N - 1;
  r = x + 5 * N; /* all NaN */
  for (int i = 0; i < N; i++) r[i] = NAN;
  want[5] = 0;
  r = x + 6 * N; /* +inf beats everything, even a later +inf */
  r[300] = r[301] = INFINITY;
  want[6] = 300;
  for (int row = 0; row < M; row++) {
    if (row >= 1 && row <= 6) continue;
    const float *q = x + (size_t)row * N;
    want[row] = 0;
    for (int i = 1; i < N; i++)
      if (q[i] > q[want[row]]) want[row] = i;
  }
  int32_t got[M + 1];
  got[M] = -7;
  CHECK_INT_EQ(g_be->ops->sample(g_be, got, x, M, N, NULL), 0);
  for (int row = 0; row < M; row++) CHECK_INT_EQ(got[row], want[row]);
  CHECK_INT_EQ(got[M], -7);
  CHECK_INT_EQ(g_be->ops->sample(g_be, got, x, 0, N, NULL), 0);
  CHECK_INT_EQ(g_be->ops->sample(g_be, got, x, 1, 0, NULL), -EINVAL);

  /* draws: rows 1-6 (ties, NaN, -inf, +inf) are the argmax at any
   * temperature where the maximum is not finite or is kept alone */
  k_draw_t d[M];
  for (int row = 0; row < M; row++)
    d[row] = (k_draw_t){.temperature = row % 2 ? 0.0f : 0.7f, .key = 99u + row};
  d[2].min_p = d[4].min_p = 1.0f; /* only the maximum */
  CHECK_INT_EQ(g_be->ops->sample(g_be, got, x, M, N, d), 0);
  for (int row = 1; row <= 6; row++)
    if (row != 1 || d[row].temperature == 0.0f) CHECK_INT_EQ(got[row], want[row]);
  int32_t again[M];
  CHECK_INT_EQ(g_be->ops->sample(g_be, again, x, M, N, d), 0);
  for (int row = 0; row < M; row++) CHECK_INT_EQ(again[row], got[row]); /* the key decides */
  free(x);

  /* frequencies over 40,000 keys against softmax(l / T) over the kept ids,
   * worked out here by sorting */
  enum { V = 5, DRAWS = 40000, CASES = 6 };
  const float l[V] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f}, ties[V] = {1.0f, 1.0f, 3.0f, 1.0f, 1.0f};
  const k_draw_t cases[CASES] = {
      {.temperature = 1.0f},
      {.temperature = 0.5f, .min_p = 0.3f},
      {.temperature = 1.0f, .top_k = 2},
      {.temperature = 1.0f, .top_p = 0.8f},
      {.temperature = 0.5f, .top_k = 4, .top_p = 0.9f, .min_p = 0.05f},
      {.temperature = 2.0f, .top_k = 3}, /* on the ties: 2, then ids 0 and 1 */
  };
  for (int k = 0; k < CASES; k++) {
    const float *row = k == 5 ? ties : l;
    const k_draw_t *c = &cases[k];
    int32_t count[V] = {0};
    for (int t = 0; t < DRAWS; t++) {
      k_draw_t dr = *c;
      dr.key = 0x1234567ull * (uint64_t)(t + 1);
      int32_t id = -1;
      CHECK_INT_EQ(g_be->ops->sample(g_be, &id, row, 1, V, &dr), 0);
      CHECK(id >= 0 && id < V);
      count[id]++;
    }
    int32_t order[V] = {0, 1, 2, 3, 4}; /* rank order: larger logit, then lower id */
    for (int a = 1; a < V; a++)
      for (int b = a; b > 0 && (row[order[b]] > row[order[b - 1]] ||
                                (row[order[b]] == row[order[b - 1]] && order[b] < order[b - 1]));
           b--) {
        int32_t tmp = order[b];
        order[b] = order[b - 1];
        order[b - 1] = tmp;
      }
    double w[V] = {0}, lmax = row[order[0]], sum = 0;
    const int kk = c->top_k > 0 && c->top_k < V ? c->top_k : V;
    for (int q = 0; q < kk; q++) sum += w[order[q]] = exp((row[order[q]] - lmax) / c->temperature);
    if (c->top_p > 0 && c->top_p < 1) { /* the shortest prefix reaching top_p of it */
      double cum = 0;
      int n_kept = 0;
      while (n_kept < kk && cum < c->top_p * sum) cum += w[order[n_kept++]];
      for (int q = n_kept; q < V; q++) w[order[q]] = 0;
    }
    sum = 0;
    for (int i = 0; i < V; i++) {
      if (w[i] < c->min_p) w[i] = 0; /* p / p_max below min-p */
      sum += w[i];
    }
    for (int i = 0; i < V; i++) {
      double p = w[i] / sum, f = (double)count[i] / DRAWS;
      double sd = sqrt(p * (1 - p) / DRAWS);
      if (fabs(f - p) > 5 * sd + 1e-9)
        FAIL_AT("case %d: token %d drawn %.4f, softmax over the kept %.4f", k, i, f, p);
    }
  }
}

static void test_embed(void) {
  enum { ROWS = 10, COLS = 64 };
  const int32_t ids[5] = {3, 0, 9, 3, 5};
  uint64_t rng = 50;
  for (size_t k = 0; k < N_TYPES; k++) {
    k_dtype_t type = k_all_types[k];
    if (!backend_takes(type)) continue;
    double ref[ROWS * COLS];
    void *table = rand_weights(&rng, type, ROWS, COLS, ref);
    k_weight_t t = {.type = type, .rows = ROWS, .cols = COLS, .data = table};
    float y[5 * COLS + 1];
    y[5 * COLS] = 99.0f;
    CHECK_INT_EQ(g_be->ops->embed(g_be, y, &t, ids, 5), 0);
    for (int r = 0; r < 5; r++)
      for (int c = 0; c < COLS; c++)
        check_close(dtype_name(type), (size_t)(r * COLS + c), y[r * COLS + c],
                    ref[ids[r] * COLS + c], 1e-6);
    CHECK_NEAR(y[5 * COLS], 99.0, 0);
    CHECK_INT_EQ(g_be->ops->embed(g_be, y, &t, ids, 0), 0);
    const int32_t bad1[2] = {1, -1}, bad2[2] = {ROWS, 0}, bad3[1] = {INT32_MAX};
    CHECK_INT_EQ(g_be->ops->embed(g_be, y, &t, bad1, 2), -EINVAL);
    CHECK_INT_EQ(g_be->ops->embed(g_be, y, &t, bad2, 2), -EINVAL);
    CHECK_INT_EQ(g_be->ops->embed(g_be, y, &t, bad3, 1), -EINVAL);
    free(table);
  }
}

/* Element i of an arena array (K or V) of a's type, as a float and back. */
static void set_el(const k_kv_arena_t *a, float *arr, int64_t i, float x) {
  if (a->type == K_F16) ((uint16_t *)(void *)arr)[i] = k_f32_to_f16(x);
  else arr[i] = x;
}
static float get_el(const k_kv_arena_t *a, const float *arr, int64_t i) {
  return a->type == K_F16 ? k_f16_to_f32(((const uint16_t *)(const void *)arr)[i]) : arr[i];
}
/* x as an f16 arena holds it, or an f32 one */
static float f16_round(float x) { return k_f16_to_f32(k_f32_to_f16(x)); }
static float same_float(float x) { return x; }

/* An arena on the backend holding K and V as t, every slot filled with
 * garbage: huge V, position 0 (visible to every query), so reading a slot
 * not in use shows. */
static void arena_new_of(k_kv_arena_t *a, int32_t n_blocks, int32_t bs, int32_t d, k_dtype_t t) {
  *a = (k_kv_arena_t){0};
  a->n_blocks = n_blocks;
  a->block_size = bs;
  a->head_dim = d;
  a->type = t;
  size_t slots = (size_t)n_blocks * (size_t)bs;
  a->k = g_be->ops->alloc(g_be, slots * (size_t)d * k_dtype_bytes(t));
  a->v = g_be->ops->alloc(g_be, slots * (size_t)d * k_dtype_bytes(t));
  a->score = g_be->ops->alloc(g_be, slots * sizeof(float));
  a->pos = g_be->ops->alloc(g_be, slots * sizeof(int32_t));
  CHECK(a->k && a->v && a->score && a->pos);
  for (size_t i = 0; i < slots * (size_t)d; i++) {
    set_el(a, a->k, (int64_t)i, 3.0f);
    set_el(a, a->v, (int64_t)i, 1000.0f);
  }
  for (size_t i = 0; i < slots; i++) {
    a->score[i] = 9.0f;
    a->pos[i] = 0;
  }
}
static void arena_new(k_kv_arena_t *a, int32_t n_blocks, int32_t bs, int32_t d) {
  arena_new_of(a, n_blocks, bs, d, K_F32);
}
static void arena_free(k_kv_arena_t *a) {
  g_be->ops->free(g_be, a->k);
  g_be->ops->free(g_be, a->v);
  g_be->ops->free(g_be, a->score);
  g_be->ops->free(g_be, a->pos);
}

/* Write K, V and a position straight into a slot (the CPU arena is host
 * memory), to lay out a cache without going through kv_write. */
static void put_slot(k_kv_arena_t *a, int32_t slot, const float *k, const float *v, int32_t pos) {
  for (int32_t d = 0; d < a->head_dim; d++) {
    set_el(a, a->k, (int64_t)slot * a->head_dim + d, k[d]);
    set_el(a, a->v, (int64_t)slot * a->head_dim + d, v[d]);
  }
  a->pos[slot] = pos;
}

/* Two sequences, two layers, two KV heads: each row's K/V land in the last
 * slots of its sequence's heads at the call's layer, whatever the blocks. */
static void kv_write_of(k_dtype_t type) {
  enum { NB = 12, BS = 4, D = 8, H = 2, L = 2, STRIDE = 3 };
  k_kv_arena_t a;
  arena_new_of(&a, NB, BS, D, type);
  float (*as)(float) = type == K_F16 ? f16_round : same_float; /* what the arena holds */
  uint64_t rng = 40;
  const int32_t M = 5; /* seq 0: 2 rows, seq 1: 3 rows */
  float *k = test_rand_floats(&rng, M * H * D, 1.0f), *v = test_rand_floats(&rng, M * H * D, 1.0f);
  const int32_t q_start[3] = {0, 2, 5}, q_pos[5] = {7, 8, 0, 1, 2};
  /* [L][H][STRIDE] tables; lengths include the new rows */
  const int32_t tab0[L * H * STRIDE] = {9, 3, -1, 4, 11, -1, 0, 1, -1, 2, 5, -1};
  const int32_t ctx0[L * H] = {9, 6, 5, 7};
  const int32_t tab1[L * H * STRIDE] = {6, -1, -1, 7, -1, -1, 8, -1, -1, 10, -1, -1};
  const int32_t ctx1[L * H] = {3, 3, 3, 3};
  k_seq_kv_t seqs[2] = {{tab0, ctx0, STRIDE, 0, NULL, NULL, 1},
                           {tab1, ctx1, STRIDE, 0, NULL, NULL, 1}};
  k_attn_args_t args = {.n_seqs = 2, .layer = 1, .n_kv_heads = H, .head_dim = D,
                        .q_start = q_start, .q_pos = q_pos, .seqs = seqs};
  CHECK_INT_EQ(g_be->ops->kv_write(g_be, &a, k, v, &args), 0);
  bool written[NB * BS] = {false};
  for (int s = 0; s < 2; s++)
    for (int t = q_start[s]; t < q_start[s + 1]; t++)
      for (int h = 0; h < H; h++) {
        const int32_t *tab = (s ? tab1 : tab0) + (1 * H + h) * STRIDE;
        int32_t i = (s ? ctx1 : ctx0)[1 * H + h] - (q_start[s + 1] - t);
        int32_t sl = tab[i / BS] * BS + i % BS;
        written[sl] = true;
        CHECK_INT_EQ(a.pos[sl], q_pos[t]);
        CHECK_NEAR(a.score[sl], 0, 0);
        for (int d = 0; d < D; d++) {
          CHECK_NEAR(get_el(&a, a.k, sl * D + d), as(k[(t * H + h) * D + d]), 0);
          CHECK_NEAR(get_el(&a, a.v, sl * D + d), as(v[(t * H + h) * D + d]), 0);
        }
      }
  int n_written = 0;
  for (int sl = 0; sl < NB * BS; sl++) {
    if (written[sl]) {
      n_written++;
      continue;
    }
    CHECK_INT_EQ(a.pos[sl], 0);
    CHECK_NEAR(a.score[sl], 9.0, 0);
    for (int d = 0; d < D; d++) CHECK_NEAR(get_el(&a, a.k, sl * D + d), 3.0, 0);
  }
  CHECK_INT_EQ(n_written, M * H);
  /* a table pointing outside the arena, or fewer slots than rows, is refused */
  const int32_t bad_tab[L * H * STRIDE] = {0, 0, 0, 0, 0, 0, NB, 0, 0, 0, 0, 0};
  seqs[0].blocks = bad_tab;
  CHECK_INT_EQ(g_be->ops->kv_write(g_be, &a, k, v, &args), -EINVAL);
  const int32_t short_ctx[L * H] = {9, 6, 1, 7};
  seqs[0].blocks = tab0;
  seqs[0].ctx = short_ctx;
  CHECK_INT_EQ(g_be->ops->kv_write(g_be, &a, k, v, &args), -EINVAL);
  args.n_seqs = 0;
  CHECK_INT_EQ(g_be->ops->kv_write(g_be, &a, k, v, &args), 0);
  free(k);
  free(v);
  arena_free(&a);
}

static void test_kv_write(void) {
  kv_write_of(K_F32);
  kv_write_of(K_F16); /* rounded to the nearest half */
}

/* Compaction moves carry K, V, score and position; other slots stay. */
static void kv_move_of(k_dtype_t type) {
  enum { NB = 4, BS = 4, D = 8 };
  k_kv_arena_t a;
  arena_new_of(&a, NB, BS, D, type);
  float (*as)(float) = type == K_F16 ? f16_round : same_float;
  uint64_t rng = 41;
  float *k = test_rand_floats(&rng, NB * BS * D, 1.0f), *v = test_rand_floats(&rng, NB * BS * D, 1.0f);
  for (int sl = 0; sl < NB * BS; sl++) {
    put_slot(&a, sl, k + sl * D, v + sl * D, 100 + sl);
    a.score[sl] = (float)sl * 0.5f;
  }
  const int32_t src[3] = {15, 14, 9}, dst[3] = {2, 0, 5};
  CHECK_INT_EQ(g_be->ops->kv_move(g_be, &a, src, dst, 3), 0);
  for (int sl = 0; sl < NB * BS; sl++) {
    int from = sl;
    for (int i = 0; i < 3; i++)
      if (dst[i] == sl) from = src[i];
    CHECK_INT_EQ(a.pos[sl], 100 + from);
    CHECK_NEAR(a.score[sl], from * 0.5, 0);
    for (int d = 0; d < D; d++) {
      CHECK_NEAR(get_el(&a, a.k, sl * D + d), as(k[from * D + d]), 0);
      CHECK_NEAR(get_el(&a, a.v, sl * D + d), as(v[from * D + d]), 0);
    }
  }
  const int32_t bad[1] = {NB * BS};
  CHECK_INT_EQ(g_be->ops->kv_move(g_be, &a, bad, dst, 1), -EINVAL);
  CHECK_INT_EQ(g_be->ops->kv_move(g_be, &a, src, bad, 1), -EINVAL);
  CHECK_INT_EQ(g_be->ops->kv_move(g_be, &a, src, dst, 0), 0);
  free(k);
  free(v);
  arena_free(&a);
}

static void test_kv_move(void) {
  kv_move_of(K_F32);
  kv_move_of(K_F16);
}

/* ---- attention ------------------------------------------------------------ */

#define MAX_KVH 16

typedef struct seq_spec {
  int32_t prefix; /* positions [0, prefix) came before this step */
  int32_t n_q;    /* query rows at positions prefix .. prefix + n_q - 1 */
  int32_t keep[MAX_KVH]; /* prefix positions each KV head still holds; -1 all */
  int32_t n_obs;         /* compression scores asked (k_seq_kv_t.n_obs) */
} seq_spec_t;

typedef struct attn_case {
  const char *name;
  int32_t n_q_heads, n_kv_heads, head_dim, block_size;
  int32_t n_seqs;
  const seq_spec_t *seqs;
  float q_gain; /* larger: peakier softmax */
  uint64_t seed;
  bool sorted_slots; /* slots in position order (else shuffled) */
  int32_t obs_pool;  /* max-pool width of prefill scores; 0 = 1 */
  k_dtype_t kv_type; /* of the arena's K and V (0: f32) */
} attn_case_t;

typedef struct attn_stats {
  double max_diff;
  int64_t rows_one_key;
  int64_t rows;
} attn_stats_t;

/* Copies of the sequences' obs_mass (n floats each, NULL where none), which
 * are then reset to 0.5 for another run to add to. */
static float **take_mass(k_seq_kv_t *views, int32_t S, size_t n) {
  float **m = test_xmalloc((size_t)S * sizeof *m);
  for (int32_t s = 0; s < S; s++) {
    m[s] = NULL;
    if (!views[s].obs_mass) continue;
    m[s] = test_xmalloc(n * sizeof(float));
    memcpy(m[s], views[s].obs_mass, n * sizeof(float));
    for (size_t t = 0; t < n; t++) views[s].obs_mass[t] = 0.5f;
  }
  return m;
}

/* Whether the other run's obs_mass equal the copies; the copies are put
 * back where restore, and freed. */
static bool same_mass(float **m, k_seq_kv_t *views, int32_t S, size_t n, bool restore) {
  bool same = true;
  for (int32_t s = 0; s < S; s++) {
    if (!m[s]) continue;
    same = same && !memcmp(m[s], views[s].obs_mass, n * sizeof(float));
    if (restore) memcpy(views[s].obs_mass, m[s], n * sizeof(float));
    free(m[s]);
  }
  free(m);
  return same;
}

/* Batch invariance: every query row of an unscored sequence, alone in a
 * call, gets the bits it got in the batch (out), though tiles of many rows
 * take other code paths than one row does. The arena's scores are kept. */
static void check_rows_alone(const char *name, k_kv_arena_t *a, const k_attn_args_t *args,
                             const float *out, int32_t n_slots) {
  const int64_t row = (int64_t)args->n_q_heads * args->head_dim;
  float *o1 = test_xmalloc((size_t)row * sizeof *o1);
  float *score = test_xmalloc((size_t)n_slots * sizeof *score);
  memcpy(score, a->score, (size_t)n_slots * sizeof *score);
  int32_t checked = 0;
  for (int32_t s = 0; s < args->n_seqs; s++) {
    if (args->seqs[s].n_obs != 0) continue;
    for (int32_t r = args->q_start[s]; r < args->q_start[s + 1]; r++, checked++) {
      const int32_t q_start[2] = {0, 1};
      k_attn_args_t one = *args;
      one.n_seqs = 1;
      one.q = args->q + r * row;
      one.out = o1;
      one.q_start = q_start;
      one.q_pos = args->q_pos + r;
      one.seqs = args->seqs + s;
      CHECK_INT_EQ(g_be->ops->attention(g_be, a, &one), 0);
      if (memcmp(o1, out + r * row, (size_t)row * sizeof *o1))
        FAIL_AT("%s: seq %d row %d alone differs from the batch", name, s, r);
    }
  }
  memcpy(a->score, score, (size_t)n_slots * sizeof *score);
  if (!checked) fprintf(stderr, "   %s: no unscored rows to check alone\n", name);
  free(score);
  free(o1);
}

/* f rounded to bf16, to nearest even. */
static float bf16_round(float f) { return model_bf16_to_f32(model_f32_to_bf16(f)); }

static void run_attention(const attn_case_t *c, attn_stats_t *st) {
  const int32_t S = c->n_seqs, H = c->n_kv_heads, QH = c->n_q_heads, D = c->head_dim,
                B = c->block_size, G = QH / H;
  /* the int8 arithmetic's bf16 dot products (k__cpu_bf16): the reference
   * rounds the scaled queries, K, V and each block's exponentials (taken
   * from the running maximum, as the online softmax does) the same way */
  const bool bf = g_be->numerics == K_NUMERICS_INT8 && k__cpu_bf16() && B == 16 && D % 32 == 0;
  CHECK(H <= MAX_KVH);
  uint64_t rng = c->seed;

  /* what every (seq, head) holds: positions in slot order, and its K/V */
  int32_t *ctx = test_xmalloc((size_t)S * H * sizeof *ctx);
  int32_t **hpos = test_xmalloc((size_t)S * H * sizeof *hpos);
  float **hk = test_xmalloc((size_t)S * H * sizeof *hk), **hv = test_xmalloc((size_t)S * H * sizeof *hv);
  int32_t total_blocks = 0, max_blocks = 1;
  for (int32_t s = 0; s < S; s++) {
    const seq_spec_t *sp = &c->seqs[s];
    int32_t *pool = test_xmalloc((size_t)(sp->prefix + 1) * sizeof *pool);
    for (int32_t h = 0; h < H; h++) {
      int32_t keep = sp->keep[h] < 0 || sp->keep[h] > sp->prefix ? sp->prefix : sp->keep[h];
      int32_t n = keep + sp->n_q, i = s * H + h;
      ctx[i] = n;
      hpos[i] = test_xmalloc((size_t)(n + 1) * sizeof(int32_t));
      /* a random subset of the prefix survives, plus every new position */
      for (int32_t p = 0; p < sp->prefix; p++) pool[p] = p;
      for (int32_t p = 0; p < keep; p++) {
        int32_t j = p + rng_int(&rng, sp->prefix - p);
        int32_t t = pool[p];
        pool[p] = pool[j];
        pool[j] = t;
        hpos[i][p] = pool[p];
      }
      for (int32_t p = 0; p < sp->n_q; p++) hpos[i][keep + p] = sp->prefix + p;
      if (c->sorted_slots) {
        for (int32_t a = 1; a < n; a++) /* insertion sort */
          for (int32_t b = a; b > 0 && hpos[i][b - 1] > hpos[i][b]; b--) {
            int32_t t = hpos[i][b];
            hpos[i][b] = hpos[i][b - 1];
            hpos[i][b - 1] = t;
          }
      } else {
        for (int32_t a = n - 1; a > 0; a--) { /* slot order is not position order */
          int32_t b = rng_int(&rng, a + 1), t = hpos[i][a];
          hpos[i][a] = hpos[i][b];
          hpos[i][b] = t;
        }
      }
      hk[i] = test_rand_floats(&rng, (size_t)n * D, 1.0f);
      hv[i] = test_rand_floats(&rng, (size_t)n * D, 1.0f);
      for (int64_t e = 0; c->kv_type == K_F16 && e < (int64_t)n * D; e++) {
        hk[i][e] = f16_round(hk[i][e]); /* the reference sees what the arena holds */
        hv[i][e] = f16_round(hv[i][e]);
      }
      int32_t nb = (n + B - 1) / B;
      total_blocks += nb;
      if (nb > max_blocks) max_blocks = nb;
    }
    free(pool);
  }
  max_blocks += 1; /* an unused column: -1 there, never read */

  /* blocks from a shuffled arena; tables [S][H][max_blocks] */
  int32_t n_arena = total_blocks + 9;
  int32_t *ids = test_xmalloc((size_t)n_arena * sizeof *ids);
  for (int32_t b = 0; b < n_arena; b++) ids[b] = b;
  for (int32_t b = n_arena - 1; b > 0; b--) {
    int32_t j = rng_int(&rng, b + 1), t = ids[b];
    ids[b] = ids[j];
    ids[j] = t;
  }
  k_kv_arena_t a;
  arena_new_of(&a, n_arena, B, D, c->kv_type);
  int32_t *tables = test_xmalloc((size_t)S * H * max_blocks * sizeof *tables);
  int32_t next = 0;
  for (int32_t i = 0; i < S * H; i++) {
    int32_t *row = tables + (int64_t)i * max_blocks;
    int32_t nb = (ctx[i] + B - 1) / B;
    for (int32_t b = 0; b < max_blocks; b++) row[b] = b < nb ? ids[next++] : -1;
    for (int32_t t = 0; t < ctx[i]; t++)
      put_slot(&a, row[t / B] * B + t % B, hk[i] + (int64_t)t * D, hv[i] + (int64_t)t * D,
               hpos[i][t]);
  }
  const int32_t cap = max_blocks * B; /* logical slots per head row */
  k_seq_kv_t *views = test_xmalloc((size_t)S * sizeof *views);
  for (int32_t s = 0; s < S; s++) {
    views[s] = (k_seq_kv_t){tables + (int64_t)s * H * max_blocks, ctx + s * H, max_blocks,
                            c->seqs[s].n_obs, NULL, NULL, c->obs_pool > 0 ? c->obs_pool : 1};
    if (c->seqs[s].n_obs > 0) {
      views[s].obs_mass = test_xmalloc((size_t)H * cap * sizeof(float));
      views[s].obs_last = test_xmalloc((size_t)QH * cap * sizeof(float));
      for (int32_t t = 0; t < H * cap; t++) views[s].obs_mass[t] = 0.5f; /* added to */
      fill_nan(views[s].obs_last, (size_t)QH * cap);
    }
  }
  const int32_t n_slots = n_arena * B;
  float *score0 = test_xmalloc((size_t)n_slots * sizeof *score0);
  float *score2 = test_xmalloc((size_t)n_slots * sizeof *score2);
  for (int32_t t = 0; t < n_slots; t++) a.score[t] = score0[t] = (float)(t % 7) * 0.25f;
  /* reference scores: [S*H][cap] added, [S*H][G][cap] window sums, [S][QH][cap] last row */
  double *ref_add = calloc((size_t)S * H * cap, sizeof(double));
  double *ref_sq = calloc((size_t)S * H * G * cap, sizeof(double));
  double *ref_mass = calloc((size_t)S * H * G * cap, sizeof(double));
  double *ref_last = calloc((size_t)S * QH * cap, sizeof(double));
  CHECK(ref_add && ref_sq && ref_mass && ref_last);

  /* queries */
  int32_t *q_start = test_xmalloc((size_t)(S + 1) * sizeof *q_start);
  q_start[0] = 0;
  for (int32_t s = 0; s < S; s++) q_start[s + 1] = q_start[s] + c->seqs[s].n_q;
  int32_t n_tok = q_start[S];
  int32_t *q_pos = test_xmalloc((size_t)n_tok * sizeof *q_pos);
  for (int32_t s = 0; s < S; s++)
    for (int32_t r = 0; r < c->seqs[s].n_q; r++) q_pos[q_start[s] + r] = c->seqs[s].prefix + r;
  float *q = test_rand_floats(&rng, (size_t)n_tok * QH * D, c->q_gain);
  float *out = test_xmalloc((size_t)n_tok * QH * D * sizeof *out);
  float *out1 = test_xmalloc((size_t)n_tok * QH * D * sizeof *out1);
  fill_nan(out, (size_t)n_tok * QH * D);
  fill_nan(out1, (size_t)n_tok * QH * D);

  k_attn_args_t args = {
      .n_seqs = S,
      .n_q_heads = QH,
      .n_kv_heads = H,
      .head_dim = D,
      .scale = 1.0f / sqrtf((float)D),
      .q = q,
      .out = out,
      .q_start = q_start,
      .q_pos = q_pos,
      .seqs = views,
  };
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  memcpy(score2, a.score, (size_t)n_slots * sizeof *score2);
  memcpy(a.score, score0, (size_t)n_slots * sizeof *score0);
  const size_t mass_n = (size_t)H * cap;
  float **mass2 = take_mass(views, S, mass_n); /* obs_mass is added to: run afresh */
  args.out = out1;
  CHECK_INT_EQ(g_be1->ops->attention(g_be1, &a, &args), 0);
  if (memcmp(score2, a.score, (size_t)n_slots * sizeof *score2) != 0)
    FAIL_AT("%s: scores differ between 1 and 2 threads", c->name);
  if (!same_mass(mass2, views, S, mass_n, false))
    FAIL_AT("%s: attention mass differs between 1 and 2 threads", c->name);
  check_rows_alone(c->name, &a, &args, out, n_slots);
  if (c->kv_type == K_F16) { /* halves read as floats: an f32 arena of the same values */
    k_kv_arena_t a32;
    arena_new_of(&a32, n_arena, B, D, K_F32);
    for (int64_t e = 0; e < (int64_t)n_slots * D; e++) {
      a32.k[e] = get_el(&a, a.k, e);
      a32.v[e] = get_el(&a, a.v, e);
    }
    memcpy(a32.pos, a.pos, (size_t)n_slots * sizeof(int32_t));
    memcpy(a32.score, score0, (size_t)n_slots * sizeof(float));
    float *out2 = test_xmalloc((size_t)n_tok * QH * D * sizeof *out2);
    float **mass16 = take_mass(views, S, mass_n); /* the f16 run's, kept for the checks below */
    args.out = out2;
    CHECK_INT_EQ(g_be->ops->attention(g_be, &a32, &args), 0);
    bool same = !memcmp(out2, out, (size_t)n_tok * QH * D * sizeof *out2) &&
                !memcmp(a32.score, score2, (size_t)n_slots * sizeof(float));
    same = same_mass(mass16, views, S, mass_n, true) && same;
    if (!same) FAIL_AT("%s: an f16 arena and an f32 arena of the same values differ", c->name);
    free(out2);
    arena_free(&a32);
    args.out = out1;
  }

  /* dense reference over the visible keys of the same head */
  double *sc = test_xmalloc((size_t)(ctx[0] + 1) * sizeof *sc);
  size_t sc_cap = (size_t)ctx[0] + 1;
  double acc[1024];
  int32_t flips = 0; /* query vectors where bf16 rounding went the other way */
  CHECK(D <= 1024);
  for (int32_t s = 0; s < S; s++)
    for (int32_t r = q_start[s]; r < q_start[s + 1]; r++) {
      st->rows++;
      for (int32_t qh = 0; qh < QH; qh++) {
        int32_t i = s * H + qh / G;
        if ((size_t)ctx[i] > sc_cap) {
          sc_cap = (size_t)ctx[i];
          free(sc);
          sc = test_xmalloc(sc_cap * sizeof *sc);
        }
        const float *qq = q + ((int64_t)r * QH + qh) * D;
        double mx = -INFINITY;
        int32_t visible = 0;
        for (int32_t t = 0; t < ctx[i]; t++) {
          if (hpos[i][t] > q_pos[r]) continue;
          double dot = 0;
          if (bf) {
            for (int32_t d = 0; d < D; d++)
              dot += (double)bf16_round(qq[d] * args.scale) * bf16_round(hk[i][(int64_t)t * D + d]);
            sc[t] = dot;
          } else {
            for (int32_t d = 0; d < D; d++) dot += (double)qq[d] * hk[i][(int64_t)t * D + d];
            sc[t] = dot * args.scale;
          }
          if (sc[t] > mx) mx = sc[t];
          visible++;
        }
        CHECK(visible >= 1);
        if (visible == 1 && qh % G == 0) st->rows_one_key++; /* once per KV head */
        double l = 0, mrun = -INFINITY;
        int32_t blk = -1;
        for (int32_t d = 0; d < D; d++) acc[d] = 0;
        for (int32_t t = 0; t < ctx[i]; t++) {
          if (hpos[i][t] > q_pos[r]) continue;
          double p = exp(sc[t] - mx);
          l += p;
          if (bf) { /* exp(x - m_b) rounded, then brought to the final maximum */
            if (t / B != blk)
              for (int32_t u = (blk = t / B) * B; u < ctx[i] && u < blk * B + B; u++)
                if (hpos[i][u] <= q_pos[r] && sc[u] > mrun) mrun = sc[u];
            p = bf16_round((float)exp(sc[t] - mrun)) * exp(mrun - mx);
          }
          for (int32_t d = 0; d < D; d++)
            acc[d] += p * (bf ? bf16_round(hv[i][(int64_t)t * D + d]) : hv[i][(int64_t)t * D + d]);
        }
        int32_t n_obs = c->seqs[s].n_obs, g = qh % G;
        bool obs = n_obs < 0 || (n_obs > 0 && r >= q_start[s + 1] - n_obs);
        for (int32_t t = 0; obs && t < ctx[i]; t++) {
          if (hpos[i][t] > q_pos[r]) continue;
          double p = exp(sc[t] - mx) / l;
          if (n_obs < 0) ref_add[(int64_t)i * cap + t] += p * p;
          ref_sq[((int64_t)i * G + g) * cap + t] += p * p;
          ref_mass[((int64_t)i * G + g) * cap + t] += p;
          if (r == q_start[s + 1] - 1) ref_last[((int64_t)s * QH + qh) * cap + t] = p * p;
        }
        bool flipped = false;
        for (int32_t d = 0; d < D; d++) {
          size_t o = ((size_t)r * QH + qh) * D + d;
          double want = acc[d] / l, diff = fabs(out[o] - want);
          /* bf: an exponential on the edge between two bf16 values may round
           * the other way than the reference's (exp in double): one bf16 step
           * (2^-8 of at most 1) times a value of V (|v| <= 1) */
          if (bf && diff > 1e-4 && diff <= 1.15 / 256) flipped = true;
          else if (!(diff <= (bf ? 1e-4 : 1e-5)))
            FAIL_AT("%s: seq %d row %d (pos %d) head %d dim %d: %.9g vs reference %.9g", c->name,
                    s, r, q_pos[r], qh, d, (double)out[o], want);
          if (diff > st->max_diff) st->max_diff = diff;
          if (memcmp(&out[o], &out1[o], sizeof(float)) != 0)
            FAIL_AT("%s: 1 and 2 threads differ at %zu: %.9g vs %.9g", c->name, o,
                    (double)out1[o], (double)out[o]);
        }
        flips += flipped;
      }
    }

  if (flips > 2 + n_tok * QH / 100)
    FAIL_AT("%s: %d of %d query vectors beyond 1e-4 of the reference", c->name, flips, n_tok * QH);

  /* scores: the window's sums max-pooled per query head, then summed */
  const int32_t w = (c->obs_pool > 0 ? c->obs_pool : 1) / 2;
  for (int32_t s = 0; s < S; s++) {
    if (c->seqs[s].n_obs <= 0) continue;
    for (int32_t h = 0; h < H; h++) {
      int32_t i = s * H + h;
      for (int32_t t = 0; t < ctx[i]; t++) {
        double mass = 0;
        for (int32_t g = 0; g < G; g++) {
          double mq = 0, mm = 0;
          for (int32_t u = t - w; u <= t + w; u++) {
            if (u < 0 || u >= ctx[i]) continue;
            mq = fmax(mq, ref_sq[((int64_t)i * G + g) * cap + u]);
            mm = fmax(mm, ref_mass[((int64_t)i * G + g) * cap + u]);
          }
          ref_add[(int64_t)i * cap + t] += mq;
          mass += mm;
        }
        check_close("obs_mass", (size_t)t, views[s].obs_mass[h * cap + t], 0.5 + mass, 1e-5);
        for (int32_t g = 0; g < G; g++)
          check_close("obs_last", (size_t)t, views[s].obs_last[(h * G + g) * cap + t],
                      ref_last[((int64_t)s * QH + h * G + g) * cap + t], 1e-5);
      }
    }
  }
  for (int32_t i = 0; i < S * H; i++)
    for (int32_t t = 0; t < ctx[i]; t++) {
      int32_t slot = tables[(int64_t)i * max_blocks + t / B] * B + t % B;
      double want = score0[slot] + ref_add[(int64_t)i * cap + t];
      if (c->seqs[i / H].n_obs == 0) {
        if (a.score[slot] != score0[slot])
          FAIL_AT("%s: seq %d asked no scores but slot %d changed", c->name, i / H, slot);
      } else {
        check_close("score", (size_t)slot, a.score[slot], want, 1e-5);
      }
    }
  free(ref_add);
  free(ref_sq);
  free(ref_mass);
  free(ref_last);
  free(score0);
  free(score2);
  for (int32_t s = 0; s < S; s++) {
    free(views[s].obs_mass);
    free(views[s].obs_last);
  }
  free(views);

  /* attention reads the cache, it does not move it */
  for (int32_t i = 0; i < S * H; i++)
    for (int32_t t = 0; t < ctx[i]; t++) {
      int32_t slot = tables[(int64_t)i * max_blocks + t / B] * B + t % B;
      CHECK_INT_EQ(a.pos[slot], hpos[i][t]);
    }

  free(sc);
  free(q);
  free(out);
  free(out1);
  free(q_pos);
  free(q_start);
  free(tables);
  free(ids);
  arena_free(&a);
  for (int32_t i = 0; i < S * H; i++) {
    free(hpos[i]);
    free(hk[i]);
    free(hv[i]);
  }
  free(hpos);
  free(hk);
  free(hv);
  free(ctx);
}

static void test_attention_gqa(void) {
  /* 6 query heads over 2 KV heads, head_dim 64, blocks of 16.
   * seq 0: one decode row at position 70; its heads hold 45+1 and 12+1 keys.
   * seq 1: 7 rows at 20..26; head 0 holds the whole prefix, head 1 three keys.
   * seq 2: 40 rows at 30..69 (5 tiles); head 1 evicted the whole prefix, so
   *        the row at position 30 sees exactly one key there. */
  static const seq_spec_t seqs[] = {
      {70, 1, {45, 12}, 0},
      {20, 7, {-1, 3}, 0},
      {30, 40, {17, 0}, 0},
  };
  /* The same with compression scores: a decode, a window longer than the
   * rows, and a 20-row window over 3 tiles after 20 unscored rows. */
  static const seq_spec_t scored[] = {
      {70, 1, {45, 12}, -1},
      {20, 7, {-1, 3}, 32},
      {30, 40, {17, 0}, 20},
  };
  for (int v = 0; v < 5; v++) {
    attn_case_t c = {"gqa", 6, 2, 64, 16, 3, v < 3 ? seqs : scored, v == 2 ? 4.0f : 1.0f,
                     100 + (uint64_t)v, v == 1, v == 3 ? 7 : 1, K_F32};
    attn_stats_t st = {0};
    run_attention(&c, &st);
    fprintf(stderr, "   gqa variant %d: %lld rows, max |diff| %.3g\n", v, (long long)st.rows,
            st.max_diff);
    CHECK(st.rows_one_key >= 1);
    CHECK_INT_EQ(st.rows, 48);
  }
}

static void test_attention_shapes(void) {
  /* multi-head (G = 1), small blocks, head_dim 32 */
  static const seq_spec_t mha[] = {{0, 9, {0, 0, 0, 0}, 5}, {5, 3, {5, 2, 0, 4}, 0}, {33, 1, {1, 33, 8, 20}, -1}};
  attn_case_t c1 = {"mha", 4, 4, 32, 8, 3, mha, 2.0f, 200, false, 3, K_F32};
  attn_stats_t st = {0};
  run_attention(&c1, &st);
  CHECK(st.rows_one_key >= 1); /* seq 0 row 0 sees only itself */

  /* G = 16 (the most the CPU kernel takes), head_dim 128, blocks of 32,
   * a long context */
  static const seq_spec_t big[] = {{300, 2, {260}, -1}, {64, 17, {-1}, 12}};
  attn_case_t c2 = {"g16", 16, 1, 128, 32, 2, big, 1.5f, 300, false, 7, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c2, &st);

  /* blocks of 64 (the largest), head_dim 256 */
  static const seq_spec_t wide[] = {{130, 5, {100, 3}, 0}};
  attn_case_t c3 = {"d256", 4, 2, 256, 64, 1, wide, 1.0f, 400, false, 1, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c3, &st);

  /* long windows, split into parts that run in parallel: the whole prompt
   * (prefix 0) and a window inside a chunk after cached keys */
  static const seq_spec_t longw[] = {{0, 300, {0, 0}, 300}, {40, 300, {-1, 25}, 260},
                                     {12, 1, {5, 12}, -1}};
  attn_case_t c5 = {"long", 6, 2, 64, 16, 3, longw, 1.5f, 450, false, 7, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c5, &st);

  /* blocks of 16 (the vector kernel's) at head_dim 128 (the 8B shape: P·V
   * eight vectors at a time), 48 (one at a time) and 256 (two passes) */
  static const seq_spec_t b16[] = {{75, 11, {60, 7}, 9}, {130, 1, {-1, 100}, -1}, {3, 20, {2, 0}, 0}};
  attn_case_t c6 = {"b16-d128", 8, 2, 128, 16, 3, b16, 2.0f, 600, false, 7, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c6, &st);
  attn_case_t c7 = {"b16-d48", 6, 2, 48, 16, 3, b16, 1.0f, 700, true, 1, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c7, &st);
  attn_case_t c8 = {"b16-d256", 2, 2, 256, 16, 3, b16, 1.0f, 800, false, 3, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c8, &st);

  /* K and V in f16 (the CPU's default cache): the vector kernel, prefill and
   * decode with scores, and the generic loop (blocks of 8) */
  attn_case_t c9 = {"b16-d64-f16", 6, 2, 64, 16, 3, b16, 2.0f, 900, false, 7, K_F16};
  memset(&st, 0, sizeof st);
  run_attention(&c9, &st);
  attn_case_t c10 = {"mha-f16", 4, 4, 32, 8, 3, mha, 2.0f, 910, false, 3, K_F16};
  memset(&st, 0, sizeof st);
  run_attention(&c10, &st);
  /* head_dim 32: two dims groups of 16 in tiles where attention runs on them */
  attn_case_t c11 = {"b16-d32-f16", 6, 2, 32, 16, 3, b16, 2.0f, 920, false, 7, K_F16};
  memset(&st, 0, sizeof st);
  run_attention(&c11, &st);

  /* block size 1: every slot its own block */
  static const seq_spec_t tiny[] = {{10, 3, {4, 10}, 3}, {2, 2, {1, 0}, -1}};
  attn_case_t c4 = {"bs1", 2, 2, 16, 1, 2, tiny, 1.0f, 500, false, 7, K_F32};
  memset(&st, 0, sizeof st);
  run_attention(&c4, &st);
}

/* A decode batch of 300 sequences (more tiles than the kernel keeps on its
 * stack), each with its own ragged heads. */
static void test_attention_many_seqs(void) {
  enum { S = 300 };
  seq_spec_t *seqs = test_xmalloc(S * sizeof *seqs);
  uint64_t rng = 600;
  for (int s = 0; s < S; s++) {
    memset(&seqs[s], 0, sizeof seqs[s]);
    seqs[s].prefix = rng_int(&rng, 50);
    seqs[s].n_q = s % 10 == 0 ? 9 : 1;
    for (int h = 0; h < 3; h++) seqs[s].keep[h] = rng_int(&rng, seqs[s].prefix + 1);
    seqs[s].n_obs = s % 10 == 0 ? (s % 20 ? 4 : 0) : (s % 3 == 0 ? -1 : 0);
  }
  attn_case_t c = {"many", 9, 3, 64, 16, S, seqs, 1.0f, 601, false, 7, K_F32};
  attn_stats_t st = {0};
  run_attention(&c, &st);
  fprintf(stderr, "   %lld rows, max |diff| %.3g\n", (long long)st.rows, st.max_diff);
  free(seqs);
}

/* One query row, one visible key among many future ones: the output is that
 * key's V exactly (rounded to bf16 in the bf16 arithmetic). */
static void test_attention_single_key(void) {
  enum { D = 64, B = 16, NB = 4 };
  k_kv_arena_t a;
  arena_new(&a, NB, B, D);
  uint64_t rng = 700;
  float *k = test_rand_floats(&rng, 40 * D, 1.0f), *v = test_rand_floats(&rng, 40 * D, 1.0f);
  const int32_t table[3] = {2, 0, 3};
  /* slots 0..39 of the head hold positions 39, 38, ..., 0: reversed */
  for (int32_t t = 0; t < 40; t++) put_slot(&a, table[t / B] * B + t % B, k + t * D, v + t * D, 39 - t);
  float q[2 * D], out[2 * D];
  for (int d = 0; d < 2 * D; d++) q[d] = test_rng_unit(&rng) * 5.0f;
  const int32_t q_start[2] = {0, 1}, q_pos[1] = {0}, ctx[1] = {40};
  k_seq_kv_t view = {table, ctx, 3, 0, NULL, NULL, 1};
  k_attn_args_t args = {.n_seqs = 1, .n_q_heads = 2, .n_kv_heads = 1, .head_dim = D,
                        .scale = 0.125f, .q = q, .out = out, .q_start = q_start,
                        .q_pos = q_pos, .seqs = &view};
  const bool bf = g_be->numerics == K_NUMERICS_INT8 && k__cpu_bf16();
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  /* position 0 sits in slot 39 */
  for (int h = 0; h < 2; h++)
    for (int d = 0; d < D; d++)
      CHECK_NEAR(out[h * D + d], bf ? bf16_round(v[39 * D + d]) : v[39 * D + d], 0);
  /* at position 39 the row sees all 40: the output is a convex mix */
  const int32_t q_pos2[1] = {39};
  args.q_pos = q_pos2;
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  for (int d = 0; d < D; d++) {
    double lo = 1e9, hi = -1e9;
    for (int t = 0; t < 40; t++) {
      lo = fmin(lo, v[t * D + d]);
      hi = fmax(hi, v[t * D + d]);
    }
    double slack = bf ? 4e-3 * fmax(fabs(lo), fabs(hi)) : 1e-6; /* bf: weights rounded */
    CHECK(out[d] >= lo - slack && out[d] <= hi + slack);
  }
  /* ctx 1: only slot 0 (position 39) is in use; a row at 39 sees just it */
  const int32_t ctx1[1] = {1};
  view.ctx = ctx1;
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  for (int d = 0; d < D; d++) CHECK_NEAR(out[d], bf ? bf16_round(v[d]) : v[d], 0);
  free(k);
  free(v);
  arena_free(&a);
}

static void test_attention_bad_args(void) {
  k_kv_arena_t a;
  arena_new(&a, 2, 16, 64);
  float q[64] = {0}, out[64];
  const int32_t q_start[2] = {0, 1}, q_pos[1] = {0}, table[1] = {0}, ctx[1] = {1};
  k_seq_kv_t view = {table, ctx, 1, 0, NULL, NULL, 1};
  k_attn_args_t args = {.n_seqs = 1, .n_q_heads = 1, .n_kv_heads = 1, .head_dim = 64,
                        .scale = 0.125f, .q = q, .out = out, .q_start = q_start,
                        .q_pos = q_pos, .seqs = &view};
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  args.n_q_heads = 3;
  args.n_kv_heads = 2; /* not a multiple */
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), -EINVAL);
  args.n_q_heads = 17;
  args.n_kv_heads = 1; /* group too large for the CPU kernel */
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), -EINVAL);
  args.n_q_heads = 1;
  args.head_dim = 32; /* not the arena's */
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), -EINVAL);
  arena_free(&a);
  arena_new(&a, 1, 128, 64); /* block too large */
  args.head_dim = 64;
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), -EINVAL);
  arena_free(&a);
  arena_new(&a, 1, 16, 512); /* head too large */
  args.head_dim = 512;
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), -EINVAL);
  arena_free(&a);
  /* no sequences: nothing to do */
  arena_new(&a, 1, 16, 64);
  args.head_dim = 64;
  args.n_seqs = 0;
  CHECK_INT_EQ(g_be->ops->attention(g_be, &a, &args), 0);
  arena_free(&a);
}

/* The op profiler: every call counted under its kind, the table sorted,
 * the backend's results unchanged, and the wrapper gone on free. */
static void test_profile(void) {
  k_backend_t *b;
  CHECK_INT_EQ(k_cpu_backend_new(&b, 1), 0);
  const k_ops_t *real = b->ops;
  CHECK_INT_EQ(k_profile_wrap(b), 0);
  CHECK_INT_EQ(k_profile_wrap(b), -EBUSY);
  CHECK(b->ops != real);
  uint64_t rng = 5;
  float *wf = test_rand_floats(&rng, 64 * 32, 1.0f), *x = test_rand_floats(&rng, 3 * 32, 1.0f);
  float y[3 * 64], want[3 * 64];
  k_weight_t w = {.type = K_F32, .rows = 64, .cols = 32, .data = wf};
  for (int i = 0; i < 5; i++) CHECK_INT_EQ(b->ops->matmul(b, y, x, &w, 3), 0);
  CHECK_INT_EQ(b->ops->matmul(b, y, x, &w, 1), 0);
  CHECK_INT_EQ(b->ops->add(b, y, y, 64), 0);
  CHECK_INT_EQ(real->matmul(b, want, x, &w, 1), 0);
  CHECK_INT_EQ(real->add(b, want, want, 64), 0);
  for (int i = 0; i < 64; i++) CHECK_NEAR(y[i], want[i], 0);
  CHECK_INT_EQ(k_profile_report(g_be, stdout), -ENOENT);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  CHECK_INT_EQ(k_profile_report(b, f), 0);
  fclose(f);
  printf("%s", buf);
  CHECK(strstr(buf, "backend cpu: 7 calls") != NULL);
  CHECK(strstr(buf, "matmul f32 64x32 rows 2-4") != NULL);
  CHECK(strstr(buf, "matmul f32 64x32 rows 1 ") != NULL);
  const char *five = strstr(buf, "rows 2-4"), *one = strstr(buf, "rows 1 ");
  const char *add = strstr(buf, "\nadd ");
  CHECK(five && one && add);
  CHECK_INT_EQ(strtol(five + strlen("rows 2-4"), NULL, 10), 5); /* its calls */
  CHECK_INT_EQ(strtol(one + strlen("rows 1"), NULL, 10), 1);
  free(buf);
  k_backend_free(b); /* the wrapper's destroy, then the CPU's (ASan: no leak) */
  free(wf);
  free(x);
}

static void test_backend_new(void) {
  k_backend_t *be = NULL;
  char err[128];
  CHECK_INT_EQ(k_backend_new(&be, K_DEVICE_CPU, 3, err, sizeof err), 0);
  CHECK_STR_EQ(be->ops->name, "cpu");
  CHECK_INT_EQ(be->threads, 3);
  void *p = be->ops->alloc(be, 1000);
  CHECK(p);
  CHECK_INT_EQ((uintptr_t)p % 64, 0);
  char src[1000], back[1000];
  for (int i = 0; i < 1000; i++) src[i] = (char)i;
  CHECK_INT_EQ(be->ops->upload(be, p, src, 1000), 0);
  CHECK_INT_EQ(be->ops->download(be, back, p, 1000), 0);
  CHECK(memcmp(src, back, 1000) == 0);
  CHECK_INT_EQ(be->ops->sync(be), 0);
  be->ops->free(be, p);
  p = be->ops->alloc(be, 0);
  CHECK(p);
  be->ops->free(be, p);
  k_backend_free(be);
  k_backend_free(NULL);
  be = NULL;
  CHECK_INT_EQ(k_cpu_backend_new(&be, 0), 0); /* 0: one per CPU */
  CHECK(be->threads >= 1);
  k_backend_free(be);
}

int main(void) {
  CHECK_INT_EQ(k_cpu_backend_new(&g_be, 2), 0);
  CHECK_INT_EQ(k_cpu_backend_new(&g_be1, 1), 0);
  RUN(test_backend_new);
  RUN(test_profile);
  RUN(test_matmul);
  RUN(test_matmul_n);
  RUN(test_rmsnorm);
  RUN(test_rope);
  RUN(test_silu_mul_add);
  RUN(test_sample);
  RUN(test_penalize);
  RUN(test_logprobs);
  RUN(test_embed);
  RUN(test_kv_write);
  RUN(test_kv_move);
  RUN(test_attention_gqa);
  RUN(test_attention_shapes);
  RUN(test_attention_many_seqs);
  RUN(test_attention_single_key);
  RUN(test_attention_bad_args);
  if (k__cpu_bf16()) { /* the fp32 vector kernel too: the exact arithmetic takes it */
    fprintf(stderr, "attention again in the exact arithmetic (fp32 dot products):\n");
    g_be->numerics = g_be1->numerics = K_NUMERICS_EXACT;
    RUN(test_attention_gqa);
    RUN(test_attention_shapes);
    RUN(test_attention_many_seqs);
    RUN(test_attention_single_key);
    g_be->numerics = g_be1->numerics = K_NUMERICS_INT8;
  }
  k_backend_free(g_be);
  k_backend_free(g_be1);
  return 0;
}
