/* Growable byte buffer and the JSON writer the responses are built with:
 * strings are escaped and made valid UTF-8, floats written so that every
 * JSON parser accepts them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/internal.h"

void srv__buf_init(srv_buf_t *b) { memset(b, 0, sizeof *b); }

void srv__buf_free(srv_buf_t *b) {
  if (!b) return;
  if (!b->borrowed) free(b->p);
  memset(b, 0, sizeof *b);
}

static bool buf_reserve(srv_buf_t *b, size_t extra) {
  if (b->oom) return false;
  if (extra >= SIZE_MAX / 2 - b->len) goto oom;
  size_t need = b->len + extra + 1;
  if (need <= b->cap) return true;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2;
  char *p;
  if (b->borrowed) {
    if ((p = malloc(cap)) && b->len) memcpy(p, b->p, b->len);
  } else {
    p = realloc(b->p, cap);
  }
  if (!p) goto oom;
  b->p = p;
  b->borrowed = false;
  b->cap = cap;
  return true;
oom:
  b->oom = true;
  return false;
}

void srv__buf_add(srv_buf_t *b, const void *p, size_t n) {
  if (!buf_reserve(b, n)) return;
  if (n) memcpy(b->p + b->len, p, n);
  b->len += n;
  b->p[b->len] = '\0';
}

void srv__buf_adds(srv_buf_t *b, const char *s) { srv__buf_add(b, s, strlen(s)); }

void srv__buf_printf(srv_buf_t *b, const char *fmt, ...) {
  va_list ap;
  char small[256];
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n < sizeof small) {
    srv__buf_add(b, small, (size_t)n);
    return;
  }
  if (!buf_reserve(b, (size_t)n)) return;
  va_start(ap, fmt);
  vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

char *srv__buf_take(srv_buf_t *b) {
  char *p = b->p;
  if (!p) p = calloc(1, 1);
  srv__buf_init(b);
  return p;
}

/* Length of the valid UTF-8 sequence at s[0..n), 0 when it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  unsigned min;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) len = 2, min = 0x80;
  else if (c >= 0xe0 && c <= 0xef) len = 3, min = 0x800;
  else if (c >= 0xf0 && c <= 0xf4) len = 4, min = 0x10000;
  else return 0;
  if (n < len) return 0;
  unsigned cp = c & (0x7f >> len);
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

bool srv__utf8_valid(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    size_t k = utf8_seq(u + i, n - i);
    if (!k) return false;
    i += k;
  }
  return true;
}

void srv__json_str(srv_buf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *u = (const unsigned char *)s;
  if (!buf_reserve(b, n + 2)) return;
  srv__buf_add(b, "\"", 1);
  size_t run = 0; /* start of the pending run of bytes copied verbatim */
  for (size_t i = 0; i < n;) {
    unsigned c = u[i];
    if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
      i++;
      continue;
    }
    size_t k = c >= 0x80 ? utf8_seq(u + i, n - i) : 0;
    if (k) { /* valid multi-byte character: verbatim */
      i += k;
      continue;
    }
    srv__buf_add(b, s + run, i - run);
    char esc[8];
    const char *e = esc;
    size_t elen = 2;
    switch (c) {
    case '"': e = "\\\""; break;
    case '\\': e = "\\\\"; break;
    case '\n': e = "\\n"; break;
    case '\r': e = "\\r"; break;
    case '\t': e = "\\t"; break;
    case '\b': e = "\\b"; break;
    case '\f': e = "\\f"; break;
    default:
      if (c < 0x20) {
        memcpy(esc, "\\u00", 4);
        esc[4] = hex[c >> 4];
        esc[5] = hex[c & 15];
        elen = 6;
      } else { /* an ill-formed byte */
        e = "\xef\xbf\xbd";
        elen = 3;
      }
    }
    srv__buf_add(b, e, elen);
    i++;
    run = i;
  }
  srv__buf_add(b, s + run, n - run);
  srv__buf_add(b, "\"", 1);
}

void srv__json_cstr(srv_buf_t *b, const char *s) {
  if (!s) srv__buf_add(b, "null", 4);
  else srv__json_str(b, s, strlen(s));
}

void srv__json_float(srv_buf_t *b, double v) {
  if (!isfinite(v)) v = -9999.0;
  char tmp[40];
  int n = snprintf(tmp, sizeof tmp, "%.9g", v);
  /* "1e-05" is valid JSON; "inf"/"nan" cannot occur here. Keep a float look. */
  srv__buf_add(b, tmp, (size_t)n);
  if (!strpbrk(tmp, ".eE")) srv__buf_add(b, ".0", 2);
}
