/* Private to kernels/cuda: the CUDA backend's state and the entry points its
 * files share. cuda.cu owns the backend (device, stream, memory, cuBLASLt,
 * element-wise ops, sampling-free ops, kv_move); attn.cu owns everything
 * that reads the paged block tables (attn_prepare, kv_write, attention);
 * nccl.cu owns the NCCL communicator. */
#ifndef PRESSD_KERNELS_CUDA_INTERNAL_H
#define PRESSD_KERNELS_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "kernels/backend.h"
}

typedef struct kc_attn kc_attn_t; /* attn.cu's state (device copies of tables, scratch) */

typedef struct kc {
  int device;
  cudaStream_t stream;
  void *blas;        /* cuda.cu: cuBLASLt handle and workspace */
  kc_attn_t *attn;   /* attn.cu: created lazily by kc_attn_prepare, freed by kc_attn_destroy */
  cudaError_t error; /* first device error seen (sticky), cudaSuccess if none */
  /* While a replay captures (cuda.cu): errors go to capture_error instead,
   * and the capture is given up, not the backend. */
  bool capturing;
  cudaError_t capture_error;
} kc_t;

static inline kc_t *kc_of(k_backend_t *be) { return (kc_t *)be->impl; }

/* Record a CUDA error (the first one sticks) and map it to -EIO. */
int kc_check(kc_t *c, cudaError_t rc);

/* attn.cu */
int kc_attn_prepare(k_backend_t *be, const k_attn_args_t *a);
int kc_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                const k_attn_args_t *a);
int kc_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a);
void kc_attn_destroy(kc_t *c); /* NULL-safe on c->attn */

/* cuda.cu: the start of every op: -EIO once an error has stuck, else makes
 * the backend's device current in the calling thread (a rank's thread may
 * not be the one that created its backend). */
int kc_enter(kc_t *c);

#endif
