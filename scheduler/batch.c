/* The batch picker and the scheduler's queues. See engine-internal.h.
 *
 * Every running sequence has at least one token to feed (n_tokens >
 * n_computed): one for a decode (the token sampled last), more for a prompt
 * being prefilled in chunks. A preempted sequence's prompt is its prompt
 * plus everything it generated, recomputed from position 0. */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/engine-internal.h"

/* ---- queues ------------------------------------------------------------- */

void sched__queue_push_back(sched__queue_t *q, sched__seq_t *s) {
  s->next = NULL;
  s->prev = q->tail;
  if (q->tail) q->tail->next = s;
  else q->head = s;
  q->tail = s;
  q->n++;
}

void sched__queue_push_front(sched__queue_t *q, sched__seq_t *s) {
  s->prev = NULL;
  s->next = q->head;
  if (q->head) q->head->prev = s;
  else q->tail = s;
  q->head = s;
  q->n++;
}

void sched__queue_remove(sched__queue_t *q, sched__seq_t *s) {
  if (s->prev) s->prev->next = s->next;
  else q->head = s->next;
  if (s->next) s->next->prev = s->prev;
  else q->tail = s->prev;
  s->prev = s->next = NULL;
  q->n--;
}

/* ---- state -------------------------------------------------------------- */

int sched__sched_init(sched__sched_t *sc, kv_pool_t *pool, int32_t max_num_seqs,
                      int32_t max_num_batched_tokens, int32_t n_layers, int32_t n_kv_heads,
                      int32_t block_size) {
  memset(sc, 0, sizeof *sc);
  if (max_num_seqs <= 0 || max_num_batched_tokens < max_num_seqs || n_layers <= 0 ||
      n_kv_heads <= 0 || block_size <= 0)
    return -EINVAL;
  sc->pool = pool;
  sc->max_num_seqs = max_num_seqs;
  sc->max_num_batched_tokens = max_num_batched_tokens;
  sc->block_size = block_size;
  sc->heads = n_layers * n_kv_heads;
  sc->watermark = pool->n_blocks / 100; /* 1% */
  sc->running = calloc((size_t)max_num_seqs, sizeof *sc->running);
  sc->batch = calloc((size_t)max_num_seqs, sizeof *sc->batch);
  if (!sc->running || !sc->batch) {
    sched__sched_destroy(sc);
    return -ENOMEM;
  }
  return 0;
}

void sched__sched_destroy(sched__sched_t *sc) {
  if (!sc) return;
  free(sc->running);
  free(sc->batch);
  memset(sc, 0, sizeof *sc);
}

void sched__running_remove(sched__sched_t *sc, sched__seq_t *s) {
  int32_t i = s->run_idx;
  assert(i >= 0 && i < sc->n_running && sc->running[i] == s);
  for (int32_t j = i + 1; j < sc->n_running; j++) {
    sc->running[j - 1] = sc->running[j];
    sc->running[j - 1]->run_idx = j - 1;
  }
  sc->n_running--;
  s->run_idx = -1;
}

void sched__running_compact(sched__sched_t *sc, void (*done)(void *ctx, sched__seq_t *s),
                            void *ctx) {
  int32_t o = 0;
  for (int32_t i = 0; i < sc->n_running; i++) {
    sched__seq_t *s = sc->running[i];
    if (s->finished) {
      s->run_idx = -1;
      sc->hold_admissions = false;
      if (done) done(ctx, s);
      continue;
    }
    s->run_idx = o;
    sc->running[o++] = s;
  }
  sc->n_running = o;
}

/* ---- picking ------------------------------------------------------------ */

static inline int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

/* Blocks a prompt of n tokens takes in an empty sequence (heads are uniform
 * until compression, which runs only after the prefill). */
static inline int32_t prompt_blocks(const sched__sched_t *sc, int32_t n) {
  return sc->heads * ceil_div(n, sc->block_size);
}

static void preempt(sched__sched_t *sc, sched__seq_t *s) {
  kv_seq_reset(&s->kv, sc->pool);
  s->n_computed = 0;
  s->chunk = 0;
  sched__running_remove(sc, s);
  sched__queue_push_front(&sc->waiting, s);
  sc->preemptions++;
  sc->n_preempted++;
  sc->hold_admissions = false;
}

/* Put s in the batch with m tokens whose slots are appended already. */
static void plan(sched__sched_t *sc, sched__seq_t *s, int32_t m) {
  s->chunk = m;
  sc->batch[sc->n_batch++] = s;
  sc->n_batch_tokens += m;
}

/* kv_seq_append(kv, pool, 1) for a decode. Most steps no head's last block
 * is full (15 of 16 with block_size 16): then the one new slot of every head
 * is already there and only the lengths move, in one pass over the heads
 * with no division (undone in the rare case, which kv_seq_append then
 * takes). Relies on what kv_seq_append keeps true: a head's blocks hold at
 * least its ctx slots. */
static int append_decode(kv_seq_t *kv, kv_pool_t *pool) {
  const int32_t n = kv->n_layers * kv->n_heads, B = kv->block_size;
  int32_t *ctx = kv->ctx;
  const int32_t *nb = kv->n_blocks;
  int32_t full = 0;
  for (int32_t i = 0; i < n; i++) full |= ctx[i]++ >= nb[i] * B;
  if (!full) return 0;
  for (int32_t i = 0; i < n; i++) ctx[i]--;
  return kv_seq_append(kv, pool, 1);
}

/* The most tokens, up to m, whose blocks the pool can give s now. */
static void add(sched__sched_t *sc, sched__seq_t *s, int32_t m) {
  int rc = kv_seq_append(&s->kv, sc->pool, m);
  (void)rc;
  assert(rc == 0);
  plan(sc, s, m);
}

static int32_t fit_tokens(const sched__seq_t *s, int32_t m, int32_t free_blocks) {
  if (kv_seq_blocks_needed(&s->kv, m) <= free_blocks) return m;
  int32_t lo = 0, hi = m - 1;
  while (lo < hi) {
    int32_t mid = lo + (hi - lo + 1) / 2;
    if (kv_seq_blocks_needed(&s->kv, mid) <= free_blocks) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* A chunk of at most m tokens of s that does not cross the end of its
 * segment (the prompt, or the chunk after which it is compressed) nor end
 * inside the segment's last obs_window tokens unless it ends the segment:
 * the observation window of a compressing sequence is scored in one
 * attention call. When only the window is left and it does not fit, the
 * chunk ends inside it (the window is then partly observed) rather than
 * waiting. */
static int32_t window_cap(const sched__seq_t *s, int32_t m) {
  int32_t seg = sched__seg_end(s);
  if (m > seg - s->n_computed) m = seg - s->n_computed;
  if (s->obs_window <= 0) return m;
  int32_t end = s->n_computed + m, wstart = seg - s->obs_window;
  if (end >= seg || end <= wstart || wstart <= s->n_computed) return m;
  return wstart - s->n_computed;
}

/* Blocks s needs in all for its prompt, from empty: the whole prompt's, or
 * when it is compressed between chunks, its peak. */
static int32_t need_blocks(const sched__sched_t *sc, const sched__seq_t *s) {
  if (s->fill_chunk <= 0) return prompt_blocks(sc, s->n_tokens);
  int32_t peak = sched__kvc_fill_peak(s, sc->block_size);
  int32_t whole = s->n_tokens + sc->block_size; /* never more than uncompressed */
  return sc->heads * ceil_div(peak < whole ? peak : whole, sc->block_size);
}

/* The newest running sequence after index i that has nothing scheduled. */
static sched__seq_t *newest_idle_after(const sched__sched_t *sc, int32_t i) {
  for (int32_t j = sc->n_running - 1; j > i; j--)
    if (sc->running[j]->chunk == 0) return sc->running[j];
  return NULL;
}

int32_t sched__pick(sched__sched_t *sc) {
  sc->n_batch = 0;
  sc->n_batch_tokens = 0;
  sc->n_preempted = 0;
  sc->failed = NULL;
  int32_t budget = sc->max_num_batched_tokens;

  /* 1. Decodes, oldest first (and every chunk of the last step cleared).
   * The newest running sequence is never scheduled yet when an older one
   * needs its blocks. */
  for (int32_t i = 0; i < sc->n_running; i++) {
    sched__seq_t *s = sc->running[i];
    s->chunk = 0;
    if (budget == 0 || s->n_tokens - s->n_computed != 1) continue;
    bool self = false;
    int rc;
    while ((rc = append_decode(&s->kv, sc->pool)) == -ENOSPC) {
      sched__seq_t *victim = sc->running[sc->n_running - 1];
      preempt(sc, victim);
      if ((self = victim == s)) break;
    }
    if (self) break; /* s was the newest: nothing after it */
    assert(rc == 0);
    plan(sc, s, 1);
    budget--;
  }

  /* 2. Next chunks of prompts being prefilled, oldest first; they may take
   * the blocks of newer sequences that have nothing scheduled. */
  for (int32_t i = 0; i < sc->n_running && budget > 0; i++) {
    sched__seq_t *s = sc->running[i];
    int32_t pending = s->n_tokens - s->n_computed;
    if (s->chunk || pending <= 1) continue;
    int32_t m = window_cap(s, pending < budget ? pending : budget);
    int32_t fit;
    while ((fit = fit_tokens(s, m, kv_pool_free_count(sc->pool))) == 0) {
      sched__seq_t *victim = newest_idle_after(sc, i);
      if (!victim) break;
      preempt(sc, victim);
    }
    if (fit == 0) continue;
    add(sc, s, fit);
    budget -= fit;
  }

  /* 3. Admissions, FCFS, unless this step had to preempt. Blocks the
   * running prompts still need are reserved; the watermark applies only
   * beside other sequences, so a lone sequence always gets in. */
  if (sc->n_preempted || sc->hold_admissions || !sc->waiting.head || budget == 0)
    return sc->n_batch;
  int32_t reserved = 0;
  for (int32_t i = 0; i < sc->n_running; i++) {
    const sched__seq_t *s = sc->running[i];
    int32_t after = s->n_computed + s->chunk;
    if (after >= s->n_tokens) continue;
    if (s->fill_chunk > 0) {
      int64_t more = (int64_t)need_blocks(sc, s) - kv_seq_blocks_held(&s->kv);
      reserved += more > 0 ? (int32_t)more : 0;
    } else {
      reserved += sc->heads * (ceil_div(s->n_tokens, sc->block_size) -
                               ceil_div(after, sc->block_size));
    }
  }
  while (budget > 0 && sc->n_running < sc->max_num_seqs && sc->waiting.head) {
    sched__seq_t *s = sc->waiting.head;
    int32_t need = need_blocks(sc, s);
    int32_t avail = kv_pool_free_count(sc->pool) - reserved;
    if (sc->n_running > 0 ? avail - need < sc->watermark : avail < need) break;
    sched__queue_remove(&sc->waiting, s);
    if (!s->started && sc->prepare && sc->prepare(sc->prepare_ctx, s)) {
      sc->failed = s;
      break;
    }
    s->started = true;
    s->run_idx = sc->n_running;
    sc->running[sc->n_running++] = s;
    int32_t m = window_cap(s, s->n_tokens < budget ? s->n_tokens : budget);
    add(sc, s, m);
    budget -= m;
    reserved += need - prompt_blocks(sc, m);
  }
  return sc->n_batch;
}
