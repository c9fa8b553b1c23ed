/* The CPU backend: fp32 reference implementation of every op. GEMMs go
 * through OpenBLAS (the decode batch is one GEMM); attention and the
 * element-wise ops run on a small thread pool. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu-internal.h"

/* OpenBLAS's own thread control (declared in its cblas.h on Debian, but not
 * in every BLAS's header). */
void openblas_set_num_threads(int n);

typedef struct cpu {
  k_pool_t *pool;         /* owns */
  k__scratch_t mm_scratch; /* matmul's dequantised weight bands */
} cpu_t;

int k__scratch_reserve(k__scratch_t *s, size_t bytes) {
  if (bytes <= s->cap) return 0;
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes)) return -ENOMEM;
  free(s->p);
  s->p = p;
  s->cap = bytes;
  return 0;
}

void k__scratch_destroy(k__scratch_t *s) {
  free(s->p);
  s->p = NULL;
  s->cap = 0;
}

static k_pool_t *pool_of(k_backend_t *be) { return ((cpu_t *)be->impl)->pool; }

static void cpu_destroy(k_backend_t *be) {
  cpu_t *c = be->impl;
  if (c) {
    k_pool_free(c->pool);
    k__scratch_destroy(&c->mm_scratch);
  }
  free(c);
}

static void *cpu_alloc(k_backend_t *be, size_t bytes) {
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
  return p;
}

static void cpu_free(k_backend_t *be, void *p) { free(p); }

static int cpu_copy(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  memcpy(dst, src, bytes);
  return 0;
}

static int cpu_sync(k_backend_t *be) { return 0; }

static int cpu_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  cpu_t *c = be->impl;
  return k__cpu_matmul(c->pool, &c->mm_scratch, be->f32_activations, y, x, w, m);
}

static inline float dot(const float *a, const float *b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (int j = 0; j < 16; j++) s += acc[j];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

typedef struct rms_job {
  float *y;
  const float *x, *g;
  int64_t n;
  float eps;
} rms_job_t;

static void rms_row(void *arg, int64_t r, int32_t thread) {
  const rms_job_t *j = arg;
  const float *x = j->x + r * j->n;
  float *y = j->y + r * j->n;
  double ss = 0;
  for (int64_t i = 0; i < j->n; i++) ss += (double)x[i] * x[i];
  float scale = (float)(1.0 / sqrt(ss / (double)j->n + j->eps));
  for (int64_t i = 0; i < j->n; i++) y[i] = x[i] * scale * j->g[i];
}

static int cpu_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                       int64_t n, float eps) {
  rms_job_t j = {y, x, g, n, eps};
  k_pool_run(pool_of(be), m, rms_row, &j);
  return 0;
}

typedef struct rope_job {
  float *x;
  const int32_t *pos;
  int32_t n_heads, head_dim;
  const float *inv_freq;
} rope_job_t;

static void rope_row(void *arg, int64_t r, int32_t thread) {
  const rope_job_t *j = arg;
  int32_t half = j->head_dim / 2;
  float cs[512], sn[512]; /* head_dim <= 1024 checked by the caller */
  for (int32_t i = 0; i < half; i++) {
    float theta = (float)j->pos[r] * j->inv_freq[i];
    cs[i] = cosf(theta);
    sn[i] = sinf(theta);
  }
  float *row = j->x + r * (int64_t)j->n_heads * j->head_dim;
  for (int32_t h = 0; h < j->n_heads; h++) {
    float *v = row + (int64_t)h * j->head_dim;
    for (int32_t i = 0; i < half; i++) {
      float x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * cs[i] - x1 * sn[i];
      v[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
    }
  }
}

static int cpu_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                    int32_t head_dim, const float *inv_freq) {
  if (head_dim > 1024 || head_dim % 2) return -EINVAL;
  rope_job_t j = {x, pos, n_heads, head_dim, inv_freq};
  k_pool_run(pool_of(be), m, rope_row, &j);
  return 0;
}

#define ELEM_CHUNK 16384

typedef struct elem_job {
  float *y;
  const float *a, *b;
  int64_t n;
} elem_job_t;

static void silu_chunk(void *arg, int64_t c, int32_t thread) {
  const elem_job_t *j = arg;
  int64_t lo = c * ELEM_CHUNK, hi = lo + ELEM_CHUNK < j->n ? lo + ELEM_CHUNK : j->n;
  for (int64_t i = lo; i < hi; i++) {
    float g = j->a[i];
    j->y[i] = g / (1.0f + expf(-g)) * j->b[i];
  }
}

static int cpu_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  elem_job_t j = {y, gate, up, n};
  k_pool_run(pool_of(be), (n + ELEM_CHUNK - 1) / ELEM_CHUNK, silu_chunk, &j);
  return 0;
}

static int cpu_add(k_backend_t *be, float *y, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += x[i];
  return 0;
}

static int cpu_embed(k_backend_t *be, float *y, const k_weight_t *table, const int32_t *ids,
                     int64_t m) {
  size_t rb = k_row_bytes(table->type, table->cols);
  for (int64_t t = 0; t < m; t++) {
    if (ids[t] < 0 || ids[t] >= table->rows) return -EINVAL;
    k__cpu_dequant_row(table->type, (const uint8_t *)table->data + (size_t)ids[t] * rb,
                       y + t * table->cols, table->cols);
  }
  return 0;
}

static int cpu_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                        const int32_t *pos, const int32_t *slots, int64_t m, int32_t n_kv_heads) {
  int64_t d = kv->head_dim, n_slots = (int64_t)kv->n_blocks * kv->block_size;
  for (int64_t t = 0; t < m; t++) {
    for (int32_t h = 0; h < n_kv_heads; h++) {
      int64_t s = slots[t * n_kv_heads + h];
      if (s < 0 || s >= n_slots) return -EINVAL;
      int64_t src = (t * n_kv_heads + h) * d;
      memcpy(kv->k + s * d, k + src, (size_t)d * sizeof(float));
      memcpy(kv->v + s * d, v + src, (size_t)d * sizeof(float));
      kv->pos[s] = pos[t];
      kv->score[s] = 0.0f;
    }
  }
  return 0;
}

/* ---- attention ------------------------------------------------------------
 * One task = (sequence, KV head, tile of up to ATT_QT query rows). The task
 * walks the head's blocks once; every query row of the tile and every query
 * head of the GQA group keeps an online-softmax state (running max m, sum l,
 * accumulator acc[head_dim]) updated once per block. Each block's K is
 * transposed once into kt[head_dim][block] so the scores of one query are
 * plain vector multiply-adds (no horizontal sums), and the exponentials of a
 * block are one vectorisable loop. A query's result depends only on its own
 * row and the cached K/V, never on the rest of the batch. */
#define ATT_QT 8
#define ATT_MAX_G 16
#define ATT_MAX_D 256
#define ATT_MAX_B 64

typedef struct att_job {
  const k_kv_arena_t *kv;
  const k_attn_args_t *a;
  const int32_t *task_seq; /* [n_tasks] */
  const int32_t *task_row; /* [n_tasks] first query row of the tile */
} att_job_t;

/* exp(x) for x <= 0 (scores minus their running max), -inf → 0; a
 * branch-free polynomial GCC vectorises (relative error < 2e-7). */
static inline float exp_nonpos(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  float n = __builtin_roundf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float two_n;
  memcpy(&two_n, &bits, 4);
  return x == -INFINITY ? 0.0f : p * two_n;
}

static void att_task(void *arg, int64_t ti, int32_t thread) {
  const att_job_t *j = arg;
  const k_attn_args_t *a = j->a;
  const k_kv_arena_t *kv = j->kv;
  const int32_t H = a->n_kv_heads, G = a->n_q_heads / a->n_kv_heads, D = a->head_dim,
                B = kv->block_size;
  int32_t s = j->task_seq[ti / H], h = (int32_t)(ti % H);
  int32_t r0 = j->task_row[ti / H];
  int32_t r1 = r0 + ATT_QT < a->q_start[s + 1] ? r0 + ATT_QT : a->q_start[s + 1];
  int32_t nq = (r1 - r0) * G; /* query vectors in this task */
  const int32_t *table = a->block_tables + ((int64_t)s * H + h) * a->max_blocks;
  int32_t ctx = a->ctx_lens[(int64_t)s * H + h];

  float m[ATT_QT * ATT_MAX_G], l[ATT_QT * ATT_MAX_G];
  float acc[ATT_QT * ATT_MAX_G][ATT_MAX_D] __attribute__((aligned(64)));
  float qs[ATT_QT * ATT_MAX_G][ATT_MAX_D] __attribute__((aligned(64))); /* scaled queries */
  int32_t qpos[ATT_QT * ATT_MAX_G];
  for (int32_t i = 0; i < nq; i++) {
    int32_t r = r0 + i / G, g = i % G;
    const float *q = a->q + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
    for (int32_t d = 0; d < D; d++) qs[i][d] = q[d] * a->scale;
    qpos[i] = a->q_pos[r];
    m[i] = -INFINITY;
    l[i] = 0.0f;
    memset(acc[i], 0, (size_t)D * sizeof(float));
  }

  float kt[ATT_MAX_D][ATT_MAX_B] __attribute__((aligned(64)));
  float sc[ATT_MAX_B] __attribute__((aligned(64)));
  for (int32_t b0 = 0; b0 < ctx; b0 += B) {
    int32_t blk = table[b0 / B];
    int32_t n = ctx - b0 < B ? ctx - b0 : B;
    const float *kb = kv->k + (int64_t)blk * B * D;
    const float *vb = kv->v + (int64_t)blk * B * D;
    const int32_t *pb = kv->pos + (int64_t)blk * B;
    int32_t pmin = INT32_MAX;
    for (int32_t t = 0; t < n; t++) pmin = pb[t] < pmin ? pb[t] : pmin;
    for (int32_t t = 0; t < B; t++)
      for (int32_t d = 0; d < D; d++) kt[d][t] = t < n ? kb[(int64_t)t * D + d] : 0.0f;
    for (int32_t i = 0; i < nq; i++) {
      if (pmin > qpos[i]) continue; /* nothing visible in this block */
      for (int32_t t = 0; t < B; t++) sc[t] = 0.0f;
      for (int32_t d = 0; d < D; d++) {
        float qd = qs[i][d];
        for (int32_t t = 0; t < B; t++) sc[t] += qd * kt[d][t];
      }
      float bmax = -INFINITY;
      for (int32_t t = 0; t < B; t++) {
        if (t >= n || pb[t] > qpos[i]) sc[t] = -INFINITY;
        bmax = sc[t] > bmax ? sc[t] : bmax;
      }
      float mnew = bmax > m[i] ? bmax : m[i];
      float corr = exp_nonpos(m[i] - mnew); /* 0 when m was -inf */
      float psum = 0.0f;
      for (int32_t t = 0; t < B; t++) {
        sc[t] = exp_nonpos(sc[t] - mnew);
        psum += sc[t];
      }
      l[i] = l[i] * corr + psum;
      float *ac = acc[i];
      if (corr != 1.0f)
        for (int32_t d = 0; d < D; d++) ac[d] *= corr;
      for (int32_t t = 0; t < n; t++) {
        float p = sc[t];
        if (p == 0.0f) continue;
        const float *vv = vb + (int64_t)t * D;
        for (int32_t d = 0; d < D; d++) ac[d] += p * vv[d];
      }
      m[i] = mnew;
    }
  }
  for (int32_t i = 0; i < nq; i++) {
    int32_t r = r0 + i / G, g = i % G;
    float *o = a->out + ((int64_t)r * a->n_q_heads + (int64_t)h * G + g) * D;
    float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
    for (int32_t d = 0; d < D; d++) o[d] = acc[i][d] * inv;
  }
}

static int cpu_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  int32_t G = a->n_q_heads / a->n_kv_heads;
  if (a->n_q_heads % a->n_kv_heads || G > ATT_MAX_G || a->head_dim > ATT_MAX_D ||
      kv->block_size > ATT_MAX_B || a->head_dim != kv->head_dim)
    return -EINVAL;
  int64_t n_tiles = 0;
  for (int32_t s = 0; s < a->n_seqs; s++)
    n_tiles += (a->q_start[s + 1] - a->q_start[s] + ATT_QT - 1) / ATT_QT;
  int32_t stack_seq[256], stack_row[256];
  int32_t *ts = stack_seq, *tr = stack_row;
  if (n_tiles > 256) {
    ts = malloc((size_t)n_tiles * sizeof *ts);
    tr = malloc((size_t)n_tiles * sizeof *tr);
    if (!ts || !tr) {
      free(ts);
      free(tr);
      return -ENOMEM;
    }
  }
  int64_t k = 0;
  for (int32_t s = 0; s < a->n_seqs; s++)
    for (int32_t r = a->q_start[s]; r < a->q_start[s + 1]; r += ATT_QT) {
      ts[k] = s;
      tr[k] = r;
      k++;
    }
  att_job_t j = {kv, a, ts, tr};
  k_pool_run(pool_of(be), n_tiles * a->n_kv_heads, att_task, &j);
  if (ts != stack_seq) {
    free(ts);
    free(tr);
  }
  return 0;
}

static const k_ops_t cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .embed = cpu_embed,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
};

int k_cpu_backend_new(k_backend_t **out, int32_t threads) {
  if (threads <= 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    threads = n > 0 ? (int32_t)n : 1;
  }
  k_backend_t *be = calloc(1, sizeof *be);
  cpu_t *c = calloc(1, sizeof *c);
  if (!be || !c) {
    free(be);
    free(c);
    return -ENOMEM;
  }
  int rc = k_pool_new(&c->pool, threads);
  if (rc) {
    free(be);
    free(c);
    return rc;
  }
  be->ops = &cpu_ops;
  be->impl = c;
  be->threads = threads;
  be->weight_types = 1u << K_F32 | 1u << K_F16 | 1u << K_BF16 | 1u << K_Q8_0 | 1u << K_Q4_0 |
                     1u << K_Q4_1;
  be->host_memory = true;
  /* The pool runs bands of rows in parallel; each band's sgemm is serial. */
  openblas_set_num_threads(1);
  *out = be;
  return 0;
}
