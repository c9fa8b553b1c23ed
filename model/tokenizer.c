/* Tokenizer: byte-level BPE and SentencePiece-style BPE with the same results
 * as llama.cpp on the same GGUF.
 *
 * Encoding runs in three stages, each mirroring llama.cpp:
 *   1. special-token partition: every control / user-defined token text found
 *      in the input becomes its id, longest texts first, leaving raw fragments;
 *   2. pre-tokenisation (BPE only): the fragment is decoded to code points the
 *      lenient way llama.cpp does (each ill-formed byte becomes U+FFFD), then
 *      split by each regex of the vocabulary's "pre" list in turn; text between
 *      two matches is kept as its own word;
 *   3. merging: per word, a heap of adjacent pairs ordered by merge rank (BPE)
 *      or by token score (SentencePiece), leftmost first on ties.
 * The regexes run on PCRE2 with Unicode properties. PCRE2's tables may be
 * older than llama.cpp's (Unicode 15.1), so \p{L}, \p{N}, \p{M}, \p{P}, \p{S}
 * are widened with the code points added since Unicode 14, and \s / \S are
 * replaced by llama.cpp's whitespace set (which lacks U+180E).
 *
 * A model_tok_t is read-only after construction; encode and decode allocate
 * their scratch per call, so one tokenizer may serve many threads. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "model/model-internal.h"
#include "model/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Token attributes (same bit meaning as llama.cpp's llama_token_attr). */
enum {
  ATTR_UNDEFINED = 0,
  ATTR_UNKNOWN = 1 << 0,
  ATTR_UNUSED = 1 << 1,
  ATTR_NORMAL = 1 << 2,
  ATTR_CONTROL = 1 << 3,
  ATTR_USER_DEFINED = 1 << 4,
  ATTR_BYTE = 1 << 5,
  ATTR_LSTRIP = 1 << 7,
  ATTR_RSTRIP = 1 << 8,
  ATTR_EOG = 1 << 12, /* ours: ends generation */
};

typedef enum { TOK_BPE, TOK_SPM } tok_kind_t;

#define TOK_MAX_RE 8

typedef struct tok_merge {
  uint32_t off; /* into merge_pool: first, then second right after it */
  uint32_t n1, n2;
  uint64_t hash;
} tok_merge_t;

struct model_tok {
  tok_kind_t kind;
  int32_t n_vocab;

  char *text_pool; /* owns: every token text, NUL-terminated */
  uint32_t *text_off; /* owns [n_vocab] */
  uint32_t *text_len; /* owns [n_vocab] */
  uint64_t *text_hash; /* owns [n_vocab] */
  float *scores; /* owns [n_vocab]; SentencePiece merge priority */
  uint16_t *attr; /* owns [n_vocab] */
  int32_t *vocab_slot; /* owns: open addressing, -1 = empty */
  uint64_t vocab_mask;

  char *merge_pool; /* owns */
  tok_merge_t *merges; /* owns; index = rank */
  int32_t n_merges;
  int32_t *merge_slot; /* owns: open addressing over ranks, -1 = empty */
  uint64_t merge_mask;

  char *piece_pool; /* owns: decoded bytes of every token */
  uint32_t *piece_off; /* owns [n_vocab] */
  uint32_t *piece_len; /* owns [n_vocab] */

  int32_t *specials; /* owns: control/user-defined/unknown ids, longest text first */
  size_t n_specials;

  pcre2_code *re[TOK_MAX_RE]; /* owns */
  size_t n_re;

  bool byte_encode; /* GPT-2 byte-to-unicode mapping of words */
  bool escape_ws; /* BPE on U+2581 text (SentencePiece-style BPE) */
  bool add_space_prefix; /* decode: drop the first token's leading space */
  bool prefix_encode; /* encode: prepend a space to raw fragments */
  bool add_bos;
  bool clean_spaces; /* decode: " ." -> "." etc. */
  bool ignore_merges;
  int32_t bos, eos, eot, eom, unk;

  char benc[256][2]; /* byte -> its byte-level code point, UTF-8 */
  uint8_t benc_len[256];
  int16_t bdec[324]; /* byte-level code point -> byte, -1 when none */
  int32_t byte_tok[256]; /* byte -> token used as fallback, -1 when none */
};


/* ---- small helpers -------------------------------------------------------- */

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
  const unsigned char *s = p;
  for (size_t i = 0; i < n; i++) {
    h ^= s[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

#define HASH_SEED 0xcbf29ce484222325ULL

static uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

/* Length of the UTF-8 sequence a lead byte announces (llama.cpp's rule:
 * continuation and invalid bytes count as 1). */
static size_t utf8_lead_len(unsigned char c) {
  static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lookup[c >> 4];
}

static size_t utf8_put(uint32_t c, char *o) {
  if (c < 0x80) {
    o[0] = (char)c;
    return 1;
  }
  if (c < 0x800) {
    o[0] = (char)(0xC0 | (c >> 6));
    o[1] = (char)(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    o[0] = (char)(0xE0 | (c >> 12));
    o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[2] = (char)(0x80 | (c & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (c >> 18));
  o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
  o[3] = (char)(0x80 | (c & 0x3F));
  return 4;
}

/* Decode one code point the way llama.cpp does: no overlong or surrogate
 * checks; a byte that does not start a complete sequence gives U+FFFD and
 * advances by one. */
static uint32_t utf8_get_lenient(const unsigned char *s, size_t n, size_t *adv) {
  unsigned char c = s[0];
  if (c < 0x80) {
    *adv = 1;
    return c;
  }
  *adv = 1;
  if (!(c & 0x40)) return 0xFFFD;
  if (!(c & 0x20)) {
    if (n < 2 || (s[1] & 0xC0) != 0x80) return 0xFFFD;
    *adv = 2;
    return ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
  }
  if (!(c & 0x10)) {
    if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0xFFFD;
    *adv = 3;
    return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  }
  if (!(c & 0x08)) {
    if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
      return 0xFFFD;
    *adv = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
           ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
  }
  return 0xFFFD;
}

/* Strict UTF-8 check of one sequence (Unicode table 3-7). Returns its length
 * when complete and well-formed; 0 when s[0..n) is a well-formed but
 * unfinished prefix; otherwise -(length of the maximal ill-formed subpart). */
static int utf8_check(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  int len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else
    return -1;
  for (int i = 1; i < len; i++) {
    if ((size_t)i >= n) return 0;
    unsigned char b = s[i];
    if (b < lo || b > hi) return -i;
    lo = 0x80;
    hi = 0xBF;
  }
  return len;
}

static bool utf8_valid(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    if (u[i] < 0x80) {
      i++;
      continue;
    }
    int r = utf8_check(u + i, n - i);
    if (r <= 0) return false;
    i += (size_t)r;
  }
  return true;
}

/* Grow the array whose pointer is at pp (elements of size sz) to hold at
 * least need elements. The pointer is read and written with memcpy so any
 * element type can be passed without aliasing it as a void *. */
static int grow(void *pp, size_t *cap, size_t need, size_t sz) {
  if (need <= *cap) return 0;
  size_t nc = *cap ? *cap : 16;
  while (nc < need) {
    if (nc > SIZE_MAX / 2 / sz) return -ENOMEM;
    nc *= 2;
  }
  void *p;
  memcpy(&p, pp, sizeof p);
  void *q = realloc(p, nc * sz);
  if (!q) return -ENOMEM;
  memcpy(pp, &q, sizeof q);
  *cap = nc;
  return 0;
}

/* ---- regexes -------------------------------------------------------------- */

/* Code points llama.cpp (Unicode 15.1) puts in a category that PCRE2 built on
 * Unicode 14 leaves unassigned. Harmless when PCRE2 already knows them. */
static const char XL[] =
    "\\x{1123F}-\\x{11240}\\x{11F02}\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}\\x{1342F}"
    "\\x{13441}-\\x{13446}\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}\\x{1E030}-\\x{1E06D}"
    "\\x{1E4D0}-\\x{1E4EB}\\x{2B739}\\x{2EBF0}-\\x{2EE5D}\\x{31350}-\\x{323AF}";
static const char XN[] = "\\x{11F50}-\\x{11F59}\\x{1D2C0}-\\x{1D2D3}\\x{1E4F0}-\\x{1E4F9}";
static const char XM[] =
    "\\x{0CF3}\\x{0ECE}\\x{10EFD}-\\x{10EFF}\\x{11241}\\x{11F00}-\\x{11F01}\\x{11F03}"
    "\\x{11F34}-\\x{11F3A}\\x{11F3E}-\\x{11F42}\\x{13440}\\x{13447}-\\x{13455}\\x{1E08F}"
    "\\x{1E4EC}-\\x{1E4EF}";
static const char XP[] = "\\x{11B00}-\\x{11B09}\\x{11F43}-\\x{11F4F}";
static const char XS[] =
    "\\x{2FFC}-\\x{2FFF}\\x{31EF}\\x{1F6DC}\\x{1F774}-\\x{1F776}\\x{1F77B}-\\x{1F77F}"
    "\\x{1F7D9}\\x{1FA75}-\\x{1FA77}\\x{1FA87}-\\x{1FA88}\\x{1FAAD}-\\x{1FAAF}"
    "\\x{1FABB}-\\x{1FABD}\\x{1FABF}\\x{1FACE}-\\x{1FACF}\\x{1FADA}-\\x{1FADB}\\x{1FAE8}"
    "\\x{1FAF7}-\\x{1FAF8}";
/* llama.cpp's whitespace: Unicode White_Space. */
static const char XWS[] =
    "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";

typedef struct strbuf {
  char *p;
  size_t n, cap;
} strbuf_t;

static int sb_put(strbuf_t *b, const char *s, size_t n) {
  if (grow(&b->p, &b->cap, b->n + n + 1, 1)) return -ENOMEM;
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
  return 0;
}

static int sb_puts(strbuf_t *b, const char *s) { return sb_put(b, s, strlen(s)); }

/* Rewrite a pattern so its classes mean what they mean in llama.cpp, and
 * its groups do not capture (unless it has back-references). */
static int re_rewrite(const char *pat, strbuf_t *o) {
  bool in_class = false;
  int rc = 0;
  size_t n = strlen(pat);
  bool has_backref = strstr(pat, "\\k") != NULL || strstr(pat, "(?P=") != NULL;
  for (size_t i = 0; i + 1 < n; i++) {
    if (pat[i] != '\\') continue;
    if (pat[i + 1] >= '1' && pat[i + 1] <= '9') has_backref = true;
    i++; /* past the escaped character */
  }
  for (size_t i = 0; i < n && !rc;) {
    char c = pat[i];
    if (c == '\\' && i + 1 < n) {
      char e = pat[i + 1];
      if (e == 'Q') { /* \Q...\E literal */
        const char *end = strstr(pat + i + 2, "\\E");
        size_t stop = end ? (size_t)(end - pat) + 2 : n;
        rc = sb_put(o, pat + i, stop - i);
        i = stop;
        continue;
      }
      if (e == 'p' && i + 4 < n && pat[i + 2] == '{' && pat[i + 4] == '}') {
        const char *extra = NULL;
        switch (pat[i + 3]) {
        case 'L': extra = XL; break;
        case 'N': extra = XN; break;
        case 'M': extra = XM; break;
        case 'P': extra = XP; break;
        case 'S': extra = XS; break;
        default: break;
        }
        if (extra) {
          if (!in_class) rc |= sb_puts(o, "[");
          rc |= sb_put(o, pat + i, 5);
          rc |= sb_puts(o, extra);
          if (!in_class) rc |= sb_puts(o, "]");
          i += 5;
          continue;
        }
      }
      if (e == 's') {
        if (!in_class) rc |= sb_puts(o, "[");
        rc |= sb_puts(o, XWS);
        if (!in_class) rc |= sb_puts(o, "]");
        i += 2;
        continue;
      }
      if (e == 'S' && !in_class) {
        rc |= sb_puts(o, "[^");
        rc |= sb_puts(o, XWS);
        rc |= sb_puts(o, "]");
        i += 2;
        continue;
      }
      rc = sb_put(o, pat + i, 2);
      i += 2;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      size_t j = i + 1;
      if (j < n && pat[j] == '^') j++;
      if (j < n && pat[j] == ']') j++; /* a leading ']' is literal */
      rc = sb_put(o, pat + i, j - i);
      i = j;
      continue;
    }
    if (in_class && c == '[' && i + 1 < n && pat[i + 1] == ':') { /* [:alpha:] */
      const char *end = strstr(pat + i + 2, ":]");
      size_t stop = end ? (size_t)(end - pat) + 2 : i + 1;
      rc = sb_put(o, pat + i, stop - i);
      i = stop;
      continue;
    }
    if (in_class && c == ']') in_class = false;
    if (!in_class && c == '(' && pat[i + 1] != '?' && !has_backref) {
      rc = sb_puts(o, "(?:"); /* nothing reads the groups; capturing costs time */
      i++;
      continue;
    }
    rc = sb_put(o, pat + i, 1);
    i++;
  }
  return rc;
}

static int re_add(model_tok_t *t, const char *pat, char *err, size_t errlen) {
  if (t->n_re >= TOK_MAX_RE)
    return model__errf(err, errlen, -EINVAL, "tokenizer: more than %d pre-tokenizer regexes", TOK_MAX_RE);
  strbuf_t b = {0};
  if (re_rewrite(pat, &b)) {
    free(b.p);
    return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  }
  int ecode;
  PCRE2_SIZE eoff;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)b.p, b.n, PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY,
                                 &ecode, &eoff, NULL);
  free(b.p);
  if (!re) {
    PCRE2_UCHAR msg[160];
    pcre2_get_error_message(ecode, msg, sizeof msg);
    return model__errf(err, errlen, -EINVAL, "tokenizer: bad pre-tokenizer regex at %zu: %s", (size_t)eoff,
                (const char *)msg);
  }
  pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
  t->re[t->n_re++] = re;
  return 0;
}

/* ---- pre-tokenizer table (llama.cpp's per-"pre" regex lists) --------------- */

#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RE_CONTRACT "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_LLAMA3                                                              \
  RE_CONTRACT                                                                  \
  "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
  "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2                                                          \
  RE_CONTRACT                                                             \
  "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
  "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN35                                                             \
  RE_CONTRACT                                                                 \
  "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+" \
  "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_BLOOM \
  " ?[^(\\s|.,!?\xe2\x80\xa6\xe3\x80\x82\xef\xbc\x8c\xe3\x80\x81\xe0\xa5\xa4\xdb\x94\xd8\x8c)]+"
#define RE_TEKKEN                                                                \
  "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|"        \
  "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}|" \
  " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_GPT4O                                                                     \
  "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+" RE_CONTRACT \
  "?|"                                                                               \
  "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*" RE_CONTRACT \
  "?|"                                                                               \
  "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_CJK_KANA "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+"
#define RE_DSV3                                                                      \
  "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?" \
  "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"

enum {
  PRE_CLEAN_SPACES = 1 << 0, /* decode cleans " ." and the like */
  PRE_IGNORE_MERGES = 1 << 1, /* a word that is a token is taken whole */
  PRE_ADD_BOS = 1 << 2, /* BOS wanted unless the GGUF says otherwise */
  PRE_NO_BOS = 1 << 3, /* the vocabulary has no BOS */
};

typedef struct tok_pre {
  const char *names; /* '|'-separated */
  const char *re[5];
  unsigned flags; /* PRE_* */
} tok_pre_t;

static const tok_pre_t k_pre[] = {
    {"default",
     {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"},
     PRE_CLEAN_SPACES},
    {"llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|midm-2.0|lfm2|jina-v5-nano",
     {RE_LLAMA3},
     PRE_CLEAN_SPACES | PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"dbrx|smaug-bpe", {RE_LLAMA3}, PRE_CLEAN_SPACES},
    {"chatglm-bpe", {RE_LLAMA3}, PRE_CLEAN_SPACES | PRE_NO_BOS},
    {"glm4|glm5", {RE_LLAMA3}, PRE_CLEAN_SPACES | PRE_IGNORE_MERGES | PRE_NO_BOS},
    /* [\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+ upstream; llama.cpp's
     * std::wregex sees non-ASCII whitespace as U+000B, so it is cut out here */
    {"deepseek-coder",
     {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+",
      "[\\x{4E00}-\\x{9FA5}\\x{0800}-\\x{167F}\\x{1681}-\\x{1FFF}\\x{200B}-\\x{2027}"
      "\\x{202A}-\\x{202E}\\x{2030}-\\x{205E}\\x{2060}-\\x{2FFF}\\x{3001}-\\x{4E00}"
      "\\x{AC00}-\\x{D7FF}]+",
      "\\p{N}"},
     0},
    {"deepseek-v3", {"\\p{N}{1,3}", RE_CJK_KANA, RE_DSV3}, 0},
    {"falcon", {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}, PRE_CLEAN_SPACES},
    {"gpt-2|phi-2|jina-es|jina-de|gigachat|jina-v2-es|jina-v2-de|a.x-4.0|mellum|modern-bert|"
     "jina-v1-en|jina-v2-code|roberta-bpe|mpt|olmo|jais|exaone4",
     {RE_GPT2},
     PRE_CLEAN_SPACES},
    {"trillion|granite-docling", {RE_GPT2}, 0},
    {"starcoder|refact|codeshell|exaone|minerva-7b|mellum2", {"\\p{N}", RE_GPT2}, PRE_CLEAN_SPACES},
    {"smollm|command-r", {"\\p{N}", RE_GPT2}, 0},
    {"qwen2|deepseek-r1-qwen|kormo|f2llmv2|hunyuan|solar-open|grok-2", {RE_QWEN2}, 0},
    {"stablelm2|megrez", {RE_QWEN2}, PRE_CLEAN_SPACES},
    {"qwen35", {RE_QWEN35}, 0},
    {"bloom|gpt3-finnish", {RE_BLOOM}, PRE_CLEAN_SPACES},
    {"poro-chat", {RE_BLOOM}, 0},
    {"viking", {RE_BLOOM, "\\p{N}"}, 0},
    {"tekken", {RE_TEKKEN}, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"gpt-4o|llama4|kanana2|talkie|minimax-m2", {RE_GPT4O}, 0},
    {"seed-coder",
     {RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|"
                  "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     0},
    {"bailingmoe|bailingmoe2|llada-moe",
     {"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
      " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"},
     0},
    {"ufakzeka",
     {"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
      "\\s+(?!\\S)|\\s+"},
     0},
    {"minicpm5",
     {"\\p{N}{1,3}", RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+"
                                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     PRE_CLEAN_SPACES | PRE_IGNORE_MERGES},
    {"exaone-moe",
     {RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}|"
                  " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"},
     PRE_CLEAN_SPACES},
};

static bool name_in_list(const char *list, const char *name, size_t n) {
  const char *p = list;
  while (*p) {
    const char *e = strchr(p, '|');
    size_t l = e ? (size_t)(e - p) : strlen(p);
    if (l == n && memcmp(p, name, n) == 0) return true;
    if (!e) break;
    p = e + 1;
  }
  return false;
}

static const tok_pre_t *pre_find(const char *name, size_t n) {
  for (size_t i = 0; i < sizeof k_pre / sizeof k_pre[0]; i++)
    if (name_in_list(k_pre[i].names, name, n)) return &k_pre[i];
  return NULL;
}

/* ---- vocabulary and merges ------------------------------------------------- */

typedef struct tok_view {
  const char *p;
  size_t n;
} tok_view_t;

static uint64_t table_size(size_t n) {
  uint64_t s = 16;
  while (s < (uint64_t)n * 2) s <<= 1;
  return s;
}

static const char *tok_text(const model_tok_t *t, int32_t id) {
  return t->text_pool + t->text_off[id];
}

static int32_t vocab_find(const model_tok_t *t, const char *s, size_t n) {
  uint64_t h = hash_bytes(HASH_SEED, s, n);
  for (uint64_t i = mix64(h) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
    int32_t id = t->vocab_slot[i];
    if (id < 0) return -1;
    if (t->text_hash[id] == h && t->text_len[id] == n && memcmp(tok_text(t, id), s, n) == 0)
      return id;
  }
}

/* Rank of the merge (l, r), -1 when none. */
static int32_t merge_find(const model_tok_t *t, const char *l, size_t nl, const char *r,
                          size_t nr) {
  if (!t->n_merges) return -1;
  uint64_t h = hash_bytes(HASH_SEED, l, nl);
  h = hash_bytes(h, " ", 1);
  h = hash_bytes(h, r, nr);
  for (uint64_t i = mix64(h) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
    int32_t k = t->merge_slot[i];
    if (k < 0) return -1;
    const tok_merge_t *m = &t->merges[k];
    if (m->hash == h && m->n1 == nl && m->n2 == nr) {
      const char *p = t->merge_pool + m->off;
      if (memcmp(p, l, nl) == 0 && memcmp(p + nl, r, nr) == 0) return k;
    }
  }
}

/* Copy the token texts in and index them. An empty text becomes
 * "[EMPTY_<id>]" and a repeated text maps to its last id, as in llama.cpp. */
static int vocab_build(model_tok_t *t, const tok_view_t *toks, size_t n, char *err, size_t errlen) {
  if (n == 0 || n > INT32_MAX / 2)
    return model__errf(err, errlen, -EINVAL, "tokenizer: vocabulary size %zu is out of range", n);
  size_t total = 0;
  for (size_t i = 0; i < n; i++) total += (toks[i].n ? toks[i].n : 24) + 1;
  if (total > UINT32_MAX) return model__errf(err, errlen, -EINVAL, "tokenizer: vocabulary too large");
  t->n_vocab = (int32_t)n;
  t->text_pool = malloc(total);
  t->text_off = calloc(n, sizeof *t->text_off);
  t->text_len = calloc(n, sizeof *t->text_len);
  t->text_hash = calloc(n, sizeof *t->text_hash);
  t->scores = calloc(n, sizeof *t->scores);
  t->attr = calloc(n, sizeof *t->attr);
  uint64_t slots = table_size(n);
  t->vocab_slot = malloc(slots * sizeof *t->vocab_slot);
  if (!t->text_pool || !t->text_off || !t->text_len || !t->text_hash || !t->scores || !t->attr ||
      !t->vocab_slot)
    return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  memset(t->vocab_slot, 0xff, slots * sizeof *t->vocab_slot);
  t->vocab_mask = slots - 1;
  size_t off = 0;
  for (size_t i = 0; i < n; i++) {
    t->text_off[i] = (uint32_t)off;
    size_t l;
    if (toks[i].n) {
      memcpy(t->text_pool + off, toks[i].p, toks[i].n);
      l = toks[i].n;
    } else {
      l = (size_t)snprintf(t->text_pool + off, 24, "[EMPTY_%zu]", i);
    }
    t->text_pool[off + l] = 0;
    t->text_len[i] = (uint32_t)l;
    t->text_hash[i] = hash_bytes(HASH_SEED, t->text_pool + off, l);
    t->attr[i] = ATTR_NORMAL;
    off += l + 1;
    uint64_t h = t->text_hash[i];
    for (uint64_t k = mix64(h) & t->vocab_mask;; k = (k + 1) & t->vocab_mask) {
      int32_t id = t->vocab_slot[k];
      if (id < 0) {
        t->vocab_slot[k] = (int32_t)i;
        break;
      }
      if (t->text_hash[id] == h && t->text_len[id] == l &&
          memcmp(tok_text(t, id), t->text_pool + off - l - 1, l) == 0) {
        t->vocab_slot[k] = (int32_t)i; /* later duplicate wins */
        break;
      }
    }
  }
  return 0;
}

/* Index merges given as (first, second) pairs; the first of duplicates wins. */
static int merges_build(model_tok_t *t, const tok_view_t *first, const tok_view_t *second, size_t n,
                        char *err, size_t errlen) {
  if (n > INT32_MAX / 2) return model__errf(err, errlen, -EINVAL, "tokenizer: too many merges");
  size_t total = 1;
  for (size_t i = 0; i < n; i++) total += first[i].n + second[i].n;
  if (total > UINT32_MAX) return model__errf(err, errlen, -EINVAL, "tokenizer: merges too large");
  uint64_t slots = table_size(n);
  t->merge_pool = malloc(total);
  t->merges = calloc(n ? n : 1, sizeof *t->merges);
  t->merge_slot = malloc(slots * sizeof *t->merge_slot);
  if (!t->merge_pool || !t->merges || !t->merge_slot)
    return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  memset(t->merge_slot, 0xff, slots * sizeof *t->merge_slot);
  t->merge_mask = slots - 1;
  size_t off = 0;
  for (size_t i = 0; i < n; i++) {
    tok_merge_t *m = &t->merges[i];
    m->off = (uint32_t)off;
    m->n1 = (uint32_t)first[i].n;
    m->n2 = (uint32_t)second[i].n;
    if (first[i].n) memcpy(t->merge_pool + off, first[i].p, first[i].n);
    if (second[i].n) memcpy(t->merge_pool + off + first[i].n, second[i].p, second[i].n);
    off += first[i].n + second[i].n;
    uint64_t h = hash_bytes(HASH_SEED, first[i].p, first[i].n);
    h = hash_bytes(h, " ", 1);
    m->hash = hash_bytes(h, second[i].p, second[i].n);
    if (!m->n1 || !m->n2) continue; /* malformed: can never match */
    for (uint64_t k = mix64(m->hash) & t->merge_mask;; k = (k + 1) & t->merge_mask) {
      int32_t j = t->merge_slot[k];
      if (j < 0) {
        t->merge_slot[k] = (int32_t)i;
        break;
      }
      const tok_merge_t *o = &t->merges[j];
      if (o->hash == m->hash && o->n1 == m->n1 && o->n2 == m->n2 &&
          memcmp(t->merge_pool + o->off, t->merge_pool + m->off, m->n1 + m->n2) == 0)
        break;
    }
  }
  t->n_merges = (int32_t)n;
  return 0;
}

/* ---- finishing: specials, end-of-generation set, pieces --------------------- */

static int32_t find_text(const model_tok_t *t, const char *s) {
  return vocab_find(t, s, strlen(s));
}

/* The lowest id among the texts of list (each text maps to its last id, as
 * llama.cpp's token_to_id does), marked as control; cur when already known. */
static int32_t detect_control(model_tok_t *t, int32_t cur, const char *const *list) {
  if (cur >= 0) return cur;
  int32_t best = -1;
  for (size_t i = 0; list[i]; i++) {
    int32_t id = find_text(t, list[i]);
    if (id >= 0 && (best < 0 || id < best)) best = id;
  }
  if (best >= 0) t->attr[best] |= ATTR_CONTROL;
  return best;
}

static void hex_byte_token(const model_tok_t *t, int32_t id, int *out) {
  const char *s = tok_text(t, id);
  *out = -1;
  if (t->text_len[id] < 5) return;
  char hx[3] = {s[3], s[4], 0};
  *out = (int)(strtol(hx, NULL, 16) & 0xFF);
}

/* Bytes a token decodes to, as llama.cpp's token_to_piece with special=true. */
static int piece_of(const model_tok_t *t, int32_t id, strbuf_t *o) {
  uint16_t a = t->attr[id];
  const char *s = tok_text(t, id);
  size_t n = t->text_len[id];
  if (a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED)) return sb_put(o, s, n);
  if (a & ATTR_NORMAL) {
    if (t->kind == TOK_SPM || t->escape_ws) {
      int rc = 0;
      for (size_t i = 0; i < n && !rc;) {
        if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
          rc = sb_put(o, " ", 1);
          i += 3;
        } else {
          rc = sb_put(o, s + i, 1);
          i++;
        }
      }
      return rc;
    }
    /* byte-level: every code point stands for one byte */
    const unsigned char *u = (const unsigned char *)s;
    int rc = 0;
    for (size_t i = 0; i < n && !rc;) {
      size_t adv;
      uint32_t c = utf8_get_lenient(u + i, n - i, &adv);
      if (c < 324 && t->bdec[c] >= 0) {
        char b = (char)t->bdec[c];
        rc = sb_put(o, &b, 1);
      } else { /* llama.cpp's marker for a code point that is no byte */
        char tmp[16];
        rc = sb_puts(o, "[UNK_BYTE_0x");
        for (size_t k = 0; k < adv && !rc; k++) {
          snprintf(tmp, sizeof tmp, "%02x", u[i + k]);
          rc = sb_puts(o, tmp);
        }
        if (!rc) rc = sb_put(o, s, n);
        if (!rc) rc = sb_puts(o, "]");
      }
      i += adv;
    }
    return rc;
  }
  if (a & ATTR_BYTE) {
    int b;
    hex_byte_token(t, id, &b);
    if (b < 0) return 0;
    char c = (char)b;
    return sb_put(o, &c, 1);
  }
  return 0;
}

static int cmp_special(const void *a, const void *b, void *arg) {
  const model_tok_t *t = arg;
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  uint32_t lx = t->text_len[x], ly = t->text_len[y];
  if (lx != ly) return lx > ly ? -1 : 1;
  return x < y ? -1 : x > y;
}

typedef struct tok_ids {
  int32_t fim_pre, fim_suf, fim_mid, fim_pad, fim_rep, fim_sep;
} tok_ids_t;

/* Token texts llama.cpp recognises by name (FW: fullwidth bar, SP: U+2581). */
#define FW "\xef\xbd\x9c"
#define SP "\xe2\x96\x81"
/* clang-format off */
static const char *const k_eot_texts[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
    "<" FW "end" SP "of" SP "sentence" FW ">", "<end_of_utterance>", NULL};
static const char *const k_eom_texts[] = {"<|eom_id|>", NULL};
static const char *const k_pre_texts[] = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
    "<" FW "fim" SP "begin" FW ">", "<PRE>", SP "<PRE>", "<|code_prefix|>", "<|prefix|>", NULL};
static const char *const k_suf_texts[] = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<" FW "fim" SP "hole" FW ">", "<SUF>", SP "<SUF>", "<|code_suffix|>", "<|suffix|>", NULL};
static const char *const k_mid_texts[] = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
    "<" FW "fim" SP "end" FW ">", "<MID>", SP "<MID>", "<|code_middle|>", "<|middle|>", NULL};
static const char *const k_pad_texts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "[PAD]", NULL};
static const char *const k_rep_texts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
    "<reponame>", NULL};
static const char *const k_sep_texts[] = {"<|file_sep|>", NULL};
static const char *const k_eog_texts[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>",
    "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
    "<turn|>", "<|tool_response>", "<" FW "end" SP "of" SP "sentence" FW ">", "[e~[", NULL};
static const char *const k_always_user[] = {"<|channel|>", "<|message|>", "<|start|>",
    "<|constrain|>", NULL};
/* clang-format on */
#undef FW
#undef SP

/* Special-token attributes and the end-of-generation set as llama.cpp
 * derives them, the partition list, byte fallbacks and decoded pieces. */
static int tok_finish(model_tok_t *t, tok_ids_t *fim, const char *model_name, char *err,
                      size_t errlen) {
  t->eot = detect_control(t, t->eot, k_eot_texts);
  t->eom = detect_control(t, t->eom, k_eom_texts);
  fim->fim_pre = detect_control(t, fim->fim_pre, k_pre_texts);
  fim->fim_suf = detect_control(t, fim->fim_suf, k_suf_texts);
  fim->fim_mid = detect_control(t, fim->fim_mid, k_mid_texts);
  fim->fim_pad = detect_control(t, fim->fim_pad, k_pad_texts);
  fim->fim_rep = detect_control(t, fim->fim_rep, k_rep_texts);
  fim->fim_sep = detect_control(t, fim->fim_sep, k_sep_texts);

  int32_t end_id = -1, s_id = -1;
  bool has_return = false, has_call = false, has_flush = false, has_normal_s = false;
  for (size_t i = 0; k_eog_texts[i]; i++) {
    int32_t id = find_text(t, k_eog_texts[i]);
    if (id >= 0) t->attr[id] |= ATTR_EOG | ATTR_CONTROL;
  }
  for (size_t i = 0; k_always_user[i]; i++) { /* gpt-oss: always rendered */
    int32_t id = find_text(t, k_always_user[i]);
    if (id >= 0) t->attr[id] = ATTR_USER_DEFINED;
  }
  const int32_t extra[] = {fim->fim_pad, fim->fim_rep, fim->fim_sep, t->eos, t->eot, t->eom};
  for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++)
    if (extra[i] >= 0) t->attr[extra[i]] |= ATTR_EOG;
  for (int32_t id = 0; id < t->n_vocab; id++) {
    if (!(t->attr[id] & ATTR_EOG)) continue;
    const char *s = tok_text(t, id);
    if (!strcmp(s, "<|return|>"))
      has_return = true;
    else if (!strcmp(s, "<|call|>") || !strcmp(s, "<|calls|>"))
      has_call = true;
    else if (!strcmp(s, "<|flush|>"))
      has_flush = true;
    else if (!strcmp(s, "<|end|>"))
      end_id = id;
    else if (!strcmp(s, "<|tool_response>") || !strcmp(s, "<|plamo:eos|>"))
      has_normal_s = true;
    else if (!strcmp(s, "</s>"))
      s_id = id;
  }
  if (end_id >= 0 && has_call && (has_return || has_flush)) t->attr[end_id] = ATTR_USER_DEFINED;
  if (has_normal_s && s_id >= 0) t->attr[s_id] = ATTR_NORMAL;

  /* Phi-3 strips the whitespace after its special tokens. */
  if (model_name) {
    char low[256];
    size_t k = 0;
    for (; model_name[k] && k + 1 < sizeof low; k++)
      low[k] = (char)((model_name[k] >= 'A' && model_name[k] <= 'Z') ? model_name[k] + 32
                                                                     : model_name[k]);
    low[k] = 0;
    if (strstr(low, "phi-3") || strstr(low, "phi3")) {
      for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->attr[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
          t->attr[id] |= ATTR_RSTRIP;
      int32_t id;
      if ((id = find_text(t, "</s>")) >= 0) t->attr[id] |= ATTR_RSTRIP;
      if ((id = find_text(t, "<unk>")) >= 0) t->attr[id] &= (uint16_t)~ATTR_RSTRIP;
      if ((id = find_text(t, "<s>")) >= 0) t->attr[id] &= (uint16_t)~ATTR_RSTRIP;
      if ((id = find_text(t, "<|endoftext|>")) >= 0) t->attr[id] &= (uint16_t)~ATTR_RSTRIP;
    }
  }

  /* special tokens, longest first */
  size_t ns = 0;
  for (int32_t id = 0; id < t->n_vocab; id++)
    if (t->attr[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)) ns++;
  t->specials = malloc((ns ? ns : 1) * sizeof *t->specials);
  if (!t->specials) return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  for (int32_t id = 0; id < t->n_vocab; id++)
    if (t->attr[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
      t->specials[t->n_specials++] = id;
  qsort_r(t->specials, t->n_specials, sizeof *t->specials, cmp_special, t);

  /* byte fallback tokens */
  for (int b = 0; b < 256; b++) {
    char buf[8];
    t->byte_tok[b] = -1;
    if (t->kind == TOK_SPM || !t->byte_encode) {
      snprintf(buf, sizeof buf, "<0x%02X>", b);
      t->byte_tok[b] = find_text(t, buf);
      if (t->byte_tok[b] < 0 && t->kind == TOK_SPM) {
        buf[0] = (char)b;
        t->byte_tok[b] = vocab_find(t, buf, 1);
      }
    } else {
      t->byte_tok[b] = vocab_find(t, t->benc[b], t->benc_len[b]);
    }
  }

  /* pieces */
  strbuf_t pool = {0};
  t->piece_off = calloc((size_t)t->n_vocab, sizeof *t->piece_off);
  t->piece_len = calloc((size_t)t->n_vocab, sizeof *t->piece_len);
  if (!t->piece_off || !t->piece_len) return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  if (sb_put(&pool, "", 0)) return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
  for (int32_t id = 0; id < t->n_vocab; id++) {
    size_t start = pool.n;
    if (piece_of(t, id, &pool) || pool.n > UINT32_MAX) {
      free(pool.p);
      return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
    }
    t->piece_off[id] = (uint32_t)start;
    t->piece_len[id] = (uint32_t)(pool.n - start);
  }
  t->piece_pool = pool.p;
  return 0;
}

static void byte_tables(model_tok_t *t) {
  int n = 0;
  memset(t->bdec, 0xff, sizeof t->bdec);
  for (int b = 0; b < 256; b++) {
    bool direct = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    uint32_t c = direct ? (uint32_t)b : (uint32_t)(256 + n++);
    t->benc_len[b] = (uint8_t)utf8_put(c, t->benc[b]);
    t->bdec[c] = (int16_t)b;
  }
}

static model_tok_t *tok_alloc(void) {
  model_tok_t *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->bos = t->eos = t->eot = t->eom = t->unk = -1;
  byte_tables(t);
  return t;
}

void model_tok_free(model_tok_t *t) {
  if (!t) return;
  free(t->text_pool);
  free(t->text_off);
  free(t->text_len);
  free(t->text_hash);
  free(t->scores);
  free(t->attr);
  free(t->vocab_slot);
  free(t->merge_pool);
  free(t->merges);
  free(t->merge_slot);
  free(t->piece_pool);
  free(t->piece_off);
  free(t->piece_len);
  free(t->specials);
  for (size_t i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
  free(t);
}

/* ---- GGUF ------------------------------------------------------------------ */

static bool gguf_view_eq(model_gguf_str_t s, const char *c) {
  size_t n = strlen(c);
  return s.len == n && memcmp(s.ptr, c, n) == 0;
}

/* Read an id key into *id when present and in range. */
static void gguf_id(const model_gguf_t *g, const char *key, int32_t n_vocab, int32_t *id) {
  int64_t v;
  if (*id >= n_vocab) *id = -1;
  if (model_gguf_get_i64(g, key, &v) == 0 && v >= 0 && v < n_vocab) *id = (int32_t)v;
}

int model_tok_from_gguf(model_tok_t **out, const model_gguf_t *g, char *err, size_t errlen) {
  *out = NULL;
  model_gguf_str_t model, pre = {"", 0};
  int rc = model_gguf_get_str(g, "tokenizer.ggml.model", &model);
  if (rc) return model__errf(err, errlen, -EINVAL, "tokenizer: missing tokenizer.ggml.model");
  bool have_pre = model_gguf_get_str(g, "tokenizer.ggml.pre", &pre) == 0;

  model_tok_t *t = tok_alloc();
  tok_view_t *views = NULL, *v2 = NULL;
  if (!t) return model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");

  const tok_pre_t *pt = NULL;
  if (gguf_view_eq(model, "llama")) {
    t->kind = TOK_SPM;
    t->add_space_prefix = true;
    t->add_bos = true;
    t->bos = 1;
    t->eos = 2;
    t->unk = 0;
  } else if (gguf_view_eq(model, "gpt2")) {
    t->kind = TOK_BPE;
    t->byte_encode = true;
    t->clean_spaces = true;
    t->bos = 11;
    t->eos = 11;
    if (!have_pre || pre.len == 0) pre = (model_gguf_str_t){"default", 7};
    pt = pre_find(pre.ptr, pre.len);
    if (!pt) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer: unknown pre-tokenizer '%.*s'", (int)pre.len,
                pre.ptr);
      goto fail;
    }
    t->clean_spaces = pt->flags & PRE_CLEAN_SPACES;
    t->ignore_merges = pt->flags & PRE_IGNORE_MERGES;
    t->add_bos = pt->flags & PRE_ADD_BOS;
  } else {
    rc = model__errf(err, errlen, -EINVAL, "tokenizer: unsupported tokenizer model '%.*s'", (int)model.len,
              model.ptr);
    goto fail;
  }

  const model_gguf_kv_t *kt = model_gguf_find(g, "tokenizer.ggml.tokens");
  if (!kt || kt->type != MODEL_GGUF_ARRAY || kt->arr_type != MODEL_GGUF_STRING || !kt->arr_strs) {
    rc = model__errf(err, errlen, -EINVAL, "tokenizer: missing tokenizer.ggml.tokens");
    goto fail;
  }
  size_t n = (size_t)kt->arr_len;
  if (n == 0 || n > (1u << 24)) {
    rc = model__errf(err, errlen, -EINVAL, "tokenizer: vocabulary size %zu is out of range", n);
    goto fail;
  }
  views = calloc(n, sizeof *views);
  if (!views) {
    rc = model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
    goto fail;
  }
  for (size_t i = 0; i < n; i++)
    views[i] = (tok_view_t){kt->arr_strs[i].ptr, (size_t)kt->arr_strs[i].len};
  rc = vocab_build(t, views, n, err, errlen);
  if (rc) goto fail;

  const model_gguf_kv_t *ks = model_gguf_find(g, "tokenizer.ggml.scores");
  if (ks) {
    if (ks->type != MODEL_GGUF_ARRAY || ks->arr_len < n) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer: bad tokenizer.ggml.scores");
      goto fail;
    }
    for (size_t i = 0; i < n; i++) {
      double d;
      if (model_gguf_arr_f64(ks, i, &d)) {
        rc = model__errf(err, errlen, -EINVAL, "tokenizer: bad tokenizer.ggml.scores");
        goto fail;
      }
      t->scores[i] = (float)d;
    }
  }
  const model_gguf_kv_t *ky = model_gguf_find(g, "tokenizer.ggml.token_type");
  if (ky) {
    if (ky->type != MODEL_GGUF_ARRAY || ky->arr_len < n) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer: bad tokenizer.ggml.token_type");
      goto fail;
    }
    for (size_t i = 0; i < n; i++) {
      int64_t ty;
      if (model_gguf_arr_i64(ky, i, &ty)) {
        rc = model__errf(err, errlen, -EINVAL, "tokenizer: bad tokenizer.ggml.token_type");
        goto fail;
      }
      static const uint16_t map[7] = {ATTR_UNDEFINED,    ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                                      ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE};
      t->attr[i] = (ty >= 0 && ty <= 6) ? map[ty] : ATTR_UNDEFINED;
    }
  }

  if (t->kind == TOK_BPE) {
    const model_gguf_kv_t *km = model_gguf_find(g, "tokenizer.ggml.merges");
    if (!km || km->type != MODEL_GGUF_ARRAY || km->arr_type != MODEL_GGUF_STRING ||
        (km->arr_len && !km->arr_strs)) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer: missing tokenizer.ggml.merges");
      goto fail;
    }
    size_t nm = (size_t)km->arr_len;
    v2 = calloc(2 * (nm ? nm : 1), sizeof *v2);
    if (!v2) {
      rc = model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
      goto fail;
    }
    for (size_t i = 0; i < nm; i++) {
      const char *s = km->arr_strs[i].ptr;
      size_t l = (size_t)km->arr_strs[i].len;
      const char *sp = l > 1 ? memchr(s + 1, ' ', l - 1) : NULL;
      if (sp) {
        v2[i] = (tok_view_t){s, (size_t)(sp - s)};
        v2[nm + i] = (tok_view_t){sp + 1, l - (size_t)(sp - s) - 1};
      }
    }
    rc = merges_build(t, v2, v2 + nm, nm, err, errlen);
    if (rc) goto fail;
    for (size_t i = 0; i < 5 && pt->re[i]; i++)
      if ((rc = re_add(t, pt->re[i], err, errlen))) goto fail;
    if (pt->flags & PRE_NO_BOS) t->bos = -1;
  }

  bool b;
  if (model_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &b) == 0) t->add_space_prefix = b;
  t->prefix_encode = t->kind == TOK_SPM && t->add_space_prefix; /* BPE never prepends */

  tok_ids_t fim = {-1, -1, -1, -1, -1, -1};
  int32_t nv = t->n_vocab;
  gguf_id(g, "tokenizer.ggml.bos_token_id", nv, &t->bos);
  gguf_id(g, "tokenizer.ggml.eos_token_id", nv, &t->eos);
  gguf_id(g, "tokenizer.ggml.eot_token_id", nv, &t->eot);
  gguf_id(g, "tokenizer.ggml.eom_token_id", nv, &t->eom);
  gguf_id(g, "tokenizer.ggml.unknown_token_id", nv, &t->unk);
  gguf_id(g, "tokenizer.ggml.fim_pre_token_id", nv, &fim.fim_pre);
  gguf_id(g, "tokenizer.ggml.fim_suf_token_id", nv, &fim.fim_suf);
  gguf_id(g, "tokenizer.ggml.fim_mid_token_id", nv, &fim.fim_mid);
  gguf_id(g, "tokenizer.ggml.fim_pad_token_id", nv, &fim.fim_pad);
  gguf_id(g, "tokenizer.ggml.fim_rep_token_id", nv, &fim.fim_rep);
  gguf_id(g, "tokenizer.ggml.fim_sep_token_id", nv, &fim.fim_sep);
  gguf_id(g, "tokenizer.ggml.prefix_token_id", nv, &fim.fim_pre);
  gguf_id(g, "tokenizer.ggml.suffix_token_id", nv, &fim.fim_suf);
  gguf_id(g, "tokenizer.ggml.middle_token_id", nv, &fim.fim_mid);
  if (model_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b) == 0) t->add_bos = b;
  if (t->add_bos && t->bos < 0) t->add_bos = false;

  char name[256] = "";
  model_gguf_str_t gn;
  if (model_gguf_get_str(g, "general.name", &gn) == 0)
    snprintf(name, sizeof name, "%.*s", (int)(gn.len < 255 ? gn.len : 255), gn.ptr);
  rc = tok_finish(t, &fim, name, err, errlen);
  if (rc) goto fail;
  free(views);
  free(v2);
  *out = t;
  return 0;
fail:
  free(views);
  free(v2);
  model_tok_free(t);
  return rc;
}

/* ---- tokenizer.json -------------------------------------------------------- */

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *buf = NULL;
  size_t cap = 0, n = 0;
  for (;;) {
    if (grow(&buf, &cap, n + 65536 + 1, 1)) {
      free(buf);
      fclose(f);
      return NULL;
    }
    size_t r = fread(buf + n, 1, cap - n - 1, f);
    n += r;
    if (r == 0) break;
  }
  bool bad = ferror(f);
  fclose(f);
  if (bad) {
    free(buf);
    return NULL;
  }
  buf[n] = 0;
  *len = n;
  return buf;
}

static const char *json_str(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool json_type_is(const cJSON *o, const char *type) {
  const char *s = json_str(o, "type");
  return s && !strcmp(s, type);
}

/* Collect the pre-tokenizer regexes of a (possibly nested) pre_tokenizer. */
static int json_pre(model_tok_t *t, const cJSON *p, bool *byte_level, bool *metaspace, char *err,
                    size_t errlen) {
  if (!p || cJSON_IsNull(p)) return 0;
  const char *type = json_str(p, "type");
  if (!type) return model__errf(err, errlen, -EINVAL, "tokenizer.json: pre_tokenizer without type");
  if (!strcmp(type, "Sequence")) {
    const cJSON *it, *arr = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
    cJSON_ArrayForEach(it, arr) {
      int rc = json_pre(t, it, byte_level, metaspace, err, errlen);
      if (rc) return rc;
    }
    return 0;
  }
  if (!strcmp(type, "Split")) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const char *rx = json_str(pat, "Regex");
    if (rx) return re_add(t, rx, err, errlen);
    const char *lit = json_str(pat, "String");
    if (!lit) return model__errf(err, errlen, -EINVAL, "tokenizer.json: Split without pattern");
    strbuf_t b = {0};
    int rc = sb_puts(&b, "\\Q");
    rc |= sb_puts(&b, lit);
    rc |= sb_puts(&b, "\\E");
    if (!rc) rc = re_add(t, b.p, err, errlen);
    free(b.p);
    return rc;
  }
  if (!strcmp(type, "Digits")) {
    const cJSON *ind = cJSON_GetObjectItemCaseSensitive(p, "individual_digits");
    return re_add(t, cJSON_IsTrue(ind) ? "\\p{N}" : "\\p{N}+", err, errlen);
  }
  if (!strcmp(type, "ByteLevel")) {
    *byte_level = true;
    const cJSON *ur = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
    if (!ur || cJSON_IsTrue(ur)) return re_add(t, RE_GPT2 "|\\s+", err, errlen);
    return 0;
  }
  if (!strcmp(type, "Metaspace")) {
    *metaspace = true;
    const char *scheme = json_str(p, "prepend_scheme");
    const cJSON *aps = cJSON_GetObjectItemCaseSensitive(p, "add_prefix_space");
    if ((scheme && strcmp(scheme, "never") != 0) || cJSON_IsTrue(aps)) t->add_space_prefix = true;
    const cJSON *split = cJSON_GetObjectItemCaseSensitive(p, "split");
    if (cJSON_IsTrue(split)) return re_add(t, "\\x{2581}[^\\x{2581}]*|[^\\x{2581}]+", err, errlen);
    return 0;
  }
  return model__errf(err, errlen, -EINVAL, "tokenizer.json: unsupported pre_tokenizer '%s'", type);
}

static bool json_has_type(const cJSON *o, const char *type, const char *list_key) {
  if (!o || cJSON_IsNull(o)) return false;
  if (json_type_is(o, type)) return true;
  const cJSON *it, *arr = cJSON_GetObjectItemCaseSensitive(o, list_key);
  cJSON_ArrayForEach(it, arr) {
    if (json_has_type(it, type, list_key)) return true;
  }
  return false;
}

/* Normalizer steps that prepend U+2581 / replace spaces by it. */
static void json_normalizer(const cJSON *o, bool *prepend, bool *replace) {
  if (!o || cJSON_IsNull(o)) return;
  if (json_type_is(o, "Prepend")) *prepend = true;
  if (json_type_is(o, "Replace")) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const char *s = json_str(pat, "String");
    if (s && !strcmp(s, " ")) *replace = true;
  }
  const cJSON *it, *arr = cJSON_GetObjectItemCaseSensitive(o, "normalizers");
  cJSON_ArrayForEach(it, arr) json_normalizer(it, prepend, replace);
}

static const char *json_token_text(const cJSON *v) {
  if (cJSON_IsString(v)) return v->valuestring;
  return json_str(v, "content");
}

/* Special ids and add_bos from a tokenizer_config.json beside the file. */
static void json_config(model_tok_t *t, const char *path) {
  const char *slash = strrchr(path, '/');
  size_t dl = slash ? (size_t)(slash - path) + 1 : 0;
  char *cfg_path = malloc(dl + 32);
  if (!cfg_path) return;
  memcpy(cfg_path, path, dl);
  strcpy(cfg_path + dl, "tokenizer_config.json");
  size_t len;
  char *txt = read_file(cfg_path, &len);
  free(cfg_path);
  if (!txt) return;
  cJSON *c = cJSON_ParseWithLength(txt, len);
  free(txt);
  if (!c) return;
  const char *s;
  if ((s = json_token_text(cJSON_GetObjectItemCaseSensitive(c, "bos_token"))))
    t->bos = find_text(t, s);
  if ((s = json_token_text(cJSON_GetObjectItemCaseSensitive(c, "eos_token"))))
    t->eos = find_text(t, s);
  if ((s = json_token_text(cJSON_GetObjectItemCaseSensitive(c, "unk_token"))))
    t->unk = find_text(t, s);
  const cJSON *ab = cJSON_GetObjectItemCaseSensitive(c, "add_bos_token");
  if (cJSON_IsBool(ab)) t->add_bos = cJSON_IsTrue(ab);
  cJSON_Delete(c);
}

int model_tok_from_json(model_tok_t **out, const char *path, char *err, size_t errlen) {
  *out = NULL;
  size_t len;
  errno = 0;
  char *txt = read_file(path, &len);
  if (!txt) {
    int e = errno ? errno : EIO;
    return model__errf(err, errlen, -e, "tokenizer.json: cannot read %s: %s", path, strerror(e));
  }
  cJSON *root = cJSON_ParseWithLength(txt, len);
  free(txt);
  if (!root) return model__errf(err, errlen, -EINVAL, "tokenizer.json: %s is not valid JSON", path);

  int rc = 0;
  tok_view_t *toks = NULL, *mv = NULL;
  model_tok_t *t = tok_alloc();
  if (!t) {
    rc = model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
    goto fail;
  }
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
  const char *mtype = json_str(model, "type");
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
  if ((mtype && strcmp(mtype, "BPE") != 0) || !cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
    rc = model__errf(err, errlen, -EINVAL,
              "tokenizer.json: only BPE models with vocab and merges are supported");
    goto fail;
  }
  t->kind = TOK_BPE;

  /* vocabulary: model.vocab plus added_tokens, indexed by id */
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
  const cJSON *it;
  int64_t max_id = -1;
  cJSON_ArrayForEach(it, vocab) {
    if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble >= (1 << 24)) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer.json: bad id for vocab entry");
      goto fail;
    }
    if ((int64_t)it->valuedouble > max_id) max_id = (int64_t)it->valuedouble;
  }
  cJSON_ArrayForEach(it, added) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
    if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= (1 << 24) ||
        !json_str(it, "content")) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer.json: bad added_tokens entry");
      goto fail;
    }
    if ((int64_t)id->valuedouble > max_id) max_id = (int64_t)id->valuedouble;
  }
  if (max_id < 0) {
    rc = model__errf(err, errlen, -EINVAL, "tokenizer.json: empty vocabulary");
    goto fail;
  }
  size_t n = (size_t)max_id + 1;
  toks = calloc(n, sizeof *toks);
  if (!toks) {
    rc = model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
    goto fail;
  }
  cJSON_ArrayForEach(it, vocab) {
    toks[(size_t)it->valuedouble] = (tok_view_t){it->string, strlen(it->string)};
  }
  cJSON_ArrayForEach(it, added) {
    const char *s = json_str(it, "content");
    toks[(size_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble] =
        (tok_view_t){s, strlen(s)};
  }
  if ((rc = vocab_build(t, toks, n, err, errlen))) goto fail;
  for (size_t i = 0; i < n; i++)
    if (!toks[i].p) t->attr[i] = ATTR_UNUSED;
  cJSON_ArrayForEach(it, added) {
    size_t id = (size_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
    t->attr[id] = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "special")) ? ATTR_CONTROL
                                                                                : ATTR_USER_DEFINED;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "lstrip"))) t->attr[id] |= ATTR_LSTRIP;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "rstrip"))) t->attr[id] |= ATTR_RSTRIP;
  }

  /* merges: "a b" strings or ["a", "b"] pairs */
  size_t nm = (size_t)cJSON_GetArraySize(merges);
  mv = calloc(2 * (nm ? nm : 1), sizeof *mv);
  if (!mv) {
    rc = model__errf(err, errlen, -ENOMEM, "tokenizer: out of memory");
    goto fail;
  }
  size_t k = 0;
  cJSON_ArrayForEach(it, merges) {
    if (cJSON_IsString(it)) {
      const char *s = it->valuestring;
      size_t l = strlen(s);
      const char *sp = l > 1 ? strchr(s + 1, ' ') : NULL;
      if (sp) {
        mv[k] = (tok_view_t){s, (size_t)(sp - s)};
        mv[nm + k] = (tok_view_t){sp + 1, l - (size_t)(sp - s) - 1};
      }
    } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 &&
               cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
               cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
      const char *a = cJSON_GetArrayItem(it, 0)->valuestring,
                 *b = cJSON_GetArrayItem(it, 1)->valuestring;
      mv[k] = (tok_view_t){a, strlen(a)};
      mv[nm + k] = (tok_view_t){b, strlen(b)};
    } else {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer.json: bad merge at index %zu", k);
      goto fail;
    }
    k++;
  }
  if ((rc = merges_build(t, mv, mv + nm, nm, err, errlen))) goto fail;
  t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));

  /* pre-tokenizer, normalizer, decoder */
  bool byte_level = false, metaspace = false, prepend = false, replace = false;
  const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
  if ((rc = json_pre(t, pre, &byte_level, &metaspace, err, errlen))) goto fail;
  json_normalizer(cJSON_GetObjectItemCaseSensitive(root, "normalizer"), &prepend, &replace);
  const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
  if (json_has_type(dec, "ByteLevel", "decoders")) byte_level = true;
  if (byte_level) {
    t->byte_encode = true;
    t->add_space_prefix = false;
    if (t->n_re == 0 && (rc = re_add(t, RE_GPT2 "|\\s+", err, errlen))) goto fail;
  } else {
    t->byte_encode = false;
    t->escape_ws = metaspace || replace ||
                   cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"));
    if (prepend) t->add_space_prefix = true;
    t->prefix_encode = t->add_space_prefix;
    if (!t->escape_ws) {
      rc = model__errf(err, errlen, -EINVAL, "tokenizer.json: neither byte-level nor metaspace BPE");
      goto fail;
    }
    for (size_t i = 0; i < n; i++) {
      const char *s = tok_text(t, (int32_t)i);
      if (t->text_len[i] == 6 && !memcmp(s, "<0x", 3) && s[5] == '>') t->attr[i] = ATTR_BYTE;
    }
  }

  /* BOS: a TemplateProcessing that starts with a special token */
  const cJSON *post = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
  if (json_type_is(post, "TemplateProcessing")) {
    const cJSON *first = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(post, "single"), 0);
    const char *id = json_str(cJSON_GetObjectItemCaseSensitive(first, "SpecialToken"), "id");
    if (id && (t->bos = find_text(t, id)) >= 0) t->add_bos = true;
  }
  json_config(t, path);
  if (t->eos < 0) {
    static const char *const eos_guess[] = {"</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>",
                                            NULL};
    for (size_t i = 0; eos_guess[i] && t->eos < 0; i++) t->eos = find_text(t, eos_guess[i]);
  }
  if (t->add_bos && t->bos < 0) t->add_bos = false;
  t->clean_spaces = false;

  tok_ids_t fim = {-1, -1, -1, -1, -1, -1};
  if ((rc = tok_finish(t, &fim, NULL, err, errlen))) goto fail;
  free(toks);
  free(mv);
  cJSON_Delete(root);
  *out = t;
  return 0;
fail:
  free(toks);
  free(mv);
  cJSON_Delete(root);
  model_tok_free(t);
  return rc;
}

/* ---- accessors ------------------------------------------------------------- */

int32_t model_tok_n_vocab(const model_tok_t *t) { return t->n_vocab; }
int32_t model_tok_bos(const model_tok_t *t) { return t->bos; }
int32_t model_tok_eos(const model_tok_t *t) { return t->eos; }
bool model_tok_add_bos(const model_tok_t *t) { return t->add_bos; }

bool model_tok_is_eog(const model_tok_t *t, int32_t id) {
  return id >= 0 && id < t->n_vocab && (t->attr[id] & ATTR_EOG);
}

int32_t model_tok_lookup(const model_tok_t *t, const char *text) { return find_text(t, text); }

/* ---- encoding -------------------------------------------------------------- */

typedef struct frag {
  int32_t id; /* -1: raw text */
  size_t off, len;
} frag_t;

typedef struct sym {
  uint32_t off, n;
  int32_t prev, next;
} sym_t;

typedef struct bigram {
  float score; /* SentencePiece: higher first */
  int32_t rank; /* BPE: lower first */
  int32_t left, right;
  uint32_t size;
} bigram_t;

typedef struct enc {
  const model_tok_t *t;
  int32_t *out;
  size_t cap, n;
  int rc;
  frag_t *fa, *fb;
  size_t fa_cap, fb_cap;
  char *rtext, *wtext; /* regex view and word bytes of a fragment */
  size_t rt_cap, wt_cap;
  size_t *ra, *rb; /* word ranges: pairs of byte offsets */
  size_t ra_cap, rb_cap;
  char *word;
  size_t word_cap;
  sym_t *sym;
  size_t sym_cap;
  bigram_t *heap;
  size_t heap_cap, heap_n;
  pcre2_match_data *md;
} enc_t;

static void emit(enc_t *e, int32_t id) {
  if (e->n < e->cap) e->out[e->n] = id;
  e->n++;
}

static bool bigram_before(const model_tok_t *t, const bigram_t *a, const bigram_t *b) {
  if (t->kind == TOK_SPM) {
    if (a->score != b->score) return a->score > b->score;
  } else if (a->rank != b->rank) {
    return a->rank < b->rank;
  }
  return a->left < b->left;
}

static void heap_push(enc_t *e, bigram_t b) {
  if (grow(&e->heap, &e->heap_cap, e->heap_n + 1, sizeof *e->heap)) {
    e->rc = -ENOMEM;
    return;
  }
  size_t i = e->heap_n++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!bigram_before(e->t, &b, &e->heap[p])) break;
    e->heap[i] = e->heap[p];
    i = p;
  }
  e->heap[i] = b;
}

static bigram_t heap_pop(enc_t *e) {
  bigram_t top = e->heap[0], last = e->heap[--e->heap_n];
  size_t i = 0, n = e->heap_n;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && bigram_before(e->t, &e->heap[c + 1], &e->heap[c])) c++;
    if (!bigram_before(e->t, &e->heap[c], &last)) break;
    e->heap[i] = e->heap[c];
    i = c;
  }
  if (n) e->heap[i] = last;
  return top;
}

/* Split s[0..n) into one symbol per UTF-8 lead byte (llama.cpp's rule). */
static int make_symbols(enc_t *e, const char *s, size_t n, size_t *count) {
  size_t k = 0;
  if (grow(&e->sym, &e->sym_cap, n ? n : 1, sizeof *e->sym)) return -ENOMEM;
  for (size_t off = 0; off < n; k++) {
    size_t l = utf8_lead_len((unsigned char)s[off]);
    if (l > n - off) l = n - off;
    e->sym[k] = (sym_t){(uint32_t)off, (uint32_t)l, (int32_t)k - 1, -1};
    if (k) e->sym[k - 1].next = (int32_t)k;
    off += l;
  }
  *count = k;
  return 0;
}

static void bpe_pair(enc_t *e, const char *w, int32_t l, int32_t r) {
  if (l < 0 || r < 0) return;
  const sym_t *a = &e->sym[l], *b = &e->sym[r];
  int32_t rank = merge_find(e->t, w + a->off, a->n, w + b->off, b->n);
  if (rank < 0) return;
  heap_push(e, (bigram_t){0, rank, l, r, a->n + b->n});
}

static void spm_pair(enc_t *e, const char *w, int32_t l, int32_t r) {
  if (l < 0 || r < 0) return;
  const sym_t *a = &e->sym[l], *b = &e->sym[r];
  int32_t id = vocab_find(e->t, w + a->off, a->n + b->n);
  if (id < 0) return;
  heap_push(e, (bigram_t){e->t->scores[id], 0, l, r, a->n + b->n});
}

/* Merge loop shared by both kinds: the heap top wins while both halves are
 * still whole (their sizes add up to what was queued). */
static void merge_symbols(enc_t *e, const char *w, size_t count, bool spm) {
  e->heap_n = 0;
  for (size_t i = 1; i < count; i++) {
    if (spm)
      spm_pair(e, w, (int32_t)i - 1, (int32_t)i);
    else
      bpe_pair(e, w, (int32_t)i - 1, (int32_t)i);
  }
  while (e->heap_n && !e->rc) {
    bigram_t b = heap_pop(e);
    sym_t *l = &e->sym[b.left], *r = &e->sym[b.right];
    if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
    l->n += r->n;
    r->n = 0;
    l->next = r->next;
    if (r->next >= 0) e->sym[r->next].prev = b.left;
    if (spm) {
      spm_pair(e, w, l->prev, b.left);
      spm_pair(e, w, b.left, l->next);
    } else {
      bpe_pair(e, w, l->prev, b.left);
      bpe_pair(e, w, b.left, l->next);
    }
  }
}

static void bpe_word(enc_t *e, const char *w, size_t n) {
  const model_tok_t *t = e->t;
  if (n == 0) return;
  if (t->ignore_merges) {
    int32_t id = vocab_find(t, w, n);
    if (id >= 0) {
      emit(e, id);
      return;
    }
  }
  size_t count;
  if (make_symbols(e, w, n, &count)) {
    e->rc = -ENOMEM;
    return;
  }
  merge_symbols(e, w, count, false);
  for (int32_t i = 0; i >= 0 && (size_t)i < count; i = e->sym[i].next) {
    const sym_t *s = &e->sym[i];
    if (s->n == 0) continue;
    int32_t id = vocab_find(t, w + s->off, s->n);
    if (id >= 0) {
      emit(e, id);
      continue;
    }
    for (uint32_t j = 0; j < s->n; j++) { /* llama.cpp: each byte alone, or nothing */
      unsigned char c = (unsigned char)w[s->off + j];
      int32_t bid =
          t->byte_encode ? vocab_find(t, (const char *)&w[s->off + j], 1) : t->byte_tok[c];
      if (bid >= 0) emit(e, bid);
    }
  }
}

/* Regex view of a raw fragment: llama.cpp's lenient decode, re-encoded. rtext
 * is valid UTF-8 (for PCRE2); wtext has the same length and holds the bytes
 * words are made of (they differ only where a surrogate was decoded). */
static int sanitize(enc_t *e, const char *s, size_t n, size_t *out_len) {
  if (n > (SIZE_MAX - 1) / 3 || grow(&e->rtext, &e->rt_cap, 3 * n + 1, 1) ||
      grow(&e->wtext, &e->wt_cap, 3 * n + 1, 1))
    return -ENOMEM;
  const unsigned char *u = (const unsigned char *)s;
  size_t o = 0;
  for (size_t i = 0; i < n;) {
    size_t adv;
    uint32_t c = utf8_get_lenient(u + i, n - i, &adv);
    i += adv;
    if (c > 0x10FFFF) c = 0xFFFD;
    if (c >= 0xD800 && c <= 0xDFFF) {
      utf8_put(0xFFFD, e->rtext + o);
      e->wtext[o] = (char)(0xE0 | (c >> 12));
      e->wtext[o + 1] = (char)(0x80 | ((c >> 6) & 0x3F));
      e->wtext[o + 2] = (char)(0x80 | (c & 0x3F));
      o += 3;
      continue;
    }
    size_t l = utf8_put(c, e->rtext + o);
    memcpy(e->wtext + o, e->rtext + o, l);
    o += l;
  }
  *out_len = o;
  return 0;
}

static int push_range(size_t **arr, size_t *cap, size_t *n, size_t a, size_t b) {
  if (grow(arr, cap, 2 * (*n + 1), sizeof **arr)) return -ENOMEM;
  (*arr)[2 * *n] = a;
  (*arr)[2 * *n + 1] = b;
  (*n)++;
  return 0;
}

static int re_next(const pcre2_code *re, const char *s, size_t n, size_t start,
                   pcre2_match_data *md) {
  int rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, md, NULL);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
    rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
  return rc;
}

/* Split rtext[0..n) by each regex in turn; every match and every stretch
 * between matches becomes a word. Leaves the words in e->ra. */
static int split_words(enc_t *e, size_t n, size_t *n_words) {
  const model_tok_t *t = e->t;
  size_t na = 0;
  if (push_range(&e->ra, &e->ra_cap, &na, 0, n)) return -ENOMEM;
  for (size_t r = 0; r < t->n_re; r++) {
    size_t nb = 0;
    for (size_t w = 0; w < na; w++) {
      size_t a = e->ra[2 * w], b = e->ra[2 * w + 1];
      const char *s = e->rtext + a;
      size_t len = b - a, pos = 0, prev = 0;
      while (pos <= len) {
        int rc = re_next(t->re[r], s, len, pos, e->md);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t m0 = ov[0], m1 = ov[1];
        if (m1 <= m0) { /* empty match: step over one character */
          if (m0 >= len) break;
          pos = m0 + utf8_lead_len((unsigned char)s[m0]);
          continue;
        }
        if (m0 > prev && push_range(&e->rb, &e->rb_cap, &nb, a + prev, a + m0)) return -ENOMEM;
        if (push_range(&e->rb, &e->rb_cap, &nb, a + m0, a + m1)) return -ENOMEM;
        prev = pos = m1;
      }
      if (prev < len && push_range(&e->rb, &e->rb_cap, &nb, a + prev, b)) return -ENOMEM;
    }
    size_t *tmp = e->ra, tc = e->ra_cap;
    e->ra = e->rb;
    e->ra_cap = e->rb_cap;
    e->rb = tmp;
    e->rb_cap = tc;
    na = nb;
  }
  *n_words = na;
  return 0;
}

static const char k_ws_mark[] = "\xe2\x96\x81"; /* U+2581 */

/* Copy s[0..n) into e->word with ' ' escaped as U+2581, optionally after a
 * leading one. */
static int escape_into_word(enc_t *e, const char *s, size_t n, bool prefix, size_t *out_len) {
  if (n > (SIZE_MAX - 3) / 3 || grow(&e->word, &e->word_cap, 3 * n + 4, 1)) return -ENOMEM;
  size_t o = 0;
  if (prefix) {
    memcpy(e->word, k_ws_mark, 3);
    o = 3;
  }
  for (size_t i = 0; i < n; i++) {
    if (s[i] == ' ') {
      memcpy(e->word + o, k_ws_mark, 3);
      o += 3;
    } else {
      e->word[o++] = s[i];
    }
  }
  *out_len = o;
  return 0;
}

static void encode_bpe_fragment(enc_t *e, const char *s, size_t n, bool prefix) {
  const model_tok_t *t = e->t;
  size_t rn, nw;
  if (t->escape_ws) {
    size_t wl;
    if (escape_into_word(e, s, n, prefix, &wl)) {
      e->rc = -ENOMEM;
      return;
    }
    s = e->word; /* sanitize copies it out before e->word is reused */
    n = wl;
  }
  if (sanitize(e, s, n, &rn) || split_words(e, rn, &nw)) {
    e->rc = -ENOMEM;
    return;
  }
  for (size_t w = 0; w < nw && !e->rc; w++) {
    size_t a = e->ra[2 * w], b = e->ra[2 * w + 1];
    if (!t->byte_encode) {
      bpe_word(e, e->wtext + a, b - a);
      continue;
    }
    if (grow(&e->word, &e->word_cap, 2 * (b - a) + 1, 1)) {
      e->rc = -ENOMEM;
      return;
    }
    size_t o = 0;
    for (size_t i = a; i < b; i++) {
      unsigned char c = (unsigned char)e->wtext[i];
      memcpy(e->word + o, t->benc[c], t->benc_len[c]);
      o += t->benc_len[c];
    }
    bpe_word(e, e->word, o);
  }
}

static void encode_spm_fragment(enc_t *e, const char *s, size_t n, bool prefix) {
  const model_tok_t *t = e->t;
  size_t wl, count;
  if (escape_into_word(e, s, n, prefix, &wl) || make_symbols(e, e->word, wl, &count)) {
    e->rc = -ENOMEM;
    return;
  }
  const char *w = e->word;
  merge_symbols(e, w, count, true);
  for (int32_t i = 0; i >= 0 && (size_t)i < count; i = e->sym[i].next) {
    const sym_t *sy = &e->sym[i];
    if (sy->n == 0) continue;
    int32_t id = vocab_find(t, w + sy->off, sy->n);
    if (id >= 0) {
      emit(e, id);
      continue;
    }
    for (uint32_t j = 0; j < sy->n; j++) {
      int32_t bid = t->byte_tok[(unsigned char)w[sy->off + j]];
      if (bid < 0) bid = t->unk;
      if (bid >= 0) emit(e, bid);
    }
  }
}

static bool is_c_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* Cut the raw fragments at every occurrence of each special token text,
 * longest texts first, as llama.cpp's tokenizer_st_partition does. */
static int partition(enc_t *e, const char *text, size_t len, bool parse_special, size_t *n_frags) {
  const model_tok_t *t = e->t;
  size_t na = 0;
  if (grow(&e->fa, &e->fa_cap, 1, sizeof *e->fa)) return -ENOMEM;
  if (len) e->fa[na++] = (frag_t){-1, 0, len};
  for (size_t k = 0; k < t->n_specials; k++) {
    int32_t sid = t->specials[k];
    uint16_t a = t->attr[sid];
    if (!parse_special && (a & (ATTR_CONTROL | ATTR_UNKNOWN))) continue;
    const char *st = tok_text(t, sid);
    size_t sl = t->text_len[sid];
    bool any = false;
    for (size_t i = 0; i < na && !any; i++)
      if (e->fa[i].id < 0 && e->fa[i].len >= sl &&
          memmem(text + e->fa[i].off, e->fa[i].len, st, sl))
        any = true;
    if (!any) continue;
    size_t nb = 0;
    for (size_t i = 0; i < na; i++) {
      frag_t f = e->fa[i];
      if (f.id >= 0) {
        if (grow(&e->fb, &e->fb_cap, nb + 1, sizeof *e->fb)) return -ENOMEM;
        e->fb[nb++] = f;
        continue;
      }
      size_t cur = f.off, end = f.off + f.len;
      for (;;) {
        const char *m = end - cur >= sl ? memmem(text + cur, end - cur, st, sl) : NULL;
        if (!m) break;
        size_t mo = (size_t)(m - text), ll = mo - cur;
        if (a & ATTR_LSTRIP)
          while (ll > 0 && is_c_space(text[cur + ll - 1])) ll--;
        if (grow(&e->fb, &e->fb_cap, nb + 2, sizeof *e->fb)) return -ENOMEM;
        if (ll) e->fb[nb++] = (frag_t){-1, cur, ll};
        e->fb[nb++] = (frag_t){sid, mo, sl};
        cur = mo + sl;
        if (a & ATTR_RSTRIP)
          while (cur < end && is_c_space(text[cur])) cur++;
      }
      if (cur < end) {
        if (grow(&e->fb, &e->fb_cap, nb + 1, sizeof *e->fb)) return -ENOMEM;
        e->fb[nb++] = (frag_t){-1, cur, end - cur};
      }
    }
    frag_t *tmp = e->fa;
    size_t tc = e->fa_cap;
    e->fa = e->fb;
    e->fa_cap = e->fb_cap;
    e->fb = tmp;
    e->fb_cap = tc;
    na = nb;
  }
  *n_frags = na;
  return 0;
}

int model_tok_encode(const model_tok_t *t, const char *text, size_t len, bool parse_special,
                     int32_t *out, size_t cap, size_t *n_out) {
  enc_t e = {.t = t, .out = out, .cap = out ? cap : 0};
  *n_out = 0;
  if (!text && len) return -EINVAL;
  bool valid = utf8_valid(text, len);
  e.md = pcre2_match_data_create(1, NULL);
  if (!e.md) return -ENOMEM;
  size_t nf = 0;
  e.rc = partition(&e, text, len, parse_special, &nf);
  bool prev_special = true; /* a space prefix goes on the first fragment and after specials */
  for (size_t i = 0; i < nf && !e.rc; i++) {
    const frag_t *f = &e.fa[i];
    if (f->id >= 0) {
      emit(&e, f->id);
      prev_special = true;
      continue;
    }
    bool prefix = t->prefix_encode && prev_special;
    if (t->kind == TOK_SPM)
      encode_spm_fragment(&e, text + f->off, f->len, prefix);
    else
      encode_bpe_fragment(&e, text + f->off, f->len, prefix);
    prev_special = false;
  }
  pcre2_match_data_free(e.md);
  free(e.fa);
  free(e.fb);
  free(e.rtext);
  free(e.wtext);
  free(e.ra);
  free(e.rb);
  free(e.word);
  free(e.sym);
  free(e.heap);
  if (e.rc) return e.rc;
  *n_out = e.n;
  if (e.n > e.cap) return -ENOSPC;
  return valid ? 0 : -EINVAL;
}

/* ---- decoding -------------------------------------------------------------- */

const char *model_tok_piece(const model_tok_t *t, int32_t id, bool special, size_t *len) {
  *len = 0;
  if (id < 0 || id >= t->n_vocab) return "";
  if (!special && (t->attr[id] & (ATTR_UNKNOWN | ATTR_CONTROL))) return "";
  *len = t->piece_len[id];
  return t->piece_pool + t->piece_off[id];
}

/* llama.cpp's clean_up_tokenization_spaces passes, in place; returns the new length. */
static size_t clean_spaces(char *s, size_t n) {
  if (n == 0) return 0;
  size_t o = 1;
  for (size_t i = 1; i < n; i++) { /* " ?" " !" " ." " ," */
    char x = s[i];
    if (s[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) o--;
    s[o++] = x;
  }
  /* the passes read the previous input byte, which in-place writing keeps intact */
  n = o;
  o = 1;
  for (size_t i = 1; i < n; i++) { /* " ' " -> "'" */
    char x = s[i];
    if (x == '\'' && i + 1 < n && s[i - 1] == ' ' && s[i + 1] == ' ') {
      o--;
      s[++i] = '\0';
    }
    s[o++] = x;
  }
  n = o;
  o = 1;
  for (size_t i = 1; i < n; i++) { /* " 's" " 'm" " 're" " 've" */
    char x = s[i];
    if (s[i - 1] == ' ' && x == '\'' && i + 1 < n) {
      char x1 = s[i + 1];
      if (x1 == 's' || x1 == 'm')
        o--;
      else if (x1 != 't' && x1 != 'd' && i + 2 < n) {
        char x2 = s[i + 2];
        if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) o--;
      }
    }
    s[o++] = x;
  }
  return o;
}

size_t model_tok_decode(const model_tok_t *t, const int32_t *ids, size_t n, bool special, char *buf,
                        size_t cap) {
  bool strip = t->add_space_prefix;
  size_t total = 0;
  char *tmp = NULL;
  if (t->clean_spaces) { /* needs the whole text before it can clean it */
    for (size_t i = 0; i < n; i++) {
      size_t l;
      model_tok_piece(t, ids[i], special, &l);
      total += l;
    }
    tmp = malloc(total + 1);
    if (!tmp) {
      if (cap) buf[0] = 0;
      return 0;
    }
  }
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    size_t l;
    const char *p = model_tok_piece(t, ids[i], special, &l);
    if (strip && l && p[0] == ' ') {
      p++;
      l--;
    }
    strip = false;
    if (tmp) {
      memcpy(tmp + o, p, l);
    } else if (o < cap) {
      size_t room = cap - 1 - o < l ? cap - 1 - o : l;
      memcpy(buf + o, p, room);
    }
    o += l;
  }
  if (tmp) {
    o = clean_spaces(tmp, o);
    if (cap) memcpy(buf, tmp, o < cap - 1 ? o : cap - 1);
    free(tmp);
  }
  if (cap) buf[o < cap - 1 ? o : cap - 1] = 0;
  return o;
}

void model_detok_init(model_detok_t *d) { memset(d, 0, sizeof *d); }

static const char k_replacement[] = "\xef\xbf\xbd";

/* Emit the complete characters of pending + p[0..n); an unfinished tail
 * stays pending (or becomes U+FFFD when at_end). */
static size_t detok_feed(model_detok_t *d, const char *p, size_t n, bool at_end, char *out,
                         size_t cap) {
  size_t limit = cap ? cap - 1 : 0, w = 0;
  unsigned char win[8];
  size_t np = d->n_pending, i = 0, total = np + n;
#define AT(k) ((k) < np ? d->pending[(k)] : (unsigned char)p[(k)-np])
  while (i < total) {
    size_t avail = total - i < 4 ? total - i : 4;
    for (size_t k = 0; k < avail; k++) win[k] = AT(i + k);
    int r = utf8_check(win, avail);
    if (r == 0 && !at_end) break; /* wait for the rest of the character */
    const char *src;
    size_t len, adv;
    if (r > 0) {
      len = adv = (size_t)r;
      src = (const char *)win;
    } else {
      adv = r == 0 ? avail : (size_t)-r;
      src = k_replacement;
      len = 3;
    }
    if (w + len > limit) break;
    memcpy(out + w, src, len);
    w += len;
    i += adv;
  }
  /* keep what was not emitted (an unfinished character, or what did not fit) */
  size_t rest = total - i, keep = rest < sizeof d->pending ? rest : sizeof d->pending;
  unsigned char nb[sizeof d->pending];
  for (size_t k = 0; k < keep; k++) nb[k] = AT(i + k);
#undef AT
  memcpy(d->pending, nb, keep);
  d->n_pending = keep;
  if (cap) out[w] = 0;
  return w;
}

size_t model_detok_push(model_detok_t *d, const model_tok_t *t, int32_t id, char *out, size_t cap) {
  size_t n;
  const char *p = model_tok_piece(t, id, false, &n);
  return detok_feed(d, p, n, false, out, cap);
}

size_t model_detok_flush(model_detok_t *d, char *out, size_t cap) {
  return detok_feed(d, "", 0, true, out, cap);
}
