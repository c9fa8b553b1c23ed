/* A small test harness: assertions print both values and abort.
 * A test file defines test functions and calls them from main() via RUN(). */
#ifndef PRESSD_TEST_H
#define PRESSD_TEST_H

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TEST_SKIP 77

#define FAIL_AT(...)                                                   \
  do {                                                                 \
    fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                    \
    fprintf(stderr, __VA_ARGS__);                                      \
    fputc('\n', stderr);                                               \
    abort();                                                           \
  } while (0)

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) FAIL_AT("CHECK(%s) failed", #cond);                   \
  } while (0)

#define CHECK_INT_EQ(a, b)                                             \
  do {                                                                 \
    long long a_ = (long long)(a), b_ = (long long)(b);                \
    if (a_ != b_) FAIL_AT("%s == %s: %lld != %lld", #a, #b, a_, b_);   \
  } while (0)

#define CHECK_STR_EQ(a, b)                                             \
  do {                                                                 \
    const char *a_ = (a), *b_ = (b);                                   \
    if (!a_ || !b_ || strcmp(a_, b_) != 0)                             \
      FAIL_AT("%s == %s: \"%s\" != \"%s\"", #a, #b, a_ ? a_ : "(null)", \
              b_ ? b_ : "(null)");                                     \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                          \
  do {                                                                 \
    double a_ = (double)(a), b_ = (double)(b);                         \
    if (!(fabs(a_ - b_) <= (tol)))                                     \
      FAIL_AT("%s ~= %s: %.9g vs %.9g (tol %g)", #a, #b, a_, b_, (double)(tol)); \
  } while (0)

/* Runs fn unless PRESSD_TEST_ONLY (a comma-separated list of names) leaves
 * it out; prints its name and how long it took. */
static inline bool test_selected(const char *name) {
  const char *only = getenv("PRESSD_TEST_ONLY");
  if (!only || !*only) return true;
  size_t n = strlen(name);
  for (const char *p = only; (p = strstr(p, name)); p += n)
    if ((p == only || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return true;
  return false;
}

static inline double test_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define RUN(fn)                                                        \
  do {                                                                 \
    if (!test_selected(#fn)) break;                                    \
    fprintf(stderr, "-- %s\n", #fn);                                   \
    double t0_ = test_now();                                           \
    fn();                                                              \
    fprintf(stderr, "   (%.1f s)\n", test_now() - t0_);                \
  } while (0)

/* The whole file, NUL-terminated (caller frees); NULL when it cannot be
 * opened. *len (if non-NULL) gets its size. */
static inline char *test_read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  CHECK(s);
  CHECK(fread(s, 1, (size_t)n, f) == (size_t)n);
  s[n] = '\0';
  fclose(f);
  if (len) *len = (size_t)n;
  return s;
}

/* Path of the default model for tests that need it; NULL (and the caller
 * skips) when PRESSD_MODEL is unset or the file is missing. */
static inline const char *test_model_path(void) {
  const char *p = getenv("PRESSD_MODEL");
  if (!p || !*p) return NULL;
  FILE *f = fopen(p, "rb");
  if (!f) return NULL;
  fclose(f);
  return p;
}

/* splitmix64: a seeded stream of 64-bit values, the same on every machine. */
static inline uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* Uniform in [0, n). */
static inline int32_t rng_int(uint64_t *s, int32_t n) { return (int32_t)(rng_next(s) % (uint64_t)n); }

/* Well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF). */
static inline bool test_utf8_ok(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    unsigned char c = u[i];
    size_t l;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      i++;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      l = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      l = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      l = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + l > n) return false;
    for (size_t k = 1; k < l; k++) {
      if (u[i + k] < lo || u[i + k] > hi) return false;
      lo = 0x80;
      hi = 0xBF;
    }
    i += l;
  }
  return true;
}

/* Uniform in [-1, 1). */
static inline float test_rng_unit(uint64_t *s) {
  return (float)((double)(rng_next(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static inline void *test_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  CHECK(p);
  return p;
}

/* n values uniform in [-gain, gain) (caller frees). */
static inline float *test_rand_floats(uint64_t *rng, size_t n, float gain) {
  float *p = (float *)test_xmalloc(n * sizeof *p);
  for (size_t i = 0; i < n; i++) p[i] = test_rng_unit(rng) * gain;
  return p;
}

#endif
