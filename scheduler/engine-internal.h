/* Internals of the engine shared by its files: the state of one request's
 * sequence, the scheduler's queues, the batch picker, and stop-string
 * matching.
 *
 * The picker (batch.c) is a function of the sequence states and the block
 * pool only: no model, no backend, no threads. The engine calls it once per
 * step; the scheduler benchmark calls it alone. */
#ifndef PRESSD_SCHED_ENGINE_INTERNAL_H
#define PRESSD_SCHED_ENGINE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/tokenizer.h"
#include "paged/seq.h"
#include "scheduler/engine.h"
#include "scheduler/sample.h"

/* Text a sequence has decoded but not emitted yet: a tail that may be the
 * start of a stop string. */
typedef struct sched__text {
  char *buf; /* owns: [cap] */
  size_t n, cap;
} sched__text_t;

typedef struct sched__seq sched__seq_t;
struct sched__seq {
  /* what the picker reads every step, together */
  int32_t run_idx;    /* index in running[], -1 when not running */
  int32_t chunk;      /* tokens scheduled in this step, 0 when none */
  int32_t n_tokens;   /* prompt + generated so far */
  int32_t n_computed; /* tokens whose K/V are in the cache */
  kv_seq_t kv;
  /* the rest */
  sched_request_t *req;      /* owns (NULL in the benchmark) */
  sched__seq_t *prev, *next; /* links in the inbox or the waiting queue */
  sched__seq_t *hnext;       /* id hash chain */
  int32_t *tokens;           /* owns: [cap] the prompt, then the generated ids */
  int32_t cap;               /* min(n_prompt + max_tokens, max_model_len) */
  int32_t n_prompt;          /* the request's prompt */
  int32_t n_gen;             /* tokens generated */
  bool started;              /* sampler ready: admitted at least once */
  bool prompt_counted;       /* prompt tokens added to the stats */
  bool finished;             /* finished in this step, to be freed */
  bool queue_reported;       /* the first event (with the queue time) went out */
  int64_t t_queued_ns;       /* monotonic: entered the waiting queue */
  int64_t t_admitted_ns;     /* monotonic: first admitted (0: not yet) */
  /* KV compression (kvc.c) */
  int32_t obs_window;        /* picker: keep the last obs_window prompt tokens in one chunk */
  int32_t fill_chunk;        /* > 0: compressed after every fill_chunk prompt tokens */
  int32_t since_compress;    /* decode steps since the last compression */
  bool prefill_compressed;   /* the compression after the prefill ran */
  bool kvc_counted;          /* counted among the engine's compressing sequences */
  /* owns: the prefill's observations until it is compressed, one buffer
   * per KV arena (backend memory of its rank; [0]: the only one without
   * tensor parallelism); NULL when not asked */
  float **obs_mass, **obs_last;
  float *obs_prev;           /* owns: with fill_chunk, the scores before this window */
  int64_t kv_evicted;        /* KV entries evicted, all heads */
  sched_sampler_t smp;
  model_detok_t dt;
  sched__text_t held;
};

/* A doubly-linked FIFO of sequences. */
typedef struct sched__queue {
  sched__seq_t *head, *tail;
  int32_t n;
} sched__queue_t;

void sched__queue_push_back(sched__queue_t *q, sched__seq_t *s);
void sched__queue_push_front(sched__queue_t *q, sched__seq_t *s);
void sched__queue_remove(sched__queue_t *q, sched__seq_t *s);

/* The scheduler's state: the running sequences in admission order (the
 * newest last), the waiting queue, and the plan of the last pick. */
typedef struct sched__sched {
  kv_pool_t *pool; /* borrows */
  int32_t max_num_seqs, max_num_batched_tokens;
  int32_t block_size;
  int32_t heads;     /* n_layers * n_kv_heads: blocks per block_size tokens */
  int32_t watermark; /* free blocks kept back when admitting beside others */
  sched__seq_t **running; /* owns (the array): [max_num_seqs] */
  int32_t n_running;
  sched__queue_t waiting;
  uint64_t preemptions;
  /* Called before a sequence is admitted for the first time (the engine
   * sets up its sampler); nonzero fails the sequence. May be NULL. */
  int (*prepare)(void *ctx, sched__seq_t *s);
  void *prepare_ctx;
  /* The plan of the last pick: sequences in batch order, each with its
   * chunk of new tokens (slots already appended to its kv). */
  sched__seq_t **batch; /* owns (the array): [max_num_seqs] */
  int32_t n_batch, n_batch_tokens;
  int32_t n_preempted;  /* in the last pick */
  /* After a compression forced by memory pressure, no admissions until a
   * sequence finishes or is preempted (no compress-refill thrash). */
  bool hold_admissions;
  sched__seq_t *failed; /* removed from waiting because prepare failed */
} sched__sched_t;

int sched__sched_init(sched__sched_t *sc, kv_pool_t *pool, int32_t max_num_seqs,
                      int32_t max_num_batched_tokens, int32_t n_layers, int32_t n_kv_heads,
                      int32_t block_size);
void sched__sched_destroy(sched__sched_t *sc); /* NULL-safe; sequences are the caller's */

/* Pick this step's batch: running decodes first (one token each, oldest
 * first), then the next chunks of partially prefilled sequences, then new
 * admissions from the waiting queue, FCFS, while the token budget, the
 * sequence cap and the free blocks (above the watermark) allow. When a
 * running sequence cannot get a block, the newest running sequence is
 * preempted by recompute: its blocks are freed and it goes back to the
 * front of the waiting queue with n_computed = 0. Appends the KV slots of
 * every chunk. Cost: O(running + admitted), never a scan of the pool or of
 * the waiting queue beyond its head. Returns the batch size. */
int32_t sched__pick(sched__sched_t *sc);

/* Take s out of running[] (O(n_running)). */
void sched__running_remove(sched__sched_t *sc, sched__seq_t *s);
/* Drop every sequence with ->finished from running[], keeping the order;
 * calls done(ctx, s) for each. One pass. */
void sched__running_compact(sched__sched_t *sc, void (*done)(void *ctx, sched__seq_t *s),
                            void *ctx);

/* Monotonic clock, nanoseconds. */
int64_t sched__now_ns(void);

/* ---- KV compression (kvc.c) ---------------------------------------------
 * When a sequence's KV is compressed and what the kernels must observe for
 * it. The plan (paged/compress) reads scores and positions in host memory.
 * On a device (or with via_backend) the kernels write them, and the prefill's
 * observations, in backend memory; each compression first reads the
 * sequence's blocks of them back (read_rows) into a host mirror of the
 * arena's score and pos arrays, indexed by slot like the arena itself, so
 * the planner runs unchanged. Compression between prefill chunks needs the
 * scores in host memory (set aside and merged in place): host backends only. */
typedef struct sched__kvc {
  k_backend_t *be;              /* borrows: rank 0's (observations, scores' mirror) */
  /* borrow: the KV arenas, one, or one per tensor-parallel rank (each the
   * blocks of its heads, on its backend) */
  int32_t n_arenas;
  const k_kv_arena_t *arenas;   /* [n_arenas] */
  k_backend_t *const *arena_be; /* [n_arenas] */

  kv_pool_t *pool;              /* borrows */
  sched_stats_t *st;            /* borrows: counters */
  int32_t n_layers, n_kv_heads, group;
  kv_compress_plan_t plan;
  bool via_backend;             /* scores read back through the backend (above) */
  float *m_score;               /* owns (host, via_backend): [n_slots] mirror (lazy pages) */
  int32_t *m_pos;               /* owns (host, via_backend): [n_slots] mirror */
  int32_t *rows;                /* owns: [cap_rows] block ids of the sequence read back */
  float *stage;                 /* owns: [cap_stage] their rows (block_size floats each) */
  size_t cap_rows, cap_stage;
  float *h_mass, *h_last;       /* owns: host copies of a sequence's observations */
  float *h_rank;                /* owns: one rank's, before they are summed */
  size_t cap_mass, cap_last, cap_rank; /* floats */
  struct k_pool *par;           /* owns: threads the planner ranks heads on (NULL: one) */
} sched__kvc_t;

/* via_backend: plan from scores read back through the backend even where
 * they are in host memory (a device backend always does, and so do ranks
 * with arenas of their own): tests run the device's path on the CPU. */
void sched__kvc_init(sched__kvc_t *k, int32_t n_arenas, k_backend_t *const *arena_be,
                     const k_kv_arena_t *arenas, kv_pool_t *pool, sched_stats_t *st,
                     int32_t n_layers, int32_t n_kv_heads, int32_t group, bool via_backend);
/* Rank r's view of s (r > 0, with an arena per rank): v, sched__kvc_view's,
 * with the observation buffers of rank r, where its kernels write. */
void sched__kvc_view_rank(const sched__kvc_t *k, const sched__seq_t *s, int32_t r,
                          k_seq_kv_t *v);
/* Whether this engine can compress s between prefill chunks (host scores). */
bool sched__kvc_chunks_ok(const sched__kvc_t *k);
void sched__kvc_destroy(sched__kvc_t *k); /* NULL-safe */
/* Whether s compresses at all. */
bool sched__kvc_enabled(const sched__seq_t *s);
/* s's view for this step: scores asked where its policy needs them (the
 * observation window when this chunk ends its prompt; p^2 sums on decode).
 * -ENOMEM when the observation buffers cannot be had (scores then skipped). */
int sched__kvc_view(sched__kvc_t *k, sched__seq_t *s, k_seq_kv_t *v);
/* After s's chunk was computed: compress when due (prompt done, or every
 * interval decode steps). */
void sched__kvc_after(sched__kvc_t *k, sched__seq_t *s);
/* Compress s now, freeing at least min_free blocks if its KVs allow (memory
 * pressure; 0: the policy's budget only). s must have no slot appended
 * but not yet computed. Returns the blocks freed. */
int32_t sched__kvc_compress(sched__kvc_t *k, sched__seq_t *s, int32_t min_free);
/* The end of the prompt segment s is prefilling: n_tokens, or with
 * fill_chunk the next multiple of it (s is compressed there). */
static inline int32_t sched__seg_end(const sched__seq_t *s) {
  if (s->fill_chunk <= 0) return s->n_tokens;
  int32_t end = (s->n_computed / s->fill_chunk + 1) * s->fill_chunk;
  return end < s->n_tokens ? end : s->n_tokens;
}
/* What a sequence of n tokens compressed between prefill chunks holds per
 * head besides the chunk itself: its budget (or its protected positions,
 * if more) and slack for partly filled blocks. */
int64_t sched__kvc_fill_base(const kv_compress_params_t *p, int32_t n, int32_t block_size);
/* With fill_chunk: the tokens per head s holds at most while it prefills
 * (sched__kvc_fill_base at n_tokens, plus one chunk). */
int32_t sched__kvc_fill_peak(const sched__seq_t *s, int32_t block_size);
/* KV entries s holds, all heads. */
int64_t sched__kvc_held(const sched__seq_t *s);
void sched__kvc_seq_free(sched__kvc_t *k, sched__seq_t *s);

/* ---- stop strings (stop.c) ----------------------------------------------- */

int sched__text_init(sched__text_t *t, size_t cap);
void sched__text_destroy(sched__text_t *t); /* NULL-safe */
/* Append n bytes of new text and decide what may be emitted: returns the
 * number of bytes at the front of t->buf that can go out now. When a stop
 * string occurs, *stopped is set and the bytes before its first occurrence
 * are returned; the rest is never to be emitted. Otherwise the longest tail
 * that could begin a stop string is held back, unless final. */
size_t sched__text_feed(sched__text_t *t, char *const *stop, int32_t n_stop, const char *text,
                        size_t n, bool final, bool *stopped);
/* Forget the first k bytes (after they were emitted), or all when stopped. */
void sched__text_consume(sched__text_t *t, size_t k, bool stopped);

#endif
