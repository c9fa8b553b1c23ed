/* Sampling: greedy, seeding, the temperature-1 distribution against softmax,
 * top-k / top-p / min-p truncation, the exact effect of each penalty, and
 * parameter checks. Statistical checks use a fixed seed, so they are
 * deterministic; their tolerances are 5 standard deviations. */
#include <errno.h>

#include "scheduler/sample.h"
#include "tests/test.h"

static sched_sample_params_t params(float temperature, uint64_t seed) {
  sched_sample_params_t p;
  sched_sample_params_default(&p);
  p.temperature = temperature;
  p.seed = seed;
  p.has_seed = true;
  return p;
}

static void softmax(const float *l, int n, float t, double *out) {
  double mx = -INFINITY, sum = 0.0;
  for (int i = 0; i < n; i++) mx = l[i] > mx ? l[i] : mx;
  for (int i = 0; i < n; i++) sum += out[i] = exp(((double)l[i] - mx) / t);
  for (int i = 0; i < n; i++) out[i] /= sum;
}

/* Draws `draws` tokens from fixed logits; counts land in freq[n]. */
static void draw(const sched_sample_params_t *p, const float *logits, int n, int draws,
                 double *freq) {
  sched_sampler_t s;
  CHECK_INT_EQ(sched_sampler_init(&s, p, n), 0);
  float *row = malloc(sizeof *row * (size_t)n);
  CHECK(row);
  for (int i = 0; i < n; i++) freq[i] = 0.0;
  for (int d = 0; d < draws; d++) {
    memcpy(row, logits, sizeof *row * (size_t)n);
    int32_t id = sched_sample(&s, row, NULL);
    CHECK(id >= 0 && id < n);
    freq[id] += 1.0;
  }
  for (int i = 0; i < n; i++) freq[i] /= draws;
  free(row);
  sched_sampler_destroy(&s);
}

/* |freq - want| within 5 sigma of a binomial proportion (plus a hair). */
static void check_freq(const double *freq, const double *want, int n, int draws) {
  for (int i = 0; i < n; i++) {
    double sigma = sqrt(want[i] * (1.0 - want[i]) / draws);
    if (fabs(freq[i] - want[i]) > 5.0 * sigma + 1e-9)
      FAIL_AT("token %d: frequency %.5f, expected %.5f (5 sigma = %.5f)", i, freq[i], want[i],
              5.0 * sigma);
  }
}

static void test_argmax(void) {
  float a[] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f};
  CHECK_INT_EQ(sched_argmax(a, 5), 1); /* tie: lowest id */
  float b[] = {-3.0f, -2.0f, -2.5f};
  CHECK_INT_EQ(sched_argmax(b, 3), 1);
  float c[] = {NAN, 1.0f, NAN};
  CHECK_INT_EQ(sched_argmax(c, 3), 1);
  float d[] = {-INFINITY, -INFINITY};
  CHECK_INT_EQ(sched_argmax(d, 2), 0);

  /* greedy through the sampler, with a logprob under the raw distribution */
  sched_sample_params_t p = params(0.0f, 1);
  sched_sampler_t s;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, 5), 0);
  float row[5];
  memcpy(row, a, sizeof row);
  float lp = 0.0f;
  CHECK_INT_EQ(sched_sample(&s, row, &lp), 1);
  double sm[5];
  softmax(a, 5, 1.0f, sm);
  CHECK_NEAR(lp, log(sm[1]), 1e-5);
  for (int i = 0; i < 20; i++) {
    memcpy(row, a, sizeof row);
    CHECK_INT_EQ(sched_sample(&s, row, NULL), 1);
  }
  float e[] = {NAN, 0.0f, NAN, -1.0f, 0.0f};
  CHECK_INT_EQ(sched_sample(&s, e, NULL), 1);
  sched_sampler_destroy(&s);
}

static void test_seed_reproducible(void) {
  enum { V = 1000, STEPS = 200 };
  float *logits = malloc(sizeof *logits * V), *row = malloc(sizeof *row * V);
  CHECK(logits && row);
  uint32_t x = 12345;
  for (int i = 0; i < V; i++) {
    x = x * 1664525u + 1013904223u;
    logits[i] = (float)(x >> 8) / (float)(1u << 24) * 8.0f;
  }
  const struct {
    float t, top_p, min_p;
    int32_t top_k;
  } cfg[] = {{1.0f, 1.0f, 0.0f, 0}, {0.8f, 0.9f, 0.0f, 0}, {1.2f, 1.0f, 0.05f, 40},
             {0.7f, 0.95f, 0.02f, 100}};
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
    int32_t seq[3][STEPS];
    const uint64_t seeds[3] = {42, 42, 43};
    for (int run = 0; run < 3; run++) {
      sched_sample_params_t p = params(cfg[c].t, seeds[run]);
      p.top_p = cfg[c].top_p;
      p.min_p = cfg[c].min_p;
      p.top_k = cfg[c].top_k;
      sched_sampler_t s;
      CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
      for (int t = 0; t < STEPS; t++) {
        memcpy(row, logits, sizeof *row * V);
        seq[run][t] = sched_sample(&s, row, NULL);
        sched_sampler_accept(&s, seq[run][t]);
      }
      sched_sampler_destroy(&s);
    }
    CHECK(memcmp(seq[0], seq[1], sizeof seq[0]) == 0);
    CHECK(memcmp(seq[0], seq[2], sizeof seq[0]) != 0);
  }
  free(logits);
  free(row);
}

static void test_temperature_distribution(void) {
  enum { DRAWS = 200000 };
  const float logits[5] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  double freq[5], want[5];
  const float temps[] = {1.0f, 0.5f, 2.0f};
  for (size_t k = 0; k < 3; k++) {
    sched_sample_params_t p = params(temps[k], 7 + k);
    draw(&p, logits, 5, DRAWS, freq);
    softmax(logits, 5, temps[k], want);
    check_freq(freq, want, 5, DRAWS);
  }
}

static void test_top_k(void) {
  enum { V = 300 };
  float logits[V], row[V];
  for (int i = 0; i < V; i++) logits[i] = (float)((i * 37) % V) / 50.0f;
  /* top_k = 1 is greedy, for any seed and temperature */
  for (uint64_t seed = 0; seed < 50; seed++) {
    sched_sample_params_t p = params(1.5f, seed);
    p.top_k = 1;
    sched_sampler_t s;
    CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
    memcpy(row, logits, sizeof row);
    CHECK_INT_EQ(sched_sample(&s, row, NULL), sched_argmax(logits, V));
    sched_sampler_destroy(&s);
  }
  /* top_k = 3 over five tokens: the renormalised top three */
  enum { DRAWS = 100000 };
  const float l5[5] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  double freq[5], want[5];
  sched_sample_params_t p = params(1.0f, 3);
  p.top_k = 3;
  draw(&p, l5, 5, DRAWS, freq);
  softmax(l5, 5, 1.0f, want);
  double z = want[0] + want[1] + want[4];
  want[0] /= z, want[1] /= z, want[4] /= z, want[2] = want[3] = 0.0;
  check_freq(freq, want, 5, DRAWS);
  /* top_k >= n_vocab keeps everything */
  p.top_k = 5;
  draw(&p, l5, 5, DRAWS, freq);
  softmax(l5, 5, 1.0f, want);
  check_freq(freq, want, 5, DRAWS);
}

static void test_top_p(void) {
  enum { DRAWS = 100000 };
  /* probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 */
  const float l5[5] = {logf(8), logf(4), logf(2), logf(1), logf(1)};
  double freq[5];
  sched_sample_params_t p = params(1.0f, 11);
  p.top_p = 0.7f; /* 0.5 < 0.7 <= 0.75: the first two */
  draw(&p, l5, 5, DRAWS, freq);
  double want[5] = {2.0 / 3, 1.0 / 3, 0, 0, 0};
  check_freq(freq, want, 5, DRAWS);
  p.top_p = 0.8f; /* the first three */
  draw(&p, l5, 5, DRAWS, freq);
  double want3[5] = {4.0 / 7, 2.0 / 7, 1.0 / 7, 0, 0};
  check_freq(freq, want3, 5, DRAWS);
  p.top_p = 0.1f; /* at least one token: the top one */
  draw(&p, l5, 5, 1000, freq);
  CHECK(freq[0] == 1.0);

  /* Large vocabulary: 100 heavy tokens hold ~90% of the mass and sit at
   * scattered ids, so top-p must look past its first sorted chunk. */
  enum { V = 50000 };
  float *big = malloc(sizeof *big * V);
  CHECK(big);
  double heavy = 0.0, rest = 0.0;
  for (int i = 0; i < V; i++) big[i] = 0.0f;
  for (int k = 0; k < 100; k++) big[(k * 499 + 17) % V] = 8.0f;
  for (int i = 0; i < V; i++) {
    if (big[i] > 0) heavy += exp(big[i]);
    else rest += exp(big[i]);
  }
  double heavy_mass = heavy / (heavy + rest);
  CHECK(heavy_mass > 0.85 && heavy_mass < 0.95);
  double *bf = malloc(sizeof *bf * V);
  CHECK(bf);
  p.top_p = (float)(heavy_mass - 0.01); /* reached inside the heavy tokens */
  draw(&p, big, V, 4000, bf);
  double in_heavy = 0.0;
  for (int k = 0; k < 100; k++) in_heavy += bf[(k * 499 + 17) % V];
  CHECK_NEAR(in_heavy, 1.0, 1e-12);
  p.top_p = (float)(heavy_mass + 0.02); /* needs light tokens too */
  draw(&p, big, V, 4000, bf);
  in_heavy = 0.0;
  for (int k = 0; k < 100; k++) in_heavy += bf[(k * 499 + 17) % V];
  CHECK(in_heavy < 1.0);
  /* light tokens tie, so the lowest ids are kept: every light token drawn
   * is among the first ones needed to reach the mass (plus one for rounding) */
  double total = heavy + rest, lacking = (double)p.top_p * total - heavy;
  int n_light_needed = (int)ceil(lacking) + 1, seen = 0, bound = -1;
  for (int i = 0; i < V && seen < n_light_needed; i++)
    if (big[i] == 0.0f) seen++, bound = i;
  for (int i = 0; i < V; i++)
    if (bf[i] > 0 && big[i] == 0.0f && i > bound)
      FAIL_AT("light token %d drawn, beyond the top-p cut at id %d", i, bound);
  free(bf);
  free(big);
}

static void test_min_p(void) {
  enum { DRAWS = 100000 };
  const float l5[5] = {logf(8), logf(4), logf(2), logf(1), logf(1)};
  double freq[5];
  sched_sample_params_t p = params(1.0f, 5);
  p.min_p = 0.25f; /* p/p_max: 1, .5, .25, .125, .125 -> keeps the first three */
  draw(&p, l5, 5, DRAWS, freq);
  double want[5] = {4.0 / 7, 2.0 / 7, 1.0 / 7, 0, 0};
  check_freq(freq, want, 5, DRAWS);
  p.min_p = 0.3f;
  draw(&p, l5, 5, DRAWS, freq);
  double want2[5] = {2.0 / 3, 1.0 / 3, 0, 0, 0};
  check_freq(freq, want2, 5, DRAWS);
  p.min_p = 1.0f; /* only the maximum */
  draw(&p, l5, 5, 1000, freq);
  CHECK(freq[0] == 1.0);
  /* with top-k (sorted path) and with top-p together */
  p.min_p = 0.25f;
  p.top_k = 4;
  draw(&p, l5, 5, DRAWS, freq);
  check_freq(freq, want, 5, DRAWS);
  p.top_k = 0;
  p.top_p = 0.7f;
  draw(&p, l5, 5, DRAWS, freq);
  check_freq(freq, want2, 5, DRAWS);
  /* min-p is relative to the tempered distribution: at T = 0.5, p/p_max of
   * token 1 is 0.25 */
  p = params(0.5f, 6);
  p.min_p = 0.26f;
  draw(&p, l5, 5, 2000, freq);
  CHECK(freq[0] == 1.0);
}

static void test_penalties(void) {
  enum { V = 6 };
  const float base[V] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f};
  float row[V];
  sched_sampler_t s;

  /* repetition: ids 0 and 1 in the prompt, 2 generated, 3..5 untouched */
  sched_sample_params_t p = params(0.0f, 1);
  p.repetition_penalty = 2.0f;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
  const int32_t prompt[] = {0, 1, 1, -5, 99};
  sched_sampler_prompt(&s, prompt, 5);
  sched_sampler_accept(&s, 2);
  sched_sampler_accept(&s, 2);
  memcpy(row, base, sizeof row);
  CHECK_INT_EQ(sched_sample(&s, row, NULL), 3);
  CHECK_NEAR(row[0], 1.0, 0);  /* positive: divided */
  CHECK_NEAR(row[1], -2.0, 0); /* negative: multiplied */
  CHECK_NEAR(row[2], 0.25, 0); /* generated counts too, once however often */
  CHECK_NEAR(row[3], 3.0, 0);
  CHECK_NEAR(row[4], -2.0, 0);
  CHECK_NEAR(row[5], 1.0, 0);
  sched_sampler_destroy(&s);

  /* presence and frequency: generated ids only, prompt ignored */
  p = params(0.0f, 1);
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
  sched_sampler_prompt(&s, prompt, 2);
  sched_sampler_accept(&s, 3);
  sched_sampler_accept(&s, 3);
  sched_sampler_accept(&s, 3);
  sched_sampler_accept(&s, 4);
  sched_sampler_accept(&s, V); /* out of range: ignored */
  memcpy(row, base, sizeof row);
  CHECK_INT_EQ(sched_sample(&s, row, NULL), 0); /* 3 fell to 1.75 */
  CHECK_NEAR(row[0], 2.0, 0);
  CHECK_NEAR(row[1], -1.0, 0);
  CHECK_NEAR(row[3], 3.0 - 0.5 - 3 * 0.25, 1e-6);
  CHECK_NEAR(row[4], -2.0 - 0.5 - 0.25, 1e-6);
  CHECK_NEAR(row[5], 1.0, 0);
  sched_sampler_destroy(&s);

  /* negative presence/frequency reward repeats */
  p.presence_penalty = -1.0f;
  p.frequency_penalty = -0.5f;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
  sched_sampler_accept(&s, 5);
  sched_sampler_accept(&s, 5);
  sched_sampler_accept(&s, 5);
  memcpy(row, base, sizeof row);
  CHECK_INT_EQ(sched_sample(&s, row, NULL), 5);
  CHECK_NEAR(row[5], 1.0 + 1.0 + 3 * 0.5, 1e-6);
  sched_sampler_destroy(&s);

  /* all three: repetition first, then frequency and presence */
  p = params(0.0f, 1);
  p.repetition_penalty = 1.5f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 1.0f;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
  sched_sampler_prompt(&s, prompt, 1); /* id 0 */
  sched_sampler_accept(&s, 3);
  sched_sampler_accept(&s, 3);
  memcpy(row, base, sizeof row);
  float lp = 0.0f;
  int32_t id = sched_sample(&s, row, &lp);
  CHECK_NEAR(row[0], 2.0 / 1.5, 1e-6);
  CHECK_NEAR(row[3], 3.0 / 1.5 - 2 * 1.0 - 0.5, 1e-6);
  CHECK_INT_EQ(id, sched_argmax(row, V));
  CHECK_INT_EQ(id, 0);
  double sm[V];
  softmax(row, V, 1.0f, sm); /* logprob is under the penalised logits */
  CHECK_NEAR(lp, log(sm[0]), 1e-5);
  sched_sampler_destroy(&s);

  /* defaults change nothing */
  sched_sample_params_default(&p);
  p.temperature = 0.0f;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
  sched_sampler_prompt(&s, prompt, 2);
  sched_sampler_accept(&s, 3);
  memcpy(row, base, sizeof row);
  sched_sample(&s, row, NULL);
  CHECK(memcmp(row, base, sizeof row) == 0);
  sched_sampler_destroy(&s);
}

/* What a device is handed (sched_sampler_penalty) rewrites a row exactly as
 * sched_sample does: random histories over a vocabulary of 500, every mix
 * of the three penalties; the drawn token is then the same as well. */
static void test_penalties_exported(void) {
  enum { V = 500 };
  static float a[V], b[V];
  static int32_t ids[V], seen[V];
  uint64_t rng = 77;
  for (int trial = 0; trial < 40; trial++) {
    sched_sample_params_t p = params(trial % 2 ? 0.0f : 0.9f, 1000 + (uint64_t)trial);
    p.repetition_penalty = trial % 4 < 2 ? 1.0f : 1.1f + 0.1f * (float)(trial % 5);
    p.presence_penalty = trial % 3 ? 0.3f : 0.0f;
    p.frequency_penalty = trial % 5 ? -0.2f + 0.1f * (float)(trial % 7) : 0.0f;
    sched_sampler_t s, t;
    CHECK_INT_EQ(sched_sampler_init(&s, &p, V), 0);
    CHECK_INT_EQ(sched_sampler_init(&t, &p, V), 0);
    int32_t prompt[300];
    const int32_t np = (int32_t)(rng_next(&rng) % 300);
    for (int32_t i = 0; i < np; i++) prompt[i] = (int32_t)(rng_next(&rng) % V);
    sched_sampler_prompt(&s, prompt, (size_t)np);
    sched_sampler_prompt(&t, prompt, (size_t)np);
    const int32_t ng = (int32_t)(rng_next(&rng) % 200);
    for (int32_t i = 0; i < ng; i++) {
      int32_t id = (int32_t)(rng_next(&rng) % 60); /* repeats */
      sched_sampler_accept(&s, id);
      sched_sampler_accept(&t, id);
    }
    for (int32_t i = 0; i < V; i++)
      a[i] = b[i] = (float)((double)rng_next(&rng) / 0x1p64 * 8.0 - 4.0);
    k_penalty_t row;
    const int32_t n = sched_sampler_penalty(&t, &row, 7, ids, seen);
    CHECK_INT_EQ(row.first, 7);
    CHECK_INT_EQ(row.n, n);
    const bool any = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f ||
                     p.frequency_penalty != 0.0f;
    if (!any) CHECK_INT_EQ(n, 0);
    for (int32_t j = 0; j < n; j++) {
      for (int32_t k = 0; k < j; k++) CHECK(ids[k] != ids[j]); /* each id once */
      b[ids[j]] = k_draw_penalise(b[ids[j]], seen[j] >> 1, seen[j] & 1, row.rep, row.pres,
                                  row.freq);
    }
    k_draw_t d;
    sched_sampler_next_draw(&t, &d);
    const int32_t want = sched_sample(&s, a, NULL);
    for (int32_t i = 0; i < V; i++)
      if (memcmp(&a[i], &b[i], sizeof a[i]))
        FAIL_AT("trial %d id %d: %g vs %g", trial, i, a[i], b[i]);
    float w[V];
    int32_t idx[V];
    CHECK_INT_EQ(k_draw_row(b, V, &d, w, idx), want);
    CHECK(sched_sampler_on_device(&t, true));
    CHECK(sched_sampler_on_device(&t, false) == !any);
    sched_sampler_destroy(&s);
    sched_sampler_destroy(&t);
  }
}

static void expect_bad(sched_sample_params_t p, const char *name) {
  char err[200] = "";
  int rc = sched_sample_params_check(&p, err, sizeof err);
  if (rc != -EINVAL) FAIL_AT("%s: rc %d, expected -EINVAL", name, rc);
  if (!strstr(err, name)) FAIL_AT("message \"%s\" does not name %s", err, name);
  sched_sampler_t s;
  CHECK_INT_EQ(sched_sampler_init(&s, &p, 10), -EINVAL);
  sched_sampler_destroy(&s);
}

static void test_params_check(void) {
  sched_sample_params_t d;
  sched_sample_params_default(&d);
  CHECK_INT_EQ(sched_sample_params_check(&d, NULL, 0), 0);
  CHECK_NEAR(d.temperature, 1.0, 0);
  CHECK_NEAR(d.top_p, 1.0, 0);
  CHECK_NEAR(d.repetition_penalty, 1.0, 0);
  CHECK(!d.has_seed);

  sched_sample_params_t p;
#define BAD(field, value)                                                                          \
  do {                                                                                             \
    p = d;                                                                                         \
    p.field = (value);                                                                             \
    expect_bad(p, #field);                                                                         \
  } while (0)
  BAD(temperature, -0.1f);
  BAD(temperature, NAN);
  BAD(temperature, INFINITY);
  BAD(top_p, 0.0f);
  BAD(top_p, -0.5f);
  BAD(top_p, 1.01f);
  BAD(top_p, NAN);
  BAD(min_p, -0.01f);
  BAD(min_p, 1.5f);
  BAD(min_p, NAN);
  BAD(repetition_penalty, 0.0f);
  BAD(repetition_penalty, -1.0f);
  BAD(repetition_penalty, NAN);
  BAD(repetition_penalty, INFINITY);
  BAD(presence_penalty, 2.5f);
  BAD(presence_penalty, -2.5f);
  BAD(presence_penalty, NAN);
  BAD(frequency_penalty, 3.0f);
  BAD(frequency_penalty, -2.01f);
  BAD(frequency_penalty, NAN);
#undef BAD

  /* edges that are fine */
  p = d;
  p.temperature = 0.0f;
  p.top_p = 1e-6f;
  p.min_p = 1.0f;
  p.top_k = -1;
  p.presence_penalty = -2.0f;
  p.frequency_penalty = 2.0f;
  p.repetition_penalty = 0.01f;
  CHECK_INT_EQ(sched_sample_params_check(&p, NULL, 0), 0);
  p.top_k = 1 << 30;
  CHECK_INT_EQ(sched_sample_params_check(&p, NULL, 0), 0);

  /* init: bad vocab size; destroy is NULL-safe and idempotent */
  sched_sampler_t s;
  CHECK_INT_EQ(sched_sampler_init(&s, &d, 0), -EINVAL);
  sched_sampler_destroy(&s);
  sched_sampler_destroy(&s);
  sched_sampler_destroy(NULL);
}

/* Unseeded samplers draw from a random source: two of them (almost surely)
 * disagree somewhere over a long flat sequence. */
static void test_unseeded(void) {
  enum { V = 64, STEPS = 64 };
  float row[V];
  sched_sample_params_t p;
  sched_sample_params_default(&p);
  sched_sampler_t a, b;
  CHECK_INT_EQ(sched_sampler_init(&a, &p, V), 0);
  CHECK_INT_EQ(sched_sampler_init(&b, &p, V), 0);
  int differ = 0;
  for (int t = 0; t < STEPS; t++) {
    for (int i = 0; i < V; i++) row[i] = 0.0f;
    int32_t x = sched_sample(&a, row, NULL);
    for (int i = 0; i < V; i++) row[i] = 0.0f;
    differ += x != sched_sample(&b, row, NULL);
  }
  CHECK(differ > 0);
  sched_sampler_destroy(&a);
  sched_sampler_destroy(&b);
}

int main(void) {
  RUN(test_argmax);
  RUN(test_seed_reproducible);
  RUN(test_temperature_distribution);
  RUN(test_top_k);
  RUN(test_top_p);
  RUN(test_min_p);
  RUN(test_penalties);
  RUN(test_penalties_exported);
  RUN(test_params_check);
  RUN(test_unseeded);
  return 0;
}
