#include "paged/pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int kv_pool_init(kv_pool_t *p, int32_t n_blocks) {
  memset(p, 0, sizeof *p);
  if (n_blocks <= 0) return -EINVAL;
  p->free_ids = malloc((size_t)n_blocks * sizeof *p->free_ids);
  p->refs = calloc((size_t)n_blocks, sizeof *p->refs);
  if (!p->free_ids || !p->refs) {
    kv_pool_destroy(p);
    return -ENOMEM;
  }
  p->n_blocks = n_blocks;
  p->n_free = n_blocks;
  /* Lowest ids on top: a fresh sequence gets contiguous blocks. */
  for (int32_t i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i;
  return 0;
}

void kv_pool_destroy(kv_pool_t *p) {
  if (!p) return;
  free(p->free_ids);
  free(p->refs);
  memset(p, 0, sizeof *p);
}

int32_t kv_pool_alloc(kv_pool_t *p) {
  if (p->n_free == 0) return -1;
  int32_t id = p->free_ids[--p->n_free];
  p->refs[id] = 1;
  return id;
}

void kv_pool_release(kv_pool_t *p, int32_t id) {
  if (--p->refs[id] == 0) p->free_ids[p->n_free++] = id;
}

void kv_pool_shuffle(kv_pool_t *p, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int32_t i = p->n_free - 1; i > 0; i--) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    int32_t j = (int32_t)(x % (uint64_t)(i + 1));
    int32_t t = p->free_ids[i];
    p->free_ids[i] = p->free_ids[j];
    p->free_ids[j] = t;
  }
}

int kv_pool_check(const kv_pool_t *p) {
  uint8_t *seen = calloc((size_t)p->n_blocks, 1);
  if (!seen) return -ENOMEM;
  int rc = 0;
  for (int32_t i = 0; i < p->n_free && !rc; i++) {
    int32_t id = p->free_ids[i];
    if (id < 0 || id >= p->n_blocks || seen[id] || p->refs[id]) rc = -EFAULT;
    else seen[id] = 1;
  }
  for (int32_t id = 0; id < p->n_blocks && !rc; id++)
    if (!seen[id] && p->refs[id] == 0) rc = -EFAULT; /* lost block */
  free(seen);
  return rc;
}

size_t kv_block_bytes(k_dtype_t kv_type, int32_t block_size, int32_t head_dim) {
  return (size_t)block_size * (2 * (size_t)head_dim * k_dtype_bytes(kv_type) + sizeof(float) +
                               sizeof(int32_t));
}

int kv_arena_init(k_kv_arena_t *a, k_backend_t *be, int32_t n_blocks, int32_t block_size,
                  int32_t head_dim) {
  memset(a, 0, sizeof *a);
  size_t slots = (size_t)n_blocks * (size_t)block_size;
  a->n_blocks = n_blocks;
  a->block_size = block_size;
  a->head_dim = head_dim;
  a->type = be->kv_type;
  size_t el = k_dtype_bytes(be->kv_type);
  if (!el) return -EINVAL;
  a->k = be->ops->alloc(be, slots * (size_t)head_dim * el);
  a->v = be->ops->alloc(be, slots * (size_t)head_dim * el);
  a->score = be->ops->alloc(be, slots * sizeof(float));
  a->pos = be->ops->alloc(be, slots * sizeof(int32_t));
  if (!a->k || !a->v || !a->score || !a->pos) {
    kv_arena_destroy(a, be);
    return -ENOMEM;
  }
  return 0;
}

void kv_arena_destroy(k_kv_arena_t *a, k_backend_t *be) {
  if (!a || !be) return;
  if (a->k) be->ops->free(be, a->k);
  if (a->v) be->ops->free(be, a->v);
  if (a->score) be->ops->free(be, a->score);
  if (a->pos) be->ops->free(be, a->pos);
  memset(a, 0, sizeof *a);
}
