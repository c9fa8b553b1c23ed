/* One sequence through the model: the path `pressd generate` and the model
 * tests take. Owns a block pool sized for the request, its KV arena, the
 * sequence's block tables. The continuous-
 * batching engine uses the same pieces for many sequences. */
#ifndef PRESSD_SCHED_SINGLE_H
#define PRESSD_SCHED_SINGLE_H

#include <stdint.h>

#include "model/group.h"
#include "model/llama.h"
#include "paged/seq.h"

typedef struct sched_single {
  const model_weights_t *w; /* borrows */
  k_backend_t *be;          /* borrows */
  kv_pool_t pool;
  /* the arena (on be), or one per rank where the ranks' memories are
   * apart, each on its rank's backend holding its part of the pool */
  int32_t n_arenas;
  k_kv_arena_t arenas[64];
  k_backend_t *arena_be[64];
  kv_seq_t seq;
  model_group_t model;
  int32_t chunk;    /* tokens per forward step */
  int32_t max_len;  /* tokens the sequence may hold */
  int32_t n_past;   /* tokens already in the cache */
  int32_t *pos;     /* owns: [chunk] */
  int32_t *rows;    /* owns: [chunk] */
} sched_single_t;

/* n_blocks = 0 sizes the pool for exactly one max_len sequence. */
int sched_single_init(sched_single_t *s, const model_weights_t *w, k_backend_t *be,
                      int32_t max_len, int32_t chunk, int32_t n_blocks, char *err, size_t errlen);
/* The same over tp ranks (tp > 1): rank r with the shard tp_w[r] on
 * tp_be[r], summing through comm; w stays the whole model. Host-memory
 * ranks read the one arena of be; device ranks keep their KV heads in
 * arenas of their own. */
int sched_single_init_tp(sched_single_t *s, const model_weights_t *w, k_backend_t *be,
                         int32_t tp, const model_weights_t *tp_w, k_backend_t *const *tp_be,
                         k_comm_t *comm, int32_t max_len, int32_t chunk, int32_t n_blocks,
                         char *err, size_t errlen);
void sched_single_destroy(sched_single_t *s); /* NULL-safe */
/* Feed n tokens (split into chunks). logits receives [n][n_vocab] when
 * all_logits, else [1][n_vocab] for the last token. -E2BIG past max_len,
 * -ENOSPC when the pool is exhausted. */
int sched_single_feed(sched_single_t *s, const int32_t *tokens, int32_t n, bool all_logits,
                      float *logits);
/* Forget the sequence (blocks back to the pool). */
void sched_single_reset(sched_single_t *s);

#endif
