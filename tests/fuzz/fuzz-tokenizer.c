/* fuzz-tokenizer: arbitrary bytes encoded with the default model's tokenizer
 * (control tokens parsed and not), then decoded whole and incrementally.
 * Checks what the tokenizer promises (model/tokenizer.h, tests/test-tokenizer.c):
 *  - encode returns 0 for valid UTF-8 and -EINVAL otherwise, ids always written;
 *  - every id is in the vocabulary;
 *  - a too small buffer gives -ENOSPC (even for invalid UTF-8), the same
 *    count and the same prefix;
 *  - decode measures like snprintf and NUL-terminates;
 *  - the incremental detokeniser only emits whole UTF-8 characters;
 *  - decode(encode(x)) == x for valid UTF-8 without NUL whose bytes all have
 *    a single-byte token (byte-level BPE is lossless there), and streaming
 *    the ids gives x back too when control tokens were not parsed. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "tests/fuzz/common.h"

static fuzz_model_t g_model;
static bool g_has_byte[256]; /* a token decodes to exactly this byte */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  fuzz_load_model(&g_model, "fuzz-tokenizer");
  for (int32_t id = 0; id < model_tok_n_vocab(g_model.tok); id++) {
    size_t len;
    const char *p = model_tok_piece(g_model.tok, id, false, &len);
    if (len == 1) g_has_byte[(unsigned char)p[0]] = true;
  }
  return 0;
}

static bool lossless(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!g_has_byte[(unsigned char)s[i]]) return false;
  return fuzz_utf8_ok(s, n) && !memchr(s, 0, n);
}

static void check_decode(const int32_t *ids, size_t n_ids, const char *text, size_t len,
                         bool special, bool want_text) {
  const model_tok_t *t = g_model.tok;
  size_t need = model_tok_decode(t, ids, n_ids, true, NULL, 0);
  char *buf = malloc(need + 1);
  FUZZ_CHECK(buf);
  memset(buf, 'x', need + 1);
  FUZZ_CHECK(model_tok_decode(t, ids, n_ids, true, buf, need + 1) == need);
  FUZZ_CHECK(buf[need] == '\0');
  if (want_text) FUZZ_CHECK(need == len && memcmp(buf, text, len) == 0);
  if (need > 0) { /* truncated like snprintf: need - 1 bytes and the NUL */
    FUZZ_CHECK(model_tok_decode(t, ids, n_ids, true, buf, need) == need);
    FUZZ_CHECK(buf[need - 1] == '\0');
  }
  free(buf);

  /* streamed: whole characters only; without control tokens, the text back */
  model_detok_t d;
  model_detok_init(&d);
  char *all = malloc(3 * need + 64); /* each byte at most one U+FFFD */
  FUZZ_CHECK(all);
  size_t o = 0;
  for (size_t i = 0; i < n_ids; i++) {
    char chunk[256];
    size_t k = model_detok_push(&d, t, ids[i], chunk, sizeof chunk);
    FUZZ_CHECK(k < sizeof chunk && chunk[k] == '\0');
    FUZZ_CHECK(fuzz_utf8_ok(chunk, k));
    FUZZ_CHECK(d.n_pending < sizeof d.pending);
    memcpy(all + o, chunk, k);
    o += k;
  }
  char tail[64];
  size_t k = model_detok_flush(&d, tail, sizeof tail);
  FUZZ_CHECK(fuzz_utf8_ok(tail, k) && d.n_pending == 0);
  memcpy(all + o, tail, k);
  o += k;
  if (want_text && !special) FUZZ_CHECK(o == len && memcmp(all, text, len) == 0);
  free(all);
}

static void encode_one(const char *text, size_t len, bool special) {
  const model_tok_t *t = g_model.tok;
  int32_t n_vocab = model_tok_n_vocab(t);
  size_t cap = len + 2, n = 0;
  int32_t *ids = malloc(cap * sizeof *ids);
  FUZZ_CHECK(ids);
  int rc = model_tok_encode(t, text, len, special, ids, cap, &n);
  FUZZ_CHECK((rc == -ENOSPC) == (n > cap)); /* callers rely on it to size their buffer */
  if (rc == -ENOSPC) {
    free(ids);
    cap = n;
    ids = malloc(cap * sizeof *ids);
    FUZZ_CHECK(ids);
    size_t n2 = 0;
    rc = model_tok_encode(t, text, len, special, ids, cap, &n2);
    FUZZ_CHECK(rc != -ENOSPC && n2 == n);
  }
  bool valid = fuzz_utf8_ok(text, len);
  FUZZ_CHECK(rc == (valid ? 0 : -EINVAL));
  for (size_t i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < n_vocab);

  if (n > 1) { /* a short buffer: -ENOSPC, the same count, the same prefix */
    size_t half = n / 2, n3 = 0;
    int32_t *part = malloc(half * sizeof *part);
    FUZZ_CHECK(part);
    FUZZ_CHECK(model_tok_encode(t, text, len, special, part, half, &n3) == -ENOSPC);
    FUZZ_CHECK(n3 == n && memcmp(part, ids, half * sizeof *part) == 0);
    free(part);
  }
  check_decode(ids, n, text, len, special, lossless(text, len));
  free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  encode_one((const char *)data, size, false);
  encode_one((const char *)data, size, true);
  return 0;
}
