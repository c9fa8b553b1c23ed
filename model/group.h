/* A model run by one or several tensor-parallel ranks as one: the engine
 * calls model_group_forward as it would model_forward. With one rank it is
 * model_forward on the caller's thread; with N, rank 0 runs on the caller's
 * thread and ranks 1..N-1 on threads of their own, each driving its backend,
 * all meeting in the communicator's all-reduces. */
#ifndef PRESSD_MODEL_GROUP_H
#define PRESSD_MODEL_GROUP_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/comm.h"
#include "model/llama.h"

typedef struct model_group {
  int32_t n;
  model_t *ranks;        /* owns: [n] */
  k_comm_t *comm;        /* borrows */
  pthread_t *threads;    /* owns: [n - 1] */
  int32_t n_threads;     /* started */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool sync_ok, quit;
  uint64_t step;         /* generation of the current job */
  int32_t pending;       /* ranks still running it */
  const model_batch_t *job;
  float *job_logits;
  int *rcs;              /* owns: [n] each rank's result */
} model_group_t;

/* weights[r] and bes[r] for each rank r < n (n == 1: unsharded weights and
 * no communicator); every rank reads the same KV arena kvs[r] layout (one
 * arena shared by host-memory ranks, or one per device). */
int model_group_init(model_group_t *g, int32_t n, const model_weights_t *weights,
                     k_backend_t *const *bes, const k_kv_arena_t *const *kvs, k_comm_t *comm,
                     int32_t cap_tokens, int32_t cap_logits, char *err, size_t errlen);
void model_group_destroy(model_group_t *g); /* NULL-safe, half-init safe */

/* One step on every rank; logits (host) receive [n_logits][n_vocab of the
 * whole model]. The first error of any rank, the others' collectives
 * aborted so that none waits. */
int model_group_forward(model_group_t *g, const model_batch_t *b, float *logits);
/* model_can_sample of the group: one rank that can. */
bool model_group_can_sample(const model_group_t *g);
/* model_can_penalize of the group. */
bool model_group_can_penalize(const model_group_t *g);
/* model_can_logprobs of the group. */
bool model_group_can_logprobs(const model_group_t *g);
/* model_set_graphs of an unsharded group (a sharded one stays eager). */
void model_group_set_graphs(model_group_t *g, bool on);
/* model_capture_graphs of an unsharded group. */
int model_group_capture_graphs(model_group_t *g, int32_t max_rows);
/* model_graph_rows of the group's step b (0: eager). */
int32_t model_group_graph_rows(const model_group_t *g, const model_batch_t *b);

#endif
