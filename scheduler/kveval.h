/* KV compression on one sequence, for quality evaluation (`pressd eval-kv`):
 * prefill a context once, keeping its scores and observations, then for
 * each setting restore that cache, compress it as the engine would after the
 * prefill, and measure: the log-likelihood of tokens that follow, or a
 * greedy continuation (decode scores and periodic compression as the engine
 * does them). Host-memory backends only (the cache is snapshotted in place). */
#ifndef PRESSD_SCHED_KVEVAL_H
#define PRESSD_SCHED_KVEVAL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "model/weights.h"
#include "scheduler/engine.h"

typedef struct sched_kveval sched_kveval_t;

/* Room for max_len tokens, forward chunks of chunk tokens. */
int sched_kveval_new(sched_kveval_t **out, const model_weights_t *w, k_backend_t *be,
                     int32_t max_len, int32_t chunk, char *err, size_t errlen);
void sched_kveval_free(sched_kveval_t *ev); /* NULL-safe */

/* Prefill ids (scores, attention mass, last-query probabilities) and
 * snapshot the cache. window > 0 (and < n): the last `window` queries are
 * observed apart from the others, so that settings with that observation
 * window and settings with none (0: the whole prompt) can both be
 * evaluated. -E2BIG past max_len. */
int sched_kveval_prefill(sched_kveval_t *ev, const int32_t *ids, int32_t n, int32_t window);

/* Prefill ids as the engine does with k when k->prefill_chunk > 0: chunk
 * by chunk, each chunk's last k->observation_window queries observed and
 * the cache compressed to k's budget for all n tokens after every chunk but
 * the last; then snapshot. sched_kveval_compress with k finishes it as
 * after any prefill. -EINVAL without a bounded budget. */
int sched_kveval_prefill_chunked(sched_kveval_t *ev, const int32_t *ids, int32_t n,
                                 const sched_kv_compression_t *k);

/* Back to the snapshot, then compress with k (policy none: not at all).
 * kept/evicted (where not NULL): KV entries, all heads. -EINVAL when k's
 * observation_window is neither 0 nor the prefill's window. */
int sched_kveval_compress(sched_kveval_t *ev, const sched_kv_compression_t *k, int64_t *kept,
                          int64_t *evicted);

/* -sum log p(ids[i] | cache, ids[<i]) over i in [0, n): ids[0] is scored
 * with the prefill's last logits, the rest by feeding ids[0..n-1). */
int sched_kveval_nll(sched_kveval_t *ev, const int32_t *ids, int32_t n, double *nll_sum);

/* Greedy decode of n tokens after the (compressed) cache, with decode
 * scores and a compression every k->interval tokens: out[i] is the argmax
 * after out[<i], or, teacher-forced when force is given, after force[<i]
 * (so one early disagreement does not change every later position). */
int sched_kveval_greedy(sched_kveval_t *ev, const sched_kv_compression_t *k, int32_t n,
                        const int32_t *force, int32_t *out);

/* KV entries per token (layers * KV heads), to turn entries into tokens. */
int32_t sched_kveval_heads(const sched_kveval_t *ev);

#endif
