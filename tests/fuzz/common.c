#include "tests/fuzz/common.h"

#include <string.h>

#include "tests/test.h"

#ifndef FUZZ_DEFAULT_MODEL
#define FUZZ_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

static void die(const char *harness, const char *path, const char *why) {
  fprintf(stderr,
          "%s: cannot load the model %s: %s\n"
          "  set PRESSD_MODEL to a GGUF file, or run scripts/fetch-model for the default one\n",
          harness, path, why);
  exit(2);
}

void fuzz_load_model(fuzz_model_t *m, const char *harness) {
  const char *path = getenv("PRESSD_MODEL");
  if (!path || !*path) path = FUZZ_DEFAULT_MODEL;
  char err[256];
  memset(m, 0, sizeof *m);
  if (model_gguf_open(&m->gguf, path, err, sizeof err)) die(harness, path, err);
  if (model_tok_from_gguf(&m->tok, &m->gguf, err, sizeof err)) die(harness, path, err);
  model_gguf_str_t t;
  if (model_gguf_get_str(&m->gguf, "tokenizer.chat_template", &t))
    die(harness, path, "it has no tokenizer.chat_template");
  char *tmpl = strndup(t.ptr, t.len);
  size_t n;
  int32_t bos = model_tok_bos(m->tok), eos = model_tok_eos(m->tok);
  char *bos_s = bos >= 0 ? strdup(model_tok_piece(m->tok, bos, true, &n)) : NULL;
  char *eos_s = eos >= 0 ? strdup(model_tok_piece(m->tok, eos, true, &n)) : NULL;
  int rc = tmpl ? model_chat_init_detect(&m->chat, tmpl, bos_s, eos_s, err, sizeof err) : -1;
  free(tmpl);
  free(bos_s);
  free(eos_s);
  if (rc) die(harness, path, err);
}

bool fuzz_utf8_ok(const char *s, size_t n) { return test_utf8_ok(s, n); }
