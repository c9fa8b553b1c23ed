/* fuzz-gguf: arbitrary bytes as a GGUF image (model_gguf_parse, the parser
 * behind model_gguf_open), then what loading a model reads from its metadata:
 * every value through the typed getters, the model config, the tokenizer
 * (encoding and decoding a fixed text with it) and the chat template.
 * A parse either fails with a message or gives an index whose views all lie
 * inside the image. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "model/gguf.h"
#include "model/weights.h"
#include "tests/fuzz/common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool inside(const void *p, uint64_t n, const uint8_t *data, size_t size) {
  const uint8_t *b = p;
  return n == 0 || (b >= data && b <= data + size && n <= (uint64_t)(data + size - b));
}

static void check_views(const model_gguf_t *g, const uint8_t *data, size_t size) {
  for (uint64_t i = 0; i < g->n_kv; i++) {
    const model_gguf_kv_t *kv = &g->kv[i];
    FUZZ_CHECK(inside(kv->key.ptr, kv->key.len, data, size));
    if (kv->type == MODEL_GGUF_STRING) FUZZ_CHECK(inside(kv->v.s.ptr, kv->v.s.len, data, size));
    if (kv->type != MODEL_GGUF_ARRAY) continue;
    if (kv->arr_type == MODEL_GGUF_STRING) {
      FUZZ_CHECK(kv->arr_strs);
      for (uint64_t k = 0; k < kv->arr_len; k++)
        FUZZ_CHECK(inside(kv->arr_strs[k].ptr, kv->arr_strs[k].len, data, size));
      continue;
    }
    /* numeric arrays: every element through both getters */
    for (uint64_t k = 0; k < kv->arr_len; k++) {
      int64_t iv;
      double dv;
      int a = model_gguf_arr_i64(kv, k, &iv), b = model_gguf_arr_f64(kv, k, &dv);
      FUZZ_CHECK(a == 0 || a == -EINVAL);
      FUZZ_CHECK(b == 0 || b == -EINVAL);
    }
    int64_t iv;
    FUZZ_CHECK(model_gguf_arr_i64(kv, kv->arr_len, &iv) == -EINVAL);
  }
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const model_gguf_tensor_t *t = &g->tensors[i];
    FUZZ_CHECK(inside(t->name.ptr, t->name.len, data, size));
    FUZZ_CHECK(t->n_dims >= 1 && t->n_dims <= 4);
    FUZZ_CHECK(inside(t->data, t->nbytes, data, size));
    FUZZ_CHECK(t->offset % g->alignment == 0);
  }
}

/* The typed getters on every key, by its own name as loaders look it up. */
static void check_getters(const model_gguf_t *g) {
  for (uint64_t i = 0; i < g->n_kv; i++) {
    const model_gguf_kv_t *kv = &g->kv[i];
    if (kv->key.len > 255 || memchr(kv->key.ptr, 0, kv->key.len)) continue;
    char key[256];
    memcpy(key, kv->key.ptr, kv->key.len);
    key[kv->key.len] = '\0';
    FUZZ_CHECK(model_gguf_find(g, key) != NULL);
    int64_t iv;
    double dv;
    bool bv;
    model_gguf_str_t sv;
    int rc = model_gguf_get_i64(g, key, &iv);
    FUZZ_CHECK(rc == 0 || rc == -EINVAL);
    rc = model_gguf_get_f64(g, key, &dv);
    FUZZ_CHECK(rc == 0 || rc == -EINVAL);
    rc = model_gguf_get_bool(g, key, &bv);
    FUZZ_CHECK(rc == 0 || rc == -EINVAL);
    rc = model_gguf_get_str(g, key, &sv);
    FUZZ_CHECK(rc == 0 || rc == -EINVAL);
  }
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const model_gguf_tensor_t *t = &g->tensors[i];
    if (t->name.len > 255 || memchr(t->name.ptr, 0, t->name.len)) continue;
    char name[256];
    memcpy(name, t->name.ptr, t->name.len);
    name[t->name.len] = '\0';
    FUZZ_CHECK(model_gguf_tensor(g, name) != NULL);
  }
}

/* The tokenizer built from the image's vocabulary must encode and decode. */
static void check_tokenizer(const model_gguf_t *g) {
  char err[256];
  model_tok_t *tok = NULL;
  int rc = model_tok_from_gguf(&tok, g, err, sizeof err);
  if (rc) {
    FUZZ_CHECK(!tok && err[0]);
    return;
  }
  static const char text[] = "Hello world! <|im_start|>user\n\xc3\xa9t\xc3\xa9 12345 \xe4\xbd\xa0\xe5\xa5\xbd"
                             "  \t\xf0\x9f\x98\x80<s>\xff";
  int32_t n_vocab = model_tok_n_vocab(tok);
  FUZZ_CHECK(n_vocab > 0);
  size_t cap = sizeof text, n = 0;
  int32_t *ids = malloc(cap * sizeof *ids);
  FUZZ_CHECK(ids);
  rc = model_tok_encode(tok, text, sizeof text - 1, true, ids, cap, &n);
  if (rc == -ENOSPC) {
    FUZZ_CHECK(n > cap);
    cap = n;
    ids = realloc(ids, cap * sizeof *ids);
    FUZZ_CHECK(ids);
    rc = model_tok_encode(tok, text, sizeof text - 1, true, ids, cap, &n);
  }
  FUZZ_CHECK(rc == -EINVAL && n <= cap); /* the text ends in a bad byte */
  for (size_t i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < n_vocab);
  char out[4096];
  model_tok_decode(tok, ids, n, true, out, sizeof out);
  model_detok_t d;
  model_detok_init(&d);
  for (size_t i = 0; i < n; i++) {
    char chunk[256];
    size_t k = model_detok_push(&d, tok, ids[i], chunk, sizeof chunk);
    FUZZ_CHECK(k < sizeof chunk);
  }
  model_detok_flush(&d, out, sizeof out);
  free(ids);
  int32_t bos = model_tok_bos(tok), eos = model_tok_eos(tok);
  FUZZ_CHECK(bos >= -1 && bos < n_vocab && eos >= -1 && eos < n_vocab);
  size_t len;
  if (bos >= 0) FUZZ_CHECK(model_tok_piece(tok, bos, true, &len) != NULL);

  /* the chat template, as pressd serve detects it */
  model_gguf_str_t t;
  if (model_gguf_get_str(g, "tokenizer.chat_template", &t) == 0) {
    char *tmpl = strndup(t.ptr, t.len);
    FUZZ_CHECK(tmpl);
    model_chat_t chat;
    if (model_chat_init_detect(&chat, tmpl, "<s>", "</s>", err, sizeof err) == 0) {
      model_chat_msg_t msgs[3] = {{"system", "be brief"}, {"user", "hi"}, {"assistant", "hello"}};
      char *prompt = NULL;
      if (model_chat_render(&chat, msgs, 3, true, &prompt, err, sizeof err) == 0)
        FUZZ_CHECK(prompt);
      free(prompt);
      model_chat_destroy(&chat);
    }
    free(tmpl);
  }
  model_tok_free(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  model_gguf_t g;
  char err[256];
  int rc = model_gguf_parse(&g, data, size, err, sizeof err);
  if (rc) {
    FUZZ_CHECK(rc == -EINVAL || rc == -ENOMEM);
    FUZZ_CHECK(err[0] && memchr(err, 0, sizeof err));
    FUZZ_CHECK(!g.kv && !g.tensors);
    return 0;
  }
  FUZZ_CHECK(g.version == 2 || g.version == 3);
  FUZZ_CHECK(g.alignment && !(g.alignment & (g.alignment - 1)));
  check_views(&g, data, size);
  check_getters(&g);
  model_config_t c;
  if (model_config_from_gguf(&c, &g, err, sizeof err) == 0)
    FUZZ_CHECK(model_config_check(&c, err, sizeof err) == 0);
  check_tokenizer(&g);
  model_gguf_close(&g);
  return 0;
}
