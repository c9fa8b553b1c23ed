/* The block pool: a fixed number of KV blocks, a free stack of block ids and
 * a reference count per block. O(1) alloc and free; never scans the pool.
 * One block = block_size token slots of one KV head of one layer. */
#ifndef PRESSD_PAGED_POOL_H
#define PRESSD_PAGED_POOL_H

#include <stdint.h>

#include "kernels/backend.h"

typedef struct kv_pool {
  int32_t n_blocks;
  int32_t n_free;
  int32_t *free_ids; /* owns: stack, top at n_free - 1 */
  uint16_t *refs;    /* owns: [n_blocks] */
} kv_pool_t;

int kv_pool_init(kv_pool_t *p, int32_t n_blocks);
void kv_pool_destroy(kv_pool_t *p); /* NULL-safe */
/* A free block id, or -1 when the pool is empty. */
int32_t kv_pool_alloc(kv_pool_t *p);
/* Drop one reference; the block is free again at zero. */
void kv_pool_release(kv_pool_t *p, int32_t id);
static inline int32_t kv_pool_free_count(const kv_pool_t *p) { return p->n_free; }
static inline int32_t kv_pool_used_count(const kv_pool_t *p) { return p->n_blocks - p->n_free; }
/* Permute the free stack (tests: scatter a sequence over the pool). */
void kv_pool_shuffle(kv_pool_t *p, uint64_t seed);
/* Internal consistency: every block is free exactly once or referenced.
 * O(n_blocks): for tests and debug builds. 0 or -EFAULT. */
int kv_pool_check(const kv_pool_t *p);

/* Bytes of backend memory one block takes (K and V of kv_type, score, position). */
size_t kv_block_bytes(k_dtype_t kv_type, int32_t block_size, int32_t head_dim);
/* Allocate the KV arena for n_blocks on the backend. */
int kv_arena_init(k_kv_arena_t *a, k_backend_t *be, int32_t n_blocks, int32_t block_size,
                  int32_t head_dim);
void kv_arena_destroy(k_kv_arena_t *a, k_backend_t *be); /* NULL-safe */

#endif
