/* Chat templates. Each family renders exactly what its reference Jinja
 * template renders (see scripts/reference/chat_fixtures.py for the template
 * strings and tests/test-chat.c for the comparison):
 *   ChatML   teknium/OpenHermes-2.5 / SmolLM2 / Qwen2.5 (no tools);
 *   Llama-3  meta-llama/Meta-Llama-3-8B-Instruct (content | trim);
 *   Llama-2  meta-llama/Llama-2-7b-chat-hf (content.strip(), <<SYS>> block);
 *   Mistral  mistralai "v1" (Mistral-7B-Instruct-v0.2, system prepended to
 *            the first user message).
 * Detection looks for marker strings only; there is no Jinja interpreter.
 * The only Jinja that is parsed is string literals, to find a default system
 * prompt the template inserts when messages[0] is not a system message. */
#include "model/model-internal.h"
#include "model/chat.h"

#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static bool has(const char *s, const char *needle) { return strstr(s, needle) != NULL; }

static char *dup_or_null(const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

const char *model_chat_kind_name(model_chat_kind_t k) {
  switch (k) {
  case MODEL_CHAT_CHATML: return "chatml";
  case MODEL_CHAT_LLAMA3: return "llama3";
  case MODEL_CHAT_LLAMA2: return "llama2";
  case MODEL_CHAT_MISTRAL: return "mistral";
  case MODEL_CHAT_UNKNOWN: break;
  }
  return "unknown";
}

void model_chat_destroy(model_chat_t *c) {
  if (!c) return;
  free(c->default_system);
  free(c->bos);
  free(c->eos);
  memset(c, 0, sizeof *c);
}

/* ---- growable output buffer ---------------------------------------------- */

typedef struct sbuf {
  char *p; /* owns */
  size_t len;
  size_t cap;
  int rc; /* first error (-ENOMEM), sticky */
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t n) {
  if (b->rc) return;
  if (n >= SIZE_MAX - b->len) {
    b->rc = -ENOMEM;
    return;
  }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) {
      if (cap > SIZE_MAX / 2) {
        cap = b->len + n + 1;
        break;
      }
      cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) {
      b->rc = -ENOMEM;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_puts(sbuf_t *b, const char *s) {
  if (s) sb_put(b, s, strlen(s));
}

static void sb_reset(sbuf_t *b) {
  b->len = 0;
  if (b->p) b->p[0] = '\0';
}

/* ---- Python str.strip() whitespace over UTF-8 ------------------------------
 * Jinja's trim filter and str.strip() remove the characters for which
 * str.isspace() is true: U+0009-000D, U+001C-001F, U+0020, U+0085, U+00A0,
 * U+1680, U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000. */

static size_t ws_at(const unsigned char *s, size_t n) { /* length of a space at s, or 0 */
  if (n >= 1 && ((s[0] >= 0x09 && s[0] <= 0x0d) || (s[0] >= 0x1c && s[0] <= 0x20))) return 1;
  if (n >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0)) return 2;
  if (n >= 3) {
    if (s[0] == 0xe1 && s[1] == 0x9a && s[2] == 0x80) return 3; /* U+1680 */
    if (s[0] == 0xe2 && s[1] == 0x80 &&
        ((s[2] >= 0x80 && s[2] <= 0x8a) || s[2] == 0xa8 || s[2] == 0xa9 || s[2] == 0xaf))
      return 3;                                                /* U+2000-200A, 2028/9, 202F */
    if (s[0] == 0xe2 && s[1] == 0x81 && s[2] == 0x9f) return 3; /* U+205F */
    if (s[0] == 0xe3 && s[1] == 0x80 && s[2] == 0x80) return 3; /* U+3000 */
  }
  return 0;
}

static size_t ws_before(const unsigned char *s, size_t n) { /* length of a space ending at s+n */
  for (size_t k = 1; k <= 3 && k <= n; k++)
    if (ws_at(s + n - k, k) == k) return k;
  return 0;
}

/* Strip the text appended to b since position start, as str.strip() does. */
static void sb_strip_from(sbuf_t *b, size_t start) {
  if (b->rc) return;
  const unsigned char *s = (const unsigned char *)b->p + start;
  size_t n = b->len - start, k;
  while (n && (k = ws_before(s, n))) n -= k;
  size_t lead = 0;
  while (lead < n && (k = ws_at(s + lead, n - lead))) lead += k;
  memmove(b->p + start, b->p + start + lead, n - lead);
  b->len = start + n - lead;
  b->p[b->len] = '\0';
}

static void sb_put_stripped(sbuf_t *b, const char *s) {
  size_t start = b->len;
  sb_puts(b, s);
  sb_strip_from(b, start);
}

/* ---- Jinja string literals ---------------------------------------------- */

static void put_utf8(sbuf_t *b, uint32_t cp) {
  char u[4];
  size_t n;
  if (cp < 0x80) {
    u[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    u[0] = (char)(0xc0 | (cp >> 6));
    u[1] = (char)(0x80 | (cp & 0x3f));
    n = 2;
  } else if (cp < 0x10000) {
    u[0] = (char)(0xe0 | (cp >> 12));
    u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[2] = (char)(0x80 | (cp & 0x3f));
    n = 3;
  } else {
    u[0] = (char)(0xf0 | (cp >> 18));
    u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[3] = (char)(0x80 | (cp & 0x3f));
    n = 4;
  }
  sb_put(b, u, n);
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* Decode the literal whose opening quote is at *pp, as Jinja does (Python
 * unicode-escape). Leaves *pp after the closing quote; false when the
 * literal is unterminated. */
static bool read_literal(const char **pp, sbuf_t *b) {
  const char *p = *pp;
  char q = *p++;
  while (*p && *p != q) {
    if (*p != '\\') {
      const char *run = p;
      while (*p && *p != q && *p != '\\') p++;
      sb_put(b, run, (size_t)(p - run));
      continue;
    }
    p++;
    char e = *p;
    if (!e) break;
    p++;
    switch (e) {
    case 'n': sb_put(b, "\n", 1); break;
    case 't': sb_put(b, "\t", 1); break;
    case 'r': sb_put(b, "\r", 1); break;
    case 'a': sb_put(b, "\a", 1); break;
    case 'b': sb_put(b, "\b", 1); break;
    case 'f': sb_put(b, "\f", 1); break;
    case 'v': sb_put(b, "\v", 1); break;
    case '\\': sb_put(b, "\\", 1); break;
    case '\'': sb_put(b, "'", 1); break;
    case '"': sb_put(b, "\"", 1); break;
    case '\n': break; /* line continuation */
    case 'x':
    case 'u':
    case 'U': {
      int want = e == 'x' ? 2 : e == 'u' ? 4 : 8, got = 0;
      uint32_t cp = 0;
      while (got < want && hexval(p[got]) >= 0) cp = cp * 16 + (uint32_t)hexval(p[got++]);
      if (got != want || cp > 0x10ffff) return false; /* Jinja rejects it too */
      p += got;
      put_utf8(b, cp);
      break;
    }
    default:
      if (e >= '0' && e <= '7') {
        uint32_t cp = (uint32_t)(e - '0');
        for (int i = 0; i < 2 && *p >= '0' && *p <= '7'; i++) cp = cp * 8 + (uint32_t)(*p++ - '0');
        put_utf8(b, cp);
      } else { /* unknown escape: kept as written */
        char two[2] = {'\\', e};
        sb_put(b, two, 2);
      }
    }
  }
  if (*p != q) return false;
  *pp = p + 1;
  return true;
}

/* head + non-empty text + tail inside one piece of template text: a copy of
 * the text, or NULL (and *rc = -ENOMEM when the copy fails). */
static char *match_fixed(const sbuf_t *piece, const char *head, const char *tail, int *rc) {
  const char *h = piece->p ? strstr(piece->p, head) : NULL;
  if (!h) return NULL;
  const char *text = h + strlen(head);
  const char *t = strstr(text, tail);
  if (!t || t == text) return NULL;
  sbuf_t out = {0};
  sb_put(&out, text, (size_t)(t - text));
  if (out.rc) *rc = out.rc;
  return out.p;
}

/* Find, in the template's text (raw text and string literals inside tags),
 * one piece holding head + non-empty text + tail: a fixed system turn.
 * Returns a new string, NULL when there is none, or sets *rc on ENOMEM. */
static char *find_fixed_system(const char *tmpl, const char *head, const char *tail, int *rc) {
  sbuf_t piece = {0};
  char *found = NULL;
  const char *p = tmpl;
  while (*p && !found && !piece.rc && !*rc) {
    sb_reset(&piece);
    if (p[0] == '{' && p[1] == '#') { /* comment */
      const char *end = strstr(p + 2, "#}");
      p = end ? end + 2 : p + strlen(p);
      continue;
    }
    if (p[0] == '{' && (p[1] == '{' || p[1] == '%')) { /* tag: only its literals */
      const char close = p[1] == '{' ? '}' : '%';
      p += 2;
      while (*p && !(p[0] == close && p[1] == '}') && !found) {
        if (*p != '\'' && *p != '"') {
          p++;
          continue;
        }
        sb_reset(&piece);
        if (!read_literal(&p, &piece)) {
          p += strlen(p); /* unterminated: the rest is no template */
          break;
        }
        found = match_fixed(&piece, head, tail, rc);
      }
      if (!found && *p) p += 2; /* past the closing %} or }} */
      continue;
    }
    const char *run = p; /* raw text up to the next tag */
    while (*p && !(p[0] == '{' && (p[1] == '{' || p[1] == '%' || p[1] == '#'))) p++;
    sb_put(&piece, run, (size_t)(p - run));
    found = match_fixed(&piece, head, tail, rc);
  }
  if (piece.rc) *rc = piece.rc;
  free(piece.p);
  return found;
}

/* ---- init ---------------------------------------------------------------- */

static const char CHATML_SYS_HEAD[] = "<|im_start|>system\n";
static const char CHATML_SYS_TAIL[] = "<|im_end|>";
static const char LLAMA3_SYS_HEAD[] = "<|start_header_id|>system<|end_header_id|>\n\n";
static const char LLAMA3_SYS_TAIL[] = "<|eot_id|>";

/* tmpl NULL: a named template, the family's reference use of BOS/EOS. */
static int chat_setup(model_chat_t *c, model_chat_kind_t kind, const char *tmpl, const char *bos,
                      const char *eos, char *err, size_t errlen) {
  bool uses_bos = false, uses_eos = false;
  const char *bos_text = bos;
  switch (kind) {
  case MODEL_CHAT_CHATML: uses_bos = tmpl && has(tmpl, "bos_token"); break;
  case MODEL_CHAT_LLAMA3:
    uses_bos = !tmpl || has(tmpl, "bos_token");
    if (tmpl && !uses_bos && has(tmpl, "<|begin_of_text|>")) {
      uses_bos = true; /* written as a literal rather than through bos_token */
      bos_text = "<|begin_of_text|>";
    }
    break;
  case MODEL_CHAT_LLAMA2:
  case MODEL_CHAT_MISTRAL:
    uses_bos = !tmpl || has(tmpl, "bos_token");
    uses_eos = !tmpl || has(tmpl, "eos_token");
    break;
  case MODEL_CHAT_UNKNOWN: break;
  }
  c->kind = kind;
  if (uses_bos && bos_text && *bos_text && !(c->bos = dup_or_null(bos_text))) goto fail_nomem;
  if (uses_eos && eos && *eos && !(c->eos = dup_or_null(eos))) goto fail_nomem;
  if (tmpl && (kind == MODEL_CHAT_CHATML || kind == MODEL_CHAT_LLAMA3)) {
    int rc = 0;
    c->default_system = kind == MODEL_CHAT_CHATML
                            ? find_fixed_system(tmpl, CHATML_SYS_HEAD, CHATML_SYS_TAIL, &rc)
                            : find_fixed_system(tmpl, LLAMA3_SYS_HEAD, LLAMA3_SYS_TAIL, &rc);
    if (rc) goto fail_nomem;
  }
  return 0;

fail_nomem:
  model_chat_destroy(c);
  return model__errf(err, errlen, -ENOMEM, "chat: out of memory");
}

#define CHAT_NAMES "chatml, llama3, llama2, mistral"

int model_chat_init_detect(model_chat_t *c, const char *tmpl, const char *bos, const char *eos,
                           char *err, size_t errlen) {
  assert(c);
  memset(c, 0, sizeof *c);
  if (!tmpl || !*tmpl)
    return model__errf(err, errlen, -ENOTSUP,
                   "chat: the model has no chat template; choose one with --chat-template "
                   "(" CHAT_NAMES ")");
  const char *other = NULL; /* a family that shares markers with a built-in one */
  model_chat_kind_t kind = MODEL_CHAT_UNKNOWN;
  if (has(tmpl, "<|im_start|>")) {
    if (has(tmpl, "<|im_sep|>"))
      other = "Phi-4 (<|im_sep|>)";
    else if (has(tmpl, "<end_of_utterance>"))
      other = "SmolVLM (<end_of_utterance>)";
    else if (!has(tmpl, "<|im_end|>"))
      other = "<|im_start|> without <|im_end|>";
    else
      kind = MODEL_CHAT_CHATML;
  } else if (has(tmpl, "<|start_header_id|>") && has(tmpl, "<|end_header_id|>")) {
    kind = MODEL_CHAT_LLAMA3;
  } else if (has(tmpl, "[INST]")) {
    if (has(tmpl, "[SYSTEM_PROMPT]"))
      other = "Mistral v7 ([SYSTEM_PROMPT])";
    else
      kind = has(tmpl, "<<SYS>>") ? MODEL_CHAT_LLAMA2 : MODEL_CHAT_MISTRAL;
  }
  if (kind == MODEL_CHAT_UNKNOWN) {
    if (other)
      return model__errf(err, errlen, -ENOTSUP,
                     "chat: template family %s is not built in; choose one with --chat-template "
                     "(" CHAT_NAMES ")",
                     other);
    return model__errf(err, errlen, -ENOTSUP,
                   "chat: template not recognised (no ChatML, Llama-3, Llama-2 or Mistral "
                   "markers); choose one with --chat-template (" CHAT_NAMES ")");
  }
  return chat_setup(c, kind, tmpl, bos, eos, err, errlen);
}

int model_chat_init_named(model_chat_t *c, const char *name, const char *bos, const char *eos,
                          char *err, size_t errlen) {
  assert(c);
  memset(c, 0, sizeof *c);
  static const model_chat_kind_t kinds[] = {MODEL_CHAT_CHATML, MODEL_CHAT_LLAMA3, MODEL_CHAT_LLAMA2,
                                            MODEL_CHAT_MISTRAL};
  for (size_t i = 0; name && i < sizeof kinds / sizeof kinds[0]; i++)
    if (strcmp(name, model_chat_kind_name(kinds[i])) == 0)
      return chat_setup(c, kinds[i], NULL, bos, eos, err, errlen);
  return model__errf(err, errlen, -EINVAL, "chat: unknown chat template name \"%s\" (expected one of "
                 CHAT_NAMES ")", name ? name : "(null)");
}

/* ---- render -------------------------------------------------------------- */

typedef enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT } role_t;

static int parse_role(const char *r) {
  if (!r) return -1;
  if (strcmp(r, "system") == 0) return ROLE_SYSTEM;
  if (strcmp(r, "user") == 0) return ROLE_USER;
  if (strcmp(r, "assistant") == 0) return ROLE_ASSISTANT;
  return -1;
}

static const char *content_of(const model_chat_msg_t *m) { return m->content ? m->content : ""; }

static void render_chatml(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n, bool agp,
                          sbuf_t *b) {
  sb_puts(b, c->bos);
  if (c->default_system && parse_role(msgs[0].role) != ROLE_SYSTEM) {
    sb_puts(b, CHATML_SYS_HEAD);
    sb_puts(b, c->default_system);
    sb_puts(b, "<|im_end|>\n");
  }
  for (size_t i = 0; i < n; i++) {
    sb_puts(b, "<|im_start|>");
    sb_puts(b, msgs[i].role);
    sb_puts(b, "\n");
    sb_puts(b, content_of(&msgs[i]));
    sb_puts(b, "<|im_end|>\n");
  }
  if (agp) sb_puts(b, "<|im_start|>assistant\n");
}

static void llama3_turn(sbuf_t *b, const char *role, const char *content) {
  sb_puts(b, "<|start_header_id|>");
  sb_puts(b, role);
  sb_puts(b, "<|end_header_id|>\n\n");
  sb_put_stripped(b, content);
  sb_puts(b, "<|eot_id|>");
}

static void render_llama3(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n, bool agp,
                          sbuf_t *b) {
  sb_puts(b, c->bos);
  if (c->default_system && parse_role(msgs[0].role) != ROLE_SYSTEM)
    llama3_turn(b, "system", c->default_system);
  for (size_t i = 0; i < n; i++) llama3_turn(b, msgs[i].role, content_of(&msgs[i]));
  if (agp) sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* Llama-2 and Mistral: an optional first system message, then strictly
 * user/assistant/user/...; the system text goes into the first user turn. */
static int check_alternation(const model_chat_msg_t *msgs, size_t n, size_t first, char *err,
                             size_t errlen) {
  if (first == n)
    return model__errf(err, errlen, -EINVAL,
                   "chat: this template needs a user message after the system message");
  for (size_t i = first; i < n; i++) {
    int want = (i - first) % 2 == 0 ? ROLE_USER : ROLE_ASSISTANT;
    if (parse_role(msgs[i].role) != want)
      return model__errf(err, errlen, -EINVAL,
                     "chat: message %zu is \"%s\" but this template needs an optional first system "
                     "message, then alternating user/assistant messages starting with user",
                     i, msgs[i].role);
  }
  return 0;
}

static void render_llama2(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n,
                          size_t first, const char *sys, sbuf_t *b) {
  for (size_t i = first; i < n; i++) {
    if (parse_role(msgs[i].role) == ROLE_USER) {
      sb_puts(b, c->bos);
      sb_puts(b, "[INST] ");
      size_t start = b->len; /* strip() covers the <<SYS>> block too */
      if (i == first && sys) {
        sb_puts(b, "<<SYS>>\n");
        sb_puts(b, sys);
        sb_puts(b, "\n<</SYS>>\n\n");
      }
      sb_puts(b, content_of(&msgs[i]));
      sb_strip_from(b, start);
      sb_puts(b, " [/INST]");
    } else {
      sb_puts(b, " ");
      sb_put_stripped(b, content_of(&msgs[i]));
      sb_puts(b, " ");
      sb_puts(b, c->eos);
    }
  }
}

static void render_mistral(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n,
                           size_t first, const char *sys, sbuf_t *b) {
  sb_puts(b, c->bos);
  for (size_t i = first; i < n; i++) {
    if (parse_role(msgs[i].role) == ROLE_USER) {
      sb_puts(b, " [INST] ");
      if (i == first && sys) {
        sb_puts(b, sys);
        sb_puts(b, "\n\n");
      }
      sb_puts(b, content_of(&msgs[i]));
      sb_puts(b, " [/INST]");
    } else {
      sb_puts(b, " ");
      sb_puts(b, content_of(&msgs[i]));
      sb_puts(b, c->eos);
    }
  }
}

int model_chat_render(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n,
                      bool add_generation_prompt, char **out, char *err, size_t errlen) {
  assert(c && out);
  *out = NULL;
  if (n == 0 || !msgs) return model__errf(err, errlen, -EINVAL, "chat: no messages");
  for (size_t i = 0; i < n; i++)
    if (parse_role(msgs[i].role) < 0)
      return model__errf(err, errlen, -EINVAL,
                     "chat: message %zu has unknown role \"%s\" (expected system, user or "
                     "assistant)",
                     i, msgs[i].role ? msgs[i].role : "(null)");

  sbuf_t b = {0};
  int rc = 0;
  switch (c->kind) {
  case MODEL_CHAT_CHATML: render_chatml(c, msgs, n, add_generation_prompt, &b); break;
  case MODEL_CHAT_LLAMA3: render_llama3(c, msgs, n, add_generation_prompt, &b); break;
  case MODEL_CHAT_LLAMA2:
  case MODEL_CHAT_MISTRAL: {
    /* These templates end every user turn with [/INST], so the assistant
     * turn is always open; add_generation_prompt changes nothing. */
    const bool sys0 = parse_role(msgs[0].role) == ROLE_SYSTEM;
    const size_t first = sys0 ? 1 : 0;
    const char *sys = sys0 ? content_of(&msgs[0]) : c->default_system;
    rc = check_alternation(msgs, n, first, err, errlen);
    if (rc) break;
    if (c->kind == MODEL_CHAT_LLAMA2)
      render_llama2(c, msgs, n, first, sys, &b);
    else
      render_mistral(c, msgs, n, first, sys, &b);
    break;
  }
  case MODEL_CHAT_UNKNOWN:
    rc = model__errf(err, errlen, -EINVAL, "chat: template not initialised");
    break;
  }
  if (!rc && b.rc) rc = model__errf(err, errlen, b.rc, "chat: out of memory");
  if (!rc && !b.p) sb_put(&b, "", 0); /* an empty rendering is still a string */
  if (!rc && b.rc) rc = model__errf(err, errlen, b.rc, "chat: out of memory");
  if (rc) {
    free(b.p);
    return rc;
  }
  *out = b.p;
  return 0;
}
