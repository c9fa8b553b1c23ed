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
/* Bytes of w's packed copy (k__cpu_pack), 0 where it has none: Q4_0,
 * Q4_1 and Q8_0 with rows a multiple of 16, in builds with AVX-512 VNNI. */
size_t k__cpu_packed_bytes(const k_weight_t *w);
void k__cpu_pack(const k_weight_t *w, void *dst);
/* Whether the packed matmuls run batches of 16 rows or more on AMX-INT8
 * tiles: the CPU has them, Linux grants them, PRESSD_CPU_AMX is not "0". */
bool k__cpu_amx(void);
/* One row of cols elements of type t to fp32. */
void k__cpu_dequant_row(k_dtype_t t, const void *src, float *dst, int64_t cols);

#endif
