/* The safetensors directory loader and the dummy weights.
 *
 * No Python is needed: the test writes Hugging Face checkpoints itself. The
 * default model's GGUF tensors are dequantised, q and k rows are put back in
 * Hugging Face's "rotate half" layout (the inverse of llama.cpp's permute),
 * and the result is written as model.safetensors in F32 and BF16 and as two
 * F16 shards with an index. Each is loaded and run; its logits are compared
 * with the GGUF model's on the same tokens.
 *
 * Then a tiny checkpoint checks the q/k row permutation value by value on
 * both loading paths (fill and view), and damaged copies of it (header
 * length past the end, bad JSON, offsets past the end, dtype I64, a missing
 * tensor, random header bytes...) must give a negative errno and a one-line
 * message, never a crash. Last, the dummy weights are deterministic. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/gguf.h"
#include "model/quant.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "scheduler/single.h"
#include "tests/test.h"

static k_backend_t *be;
static char err[512];
static char root[512]; /* temporary directory, removed at the end */

/* ---- files --------------------------------------------------------------- */

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(p);
}

static void rm_rf(const char *p) { nftw(p, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static void make_dir(char *out, size_t cap, const char *name) {
  snprintf(out, cap, "%s/%s", root, name);
  rm_rf(out);
  CHECK(mkdir(out, 0700) == 0);
}

static void write_text(const char *dir, const char *name, const char *text) {
  char p[1024];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  FILE *f = fopen(p, "wb");
  CHECK(f != NULL);
  CHECK(fwrite(text, 1, strlen(text), f) == strlen(text));
  CHECK(fclose(f) == 0);
}

static void write_config(const char *dir, const model_config_t *c) {
  char txt[1024];
  snprintf(txt, sizeof txt,
           "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
           "\"hidden_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d, "
           "\"num_key_value_heads\": %d, \"intermediate_size\": %d, \"vocab_size\": %d, "
           "\"rope_theta\": %.1f, \"rms_norm_eps\": %g, \"tie_word_embeddings\": %s, "
           "\"max_position_embeddings\": %d, \"hidden_act\": \"silu\", "
           "\"torch_dtype\": \"bfloat16\"}\n",
           c->n_embd, c->n_layers, c->n_heads, c->n_kv_heads, c->n_ff, c->n_vocab,
           (double)c->rope_theta, (double)c->rms_eps, c->tied_embeddings ? "true" : "false",
           c->n_ctx_train);
  write_text(dir, "config.json", txt);
}

/* ---- a safetensors writer ------------------------------------------------ */

typedef enum { W_F32, W_F16, W_BF16 } wtype_t;
static const char *const wtype_name[] = {"F32", "F16", "BF16"};
static const size_t wtype_size[] = {4, 2, 2};

/* One tensor to write: its values come from produce(i) as fp32 and are
 * stored as `type`. The dtype string, shape and offsets written in the
 * header can be falsified to build damaged files. */
typedef struct wt {
  char name[96];
  int64_t rows, cols;     /* rows == 1: written as a vector [cols] */
  int32_t heads;          /* > 0: q/k, rows go to the Hugging Face layout */
  char gguf[64];          /* name of the source tensor in the GGUF */
  const char *dtype;      /* header dtype if not the type's own ("I64") */
  int64_t shape0;         /* header shape[0] if nonzero */
  int64_t end_delta;      /* added to the header's end offset */
  bool swap_offsets;      /* header writes [end, begin] */
} wt_t;

typedef void (*produce_fn)(const wt_t *t, float *dst, void *user);

/* GGUF rows (adjacent RoPE pairs) to Hugging Face rows (rotate half): in a
 * head of hd rows, GGUF row 2i + j becomes row j * hd/2 + i. This is the
 * inverse of convert_hf_to_gguf.py's permute. */
static void to_hf_layout(const float *gg, float *hf, int64_t rows, int64_t cols, int32_t heads) {
  int64_t hd = rows / heads, half = hd / 2;
  for (int64_t h = 0; h < heads; h++)
    for (int64_t i = 0; i < half; i++)
      for (int64_t j = 0; j < 2; j++)
        memcpy(hf + (h * hd + j * half + i) * cols, gg + (h * hd + 2 * i + j) * cols,
               (size_t)cols * sizeof(float));
}

/* Writes the file; hlen_override != 0 replaces the header length field,
 * header_text != NULL replaces the header JSON. Returns the header length. */
static uint64_t write_st(const char *path, const wt_t *ts, size_t n, wtype_t type,
                         produce_fn produce, void *user, const char *header_text,
                         uint64_t hlen_override) {
  cJSON *h = cJSON_CreateObject();
  cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
  cJSON_AddStringToObject(meta, "format", "pt");
  uint64_t off = 0, biggest = 0;
  for (size_t i = 0; i < n; i++) {
    const wt_t *t = &ts[i];
    uint64_t elems = (uint64_t)t->rows * (uint64_t)t->cols, bytes = elems * wtype_size[type];
    if (elems > biggest) biggest = elems;
    cJSON *o = cJSON_AddObjectToObject(h, t->name);
    cJSON_AddStringToObject(o, "dtype", t->dtype ? t->dtype : wtype_name[type]);
    cJSON *shape = cJSON_AddArrayToObject(o, "shape");
    if (t->rows > 1 || t->shape0)
      cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)(t->shape0 ? t->shape0 : t->rows)));
    cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->cols));
    cJSON *offs = cJSON_AddArrayToObject(o, "data_offsets");
    double b = (double)off, e = (double)(off + bytes) + (double)t->end_delta;
    cJSON_AddItemToArray(offs, cJSON_CreateNumber(t->swap_offsets ? e : b));
    cJSON_AddItemToArray(offs, cJSON_CreateNumber(t->swap_offsets ? b : e));
    off += bytes;
  }
  char *js = cJSON_PrintUnformatted(h);
  cJSON_Delete(h);
  const char *text = header_text ? header_text : js;
  size_t tl = strlen(text), hl = (tl + 7) / 8 * 8; /* padded with spaces, as writers do */
  uint64_t hlen = hlen_override ? hlen_override : hl;
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  uint8_t le[8];
  for (int i = 0; i < 8; i++) le[i] = (uint8_t)(hlen >> (8 * i));
  CHECK(fwrite(le, 1, 8, f) == 8);
  CHECK(fwrite(text, 1, tl, f) == tl);
  for (size_t i = tl; i < hl; i++) fputc(' ', f);
  free(js);
  float *vals = malloc((size_t)biggest * sizeof(float));
  void *out = malloc((size_t)biggest * 4);
  CHECK(vals && out);
  for (size_t i = 0; i < n; i++) {
    const wt_t *t = &ts[i];
    size_t elems = (size_t)(t->rows * t->cols);
    produce(t, vals, user);
    for (size_t k = 0; k < elems; k++) {
      if (type == W_F32) ((float *)out)[k] = vals[k];
      else if (type == W_F16) ((uint16_t *)out)[k] = model_f32_to_f16(vals[k]);
      else ((uint16_t *)out)[k] = model_f32_to_bf16(vals[k]);
    }
    CHECK(fwrite(out, wtype_size[type], elems, f) == elems);
  }
  free(vals);
  free(out);
  CHECK(fclose(f) == 0);
  return hl;
}

/* The tensors of a Llama checkpoint in Hugging Face naming. */
static size_t llama_tensors(const model_config_t *c, bool with_lm_head, wt_t **out) {
  wt_t *ts = calloc((size_t)(3 + 9 * c->n_layers), sizeof *ts);
  CHECK(ts != NULL);
  size_t n = 0;
  int64_t E = c->n_embd, F = c->n_ff, QD = (int64_t)c->n_heads * c->head_dim,
          KD = (int64_t)c->n_kv_heads * c->head_dim;
#define T(hf, gg, r, cc, hd)                                            \
  do {                                                                  \
    snprintf(ts[n].name, sizeof ts[n].name, "%s", hf);                  \
    snprintf(ts[n].gguf, sizeof ts[n].gguf, "%s", gg);                  \
    ts[n].rows = r;                                                     \
    ts[n].cols = cc;                                                    \
    ts[n].heads = hd;                                                   \
    n++;                                                                \
  } while (0)
  T("model.embed_tokens.weight", "token_embd.weight", c->n_vocab, E, 0);
  T("model.norm.weight", "output_norm.weight", 1, E, 0);
  if (with_lm_head) T("lm_head.weight", "output.weight", c->n_vocab, E, 0);
  static const struct {
    const char *hf, *gg;
    int kind; /* 0 norm, 1 q, 2 k, 3 v, 4 o, 5 gate/up, 6 down */
  } per_layer[] = {
      {"input_layernorm", "attn_norm", 0}, {"self_attn.q_proj", "attn_q", 1},
      {"self_attn.k_proj", "attn_k", 2},   {"self_attn.v_proj", "attn_v", 3},
      {"self_attn.o_proj", "attn_output", 4}, {"post_attention_layernorm", "ffn_norm", 0},
      {"mlp.gate_proj", "ffn_gate", 5},    {"mlp.up_proj", "ffn_up", 5},
      {"mlp.down_proj", "ffn_down", 6},
  };
  for (int32_t l = 0; l < c->n_layers; l++) {
    for (size_t k = 0; k < sizeof per_layer / sizeof *per_layer; k++) {
      char hf[96], gg[64];
      snprintf(hf, sizeof hf, "model.layers.%d.%s.weight", l, per_layer[k].hf);
      snprintf(gg, sizeof gg, "blk.%d.%s.weight", l, per_layer[k].gg);
      int64_t r = 0, cc = 0;
      int32_t hd = 0;
      switch (per_layer[k].kind) {
      case 0: r = 1, cc = E; break;
      case 1: r = QD, cc = E, hd = c->n_heads; break;
      case 2: r = KD, cc = E, hd = c->n_kv_heads; break;
      case 3: r = KD, cc = E; break;
      case 4: r = E, cc = QD; break;
      case 5: r = F, cc = E; break;
      case 6: r = E, cc = F; break;
      }
      T(hf, gg, r, cc, hd);
    }
  }
#undef T
  *out = ts;
  return n;
}

/* ---- the default model as Hugging Face checkpoints ----------------------- */

static model_gguf_t g;
static model_weights_t wref;
static model_config_t cref;
enum { N_TOK = 48 };
static int32_t toks[N_TOK];
/* [N_TOK][n_vocab] logits of the GGUF model: with its Q4_1 weights as they
 * are (ref_q), and with every weight dequantised to fp32 (ref_f: the same
 * values the F32 checkpoint holds, through the same fp32 matmul). */
static float *ref_q, *ref_f;

/* Values of a GGUF tensor, dequantised, q/k in the Hugging Face layout. */
static void produce_gguf(const wt_t *t, float *dst, void *user) {
  (void)user;
  const model_gguf_tensor_t *gt = model_gguf_tensor(&g, t->gguf);
  if (!gt) FAIL_AT("GGUF lacks %s", t->gguf);
  size_t n = (size_t)(t->rows * t->cols);
  CHECK(gt->ne[0] * gt->ne[1] * gt->ne[2] * gt->ne[3] == n);
  if (!t->heads) {
    CHECK_INT_EQ(model_dequant(gt->type, gt->data, dst, n), 0);
    return;
  }
  float *gg = malloc(n * sizeof(float));
  CHECK(gg != NULL);
  CHECK_INT_EQ(model_dequant(gt->type, gt->data, gg, n), 0);
  to_hf_layout(gg, dst, t->rows, t->cols, t->heads);
  free(gg);
}

static int32_t argmax(const float *x, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return best;
}

static void logits_of(const model_weights_t *w, const int32_t *t, int32_t n, float *out) {
  sched_single_t s;
  if (sched_single_init(&s, w, be, n, n, 0, err, sizeof err)) FAIL_AT("%s", err);
  CHECK_INT_EQ(sched_single_feed(&s, t, n, true, out), 0);
  sched_single_destroy(&s);
}

typedef struct cmp {
  double max_d;
  int32_t same; /* positions with the same top-1 */
} cmp_t;

static cmp_t compare(const float *got, const float *ref, int32_t n, int32_t V) {
  cmp_t r = {0, 0};
  for (int32_t p = 0; p < n; p++) {
    const float *a = got + (size_t)p * V, *b = ref + (size_t)p * V;
    for (int32_t i = 0; i < V; i++) {
      double d = fabs((double)a[i] - b[i]);
      if (!(d <= r.max_d)) r.max_d = d; /* NaN sticks */
    }
    r.same += argmax(a, V) == argmax(b, V);
  }
  return r;
}

static void check_config(const model_config_t *a, const model_config_t *b) {
  CHECK_INT_EQ(a->n_layers, b->n_layers);
  CHECK_INT_EQ(a->n_embd, b->n_embd);
  CHECK_INT_EQ(a->n_ff, b->n_ff);
  CHECK_INT_EQ(a->n_heads, b->n_heads);
  CHECK_INT_EQ(a->n_kv_heads, b->n_kv_heads);
  CHECK_INT_EQ(a->head_dim, b->head_dim);
  CHECK_INT_EQ(a->n_vocab, b->n_vocab);
  CHECK_INT_EQ(a->tied_embeddings, b->tied_embeddings);
  CHECK_NEAR(a->rope_theta, b->rope_theta, 1e-3);
  CHECK_NEAR(a->rms_eps, b->rms_eps, 1e-12);
}

/* Load dir, run the tokens, compare with the GGUF model both ways; *vs_q
 * gets the comparison with the quantised one. */
static cmp_t load_and_compare(const char *dir, const char *what, float *logits, cmp_t *vs_q) {
  model_weights_t w;
  if (model_weights_from_safetensors(&w, dir, be, err, sizeof err)) FAIL_AT("%s: %s", what, err);
  check_config(&w.cfg, &wref.cfg);
  CHECK(w.output.data == w.tok_embd.data); /* tied: no lm_head */
  logits_of(&w, toks, N_TOK, logits);
  cmp_t r = compare(logits, ref_f, N_TOK, cref.n_vocab);
  *vs_q = compare(logits, ref_q, N_TOK, cref.n_vocab);
  fprintf(stderr,
          "%s (%.1f MB of weights): vs GGUF dequantised to F32: top-1 equal at %d/%d positions, "
          "max |dlogit| %.3g; vs GGUF Q4_1 as is: %d/%d, max |dlogit| %.3g\n",
          what, (double)w.bytes / 1e6, r.same, N_TOK, r.max_d, vs_q->same, N_TOK, vs_q->max_d);
  model_weights_destroy(&w);
  return r;
}

/* F32: the dequantised values exactly, so the logits equal those of the
 * GGUF model dequantised to fp32 (the same weights through the same fp32
 * matmul: observed max |dlogit| 0, bound 1e-4), which a wrong q/k row order
 * would not. Against the GGUF's own Q4_1 path, whose matmul quantises the
 * activations to int8, the logits differ by more (observed max |dlogit|
 * about 1.2 on logits of magnitude ~20, top-1 equal at 48/48 positions);
 * there top-1 must agree at >= 90% of positions. */
static void test_f32(void) {
  wt_t *ts;
  size_t n = llama_tensors(&cref, false, &ts);
  char dir[600], path[700];
  make_dir(dir, sizeof dir, "f32");
  write_config(dir, &cref);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  write_st(path, ts, n, W_F32, produce_gguf, NULL, NULL, 0);
  float *logits = malloc((size_t)N_TOK * cref.n_vocab * sizeof(float));
  cmp_t q, r = load_and_compare(dir, "F32 single file", logits, &q);
  CHECK_INT_EQ(r.same, N_TOK);
  CHECK(r.max_d <= 1e-4);
  CHECK(q.same * 10 >= N_TOK * 9);
  free(logits);
  free(ts);
  rm_rf(dir);
}

/* BF16 (loaded as BF16 through view, q/k as permuted copies): 8 bits of
 * mantissa on every weight; top-1 equal at >= 90% of positions, against
 * both GGUF references. */
static void test_bf16(void) {
  wt_t *ts;
  size_t n = llama_tensors(&cref, false, &ts);
  char dir[600], path[700];
  make_dir(dir, sizeof dir, "bf16");
  write_config(dir, &cref);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  write_st(path, ts, n, W_BF16, produce_gguf, NULL, NULL, 0);
  float *logits = malloc((size_t)N_TOK * cref.n_vocab * sizeof(float));
  cmp_t q, r = load_and_compare(dir, "BF16 single file", logits, &q);
  CHECK(r.same * 10 >= N_TOK * 9);
  CHECK(q.same * 10 >= N_TOK * 9);
  free(logits);
  free(ts);
  rm_rf(dir);
}

/* F16 in two shards with model.safetensors.index.json; then the same
 * shards without the index (found by listing the directory): identical
 * logits. */
static void test_sharded(void) {
  wt_t *ts;
  size_t n = llama_tensors(&cref, false, &ts);
  char dir[600], path[700];
  make_dir(dir, sizeof dir, "sharded");
  write_config(dir, &cref);
  size_t half = n / 2;
  static const char *const shard[2] = {"model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors"};
  snprintf(path, sizeof path, "%s/%s", dir, shard[0]);
  write_st(path, ts, half, W_F16, produce_gguf, NULL, NULL, 0);
  snprintf(path, sizeof path, "%s/%s", dir, shard[1]);
  write_st(path, ts + half, n - half, W_F16, produce_gguf, NULL, NULL, 0);
  cJSON *idx = cJSON_CreateObject();
  cJSON *meta = cJSON_AddObjectToObject(idx, "metadata");
  double total = 0;
  for (size_t i = 0; i < n; i++) total += (double)(ts[i].rows * ts[i].cols * 2);
  cJSON_AddNumberToObject(meta, "total_size", total);
  cJSON *map = cJSON_AddObjectToObject(idx, "weight_map");
  for (size_t i = 0; i < n; i++) cJSON_AddStringToObject(map, ts[i].name, shard[i >= half]);
  char *js = cJSON_Print(idx);
  write_text(dir, "model.safetensors.index.json", js);
  free(js);
  cJSON_Delete(idx);

  size_t sz = (size_t)N_TOK * cref.n_vocab * sizeof(float);
  float *a = malloc(sz), *b = malloc(sz);
  cmp_t q, r = load_and_compare(dir, "F16 two shards + index", a, &q);
  CHECK(r.same * 10 >= N_TOK * 9);
  CHECK(q.same * 10 >= N_TOK * 9);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  CHECK(unlink(path) == 0);
  load_and_compare(dir, "F16 two shards, no index", b, &q);
  CHECK(memcmp(a, b, sz) == 0);
  free(a);
  free(b);
  free(ts);
  rm_rf(dir);
}

/* ---- a tiny checkpoint --------------------------------------------------- */

static const model_config_t tiny = {
    .arch = "llama", .n_layers = 2, .n_embd = 64, .n_ff = 128, .n_heads = 4, .n_kv_heads = 2,
    .head_dim = 16, .n_vocab = 256, .n_ctx_train = 256, .rms_eps = 1e-5f,
    .rope_theta = 10000.0f, .tied_embeddings = false};

/* Value (GGUF layout) of element i of a tensor: distinct per tensor. */
static float tiny_value(const char *name, size_t i) {
  uint32_t id = 0;
  for (const char *p = name; *p; p++) id = id * 31 + (uint8_t)*p;
  return model_dummy_value(7, id, i, 0.25f);
}

static void produce_tiny(const wt_t *t, float *dst, void *user) {
  (void)user;
  size_t n = (size_t)(t->rows * t->cols);
  float *gg = malloc(n * sizeof(float));
  CHECK(gg != NULL);
  for (size_t i = 0; i < n; i++) gg[i] = tiny_value(t->name, i);
  if (t->heads) to_hf_layout(gg, dst, t->rows, t->cols, t->heads);
  else memcpy(dst, gg, n * sizeof(float));
  free(gg);
}

/* A fresh directory holding config.json and the tiny model in one file. */
static void tiny_dir(char *dir, size_t cap, const char *name, wt_t **ts, size_t *n) {
  make_dir(dir, cap, name);
  write_config(dir, &tiny);
  *n = llama_tensors(&tiny, true, ts);
}

static void tiny_write(const char *dir, const wt_t *ts, size_t n, wtype_t type) {
  char path[700];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  write_st(path, ts, n, type, produce_tiny, NULL, NULL, 0);
}

/* The loaded q/k hold, row for row, the GGUF-layout values the checkpoint
 * was made from: the permutation is exactly llama.cpp's. Checked through
 * fill (F32) and through view (BF16 stays BF16 on the CPU backend). */
static void test_permutation(void) {
  for (int pass = 0; pass < 2; pass++) {
    wt_t *ts;
    size_t n;
    char dir[600];
    tiny_dir(dir, sizeof dir, "perm", &ts, &n);
    tiny_write(dir, ts, n, pass ? W_BF16 : W_F32);
    model_weights_t w;
    if (model_weights_from_safetensors(&w, dir, be, err, sizeof err)) FAIL_AT("%s", err);
    CHECK(!w.cfg.tied_embeddings && w.output.data != w.tok_embd.data);
    for (int32_t l = 0; l < tiny.n_layers; l++) {
      const k_weight_t *mats[3] = {&w.layers[l].wq, &w.layers[l].wk, &w.layers[l].wv};
      static const char *const names[3] = {"q_proj", "k_proj", "v_proj"};
      for (int m = 0; m < 3; m++) {
        const k_weight_t *kw = mats[m];
        CHECK_INT_EQ(kw->type, pass ? K_BF16 : K_F32);
        size_t elems = (size_t)(kw->rows * kw->cols), esz = pass ? 2 : 4;
        uint8_t *host = malloc(elems * esz);
        CHECK(host != NULL);
        CHECK_INT_EQ(be->ops->download(be, host, kw->data, elems * esz), 0);
        char hf[96];
        snprintf(hf, sizeof hf, "model.layers.%d.self_attn.%s.weight", l, names[m]);
        for (size_t i = 0; i < elems; i++) {
          float want = tiny_value(hf, i), got;
          if (pass) {
            uint16_t h;
            memcpy(&h, host + 2 * i, 2);
            got = model_bf16_to_f32(h);
            want = model_bf16_to_f32(model_f32_to_bf16(want));
          } else {
            memcpy(&got, host + 4 * i, 4);
          }
          if (got != want)
            FAIL_AT("%s (%s) element %zu (row %zu): %g, want %g", hf, pass ? "BF16" : "F32", i,
                    i / (size_t)kw->cols, got, want);
        }
        free(host);
      }
    }
    model_weights_destroy(&w);
    free(ts);
    rm_rf(dir);
  }
}

/* rc < 0 and a one-line message holding every one of the needles. */
static void expect_fail(int rc, const char *what, const char *n1, const char *n2) {
  if (rc >= 0) FAIL_AT("%s: loaded (rc %d), want an error", what, rc);
  if (!err[0] || strchr(err, '\n')) FAIL_AT("%s: message %s", what, err[0] ? "has a newline" : "empty");
  if ((n1 && !strstr(err, n1)) || (n2 && !strstr(err, n2)))
    FAIL_AT("%s: message \"%s\" lacks \"%s\"%s%s", what, err, n1, n2 ? " or " : "", n2 ? n2 : "");
  fprintf(stderr, "  %-34s -> %d: %s\n", what, rc, err);
}

static int try_load(const char *dir) {
  model_weights_t w;
  err[0] = 0;
  int rc = model_weights_from_safetensors(&w, dir, be, err, sizeof err);
  if (!rc) model_weights_destroy(&w);
  return rc;
}

static void test_damaged(void) {
  wt_t *ts;
  size_t n;
  char dir[600], path[700];
  tiny_dir(dir, sizeof dir, "bad", &ts, &n);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  /* the undamaged file loads */
  tiny_write(dir, ts, n, W_F32);
  CHECK_INT_EQ(try_load(dir), 0);

  /* shorter than the length field */
  FILE *f = fopen(path, "wb");
  CHECK(f && fwrite("abcd", 1, 4, f) == 4 && fclose(f) == 0);
  expect_fail(try_load(dir), "4-byte file", "model.safetensors", "truncated");
  /* header length past the end of the file */
  write_st(path, ts, n, W_F32, produce_tiny, NULL, NULL, (uint64_t)1 << 40);
  expect_fail(try_load(dir), "header length 2^40", "model.safetensors", "header length");
  struct stat sb;
  CHECK(stat(path, &sb) == 0);
  write_st(path, ts, n, W_F32, produce_tiny, NULL, NULL, (uint64_t)sb.st_size - 7);
  expect_fail(try_load(dir), "header length size-7", "model.safetensors", "past the end");
  /* bad JSON, and JSON that is not an object */
  write_st(path, ts, n, W_F32, produce_tiny, NULL, "{\"model.norm.weight\": {\"dtype\": ", 0);
  expect_fail(try_load(dir), "truncated JSON header", "model.safetensors", "JSON");
  write_st(path, ts, n, W_F32, produce_tiny, NULL, "[1, 2, 3]", 0);
  expect_fail(try_load(dir), "JSON array header", "model.safetensors", "JSON");
  write_st(path, ts, n, W_F32, produce_tiny, NULL, "{\"model.norm.weight\": 5}", 0);
  expect_fail(try_load(dir), "entry that is not an object", "model.safetensors", "dtype");

  /* damage to one entry: tensor index, field, value */
  struct {
    const char *what, *needle;
    int kind;
  } cases[] = {
      {"offsets past the end", "past the end", 0},
      {"offsets begin > end", "data_offsets", 1},
      {"byte count != shape", "size mismatch", 2},
      {"dtype I64", "I64", 3},
      {"shape mismatch", "shape mismatch", 4},
      {"missing tensor", "model.layers.1.mlp.up_proj.weight", 5},
  };
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    wt_t *bad = malloc(n * sizeof *bad);
    memcpy(bad, ts, n * sizeof *bad);
    size_t nb = n;
    size_t last = n - 1, up1 = 0;
    for (size_t i = 0; i < n; i++)
      if (!strcmp(ts[i].name, "model.layers.1.mlp.up_proj.weight")) up1 = i;
    switch (cases[c].kind) {
    case 0: bad[last].end_delta = 4096; break;
    case 1: bad[3].swap_offsets = true; break;
    case 2: bad[1].shape0 = 3; break; /* model.norm.weight as [3, 64] */
    case 3: bad[0].dtype = "I64"; break;
    case 4: bad[last].rows /= 2; break; /* down_proj of the last layer: half its rows */
    case 5: memmove(&bad[up1], &bad[up1 + 1], (n - up1 - 1) * sizeof *bad), nb--; break;
    }
    write_st(path, bad, nb, W_F32, produce_tiny, NULL, NULL, 0);
    expect_fail(try_load(dir), cases[c].what, cases[c].needle, cases[c].kind == 5 ? NULL
                                                                                 : "model.safetensors");
    free(bad);
  }

  /* directory-level problems */
  CHECK(unlink(path) == 0);
  expect_fail(try_load(dir), "no *.safetensors files", "no *.safetensors", NULL);
  tiny_write(dir, ts, n, W_F32);
  snprintf(path, sizeof path, "%s/config.json", dir);
  CHECK(unlink(path) == 0);
  expect_fail(try_load(dir), "no config.json", "config.json", NULL);
  write_text(dir, "config.json", "{\"model_type\": \"llama\"}");
  expect_fail(try_load(dir), "config.json without sizes", "config.json", NULL);
  write_config(dir, &tiny);
  write_text(dir, "model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}");
  expect_fail(try_load(dir), "index names a missing shard", "model-00002-of-00002", NULL);
  write_text(dir, "model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"../model.safetensors\"}}");
  expect_fail(try_load(dir), "index with a path in a name", "bad file name", NULL);
  write_text(dir, "model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"model.safetensors\", "
             "\"model.extra.weight\": \"model.safetensors\"}}");
  expect_fail(try_load(dir), "index lists an absent tensor", "model.extra.weight", NULL);
  write_text(dir, "model.safetensors.index.json", "{\"weight_map\": ");
  expect_fail(try_load(dir), "index that is not JSON", "weight_map", NULL);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  CHECK(unlink(path) == 0);
  /* the same tensor in two files */
  snprintf(path, sizeof path, "%s/model-extra.safetensors", dir);
  write_st(path, ts, 2, W_F32, produce_tiny, NULL, NULL, 0);
  expect_fail(try_load(dir), "tensor in two files", "appears in", NULL);
  CHECK(unlink(path) == 0);
  CHECK_INT_EQ(try_load(dir), 0);
  free(ts);
  rm_rf(dir);
}

/* Random bytes flipped in the header region: any outcome but a crash. */
static void test_header_flips(void) {
  wt_t *ts;
  size_t n;
  char dir[600], path[700];
  tiny_dir(dir, sizeof dir, "flip", &ts, &n);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  uint64_t hl = write_st(path, ts, n, W_F32, produce_tiny, NULL, NULL, 0);
  FILE *f = fopen(path, "rb");
  CHECK(f != NULL);
  size_t head_len = (size_t)hl + 8;
  uint8_t *orig = malloc(head_len);
  CHECK(fread(orig, 1, head_len, f) == head_len);
  fclose(f);
  uint64_t s = 12345;
  int loaded = 0, cases = 300;
  for (int c = 0; c < cases; c++) {
    uint8_t *b = malloc(head_len);
    memcpy(b, orig, head_len);
    int flips = 1 + (int)(s % 4);
    for (int k = 0; k < flips; k++) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      size_t pos = (size_t)(s >> 33) % head_len;
      /* half the time a digit-for-digit change, which keeps the JSON valid */
      uint8_t v = (s >> 20) & 1 && b[pos] >= '0' && b[pos] <= '9' ? (uint8_t)('0' + (s >> 24) % 10)
                                                                  : (uint8_t)(b[pos] ^ (s >> 24));
      b[pos] = v;
    }
    f = fopen(path, "r+b");
    CHECK(f && fwrite(b, 1, head_len, f) == head_len && fclose(f) == 0);
    free(b);
    int rc = try_load(dir);
    if (rc == 0) loaded++;
    else if (rc > 0 || !err[0] || strchr(err, '\n')) FAIL_AT("flip case %d: rc %d, message '%s'", c, rc, err);
  }
  fprintf(stderr, "  header flips: %d cases, %d still loaded\n", cases, loaded);
  free(orig);
  free(ts);
  rm_rf(dir);
}

/* ---- dummy weights ------------------------------------------------------- */

static void test_dummy(void) {
  /* model_dummy_value: a pure function, uniform in [-scale, scale) */
  double sum = 0;
  for (uint64_t i = 0; i < 10000; i++) {
    float v = model_dummy_value(42, 3, i, 0.5f);
    CHECK(v == model_dummy_value(42, 3, i, 0.5f));
    CHECK(v >= -0.5f && v < 0.5f);
    sum += v;
  }
  CHECK(fabs(sum / 10000) < 0.02);
  CHECK(model_dummy_value(42, 3, 7, 1) != model_dummy_value(43, 3, 7, 1));
  CHECK(model_dummy_value(42, 3, 7, 1) != model_dummy_value(42, 4, 7, 1));
  CHECK(model_dummy_value(42, 3, 7, 1) != model_dummy_value(42, 3, 8, 1));

  enum { N = 12 };
  int32_t t[N];
  for (int i = 0; i < N; i++) t[i] = (i * 37 + 5) % tiny.n_vocab;
  size_t sz = (size_t)N * tiny.n_vocab * sizeof(float);
  float *l[3];
  uint64_t seeds[3] = {1, 1, 2};
  for (int k = 0; k < 3; k++) {
    model_weights_t w;
    if (model_weights_dummy(&w, &tiny, seeds[k], be, err, sizeof err)) FAIL_AT("%s", err);
    l[k] = malloc(sz);
    logits_of(&w, t, N, l[k]);
    for (size_t i = 0; i < (size_t)N * tiny.n_vocab; i++) CHECK(isfinite(l[k][i]));
    model_weights_destroy(&w);
  }
  CHECK(memcmp(l[0], l[1], sz) == 0);
  CHECK(memcmp(l[0], l[2], sz) != 0);
  /* the logits are not degenerate: they vary across the vocabulary */
  float lo = l[0][0], hi = l[0][0];
  for (int32_t i = 0; i < tiny.n_vocab; i++) {
    if (l[0][i] < lo) lo = l[0][i];
    if (l[0][i] > hi) hi = l[0][i];
  }
  CHECK(hi - lo > 0.1f);
  for (int k = 0; k < 3; k++) free(l[k]);
  /* a config that fails the checks is refused */
  model_config_t bad = tiny;
  bad.n_kv_heads = 3;
  model_weights_t w;
  err[0] = 0;
  expect_fail(model_weights_dummy(&w, &bad, 1, be, err, sizeof err), "dummy: 4 heads / 3 KV",
              "divisible", NULL);
  model_weights_destroy(&w);
}

/* ---- main ---------------------------------------------------------------- */

static void setup_default_model(const char *path) {
  if (model_gguf_open(&g, path, err, sizeof err)) FAIL_AT("%s", err);
  if (model_weights_from_gguf(&wref, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  cref = wref.cfg;
  model_tok_t *tok;
  if (model_tok_from_gguf(&tok, &g, err, sizeof err)) FAIL_AT("%s", err);
  static const char text[] =
      "The capital of France is Paris. It lies on the Seine, and its museums hold some of "
      "the most famous paintings in the world, among them the Mona Lisa at the Louvre. Every "
      "year millions of visitors walk along its boulevards, climb the Eiffel Tower and sit in "
      "the cafes of Montmartre.";
  size_t n = 0;
  int32_t ids[256];
  CHECK_INT_EQ(model_tok_encode(tok, text, strlen(text), false, ids, 256, &n), 0);
  CHECK(n >= N_TOK);
  memcpy(toks, ids, sizeof toks);
  model_tok_free(tok);
  size_t sz = (size_t)N_TOK * cref.n_vocab * sizeof(float);
  ref_q = malloc(sz);
  ref_f = malloc(sz);
  logits_of(&wref, toks, N_TOK, ref_q);
  /* the backend told it computes on fp32 weights only: the GGUF loader
   * dequantises every tensor */
  uint32_t types = be->weight_types;
  be->weight_types = 1u << K_F32;
  model_weights_t wf;
  if (model_weights_from_gguf(&wf, &g, be, err, sizeof err)) FAIL_AT("%s", err);
  be->weight_types = types;
  CHECK_INT_EQ(wf.layers[0].wq.type, K_F32);
  logits_of(&wf, toks, N_TOK, ref_f);
  model_weights_destroy(&wf);
}

int main(void) {
  const char *tmp = getenv("TMPDIR");
  snprintf(root, sizeof root, "%s/pressd-test-st-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  CHECK(mkdtemp(root) != NULL);
  CHECK_INT_EQ(k_cpu_backend_new(&be, 2), 0);
  RUN(test_dummy);
  RUN(test_permutation);
  RUN(test_damaged);
  RUN(test_header_flips);
  const char *path = test_model_path();
  if (path) {
    setup_default_model(path);
    RUN(test_f32);
    RUN(test_bf16);
    RUN(test_sharded);
    free(ref_q);
    free(ref_f);
    model_weights_destroy(&wref);
    model_gguf_close(&g);
  }
  k_backend_free(be);
  rm_rf(root);
  if (!path) {
    fprintf(stderr, "skip: the default model is absent (PRESSD_MODEL); GGUF comparisons not run\n");
    return TEST_SKIP;
  }
  return 0;
}
