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

int kv_batch_init(kv_batch_t *b, int32_t n_layers, int32_t n_heads, int32_t block_size,
                  int32_t cap_seqs, int32_t cap_tokens, int32_t cap_blocks_per_head) {
  memset(b, 0, sizeof *b);
  if (n_layers <= 0 || n_heads <= 0 || cap_seqs <= 0 || cap_tokens <= 0 ||
      cap_blocks_per_head <= 0)
    return -EINVAL;
  b->n_layers = n_layers;
  b->n_heads = n_heads;
  b->block_size = block_size;
  b->cap_seqs = cap_seqs;
  b->cap_tokens = cap_tokens;
  b->cap_blocks = cap_blocks_per_head;
  size_t lh = (size_t)n_layers * (size_t)n_heads;
  b->block_tables = malloc(lh * (size_t)cap_seqs * (size_t)cap_blocks_per_head * sizeof(int32_t));
  b->ctx_lens = malloc(lh * (size_t)cap_seqs * sizeof(int32_t));
  b->slots = malloc(lh * (size_t)cap_tokens * sizeof(int32_t));
  if (!b->block_tables || !b->ctx_lens || !b->slots) {
    kv_batch_destroy(b);
    return -ENOMEM;
  }
  return 0;
}

void kv_batch_destroy(kv_batch_t *b) {
  if (!b) return;
  free(b->block_tables);
  free(b->ctx_lens);
  free(b->slots);
  memset(b, 0, sizeof *b);
}

int kv_batch_build(kv_batch_t *b, kv_seq_t *const *seqs, const int32_t *n_new, int32_t n_seqs) {
  int32_t L = b->n_layers, H = b->n_heads, n_tokens = 0, max_blocks = 1;
  if (n_seqs > b->cap_seqs) return -E2BIG;
  for (int32_t s = 0; s < n_seqs; s++) {
    if (seqs[s]->n_layers != L || seqs[s]->n_heads != H) return -EINVAL;
    n_tokens += n_new[s];
    for (int32_t i = 0; i < L * H; i++)
      if (seqs[s]->n_blocks[i] > max_blocks) max_blocks = seqs[s]->n_blocks[i];
  }
  if (n_tokens > b->cap_tokens || max_blocks > b->cap_blocks) return -E2BIG;
  b->n_seqs = n_seqs;
  b->n_tokens = n_tokens;
  b->max_blocks = max_blocks;
  for (int32_t l = 0; l < L; l++) {
    int32_t tok = 0;
    for (int32_t s = 0; s < n_seqs; s++) {
      const kv_seq_t *q = seqs[s];
      for (int32_t h = 0; h < H; h++) {
        int32_t i = l * H + h;
        int32_t *row = b->block_tables + (((int64_t)l * n_seqs + s) * H + h) * max_blocks;
        memcpy(row, kv_seq_table(q, l, h), (size_t)q->n_blocks[i] * sizeof(int32_t));
        b->ctx_lens[((int64_t)l * n_seqs + s) * H + h] = q->ctx[i];
        for (int32_t t = 0; t < n_new[s]; t++)
          b->slots[((int64_t)l * n_tokens + tok + t) * H + h] =
              kv_seq_slot(q, l, h, q->ctx[i] - n_new[s] + t);
      }
      tok += n_new[s];
    }
  }
  return 0;
}
