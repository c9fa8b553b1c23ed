/* KV compression of one sequence (ALGORITHMS.md §2-§4): decide which KVs of
 * every (layer, KV head) go, plan the compaction moves that make whole tail
 * blocks free, and, once the backend has moved the slots, shorten the heads
 * and give the freed blocks back to the pool.
 *
 *   kv_compress_plan()   reads scores and positions (host copies), writes a
 *                        plan: per head the KVs evicted, the moves (src ->
 *                        dst arena slots) and the blocks that will be freed;
 *   backend kv_move()    copies K, V, score and position along the moves;
 *   kv_compress_apply()  ctx[l][h] -= evicted, tail blocks back to the pool.
 *
 * Policies:
 *   KV_POLICY_KVCOMPRESS  KV-Compress: per-head ranking by score, block cost
 *                         = score at sorted index (n-1)*B + hang - 1, the
 *                         cheapest blocks first, spread over heads by
 *                         layer_budget (global greedy, uniform per layer, or
 *                         ZigZagKV per-layer quotas from obs_mass);
 *   KV_POLICY_DBUDGET     the same ranking and order, but each layer stops
 *                         where DBudgetKV's attention-mass criterion (from
 *                         obs_last, threshold dbudget_threshold) would be
 *                         broken; a ratio, when given, caps the pruning;
 *   KV_POLICY_STREAMING   StreamingLLM baseline: keep the sinks and the most
 *                         recent positions, same budgets;
 *   KV_POLICY_RANDOM      random eviction baseline (seeded), same budgets.
 * Never evicted (score +inf): positions > last_pos - protected_window, the
 * first `sinks` positions. */
#ifndef PRESSD_PAGED_COMPRESS_H
#define PRESSD_PAGED_COMPRESS_H

#include <stdbool.h>
#include <stdint.h>

#include "paged/pool.h"
#include "paged/seq.h"

typedef enum kv_policy {
  KV_POLICY_NONE = 0,
  KV_POLICY_KVCOMPRESS,
  KV_POLICY_DBUDGET,
  KV_POLICY_STREAMING,
  KV_POLICY_RANDOM,
} kv_policy_t;

typedef enum kv_layer_budget {
  KV_LAYER_GLOBAL = 0, /* one greedy over all layers' block costs */
  KV_LAYER_UNIFORM,    /* every layer the same quota */
  KV_LAYER_ZIGZAG,     /* ZigZagKV quotas from layer uncertainty */
} kv_layer_budget_t;

typedef struct kv_compress_params {
  kv_policy_t policy;
  kv_layer_budget_t layer_budget;
  double ratio;              /* >= 1, or 0: not given */
  int32_t max_cache_tokens;  /* average tokens per head, or 0: from ratio */
  int32_t min_tokens;        /* floor of the ratio budget (reference: 128) */
  int32_t protected_window;  /* newest positions kept */
  int32_t sinks;             /* first positions kept */
  float dbudget_threshold;   /* T of DBudgetKV (0.01) */
  /* DBudgetKV's measure of the last prompt query's attention over the kept
   * KVs: false, the paper's norm sqrt(sum a^2); true, the mass sum a. The
   * norm hardly moves when many small weights go (a^2 of 1e-3 is 1e-6),
   * though their mass, and so the attention's output, may move a lot. */
  bool dbudget_mass;
  float zigzag_tau;          /* mass fraction for MBA (0.9) */
  float zigzag_bound;        /* B_bound = zigzag_bound * B_avg (0.2) */
  uint64_t seed;             /* KV_POLICY_RANDOM */
  /* KV_POLICY_KVCOMPRESS: rank by score per observing query instead of the
   * raw sum (KV-Compress's definition). A KV at position p was scored by the
   * queries at positions max(p, obs_start) .. last_pos (the observation
   * window, then every decode step), so raw sums favour old KVs. */
  bool per_query;
} kv_compress_params_t;

/* Defaults: kvcompress, global, ratio 0, min_tokens 128, protected 32,
 * sinks 4, threshold 0.01 of the mass, tau 0.9, bound 0.2, seed 0, raw sums. */
void kv_compress_params_default(kv_compress_params_t *p);

/* What one sequence needs for a plan. score/pos are the arena's per-slot
 * arrays (host memory, [n_blocks * block_size]). obs_mass ([L][H][stride*B],
 * attention mass by logical slot) is needed by KV_LAYER_ZIGZAG, obs_last
 * ([L][H*G][stride*B], last prompt query's p^2 by logical slot) by
 * KV_POLICY_DBUDGET; both come from the prefill attention (k_seq_kv_t). */
typedef struct kv_compress_input {
  const kv_seq_t *seq;
  const float *score;
  const int32_t *pos;
  int32_t n_tokens;          /* tokens the sequence covers (budget by ratio) */
  int32_t last_pos;          /* newest position in the cache */
  int32_t group;             /* G: query heads per KV head (obs_last) */
  const float *obs_mass;     /* NULL unless zigzag */
  const float *obs_last;     /* NULL unless dbudget */
  int32_t min_free_blocks;   /* free at least this many (memory pressure), 0: none */
  int32_t obs_start;         /* first position of the observation window (per_query) */
} kv_compress_input_t;

/* A plan. Owns its arrays; reusable across calls (grows as needed). */
/* A parallel loop the owner of a plan may lend it: run(ctx, n, fn, arg)
 * calls fn(arg, i, thread) for every i in [0, n), thread < threads, and
 * returns when all are done. The planner ranks the heads through it. */
typedef void (*kv_par_fn)(void *arg, int64_t i, int32_t thread);
typedef struct kv_par {
  void (*run)(void *ctx, int64_t n, kv_par_fn fn, void *arg);
  void *ctx;
  int32_t threads;
} kv_par_t;

typedef struct kv_compress_plan {
  kv_par_t par;              /* set by the owner; zero: one thread */
  int32_t n_heads_total;     /* L * H */
  int32_t *evict;            /* owns: [L * H] KVs each head drops */
  int32_t cap_heads;         /* entries evict[] has room for */
  int32_t *src, *dst;        /* owns: [n_moves] arena slots */
  int64_t n_moves, cap_moves;
  int32_t blocks_freed;      /* sum over heads of the tail blocks released */
  int64_t tokens_evicted;    /* sum of evict[] */
  int32_t budget_blocks;     /* the blocks the policy allowed to keep: the
                              * global budget (global), the sum of the layer
                              * quotas (uniform, zigzag, streaming, random),
                              * the blocks DBudgetKV kept (dbudget) */
  bool pressure_overrode;    /* min_free_blocks asked for more than the policy's stop */
  /* scratch (owned) */
  void *scratch;
  size_t scratch_cap;
} kv_compress_plan_t;

void kv_compress_plan_init(kv_compress_plan_t *pl);
void kv_compress_plan_destroy(kv_compress_plan_t *pl); /* NULL-safe */

/* Token budget (average per head) of a sequence of n tokens:
 * max_cache_tokens if set, else max(min_tokens, floor((floor(n / r) - 1) / B) * B),
 * or n when neither is set (no ratio: no limit) or r is 1 (keep everything). */
int32_t kv_compress_budget_tokens(const kv_compress_params_t *p, int32_t n, int32_t block_size);

/* Plan the compression of one sequence. Returns 0 (a plan with nothing to do
 * is fine), -EINVAL for inconsistent input, -ENOMEM. KV_POLICY_NONE plans
 * nothing, min_free_blocks included; without ratio and max_cache_tokens
 * the fixed-budget policies plan nothing either (no limit), DBudgetKV
 * prunes as far as its threshold allows. Under memory pressure the blocks
 * the policy left are taken in KV-Compress order (global cheapest first)
 * until min_free_blocks are freed or nothing evictable is left. */
int kv_compress_plan(kv_compress_plan_t *pl, const kv_compress_params_t *prm,
                     const kv_compress_input_t *in);

/* After the moves ran: shorten each head by evict[], release the freed tail
 * blocks to the pool. */
void kv_compress_apply(const kv_compress_plan_t *pl, kv_seq_t *seq, kv_pool_t *pool);

/* The whole compression of in->seq (which seq must be): plan, the backend's
 * kv_move over the arena, apply. 0, or the first error with the sequence
 * untouched. */
int kv_compress_run(kv_compress_plan_t *pl, const kv_compress_params_t *prm,
                    const kv_compress_input_t *in, k_backend_t *be, const k_kv_arena_t *arena,
                    kv_seq_t *seq, kv_pool_t *pool);
/* The same over the arenas of tensor-parallel ranks: arenas[r] (on bes[r])
 * holds the pool's blocks [first_block, first_block + n_blocks), and each
 * rank moves the slots of its own blocks. Should a rank's kv_move fail
 * after another's ran, that rank's evicted slots hold copies already. */
int kv_compress_run_on(kv_compress_plan_t *pl, const kv_compress_params_t *prm,
                       const kv_compress_input_t *in, int32_t n_arenas, k_backend_t *const *bes,
                       const k_kv_arena_t *arenas, kv_seq_t *seq, kv_pool_t *pool);

/* Scores of a sequence compressed between prefill chunks, where each
 * chunk's observation window scores the KVs in turn and a KV keeps the
 * most any one window gave it (summed, the KVs that survived earlier
 * chunks would outweigh the newest chunk's, however much the newest window
 * looks at them). prev is [n_layers * n_heads][max_blocks * block_size] by
 * logical slot.
 *
 * Before a window: each head's slots but its newest `fresh` ones (appended,
 * not yet computed) have their scores moved into prev and zeroed; prev is 0
 * for the rest of the head's row (the fresh slots and any the window will
 * append). */
void kv_scores_set_aside(const kv_seq_t *seq, float *score, int32_t fresh, float *prev);
/* After it: score = max(score, prev) over the sequence's slots. */
void kv_scores_merge_max(const kv_seq_t *seq, float *score, const float *prev);

#endif
