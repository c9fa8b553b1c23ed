/* GGUF reader: images written in memory by a small writer below are parsed
 * back value by value; then every kind of damage (truncation at every
 * length, bad headers, lengths and offsets past the end, random byte flips)
 * must give a negative errno and a message, never a crash; finally a few
 * known facts of the default model when it is present. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/gguf.h"
#include "model/quant.h"
#include "tests/test.h"

/* ---- a little-endian GGUF writer ---------------------------------------- */

typedef struct wbuf {
  uint8_t *p;
  size_t len, cap;
} wbuf_t;

static void w_bytes(wbuf_t *w, const void *src, size_t n) {
  if (w->len + n > w->cap) {
    size_t cap = w->cap ? w->cap : 256;
    while (cap < w->len + n) cap *= 2;
    w->p = realloc(w->p, cap);
    CHECK(w->p);
    w->cap = cap;
  }
  if (n) memcpy(w->p + w->len, src, n);
  w->len += n;
}

static void w_u8(wbuf_t *w, uint8_t x) { w_bytes(w, &x, 1); }
static void w_u16(wbuf_t *w, uint16_t x) {
  uint8_t b[2] = {(uint8_t)x, (uint8_t)(x >> 8)};
  w_bytes(w, b, 2);
}
static void w_u32(wbuf_t *w, uint32_t x) {
  uint8_t b[4];
  for (int i = 0; i < 4; i++) b[i] = (uint8_t)(x >> (8 * i));
  w_bytes(w, b, 4);
}
static void w_u64(wbuf_t *w, uint64_t x) {
  uint8_t b[8];
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)(x >> (8 * i));
  w_bytes(w, b, 8);
}
static void w_f32(wbuf_t *w, float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  w_u32(w, x);
}
static void w_f64(wbuf_t *w, double f) {
  uint64_t x;
  memcpy(&x, &f, 8);
  w_u64(w, x);
}
static void w_str(wbuf_t *w, const char *s) {
  w_u64(w, strlen(s));
  w_bytes(w, s, strlen(s));
}
static void w_pad(wbuf_t *w, size_t align) {
  while (w->len % align) w_u8(w, 0);
}
static void w_free(wbuf_t *w) {
  free(w->p);
  memset(w, 0, sizeof *w);
}

static void w_header(wbuf_t *w, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
  w_bytes(w, "GGUF", 4);
  w_u32(w, version);
  w_u64(w, n_tensors);
  w_u64(w, n_kv);
}
static void w_key(wbuf_t *w, const char *key, uint32_t type) {
  w_str(w, key);
  w_u32(w, type);
}
static void w_tensor(wbuf_t *w, const char *name, uint32_t n_dims, const uint64_t *ne,
                     uint32_t type, uint64_t offset) {
  w_str(w, name);
  w_u32(w, n_dims);
  for (uint32_t d = 0; d < n_dims; d++) w_u64(w, ne[d]);
  w_u32(w, type);
  w_u64(w, offset);
}

/* ---- the reference image ------------------------------------------------- */

#define N_TENSORS 4

typedef struct tspec {
  const char *name;
  uint32_t n_dims;
  uint64_t ne[4];
  uint32_t type;
  size_t nbytes;
} tspec_t;

static const tspec_t k_tensors[N_TENSORS] = {
    {"a.f32", 2, {3, 2, 1, 1}, MODEL_GGML_F32, 24},
    {"b.q8_0", 1, {64, 1, 1, 1}, MODEL_GGML_Q8_0, 68},
    {"c.f16", 4, {2, 2, 2, 2}, MODEL_GGML_F16, 32},
    {"d.q4_1", 2, {32, 3, 1, 1}, MODEL_GGML_Q4_1, 60},
};

static const char *const k_arr_strs[] = {"alpha", "", "gamma delta", "\xc3\xa9t\xc3\xa9"};
static const int32_t k_arr_i32[] = {1, -2, 3, INT32_MIN, INT32_MAX, 0};
static const float k_arr_f32[] = {0.5f, -1.25f, 3.0e10f};
static const double k_arr_f64[] = {1e-300, -2.5, 6.02214076e23};
static const uint64_t k_arr_u64[] = {0, 1, UINT64_MAX};
static const int64_t k_arr_i64[] = {INT64_MIN, -1, INT64_MAX};
static const uint8_t k_arr_u8[] = {0, 7, 255};
static const int8_t k_arr_i8[] = {-128, 0, 127};
static const uint16_t k_arr_u16[] = {65535, 1};
static const int16_t k_arr_i16[] = {-32768, 32767};
static const uint32_t k_arr_u32[] = {4000000000u, 2};
static const uint8_t k_arr_bool[] = {1, 0, 1};

#define N_KV 31

static uint8_t tensor_byte(int t, size_t i) { return (uint8_t)(t * 37 + i * 11 + 5); }

/* Writes a complete valid image. alignment 0: no general.alignment key (the
 * default of 32 applies). The last tensor's data ends the file, so every
 * proper prefix is invalid. offsets[] receives each tensor's offset within
 * the data section, *data_off the data section's start. */
static void build_image(wbuf_t *w, uint32_t alignment, uint64_t offsets[N_TENSORS],
                        size_t *data_off) {
  memset(w, 0, sizeof *w);
  w_header(w, 3, N_TENSORS, alignment ? N_KV : N_KV - 1);
  w_key(w, "general.architecture", MODEL_GGUF_STRING);
  w_str(w, "llama");
  if (alignment) {
    w_key(w, "general.alignment", MODEL_GGUF_UINT32);
    w_u32(w, alignment);
  }
  w_key(w, "t.u8", MODEL_GGUF_UINT8);
  w_u8(w, 200);
  w_key(w, "t.i8", MODEL_GGUF_INT8);
  w_u8(w, (uint8_t)-100);
  w_key(w, "t.u16", MODEL_GGUF_UINT16);
  w_u16(w, 60000);
  w_key(w, "t.i16", MODEL_GGUF_INT16);
  w_u16(w, (uint16_t)-30000);
  w_key(w, "t.u32", MODEL_GGUF_UINT32);
  w_u32(w, 4000000000u);
  w_key(w, "t.i32", MODEL_GGUF_INT32);
  w_u32(w, (uint32_t)-2000000000);
  w_key(w, "t.f32", MODEL_GGUF_FLOAT32);
  w_f32(w, 1.5f);
  w_key(w, "t.bool", MODEL_GGUF_BOOL);
  w_u8(w, 1);
  w_key(w, "t.bool0", MODEL_GGUF_BOOL);
  w_u8(w, 0);
  w_key(w, "t.str", MODEL_GGUF_STRING);
  w_str(w, "hello, gguf");
  w_key(w, "t.empty", MODEL_GGUF_STRING);
  w_str(w, "");
  w_key(w, "t.u64", MODEL_GGUF_UINT64);
  w_u64(w, 12345678901ull);
  w_key(w, "t.u64big", MODEL_GGUF_UINT64);
  w_u64(w, (1ull << 63) + 5);
  w_key(w, "t.i64", MODEL_GGUF_INT64);
  w_u64(w, (uint64_t)-9000000000000ll);
  w_key(w, "t.f64", MODEL_GGUF_FLOAT64);
  w_f64(w, 3.141592653589793);

  w_key(w, "t.arr.str", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_STRING);
  w_u64(w, 4);
  for (int i = 0; i < 4; i++) w_str(w, k_arr_strs[i]);
  w_key(w, "t.arr.i32", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_INT32);
  w_u64(w, 6);
  for (int i = 0; i < 6; i++) w_u32(w, (uint32_t)k_arr_i32[i]);
  w_key(w, "t.arr.f32", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_FLOAT32);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_f32(w, k_arr_f32[i]);
  w_key(w, "t.arr.f64", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_FLOAT64);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_f64(w, k_arr_f64[i]);
  w_key(w, "t.arr.u64", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_UINT64);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_u64(w, k_arr_u64[i]);
  w_key(w, "t.arr.i64", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_INT64);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_u64(w, (uint64_t)k_arr_i64[i]);
  w_key(w, "t.arr.u8", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_UINT8);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_u8(w, k_arr_u8[i]);
  w_key(w, "t.arr.i8", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_INT8);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_u8(w, (uint8_t)k_arr_i8[i]);
  w_key(w, "t.arr.u16", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_UINT16);
  w_u64(w, 2);
  for (int i = 0; i < 2; i++) w_u16(w, k_arr_u16[i]);
  w_key(w, "t.arr.i16", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_INT16);
  w_u64(w, 2);
  for (int i = 0; i < 2; i++) w_u16(w, (uint16_t)k_arr_i16[i]);
  w_key(w, "t.arr.u32", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_UINT32);
  w_u64(w, 2);
  for (int i = 0; i < 2; i++) w_u32(w, k_arr_u32[i]);
  w_key(w, "t.arr.bool", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_BOOL);
  w_u64(w, 3);
  for (int i = 0; i < 3; i++) w_u8(w, k_arr_bool[i]);
  w_key(w, "t.arr.empty", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_INT32);
  w_u64(w, 0);
  w_key(w, "t.arr.nostr", MODEL_GGUF_ARRAY);
  w_u32(w, MODEL_GGUF_STRING);
  w_u64(w, 0);

  size_t align = alignment ? alignment : 32;
  uint64_t off = 0;
  for (int t = 0; t < N_TENSORS; t++) {
    offsets[t] = off;
    w_tensor(w, k_tensors[t].name, k_tensors[t].n_dims, k_tensors[t].ne, k_tensors[t].type, off);
    off += k_tensors[t].nbytes;
    off = (off + align - 1) / align * align;
  }
  w_pad(w, align);
  *data_off = w->len;
  for (int t = 0; t < N_TENSORS; t++) {
    while (w->len < *data_off + offsets[t]) w_u8(w, 0xee);
    for (size_t i = 0; i < k_tensors[t].nbytes; i++) w_u8(w, tensor_byte(t, i));
  }
}

/* A private copy of exactly len bytes, so that ASan sees any read past it. */
static uint8_t *dup_exact(const uint8_t *p, size_t len) {
  uint8_t *c = malloc(len ? len : 1);
  CHECK(c);
  if (len) memcpy(c, p, len);
  return c;
}

/* Parse that must fail: negative errno, a message, and a zeroed object. */
static void expect_fail(const uint8_t *img, size_t len, int want_rc, const char *want_in_msg) {
  uint8_t *c = dup_exact(img, len);
  model_gguf_t g;
  char err[256];
  memset(err, 'x', sizeof err);
  int rc = model_gguf_parse(&g, c, len, err, sizeof err);
  if (rc >= 0 || rc < -4095) FAIL_AT("expected a negative errno, got %d", rc);
  if (want_rc) CHECK_INT_EQ(rc, want_rc);
  CHECK(memchr(err, 0, sizeof err) != NULL);
  if (err[0] == 0) FAIL_AT("empty error message for rc %d (len %zu)", rc, len);
  if (want_in_msg && !strstr(err, want_in_msg))
    FAIL_AT("message \"%s\" does not mention \"%s\"", err, want_in_msg);
  CHECK(g.kv == NULL && g.tensors == NULL && g.n_kv == 0);
  model_gguf_close(&g);
  free(c);
}

static bool view_inside(const void *p, uint64_t n, const uint8_t *buf, size_t len) {
  const uint8_t *q = p;
  if (n == 0) return true;
  return q >= buf && q <= buf + len && n <= (uint64_t)(buf + len - q);
}

/* Every view a successful parse hands out lies inside the buffer. */
static void check_views(const model_gguf_t *g, const uint8_t *buf, size_t len) {
  for (uint64_t i = 0; i < g->n_kv; i++) {
    const model_gguf_kv_t *kv = &g->kv[i];
    CHECK(view_inside(kv->key.ptr, kv->key.len, buf, len));
    if (kv->type == MODEL_GGUF_STRING) CHECK(view_inside(kv->v.s.ptr, kv->v.s.len, buf, len));
    if (kv->type == MODEL_GGUF_ARRAY) {
      if (kv->arr_type == MODEL_GGUF_STRING) {
        CHECK(kv->arr_strs != NULL);
        for (uint64_t k = 0; k < kv->arr_len; k++)
          CHECK(view_inside(kv->arr_strs[k].ptr, kv->arr_strs[k].len, buf, len));
      } else {
        int64_t x;
        double f;
        /* reading every element must stay inside the buffer (ASan checks) */
        for (uint64_t k = 0; k < kv->arr_len && k < 64; k++) {
          (void)model_gguf_arr_i64(kv, k, &x);
          (void)model_gguf_arr_f64(kv, k, &f);
        }
        if (kv->arr_len) {
          (void)model_gguf_arr_i64(kv, kv->arr_len - 1, &x);
          CHECK(kv->arr_data != NULL);
        }
      }
    }
  }
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const model_gguf_tensor_t *t = &g->tensors[i];
    CHECK(view_inside(t->name.ptr, t->name.len, buf, len));
    CHECK(t->n_dims >= 1 && t->n_dims <= 4);
    CHECK(t->data != NULL);
    CHECK(view_inside(t->data, t->nbytes, buf, len));
    CHECK((uint64_t)((const uint8_t *)t->data - buf) <= len);
  }
}

/* ---- positive tests ----------------------------------------------------- */

static void check_scalars(const model_gguf_t *g) {
  int64_t i;
  double f;
  bool b;
  model_gguf_str_t s;

  CHECK_INT_EQ(model_gguf_get_str(g, "general.architecture", &s), 0);
  CHECK(model_gguf_str_eq(s, "llama"));
  CHECK(!model_gguf_str_eq(s, "llam"));
  CHECK(!model_gguf_str_eq(s, "llama2"));

  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u8", &i), 0);
  CHECK_INT_EQ(i, 200);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.i8", &i), 0);
  CHECK_INT_EQ(i, -100);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u16", &i), 0);
  CHECK_INT_EQ(i, 60000);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.i16", &i), 0);
  CHECK_INT_EQ(i, -30000);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u32", &i), 0);
  CHECK_INT_EQ(i, 4000000000ll);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.i32", &i), 0);
  CHECK_INT_EQ(i, -2000000000ll);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u64", &i), 0);
  CHECK_INT_EQ(i, 12345678901ll);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.i64", &i), 0);
  CHECK_INT_EQ(i, -9000000000000ll);
  /* a uint64 above INT64_MAX does not convert */
  i = 42;
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u64big", &i), -EINVAL);
  CHECK_INT_EQ(i, 42);
  CHECK_INT_EQ(model_gguf_get_f64(g, "t.u64big", &f), -EINVAL);
  const model_gguf_kv_t *kv = model_gguf_find(g, "t.u64big");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->type, MODEL_GGUF_UINT64);
  CHECK(kv->v.u == (1ull << 63) + 5);
  /* bools convert to integers, not the other way round */
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.bool", &i), 0);
  CHECK_INT_EQ(i, 1);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.bool0", &i), 0);
  CHECK_INT_EQ(i, 0);
  CHECK_INT_EQ(model_gguf_get_bool(g, "t.bool", &b), 0);
  CHECK(b == true);
  CHECK_INT_EQ(model_gguf_get_bool(g, "t.bool0", &b), 0);
  CHECK(b == false);
  CHECK_INT_EQ(model_gguf_get_bool(g, "t.u8", &b), -EINVAL);

  CHECK_INT_EQ(model_gguf_get_f64(g, "t.f32", &f), 0);
  CHECK_NEAR(f, 1.5, 0);
  CHECK_INT_EQ(model_gguf_get_f64(g, "t.f64", &f), 0);
  CHECK_NEAR(f, 3.141592653589793, 0);
  CHECK_INT_EQ(model_gguf_get_f64(g, "t.i32", &f), 0);
  CHECK_NEAR(f, -2000000000.0, 0);
  CHECK_INT_EQ(model_gguf_get_f64(g, "t.u8", &f), 0);
  CHECK_NEAR(f, 200.0, 0);
  /* floats do not convert to integers */
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.f32", &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.f64", &i), -EINVAL);

  CHECK_INT_EQ(model_gguf_get_str(g, "t.str", &s), 0);
  CHECK_INT_EQ(s.len, 11);
  CHECK(memcmp(s.ptr, "hello, gguf", 11) == 0);
  CHECK(model_gguf_str_eq(s, "hello, gguf"));
  CHECK_INT_EQ(model_gguf_get_str(g, "t.empty", &s), 0);
  CHECK_INT_EQ(s.len, 0);
  CHECK(model_gguf_str_eq(s, ""));

  /* wrong kinds */
  CHECK_INT_EQ(model_gguf_get_str(g, "t.u32", &s), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.str", &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_f64(g, "t.str", &f), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_bool(g, "t.str", &b), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.arr.i32", &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_get_str(g, "t.arr.str", &s), -EINVAL);
  /* absent keys, including prefixes and extensions of present ones */
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.nope", &i), -ENOENT);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u", &i), -ENOENT);
  CHECK_INT_EQ(model_gguf_get_i64(g, "t.u8x", &i), -ENOENT);
  CHECK_INT_EQ(model_gguf_get_f64(g, "nope", &f), -ENOENT);
  CHECK_INT_EQ(model_gguf_get_bool(g, "nope", &b), -ENOENT);
  CHECK_INT_EQ(model_gguf_get_str(g, "nope", &s), -ENOENT);
  CHECK(model_gguf_find(g, "") == NULL);
  CHECK(model_gguf_find(g, "t.str") != NULL);
}

static void check_arrays(const model_gguf_t *g) {
  int64_t i;
  double f;
  const model_gguf_kv_t *kv;

  kv = model_gguf_find(g, "t.arr.str");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->type, MODEL_GGUF_ARRAY);
  CHECK_INT_EQ(kv->arr_type, MODEL_GGUF_STRING);
  CHECK_INT_EQ(kv->arr_len, 4);
  CHECK(kv->arr_strs != NULL);
  for (int k = 0; k < 4; k++) {
    CHECK_INT_EQ(kv->arr_strs[k].len, strlen(k_arr_strs[k]));
    CHECK(model_gguf_str_eq(kv->arr_strs[k], k_arr_strs[k]));
  }
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 0, &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_arr_f64(kv, 0, &f), -EINVAL);

  kv = model_gguf_find(g, "t.arr.nostr");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->arr_type, MODEL_GGUF_STRING);
  CHECK_INT_EQ(kv->arr_len, 0);

  kv = model_gguf_find(g, "t.arr.i32");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->arr_type, MODEL_GGUF_INT32);
  CHECK_INT_EQ(kv->arr_len, 6);
  for (uint64_t k = 0; k < 6; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_i32[k]);
    CHECK_INT_EQ(model_gguf_arr_f64(kv, k, &f), 0);
    CHECK_NEAR(f, (double)k_arr_i32[k], 0);
  }
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 6, &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, UINT64_MAX, &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_arr_f64(kv, 6, &f), -EINVAL);

  kv = model_gguf_find(g, "t.arr.f32");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->arr_len, 3);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_f64(kv, k, &f), 0);
    CHECK_NEAR(f, (double)k_arr_f32[k], 0);
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), -EINVAL);
  }
  kv = model_gguf_find(g, "t.arr.f64");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_f64(kv, k, &f), 0);
    CHECK_NEAR(f, k_arr_f64[k], 0);
  }
  kv = model_gguf_find(g, "t.arr.u64");
  CHECK(kv != NULL);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 0, &i), 0);
  CHECK_INT_EQ(i, 0);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 1, &i), 0);
  CHECK_INT_EQ(i, 1);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 2, &i), -EINVAL); /* UINT64_MAX */
  kv = model_gguf_find(g, "t.arr.i64");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK(i == k_arr_i64[k]);
  }
  kv = model_gguf_find(g, "t.arr.u8");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_u8[k]);
  }
  kv = model_gguf_find(g, "t.arr.i8");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_i8[k]);
  }
  kv = model_gguf_find(g, "t.arr.u16");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 2; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_u16[k]);
  }
  kv = model_gguf_find(g, "t.arr.i16");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 2; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_i16[k]);
  }
  kv = model_gguf_find(g, "t.arr.u32");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 2; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_u32[k]);
    CHECK_INT_EQ(model_gguf_arr_f64(kv, k, &f), 0);
    CHECK_NEAR(f, (double)k_arr_u32[k], 0);
  }
  kv = model_gguf_find(g, "t.arr.bool");
  CHECK(kv != NULL);
  for (uint64_t k = 0; k < 3; k++) {
    CHECK_INT_EQ(model_gguf_arr_i64(kv, k, &i), 0);
    CHECK_INT_EQ(i, k_arr_bool[k]);
  }
  kv = model_gguf_find(g, "t.arr.empty");
  CHECK(kv != NULL);
  CHECK_INT_EQ(kv->arr_len, 0);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 0, &i), -EINVAL);

  /* array getters on a scalar */
  kv = model_gguf_find(g, "t.i32");
  CHECK(kv != NULL);
  CHECK_INT_EQ(model_gguf_arr_i64(kv, 0, &i), -EINVAL);
  CHECK_INT_EQ(model_gguf_arr_f64(kv, 0, &f), -EINVAL);
}

static void check_tensors(const model_gguf_t *g, const uint8_t *buf, size_t len,
                          const uint64_t offsets[N_TENSORS], size_t data_off) {
  CHECK_INT_EQ(g->n_tensors, N_TENSORS);
  for (int t = 0; t < N_TENSORS; t++) {
    const tspec_t *sp = &k_tensors[t];
    const model_gguf_tensor_t *x = model_gguf_tensor(g, sp->name);
    CHECK(x != NULL);
    CHECK(x == &g->tensors[t]);
    CHECK(model_gguf_str_eq(x->name, sp->name));
    CHECK_INT_EQ(x->n_dims, sp->n_dims);
    for (int d = 0; d < 4; d++) CHECK_INT_EQ(x->ne[d], sp->ne[d]); /* unused dims are 1 */
    CHECK_INT_EQ(x->type, sp->type);
    CHECK_INT_EQ(x->offset, offsets[t]);
    CHECK_INT_EQ(x->nbytes, sp->nbytes);
    CHECK_INT_EQ((const uint8_t *)x->data - buf, (long long)(data_off + offsets[t]));
    CHECK_INT_EQ((uintptr_t)((const uint8_t *)x->data - buf) % g->alignment, 0);
    for (size_t i = 0; i < sp->nbytes; i++)
      CHECK_INT_EQ(((const uint8_t *)x->data)[i], tensor_byte(t, i));
  }
  CHECK(model_gguf_tensor(g, "a.f3") == NULL);
  CHECK(model_gguf_tensor(g, "nope") == NULL);
  /* the last tensor ends the file */
  const model_gguf_tensor_t *last = &g->tensors[N_TENSORS - 1];
  CHECK((const uint8_t *)last->data + last->nbytes == buf + len);
}

static void test_parse_all_types(void) {
  wbuf_t w;
  uint64_t offsets[N_TENSORS];
  size_t data_off;
  build_image(&w, 0, offsets, &data_off);
  uint8_t *img = dup_exact(w.p, w.len);
  model_gguf_t g;
  char err[256] = "untouched";
  int rc = model_gguf_parse(&g, img, w.len, err, sizeof err);
  if (rc) FAIL_AT("parse: %d %s", rc, err);
  CHECK_STR_EQ(err, "");
  CHECK_INT_EQ(g.version, 3);
  CHECK_INT_EQ(g.n_kv, N_KV - 1);
  CHECK_INT_EQ(g.alignment, 32);
  CHECK(!g.mapped_file);
  CHECK_INT_EQ(data_off % 32, 0);
  check_scalars(&g);
  check_arrays(&g);
  check_tensors(&g, img, w.len, offsets, data_off);
  check_views(&g, img, w.len);
  /* keys come back in file order */
  CHECK(model_gguf_str_eq(g.kv[0].key, "general.architecture"));
  CHECK(model_gguf_str_eq(g.kv[g.n_kv - 1].key, "t.arr.nostr"));
  model_gguf_close(&g);
  CHECK(g.kv == NULL && g.tensors == NULL && g.n_kv == 0 && g.n_tensors == 0);
  model_gguf_close(&g); /* twice is fine */
  model_gguf_close(NULL);
  free(img);
  w_free(&w);
}

static void test_alignment_honoured(void) {
  static const uint32_t aligns[] = {1, 8, 32, 64, 256, 4096};
  for (size_t k = 0; k < sizeof aligns / sizeof aligns[0]; k++) {
    wbuf_t w;
    uint64_t offsets[N_TENSORS];
    size_t data_off;
    build_image(&w, aligns[k], offsets, &data_off);
    uint8_t *img = dup_exact(w.p, w.len);
    model_gguf_t g;
    char err[256];
    int rc = model_gguf_parse(&g, img, w.len, err, sizeof err);
    if (rc) FAIL_AT("alignment %u: %d %s", aligns[k], rc, err);
    CHECK_INT_EQ(g.alignment, aligns[k]);
    CHECK_INT_EQ(g.n_kv, N_KV);
    CHECK_INT_EQ(data_off % aligns[k], 0);
    int64_t a;
    CHECK_INT_EQ(model_gguf_get_i64(&g, "general.alignment", &a), 0);
    CHECK_INT_EQ(a, aligns[k]);
    check_scalars(&g);
    check_arrays(&g);
    check_tensors(&g, img, w.len, offsets, data_off);
    model_gguf_close(&g);
    free(img);
    w_free(&w);
  }
}

/* Data section placement: with alignment 64 the data starts at the next
 * multiple of 64 after the tensor infos, not of 32. */
static void test_alignment_data_start(void) {
  for (uint32_t align = 16; align <= 128; align *= 2) {
    for (size_t namelen = 1; namelen <= 40; namelen++) {
      wbuf_t w = {0};
      char name[64];
      memset(name, 'n', namelen);
      name[namelen] = 0;
      w_header(&w, 3, 1, 1);
      w_key(&w, "general.alignment", MODEL_GGUF_UINT32);
      w_u32(&w, align);
      uint64_t ne[1] = {4};
      w_tensor(&w, name, 1, ne, MODEL_GGML_F32, 0);
      size_t infos_end = w.len;
      w_pad(&w, align);
      size_t data_off = w.len;
      CHECK(data_off >= infos_end && data_off - infos_end < align);
      for (int i = 0; i < 16; i++) w_u8(&w, (uint8_t)(0xa0 + i));
      model_gguf_t g;
      char err[256];
      int rc = model_gguf_parse(&g, w.p, w.len, err, sizeof err);
      if (rc) FAIL_AT("align %u namelen %zu: %d %s", align, namelen, rc, err);
      CHECK_INT_EQ((const uint8_t *)g.tensors[0].data - w.p, (long long)data_off);
      CHECK_INT_EQ(((const uint8_t *)g.tensors[0].data)[0], 0xa0);
      CHECK_INT_EQ(g.tensors[0].nbytes, 16);
      model_gguf_close(&g);
      w_free(&w);
    }
  }
}

static void test_minimal_images(void) {
  /* no tensors, no metadata: valid, and nothing needs to follow the header */
  wbuf_t w = {0};
  w_header(&w, 3, 0, 0);
  uint8_t *img = dup_exact(w.p, w.len);
  model_gguf_t g;
  char err[256];
  int rc = model_gguf_parse(&g, img, w.len, err, sizeof err);
  if (rc) FAIL_AT("%d %s", rc, err);
  CHECK_INT_EQ(g.n_kv, 0);
  CHECK_INT_EQ(g.n_tensors, 0);
  CHECK(model_gguf_find(&g, "x") == NULL);
  CHECK(model_gguf_tensor(&g, "x") == NULL);
  model_gguf_close(&g);
  free(img);
  w_free(&w);

  /* an error buffer is optional */
  w_header(&w, 3, 0, 0);
  CHECK_INT_EQ(model_gguf_parse(&g, w.p, w.len, NULL, 0), 0);
  model_gguf_close(&g);
  CHECK(model_gguf_parse(&g, w.p, 10, NULL, 0) < 0);
  char tiny[1] = {'x'};
  CHECK(model_gguf_parse(&g, w.p, 10, tiny, 0) < 0);
  CHECK_INT_EQ(tiny[0], 'x');
  w_free(&w);

  /* a tensor of a type pressd cannot dequantise parses with nbytes 0: the
   * loader names the type when it needs the tensor */
  w_header(&w, 3, 1, 0);
  uint64_t ne[2] = {256, 2};
  w_tensor(&w, "q6k", 2, ne, MODEL_GGML_Q6_K, 0);
  w_pad(&w, 32);
  for (int i = 0; i < 420; i++) w_u8(&w, 0);
  img = dup_exact(w.p, w.len);
  rc = model_gguf_parse(&g, img, w.len, err, sizeof err);
  if (rc) FAIL_AT("%d %s", rc, err);
  CHECK_INT_EQ(g.tensors[0].type, MODEL_GGML_Q6_K);
  CHECK_INT_EQ(g.tensors[0].nbytes, 0);
  model_gguf_close(&g);
  free(img);
  w_free(&w);
}

/* ---- bad input ------------------------------------------------------------ */

static void test_truncation_every_length(void) {
  static const uint32_t aligns[] = {0, 64};
  for (size_t k = 0; k < 2; k++) {
    wbuf_t w;
    uint64_t offsets[N_TENSORS];
    size_t data_off;
    build_image(&w, aligns[k], offsets, &data_off);
    for (size_t len = 0; len < w.len; len++) expect_fail(w.p, len, -EINVAL, NULL);
    /* and a few messages name the part that was cut */
    expect_fail(w.p, 2, 0, "magic");
    expect_fail(w.p, 6, 0, "version");
    expect_fail(w.p, 12, 0, "tensor count");
    expect_fail(w.p, 20, 0, "metadata count");
    expect_fail(w.p, w.len - 1, 0, "d.q4_1");
    w_free(&w);
  }
}

static void test_bad_headers(void) {
  wbuf_t w = {0};
  /* wrong magic, in several ways */
  w_bytes(&w, "GGUG", 4);
  w_u32(&w, 3);
  w_u64(&w, 0);
  w_u64(&w, 0);
  expect_fail(w.p, w.len, -EINVAL, "magic");
  memcpy(w.p, "FUGG", 4);
  expect_fail(w.p, w.len, -EINVAL, "magic");
  memcpy(w.p, "gguf", 4);
  expect_fail(w.p, w.len, -EINVAL, "magic");
  memset(w.p, 0, 4);
  expect_fail(w.p, w.len, -EINVAL, "magic");
  w_free(&w);

  /* versions: 1 (32-bit counts) and 4 (unknown) are refused */
  static const uint32_t bad_versions[] = {0, 1, 4, 5, 0x03000000u, UINT32_MAX};
  for (size_t k = 0; k < sizeof bad_versions / sizeof bad_versions[0]; k++) {
    w_header(&w, bad_versions[k], 0, 0);
    expect_fail(w.p, w.len, -EINVAL, "version");
    w_free(&w);
  }
  w_header(&w, 3, 0, 0);
  model_gguf_t g;
  char err[256];
  CHECK_INT_EQ(model_gguf_parse(&g, w.p, w.len, err, sizeof err), 0);
  model_gguf_close(&g);
  w_free(&w);

  /* absurd counts: refused before any allocation or read of them */
  static const uint64_t absurd[] = {1ull << 60, UINT64_MAX, 1ull << 32, (1ull << 20) + 1};
  for (size_t k = 0; k < sizeof absurd / sizeof absurd[0]; k++) {
    w_header(&w, 3, 0, absurd[k]);
    expect_fail(w.p, w.len, -EINVAL, NULL);
    w_free(&w);
    w_header(&w, 3, absurd[k], 0);
    expect_fail(w.p, w.len, -EINVAL, NULL);
    w_free(&w);
    w_header(&w, 3, absurd[k], absurd[k]);
    expect_fail(w.p, w.len, -EINVAL, NULL);
    w_free(&w);
  }
  /* plausible counts but nothing behind them */
  w_header(&w, 3, 0, 1000);
  expect_fail(w.p, w.len, -EINVAL, "truncated");
  w_free(&w);
  w_header(&w, 3, 1000, 0);
  expect_fail(w.p, w.len, -EINVAL, "truncated");
  w_free(&w);
}

static void test_bad_strings_and_arrays(void) {
  wbuf_t w = {0};
  /* key length past the end: by one byte, and absurdly */
  static const uint64_t key_over[] = {6, 1ull << 40, 1ull << 63, UINT64_MAX};
  for (size_t k = 0; k < 4; k++) {
    w_header(&w, 3, 0, 1);
    w_u64(&w, key_over[k]);
    w_bytes(&w, "abcde", 5);
    expect_fail(w.p, w.len, -EINVAL, "past the end");
    w_free(&w);
  }
  /* string value length past the end */
  static const uint64_t val_over[] = {4, 1ull << 62, UINT64_MAX, UINT64_MAX - 2};
  for (size_t k = 0; k < 4; k++) {
    w_header(&w, 3, 0, 1);
    w_key(&w, "k", MODEL_GGUF_STRING);
    w_u64(&w, val_over[k]);
    w_bytes(&w, "abc", 3);
    expect_fail(w.p, w.len, -EINVAL, "past the end");
    w_free(&w);
  }
  /* numeric array length past the end, for every element size */
  static const uint32_t elem_types[] = {MODEL_GGUF_UINT8, MODEL_GGUF_INT16, MODEL_GGUF_FLOAT32,
                                        MODEL_GGUF_FLOAT64, MODEL_GGUF_BOOL};
  static const size_t elem_sizes[] = {1, 2, 4, 8, 1};
  for (size_t k = 0; k < 5; k++) {
    static const uint64_t over[] = {0 /* set below */, 1ull << 61, 1ull << 63, UINT64_MAX};
    for (size_t o = 0; o < 4; o++) {
      uint64_t n = o == 0 ? 3 : over[o]; /* 3 elements announced, 2 present */
      w_header(&w, 3, 0, 1);
      w_key(&w, "arr", MODEL_GGUF_ARRAY);
      w_u32(&w, elem_types[k]);
      w_u64(&w, n);
      for (size_t b = 0; b < 2 * elem_sizes[k]; b++) w_u8(&w, 1);
      expect_fail(w.p, w.len, -EINVAL, "arr");
      w_free(&w);
    }
  }
  /* string array: count past the end, and an element's length past the end */
  static const uint64_t str_counts[] = {3, 1ull << 59, 1ull << 61, UINT64_MAX};
  for (size_t k = 0; k < 4; k++) {
    w_header(&w, 3, 0, 1);
    w_key(&w, "sa", MODEL_GGUF_ARRAY);
    w_u32(&w, MODEL_GGUF_STRING);
    w_u64(&w, str_counts[k]);
    w_str(&w, "one");
    w_str(&w, "two");
    expect_fail(w.p, w.len, -EINVAL, NULL);
    w_free(&w);
  }
  w_header(&w, 3, 0, 1);
  w_key(&w, "sa", MODEL_GGUF_ARRAY);
  w_u32(&w, MODEL_GGUF_STRING);
  w_u64(&w, 2);
  w_str(&w, "one");
  w_u64(&w, 4);
  w_bytes(&w, "two", 3);
  expect_fail(w.p, w.len, -EINVAL, "past the end");
  w_free(&w);

  /* unknown value types, arrays of arrays, arrays of unknown types */
  static const uint32_t bad_types[] = {13, 100, UINT32_MAX};
  for (size_t k = 0; k < 3; k++) {
    w_header(&w, 3, 0, 1);
    w_key(&w, "weird", bad_types[k]);
    w_u64(&w, 0);
    expect_fail(w.p, w.len, -EINVAL, "weird");
    w_free(&w);
    w_header(&w, 3, 0, 1);
    w_key(&w, "weird", MODEL_GGUF_ARRAY);
    w_u32(&w, bad_types[k]);
    w_u64(&w, 1);
    w_u64(&w, 0);
    expect_fail(w.p, w.len, -EINVAL, "weird");
    w_free(&w);
  }
  w_header(&w, 3, 0, 1);
  w_key(&w, "nested", MODEL_GGUF_ARRAY);
  w_u32(&w, MODEL_GGUF_ARRAY);
  w_u64(&w, 1);
  w_u32(&w, MODEL_GGUF_INT32);
  w_u64(&w, 1);
  w_u32(&w, 7);
  expect_fail(w.p, w.len, -EINVAL, "nested");
  w_free(&w);

  /* general.alignment: zero, not a power of two, or of the wrong type */
  static const uint32_t bad_aligns[] = {0, 3, 48, 96, 0x80000001u};
  for (size_t k = 0; k < 5; k++) {
    w_header(&w, 3, 0, 1);
    w_key(&w, "general.alignment", MODEL_GGUF_UINT32);
    w_u32(&w, bad_aligns[k]);
    expect_fail(w.p, w.len, -EINVAL, "alignment");
    w_free(&w);
  }
  w_header(&w, 3, 0, 1);
  w_key(&w, "general.alignment", MODEL_GGUF_UINT64);
  w_u64(&w, 32);
  expect_fail(w.p, w.len, -EINVAL, "alignment");
  w_free(&w);
  w_header(&w, 3, 0, 1);
  w_key(&w, "general.alignment", MODEL_GGUF_STRING);
  w_str(&w, "32");
  expect_fail(w.p, w.len, -EINVAL, "alignment");
  w_free(&w);
}

/* One tensor "t" with the given description, an alignment of 32, and
 * data_bytes bytes of data after the padding. */
static void one_tensor(wbuf_t *w, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                       uint64_t offset, size_t data_bytes) {
  memset(w, 0, sizeof *w);
  w_header(w, 3, 1, 0);
  w_tensor(w, "t", n_dims, ne, type, offset);
  w_pad(w, 32);
  for (size_t i = 0; i < data_bytes; i++) w_u8(w, (uint8_t)i);
}

static void test_bad_tensors(void) {
  wbuf_t w;
  model_gguf_t g;
  char err[256];
  uint64_t ne[8] = {32, 2, 1, 1, 1, 1, 1, 1};

  /* control: 32x2 F32 at offset 0 with exactly 256 bytes */
  one_tensor(&w, 2, ne, MODEL_GGML_F32, 0, 256);
  CHECK_INT_EQ(model_gguf_parse(&g, w.p, w.len, err, sizeof err), 0);
  CHECK_INT_EQ(g.tensors[0].nbytes, 256);
  model_gguf_close(&g);
  w_free(&w);
  /* 4 dims is the maximum */
  one_tensor(&w, 4, ne, MODEL_GGML_F32, 0, 256);
  CHECK_INT_EQ(model_gguf_parse(&g, w.p, w.len, err, sizeof err), 0);
  model_gguf_close(&g);
  w_free(&w);

  /* 0 and 5+ dims */
  static const uint32_t bad_dims[] = {0, 5, 8, UINT32_MAX};
  for (size_t k = 0; k < 4; k++) {
    one_tensor(&w, bad_dims[k] > 8 ? 8 : bad_dims[k], ne, MODEL_GGML_F32, 0, 256);
    /* patch the dim count: it sits after header (24) + name (8 + 1) */
    uint32_t nd = bad_dims[k];
    memcpy(w.p + 24 + 9, &nd, 4);
    expect_fail(w.p, w.len, -EINVAL, "dimensions");
    w_free(&w);
  }

  /* data past the end by one byte */
  one_tensor(&w, 2, ne, MODEL_GGML_F32, 0, 255);
  expect_fail(w.p, w.len, -EINVAL, "past the end");
  w_free(&w);
  /* no data section at all */
  one_tensor(&w, 2, ne, MODEL_GGML_F32, 0, 0);
  expect_fail(w.p, w.len, -EINVAL, NULL);
  w_free(&w);
  /* an offset that puts it past the end, modestly and absurdly (aligned) */
  static const uint64_t far[] = {32, 1ull << 40, 1ull << 63, UINT64_MAX - 31};
  for (size_t k = 0; k < 4; k++) {
    one_tensor(&w, 2, ne, MODEL_GGML_F32, far[k], 256);
    expect_fail(w.p, w.len, -EINVAL, "past the end");
    w_free(&w);
  }
  /* a huge shape whose byte size overflows */
  uint64_t huge[4] = {1ull << 40, 1ull << 30, 1, 1};
  one_tensor(&w, 2, huge, MODEL_GGML_F32, 0, 256);
  expect_fail(w.p, w.len, -EINVAL, NULL);
  w_free(&w);
  uint64_t overflow[4] = {1ull << 32, 1ull << 32, 1ull << 32, 1};
  one_tensor(&w, 3, overflow, MODEL_GGML_F32, 0, 256);
  expect_fail(w.p, w.len, -EINVAL, "shape");
  w_free(&w);
  uint64_t big_elems[4] = {1ull << 62, 1, 1, 1};
  one_tensor(&w, 1, big_elems, MODEL_GGML_F32, 0, 256);
  expect_fail(w.p, w.len, -EINVAL, NULL);
  w_free(&w);
  /* a zero dimension */
  uint64_t zero[4] = {32, 0, 1, 1};
  one_tensor(&w, 2, zero, MODEL_GGML_F32, 0, 256);
  expect_fail(w.p, w.len, -EINVAL, "shape");
  w_free(&w);
  /* a row that is not a whole number of blocks */
  uint64_t odd[4] = {33, 1, 1, 1};
  one_tensor(&w, 1, odd, MODEL_GGML_Q8_0, 0, 256);
  expect_fail(w.p, w.len, -EINVAL, "type");
  w_free(&w);
  /* misaligned offsets */
  static const uint64_t mis[] = {1, 4, 16, 31, 33};
  for (size_t k = 0; k < 5; k++) {
    one_tensor(&w, 1, ne, MODEL_GGML_F32, mis[k], 512);
    expect_fail(w.p, w.len, -EINVAL, "aligned");
    w_free(&w);
  }
  /* aligned to 32 but not to the file's own alignment of 64 */
  memset(&w, 0, sizeof w);
  w_header(&w, 3, 1, 1);
  w_key(&w, "general.alignment", MODEL_GGUF_UINT32);
  w_u32(&w, 64);
  w_tensor(&w, "t", 1, ne, MODEL_GGML_F32, 32);
  w_pad(&w, 64);
  for (int i = 0; i < 512; i++) w_u8(&w, 0);
  expect_fail(w.p, w.len, -EINVAL, "aligned");
  w_free(&w);
  /* tensor name past the end */
  memset(&w, 0, sizeof w);
  w_header(&w, 3, 1, 0);
  w_u64(&w, 1000);
  w_bytes(&w, "tensor", 6);
  expect_fail(w.p, w.len, -EINVAL, "past the end");
  w_free(&w);
}

/* ---- random damage ------------------------------------------------------- */


static void test_random_mutations(void) {
  wbuf_t w;
  uint64_t offsets[N_TENSORS];
  size_t data_off;
  build_image(&w, 0, offsets, &data_off);
  uint8_t *buf = malloc(w.len);
  CHECK(buf);
  uint64_t rng = 20240611;
  int n_ok = 0, n_fail = 0;
  for (int iter = 0; iter < 20000; iter++) {
    memcpy(buf, w.p, w.len);
    int flips = 1 + (int)(rng_next(&rng) % 4);
    for (int f = 0; f < flips; f++) {
      uint64_t r = rng_next(&rng);
      /* mostly the header (where all the structure is), sometimes anywhere */
      size_t at = (r & 3) ? (size_t)((r >> 8) % data_off) : (size_t)((r >> 8) % w.len);
      uint8_t x;
      switch ((r >> 4) & 3) {
      case 0: x = (uint8_t)(1u << ((r >> 40) & 7)); break; /* one bit */
      case 1: x = 0xff; break;
      default: x = (uint8_t)(r >> 48); break;
      }
      if (((r >> 56) & 7) == 0) buf[at] = (uint8_t)(buf[at] ? 0 : 0xff); /* set, not flip */
      else buf[at] ^= x;
    }
    /* sometimes cut the end off too */
    size_t len = w.len;
    uint64_t r = rng_next(&rng);
    if ((r & 15) == 0) len = (size_t)((r >> 8) % (w.len + 1));
    model_gguf_t g;
    char err[256];
    memset(err, 0, sizeof err);
    int rc = model_gguf_parse(&g, buf, len, err, sizeof err);
    if (rc == 0) {
      check_views(&g, buf, len);
      model_gguf_close(&g);
      n_ok++;
    } else {
      if (rc > 0 || rc < -4095) FAIL_AT("iteration %d: rc %d is not a negative errno", iter, rc);
      if (!err[0]) FAIL_AT("iteration %d: rc %d without a message", iter, rc);
      CHECK(g.kv == NULL && g.tensors == NULL);
      n_fail++;
    }
  }
  fprintf(stderr, "   mutations: %d parsed, %d refused\n", n_ok, n_fail);
  CHECK(n_fail > 1000); /* the mutations really do damage */
  free(buf);
  w_free(&w);
}

/* ---- files ------------------------------------------------------------- */

static void test_open_errors(void) {
  model_gguf_t g;
  char err[512];
  const char *missing = "/nonexistent-dir/no-such-model.gguf";
  int rc = model_gguf_open(&g, missing, err, sizeof err);
  CHECK_INT_EQ(rc, -ENOENT);
  if (!strstr(err, missing)) FAIL_AT("message \"%s\" does not name the path", err);
  CHECK(g.kv == NULL && g.tensors == NULL && g.map == NULL);
  model_gguf_close(&g);

  char dir[] = "/tmp/pressd-test-gguf-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  rc = model_gguf_open(&g, dir, err, sizeof err);
  CHECK(rc < 0);
  if (!strstr(err, dir)) FAIL_AT("message \"%s\" does not name the path", err);
  model_gguf_close(&g);

  /* a file too short, a file with bad content, and a good file */
  char path[128];
  snprintf(path, sizeof path, "%s/m.gguf", dir);
  FILE *f = fopen(path, "wb");
  CHECK(f);
  fwrite("GGUF", 1, 4, f);
  fclose(f);
  rc = model_gguf_open(&g, path, err, sizeof err);
  CHECK_INT_EQ(rc, -EINVAL);
  if (!strstr(err, path)) FAIL_AT("message \"%s\" does not name the path", err);

  wbuf_t w;
  uint64_t offsets[N_TENSORS];
  size_t data_off;
  build_image(&w, 0, offsets, &data_off);
  f = fopen(path, "wb");
  CHECK(f);
  CHECK(fwrite(w.p, 1, w.len - 1, f) == w.len - 1);
  fclose(f);
  rc = model_gguf_open(&g, path, err, sizeof err);
  CHECK_INT_EQ(rc, -EINVAL);
  if (!strstr(err, path) || !strstr(err, "d.q4_1"))
    FAIL_AT("message \"%s\" does not name the path and the tensor", err);

  f = fopen(path, "wb");
  CHECK(f);
  CHECK(fwrite(w.p, 1, w.len, f) == w.len);
  fclose(f);
  rc = model_gguf_open(&g, path, err, sizeof err);
  if (rc) FAIL_AT("%d %s", rc, err);
  CHECK(g.mapped_file);
  CHECK_INT_EQ(g.map_len, w.len);
  check_scalars(&g);
  check_arrays(&g);
  check_tensors(&g, g.map, g.map_len, offsets, data_off);
  model_gguf_close(&g);
  CHECK(g.map == NULL);

  CHECK_INT_EQ(unlink(path), 0);
  CHECK_INT_EQ(rmdir(dir), 0);
  w_free(&w);
}

static void test_real_model(void) {
  const char *path = test_model_path();
  if (!path) {
    fprintf(stderr, "   PRESSD_MODEL not present: skipped\n");
    return;
  }
  model_gguf_t g;
  char err[512];
  int rc = model_gguf_open(&g, path, err, sizeof err);
  if (rc) FAIL_AT("%s: %d %s", path, rc, err);
  model_gguf_str_t s;
  CHECK_INT_EQ(model_gguf_get_str(&g, "general.architecture", &s), 0);
  CHECK(model_gguf_str_eq(s, "llama"));
  int64_t v;
  CHECK_INT_EQ(model_gguf_get_i64(&g, "llama.block_count", &v), 0);
  CHECK_INT_EQ(v, 30);
  CHECK_INT_EQ(model_gguf_get_i64(&g, "llama.embedding_length", &v), 0);
  CHECK_INT_EQ(v, 576);
  CHECK_INT_EQ(model_gguf_get_i64(&g, "llama.attention.head_count", &v), 0);
  CHECK_INT_EQ(v, 9);
  CHECK_INT_EQ(model_gguf_get_i64(&g, "llama.attention.head_count_kv", &v), 0);
  CHECK_INT_EQ(v, 3);
  CHECK_INT_EQ(g.n_tensors, 272);
  const model_gguf_tensor_t *t = model_gguf_tensor(&g, "token_embd.weight");
  CHECK(t != NULL);
  CHECK_INT_EQ(t->type, MODEL_GGML_Q8_0);
  CHECK_INT_EQ(t->n_dims, 2);
  CHECK_INT_EQ(t->ne[0], 576);
  CHECK_INT_EQ(t->ne[1], 49152);
  CHECK_INT_EQ(t->nbytes, 576ull * 49152 / 32 * 34);
  const model_gguf_kv_t *tok = model_gguf_find(&g, "tokenizer.ggml.tokens");
  CHECK(tok != NULL);
  CHECK_INT_EQ(tok->arr_type, MODEL_GGUF_STRING);
  CHECK_INT_EQ(tok->arr_len, 49152);
  check_views(&g, g.map, g.map_len);
  model_gguf_close(&g);
}

int main(void) {
  RUN(test_parse_all_types);
  RUN(test_alignment_honoured);
  RUN(test_alignment_data_start);
  RUN(test_minimal_images);
  RUN(test_truncation_every_length);
  RUN(test_bad_headers);
  RUN(test_bad_strings_and_arrays);
  RUN(test_bad_tensors);
  RUN(test_random_mutations);
  RUN(test_open_errors);
  RUN(test_real_model);
  return 0;
}
