/* The CPU backend: the reference implementation of every op. Matmuls are
 * matmul.c's (int8 activations on quantised weights, from a packed copy on
 * CPUs with AVX-512 VNNI); attention and the element-wise ops run here, on
 * a small thread pool. */
#include <cpuid.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__F16C__)
#define GG_EMU 1 /* GGML CPU arithmetic available for the int8 mode */
#endif

#include "kernels/backend.h"
#include "kernels/cpu/cpu-internal.h"

/* OpenBLAS's own thread control (declared in its cblas.h on Debian, but not
 * in every BLAS's header). */
void openblas_set_num_threads(int n);

/* A thread's K and V blocks in the tile unit's layout (att_tile16_bf),
 * converted once for all the query groups of a tile. */
typedef struct att_conv {
  k__scratch_t s;
  int32_t d; /* the head dim the zeros in s are laid out for */
} att_conv_t;

typedef struct cpu {
  k_pool_t *pool;         /* owns */
  k__scratch_t mm_scratch; /* matmul's dequantised weight bands */
  k__scratch_t *att_scratch; /* owns: [threads] attention's probabilities for scores */
  att_conv_t *att_conv;     /* owns: [threads] K and V converted for the tile unit */
  k__scratch_t att_acc;      /* score sums of windows split into parts */
  k__scratch_t att_seq;      /* attention's per-sequence task plan */
  k__scratch_t draw;         /* sample's per-thread weights and ids */
  int32_t threads;
} cpu_t;

int k__scratch_reserve(k__scratch_t *s, size_t bytes) {
  if (bytes <= s->cap) return 0;
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes)) return -ENOMEM;
  free(s->p);
  s->p = p;
  s->cap = bytes;
  return 0;
}

void k__scratch_destroy(k__scratch_t *s) {
  free(s->p);
  s->p = NULL;
  s->cap = 0;
}

static bool g_bf16; /* set once by bf16_init */
static pthread_once_t g_bf16_once = PTHREAD_ONCE_INIT;

static void bf16_init(void) {
#ifdef __AVX512F__
  const char *env = getenv("PRESSD_CPU_BF16");
  if (env && !strcmp(env, "0")) return;
  unsigned a, b, c, d, a1, b1, c1, d1;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1))
    return;
  /* AMX-BF16 and AVX512_BF16, and the tile state granted (k__cpu_amx) */
  g_bf16 = (d >> 22 & 1) && (a1 >> 5 & 1) && k__cpu_amx();
#endif
}

bool k__cpu_bf16(void) {
  pthread_once(&g_bf16_once, bf16_init);
  return g_bf16;
}

static k_pool_t *pool_of(k_backend_t *be) { return ((cpu_t *)be->impl)->pool; }

static void cpu_destroy(k_backend_t *be) {
  cpu_t *c = be->impl;
  if (c) {
    k_pool_free(c->pool);
    k__scratch_destroy(&c->mm_scratch);
    for (int32_t i = 0; c->att_scratch && i < c->threads; i++)
      k__scratch_destroy(&c->att_scratch[i]);
    free(c->att_scratch);
    for (int32_t i = 0; c->att_conv && i < c->threads; i++)
      k__scratch_destroy(&c->att_conv[i].s);
    free(c->att_conv);
    k__scratch_destroy(&c->att_acc);
    k__scratch_destroy(&c->att_seq);
    k__scratch_destroy(&c->draw);
  }
  free(c);
}

static void *cpu_alloc(k_backend_t *be, size_t bytes) {
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
  return p;
}

static void cpu_free(k_backend_t *be, void *p) { free(p); }

static int cpu_copy(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  memcpy(dst, src, bytes);
  return 0;
}

static int cpu_sync(k_backend_t *be) { return 0; }

static int cpu_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  cpu_t *c = be->impl;
  return k__cpu_matmul(c->pool, &c->mm_scratch, be->numerics == K_NUMERICS_EXACT,
                       be->numerics == K_NUMERICS_INT8, y, x, w, m);
}

static int cpu_matmul_n(k_backend_t *be, float *const *y, const float *x,
                        const k_weight_t *const *w, int n, int64_t m) {
  cpu_t *c = be->impl;
  return k__cpu_matmul_n(c->pool, &c->mm_scratch, be->numerics == K_NUMERICS_EXACT,
                         be->numerics == K_NUMERICS_INT8, y, x, w, n, m);
}

/* The packed copy serves the int8 arithmetic only (its float order is not
 * llama.cpp's). Once it exists, a borrowed matrix's pages are paged out
 * unless other ops read them: the matmuls no longer do, so the copy costs
 * no resident memory.
 * MADV_PAGEOUT never changes contents (a mapped file's pages come back from
 * the file, anonymous ones from swap, or simply stay), so it is safe whatever
 * the borrowed memory is. */
static int cpu_weight_pack(k_backend_t *be, k_weight_t *w, bool data_read) {
  size_t bytes = k__cpu_packed_bytes(w);
  if (be->numerics != K_NUMERICS_INT8 || w->packed || !bytes) return 0;
  void *p = cpu_alloc(be, bytes);
  if (!p) return -ENOMEM;
  k__cpu_pack(w, p);
  w->packed = p;
#ifdef MADV_PAGEOUT
  if (w->borrowed && !data_read) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)w->data + page - 1) / page * page;
    uintptr_t hi = ((uintptr_t)w->data + (uintptr_t)w->rows * k_row_bytes(w->type, w->cols)) /
                   page * page;
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_PAGEOUT); /* advice only */
  }
#endif
  return 0;
}

#ifdef __AVX512F__
/* exp(x) for x <= 0, lane by lane: exp_nonpos's polynomial, rounding n to
 * nearest even; exactly 0 at -inf, NaN stays NaN. */
static inline __m512 exp_nonpos16(__m512 x) {
  __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f)); /* NaN lanes fixed below */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), y,
                           _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

#endif

typedef struct rms_job {
  float *y;
  const float *x, *g;
  int64_t n;
  float eps;
  bool ggml;
} rms_job_t;

static void rms_row(void *arg, int64_t r, int32_t thread) {
  const rms_job_t *j = arg;
  const float *x = j->x + r * j->n;
  float *y = j->y + r * j->n;
  double ss = 0;
  float scale;
  int64_t i = 0;
  if (j->ggml) {
    /* GGML: float squares summed in double, the rest in float */
    for (; i < j->n; i++) ss += (double)(x[i] * x[i]);
    float mean = (float)(ss / (double)j->n);
    scale = 1.0f / sqrtf(mean + j->eps);
  } else {
#ifdef __AVX512F__
    /* squares in double, summed in eight lanes, then across them */
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (; i + 16 <= j->n; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      a0 = _mm512_fmadd_pd(lo, lo, a0);
      a1 = _mm512_fmadd_pd(hi, hi, a1);
    }
    ss = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#endif
    for (; i < j->n; i++) ss += (double)x[i] * x[i];
    scale = (float)(1.0 / sqrt(ss / (double)j->n + j->eps));
  }
  i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= j->n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(scale)),
                                          _mm512_loadu_ps(j->g + i)));
#endif
  for (; i < j->n; i++) y[i] = x[i] * scale * j->g[i];
}

static int cpu_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                       int64_t n, float eps) {
  rms_job_t j = {y, x, g, n, eps, be->numerics == K_NUMERICS_LLAMA};
  k_pool_run(pool_of(be), m, rms_row, &j);
  return 0;
}

typedef struct rope_job {
  float *x;
  const int32_t *pos;
  int32_t n_heads, head_dim;
  const float *inv_freq;
  bool ggml;
} rope_job_t;

static void rope_row(void *arg, int64_t r, int32_t thread) {
  const rope_job_t *j = arg;
  int32_t half = j->head_dim / 2;
  float cs[512], sn[512]; /* head_dim <= 1024 checked by the caller */
  float ts = j->ggml ? j->inv_freq[half] : 0.0f;
  if (ts != 0.0f) {
    /* GGML: theta_i = pos * ts^i by repeated float multiplication */
    float theta = (float)j->pos[r];
    for (int32_t i = 0; i < half; i++) {
      cs[i] = cosf(theta);
      sn[i] = sinf(theta);
      theta *= ts;
    }
  } else
    for (int32_t i = 0; i < half; i++) {
      float theta = (float)j->pos[r] * j->inv_freq[i];
      cs[i] = cosf(theta);
      sn[i] = sinf(theta);
    }
  float *row = j->x + r * (int64_t)j->n_heads * j->head_dim;
  for (int32_t h = 0; h < j->n_heads; h++) {
    float *v = row + (int64_t)h * j->head_dim;
    for (int32_t i = 0; i < half; i++) {
      float x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * cs[i] - x1 * sn[i];
      v[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
    }
  }
}

static int cpu_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                    int32_t head_dim, const float *inv_freq) {
  if (head_dim > 1024 || head_dim % 2) return -EINVAL;
  rope_job_t j = {x, pos, n_heads, head_dim, inv_freq, be->numerics == K_NUMERICS_LLAMA};
  k_pool_run(pool_of(be), m, rope_row, &j);
  return 0;
}

#define ELEM_CHUNK 16384

typedef struct elem_job {
  float *y;
  const float *a, *b;
  int64_t n;
  bool ggml;
} elem_job_t;

#ifdef GG_EMU
/* GGML's vectorised expf (ggml_v_expf, AVX-512 variant), bit for bit. */
static inline __m512 gg_v_expf(__m512 x) {
  const __m512 r = _mm512_set1_ps(0x1.8p23f);
  const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
  const __m512 n = _mm512_sub_ps(z, r);
  const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
  const __mmask16 d = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192), _CMP_GT_OQ);
  const __m512 u = _mm512_mul_ps(b, b);
  const __m512 j = _mm512_fmadd_ps(
      _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)),
                      u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
      u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0F)));
  const __m512 res = _mm512_scalef_ps(j, n);
  if (_mm512_kortestz(d, d)) return res;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 alt = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, zero, _CMP_LE_OQ),
                                          _mm512_set1_ps(INFINITY), zero);
  return _mm512_mask_blend_ps(d, res, alt);
}

static inline __m512 gg_v_silu(__m512 x) {
  const __m512 neg_x = _mm512_sub_ps(_mm512_setzero_ps(), x);
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1), gg_v_expf(neg_x)));
}
#endif

#ifdef GG_EMU
static inline float f16r(float f) { return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }
#endif

static void silu_chunk(void *arg, int64_t c, int32_t thread) {
  const elem_job_t *j = arg;
  int64_t lo = c * ELEM_CHUNK, hi = lo + ELEM_CHUNK < j->n ? lo + ELEM_CHUNK : j->n;
#ifdef GG_EMU
  if (j->ggml)
    for (; lo + 16 <= hi; lo += 16)
      _mm512_storeu_ps(j->y + lo, _mm512_mul_ps(gg_v_silu(_mm512_loadu_ps(j->a + lo)),
                                                _mm512_loadu_ps(j->b + lo)));
#endif
#ifdef __AVX512F__
  /* g·σ(g)·u with e = exp(-|g|) <= 1: σ(g) = 1/(1+e) for g >= 0, e/(1+e) below */
  if (!j->ggml)
    for (; lo + 16 <= hi; lo += 16) {
      __m512 g = _mm512_loadu_ps(j->a + lo);
      __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
      __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ),
                                        _mm512_set1_ps(1.0f), e);
      __m512 sg = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      _mm512_storeu_ps(j->y + lo, _mm512_mul_ps(_mm512_mul_ps(g, sg), _mm512_loadu_ps(j->b + lo)));
    }
#endif
  for (int64_t i = lo; i < hi; i++) {
    float g = j->a[i];
    j->y[i] = g / (1.0f + expf(-g)) * j->b[i];
  }
}

static int cpu_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  elem_job_t j = {y, gate, up, n, be->numerics == K_NUMERICS_LLAMA};
  k_pool_run(pool_of(be), (n + ELEM_CHUNK - 1) / ELEM_CHUNK, silu_chunk, &j);
  return 0;
}

static void add_chunk(void *arg, int64_t c, int32_t thread) {
  const elem_job_t *j = arg;
  int64_t lo = c * ELEM_CHUNK, hi = lo + ELEM_CHUNK < j->n ? lo + ELEM_CHUNK : j->n;
  for (int64_t i = lo; i < hi; i++) j->y[i] += j->a[i];
}

static int cpu_add(k_backend_t *be, float *y, const float *x, int64_t n) {
  elem_job_t j = {y, x, NULL, n, false};
  k_pool_run(pool_of(be), (n + ELEM_CHUNK - 1) / ELEM_CHUNK, add_chunk, &j);
  return 0;
}

typedef struct sample_job {
  int32_t *ids;
  const float *x;
  int64_t n;
  const k_draw_t *draws;
  char *scratch; /* [threads][n] weights, then [threads][n] ids */
  int32_t threads;
} sample_job_t;

static void sample_row(void *arg, int64_t r, int32_t thread) {
  const sample_job_t *j = arg;
  float *w = (float *)(void *)j->scratch + (size_t)thread * (size_t)j->n;
  int32_t *idx = (int32_t *)(void *)(j->scratch + (size_t)j->threads * (size_t)j->n * sizeof(float)) +
                 (size_t)thread * (size_t)j->n;
  j->ids[r] = k_draw_row(j->x + r * j->n, j->n, j->draws ? &j->draws[r] : NULL, w, idx);
}

/* Rows in parallel; each thread ranks in its own scratch. */
static int cpu_sample(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                      const k_draw_t *draws) {
  cpu_t *c = be->impl;
  if (m < 0 || n <= 0 || n > INT32_MAX) return -EINVAL;
  if (m == 0) return 0;
  sample_job_t j = {.ids = ids, .x = x, .n = n, .draws = draws, .threads = c->threads};
  bool rank = false;
  for (int64_t r = 0; draws && r < m; r++) rank |= k_draw_needs_rank(&draws[r], n);
  if (rank) {
    if (k__scratch_reserve(&c->draw, (size_t)c->threads * (size_t)n * 8)) return -ENOMEM;
    j.scratch = c->draw.p;
  }
  k_pool_run(c->pool, m, sample_row, &j);
  return 0;
}

typedef struct lp_job {
  k_logprobs_t *out;
  const float *x;
  int64_t n;
  const int32_t *ids, *want;
} lp_job_t;

static void lp_row(void *arg, int64_t r, int32_t thread) {
  const lp_job_t *j = arg;
  (void)thread;
  if (j->want[r] >= 0) k_draw_logprobs(j->x + r * j->n, j->n, j->ids[r], j->want[r], &j->out[r]);
}

static int cpu_logprobs(k_backend_t *be, k_logprobs_t *out, const float *x, int64_t m, int64_t n,
                        const int32_t *ids, const int32_t *want) {
  if (m < 0 || n <= 0) return -EINVAL;
  for (int64_t r = 0; r < m; r++)
    if (want[r] >= 0 && (ids[r] < 0 || ids[r] >= n)) return -EINVAL;
  lp_job_t j = {out, x, n, ids, want};
  k_pool_run(pool_of(be), m, lp_row, &j);
  return 0;
}

static int cpu_penalize(k_backend_t *be, float *x, int64_t m, int64_t n, const k_penalty_t *rows,
                        const int32_t *ids, const int32_t *seen) {
  (void)be;
  for (int64_t r = 0; r < m; r++)
    for (int32_t j = 0; j < rows[r].n; j++)
      if (ids[rows[r].first + j] < 0 || ids[rows[r].first + j] >= n) return -EINVAL;
  for (int64_t r = 0; r < m; r++) {
    const k_penalty_t *p = &rows[r];
    for (int32_t j = 0; j < p->n; j++) {
      const int32_t s = seen[p->first + j];
      float *l = &x[r * n + ids[p->first + j]];
      *l = k_draw_penalise(*l, s >> 1, s & 1, p->rep, p->pres, p->freq);
    }
  }
  return 0;
}

static int cpu_read_rows(k_backend_t *be, void *dst, const void *src, const int32_t *rows,
                         int64_t n, size_t row_bytes) {
  (void)be;
  if (n < 0 || row_bytes == 0 || row_bytes % 4) return -EINVAL;
  for (int64_t i = 0; i < n; i++)
    memcpy((char *)dst + (size_t)i * row_bytes, (const char *)src + (size_t)rows[i] * row_bytes,
           row_bytes);
  return 0;
}

static int cpu_embed(k_backend_t *be, float *y, const k_weight_t *table, const int32_t *ids,
                     int64_t m) {
  size_t rb = k_row_bytes(table->type, table->cols);
  for (int64_t t = 0; t < m; t++) {
    if (ids[t] < 0 || ids[t] >= table->rows) return -EINVAL;
    k__cpu_dequant_row(table->type, (const uint8_t *)table->data + (size_t)ids[t] * rb,
                       y + t * table->cols, table->cols);
  }
  return 0;
}

/* Index in kv's arrays of the pool's block id (a rank's arena holds a part). */
static inline int64_t arena_block(const k_kv_arena_t *kv, int32_t id) {
  return (int64_t)id - kv->first_block;
}

/* n floats to halves (n = the head dimension). */
static void to_f16(uint16_t *dst, const float *src, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i *)(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; i++) dst[i] = k_f32_to_f16(src[i]);
}

/* Bytes of one slot's K (or V) row in kv. */
static inline size_t kv_row_bytes(const k_kv_arena_t *kv) {
  return (size_t)kv->head_dim * k_dtype_bytes(kv->type);
}

/* Slot sl's row of an arena array (K or V) as fp32: in place where the
 * arena holds fp32, else converted into buf[head_dim]. */
static inline const float *kv_row(const k_kv_arena_t *kv, const float *arr, int64_t sl,
                                  float *buf) {
  const int64_t d = kv->head_dim;
  if (kv->type == K_F32) return arr + sl * d;
  k__cpu_dequant_row(K_F16, (const uint16_t *)(const void *)arr + sl * d, buf, d);
  return buf;
}

static int cpu_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                        const k_attn_args_t *a) {
  const int64_t d = kv->head_dim, n_slots = (int64_t)kv->n_blocks * kv->block_size;
  const int32_t H = a->n_kv_heads, B = kv->block_size;
  for (int32_t s = 0; s < a->n_seqs; s++) {
    const k_seq_kv_t *q = &a->seqs[s];
    int32_t r0 = a->q_start[s], n_new = a->q_start[s + 1] - r0;
    for (int32_t h = 0; h < H; h++) {
      const int32_t *table = k_attn_table(a, q, h);
      int32_t first = k_attn_ctx(a, q, h) - n_new;
      if (first < 0) return -EINVAL;
      for (int32_t t = 0; t < n_new; t++) {
        int32_t i = first + t;
        int64_t sl = arena_block(kv, table[i / B]) * B + i % B;
        if (sl < 0 || sl >= n_slots) return -EINVAL;
        int64_t src = ((int64_t)(r0 + t) * H + h) * d;
        if (kv->type == K_F16) {
          to_f16((uint16_t *)(void *)kv->k + sl * d, k + src, d);
          to_f16((uint16_t *)(void *)kv->v + sl * d, v + src, d);
        } else {
          memcpy(kv->k + sl * d, k + src, (size_t)d * sizeof(float));
          memcpy(kv->v + sl * d, v + src, (size_t)d * sizeof(float));
#ifdef GG_EMU
          if (be->numerics == K_NUMERICS_LLAMA) /* GGML's fp16 cache, held in fp32 */
            for (int64_t e = 0; e < d; e++) {
              kv->k[sl * d + e] = f16r(kv->k[sl * d + e]);
              kv->v[sl * d + e] = f16r(kv->v[sl * d + e]);
            }
#endif
        }
        kv->pos[sl] = a->q_pos[r0 + t];
        kv->score[sl] = 0.0f;
      }
    }
  }
  return 0;
}

static int cpu_kv_move(k_backend_t *be, const k_kv_arena_t *kv, const int32_t *src,
                       const int32_t *dst, int64_t n) {
  const int64_t n_slots = (int64_t)kv->n_blocks * kv->block_size;
  for (int64_t i = 0; i < n; i++)
    if (src[i] < 0 || src[i] >= n_slots || dst[i] < 0 || dst[i] >= n_slots) return -EINVAL;
  const size_t rb = kv_row_bytes(kv);
  char *k = (char *)kv->k, *v = (char *)kv->v;
  for (int64_t i = 0; i < n; i++) {
    int64_t f = src[i], t = dst[i];
    memcpy(k + t * rb, k + f * rb, rb);
    memcpy(v + t * rb, v + f * rb, rb);
    kv->score[t] = kv->score[f];
    kv->pos[t] = kv->pos[f];
  }
  return 0;
}

/* ---- attention ------------------------------------------------------------
 * One task = (sequence, KV head, tile of up to ATT_QT query rows). The task
 * walks the head's blocks once; every query row of the tile and every query
 * head of the GQA group keeps an online-softmax state (running max m, sum l,
 * accumulator acc[head_dim]) updated once per block. Each block's K is
 * transposed once into kt[head_dim][block] so the scores of one query are
 * plain vector multiply-adds (no horizontal sums), and the exponentials of a
 * block are one vectorisable loop. A query's result depends only on its own
 * row and the cached K/V, never on the rest of the batch. */
#define ATT_QT 16
#define ATT_MAX_G 16
#define ATT_MAX_D 256
#define ATT_MAX_B 64

typedef struct att_job {
  const k_kv_arena_t *kv;
  const k_attn_args_t *a;
  k__scratch_t *scratch;   /* [threads] for scored tasks */
  const int32_t *task_seq; /* [n_tasks] */
  const int32_t *task_row; /* [n_tasks] first query row */
  const int32_t *task_end; /* [n_tasks] one past the last query row */
  const int32_t *task_part; /* [n_tasks] part of the scored rows, -1 for a plain tile */
  /* scored windows split into parts, per sequence: parts, sums' row length,
   * offset in acc; and the sequences split */
  const int32_t *n_parts, *acc_ld;
  const int64_t *acc_off;
  float *acc;
  const int32_t *split_seq;
  int rc;                  /* first failure of a scored task (scratch) */
  bool bf16;               /* on AMX-BF16 tiles (att_tile16_bf) */
  att_conv_t *conv;        /* [threads] */
} att_job_t;

static inline float exp_nonpos(float x) {
  if (x != x) return x; /* NaN (from corrupt weights): no integer exponent to build */
  float xc = x < -87.0f ? -87.0f : x;
  float n = __builtin_roundf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float two_n;
  memcpy(&two_n, &bits, 4);
  return x == -INFINITY ? 0.0f : p * two_n;
}

/* A tile's query vectors (scaled) and their online-softmax state. */
typedef struct att_state {
  int32_t nq; /* query vectors: rows × G */
  float m[ATT_QT * ATT_MAX_G], l[ATT_QT * ATT_MAX_G];
  int32_t qpos[ATT_QT * ATT_MAX_G];
  float corr[ATT_QT * ATT_MAX_G]; /* the block's rescale of acc */
  uint8_t seen[ATT_QT * ATT_MAX_G]; /* whether the block has a slot visible to it */
  float acc[ATT_QT * ATT_MAX_G][ATT_MAX_D] __attribute__((aligned(64)));
  float qs[ATT_QT * ATT_MAX_G][ATT_MAX_D] __attribute__((aligned(64))); /* scaled queries */
  uint32_t qb[ATT_QT * ATT_MAX_G][ATT_MAX_D / 2]; /* qs as bf16 pairs, where bf16 */
} att_state_t;

static void att_begin(att_state_t *st, const k_attn_args_t *a, int32_t h, int32_t r0,
                      int32_t r1) {
  const int32_t G = a->n_q_heads / a->n_kv_heads, D = a->head_dim;
  st->nq = (r1 - r0) * G;
  for (int32_t i = 0; i < st->nq; i++) {
    int32_t r = r0 + i / G, g = i % G;
    const float *q = a->q + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
    for (int32_t d = 0; d < D; d++) st->qs[i][d] = q[d] * a->scale;
    st->qpos[i] = a->q_pos[r];
    st->m[i] = -INFINITY;
    st->l[i] = 0.0f;
    memset(st->acc[i], 0, (size_t)D * sizeof(float));
  }
}

static void att_end(const att_state_t *st, const k_attn_args_t *a, int32_t h, int32_t r0,
                    float *m_out, float *l_out) {
  const int32_t G = a->n_q_heads / a->n_kv_heads, D = a->head_dim;
  for (int32_t i = 0; i < st->nq; i++) {
    int32_t r = r0 + i / G, g = i % G;
    float *o = a->out + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
    float inv = st->l[i] > 0 ? 1.0f / st->l[i] : 0.0f;
    for (int32_t d = 0; d < D; d++) o[d] = st->acc[i][d] * inv;
    if (m_out) {
      m_out[i] = st->m[i];
      l_out[i] = st->l[i];
    }
  }
}

/* Query vector i sees nothing of the block of B slots at b0 (n of them
 * filled): where the exponentials are kept, it records zeros and a -inf
 * block maximum. */
static inline void att_unseen(float *lg, int64_t ld, float *bm, int64_t ldb, int32_t i,
                              int32_t b0, int32_t n, int32_t B) {
  if (!lg) return;
  for (int32_t t = 0; t < n; t++) lg[i * ld + b0 + t] = 0.0f;
  bm[i * ldb + b0 / B] = -INFINITY;
}

/* Rows [r0, r1) (at most ATT_QT) of sequence s against KV head h, any block
 * size and head dimension. Where lg
 * is given, it receives every query vector's exponentials over the head's
 * logical slots as the online softmax computed them ([nq][ld]: exp(x - m_b)
 * with m_b the running maximum at block b, 0 where masked), bm the m_b
 * ([nq][ldb]), and m, l the final maximum and denominator: the probability
 * of slot k in block b is lg[k] * exp(m_b - m) / l, with no second pass over
 * K and one exponential per block. */
static void att_tile_any(att_state_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a,
                         int32_t s, int32_t h, float *lg, int64_t ld, float *bm, int64_t ldb) {
  const int32_t D = a->head_dim, B = kv->block_size, nq = st->nq;
  const int32_t *table = k_attn_table(a, &a->seqs[s], h);
  int32_t ctx = k_attn_ctx(a, &a->seqs[s], h);
  float *m = st->m, *l = st->l;
  const int32_t *qpos = st->qpos;

  float kt[ATT_MAX_D][ATT_MAX_B] __attribute__((aligned(64)));
  float sc[ATT_MAX_B] __attribute__((aligned(64)));
  float vbuf[ATT_MAX_B][ATT_MAX_D], kr[ATT_MAX_D];
  for (int32_t b0 = 0; b0 < ctx; b0 += B) {
    int64_t blk = arena_block(kv, table[b0 / B]);
    int32_t n = ctx - b0 < B ? ctx - b0 : B;
    const int32_t *pb = kv->pos + (int64_t)blk * B;
    int32_t pmin = INT32_MAX;
    for (int32_t t = 0; t < n; t++) pmin = pb[t] < pmin ? pb[t] : pmin;
    const float *vrow[ATT_MAX_B];
    for (int32_t t = 0; t < B; t++) {
      const float *k = t < n ? kv_row(kv, kv->k, (int64_t)blk * B + t, kr) : NULL;
      for (int32_t d = 0; d < D; d++) kt[d][t] = k ? k[d] : 0.0f;
      if (t < n) vrow[t] = kv_row(kv, kv->v, (int64_t)blk * B + t, vbuf[t]);
    }
    for (int32_t i = 0; i < nq; i++) {
      if (pmin > qpos[i]) { /* nothing visible in this block */
        att_unseen(lg, ld, bm, ldb, i, b0, n, B);
        continue;
      }
      for (int32_t t = 0; t < B; t++) sc[t] = 0.0f;
      for (int32_t d = 0; d < D; d++) {
        float qd = st->qs[i][d];
        for (int32_t t = 0; t < B; t++) sc[t] += qd * kt[d][t];
      }
      float bmax = -INFINITY;
      for (int32_t t = 0; t < B; t++) {
        if (t >= n || pb[t] > qpos[i]) sc[t] = -INFINITY;
        bmax = sc[t] > bmax ? sc[t] : bmax;
      }
      float mnew = bmax > m[i] ? bmax : m[i];
      float corr = exp_nonpos(m[i] - mnew); /* 0 when m was -inf */
      float psum = 0.0f;
      for (int32_t t = 0; t < B; t++) {
        sc[t] = exp_nonpos(sc[t] - mnew);
        psum += sc[t];
      }
      l[i] = l[i] * corr + psum;
      if (lg) {
        memcpy(lg + i * ld + b0, sc, (size_t)n * sizeof(float));
        bm[i * ldb + b0 / B] = mnew;
      }
      float *ac = st->acc[i];
      if (corr != 1.0f)
        for (int32_t d = 0; d < D; d++) ac[d] *= corr;
      for (int32_t t = 0; t < n; t++) {
        float p = sc[t];
        if (p == 0.0f) continue;
        const float *vv = vrow[t];
        for (int32_t d = 0; d < D; d++) ac[d] += p * vv[d];
      }
      m[i] = mnew;
    }
  }
}

#ifdef __AVX512F__
/* ---- blocks of 16 slots with AVX-512 ----------------------------------------
 * The same online softmax as att_tile_any, a block of 16 slots per step with
 * the slots in the 16 lanes: K's block is transposed in registers, each
 * query's 16 scores are one fused multiply-add chain over the head
 * dimension (eight queries' chains interleaved), the softmax's maxima,
 * rescales and sums run across 16 queries at a time (softmax16), and P·V
 * is two accumulators per 16 dimensions (even and odd slots).
 * A query's arithmetic depends only on its own row and the cache, never on
 * how many queries share its tile: batch invariance and chunked prefill
 * equal to whole prefill hold as before. */
#define ATT_QG 8 /* query vectors whose score chains are interleaved */
#define ATT_SM_MIN 8 /* fewer query vectors left: softmax_row for each */
#define ATT_AHEAD 2  /* blocks ahead whose K and V are prefetched */

static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

/* Scores of query vectors [i0, i0 + ni) against the transposed block. */
static inline __attribute__((always_inline)) void scores16(const att_state_t *st,
                                                           float kt[][16], int32_t D, int32_t i0,
                                                           int ni, float sc[][16]) {
  __m512 acc[ATT_QG];
  _Pragma("GCC unroll 8") for (int j = 0; j < ATT_QG; j++) acc[j] = _mm512_setzero_ps();
  for (int32_t d = 0; d < D; d++) {
    __m512 k = _mm512_load_ps(kt[d]);
    _Pragma("GCC unroll 8") for (int j = 0; j < ni; j++)
        acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(st->qs[i0 + j][d]), k, acc[j]);
  }
  _Pragma("GCC unroll 8") for (int j = 0; j < ni; j++) _mm512_store_ps(sc[i0 + j], acc[j]);
}

/* 16 elements at element offset i of an arena array, halves (h) or fp32. */
static inline __attribute__((always_inline)) __m512 kv_load16(const float *arr, int64_t i,
                                                              bool h) {
  if (!h) return _mm512_loadu_ps(arr + i);
  const uint16_t *p = (const uint16_t *)(const void *)arr + i;
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* ac[0, 16·nd) = ac·corr + Σ p[t]·V[t] over the slots of nz, ascending, the
 * even slots in one accumulator and the odd ones in another; V's block in
 * fp32 at vb ([16][D]). */
static inline __attribute__((always_inline)) void pv16(float *ac, const float *p, const float *vb,
                                                       __mmask16 nz, float corr, int32_t D,
                                                       int nd) {
  for (int32_t c = 0; c < D; c += 16 * nd) {
    __m512 x0[8], x1[8];
    _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) x0[u] = x1[u] = _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int u = 0; u < nd; u++) {
      x0[u] = _mm512_load_ps(ac + c + 16 * u);
      if (corr != 1.0f) x0[u] = _mm512_mul_ps(x0[u], _mm512_set1_ps(corr));
      x1[u] = _mm512_setzero_ps();
    }
    for (int t = 0; t < 16; t += 2) {
      if (nz >> t & 1) {
        __m512 pt = _mm512_set1_ps(p[t]);
        const float *v = vb + (int64_t)t * D + c;
        _Pragma("GCC unroll 8") for (int u = 0; u < nd; u++)
            x0[u] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + 16 * u), x0[u]);
      }
      if (nz >> (t + 1) & 1) {
        __m512 pt = _mm512_set1_ps(p[t + 1]);
        const float *v = vb + (int64_t)(t + 1) * D + c;
        _Pragma("GCC unroll 8") for (int u = 0; u < nd; u++)
            x1[u] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + 16 * u), x1[u]);
      }
    }
    _Pragma("GCC unroll 8") for (int u = 0; u < nd; u++)
        _mm512_store_ps(ac + c + 16 * u, _mm512_add_ps(x0[u], x1[u]));
  }
}

/* The bf16 arithmetic (K_NUMERICS_INT8 on CPUs with AMX-BF16): the scaled
 * queries, K, the exponentials and V are rounded to bf16 (nearest even),
 * and the tile unit multiplies them with fp32 sums: per block of 16 slots,
 * S = Q·Kᵀ for 16 query vectors at a time, then O = P·V, which the vector
 * unit adds into the accumulators (acc·corr + O). A query vector's sums
 * are its tile row's alone, so a row alone and in a batch still give the
 * same bits. */
#define BF_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512vl,avx512f")))

/* 32 elements at element offset i of an arena array as bf16, in order. */
static inline __attribute__((always_inline)) BF_TARGET __m512i kv_load32_bf(const float *arr,
                                                                             int64_t i, bool h) {
  return (__m512i)_mm512_cvtne2ps_pbh(kv_load16(arr, i + 16, h), kv_load16(arr, i, h));
}

/* The block's K and V as the tiles take them, the slots past n zero:
 * kt2[p][t] dims 2p, 2p + 1 of slot t; vv[u * ldv + j] (u < 8) slots 2u,
 * 2u + 1 of one dim, the dims of each 32 in the order of a word unpack of
 * two slots (one shuffle per 16 dims; att_unpermute_bf gives that order),
 * so the accumulators hold the dims in that order until att_unpermute_bf. */
static inline __attribute__((always_inline)) BF_TARGET void
kv_block_bf(const k_kv_arena_t *kv, int64_t ko, int32_t n, int32_t D, bool h,
            uint32_t kt2[][16], uint32_t *vv, int64_t ldv) {
  for (int32_t c = 0; c < D; c += 32) {
    __m512 r[16];
    for (int t = 0; t < 16; t++)
      r[t] = t < n ? _mm512_castsi512_ps(kv_load32_bf(kv->k, ko + (int64_t)t * D + c, h))
                   : _mm512_setzero_ps();
    transpose16(r);
    for (int j = 0; j < 16; j++) _mm512_store_ps((float *)kt2[c / 2 + j], r[j]);
  }
  for (int u = 0; u < 8; u++)
    for (int32_t c = 0; c < D; c += 32) {
      __m512i a = 2 * u < n ? kv_load32_bf(kv->v, ko + (int64_t)(2 * u) * D + c, h)
                            : _mm512_setzero_si512();
      __m512i b = 2 * u + 1 < n ? kv_load32_bf(kv->v, ko + (int64_t)(2 * u + 1) * D + c, h)
                                : _mm512_setzero_si512();
      _mm512_store_si512(vv + u * ldv + c, _mm512_unpacklo_epi16(a, b));
      _mm512_store_si512(vv + u * ldv + c + 16, _mm512_unpackhi_epi16(a, b));
    }
}

/* The accumulators back in dims order from kv_block_bf's: in each 32 dims,
 * the first 16 hold the dims 0-3, 8-11, 16-19, 24-27, the next 16 the
 * rest. */
static BF_TARGET void att_unpermute_bf(att_state_t *st, int32_t D) {
  const __m512i lo = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int32_t i = 0; i < st->nq; i++)
    for (int32_t c = 0; c < D; c += 32) {
      __m512 a = _mm512_load_ps(st->acc[i] + c), b = _mm512_load_ps(st->acc[i] + c + 16);
      _mm512_store_ps(st->acc[i] + c, _mm512_permutex2var_ps(a, lo, b));
      _mm512_store_ps(st->acc[i] + c + 16, _mm512_permutex2var_ps(a, hi, b));
    }
}

/* The scaled queries as bf16 pairs; the rows up to the next 16 zero. */
static BF_TARGET void att_queries_bf(att_state_t *st, int32_t D) {
  for (int32_t i = 0; i < (st->nq + 15) / 16 * 16; i++)
    for (int32_t c = 0; c < D; c += 32)
      _mm512_store_si512(st->qb[i] + c / 2,
                         i < st->nq ? (__m512i)_mm512_cvtne2ps_pbh(
                                          _mm512_load_ps(st->qs[i] + c + 16),
                                          _mm512_load_ps(st->qs[i] + c))
                                    : _mm512_setzero_si512());
}

/* Tiles: for S = Q·Kᵀ, 0 and 1 K (16 pairs of dims × 16 slots), 2 and 3 Q
 * (16 query vectors × 32 dims), 4 S (16 × 16 fp32); for O = P·V, 5 P (16
 * query vectors × 16 slots), 6 and 7 V (8 pairs of slots × 16 dims), 0-3
 * O (16 × 16 fp32 each): four dims groups at once, not one after another
 * through one tile. With uniform (att_tile16_bf_o_of), every tile is 16
 * rows of 64 bytes. */
static BF_TARGET void att_amx_begin(bool uniform) {
  k__amx_cfg_t cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  if (!uniform) {
    cfg.colsb[5] = 32;
    cfg.rows[6] = cfg.rows[7] = 8;
  }
  _tile_loadconfig(&cfg);
}

static BF_TARGET void att_amx_end(void) { _tile_release(); }

/* A block's K and V in tile layout, then every query vector's scores. */
static BF_TARGET void att_block_bf(att_state_t *st, const k_kv_arena_t *kv, int64_t ko,
                                   int32_t n, int32_t D, bool h, uint32_t kt2[][16],
                                   uint32_t vv[][ATT_MAX_D], float sc[][16]) {
  if (h) kv_block_bf(kv, ko, n, D, true, kt2, vv[0], ATT_MAX_D);
  else kv_block_bf(kv, ko, n, D, false, kt2, vv[0], ATT_MAX_D);
  for (int32_t i0 = 0; i0 < st->nq; i0 += 16) {
    _tile_zero(4);
    int32_t c = 0;
    for (; c + 2 <= D / 32; c += 2) {
      _tile_loadd(0, kt2[16 * c], 64);
      _tile_loadd(1, kt2[16 * c + 16], 64);
      _tile_loadd(2, st->qb[i0] + 16 * c, sizeof st->qb[0]);
      _tile_loadd(3, st->qb[i0] + 16 * c + 16, sizeof st->qb[0]);
      _tile_dpbf16ps(4, 2, 0);
      _tile_dpbf16ps(4, 3, 1);
    }
    if (c < D / 32) {
      _tile_loadd(0, kt2[16 * c], 64);
      _tile_loadd(2, st->qb[i0] + 16 * c, sizeof st->qb[0]);
      _tile_dpbf16ps(4, 2, 0);
    }
    _tile_stored(4, sc[i0], 64);
  }
}

/* Every query vector that sees the block: acc = acc·corr + P·V, P its
 * exponentials in sc. */
static BF_TARGET void att_pv_bf(att_state_t *st, float sc[][16], uint32_t vv[][ATT_MAX_D],
                                int32_t D) {
  uint32_t pb[16][8] __attribute__((aligned(64)));
  float o[4][16][16] __attribute__((aligned(64)));
  for (int32_t i0 = 0; i0 < st->nq; i0 += 16) {
    const int32_t rows = st->nq - i0 < 16 ? st->nq - i0 : 16;
    for (int32_t r = 0; r < 16; r++)
      _mm256_store_si256((__m256i *)pb[r],
                         r < rows && st->seen[i0 + r]
                             ? (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sc[i0 + r]))
                             : _mm256_setzero_si256());
    _tile_loadd(5, pb, 32);
    for (int32_t g0 = 0; g0 < D; g0 += 64) {
      const int ng = D - g0 < 64 ? 2 : 4; /* dims groups of 16: D is a multiple of 32 */
      _tile_loadd(6, vv[0] + g0, sizeof vv[0]);
      _tile_loadd(7, vv[0] + g0 + 16, sizeof vv[0]);
      _tile_zero(0);
      _tile_zero(1);
      _tile_dpbf16ps(0, 5, 6);
      _tile_dpbf16ps(1, 5, 7);
      if (ng == 4) {
        _tile_loadd(6, vv[0] + g0 + 32, sizeof vv[0]);
        _tile_loadd(7, vv[0] + g0 + 48, sizeof vv[0]);
        _tile_zero(2);
        _tile_zero(3);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, o[0], 64);
      _tile_stored(1, o[1], 64);
      if (ng == 4) {
        _tile_stored(2, o[2], 64);
        _tile_stored(3, o[3], 64);
      }
      for (int32_t r = 0; r < rows; r++) {
        if (!st->seen[i0 + r]) continue;
        const __m512 corr = _mm512_set1_ps(st->corr[i0 + r]);
        for (int k = 0; k < ng; k++) {
          float *ac = st->acc[i0 + r] + g0 + 16 * k;
          _mm512_store_ps(ac, _mm512_fmadd_ps(_mm512_load_ps(ac), corr, _mm512_load_ps(o[k][r])));
        }
      }
    }
  }
}

/* Sum of the 16 vectors x[t], lane by lane, in the order of
 * _mm512_reduce_add_ps over one vector's lanes. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 x[16]) {
  __m512 a[8];
  for (int t = 0; t < 8; t++) a[t] = _mm512_add_ps(x[t], x[t + 8]);
  for (int t = 0; t < 4; t++) a[t] = _mm512_add_ps(a[t], a[t + 4]);
  for (int t = 0; t < 2; t++) a[t] = _mm512_add_ps(a[t], a[t + 2]);
  return _mm512_add_ps(a[0], a[1]);
}

/* Sum of x's lanes in sum16's order. */
static inline float hsum16(__m512 x) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(x),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

/* softmax16's step for the one query vector i, in its own lanes: the same
 * arithmetic as its lane there (for a few queries, where the transposes
 * would cost more than they save). */
static inline __attribute__((always_inline)) void
softmax_row(att_state_t *st, int32_t i, float sc[][16], __m512i pv, __mmask16 live, float *lg,
            int64_t ld, float *bm, int64_t ldb, int32_t b0) {
  const __mmask16 vis = live & _mm512_cmple_epi32_mask(pv, _mm512_set1_epi32(st->qpos[i]));
  st->seen[i] = vis != 0;
  if (!vis) {
    att_unseen(lg, ld, bm, ldb, i, b0, _mm_popcnt_u32(live), 16);
    return;
  }
  const __m512 x = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), _mm512_load_ps(sc[i]));
  const float bmax = _mm512_reduce_max_ps(x), m = st->m[i];
  const float mnew = bmax > m ? bmax : m;
  const __m512 vmnew = _mm512_set1_ps(mnew);
  const float corr =
      mnew == m ? 1.0f : _mm512_cvtss_f32(exp_nonpos16(_mm512_sub_ps(_mm512_set1_ps(m), vmnew)));
  const __m512 e = exp_nonpos16(_mm512_sub_ps(x, vmnew));
  st->l[i] = fmaf(st->l[i], corr, hsum16(e));
  st->m[i] = mnew;
  st->corr[i] = corr;
  _mm512_store_ps(sc[i], e);
  if (lg) {
    _mm512_mask_storeu_ps(lg + i * ld + b0, live, e);
    bm[i * ldb + b0 / 16] = mnew;
  }
}

/* The online-softmax step of query vectors [g0, g0 + gn) (gn <= 16) for the
 * block at b0: their scores sc are transposed so that each lane is a query
 * and each vector a slot, the block maxima, rescales, exponentials and sums
 * are vector operations across the queries (no horizontal reductions, no
 * scalar exponential), and the exponentials are transposed back into sc. A
 * query's arithmetic is its lane's alone. */
static inline __attribute__((always_inline)) void
softmax16(att_state_t *st, int32_t g0, int gn, float sc[][16], __m512i pv, __mmask16 live,
          float *lg, int64_t ld, float *bm, int64_t ldb, int32_t b0) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __mmask16 lanes = (__mmask16)((1u << gn) - 1);
  __m512 x[16];
  __mmask16 seen = 0;
  for (int j = 0; j < 16; j++) {
    if (j >= gn) {
      x[j] = ninf;
      continue;
    }
    __mmask16 vis = live & _mm512_cmple_epi32_mask(pv, _mm512_set1_epi32(st->qpos[g0 + j]));
    x[j] = _mm512_mask_blend_ps(vis, ninf, _mm512_load_ps(sc[g0 + j]));
    seen |= (__mmask16)((vis != 0) << j);
  }
  transpose16(x); /* x[t]: slot t of every query */
  __m512 bmax = x[0];
  for (int t = 1; t < 16; t++) bmax = _mm512_max_ps(x[t], bmax);
  const __m512 m = _mm512_maskz_loadu_ps(lanes, st->m + g0);
  const __m512 mnew = _mm512_max_ps(bmax, m);
  /* 1 where the maximum holds (or nothing was seen yet), else exp(m - mnew) */
  const __m512 corr = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mnew, m, _CMP_EQ_OQ),
                                           exp_nonpos16(_mm512_sub_ps(m, mnew)),
                                           _mm512_set1_ps(1.0f));
  for (int t = 0; t < 16; t++)
    x[t] = _mm512_maskz_mov_ps(seen, exp_nonpos16(_mm512_sub_ps(x[t], mnew)));
  const __m512 l = _mm512_maskz_loadu_ps(lanes, st->l + g0);
  _mm512_mask_storeu_ps(st->l + g0, seen, _mm512_fmadd_ps(l, corr, sum16(x)));
  _mm512_mask_storeu_ps(st->m + g0, seen, mnew);
  _mm512_mask_storeu_ps(st->corr + g0, lanes, corr);
  float mb[16] __attribute__((aligned(64)));
  _mm512_store_ps(mb, mnew);
  transpose16(x); /* x[j]: query g0 + j's exponentials */
  for (int j = 0; j < gn; j++) {
    const int32_t i = g0 + j;
    st->seen[i] = seen >> j & 1;
    if (!st->seen[i]) {
      att_unseen(lg, ld, bm, ldb, i, b0, _mm_popcnt_u32(live), 16);
      continue;
    }
    _mm512_store_ps(sc[i], x[j]);
    if (lg) {
      _mm512_mask_storeu_ps(lg + i * ld + b0, live, x[j]);
      bm[i * ldb + b0 / 16] = mb[j];
    }
  }
}

/* Into the cache: block blk's K and V (16 slots) and its positions. */
static inline __attribute__((always_inline)) void kv_prefetch(const k_kv_arena_t *kv,
                                                              int64_t blk) {
  const size_t bytes = 16 * kv_row_bytes(kv);
  const char *k = (const char *)kv->k + (size_t)blk * bytes;
  const char *v = (const char *)kv->v + (size_t)blk * bytes;
  for (size_t l = 0; l < bytes; l += 64) {
    _mm_prefetch(k + l, _MM_HINT_T0);
    _mm_prefetch(v + l, _MM_HINT_T0);
  }
  _mm_prefetch((const char *)(kv->pos + blk * 16), _MM_HINT_T0);
}

static inline __attribute__((always_inline)) void
att_tile16_of(att_state_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a, int32_t s,
              int32_t h, float *lg, int64_t ld, float *bm, int64_t ldb, const bool f16,
              const bool bf) {
  const int32_t D = a->head_dim, nq = st->nq;
  const int32_t *table = k_attn_table(a, &a->seqs[s], h);
  const int32_t ctx = k_attn_ctx(a, &a->seqs[s], h);
  float kt[ATT_MAX_D][16] __attribute__((aligned(64)));
  float sc[ATT_QT * ATT_MAX_G][16] __attribute__((aligned(64)));
  float vf[16 * ATT_MAX_D] __attribute__((aligned(64))); /* an f16 block's V in fp32 */
  /* bf: K^T in pairs of dims, V in pairs of slots; two of each, block by
   * block in turn, so that a block's conversions need not wait for the
   * previous block's tile loads */
  uint32_t kt2[2][ATT_MAX_D / 2][16] __attribute__((aligned(64)));
  uint32_t vv[2][8][ATT_MAX_D] __attribute__((aligned(64)));
  if (bf) att_queries_bf(st, D);
  int32_t qmax = INT32_MIN;
  for (int32_t i = 0; i < nq; i++) qmax = st->qpos[i] > qmax ? st->qpos[i] : qmax;
  for (int32_t b0 = 0; b0 < ctx; b0 += 16) {
    int64_t blk = arena_block(kv, table[b0 / 16]);
    int32_t n = ctx - b0 < 16 ? ctx - b0 : 16;
    const int64_t ko = blk * 16 * D; /* the block's first element in K and V */
    const __mmask16 live = (__mmask16)((1u << n) - 1);
    if (b0 + ATT_AHEAD * 16 < ctx) /* the blocks are scattered: fetch a later one early */
      kv_prefetch(kv, arena_block(kv, table[b0 / 16 + ATT_AHEAD]));
    const __m512i pv = _mm512_maskz_loadu_epi32(live, kv->pos + blk * 16);
    if (_mm512_mask_reduce_min_epi32(live, pv) > qmax) { /* the causal future of every row */
      for (int32_t i = 0; i < nq; i++) att_unseen(lg, ld, bm, ldb, i, b0, n, 16);
      continue;
    }
    if (bf) {
      att_block_bf(st, kv, ko, n, D, f16, kt2[b0 / 16 & 1], vv[b0 / 16 & 1], sc);
    } else {
      for (int32_t c = 0; c < D; c += 16) { /* kt = K^T, the slots past n zero */
        __m512 r[16];
        for (int t = 0; t < 16; t++)
          r[t] = t < n ? kv_load16(kv->k, ko + (int64_t)t * D + c, f16) : _mm512_setzero_ps();
        transpose16(r);
        for (int j = 0; j < 16; j++) _mm512_store_ps(kt[c + j], r[j]);
      }
      /* V in fp32 once per block, not once per query that reads it */
      for (int64_t e = 0; f16 && e < (int64_t)n * D; e += 16)
        _mm512_store_ps(vf + e, kv_load16(kv->v, ko + e, true));
      int32_t i0 = 0;
      for (; i0 + ATT_QG <= nq; i0 += ATT_QG) scores16(st, kt, D, i0, ATT_QG, sc);
      if (i0 < nq) scores16(st, kt, D, i0, nq - i0, sc);
    }
    int32_t g0 = 0;
    for (; g0 + ATT_SM_MIN <= nq; g0 += 16)
      softmax16(st, g0, nq - g0 < 16 ? nq - g0 : 16, sc, pv, live, lg, ld, bm, ldb, b0);
    for (; g0 < nq; g0++) softmax_row(st, g0, sc, pv, live, lg, ld, bm, ldb, b0);
    if (bf) {
      att_pv_bf(st, sc, vv[b0 / 16 & 1], D);
      continue;
    }
    const float *vb = f16 ? vf : kv->v + ko;
    for (int32_t i = 0; i < nq; i++) {
      if (!st->seen[i]) continue; /* nothing visible in this block */
      __m512 e = _mm512_load_ps(sc[i]);
      __mmask16 nz = live & _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      const float corr = st->corr[i];
      if (D % 128 == 0) pv16(st->acc[i], sc[i], vb, nz, corr, D, 8);
      else if (D % 64 == 0) pv16(st->acc[i], sc[i], vb, nz, corr, D, 4);
      else pv16(st->acc[i], sc[i], vb, nz, corr, D, 1);
    }
  }
}

static void att_tile16(att_state_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a,
                       int32_t s, int32_t h, float *lg, int64_t ld, float *bm, int64_t ldb) {
  if (kv->type == K_F16) att_tile16_of(st, kv, a, s, h, lg, ld, bm, ldb, true, false);
  else att_tile16_of(st, kv, a, s, h, lg, ld, bm, ldb, false, false);
}

/* Head dims up to 64: O stays in tiles. The query vectors go 16 at a time
 * (a group) over the blocks, and the group's O = P·V sums stay in tiles 4-7
 * (16 dims each) from block to block; only where a row's maximum moved are
 * they stored, its row rescaled by corr and loaded again (about one block
 * in eight in a prefill, one in twenty-five in a decode). P is padded to
 * 32 slots with zeros so that every tile is 16 rows of 64 bytes: 0 holds
 * Q, then P; 1 K, then V; 2 S, then V (V's dims groups alternate between 1
 * and 2, so that a load need not wait for the multiply before it). Where
 * a tile has several groups, the first converts each block's K and V into
 * the thread's att_conv_t and the others read them there. A row's sums are
 * still its own: the other rows of its group change neither its tile row
 * nor its rescales. */
/* OP(tile, k) for the O tiles of no = D / 16 groups of dims (no <= 4). */
#define ATT_O_TILES(no, OP)                                                                    \
  do {                                                                                         \
    OP(4, 0);                                                                                  \
    if ((no) > 1) OP(5, 1);                                                                    \
    if ((no) > 2) OP(6, 2);                                                                    \
    if ((no) > 3) OP(7, 3);                                                                    \
  } while (0)

/* Words of one block in att_conv_t: K^T in pairs of dims ([D / 2][16]),
 * then V's 8 slot pairs ([8][D]) and 8 rows of zeros under P's padding. */
#define ATT_CONV_WORDS(D) ((int64_t)(D) / 2 * 16 + 16 * (int64_t)(D))

/* c's room for nb blocks, the zero rows in place; NULL where it cannot
 * grow (the caller then converts every block once per group). */
static uint32_t *att_conv_blocks(att_conv_t *c, int32_t D, int32_t nb) {
  if (!c) return NULL;
  void *p0 = c->s.p;
  if (k__scratch_reserve(&c->s, (size_t)nb * (size_t)ATT_CONV_WORDS(D) * sizeof(uint32_t)))
    return NULL;
  if (c->s.p != p0 || c->d != D) { /* new memory or another layout: zero once */
    memset(c->s.p, 0, c->s.cap);
    c->d = D;
  }
  return c->s.p;
}

static inline __attribute__((always_inline)) BF_TARGET void
att_tile16_bf_o_of(att_state_t *st, const k_kv_arena_t *kv, const k_attn_args_t *a, int32_t s,
                   int32_t h, float *lg, int64_t ld, float *bm, int64_t ldb, att_conv_t *conv,
                   const bool f16) {
  const int32_t D = a->head_dim, nq = st->nq, no = D / 16;
  const int32_t *table = k_attn_table(a, &a->seqs[s], h);
  const int32_t ctx = k_attn_ctx(a, &a->seqs[s], h);
  const int64_t words = ATT_CONV_WORDS(D);
  float sc[ATT_QT * ATT_MAX_G][16] __attribute__((aligned(64)));
  /* one group: K and V converted block by block into two blocks in turn,
   * laid out as in att_conv_t */
  uint32_t two[2][ATT_CONV_WORDS(64)] __attribute__((aligned(64)));
  uint32_t pb[16][16] __attribute__((aligned(64))); /* P: 8 slot pairs, 8 zeros */
  /* several groups: every block converted once, by the first group */
  uint32_t *blocks = nq > 16 ? att_conv_blocks(conv, D, (ctx + 15) / 16) : NULL;
  if (!blocks)
    for (int t = 0; t < 2; t++) memset(two[t] + words - 8 * D, 0, 8 * (size_t)D * sizeof(uint32_t));
  memset(pb, 0, sizeof pb);
  int32_t qtile = INT32_MIN; /* the tile's last position */
  for (int32_t i = 0; i < nq; i++) qtile = st->qpos[i] > qtile ? st->qpos[i] : qtile;
  const int64_t lda = sizeof st->acc[0];
  const int64_t ldv = (int64_t)D * sizeof(uint32_t); /* V's row, in bytes */
#define O_ZERO(t, k) _tile_zero(t)
#define O_STORE(t, k) _tile_stored(t, st->acc[i0] + 16 * (k), lda)
#define O_LOAD(t, k) _tile_loadd(t, st->acc[i0] + 16 * (k), lda)
#define O_PV(t, k)                                                                             \
  do {                                                                                         \
    if ((k) % 2 == 0) {                                                                        \
      _tile_loadd(1, vp + 16 * (k), ldv);                                                      \
      _tile_dpbf16ps(t, 0, 1);                                                                 \
    } else {                                                                                   \
      _tile_loadd(2, vp + 16 * (k), ldv);                                                      \
      _tile_dpbf16ps(t, 0, 2);                                                                 \
    }                                                                                          \
  } while (0)
  att_queries_bf(st, D);
  for (int32_t i0 = 0; i0 < nq; i0 += 16) {
    const int32_t rows = nq - i0 < 16 ? nq - i0 : 16;
    int32_t qmax = INT32_MIN;
    for (int32_t i = i0; i < i0 + rows; i++) qmax = st->qpos[i] > qmax ? st->qpos[i] : qmax;
    ATT_O_TILES(no, O_ZERO);
    memset(pb[rows], 0, sizeof pb[0] * (size_t)(16 - rows)); /* rows past the group's */
    for (int32_t b0 = 0; b0 < ctx; b0 += 16) {
      const int64_t blk = arena_block(kv, table[b0 / 16]);
      const int32_t n = ctx - b0 < 16 ? ctx - b0 : 16;
      const __mmask16 live = (__mmask16)((1u << n) - 1);
      const __m512i pv = _mm512_maskz_loadu_epi32(live, kv->pos + blk * 16);
      const int32_t pmin = _mm512_mask_reduce_min_epi32(live, pv);
      if (pmin > qtile) { /* the causal future of every row */
        for (int32_t i = i0; i < i0 + rows; i++) att_unseen(lg, ld, bm, ldb, i, b0, n, 16);
        continue;
      }
      const bool convert = !blocks || i0 == 0;
      if (convert && b0 + ATT_AHEAD * 16 < ctx) /* scattered blocks: fetch a later one early */
        kv_prefetch(kv, arena_block(kv, table[b0 / 16 + ATT_AHEAD]));
      /* the block's K^T pairs, then its V pairs */
      uint32_t *kp = blocks ? blocks + b0 / 16 * words : two[b0 / 16 & 1], *vp = kp + D / 2 * 16;
      if (convert) kv_block_bf(kv, blk * 16 * D, n, D, f16, (uint32_t(*)[16])kp, vp, D);
      if (pmin > qmax) { /* the causal future of the group's rows */
        for (int32_t i = i0; i < i0 + rows; i++) att_unseen(lg, ld, bm, ldb, i, b0, n, 16);
        continue;
      }
      _tile_zero(2);
      for (int32_t c = 0; c < D / 32; c++) {
        _tile_loadd(0, st->qb[i0] + 16 * c, sizeof st->qb[0]);
        _tile_loadd(1, kp + 16 * 16 * c, 64);
        _tile_dpbf16ps(2, 0, 1);
      }
      _tile_stored(2, sc[i0], 64);
      if (rows >= ATT_SM_MIN) softmax16(st, i0, rows, sc, pv, live, lg, ld, bm, ldb, b0);
      else
        for (int32_t i = i0; i < i0 + rows; i++)
          softmax_row(st, i, sc, pv, live, lg, ld, bm, ldb, b0);
      bool moved = false;
      for (int32_t r = 0; r < rows; r++) {
        const bool seen = st->seen[i0 + r];
        moved |= seen && st->corr[i0 + r] != 1.0f;
        _mm256_store_si256((__m256i *)pb[r],
                           seen ? (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sc[i0 + r]))
                                : _mm256_setzero_si256());
      }
      if (moved) { /* rescale the rows whose maximum moved */
        ATT_O_TILES(no, O_STORE);
        for (int32_t r = 0; r < rows; r++) {
          if (!st->seen[i0 + r] || st->corr[i0 + r] == 1.0f) continue;
          const __m512 corr = _mm512_set1_ps(st->corr[i0 + r]);
          for (int32_t d = 0; d < D; d += 16)
            _mm512_store_ps(st->acc[i0 + r] + d,
                            _mm512_mul_ps(_mm512_load_ps(st->acc[i0 + r] + d), corr));
        }
        ATT_O_TILES(no, O_LOAD);
      }
      _tile_loadd(0, pb, 64);
      ATT_O_TILES(no, O_PV);
    }
    ATT_O_TILES(no, O_STORE);
  }
#undef O_ZERO
#undef O_STORE
#undef O_LOAD
#undef O_PV
}

static BF_TARGET void att_tile16_bf(att_state_t *st, const k_kv_arena_t *kv,
                                    const k_attn_args_t *a, int32_t s, int32_t h, float *lg,
                                    int64_t ld, float *bm, int64_t ldb, att_conv_t *conv) {
  if (a->head_dim <= 64) {
    att_amx_begin(true);
    if (kv->type == K_F16) att_tile16_bf_o_of(st, kv, a, s, h, lg, ld, bm, ldb, conv, true);
    else att_tile16_bf_o_of(st, kv, a, s, h, lg, ld, bm, ldb, conv, false);
    att_amx_end();
    att_unpermute_bf(st, a->head_dim);
    return;
  }
  att_amx_begin(false);
  if (kv->type == K_F16) att_tile16_of(st, kv, a, s, h, lg, ld, bm, ldb, true, true);
  else att_tile16_of(st, kv, a, s, h, lg, ld, bm, ldb, false, true);
  att_amx_end();
  att_unpermute_bf(st, a->head_dim);
}
#endif

/* Rows [r0, r1) (at most ATT_QT) of sequence s against KV head h; lg, bm,
 * m_out and l_out as att_tile_any describes. */
static void att_tile(const att_job_t *j, int32_t thread, int32_t s, int32_t h, int32_t r0,
                     int32_t r1, float *lg, int64_t ld, float *bm, int64_t ldb, float *m_out,
                     float *l_out) {
  const k_kv_arena_t *kv = j->kv;
  const k_attn_args_t *a = j->a;
  att_state_t st;
  att_begin(&st, a, h, r0, r1);
#ifdef __AVX512F__
  if (kv->block_size == 16 && j->bf16 && a->head_dim % 32 == 0)
    att_tile16_bf(&st, kv, a, s, h, lg, ld, bm, ldb, j->conv ? &j->conv[thread] : NULL);
  else if (kv->block_size == 16 && a->head_dim % 16 == 0)
    att_tile16(&st, kv, a, s, h, lg, ld, bm, ldb);
  else
#endif
    att_tile_any(&st, kv, a, s, h, lg, ld, bm, ldb);
  att_end(&st, a, h, r0, m_out, l_out);
}

/* y[j] = max of x over [j - w/2, j + w/2] within [0, n). */
static void max_pool(float *y, const float *x, int32_t n, int32_t w) {
  int32_t r = w / 2;
  for (int32_t j = 0; j < n; j++) {
    int32_t lo = j - r < 0 ? 0 : j - r, hi = j + r >= n ? n - 1 : j + r;
    float v = x[lo];
    for (int32_t k = lo + 1; k <= hi; k++) v = x[k] > v ? x[k] : v;
    y[j] = v;
  }
}

/* Scored rows (k_seq_kv_t.n_obs) of a sequence against head h: tile by
 * tile, each tile's probabilities folded into per-query-head sums sq[g][k]
 * (of p^2) and mass[g][k] (of p), [G][ld] each, zeroed here. A long window
 * is split into parts that run in parallel, each with its own sums, added
 * up by att_finish. */
static int att_accumulate(const att_job_t *j, int32_t s, int32_t h, int32_t r0, int32_t r1,
                          int32_t thread, float *sq, float *mass, int64_t ld) {
  const k_kv_arena_t *kv = j->kv;
  const k_attn_args_t *a = j->a;
  const k_seq_kv_t *q = &a->seqs[s];
  const int32_t H = a->n_kv_heads, G = a->n_q_heads / H, B = kv->block_size;
  const int32_t ctx = k_attn_ctx(a, q, h);
  const int32_t last_row = a->q_start[s + 1] - 1;
  const int64_t ldb = (ld + B - 1) / B;
  const bool want_mass = q->n_obs > 0 && q->obs_mass;
  k__scratch_t *sc = &j->scratch[thread];
  if (k__scratch_reserve(sc, (size_t)ATT_QT * G * (size_t)(ld + ldb) * sizeof(float)))
    return -ENOMEM;
  float *lg = sc->p, *bm = lg + (int64_t)ATT_QT * G * ld;
  memset(sq, 0, (size_t)G * (size_t)ld * sizeof(float));
  memset(mass, 0, (size_t)G * (size_t)ld * sizeof(float));
  float mm[ATT_QT * ATT_MAX_G], ll[ATT_QT * ATT_MAX_G];
  for (int32_t t0 = r0; t0 < r1; t0 += ATT_QT) {
    int32_t t1 = t0 + ATT_QT < r1 ? t0 + ATT_QT : r1;
    att_tile(j, thread, s, h, t0, t1, lg, ld, bm, ldb, mm, ll);
    for (int32_t i = 0; i < (t1 - t0) * G; i++) {
      int32_t g = i % G;
      float inv = ll[i] > 0 ? 1.0f / ll[i] : 0.0f;
      float *row = lg + i * ld, *sg = sq + g * ld, *mg = mass + g * ld;
      for (int32_t b0 = 0; b0 < ctx; b0 += B) {
        float f = exp_nonpos(bm[i * ldb + b0 / B] - mm[i]) * inv; /* block's rescale */
        int32_t n = ctx - b0 < B ? ctx - b0 : B;
        float *rb = row + b0, *sb = sg + b0;
        for (int32_t k = 0; k < n; k++) {
          float p = rb[k] * f;
          rb[k] = p;
          sb[k] += p * p;
        }
        if (want_mass)
          for (int32_t k = 0; k < n; k++) mg[b0 + k] += rb[k];
      }
      if (q->n_obs > 0 && q->obs_last && t0 + i / G == last_row) {
        float *o = q->obs_last + (k_attn_row(a, h) * G + g) * ((int64_t)q->stride * B);
        for (int32_t k = 0; k < ctx; k++) o[k] = row[k] * row[k];
      }
    }
  }
  return 0;
}

/* Pool (prefill windows) and add the sums into the scores and the mass. */
static void att_finish(const att_job_t *j, int32_t s, int32_t h, float *sq, float *mass,
                       int64_t ld, float *tmp) {
  const k_kv_arena_t *kv = j->kv;
  const k_attn_args_t *a = j->a;
  const k_seq_kv_t *q = &a->seqs[s];
  const int32_t H = a->n_kv_heads, G = a->n_q_heads / H, B = kv->block_size;
  const int32_t ctx = k_attn_ctx(a, q, h);
  const int32_t *table = k_attn_table(a, q, h);
  const bool window = q->n_obs > 0;
  float *om = window && q->obs_mass
                  ? q->obs_mass + k_attn_row(a, h) * ((int64_t)q->stride * B)
                  : NULL;
  if (window && q->obs_pool > 1) {
    for (int32_t g = 0; g < G; g++) {
      max_pool(tmp, sq + g * ld, ctx, q->obs_pool);
      memcpy(sq + g * ld, tmp, (size_t)ctx * sizeof(float));
      if (!om) continue;
      max_pool(tmp, mass + g * ld, ctx, q->obs_pool);
      memcpy(mass + g * ld, tmp, (size_t)ctx * sizeof(float));
    }
  }
  for (int32_t k = 0; k < ctx; k++) {
    float add = 0.0f;
    for (int32_t g = 0; g < G; g++) add += sq[g * ld + k];
    kv->score[arena_block(kv, table[k / B]) * B + k % B] += add;
  }
  for (int32_t k = 0; om && k < ctx; k++) {
    float ms = 0.0f;
    for (int32_t g = 0; g < G; g++) ms += mass[g * ld + k];
    om[k] += ms;
  }
}

/* Part p of sequence s's scored rows, head h: its sums in the job's
 * accumulator ([H][parts][2][G][ld] per sequence). */
static float *att_part_sums(const att_job_t *j, int32_t s, int32_t h, int32_t p) {
  const int32_t G = j->a->n_q_heads / j->a->n_kv_heads;
  return j->acc + j->acc_off[s] + ((int64_t)h * j->n_parts[s] + p) * 2 * G * j->acc_ld[s];
}

static void att_task(void *arg, int64_t ti, int32_t thread) {
  att_job_t *j = arg;
  const int32_t H = j->a->n_kv_heads, G = j->a->n_q_heads / H;
  int32_t s = j->task_seq[ti / H], h = (int32_t)(ti % H);
  int32_t r0 = j->task_row[ti / H], r1 = j->task_end[ti / H], part = j->task_part[ti / H];
  if (part < 0) {
    att_tile(j, thread, s, h, r0, r1, NULL, 0, NULL, 0, NULL, NULL);
    return;
  }
  int rc;
  if (j->n_parts[s] > 1) { /* sums only; att_finish_task adds the parts up */
    float *sq = att_part_sums(j, s, h, part);
    rc = att_accumulate(j, s, h, r0, r1, thread, sq, sq + (int64_t)G * j->acc_ld[s],
                        j->acc_ld[s]);
  } else {
    const int32_t ctx = k_attn_ctx(j->a, &j->a->seqs[s], h);
    const int64_t ld = ctx > 0 ? ctx : 1;
    /* then sq, mass [G][ld], tmp [ld] */
    k__scratch_t *sc = &j->scratch[thread];
    /* att_accumulate's lg and bm first */
    size_t lgn = (size_t)ATT_QT * G * (size_t)(ld + (ld + j->kv->block_size - 1) / j->kv->block_size);
    rc = k__scratch_reserve(sc, (lgn + (2 * (size_t)G + 1) * (size_t)ld) * sizeof(float));
    if (!rc) {
      float *sq = (float *)sc->p + lgn, *mass = sq + (int64_t)G * ld, *tmp = mass + (int64_t)G * ld;
      rc = att_accumulate(j, s, h, r0, r1, thread, sq, mass, ld);
      if (!rc) att_finish(j, s, h, sq, mass, ld, tmp);
    }
  }
  if (rc) __atomic_store_n(&j->rc, rc, __ATOMIC_RELAXED);
}

/* Task i of the second pass: (sequence, head) i of the split windows. */
static void att_finish_task(void *arg, int64_t ti, int32_t thread) {
  att_job_t *j = arg;
  const int32_t H = j->a->n_kv_heads, G = j->a->n_q_heads / H;
  int32_t s = j->split_seq[ti / H], h = (int32_t)(ti % H);
  const int64_t ld = j->acc_ld[s];
  float *sq0 = att_part_sums(j, s, h, 0);
  for (int32_t p = 1; p < j->n_parts[s]; p++) {
    const float *sp = att_part_sums(j, s, h, p);
    for (int64_t k = 0; k < 2 * G * ld; k++) sq0[k] += sp[k];
  }
  k__scratch_t *sc = &j->scratch[thread];
  if (k__scratch_reserve(sc, (size_t)ld * sizeof(float))) {
    __atomic_store_n(&j->rc, -ENOMEM, __ATOMIC_RELAXED);
    return;
  }
  att_finish(j, s, h, sq0, sq0 + G * ld, ld, sc->p);
}

#ifdef GG_EMU
/* ---- attention as GGML computes it without flash attention ----------------
 * kq = K·q with q rounded to fp16 (K and V are fp16 already), softmax of
 * kq·scale over the whole row with ggml_v_expf and a double sum over
 * 16-wide chunks, probabilities rounded to fp16, then V·p. The dot products
 * follow GGML's two kernels: llamafile's tinyBLAS (one 16-lane accumulator)
 * when the batch has two or more tokens, ggml_vec_dot_f16 (four 16-lane
 * accumulators) for a single token. Position t of the context sits in lane
 * t % 16 of chunk t / 16, as cell t of GGML's cache does. */
static inline float red16(const float *x) { return _mm512_reduce_add_ps(_mm512_loadu_ps(x)); }

static void att_task_gg(void *arg, int64_t ti, int32_t thread) {
  const att_job_t *j = arg;
  const k_attn_args_t *a = j->a;
  const k_kv_arena_t *kv = j->kv;
  const int32_t H = a->n_kv_heads, G = a->n_q_heads / a->n_kv_heads, D = a->head_dim,
                B = kv->block_size;
  const bool gemm = a->q_start[a->n_seqs] >= 2;
  int32_t s = j->task_seq[ti / H], h = (int32_t)(ti % H);
  int32_t r0 = j->task_row[ti / H], r1 = j->task_end[ti / H];
  const int32_t *table = k_attn_table(a, &a->seqs[s], h);
  int32_t ctx = k_attn_ctx(a, &a->seqs[s], h);
  int32_t nch = (ctx + 15) / 16;
  float *w = aligned_alloc(64, (size_t)nch * 16 * sizeof(float) * 2);
  float *pr = w + (size_t)nch * 16;
  for (int32_t r = r0; r < r1; r++) {
    int32_t qp = a->q_pos[r];
    for (int32_t g = 0; g < G; g++) {
      const float *q = a->q + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
      float *o = a->out + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
      float q16[ATT_MAX_D] __attribute__((aligned(64)));
      for (int32_t d = 0; d < D; d++) q16[d] = f16r(q[d]);
      /* scores */
      float mx = -INFINITY;
      for (int32_t t = 0; t < nch * 16; t++) {
        if (t >= ctx) { w[t] = -INFINITY; continue; }
        int64_t blk = arena_block(kv, table[t / B]);
        int32_t off = t % B;
        if (kv->pos[(int64_t)blk * B + off] > qp) { w[t] = -INFINITY; continue; }
        float kbuf[ATT_MAX_D] __attribute__((aligned(64)));
        const float *kr = kv_row(kv, kv->k, (int64_t)blk * B + off, kbuf);
        float sc;
        if (gemm) {
          __m512 acc = _mm512_setzero_ps();
          for (int32_t d = 0; d < D; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(kr + d), _mm512_load_ps(q16 + d), acc);
          sc = _mm512_reduce_add_ps(acc);
        } else {
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};
          for (int32_t d = 0; d < D; d += 64)
            for (int k = 0; k < 4; k++)
              acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(kr + d + 16 * k),
                                       _mm512_load_ps(q16 + d + 16 * k), acc[k]);
          acc[0] = _mm512_add_ps(acc[0], acc[2]);
          acc[1] = _mm512_add_ps(acc[1], acc[3]);
          acc[0] = _mm512_add_ps(acc[0], acc[1]);
          sc = _mm512_reduce_add_ps(acc[0]);
        }
        w[t] = sc * a->scale;
        mx = w[t] > mx ? w[t] : mx;
      }
      /* softmax */
      double sum = 0;
      for (int32_t c = 0; c < nch; c++) {
        __m512 e = gg_v_expf(_mm512_sub_ps(_mm512_loadu_ps(w + 16 * c), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(pr + 16 * c, e);
        sum += (double)_mm512_reduce_add_ps(e);
      }
      float inv = (float)(1.0 / sum);
      for (int32_t t = 0; t < nch * 16; t++) pr[t] = f16r(pr[t] * inv);
      /* V·p: acc[k][lane][d] */
      float acc[4][16][ATT_MAX_D] __attribute__((aligned(64)));
      int nacc = gemm ? 1 : 4;
      memset(acc, 0, sizeof acc);
      for (int32_t t = 0; t < ctx; t++) {
        float p = pr[t];
        int64_t blk = arena_block(kv, table[t / B]);
        int32_t off = t % B;
        float vbuf[ATT_MAX_D];
        const float *vr = kv_row(kv, kv->v, (int64_t)blk * B + off, vbuf);
        float *ac = acc[gemm ? 0 : (t / 16) % 4][t % 16];
        for (int32_t d = 0; d < D; d++) ac[d] = fmaf(vr[d], p, ac[d]);
      }
      for (int32_t d = 0; d < D; d++) {
        float l[16] __attribute__((aligned(64)));
        for (int k = 0; k < 16; k++) {
          if (nacc == 1) l[k] = acc[0][k][d];
          else l[k] = (acc[0][k][d] + acc[2][k][d]) + (acc[1][k][d] + acc[3][k][d]);
        }
        o[d] = red16(l);
      }
    }
  }
  free(w);
}
#endif

#ifdef GG_EMU
/* Whether any sequence asks for scores (the GGML emulation has none). */
static bool scored_any(const k_attn_args_t *a) {
  for (int32_t s = 0; s < a->n_seqs; s++)
    if (a->seqs[s].n_obs) return true;
  return false;
}
#endif

/* Rows of a scored window per parallel part, at least; parts at most. */
#define ATT_PART_ROWS 128
#define ATT_MAX_PARTS 8

static int cpu_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  cpu_t *c = be->impl;
  const int32_t H = a->n_kv_heads, G = a->n_q_heads / (H > 0 ? H : 1), S = a->n_seqs;
  if (H <= 0 || a->n_q_heads % H || G > ATT_MAX_G || a->head_dim > ATT_MAX_D ||
      kv->block_size > ATT_MAX_B || a->head_dim != kv->head_dim)
    return -EINVAL;
  /* Tasks: tiles of ATT_QT rows; the scored rows of a sequence (all of a
   * decode's, the observation window of a prefill) form one task, or
   * several parts with separate sums when the window is long. */
  size_t ns = (size_t)(S > 0 ? S : 1);
  if (k__scratch_reserve(&c->att_seq, ns * (sizeof(int64_t) + 4 * sizeof(int32_t))))
    return -ENOMEM;
  int64_t *acc_off = c->att_seq.p;
  int32_t *per_seq = (int32_t *)(acc_off + ns);
  int32_t *n_parts = per_seq, *acc_ld = per_seq + S, *split_seq = per_seq + 2 * S,
          *obs_rows = per_seq + 3 * S;
  int64_t n_tasks = 0, acc_n = 0;
  int32_t n_split = 0;
  for (int32_t s = 0; s < S; s++) {
    int32_t rows = a->q_start[s + 1] - a->q_start[s], n_obs = a->seqs[s].n_obs;
    int32_t obs = obs_rows[s] = n_obs < 0 || n_obs > rows ? rows : n_obs;
    /* the split depends on the rows only, so the scores do not depend on
     * the thread count */
    int32_t np = obs / ATT_PART_ROWS < ATT_MAX_PARTS ? obs / ATT_PART_ROWS : ATT_MAX_PARTS;
    n_parts[s] = obs > 0 ? (np > 1 ? np : 1) : 0;
    acc_off[s] = -1;
    acc_ld[s] = 0;
    if (n_parts[s] > 1) {
      int32_t ld = 1;
      for (int32_t h = 0; h < H; h++) {
        int32_t ctx = k_attn_ctx(a, &a->seqs[s], h);
        ld = ctx > ld ? ctx : ld;
      }
      acc_ld[s] = ld;
      acc_off[s] = acc_n;
      acc_n += (int64_t)H * n_parts[s] * 2 * G * ld;
      split_seq[n_split++] = s;
    }
    n_tasks += (rows - obs + ATT_QT - 1) / ATT_QT + n_parts[s];
  }
  int rc = acc_n ? k__scratch_reserve(&c->att_acc, (size_t)acc_n * sizeof(float)) : 0;
  int32_t stack[4][256];
  int32_t *ts = stack[0], *tr = stack[1], *te = stack[2], *tp = stack[3];
  if (!rc && n_tasks > 256) {
    ts = malloc((size_t)n_tasks * 4 * sizeof *ts);
    if (!ts) rc = -ENOMEM;
    tr = ts + n_tasks;
    te = tr + n_tasks;
    tp = te + n_tasks;
  }
  if (rc) {
    return rc;
  }
  int64_t k = 0;
  for (int32_t s = 0; s < S; s++) {
    int32_t q0 = a->q_start[s], q1 = a->q_start[s + 1], obs = obs_rows[s];
    for (int32_t r = q0; r < q1 - obs; r += ATT_QT, k++) {
      ts[k] = s;
      tr[k] = r;
      te[k] = r + ATT_QT < q1 - obs ? r + ATT_QT : q1 - obs;
      tp[k] = -1;
    }
    /* parts of whole tiles, as even as that allows */
    int32_t tiles = (obs + ATT_QT - 1) / ATT_QT;
    for (int32_t p = 0; p < n_parts[s]; p++, k++) {
      ts[k] = s;
      tr[k] = q1 - obs + (int32_t)((int64_t)tiles * p / n_parts[s]) * ATT_QT;
      te[k] = p + 1 == n_parts[s] ? q1 : q1 - obs + (int32_t)((int64_t)tiles * (p + 1) / n_parts[s]) * ATT_QT;
      tp[k] = p;
    }
  }
  att_job_t j = {kv, a, c->att_scratch, ts, tr, te, tp, n_parts, acc_ld, acc_off,
                 c->att_acc.p, split_seq, 0, be->numerics == K_NUMERICS_INT8 && k__cpu_bf16(),
                 c->att_conv};
#ifdef GG_EMU
  if (be->numerics == K_NUMERICS_LLAMA && a->head_dim % 64 == 0 && acc_n == 0 && !scored_any(a))
    k_pool_run(c->pool, n_tasks * H, att_task_gg, &j);
  else
#endif
    k_pool_run(c->pool, n_tasks * H, att_task, &j);
  if (n_split && !j.rc) k_pool_run(c->pool, (int64_t)n_split * H, att_finish_task, &j);
  if (ts != stack[0]) free(ts);
  return j.rc;
}

static const k_ops_t cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .matmul = cpu_matmul,
    .matmul_n = cpu_matmul_n,
    .weight_pack = cpu_weight_pack,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .embed = cpu_embed,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .kv_move = cpu_kv_move,
    .sample = cpu_sample,
    .penalize = cpu_penalize,
    .logprobs = cpu_logprobs,
    .read_rows = cpu_read_rows,
};

int k_cpu_backend_new(k_backend_t **out, int32_t threads) {
  if (threads <= 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    threads = n > 0 ? (int32_t)n : 1;
  }
  k_backend_t *be = calloc(1, sizeof *be);
  cpu_t *c = calloc(1, sizeof *c);
  if (!be || !c) {
    free(be);
    free(c);
    return -ENOMEM;
  }
  c->threads = threads;
  c->att_scratch = calloc((size_t)threads, sizeof *c->att_scratch);
  c->att_conv = calloc((size_t)threads, sizeof *c->att_conv);
  int rc = c->att_scratch && c->att_conv ? k_pool_new(&c->pool, threads) : -ENOMEM;
  if (rc) {
    free(c->att_conv);
    free(c->att_scratch);
    free(be);
    free(c);
    return rc;
  }
  be->ops = &cpu_ops;
  be->impl = c;
  be->threads = threads;
  be->weight_types = 1u << K_F32 | 1u << K_F16 | 1u << K_BF16 | 1u << K_Q8_0 | 1u << K_Q4_0 |
                     1u << K_Q4_1;
  be->host_memory = true;
  be->kv_type = K_F32;
  be->kv_types = 1u << K_F32 | 1u << K_F16;
  be->dense_type = K_F32;
  /* The pool runs bands of rows in parallel; each band's sgemm is serial. */
  openblas_set_num_threads(1);
  *out = be;
  return 0;
}
