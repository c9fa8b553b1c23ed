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

int32_t kv_seq_blocks_needed(const kv_seq_t *s, int32_t n_new) {
  int32_t heads = s->n_layers * s->n_heads;
  int64_t need = 0;
  for (int32_t i = 0; i < heads; i++) need += head_blocks_after(s, i, n_new) - s->n_blocks[i];
  return need > INT32_MAX ? INT32_MAX : (int32_t)need;
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
  if (kv_seq_blocks_needed(s, n_new) > kv_pool_free_count(pool)) return -ENOSPC;
  for (int32_t i = 0; i < heads; i++) {
    int32_t *t = s->blocks + (int64_t)i * s->max_blocks;
    int32_t want = (int32_t)head_blocks_after(s, i, n_new);
    while (s->n_blocks[i] < want) t[s->n_blocks[i]++] = kv_pool_alloc(pool);
    s->ctx[i] += n_new;
  }
  return 0;
}
