/* A replay op for the CPU backend that checks the promise replay's callers
 * make (kernels/backend.h) instead of capturing: under one key, fn queues
 * only ops a capture can hold, and the same ops on the same buffers with
 * the same sizes every time. The first call's list of ops is kept; every
 * later call's is compared with it, and a difference, or a forbidden op
 * (allocation, copy, sync, sampling, attention, a nested replay) while fn
 * runs, is counted with a message. fn runs every time: the CPU computes
 * what a replayed graph would.
 *
 * One wrapped backend at a time; its ops are called from one thread (the
 * engine's); read the counts once that thread has stopped. */
#ifndef PRESSD_TESTS_GRAPH_CHECK_H
#define PRESSD_TESTS_GRAPH_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"

typedef struct gc_op {
  const char *name;
  const void *p[4];
  int64_t n[4];
} gc_op_t;

typedef struct gc_trace {
  uint64_t key;
  gc_op_t *ops;
  int32_t n, cap;
} gc_trace_t;

typedef struct graph_check {
  k_ops_t ops;         /* installed */
  const k_ops_t *real; /* the backend's own */
  gc_trace_t *keys;    /* [n_keys] each key's first list */
  int32_t n_keys, cap_keys;
  gc_trace_t cur;      /* the list of the call running */
  int in_fn;
  uint64_t calls, repeats, violations;
  char first_violation[256];
} graph_check_t;

static graph_check_t gc_state;

static void gc_violation(const char *what, const char *detail) {
  if (!gc_state.violations++)
    snprintf(gc_state.first_violation, sizeof gc_state.first_violation, "%s%s", what, detail);
}

static void gc_push(gc_trace_t *t, const gc_op_t *op) {
  if (t->n == t->cap) {
    t->cap = t->cap ? 2 * t->cap : 64;
    t->ops = realloc(t->ops, (size_t)t->cap * sizeof *t->ops);
    if (!t->ops) abort();
  }
  t->ops[t->n++] = *op;
}

/* An op that may be captured: recorded while fn runs. */
static void gc_record(const char *name, const void *p0, const void *p1, const void *p2,
                      const void *p3, int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
  if (!gc_state.in_fn) return;
  gc_op_t op = {name, {p0, p1, p2, p3}, {n0, n1, n2, n3}};
  gc_push(&gc_state.cur, &op);
}

/* An op a capture cannot hold. */
static void gc_forbid(const char *name) {
  if (gc_state.in_fn) gc_violation(name, " queued inside a replayed segment");
}

static int gc_matmul(k_backend_t *be, float *y, const float *x, const k_weight_t *w, int64_t m) {
  gc_record("matmul", y, x, w->data, NULL, m, w->rows, w->cols, w->type);
  return gc_state.real->matmul(be, y, x, w, m);
}
static int gc_rmsnorm(k_backend_t *be, float *y, const float *x, const float *g, int64_t m,
                      int64_t n, float eps) {
  int32_t e;
  memcpy(&e, &eps, sizeof e);
  gc_record("rmsnorm", y, x, g, NULL, m, n, e, 0);
  return gc_state.real->rmsnorm(be, y, x, g, m, n, eps);
}
static int gc_rope(k_backend_t *be, float *x, const int32_t *pos, int64_t m, int32_t n_heads,
                   int32_t head_dim, const float *inv_freq) {
  gc_record("rope", x, pos, inv_freq, NULL, m, n_heads, head_dim, 0);
  return gc_state.real->rope(be, x, pos, m, n_heads, head_dim, inv_freq);
}
static int gc_silu_mul(k_backend_t *be, float *y, const float *gate, const float *up, int64_t n) {
  gc_record("silu_mul", y, gate, up, NULL, n, 0, 0, 0);
  return gc_state.real->silu_mul(be, y, gate, up, n);
}
static int gc_add(k_backend_t *be, float *y, const float *x, int64_t n) {
  gc_record("add", y, x, NULL, NULL, n, 0, 0, 0);
  return gc_state.real->add(be, y, x, n);
}
static int gc_embed(k_backend_t *be, float *y, const k_weight_t *t, const int32_t *ids, int64_t m) {
  gc_record("embed", y, t->data, ids, NULL, m, t->rows, t->cols, t->type);
  return gc_state.real->embed(be, y, t, ids, m);
}

static void *gc_alloc(k_backend_t *be, size_t bytes) {
  gc_forbid("alloc");
  return gc_state.real->alloc(be, bytes);
}
static void gc_free(k_backend_t *be, void *p) {
  gc_forbid("free");
  gc_state.real->free(be, p);
}
static int gc_upload(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  gc_forbid("upload");
  return gc_state.real->upload(be, dst, src, bytes);
}
static int gc_download(k_backend_t *be, void *dst, const void *src, size_t bytes) {
  gc_forbid("download");
  return gc_state.real->download(be, dst, src, bytes);
}
static int gc_sync(k_backend_t *be) {
  gc_forbid("sync");
  return gc_state.real->sync(be);
}
static int gc_kv_write(k_backend_t *be, const k_kv_arena_t *kv, const float *k, const float *v,
                       const k_attn_args_t *a) {
  gc_forbid("kv_write");
  return gc_state.real->kv_write(be, kv, k, v, a);
}
static int gc_attention(k_backend_t *be, const k_kv_arena_t *kv, const k_attn_args_t *a) {
  gc_forbid("attention");
  return gc_state.real->attention(be, kv, a);
}
static int gc_sample(k_backend_t *be, int32_t *ids, const float *x, int64_t m, int64_t n,
                     const k_draw_t *draws) {
  gc_forbid("sample");
  return gc_state.real->sample(be, ids, x, m, n, draws);
}
static int gc_read_rows(k_backend_t *be, void *dst, const void *src, const int32_t *rows,
                        int64_t n, size_t row_bytes) {
  gc_forbid("read_rows");
  return gc_state.real->read_rows(be, dst, src, rows, n, row_bytes);
}
static int gc_kv_move(k_backend_t *be, const k_kv_arena_t *kv, const int32_t *src,
                      const int32_t *dst, int64_t n) {
  gc_forbid("kv_move");
  return gc_state.real->kv_move(be, kv, src, dst, n);
}

static bool gc_same(const gc_trace_t *a, const gc_trace_t *b, char *what, size_t len) {
  for (int32_t i = 0; i < a->n || i < b->n; i++) {
    if (i >= a->n || i >= b->n) {
      snprintf(what, len, "%d ops, then %d", a->n, b->n);
      return false;
    }
    const gc_op_t *x = &a->ops[i], *y = &b->ops[i];
    if (x->name != y->name || memcmp(x->p, y->p, sizeof x->p) || memcmp(x->n, y->n, sizeof x->n)) {
      snprintf(what, len, "op %d: %s, then %s with other buffers or sizes", i, x->name, y->name);
      return false;
    }
  }
  return true;
}

static int gc_replay(k_backend_t *be, uint64_t key, int (*fn)(void *ctx), void *ctx) {
  (void)be;
  if (gc_state.in_fn) gc_violation("a replay inside a replayed segment", "");
  gc_state.calls++;
  gc_state.in_fn = 1;
  gc_state.cur.n = 0;
  int rc = fn(ctx);
  gc_state.in_fn = 0;
  for (int32_t i = 0; i < gc_state.n_keys; i++) {
    if (gc_state.keys[i].key != key) continue;
    char what[160];
    gc_state.repeats++;
    if (!gc_same(&gc_state.keys[i], &gc_state.cur, what, sizeof what))
      gc_violation("a key's segment changed: ", what);
    return rc;
  }
  if (gc_state.n_keys == gc_state.cap_keys) {
    gc_state.cap_keys = gc_state.cap_keys ? 2 * gc_state.cap_keys : 64;
    gc_state.keys = realloc(gc_state.keys, (size_t)gc_state.cap_keys * sizeof *gc_state.keys);
    if (!gc_state.keys) abort();
  }
  gc_trace_t *t = &gc_state.keys[gc_state.n_keys++];
  *t = (gc_trace_t){.key = key};
  for (int32_t i = 0; i < gc_state.cur.n; i++) gc_push(t, &gc_state.cur.ops[i]);
  return rc;
}

static void gc_replay_drop(k_backend_t *be) {
  (void)be;
  for (int32_t i = 0; i < gc_state.n_keys; i++) free(gc_state.keys[i].ops);
  gc_state.n_keys = 0;
}

/* Install the checking replay op on be (whose other ops are wrapped to
 * record or forbid); counts from zero. */
static inline void graph_check_wrap(k_backend_t *be) {
  gc_replay_drop(be);
  free(gc_state.keys);
  free(gc_state.cur.ops);
  memset(&gc_state, 0, sizeof gc_state);
  gc_state.real = be->ops;
  gc_state.ops = *be->ops;
  k_ops_t *o = &gc_state.ops;
  o->matmul = gc_matmul;
  o->matmul_n = NULL;
  o->rmsnorm = gc_rmsnorm;
  o->rope = gc_rope;
  o->silu_mul = gc_silu_mul;
  o->add = gc_add;
  o->embed = gc_embed;
  o->alloc = gc_alloc;
  o->free = gc_free;
  o->upload = gc_upload;
  o->download = gc_download;
  o->sync = gc_sync;
  o->kv_write = gc_kv_write;
  o->attention = gc_attention;
  if (o->sample) o->sample = gc_sample;
  if (o->read_rows) o->read_rows = gc_read_rows;
  if (o->kv_move) o->kv_move = gc_kv_move;
  o->replay = gc_replay;
  o->replay_drop = gc_replay_drop;
  be->ops = o;
}

/* The backend's own ops back. */
static inline void graph_check_unwrap(k_backend_t *be) {
  if (be->ops == &gc_state.ops) be->ops = gc_state.real;
}

#endif
