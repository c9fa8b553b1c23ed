/* The KV compression planner (ALGORITHMS.md §2-§4).
 *
 * Every (layer, KV head) ranks its evictable slots once: a 32-bit rank key
 * (score, position or a seeded hash, in an order-preserving encoding) above
 * the logical slot index, sorted ascending, so ties go to the lower slot.
 * Never-evictable slots (sinks, protected window, score +inf or NaN) are
 * left out of the ranking: a block whose cost would be one of them is past
 * the head's nmax and is never taken.
 *
 * Freeing the head's n-th block costs the key at sorted index
 * (n-1)*B + hang - 1. The policies differ only in which heads they merge
 * (all, or one layer at a time), how many blocks they take and when they
 * stop; the merge is a binary heap of (cost << 32 | head) over the heads'
 * monotone cost lists, so ties are broken by (cost, head, n). */
#include "paged/compress.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define KEY_HI 0xFFFFFFFF00000000ull

typedef enum rank_by { RANK_SCORE, RANK_POS, RANK_RANDOM } rank_by_t;

/* The planner's working state, carved out of pl->scratch. */
typedef struct plan_ctx {
  const kv_seq_t *seq; /* borrows */
  int32_t L, H, B, G, LH;
  uint64_t *keys;  /* view: per head, sorted (rank key << 32 | logical slot), evictable only */
  int64_t *off;    /* view: [LH] start of each head's keys */
  int32_t *hang;   /* view: [LH] fill of the last block (B when full) */
  int32_t *full;   /* view: [LH] ceil(ctx / B) */
  int32_t *nev;    /* view: [LH] evictable slots */
  int32_t *nmax;   /* view: [LH] blocks the head can free */
  int32_t *cnt;    /* view: [LH] blocks the plan frees */
  int32_t *cap;    /* view: [LH] DBudgetKV's per-head limit */
  uint64_t *heap;  /* view: [LH] */
  int32_t heap_n;
  uint64_t *tmp;   /* view: [threads][max ctx] sort buffers, one per thread */
  uint64_t *work;  /* view: [max ctx] */
  size_t max_ctx;
  uint8_t *mark;   /* view: [max ctx] */
  int64_t *quota;  /* view: [L] blocks each layer may keep */
  double *lbud;    /* view: [L] ZigZagKV tokens per head of each layer */
  uint8_t *fixed;  /* view: [L] */
  double *s, *s_new; /* view: [H * G], [G] DBudgetKV kept a^2 per query head */
} plan_ctx_t;

void kv_compress_params_default(kv_compress_params_t *p) {
  memset(p, 0, sizeof *p);
  p->policy = KV_POLICY_KVCOMPRESS;
  p->layer_budget = KV_LAYER_GLOBAL;
  p->ratio = 0.0;
  p->max_cache_tokens = 0;
  p->min_tokens = 128;
  p->protected_window = 32;
  p->sinks = 4;
  p->dbudget_threshold = 0.01f;
  p->dbudget_mass = true;
  p->zigzag_tau = 0.9f;
  p->zigzag_bound = 0.2f;
  p->seed = 0;
  p->per_query = false;
}

void kv_compress_plan_init(kv_compress_plan_t *pl) { memset(pl, 0, sizeof *pl); }

void kv_compress_plan_destroy(kv_compress_plan_t *pl) {
  if (!pl) return;
  free(pl->evict);
  free(pl->src);
  free(pl->dst);
  free(pl->scratch);
  memset(pl, 0, sizeof *pl);
}

static bool has_budget(const kv_compress_params_t *p) {
  return p->max_cache_tokens > 0 || p->ratio >= 1.0;
}

int32_t kv_compress_budget_tokens(const kv_compress_params_t *p, int32_t n, int32_t block_size) {
  if (p->max_cache_tokens > 0) return p->max_cache_tokens;
  /* ratio 1 keeps everything (the reference's formula would drop a block
   * of every head) */
  if (!(p->ratio > 1.0) || block_size <= 0) return n;
  int64_t t = (int64_t)floor((double)n / p->ratio) - 1;
  int64_t blocks = t >= 0 ? t / block_size : -((-t + block_size - 1) / block_size);
  int64_t tok = blocks * block_size;
  if (tok < p->min_tokens) tok = p->min_tokens;
  return tok > INT32_MAX ? INT32_MAX : (int32_t)tok;
}

/* ---- ranking ------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Order-preserving: a < b as floats iff float_key(a) < float_key(b). */
static uint32_t float_key(float f) {
  if (f == 0.0f) return 0x80000000u; /* -0 == +0 */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

/* Ascending by the full 64 bits; a stable LSD radix sort on the high 32
 * bits, which is the same order when the input is in ascending low bits. */
static void sort_keys(uint64_t *a, uint64_t *tmp, int32_t n) {
  if (n < 64) {
    for (int32_t i = 1; i < n; i++) {
      uint64_t x = a[i];
      int32_t j = i;
      for (; j > 0 && a[j - 1] > x; j--) a[j] = a[j - 1];
      a[j] = x;
    }
    return;
  }
  uint32_t hist[4][256];
  memset(hist, 0, sizeof hist);
  for (int32_t i = 0; i < n; i++) {
    uint32_t k = (uint32_t)(a[i] >> 32);
    hist[0][k & 255]++;
    hist[1][(k >> 8) & 255]++;
    hist[2][(k >> 16) & 255]++;
    hist[3][k >> 24]++;
  }
  uint64_t *src = a, *dst = tmp;
  for (int d = 0; d < 4; d++) {
    int shift = 32 + 8 * d;
    if (hist[d][(src[0] >> shift) & 255] == (uint32_t)n) continue; /* one bucket */
    uint32_t sum = 0;
    for (int b = 0; b < 256; b++) {
      uint32_t c = hist[d][b];
      hist[d][b] = sum;
      sum += c;
    }
    for (int32_t i = 0; i < n; i++) dst[hist[d][(src[i] >> shift) & 255]++] = src[i];
    uint64_t *t = src;
    src = dst;
    dst = t;
  }
  if (src != a) memcpy(a, src, (size_t)n * sizeof *a);
}

/* Rank the evictable slots of head i (sorting through tmp, max_ctx
 * entries); sets nev, nmax. Heads are independent: any may run on any
 * thread. */
static void rank_head(plan_ctx_t *c, const kv_compress_params_t *prm,
                      const kv_compress_input_t *in, rank_by_t by, int32_t i, uint64_t *tmp) {
  const kv_seq_t *s = c->seq;
  const int32_t *table = s->blocks + (int64_t)i * s->max_blocks;
  int32_t ctx = s->ctx[i], B = c->B, e = 0;
  int64_t newest_kept = (int64_t)in->last_pos - prm->protected_window;
  uint64_t *k = c->keys + c->off[i];
  uint64_t head_seed = 0;
  if (by == RANK_RANDOM)
    head_seed = splitmix64(prm->seed ^ splitmix64(((uint64_t)(uint32_t)(i / c->H) << 32) |
                                                  (uint32_t)(i % c->H)));
  for (int32_t b = 0, j = 0; j < ctx; b++) {
    int32_t base = table[b] * B;
    for (int32_t o = 0; o < B && j < ctx; o++, j++) {
      int32_t slot = base + o, p = in->pos[slot];
      if ((int64_t)p > newest_kept || p < prm->sinks) continue;
      uint32_t key;
      if (by == RANK_SCORE) {
        float f = in->score[slot];
        if (!(f < INFINITY)) continue; /* +inf, NaN: never evicted */
        if (prm->per_query && prm->policy == KV_POLICY_KVCOMPRESS) /* old KVs were seen by more queries */
          f /= (float)((int64_t)in->last_pos + 1 - (p > in->obs_start ? p : in->obs_start));
        key = float_key(f);
      } else if (by == RANK_POS) {
        key = (uint32_t)p ^ 0x80000000u;
      } else {
        key = (uint32_t)(splitmix64(head_seed ^ (uint32_t)p) >> 32);
      }
      k[e++] = ((uint64_t)key << 32) | (uint32_t)j;
    }
  }
  sort_keys(k, tmp, e);
  c->nev[i] = e;
  int32_t hang = c->hang[i];
  c->nmax[i] = ctx > 0 && e >= hang ? (e - hang) / B + 1 : 0;
}

typedef struct rank_job {
  plan_ctx_t *c;
  const kv_compress_params_t *prm;
  const kv_compress_input_t *in;
  rank_by_t by;
} rank_job_t;

static void rank_one(void *arg, int64_t i, int32_t thread) {
  const rank_job_t *j = arg;
  rank_head(j->c, j->prm, j->in, j->by, (int32_t)i, j->c->tmp + (size_t)thread * j->c->max_ctx);
}

/* ---- merging the heads' cost lists --------------------------------------------- */

/* Heap entry of head i's next block (cnt[i] + 1). */
static uint64_t next_cost(const plan_ctx_t *c, const int32_t *cnt, int32_t i) {
  int64_t k = c->off[i] + (int64_t)cnt[i] * c->B + c->hang[i] - 1;
  return (c->keys[k] & KEY_HI) | (uint32_t)i;
}

static void sift_down(uint64_t *hp, int32_t n, int32_t k) {
  uint64_t x = hp[k];
  for (;;) {
    int32_t ch = 2 * k + 1;
    if (ch >= n) break;
    if (ch + 1 < n && hp[ch + 1] < hp[ch]) ch++;
    if (hp[ch] >= x) break;
    hp[k] = hp[ch];
    k = ch;
  }
  hp[k] = x;
}

/* Heads [i0, i1), each from its cnt[] up to its cap[]. */
static void merge_start(plan_ctx_t *c, int32_t i0, int32_t i1, const int32_t *cnt,
                        const int32_t *cap) {
  int32_t n = 0;
  for (int32_t i = i0; i < i1; i++)
    if (cnt[i] < cap[i]) c->heap[n++] = next_cost(c, cnt, i);
  c->heap_n = n;
  for (int32_t k = n / 2 - 1; k >= 0; k--) sift_down(c->heap, n, k);
}

/* The head whose next block is the cheapest, or -1. */
static int32_t merge_top(const plan_ctx_t *c) {
  return c->heap_n ? (int32_t)(uint32_t)c->heap[0] : -1;
}

static void merge_accept(plan_ctx_t *c, int32_t *cnt, const int32_t *cap) {
  int32_t i = merge_top(c);
  if (++cnt[i] < cap[i]) c->heap[0] = next_cost(c, cnt, i);
  else c->heap[0] = c->heap[--c->heap_n];
  if (c->heap_n) sift_down(c->heap, c->heap_n, 0);
}

/* Take up to want of the cheapest blocks of heads [i0, i1); returns how many. */
static int64_t merge_take(plan_ctx_t *c, int32_t i0, int32_t i1, int32_t *cnt,
                          const int32_t *cap, int64_t want) {
  if (want <= 0) return 0;
  merge_start(c, i0, i1, cnt, cap);
  int64_t n = 0;
  for (; n < want && merge_top(c) >= 0; n++) merge_accept(c, cnt, cap);
  return n;
}

/* ---- layer budgets --------------------------------------------------------------- */

static void uniform_quotas(plan_ctx_t *c, int32_t bt) {
  int64_t q = ((int64_t)bt * c->H + c->B - 1) / c->B;
  for (int32_t l = 0; l < c->L; l++) c->quota[l] = q;
}

/* ZigZagKV (§3): layer budgets from the minimum budget for tau of the
 * attention mass, floor B_bound, clamped to [protected window, n_tokens]. */
static void zigzag_quotas(plan_ctx_t *c, const kv_compress_params_t *prm,
                          const kv_compress_input_t *in, int32_t bt) {
  int32_t L = c->L, H = c->H;
  size_t span = (size_t)c->seq->max_blocks * (size_t)c->B;
  double lmba_sum = 0.0;
  for (int32_t l = 0; l < L; l++) {
    double mba_sum = 0.0;
    for (int32_t h = 0; h < H; h++) {
      int32_t i = l * H + h, ctx = c->seq->ctx[i];
      const float *m = in->obs_mass + (size_t)i * span;
      double total = 0.0;
      for (int32_t j = 0; j < ctx; j++) {
        float v = m[j] > 0.0f ? m[j] : 0.0f; /* NaN, negative: no mass */
        total += v;
        c->work[j] = ((uint64_t)~float_key(v) << 32) | (uint32_t)j; /* descending */
      }
      sort_keys(c->work, c->tmp, ctx);
      double cum = 0.0, lim = (double)prm->zigzag_tau * total;
      int32_t below = 0;
      for (int32_t k = 0; k < ctx; k++) {
        float v = m[(uint32_t)c->work[k]];
        cum += v > 0.0f ? v : 0.0f;
        if (cum < lim) below++;
      }
      mba_sum += 1.0 + below;
    }
    c->lbud[l] = mba_sum / H;
    lmba_sum += c->lbud[l];
  }
  double avg = bt, bound = (double)prm->zigzag_bound * avg, target = (double)L * avg;
  for (int32_t l = 0; l < L; l++) {
    c->lbud[l] = bound + (avg - bound) * L * (c->lbud[l] / lmba_sum);
    c->fixed[l] = 0;
  }
  double lo = prm->protected_window, hi = in->n_tokens;
  if (lo > hi) lo = hi;
  /* Clamp, then give what the clamped layers lost or gained to the others
   * in proportion; each round fixes at least one more layer. */
  for (int32_t round = 0; round <= L; round++) {
    bool clamped = false;
    for (int32_t l = 0; l < L; l++) {
      if (c->fixed[l]) continue;
      double v = c->lbud[l] < lo ? lo : c->lbud[l] > hi ? hi : c->lbud[l];
      if (v != c->lbud[l]) {
        c->lbud[l] = v;
        c->fixed[l] = 1;
        clamped = true;
      }
    }
    if (!clamped) break;
    double fixed_sum = 0.0, free_sum = 0.0;
    int32_t n_free = 0;
    for (int32_t l = 0; l < L; l++) {
      if (c->fixed[l]) {
        fixed_sum += c->lbud[l];
      } else {
        free_sum += c->lbud[l];
        n_free++;
      }
    }
    if (n_free == 0) break;
    double rest = target - fixed_sum;
    for (int32_t l = 0; l < L; l++)
      if (!c->fixed[l]) c->lbud[l] = free_sum > 0.0 ? c->lbud[l] * rest / free_sum : rest / n_free;
  }
  for (int32_t l = 0; l < L; l++) {
    double q = ceil(c->lbud[l] * H / c->B - 1e-9);
    c->quota[l] = q > 0.0 ? (int64_t)q : 0;
  }
}

/* Within each layer, the cheapest blocks until the layer keeps its quota. */
static void take_by_layer(plan_ctx_t *c, const int32_t *cap) {
  for (int32_t l = 0; l < c->L; l++) {
    int64_t full = 0;
    for (int32_t h = 0; h < c->H; h++) full += c->full[l * c->H + h] - c->cnt[l * c->H + h];
    merge_take(c, l * c->H, (l + 1) * c->H, c->cnt, cap, full - c->quota[l]);
  }
}

/* DBudgetKV's weight of entries [lo, hi) of a head's ranked keys k in one
 * query head's a^2 row: the sum of a^2, or with mass the sum of a. */
static double dbudget_sum(const float *a2, const uint64_t *k, int32_t lo, int32_t hi, bool mass) {
  double s = 0.0;
  for (int32_t e = lo; e < hi; e++) {
    float v = a2[(uint32_t)k[e]];
    s += v > 0.0f ? (mass ? sqrtf(v) : v) : 0.0f;
  }
  return s;
}

/* A query head's measure of the kept weight s: the norm sqrt(s), or the mass s. */
static double dbudget_measure(double s, bool mass) { return mass ? s : sqrt(s); }

/* DBudgetKV (§4): per layer, the blocks in cost order while the mean
 * sqrt(kept a^2) of the layer's query heads drops by at most the threshold;
 * with dbudget_mass, the mean kept attention mass (the sum of a = sqrt(a^2)).
 * Leaves each head's limit in cap[]. */
static void dbudget_caps(plan_ctx_t *c, const kv_compress_params_t *prm,
                         const kv_compress_input_t *in) {
  int32_t H = c->H, G = c->G, B = c->B, HG = H * G;
  size_t span = (size_t)c->seq->max_blocks * (size_t)B;
  double thr = prm->dbudget_threshold;
  const bool mass = prm->dbudget_mass;
  for (int32_t l = 0; l < c->L; l++) {
    double kept_sum = 0.0; /* over the layer's query heads: sqrt(sum a^2), or sum a */
    for (int32_t h = 0; h < H; h++) {
      int32_t i = l * H + h;
      const uint64_t *k = c->keys + c->off[i];
      c->cap[i] = 0;
      for (int32_t g = 0; g < G; g++) {
        const float *a2 = in->obs_last + ((size_t)i * G + g) * span;
        c->s[h * G + g] = dbudget_sum(a2, k, 0, c->nev[i], mass);
        kept_sum += dbudget_measure(c->s[h * G + g], mass);
      }
    }
    double base = kept_sum / HG;
    if (!(base > 0.0)) { /* no attention on evictable KVs: all may go */
      for (int32_t i = l * H; i < (l + 1) * H; i++) c->cap[i] = c->nmax[i];
      continue;
    }
    merge_start(c, l * H, (l + 1) * H, c->cap, c->nmax);
    int32_t i;
    while ((i = merge_top(c)) >= 0) {
      int32_t h = i - l * H, n = c->cap[i] + 1;
      int32_t lo = n == 1 ? 0 : (n - 2) * B + c->hang[i], hi = (n - 1) * B + c->hang[i];
      const uint64_t *k = c->keys + c->off[i];
      double next = kept_sum;
      for (int32_t g = 0; g < G; g++) {
        const float *a2 = in->obs_last + ((size_t)i * G + g) * span;
        double s = c->s[h * G + g] - dbudget_sum(a2, k, lo, hi, mass);
        c->s_new[g] = s > 0.0 ? s : 0.0;
        next += dbudget_measure(c->s_new[g], mass) - dbudget_measure(c->s[h * G + g], mass);
      }
      if (1.0 - next / HG / base > thr) break; /* this block would break the bound */
      memcpy(c->s + h * G, c->s_new, (size_t)G * sizeof *c->s_new);
      kept_sum = next;
      merge_accept(c, c->cap, c->nmax);
    }
  }
}

/* ---- the plan ------------------------------------------------------------------- */

static int validate(const kv_compress_params_t *prm, const kv_compress_input_t *in) {
  if (!prm || !in || !in->seq || !in->score || !in->pos) return -EINVAL;
  const kv_seq_t *s = in->seq;
  if (s->n_layers <= 0 || s->n_heads <= 0 || s->block_size <= 0 || s->max_blocks <= 0)
    return -EINVAL;
  if ((int64_t)s->n_layers * s->n_heads > INT32_MAX / 8) return -EINVAL;
  if (prm->policy < KV_POLICY_NONE || prm->policy > KV_POLICY_RANDOM) return -EINVAL;
  if (prm->layer_budget < KV_LAYER_GLOBAL || prm->layer_budget > KV_LAYER_ZIGZAG) return -EINVAL;
  if (prm->ratio < 0.0 || isnan(prm->ratio) || (prm->ratio > 0.0 && prm->ratio < 1.0))
    return -EINVAL;
  if (prm->max_cache_tokens < 0 || prm->min_tokens < 0 || prm->protected_window < 0 ||
      prm->sinks < 0)
    return -EINVAL;
  if (in->n_tokens < 0 || in->min_free_blocks < 0) return -EINVAL;
  if (prm->policy == KV_POLICY_DBUDGET) {
    if (!in->obs_last || in->group <= 0) return -EINVAL;
    if (!(prm->dbudget_threshold >= 0.0f)) return -EINVAL;
    if ((int64_t)s->n_heads * in->group > INT32_MAX / 8) return -EINVAL;
  }
  if (prm->layer_budget == KV_LAYER_ZIGZAG && in->obs_mass &&
      (!(prm->zigzag_tau >= 0.0f && prm->zigzag_tau <= 1.0f) || !(prm->zigzag_bound >= 0.0f)))
    return -EINVAL;
  int32_t LH = s->n_layers * s->n_heads;
  for (int32_t i = 0; i < LH; i++) {
    int32_t ctx = s->ctx[i], nb = s->n_blocks[i];
    if (ctx < 0 || nb < 0 || nb > s->max_blocks) return -EINVAL;
    if ((int64_t)nb * s->block_size < ctx) return -EINVAL;
  }
  return 0;
}

/* Carve the working state out of pl->scratch (grown when too small). */
static int ctx_init(plan_ctx_t *c, kv_compress_plan_t *pl, const kv_compress_input_t *in,
                    bool dbudget, int32_t threads) {
  const kv_seq_t *s = in->seq;
  memset(c, 0, sizeof *c);
  c->seq = s;
  c->L = s->n_layers;
  c->H = s->n_heads;
  c->B = s->block_size;
  c->G = dbudget ? in->group : 1;
  c->LH = c->L * c->H;
  size_t total_ctx = 0, max_ctx = 1;
  for (int32_t i = 0; i < c->LH; i++) {
    total_ctx += (size_t)s->ctx[i];
    if ((size_t)s->ctx[i] > max_ctx) max_ctx = (size_t)s->ctx[i];
  }
  size_t LH = (size_t)c->LH, L = (size_t)c->L, HG = (size_t)c->H * (size_t)c->G;
  size_t n8 = total_ctx + ((size_t)threads + 1) * max_ctx + 2 * LH + 2 * L + HG + (size_t)c->G;
  size_t n4 = 6 * LH;
  size_t n1 = max_ctx + L;
  size_t bytes = n8 * 8 + n4 * 4 + n1;
  if (bytes > pl->scratch_cap) {
    void *p = realloc(pl->scratch, bytes);
    if (!p) return -ENOMEM;
    pl->scratch = p;
    pl->scratch_cap = bytes;
  }
  if (LH > (size_t)pl->cap_heads) {
    int32_t *e = realloc(pl->evict, LH * sizeof *e);
    if (!e) return -ENOMEM;
    pl->evict = e;
    pl->cap_heads = c->LH;
  }
  char *p = pl->scratch;
#define CARVE(dst, n)                 \
  do {                                \
    (dst) = (void *)p;                \
    p += (size_t)(n) * sizeof *(dst); \
  } while (0)
  CARVE(c->keys, total_ctx);
  CARVE(c->tmp, (size_t)threads * max_ctx);
  CARVE(c->work, max_ctx);
  c->max_ctx = max_ctx;
  CARVE(c->off, LH);
  CARVE(c->heap, LH);
  CARVE(c->quota, L);
  CARVE(c->lbud, L);
  CARVE(c->s, HG);
  CARVE(c->s_new, c->G);
  CARVE(c->hang, LH);
  CARVE(c->full, LH);
  CARVE(c->nev, LH);
  CARVE(c->nmax, LH);
  CARVE(c->cnt, LH);
  CARVE(c->cap, LH);
  CARVE(c->mark, max_ctx);
  CARVE(c->fixed, L);
#undef CARVE
  assert((size_t)(p - (char *)pl->scratch) == bytes);
  int64_t off = 0;
  for (int32_t i = 0; i < c->LH; i++) {
    int32_t ctx = s->ctx[i], r = ctx % c->B;
    c->off[i] = off;
    off += ctx;
    c->full[i] = (ctx + c->B - 1) / c->B;
    c->hang[i] = r ? r : c->B;
    c->cnt[i] = 0;
    c->nev[i] = 0;
    c->nmax[i] = 0;
  }
  return 0;
}

/* The compaction moves of head i: the survivors at or past the new length
 * fill the evicted slots below it, the lowest first. */
static void plan_moves(kv_compress_plan_t *pl, plan_ctx_t *c, int32_t i, int32_t evict) {
  int32_t ctx = c->seq->ctx[i], keep = ctx - evict, B = c->B;
  const int32_t *table = c->seq->blocks + (int64_t)i * c->seq->max_blocks;
  const uint64_t *k = c->keys + c->off[i];
  memset(c->mark, 0, (size_t)ctx);
  for (int32_t e = 0; e < evict; e++) c->mark[(uint32_t)k[e]] = 1;
  int32_t d = 0;
  for (int32_t j = ctx - 1; j >= keep; j--) {
    if (c->mark[j]) continue;
    while (!c->mark[d]) d++;
    assert(d < keep);
    pl->src[pl->n_moves] = table[j / B] * B + j % B;
    pl->dst[pl->n_moves] = table[d / B] * B + d % B;
    pl->n_moves++;
    d++;
  }
}

static int64_t blocks_freed_now(const plan_ctx_t *c) {
  int64_t n = 0;
  for (int32_t i = 0; i < c->LH; i++) n += c->seq->n_blocks[i] - c->full[i] + c->cnt[i];
  return n;
}

static int32_t clamp32(int64_t x) { return x > INT32_MAX ? INT32_MAX : (int32_t)x; }

int kv_compress_plan(kv_compress_plan_t *pl, const kv_compress_params_t *prm_in,
                     const kv_compress_input_t *in) {
  /* ratio 1 keeps everything, whatever the policy (a per-head budget of n
   * tokens would still take the heads' partly filled last blocks) */
  kv_compress_params_t keep_all;
  const kv_compress_params_t *prm = prm_in;
  if (prm_in && prm_in->ratio == 1.0 && prm_in->max_cache_tokens <= 0) {
    keep_all = *prm_in;
    keep_all.policy = KV_POLICY_NONE;
    prm = &keep_all;
  }
  pl->n_heads_total = 0;
  pl->n_moves = 0;
  pl->blocks_freed = 0;
  pl->tokens_evicted = 0;
  pl->budget_blocks = 0;
  pl->pressure_overrode = false;
  int rc = validate(prm, in);
  if (rc) return rc;
  plan_ctx_t c;
  const bool par = pl->par.run && pl->par.threads > 1;
  rc = ctx_init(&c, pl, in, prm->policy == KV_POLICY_DBUDGET, par ? pl->par.threads : 1);
  if (rc) return rc;
  const kv_seq_t *s = in->seq;
  int32_t LH = c.LH, B = c.B;
  int64_t held = kv_seq_blocks_held(s), full = 0;
  for (int32_t i = 0; i < LH; i++) full += c.full[i];
  int32_t bt = kv_compress_budget_tokens(prm, in->n_tokens, B);

  if (prm->policy != KV_POLICY_NONE) {
    rank_by_t by = prm->policy == KV_POLICY_STREAMING ? RANK_POS
                   : prm->policy == KV_POLICY_RANDOM  ? RANK_RANDOM
                                                      : RANK_SCORE;
    rank_job_t job = {&c, prm, in, by};
    if (par) pl->par.run(pl->par.ctx, LH, rank_one, &job);
    else for (int32_t i = 0; i < LH; i++) rank_head(&c, prm, in, by, i, c.tmp);
  }

  kv_layer_budget_t split = prm->layer_budget;
  if (split == KV_LAYER_ZIGZAG && !in->obs_mass) split = KV_LAYER_UNIFORM;
  if (prm->policy == KV_POLICY_STREAMING || prm->policy == KV_POLICY_RANDOM)
    split = KV_LAYER_UNIFORM;
  /* Without a ratio or max_cache_tokens there is no limit to enforce;
   * with DBudgetKV a given one caps the pruning. */
  const int32_t *limit = c.nmax;
  bool by_budget = prm->policy != KV_POLICY_NONE && has_budget(prm);
  if (prm->policy == KV_POLICY_DBUDGET) {
    dbudget_caps(&c, prm, in);
    limit = c.cap;
    if (!by_budget) memcpy(c.cnt, c.cap, (size_t)LH * sizeof *c.cnt);
  }
  int64_t allowed = held;
  if (by_budget) {
    if (split == KV_LAYER_GLOBAL) {
      allowed = ((int64_t)bt * LH + B - 1) / B;
      merge_take(&c, 0, LH, c.cnt, limit, full - allowed);
    } else {
      if (split == KV_LAYER_ZIGZAG) zigzag_quotas(&c, prm, in, bt);
      else uniform_quotas(&c, bt);
      take_by_layer(&c, limit);
      allowed = 0;
      for (int32_t l = 0; l < c.L; l++) allowed += c.quota[l];
    }
  }
  if (prm->policy == KV_POLICY_DBUDGET) allowed = held - blocks_freed_now(&c);
  pl->budget_blocks = clamp32(allowed);

  /* Memory pressure: more than the policy chose, globally cheapest first. */
  int64_t freed = blocks_freed_now(&c);
  if (prm->policy != KV_POLICY_NONE && freed < in->min_free_blocks)
    pl->pressure_overrode = merge_take(&c, 0, LH, c.cnt, c.nmax, in->min_free_blocks - freed) > 0;

  int64_t evicted = 0;
  for (int32_t i = 0; i < LH; i++) {
    pl->evict[i] = c.cnt[i] ? (c.cnt[i] - 1) * B + c.hang[i] : 0;
    evicted += pl->evict[i];
  }
  if (evicted > pl->cap_moves) {
    int32_t *src = realloc(pl->src, (size_t)evicted * sizeof *src);
    if (!src) return -ENOMEM;
    pl->src = src;
    int32_t *dst = realloc(pl->dst, (size_t)evicted * sizeof *dst);
    if (!dst) return -ENOMEM;
    pl->dst = dst;
    pl->cap_moves = evicted;
  }
  for (int32_t i = 0; i < LH; i++)
    if (pl->evict[i] > 0) plan_moves(pl, &c, i, pl->evict[i]);
  pl->n_heads_total = LH;
  pl->tokens_evicted = evicted;
  pl->blocks_freed = clamp32(blocks_freed_now(&c));
  return 0;
}

void kv_compress_apply(const kv_compress_plan_t *pl, kv_seq_t *seq, kv_pool_t *pool) {
  int32_t LH = seq->n_layers * seq->n_heads, B = seq->block_size;
  assert(pl->n_heads_total == LH);
  for (int32_t i = 0; i < LH; i++) {
    int32_t ctx = seq->ctx[i] - pl->evict[i];
    assert(ctx >= 0);
    int32_t keep = (ctx + B - 1) / B;
    int32_t *table = seq->blocks + (int64_t)i * seq->max_blocks;
    for (int32_t b = keep; b < seq->n_blocks[i]; b++) kv_pool_release(pool, table[b]);
    if (seq->n_blocks[i] > keep) seq->n_blocks[i] = keep;
    seq->ctx[i] = ctx;
  }
}

int kv_compress_run(kv_compress_plan_t *pl, const kv_compress_params_t *prm,
                    const kv_compress_input_t *in, k_backend_t *be, const k_kv_arena_t *arena,
                    kv_seq_t *seq, kv_pool_t *pool) {
  return kv_compress_run_on(pl, prm, in, 1, &be, arena, seq, pool);
}

/* The plan's moves whose slots lie in arena a, as indices into it. A head
 * never moves a KV to another head's block, so both ends of a move lie in
 * the same arena. */
static int move_in(k_backend_t *be, const k_kv_arena_t *a, const kv_compress_plan_t *pl,
                   int32_t *src, int32_t *dst) {
  const int64_t first = (int64_t)a->first_block * a->block_size;
  const int64_t end = first + (int64_t)a->n_blocks * a->block_size;
  int64_t n = 0;
  for (int64_t i = 0; i < pl->n_moves; i++) {
    if (pl->src[i] < first || pl->src[i] >= end) continue;
    src[n] = (int32_t)(pl->src[i] - first);
    dst[n++] = (int32_t)(pl->dst[i] - first);
  }
  return n ? be->ops->kv_move(be, a, src, dst, n) : 0;
}

int kv_compress_run_on(kv_compress_plan_t *pl, const kv_compress_params_t *prm,
                       const kv_compress_input_t *in, int32_t n_arenas, k_backend_t *const *bes,
                       const k_kv_arena_t *arenas, kv_seq_t *seq, kv_pool_t *pool) {
  if (in->seq != seq || n_arenas < 1) return -EINVAL;
  int rc = kv_compress_plan(pl, prm, in);
  if (!rc && pl->n_moves && n_arenas == 1 && arenas[0].first_block == 0) {
    rc = bes[0]->ops->kv_move(bes[0], &arenas[0], pl->src, pl->dst, pl->n_moves);
  } else if (!rc && pl->n_moves) {
    int32_t *idx = malloc(2 * (size_t)pl->n_moves * sizeof *idx);
    if (!idx) rc = -ENOMEM;
    for (int32_t r = 0; !rc && r < n_arenas; r++)
      rc = move_in(bes[r], &arenas[r], pl, idx, idx + pl->n_moves);
    free(idx);
  }
  if (!rc) kv_compress_apply(pl, seq, pool);
  return rc;
}

/* ---- scores across prefill chunks ------------------------------------------- */

void kv_scores_set_aside(const kv_seq_t *seq, float *score, int32_t fresh, float *prev) {
  const int32_t H = seq->n_heads, lh = seq->n_layers * H;
  const size_t per_head = (size_t)seq->max_blocks * (size_t)seq->block_size;
  for (int32_t i = 0; i < lh; i++) {
    float *p = prev + (size_t)i * per_head;
    int32_t j = 0;
    for (; j < seq->ctx[i] - fresh; j++) {
      float *sc = &score[kv_seq_slot(seq, i / H, i % H, j)];
      p[j] = *sc;
      *sc = 0.0f;
    }
    memset(p + j, 0, (per_head - (size_t)j) * sizeof *p); /* and slots the window appends */
  }
}

void kv_scores_merge_max(const kv_seq_t *seq, float *score, const float *prev) {
  const int32_t H = seq->n_heads, lh = seq->n_layers * H;
  const size_t per_head = (size_t)seq->max_blocks * (size_t)seq->block_size;
  for (int32_t i = 0; i < lh; i++) {
    const float *p = prev + (size_t)i * per_head;
    for (int32_t j = 0; j < seq->ctx[i]; j++) {
      float *sc = &score[kv_seq_slot(seq, i / H, i % H, j)];
      if (p[j] > *sc) *sc = p[j];
    }
  }
}
