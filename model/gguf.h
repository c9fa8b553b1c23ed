/* GGUF reader: mmap a file (or parse a caller's buffer) and index its
 * metadata and tensor descriptors. Everything returned is a view into the
 * mapping and lives until model_gguf_close(). Library code: returns negative
 * errno and fills an error string, never prints. */
#ifndef PRESSD_MODEL_GGUF_H
#define PRESSD_MODEL_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum model_gguf_vtype {
  MODEL_GGUF_UINT8 = 0, MODEL_GGUF_INT8 = 1, MODEL_GGUF_UINT16 = 2, MODEL_GGUF_INT16 = 3,
  MODEL_GGUF_UINT32 = 4, MODEL_GGUF_INT32 = 5, MODEL_GGUF_FLOAT32 = 6, MODEL_GGUF_BOOL = 7,
  MODEL_GGUF_STRING = 8, MODEL_GGUF_ARRAY = 9, MODEL_GGUF_UINT64 = 10, MODEL_GGUF_INT64 = 11,
  MODEL_GGUF_FLOAT64 = 12,
};

typedef struct model_gguf_str {
  const char *ptr; /* view, NOT NUL-terminated */
  uint64_t len;
} model_gguf_str_t;

typedef struct model_gguf_kv {
  model_gguf_str_t key;
  uint32_t type; /* enum model_gguf_vtype */
  union {
    uint64_t u;
    int64_t i;
    double f;
    bool b;
    model_gguf_str_t s;
  } v;                        /* scalars and strings */
  uint32_t arr_type;          /* arrays: element type */
  uint64_t arr_len;           /* arrays: element count */
  const void *arr_data;       /* arrays of numbers: view of the packed elements */
  model_gguf_str_t *arr_strs; /* arrays of strings: owns the index, views the text */
} model_gguf_kv_t;

typedef struct model_gguf_tensor {
  model_gguf_str_t name;
  uint32_t n_dims;
  uint64_t ne[4];   /* ne[0] is the innermost (row length) */
  uint32_t type;    /* ggml type id, see model/quant.h */
  uint64_t offset;  /* relative to the data section */
  const void *data; /* view */
  size_t nbytes;
} model_gguf_tensor_t;

typedef struct model_gguf {
  void *map;         /* owns (munmap) when mapped_file */
  size_t map_len;
  bool mapped_file;
  uint32_t version;
  uint64_t n_kv;
  uint64_t n_tensors;
  model_gguf_kv_t *kv;          /* owns */
  model_gguf_tensor_t *tensors; /* owns */
  uint64_t alignment;
} model_gguf_t;

/* Open and index a GGUF file. On error returns -errno and writes a one-line
 * message naming the problem into err. */
int model_gguf_open(model_gguf_t *g, const char *path, char *err, size_t errlen);
/* Index a GGUF image held in memory (borrowed; must outlive g). */
int model_gguf_parse(model_gguf_t *g, const void *buf, size_t len, char *err, size_t errlen);
/* NULL-safe; works on a half-initialised or zeroed object. */
void model_gguf_close(model_gguf_t *g);

const model_gguf_kv_t *model_gguf_find(const model_gguf_t *g, const char *key);
const model_gguf_tensor_t *model_gguf_tensor(const model_gguf_t *g, const char *name);

/* Typed lookups: 0 on success, -ENOENT when absent, -EINVAL on a type that
 * does not convert (any integer type converts to any other when in range). */
int model_gguf_get_i64(const model_gguf_t *g, const char *key, int64_t *out);
int model_gguf_get_f64(const model_gguf_t *g, const char *key, double *out);
int model_gguf_get_bool(const model_gguf_t *g, const char *key, bool *out);
int model_gguf_get_str(const model_gguf_t *g, const char *key, model_gguf_str_t *out);
/* Array element as int64 / double (numeric arrays only); -EINVAL otherwise. */
int model_gguf_arr_i64(const model_gguf_kv_t *kv, uint64_t i, int64_t *out);
int model_gguf_arr_f64(const model_gguf_kv_t *kv, uint64_t i, double *out);

/* Compare a view with a C string. */
bool model_gguf_str_eq(model_gguf_str_t s, const char *cstr);

#endif
