/* The engine thread: drains the inbox, picks a batch (batch.c), runs one
 * forward pass over it, samples, detokenises, applies the stop rules and
 * posts events. See engine.h for the contract, DESIGN.md §2 for the flow.
 *
 * Threads: the engine thread owns the sequences, the block pool and the
 * backend. The caller's threads touch only the inbox, the abort list, the
 * outbox and the published stats, all under one mutex. Per-step buffers are
 * sized at sched_engine_new from max_num_seqs and max_num_batched_tokens;
 * per-request memory is allocated at submit (token ids, block tables, held
 * text) and at first admission (the sampler). */
#include "scheduler/engine.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/group.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "paged/pool.h"
#include "paged/seq.h"
#include "scheduler/engine-internal.h"

#define BLOCK_SIZE 16
/* The smallest KV pool with kv_below_max_len, in tokens per head. */
#define MIN_POOL_TOKENS 1024
#define DETOK_CAP 512 /* >= 256, as model_detok_push asks, plus a flush */
#define HELD_SLACK (2 * DETOK_CAP)
#define MAX_HASH_BUCKETS (1u << 20)
#define MAX_RANKS 64

/* The text of events that carry none; sched_event_clear never frees it. */
static char empty_text[1];

struct sched_engine {
  sched_engine_config_t cfg;
  const model_weights_t *w; /* borrows */
  k_backend_t *be;          /* borrows */
  const model_tok_t *tok;   /* borrows */
  int32_t n_layers, n_kv_heads, n_vocab;

  /* engine thread only */
  kv_pool_t pool;
  /* The KV arena, or with per-rank arenas one per tensor-parallel rank,
   * each on its rank's backend holding its part of the pool. */
  int32_t n_arenas;
  k_kv_arena_t arenas[MAX_RANKS];
  k_backend_t *arena_be[MAX_RANKS];
  model_group_t model; /* one rank, or the tensor-parallel ranks */
  sched__sched_t sc;
  sched__kvc_t kvc;
  int32_t n_kvc_live; /* live sequences that compress */
  int32_t *tokens;   /* owns: [max_num_batched_tokens] */
  int32_t *pos;      /* owns: [max_num_batched_tokens] */
  int32_t *q_start;  /* owns: [max_num_seqs + 1] */
  int32_t *rows;     /* owns: [max_num_seqs] logit rows */
  int32_t *ids;      /* owns: [max_num_seqs] the rows' tokens, drawn by the backend */
  k_draw_t *draws;   /* owns: [max_num_seqs] how the backend draws them */
  int32_t *host_rows; /* owns: [max_num_seqs] rows the host samples (their logits come back) */
  bool penalize;      /* the backend applies penalties before drawing */
  bool logprobs;      /* the backend works out log-probabilities */
  int32_t *lp_want;   /* owns: [max_num_seqs] the rows' top counts asked (-1: none) */
  k_logprobs_t *lp;   /* owns: [max_num_seqs] the backend's log-probabilities */
  /* with an arena per rank: each rank's views ([0]: views), which differ in
   * the observation buffers they point the kernels to */
  k_seq_kv_t **rank_views; /* owns: [n_arenas], [r > 0]: [max_num_seqs] */
  k_penalty_t *pens;  /* owns: [max_num_seqs] the rows' penalties */
  int32_t *pen_ids, *pen_seen; /* owns: [cap_pen] their packed entries */
  int64_t cap_pen;
  k_seq_kv_t *views; /* owns: [max_num_seqs] the batch's KV as the kernels read it */
  float *logits;     /* owns: [max_num_seqs][n_vocab] */
  float *lp_row;     /* owns: [n_vocab] raw logits of a row, for logprobs */
  char detok[DETOK_CAP];
  sched_event_t *stage; /* owns: [max_num_seqs] events of this step */
  size_t n_stage;
  bool posted;          /* events went out since the last notify */
  sched__seq_t **ht;    /* owns (the array): live requests by id */
  size_t ht_mask;
  sched_stats_t st;     /* counters */

  /* shared, under mu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool mu_ok, cv_ok;
  sched__seq_t *in_head, *in_tail; /* inbox, linked by ->next */
  int32_t n_inbox;
  int32_t n_waiting;      /* the engine's waiting queue, as last published */
  uint64_t *aborts;       /* owns: [cap_aborts] ids to abort */
  size_t n_aborts, cap_aborts;
  uint64_t *aborts_eng;   /* owns: the engine's copy, swapped with aborts */
  size_t cap_aborts_eng;
  sched_event_t *out;     /* owns: ring [out_cap] */
  size_t out_head, out_n, out_cap;
  sched_stats_t pub;
  int64_t step_start_ns; /* atomic: monotonic start of the running step, 0 between steps */
  bool thread_done;      /* atomic: engine_main returned */
  bool step_failed;      /* engine thread: the last step's forward failed */
  bool stopping;
  bool started;
  pthread_t thread;
};

/* ---- requests and events ------------------------------------------------- */

sched_request_t *sched_request_new(void) {
  sched_request_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->logprobs = -1;
  sched_sample_params_default(&r->sample);
  sched_kv_compression_default(&r->kvc);
  return r;
}

void sched_request_free(sched_request_t *r) {
  if (!r) return;
  free(r->prompt);
  if (r->stop)
    for (int32_t i = 0; i < r->n_stop; i++) free(r->stop[i]);
  free(r->stop);
  free(r);
}

void sched_event_clear(sched_event_t *ev) {
  if (!ev) return;
  if (ev->text && ev->text != empty_text) free(ev->text);
  ev->text = NULL;
  ev->text_len = 0;
}

int64_t sched__now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- sequences ------------------------------------------------------------ */

static void seq_free(sched_engine_t *e, sched__seq_t *s, bool free_request) {
  if (!s) return;
  if (s->kv_evicted > 0) {
    int64_t held = sched__kvc_held(s);
    e->st.kv_kept_fraction_sum += (double)held / (double)(held + s->kv_evicted);
    e->st.kv_compressed_requests++;
  }
  sched__kvc_seq_free(&e->kvc, s);
  if (s->kvc_counted) e->n_kvc_live--;
  kv_seq_destroy(&s->kv, &e->pool);
  sched_sampler_destroy(&s->smp);
  sched__text_destroy(&s->held);
  free(s->tokens);
  if (free_request) sched_request_free(s->req);
  free(s);
}

static int seq_new(sched_engine_t *e, sched_request_t *r, sched__seq_t **out) {
  sched__seq_t *s = calloc(1, sizeof *s);
  if (!s) return -ENOMEM;
  int64_t cap = (int64_t)r->n_prompt + r->max_tokens;
  if (cap > e->cfg.max_model_len) cap = e->cfg.max_model_len;
  s->req = r;
  s->run_idx = -1;
  s->cap = (int32_t)cap;
  s->n_prompt = s->n_tokens = r->n_prompt;
  size_t max_stop = 0;
  for (int32_t i = 0; i < r->n_stop; i++) {
    size_t l = strlen(r->stop[i]);
    if (l > max_stop) max_stop = l;
  }
  model_detok_init(&s->dt);
  s->tokens = malloc((size_t)cap * sizeof *s->tokens);
  if (!s->tokens || kv_seq_init(&s->kv, e->n_layers, e->n_kv_heads, BLOCK_SIZE, s->cap) ||
      kv_seq_set_parts(&s->kv, e->pool.n_parts) ||
      sched__text_init(&s->held, max_stop + HELD_SLACK)) {
    seq_free(e, s, false);
    return -ENOMEM;
  }
  memcpy(s->tokens, r->prompt, (size_t)r->n_prompt * sizeof *s->tokens);
  if (sched__kvc_enabled(s)) s->obs_window = sched_kv_window(&r->kvc);
  *out = s;
  return 0;
}

/* How s fits in the pool, which may hold less than max_model_len
 * (kv_below_max_len): uncompressed, its length is capped at what the pool
 * holds; compressed with a bounded budget, a prompt whose KV would not fit
 * is compressed between prefill chunks of a size the pool allows (or the
 * request's prefill_chunk). -ENOSPC when it cannot fit either way. */
static int seq_fit(const sched_engine_t *e, sched__seq_t *s) {
  const sched_kv_compression_t *k = &s->req->kvc;
  const int32_t B = BLOCK_SIZE, heads = e->n_layers * e->n_kv_heads;
  const int64_t pool_tokens = (int64_t)(e->pool.n_blocks / heads) * B;
  const bool bounded = sched__kvc_enabled(s) && sched__kvc_chunks_ok(&e->kvc) &&
                       (k->plan.ratio > 1 || k->plan.max_cache_tokens > 0);
  if (!bounded) {
    if (s->n_prompt >= pool_tokens) return -ENOSPC;
    if (s->cap > pool_tokens) s->cap = (int32_t)pool_tokens;
    return 0;
  }
  const bool fits = (int64_t)s->n_prompt + 1 <= pool_tokens;
  if (fits && (k->prefill_chunk <= 0 || s->n_prompt <= k->prefill_chunk)) return 0;
  int64_t room = pool_tokens - sched__kvc_fill_base(&k->plan, s->n_prompt, B);
  int64_t c = k->prefill_chunk > 0 ? k->prefill_chunk : room / 2 < 2048 ? room / 2 : 2048;
  if (c > room) c = room;
  c -= c % B;
  if (c < 64) return fits ? 0 : -ENOSPC;
  s->fill_chunk = (int32_t)c;
  return 0;
}

/* The picker's hook before a first admission: the sampler. */
static int seq_prepare(void *ctx, sched__seq_t *s) {
  sched_engine_t *e = ctx;
  s->t_admitted_ns = sched__now_ns();
  int rc = sched_sampler_init(&s->smp, &s->req->sample, e->n_vocab);
  if (rc) return rc;
  sched_sampler_prompt(&s->smp, s->req->prompt, (size_t)s->req->n_prompt);
  return 0;
}

/* ---- live requests by id ------------------------------------------------ */

static size_t hash_id(const sched_engine_t *e, uint64_t id) {
  uint64_t x = id * 0x9E3779B97F4A7C15ull;
  return (size_t)(x ^ (x >> 29)) & e->ht_mask;
}

static void hash_insert(sched_engine_t *e, sched__seq_t *s) {
  size_t b = hash_id(e, s->req->id);
  s->hnext = e->ht[b];
  e->ht[b] = s;
}

static void hash_remove(sched_engine_t *e, sched__seq_t *s) {
  sched__seq_t **pp = &e->ht[hash_id(e, s->req->id)];
  while (*pp && *pp != s) pp = &(*pp)->hnext;
  if (*pp) *pp = s->hnext;
}

static sched__seq_t *hash_find(const sched_engine_t *e, uint64_t id) {
  for (sched__seq_t *s = e->ht[hash_id(e, id)]; s; s = s->hnext)
    if (s->req->id == id) return s;
  return NULL;
}

/* ---- outbox --------------------------------------------------------------- */

/* Under mu: append n events to the ring, growing it. */
static int outbox_append(sched_engine_t *e, const sched_event_t *evs, size_t n) {
  if (e->out_n + n > e->out_cap) {
    size_t cap = e->out_cap ? e->out_cap : 64;
    while (cap < e->out_n + n) cap *= 2;
    sched_event_t *q = malloc(cap * sizeof *q);
    if (!q) return -ENOMEM;
    for (size_t i = 0; i < e->out_n; i++) q[i] = e->out[(e->out_head + i) % e->out_cap];
    free(e->out);
    e->out = q;
    e->out_cap = cap;
    e->out_head = 0;
  }
  for (size_t i = 0; i < n; i++) e->out[(e->out_head + e->out_n + i) % e->out_cap] = evs[i];
  e->out_n += n;
  return 0;
}

/* Under mu: what sched_engine_stats returns. */
static void publish_stats_locked(sched_engine_t *e) {
  e->pub = e->st;
  e->pub.running = e->sc.n_running;
  e->pub.waiting = e->sc.waiting.n;
  e->pub.kv_blocks_total = e->pool.n_blocks;
  e->pub.kv_blocks_used = kv_pool_used_count(&e->pool);
  e->pub.kv_blocks_stranded = kv_pool_stranded_count(&e->pool);
  e->pub.preemptions = e->sc.preemptions;
  e->n_waiting = e->sc.waiting.n;
}

/* Move the staged events to the outbox and publish the stats. Waits for the
 * consumer when the outbox cannot grow (out of memory), never drops. */
static void flush_stage(sched_engine_t *e) {
  for (;;) {
    pthread_mutex_lock(&e->mu);
    int rc = outbox_append(e, e->stage, e->n_stage);
    publish_stats_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (!rc) break;
    nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
  }
  if (e->n_stage) e->posted = true;
  e->n_stage = 0;
}

static void notify(sched_engine_t *e) {
  if (e->posted && e->cfg.notify) e->cfg.notify(e->cfg.notify_ctx);
  e->posted = false;
}

/* A new event for s in the stage; text "" and usage filled in. */
static sched_event_t *stage_push(sched_engine_t *e, sched__seq_t *s) {
  if (e->n_stage == (size_t)e->cfg.max_num_seqs) flush_stage(e);
  sched_event_t *ev = &e->stage[e->n_stage++];
  memset(ev, 0, sizeof *ev);
  if (!s->queue_reported) { /* the first event carries the time in the queue */
    int64_t end = s->t_admitted_ns ? s->t_admitted_ns : sched__now_ns();
    ev->queue_seconds = s->t_queued_ns ? (double)(end - s->t_queued_ns) * 1e-9 : 0.0;
    s->queue_reported = true;
  }
  ev->id = s->req->id;
  ev->user = s->req->user;
  ev->text = empty_text;
  ev->prompt_tokens = s->n_prompt;
  ev->completion_tokens = s->n_gen;
  return ev;
}

static void event_set_text(sched_event_t *ev, const char *p, size_t n) {
  if (n == 0) return;
  char *t = malloc(n + 1);
  if (!t) return; /* the delta is lost, the request goes on */
  memcpy(t, p, n);
  t[n] = 0;
  ev->text = t;
  ev->text_len = n;
}

/* The last event of s: the finish reason and, when it compresses, its KV
 * usage (on this event only: the count walks every head). */
static void event_finish(sched_engine_t *e, const sched__seq_t *s, sched_event_t *ev,
                         sched_finish_t fin, const char *msg) {
  ev->finish = fin;
  if (sched__kvc_enabled(s)) {
    int64_t heads = (int64_t)s->kv.n_layers * s->kv.n_heads;
    ev->kv_tokens_kept = (int32_t)((sched__kvc_held(s) + heads / 2) / heads);
    ev->kv_tokens_evicted = (int32_t)((s->kv_evicted + heads / 2) / heads);
  }
  if (msg) snprintf(ev->message, sizeof ev->message, "%s", msg);
  e->st.requests_finished++;
}

/* ---- finishing -------------------------------------------------------------- */

/* Finish s now, wherever it is (not in the batch being processed): post its
 * last event and free it; its blocks return to the pool. */
static void finish_now(sched_engine_t *e, sched__seq_t *s, sched_finish_t fin, const char *msg) {
  if (s->run_idx >= 0) sched__running_remove(&e->sc, s);
  else if (s->prev || s->next || e->sc.waiting.head == s) sched__queue_remove(&e->sc.waiting, s);
  event_finish(e, s, stage_push(e, s), fin, msg);
  hash_remove(e, s);
  seq_free(e, s, true);
}

/* running_compact's callback for sequences that finished in the step. */
static void seq_done(void *ctx, sched__seq_t *s) {
  sched_engine_t *e = ctx;
  hash_remove(e, s);
  seq_free(e, s, true);
}

/* Finish every running and waiting request with fin (and msg). */
static void finish_all(sched_engine_t *e, sched_finish_t fin, const char *msg) {
  while (e->sc.n_running) finish_now(e, e->sc.running[e->sc.n_running - 1], fin, msg);
  while (e->sc.waiting.head) finish_now(e, e->sc.waiting.head, fin, msg);
}

/* ---- sampling and stop rules --------------------------------------------- */

_Static_assert(SCHED_MAX_TOP_LOGPROBS <= K_DRAW_MAX_TOP, "the backends' top alternatives");

/* The event's log-probabilities: from lp (the backend's), or worked out
 * from the raw logits in e->lp_row (kernels/draw.h). */
static void fill_logprobs(sched_engine_t *e, sched_event_t *ev, int32_t id, int32_t n,
                          const k_logprobs_t *lp) {
  k_logprobs_t own;
  if (!lp) {
    k_draw_logprobs(e->lp_row, e->n_vocab, id, n, &own);
    lp = &own;
  }
  ev->logprob = lp->chosen;
  ev->n_top = lp->n_top < SCHED_MAX_TOP_LOGPROBS ? lp->n_top : SCHED_MAX_TOP_LOGPROBS;
  for (int32_t j = 0; j < ev->n_top; j++)
    ev->top[j] = (sched_top_logprob_t){.token = lp->top[j], .logprob = lp->top_lp[j]};
}

/* Whether s's next token is drawn on the device (kernels/draw.h), its
 * penalties and log-probabilities worked out there too where the backend
 * can. */
static bool draw_on_device(const sched_engine_t *e, const sched__seq_t *s) {
  if (s->req->logprobs >= 0) /* of the raw logits: not where penalties rewrote them */
    return e->logprobs && sched_sampler_on_device(&s->smp, false);
  return sched_sampler_on_device(&s->smp, e->penalize);
}

/* Room for n more packed penalty entries after used ones. */
static int pen_room(sched_engine_t *e, int64_t used, int64_t n) {
  if (used + n <= e->cap_pen) return 0;
  int64_t cap = e->cap_pen ? e->cap_pen : 4096;
  while (cap < used + n) cap *= 2;
  int32_t *a = realloc(e->pen_ids, (size_t)cap * sizeof *a);
  if (a) e->pen_ids = a;
  int32_t *b = realloc(e->pen_seen, (size_t)cap * sizeof *b);
  if (b) e->pen_seen = b;
  if (!a || !b) return -ENOMEM;
  e->cap_pen = cap;
  return 0;
}

/* Sample s's next token from its logits row (or take the one the backend
 * drew, row NULL, with its log-probabilities lp where asked), post its
 * event, and mark s finished when a stop rule fires. */
static void emit_token(sched_engine_t *e, sched__seq_t *s, float *row, int32_t drawn,
                       const k_logprobs_t *lp) {
  const sched_request_t *r = s->req;
  if (!s->prompt_counted) {
    e->st.prompt_tokens += (uint64_t)s->n_prompt;
    s->prompt_counted = true;
  }
  if (row && r->logprobs >= 0) memcpy(e->lp_row, row, (size_t)e->n_vocab * sizeof *row);
  const int32_t id = row ? sched_sample(&s->smp, row, NULL) : drawn;
  sched_sampler_accept(&s->smp, id);
  assert(s->n_tokens < s->cap);
  s->tokens[s->n_tokens++] = id;
  s->n_gen++;
  e->st.generation_tokens++;

  sched_event_t *ev = stage_push(e, s);
  ev->n_tokens = 1;
  ev->token = id;
  if (r->logprobs >= 0) fill_logprobs(e, ev, id, r->logprobs, row ? NULL : lp);

  const bool eog = !r->ignore_eos && model_tok_is_eog(e->tok, id);
  const bool len = s->n_gen >= r->max_tokens || s->n_tokens >= s->cap; /* max_model_len, pool */
  const bool last = eog || len;
  size_t n = 0;
  if (!eog) n = model_detok_push(&s->dt, e->tok, id, e->detok, sizeof e->detok);
  if (last) n += model_detok_flush(&s->dt, e->detok + n, sizeof e->detok - n);
  bool stopped;
  size_t k = sched__text_feed(&s->held, r->stop, r->n_stop, e->detok, n, last, &stopped);
  event_set_text(ev, s->held.buf, k);
  sched__text_consume(&s->held, k, stopped);

  sched_finish_t fin = stopped || eog ? SCHED_FINISH_STOP : len ? SCHED_FINISH_LENGTH
                                                                : SCHED_FINISH_NONE;
  if (fin != SCHED_FINISH_NONE) {
    event_finish(e, s, ev, fin, NULL);
    s->finished = true;
  }
}

/* ---- one step --------------------------------------------------------------- */

/* Before the pick: when the decodes of this step need more new blocks than
 * are free, compress running sequences (newest first: they would be
 * preempted first) instead of preempting them, and hold admissions back so
 * the room is not refilled at once. */
static void relieve_pressure(sched_engine_t *e) {
  sched__sched_t *sc = &e->sc;
  if (e->n_kvc_live == 0) return;
  int32_t free_blocks = kv_pool_free_count(&e->pool);
  if (free_blocks >= sc->n_running * sc->heads) return; /* enough whatever happens */
  int64_t need = 0; /* in kv_pool_free_count's units, as kv_seq_blocks_needed counts */
  for (int32_t i = 0; i < sc->n_running; i++)
    if (sc->running[i]->n_tokens - sc->running[i]->n_computed == 1)
      need += kv_seq_blocks_needed(&sc->running[i]->kv, 1);
  if (need <= free_blocks) return;
  bool any = false;
  for (int32_t j = sc->n_running - 1; j >= 0 && need > free_blocks; j--) {
    sched__seq_t *s = sc->running[j];
    if (!sched__kvc_enabled(s) || !s->prefill_compressed) continue;
    int32_t got = sched__kvc_compress(&e->kvc, s, (int32_t)(need - free_blocks));
    free_blocks = kv_pool_free_count(&e->pool); /* with parts, not free_blocks + got */
    any |= got > 0;
  }
  if (any) sc->hold_admissions = true;
}

static void step(sched_engine_t *e) {
  sched__sched_t *sc = &e->sc;
  relieve_pressure(e);
  const int32_t n = sched__pick(sc);
  if (sc->failed) finish_now(e, sc->failed, SCHED_FINISH_ERROR, "out of memory");
  /* A lone sequence always fits (sched_engine_new checks the pool), so
   * running sequences always make progress. */
  assert(n > 0 || sc->n_running == 0);
  if (n == 0) return;

  /* Each row's token is drawn by the backend where its request allows
   * (kernels/draw.h: the same token the host sampler would draw); only the
   * other rows' logits come back to the host (host_rows). */
  const bool device = model_group_can_sample(&e->model);
  int32_t t = 0, n_logits = 0, n_host = 0;
  int64_t n_pen = 0; /* packed penalty entries */
  bool any_lp = false;
  for (int32_t i = 0; i < n; i++) {
    sched__seq_t *s = sc->batch[i];
    const int32_t m = s->chunk;
    if (sched__kvc_view(&e->kvc, s, &e->views[i])) e->views[i].n_obs = 0; /* no scores */
    e->q_start[i] = t;
    memcpy(e->tokens + t, s->tokens + s->n_computed, (size_t)m * sizeof *e->tokens);
    for (int32_t j = 0; j < m; j++) e->pos[t + j] = s->n_computed + j;
    t += m;
    if (s->n_computed + m < s->n_tokens) continue;
    e->pens[n_logits] = (k_penalty_t){0};
    e->lp_want[n_logits] = -1;
    if (device && draw_on_device(e, s) &&
        !pen_room(e, n_pen, s->smp.n_seen)) { /* the generator advances as sched_sample's would */
      sched_sampler_next_draw(&s->smp, &e->draws[n_logits]);
      n_pen += sched_sampler_penalty(&s->smp, &e->pens[n_logits], n_pen, e->pen_ids + n_pen,
                                     e->pen_seen + n_pen);
      e->lp_want[n_logits] = s->req->logprobs;
      any_lp |= s->req->logprobs >= 0;
    } else {
      e->draws[n_logits] = (k_draw_t){0};
      e->host_rows[n_host++] = n_logits;
    }
    e->rows[n_logits++] = t - 1;
  }
  e->q_start[n] = t;
  for (int32_t r = 1; r < e->n_arenas; r++)
    for (int32_t i = 0; i < n; i++) {
      e->rank_views[r][i] = e->views[i];
      sched__kvc_view_rank(&e->kvc, sc->batch[i], r, &e->rank_views[r][i]);
    }

  model_batch_t b = {
      .n_seqs = n,
      .n_tokens = t,
      .tokens = e->tokens,
      .pos = e->pos,
      .q_start = e->q_start,
      .seqs = e->views,
      .n_logits = n_logits,
      .logit_rows = e->rows,
      .ids = device ? e->ids : NULL,
      .draws = device ? e->draws : NULL,
      .host_rows = e->host_rows,
      .n_host_rows = device ? n_host : 0,
      .pens = n_pen > 0 ? e->pens : NULL,
      .pen_ids = e->pen_ids,
      .pen_seen = e->pen_seen,
      .lp_want = any_lp ? e->lp_want : NULL,
      .lp = e->lp,
      .rank_seqs = e->n_arenas > 1 ? (const k_seq_kv_t *const *)e->rank_views : NULL,
  };
  const int64_t f0 = sched__now_ns();
  int rc = model_group_forward(&e->model, &b, e->logits);
  e->st.forward_seconds += (double)(sched__now_ns() - f0) * 1e-9;
  e->st.steps++;
  if (model_group_graph_rows(&e->model, &b) > 0) e->st.graph_steps++;
  if (rc) e->step_failed = true;

  /* logits rows: packed host rows on the device path, all rows otherwise */
  int32_t li = 0, hi = 0;
  for (int32_t i = 0; i < n; i++) {
    sched__seq_t *s = sc->batch[i];
    if (rc) {
      event_finish(e, s, stage_push(e, s), SCHED_FINISH_ERROR, "the model failed to run");
      s->finished = true;
      continue;
    }
    s->n_computed += s->chunk;
    sched__kvc_after(&e->kvc, s);
    if (s->n_computed == s->n_tokens) {
      const bool host = !device || (hi < n_host && e->host_rows[hi] == li);
      float *row = !host ? NULL : e->logits + (int64_t)(device ? hi++ : li) * e->n_vocab;
      emit_token(e, s, row, host ? 0 : e->ids[li], host ? NULL : &e->lp[li]);
      li++;
    }
  }
  sched__running_compact(sc, seq_done, e);
}

/* ---- the thread ---------------------------------------------------------------- */

static void abort_id(sched_engine_t *e, uint64_t id) {
  sched__seq_t *s = hash_find(e, id);
  if (s) finish_now(e, s, SCHED_FINISH_ABORT, NULL);
}

static int bad(char *why, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *why, size_t len, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, len, fmt, ap);
  va_end(ap);
  return -1;
}

/* Whether every rank's backend can go on after a failed step. */
static bool healthy(const sched_engine_t *e) {
  const int32_t n = e->cfg.tp_size > 1 ? e->cfg.tp_size : 1;
  for (int32_t r = 0; r < n; r++) {
    k_backend_t *b = n > 1 ? e->cfg.tp_backends[r] : e->be;
    if (b->ops->health && b->ops->health(b)) return false;
  }
  return true;
}

/* The KV accounting after a step: the pool is consistent, and the blocks it
 * has lent are exactly those the sequences' tables hold, each in one table
 * once, every head with the blocks its length needs. O(pool + tables). */
static int check_accounting(const sched_engine_t *e, char *why, size_t len) {
  if (kv_pool_check(&e->pool)) return bad(why, len, "the block pool is inconsistent");
  uint8_t *seen = calloc((size_t)e->pool.n_blocks, 1);
  if (!seen) return 0; /* no memory to check with: not a finding */
  int64_t held = 0;
  int rc = 0;
  const sched__seq_t *q = e->sc.waiting.head;
  for (int32_t i = 0; !rc && (i < e->sc.n_running || q); i++) {
    const sched__seq_t *s = i < e->sc.n_running ? e->sc.running[i] : q;
    if (i >= e->sc.n_running) q = q->next;
    const kv_seq_t *kv = &s->kv;
    for (int32_t lh = 0; !rc && lh < kv->n_layers * kv->n_heads; lh++) {
      int32_t nb = kv->n_blocks[lh], ctx = kv->ctx[lh];
      if (ctx < 0 || nb < (ctx + kv->block_size - 1) / kv->block_size || nb > kv->max_blocks)
        rc = bad(why, len, "request %llu head %d: %d slots in %d blocks",
                 (unsigned long long)(s->req ? s->req->id : 0), lh, ctx, nb);
      for (int32_t b = 0; !rc && b < nb; b++) {
        int32_t id = kv->blocks[(int64_t)lh * kv->max_blocks + b];
        if (id < 0 || id >= e->pool.n_blocks || !e->pool.refs[id] || seen[id]++)
          rc = bad(why, len, "request %llu head %d: block %d is free, foreign or shared",
                   (unsigned long long)(s->req ? s->req->id : 0), lh, id);
      }
      held += nb;
    }
  }
  if (!rc && held != kv_pool_used_count(&e->pool))
    rc = bad(why, len, "the pool lent %d blocks, the sequences hold %lld",
             kv_pool_used_count(&e->pool), (long long)held);
  free(seen);
  return rc;
}

/* cfg.alive, when alive_ms has passed since the last call. */
static void tick_alive(sched_engine_t *e, int64_t *last_ns) {
  int64_t now = sched__now_ns();
  if (e->cfg.alive && now - *last_ns >= (int64_t)e->cfg.alive_ms * 1000000) {
    e->cfg.alive(e->cfg.alive_ctx);
    *last_ns = now;
  }
}

static void *engine_main(void *arg) {
  sched_engine_t *e = arg;
  int64_t alive_ns = 0;
  for (;;) {
    tick_alive(e, &alive_ns);
    pthread_mutex_lock(&e->mu);
    while (!e->stopping && !e->in_head && !e->n_aborts && !e->sc.n_running && !e->sc.waiting.n) {
      if (!e->cfg.alive) {
        pthread_cond_wait(&e->cv, &e->mu);
        continue;
      }
      struct timespec ts; /* the condition variable's clock is CLOCK_MONOTONIC */
      clock_gettime(CLOCK_MONOTONIC, &ts);
      int64_t ns = ts.tv_nsec + (int64_t)e->cfg.alive_ms * 1000000;
      ts.tv_sec += ns / 1000000000;
      ts.tv_nsec = ns % 1000000000;
      pthread_cond_timedwait(&e->cv, &e->mu, &ts);
      pthread_mutex_unlock(&e->mu);
      tick_alive(e, &alive_ns);
      pthread_mutex_lock(&e->mu);
    }
    sched__seq_t *in = e->in_head;
    e->in_head = e->in_tail = NULL;
    e->n_waiting += e->n_inbox;
    e->n_inbox = 0;
    uint64_t *ab = e->aborts;
    size_t n_ab = e->n_aborts, cap_ab = e->cap_aborts;
    e->aborts = e->aborts_eng;
    e->cap_aborts = e->cap_aborts_eng;
    e->n_aborts = 0;
    e->aborts_eng = ab;
    e->cap_aborts_eng = cap_ab;
    const bool stop = e->stopping;
    pthread_mutex_unlock(&e->mu);

    for (sched__seq_t *s = in, *next; s; s = next) {
      next = s->next;
      sched__queue_push_back(&e->sc.waiting, s);
      hash_insert(e, s);
      s->t_queued_ns = sched__now_ns();
      if ((s->kvc_counted = sched__kvc_enabled(s))) e->n_kvc_live++;
    }
    for (size_t i = 0; i < n_ab; i++) abort_id(e, ab[i]);
    if (stop) {
      finish_all(e, SCHED_FINISH_ABORT, NULL);
      flush_stage(e);
      notify(e);
      break;
    }
    int64_t t0 = sched__now_ns();
    __atomic_store_n(&e->step_start_ns, t0, __ATOMIC_RELAXED);
    e->step_failed = false;
    step(e);
    if (e->step_failed && !healthy(e)) {
      /* the device cannot go on: end everything, and let the process restart */
      __atomic_store_n(&e->step_start_ns, 0, __ATOMIC_RELAXED);
      finish_all(e, SCHED_FINISH_ERROR,
                 "the compute device failed and cannot recover; the server is restarting");
      flush_stage(e);
      notify(e);
      if (e->cfg.fatal) e->cfg.fatal(e->cfg.fatal_ctx);
      break;
    }
    char why[200];
    if (e->cfg.debug_checks && check_accounting(e, why, sizeof why)) {
      fprintf(stderr, "pressd: KV accounting broken after step %llu: %s\n",
              (unsigned long long)e->st.steps, why);
      abort(); /* a checking run wants the core, not a limping daemon */
    }
    __atomic_store_n(&e->step_start_ns, 0, __ATOMIC_RELAXED);
    e->st.busy_seconds += (double)(sched__now_ns() - t0) * 1e-9;
    flush_stage(e);
    notify(e);
  }
  __atomic_store_n(&e->thread_done, true, __ATOMIC_RELEASE);
  return NULL;
}

/* ---- public ------------------------------------------------------------------- */

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, int rc, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

int sched_engine_new(sched_engine_t **out, const sched_engine_config_t *cfg,
                     const struct model_weights *w, struct k_backend *be,
                     const struct model_tok *tok, char *err, size_t errlen) {
  *out = NULL;
  if (cfg->max_num_seqs < 1)
    return fail(err, errlen, -EINVAL, "max_num_seqs must be >= 1, got %d", cfg->max_num_seqs);
  if (cfg->max_num_batched_tokens < cfg->max_num_seqs)
    return fail(err, errlen, -EINVAL,
                "max_num_batched_tokens (%d) must be >= max_num_seqs (%d)",
                cfg->max_num_batched_tokens, cfg->max_num_seqs);
  if (cfg->max_model_len < 2)
    return fail(err, errlen, -EINVAL, "max_model_len must be >= 2, got %d", cfg->max_model_len);
  if (cfg->alive && cfg->alive_ms < 1)
    return fail(err, errlen, -EINVAL, "alive_ms must be >= 1, got %d", cfg->alive_ms);
  if (cfg->max_waiting < 1)
    return fail(err, errlen, -EINVAL, "max_waiting must be >= 1, got %d", cfg->max_waiting);
  const int32_t n_ranks = cfg->tp_size > 1 ? cfg->tp_size : 1;
  bool per_rank = false; /* each rank's KV heads in its own arena */
  if (n_ranks > 1) {
    if (n_ranks > MAX_RANKS || !cfg->tp_weights || !cfg->tp_backends || !cfg->tp_comm)
      return fail(err, errlen, -EINVAL, "tensor parallelism needs shards, backends and a communicator");
    per_rank = cfg->kv_per_rank || !be->host_memory;
    for (int32_t r = 0; r < n_ranks; r++) per_rank |= !cfg->tp_backends[r]->host_memory;
    if (w->cfg.n_kv_heads % n_ranks)
      return fail(err, errlen, -EINVAL, "%d ranks cannot split the model's %d KV heads", n_ranks,
                  w->cfg.n_kv_heads);
  }
  const model_config_t *c = &w->cfg;
  const size_t block_bytes = kv_block_bytes(be->kv_type, BLOCK_SIZE, c->head_dim);
  const int64_t heads = (int64_t)c->n_layers * c->n_kv_heads;
  const int64_t per_seq = heads * ((cfg->max_model_len + BLOCK_SIZE - 1) / BLOCK_SIZE);
  int64_t n_blocks = cfg->kv_cache_memory > 0 ? cfg->kv_cache_memory / (int64_t)block_bytes : 0;
  if (n_blocks > INT32_MAX) n_blocks = INT32_MAX;
  if (per_rank) n_blocks -= n_blocks % n_ranks; /* equal parts */
  const int64_t floor_blocks = heads * (MIN_POOL_TOKENS / BLOCK_SIZE);
  if (cfg->kv_below_max_len && n_blocks < per_seq && n_blocks < floor_blocks)
    return fail(err, errlen, -EINVAL,
                "kv_cache_memory of %lld bytes holds %lld tokens, fewer than %d: raise it to at "
                "least %lld bytes",
                (long long)cfg->kv_cache_memory, (long long)(n_blocks / heads * BLOCK_SIZE),
                MIN_POOL_TOKENS, (long long)(floor_blocks * (int64_t)block_bytes));
  if (!cfg->kv_below_max_len && n_blocks < per_seq)
    return fail(err, errlen, -EINVAL,
                "kv_cache_memory of %lld bytes holds %lld tokens, fewer than one sequence of "
                "max_model_len %d needs: raise kv_cache_memory to at least %lld bytes or lower "
                "max_model_len",
                (long long)cfg->kv_cache_memory, (long long)(n_blocks / heads * BLOCK_SIZE),
                cfg->max_model_len, (long long)(per_seq * (int64_t)block_bytes));

  sched_engine_t *e = calloc(1, sizeof *e);
  if (!e) return fail(err, errlen, -ENOMEM, "out of memory");
  e->cfg = *cfg;
  e->w = w;
  e->be = be;
  e->tok = tok;
  e->n_layers = c->n_layers;
  e->n_kv_heads = c->n_kv_heads;
  e->n_vocab = c->n_vocab;
  const int32_t S = cfg->max_num_seqs, T = cfg->max_num_batched_tokens, V = c->n_vocab;
  int rc;
  if ((rc = -pthread_mutex_init(&e->mu, NULL))) goto fail_rc;
  e->mu_ok = true;
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  rc = -pthread_cond_init(&e->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (rc) goto fail_rc;
  e->cv_ok = true;
  e->n_arenas = per_rank ? n_ranks : 1;
  for (int32_t r = 0; r < e->n_arenas; r++) e->arena_be[r] = per_rank ? cfg->tp_backends[r] : be;
  rc = kv_pool_arenas_init(&e->pool, e->arenas, e->arena_be, (int32_t)n_blocks, e->n_arenas,
                           BLOCK_SIZE, c->head_dim);
  if (rc) {
    fail(err, errlen, rc, "cannot allocate the KV cache (%lld blocks%s): %s", (long long)n_blocks,
         per_rank ? " over the ranks" : "", strerror(-rc));
    goto fail;
  }
  {
    const k_kv_arena_t *kvs[MAX_RANKS];
    k_backend_t *bes[MAX_RANKS];
    for (int32_t r = 0; r < n_ranks; r++) {
      kvs[r] = &e->arenas[per_rank ? r : 0]; /* shared: every rank reads the one arena */
      bes[r] = n_ranks > 1 ? cfg->tp_backends[r] : be;
    }
    if ((rc = model_group_init(&e->model, n_ranks, n_ranks > 1 ? cfg->tp_weights : w, bes, kvs,
                               cfg->tp_comm, T, S, err, errlen)))
      goto fail;
    model_group_set_graphs(&e->model, cfg->graphs);
    if (cfg->graphs && (rc = model_group_capture_graphs(&e->model, T))) {
      fail(err, errlen, rc, "capturing the steps' CUDA graphs failed: %s", strerror(-rc));
      goto fail;
    }
  }
  sched__kvc_init(&e->kvc, e->n_arenas, e->arena_be, e->arenas, &e->pool, &e->st, c->n_layers,
                  c->n_kv_heads, c->n_heads / c->n_kv_heads, cfg->kv_via_backend);
  if ((rc = sched__sched_init(&e->sc, &e->pool, S, T, c->n_layers, c->n_kv_heads, BLOCK_SIZE)))
    goto fail_rc;
  e->sc.prepare = seq_prepare;
  e->sc.prepare_ctx = e;
  size_t nb = 64;
  while (nb < MAX_HASH_BUCKETS && nb < 2 * ((size_t)cfg->max_waiting + (size_t)S)) nb *= 2;
  e->ht = calloc(nb, sizeof *e->ht);
  e->ht_mask = nb - 1;
  e->tokens = malloc((size_t)T * sizeof *e->tokens);
  e->pos = malloc((size_t)T * sizeof *e->pos);
  e->q_start = malloc(((size_t)S + 1) * sizeof *e->q_start);
  e->rows = malloc((size_t)S * sizeof *e->rows);
  e->ids = malloc((size_t)S * sizeof *e->ids);
  e->draws = malloc((size_t)S * sizeof *e->draws);
  e->host_rows = malloc((size_t)S * sizeof *e->host_rows);
  e->pens = malloc((size_t)S * sizeof *e->pens);
  e->penalize = model_group_can_penalize(&e->model);
  e->logprobs = model_group_can_logprobs(&e->model);
  e->lp_want = malloc((size_t)S * sizeof *e->lp_want);
  e->lp = malloc((size_t)S * sizeof *e->lp);
  e->views = malloc((size_t)S * sizeof *e->views);
  bool views_ok = true;
  if (e->n_arenas > 1 && (e->rank_views = calloc((size_t)e->n_arenas, sizeof *e->rank_views))) {
    e->rank_views[0] = e->views;
    for (int32_t r = 1; r < e->n_arenas; r++)
      views_ok &= (e->rank_views[r] = malloc((size_t)S * sizeof **e->rank_views)) != NULL;
  }
  e->logits = malloc((size_t)S * (size_t)V * sizeof *e->logits);
  e->lp_row = malloc((size_t)V * sizeof *e->lp_row);
  e->stage = malloc((size_t)S * sizeof *e->stage);
  if (!e->ht || !e->tokens || !e->pos || !e->q_start || !e->rows || !e->ids || !e->draws ||
      !e->host_rows || !e->pens || !e->lp_want || !e->lp || !e->views ||
      (e->n_arenas > 1 && (!e->rank_views || !views_ok)) ||
      !e->logits || !e->lp_row || !e->stage) {
    rc = -ENOMEM;
    goto fail_rc;
  }
  pthread_mutex_lock(&e->mu);
  publish_stats_locked(e);
  pthread_mutex_unlock(&e->mu);
  *out = e;
  return 0;

fail_rc:
  fail(err, errlen, rc, "cannot start the engine: %s", strerror(-rc));
fail:
  sched_engine_free(e);
  return rc;
}

int sched_engine_start(sched_engine_t *e) {
  if (!e || e->started) return -EINVAL;
  int rc = pthread_create(&e->thread, NULL, engine_main, e);
  if (rc) return -rc;
  e->started = true;
  return 0;
}

void sched_engine_free(sched_engine_t *e) {
  if (!e) return;
  if (e->started) {
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
  }
  /* Not started (or submitted after the last drain): the inbox is ours. */
  for (sched__seq_t *s = e->in_head, *next; s; s = next) {
    next = s->next;
    seq_free(e, s, true);
  }
  for (size_t i = 0; i < e->n_stage; i++) sched_event_clear(&e->stage[i]);
  for (size_t i = 0; i < e->out_n; i++) sched_event_clear(&e->out[(e->out_head + i) % e->out_cap]);
  free(e->out);
  free(e->stage);
  free(e->aborts);
  free(e->aborts_eng);
  free(e->ht);
  free(e->tokens);
  free(e->pos);
  free(e->q_start);
  free(e->rows);
  free(e->ids);
  free(e->draws);
  free(e->host_rows);
  free(e->pens);
  free(e->lp_want);
  free(e->lp);
  for (int32_t r = 1; e->rank_views && r < e->n_arenas; r++) free(e->rank_views[r]);
  free(e->rank_views);
  free(e->pen_ids);
  free(e->pen_seen);
  free(e->views);
  free(e->logits);
  free(e->lp_row);
  sched__sched_destroy(&e->sc);
  model_group_destroy(&e->model);
  sched__kvc_destroy(&e->kvc);
  kv_pool_arenas_destroy(&e->pool, e->arenas, e->arena_be);
  if (e->cv_ok) pthread_cond_destroy(&e->cv);
  if (e->mu_ok) pthread_mutex_destroy(&e->mu);
  free(e);
}

int sched_engine_submit(sched_engine_t *e, sched_request_t *r) {
  if (!e || !r || !r->prompt || r->n_prompt < 1 || r->max_tokens < 1 || r->n_stop < 0 ||
      (r->n_stop > 0 && !r->stop) || r->logprobs < -1 || r->logprobs > SCHED_MAX_TOP_LOGPROBS)
    return -EINVAL;
  /* At least one token must fit after the prompt. */
  if (r->n_prompt >= e->cfg.max_model_len) return -EINVAL;
  for (int32_t i = 0; i < r->n_stop; i++)
    if (!r->stop[i]) return -EINVAL;
  for (int32_t i = 0; i < r->n_prompt; i++)
    if (r->prompt[i] < 0 || r->prompt[i] >= e->n_vocab) return -EINVAL;
  if (sched_sample_params_check(&r->sample, NULL, 0)) return -EINVAL;

  sched__seq_t *s;
  int rc = seq_new(e, r, &s);
  if (rc) return rc;
  if ((rc = seq_fit(e, s))) {
    seq_free(e, s, false); /* the caller keeps r */
    return rc;
  }
  pthread_mutex_lock(&e->mu);
  if (e->stopping || e->n_inbox + e->n_waiting >= e->cfg.max_waiting) {
    rc = -EAGAIN;
  } else {
    s->next = NULL;
    if (e->in_tail) e->in_tail->next = s;
    else e->in_head = s;
    e->in_tail = s;
    e->n_inbox++;
    pthread_cond_signal(&e->cv);
  }
  pthread_mutex_unlock(&e->mu);
  if (rc) seq_free(e, s, false);
  return rc;
}

void sched_engine_abort(sched_engine_t *e, uint64_t id) {
  if (!e) return;
  pthread_mutex_lock(&e->mu);
  if (e->n_aborts == e->cap_aborts) {
    size_t cap = e->cap_aborts ? 2 * e->cap_aborts : 16;
    uint64_t *a = realloc(e->aborts, cap * sizeof *a);
    if (!a) { /* the request runs to its end instead */
      pthread_mutex_unlock(&e->mu);
      return;
    }
    e->aborts = a;
    e->cap_aborts = cap;
  }
  e->aborts[e->n_aborts++] = id;
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

size_t sched_engine_poll(sched_engine_t *e, sched_event_t *evs, size_t max) {
  pthread_mutex_lock(&e->mu);
  size_t n = e->out_n < max ? e->out_n : max;
  for (size_t i = 0; i < n; i++) evs[i] = e->out[(e->out_head + i) % e->out_cap];
  if (n) e->out_head = (e->out_head + n) % e->out_cap;
  e->out_n -= n;
  pthread_mutex_unlock(&e->mu);
  return n;
}

void sched_engine_stats(sched_engine_t *e, sched_stats_t *out) {
  int64_t t0 = __atomic_load_n(&e->step_start_ns, __ATOMIC_RELAXED);
  pthread_mutex_lock(&e->mu);
  *out = e->pub;
  out->step_seconds = t0 ? (double)(sched__now_ns() - t0) * 1e-9 : 0.0;
  out->stopped = __atomic_load_n(&e->thread_done, __ATOMIC_ACQUIRE);
  out->waiting = e->n_waiting + e->n_inbox;
  pthread_mutex_unlock(&e->mu);
}

void sched_engine_capacity(const sched_engine_t *e, sched_capacity_t *out) {
  const int32_t heads = e->n_layers * e->n_kv_heads;
  const int32_t per_seq = heads * ((e->cfg.max_model_len + BLOCK_SIZE - 1) / BLOCK_SIZE);
  out->kv_blocks = e->pool.n_blocks;
  out->block_size = BLOCK_SIZE;
  out->kv_tokens = (int64_t)(e->pool.n_blocks / heads) * BLOCK_SIZE;
  out->max_model_len = e->cfg.max_model_len;
  out->max_concurrency = (double)e->pool.n_blocks / (double)per_seq;
}
