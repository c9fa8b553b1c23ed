/* CPU matmul for fp32, fp16/bf16 and GGML-quantised weights with fp32
 * activations.
 *
 * Batch invariance: every output y[i][r] is computed by the same sequence
 * of operations whatever the batch size m and whichever tile it falls in:
 * per 32-element block the weights are dequantised exactly as
 * k__cpu_dequant_row does (q·d, or fma(q, d, min) for Q4_1), then two fused
 * multiply-adds per 16 lanes into one accumulator, and one fixed reduction
 * at the end. So a sequence gets bit-identical logits alone or in a batch of
 * any size, and chunked prefill equals whole prefill: what continuous
 * batching needs to "change nothing".
 *
 * Work split: tasks are bands of MM_BAND weight rows. Small batches (decode)
 * dequantise each block on the fly (the work is reading the weights); large
 * batches dequantise the band once into a thread-local fp32 scratch and run
 * register tiles of 4 activation rows × 4 weight rows over it. */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__F16C__)
#define MM_AVX512 1
#endif
#if defined(MM_AVX512) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MM_PACK 1 /* the packed Q4_0/Q4_1/Q8_0 kernel */
#endif
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef MM_PACK
#include <cpuid.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/cpu/cpu-internal.h"

/* GCC cannot see that the tile loops only read the ni/nr entries they wrote
 * (clang has no such warning, and would warn about the unknown option). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MM_BAND 16 /* weight rows per task */
#define MM_TI 4    /* activation rows per tile */
#define MM_TR 4    /* weight rows per tile */

static inline float f16(const uint8_t *p) {
  uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return k_f16_to_f32(h);
#endif
}

static inline float bf16(const uint8_t *p) {
  uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

void k__cpu_dequant_row(k_dtype_t t, const void *src, float *dst, int64_t cols) {
  const uint8_t *p = src;
  switch (t) {
  case K_F32:
    memcpy(dst, src, (size_t)cols * sizeof(float));
    return;
  case K_F16:
    for (int64_t i = 0; i < cols; i++) dst[i] = f16(p + 2 * i);
    return;
  case K_BF16:
    for (int64_t i = 0; i < cols; i++) dst[i] = bf16(p + 2 * i);
    return;
  case K_Q8_0:
    for (int64_t b = 0; b < cols / K_QBLOCK; b++, p += 34, dst += K_QBLOCK) {
      float d = f16(p);
      for (int j = 0; j < K_QBLOCK; j++) dst[j] = (float)(int8_t)p[2 + j] * d;
    }
    return;
  case K_Q4_0:
    for (int64_t b = 0; b < cols / K_QBLOCK; b++, p += 18, dst += K_QBLOCK) {
      float d = f16(p);
      for (int j = 0; j < 16; j++) {
        dst[j] = (float)((p[2 + j] & 15) - 8) * d;
        dst[j + 16] = (float)((p[2 + j] >> 4) - 8) * d;
      }
    }
    return;
  case K_Q4_1:
    for (int64_t b = 0; b < cols / K_QBLOCK; b++, p += 20, dst += K_QBLOCK) {
      float d = f16(p), mn = f16(p + 2);
      for (int j = 0; j < 16; j++) {
        dst[j] = fmaf((float)(p[4 + j] & 15), d, mn);
        dst[j + 16] = fmaf((float)(p[4 + j] >> 4), d, mn);
      }
    }
    return;
  }
}

/* Bytes of one 32-element block of a weight row. */
static size_t block_bytes(k_dtype_t t) { return k_row_bytes(t, K_QBLOCK); }

typedef struct mm_job {
  float *y;
  const float *x;
  const k_weight_t *w;
  int64_t m, nb;
  size_t row_bytes;
  float *scratch; /* [threads][MM_BAND][cols] dequantised bands */
  const int8_t *xq; /* quantised activations [m][cols] (Q weight types) */
  const float *xd;  /* [m][nb] their scales */
  const float *xs;  /* [m][nb] their scaled sums */
  const int32_t *xsum; /* [m][nb] their integer sums */
  uint8_t *amx_spread;  /* [threads][2][nb][AMX_TILE_BYTES] Q4 weight tiles; NULL: no AMX */
  int64_t task_groups;  /* groups of 16 rows per task of the packed path */
} mm_job_t;

#define MM_FLY_M 4 /* up to this many activation rows: dequantise on the fly */
#define ALWAYS_INLINE_Q static inline __attribute__((always_inline))

#ifdef MM_AVX512
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One block as two vectors of 16 fp32 weights, bit-equal to what
 * k__cpu_dequant_row writes. */
ALWAYS_INLINE void deq(k_dtype_t t, const uint8_t *b, __m512 *w0, __m512 *w1) {
  const __m128i m15 = _mm_set1_epi8(15);
  switch (t) {
  case K_Q4_1: {
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 4));
    __m512 d = _mm512_set1_ps(f16(b)), mn = _mm512_set1_ps(f16(b + 2));
    *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, m15))), d, mn);
    *w1 = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m15))), d, mn);
    return;
  }
  case K_Q4_0: {
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
    __m512 d = _mm512_set1_ps(f16(b));
    __m512i eight = _mm512_set1_epi32(8);
    *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                            _mm512_cvtepu8_epi32(_mm_and_si128(q, m15)), eight)), d);
    *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m15)), eight)),
                        d);
    return;
  }
  case K_Q8_0: {
    __m512 d = _mm512_set1_ps(f16(b));
    *w0 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))), d);
    *w1 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))), d);
    return;
  }
  case K_F16:
    *w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b));
    *w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + 32)));
    return;
  case K_BF16:
    *w0 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)b)), 16));
    *w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + 32))), 16));
    return;
  case K_F32:
    *w0 = _mm512_loadu_ps((const float *)b);
    *w1 = _mm512_loadu_ps((const float *)b + 16);
    return;
  }
}

/* ni activation rows (from i0) × nr weight rows (pointers wr, type t). */
ALWAYS_INLINE void tile(const mm_job_t *j, const k_dtype_t t, const uint8_t *const *wr,
                        int64_t i0, int ni, int64_t r0, int nr) {
  const size_t bb = block_bytes(t);
  const int64_t cols = j->w->cols, nb = j->nb;
  __m512 acc[MM_TI][MM_TR];
  _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++)
      _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++) acc[i][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512 x0[MM_TI], x1[MM_TI];
    _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++) {
      const float *xb = j->x + (i0 + i) * cols + b * K_QBLOCK;
      x0[i] = _mm512_loadu_ps(xb);
      x1[i] = _mm512_loadu_ps(xb + 16);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++) {
      __m512 w0, w1;
      deq(t, wr[r] + (size_t)b * bb, &w0, &w1);
      _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++) {
        acc[i][r] = _mm512_fmadd_ps(w0, x0[i], acc[i][r]);
        acc[i][r] = _mm512_fmadd_ps(w1, x1[i], acc[i][r]);
      }
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++)
      _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
          j->y[(i0 + i) * j->w->rows + r0 + r] = _mm512_reduce_add_ps(acc[i][r]);
}

ALWAYS_INLINE void tiles(const mm_job_t *j, const k_dtype_t t, const uint8_t *base, size_t stride,
                         int64_t r_begin, int64_t r_end) {
  for (int64_t i0 = 0; i0 < j->m; i0 += MM_TI) {
    int ni = j->m - i0 < MM_TI ? (int)(j->m - i0) : MM_TI;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += MM_TR) {
      int nr = r_end - r0 < MM_TR ? (int)(r_end - r0) : MM_TR;
      const uint8_t *wr[MM_TR];
      for (int r = 0; r < nr; r++) wr[r] = base + (size_t)(r0 - r_begin + r) * stride;
      if (ni == MM_TI && nr == MM_TR) tile(j, t, wr, i0, MM_TI, r0, MM_TR);
      else if (ni == 1 && nr == MM_TR) tile(j, t, wr, i0, 1, r0, MM_TR);
      else tile(j, t, wr, i0, ni, r0, nr);
    }
  }
}

static void dequant_block_row(k_dtype_t t, const uint8_t *src, float *dst, int64_t nb) {
  const size_t bb = block_bytes(t);
  for (int64_t b = 0; b < nb; b++) {
    __m512 w0, w1;
    deq(t, src + (size_t)b * bb, &w0, &w1);
    _mm512_storeu_ps(dst + b * K_QBLOCK, w0);
    _mm512_storeu_ps(dst + b * K_QBLOCK + 16, w1);
  }
}
#else
/* Portable: one output at a time, blocks in order, the same arithmetic for
 * every batch shape. */
static void tiles(const mm_job_t *j, const k_dtype_t t, const uint8_t *base, size_t stride,
                  int64_t r_begin, int64_t r_end) {
  float wb[K_QBLOCK];
  const size_t bb = block_bytes(t);
  for (int64_t i = 0; i < j->m; i++)
    for (int64_t r = r_begin; r < r_end; r++) {
      const uint8_t *wr = base + (size_t)(r - r_begin) * stride;
      const float *x = j->x + i * j->w->cols;
      float acc[16] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        k__cpu_dequant_row(t, wr + (size_t)b * bb, wb, K_QBLOCK);
        for (int k = 0; k < 16; k++) {
          acc[k] = fmaf(wb[k], x[b * K_QBLOCK + k], acc[k]);
          acc[k] = fmaf(wb[k + 16], x[b * K_QBLOCK + k + 16], acc[k]);
        }
      }
      float s = 0;
      for (int k = 0; k < 16; k++) s += acc[k];
      j->y[i * j->w->rows + r] = s;
    }
}

static void dequant_block_row(k_dtype_t t, const uint8_t *src, float *dst, int64_t nb) {
  k__cpu_dequant_row(t, src, dst, nb * K_QBLOCK);
}
#endif


/* ---- quantised weights: int8 activations, integer dot products ------------
 * For Q4_0, Q4_1 and Q8_0 weights the activations are quantised per 32-
 * element block to int8 with an fp32 scale (stored rounded to fp16, as GGML's
 * Q8_0/Q8_1 blocks do), and each block's dot product is an exact integer sum
 * scaled by d_w·d_x (plus min_w·s_x for Q4_1). This is llama.cpp's CPU
 * arithmetic for these types, so logits track the reference closely, and the
 * integer kernels read 4-bit weights without unpacking them to floats. */

static inline float fp16_round(float f) {
#ifdef __F16C__
  return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  return k_f16_to_f32(k_f32_to_f16(f));
#endif
}

/* A block holding inf or NaN has no int8 form (the conversion would give
 * garbage integers): zeros, with the non-finite value as its scale, so that
 * the dot products come out NaN as the float arithmetic would have. */
static inline bool nonfinite_block(float amax, int8_t *qb, float *d, float *s) {
  if (amax <= FLT_MAX) return false;
  memset(qb, 0, K_QBLOCK);
  *d = amax != amax ? amax : NAN;
  *s = *d;
  return true;
}

/* One activation row: q[cols] int8, d[nb] scales, s[nb] = d·Σq (both
 * fp16-rounded). Rounding is to nearest even, as GGML's SIMD code does. */
static void quant_row(const float *x, int64_t nb, int8_t *q, float *d, float *s, int32_t *isum) {
  for (int64_t b = 0; b < nb; b++) {
    isum[b] = 0;
    const float *xb = x + b * K_QBLOCK;
    int8_t *qb = q + b * K_QBLOCK;
#ifdef MM_AVX512
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    if (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q))
      amax = NAN; /* max_ps passes a NaN lane over */
    if (nonfinite_block(amax, qb, &d[b], &s[b])) continue;
    float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    if (!(id <= FLT_MAX)) id = 0.0f; /* amax so small that 127 / amax overflows: all zero */
    __m512 vid = _mm512_set1_ps(id);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    _mm_storeu_si128((__m128i *)qb, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(qb + 16), _mm512_cvtepi32_epi8(q1));
    int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float amax = 0;
    for (int k = 0; k < K_QBLOCK; k++) amax = fmaxf(amax, fabsf(xb[k]));
    for (int k = 0; k < K_QBLOCK; k++) amax = xb[k] != xb[k] ? xb[k] : amax; /* fmaxf skips NaN */
    if (nonfinite_block(amax, qb, &d[b], &s[b])) continue;
    float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    if (!(id <= FLT_MAX)) id = 0.0f; /* amax so small that 127 / amax overflows: all zero */
    int32_t sum = 0;
    for (int k = 0; k < K_QBLOCK; k++) {
      qb[k] = (int8_t)nearbyintf(xb[k] * id);
      sum += qb[k];
    }
#endif
    d[b] = fp16_round(dd);
    s[b] = fp16_round(dd * (float)sum);
    isum[b] = sum;
  }
}

#ifdef __AVX2__
ALWAYS_INLINE_Q __m256i dot_u8s8(__m256i u, __m256i v) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, v);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* ni activation rows × nr weight rows of a quantised type. */
ALWAYS_INLINE_Q void tile_q(const mm_job_t *j, const k_dtype_t t, const uint8_t *const *wr,
                            int64_t i0, int ni, int64_t r0, int nr) {
  const size_t bb = block_bytes(t);
  const int64_t cols = j->w->cols, nb = j->nb;
  const __m128i m15 = _mm_set1_epi8(15);
  __m256 acc[MM_TI][MM_TR];
  float off[MM_TI][MM_TR];
  _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++)
      _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++) {
    acc[i][r] = _mm256_setzero_ps();
    off[i][r] = 0;
  }
  for (int64_t b = 0; b < nb; b++) {
    __m256i xq[MM_TI];
    float xd[MM_TI], xs[MM_TI];
    _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++) {
      xq[i] = _mm256_loadu_si256((const __m256i *)(j->xq + (i0 + i) * cols + b * K_QBLOCK));
      xd[i] = j->xd[(i0 + i) * nb + b];
      xs[i] = j->xs[(i0 + i) * nb + b];
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++) {
      const uint8_t *blk = wr[r] + (size_t)b * bb;
      /* the next tile's rows follow these in memory: fetch them early */
      _mm_prefetch((const char *)(blk + MM_TR * j->row_bytes), _MM_HINT_T0);
      __m256i wq;
      float dw = f16(blk), mw = 0;
      if (t == K_Q8_0) {
        wq = _mm256_loadu_si256((const __m256i *)(blk + 2));
      } else {
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (t == K_Q4_1 ? 4 : 2)));
        wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m15), _mm_and_si128(q, m15));
        if (t == K_Q4_0) wq = _mm256_sub_epi8(wq, _mm256_set1_epi8(8));
        if (t == K_Q4_1) mw = f16(blk + 2);
      }
      __m256i aw = t == K_Q4_1 ? wq : _mm256_sign_epi8(wq, wq); /* |w| for signed types */
      _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++) {
        __m256i isum = t == K_Q4_1 ? dot_u8s8(wq, xq[i])
                                   : dot_u8s8(aw, _mm256_sign_epi8(xq[i], wq));
        acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[i]), _mm256_cvtepi32_ps(isum), acc[i][r]);
        if (t == K_Q4_1) off[i][r] += mw * xs[i];
      }
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++)
      _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
          j->y[(i0 + i) * j->w->rows + r0 + r] = hsum8(acc[i][r]) + off[i][r];
}

ALWAYS_INLINE_Q void tiles_q(const mm_job_t *j, const k_dtype_t t, const uint8_t *base,
                             int64_t r_begin, int64_t r_end) {
  for (int64_t i0 = 0; i0 < j->m; i0 += MM_TI) {
    int ni = j->m - i0 < MM_TI ? (int)(j->m - i0) : MM_TI;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += MM_TR) {
      int nr = r_end - r0 < MM_TR ? (int)(r_end - r0) : MM_TR;
      const uint8_t *wr[MM_TR];
      for (int r = 0; r < nr; r++) wr[r] = base + (size_t)(r0 - r_begin + r) * j->row_bytes;
      if (ni == MM_TI && nr == MM_TR) tile_q(j, t, wr, i0, MM_TI, r0, MM_TR);
      else if (ni == 1 && nr == MM_TR) tile_q(j, t, wr, i0, 1, r0, MM_TR);
      else tile_q(j, t, wr, i0, ni, r0, nr);
    }
  }
}
#else
/* Portable: exact integer block sums, then the same float steps per output. */
static void tiles_q(const mm_job_t *j, const k_dtype_t t, const uint8_t *base, int64_t r_begin,
                    int64_t r_end) {
  const size_t bb = block_bytes(t);
  for (int64_t i = 0; i < j->m; i++)
    for (int64_t r = r_begin; r < r_end; r++) {
      const uint8_t *wr = base + (size_t)(r - r_begin) * j->row_bytes;
      const int8_t *xq = j->xq + i * j->w->cols;
      float acc = 0, off = 0;
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t *blk = wr + (size_t)b * bb;
        int32_t isum = 0;
        for (int k = 0; k < K_QBLOCK; k++) {
          int wv;
          if (t == K_Q8_0) wv = (int8_t)blk[2 + k];
          else {
            const uint8_t *qs = blk + (t == K_Q4_1 ? 4 : 2);
            wv = k < 16 ? qs[k] & 15 : qs[k - 16] >> 4;
            if (t == K_Q4_0) wv -= 8;
          }
          isum += wv * xq[b * K_QBLOCK + k];
        }
        acc = fmaf(f16(blk) * j->xd[i * j->nb + b], (float)isum, acc);
        if (t == K_Q4_1) off += f16(blk + 2) * j->xs[i * j->nb + b];
      }
      j->y[i * j->w->rows + r] = acc + off;
    }
}
#endif

static bool is_quant(k_dtype_t t) { return t == K_Q4_0 || t == K_Q4_1 || t == K_Q8_0; }

typedef struct qrow_job {
  const float *x;
  mm_job_t *j;
} qrow_job_t;

static void quant_task(void *arg, int64_t i, int32_t thread) {
  const qrow_job_t *q = arg;
  mm_job_t *j = q->j;
  quant_row(q->x + i * j->w->cols, j->nb, (int8_t *)j->xq + i * j->w->cols,
            (float *)j->xd + i * j->nb, (float *)j->xs + i * j->nb,
            (int32_t *)j->xsum + i * j->nb);
}

/* ---- packed weights: sixteen rows per vector ------------------------------
 * k__cpu_pack lays a Q4_0, Q4_1 or Q8_0 matrix out in groups of 16 rows:
 * per group and 32-column block, the 16 rows' fp16 scales, then their fp16
 * minimums (Q4_1; zero for Q4_0) or int16 value sums (Q8_0), then their
 * values interleaved four bytes at a time, so that one 64-byte vector holds
 * the same four bytes of all 16 rows (Q4: the 16 nibble bytes, 320 bytes in
 * all as the 16 blocks had; Q8_0: the 32 value bytes, 576). A lane is a
 * weight row: one VNNI dot product multiplies four activation bytes
 * (broadcast) by four weights of every row, eight of them give each row's
 * exact integer block sum, and each output accumulates
 *   acc = fma(d_w·d_x, Σq·x, acc)   (Q4_0: Σq·x − 8·Σx; Q8_0: the unsigned
 *                                   (x + 128)·q, less 128·Σq)
 *   off = fma(min_w, s_x, off)      (Q4_1)
 * block by block in order, y = acc + off. Every output is computed the same
 * way whatever the batch, so batch invariance holds as on the row-major
 * path; the float order differs from it (and from llama.cpp's), so the
 * packed copy is used only in the int8 arithmetic (K_NUMERICS_INT8). */
#define PK_ROWS 16
#define PK_TI 4 /* activation rows per tile */
#define PK_AHEAD 8 /* blocks ahead that a decode row's tile prefetches */

/* Bytes of one group's block. */
static size_t pk_block(k_dtype_t t) { return t == K_Q8_0 ? 64 + 16 * K_QBLOCK : 64 + 8 * K_QBLOCK; }

size_t k__cpu_packed_bytes(const k_weight_t *w) {
#ifdef MM_PACK
  if ((w->type == K_Q4_0 || w->type == K_Q4_1 || w->type == K_Q8_0) && w->rows % PK_ROWS == 0 &&
      w->cols % K_QBLOCK == 0 && w->rows > 0)
    return (size_t)(w->rows / PK_ROWS) * (size_t)(w->cols / K_QBLOCK) * pk_block(w->type);
#endif
  return 0;
}

void k__cpu_pack(const k_weight_t *w, void *dst) {
  const k_dtype_t t = w->type;
  const int64_t nb = w->cols / K_QBLOCK;
  const size_t rb = k_row_bytes(t, w->cols), bb = block_bytes(t), pb = pk_block(t);
  const size_t qoff = t == K_Q4_1 ? 4 : 2;
  uint8_t *out = dst;
  for (int64_t g = 0; g < w->rows / PK_ROWS; g++)
    for (int64_t b = 0; b < nb; b++, out += pb)
      for (int r = 0; r < PK_ROWS; r++) {
        const uint8_t *blk = (const uint8_t *)w->data + (size_t)(g * PK_ROWS + r) * rb + (size_t)b * bb;
        memcpy(out + 2 * r, blk, 2);
        int16_t second = 0; /* Q4_0: unused */
        if (t == K_Q4_1) memcpy(&second, blk + 2, 2);
        for (int k = 0; t == K_Q8_0 && k < K_QBLOCK; k++) second = (int16_t)(second + (int8_t)blk[2 + k]);
        memcpy(out + 32 + 2 * r, &second, 2);
        for (int v = 0; v < (t == K_Q8_0 ? 8 : 4); v++)
          memcpy(out + 64 + 64 * v + 4 * r, blk + qoff + 4 * v, 4);
      }
}

#ifdef MM_PACK
static inline int32_t load_i32(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* A Q4 group block's values as bytes, w[k] holding values 4k .. 4k + 3 of
 * every row (the low nibbles are values 0-15, the high ones 16-31). */
ALWAYS_INLINE_Q void pk_q4_values(const uint8_t *blk, __m512i w[8]) {
  const __m512i m15 = _mm512_set1_epi8(15);
  _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) {
    __m512i raw = _mm512_loadu_si512(blk + 64 + 64 * v);
    w[v] = _mm512_and_si512(raw, m15);
    w[v + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15);
  }
}

/* Activation rows [i0, i0 + ni) × the 16 rows of group g. */
ALWAYS_INLINE_Q void ptile(const mm_job_t *j, const k_dtype_t t, const uint8_t *base, int64_t i0,
                           int ni, int64_t g) {
  const int64_t cols = j->w->cols, nb = j->nb;
  const size_t pb = pk_block(t);
  __m512 acc[PK_TI], off[PK_TI];
  _Pragma("GCC unroll 4") for (int i = 0; i < PK_TI; i++) acc[i] = off[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t *p = base + b * pb;
    if (j->m <= 2 * PK_TI) /* a few rows: the weights are the work, so fetch them early */
      for (size_t l = 0; l < pb; l += 64)
        _mm_prefetch((const char *)p + PK_AHEAD * pb + l, _MM_HINT_T0);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    __m256i second = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m512i w[8]; /* w[k]: values 4k .. 4k + 3 of every row */
    if (t == K_Q8_0) {
      _Pragma("GCC unroll 8") for (int v = 0; v < 8; v++) w[v] = _mm512_loadu_si512(p + 64 + 64 * v);
    } else {
      pk_q4_values(p, w);
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++) {
      const int8_t *xb = j->xq + (i0 + i) * cols + b * K_QBLOCK;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      if (t == K_Q8_0) { /* signed weights: the activations go unsigned */
        const int32_t flip = (int32_t)0x80808080u;
        _Pragma("GCC unroll 4") for (int k = 0; k < 8; k += 2) {
          s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(load_i32(xb + 4 * k) ^ flip), w[k]);
          s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(load_i32(xb + 4 * k + 4) ^ flip),
                                   w[k + 1]);
        }
      } else {
        _Pragma("GCC unroll 4") for (int k = 0; k < 8; k += 2) {
          s0 = _mm512_dpbusd_epi32(s0, w[k], _mm512_set1_epi32(load_i32(xb + 4 * k)));
          s1 = _mm512_dpbusd_epi32(s1, w[k + 1], _mm512_set1_epi32(load_i32(xb + 4 * k + 4)));
        }
      }
      __m512i isum = _mm512_add_epi32(s0, s1);
      int64_t xi = (i0 + i) * nb + b;
      if (t == K_Q4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * j->xsum[xi]));
      if (t == K_Q8_0)
        isum = _mm512_sub_epi32(isum, _mm512_slli_epi32(_mm512_cvtepi16_epi32(second), 7));
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(j->xd[xi])),
                               _mm512_cvtepi32_ps(isum), acc[i]);
      if (t == K_Q4_1)
        off[i] = _mm512_fmadd_ps(_mm512_cvtph_ps(second), _mm512_set1_ps(j->xs[xi]), off[i]);
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < ni; i++)
      _mm512_storeu_ps(j->y + (i0 + i) * j->w->rows + g * PK_ROWS, _mm512_add_ps(acc[i], off[i]));
}

ALWAYS_INLINE_Q void ptiles_from(const mm_job_t *j, const k_dtype_t t, int64_t g, int64_t i0) {
  const uint8_t *base = (const uint8_t *)j->w->packed + (size_t)g * (size_t)j->nb * pk_block(t);
  for (; i0 + PK_TI <= j->m; i0 += PK_TI) ptile(j, t, base, i0, PK_TI, g);
  if (i0 < j->m) ptile(j, t, base, i0, (int)(j->m - i0), g);
}

/* ---- AMX: sixteen activation rows at a time --------------------------------
 * On CPUs with AMX-INT8 (Sapphire Rapids and later), batches of 16 rows or
 * more run the packed layout on the tile unit: per 32-column block, one
 * tile multiply gives the exact integer block sums of 16 activation rows ×
 * the group's 16 weight rows (the packed values are already the B tile's
 * layout: Q8_0 as they are, Q4 with the nibbles spread to bytes once per
 * task), and the vector unit applies the block's scales as ptile does:
 * acc = fma(d_w·d_x, Σq·x, acc) block by block, the Q4_1 minimums in a second
 * pass, y = acc + off. The integer sums are exact either way, so the results
 * are ptile's bit for bit; the rows past the last 16 go to ptile. */
#define AMX_ROWS 16
#define AMX_TILE_BYTES 512 /* a block's weight tile: 8 rows of 64 bytes */
#define AMX_SPREAD (2 * AMX_TILE_BYTES) /* a task's spread bytes per block: two groups */

static bool g_amx; /* set once by amx_init */
static pthread_once_t g_amx_once = PTHREAD_ONCE_INIT;

static void amx_init(void) {
  const char *env = getenv("PRESSD_CPU_AMX");
  if (env && !strcmp(env, "0")) return;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1)) return;
  /* Linux grants the tile data state on request (ARCH_REQ_XCOMP_PERM, XTILEDATA) */
  g_amx = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool k__cpu_amx(void) {
  pthread_once(&g_amx_once, amx_init);
  return g_amx;
}

/* tiles 0-3: sums [16][16] int32 of (activation tile a, group h) at
 * 2a + h; 4, 5: activations [16][32] int8; 6, 7: weights [8][64] (four
 * bytes of each of 16 rows per tile row). */
__attribute__((target("amx-tile"))) static void amx_begin(void) {
  k__amx_cfg_t cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 4; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  for (int i = 4; i < 6; i++) cfg.colsb[i] = K_QBLOCK, cfg.rows[i] = 16;
  for (int i = 6; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = K_QBLOCK / 4;
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) static void amx_end(void) { _tile_release(); }

/* The accumulators acc[NA·16][NG·16] += block b's scaled sums c[2a + h]
 * (activation tile a from row i0, group h whose block starts at blk[h]). */
ALWAYS_INLINE_Q void amx_scale(const mm_job_t *j, const k_dtype_t t, const int NA, const int NG,
                               const uint8_t *const blk[2], int32_t c[4][256], int64_t i0,
                               int64_t b, float *acc) {
  _Pragma("GCC unroll 2") for (int h = 0; h < NG; h++) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk[h]));
    _Pragma("GCC unroll 2") for (int a = 0; a < NA; a++)
        _Pragma("GCC unroll 16") for (int i = 0; i < AMX_ROWS; i++) {
      const int64_t xi = (i0 + a * AMX_ROWS + i) * j->nb + b;
      __m512i isum = _mm512_load_si512(c[2 * a + h] + AMX_ROWS * i);
      if (t == K_Q4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * j->xsum[xi]));
      float *ap = acc + (a * AMX_ROWS + i) * (NG * PK_ROWS) + h * PK_ROWS;
      _mm512_store_ps(ap, _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(j->xd[xi])),
                                          _mm512_cvtepi32_ps(isum), _mm512_load_ps(ap)));
    }
  }
}

/* y for the rows of acc: acc + off, off the Q4_1 minimums' chains (sixteen
 * rows interleaved), 0 for the other types. */
ALWAYS_INLINE_Q void amx_store(const mm_job_t *j, const k_dtype_t t, const int NA, const int NG,
                               const uint8_t *const base[2], const float *acc, int64_t i0,
                               int64_t g) {
  const size_t pb = pk_block(t);
  _Pragma("GCC unroll 2") for (int h = 0; h < NG; h++)
      _Pragma("GCC unroll 2") for (int a = 0; a < NA; a++) {
    __m512 off[AMX_ROWS];
    _Pragma("GCC unroll 16") for (int i = 0; i < AMX_ROWS; i++) off[i] = _mm512_setzero_ps();
    for (int64_t b = 0; t == K_Q4_1 && b < j->nb; b++) {
      const __m512 mw =
          _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(base[h] + b * pb + 32)));
      _Pragma("GCC unroll 16") for (int i = 0; i < AMX_ROWS; i++) off[i] = _mm512_fmadd_ps(
          mw, _mm512_set1_ps(j->xs[(i0 + a * AMX_ROWS + i) * j->nb + b]), off[i]);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < AMX_ROWS; i++) {
      const int64_t r = i0 + a * AMX_ROWS + i;
      const float *ap = acc + (a * AMX_ROWS + i) * (NG * PK_ROWS) + h * PK_ROWS;
      _mm512_storeu_ps(j->y + r * j->w->rows + (g + h) * PK_ROWS,
                       _mm512_add_ps(_mm512_load_ps(ap), off[i]));
    }
  }
}

/* Activation rows [i0, i0 + 16·NA) × groups [g, g + NG) (NA, NG: 1 or 2):
 * each block's activation and weight tiles are loaded once and used twice.
 * wt[h]: group h's weight tiles, wstride apart (Q4: spread, 512 bytes;
 * Q8_0: the packed blocks). Block b multiplies while b - 1 is scaled. */
__attribute__((target("amx-tile,amx-int8"))) ALWAYS_INLINE_Q void
amx_block(const mm_job_t *j, const k_dtype_t t, const int NA, const int NG,
          const uint8_t *const base[2], const uint8_t *const wt[2], size_t wstride, int64_t i0,
          int64_t g) {
  const int64_t cols = j->w->cols, nb = j->nb;
  const size_t pb = pk_block(t);
  int32_t c[2][4][256] __attribute__((aligned(64)));
  float acc[2 * AMX_ROWS * 2 * PK_ROWS] __attribute__((aligned(64)));
  memset(acc, 0, sizeof acc);
  const int8_t *x = j->xq + i0 * cols;
#define AMX_DP(C, A, B)                                                                \
  do {                                                                                 \
    _tile_zero(C);                                                                     \
    if (t == K_Q8_0) _tile_dpbssd(C, A, B);                                            \
    else _tile_dpbsud(C, A, B);                                                        \
  } while (0)
  for (int64_t b = 0; b <= nb; b++) {
    if (b < nb) {
      _tile_loadd(4, x + b * K_QBLOCK, cols);
      if (NA == 2) _tile_loadd(5, x + AMX_ROWS * cols + b * K_QBLOCK, cols);
      _tile_loadd(6, wt[0] + (size_t)b * wstride, 64);
      if (NG == 2) _tile_loadd(7, wt[1] + (size_t)b * wstride, 64);
      AMX_DP(0, 4, 6);
      if (NG == 2) AMX_DP(1, 4, 7);
      if (NA == 2) AMX_DP(2, 5, 6);
      if (NA == 2 && NG == 2) AMX_DP(3, 5, 7);
    }
    if (b >= 1) {
      const uint8_t *blk[2] = {base[0] + (b - 1) * pb, base[NG - 1] + (b - 1) * pb};
      amx_scale(j, t, NA, NG, blk, c[(b - 1) & 1], i0, b - 1, acc);
    }
    if (b < nb) {
      int32_t(*cb)[256] = c[b & 1];
      _tile_stored(0, cb[0], 64);
      if (NG == 2) _tile_stored(1, cb[1], 64);
      if (NA == 2) _tile_stored(2, cb[2], 64);
      if (NA == 2 && NG == 2) _tile_stored(3, cb[3], 64);
    }
  }
#undef AMX_DP
  amx_store(j, t, NA, NG, base, acc, i0, g);
}

/* Groups [g, g + NG) on the tile unit, rows past the last multiple of 16 on
 * ptile; spread: the thread's AMX_SPREAD bytes per block for Q4's weight tiles. */
__attribute__((target("amx-tile,amx-int8"))) ALWAYS_INLINE_Q void
amx_groups(const mm_job_t *j, const k_dtype_t t, const int NG, int64_t g, uint8_t *spread) {
  const size_t pb = pk_block(t);
  const uint8_t *base[2], *wt[2];
  size_t wstride = pb;
  for (int h = 0; h < 2; h++) {
    base[h] = (const uint8_t *)j->w->packed + (size_t)(g + (h < NG ? h : 0)) * (size_t)j->nb * pb;
    wt[h] = base[h] + 64;
  }
  if (t != K_Q8_0) { /* nibbles to bytes: tile row k holds values 4k .. 4k + 3 */
    for (int h = 0; h < NG; h++) {
      uint8_t *sp = spread + (size_t)h * (size_t)j->nb * AMX_TILE_BYTES;
      for (int64_t b = 0; b < j->nb; b++) {
        __m512i w[8];
        pk_q4_values(base[h] + b * pb, w);
        _Pragma("GCC unroll 8") for (int v = 0; v < 8; v++)
            _mm512_store_si512(sp + b * AMX_TILE_BYTES + 64 * v, w[v]);
      }
      wt[h] = sp;
    }
    wstride = AMX_TILE_BYTES;
  }
  amx_begin();
  int64_t i0 = 0;
  for (; i0 + 2 * AMX_ROWS <= j->m; i0 += 2 * AMX_ROWS)
    amx_block(j, t, 2, NG, base, wt, wstride, i0, g);
  if (i0 + AMX_ROWS <= j->m) {
    amx_block(j, t, 1, NG, base, wt, wstride, i0, g);
    i0 += AMX_ROWS;
  }
  amx_end();
  for (int h = 0; h < NG; h++) ptiles_from(j, t, g + h, i0);
}

/* One specialisation per type and group count, compiled for AMX whatever
 * the build's flags; a task is a pair of groups (the last may be alone). */
#define AMX_OF(name, t)                                                                  \
  __attribute__((target("amx-tile,amx-int8"), noinline)) static void name(               \
      const mm_job_t *j, int64_t pair, uint8_t *spread) {                                \
    if (2 * pair + 1 < j->w->rows / PK_ROWS) amx_groups(j, t, 2, 2 * pair, spread);      \
    else amx_groups(j, t, 1, 2 * pair, spread);                                          \
  }
AMX_OF(amx_q4_1, K_Q4_1)
AMX_OF(amx_q4_0, K_Q4_0)
AMX_OF(amx_q8_0, K_Q8_0)

static void packed_task(void *arg, int64_t g, int32_t thread) {
  const mm_job_t *j = arg;
  if (j->amx_spread) {
    uint8_t *spread = j->amx_spread + (size_t)thread * (size_t)j->nb * AMX_SPREAD;
    switch (j->w->type) {
    case K_Q4_1: amx_q4_1(j, g, spread); return;
    case K_Q4_0: amx_q4_0(j, g, spread); return;
    default: amx_q8_0(j, g, spread); return;
    }
  }
  const int64_t groups = j->w->rows / PK_ROWS, g0 = g * j->task_groups;
  const int64_t g1 = g0 + j->task_groups < groups ? g0 + j->task_groups : groups;
  for (g = g0; g < g1; g++) {
    switch (j->w->type) {
    case K_Q4_1: ptiles_from(j, K_Q4_1, g, 0); break;
    case K_Q4_0: ptiles_from(j, K_Q4_0, g, 0); break;
    default: ptiles_from(j, K_Q8_0, g, 0); break;
    }
  }
}
#else
bool k__cpu_amx(void) { return false; }
#endif

static void band_task(void *arg, int64_t band_i, int32_t thread) {
  const mm_job_t *j = arg;
  const k_weight_t *w = j->w;
  int64_t r_begin = band_i * MM_BAND;
  int64_t r_end = r_begin + MM_BAND < w->rows ? r_begin + MM_BAND : w->rows;
  const uint8_t *base = (const uint8_t *)w->data + (size_t)r_begin * j->row_bytes;
  if (j->xq) {
    switch (w->type) {
    case K_Q4_1: tiles_q(j, K_Q4_1, base, r_begin, r_end); return;
    case K_Q4_0: tiles_q(j, K_Q4_0, base, r_begin, r_end); return;
    case K_Q8_0: tiles_q(j, K_Q8_0, base, r_begin, r_end); return;
    default: break;
    }
  }
  if (j->m > MM_FLY_M && w->type != K_F32) {
    float *tl_band = j->scratch + (size_t)thread * MM_BAND * (size_t)w->cols;
    for (int64_t r = 0; r < r_end - r_begin; r++)
      dequant_block_row(w->type, base + (size_t)r * j->row_bytes, tl_band + r * w->cols, j->nb);
    tiles(j, K_F32, (const uint8_t *)tl_band, (size_t)w->cols * sizeof(float), r_begin, r_end);
    return;
  }
  /* One specialisation per weight type, so unpacking is straight-line code. */
  switch (w->type) {
  case K_Q4_1: tiles(j, K_Q4_1, base, j->row_bytes, r_begin, r_end); break;
  case K_Q4_0: tiles(j, K_Q4_0, base, j->row_bytes, r_begin, r_end); break;
  case K_Q8_0: tiles(j, K_Q8_0, base, j->row_bytes, r_begin, r_end); break;
  case K_F16: tiles(j, K_F16, base, j->row_bytes, r_begin, r_end); break;
  case K_BF16: tiles(j, K_BF16, base, j->row_bytes, r_begin, r_end); break;
  case K_F32: tiles(j, K_F32, base, j->row_bytes, r_begin, r_end); break;
  default: break;
  }
}

/* Whether w's matmul over m rows runs on AMX tiles (and needs the spread
 * buffer). */
static bool amx_spread_for(bool use_packed, const k_weight_t *w, int64_t m) {
#ifdef MM_PACK
  return use_packed && w->packed && m >= AMX_ROWS && k__cpu_amx();
#else
  (void)use_packed, (void)w, (void)m;
  return false;
#endif
}

/* int8 activations [m][cols], scales and sums [m][nb] in the scratch, then
 * (where spread) the AMX spread buffer: j's xq, xd, xs, xsum, amx_spread. */
static int quantise_x(k_pool_t *pool, k__scratch_t *scratch, mm_job_t *j, bool spread) {
  const int64_t m = j->m, cols = j->w->cols;
  size_t qbytes = (size_t)m * (size_t)cols, fbytes = (size_t)m * (size_t)j->nb * sizeof(float);
  size_t head = (qbytes + 63) / 64 * 64 + (3 * fbytes + 63) / 64 * 64, spread_bytes = 0;
#ifdef MM_PACK
  if (spread) spread_bytes = (size_t)k_pool_threads(pool) * (size_t)j->nb * AMX_SPREAD;
#endif
  int rc = k__scratch_reserve(scratch, head + spread_bytes);
  if (rc) return rc;
  j->xq = scratch->p;
  j->xd = (float *)((char *)scratch->p + (qbytes + 63) / 64 * 64);
  j->xs = j->xd + m * j->nb;
  j->xsum = (const int32_t *)(j->xs + m * j->nb);
  if (spread_bytes) j->amx_spread = (uint8_t *)scratch->p + head;
  qrow_job_t q = {j->x, j};
  if (m == 1) quant_task(&q, 0, 0);
  else k_pool_run(pool, m, quant_task, &q);
  return 0;
}

typedef void (*mm_task_fn)(void *arg, int64_t i, int32_t thread);

/* The tasks of a prepared job (activations quantised where j->xq): their
 * count, and in *fn what runs one. */
static int64_t mm_tasks(k_pool_t *pool, bool use_packed, mm_job_t *j, mm_task_fn *fn) {
#ifdef MM_PACK
  if (j->xq && use_packed && j->w->packed) {
    const int64_t groups = j->w->rows / PK_ROWS;
    *fn = packed_task;
    if (j->amx_spread) return (groups + 1) / 2;
    /* some tasks per thread, not one per group: a decode row's group is a
     * fraction of a microsecond of work, less than taking a task costs */
    j->task_groups = groups / (4 * k_pool_threads(pool));
    if (j->task_groups < 1) j->task_groups = 1;
    return (groups + j->task_groups - 1) / j->task_groups;
  }
#else
  (void)pool, (void)use_packed;
#endif
  *fn = band_task;
  return (j->w->rows + MM_BAND - 1) / MM_BAND;
}

#define MM_N 4 /* matmuls one pool run serves */

/* Several prepared jobs' tasks, numbered one after the other. */
typedef struct mm_multi {
  mm_job_t j[MM_N];
  mm_task_fn fn[MM_N];
  int64_t first[MM_N + 1];
} mm_multi_t;

static void multi_task(void *arg, int64_t t, int32_t thread) {
  mm_multi_t *mm = arg;
  int i = 0;
  while (t >= mm->first[i + 1]) i++;
  mm->fn[i](&mm->j[i], t - mm->first[i], thread);
}

static mm_job_t job_of(float *y, const float *x, const k_weight_t *w, int64_t m) {
  return (mm_job_t){.y = y, .x = x, .w = w, .m = m, .nb = w->cols / K_QBLOCK,
                    .row_bytes = k_row_bytes(w->type, w->cols)};
}

int k__cpu_matmul(k_pool_t *pool, k__scratch_t *scratch, bool f32_act, bool use_packed, float *y,
                  const float *x, const k_weight_t *w, int64_t m) {
  if (m <= 0) return 0;
  if (w->cols % K_QBLOCK) return -EINVAL;
  mm_job_t j = job_of(y, x, w, m);
  if (is_quant(w->type) && !f32_act) {
    int rc = quantise_x(pool, scratch, &j, amx_spread_for(use_packed, w, m));
    if (rc) return rc;
  } else if (m > MM_FLY_M && w->type != K_F32) {
    size_t need = (size_t)k_pool_threads(pool) * MM_BAND * (size_t)w->cols * sizeof(float);
    int rc = k__scratch_reserve(scratch, need);
    if (rc) return rc;
    j.scratch = scratch->p;
  }
  mm_task_fn fn;
  int64_t tasks = mm_tasks(pool, use_packed, &j, &fn);
  k_pool_run(pool, tasks, fn, &j);
  return 0;
}

int k__cpu_matmul_n(k_pool_t *pool, k__scratch_t *scratch, bool f32_act, bool use_packed,
                    float *const *y, const float *x, const k_weight_t *const *w, int n,
                    int64_t m) {
  if (m <= 0 || n <= 0) return 0;
  bool shared = !f32_act, spread = false;
  for (int i = 0; i < n; i++) {
    if (w[i]->cols % K_QBLOCK) return -EINVAL;
    shared = shared && is_quant(w[i]->type) && w[i]->cols == w[0]->cols;
    spread = spread || amx_spread_for(use_packed, w[i], m);
  }
  if (!shared) { /* no int8 activations to share: one by one */
    for (int i = 0; i < n; i++) {
      int rc = k__cpu_matmul(pool, scratch, f32_act, use_packed, y[i], x, w[i], m);
      if (rc) return rc;
    }
    return 0;
  }
  mm_job_t q = job_of(y[0], x, w[0], m);
  int rc = quantise_x(pool, scratch, &q, spread);
  if (rc) return rc;
  /* one pool run for up to MM_N products: a pass over the threads less
   * each, and the threads share out their tasks together */
  for (int i0 = 0; i0 < n; i0 += MM_N) {
    mm_multi_t mm;
    int k = n - i0 < MM_N ? n - i0 : MM_N;
    mm.first[0] = 0;
    for (int i = 0; i < k; i++) {
      const k_weight_t *wi = w[i0 + i];
      mm.j[i] = q;
      mm.j[i].y = y[i0 + i];
      mm.j[i].w = wi;
      mm.j[i].row_bytes = k_row_bytes(wi->type, wi->cols);
      if (!amx_spread_for(use_packed, wi, m)) mm.j[i].amx_spread = NULL;
      mm.first[i + 1] = mm.first[i] + mm_tasks(pool, use_packed, &mm.j[i], &mm.fn[i]);
    }
    k_pool_run(pool, mm.first[k], multi_task, &mm);
  }
  return 0;
}
