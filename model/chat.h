/* Chat templates: the common families built in, detected from a model's
 * Jinja template string (GGUF tokenizer.chat_template or tokenizer_config). */
#ifndef PRESSD_MODEL_CHAT_H
#define PRESSD_MODEL_CHAT_H

#include <stdbool.h>
#include <stddef.h>

typedef enum model_chat_kind {
  MODEL_CHAT_UNKNOWN = 0,
  MODEL_CHAT_CHATML,  /* <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen) */
  MODEL_CHAT_LLAMA3,  /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
  MODEL_CHAT_LLAMA2,  /* [INST] <<SYS>>...<</SYS>> ... [/INST] */
  MODEL_CHAT_MISTRAL, /* [INST] ... [/INST] without a system block */
} model_chat_kind_t;

typedef struct model_chat_msg {
  const char *role;    /* "system" | "user" | "assistant" (borrowed) */
  const char *content; /* borrowed, NUL-terminated */
} model_chat_msg_t;

/* BOS/EOS: the bos/eos arguments are the model's token texts. A family whose
 * template writes bos_token keeps a copy in `bos` and render() writes it where
 * the template does (Llama-3 and Mistral: once at the start, "<|begin_of_text|>"
 * for Llama-3; Llama-2: before every [INST]; ChatML only if its template uses
 * bos_token), so the caller must tokenise the prompt with special tokens parsed
 * and must not add another BOS when `bos` is set. `eos` is kept only where the
 * template writes eos_token after assistant turns (Llama-2, Mistral); ChatML and
 * Llama-3 end turns with their own literals (<|im_end|>, <|eot_id|>) and have
 * eos == NULL. Named templates use the family's reference template. */
typedef struct model_chat {
  model_chat_kind_t kind;
  char *default_system; /* owns; NULL when the template adds none */
  char *bos;            /* owns; BOS text the template writes itself, or NULL */
  char *eos;            /* owns; EOS text the template writes after assistant turns, or NULL */
} model_chat_t;

/* Detect the family from a template string; also extracts a default system
 * prompt the template inserts when the first message is not a system one
 * (SmolLM2's does). -ENOTSUP with a clear message for an unknown template. */
int model_chat_init_detect(model_chat_t *c, const char *tmpl, const char *bos, const char *eos,
                           char *err, size_t errlen);
/* By name: "chatml", "llama3", "llama2", "mistral"; -EINVAL for others. */
int model_chat_init_named(model_chat_t *c, const char *name, const char *bos, const char *eos,
                          char *err, size_t errlen);
void model_chat_destroy(model_chat_t *c); /* NULL-safe */
const char *model_chat_kind_name(model_chat_kind_t k);

/* Render messages into a newly allocated prompt string (*out, caller frees).
 * add_generation_prompt opens the assistant turn. -EINVAL (with message) for
 * an unknown role or a sequence the family cannot express. */
int model_chat_render(const model_chat_t *c, const model_chat_msg_t *msgs, size_t n,
                      bool add_generation_prompt, char **out, char *err, size_t errlen);

#endif
