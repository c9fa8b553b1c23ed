/* Per-op timing of a backend (profile.h). The wrapper lives beside the ops
 * table it installs, so an op finds its wrapper from be->ops alone. */
#include "kernels/profile.h"

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { PROF_KINDS = 256 };

typedef struct prof_kind {
  char name[72];
  uint64_t calls;
  double seconds;
} prof_kind_t;

typedef struct prof {
  k_ops_t ops;         /* what be->ops points to */
  const k_ops_t *real; /* the backend's own */
  prof_kind_t kinds[PROF_KINDS];
  int32_t n_kinds;
  uint64_t calls, dropped; /* dropped: calls of kinds past PROF_KINDS */
  double in_ops, first, last;
} prof_t;

static void prof_destroy(k_backend_t *be);

static prof_t *prof_of(const k_backend_t *be) {
  return be->ops->destroy == prof_destroy ? (prof_t *)((char *)be->ops - offsetof(prof_t, ops))
                                          : NULL;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The device idle, then the clock. */
static double begin(prof_t *p, k_backend_t *be) {
  p->real->sync(be);
  double t = now_s();
  if (p->first == 0.0) p->first = t;
  return t;
}

/* The op done (synced), its time added to its kind. */
static int end(prof_t *p, k_backend_t *be, const char *kind, double t0, int rc) {
  int rs = p->real->sync(be);
  double t1 = now_s();
  p->last = t1;
  p->calls++;
  p->in_ops += t1 - t0;
  int32_t i = 0;
  while (i < p->n_kinds && strcmp(p->kinds[i].name, kind)) i++;
  if (i == p->n_kinds) {
    if (i == PROF_KINDS) {
      p->dropped++;
      return rc ? rc : rs;
    }
    snprintf(p->kinds[i].name, sizeof p->kinds[i].name, "%s", kind);
    p->n_kinds++;
  }
  p->kinds[i].calls++;
  p->kinds[i].seconds += t1 - t0;
  return rc ? rc : rs;
}

static const char *type_name(k_dtype_t t) {
  static const char *names[] = {"f32", "bf16", "f16", "q8_0", "q4_0", "q4_1"};
  return (unsigned)t < sizeof names / sizeof *names ? names[t] : "?";
}

static const char *rows_bucket(int64_t m) {
  return m <= 1 ? "1" : m <= 4 ? "2-4" : m <= 64 ? "5-64" : m <= 512 ? "65-512"
         : m <= 4096 ? "513-4096" : ">4096";
}

/* Attention and kv_write: a step of decodes only (one row a sequence), or
 * one with prompt chunks. */
static const char *step_kind(const k_attn_args_t *a) {
  return a->q_start[a->n_seqs] == a->n_seqs ? "decode" : "prefill/mixed";
}

static int p_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  prof_t *p = prof_of(be);
  char kind[72];
  snprintf(kind, sizeof kind, "matmul %s %lldx%lld rows %s", type_name(w->type),
           (long long)w->rows, (long long)w->cols, rows_bucket(m));
  double t = begin(p, be);
  return end(p, be, kind, t, p->real->matmul(be, y, x, w, m));
}

/* n matmuls on one input, timed together: their rows summed. */
static int p_matmul_n(k_backend_t *be, float *const *y, const float *x,
                      const k_weight_t *const *w, int n, int64_t m) {
  prof_t *p = prof_of(be);
  char kind[72];
  int64_t rows = 0;
  for (int i = 0; i < n; i++) rows += w[i]->rows;
  snprintf(kind, sizeof kind, "matmul x%d %s %lldx%lld rows %s", n, type_name(w[0]->type),
           (long long)rows, (long long)w[0]->cols, rows_bucket(m));
  double t = begin(p, be);
  return end(p, be, kind, t, p->real->matmul_n(be, y, x, w, n, m));
}

static int p_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                     int64_t n, float eps) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "rmsnorm", t, p->real->rmsnorm(be, y, x, g, m, n, eps));
}

static int p_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                  int32_t head_dim, const float *inv_freq) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "rope", t, p->real->rope(be, x, pos, m, n_heads, head_dim, inv_freq));
}

static int p_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "silu_mul", t, p->real->silu_mul(be, y, gate, up, n));
}

static int p_add(k_backend_t *be, float *y, const float *x, int64_t n) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "add", t, p->real->add(be, y, x, n));
}

static int p_embed(k_backend_t *be, float *y, const k_weight_t *table, const int32_t *ids,
                   int64_t m) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "embed", t, p->real->embed(be, y, table, ids, m));
}

static int p_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                      const k_attn_args_t *a) {
  prof_t *p = prof_of(be);
  char kind[72];
  snprintf(kind, sizeof kind, "kv_write %s", step_kind(a));
  double t = begin(p, be);
  return end(p, be, kind, t, p->real->kv_write(be, kv, k, v, a));
}

static int p_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  prof_t *p = prof_of(be);
  char kind[72];
  snprintf(kind, sizeof kind, "attention %s", step_kind(a));
  double t = begin(p, be);
  return end(p, be, kind, t, p->real->attention(be, kv, a));
}

static int p_attn_prepare(k_backend_t *be, const k_attn_args_t *a) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "attn_prepare", t, p->real->attn_prepare(be, a));
}

static int p_upload(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "upload", t, p->real->upload(be, dst, src, bytes));
}

static int p_download(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "download", t, p->real->download(be, dst, src, bytes));
}

static int p_sample(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                    const k_draw_t *draws) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "sample", t, p->real->sample(be, ids, x, m, n, draws));
}

static int p_logprobs(k_backend_t *be, k_logprobs_t *out, const float *x, int64_t m, int64_t n,
                      const int32_t *ids, const int32_t *want) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "logprobs", t, p->real->logprobs(be, out, x, m, n, ids, want));
}

static int p_penalize(k_backend_t *be, float *x, int64_t m, int64_t n, const k_penalty_t *rows,
                      const int32_t *ids, const int32_t *seen) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "penalize", t, p->real->penalize(be, x, m, n, rows, ids, seen));
}

static int p_kv_move(k_backend_t *be, const k_kv_arena_t *kv, const int32_t *src,
                     const int32_t *dst, int64_t n) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "kv_move", t, p->real->kv_move(be, kv, src, dst, n));
}

static int p_read_rows(k_backend_t *be, void *dst, const void *src, const int32_t *rows,
                       int64_t n, size_t row_bytes) {
  prof_t *p = prof_of(be);
  double t = begin(p, be);
  return end(p, be, "read_rows", t, p->real->read_rows(be, dst, src, rows, n, row_bytes));
}

static int by_seconds(const void *a, const void *b) {
  double x = ((const prof_kind_t *)a)->seconds, y = ((const prof_kind_t *)b)->seconds;
  return x < y ? 1 : x > y ? -1 : 0;
}

int k_profile_report(k_backend_t *be, FILE *f) {
  prof_t *p = prof_of(be);
  if (!p) return -ENOENT;
  prof_kind_t *k = malloc((size_t)(p->n_kinds ? p->n_kinds : 1) * sizeof *k);
  if (!k) return -ENOMEM;
  memcpy(k, p->kinds, (size_t)p->n_kinds * sizeof *k);
  qsort(k, (size_t)p->n_kinds, sizeof *k, by_seconds);
  const double wall = p->last - p->first;
  fprintf(f, "# pressd op profile, backend %s: %llu calls, %.3f s in ops, %.3f s between "
             "them (%.3f s from the first op to the last)%s\n",
          p->real->name, (unsigned long long)p->calls, p->in_ops, wall - p->in_ops, wall,
          p->dropped ? ", some kinds not listed (too many)" : "");
  fprintf(f, "%-48s %10s %12s %10s %7s\n", "op", "calls", "total ms", "mean us", "share");
  for (int32_t i = 0; i < p->n_kinds; i++)
    fprintf(f, "%-48s %10llu %12.3f %10.2f %6.2f%%\n", k[i].name,
            (unsigned long long)k[i].calls, k[i].seconds * 1e3,
            k[i].seconds * 1e6 / (double)k[i].calls,
            p->in_ops > 0 ? 100.0 * k[i].seconds / p->in_ops : 0.0);
  free(k);
  return 0;
}

static void prof_destroy(k_backend_t *be) {
  prof_t *p = prof_of(be);
  const char *path = getenv("PRESSD_PROFILE_OPS");
  FILE *f = path && *path ? fopen(path, "a") : NULL;
  if (f) {
    k_profile_report(be, f);
    fclose(f);
  }
  be->ops = p->real;
  free(p);
  if (be->ops->destroy) be->ops->destroy(be);
}

int k_profile_wrap(k_backend_t *be) {
  if (prof_of(be)) return -EBUSY;
  prof_t *p = calloc(1, sizeof *p);
  if (!p) return -ENOMEM;
  p->real = be->ops;
  p->ops = *be->ops;
  k_ops_t *o = &p->ops;
  o->destroy = prof_destroy;
  o->matmul = p_matmul;
  if (o->matmul_n) o->matmul_n = p_matmul_n;
  o->rmsnorm = p_rmsnorm;
  o->rope = p_rope;
  o->silu_mul = p_silu_mul;
  o->add = p_add;
  o->embed = p_embed;
  o->kv_write = p_kv_write;
  o->attention = p_attention;
  o->upload = p_upload;
  o->download = p_download;
  if (o->attn_prepare) o->attn_prepare = p_attn_prepare;
  if (o->sample) o->sample = p_sample;
  if (o->penalize) o->penalize = p_penalize;
  if (o->logprobs) o->logprobs = p_logprobs;
  if (o->kv_move) o->kv_move = p_kv_move;
  if (o->read_rows) o->read_rows = p_read_rows;
  o->replay = NULL; /* every op timed alone: nothing captured */
  o->replay_drop = NULL;
  be->ops = o;
  return 0;
}
