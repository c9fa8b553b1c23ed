#include "paged/pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int kv_pool_init(kv_pool_t *p, int32_t n_blocks) { return kv_pool_init_parts(p, n_blocks, 1); }

int kv_pool_init_parts(kv_pool_t *p, int32_t n_blocks, int32_t n_parts) {
  memset(p, 0, sizeof *p);
  if (n_blocks <= 0 || n_parts <= 0 || n_blocks % n_parts) return -EINVAL;
  p->free_ids = malloc((size_t)n_blocks * sizeof *p->free_ids);
  p->refs = calloc((size_t)n_blocks, sizeof *p->refs);
  p->part_free = malloc((size_t)n_parts * sizeof *p->part_free);
  if (!p->free_ids || !p->refs || !p->part_free) {
    kv_pool_destroy(p);
    return -ENOMEM;
  }
  p->n_blocks = n_blocks;
  p->n_free = n_blocks;
  p->n_parts = n_parts;
  p->part_blocks = n_blocks / n_parts;
  /* Lowest ids on top: a fresh sequence gets contiguous blocks. */
  for (int32_t q = 0; q < n_parts; q++) {
    int32_t first = q * p->part_blocks;
    p->part_free[q] = p->part_blocks;
    for (int32_t i = 0; i < p->part_blocks; i++)
      p->free_ids[first + i] = first + p->part_blocks - 1 - i;
  }
  return 0;
}

void kv_pool_destroy(kv_pool_t *p) {
  if (!p) return;
  free(p->free_ids);
  free(p->refs);
  free(p->part_free);
  memset(p, 0, sizeof *p);
}

void kv_pool_copy(kv_pool_t *dst, const kv_pool_t *src) {
  dst->n_free = src->n_free;
  memcpy(dst->part_free, src->part_free, (size_t)src->n_parts * sizeof *src->part_free);
  memcpy(dst->free_ids, src->free_ids, (size_t)src->n_blocks * sizeof *src->free_ids);
  memcpy(dst->refs, src->refs, (size_t)src->n_blocks * sizeof *src->refs);
}

int32_t kv_pool_alloc_in(kv_pool_t *p, int32_t q) {
  if (p->part_free[q] == 0) return -1;
  int32_t id = p->free_ids[q * p->part_blocks + --p->part_free[q]];
  p->n_free--;
  p->refs[id] = 1;
  return id;
}

int32_t kv_pool_alloc(kv_pool_t *p) {
  int32_t best = 0;
  for (int32_t q = 1; q < p->n_parts; q++)
    if (p->part_free[q] > p->part_free[best]) best = q;
  return kv_pool_alloc_in(p, best);
}

void kv_pool_release(kv_pool_t *p, int32_t id) {
  if (--p->refs[id]) return;
  int32_t q = kv_pool_part_of(p, id);
  p->free_ids[q * p->part_blocks + p->part_free[q]++] = id;
  p->n_free++;
}

int32_t kv_pool_free_count(const kv_pool_t *p) {
  if (p->n_parts == 1) return p->n_free;
  int32_t least = p->part_free[0];
  for (int32_t q = 1; q < p->n_parts; q++)
    if (p->part_free[q] < least) least = p->part_free[q];
  return least * p->n_parts;
}

void kv_pool_shuffle(kv_pool_t *p, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int32_t q = 0; q < p->n_parts; q++) {
    int32_t *ids = p->free_ids + q * p->part_blocks;
    for (int32_t i = p->part_free[q] - 1; i > 0; i--) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      int32_t j = (int32_t)(x % (uint64_t)(i + 1));
      int32_t t = ids[i];
      ids[i] = ids[j];
      ids[j] = t;
    }
  }
}

int kv_pool_check(const kv_pool_t *p) {
  uint8_t *seen = calloc((size_t)p->n_blocks, 1);
  if (!seen) return -ENOMEM;
  int rc = 0;
  int64_t n_free = 0;
  for (int32_t q = 0; q < p->n_parts && !rc; q++) {
    n_free += p->part_free[q];
    if (p->part_free[q] < 0 || p->part_free[q] > p->part_blocks) rc = -EFAULT;
    for (int32_t i = 0; i < p->part_free[q] && !rc; i++) {
      int32_t id = p->free_ids[q * p->part_blocks + i];
      if (id < 0 || id >= p->n_blocks || kv_pool_part_of(p, id) != q || seen[id] || p->refs[id])
        rc = -EFAULT;
      else seen[id] = 1;
    }
  }
  if (!rc && n_free != p->n_free) rc = -EFAULT;
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

int kv_arena_init_part(k_kv_arena_t *a, k_backend_t *be, const kv_pool_t *p, int32_t q,
                       int32_t block_size, int32_t head_dim) {
  if (q < 0 || q >= p->n_parts) return -EINVAL;
  int rc = kv_arena_init(a, be, p->part_blocks, block_size, head_dim);
  if (!rc) a->first_block = q * p->part_blocks;
  return rc;
}

void kv_arena_destroy(k_kv_arena_t *a, k_backend_t *be) {
  if (!a || !be) return;
  if (a->k) be->ops->free(be, a->k);
  if (a->v) be->ops->free(be, a->v);
  if (a->score) be->ops->free(be, a->score);
  if (a->pos) be->ops->free(be, a->pos);
  memset(a, 0, sizeof *a);
}

int kv_pool_arenas_init(kv_pool_t *p, k_kv_arena_t *arenas, k_backend_t *const *be,
                        int32_t n_blocks, int32_t n_parts, int32_t block_size, int32_t head_dim) {
  int rc = kv_pool_init_parts(p, n_blocks, n_parts);
  if (rc) return rc;
  for (int32_t q = 0; q < n_parts; q++) {
    if ((rc = kv_arena_init_part(&arenas[q], be[q], p, q, block_size, head_dim))) {
      while (q-- > 0) kv_arena_destroy(&arenas[q], be[q]); /* the failed one cleaned itself */
      kv_pool_destroy(p);
      return rc;
    }
  }
  return 0;
}

void kv_pool_arenas_destroy(kv_pool_t *p, k_kv_arena_t *arenas, k_backend_t *const *be) {
  for (int32_t q = 0; q < p->n_parts; q++) kv_arena_destroy(&arenas[q], be[q]);
  kv_pool_destroy(p);
}
