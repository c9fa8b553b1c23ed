#include "paged/seq.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int kv_seq_init(kv_seq_t *s, int32_t n_layers, int32_t n_heads, int32_t block_size,
                int32_t max_tokens) {
  memset(s, 0, sizeof *s);
  if (n_layers <= 0 || n_heads <= 0 || block_size <= 0 || max_tokens <= 0) return -EINVAL;
  s->n_layers = n_layers;
  s->n_heads = n_heads;
  s->block_size = block_size;
  s->n_parts = 1;
  s->max_tokens = max_tokens;
  s->max_blocks = (max_tokens + block_size - 1) / block_size;
  size_t heads = (size_t)n_layers * (size_t)n_heads;
  s->blocks = malloc(heads * (size_t)s->max_blocks * sizeof *s->blocks);
  s->n_blocks = calloc(heads, sizeof *s->n_blocks);
  s->ctx = calloc(heads, sizeof *s->ctx);
  if (!s->blocks || !s->n_blocks || !s->ctx) {
    kv_seq_destroy(s, NULL);
    return -ENOMEM;
  }
  return 0;
}

void kv_seq_reset(kv_seq_t *s, kv_pool_t *pool) {
  int32_t heads = s->n_layers * s->n_heads;
  for (int32_t i = 0; i < heads; i++) {
    const int32_t *t = s->blocks + (int64_t)i * s->max_blocks;
    if (pool)
      for (int32_t b = 0; b < s->n_blocks[i]; b++) kv_pool_release(pool, t[b]);
    s->n_blocks[i] = 0;
    s->ctx[i] = 0;
  }
}

void kv_seq_destroy(kv_seq_t *s, kv_pool_t *pool) {
  if (!s) return;
  if (s->blocks && s->n_blocks && s->ctx) kv_seq_reset(s, pool);
  free(s->blocks);
  free(s->n_blocks);
  free(s->ctx);
  memset(s, 0, sizeof *s);
}

/* In 64 bits: ctx + n_new must not wrap for absurd n_new. */
static int64_t head_blocks_after(const kv_seq_t *s, int32_t i, int32_t n_new) {
  return ((int64_t)s->ctx[i] + n_new + s->block_size - 1) / s->block_size;
}

int kv_seq_set_parts(kv_seq_t *s, int32_t n_parts) {
  if (n_parts < 1 || s->n_heads % n_parts) return -EINVAL;
  s->n_parts = n_parts;
  return 0;
}

#define MAX_PARTS 64

/* need[q]: the blocks part q would give; the total, or n_parts times the
 * largest with parts. */
static int64_t needed(const kv_seq_t *s, int32_t n_new, int64_t *need) {
  const int32_t P = s->n_parts;
  for (int32_t q = 0; q < P; q++) need[q] = 0;
  for (int32_t l = 0; l < s->n_layers; l++)
    for (int32_t h = 0; h < s->n_heads; h++) {
      int32_t i = l * s->n_heads + h;
      need[kv_seq_part_of(s, h)] += head_blocks_after(s, i, n_new) - s->n_blocks[i];
    }
  int64_t most = 0;
  for (int32_t q = 0; q < P; q++) most = need[q] > most ? need[q] : most;
  return P == 1 ? need[0] : most * P;
}

int32_t kv_seq_blocks_needed(const kv_seq_t *s, int32_t n_new) {
  int64_t need[MAX_PARTS];
  if (s->n_parts > MAX_PARTS) return INT32_MAX;
  int64_t n = needed(s, n_new, need);
  return n > INT32_MAX ? INT32_MAX : (int32_t)n;
}

int32_t kv_seq_blocks_held(const kv_seq_t *s) {
  int32_t heads = s->n_layers * s->n_heads, n = 0;
  for (int32_t i = 0; i < heads; i++) n += s->n_blocks[i];
  return n;
}

int kv_seq_append(kv_seq_t *s, kv_pool_t *pool, int32_t n_new) {
  if (n_new < 0) return -EINVAL;
  int32_t heads = s->n_layers * s->n_heads;
  for (int32_t i = 0; i < heads; i++)
    if ((int64_t)s->ctx[i] + n_new > s->max_tokens) return -E2BIG;
  if (pool->n_parts != s->n_parts || s->n_parts > MAX_PARTS) return -EINVAL;
  int64_t need[MAX_PARTS];
  needed(s, n_new, need);
  for (int32_t q = 0; q < s->n_parts; q++)
    if (need[q] > kv_pool_part_free(pool, q)) return -ENOSPC;
  for (int32_t i = 0; i < heads; i++) {
    int32_t *t = s->blocks + (int64_t)i * s->max_blocks;
    int32_t want = (int32_t)head_blocks_after(s, i, n_new), q = kv_seq_part_of(s, i % s->n_heads);
    while (s->n_blocks[i] < want) t[s->n_blocks[i]++] = kv_pool_alloc_in(pool, q);
    s->ctx[i] += n_new;
  }
  return 0;
}
