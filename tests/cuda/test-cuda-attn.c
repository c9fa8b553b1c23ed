/* Paged attention, kv_write and compression scores of the CUDA backend
 * against the CPU backend (fp32, exact numerics) on seeded random inputs.
 *
 * Every case lays out the same cache on both backends through kv_write: the
 * prefix each KV head keeps (a random subset of earlier positions in a
 * shuffled slot order, as after compression; a different count per head)
 * is written by one call per head (n_kv_heads 1, kv_head0 = that head),
 * then the step writes its new rows with one kv_write and runs attention.
 * K and V are rounded to the GPU's KV type before either backend sees them,
 * so both attend over the same numbers and only the order of fp32
 * operations differs. Unused slots of the GPU arena hold NaN K/V at
 * position 0 (visible to every query): reading one shows as NaN. Tables of
 * other layers and of other ranks' heads point at such a block.
 *
 * Tolerances (|gpu - cpu| <= tol * max(1, |cpu|)): outputs 2e-5; scores,
 * obs_mass and obs_last 2e-5 (sums of probabilities whose relative error
 * is a few fp32 ulps; the CPU itself is within 1e-5 of a double reference).
 * With PRESSD_CUDA_PREFILL=mma the prefill multiplies Q (rounded to the KV
 * type) by K, and P (rounded likewise) by V, on tensor cores: 1e-2 for
 * outputs and scores alike, a few roundings of bf16's 2^-8.
 * Positions, written K/V and untouched entries must match exactly.
 * Exits 77 (skip) without a GPU; 1 instead when PRESSD_REQUIRE_GPU=1. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/cuda/cuda.h"
#include "model/quant.h"
#include "paged/pool.h"
#include "tests/cuda/gpu-test.h"
#include "tests/test.h"

static double g_tol_out = 2e-5, g_tol_score = 2e-5; /* main: looser for the mma prefill */
#define MAX_HA 8 /* KV heads of all ranks in a case */

static k_backend_t *g_gpu;  /* bf16 KV */
static k_backend_t *g_gpu16; /* fp16 KV */
static k_backend_t *g_cpu;

static float round_kv(k_dtype_t t, float x) {
  return t == K_F16 ? model_f16_to_f32(model_f32_to_f16(x)) : model_bf16_to_f32(model_f32_to_bf16(x));
}

static void check_close(const char *what, const char *name, size_t i, double got, double want,
                        double rel) {
  double tol = rel * (fabs(want) > 1.0 ? fabs(want) : 1.0);
  if (!(fabs(got - want) <= tol))
    FAIL_AT("%s: %s[%zu]: gpu %.9g vs cpu %.9g (tol %g)", name, what, i, got, want, tol);
}

static bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Device copies. */
static void *dev_copy(k_backend_t *be, const void *src, size_t bytes) {
  void *p = be->ops->alloc(be, bytes);
  CHECK(p);
  if (bytes) CHECK_INT_EQ(be->ops->upload(be, p, src, bytes), 0);
  return p;
}
static void dev_free(k_backend_t *be, void *p) {
  if (p) be->ops->free(be, p);
}

typedef struct seq_spec {
  int32_t prefix;       /* positions [0, prefix) came before this step */
  int32_t n_q;          /* query rows at positions prefix .. prefix + n_q - 1 */
  int32_t keep[MAX_HA]; /* prefix positions each local KV head still holds; -1: all */
  int32_t n_obs;        /* k_seq_kv_t.n_obs */
  bool mass, last;      /* obs_mass / obs_last given (windows only) */
} seq_spec_t;

typedef struct attn_case {
  const char *name;
  int32_t n_q_heads, n_kv_heads, head_dim, block_size; /* heads of this rank */
  int32_t kv_head0, kv_heads_all;                      /* 0, 0: no sharding */
  int32_t n_layers, layer;
  int32_t n_seqs;
  const seq_spec_t *seqs;
  float q_gain; /* larger: peakier softmax */
  uint64_t seed;
  bool sorted_slots; /* the kept prefix in position order (else shuffled) */
  int32_t obs_pool;
  bool prepare; /* call attn_prepare before the step */
  bool f16;     /* the fp16 KV backend */
} attn_case_t;

/* One backend's copy of a case. */
typedef struct side {
  k_backend_t *be;
  k_kv_arena_t kv;
  float **mass, **last; /* [S] obs buffers (backend memory) or NULL */
} side_t;

static void side_free(side_t *sd, int32_t S) {
  for (int32_t s = 0; s < S; s++) {
    dev_free(sd->be, sd->mass[s]);
    dev_free(sd->be, sd->last[s]);
  }
  free(sd->mass);
  free(sd->last);
  kv_arena_destroy(&sd->kv, sd->be);
}

/* first_block: the arenas hold the pool's blocks from this id on (a
 * tensor-parallel rank's part of the pool). */
static void run_case_at(const attn_case_t *c, int32_t first_block) {
  k_backend_t *gpu = c->f16 ? g_gpu16 : g_gpu;
  const k_dtype_t kt = gpu->kv_type;
  const int32_t S = c->n_seqs, H = c->n_kv_heads, QH = c->n_q_heads, D = c->head_dim,
                B = c->block_size, G = QH / H;
  const int32_t HA = c->kv_heads_all > 0 ? c->kv_heads_all : H, h0 = c->kv_head0;
  const int32_t L = c->n_layers, LY = c->layer;
  CHECK(HA <= MAX_HA && h0 + H <= HA && LY < L);
  uint64_t rng = c->seed;

  /* what every (sequence, local head) holds: kept prefix positions in slot order */
  int32_t *keep = test_xmalloc((size_t)S * H * sizeof *keep);
  int32_t **kpos = test_xmalloc((size_t)S * H * sizeof *kpos);
  float **pk = test_xmalloc((size_t)S * H * sizeof *pk), **pv = test_xmalloc((size_t)S * H * sizeof *pv);
  int32_t stride = 1, total_blocks = 0;
  for (int32_t s = 0; s < S; s++) {
    const seq_spec_t *sp = &c->seqs[s];
    int32_t *pool = test_xmalloc((size_t)(sp->prefix + 1) * sizeof *pool);
    for (int32_t h = 0; h < H; h++) {
      int32_t i = s * H + h, kp = sp->keep[h] < 0 || sp->keep[h] > sp->prefix ? sp->prefix : sp->keep[h];
      keep[i] = kp;
      kpos[i] = test_xmalloc((size_t)(kp + 1) * sizeof(int32_t));
      for (int32_t p = 0; p < sp->prefix; p++) pool[p] = p;
      for (int32_t p = 0; p < kp; p++) { /* a random subset of the prefix */
        int32_t j = p + rng_int(&rng, sp->prefix - p), t = pool[p];
        pool[p] = pool[j];
        pool[j] = t;
        kpos[i][p] = pool[p];
      }
      if (c->sorted_slots) {
        for (int32_t a = 1; a < kp; a++)
          for (int32_t b = a; b > 0 && kpos[i][b - 1] > kpos[i][b]; b--) {
            int32_t t = kpos[i][b];
            kpos[i][b] = kpos[i][b - 1];
            kpos[i][b - 1] = t;
          }
      }
      pk[i] = test_xmalloc((size_t)(kp + 1) * D * sizeof(float));
      pv[i] = test_xmalloc((size_t)(kp + 1) * D * sizeof(float));
      for (int64_t e = 0; e < (int64_t)kp * D; e++) {
        pk[i][e] = round_kv(kt, test_rng_unit(&rng));
        pv[i][e] = round_kv(kt, test_rng_unit(&rng));
      }
      int32_t nb = (kp + sp->n_q + B - 1) / B;
      total_blocks += nb;
      if (nb + 1 > stride) stride = nb + 1; /* one unused column: -1, never read */
    }
    free(pool);
  }
  const int32_t cap = stride * B;

  /* a shuffled arena: the last id is the poison block */
  const int32_t n_arena = total_blocks + 4;
  int32_t *ids = test_xmalloc((size_t)n_arena * sizeof *ids);
  for (int32_t b = 0; b < n_arena; b++) ids[b] = b;
  for (int32_t b = n_arena - 1; b > 0; b--) {
    int32_t j = rng_int(&rng, b + 1), t = ids[b];
    ids[b] = ids[j];
    ids[j] = t;
  }
  const int32_t poison = ids[n_arena - 1];
  /* tables [S][L][HA][stride], lengths [S][L][HA] (after the step) */
  int32_t *tables = test_xmalloc((size_t)S * L * HA * stride * sizeof *tables);
  int32_t *ctx = test_xmalloc((size_t)S * L * HA * sizeof *ctx);
  int32_t next = 0;
  for (int32_t s = 0; s < S; s++)
    for (int32_t l = 0; l < L; l++)
      for (int32_t ha = 0; ha < HA; ha++) {
        int32_t *row = tables + (((int64_t)s * L + l) * HA + ha) * stride;
        int32_t *cx = ctx + ((int64_t)s * L + l) * HA + ha;
        if (l == LY && ha >= h0 && ha < h0 + H) {
          int32_t i = s * H + ha - h0, n = keep[i] + c->seqs[s].n_q, nb = (n + B - 1) / B;
          for (int32_t b = 0; b < stride; b++) row[b] = b < nb ? ids[next++] + first_block : -1;
          *cx = n;
        } else {
          for (int32_t b = 0; b < stride; b++) row[b] = poison + first_block;
          *cx = B < 3 ? B : 3;
        }
      }
  CHECK_INT_EQ(next, total_blocks);

  /* both arenas: NaN K/V, position 0, then a score pattern once filled */
  side_t sd[2] = {{g_cpu, {0}, NULL, NULL}, {gpu, {0}, NULL, NULL}};
  const int64_t n_slots = (int64_t)n_arena * B;
  for (int k = 0; k < 2; k++) {
    CHECK_INT_EQ(kv_arena_init(&sd[k].kv, sd[k].be, n_arena, B, D), 0);
    sd[k].kv.first_block = first_block;
    sd[k].mass = test_xmalloc((size_t)S * sizeof(float *));
    sd[k].last = test_xmalloc((size_t)S * sizeof(float *));
  }
  {
    size_t el = k_dtype_bytes(kt);
    uint8_t *nan = test_xmalloc((size_t)n_slots * D * el);
    for (int64_t e = 0; e < n_slots * D; e++) {
      uint16_t x = kt == K_F16 ? 0x7e00 : 0x7fc0;
      memcpy(nan + e * el, &x, el);
    }
    CHECK_INT_EQ(gpu->ops->upload(gpu, sd[1].kv.k, nan, (size_t)n_slots * D * el), 0);
    CHECK_INT_EQ(gpu->ops->upload(gpu, sd[1].kv.v, nan, (size_t)n_slots * D * el), 0);
    free(nan);
    for (int64_t e = 0; e < n_slots * D; e++) sd[0].kv.k[e] = sd[0].kv.v[e] = NAN;
    int32_t *zero = calloc((size_t)n_slots, sizeof(int32_t));
    CHECK(zero);
    CHECK_INT_EQ(gpu->ops->upload(gpu, sd[1].kv.pos, zero, (size_t)n_slots * 4), 0);
    memcpy(sd[0].kv.pos, zero, (size_t)n_slots * 4);
    free(zero);
  }

  /* the kept prefixes, one kv_write per (sequence, head) on each backend */
  for (int32_t s = 0; s < S; s++)
    for (int32_t h = 0; h < H; h++) {
      int32_t i = s * H + h;
      if (keep[i] == 0) continue;
      int32_t *fctx = test_xmalloc((size_t)L * HA * sizeof *fctx);
      memcpy(fctx, ctx + (int64_t)s * L * HA, (size_t)L * HA * sizeof *fctx);
      fctx[LY * HA + h0 + h] = keep[i];
      k_seq_kv_t view = {tables + (int64_t)s * L * HA * stride, fctx, stride, 0, NULL, NULL, 1};
      const int32_t qs[2] = {0, keep[i]};
      for (int k = 0; k < 2; k++) {
        k_backend_t *be = sd[k].be;
        size_t kb = (size_t)keep[i] * D * sizeof(float);
        float *dk = k ? dev_copy(be, pk[i], kb) : pk[i], *dv = k ? dev_copy(be, pv[i], kb) : pv[i];
        int32_t *dp = k ? dev_copy(be, kpos[i], (size_t)keep[i] * 4) : kpos[i];
        k_attn_args_t fa = {.n_seqs = 1, .layer = LY, .n_q_heads = 0, .n_kv_heads = 1,
                            .head_dim = D, .kv_head0 = h0 + h, .kv_heads_all = HA,
                            .q_start = qs, .q_pos = dp, .seqs = &view};
        CHECK_INT_EQ(be->ops->kv_write(be, &sd[k].kv, dk, dv, &fa), 0);
        if (k) {
          CHECK_INT_EQ(be->ops->sync(be), 0);
          dev_free(be, dk);
          dev_free(be, dv);
          dev_free(be, dp);
        }
      }
      free(fctx);
    }
  float *score0 = test_xmalloc((size_t)n_slots * sizeof *score0);
  for (int64_t t = 0; t < n_slots; t++) score0[t] = (float)(t % 7) * 0.25f;
  memcpy(sd[0].kv.score, score0, (size_t)n_slots * sizeof *score0);
  CHECK_INT_EQ(gpu->ops->upload(gpu, sd[1].kv.score, score0, (size_t)n_slots * sizeof *score0), 0);

  /* the step: rows, new K/V, queries */
  int32_t *q_start = test_xmalloc((size_t)(S + 1) * sizeof *q_start);
  q_start[0] = 0;
  for (int32_t s = 0; s < S; s++) q_start[s + 1] = q_start[s] + c->seqs[s].n_q;
  const int32_t T = q_start[S];
  int32_t *q_pos = test_xmalloc((size_t)(T + 1) * sizeof *q_pos);
  for (int32_t s = 0; s < S; s++)
    for (int32_t r = 0; r < c->seqs[s].n_q; r++) q_pos[q_start[s] + r] = c->seqs[s].prefix + r;
  const size_t nkv = (size_t)T * H * D, nq = (size_t)T * QH * D;
  float *kn = test_xmalloc((nkv + 1) * sizeof(float)), *vn = test_xmalloc((nkv + 1) * sizeof(float));
  for (size_t e = 0; e < nkv; e++) {
    kn[e] = round_kv(kt, test_rng_unit(&rng));
    vn[e] = round_kv(kt, test_rng_unit(&rng));
  }
  float *q = test_xmalloc((nq + 1) * sizeof(float));
  for (size_t e = 0; e < nq; e++) q[e] = test_rng_unit(&rng) * c->q_gain;
  const size_t n_mass = (size_t)L * HA * cap, n_last = (size_t)L * HA * G * cap;
  float *mass0 = test_xmalloc(n_mass * sizeof(float)), *last0 = test_xmalloc(n_last * sizeof(float));
  for (size_t e = 0; e < n_mass; e++) mass0[e] = 0.5f;
  for (size_t e = 0; e < n_last; e++) last0[e] = NAN;

  float *out[2];
  for (int k = 0; k < 2; k++) {
    k_backend_t *be = sd[k].be;
    k_seq_kv_t *views = test_xmalloc((size_t)S * sizeof *views);
    for (int32_t s = 0; s < S; s++) {
      const seq_spec_t *sp = &c->seqs[s];
      sd[k].mass[s] = sd[k].last[s] = NULL;
      if (sp->n_obs > 0 && sp->mass) sd[k].mass[s] = dev_copy(be, mass0, n_mass * sizeof(float));
      if (sp->n_obs > 0 && sp->last) sd[k].last[s] = dev_copy(be, last0, n_last * sizeof(float));
      views[s] = (k_seq_kv_t){tables + (int64_t)s * L * HA * stride, ctx + (int64_t)s * L * HA,
                              stride, sp->n_obs, sd[k].mass[s], sd[k].last[s],
                              c->obs_pool > 0 ? c->obs_pool : 1};
    }
    float *dq = k ? dev_copy(be, q, nq * sizeof(float)) : q;
    float *dk = k ? dev_copy(be, kn, nkv * sizeof(float)) : kn;
    float *dv = k ? dev_copy(be, vn, nkv * sizeof(float)) : vn;
    int32_t *dp = k ? dev_copy(be, q_pos, (size_t)T * 4) : q_pos;
    float *dout = be->ops->alloc(be, (nq + 1) * sizeof(float));
    CHECK(dout);
    k_attn_args_t a = {.n_seqs = S, .layer = LY, .n_q_heads = QH, .n_kv_heads = H,
                       .head_dim = D, .kv_head0 = h0, .kv_heads_all = c->kv_heads_all,
                       .scale = 1.0f / sqrtf((float)D), .q = dq, .out = dout,
                       .q_start = q_start, .q_pos = dp, .seqs = views};
    if (k && c->prepare) CHECK_INT_EQ(be->ops->attn_prepare(be, &a), 0);
    CHECK_INT_EQ(be->ops->kv_write(be, &sd[k].kv, dk, dv, &a), 0);
    CHECK_INT_EQ(be->ops->attention(be, &sd[k].kv, &a), 0);
    out[k] = test_xmalloc((nq + 1) * sizeof(float));
    CHECK_INT_EQ(be->ops->download(be, out[k], dout, nq * sizeof(float)), 0);
    CHECK_INT_EQ(be->ops->sync(be), 0);
    if (k) {
      dev_free(be, dq);
      dev_free(be, dk);
      dev_free(be, dv);
      dev_free(be, dp);
    }
    dev_free(be, dout);
    free(views);
  }

  /* outputs */
  for (size_t e = 0; e < nq; e++) check_close("out", c->name, e, out[1][e], out[0][e], g_tol_out);

  /* the arena: positions and K/V of every slot in use, scores of all */
  {
    const size_t el = k_dtype_bytes(kt);
    uint8_t *gk = test_xmalloc((size_t)n_slots * D * el), *gv = test_xmalloc((size_t)n_slots * D * el);
    int32_t *gp = test_xmalloc((size_t)n_slots * 4);
    float *gs = test_xmalloc((size_t)n_slots * 4);
    CHECK_INT_EQ(gpu->ops->download(gpu, gk, sd[1].kv.k, (size_t)n_slots * D * el), 0);
    CHECK_INT_EQ(gpu->ops->download(gpu, gv, sd[1].kv.v, (size_t)n_slots * D * el), 0);
    CHECK_INT_EQ(gpu->ops->download(gpu, gp, sd[1].kv.pos, (size_t)n_slots * 4), 0);
    CHECK_INT_EQ(gpu->ops->download(gpu, gs, sd[1].kv.score, (size_t)n_slots * 4), 0);
    bool *scored = calloc((size_t)n_slots, 1);
    CHECK(scored);
    for (int32_t s = 0; s < S; s++)
      for (int32_t h = 0; h < H; h++) {
        const int32_t *row = tables + (((int64_t)s * L + LY) * HA + h0 + h) * stride;
        const int32_t n = ctx[((int64_t)s * L + LY) * HA + h0 + h];
        for (int32_t t = 0; t < n; t++) {
          int64_t sl = (int64_t)(row[t / B] - first_block) * B + t % B;
          scored[sl] = c->seqs[s].n_obs != 0 && c->seqs[s].n_q > 0;
          if (gp[sl] != sd[0].kv.pos[sl])
            FAIL_AT("%s: slot %lld position %d vs cpu %d", c->name, (long long)sl, gp[sl],
                    sd[0].kv.pos[sl]);
          for (int32_t d = 0; d < D; d++) {
            uint16_t xk, xv;
            memcpy(&xk, gk + ((size_t)sl * D + d) * el, 2);
            memcpy(&xv, gv + ((size_t)sl * D + d) * el, 2);
            float fk = kt == K_F16 ? model_f16_to_f32(xk) : model_bf16_to_f32(xk);
            float fv = kt == K_F16 ? model_f16_to_f32(xv) : model_bf16_to_f32(xv);
            if (!same_bits(fk, sd[0].kv.k[sl * D + d]) || !same_bits(fv, sd[0].kv.v[sl * D + d]))
              FAIL_AT("%s: slot %lld dim %d K/V %g %g vs cpu %g %g", c->name, (long long)sl, d,
                      fk, fv, sd[0].kv.k[sl * D + d], sd[0].kv.v[sl * D + d]);
          }
        }
      }
    for (int64_t t = 0; t < n_slots; t++) {
      if (scored[t])
        check_close("score", c->name, (size_t)t, gs[t], sd[0].kv.score[t], g_tol_score);
      else if (!same_bits(gs[t], sd[0].kv.score[t]))
        FAIL_AT("%s: unscored slot %lld: gpu %.9g vs cpu %.9g", c->name, (long long)t, gs[t],
                sd[0].kv.score[t]);
    }
    free(scored);
    free(gk);
    free(gv);
    free(gp);
    free(gs);
  }

  /* obs_mass and obs_last: the local heads' slots in use within tolerance,
   * every other entry untouched */
  for (int32_t s = 0; s < S; s++) {
    const int32_t *cx = ctx + (int64_t)s * L * HA;
    if (sd[1].mass[s]) {
      float *gm = test_xmalloc(n_mass * sizeof(float));
      CHECK_INT_EQ(gpu->ops->download(gpu, gm, sd[1].mass[s], n_mass * sizeof(float)), 0);
      for (size_t e = 0; e < n_mass; e++) {
        int32_t row = (int32_t)(e / cap), k = (int32_t)(e % cap), l = row / HA, ha = row % HA;
        if (l == LY && ha >= h0 && ha < h0 + H && k < cx[l * HA + ha])
          check_close("obs_mass", c->name, e, gm[e], sd[0].mass[s][e], g_tol_score);
        else if (!same_bits(gm[e], sd[0].mass[s][e]))
          FAIL_AT("%s: obs_mass[%zu] %.9g, cpu %.9g (not in use)", c->name, e, gm[e],
                  sd[0].mass[s][e]);
      }
      free(gm);
    }
    if (sd[1].last[s]) {
      float *gl = test_xmalloc(n_last * sizeof(float));
      CHECK_INT_EQ(gpu->ops->download(gpu, gl, sd[1].last[s], n_last * sizeof(float)), 0);
      for (size_t e = 0; e < n_last; e++) {
        int32_t row = (int32_t)(e / cap) / G, k = (int32_t)(e % cap), l = row / HA, ha = row % HA;
        if (l == LY && ha >= h0 && ha < h0 + H && k < cx[l * HA + ha])
          check_close("obs_last", c->name, e, gl[e], sd[0].last[s][e], g_tol_score);
        else if (!same_bits(gl[e], sd[0].last[s][e]))
          FAIL_AT("%s: obs_last[%zu] %.9g, cpu %.9g (not in use)", c->name, e, gl[e],
                  sd[0].last[s][e]);
      }
      free(gl);
    }
  }
  fprintf(stderr, "   %s: %d rows, %d seqs, ok\n", c->name, T, S);

  for (int k = 0; k < 2; k++) side_free(&sd[k], S);
  free(out[0]);
  free(out[1]);
  free(mass0);
  free(last0);
  free(q);
  free(kn);
  free(vn);
  free(q_pos);
  free(q_start);
  free(score0);
  free(tables);
  free(ctx);
  free(ids);
  for (int32_t i = 0; i < S * H; i++) {
    free(kpos[i]);
    free(pk[i]);
    free(pv[i]);
  }
  free(kpos);
  free(pk);
  free(pv);
  free(keep);
}

static void run_case(const attn_case_t *c) { run_case_at(c, 0); }

/* A decode batch: 8 sequences with one row each, contexts from 1 to 3000
 * (the long ones split over several CTAs), ragged heads, scores on some. */
static void decode_batch(const char *name, int32_t QH, int32_t H, int32_t D, uint64_t seed,
                         bool prepare) {
  static const int32_t prefix[8] = {0, 2999, 1, 2047, 700, 2500, 33, 1500};
  seq_spec_t seqs[8];
  uint64_t rng = seed;
  for (int s = 0; s < 8; s++) {
    memset(&seqs[s], 0, sizeof seqs[s]);
    seqs[s].prefix = prefix[s];
    seqs[s].n_q = 1;
    for (int h = 0; h < MAX_HA; h++)
      seqs[s].keep[h] = s % 3 == 0 ? -1 : rng_int(&rng, prefix[s] + 1);
    seqs[s].n_obs = s % 2 ? -1 : 0;
  }
  attn_case_t c = {name, QH, H, D, 16, 0, 0, 1, 0, 8, seqs, 1.0f, seed, false, 1, prepare, false};
  run_case(&c);
}

static void test_decode(void) {
  decode_batch("decode g4 d128", 8, 2, 128, 1000, true);
  decode_batch("decode g4 d128 unprepared", 8, 2, 128, 1001, false);
  decode_batch("decode g3 d64", 9, 3, 64, 1002, true);
  decode_batch("decode g4 d64", 8, 2, 64, 1003, true);
  decode_batch("decode g1 d256", 2, 2, 256, 1004, true);
  decode_batch("decode g8 d256", 8, 1, 256, 1005, true);
  decode_batch("decode g16 d128", 16, 1, 128, 1006, true);
  decode_batch("decode g4 d80", 8, 2, 80, 1007, true); /* head_dim padded to 128 */
}

/* Several rows per sequence on the decode path (rows * G <= 16), slots in
 * position order, peaky softmax. */
static void test_decode_rows(void) {
  /* seq 4: heads of 13 + 4 and 29 + 4 keys: the last chunk of keys holds
   * only the last row's key, which the earlier rows do not see */
  static const seq_spec_t seqs[] = {
      {900, 2, {-1, 400}, -1, false, false},
      {40, 4, {3, 0}, 0, false, false},
      {1200, 3, {1000, -1}, 2, true, true},
      {0, 2, {0, 0}, -1, false, false},
      {100, 4, {13, 29}, -1, false, false},
  };
  attn_case_t c = {"decode rows", 8, 2, 128, 16, 0, 0, 1, 0, 5, seqs, 4.0f, 1100, true, 7, true,
                   false};
  run_case(&c);
  c.name = "decode rows, shuffled slots, blocks of 8";
  c.sorted_slots = false;
  c.block_size = 8;
  c.seed = 1101;
  run_case(&c);
  c.name = "decode rows d64, blocks of 32";
  c.head_dim = 64;
  c.block_size = 32;
  c.seed = 1102;
  run_case(&c);
}

/* Prefill chunks after cached prefixes: scored windows inside a chunk, a
 * window longer than the chunk, pooling 7 and 1, a whole-prompt window. */
static void test_prefill(void) {
  static const seq_spec_t seqs[] = {
      {500, 40, {-1, 120}, 32, true, true},
      {0, 100, {0, 0}, 0, false, false},
      {1200, 17, {700, -1}, 64, true, false},
      {300, 70, {0, 299}, -1, false, false},
  };
  attn_case_t c = {"prefill pool 7", 8, 2, 128, 16, 0, 0, 2, 1, 4, seqs, 1.5f, 1200, false, 7,
                   true, false};
  run_case(&c);
  c.name = "prefill pool 1";
  c.obs_pool = 1;
  c.seed = 1201;
  run_case(&c);
  static const seq_spec_t whole[] = {{0, 300, {0, 0, 0}, 300, true, true},
                                     {64, 150, {-1, 10, 64}, 150, true, true}};
  attn_case_t w = {"whole-prompt windows", 12, 3, 64, 16, 0, 0, 1, 0, 2, whole, 1.0f, 1202,
                   false, 7, true, false};
  run_case(&w);
  /* one long chunk after 8 cached keys, its keys split in two: the second
   * part starts inside a tile of rows, whose first rows see none of it */
  static const seq_spec_t split[] = {{8, 600, {-1, -1}, 32, true, true}};
  attn_case_t sp = {"prefill split inside the rows", 8, 2, 128, 16, 0, 0, 1, 0, 1, split, 1.0f,
                    1204, false, 7, true, false};
  run_case(&sp);
  static const seq_spec_t big[] = {{2000, 200, {-1}, 32, true, true}};
  attn_case_t b = {"prefill g16 d256", 16, 1, 256, 32, 0, 0, 1, 0, 1, big, 1.0f, 1203, false, 5,
                   true, false};
  run_case(&b);
}

/* Decode, prefill and multi-row decode in one call, a sequence with no
 * rows, every score mode. */
static void test_mixed(void) {
  static const seq_spec_t seqs[] = {
      {2600, 1, {-1, 100, 2600, 5}, -1, false, false},
      {0, 0, {0, 0, 0, 0}, -1, false, false},
      {150, 60, {-1, 20, 0, 149}, 16, true, true},
      {33, 1, {4, 33, 0, 12}, 0, false, false},
      {700, 2, {-1, -1, 300, 2}, 2, true, false},
      {10, 130, {10, 0, 5, 1}, 130, false, true},
      {1800, 1, {1799, 900, 450, 1}, -1, false, false},
  };
  attn_case_t c = {"mixed", 16, 4, 128, 16, 0, 0, 1, 0, 7, seqs, 2.0f, 1300, false, 7, true,
                   false};
  run_case(&c);
  c.name = "mixed, unprepared";
  c.prepare = false;
  c.seed = 1301;
  run_case(&c);
}

/* Tensor parallelism: this rank computes KV heads 1 and 2 of 3, at layer 2
 * of 3; the tables, lengths and obs buffers have all heads. */
static void test_tensor_parallel(void) {
  static const seq_spec_t seqs[] = {
      {1000, 1, {-1, 300}, -1, false, false},
      {200, 50, {100, -1}, 20, true, true},
      {60, 3, {60, 1}, 3, true, true},
  };
  attn_case_t c = {"tensor parallel", 8, 2, 128, 16, 1, 3, 3, 2, 3, seqs, 1.0f, 1400, false, 7,
                   true, false};
  run_case(&c);
  /* the rank's own arena: the pool's ids from 5,000 on (kernels/backend.h) */
  c.name = "tensor parallel, a part of the pool";
  run_case_at(&c, 5000);
}

/* The fp16 KV arena. */
static void test_f16(void) {
  static const seq_spec_t seqs[] = {
      {1500, 1, {-1, 700}, -1, false, false},
      {400, 45, {-1, 50}, 16, true, true},
  };
  attn_case_t c = {"fp16 kv", 8, 2, 128, 16, 0, 0, 1, 0, 2, seqs, 1.0f, 1500, false, 7, true,
                   true};
  run_case(&c);
}

/* Blocks of one slot (each key its own block; splits bounded by the block
 * ids a CTA holds) and of 64 slots. */
static void test_block_sizes(void) {
  static const seq_spec_t seqs[] = {
      {700, 1, {-1, 300}, -1, false, false},
      {90, 30, {-1, 7}, 10, true, true},
      {20, 3, {5, 20}, 0, false, false},
  };
  attn_case_t c = {"blocks of 1", 8, 2, 64, 1, 0, 0, 1, 0, 3, seqs, 1.0f, 1700, false, 7, true,
                   false};
  run_case(&c);
  c.name = "blocks of 64";
  c.block_size = 64;
  c.head_dim = 128;
  c.seed = 1701;
  run_case(&c);
}

/* A large decode batch (more CTAs than the device runs at once). */
static void test_many(void) {
  enum { S = 96 };
  seq_spec_t *seqs = test_xmalloc(S * sizeof *seqs);
  uint64_t rng = 1600;
  for (int s = 0; s < S; s++) {
    memset(&seqs[s], 0, sizeof seqs[s]);
    seqs[s].prefix = rng_int(&rng, 1200);
    seqs[s].n_q = s % 16 == 0 ? 9 : 1;
    for (int h = 0; h < 2; h++) seqs[s].keep[h] = rng_int(&rng, seqs[s].prefix + 1);
    seqs[s].n_obs = s % 16 == 0 ? 4 : s % 3 == 0 ? -1 : 0;
    seqs[s].mass = seqs[s].last = s % 32 == 0;
  }
  attn_case_t c = {"many", 8, 2, 128, 16, 0, 0, 1, 0, S, seqs, 1.0f, 1601, false, 7, true, false};
  run_case(&c);
  free(seqs);
}

static void test_bad_args(void) {
  k_backend_t *be = g_gpu;
  k_kv_arena_t kv;
  CHECK_INT_EQ(kv_arena_init(&kv, be, 4, 16, 64), 0);
  float *q = be->ops->alloc(be, 64 * 4 * sizeof(float)), *out = be->ops->alloc(be, 64 * 4 * sizeof(float));
  int32_t *qp = be->ops->alloc(be, 4 * sizeof(int32_t));
  CHECK(q && out && qp);
  const int32_t zeros[4] = {0, 0, 0, 0};
  CHECK_INT_EQ(be->ops->upload(be, q, (float[256]){0}, 256 * sizeof(float)), 0);
  CHECK_INT_EQ(be->ops->upload(be, qp, zeros, sizeof zeros), 0);
  const int32_t q_start[2] = {0, 1}, table[2] = {2, -1}, ctx[1] = {1};
  k_seq_kv_t view = {table, ctx, 2, 0, NULL, NULL, 1};
  k_attn_args_t a = {.n_seqs = 1, .n_q_heads = 1, .n_kv_heads = 1, .head_dim = 64,
                     .scale = 0.125f, .q = q, .out = out, .q_start = q_start, .q_pos = qp,
                     .seqs = &view};
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q, q, &a), 0);
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), 0);
  a.n_q_heads = 3;
  a.n_kv_heads = 2; /* not a multiple */
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  a.n_q_heads = 17;
  a.n_kv_heads = 1; /* group too large */
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  a.n_q_heads = 1;
  a.head_dim = 32; /* not the arena's */
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  a.head_dim = 64;
  const int32_t bad_table[2] = {4, -1}; /* past the arena */
  view.blocks = bad_table;
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q, q, &a), -EINVAL);
  view.blocks = table;
  const int32_t short_ctx[1] = {0}; /* fewer slots than rows */
  view.ctx = short_ctx;
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q, q, &a), -EINVAL);
  view.ctx = ctx;
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q + 1, q, &a), -EINVAL); /* misaligned */
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), 0);
  a.n_seqs = 0;
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), 0);
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q, q, &a), 0);
  kv_arena_destroy(&kv, be);
  CHECK_INT_EQ(kv_arena_init(&kv, be, 4, 16, 264), 0); /* head too large */
  a.n_seqs = 1;
  a.head_dim = 264;
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  kv_arena_destroy(&kv, be);
  CHECK_INT_EQ(kv_arena_init(&kv, be, 4, 16, 60), 0); /* not a multiple of 8 */
  a.head_dim = 60;
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  CHECK_INT_EQ(be->ops->kv_write(be, &kv, q, q, &a), -EINVAL);
  kv_arena_destroy(&kv, be);
  CHECK_INT_EQ(kv_arena_init(&kv, be, 4, 12, 64), 0); /* block size not a power of two */
  a.head_dim = 64;
  CHECK_INT_EQ(be->ops->attention(be, &kv, &a), -EINVAL);
  kv_arena_destroy(&kv, be);
  CHECK_INT_EQ(be->ops->sync(be), 0);
  be->ops->free(be, q);
  be->ops->free(be, out);
  be->ops->free(be, qp);
}

int main(void) {
  char err[256];
  int rc = gpu_test_open("test-cuda-attn", &g_gpu);
  if (rc) return rc;
  CHECK_INT_EQ(k_cuda_backend_new_opts(&g_gpu16, 0, K_F16, err, sizeof err), 0);
  CHECK_INT_EQ(k_cpu_backend_new(&g_cpu, 0), 0);
  g_cpu->numerics = K_NUMERICS_EXACT;
  const char *pre = getenv("PRESSD_CUDA_PREFILL");
  if (pre && !strcmp(pre, "mma")) {
    g_tol_out = g_tol_score = 1e-2;
    fprintf(stderr, "prefill on tensor cores: tolerance %g\n", g_tol_out);
  }
  RUN(test_decode);
  RUN(test_decode_rows);
  RUN(test_prefill);
  RUN(test_mixed);
  RUN(test_tensor_parallel);
  RUN(test_f16);
  RUN(test_block_sizes);
  RUN(test_many);
  RUN(test_bad_args);
  CHECK_INT_EQ(k_cuda_error_string(g_gpu, err, sizeof err), 0);
  k_backend_free(g_gpu);
  k_backend_free(g_gpu16);
  k_backend_free(g_cpu);
  return 0;
}
