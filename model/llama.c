/* The Llama forward. Reads top to bottom like the math; every buffer's
 * shape is in its comment; one backend call per op. */
#include "model/llama.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The activations, one table for their sizes (model_activation_bytes) and
 * their allocation (model_init): the buffer at act_field[i] has
 * act_sizes()[i] bytes. */
enum { N_ACT = 14 };

static void act_sizes(const model_config_t *c, int32_t cap_tokens, int32_t cap_logits,
                      size_t bytes[N_ACT]) {
  const size_t T = (size_t)cap_tokens, L = (size_t)cap_logits, E = (size_t)c->n_embd,
               F = (size_t)c->n_ff, QD = (size_t)c->n_heads * (size_t)c->head_dim,
               KD = (size_t)c->n_kv_heads * (size_t)c->head_dim, fl = sizeof(float),
               in = sizeof(int32_t);
  const size_t b[N_ACT] = {
      T * E * fl,  T * E * fl,  T * QD * fl, T * KD * fl,                 /* x xn q k */
      T * KD * fl, T * QD * fl, T * F * fl,  T * F * fl,                  /* v att gate up */
      L * (size_t)c->n_vocab * fl, (size_t)(c->head_dim / 2 + 1) * fl,    /* logits inv_freq */
      T * in,      T * in,      T * in,      L * in};                     /* tokens pos rows ids */
  memcpy(bytes, b, sizeof b);
}

/* Where buffer i's pointer lives in model_t (read and written with memcpy:
 * the fields are float * and int32_t *). */
static const size_t act_field[N_ACT] = {
    offsetof(model_t, x),        offsetof(model_t, xn),       offsetof(model_t, q),
    offsetof(model_t, k),        offsetof(model_t, v),        offsetof(model_t, att),
    offsetof(model_t, gate),     offsetof(model_t, up),       offsetof(model_t, logits),
    offsetof(model_t, inv_freq), offsetof(model_t, d_tokens), offsetof(model_t, d_pos),
    offsetof(model_t, d_rows),   offsetof(model_t, d_ids)};

static void *act_get(const model_t *m, int i) {
  void *p;
  memcpy(&p, (const char *)m + act_field[i], sizeof p);
  return p;
}

size_t model_activation_bytes(const model_config_t *c, int32_t cap_tokens, int32_t cap_logits) {
  size_t bytes[N_ACT], sum = 0;
  act_sizes(c, cap_tokens, cap_logits, bytes);
  for (int i = 0; i < N_ACT; i++) sum += bytes[i];
  return sum;
}

int model_init(model_t *m, const model_weights_t *w, k_backend_t *be, const k_kv_arena_t *kv,
               int32_t cap_tokens, int32_t cap_logits, char *err, size_t errlen) {
  memset(m, 0, sizeof *m);
  const model_config_t *c = &w->cfg;
  if (cap_tokens <= 0 || cap_logits <= 0 || cap_logits > cap_tokens) {
    snprintf(err, errlen, "model: invalid batch capacity");
    return -EINVAL;
  }
  m->w = w;
  m->be = be;
  m->kv = kv;
  m->cap_tokens = cap_tokens;
  m->cap_logits = cap_logits;
  size_t bytes[N_ACT];
  act_sizes(c, cap_tokens, cap_logits, bytes);
  for (int i = 0; i < N_ACT; i++) {
    void *p = be->ops->alloc(be, bytes[i]);
    memcpy((char *)m + act_field[i], &p, sizeof p);
    if (!p) {
      model_destroy(m);
      snprintf(err, errlen, "model: out of memory for activations (%d tokens)", cap_tokens);
      return -ENOMEM;
    }
  }
  m->h_ids = malloc((size_t)cap_tokens * sizeof(int32_t));
  m->h_pos = malloc((size_t)cap_tokens * sizeof(int32_t));
  if (!m->h_ids || !m->h_pos) {
    model_destroy(m);
    snprintf(err, errlen, "model: out of memory");
    return -ENOMEM;
  }
  static _Atomic uint32_t graph_ids;
  m->graph_id = ++graph_ids & 0xffffu;
  be->ops->upload(be, m->inv_freq, w->inv_freq, (size_t)(c->head_dim / 2 + 1) * sizeof(float));
  return 0;
}

int model_init_rank(model_t *m, const model_weights_t *w, k_backend_t *be, const k_kv_arena_t *kv,
                    k_comm_t *comm, int32_t cap_tokens, int32_t cap_logits, char *err,
                    size_t errlen) {
  int rc = model_init(m, w, be, kv, cap_tokens, cap_logits, err, errlen);
  if (rc || w->shard.n_ranks <= 1) return rc;
  if (!comm || comm->n_ranks != w->shard.n_ranks) {
    model_destroy(m);
    snprintf(err, errlen, "model: a shard of %d ranks needs a communicator of as many",
             w->shard.n_ranks);
    return -EINVAL;
  }
  m->comm = comm;
  m->h_logits = malloc((size_t)cap_logits * (size_t)w->cfg.n_vocab * sizeof(float));
  if (!m->h_logits) {
    model_destroy(m);
    snprintf(err, errlen, "model: out of memory");
    return -ENOMEM;
  }
  return 0;
}

void model_destroy(model_t *m) {
  if (!m || !m->be) return;
  if (m->graphs && m->be->ops->replay_drop) m->be->ops->replay_drop(m->be);
  free(m->h_ids);
  free(m->h_pos);
  free(m->h_logits);
  for (int i = 0; i < N_ACT; i++)
    if (act_get(m, i)) m->be->ops->free(m->be, act_get(m, i));
  memset(m, 0, sizeof *m);
}

#define TRY(call)                  \
  do {                             \
    int rc_ = (call);              \
    if (rc_) return rc_;           \
  } while (0)

/* Sum a rank's partial result over the ranks (no-op unsharded). */
static int reduce(model_t *m, float *buf, int64_t n) {
  return m->comm ? m->comm->ops->all_reduce_sum(m->comm, m->w->shard.rank, buf, n) : 0;
}

/* The batch's ids and positions into d_tokens and d_pos, rows [T, R) as
 * id 0 at position 0. A rank looks up the ids of its vocabulary slice; the
 * others get the zero row after it, and the all-reduce of the embedded
 * rows completes the lookup. */
static int upload_rows(model_t *m, const model_batch_t *b, int64_t R) {
  const k_ops_t *op = m->be->ops;
  const int64_t T = b->n_tokens;
  const int32_t *ids = b->tokens, *pos = b->pos;
  if (m->comm) {
    const int32_t v0 = m->w->shard.vocab0, nv = m->w->cfg.n_vocab;
    for (int64_t i = 0; i < T; i++)
      m->h_ids[i] = b->tokens[i] >= v0 && b->tokens[i] < v0 + nv ? b->tokens[i] - v0 : nv;
    ids = m->h_ids;
  }
  if (R > T) {
    if (ids != m->h_ids) memcpy(m->h_ids, ids, (size_t)T * sizeof *ids);
    memcpy(m->h_pos, pos, (size_t)T * sizeof *pos);
    memset(m->h_ids + T, 0, (size_t)(R - T) * sizeof *ids);
    memset(m->h_pos + T, 0, (size_t)(R - T) * sizeof *pos);
    ids = m->h_ids;
    pos = m->h_pos;
  }
  TRY(op->upload(m->be, m->d_tokens, ids, (size_t)R * sizeof(int32_t)));
  return op->upload(m->be, m->d_pos, pos, (size_t)R * sizeof(int32_t));
}

/* logits[n_logits][n_vocab_all] (host) from the rank's slice of columns. */
static int gather_logits(model_t *m, int32_t n_logits, float *logits) {
  const k_ops_t *op = m->be->ops;
  const size_t nv = (size_t)m->w->cfg.n_vocab;
  if (!m->comm) return op->download(m->be, logits, m->logits, (size_t)n_logits * nv * sizeof(float));
  TRY(op->download(m->be, m->h_logits, m->logits, (size_t)n_logits * nv * sizeof(float)));
  const size_t all = (size_t)m->w->shard.n_vocab_all, v0 = (size_t)m->w->shard.vocab0;
  for (int32_t i = 0; i < n_logits; i++)
    memcpy(logits + (size_t)i * all + v0, m->h_logits + (size_t)i * nv, nv * sizeof(float));
  return 0;
}

bool model_can_sample(const model_t *m) {
  return !m->comm && m->be->ops->sample && m->be->ops->read_rows;
}

bool model_can_penalize(const model_t *m) { return model_can_sample(m) && m->be->ops->penalize; }

bool model_can_logprobs(const model_t *m) { return model_can_sample(m) && m->be->ops->logprobs; }

/* y[i] = x · w[i]ᵀ: one call where the backend shares the work on x. */
static int matmul_n(model_t *m, float *const *y, const float *x, const k_weight_t *const *w,
                    int n, int64_t T) {
  const k_ops_t *op = m->be->ops;
  if (op->matmul_n) return op->matmul_n(m->be, y, x, w, n, T);
  for (int i = 0; i < n; i++) TRY(op->matmul(m->be, y[i], x, w[i], T));
  return 0;
}

/* Before layer l's attention: xn = norm(x); q[T][Hq*D], k,v[T][Hkv*D],
 * rotated. */
static int layer_in(model_t *m, int32_t l, int64_t T) {
  const model_config_t *c = &m->w->cfg;
  const model_layer_t *ly = &m->w->layers[l];
  const k_ops_t *op = m->be->ops;
  k_backend_t *be = m->be;
  TRY(op->rmsnorm(be, m->xn, m->x, ly->attn_norm, T, c->n_embd, c->rms_eps));
  TRY(matmul_n(m, (float *const[]){m->q, m->k, m->v}, m->xn,
                (const k_weight_t *const[]){&ly->wq, &ly->wk, &ly->wv}, 3, T));
  TRY(op->rope(be, m->q, m->d_pos, T, c->n_heads, c->head_dim, m->inv_freq));
  return op->rope(be, m->k, m->d_pos, T, c->n_kv_heads, c->head_dim, m->inv_freq);
}

/* After layer l's attention: x += att · woᵀ (summed over the ranks'
 * heads), then the MLP: x += down(silu(gate(xn)) * up(xn)). */
static int layer_out(model_t *m, int32_t l, int64_t T) {
  const model_config_t *c = &m->w->cfg;
  const model_layer_t *ly = &m->w->layers[l];
  const k_ops_t *op = m->be->ops;
  k_backend_t *be = m->be;
  const int64_t E = c->n_embd;
  TRY(op->matmul(be, m->xn, m->att, &ly->wo, T));
  TRY(reduce(m, m->xn, T * E));
  TRY(op->add(be, m->x, m->xn, T * E));
  TRY(op->rmsnorm(be, m->xn, m->x, ly->ffn_norm, T, E, c->rms_eps));
  TRY(matmul_n(m, (float *const[]){m->gate, m->up}, m->xn,
                (const k_weight_t *const[]){&ly->w_gate, &ly->w_up}, 2, T));
  TRY(op->silu_mul(be, m->gate, m->gate, m->up, T * c->n_ff));
  TRY(op->matmul(be, m->xn, m->gate, &ly->w_down, T));
  TRY(reduce(m, m->xn, T * E));
  return op->add(be, m->x, m->xn, T * E);
}

/* The work between two attentions over T rows: segment l is layer l-1's
 * output half (segment 0: the embedding lookup, x[T][E]), then layer l's
 * input half (none after the last layer). */
typedef struct segment {
  model_t *m;
  int32_t l;
  int64_t T;
} segment_t;

static int segment_run(void *ctx) {
  const segment_t *s = ctx;
  model_t *m = s->m;
  if (s->l == 0) {
    TRY(m->be->ops->embed(m->be, m->x, &m->w->tok_embd, m->d_tokens, s->T));
    TRY(reduce(m, m->x, s->T * m->w->cfg.n_embd));
  } else {
    TRY(layer_out(m, s->l - 1, s->T));
  }
  return s->l < m->w->cfg.n_layers ? layer_in(m, s->l, s->T) : 0;
}

/* Steps run their segments as graphs (model_set_graphs) over a bucket of
 * rows: 1, 2, 4, then multiples of 8 up to MODEL_GRAPH_ROWS, as
 * vLLM captures them (next_bucket). The rows past the batch's are computed
 * and unused. */
#define MODEL_GRAPH_ROWS 512

/* The bucket after r: 1, 2, 4, 8, 16, 24, ... */
static int32_t next_bucket(int32_t r) { return r < 8 ? 2 * r : r + 8; }

void model_set_graphs(model_t *m, bool on) { m->graphs = on; }

int32_t model_graph_rows(const model_t *m, const model_batch_t *b) {
  const int32_t n = b->n_tokens;
  if (!m->graphs || m->comm || n <= 0) return 0;
  int32_t r = 1;
  while (r < n) r = next_bucket(r);
  return r <= m->cap_tokens && r <= MODEL_GRAPH_ROWS ? r : 0;
}

static int segment(model_t *m, int32_t l, int64_t T, bool graph) {
  segment_t s = {m, l, T};
  if (!graph || !m->be->ops->replay) return segment_run(&s);
  const uint64_t key = (uint64_t)m->graph_id << 48 | (uint64_t)T << 20 | (uint64_t)l;
  return m->be->ops->replay(m->be, key, segment_run, &s);
}

int model_capture_graphs(model_t *m, int32_t max_rows) {
  if (!m->graphs || m->comm || !m->be->ops->replay) return 0;
  const k_ops_t *op = m->be->ops;
  const int32_t L = m->w->cfg.n_layers, T = m->cap_tokens;
  memset(m->h_ids, 0, (size_t)T * sizeof *m->h_ids);
  TRY(op->upload(m->be, m->d_tokens, m->h_ids, (size_t)T * sizeof(int32_t)));
  TRY(op->upload(m->be, m->d_pos, m->h_ids, (size_t)T * sizeof(int32_t)));
  for (int32_t l = 0; l <= L; l++) TRY(segment(m, l, T, false)); /* scratch at its largest */
  /* every bucket a step of up to max_rows tokens uses */
  for (int32_t r = 1; r <= T && r <= MODEL_GRAPH_ROWS; r = next_bucket(r)) {
    for (int pass = 0; pass < 2; pass++) /* replay: run, then capture */
      for (int32_t l = 0; l <= L; l++) TRY(segment(m, l, r, true));
    if (r >= max_rows) break;
  }
  return op->sync(m->be);
}

int model_forward(model_t *m, const model_batch_t *b, float *logits) {
  const model_weights_t *w = m->w;
  const model_config_t *c = &w->cfg;
  const k_ops_t *op = m->be->ops;
  k_backend_t *be = m->be;
  const int64_t T = b->n_tokens, E = c->n_embd, D = c->head_dim;
  const int32_t Hq = c->n_heads, Hkv = c->n_kv_heads, L = c->n_layers;
  if (T <= 0 || T > m->cap_tokens || b->n_logits > m->cap_logits || b->n_logits < 0 ||
      (b->ids && !model_can_sample(m)) || b->n_host_rows < 0 ||
      (b->pens && (!b->ids || !model_can_penalize(m) || !b->pen_ids || !b->pen_seen)) ||
      (b->lp_want && (!b->ids || !model_can_logprobs(m) || !b->lp)) ||
      (b->ids && b->n_host_rows > b->n_logits))
    return -EINVAL;
  /* R rows through the segments: the batch's, or its graph bucket */
  const int32_t graph_rows = model_graph_rows(m, b);
  const int64_t R = graph_rows > 0 ? graph_rows : T;
  TRY(upload_rows(m, b, R));

  k_attn_args_t a = {
      .n_seqs = b->n_seqs,
      .n_q_heads = Hq,
      .n_kv_heads = Hkv,
      .head_dim = (int32_t)D,
      .kv_head0 = w->shard.kv_head0,
      .kv_heads_all = w->shard.n_kv_heads_all,
      .scale = 1.0f / sqrtf((float)D),
      .q = m->q,
      .out = m->att,
      .q_start = b->q_start,
      .q_pos = m->d_pos,
      .seqs = b->seqs,
  };
  if (op->attn_prepare) TRY(op->attn_prepare(be, &a));
  for (int32_t l = 0;; l++) {
    TRY(segment(m, l, R, graph_rows > 0));
    if (l == L) break;
    /* new K/V into their paged slots, then attend over each head's blocks
     * (the batch's rows only) */
    a.layer = l;
    TRY(op->kv_write(be, m->kv, m->k, m->v, &a));
    TRY(op->attention(be, m->kv, &a));
  }
  if (b->n_logits == 0) return 0;

  /* logits[n_logits][V] = norm(x[rows]) · outputᵀ */
  TRY(op->upload(be, m->d_rows, b->logit_rows, (size_t)b->n_logits * sizeof(int32_t)));
  k_weight_t xw = {.type = K_F32, .rows = T, .cols = E, .data = m->x};
  TRY(op->embed(be, m->xn, &xw, m->d_rows, b->n_logits)); /* gather rows */
  TRY(op->rmsnorm(be, m->xn, m->xn, w->out_norm, b->n_logits, E, c->rms_eps));
  TRY(op->matmul(be, m->logits, m->xn, &w->output, b->n_logits));
  if (b->ids) {
    if (b->pens)
      TRY(op->penalize(be, m->logits, b->n_logits, c->n_vocab, b->pens, b->pen_ids, b->pen_seen));
    TRY(op->sample(be, m->d_ids, m->logits, b->n_logits, c->n_vocab, b->draws));
    if (b->lp_want)
      TRY(op->logprobs(be, b->lp, m->logits, b->n_logits, c->n_vocab, m->d_ids, b->lp_want));
    TRY(op->download(be, b->ids, m->d_ids, (size_t)b->n_logits * sizeof(int32_t)));
    if (b->n_host_rows > 0)
      TRY(op->read_rows(be, logits, m->logits, b->host_rows, b->n_host_rows,
                        (size_t)c->n_vocab * sizeof(float)));
  } else {
    TRY(gather_logits(m, b->n_logits, logits));
  }
  return op->sync(be);
}
