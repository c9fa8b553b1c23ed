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
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__F16C__)
#define MM_AVX512 1
#endif
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "kernels/cpu/cpu-internal.h"

/* GCC cannot see that the tile loops only read the ni/nr entries they wrote. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MM_BAND 16 /* weight rows per task */
#define MM_TI 4    /* activation rows per tile */
#define MM_TR 4    /* weight rows per tile */

static inline float f16(const uint8_t *p) {
  uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef __F16C__
  return _cvtsh_ss(h);
#endif
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    float f = (float)mant * (1.0f / 16777216.0f); /* 2^-24 */
    return sign ? -f : f;
  }
  bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
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
} mm_job_t;

#define MM_FLY_M 4 /* up to this many activation rows: dequantise on the fly */

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

static void band_task(void *arg, int64_t band_i, int32_t thread) {
  const mm_job_t *j = arg;
  const k_weight_t *w = j->w;
  int64_t r_begin = band_i * MM_BAND;
  int64_t r_end = r_begin + MM_BAND < w->rows ? r_begin + MM_BAND : w->rows;
  const uint8_t *base = (const uint8_t *)w->data + (size_t)r_begin * j->row_bytes;
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
  }
}

int k__cpu_matmul(k_pool_t *pool, k__scratch_t *scratch, float *y, const float *x,
                  const k_weight_t *w, int64_t m) {
  if (m <= 0) return 0;
  if (w->cols % K_QBLOCK) return -EINVAL;
  mm_job_t j = {.y = y, .x = x, .w = w, .m = m, .nb = w->cols / K_QBLOCK,
                .row_bytes = k_row_bytes(w->type, w->cols)};
  if (m > MM_FLY_M && w->type != K_F32) {
    size_t need = (size_t)k_pool_threads(pool) * MM_BAND * (size_t)w->cols * sizeof(float);
    int rc = k__scratch_reserve(scratch, need);
    if (rc) return rc;
    j.scratch = scratch->p;
  }
  k_pool_run(pool, (w->rows + MM_BAND - 1) / MM_BAND, band_task, &j);
  return 0;
}
