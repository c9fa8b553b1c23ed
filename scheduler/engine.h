/* The engine: one thread that owns sequences, KV blocks and the backend,
 * and runs continuous batching. The server (loop thread) talks to it only
 * through the functions below, which are thread-safe: requests and aborts go
 * in through an inbox; events come out through an outbox, and the engine
 * calls notify() (e.g. uv_async_send) whenever it posts events.
 *
 * Nothing here knows about HTTP. */
#ifndef PRESSD_SCHED_ENGINE_H
#define PRESSD_SCHED_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "paged/compress.h"
#include "scheduler/sample.h"

typedef struct sched_engine sched_engine_t;

/* A request as the engine receives it: token ids after chat templating and
 * tokenisation, sampling parameters, stop rules. The engine takes ownership
 * of the whole object (and every pointer in it) on a successful submit and
 * frees it with sched_request_free(). */
/* How one request's KV cache is compressed (ALGORITHMS.md): the planner's
 * parameters (policy KV_POLICY_NONE: never), the prefill observation window
 * (last prompt queries whose attention scores the prompt's KVs), the
 * max-pool width of those scores, the decode steps between compressions
 * (0: only after the prefill and under memory pressure), and the prefill
 * chunk: with a bounded budget (a ratio or max_cache_tokens), a prompt
 * longer than prefill_chunk tokens is prefilled prefill_chunk tokens at a
 * time and compressed to its budget after each chunk, the chunk's last
 * observation_window queries scoring it, so that its KV never holds the
 * whole prompt (0: only where the whole prompt's KV would not fit in the
 * KV cache, with a chunk the cache allows). */
typedef struct sched_kv_compression {
  kv_compress_params_t plan;
  int32_t observation_window;
  int32_t pool;
  int32_t interval;
  int32_t prefill_chunk;
} sched_kv_compression_t;

/* Defaults: policy none, window -1 (see sched_kv_window), pool 7,
 * interval 32, prefill chunk 0. */
void sched_kv_compression_default(sched_kv_compression_t *k);
/* The observation window k asks for: observation_window, or where that is
 * -1, 32 (0 for DBudgetKV's norm criterion, which is better served by the
 * whole prompt's scores). */
int32_t sched_kv_window(const sched_kv_compression_t *k);

typedef struct sched_request {
  uint64_t id;          /* chosen by the caller, unique among live requests */
  void *user;           /* opaque, echoed in every event */
  int32_t *prompt;      /* owns: [n_prompt] */
  int32_t n_prompt;
  int32_t max_tokens;   /* >= 1 */
  sched_sample_params_t sample;
  char **stop;          /* owns: [n_stop] NUL-terminated stop strings */
  int32_t n_stop;
  bool ignore_eos;
  int32_t logprobs;     /* -1: none; else the number of top alternatives (0..20) */
  sched_kv_compression_t kvc; /* KV compression of this request */
} sched_request_t;

sched_request_t *sched_request_new(void); /* zeroed, logprobs = -1, default sampling and
                                            * KV compression (none) */
void sched_request_free(sched_request_t *r); /* NULL-safe */

typedef enum sched_finish {
  SCHED_FINISH_NONE = 0,
  SCHED_FINISH_STOP,   /* EOS or a stop string */
  SCHED_FINISH_LENGTH, /* max_tokens or the context limit */
  SCHED_FINISH_ABORT,  /* aborted by the caller */
  SCHED_FINISH_ERROR,  /* the engine failed this request; see message */
} sched_finish_t;

#define SCHED_MAX_TOP_LOGPROBS 20

typedef struct sched_top_logprob {
  int32_t token;
  float logprob;
} sched_top_logprob_t;

/* One event for one request: new text (possibly empty, e.g. while a stop
 * string is being matched or a UTF-8 character is incomplete), and on the
 * last event of a request the finish reason and usage. */
typedef struct sched_event {
  uint64_t id;
  void *user;
  char *text;           /* owns: NUL-terminated delta text ("" when none) */
  size_t text_len;
  int32_t n_tokens;     /* tokens this event covers (0 or 1) */
  int32_t token;        /* the sampled token when n_tokens == 1 */
  float logprob;        /* its log-probability when the request asked */
  int32_t n_top;
  sched_top_logprob_t top[SCHED_MAX_TOP_LOGPROBS];
  sched_finish_t finish; /* NONE on all but the last event */
  int32_t prompt_tokens;
  int32_t completion_tokens;
  /* Last event: the request's KV entries after compression and those it
   * evicted, in tokens (entries / (layers * KV heads)); both 0 when it was
   * not compressed. */
  int32_t kv_tokens_kept, kv_tokens_evicted;
  char message[160];    /* for SCHED_FINISH_ERROR: a client-safe message */
  double queue_seconds; /* first event of a request only: waiting queue to first admission */
} sched_event_t;

void sched_event_clear(sched_event_t *ev); /* frees text */

typedef struct sched_engine_config {
  int32_t max_num_seqs;            /* running sequences at most */
  int32_t max_num_batched_tokens;  /* tokens per forward step */
  int32_t max_model_len;           /* prompt + completion at most */
  int32_t max_waiting;             /* waiting queue bound: submit gives -EAGAIN past it */
  int64_t kv_cache_memory;         /* bytes for the KV pool */
  void (*notify)(void *ctx);       /* called from the engine thread after posting events */
  void *notify_ctx;
  /* Called from the engine thread at least every alive_ms while it runs,
   * idle or busy (between steps), so that a watchdog hears from the thread
   * that would hang; NULL: never. */
  void (*alive)(void *ctx);
  void *alive_ctx;
  int32_t alive_ms;
  /* After every step, check the KV block accounting (pool against the
   * sequences' tables) and abort on a mismatch: for tests and soak runs. */
  bool debug_checks;
  /* The KV pool may hold fewer tokens than one sequence of max_model_len
   * (kv_cache_memory is then checked against a floor of 1,024 tokens only):
   * a request whose tokens would not fit in the pool runs only when its
   * compression has a bounded budget and a host-memory backend, compressed
   * between prefill chunks; submit refuses the others with -ENOSPC, and an
   * uncompressed request's completion ends ("length") when the pool is
   * full. */
  bool kv_below_max_len;
  /* Plan KV compressions from scores read back through the backend's
   * read_rows, as a device backend always does, even on host memory (tests
   * run the device's path on the CPU); compression between prefill chunks
   * is then off, as on a device. */
  bool kv_via_backend;
  /* Steps of up to 512 tokens as graphs (model_set_graphs; captured when
   * the engine is made): CUDA graphs on a backend with the replay op;
   * elsewhere the same padded rows run eagerly. Not under tensor
   * parallelism. */
  bool graphs;
  /* Called once from the engine thread when the backend can no longer run
   * (a failed step and its health op says the failure sticks): every
   * request has then ended with an error and the thread has stopped; the
   * process should exit so that a service manager restarts it. NULL: the
   * thread just stops. */
  void (*fatal)(void *ctx);
  void *fatal_ctx;
  /* Tensor parallelism (tp_size > 1): the forward runs on tp_size ranks, rank
   * r with the shard tp_weights[r] on tp_backends[r], summing through
   * tp_comm; sched_engine_new's w and be stay the whole model (its shape)
   * and rank 0's backend. On host memory the ranks share one KV arena on
   * be unless kv_per_rank; otherwise (always where a rank's memory is a
   * device's) the pool is cut into one part per rank and each rank keeps
   * its KV heads' blocks in an arena of its own backend's memory,
   * kv_cache_memory being the sum over the ranks, and writes the prefill's
   * observations into buffers of its own, which the host sums. */
  int32_t tp_size;
  const struct model_weights *tp_weights;
  struct k_backend *const *tp_backends;
  struct k_comm *tp_comm;
  bool kv_per_rank;
} sched_engine_config_t;

/* Upper bounds (seconds) of the compression-time histogram buckets. */
#define SCHED_KVC_N_BOUNDS 10
extern const double sched_kvc_bounds[SCHED_KVC_N_BOUNDS];

typedef struct sched_stats {
  int32_t running, waiting;
  int32_t kv_blocks_total, kv_blocks_used;
  /* Free blocks no sequence can use now: with the pool in one part per rank,
   * those free in a part beyond the fullest part's free count (0 otherwise). */
  int32_t kv_blocks_stranded;
  uint64_t preemptions;
  uint64_t prompt_tokens, generation_tokens; /* totals */
  uint64_t requests_finished;
  uint64_t steps;
  uint64_t graph_steps; /* of which run as graphs (model_graph_rows) */
  /* Liveness: how long the step now running has taken (0 when the engine
   * is between steps or idle), and whether the engine thread has ended. */
  double step_seconds;
  bool stopped;
  double busy_seconds;    /* time spent in steps, in all */
  double forward_seconds; /* of which in the model's forward passes (waits on a device included) */
  /* KV compression: blocks freed, compressions run, their durations
   * (histogram over SCHED_KVC_BOUNDS, plus the sum), memory-pressure
   * compressions, and plans where pressure overrode the dynamic budget. */
  uint64_t kv_blocks_freed;
  uint64_t kv_compressions;
  uint64_t kv_compress_hist[SCHED_KVC_N_BOUNDS + 1];
  double kv_compress_seconds;
  uint64_t kv_forced_compressions;
  uint64_t kv_budget_overrides;
  /* Finished compressed requests: the sum of their kept fractions. */
  double kv_kept_fraction_sum;
  uint64_t kv_compressed_requests;
} sched_stats_t;

/* The engine borrows the model pieces; they must outlive it. */
struct model_weights;
struct model_tok;
struct k_backend;
int sched_engine_new(sched_engine_t **out, const sched_engine_config_t *cfg,
                     const struct model_weights *w, struct k_backend *be,
                     const struct model_tok *tok, char *err, size_t errlen);
int sched_engine_start(sched_engine_t *e);  /* spawns the engine thread */
/* Stops the thread (running requests finish with SCHED_FINISH_ABORT) and
 * frees everything. NULL-safe. */
void sched_engine_free(sched_engine_t *e);

/* Thread-safe. 0: the engine owns r now. -EAGAIN: the waiting queue is full
 * (caller keeps r). -EINVAL: the prompt does not fit max_model_len.
 * -ENOSPC: the prompt does not fit in the KV pool, even compressed between
 * prefill chunks (see kv_below_max_len). */
int sched_engine_submit(sched_engine_t *e, sched_request_t *r);
/* Thread-safe; the request finishes with SCHED_FINISH_ABORT and its blocks
 * return to the pool at the next step. Unknown ids are ignored. */
void sched_engine_abort(sched_engine_t *e, uint64_t id);
/* Thread-safe: move up to max pending events into evs; returns the count. */
size_t sched_engine_poll(sched_engine_t *e, sched_event_t *evs, size_t max);
void sched_engine_stats(sched_engine_t *e, sched_stats_t *out);

/* KV capacity, fixed by sched_engine_new (for the start-up log line): the
 * pool's blocks (one block = block_size slots of one KV head of one layer),
 * the tokens they hold in every head of every layer, and how many sequences
 * of max_model_len fit at once. Any thread. */
typedef struct sched_capacity {
  int32_t kv_blocks;
  int32_t block_size;
  int64_t kv_tokens;
  int32_t max_model_len;
  double max_concurrency;
} sched_capacity_t;
void sched_engine_capacity(const sched_engine_t *e, sched_capacity_t *out);

#endif
