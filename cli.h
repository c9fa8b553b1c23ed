/* What the pressd commands share: the loaded model and its loaders. */
#ifndef PRESSD_CLI_H
#define PRESSD_CLI_H

#include <stddef.h>
#include <stdint.h>

#include "config/options.h"
#include "kernels/comm.h"
#include "model/chat.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "model/weights.h"

#define PRESSD_VERSION "0.1.0"

typedef struct loaded {
  model_gguf_t gguf;
  model_tok_t *tok;
  model_weights_t w;
  k_backend_t *be;
  char *chat_template; /* owns: the model's template text; NULL when it has none */
  /* --tensor-parallel-size > 1: each rank's backend and shard of w (which
   * they borrow rows of, on the CPU), and the communicator. With the ranks
   * on GPUs, be is the host backend the whole model was read into. */
  int32_t tp;
  k_backend_t **tp_be;     /* owns: [tp] */
  model_weights_t *tp_w;   /* owns: [tp] */
  k_comm_t *tp_comm;       /* owns */
} loaded_t;

/* The backend of rank 0, which the engine steps through: be, or under
 * tensor parallelism tp_be[0] (be then only read the model). */
static inline k_backend_t *cli_run_be(const loaded_t *m) { return m->tp > 1 ? m->tp_be[0] : m->be; }

/* --max-num-batched-tokens, 0 resolved for the backend the engine steps
 * through: 512 on the CPU, where prefill is compute-bound and a shorter chunk
 * is as fast (its activations stay in cache) and keeps the decodes batched
 * beside it waiting less; 2048 on a GPU; never fewer than --max-num-seqs. */
int32_t cli_step_tokens(const loaded_t *m, const cfg_options_t *o);

double cli_now_s(void);
/* Prints "pressd: msg" and returns 1 (the exit status). */
int cli_die(const char *msg);
/* The model, tokenizer and backend the options name. */
int cli_load_model(loaded_t *m, const cfg_options_t *o, char *err, size_t errlen);
void cli_loaded_destroy(loaded_t *m);
/* The chat template: --chat-template, else the model's; -ENOENT when none. */
int cli_load_chat(const loaded_t *m, const cfg_options_t *o, model_chat_t *chat, char *err,
                  size_t errlen);
/* [BOS] + the tokens of text (ill-formed UTF-8 becomes U+FFFD tokens). */
int cli_tokenize(const loaded_t *m, const char *text, int32_t **ids, size_t *n, char *err,
                 size_t errlen);

/* pressd eval-kv (eval.c) */
int cli_eval_kv(cfg_options_t *o);

#endif
