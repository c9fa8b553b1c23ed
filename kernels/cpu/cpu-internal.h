/* Cross-file internals of the CPU backend. */
#ifndef PRESSD_KERNELS_CPU_INTERNAL_H
#define PRESSD_KERNELS_CPU_INTERNAL_H

#include <stdbool.h>

#include "kernels/backend.h"
#include "kernels/cpu/pool.h"

/* A growable scratch buffer: grows to the largest request, then stays. */
typedef struct k__scratch {
  void *p; /* owns */
  size_t cap;
} k__scratch_t;

int k__scratch_reserve(k__scratch_t *s, size_t bytes);
void k__scratch_destroy(k__scratch_t *s);

/* y[m][w.rows] = x[m][w.cols] · wᵀ for every weight type of the CPU backend.
 * Quantised weights run on int8-quantised activations unless f32_act, from
 * w->packed where use_packed and there is one. */
int k__cpu_matmul(k_pool_t *pool, k__scratch_t *scratch, bool f32_act, bool use_packed, float *y,
                  const float *x, const k_weight_t *w, int64_t m);
/* y[i] = x · w[i]ᵀ for n weights of the same cols, as n calls of
 * k__cpu_matmul would give them bit for bit; int8 activations are
 * quantised once for all n. */
int k__cpu_matmul_n(k_pool_t *pool, k__scratch_t *scratch, bool f32_act, bool use_packed,
                    float *const *y, const float *x, const k_weight_t *const *w, int n,
                    int64_t m);
/* Bytes of w's packed copy (k__cpu_pack), 0 where it has none: Q4_0,
 * Q4_1 and Q8_0 with rows a multiple of 16, in builds with AVX-512 VNNI. */
size_t k__cpu_packed_bytes(const k_weight_t *w);
void k__cpu_pack(const k_weight_t *w, void *dst);
/* Whether the packed matmuls run batches of 16 rows or more on AMX-INT8
 * tiles: the CPU has them, Linux grants them, PRESSD_CPU_AMX is not "0". */
bool k__cpu_amx(void);
/* Whether attention in the int8 arithmetic runs on AMX-BF16 tiles (scaled
 * queries, K, the exponentials and V rounded to bf16, sums in fp32): the
 * CPU has AMX-BF16 and AVX512_BF16, k__cpu_amx() holds, and
 * PRESSD_CPU_BF16 is not "0". */
bool k__cpu_bf16(void);
/* The tile configuration (LDTILECFG's 64 bytes, palette 1). */
typedef struct k__amx_cfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} k__amx_cfg_t;
/* One row of cols elements of type t to fp32. */
void k__cpu_dequant_row(k_dtype_t t, const void *src, float *dst, int64_t cols);

#endif
