/* The block pool: a fixed number of KV blocks, a free stack of block ids and
 * a reference count per block. O(1) alloc and free; never scans the pool.
 * One block = block_size token slots of one KV head of one layer.
 *
 * Under tensor parallelism each rank holds the blocks of its own KV heads
 * in its own memory: the pool is cut into n_parts equal parts, part q the
 * ids [q * part_blocks, (q + 1) * part_blocks), each with its free stack,
 * and a head's blocks come from its rank's part (kv_seq_set_parts). */
#ifndef PRESSD_PAGED_POOL_H
#define PRESSD_PAGED_POOL_H

#include <stdint.h>

#include "kernels/backend.h"

typedef struct kv_pool {
  int32_t n_blocks;
  int32_t n_free;      /* in all parts */
  int32_t n_parts;     /* 1 unless partitioned */
  int32_t part_blocks; /* n_blocks / n_parts */
  int32_t *part_free;  /* owns: [n_parts] free blocks of each part */
  int32_t *free_ids;   /* owns: part q's free stack at q * part_blocks, top at part_free[q] - 1 */
  uint16_t *refs;      /* owns: [n_blocks] */
} kv_pool_t;

int kv_pool_init(kv_pool_t *p, int32_t n_blocks);
/* n_parts parts of n_blocks / n_parts blocks (n_parts must divide n_blocks). */
int kv_pool_init_parts(kv_pool_t *p, int32_t n_blocks, int32_t n_parts);
void kv_pool_destroy(kv_pool_t *p); /* NULL-safe */
/* dst = src, both of the same size and parts (a snapshot). */
void kv_pool_copy(kv_pool_t *dst, const kv_pool_t *src);
/* A free block id of part q, or -1 when the part is empty. */
int32_t kv_pool_alloc_in(kv_pool_t *p, int32_t q);
/* A free block id of the part with the most free blocks, or -1. */
int32_t kv_pool_alloc(kv_pool_t *p);
/* Drop one reference; the block is free again at zero. */
void kv_pool_release(kv_pool_t *p, int32_t id);
static inline int32_t kv_pool_part_of(const kv_pool_t *p, int32_t id) {
  return id / p->part_blocks;
}
static inline int32_t kv_pool_part_free(const kv_pool_t *p, int32_t q) { return p->part_free[q]; }
/* Free blocks an allocation spread evenly over the parts can use: n_parts
 * times the emptiest part's (the free count of an unpartitioned pool). The
 * scheduler's admission and budgets count in these, so that what fits in
 * them fits in every part (kv_seq_blocks_needed counts alike). */
int32_t kv_pool_free_count(const kv_pool_t *p);
static inline int32_t kv_pool_used_count(const kv_pool_t *p) { return p->n_blocks - p->n_free; }
/* Free blocks kv_pool_free_count leaves out (0 without parts). */
static inline int32_t kv_pool_stranded_count(const kv_pool_t *p) {
  return p->n_free - kv_pool_free_count(p);
}
/* Permute each part's free stack (tests: scatter a sequence over the pool). */
void kv_pool_shuffle(kv_pool_t *p, uint64_t seed);
/* Internal consistency: every block is free exactly once or referenced.
 * O(n_blocks): for tests and debug builds. 0 or -EFAULT. */
int kv_pool_check(const kv_pool_t *p);

/* Bytes of backend memory one block takes (K and V of kv_type, score, position). */
size_t kv_block_bytes(k_dtype_t kv_type, int32_t block_size, int32_t head_dim);
/* Allocate the KV arena for n_blocks on the backend. */
int kv_arena_init(k_kv_arena_t *a, k_backend_t *be, int32_t n_blocks, int32_t block_size,
                  int32_t head_dim);
/* The arena of part q of a partitioned pool, on that rank's backend: it
 * holds the part's blocks, first_block = q * p->part_blocks. */
int kv_arena_init_part(k_kv_arena_t *a, k_backend_t *be, const kv_pool_t *p, int32_t q,
                       int32_t block_size, int32_t head_dim);
void kv_arena_destroy(k_kv_arena_t *a, k_backend_t *be); /* NULL-safe */

/* The pool of n_blocks in n_parts parts and the arena of each part,
 * arenas[q] on be[q] (n_parts 1: one arena holding the whole pool). On
 * failure nothing stays allocated. */
int kv_pool_arenas_init(kv_pool_t *p, k_kv_arena_t *arenas, k_backend_t *const *be,
                        int32_t n_blocks, int32_t n_parts, int32_t block_size, int32_t head_dim);
/* The arenas of kv_pool_arenas_init (on the same be[]), then the pool;
 * nothing after a failed init or on a zeroed pool. */
void kv_pool_arenas_destroy(kv_pool_t *p, k_kv_arena_t *arenas, k_backend_t *const *be);

#endif
