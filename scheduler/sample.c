/* Token sampling, in the order vLLM / llama.cpp apply it:
 *   1. penalties on the logits, in place: repetition (HF: divide a positive
 *      logit, multiply a negative one) over prompt + generated ids, then
 *      frequency (count * f) and presence (p once) over generated ids;
 *   2. temperature 0: argmax, lowest id on ties;
 *   3. otherwise kernels/draw.h's draw: top-k, softmax with temperature,
 *      top-p (smallest prefix of the sorted distribution whose mass reaches
 *      top_p, at least one token), min-p (keep p >= min_p * p_max), then
 *      the Gumbel-max draw keyed by one xoshiro256** output, which a device
 *      makes the same way.
 * NaN logits count as -inf. */
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

static uint64_t random_seed(void) {
  uint64_t seed = 0;
  if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) == (ssize_t)sizeof seed) return seed;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)&seed;
}

/* ---- init / destroy ------------------------------------------------------ */

static bool penalised(const sched_sample_params_t *p) {
  return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
         p->frequency_penalty != 0.0f;
}

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
  if (penalised(p) && !(s->seen = malloc(n * sizeof *s->seen))) goto fail_nomem;
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
  free(s->seen);
  memset(s, 0, sizeof *s);
}

void sched_sampler_prompt(sched_sampler_t *s, const int32_t *ids, size_t n) {
  assert(s && (ids || n == 0));
  for (size_t i = 0; i < n; i++) {
    const int32_t id = ids[i];
    if (id < 0 || id >= s->n_vocab || s->in_prompt[id]) continue;
    if (s->seen && !s->counts[id]) s->seen[s->n_seen++] = id;
    s->in_prompt[id] = 1;
  }
}

void sched_sampler_accept(sched_sampler_t *s, int32_t id) {
  assert(s);
  if (id < 0 || id >= s->n_vocab) return;
  if (s->seen && !s->counts[id] && !s->in_prompt[id]) s->seen[s->n_seen++] = id;
  if (s->counts[id] < (1 << 29)) s->counts[id]++; /* 2 * count + 1 fits an int32 */
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
  const sched_sample_params_t *p = &s->p;
  if (!penalised(p)) return;
  for (int32_t j = 0; j < s->n_seen; j++) {
    const int32_t i = s->seen[j];
    logits[i] = k_draw_penalise(logits[i], s->counts[i], s->in_prompt[i], p->repetition_penalty,
                                p->presence_penalty, p->frequency_penalty);
  }
}

/* ---- sampling ------------------------------------------------------------ */

/* The draw kernels/draw.h defines, for this request and its next key. */
static k_draw_t draw_of(sched_sampler_t *s) {
  const sched_sample_params_t *p = &s->p;
  if (p->temperature <= 0.0f) return (k_draw_t){0};
  return (k_draw_t){.temperature = p->temperature, .min_p = p->min_p, .top_p = p->top_p,
                    .top_k = p->top_k, .key = xoshiro_next(s->rng)};
}

bool sched_sampler_on_device(const sched_sampler_t *s, bool penalize) {
  return penalize || !penalised(&s->p);
}

int32_t sched_sampler_penalty(const sched_sampler_t *s, k_penalty_t *row, int64_t first,
                              int32_t *ids, int32_t *seen) {
  const sched_sample_params_t *p = &s->p;
  *row = (k_penalty_t){.first = first, .rep = p->repetition_penalty,
                       .pres = p->presence_penalty, .freq = p->frequency_penalty};
  if (!penalised(p)) return 0;
  for (int32_t j = 0; j < s->n_seen; j++) {
    const int32_t i = s->seen[j];
    ids[j] = i;
    seen[j] = 2 * s->counts[i] + (s->in_prompt[i] != 0);
  }
  row->n = s->n_seen;
  return s->n_seen;
}

void sched_sampler_next_draw(sched_sampler_t *s, k_draw_t *d) { *d = draw_of(s); }

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
  if (s->p.temperature > 0.0f && isfinite(lmax)) {
    const k_draw_t d = draw_of(s);
    id = k_draw_row(logits, V, &d, s->probs, s->idx);
  }

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
