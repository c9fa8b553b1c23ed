/* The Llama forward pass over a batch of sequences, each contributing a
 * chunk of new tokens (a prefill chunk or one decode token). K/V are read
 * and written through the paged arena: the caller (scheduler) has already
 * appended slots for the new tokens; the kernels read its block tables in
 * place. */
#ifndef PRESSD_MODEL_LLAMA_H
#define PRESSD_MODEL_LLAMA_H

#include <stdbool.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/comm.h"
#include "model/weights.h"

typedef struct model_batch {
  int32_t n_seqs;
  int32_t n_tokens;
  const int32_t *tokens;       /* [n_tokens] */
  const int32_t *pos;          /* [n_tokens] position of each token */
  const int32_t *q_start;      /* [n_seqs + 1] token row offsets */
  const k_seq_kv_t *seqs;      /* [n_seqs] each sequence's KV, new slots appended */
  int32_t n_logits;            /* rows that need logits */
  const int32_t *logit_rows;   /* [n_logits] token rows, ascending */
  /* Optional [n_logits] (host), only where model_can_sample: each row's
   * token, drawn by the backend as draws[i] says (kernels/draw.h; draws
   * NULL: the argmax of every row). Then only the logits of the rows listed
   * in host_rows (indices into the logit rows, ascending) are copied to the
   * caller's logits, packed: [n_host_rows][n_vocab]. No copy of the other
   * rows off the device. */
  int32_t *ids;
  const k_draw_t *draws;
  const int32_t *host_rows;
  int32_t n_host_rows;
  /* Optional [n_logits] (host), with ids and only where model_can_penalize:
   * each row's penalties (kernels/draw.h), applied on the backend before
   * the draw; pen_ids and pen_seen hold the rows' packed entries. */
  const k_penalty_t *pens;
  const int32_t *pen_ids, *pen_seen;
  /* Optional [n_logits] (host), with ids and only where model_can_logprobs:
   * lp_want[i] >= 0 asks for row i's log-probabilities (kernels/draw.h) of
   * its drawn id and top lp_want[i] ids, into lp[i]. Not with pens on the
   * same row (they are of the raw logits). */
  const int32_t *lp_want;
  k_logprobs_t *lp;
  /* Optional, under tensor parallelism: [n_ranks] the views each rank's
   * attention reads (rank_seqs[r][i] is seqs[i] with the observation
   * buffers of rank r, where each rank's memory is its own); NULL: seqs
   * for every rank. */
  const k_seq_kv_t *const *rank_seqs;
} model_batch_t;

typedef struct model {
  const model_weights_t *w; /* borrows */
  k_backend_t *be;          /* borrows */
  const k_kv_arena_t *kv;   /* borrows */
  int32_t cap_tokens;       /* max tokens per forward */
  int32_t cap_logits;       /* max logit rows per forward */
  /* backend scratch, sized at init for cap_tokens: */
  float *x, *xn, *q, *k, *v, *att, *gate, *up; /* owns */
  float *logits;                               /* owns: [cap_logits][n_vocab] */
  float *inv_freq;                             /* owns: backend copy */
  int32_t *d_tokens, *d_pos, *d_rows;          /* owns: backend copies of batch arrays */
  int32_t *d_ids;                              /* owns: [cap_logits] drawn tokens */
  /* (host) [cap_tokens] ids (in a rank's vocabulary slice) and positions,
   * padded to a graph's rows: */
  int32_t *h_ids, *h_pos; /* owns */
  bool graphs;            /* steps as graphs (model_set_graphs) */
  uint32_t graph_id;      /* this model's keys of the backend's replay op */
  /* A tensor-parallel rank (w->shard.n_ranks > 1): */
  k_comm_t *comm;     /* borrows: sums the partial results of the ranks */
  float *h_logits;    /* owns (host): [cap_logits][slice] this rank's logits */
} model_t;

/* Backend bytes model_init allocates for these capacities (activations,
 * logits, copies of the batch arrays). */
size_t model_activation_bytes(const model_config_t *c, int32_t cap_tokens, int32_t cap_logits);

int model_init(model_t *m, const model_weights_t *w, k_backend_t *be, const k_kv_arena_t *kv,
               int32_t cap_tokens, int32_t cap_logits, char *err, size_t errlen);
void model_destroy(model_t *m); /* NULL-safe, half-init safe */

/* One forward step. logits (host memory) receives [n_logits][n_vocab]. A
 * rank of a sharded model (init with model_init_rank) computes its share
 * and writes its vocabulary columns of logits (row length: all of the
 * vocabulary); every rank of the group must run the same step at once
 * (model/group.h does). */
int model_forward(model_t *m, const model_batch_t *b, float *logits);
/* Whether model_forward draws a batch's tokens (b->ids): an unsharded
 * model on a backend with the sample and read_rows ops. */
bool model_can_sample(const model_t *m);
/* Whether it can also apply penalties before drawing (b->pens). */
bool model_can_penalize(const model_t *m);
/* Whether it can also work out log-probabilities (b->lp_want). */
bool model_can_logprobs(const model_t *m);

/* Steps as graphs: the work between two attention calls goes through the
 * backend's replay op (CUDA graphs) over the step's tokens rounded up to
 * 1, 2, 4 or a multiple of 8 rows (steps of at most 512 tokens, and
 * cap_tokens; longer ones run eagerly), whether they decode or prefill:
 * only the attention calls, which run outside the graphs, tell the two
 * apart. The extra rows are id 0 at position 0, computed and never read.
 * Not for a sharded rank (its all-reduces stay eager). Off by default; on a
 * backend without replay the same rows and calls run as they are (what
 * tests check). */
void model_set_graphs(model_t *m, bool on);
/* The rows model_forward runs b's segments over as graphs; 0: eagerly. */
int32_t model_graph_rows(const model_t *m, const model_batch_t *b);
/* With graphs on a backend with replay: capture now the graphs of every
 * bucket a step of up to max_rows tokens uses, instead of the
 * second time each comes (the segments run once over cap_tokens rows
 * first, so that no scratch of the backend grows after a capture). What
 * they compute is thrown away; the KV cache is not touched. */
int model_capture_graphs(model_t *m, int32_t max_rows);

/* model_init for one rank of sharded weights (model_weights_shard) whose
 * partial sums go through comm. */
int model_init_rank(model_t *m, const model_weights_t *w, k_backend_t *be, const k_kv_arena_t *kv,
                    k_comm_t *comm, int32_t cap_tokens, int32_t cap_logits, char *err,
                    size_t errlen);

#endif
