/* Tokenizer: ids identical to llama.cpp on every string of
 * tests/fixtures/tokenizer-smollm2.json (scripts/reference/tokenizer_fixtures.py),
 * also with the same vocabulary under other pre-tokenizer names; decoding
 * identical to llama_detokenize; the incremental detokeniser never emitting
 * half a character; -ENOSPC; ill-formed input; encode speed; the vocabulary
 * loaded from a tokenizer.json; and a tiny SentencePiece vocabulary whose GGUF
 * image and reference ids come from the fixture. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>

#include "model/gguf.h"
#include "model/tokenizer.h"
#include "tests/test.h"

#if defined(__SANITIZE_ADDRESS__)
#define SLOW_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SLOW_BUILD 1
#endif
#endif
#ifndef SLOW_BUILD
#define SLOW_BUILD 0
#endif

static cJSON *g_doc;
static model_tok_t *g_tok;

static const char *jstr(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const cJSON *jget(const cJSON *o, const char *key) {
  return cJSON_GetObjectItemCaseSensitive(o, key);
}

/* Hex string to bytes (malloc'd, NUL-terminated). */
static char *unhex(const char *h, size_t *len) {
  size_t n = strlen(h) / 2;
  char *b = malloc(n + 1);
  CHECK(b);
  for (size_t i = 0; i < n; i++) {
    unsigned v;
    CHECK(sscanf(h + 2 * i, "%2x", &v) == 1);
    b[i] = (char)v;
  }
  b[n] = 0;
  *len = n;
  return b;
}

/* A fixture case's input bytes: "text" or "hex". */
static char *case_text(const cJSON *c, size_t *len) {
  const char *t = jstr(c, "text");
  if (t) {
    *len = strlen(t);
    char *s = strdup(t);
    CHECK(s);
    return s;
  }
  return unhex(jstr(c, "hex"), len);
}

static size_t json_ids(const cJSON *arr, int32_t **ids) {
  size_t n = (size_t)cJSON_GetArraySize(arr), k = 0;
  *ids = malloc((n ? n : 1) * sizeof **ids);
  CHECK(*ids);
  const cJSON *v;
  cJSON_ArrayForEach(v, arr)(*ids)[k++] = (int32_t)v->valuedouble;
  return n;
}

/* Encode into a malloc'd array; returns the encode rc. */
static int encode(const model_tok_t *t, const char *s, size_t n, bool special, int32_t **ids,
                  size_t *n_ids) {
  size_t cap = n + 16;
  *ids = malloc(cap * sizeof **ids);
  CHECK(*ids);
  int rc = model_tok_encode(t, s, n, special, *ids, cap, n_ids);
  CHECK(rc != -ENOSPC);
  return rc;
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
  fprintf(stderr, "    %s (%zu):", label, n);
  for (size_t i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", ids[i]);
  fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Every fixture case of g_doc against t; returns the number of mismatches. */
static size_t compare_cases(const model_tok_t *t, const char *label) {
  size_t bad = 0, total = 0;
  const cJSON *c;
  cJSON_ArrayForEach(c, jget(g_doc, "cases")) {
    size_t n, n_exp, n_got;
    char *s = case_text(c, &n);
    bool special = cJSON_IsTrue(jget(c, "special"));
    int32_t *exp, *got;
    n_exp = json_ids(jget(c, "ids"), &exp);
    int rc = encode(t, s, n, special, &got, &n_got);
    bool valid = test_utf8_ok(s, n);
    CHECK_INT_EQ(rc, valid ? 0 : -EINVAL);
    total++;
    if (n_got != n_exp || memcmp(got, exp, n_exp * sizeof *exp) != 0) {
      if (bad < 5) {
        fprintf(stderr, "  %s mismatch (special=%d) on \"%.*s\"\n", label, special,
                (int)(n < 200 ? n : 200), s);
        print_ids("llama.cpp", exp, n_exp);
        print_ids("pressd   ", got, n_got);
      }
      bad++;
    }
    free(s);
    free(exp);
    free(got);
  }
  fprintf(stderr, "  %s: %zu cases, %zu mismatches\n", label, total, bad);
  return bad;
}

static void test_fixture_ids(void) { CHECK_INT_EQ(compare_cases(g_tok, "gguf"), 0); }

static void test_metadata(void) {
  CHECK_INT_EQ(model_tok_n_vocab(g_tok), (int)jget(g_doc, "n_vocab")->valuedouble);
  CHECK_INT_EQ(model_tok_bos(g_tok), (int)jget(g_doc, "bos")->valuedouble);
  CHECK_INT_EQ(model_tok_eos(g_tok), (int)jget(g_doc, "eos")->valuedouble);
  CHECK_INT_EQ(model_tok_add_bos(g_tok), cJSON_IsTrue(jget(g_doc, "add_bos")));
  int32_t *eog;
  size_t n_eog = json_ids(jget(g_doc, "eog"), &eog), k = 0;
  for (int32_t id = 0; id < model_tok_n_vocab(g_tok); id++) {
    bool want = k < n_eog && eog[k] == id;
    if (want) k++;
    if (model_tok_is_eog(g_tok, id) != want) FAIL_AT("is_eog(%d) != %d", id, want);
  }
  free(eog);
  CHECK(!model_tok_is_eog(g_tok, -1));
  CHECK(!model_tok_is_eog(g_tok, model_tok_n_vocab(g_tok)));
  CHECK_INT_EQ(model_tok_lookup(g_tok, "<|im_end|>"), 2);
  CHECK_INT_EQ(model_tok_lookup(g_tok, "<|im_start|>"), 1);
  CHECK_INT_EQ(model_tok_lookup(g_tok, "no such token text"), -1);
  size_t len;
  CHECK_STR_EQ(model_tok_piece(g_tok, 2, false, &len), "");
  CHECK_INT_EQ(len, 0);
  const char *p = model_tok_piece(g_tok, 2, true, &len);
  CHECK(len == 10 && memcmp(p, "<|im_end|>", 10) == 0);
  model_tok_piece(g_tok, -5, true, &len);
  CHECK_INT_EQ(len, 0);
  /* the header promises a 256-byte detok buffer is enough */
  size_t longest = 0;
  for (int32_t id = 0; id < model_tok_n_vocab(g_tok); id++) {
    model_tok_piece(g_tok, id, true, &len);
    if (len > longest) longest = len;
  }
  CHECK_INT_EQ(longest, 81);
  int32_t hello;
  size_t n;
  CHECK_INT_EQ(model_tok_encode(g_tok, " Hello", 6, false, &hello, 1, &n), 0);
  CHECK_INT_EQ(n, 1);
  p = model_tok_piece(g_tok, hello, false, &len);
  CHECK(len == 6 && memcmp(p, " Hello", 6) == 0);
}

/* Whether decode(encode(s)) gives s back: valid UTF-8, no NUL, and every
 * byte has a single-byte token (SmolLM2 lacks 0x04, 0x06, 0x13, 0x14, 0x16,
 * 0x1d and some bytes above 0x7f; llama.cpp drops those as well). */
static bool lossless(const char *s, size_t n) {
  static bool has_byte[256], init;
  if (!init) {
    for (int32_t id = 0; id < model_tok_n_vocab(g_tok); id++) {
      size_t len;
      const char *p = model_tok_piece(g_tok, id, false, &len);
      if (len == 1) has_byte[(unsigned char)p[0]] = true;
    }
    init = true;
  }
  for (size_t i = 0; i < n; i++)
    if (!has_byte[(unsigned char)s[i]]) return false;
  return test_utf8_ok(s, n) && !memchr(s, 0, n);
}

/* model_tok_decode against llama_detokenize, then round trips. */
static void test_decode(void) {
  const cJSON *d;
  size_t count = 0;
  cJSON_ArrayForEach(d, jget(g_doc, "decode")) {
    int32_t *ids;
    size_t n = json_ids(jget(d, "ids"), &ids), n_exp;
    bool special = cJSON_IsTrue(jget(d, "special"));
    char *exp = unhex(jstr(d, "hex"), &n_exp);
    size_t need = model_tok_decode(g_tok, ids, n, special, NULL, 0);
    CHECK_INT_EQ(need, n_exp);
    char *buf = malloc(need + 1);
    CHECK(buf);
    CHECK_INT_EQ(model_tok_decode(g_tok, ids, n, special, buf, need + 1), need);
    if (memcmp(buf, exp, n_exp) != 0 || buf[need] != 0)
      FAIL_AT("decode differs from llama_detokenize: \"%s\" vs \"%s\"", buf, exp);
    free(buf);
    free(exp);
    free(ids);
    count++;
  }
  CHECK(count >= 100);
  /* byte-level BPE is lossless: decode(encode(text)) == text */
  const cJSON *c;
  cJSON_ArrayForEach(c, jget(g_doc, "cases")) {
    size_t n, n_ids;
    char *s = case_text(c, &n);
    if (!lossless(s, n)) {
      free(s);
      continue;
    }
    int32_t *ids;
    CHECK_INT_EQ(encode(g_tok, s, n, cJSON_IsTrue(jget(c, "special")), &ids, &n_ids), 0);
    char *buf = malloc(n + 1);
    CHECK(buf);
    size_t got = model_tok_decode(g_tok, ids, n_ids, true, buf, n + 1);
    if (got != n || strcmp(buf, s) != 0) FAIL_AT("round trip of \"%s\" gave \"%s\"", s, buf);
    free(buf);
    free(ids);
    free(s);
  }
}

/* Pushes ids one at a time; every chunk must be whole UTF-8 characters and
 * the chunks together the decoded text. Returns how many pushes held bytes
 * back (a character split across tokens). */
static size_t detok_check(const model_tok_t *t, const int32_t *ids, size_t n, const char *want,
                          size_t want_len) {
  model_detok_t d;
  model_detok_init(&d);
  char *all = malloc(want_len + 3 * n + 64);
  CHECK(all);
  size_t o = 0, held = 0;
  for (size_t i = 0; i < n; i++) {
    char chunk[256];
    size_t k = model_detok_push(&d, t, ids[i], chunk, sizeof chunk);
    CHECK(k < sizeof chunk && chunk[k] == 0);
    if (!test_utf8_ok(chunk, k)) FAIL_AT("detok emitted a partial character at id %zu", i);
    if (d.n_pending) held++;
    memcpy(all + o, chunk, k);
    o += k;
  }
  char tail[64];
  size_t k = model_detok_flush(&d, tail, sizeof tail);
  CHECK_INT_EQ(d.n_pending, 0);
  memcpy(all + o, tail, k);
  o += k;
  CHECK_INT_EQ(o, want_len);
  CHECK(memcmp(all, want, o) == 0);
  free(all);
  return held;
}

static void test_detok(void) {
  /* characters split across byte-level tokens */
  static const char *const texts[] = {
      "👨‍👩‍👧‍👦 family",
      "🏳️‍🌈🇺🇸👋🏽",
      "你好，世界！我爱北京天安门。",
      "日本語のテキスト",
      "한국어 텍스트",
      "𠀀𠀁𪚥 mixed ascii",
      "ᚠᛇᚻ ሰላም",
  };
  size_t held = 0;
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
    size_t n = strlen(texts[i]), n_ids;
    int32_t *ids;
    CHECK_INT_EQ(encode(g_tok, texts[i], n, false, &ids, &n_ids), 0);
    held += detok_check(g_tok, ids, n_ids, texts[i], n);
    free(ids);
  }
  fprintf(stderr, "  %zu pushes waited for the rest of a character\n", held);
  CHECK(held > 0);

  /* every valid fixture text streams back whole */
  const cJSON *c;
  cJSON_ArrayForEach(c, jget(g_doc, "cases")) {
    size_t n, n_ids;
    char *s = case_text(c, &n);
    if (lossless(s, n) && !cJSON_IsTrue(jget(c, "special"))) {
      int32_t *ids;
      CHECK_INT_EQ(encode(g_tok, s, n, false, &ids, &n_ids), 0);
      detok_check(g_tok, ids, n_ids, s, n);
      free(ids);
    }
    free(s);
  }

  /* a lone lead byte followed by ASCII becomes U+FFFD, never raw */
  model_detok_t d;
  model_detok_init(&d);
  int32_t lead = -1, ascii = model_tok_lookup(g_tok, "a");
  for (int32_t id = 0; id < model_tok_n_vocab(g_tok) && lead < 0; id++) {
    size_t len;
    const char *p = model_tok_piece(g_tok, id, false, &len);
    if (len == 1 && (unsigned char)p[0] == 0xE4) lead = id;
  }
  CHECK(lead >= 0 && ascii >= 0);
  char out[64];
  CHECK_INT_EQ(model_detok_push(&d, g_tok, lead, out, sizeof out), 0);
  CHECK_INT_EQ(d.n_pending, 1);
  CHECK_INT_EQ(model_detok_push(&d, g_tok, ascii, out, sizeof out), 4);
  CHECK_STR_EQ(out,
               "\xef\xbf\xbd"
               "a");
  CHECK_INT_EQ(model_detok_push(&d, g_tok, lead, out, sizeof out), 0);
  CHECK_INT_EQ(model_detok_flush(&d, out, sizeof out), 3);
  CHECK_STR_EQ(out, "\xef\xbf\xbd");
  CHECK_INT_EQ(model_detok_flush(&d, out, sizeof out), 0);
  /* control tokens stream as nothing */
  CHECK_INT_EQ(model_detok_push(&d, g_tok, 2, out, sizeof out), 0);
  CHECK_STR_EQ(out, "");
}

static void test_enospc(void) {
  const char *s = "The quick brown fox jumps over the lazy dog 12345 <|im_end|>";
  size_t n, n2;
  CHECK_INT_EQ(model_tok_encode(g_tok, s, strlen(s), true, NULL, 0, &n), -ENOSPC);
  CHECK(n > 10);
  int32_t small[4];
  CHECK_INT_EQ(model_tok_encode(g_tok, s, strlen(s), true, small, 4, &n2), -ENOSPC);
  CHECK_INT_EQ(n2, n);
  int32_t *full = malloc(n * sizeof *full);
  CHECK(full);
  CHECK_INT_EQ(model_tok_encode(g_tok, s, strlen(s), true, full, n, &n2), 0);
  CHECK_INT_EQ(n2, n);
  CHECK(memcmp(small, full, sizeof small) == 0); /* the prefix that fitted is right */
  CHECK_INT_EQ(full[n - 1], 2);
  /* empty input */
  CHECK_INT_EQ(model_tok_encode(g_tok, "", 0, true, NULL, 0, &n2), 0);
  CHECK_INT_EQ(n2, 0);
  /* decode truncates like snprintf */
  size_t need = model_tok_decode(g_tok, full, n, true, NULL, 0);
  CHECK_INT_EQ(need, strlen(s));
  char buf[8];
  CHECK_INT_EQ(model_tok_decode(g_tok, full, n, true, buf, sizeof buf), need);
  CHECK_STR_EQ(buf, "The qui");
  CHECK_INT_EQ(model_tok_decode(g_tok, full, n, true, buf, 1), need);
  CHECK_STR_EQ(buf, "");
  free(full);
}

static uint64_t g_rng = 88172645463325252ULL;
static uint32_t rnd(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)g_rng;
}

static void test_invalid_utf8(void) {
  static const char bad[] =
      "ok\xff\xfe\xc3(\xe4\xb8\xed\xa0\x80\xf4\x90\x80\x80\xf7\xbf\xbf\xbf"
      "\xc0\x80<|im_start|>\x80";
  size_t n, n_ids;
  int32_t *ids;
  CHECK_INT_EQ(encode(g_tok, bad, sizeof bad - 1, true, &ids, &n_ids), -EINVAL);
  CHECK(n_ids > 5);
  free(ids);
  char *buf = malloc(4096);
  CHECK(buf);
  for (int iter = 0; iter < 3000; iter++) {
    n = rnd() % 64;
    for (size_t i = 0; i < n; i++) {
      uint32_t r = rnd();
      buf[i] = (r & 0x300) ? (char)(r & 0xFF) : "a <|>\n"[r % 6];
    }
    int rc = encode(g_tok, buf, n, (iter & 1) != 0, &ids, &n_ids);
    CHECK(rc == 0 || rc == -EINVAL);
    CHECK_INT_EQ(rc == 0, test_utf8_ok(buf, n));
    char out[1024];
    model_tok_decode(g_tok, ids, n_ids, true, out, sizeof out);
    model_detok_t d;
    model_detok_init(&d);
    for (size_t i = 0; i < n_ids; i++) {
      size_t k = model_detok_push(&d, g_tok, ids[i], out, sizeof out);
      CHECK(test_utf8_ok(out, k));
    }
    CHECK(test_utf8_ok(out, model_detok_flush(&d, out, sizeof out)));
    free(ids);
  }
  /* random ids decode and stream without ever emitting a broken character */
  model_detok_t d;
  model_detok_init(&d);
  for (int i = 0; i < 20000; i++) {
    int32_t id = (int32_t)(rnd() % (uint32_t)model_tok_n_vocab(g_tok));
    char out[256];
    size_t k = model_detok_push(&d, g_tok, id, out, sizeof out);
    CHECK(test_utf8_ok(out, k));
  }
  free(buf);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* 30,000 characters of assorted text, and pathological single runs. */
static void test_speed(void) {
  size_t cap = 200000, n = 0;
  char *text = malloc(cap);
  CHECK(text);
  const cJSON *c;
  size_t chars = 0;
  cJSON_ArrayForEach(c, jget(g_doc, "cases")) {
    const char *s = jstr(c, "text");
    if (!s || !cJSON_IsTrue(jget(c, "special"))) continue;
    size_t l = strlen(s);
    if (n + l >= cap) break;
    memcpy(text + n, s, l);
    n += l;
    for (size_t i = 0; i < l; i++) chars += ((unsigned char)s[i] & 0xC0) != 0x80;
    if (chars >= 30000) break;
  }
  CHECK(chars >= 30000);
  const double limit = SLOW_BUILD ? 2000 : 100;
  int32_t *ids = malloc(cap * sizeof *ids);
  CHECK(ids);
  size_t n_ids;
  double best = 1e9;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = now_ms();
    CHECK_INT_EQ(model_tok_encode(g_tok, text, n, true, ids, cap, &n_ids), 0);
    double dt = now_ms() - t0;
    if (dt < best) best = dt;
  }
  fprintf(stderr, "  mixed text: %zu chars, %zu bytes -> %zu ids in %.2f ms\n", chars, n, n_ids,
          best);
  CHECK(best < limit);
  static const char *const runs[] = {"a", " ", "7", "\n", "😀", "中", "!", "a "};
  for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
    size_t l = strlen(runs[r]), reps = 30000 / (l > 2 ? 1 : strlen(runs[r])), m = 0;
    for (size_t i = 0; i < reps && m + l < cap; i++, m += l) memcpy(text + m, runs[r], l);
    double t0 = now_ms();
    CHECK_INT_EQ(model_tok_encode(g_tok, text, m, true, ids, cap, &n_ids), 0);
    double dt = now_ms() - t0;
    fprintf(stderr, "  30000 x \"%s\": %zu ids in %.2f ms\n", runs[r], n_ids, dt);
    CHECK(dt < limit);
  }
  free(ids);
  free(text);
}

/* The same vocabulary as a Hugging Face tokenizer.json (SmolLM2's layout:
 * Digits + ByteLevel), written from the GGUF, must give the same ids. */
static const char *g_model_path;

static void test_json(void) {
  model_gguf_t g;
  char err[256];
  CHECK_INT_EQ(model_gguf_open(&g, g_model_path, err, sizeof err), 0);
  const model_gguf_kv_t *toks = model_gguf_find(&g, "tokenizer.ggml.tokens");
  const model_gguf_kv_t *types = model_gguf_find(&g, "tokenizer.ggml.token_type");
  const model_gguf_kv_t *merges = model_gguf_find(&g, "tokenizer.ggml.merges");
  CHECK(toks && types && merges);
  cJSON *root = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(root, "model");
  cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
  cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
  cJSON_AddStringToObject(model, "type", "BPE");
  for (uint64_t i = 0; i < toks->arr_len; i++) {
    char *s = strndup(toks->arr_strs[i].ptr, toks->arr_strs[i].len);
    int64_t ty;
    CHECK_INT_EQ(model_gguf_arr_i64(types, i, &ty), 0);
    cJSON_AddNumberToObject(vocab, s, (double)i);
    if (ty == 3) {
      cJSON *a = cJSON_CreateObject();
      cJSON_AddNumberToObject(a, "id", (double)i);
      cJSON_AddStringToObject(a, "content", s);
      cJSON_AddBoolToObject(a, "special", true);
      cJSON_AddItemToArray(added, a);
    }
    free(s);
  }
  cJSON *ma = cJSON_AddArrayToObject(model, "merges");
  for (uint64_t i = 0; i < merges->arr_len; i++) {
    char *s = strndup(merges->arr_strs[i].ptr, merges->arr_strs[i].len);
    if (i % 2) { /* both spellings: "a b" and ["a", "b"] */
      char *sp = strchr(s + 1, ' ');
      CHECK(sp);
      *sp = 0;
      cJSON *pair = cJSON_CreateArray();
      cJSON_AddItemToArray(pair, cJSON_CreateString(s));
      cJSON_AddItemToArray(pair, cJSON_CreateString(sp + 1));
      cJSON_AddItemToArray(ma, pair);
    } else {
      cJSON_AddItemToArray(ma, cJSON_CreateString(s));
    }
    free(s);
  }
  cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
  cJSON_AddStringToObject(pre, "type", "Sequence");
  cJSON *seq = cJSON_AddArrayToObject(pre, "pretokenizers");
  cJSON *digits = cJSON_CreateObject(), *bl = cJSON_CreateObject();
  cJSON_AddStringToObject(digits, "type", "Digits");
  cJSON_AddBoolToObject(digits, "individual_digits", true);
  cJSON_AddStringToObject(bl, "type", "ByteLevel");
  cJSON_AddBoolToObject(bl, "add_prefix_space", false);
  cJSON_AddBoolToObject(bl, "use_regex", true);
  cJSON_AddItemToArray(seq, digits);
  cJSON_AddItemToArray(seq, bl);
  cJSON *dec = cJSON_AddObjectToObject(root, "decoder");
  cJSON_AddStringToObject(dec, "type", "ByteLevel");
  char *json = cJSON_PrintUnformatted(root);
  CHECK(json);
  cJSON_Delete(root);
  model_gguf_close(&g);

  char dir[] = "/tmp/pressd-tok-XXXXXX";
  CHECK(mkdtemp(dir));
  char path[128], cfg[128];
  snprintf(path, sizeof path, "%s/tokenizer.json", dir);
  snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
  FILE *f = fopen(path, "wb");
  CHECK(f && fputs(json, f) >= 0 && fclose(f) == 0);
  free(json);
  f = fopen(cfg, "wb");
  CHECK(f);
  fputs(
      "{\"bos_token\": \"<|im_start|>\", \"eos_token\": \"<|im_end|>\", \"add_bos_token\": false}",
      f);
  CHECK(fclose(f) == 0);

  model_tok_t *t = NULL;
  int rc = model_tok_from_json(&t, path, err, sizeof err);
  if (rc) FAIL_AT("model_tok_from_json: %d %s", rc, err);
  CHECK_INT_EQ(model_tok_n_vocab(t), model_tok_n_vocab(g_tok));
  CHECK_INT_EQ(model_tok_bos(t), 1);
  CHECK_INT_EQ(model_tok_eos(t), 2);
  CHECK(!model_tok_add_bos(t));
  CHECK(model_tok_is_eog(t, 2));
  CHECK_INT_EQ(compare_cases(t, "tokenizer.json"), 0);
  model_tok_free(t);

  /* errors name the problem */
  CHECK(model_tok_from_json(&t, "/nonexistent/tokenizer.json", err, sizeof err) < 0 && !t);
  CHECK(strstr(err, "/nonexistent/tokenizer.json"));
  f = fopen(path, "wb");
  CHECK(f && fputs("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", f) >= 0 &&
        fclose(f) == 0);
  CHECK_INT_EQ(model_tok_from_json(&t, path, err, sizeof err), -EINVAL);
  CHECK(!t && strlen(err) > 0);
  f = fopen(path, "wb");
  CHECK(f && fputs("{not json", f) >= 0 && fclose(f) == 0);
  CHECK_INT_EQ(model_tok_from_json(&t, path, err, sizeof err), -EINVAL);
  unlink(path);
  unlink(cfg);
  rmdir(dir);
}

/* A Llama-2-style tokenizer.json: BPE over U+2581-escaped text with byte
 * fallback, the prefix space coming from the normalizer. */
static void test_json_metaspace(void) {
  static const char json[] =
      "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": ["
      "  {\"type\": \"Prepend\", \"prepend\": \"\u2581\"},"
      "  {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"\u2581\"}]},"
      " \"pre_tokenizer\": null,"
      " \"added_tokens\": [{\"id\": 1, \"content\": \"<s>\", \"special\": true},"
      "                    {\"id\": 2, \"content\": \"</s>\", \"special\": true}],"
      " \"post_processor\": {\"type\": \"TemplateProcessing\","
      "   \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},"
      "              {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}]},"
      " \"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"vocab\": {"
      "   \"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"<0xC3>\": 3, \"<0xA9>\": 4, \"\u2581\": 5,"
      "   \"h\": 6, \"e\": 7, \"l\": 8, \"o\": 9, \"\u2581h\": 10, \"el\": 11, \"\u2581hel\": 12,"
      "   \"lo\": 13, \"\u2581hello\": 14},"
      "   \"merges\": [\"\u2581 h\", \"e l\", \"\u2581h el\", \"l o\", \"\u2581hel lo\"]}}";
  char dir[] = "/tmp/pressd-tok-XXXXXX", path[128], err[256];
  CHECK(mkdtemp(dir));
  snprintf(path, sizeof path, "%s/tokenizer.json", dir);
  FILE *f = fopen(path, "wb");
  CHECK(f && fputs(json, f) >= 0 && fclose(f) == 0);
  model_tok_t *t = NULL;
  int rc = model_tok_from_json(&t, path, err, sizeof err);
  if (rc) FAIL_AT("model_tok_from_json: %d %s", rc, err);
  unlink(path);
  rmdir(dir);
  CHECK_INT_EQ(model_tok_bos(t), 1);
  CHECK(model_tok_add_bos(t));
  int32_t ids[16];
  size_t n;
  CHECK_INT_EQ(model_tok_encode(t, "hello", 5, true, ids, 16, &n), 0);
  CHECK(n == 1 && ids[0] == 14);
  CHECK_INT_EQ(model_tok_encode(t, "hell hello", 10, true, ids, 16, &n), 0);
  CHECK(n == 3 && ids[0] == 12 && ids[1] == 8 && ids[2] == 14);
  CHECK_INT_EQ(model_tok_encode(t, "\xc3\xa9<s>lo", 8, true, ids, 16, &n), 0);
  CHECK(n == 6 && ids[0] == 5 && ids[1] == 3 && ids[2] == 4 && ids[3] == 1 && ids[4] == 5 &&
        ids[5] == 13);
  char buf[64];
  CHECK_INT_EQ(model_tok_decode(t, ids, n, false, buf, sizeof buf), 5);
  CHECK_STR_EQ(buf, "\xc3\xa9 lo");
  model_tok_free(t);
}

/* The default vocabulary under other pre-tokenizer names: llama.cpp runs its
 * custom splitters or std::regex for these, pressd PCRE2. The GGUF index is
 * copied with tokenizer.ggml.pre pointing elsewhere. */
static void test_pre_variants(void) {
  model_gguf_t g;
  char err[256];
  CHECK_INT_EQ(model_gguf_open(&g, g_model_path, err, sizeof err), 0);
  model_gguf_kv_t *kv = malloc(g.n_kv * sizeof *kv);
  CHECK(kv);
  memcpy(kv, g.kv, g.n_kv * sizeof *kv);
  model_gguf_kv_t *pre = NULL;
  for (uint64_t i = 0; i < g.n_kv; i++)
    if (model_gguf_str_eq(kv[i].key, "tokenizer.ggml.pre")) pre = &kv[i];
  CHECK(pre);
  model_gguf_t g2 = g;
  g2.kv = kv;
  const cJSON *all = jget(g_doc, "cases");
  size_t n_all = (size_t)cJSON_GetArraySize(all), k = 0;
  const cJSON **by_index = malloc(n_all * sizeof *by_index), *it;
  CHECK(by_index);
  cJSON_ArrayForEach(it, all) by_index[k++] = it;
  size_t bad = 0, total = 0, variants = 0;
  const cJSON *v;
  cJSON_ArrayForEach(v, jget(g_doc, "pre_variants")) {
    const char *name = jstr(v, "pre");
    pre->v.s = (model_gguf_str_t){name, strlen(name)};
    model_tok_t *t = NULL;
    if (model_tok_from_gguf(&t, &g2, err, sizeof err)) FAIL_AT("pre %s: %s", name, err);
    size_t vbad = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, jget(v, "cases")) {
      size_t n, n_got, idx = (size_t)jget(c, "case")->valuedouble;
      CHECK(idx < n_all);
      char *s = case_text(by_index[idx], &n);
      int32_t *exp, *got;
      size_t n_exp = json_ids(jget(c, "ids"), &exp);
      encode(t, s, n, true, &got, &n_got);
      total++;
      if (n_got != n_exp || memcmp(got, exp, n_exp * sizeof *exp) != 0) {
        if (vbad < 2) {
          fprintf(stderr, "  pre %s mismatch on \"%.*s\"\n", name, (int)(n < 200 ? n : 200), s);
          print_ids("llama.cpp", exp, n_exp);
          print_ids("pressd   ", got, n_got);
        }
        vbad++;
      }
      free(s);
      free(exp);
      free(got);
    }
    if (vbad) fprintf(stderr, "  pre %s: %zu mismatches\n", name, vbad);
    bad += vbad;
    variants++;
    model_tok_free(t);
  }
  fprintf(stderr, "  %zu pre-tokenizers, %zu cases, %zu mismatches\n", variants, total, bad);
  CHECK(variants >= 10);
  CHECK_INT_EQ(bad, 0);
  /* an unknown name is refused with a message naming it */
  pre->v.s = (model_gguf_str_t){"no-such-pre", 11};
  model_tok_t *t = NULL;
  CHECK_INT_EQ(model_tok_from_gguf(&t, &g2, err, sizeof err), -EINVAL);
  CHECK(!t && strstr(err, "no-such-pre"));
  free(by_index);
  free(kv);
  model_gguf_close(&g);
}

/* Tiny SentencePiece vocabulary (GGUF image and llama.cpp's ids in the fixture). */
static void test_spm(void) {
  const cJSON *spm = jget(g_doc, "spm");
  CHECK(spm);
  size_t len;
  char *image = unhex(jstr(spm, "gguf_hex"), &len);
  model_gguf_t g;
  char err[256];
  int rc = model_gguf_parse(&g, image, len, err, sizeof err);
  if (rc) FAIL_AT("model_gguf_parse: %d %s", rc, err);
  model_tok_t *t = NULL;
  rc = model_tok_from_gguf(&t, &g, err, sizeof err);
  if (rc) FAIL_AT("model_tok_from_gguf: %d %s", rc, err);
  model_gguf_close(&g); /* the tokenizer keeps its own copies */
  free(image);
  CHECK_INT_EQ(model_tok_bos(t), 1);
  CHECK_INT_EQ(model_tok_eos(t), 2);
  CHECK_INT_EQ(model_tok_add_bos(t), cJSON_IsTrue(jget(spm, "add_bos")));
  CHECK(model_tok_is_eog(t, 2));
  const cJSON *c;
  size_t count = 0;
  cJSON_ArrayForEach(c, jget(spm, "cases")) {
    const char *s = jstr(c, "text");
    bool special = cJSON_IsTrue(jget(c, "special"));
    int32_t *exp, *got;
    size_t n_exp = json_ids(jget(c, "ids"), &exp), n_got, n_text;
    CHECK_INT_EQ(encode(t, s, strlen(s), special, &got, &n_got), 0);
    if (n_got != n_exp || memcmp(got, exp, n_exp * sizeof *exp) != 0) {
      fprintf(stderr, "  spm mismatch (special=%d) on \"%s\"\n", special, s);
      print_ids("llama.cpp", exp, n_exp);
      print_ids("pressd   ", got, n_got);
      FAIL_AT("SentencePiece ids differ");
    }
    char *want = unhex(jstr(c, "hex"), &n_text);
    char buf[512];
    CHECK_INT_EQ(model_tok_decode(t, exp, n_exp, special, buf, sizeof buf), n_text);
    if (memcmp(buf, want, n_text) != 0) FAIL_AT("spm decode \"%s\" vs \"%s\"", buf, want);
    free(want);
    free(exp);
    free(got);
    count++;
  }
  CHECK(count >= 20);
  /* byte fallback pieces stream back as whole characters */
  const char *s = "caf\xc3\xa9 \xf0\x9f\x98\x80";
  int32_t *ids;
  size_t n_ids;
  CHECK_INT_EQ(encode(t, s, strlen(s), false, &ids, &n_ids), 0);
  char full[64];
  size_t n_full = model_tok_decode(t, ids, n_ids, false, full, sizeof full);
  CHECK_STR_EQ(full, s);
  CHECK(detok_check(t, ids, n_ids, " caf\xc3\xa9 \xf0\x9f\x98\x80", n_full + 1) >= 3);
  free(ids);
  model_tok_free(t);
}

static void test_errors(void) {
  /* a GGUF without tokenizer metadata is refused with a message */
  static const unsigned char empty_gguf[] = {'G', 'G', 'U', 'F', 3, 0, 0, 0, 0, 0, 0, 0,
                                             0,   0,   0,   0,   0, 0, 0, 0, 0, 0, 0, 0};
  model_gguf_t g;
  char err[256] = "";
  CHECK_INT_EQ(model_gguf_parse(&g, empty_gguf, sizeof empty_gguf, err, sizeof err), 0);
  model_tok_t *t = (model_tok_t *)&g;
  CHECK_INT_EQ(model_tok_from_gguf(&t, &g, err, sizeof err), -EINVAL);
  CHECK(t == NULL);
  CHECK(strstr(err, "tokenizer.ggml.model"));
  model_gguf_close(&g);
  model_tok_free(NULL);
}

int main(void) {
  const char *dir = getenv("PRESSD_FIXTURES");
  if (!dir) {
    fprintf(stderr, "PRESSD_FIXTURES unset; skipping\n");
    return TEST_SKIP;
  }
  char path[1024];
  snprintf(path, sizeof path, "%s/tokenizer-smollm2.json", dir);
  size_t len;
  char *text = test_read_file(path, &len);
  if (!text) FAIL_AT("cannot read %s", path);
  g_doc = cJSON_ParseWithLength(text, len);
  CHECK(g_doc);
  free(text);

  RUN(test_errors);
  RUN(test_spm);
  RUN(test_json_metaspace);

  const char *model = test_model_path();
  if (!model) {
    fprintf(stderr, "model file not found (PRESSD_MODEL); skipping the SmolLM2 tests\n");
    cJSON_Delete(g_doc);
    return TEST_SKIP;
  }
  g_model_path = model;
  model_gguf_t g;
  char err[256];
  if (model_gguf_open(&g, model, err, sizeof err)) FAIL_AT("%s", err);
  if (model_tok_from_gguf(&g_tok, &g, err, sizeof err)) FAIL_AT("%s", err);
  model_gguf_close(&g);

  RUN(test_metadata);
  RUN(test_fixture_ids);
  RUN(test_decode);
  RUN(test_detok);
  RUN(test_enospc);
  RUN(test_invalid_utf8);
  RUN(test_speed);
  RUN(test_pre_variants);
  RUN(test_json);

  model_tok_free(g_tok);
  cJSON_Delete(g_doc);
  fprintf(stderr, "tokenizer: all tests passed\n");
  return 0;
}
