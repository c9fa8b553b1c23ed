/* Token sampling, in the order vLLM / llama.cpp apply it:
 *   1. penalties on the logits, in place: repetition (HF: divide a positive
 *      logit, multiply a negative one) over prompt + generated ids, then
 *      frequency (count * f) and presence (p once) over generated ids;
 *   2. temperature 0: argmax, lowest id on ties;
 *   3. otherwise top-k, softmax with temperature, top-p (smallest prefix of
 *      the sorted distribution whose mass reaches top_p, at least one token),
 *      min-p (keep p >= min_p * p_max), then one draw from xoshiro256**;
 *      without top-k and top-p the draw is kernels/draw.h's Gumbel-max (one
 *      xoshiro256** output as its key), which a device makes the same way.
 * top-k and top-p select by partial quickselect; only the prefix that top-p
 * needs is sorted, grown geometrically. NaN logits count as -inf. */
#include "scheduler/sample.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* First prefix top-p sorts; it grows 4x while the mass is not reached. */
#define TOPP_FIRST_CHUNK 64

static int set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return -EINVAL;
}

void sched_sample_params_default(sched_sample_params_t *p) {
  assert(p);
  memset(p, 0, sizeof *p);
  p->temperature = 1.0f;
  p->top_k = 0;
  p->top_p = 1.0f;
  p->min_p = 0.0f;
  p->repetition_penalty = 1.0f;
  p->presence_penalty = 0.0f;
  p->frequency_penalty = 0.0f;
  p->seed = 0;
  p->has_seed = false;
}

int sched_sample_params_check(const sched_sample_params_t *p, char *err, size_t errlen) {
  assert(p);
  if (!isfinite(p->temperature) || p->temperature < 0.0f)
    return set_err(err, errlen, "temperature must be a finite number >= 0, got %g",
                   (double)p->temperature);
  if (!isfinite(p->top_p) || !(p->top_p > 0.0f) || p->top_p > 1.0f)
    return set_err(err, errlen, "top_p must be in (0, 1], got %g", (double)p->top_p);
  if (!isfinite(p->min_p) || p->min_p < 0.0f || p->min_p > 1.0f)
    return set_err(err, errlen, "min_p must be in [0, 1], got %g", (double)p->min_p);
  if (!isfinite(p->repetition_penalty) || !(p->repetition_penalty > 0.0f))
    return set_err(err, errlen, "repetition_penalty must be a finite number > 0, got %g",
                   (double)p->repetition_penalty);
  if (!isfinite(p->presence_penalty) || p->presence_penalty < -2.0f || p->presence_penalty > 2.0f)
    return set_err(err, errlen, "presence_penalty must be in [-2, 2], got %g",
                   (double)p->presence_penalty);
  if (!isfinite(p->frequency_penalty) || p->frequency_penalty < -2.0f ||
      p->frequency_penalty > 2.0f)
    return set_err(err, errlen, "frequency_penalty must be in [-2, 2], got %g",
                   (double)p->frequency_penalty);
  /* top_k: any value; <= 0 turns it off, >= n_vocab keeps everything. */
  return 0;
}

/* ---- RNG: splitmix64 expands the seed, xoshiro256** draws ----------------- */

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

static double uniform01(uint64_t s[4]) { /* [0, 1) with 53 random bits */
  return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

static uint64_t random_seed(void) {
  uint64_t seed = 0;
  if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) == (ssize_t)sizeof seed) return seed;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)&seed;
}

/* ---- init / destroy ------------------------------------------------------ */

int sched_sampler_init(sched_sampler_t *s, const sched_sample_params_t *p, int32_t n_vocab) {
  assert(s && p);
  memset(s, 0, sizeof *s);
  if (n_vocab <= 0) return -EINVAL;
  int rc = sched_sample_params_check(p, NULL, 0);
  if (rc) return rc;
  s->p = *p;
  s->n_vocab = n_vocab;
  const size_t n = (size_t)n_vocab;
  s->counts = calloc(n, sizeof *s->counts);
  s->in_prompt = calloc(n, sizeof *s->in_prompt);
  s->probs = calloc(n, sizeof *s->probs);
  s->idx = calloc(n, sizeof *s->idx);
  if (!s->counts || !s->in_prompt || !s->probs || !s->idx) goto fail_nomem;
  uint64_t x = p->has_seed ? p->seed : random_seed();
  for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
  return 0;

fail_nomem:
  sched_sampler_destroy(s);
  return -ENOMEM;
}

void sched_sampler_destroy(sched_sampler_t *s) {
  if (!s) return;
  free(s->counts);
  free(s->in_prompt);
  free(s->probs);
  free(s->idx);
  memset(s, 0, sizeof *s);
}

void sched_sampler_prompt(sched_sampler_t *s, const int32_t *ids, size_t n) {
  assert(s && (ids || n == 0));
  for (size_t i = 0; i < n; i++)
    if (ids[i] >= 0 && ids[i] < s->n_vocab) s->in_prompt[ids[i]] = 1;
}

void sched_sampler_accept(sched_sampler_t *s, int32_t id) {
  assert(s);
  if (id < 0 || id >= s->n_vocab) return;
  if (s->counts[id] < INT32_MAX) s->counts[id]++;
}

/* ---- helpers ------------------------------------------------------------- */

int32_t sched_argmax(const float *logits, int32_t n) {
  assert(logits && n > 0);
  int32_t best = 0;
  float bv = -INFINITY;
  for (int32_t i = 0; i < n; i++)
    if (logits[i] > bv) { /* strict: the lowest id wins ties; NaN never wins */
      bv = logits[i];
      best = i;
    }
  return best;
}

static void apply_penalties(const sched_sampler_t *s, float *logits) {
  const float rp = s->p.repetition_penalty, pp = s->p.presence_penalty,
              fp = s->p.frequency_penalty;
  const bool rep = rp != 1.0f, add = pp != 0.0f || fp != 0.0f;
  if (!rep && !add) return;
  for (int32_t i = 0; i < s->n_vocab; i++) {
    const int32_t c = s->counts[i];
    if (rep && (c || s->in_prompt[i]))
      logits[i] = logits[i] > 0.0f ? logits[i] / rp : logits[i] * rp;
    if (add && c) logits[i] -= fp * (float)c + pp;
  }
}

/* "a ranks before b": larger logit, then lower id. A strict total order, so
 * quickselect never meets equal keys. */
static inline bool before(const float *l, int32_t a, int32_t b) {
  return l[a] > l[b] || (l[a] == l[b] && a < b);
}

static inline void swap_i32(int32_t *a, int32_t *b) {
  int32_t t = *a;
  *a = *b;
  *b = t;
}

/* Pivot choice for select/sort: a fixed xorshift, so results never depend on
 * the sampler's RNG and worst cases need adversarial input. */
static inline size_t pick(uint32_t *st, size_t n) {
  uint32_t x = *st;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  *st = x;
  return (size_t)x % n;
}

/* Partition a[0..n) around a random pivot: returns its final position p,
 * with a[0..p) before the pivot and a(p..n) after it. */
static size_t partition(int32_t *a, size_t n, const float *l, uint32_t *st) {
  swap_i32(&a[pick(st, n)], &a[n - 1]);
  const int32_t pv = a[n - 1];
  size_t store = 0;
  for (size_t i = 0; i + 1 < n; i++)
    if (before(l, a[i], pv)) swap_i32(&a[i], &a[store++]);
  swap_i32(&a[store], &a[n - 1]);
  return store;
}

/* Rearrange a[0..n) so that a[0..k) are its k first ids in rank order (in
 * no particular order among themselves). */
static void select_top(int32_t *a, size_t n, size_t k, const float *l, uint32_t *st) {
  while (k > 0 && k < n) {
    size_t p = partition(a, n, l, st);
    if (p == k || p + 1 == k) return;
    if (p > k) {
      n = p;
    } else {
      a += p + 1;
      n -= p + 1;
      k -= p + 1;
    }
  }
}

static void sort_rank(int32_t *a, size_t n, const float *l, uint32_t *st) {
  while (n > 16) {
    size_t p = partition(a, n, l, st);
    if (p < n - p - 1) { /* recurse on the smaller side */
      sort_rank(a, p, l, st);
      a += p + 1;
      n -= p + 1;
    } else {
      sort_rank(a + p + 1, n - p - 1, l, st);
      n = p;
    }
  }
  for (size_t i = 1; i < n; i++) /* insertion sort */
    for (size_t j = i; j > 0 && before(l, a[j], a[j - 1]); j--) swap_i32(&a[j], &a[j - 1]);
}

/* ---- sampling ------------------------------------------------------------ */

/* Over the candidate ids a[0..n), with weights w by id: the length of the
 * shortest rank-ordered prefix whose weight reaches `need` (at least 1; n if
 * rounding keeps it short). With w_max the largest weight, the first
 * ceil(need / w_max) - 1 ids cannot reach `need`, so they are selected
 * unsorted; past them, a chunk is quickselected and sorted, growing 4x until
 * the mass is there. a[0..result) holds the prefix. */
static size_t mass_prefix(int32_t *a, size_t n, double need, const float *w, const float *l,
                          uint32_t *st) {
  if (n == 0) return 0;
  float w_max = 0.0f;
  for (size_t j = 0; j < n; j++) w_max = w[a[j]] > w_max ? w[a[j]] : w_max;
  double cum = 0.0;
  size_t sorted = 0;
  if (w_max > 0.0f) {
    const double sure = ceil(need / (double)w_max) - 1.0; /* these stay below need */
    sorted = sure <= 0.0 ? 0 : sure >= (double)(n - 1) ? n - 1 : (size_t)sure;
    if (sorted) {
      select_top(a, n, sorted, l, st);
      for (size_t j = 0; j < sorted; j++) cum += w[a[j]];
    }
  }
  size_t m = n - sorted > TOPP_FIRST_CHUNK ? sorted + TOPP_FIRST_CHUNK : n;
  while (sorted < n) {
    select_top(a + sorted, n - sorted, m - sorted, l, st);
    sort_rank(a + sorted, m - sorted, l, st);
    for (size_t j = sorted; j < m; j++) {
      cum += w[a[j]];
      if (cum >= need) return j + 1;
    }
    const size_t chunk = 4 * (m - sorted);
    sorted = m;
    m = n - m > chunk ? m + chunk : n;
  }
  return n;
}

/* Top-p over the whole vocabulary buckets x = (l - lmax) / T into bins of
 * 1/TOPP_BINS_PER_UNIT (x <= -TOPP_BINS / TOPP_BINS_PER_UNIT share the last
 * one). Bins are monotonic in the logit, so the cut lies in one bin, found
 * from the bin masses; only that bin's ids are ranked. */
#define TOPP_BINS 1024
#define TOPP_BINS_PER_UNIT 16.0f

static inline int topp_bin(float l, float lmax, float T) {
  const float y = (lmax - l) / T * TOPP_BINS_PER_UNIT; /* >= 0, or +inf */
  return y < (float)(TOPP_BINS - 1) ? (int)y : TOPP_BINS - 1;
}

static inline bool keep_w(float w, float min_p) { return w > 0.0f && w >= min_p; }

static int32_t draw_from(const int32_t *ids, size_t n, const float *w, float min_p, double r) {
  double total = 0.0;
  for (size_t j = 0; j < n; j++)
    if (keep_w(w[ids[j]], min_p)) total += w[ids[j]];
  const double target = r * total;
  double cum = 0.0;
  int32_t last = ids[0];
  for (size_t j = 0; j < n; j++) {
    const int32_t id = ids[j];
    if (!keep_w(w[id], min_p)) continue;
    cum += w[id];
    last = id;
    if (target < cum) return id;
  }
  return last; /* rounding */
}

static int32_t sample_stochastic(sched_sampler_t *s, const float *l, float lmax) {
  const int32_t V = s->n_vocab;
  const float T = s->p.temperature, min_p = s->p.min_p, top_p = s->p.top_p;
  const size_t K = s->p.top_k > 0 && s->p.top_k < V ? (size_t)s->p.top_k : (size_t)V;
  float *w = s->probs;   /* [V] unnormalised softmax(l / T) by id; the max weighs 1 */
  int32_t *idx = s->idx; /* [V] candidate ids */
  uint32_t st = 0x9e3779b9u;
  if (K == (size_t)V && top_p >= 1.0f) { /* whole vocabulary, min-p at most: a device's draw */
    const k_draw_t d = {T, min_p, xoshiro_next(s->rng)};
    return k_draw_row(l, V, &d);
  }
  const double r = uniform01(s->rng);
  /* min-p keeps w >= min_p (p / p_max >= min_p); the max always stays. */

  if (K < (size_t)V) { /* top-k, then top-p among the k */
    for (int32_t i = 0; i < V; i++) idx[i] = i;
    select_top(idx, (size_t)V, K, l, &st);
    double sum = 0.0;
    for (size_t j = 0; j < K; j++) sum += w[idx[j]] = expf((l[idx[j]] - lmax) / T);
    size_t kept = top_p < 1.0f ? mass_prefix(idx, K, (double)top_p * sum, w, l, &st) : K;
    return draw_from(idx, kept, w, min_p, r);
  }

  double bin_mass[TOPP_BINS] = {0};
  double sum = 0.0;
  for (int32_t i = 0; i < V; i++) {
    w[i] = expf((l[i] - lmax) / T);
    bin_mass[topp_bin(l[i], lmax, T)] += w[i];
    sum += w[i];
  }
  const double need = (double)top_p * sum;
  double above = 0.0; /* mass of the bins before the cut bin */
  int cut_bin = 0;
  while (cut_bin < TOPP_BINS - 1 && above + bin_mass[cut_bin] < need) above += bin_mass[cut_bin++];
  if (cut_bin == TOPP_BINS - 1) { /* only by rounding: keep everything */
    for (int32_t i = 0; i < V; i++) idx[i] = i;
    return draw_from(idx, (size_t)V, w, min_p, r);
  }
  /* Candidates: the bins before the cut bin whole, then the cut bin ranked.
   * One pass: the first from the front of idx, the second from its back. */
  size_t n_before = 0, n_cut = 0;
  for (int32_t i = 0; i < V; i++) {
    const int b = topp_bin(l[i], lmax, T);
    if (b < cut_bin) idx[n_before++] = i;
    else if (b == cut_bin) idx[(size_t)V - 1 - n_cut++] = i;
  }
  memmove(idx + n_before, idx + (size_t)V - n_cut, n_cut * sizeof *idx);
  size_t kept = n_before + mass_prefix(idx + n_before, n_cut, need - above, w, l, &st);
  return draw_from(idx, kept, w, min_p, r);
}

bool sched_sampler_on_device(const sched_sampler_t *s) {
  const sched_sample_params_t *p = &s->p;
  if (p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f)
    return false;
  return p->temperature == 0.0f ||
         ((p->top_k <= 0 || p->top_k >= s->n_vocab) && p->top_p >= 1.0f);
}

void sched_sampler_next_draw(sched_sampler_t *s, k_draw_t *d) {
  *d = (k_draw_t){0};
  if (s->p.temperature > 0.0f)
    *d = (k_draw_t){s->p.temperature, s->p.min_p, xoshiro_next(s->rng)};
}

int32_t sched_sample(sched_sampler_t *s, float *logits, float *logprob) {
  assert(s && logits && s->n_vocab > 0);
  const int32_t V = s->n_vocab;
  apply_penalties(s, logits);

  int32_t best = 0; /* argmax, lowest id on ties; NaN becomes -inf */
  float lmax = -INFINITY;
  for (int32_t i = 0; i < V; i++) {
    if (isnan(logits[i])) logits[i] = -INFINITY;
    if (logits[i] > lmax) {
      lmax = logits[i];
      best = i;
    }
  }

  int32_t id = best;
  if (s->p.temperature > 0.0f && isfinite(lmax)) id = sample_stochastic(s, logits, lmax);

  if (logprob) {
    if (!isfinite(lmax)) {
      *logprob = logits[id] == lmax ? 0.0f : -INFINITY;
    } else {
      double sum = 0.0;
      for (int32_t i = 0; i < V; i++) sum += expf(logits[i] - lmax);
      *logprob = (float)((double)logits[id] - (double)lmax - log(sum));
    }
  }
  return id;
}
