/* The safetensors directory loader: config.json for the shape, one or more
 * *.safetensors files (sharded with or without model.safetensors.index.json)
 * for the weights, in Hugging Face naming.
 *
 * A safetensors file is an 8-byte little-endian header length n, n bytes of
 * JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * "__metadata__": {...}}, then the data; offsets are relative to the end of
 * the header. Every number in the header is checked against the file size
 * before anything is read, so a corrupt file ends in -EINVAL and a one-line
 * message naming the file, never in a read past the mapping.
 *
 * The loader asks for tensors in GGUF naming ("blk.3.attn_q"); this source
 * maps the name to the Hugging Face one and serves the values. Hugging Face
 * Llama checkpoints lay out the rows of q_proj and k_proj for "rotate half"
 * (NeoX) RoPE, pressd rotates adjacent pairs (GGML "normal" RoPE, as GGUF
 * files store them), so those rows are permuted on the way in exactly as
 * llama.cpp's convert_hf_to_gguf.py does:
 *   w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)
 * with n_head the query heads for q and the KV heads for k. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model-internal.h"
#include "model/quant.h"
#include "model/weights-internal.h"
#include "model/weights.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the safetensors loader assumes a little-endian host"
#endif

#define ST_MAX_HEADER (100u << 20) /* bytes of header JSON (the format's own limit) */
#define ST_MAX_FILES 4096          /* shards in one directory */
#define ST_MAX_DIMS 8
#define ST_MAX_TEXT (64u << 20) /* bytes of config.json / index json */

typedef enum st_dtype { ST_OTHER = 0, ST_F32, ST_F16, ST_BF16 } st_dtype_t;

typedef struct st_tensor {
  const char *name;    /* view into the owning file's header cJSON */
  const char *dtype;   /* view: the dtype string as written */
  st_dtype_t type;
  int32_t n_dims;
  int64_t shape[ST_MAX_DIMS];
  const uint8_t *data; /* view into the file mapping */
  size_t nbytes;
  int32_t file;        /* index into st_ctx_t.files */
} st_tensor_t;

typedef struct st_file {
  char *path;   /* owns */
  void *map;    /* owns (munmap) */
  size_t size;
  cJSON *header; /* owns: names and dtypes of its tensors point into it */
} st_file_t;

typedef struct st_ctx {
  st_file_t *files;     /* owns: [n_files] */
  int32_t n_files;
  st_tensor_t *tensors; /* owns: [n_tensors], sorted by name */
  size_t n_tensors;
  int32_t n_heads, n_kv_heads;
  void *scratch; /* owns: the row-permuted copy view() hands out for q/k */
  size_t scratch_bytes;
} st_ctx_t;


static char *path_join(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  memcpy(p, dir, a);
  p[a] = '/';
  memcpy(p + a + 1, name, b + 1);
  return p;
}

/* A whole small text file, NUL-terminated. -ENOENT when absent. */
static int read_text(const char *path, char **out, char *err, size_t errlen) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    int e = errno;
    return model__errf(err, errlen, -e, "safetensors: cannot read %s: %s", path, strerror(e));
  }
  struct stat st;
  if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > ST_MAX_TEXT) {
    fclose(f);
    return model__errf(err, errlen, -EINVAL, "safetensors: %s is not a regular file of at most %u bytes",
                path, ST_MAX_TEXT);
  }
  size_t n = (size_t)st.st_size;
  char *buf = malloc(n + 1);
  if (!buf) {
    fclose(f);
    return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory reading %s", path);
  }
  size_t got = fread(buf, 1, n, f);
  fclose(f);
  if (got != n) {
    free(buf);
    return model__errf(err, errlen, -EIO, "safetensors: short read on %s", path);
  }
  buf[n] = 0;
  *out = buf;
  return 0;
}

/* ---- one file ------------------------------------------------------------ */

static st_dtype_t dtype_of(const char *s, size_t *elem) {
  if (!strcmp(s, "F32")) return *elem = 4, ST_F32;
  if (!strcmp(s, "F16")) return *elem = 2, ST_F16;
  if (!strcmp(s, "BF16")) return *elem = 2, ST_BF16;
  *elem = 0;
  return ST_OTHER;
}

/* A non-negative integer that a double holds exactly. */
static bool json_u64(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > 9007199254740992.0 ||
      v->valuedouble != (double)(uint64_t)v->valuedouble)
    return false;
  *out = (uint64_t)v->valuedouble;
  return true;
}

static int tensors_grow(st_ctx_t *st, size_t *cap, size_t more) {
  if (st->n_tensors + more <= *cap) return 0;
  size_t nc = *cap ? *cap : 256;
  while (nc < st->n_tensors + more) nc *= 2;
  st_tensor_t *t = realloc(st->tensors, nc * sizeof *t);
  if (!t) return -ENOMEM;
  st->tensors = t;
  *cap = nc;
  return 0;
}

/* Map one file and index its tensors into st->tensors. */
static int open_file(st_ctx_t *st, const char *dir, const char *name, size_t *cap, char *err,
                     size_t errlen) {
  st_file_t *f = &st->files[st->n_files];
  memset(f, 0, sizeof *f);
  f->path = path_join(dir, name);
  if (!f->path) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  st->n_files++; /* from here on st_close releases whatever f holds */
  const char *p = f->path;
  int fd = open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return model__errf(err, errlen, -e, "safetensors: cannot open %s: %s", p, strerror(e));
  }
  struct stat sb;
  if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
    close(fd);
    return model__errf(err, errlen, -EINVAL, "safetensors: %s is not a regular file", p);
  }
  if (sb.st_size < 8) {
    close(fd);
    return model__errf(err, errlen, -EINVAL, "safetensors: %s is truncated (%lld bytes, too short for "
                "the header length)", p, (long long)sb.st_size);
  }
  f->size = (size_t)sb.st_size;
  void *map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    int e = errno;
    return model__errf(err, errlen, -e, "safetensors: cannot map %s: %s", p, strerror(e));
  }
  f->map = map;
  const uint8_t *b = map;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | b[i];
  if (hlen > f->size - 8)
    return model__errf(err, errlen, -EINVAL,
                "safetensors: %s: header length %llu runs past the end of the file (%zu bytes)", p,
                (unsigned long long)hlen, f->size);
  if (hlen < 2 || hlen > ST_MAX_HEADER)
    return model__errf(err, errlen, -EINVAL, "safetensors: %s: header length %llu is out of range (2..%u)",
                p, (unsigned long long)hlen, ST_MAX_HEADER);
  const uint8_t *data = b + 8 + hlen;
  size_t data_len = f->size - 8 - (size_t)hlen;
  f->header = cJSON_ParseWithLength((const char *)b + 8, (size_t)hlen);
  if (!f->header || !cJSON_IsObject(f->header))
    return model__errf(err, errlen, -EINVAL, "safetensors: %s: the header is not a JSON object", p);

  size_t n = 0;
  const cJSON *it;
  cJSON_ArrayForEach(it, f->header) n++;
  if (tensors_grow(st, cap, n)) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  cJSON_ArrayForEach(it, f->header) {
    if (!strcmp(it->string, "__metadata__")) continue;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(it, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
    if (!cJSON_IsObject(it) || !cJSON_IsString(dt) || !cJSON_IsArray(shape) ||
        !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
      return model__errf(err, errlen, -EINVAL,
                  "safetensors: %s: tensor '%.64s' lacks dtype, shape or data_offsets", p,
                  it->string);
    st_tensor_t *t = &st->tensors[st->n_tensors];
    memset(t, 0, sizeof *t);
    t->name = it->string;
    t->dtype = dt->valuestring;
    t->file = st->n_files - 1;
    size_t elem;
    t->type = dtype_of(dt->valuestring, &elem);
    int nd = cJSON_GetArraySize(shape);
    if (nd > ST_MAX_DIMS)
      return model__errf(err, errlen, -EINVAL, "safetensors: %s: tensor '%.64s' has %d dimensions", p,
                  t->name, nd);
    t->n_dims = nd;
    uint64_t count = 1;
    bool overflow = false;
    const cJSON *d;
    int k = 0;
    cJSON_ArrayForEach(d, shape) {
      uint64_t v;
      if (!json_u64(d, &v) || v > INT64_MAX)
        return model__errf(err, errlen, -EINVAL, "safetensors: %s: tensor '%.64s' has a bad shape", p,
                    t->name);
      t->shape[k++] = (int64_t)v;
      if (v && count > UINT64_MAX / v) overflow = true;
      count *= v;
    }
    uint64_t begin, end;
    if (!json_u64(cJSON_GetArrayItem(offs, 0), &begin) ||
        !json_u64(cJSON_GetArrayItem(offs, 1), &end) || begin > end)
      return model__errf(err, errlen, -EINVAL, "safetensors: %s: tensor '%.64s' has bad data_offsets", p,
                  t->name);
    if (end > data_len)
      return model__errf(err, errlen, -EINVAL,
                  "safetensors: %s: tensor '%.64s' data_offsets [%llu, %llu] run past the end of "
                  "the file (%zu data bytes)", p, t->name, (unsigned long long)begin,
                  (unsigned long long)end, data_len);
    if (elem && (overflow || count > UINT64_MAX / elem || count * elem != end - begin))
      return model__errf(err, errlen, -EINVAL,
                  "safetensors: %s: tensor '%.64s' has %llu data bytes, its %s shape needs "
                  "%llu (size mismatch)", p, t->name, (unsigned long long)(end - begin),
                  t->dtype, overflow ? 0ull : (unsigned long long)(count * elem));
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    st->n_tensors++;
  }
  return 0;
}

static int cmp_tensor(const void *a, const void *b) {
  return strcmp(((const st_tensor_t *)a)->name, ((const st_tensor_t *)b)->name);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static const st_tensor_t *find(const st_ctx_t *st, const char *name) {
  st_tensor_t key = {.name = name};
  return bsearch(&key, st->tensors, st->n_tensors, sizeof key, cmp_tensor);
}

static void st_close(st_ctx_t *st) {
  for (int32_t i = 0; i < st->n_files; i++) {
    st_file_t *f = &st->files[i];
    if (f->map) munmap(f->map, f->size);
    cJSON_Delete(f->header);
    free(f->path);
  }
  free(st->files);
  free(st->tensors);
  free(st->scratch);
  memset(st, 0, sizeof *st);
}

/* ---- the directory ------------------------------------------------------- */

static bool has_suffix(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a > b && !strcmp(s + a - b, suf);
}

/* The shard names an index lists (weight_map values), deduplicated and
 * sorted; NULL-terminated *names owns the strings. */
static int index_files(const char *index_path, char ***names, int32_t *n,
                       cJSON **index, char *err, size_t errlen) {
  char *txt;
  int rc = read_text(index_path, &txt, err, errlen);
  if (rc) return rc;
  *index = cJSON_Parse(txt);
  free(txt);
  const cJSON *map = cJSON_GetObjectItemCaseSensitive(*index, "weight_map");
  if (!cJSON_IsObject(map))
    return model__errf(err, errlen, -EINVAL, "safetensors: %s: not JSON with a weight_map object",
                index_path);
  int32_t cap = cJSON_GetArraySize(map);
  *names = calloc((size_t)cap + 1, sizeof **names);
  if (!*names) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  const cJSON *it;
  cJSON_ArrayForEach(it, map) {
    const char *fn = cJSON_GetStringValue(it);
    if (!fn || !*fn || strchr(fn, '/') || fn[0] == '.')
      return model__errf(err, errlen, -EINVAL, "safetensors: %s: bad file name for tensor '%.64s'",
                  index_path, it->string);
    bool seen = false;
    for (int32_t i = 0; i < *n && !seen; i++) seen = !strcmp((*names)[i], fn);
    if (seen) continue;
    if (*n >= ST_MAX_FILES)
      return model__errf(err, errlen, -EINVAL, "safetensors: %s names more than %d files", index_path,
                  ST_MAX_FILES);
    if (!((*names)[(*n)++] = strdup(fn)))
      return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  }
  qsort(*names, (size_t)*n, sizeof **names, cmp_str);
  return 0;
}

/* Every *.safetensors file in dir, sorted. */
static int scan_files(const char *dir, char ***names, int32_t *n, char *err, size_t errlen) {
  DIR *d = opendir(dir);
  if (!d) {
    int e = errno;
    return model__errf(err, errlen, -e, "safetensors: cannot list %s: %s", dir, strerror(e));
  }
  int32_t cap = 0;
  int rc = 0;
  for (struct dirent *de; (de = readdir(d));) {
    if (de->d_name[0] == '.' || !has_suffix(de->d_name, ".safetensors")) continue;
    if (*n >= ST_MAX_FILES) {
      rc = model__errf(err, errlen, -EINVAL, "safetensors: %s holds more than %d files", dir,
                ST_MAX_FILES);
      break;
    }
    if (*n + 1 >= cap) {
      cap = cap ? 2 * cap : 16;
      char **nn = realloc(*names, (size_t)cap * sizeof *nn);
      if (!nn) {
        rc = model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
        break;
      }
      *names = nn;
    }
    if (!((*names)[*n] = strdup(de->d_name))) {
      rc = model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
      break;
    }
    (*names)[++*n] = NULL;
  }
  closedir(d);
  if (rc) return rc;
  if (*n == 0)
    return model__errf(err, errlen, -ENOENT, "safetensors: no *.safetensors files in %s", dir);
  qsort(*names, (size_t)*n, sizeof **names, cmp_str);
  return 0;
}

static int st_open(st_ctx_t *st, const char *dir, char *err, size_t errlen) {
  memset(st, 0, sizeof *st);
  char **names = NULL;
  int32_t n = 0;
  cJSON *index = NULL;
  char *index_path = path_join(dir, "model.safetensors.index.json");
  if (!index_path) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  int rc = access(index_path, F_OK) == 0
               ? index_files(index_path, &names, &n, &index, err, errlen)
               : scan_files(dir, &names, &n, err, errlen);
  if (rc) goto out;
  st->files = calloc((size_t)n, sizeof *st->files);
  if (!st->files) {
    rc = model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
    goto out;
  }
  size_t cap = 0;
  for (int32_t i = 0; i < n; i++)
    if ((rc = open_file(st, dir, names[i], &cap, err, errlen))) goto out;
  qsort(st->tensors, st->n_tensors, sizeof *st->tensors, cmp_tensor);
  for (size_t i = 1; i < st->n_tensors; i++)
    if (!strcmp(st->tensors[i].name, st->tensors[i - 1].name)) {
      rc = model__errf(err, errlen, -EINVAL, "safetensors: tensor '%.64s' appears in %s and in %s",
                st->tensors[i].name, st->files[st->tensors[i - 1].file].path,
                st->files[st->tensors[i].file].path);
      goto out;
    }
  if (index) {
    /* the index and the shards agree */
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(index, "weight_map")) {
      const st_tensor_t *t = find(st, it->string);
      const char *want = it->valuestring;
      const char *have = t ? strrchr(st->files[t->file].path, '/') + 1 : NULL;
      if (!t || strcmp(have, want)) {
        rc = model__errf(err, errlen, -EINVAL,
                  "safetensors: %s lists tensor '%.64s' in %s, but it is not there", index_path,
                  it->string, want);
        goto out;
      }
    }
  }
out:
  for (int32_t i = 0; names && i < n; i++) free(names[i]);
  free(names);
  cJSON_Delete(index);
  free(index_path);
  if (rc) st_close(st);
  return rc;
}

/* ---- the weight source --------------------------------------------------- */

/* Hugging Face name of a loader name; *heads > 0 when its rows need the
 * RoPE permutation (q and k). False for a name this format has no mapping
 * for. */
static bool hf_name(const st_ctx_t *st, const char *name, char *out, size_t cap, int32_t *heads) {
  static const struct {
    const char *gguf, *hf;
  } blk[] = {
      {"attn_norm", "input_layernorm"},       {"attn_q", "self_attn.q_proj"},
      {"attn_k", "self_attn.k_proj"},         {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"},    {"ffn_norm", "post_attention_layernorm"},
      {"ffn_gate", "mlp.gate_proj"},          {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},
  };
  *heads = 0;
  if (!strcmp(name, "token_embd")) return snprintf(out, cap, "model.embed_tokens.weight"), true;
  if (!strcmp(name, "output_norm")) return snprintf(out, cap, "model.norm.weight"), true;
  if (!strcmp(name, "output")) return snprintf(out, cap, "lm_head.weight"), true;
  int layer, used = 0;
  if (sscanf(name, "blk.%d.%n", &layer, &used) != 1 || used == 0) return false;
  for (size_t i = 0; i < sizeof blk / sizeof *blk; i++) {
    if (strcmp(name + used, blk[i].gguf)) continue;
    if (!strcmp(blk[i].gguf, "attn_q")) *heads = st->n_heads;
    if (!strcmp(blk[i].gguf, "attn_k")) *heads = st->n_kv_heads;
    snprintf(out, cap, "model.layers.%d.%s.weight", layer, blk[i].hf);
    return true;
  }
  return false;
}

/* The tensor for a loader name, its shape checked against [rows][cols]
 * (a vector is rows = 1). */
static int lookup(const st_ctx_t *st, const char *name, int64_t rows, int64_t cols,
                  const st_tensor_t **out, int32_t *heads, char *err, size_t errlen) {
  char hf[128];
  if (!hf_name(st, name, hf, sizeof hf, heads))
    return model__errf(err, errlen, -ENOENT, "safetensors: no Hugging Face name for tensor %s", name);
  const st_tensor_t *t = find(st, hf);
  if (!t)
    return model__errf(err, errlen, -ENOENT, "safetensors: missing tensor %s (%s)", hf, name);
  const char *file = st->files[t->file].path;
  bool ok = rows == 1 ? t->n_dims == 1 && t->shape[0] == cols
                      : t->n_dims == 2 && t->shape[0] == rows && t->shape[1] == cols;
  if (!ok)
    return model__errf(err, errlen, -EINVAL,
                "safetensors: %s: tensor %s has shape [%lld%s%lld], expected [%lld, %lld] "
                "(shape mismatch)", file, hf, t->n_dims ? (long long)t->shape[0] : 0LL,
                t->n_dims > 1 ? ", " : "", t->n_dims > 1 ? (long long)t->shape[1] : 0LL,
                (long long)rows, (long long)cols);
  if (t->type == ST_OTHER)
    return model__errf(err, errlen, -ENOTSUP,
                "safetensors: %s: tensor %s has dtype %.16s, which pressd cannot load "
                "(supported: F32, F16, BF16)", file, hf, t->dtype);
  if (*heads && (rows % *heads || (rows / *heads) % 2))
    return model__errf(err, errlen, -EINVAL,
                "safetensors: tensor %s: %lld rows do not split into %d heads of even size", hf,
                (long long)rows, *heads);
  *out = t;
  return 0;
}

/* Source row of destination row r under the RoPE permutation: within a head
 * of hd rows, GGUF row 2i + j is Hugging Face row j * hd/2 + i. */
static inline int64_t perm_row(int64_t r, int64_t hd) {
  int64_t h = r / hd, k = r % hd;
  return h * hd + (k % 2) * (hd / 2) + k / 2;
}

static int st_fill(void *ctx, const char *name, int64_t rows, int64_t cols, float *dst,
                   char *err, size_t errlen) {
  const st_ctx_t *st = ctx;
  const st_tensor_t *t;
  int32_t heads;
  int rc = lookup(st, name, rows, cols, &t, &heads, err, errlen);
  if (rc) return rc;
  int64_t hd = heads ? rows / heads : 0;
  size_t esz = t->type == ST_F32 ? 4 : 2;
  for (int64_t r = 0; r < rows; r++) {
    const uint8_t *src = t->data + (size_t)(heads ? perm_row(r, hd) : r) * (size_t)cols * esz;
    float *d = dst + (size_t)r * (size_t)cols;
    switch (t->type) {
    case ST_F32: memcpy(d, src, (size_t)cols * 4); break;
    case ST_F16:
      for (int64_t c = 0; c < cols; c++)
        d[c] = model_f16_to_f32((uint16_t)(src[2 * c] | src[2 * c + 1] << 8));
      break;
    case ST_BF16:
      for (int64_t c = 0; c < cols; c++)
        d[c] = model_bf16_to_f32((uint16_t)(src[2 * c] | src[2 * c + 1] << 8));
      break;
    case ST_OTHER: return -ENOTSUP; /* lookup refused it */
    }
  }
  return 0;
}

/* The stored matrix for backends that compute on F16/BF16. q and k come as
 * a row-permuted copy in st->scratch, valid until the next call (the loader
 * uploads it at once). F32 goes through fill. */
static int st_view(void *ctx, const char *name, int64_t rows, int64_t cols, k_dtype_t *type,
                   const void **data, char *err, size_t errlen) {
  st_ctx_t *st = ctx;
  const st_tensor_t *t;
  int32_t heads;
  int rc = lookup(st, name, rows, cols, &t, &heads, err, errlen);
  if (rc) return rc;
  if (t->type == ST_F32) return -ENOTSUP;
  *type = t->type == ST_F16 ? K_F16 : K_BF16;
  if (!heads) {
    *data = t->data;
    return 0;
  }
  if (t->nbytes > st->scratch_bytes) {
    void *p = realloc(st->scratch, t->nbytes);
    if (!p) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory permuting %s", name);
    st->scratch = p;
    st->scratch_bytes = t->nbytes;
  }
  size_t row_bytes = (size_t)cols * 2;
  int64_t hd = rows / heads;
  for (int64_t r = 0; r < rows; r++)
    memcpy((uint8_t *)st->scratch + (size_t)r * row_bytes,
           t->data + (size_t)perm_row(r, hd) * row_bytes, row_bytes);
  *data = st->scratch;
  return 0;
}

int model_weights_from_safetensors(model_weights_t *w, const char *dir, k_backend_t *be,
                                   char *err, size_t errlen) {
  memset(w, 0, sizeof *w);
  char *cfg_path = path_join(dir, "config.json");
  if (!cfg_path) return model__errf(err, errlen, -ENOMEM, "safetensors: out of memory");
  char *txt;
  int rc = read_text(cfg_path, &txt, err, errlen);
  free(cfg_path);
  if (rc) return rc;
  model_config_t c;
  rc = model_config_from_json(&c, txt, err, errlen);
  free(txt);
  if (rc) return rc;
  st_ctx_t st;
  if ((rc = st_open(&st, dir, err, errlen))) return rc;
  st.n_heads = c.n_heads;
  st.n_kv_heads = c.n_kv_heads;
  model__wsrc_t src = {.ctx = &st, .fill = st_fill, .view = st_view};
  /* the backend holds its own copy once this returns: the mappings can go */
  rc = model__weights_load(w, &c, &src, be, err, errlen);
  st_close(&st);
  return rc;
}
