/* When a sequence's KV cache is compressed, and what the attention kernels
 * observe for it (see engine-internal.h and ALGORITHMS.md):
 *
 *  - the chunks holding the prompt's last observation_window queries (0:
 *    the whole prompt) score the prompt's KVs (and, for the per-layer and
 *    dynamic budgets, keep the attention mass and the last query's p^2);
 *  - right after that chunk the sequence is compressed to its budget;
 *  - with fill_chunk (a prompt too long for the pool, or prefill_chunk),
 *    the same happens at the end of every fill_chunk prompt tokens: each
 *    segment's last observation_window queries score the cache, a KV keeps
 *    the highest score any one window gave it, and the budget is the whole
 *    prompt's;
 *  - on decode steps the kernels add every query's p^2 to the scores, and
 *    every `interval` decode steps the sequence is compressed again;
 *  - under memory pressure the engine compresses at once (sched__kvc_compress
 *    with min_free), past the dynamic budget if it must.
 *
 * The planner (paged/compress) picks the KVs and the moves; the backend's
 * kv_move carries K, V, score and position; kv_compress_apply gives the tail
 * blocks back. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include "kernels/cpu/pool.h"
#include "scheduler/engine-internal.h"

const double sched_kvc_bounds[SCHED_KVC_N_BOUNDS] = {0.0001, 0.0003, 0.001, 0.003, 0.01,
                                                     0.03,   0.1,    0.3,   1.0,   3.0};

void sched_kv_compression_default(sched_kv_compression_t *k) {
  kv_compress_params_default(&k->plan);
  k->plan.policy = KV_POLICY_NONE;
  k->observation_window = -1;
  k->pool = 7;
  k->interval = 32;
  k->prefill_chunk = 0;
  k->plan.per_query = false;
}

#define PAR_MAX 8

static void par_run(void *ctx, int64_t n, kv_par_fn fn, void *arg) {
  k_pool_run(ctx, n, fn, arg);
}

void sched__kvc_init(sched__kvc_t *k, int32_t n_arenas, k_backend_t *const *arena_be,
                     const k_kv_arena_t *arenas, kv_pool_t *pool, sched_stats_t *st,
                     int32_t n_layers, int32_t n_kv_heads, int32_t group, bool via_backend) {
  k_backend_t *be = arena_be[0];
  bool host = true;
  for (int32_t r = 0; r < n_arenas; r++) host &= arena_be[r]->host_memory;
  *k = (sched__kvc_t){.be = be, .n_arenas = n_arenas, .arenas = arenas, .arena_be = arena_be,
                      .pool = pool, .st = st,
                      .n_layers = n_layers, .n_kv_heads = n_kv_heads, .group = group,
                      .via_backend = via_backend || !host || n_arenas > 1};
  kv_compress_plan_init(&k->plan);
  /* Plans run between steps, on the engine's thread: the heads are ranked
   * on the CPU backend's number of threads (idle then), or, beside a
   * device, on the cores but one, 8 at most. Without a pool, on one. */
  long n = be->host_memory ? be->threads : sysconf(_SC_NPROCESSORS_ONLN) - 1;
  if (n > PAR_MAX) n = PAR_MAX;
  if (n > 1 && !k_pool_new(&k->par, (int32_t)n))
    k->plan.par = (kv_par_t){.run = par_run, .ctx = k->par, .threads = k_pool_threads(k->par)};
}

void sched__kvc_destroy(sched__kvc_t *k) {
  if (!k) return;
  kv_compress_plan_destroy(&k->plan);
  k_pool_free(k->par);
  free(k->m_score);
  free(k->m_pos);
  free(k->rows);
  free(k->stage);
  free(k->h_mass);
  free(k->h_last);
  free(k->h_rank);
}

bool sched__kvc_chunks_ok(const sched__kvc_t *k) { return !k->via_backend; }

/* Whether this engine can score and compress at all: host scores, or
 * backends that read them back. */
static bool can_compress(const sched__kvc_t *k) {
  bool ok = true;
  for (int32_t r = 0; r < k->n_arenas; r++) ok &= k->arena_be[r]->ops->read_rows != NULL;
  return !k->via_backend || ok;
}

int32_t sched_kv_window(const sched_kv_compression_t *k) {
  if (k->observation_window >= 0) return k->observation_window;
  /* DBudgetKV's norm stop, ranked by the window's scores, prunes far more
   * than ranked by the whole prompt's (73.6% against 28.3%) and keeps
   * perplexity worse (1.056x against 1.002x, bench/results
   * eval-compression); its mass stop is served best by the window's */
  return k->plan.policy == KV_POLICY_DBUDGET && !k->plan.dbudget_mass ? 0 : 32;
}

bool sched__kvc_enabled(const sched__seq_t *s) {
  return s->req && s->req->kvc.plan.policy != KV_POLICY_NONE;
}

/* Policies that rank by attention scores (the baselines do not). */
static bool wants_scores(const sched__seq_t *s) {
  kv_policy_t p = s->req->kvc.plan.policy;
  return p == KV_POLICY_KVCOMPRESS || p == KV_POLICY_DBUDGET;
}

static int grow(void **p, size_t *cap, size_t n, size_t el) {
  if (n <= *cap) return 0;
  void *q = realloc(*p, n * el);
  if (!q) return -ENOMEM;
  *p = q;
  *cap = n;
  return 0;
}

static void obs_free(sched__kvc_t *k, float ***obs) {
  for (int32_t r = 0; *obs && r < k->n_arenas; r++)
    if ((*obs)[r]) k->arena_be[r]->ops->free(k->arena_be[r], (*obs)[r]); /* backend memory */
  free(*obs);
  *obs = NULL;
}

void sched__kvc_seq_free(sched__kvc_t *k, sched__seq_t *s) {
  obs_free(k, &s->obs_mass);
  obs_free(k, &s->obs_last);
  free(s->obs_prev);
  s->obs_prev = NULL;
}

/* n floats of each rank's backend memory for the kernels' observations,
 * zeroed when they add into it, or when each rank writes its heads' rows
 * only and the host sums the ranks' buffers. 0 or -ENOMEM. */
static int obs_alloc(sched__kvc_t *k, float ***obs, size_t n, bool zero) {
  zero |= k->n_arenas > 1;
  float *z = zero ? calloc(n, sizeof *z) : NULL;
  if ((zero && !z) || !(*obs = calloc((size_t)k->n_arenas, sizeof **obs))) {
    free(z);
    return -ENOMEM;
  }
  int rc = 0;
  for (int32_t r = 0; r < k->n_arenas && !rc; r++) {
    k_backend_t *be = k->arena_be[r];
    if (!((*obs)[r] = be->ops->alloc(be, n * sizeof(float)))) rc = -ENOMEM;
    else if (zero) rc = be->ops->upload(be, (*obs)[r], z, n * sizeof *z);
  }
  free(z);
  if (rc) obs_free(k, obs);
  return rc;
}

/* The host copy of s's observations obs (nf floats on every rank) in *h:
 * the sum of the ranks' buffers, each of which holds its own heads' rows
 * and zeros. */
static int obs_download(sched__kvc_t *k, float *const *obs, size_t nf, float **h, size_t *cap) {
  int rc;
  if (grow((void **)h, cap, nf, sizeof(float))) return -ENOMEM;
  if ((rc = k->arena_be[0]->ops->download(k->arena_be[0], *h, obs[0], nf * sizeof(float))))
    return rc;
  for (int32_t r = 1; r < k->n_arenas; r++) {
    if (grow((void **)&k->h_rank, &k->cap_rank, nf, sizeof(float))) return -ENOMEM;
    if ((rc = k->arena_be[r]->ops->download(k->arena_be[r], k->h_rank, obs[r],
                                            nf * sizeof(float))))
      return rc;
    for (size_t i = 0; i < nf; i++) (*h)[i] += k->h_rank[i];
  }
  return 0;
}

/* The rows (blocks) of s's table in arena a, as indices into it: n. */
static int64_t rows_in(sched__kvc_t *k, const kv_seq_t *kv, const k_kv_arena_t *a) {
  const int32_t LH = kv->n_layers * kv->n_heads;
  int64_t n = 0;
  for (int32_t i = 0; i < LH; i++)
    for (int32_t b = 0; b < kv->n_blocks[i]; b++) {
      int32_t id = kv->blocks[(int64_t)i * kv->max_blocks + b] - a->first_block;
      if (id >= 0 && id < a->n_blocks) k->rows[n++] = id;
    }
  return n;
}

/* Rows rows[0..n) of arena a's array src (score or pos) into the mirror
 * dst, at the pool's slots. */
static int read_rows_of(sched__kvc_t *k, k_backend_t *be, const k_kv_arena_t *a, const void *src,
                        int64_t n, void *dst) {
  const size_t row = (size_t)a->block_size * sizeof(float);
  int rc = be->ops->read_rows(be, k->stage, src, k->rows, n, row);
  for (int64_t j = 0; !rc && j < n; j++)
    memcpy((char *)dst + ((size_t)k->rows[j] + (size_t)a->first_block) * row,
           k->stage + j * a->block_size, row);
  return rc;
}

/* Read s's scores and positions back into the host mirror, and its
 * observations into host copies: the planner's input (via_backend). */
static int read_back(sched__kvc_t *k, const sched__seq_t *s, kv_compress_input_t *in) {
  const kv_seq_t *kv = &s->kv;
  const int32_t LH = kv->n_layers * kv->n_heads, B = kv->block_size;
  const size_t n_slots = (size_t)k->pool->n_blocks * (size_t)B;
  /* calloc of this size maps zero pages: only the blocks read back are
   * ever touched */
  if (!k->m_score && !(k->m_score = calloc(n_slots, sizeof *k->m_score))) return -ENOMEM;
  if (!k->m_pos && !(k->m_pos = calloc(n_slots, sizeof *k->m_pos))) return -ENOMEM;
  int64_t n = 0;
  for (int32_t i = 0; i < LH; i++) n += kv->n_blocks[i];
  if (grow((void **)&k->rows, &k->cap_rows, (size_t)n, sizeof *k->rows) ||
      grow((void **)&k->stage, &k->cap_stage, (size_t)n * (size_t)B, sizeof *k->stage))
    return -ENOMEM;
  int rc = 0;
  for (int32_t r = 0; !rc && r < k->n_arenas; r++) {
    const k_kv_arena_t *a = &k->arenas[r];
    n = rows_in(k, kv, a);
    rc = read_rows_of(k, k->arena_be[r], a, a->score, n, k->m_score);
    if (!rc) rc = read_rows_of(k, k->arena_be[r], a, a->pos, n, k->m_pos);
  }
  if (rc) return rc;
  in->score = k->m_score;
  in->pos = k->m_pos;
  const size_t per_head = (size_t)kv->max_blocks * (size_t)B;
  if (s->obs_mass) {
    if ((rc = obs_download(k, s->obs_mass, (size_t)LH * per_head, &k->h_mass, &k->cap_mass)))
      return rc;
    in->obs_mass = k->h_mass;
  }
  if (s->obs_last) {
    if ((rc = obs_download(k, s->obs_last, (size_t)LH * (size_t)k->group * per_head, &k->h_last,
                           &k->cap_last)))
      return rc;
    in->obs_last = k->h_last;
  }
  return 0;
}

/* Compressed between prefill chunks, each chunk's window scores the KVs
 * in turn, and a KV keeps the most any one window gave it (paged/compress):
 * when a window starts, the scores so far are set aside. */
static int scores_set_aside(sched__kvc_t *k, sched__seq_t *s) {
  const kv_seq_t *kv = &s->kv;
  size_t n = (size_t)kv->n_layers * (size_t)kv->n_heads * (size_t)kv->max_blocks * (size_t)kv->block_size;
  if (!s->obs_prev && !(s->obs_prev = malloc(n * sizeof(float)))) return -ENOMEM;
  kv_scores_set_aside(kv, k->arenas[0].score, s->chunk, s->obs_prev); /* host, one arena */
  return 0;
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
    sched__kvc_seq_free(k, s);
  }
  if (!wants_scores(s) || !can_compress(k)) return 0;
  const sched_kv_compression_t *c = &s->req->kvc;
  if (s->prefill_compressed) {
    v->n_obs = -1; /* decode: p^2 of every step */
    return 0;
  }
  /* the last observation_window tokens (0: all of it) of the prompt, or of
   * the segment before a compression between prefill chunks, call by call */
  int32_t w = sched_kv_window(c), end = s->n_computed + s->chunk, seg = sched__seg_end(s);
  int32_t wstart = w <= 0 || w >= seg ? 0 : seg - w;
  if (end <= wstart) return 0;
  /* a window shorter than the chunk, starting in this call */
  int32_t seg_start = s->fill_chunk > 0 ? s->n_computed / s->fill_chunk * s->fill_chunk : 0;
  if (s->fill_chunk > 0 && wstart > seg_start && s->n_computed <= wstart && scores_set_aside(k, s))
    return -ENOMEM;
  v->n_obs = end - (s->n_computed > wstart ? s->n_computed : wstart);
  size_t per_head = (size_t)s->kv.max_blocks * (size_t)s->kv.block_size;
  size_t lh = (size_t)k->n_layers * (size_t)k->n_kv_heads;
  if (c->plan.layer_budget == KV_LAYER_ZIGZAG && c->plan.policy == KV_POLICY_KVCOMPRESS &&
      !s->obs_mass && obs_alloc(k, &s->obs_mass, lh * per_head, true))
    return -ENOMEM;
  if (c->plan.policy == KV_POLICY_DBUDGET && end == s->n_tokens && !s->obs_last &&
      obs_alloc(k, &s->obs_last, lh * (size_t)k->group * per_head, false))
    return -ENOMEM;
  v->obs_pool = c->pool;
  sched__kvc_view_rank(k, s, 0, v);
  return 0;
}

void sched__kvc_view_rank(const sched__kvc_t *k, const sched__seq_t *s, int32_t r,
                          k_seq_kv_t *v) {
  (void)k;
  if (v->n_obs <= 0) return; /* no window this call */
  v->obs_mass = s->obs_mass ? s->obs_mass[r] : NULL;
  v->obs_last = s->obs_last && s->n_computed + s->chunk == s->n_tokens ? s->obs_last[r] : NULL;
}

/* mid: between prefill chunks (the segment's window observed, the budget
 * of the tokens so far; DBudgetKV's cap stands in for its stop, which needs
 * the prompt's last query). */
static int32_t compress(sched__kvc_t *k, sched__seq_t *s, int32_t min_free, bool mid) {
  if (!sched__kvc_enabled(s) || !can_compress(k) || s->n_computed == 0) return 0;
  kv_compress_params_t prm = s->req->kvc.plan;
  /* The dynamic budget is decided once, from the prompt's last query; later
   * compressions (pressure) rank by the accumulated scores alone. */
  if (prm.policy == KV_POLICY_DBUDGET && !s->obs_last) {
    if (min_free <= 0 && !mid) return 0;
    prm.policy = KV_POLICY_KVCOMPRESS;
  }
  /* Between chunks the sequence keeps its budget for the whole prompt (its
   * room is reserved anyway): only the KVs the end would not keep go early. */
  if (mid) prm.max_cache_tokens = kv_compress_budget_tokens(&prm, s->n_tokens, s->kv.block_size);
  int32_t w = s->obs_window, wend = mid ? s->n_computed : s->n_prompt;
  if (s->obs_prev) kv_scores_merge_max(&s->kv, k->arenas[0].score, s->obs_prev);
  kv_compress_input_t in = {
      .seq = &s->kv,
      .score = k->arenas[0].score,
      .pos = k->arenas[0].pos,
      .n_tokens = s->n_computed,
      .last_pos = s->n_computed - 1,
      .group = k->group,
      .obs_mass = s->obs_mass ? s->obs_mass[0] : NULL, /* host: one arena */
      .obs_last = s->obs_last ? s->obs_last[0] : NULL,
      .min_free_blocks = min_free,
      .obs_start = w > 0 && w < wend ? wend - w : 0,
  };
  int64_t t0 = sched__now_ns();
  int32_t freed = 0;
  if ((!k->via_backend || !read_back(k, s, &in)) &&
      !kv_compress_run_on(&k->plan, &prm, &in, k->n_arenas, k->arena_be, k->arenas, &s->kv,
                          k->pool)) {
    freed = k->plan.blocks_freed;
    s->kv_evicted += k->plan.tokens_evicted;
    if (k->plan.pressure_overrode) k->st->kv_budget_overrides++;
  }
  /* the prefill's observations served their one plan */
  sched__kvc_seq_free(k, s);
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

int32_t sched__kvc_compress(sched__kvc_t *k, sched__seq_t *s, int32_t min_free) {
  return compress(k, s, min_free, false);
}

int64_t sched__kvc_fill_base(const kv_compress_params_t *p, int32_t n, int32_t block_size) {
  int64_t keep = kv_compress_budget_tokens(p, n, block_size);
  int64_t fixed = (int64_t)p->protected_window + p->sinks;
  return (keep > fixed ? keep : fixed) + 2 * block_size;
}

int32_t sched__kvc_fill_peak(const sched__seq_t *s, int32_t block_size) {
  int64_t peak = sched__kvc_fill_base(&s->req->kvc.plan, s->n_tokens, block_size) + s->fill_chunk;
  return peak < INT32_MAX ? (int32_t)peak : INT32_MAX;
}

void sched__kvc_after(sched__kvc_t *k, sched__seq_t *s) {
  if (!sched__kvc_enabled(s)) return;
  if (s->n_computed < s->n_tokens) { /* between prefill chunks */
    if (s->fill_chunk > 0 && s->n_computed % s->fill_chunk == 0) compress(k, s, 0, true);
    return;
  }
  if (!s->prefill_compressed) {
    s->prefill_compressed = true;
    sched__kvc_compress(k, s, 0);
    return;
  }
  int32_t interval = s->req->kvc.interval;
  if (interval > 0 && ++s->since_compress >= interval) sched__kvc_compress(k, s, 0);
}
