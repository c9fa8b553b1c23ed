/* Stop strings over incrementally decoded text.
 *
 * Invariant: every occurrence of a stop string that is not complete yet
 * starts inside the held tail. After each feed, the emitted bytes are those
 * before the longest tail that is a proper prefix of some stop string, so a
 * match that completes later always starts in what is still held, and no
 * text past a stop string is ever emitted. The held tail stays shorter than
 * the longest stop string, plus the new text of one token. */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/engine-internal.h"

int sched__text_init(sched__text_t *t, size_t cap) {
  t->n = 0;
  t->cap = cap;
  t->buf = malloc(cap);
  return t->buf ? 0 : -ENOMEM;
}

void sched__text_destroy(sched__text_t *t) {
  if (!t) return;
  free(t->buf);
  memset(t, 0, sizeof *t);
}

/* Length of the longest proper prefix of s (length ls) that h[0..n) ends with. */
static size_t tail_prefix(const char *h, size_t n, const char *s, size_t ls) {
  size_t k = ls - 1 < n ? ls - 1 : n;
  for (; k > 0; k--)
    if (memcmp(h + n - k, s, k) == 0) return k;
  return 0;
}

size_t sched__text_feed(sched__text_t *t, char *const *stop, int32_t n_stop, const char *text,
                        size_t n, bool final, bool *stopped) {
  assert(t->n + n <= t->cap);
  if (n) memcpy(t->buf + t->n, text, n);
  t->n += n;
  *stopped = false;
  if (n_stop == 0) return t->n;

  size_t first = t->n; /* start of the earliest match */
  for (int32_t i = 0; i < n_stop; i++) {
    size_t ls = strlen(stop[i]);
    if (ls == 0 || ls > t->n) continue;
    const char *p = memmem(t->buf, t->n, stop[i], ls);
    if (p && (size_t)(p - t->buf) < first) {
      first = (size_t)(p - t->buf);
      *stopped = true;
    }
  }
  if (*stopped) return first;
  if (final) return t->n;

  size_t keep = 0;
  for (int32_t i = 0; i < n_stop; i++) {
    size_t ls = strlen(stop[i]);
    if (ls < 2) continue;
    size_t k = tail_prefix(t->buf, t->n, stop[i], ls);
    if (k > keep) keep = k;
  }
  return t->n - keep;
}

void sched__text_consume(sched__text_t *t, size_t k, bool stopped) {
  if (stopped || k >= t->n) {
    t->n = 0;
    return;
  }
  memmove(t->buf, t->buf + k, t->n - k);
  t->n -= k;
}
