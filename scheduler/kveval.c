/* See kveval.h. The cache is one sequence in a pool sized for it; the
 * snapshot copies the pool's bookkeeping, the sequence's tables and the
 * whole arena. */
#include "scheduler/kveval.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/llama.h"
#include "paged/compress.h"
#include "paged/pool.h"
#include "paged/seq.h"

#define BLOCK 16

struct sched_kveval {
  const model_weights_t *w;
  k_backend_t *be;
  kv_pool_t pool;
  k_kv_arena_t arena;
  kv_seq_t seq;
  model_t model;
  kv_compress_plan_t plan;
  int32_t chunk, max_len, n_past, group;
  int32_t obs_pool; /* the server's default pooling of prefill scores */
  int32_t *pos, *rows;   /* [chunk] */
  float *logits;         /* [chunk][n_vocab] */
  float *last;           /* [n_vocab] the last logits */
  float *snap_last;      /* [n_vocab] the prefill's */
  float *obs_mass, *obs_last; /* the prefill's observations (of the window, if any) */
  /* With an observation window W the prefill scores the prompt's last W
   * queries apart: the scores and attention mass of the queries before them
   * are kept here, so that a setting without a window (the whole prompt)
   * can be evaluated from the same prefill. */
  int32_t window;
  float *score_head;     /* [n_blocks * BLOCK] arena scores before the window */
  float *mass_all;       /* [heads][slots] attention mass of the whole prompt */
  /* the snapshot */
  int32_t snap_past;
  kv_pool_t snap_pool;
  int32_t *snap_blocks, *snap_nb, *snap_ctx;
  void *snap_arena;
  size_t arena_bytes;
};

static size_t heads_of(const sched_kveval_t *ev) {
  return (size_t)ev->w->cfg.n_layers * (size_t)ev->w->cfg.n_kv_heads;
}

int sched_kveval_heads(const sched_kveval_t *ev) { return (int32_t)heads_of(ev); }

int sched_kveval_new(sched_kveval_t **out, const model_weights_t *w, k_backend_t *be,
                     int32_t max_len, int32_t chunk, char *err, size_t errlen) {
  *out = NULL;
  if (!be->host_memory) {
    snprintf(err, errlen, "eval-kv needs a host-memory backend (cpu)");
    return -ENOTSUP;
  }
  sched_kveval_t *ev = calloc(1, sizeof *ev);
  if (!ev) return -ENOMEM;
  const model_config_t *c = &w->cfg;
  ev->w = w;
  ev->be = be;
  ev->chunk = chunk;
  ev->max_len = max_len;
  ev->group = c->n_heads / c->n_kv_heads;
  sched_kv_compression_t dflt;
  sched_kv_compression_default(&dflt);
  ev->obs_pool = dflt.pool;
  int32_t per_head = (max_len + BLOCK - 1) / BLOCK;
  int32_t n_blocks = per_head * c->n_layers * c->n_kv_heads;
  size_t slots = (size_t)per_head * BLOCK, lh = heads_of(ev);
  int rc;
  kv_compress_plan_init(&ev->plan);
  if ((rc = kv_pool_init(&ev->pool, n_blocks)) ||
      (rc = kv_pool_init(&ev->snap_pool, n_blocks)) ||
      (rc = kv_arena_init(&ev->arena, be, n_blocks, BLOCK, c->head_dim)) ||
      (rc = kv_seq_init(&ev->seq, c->n_layers, c->n_kv_heads, BLOCK, max_len))) {
    snprintf(err, errlen, "cannot allocate the KV cache (%d blocks)", n_blocks);
    sched_kveval_free(ev);
    return rc;
  }
  ev->arena_bytes = (size_t)n_blocks * kv_block_bytes(be->kv_type, BLOCK, c->head_dim);
  ev->pos = malloc((size_t)chunk * sizeof *ev->pos);
  ev->rows = malloc((size_t)chunk * sizeof *ev->rows);
  ev->logits = malloc((size_t)chunk * (size_t)c->n_vocab * sizeof *ev->logits);
  ev->last = malloc((size_t)c->n_vocab * sizeof *ev->last);
  ev->snap_last = malloc((size_t)c->n_vocab * sizeof *ev->snap_last);
  ev->obs_mass = calloc(lh * slots, sizeof(float));
  ev->obs_last = calloc(lh * (size_t)ev->group * slots, sizeof(float));
  ev->score_head = calloc((size_t)n_blocks * BLOCK, sizeof(float));
  ev->mass_all = calloc(lh * slots, sizeof(float));
  ev->snap_blocks = malloc(lh * (size_t)per_head * sizeof(int32_t));
  ev->snap_nb = malloc(lh * sizeof(int32_t));
  ev->snap_ctx = malloc(lh * sizeof(int32_t));
  ev->snap_arena = malloc(ev->arena_bytes);
  if (!ev->pos || !ev->rows || !ev->logits || !ev->last || !ev->snap_last || !ev->obs_mass || !ev->obs_last ||
      !ev->score_head || !ev->mass_all ||
      !ev->snap_blocks || !ev->snap_nb || !ev->snap_ctx || !ev->snap_arena) {
    snprintf(err, errlen, "out of memory for a %d-token evaluation", max_len);
    sched_kveval_free(ev);
    return -ENOMEM;
  }
  if ((rc = model_init(&ev->model, w, be, &ev->arena, chunk, chunk, err, errlen))) {
    sched_kveval_free(ev);
    return rc;
  }
  *out = ev;
  return 0;
}

void sched_kveval_free(sched_kveval_t *ev) {
  if (!ev) return;
  model_destroy(&ev->model);
  kv_compress_plan_destroy(&ev->plan);
  kv_seq_destroy(&ev->seq, NULL);
  kv_arena_destroy(&ev->arena, ev->be);
  kv_pool_destroy(&ev->pool);
  kv_pool_destroy(&ev->snap_pool);
  free(ev->pos);
  free(ev->rows);
  free(ev->logits);
  free(ev->last);
  free(ev->snap_last);
  free(ev->obs_mass);
  free(ev->obs_last);
  free(ev->score_head);
  free(ev->mass_all);
  free(ev->snap_blocks);
  free(ev->snap_nb);
  free(ev->snap_ctx);
  free(ev->snap_arena);
  free(ev);
}

/* The arena's four arrays are one allocation in this order (kv_arena_init):
 * copy them one by one to stay independent of that. */
static void arena_copy(sched_kveval_t *ev, bool save) {
  const k_kv_arena_t *a = &ev->arena;
  size_t slots = (size_t)a->n_blocks * (size_t)a->block_size, kd = slots * (size_t)a->head_dim;
  char *p = ev->snap_arena;
  struct {
    void *arr;
    size_t bytes;
  } parts[4] = {{a->k, kd * k_dtype_bytes(a->type)},
                {a->v, kd * k_dtype_bytes(a->type)},
                {a->score, slots * sizeof(float)},
                {a->pos, slots * sizeof(int32_t)}};
  for (int i = 0; i < 4; i++) {
    if (save) memcpy(p, parts[i].arr, parts[i].bytes);
    else memcpy(parts[i].arr, p, parts[i].bytes);
    p += parts[i].bytes;
  }
}

static void snapshot(sched_kveval_t *ev, bool save) {
  size_t lh = heads_of(ev), tb = lh * (size_t)ev->seq.max_blocks * sizeof(int32_t);
  size_t vb = (size_t)ev->w->cfg.n_vocab * sizeof(float);
  if (save) memcpy(ev->snap_last, ev->last, vb);
  else memcpy(ev->last, ev->snap_last, vb);
  if (save) {
    ev->snap_past = ev->n_past;
    kv_pool_copy(&ev->snap_pool, &ev->pool);
    memcpy(ev->snap_blocks, ev->seq.blocks, tb);
    memcpy(ev->snap_nb, ev->seq.n_blocks, lh * sizeof(int32_t));
    memcpy(ev->snap_ctx, ev->seq.ctx, lh * sizeof(int32_t));
  } else {
    ev->n_past = ev->snap_past;
    kv_pool_copy(&ev->pool, &ev->snap_pool);
    memcpy(ev->seq.blocks, ev->snap_blocks, tb);
    memcpy(ev->seq.n_blocks, ev->snap_nb, lh * sizeof(int32_t));
    memcpy(ev->seq.ctx, ev->snap_ctx, lh * sizeof(int32_t));
  }
  arena_copy(ev, save);
}

/* Feed n tokens in chunks; n_obs for every chunk's view (> 0: all its rows
 * observed, with the prefill's buffers). Logits of every row into
 * ev->logits when all, else of the last row into ev->last. */
static int feed(sched_kveval_t *ev, const int32_t *ids, int32_t n, int32_t n_obs, bool all,
                double *nll, const int32_t *targets) {
  const int32_t V = ev->w->cfg.n_vocab;
  for (int32_t done = 0; done < n;) {
    int32_t m = n - done < ev->chunk ? n - done : ev->chunk;
    int rc = kv_seq_append(&ev->seq, &ev->pool, m);
    if (rc) return rc;
    for (int32_t i = 0; i < m; i++) {
      ev->pos[i] = ev->n_past + i;
      ev->rows[i] = i;
    }
    k_seq_kv_t view = kv_seq_view(&ev->seq);
    if (n_obs > 0) {
      view.n_obs = m;
      view.obs_pool = ev->obs_pool;
      view.obs_mass = ev->obs_mass;
      view.obs_last = ev->obs_last;
    } else {
      view.n_obs = n_obs;
    }
    int32_t q_start[2] = {0, m};
    bool last_chunk = done + m == n;
    model_batch_t b = {
        .n_seqs = 1,
        .n_tokens = m,
        .tokens = ids + done,
        .pos = ev->pos,
        .q_start = q_start,
        .seqs = &view,
        .n_logits = all ? m : (last_chunk ? 1 : 0),
        .logit_rows = all ? ev->rows : &ev->rows[m - 1],
    };
    if ((rc = model_forward(&ev->model, &b, all ? ev->logits : ev->last))) return rc;
    if (all && nll) /* row i predicts targets[done + i] */
      for (int32_t i = 0; i < m; i++) {
        const float *l = ev->logits + (int64_t)i * V;
        float mx = l[0];
        for (int32_t v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
        double z = 0;
        for (int32_t v = 0; v < V; v++) z += exp((double)l[v] - mx);
        *nll += log(z) + mx - l[targets[done + i]];
      }
    ev->n_past += m;
    done += m;
  }
  return 0;
}

int sched_kveval_prefill(sched_kveval_t *ev, const int32_t *ids, int32_t n, int32_t window) {
  if (n <= 0 || window < 0) return -EINVAL;
  if (n > ev->max_len) return -E2BIG;
  kv_seq_reset(&ev->seq, &ev->pool);
  ev->n_past = 0;
  const int32_t W = window < n ? window : 0;
  ev->window = W;
  size_t lh = heads_of(ev), slots = (size_t)ev->seq.max_blocks * BLOCK;
  size_t n_slots = (size_t)ev->arena.n_blocks * BLOCK;
  memset(ev->obs_mass, 0, lh * slots * sizeof(float));
  int rc = feed(ev, ids, n - W, 1, false, NULL, NULL);
  if (rc) return rc;
  if (W > 0) { /* the window's queries on their own; the rest kept aside */
    memcpy(ev->score_head, ev->arena.score, n_slots * sizeof(float));
    memcpy(ev->mass_all, ev->obs_mass, lh * slots * sizeof(float));
    memset(ev->arena.score, 0, n_slots * sizeof(float));
    memset(ev->obs_mass, 0, lh * slots * sizeof(float));
    if ((rc = feed(ev, ids + n - W, W, 1, false, NULL, NULL))) return rc;
    for (size_t i = 0; i < lh * slots; i++) ev->mass_all[i] += ev->obs_mass[i];
  }
  snapshot(ev, true);
  return 0;
}

int sched_kveval_prefill_chunked(sched_kveval_t *ev, const int32_t *ids, int32_t n,
                                 const sched_kv_compression_t *k) {
  const int32_t c = k->prefill_chunk, W = sched_kv_window(k);
  kv_compress_params_t prm = k->plan;
  if (n <= 0 || c <= 0 || prm.policy == KV_POLICY_NONE || !(prm.ratio > 1 || prm.max_cache_tokens))
    return -EINVAL;
  if (n > ev->max_len) return -E2BIG;
  /* as between the engine's chunks: the budget for all n tokens, and
   * DBudgetKV's cap in place of its stop */
  if (prm.policy == KV_POLICY_DBUDGET) prm.policy = KV_POLICY_KVCOMPRESS;
  prm.max_cache_tokens = kv_compress_budget_tokens(&prm, n, BLOCK);
  kv_seq_reset(&ev->seq, &ev->pool);
  ev->n_past = 0;
  size_t lh = heads_of(ev), slots = (size_t)ev->seq.max_blocks * BLOCK;
  float *prev = ev->mass_all; /* [lh][slots], unused by this kind of prefill */
  int rc = 0;
  for (int32_t a = 0; a < n && !rc; a += c) {
    int32_t b = a + c < n ? a + c : n;
    bool windowed = W > 0 && W < b - a; /* else the whole chunk observes */
    int32_t ws = windowed ? b - W : a;
    memset(ev->obs_mass, 0, lh * slots * sizeof(float));
    if ((rc = feed(ev, ids + a, ws - a, 0, false, NULL, NULL))) break;
    if (windowed) kv_scores_set_aside(&ev->seq, ev->arena.score, 0, prev);
    if ((rc = feed(ev, ids + ws, b - ws, 1, false, NULL, NULL))) break;
    if (windowed) kv_scores_merge_max(&ev->seq, ev->arena.score, prev);
    if (b == n) break;
    kv_compress_input_t in = {
        .seq = &ev->seq,
        .score = ev->arena.score,
        .pos = ev->arena.pos,
        .n_tokens = b,
        .last_pos = b - 1,
        .group = ev->group,
        .obs_mass = k->plan.policy == KV_POLICY_KVCOMPRESS && prm.layer_budget == KV_LAYER_ZIGZAG
                        ? ev->obs_mass
                        : NULL,
        .obs_start = W > 0 && W < b ? b - W : 0,
    };
    rc = kv_compress_run(&ev->plan, &prm, &in, ev->be, &ev->arena, &ev->seq, &ev->pool);
  }
  if (rc) return rc;
  ev->window = W > 0 && W < n ? W : 0;
  snapshot(ev, true);
  return 0;
}

/* with_obs: the prefill's observations, of the window (whole false) or of
 * the whole prompt (whole true). */
static int compress(sched_kveval_t *ev, const kv_compress_params_t *prm, bool with_obs,
                    bool whole) {
  kv_compress_input_t in = {
      .seq = &ev->seq,
      .score = ev->arena.score,
      .pos = ev->arena.pos,
      .n_tokens = ev->n_past,
      .last_pos = ev->n_past - 1,
      .group = ev->group,
      .obs_mass = !with_obs ? NULL : whole && ev->window > 0 ? ev->mass_all : ev->obs_mass,
      .obs_last = with_obs ? ev->obs_last : NULL,
      .obs_start = whole ? 0 : ev->snap_past - ev->window,
  };
  return kv_compress_run(&ev->plan, prm, &in, ev->be, &ev->arena, &ev->seq, &ev->pool);
}

int sched_kveval_compress(sched_kveval_t *ev, const sched_kv_compression_t *k, int64_t *kept,
                          int64_t *evicted) {
  const int32_t w = sched_kv_window(k);
  const bool scored = k->plan.policy == KV_POLICY_KVCOMPRESS || k->plan.policy == KV_POLICY_DBUDGET;
  const bool whole = w == 0 || w >= ev->snap_past; /* a window as long as the prompt is all of it */
  if (scored && !whole && w != ev->window) return -EINVAL; /* the prefill did not observe it */
  snapshot(ev, false);
  if (whole && ev->window > 0) /* add the scores of the queries before the window */
    for (size_t i = 0; i < (size_t)ev->arena.n_blocks * BLOCK; i++)
      ev->arena.score[i] += ev->score_head[i];
  /* every token of the context, evicted between prefill chunks or now */
  int64_t before = (int64_t)ev->snap_past * (int64_t)heads_of(ev), after = 0;
  int rc = k->plan.policy == KV_POLICY_NONE ? 0 : compress(ev, &k->plan, true, whole);
  for (size_t i = 0; i < heads_of(ev); i++) after += ev->seq.ctx[i];
  if (kept) *kept = after;
  if (evicted) *evicted = before - after;
  return rc;
}

int sched_kveval_nll(sched_kveval_t *ev, const int32_t *ids, int32_t n, double *nll_sum) {
  if (n <= 0) return -EINVAL;
  if (ev->n_past + n - 1 > ev->max_len) return -E2BIG;
  const int32_t V = ev->w->cfg.n_vocab;
  float mx = ev->last[0];
  for (int32_t v = 1; v < V; v++) mx = ev->last[v] > mx ? ev->last[v] : mx;
  double z = 0;
  for (int32_t v = 0; v < V; v++) z += exp((double)ev->last[v] - mx);
  *nll_sum = log(z) + mx - ev->last[ids[0]];
  return n > 1 ? feed(ev, ids, n - 1, 0, true, nll_sum, ids + 1) : 0;
}

static int32_t argmax(const float *l, int32_t n) {
  int32_t b = 0;
  for (int32_t i = 1; i < n; i++)
    if (l[i] > l[b]) b = i;
  return b;
}

int sched_kveval_greedy(sched_kveval_t *ev, const sched_kv_compression_t *k, int32_t n,
                        const int32_t *force, int32_t *out) {
  if (ev->n_past + n > ev->max_len) return -E2BIG;
  const int32_t V = ev->w->cfg.n_vocab;
  const bool scored = k->plan.policy == KV_POLICY_KVCOMPRESS || k->plan.policy == KV_POLICY_DBUDGET;
  /* the engine's later compressions rank by the accumulated scores; the
   * dynamic budget was decided once */
  kv_compress_params_t later = k->plan;
  if (later.policy == KV_POLICY_DBUDGET) later.policy = KV_POLICY_NONE;
  for (int32_t i = 0; i < n; i++) {
    out[i] = argmax(ev->last, V);
    if (i + 1 == n) break;
    int rc = feed(ev, force ? &force[i] : &out[i], 1, scored ? -1 : 0, false, NULL, NULL);
    if (rc) return rc;
    if (later.policy != KV_POLICY_NONE && k->interval > 0 && (i + 1) % k->interval == 0 &&
        (rc = compress(ev, &later, false, true)))
      return rc;
  }
  return 0;
}
