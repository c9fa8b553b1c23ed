#include "scheduler/single.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sched_single_init(sched_single_t *s, const model_weights_t *w, k_backend_t *be,
                      int32_t max_len, int32_t chunk, int32_t n_blocks, char *err, size_t errlen) {
  return sched_single_init_tp(s, w, be, 1, NULL, NULL, NULL, max_len, chunk, n_blocks, err,
                              errlen);
}

int sched_single_init_tp(sched_single_t *s, const model_weights_t *w, k_backend_t *be,
                         int32_t tp, const model_weights_t *tp_w, k_backend_t *const *tp_be,
                         k_comm_t *comm, int32_t max_len, int32_t chunk, int32_t n_blocks,
                         char *err, size_t errlen) {
  memset(s, 0, sizeof *s);
  const model_config_t *c = &w->cfg;
  const int32_t B = 16;
  s->w = w;
  s->be = be;
  s->chunk = chunk;
  s->max_len = max_len;
  if (tp < 1 || tp > 64 || (tp > 1 && (!tp_w || !tp_be || !comm))) {
    snprintf(err, errlen, "tensor parallelism needs shards, backends and a communicator");
    return -EINVAL;
  }
  bool per_rank = false;
  for (int32_t r = 0; tp > 1 && r < tp; r++) per_rank |= !tp_be[r]->host_memory;
  s->n_arenas = per_rank ? tp : 1;
  int32_t per_head = (max_len + B - 1) / B;
  if (n_blocks <= 0) n_blocks = per_head * c->n_layers * c->n_kv_heads;
  n_blocks = (n_blocks + s->n_arenas - 1) / s->n_arenas * s->n_arenas; /* equal parts */
  for (int32_t r = 0; r < s->n_arenas; r++) s->arena_be[r] = per_rank ? tp_be[r] : be;
  int rc = kv_pool_arenas_init(&s->pool, s->arenas, s->arena_be, n_blocks, s->n_arenas, B,
                               c->head_dim);
  if (!rc && !(rc = kv_seq_init(&s->seq, c->n_layers, c->n_kv_heads, B, max_len)))
    rc = kv_seq_set_parts(&s->seq, s->n_arenas);
  if (rc) {
    snprintf(err, errlen, "cannot allocate the KV cache (%d blocks): %s", n_blocks, strerror(-rc));
    sched_single_destroy(s);
    return rc;
  }
  s->pos = malloc((size_t)chunk * sizeof *s->pos);
  s->rows = malloc((size_t)chunk * sizeof *s->rows);
  if (!s->pos || !s->rows) {
    snprintf(err, errlen, "out of memory");
    sched_single_destroy(s);
    return -ENOMEM;
  }
  const k_kv_arena_t *kvs[64];
  for (int32_t r = 0; r < tp; r++) kvs[r] = &s->arenas[per_rank ? r : 0];
  if ((rc = model_group_init(&s->model, tp, tp > 1 ? tp_w : w, tp > 1 ? tp_be : &be, kvs, comm,
                             chunk, chunk, err, errlen))) {
    sched_single_destroy(s);
    return rc;
  }
  return 0;
}

void sched_single_destroy(sched_single_t *s) {
  if (!s) return;
  model_group_destroy(&s->model);
  free(s->pos);
  free(s->rows);
  kv_seq_destroy(&s->seq, &s->pool);
  kv_pool_arenas_destroy(&s->pool, s->arenas, s->arena_be);
  memset(s, 0, sizeof *s);
}

void sched_single_reset(sched_single_t *s) {
  kv_seq_reset(&s->seq, &s->pool);
  s->n_past = 0;
}

int sched_single_feed(sched_single_t *s, const int32_t *tokens, int32_t n, bool all_logits,
                      float *logits) {
  if (n <= 0) return -EINVAL;
  if (n > s->max_len - s->n_past) return -E2BIG;
  const int32_t V = s->w->cfg.n_vocab;
  for (int32_t done = 0; done < n;) {
    int32_t m = n - done < s->chunk ? n - done : s->chunk;
    int rc = kv_seq_append(&s->seq, &s->pool, m);
    if (rc) return rc;
    k_seq_kv_t view = kv_seq_view(&s->seq);
    for (int32_t i = 0; i < m; i++) {
      s->pos[i] = s->n_past + i;
      s->rows[i] = i;
    }
    bool last = done + m == n;
    int32_t q_start[2] = {0, m};
    model_batch_t b = {
        .n_seqs = 1,
        .n_tokens = m,
        .tokens = tokens + done,
        .pos = s->pos,
        .q_start = q_start,
        .seqs = &view,
        .n_logits = all_logits ? m : (last ? 1 : 0),
        .logit_rows = all_logits ? s->rows : &s->rows[m - 1],
    };
    float *out = all_logits ? logits + (int64_t)done * V : logits;
    if ((rc = model_group_forward(&s->model, &b, out))) return rc;
    s->n_past += m;
    done += m;
  }
  return 0;
}
