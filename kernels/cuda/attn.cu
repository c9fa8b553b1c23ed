// Paged attention on CUDA: the block tables of a step, the KV scatter-write
// and the attention kernels (decode and prefill) with compression scores.
#include <errno.h>

#include "kernels/cuda/cuda-internal.h"

int kc_attn_prepare(k_backend_t *be, const k_attn_args_t *a) { return -ENOSYS; }
int kc_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                const k_attn_args_t *a) {
  return -ENOSYS;
}
int kc_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  return -ENOSYS;
}
void kc_attn_destroy(kc_t *c) {}
