/* Per-sequence KV bookkeeping: for every (layer, KV head) a block list and a
 * context length. Heads of one sequence may hold different lengths (after
 * compression); each slot's token position lives in the arena.
 *
 * The kernels read the tables and lengths where they are (no per-step
 * copy), so a forward step costs O(sequences) to set up. */
#ifndef PRESSD_PAGED_SEQ_H
#define PRESSD_PAGED_SEQ_H

#include <stdint.h>

#include "kernels/backend.h"
#include "paged/pool.h"

typedef struct kv_seq {
  int32_t n_layers, n_heads, block_size;
  int32_t max_tokens; /* slots a head may hold */
  int32_t max_blocks; /* per head: ceil(max_tokens / block_size) */
  int32_t n_parts;    /* the pool parts its heads draw from (1: the whole pool) */
  int32_t *blocks;    /* owns: [n_layers][n_heads][max_blocks] */
  int32_t *n_blocks;  /* owns: [n_layers][n_heads] */
  int32_t *ctx;       /* owns: [n_layers][n_heads] slots in use */
} kv_seq_t;

int kv_seq_init(kv_seq_t *s, int32_t n_layers, int32_t n_heads, int32_t block_size,
                int32_t max_tokens);
/* Returns every block to the pool, then frees the bookkeeping. NULL-safe. */
void kv_seq_destroy(kv_seq_t *s, kv_pool_t *pool);
/* Give back all blocks and reset to empty (sequence is kept for reuse). */
void kv_seq_reset(kv_seq_t *s, kv_pool_t *pool);

/* Under tensor parallelism: the heads split into n_parts equal runs (the
 * ranks' KV heads, n_parts dividing n_heads), run q drawing its blocks from
 * pool part q (the pool must have n_parts parts). 0 or -EINVAL. */
int kv_seq_set_parts(kv_seq_t *s, int32_t n_parts);
static inline int32_t kv_seq_part_of(const kv_seq_t *s, int32_t h) {
  return h / (s->n_heads / s->n_parts);
}

/* Blocks that appending n_new tokens to every head would take from the
 * pool; with parts, n_parts times the most any part would take (the units
 * of kv_pool_free_count). */
int32_t kv_seq_blocks_needed(const kv_seq_t *s, int32_t n_new);
/* Append n_new slots to every head, taking blocks from the pool: all or
 * nothing. -ENOSPC when the pool (or a head's part of it) lacks blocks,
 * -E2BIG past max_tokens. */
int kv_seq_append(kv_seq_t *s, kv_pool_t *pool, int32_t n_new);
/* Blocks held in all. */
int32_t kv_seq_blocks_held(const kv_seq_t *s);

static inline int32_t kv_seq_ctx(const kv_seq_t *s, int32_t l, int32_t h) {
  return s->ctx[l * s->n_heads + h];
}
static inline const int32_t *kv_seq_table(const kv_seq_t *s, int32_t l, int32_t h) {
  return s->blocks + ((int64_t)l * s->n_heads + h) * s->max_blocks;
}
/* Arena slot (block * block_size + offset) of logical slot i of head (l, h). */
static inline int32_t kv_seq_slot(const kv_seq_t *s, int32_t l, int32_t h, int32_t i) {
  return kv_seq_table(s, l, h)[i / s->block_size] * s->block_size + i % s->block_size;
}

/* The sequence as the kernels read it in place (no scores asked). */
static inline k_seq_kv_t kv_seq_view(const kv_seq_t *s) {
  return (k_seq_kv_t){.blocks = s->blocks, .ctx = s->ctx, .stride = s->max_blocks};
}

#endif
