/* What the libFuzzer harnesses share: the default model's tokenizer and chat
 * template, loaded once per process, and an assertion that reports the
 * broken invariant before aborting (libFuzzer then saves the input). */
#ifndef PRESSD_FUZZ_COMMON_H
#define PRESSD_FUZZ_COMMON_H

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/chat.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

#define FUZZ_CHECK(cond)                                                      \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond); \
      abort();                                                                \
    }                                                                         \
  } while (0)

typedef struct fuzz_model {
  model_gguf_t gguf;
  model_tok_t *tok;
  model_chat_t chat;
} fuzz_model_t;

/* Loads $PRESSD_MODEL (default: the source tree's models/ file). Exits with
 * a message naming the file when it cannot, as there is nothing to fuzz. */
void fuzz_load_model(fuzz_model_t *m, const char *harness);

/* True when s[0..n) is well-formed UTF-8 (no surrogates, no overlongs). */
bool fuzz_utf8_ok(const char *s, size_t n);

#endif
