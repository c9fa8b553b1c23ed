/* When a sequence's KV cache is compressed, and what the attention kernels
 * observe for it (see engine-internal.h and ALGORITHMS.md):
 *
 *  - the chunks holding the prompt's last observation_window queries (0:
 *    the whole prompt) score the prompt's KVs (and, for the per-layer and
 *    dynamic budgets, keep the attention mass and the last query's p^2);
 *  - right after that chunk the sequence is compressed to its budget;
 *  - on decode steps the kernels add every query's p^2 to the scores, and
 *    every `interval` decode steps the sequence is compressed again;
 *  - under memory pressure the engine compresses at once (sched__kvc_compress
 *    with min_free), past the dynamic budget if it must.
 *
 * The planner (paged/compress) picks the KVs and the moves; the backend's
 * kv_move carries K, V, score and position; kv_compress_apply gives the tail
 * blocks back. */
#include <errno.h>
#include <stdlib.h>

#include "scheduler/engine-internal.h"

const double sched_kvc_bounds[SCHED_KVC_N_BOUNDS] = {0.0001, 0.0003, 0.001, 0.003, 0.01,
                                                     0.03,   0.1,    0.3,   1.0,   3.0};

void sched_kv_compression_default(sched_kv_compression_t *k) {
  kv_compress_params_default(&k->plan);
  k->plan.policy = KV_POLICY_NONE;
  k->observation_window = 32;
  k->pool = 7;
  k->interval = 32;
  k->plan.per_query = false;
}

void sched__kvc_init(sched__kvc_t *k, k_backend_t *be, const k_kv_arena_t *arena, kv_pool_t *pool,
                     sched_stats_t *st, int32_t n_layers, int32_t n_kv_heads, int32_t group) {
  *k = (sched__kvc_t){be, arena, pool, st, n_layers, n_kv_heads, group, {0}};
  kv_compress_plan_init(&k->plan);
}

void sched__kvc_destroy(sched__kvc_t *k) {
  if (k) kv_compress_plan_destroy(&k->plan);
}

bool sched__kvc_enabled(const sched__seq_t *s) {
  return s->req && s->req->kvc.plan.policy != KV_POLICY_NONE;
}

/* Policies that rank by attention scores (the baselines do not). */
static bool wants_scores(const sched__seq_t *s) {
  kv_policy_t p = s->req->kvc.plan.policy;
  return p == KV_POLICY_KVCOMPRESS || p == KV_POLICY_DBUDGET;
}

void sched__kvc_seq_free(sched__seq_t *s) {
  free(s->obs_mass);
  free(s->obs_last);
  s->obs_mass = s->obs_last = NULL;
}

int64_t sched__kvc_held(const sched__seq_t *s) {
  int64_t n = 0;
  for (int32_t i = 0; i < s->kv.n_layers * s->kv.n_heads; i++) n += s->kv.ctx[i];
  return n;
}

int sched__kvc_view(sched__kvc_t *k, sched__seq_t *s, k_seq_kv_t *v) {
  *v = kv_seq_view(&s->kv);
  if (!sched__kvc_enabled(s)) return 0;
  if (s->n_computed == 0) { /* (re)computing from the start */
    s->prefill_compressed = false;
    sched__kvc_seq_free(s);
  }
  if (!wants_scores(s) || !k->be->host_memory) return 0;
  const sched_kv_compression_t *c = &s->req->kvc;
  if (s->prefill_compressed) {
    v->n_obs = -1; /* decode: p^2 of every step */
    return 0;
  }
  /* the prompt's last observation_window tokens (0: all of it), chunk by chunk */
  int32_t w = c->observation_window, end = s->n_computed + s->chunk;
  int32_t wstart = w <= 0 || w >= s->n_tokens ? 0 : s->n_tokens - w;
  if (end <= wstart) return 0;
  v->n_obs = end - (s->n_computed > wstart ? s->n_computed : wstart);
  size_t per_head = (size_t)s->kv.max_blocks * (size_t)s->kv.block_size;
  size_t lh = (size_t)k->n_layers * (size_t)k->n_kv_heads;
  if (c->plan.layer_budget == KV_LAYER_ZIGZAG && c->plan.policy == KV_POLICY_KVCOMPRESS &&
      !s->obs_mass && !(s->obs_mass = calloc(lh * per_head, sizeof(float))))
    return -ENOMEM;
  if (c->plan.policy == KV_POLICY_DBUDGET && end == s->n_tokens && !s->obs_last &&
      !(s->obs_last = malloc(lh * (size_t)k->group * per_head * sizeof(float))))
    return -ENOMEM;
  v->obs_pool = c->pool;
  v->obs_mass = s->obs_mass;
  v->obs_last = end == s->n_tokens ? s->obs_last : NULL;
  return 0;
}

int32_t sched__kvc_compress(sched__kvc_t *k, sched__seq_t *s, int32_t min_free) {
  if (!sched__kvc_enabled(s) || !k->be->host_memory || s->n_computed == 0) return 0;
  kv_compress_params_t prm = s->req->kvc.plan;
  /* The dynamic budget is decided once, from the prompt's last query; later
   * compressions (pressure) rank by the accumulated scores alone. */
  if (prm.policy == KV_POLICY_DBUDGET && !s->obs_last) {
    if (min_free <= 0) return 0;
    prm.policy = KV_POLICY_KVCOMPRESS;
  }
  kv_compress_input_t in = {
      .seq = &s->kv,
      .score = k->arena->score,
      .pos = k->arena->pos,
      .n_tokens = s->n_computed,
      .last_pos = s->n_computed - 1,
      .group = k->group,
      .obs_mass = s->obs_mass,
      .obs_last = s->obs_last,
      .min_free_blocks = min_free,
      .obs_start = s->obs_window > 0 && s->obs_window < s->n_prompt ? s->n_prompt - s->obs_window : 0,
  };
  int64_t t0 = sched__now_ns();
  int32_t freed = 0;
  if (!kv_compress_run(&k->plan, &prm, &in, k->be, k->arena, &s->kv, k->pool)) {
    freed = k->plan.blocks_freed;
    s->kv_evicted += k->plan.tokens_evicted;
    if (k->plan.pressure_overrode) k->st->kv_budget_overrides++;
  }
  /* the prefill's observations served their one plan */
  sched__kvc_seq_free(s);
  s->since_compress = 0;
  double dt = (double)(sched__now_ns() - t0) * 1e-9;
  int b = 0;
  while (b < SCHED_KVC_N_BOUNDS && dt > sched_kvc_bounds[b]) b++;
  k->st->kv_compress_hist[b]++;
  k->st->kv_compress_seconds += dt;
  k->st->kv_compressions++;
  k->st->kv_blocks_freed += (uint64_t)freed;
  if (min_free > 0) k->st->kv_forced_compressions++;
  return freed;
}

void sched__kvc_after(sched__kvc_t *k, sched__seq_t *s) {
  if (!sched__kvc_enabled(s) || s->n_computed != s->n_tokens) return;
  if (!s->prefill_compressed) {
    s->prefill_compressed = true;
    sched__kvc_compress(k, s, 0);
    return;
  }
  int32_t interval = s->req->kvc.interval;
  if (interval > 0 && ++s->since_compress >= interval) sched__kvc_compress(k, s, 0);
}
