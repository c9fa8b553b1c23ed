/* GGUF reader. The whole file is mmap'd; the index (kv + tensor arrays) is
 * the only heap memory. Every length read from the file is bounds-checked
 * before use, so a corrupted header gives -EINVAL with a message, never a
 * crash. */
#include "model/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/quant.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32
/* Sanity bounds: larger counts than these mean a corrupted header. */
#define GGUF_MAX_KV (1u << 20)
#define GGUF_MAX_TENSORS (1u << 20)
#define GGUF_MAX_ARRAY_DEPTH 1

typedef struct reader {
  const uint8_t *p;
  size_t len;
  size_t off;
  char *err;
  size_t errlen;
} reader_t;

static int fail(reader_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(reader_t *r, const char *fmt, ...) {
  if (r->err && r->errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, r->errlen, fmt, ap);
    va_end(ap);
  }
  return -EINVAL;
}

static int rd(reader_t *r, void *dst, size_t n, const char *what) {
  if (n > r->len - r->off)
    return fail(r, "gguf: truncated file while reading %s at offset %zu", what, r->off);
  memcpy(dst, r->p + r->off, n);
  r->off += n;
  return 0;
}

static int rd_str(reader_t *r, model_gguf_str_t *s, const char *what) {
  uint64_t n = 0;
  int rc = rd(r, &n, sizeof n, what);
  if (rc) return rc;
  if (n > r->len - r->off)
    return fail(r, "gguf: %s length %llu runs past the end of the file", what,
                (unsigned long long)n);
  s->ptr = (const char *)r->p + r->off;
  s->len = n;
  r->off += n;
  return 0;
}

static size_t scalar_size(uint32_t t) {
  switch (t) {
  case MODEL_GGUF_UINT8: case MODEL_GGUF_INT8: case MODEL_GGUF_BOOL: return 1;
  case MODEL_GGUF_UINT16: case MODEL_GGUF_INT16: return 2;
  case MODEL_GGUF_UINT32: case MODEL_GGUF_INT32: case MODEL_GGUF_FLOAT32: return 4;
  case MODEL_GGUF_UINT64: case MODEL_GGUF_INT64: case MODEL_GGUF_FLOAT64: return 8;
  default: return 0;
  }
}

/* Decode one packed scalar of type t at p into the kv's value union. */
static void decode_scalar(uint32_t t, const uint8_t *p, model_gguf_kv_t *kv) {
  switch (t) {
  case MODEL_GGUF_UINT8: kv->v.u = p[0]; break;
  case MODEL_GGUF_INT8: kv->v.i = (int8_t)p[0]; break;
  case MODEL_GGUF_BOOL: kv->v.b = p[0] != 0; break;
  case MODEL_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); kv->v.u = x; break; }
  case MODEL_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); kv->v.i = x; break; }
  case MODEL_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); kv->v.u = x; break; }
  case MODEL_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); kv->v.i = x; break; }
  case MODEL_GGUF_FLOAT32: { float x; memcpy(&x, p, 4); kv->v.f = x; break; }
  case MODEL_GGUF_UINT64: { uint64_t x; memcpy(&x, p, 8); kv->v.u = x; break; }
  case MODEL_GGUF_INT64: { int64_t x; memcpy(&x, p, 8); kv->v.i = x; break; }
  case MODEL_GGUF_FLOAT64: { double x; memcpy(&x, p, 8); kv->v.f = x; break; }
  default: break;
  }
}

static int read_value(reader_t *r, model_gguf_kv_t *kv) {
  if (kv->type == MODEL_GGUF_STRING) return rd_str(r, &kv->v.s, "string value");
  if (kv->type != MODEL_GGUF_ARRAY) {
    size_t sz = scalar_size(kv->type);
    if (!sz)
      return fail(r, "gguf: key '%.*s' has unknown value type %u", (int)kv->key.len, kv->key.ptr,
                  kv->type);
    if (sz > r->len - r->off) return fail(r, "gguf: truncated file in value of '%.*s'",
                                          (int)kv->key.len, kv->key.ptr);
    decode_scalar(kv->type, r->p + r->off, kv);
    r->off += sz;
    return 0;
  }
  int rc = rd(r, &kv->arr_type, sizeof kv->arr_type, "array type");
  if (!rc) rc = rd(r, &kv->arr_len, sizeof kv->arr_len, "array length");
  if (rc) return rc;
  if (kv->arr_type == MODEL_GGUF_STRING) {
    /* Each string needs at least its 8-byte length. */
    if (kv->arr_len > (r->len - r->off) / 8)
      return fail(r, "gguf: string array '%.*s' of %llu elements runs past the end of the file",
                  (int)kv->key.len, kv->key.ptr, (unsigned long long)kv->arr_len);
    kv->arr_strs = calloc(kv->arr_len ? kv->arr_len : 1, sizeof *kv->arr_strs);
    if (!kv->arr_strs) return -ENOMEM;
    for (uint64_t i = 0; i < kv->arr_len; i++) {
      rc = rd_str(r, &kv->arr_strs[i], "array string");
      if (rc) return rc;
    }
    return 0;
  }
  size_t sz = scalar_size(kv->arr_type);
  if (!sz)
    return fail(r, "gguf: array '%.*s' has unsupported element type %u", (int)kv->key.len,
                kv->key.ptr, kv->arr_type);
  if (kv->arr_len > (r->len - r->off) / sz)
    return fail(r, "gguf: array '%.*s' of %llu elements runs past the end of the file",
                (int)kv->key.len, kv->key.ptr, (unsigned long long)kv->arr_len);
  kv->arr_data = r->p + r->off;
  r->off += kv->arr_len * sz;
  return 0;
}

static int parse(model_gguf_t *g, reader_t *r) {
  uint32_t magic = 0;
  int rc = rd(r, &magic, sizeof magic, "magic");
  if (rc) return rc;
  if (magic != GGUF_MAGIC) return fail(r, "gguf: bad magic (not a GGUF file)");
  if ((rc = rd(r, &g->version, sizeof g->version, "version"))) return rc;
  if (g->version < 2 || g->version > 3)
    return fail(r, "gguf: unsupported GGUF version %u (need 2 or 3)", g->version);
  if ((rc = rd(r, &g->n_tensors, sizeof g->n_tensors, "tensor count"))) return rc;
  if ((rc = rd(r, &g->n_kv, sizeof g->n_kv, "metadata count"))) return rc;
  if (g->n_kv > GGUF_MAX_KV) return fail(r, "gguf: implausible metadata count %llu",
                                         (unsigned long long)g->n_kv);
  if (g->n_tensors > GGUF_MAX_TENSORS)
    return fail(r, "gguf: implausible tensor count %llu", (unsigned long long)g->n_tensors);

  g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
  g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
  if (!g->kv || !g->tensors) return -ENOMEM;

  g->alignment = GGUF_DEFAULT_ALIGNMENT;
  for (uint64_t i = 0; i < g->n_kv; i++) {
    model_gguf_kv_t *kv = &g->kv[i];
    if ((rc = rd_str(r, &kv->key, "metadata key"))) return rc;
    if ((rc = rd(r, &kv->type, sizeof kv->type, "metadata type"))) return rc;
    if ((rc = read_value(r, kv))) return rc;
    if (model_gguf_str_eq(kv->key, "general.alignment")) {
      if (kv->type != MODEL_GGUF_UINT32 || kv->v.u == 0 || (kv->v.u & (kv->v.u - 1)))
        return fail(r, "gguf: general.alignment must be a power of two (uint32)");
      g->alignment = kv->v.u;
    }
  }

  for (uint64_t i = 0; i < g->n_tensors; i++) {
    model_gguf_tensor_t *t = &g->tensors[i];
    if ((rc = rd_str(r, &t->name, "tensor name"))) return rc;
    if ((rc = rd(r, &t->n_dims, sizeof t->n_dims, "tensor dims"))) return rc;
    if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
      return fail(r, "gguf: tensor '%.*s' has %u dimensions (1..4 allowed)", (int)t->name.len,
                  t->name.ptr, t->n_dims);
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
      if ((rc = rd(r, &t->ne[d], sizeof t->ne[d], "tensor shape"))) return rc;
    if ((rc = rd(r, &t->type, sizeof t->type, "tensor type"))) return rc;
    if ((rc = rd(r, &t->offset, sizeof t->offset, "tensor offset"))) return rc;
  }

  /* Data section starts at the next multiple of the alignment. */
  uint64_t data_off = (r->off + g->alignment - 1) / g->alignment * g->alignment;
  if (data_off > r->len && g->n_tensors)
    return fail(r, "gguf: truncated file: no tensor data section");

  for (uint64_t i = 0; i < g->n_tensors; i++) {
    model_gguf_tensor_t *t = &g->tensors[i];
    uint64_t n = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
      if (t->ne[d] == 0 || n > UINT64_MAX / t->ne[d])
        return fail(r, "gguf: tensor '%.*s' has an invalid shape", (int)t->name.len, t->name.ptr);
      n *= t->ne[d];
    }
    size_t nbytes = model_ggml_nbytes(t->type, n);
    if (nbytes == SIZE_MAX || (model_ggml_block_elems(t->type) && nbytes == 0))
      return fail(r, "gguf: tensor '%.*s' shape does not fit its type", (int)t->name.len,
                  t->name.ptr);
    /* Unsupported types keep nbytes == 0: the loader names the type when a
     * tensor of it is actually needed. */
    if (t->offset % g->alignment)
      return fail(r, "gguf: tensor '%.*s' data offset is not aligned", (int)t->name.len,
                  t->name.ptr);
    if (t->offset > r->len - data_off || nbytes > r->len - data_off - t->offset)
      return fail(r, "gguf: tensor '%.*s' data runs past the end of the file (truncated?)",
                  (int)t->name.len, t->name.ptr);
    t->data = r->p + data_off + t->offset;
    t->nbytes = nbytes;
  }
  return 0;
}

int model_gguf_parse(model_gguf_t *g, const void *buf, size_t len, char *err, size_t errlen) {
  memset(g, 0, sizeof *g);
  reader_t r = {.p = buf, .len = len, .err = err, .errlen = errlen};
  if (err && errlen) err[0] = 0;
  int rc = parse(g, &r);
  if (rc) {
    if (rc == -ENOMEM && err && errlen) snprintf(err, errlen, "gguf: out of memory");
    model_gguf_close(g);
  }
  return rc;
}

int model_gguf_open(model_gguf_t *g, const char *path, char *err, size_t errlen) {
  memset(g, 0, sizeof *g);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    snprintf(err, errlen, "cannot open model file '%s': %s", path, strerror(e));
    return -e;
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    snprintf(err, errlen, "model file '%s' is not a regular file", path);
    return -EINVAL;
  }
  if (st.st_size < 24) {
    close(fd);
    snprintf(err, errlen, "model file '%s' is too small to be GGUF (%lld bytes)", path,
             (long long)st.st_size);
    return -EINVAL;
  }
  void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    int e = errno;
    snprintf(err, errlen, "cannot map model file '%s': %s", path, strerror(e));
    return -e;
  }
  char inner[256];
  int rc = model_gguf_parse(g, map, (size_t)st.st_size, inner, sizeof inner);
  if (rc) {
    munmap(map, (size_t)st.st_size);
    snprintf(err, errlen, "%s: %s", path, inner);
    return rc;
  }
  g->map = map;
  g->map_len = (size_t)st.st_size;
  g->mapped_file = true;
  return 0;
}

void model_gguf_close(model_gguf_t *g) {
  if (!g) return;
  if (g->kv)
    for (uint64_t i = 0; i < g->n_kv; i++) free(g->kv[i].arr_strs);
  free(g->kv);
  free(g->tensors);
  if (g->mapped_file && g->map) munmap(g->map, g->map_len);
  memset(g, 0, sizeof *g);
}

bool model_gguf_str_eq(model_gguf_str_t s, const char *cstr) {
  size_t n = strlen(cstr);
  return s.len == n && memcmp(s.ptr, cstr, n) == 0;
}

const model_gguf_kv_t *model_gguf_find(const model_gguf_t *g, const char *key) {
  for (uint64_t i = 0; i < g->n_kv; i++)
    if (model_gguf_str_eq(g->kv[i].key, key)) return &g->kv[i];
  return NULL;
}

const model_gguf_tensor_t *model_gguf_tensor(const model_gguf_t *g, const char *name) {
  for (uint64_t i = 0; i < g->n_tensors; i++)
    if (model_gguf_str_eq(g->tensors[i].name, name)) return &g->tensors[i];
  return NULL;
}

static bool is_signed(uint32_t t) {
  return t == MODEL_GGUF_INT8 || t == MODEL_GGUF_INT16 || t == MODEL_GGUF_INT32 ||
         t == MODEL_GGUF_INT64;
}
static bool is_unsigned(uint32_t t) {
  return t == MODEL_GGUF_UINT8 || t == MODEL_GGUF_UINT16 || t == MODEL_GGUF_UINT32 ||
         t == MODEL_GGUF_UINT64;
}

static int kv_to_i64(const model_gguf_kv_t *kv, uint32_t type, int64_t *out) {
  if (is_signed(type)) {
    *out = kv->v.i;
    return 0;
  }
  if (is_unsigned(type)) {
    if (kv->v.u > INT64_MAX) return -EINVAL;
    *out = (int64_t)kv->v.u;
    return 0;
  }
  if (type == MODEL_GGUF_BOOL) {
    *out = kv->v.b;
    return 0;
  }
  return -EINVAL;
}

int model_gguf_get_i64(const model_gguf_t *g, const char *key, int64_t *out) {
  const model_gguf_kv_t *kv = model_gguf_find(g, key);
  if (!kv) return -ENOENT;
  return kv_to_i64(kv, kv->type, out);
}

int model_gguf_get_f64(const model_gguf_t *g, const char *key, double *out) {
  const model_gguf_kv_t *kv = model_gguf_find(g, key);
  if (!kv) return -ENOENT;
  if (kv->type == MODEL_GGUF_FLOAT32 || kv->type == MODEL_GGUF_FLOAT64) {
    *out = kv->v.f;
    return 0;
  }
  int64_t i;
  if (kv_to_i64(kv, kv->type, &i)) return -EINVAL;
  *out = (double)i;
  return 0;
}

int model_gguf_get_bool(const model_gguf_t *g, const char *key, bool *out) {
  const model_gguf_kv_t *kv = model_gguf_find(g, key);
  if (!kv) return -ENOENT;
  if (kv->type != MODEL_GGUF_BOOL) return -EINVAL;
  *out = kv->v.b;
  return 0;
}

int model_gguf_get_str(const model_gguf_t *g, const char *key, model_gguf_str_t *out) {
  const model_gguf_kv_t *kv = model_gguf_find(g, key);
  if (!kv) return -ENOENT;
  if (kv->type != MODEL_GGUF_STRING) return -EINVAL;
  *out = kv->v.s;
  return 0;
}

static int arr_elem(const model_gguf_kv_t *kv, uint64_t i, model_gguf_kv_t *tmp) {
  if (kv->type != MODEL_GGUF_ARRAY || i >= kv->arr_len) return -EINVAL;
  size_t sz = scalar_size(kv->arr_type);
  if (!sz) return -EINVAL;
  decode_scalar(kv->arr_type, (const uint8_t *)kv->arr_data + i * sz, tmp);
  return 0;
}

int model_gguf_arr_i64(const model_gguf_kv_t *kv, uint64_t i, int64_t *out) {
  model_gguf_kv_t tmp;
  int rc = arr_elem(kv, i, &tmp);
  return rc ? rc : kv_to_i64(&tmp, kv->arr_type, out);
}

int model_gguf_arr_f64(const model_gguf_kv_t *kv, uint64_t i, double *out) {
  model_gguf_kv_t tmp;
  int rc = arr_elem(kv, i, &tmp);
  if (rc) return rc;
  if (kv->arr_type == MODEL_GGUF_FLOAT32 || kv->arr_type == MODEL_GGUF_FLOAT64) {
    *out = tmp.v.f;
    return 0;
  }
  int64_t x;
  if ((rc = kv_to_i64(&tmp, kv->arr_type, &x))) return rc;
  *out = (double)x;
  return 0;
}
