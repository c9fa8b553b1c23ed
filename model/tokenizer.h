/* Tokenizer: byte-level BPE (GPT-2 / Llama-3 / SmolLM style, pre-tokeniser
 * regex chosen from the vocabulary's "pre" name, PCRE2 with Unicode) and
 * SentencePiece-style BPE (Llama-2 vocabularies), special/added tokens, and
 * incremental detokenisation that never emits half a UTF-8 character.
 * Must produce the same ids as llama.cpp on the same GGUF. */
#ifndef PRESSD_MODEL_TOKENIZER_H
#define PRESSD_MODEL_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/gguf.h"

typedef struct model_tok model_tok_t;

/* Build from a GGUF's tokenizer.ggml.* metadata. -EINVAL with a message
 * naming the problem (unknown tokenizer model or pre-tokeniser, missing keys). */
int model_tok_from_gguf(model_tok_t **out, const model_gguf_t *g, char *err, size_t errlen);
/* Build from a Hugging Face tokenizer.json (BPE models). */
int model_tok_from_json(model_tok_t **out, const char *path, char *err, size_t errlen);
void model_tok_free(model_tok_t *t); /* NULL-safe */

int32_t model_tok_n_vocab(const model_tok_t *t);
int32_t model_tok_bos(const model_tok_t *t);  /* -1 when none */
int32_t model_tok_eos(const model_tok_t *t);  /* -1 when none */
bool model_tok_add_bos(const model_tok_t *t); /* the vocabulary wants BOS prepended */
/* End of generation: EOS, EOT (<|eot_id|>, <|im_end|>, <|end_of_text|>...). */
bool model_tok_is_eog(const model_tok_t *t, int32_t id);
/* Id of an exact token text (e.g. "<|im_end|>"), -1 when absent. */
int32_t model_tok_lookup(const model_tok_t *t, const char *text);

/* Encode len bytes of text. With parse_special, control tokens written in the
 * text ("<|im_start|>") become their ids; user-defined added tokens are always
 * matched (as llama.cpp does). BOS is never added here: callers prepend it
 * when model_tok_add_bos() says so.
 * Writes at most cap ids to out and sets *n_out to the full count; returns 0,
 * or -ENOSPC when cap was too small (call again with *n_out), -EINVAL on
 * invalid UTF-8 (the ids are still written: each ill-formed byte is tokenised
 * as U+FFFD, as llama.cpp does; never crashes). */
int model_tok_encode(const model_tok_t *t, const char *text, size_t len, bool parse_special,
                     int32_t *out, size_t cap, size_t *n_out);

/* The bytes a token stands for when decoded (byte-level BPE mapping undone,
 * SentencePiece U+2581 turned into a space, <0xNN> byte tokens into the byte).
 * Control tokens decode to their text only when special is true, else to "". */
const char *model_tok_piece(const model_tok_t *t, int32_t id, bool special, size_t *len);

/* Decode a whole sequence into buf (NUL-terminated when cap > 0). Returns the
 * byte length it needs, like snprintf. */
size_t model_tok_decode(const model_tok_t *t, const int32_t *ids, size_t n, bool special,
                        char *buf, size_t cap);

/* Incremental detokeniser: push ids one at a time, get back only complete
 * UTF-8 characters; bytes of an unfinished character wait for the next id. */
typedef struct model_detok {
  unsigned char pending[8];
  size_t n_pending;
} model_detok_t;

void model_detok_init(model_detok_t *d);
/* Appends the newly complete text to out (at most cap bytes, NUL-terminated
 * when cap > 0) and returns the number of bytes written. cap >= 256 suffices
 * for any single token of the supported vocabularies plus pending bytes
 * (SmolLM2's longest piece is 81 bytes); with less, the rest is lost. */
size_t model_detok_push(model_detok_t *d, const model_tok_t *t, int32_t id, char *out, size_t cap);
/* Whatever is still pending (an invalid tail) as U+FFFD replacement chars. */
size_t model_detok_flush(model_detok_t *d, char *out, size_t cap);

#endif
