/* fuzz-request: the JSON request validation of the OpenAI API. Each input is
 * the body of /v1/completions, /v1/chat/completions, /tokenize and
 * /detokenize in turn, validated with the default model's tokenizer and chat
 * template. Accepted requests must satisfy what the engine relies on (a
 * non-empty prompt of valid ids that leaves room for max_tokens in the
 * context); rejected ones must carry a 4xx/5xx error whose JSON is valid. */
#include <stdint.h>
#include <string.h>

#include "server/internal.h"
#include "tests/fuzz/common.h"

#define MAX_MODEL_LEN 1024
#define MAX_TOKENS_LIMIT 700

static fuzz_model_t g_model;
static srv_api_ctx_t g_api;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  fuzz_load_model(&g_model, "fuzz-request");
  g_api = (srv_api_ctx_t){.tok = g_model.tok,
                          .chat = &g_model.chat,
                          .model_name = "fuzz-model",
                          .max_model_len = MAX_MODEL_LEN,
                          .max_tokens_limit = MAX_TOKENS_LIMIT};
  sched_kv_compression_default(&g_api.kvc);
  return 0;
}

/* An error must name a status the routes send and render as valid JSON. */
static void check_error(const srv_error_t *e) {
  FUZZ_CHECK(e->status == 400 || e->status == 404 || e->status == 500);
  FUZZ_CHECK(memchr(e->message, 0, sizeof e->message) && e->message[0]);
  FUZZ_CHECK(memchr(e->param, 0, sizeof e->param));
  srv_buf_t b;
  srv__buf_init(&b);
  srv__error_json(&b, e);
  FUZZ_CHECK(!b.oom && b.p && fuzz_utf8_ok(b.p, b.len));
  cJSON *j = cJSON_ParseWithLength(b.p, b.len);
  FUZZ_CHECK(cJSON_IsObject(j));
  cJSON_Delete(j);
  srv__buf_free(&b);
}

static void check_request(const sched_request_t *r, const srv_gen_params_t *gp, srv_api_t api) {
  int32_t n_vocab = model_tok_n_vocab(g_api.tok);
  FUZZ_CHECK(r->prompt && r->n_prompt > 0 && r->n_prompt < MAX_MODEL_LEN);
  for (int32_t i = 0; i < r->n_prompt; i++)
    FUZZ_CHECK(r->prompt[i] >= 0 && r->prompt[i] < n_vocab);
  FUZZ_CHECK(r->max_tokens >= 1 && r->max_tokens <= MAX_TOKENS_LIMIT);
  FUZZ_CHECK((int64_t)r->n_prompt + r->max_tokens <= MAX_MODEL_LEN);
  FUZZ_CHECK(gp->api == api);
  FUZZ_CHECK(gp->top_logprobs >= 0 && gp->top_logprobs <= SCHED_MAX_TOP_LOGPROBS);
  FUZZ_CHECK(r->logprobs == (gp->logprobs ? gp->top_logprobs : -1));
  FUZZ_CHECK(!gp->include_usage || gp->stream);
  FUZZ_CHECK(!gp->echo || (api == SRV_API_COMPLETIONS && gp->echo_text &&
                           gp->echo_len == strlen(gp->echo_text)));
  FUZZ_CHECK(gp->echo || !gp->echo_text);
  FUZZ_CHECK(r->n_stop >= 0 && r->n_stop <= SRV_MAX_STOP && (r->n_stop == 0 || r->stop));
  for (int32_t i = 0; i < r->n_stop; i++) {
    size_t n = strlen(r->stop[i]);
    FUZZ_CHECK(n > 0 && n <= SRV_MAX_STOP_LEN);
  }
  char msg[200];
  FUZZ_CHECK(sched_sample_params_check(&r->sample, msg, sizeof msg) == 0);
}

static void generate(const char *body, size_t len, srv_api_t api) {
  sched_request_t *r = NULL;
  srv_gen_params_t gp;
  srv_error_t e;
  if (srv__parse_generate(&g_api, api, body, len, &r, &gp, &e) == 0) {
    check_request(r, &gp, api);
    sched_request_free(r);
    srv__gen_params_destroy(&gp);
  } else {
    FUZZ_CHECK(r == NULL && gp.echo_text == NULL);
    check_error(&e);
  }
}

/* /tokenize and /detokenize answer a JSON object or an error. */
static void tokenizer_route(const char *body, size_t len, bool encode) {
  srv_buf_t out;
  srv_error_t e;
  srv__buf_init(&out);
  int rc = encode ? srv__tokenize(&g_api, body, len, &out, &e)
                  : srv__detokenize(&g_api, body, len, &out, &e);
  if (rc == 0) {
    FUZZ_CHECK(!out.oom && out.p && fuzz_utf8_ok(out.p, out.len));
    cJSON *j = cJSON_ParseWithLength(out.p, out.len);
    FUZZ_CHECK(cJSON_IsObject(j));
    cJSON_Delete(j);
  } else {
    check_error(&e);
  }
  srv__buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* As the server holds a body: NUL-terminated after its bytes. */
  char *body = malloc(size + 1);
  if (!body) return 0;
  memcpy(body, data, size);
  body[size] = '\0';
  generate(body, size, SRV_API_COMPLETIONS);
  generate(body, size, SRV_API_CHAT);
  tokenizer_route(body, size, true);
  tokenizer_route(body, size, false);
  free(body);
  return 0;
}
