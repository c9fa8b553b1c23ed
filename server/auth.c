/* Bearer API key check (--api-key) with a constant-time comparison: the time
 * taken depends on the lengths only, never on where the bytes differ. */
#include <string.h>
#include <strings.h>

#include "server/internal.h"

bool srv__ct_equal(const void *a, size_t alen, const void *b, size_t blen) {
  const volatile unsigned char *x = a, *y = b;
  size_t n = alen > blen ? alen : blen;
  unsigned diff = alen != blen;
  for (size_t i = 0; i < n; i++) {
    /* Read in bounds even when the lengths differ: the shorter string wraps. */
    unsigned cx = alen ? x[i % alen] : 0u, cy = blen ? y[i % blen] : 0u;
    diff |= cx ^ cy;
  }
  return diff == 0;
}

bool srv__auth_ok(const char *header, size_t header_len, char *const *keys, int n_keys) {
  if (n_keys <= 0) return true;
  if (!header) return false;
  static const char scheme[] = "Bearer ";
  size_t sl = sizeof scheme - 1;
  if (header_len < sl || strncasecmp(header, scheme, sl) != 0) return false;
  const char *tok = header + sl;
  size_t n = header_len - sl;
  while (n && *tok == ' ') tok++, n--;
  while (n && (tok[n - 1] == ' ' || tok[n - 1] == '\t')) n--;
  bool ok = false;
  for (int i = 0; i < n_keys; i++) /* no early exit: every key takes its time */
    ok |= srv__ct_equal(tok, n, keys[i], strlen(keys[i]));
  return ok;
}
