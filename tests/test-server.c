/* The HTTP front end without a model running: JSON writing, auth, stop
 * parsing, SSE framing, response and chunk formats, metrics text, routing;
 * then, with the default model's tokenizer and chat template, request
 * validation (valid bodies and more than 60 malformed ones with their status
 * and "param"), /tokenize and /detokenize; then the real server over
 * sockets against a fake engine: keep-alive, pipelining order, streaming,
 * 401/404/405/408/413/429/431/503, Expect: 100-continue, chunked bodies,
 * HTTP/1.0, idle timeout, and an abort reaching the engine when a client
 * disconnects mid-stream. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "model/chat.h"
#include "model/gguf.h"
#include "model/tokenizer.h"
#include "server/internal.h"
#include "tests/test.h"

#define MODEL_NAME "test-model"
#define API_KEY "sekrit-key"
#define MAX_MODEL_LEN 4096

static model_gguf_t g_gguf;
static model_tok_t *g_tok;
static model_chat_t g_chat;
static srv_api_ctx_t g_api;

static cJSON *parse(const char *s, size_t n) {
  cJSON *j = cJSON_ParseWithLength(s, n);
  if (!j) FAIL_AT("not JSON: %.*s", (int)n, s);
  return j;
}

static const cJSON *jget(const cJSON *o, const char *key) {
  return cJSON_GetObjectItemCaseSensitive(o, key);
}

static const char *jstr(const cJSON *o, const char *key) {
  const cJSON *v = jget(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double jnum(const cJSON *o, const char *key) {
  const cJSON *v = jget(o, key);
  if (!cJSON_IsNumber(v)) FAIL_AT("'%s' is not a number", key);
  return v->valuedouble;
}

/* ======================= pieces that need no model ======================= */

static void test_json_writer(void) {
  srv_buf_t b;
  srv__buf_init(&b);
  const char in[] = "a\"b\\c\n\t\x01 \xc3\xa9 \xff end \xe2\x82";
  srv__json_str(&b, in, sizeof in - 1);
  CHECK_STR_EQ(b.p,
               "\"a\\\"b\\\\c\\n\\t\\u0001 \xc3\xa9 \xef\xbf\xbd end \xef\xbf\xbd\xef\xbf\xbd\"");
  CHECK(srv__utf8_valid(b.p, b.len));
  cJSON *j = parse(b.p, b.len);
  CHECK(cJSON_IsString(j));
  cJSON_Delete(j);
  CHECK(!srv__utf8_valid("\xed\xa0\x80", 3)); /* a surrogate */
  CHECK(!srv__utf8_valid("\xc0\x80", 2));     /* overlong */
  CHECK(srv__utf8_valid("\xf0\x9f\x98\x80", 4));

  b.len = 0;
  srv__json_float(&b, -INFINITY);
  srv__buf_add(&b, " ", 1);
  srv__json_float(&b, 2);
  srv__buf_add(&b, " ", 1);
  srv__json_float(&b, -0.25);
  srv__buf_add(&b, " ", 1);
  srv__json_cstr(&b, NULL);
  CHECK_STR_EQ(b.p, "-9999.0 2.0 -0.25 null");

  /* a borrowed (stack) buffer grows onto the heap */
  char stack[8];
  srv_buf_t s = {.p = stack, .cap = sizeof stack, .borrowed = true};
  srv__buf_adds(&s, "0123456789abcdef");
  CHECK(s.p != stack && !s.borrowed);
  CHECK_STR_EQ(s.p, "0123456789abcdef");
  srv__buf_free(&s);
  srv__buf_printf(&b, "%0300d", 7);
  CHECK(b.len == 22 + 300);
  char *t = srv__buf_take(&b);
  CHECK(b.p == NULL && b.len == 0);
  free(t);
}

static void test_errors(void) {
  srv_error_t e;
  CHECK_INT_EQ(srv__error(&e, 400, "temperature", "bad %s", "value"), -1);
  srv_buf_t b;
  srv__buf_init(&b);
  srv__error_json(&b, &e);
  cJSON *j = parse(b.p, b.len);
  const cJSON *err = jget(j, "error");
  CHECK_STR_EQ(jstr(err, "message"), "bad value");
  CHECK_STR_EQ(jstr(err, "type"), "invalid_request_error");
  CHECK_STR_EQ(jstr(err, "param"), "temperature");
  CHECK_INT_EQ(jnum(err, "code"), 400);
  cJSON_Delete(j);
  b.len = 0;
  srv__error(&e, 404, NULL, "no such \"model\"");
  e.code = "model_not_found";
  srv__error_json(&b, &e);
  j = parse(b.p, b.len);
  err = jget(j, "error");
  CHECK(cJSON_IsNull(jget(err, "param")));
  CHECK_STR_EQ(jstr(err, "code"), "model_not_found");
  CHECK_STR_EQ(jstr(err, "message"), "no such \"model\"");
  cJSON_Delete(j);
  srv__buf_free(&b);
  CHECK_STR_EQ(srv__status_text(413), "Payload Too Large");
  CHECK_STR_EQ(srv__status_text(431), "Request Header Fields Too Large");
}

static void test_auth(void) {
  CHECK(srv__ct_equal("abc", 3, "abc", 3));
  CHECK(!srv__ct_equal("abc", 3, "abd", 3));
  CHECK(!srv__ct_equal("abc", 3, "abcd", 4));
  CHECK(!srv__ct_equal("", 0, "a", 1));
  CHECK(srv__ct_equal("", 0, "", 0));
  CHECK(!srv__ct_equal("abcabc", 6, "abc", 3)); /* wrap-around reads must not match */
  char *k[] = {"s3cret"};
  CHECK(srv__auth_ok(NULL, 0, NULL, 0)); /* no key configured */
  CHECK(!srv__auth_ok(NULL, 0, k, 1));
#define AUTH(h) srv__auth_ok(h, strlen(h), k, 1)
  CHECK(AUTH("Bearer s3cret"));
  CHECK(AUTH("bearer s3cret"));
  CHECK(AUTH("Bearer  s3cret "));
  CHECK(!AUTH("Bearer s3cre"));
  CHECK(!AUTH("Bearer s3cretx"));
  CHECK(!AUTH("Basic s3cret"));
  CHECK(!AUTH("s3cret"));
  CHECK(!AUTH("Bearer "));
  CHECK(!AUTH(""));
#undef AUTH
  char *ks[] = {"first-key", "s3cret", "third"}; /* several keys: any one opens */
#define AUTH3(h) srv__auth_ok(h, strlen(h), ks, 3)
  CHECK(AUTH3("Bearer first-key"));
  CHECK(AUTH3("Bearer s3cret"));
  CHECK(AUTH3("Bearer third"));
  CHECK(!AUTH3("Bearer thir"));
  CHECK(!AUTH3("Bearer first-keys3cret"));
  CHECK(!AUTH3("Bearer "));
#undef AUTH3
}

static cJSON *json_of(const char *s) {
  cJSON *j = cJSON_Parse(s);
  CHECK(j);
  return j;
}

static void check_stop(const char *json, int n, const char *first, const char *last) {
  cJSON *j = json_of(json);
  char **stop = NULL;
  int32_t ns = -1;
  srv_error_t e;
  if (srv__parse_stop(j, &stop, &ns, &e)) FAIL_AT("stop %s: %s", json, e.message);
  CHECK_INT_EQ(ns, n);
  if (n) {
    CHECK_STR_EQ(stop[0], first);
    CHECK_STR_EQ(stop[n - 1], last);
  } else {
    CHECK(stop == NULL);
  }
  for (int i = 0; i < ns; i++) free(stop[i]);
  free(stop);
  cJSON_Delete(j);
}

static void check_stop_bad(const char *json) {
  cJSON *j = json_of(json);
  char **stop = (char **)1;
  int32_t ns = -1;
  srv_error_t e;
  CHECK_INT_EQ(srv__parse_stop(j, &stop, &ns, &e), -1);
  CHECK(stop == NULL && ns == 0);
  CHECK_INT_EQ(e.status, 400);
  CHECK_STR_EQ(e.param, "stop");
  cJSON_Delete(j);
}

static void test_stop(void) {
  check_stop("null", 0, NULL, NULL);
  check_stop("\"\\n\"", 1, "\n", "\n");
  check_stop("[\"a\", \"bc\", \"\"]", 2, "a", "bc");
  check_stop("[\"x\", \"x\", \"y\"]", 2, "x", "y");
  check_stop("[]", 0, NULL, NULL);
  check_stop("\"\"", 0, NULL, NULL);
  check_stop("[\"<|im_end|>\", \"\\u00e9t\\u00e9\"]", 2, "<|im_end|>", "\xc3\xa9t\xc3\xa9");
  CHECK(srv__parse_stop(NULL, &(char **){NULL}, &(int32_t){0}, &(srv_error_t){0}) == 0);
  check_stop_bad("5");
  check_stop_bad("true");
  check_stop_bad("{}");
  check_stop_bad("[\"a\", 1]");
  check_stop_bad("[[\"a\"]]");
  check_stop_bad("[null]");
  srv_buf_t b;
  srv__buf_init(&b);
  srv__buf_adds(&b, "[");
  for (int i = 0; i <= SRV_MAX_STOP; i++) srv__buf_printf(&b, "%s\"s%d\"", i ? "," : "", i);
  srv__buf_adds(&b, "]");
  check_stop_bad(b.p);
  b.len = 0;
  srv__buf_adds(&b, "\"");
  for (int i = 0; i <= SRV_MAX_STOP_LEN; i++) srv__buf_adds(&b, "z");
  srv__buf_adds(&b, "\"");
  check_stop_bad(b.p);
  srv__buf_free(&b);
}

static void test_sse(void) {
  srv_buf_t b;
  srv__buf_init(&b);
  srv__sse_data(&b, "{\"a\":1}", 7, false);
  srv__sse_done(&b, false);
  CHECK_STR_EQ(b.p, "data: {\"a\":1}\n\ndata: [DONE]\n\n");
  b.len = 0;
  srv__sse_data(&b, "{\"a\":1}", 7, true);
  srv__sse_done(&b, true);
  /* 6 + 7 + 2 = 15 = 0xf; 6 + 6 + 2 = 14 = 0xe */
  CHECK_STR_EQ(b.p, "f\r\ndata: {\"a\":1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n");
  srv__buf_free(&b);
}

static void test_format(void) {
  srv_buf_t b;
  srv__buf_init(&b);
  srv_resp_info_t ri = {SRV_API_COMPLETIONS, "cmpl-abc", "m\"x", 1700000000, false};

  srv__fmt_response(&b, &ri, "hi \"there\"", 10, "length", NULL, &(srv_usage_t){5, 3, 0, 0});
  cJSON *j = parse(b.p, b.len);
  CHECK_STR_EQ(jstr(j, "id"), "cmpl-abc");
  CHECK_STR_EQ(jstr(j, "object"), "text_completion");
  CHECK_STR_EQ(jstr(j, "model"), "m\"x");
  CHECK_INT_EQ(jnum(j, "created"), 1700000000);
  const cJSON *c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_INT_EQ(cJSON_GetArraySize(jget(j, "choices")), 1);
  CHECK_INT_EQ(jnum(c0, "index"), 0);
  CHECK_STR_EQ(jstr(c0, "text"), "hi \"there\"");
  CHECK_STR_EQ(jstr(c0, "finish_reason"), "length");
  CHECK(cJSON_IsNull(jget(c0, "logprobs")));
  const cJSON *u = jget(j, "usage");
  CHECK_INT_EQ(jnum(u, "prompt_tokens"), 5);
  CHECK_INT_EQ(jnum(u, "completion_tokens"), 3);
  CHECK_INT_EQ(jnum(u, "total_tokens"), 8);
  cJSON_Delete(j);

  ri.api = SRV_API_CHAT;
  ri.id = "chatcmpl-1";
  b.len = 0;
  srv__fmt_response(&b, &ri, "ok", 2, "stop", NULL, &(srv_usage_t){7, 1, 40, 60});
  j = parse(b.p, b.len);
  CHECK_STR_EQ(jstr(j, "object"), "chat.completion");
  c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_STR_EQ(jstr(jget(c0, "message"), "role"), "assistant");
  CHECK_STR_EQ(jstr(jget(c0, "message"), "content"), "ok");
  CHECK_STR_EQ(jstr(c0, "finish_reason"), "stop");
  /* a compressed request's usage: the KV tokens kept and evicted */
  CHECK_INT_EQ((int)cJSON_GetNumberValue(jget(jget(j, "usage"), "kv_tokens_kept")), 40);
  CHECK_INT_EQ((int)cJSON_GetNumberValue(jget(jget(j, "usage"), "kv_tokens_evicted")), 60);
  CHECK_INT_EQ((int)cJSON_GetNumberValue(jget(jget(j, "usage"), "total_tokens")), 8);
  cJSON_Delete(j);

  /* chat chunks: the role delta, a content delta, the finish, usage */
  ri.include_usage = true;
  b.len = 0;
  srv__fmt_chunk(&b, &ri, "assistant", "", 0, NULL, NULL);
  j = parse(b.p, b.len);
  CHECK_STR_EQ(jstr(j, "object"), "chat.completion.chunk");
  c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_STR_EQ(jstr(jget(c0, "delta"), "role"), "assistant");
  CHECK_STR_EQ(jstr(jget(c0, "delta"), "content"), "");
  CHECK(cJSON_IsNull(jget(c0, "finish_reason")));
  CHECK(cJSON_IsNull(jget(j, "usage")));
  cJSON_Delete(j);
  b.len = 0;
  srv__fmt_chunk(&b, &ri, NULL, "\xc3\xa9\n", 3, NULL, NULL);
  j = parse(b.p, b.len);
  c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_STR_EQ(jstr(jget(c0, "delta"), "content"), "\xc3\xa9\n");
  CHECK(jget(jget(c0, "delta"), "role") == NULL);
  cJSON_Delete(j);
  b.len = 0;
  srv__fmt_chunk(&b, &ri, NULL, "", 0, "stop", NULL);
  j = parse(b.p, b.len);
  c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK(cJSON_IsObject(jget(c0, "delta")) && cJSON_GetArraySize(jget(c0, "delta")) == 0);
  CHECK_STR_EQ(jstr(c0, "finish_reason"), "stop");
  cJSON_Delete(j);
  b.len = 0;
  srv__fmt_usage_chunk(&b, &ri, &(srv_usage_t){4, 6, 0, 0});
  j = parse(b.p, b.len);
  CHECK(cJSON_IsArray(jget(j, "choices")) && cJSON_GetArraySize(jget(j, "choices")) == 0);
  CHECK_INT_EQ(jnum(jget(j, "usage"), "total_tokens"), 10);
  cJSON_Delete(j);

  /* completion chunk without include_usage has no "usage" key */
  ri.api = SRV_API_COMPLETIONS;
  ri.include_usage = false;
  b.len = 0;
  srv__fmt_chunk(&b, &ri, NULL, "x", 1, NULL, NULL);
  j = parse(b.p, b.len);
  CHECK(jget(j, "usage") == NULL);
  CHECK_STR_EQ(jstr(cJSON_GetArrayItem(jget(j, "choices"), 0), "text"), "x");
  cJSON_Delete(j);

  b.len = 0;
  srv__fmt_models(&b, "smol", 123, 8192);
  j = parse(b.p, b.len);
  CHECK_STR_EQ(jstr(j, "object"), "list");
  const cJSON *m0 = cJSON_GetArrayItem(jget(j, "data"), 0);
  CHECK_STR_EQ(jstr(m0, "id"), "smol");
  CHECK_STR_EQ(jstr(m0, "object"), "model");
  CHECK_INT_EQ(jnum(m0, "max_model_len"), 8192);
  cJSON_Delete(j);
  srv__buf_free(&b);
  CHECK_STR_EQ(srv__finish_name(SCHED_FINISH_STOP), "stop");
  CHECK_STR_EQ(srv__finish_name(SCHED_FINISH_LENGTH), "length");
  CHECK(srv__finish_name(SCHED_FINISH_ABORT) == NULL);
}

static bool has_line(const char *text, const char *line) {
  size_t n = strlen(line);
  for (const char *p = text; (p = strstr(p, line)); p += n)
    if ((p == text || p[-1] == '\n') && p[n] == '\n') return true;
  return false;
}

static void test_metrics(void) {
  srv_metrics_t m;
  srv__metrics_init(&m);
  srv__hist_observe(&m.ttft, 0.003);
  srv__hist_observe(&m.ttft, 0.05);
  srv__hist_observe(&m.ttft, 1e9);
  srv__hist_observe(&m.ttft, NAN);
  m.finished[SRV_FIN_STOP] = 3;
  m.finished[SRV_FIN_LENGTH] = 2;
  sched_stats_t st = {.running = 2,
                      .waiting = 1,
                      .kv_blocks_total = 200,
                      .kv_blocks_used = 50,
                      .kv_blocks_stranded = 6,
                      .preemptions = 4,
                      .prompt_tokens = 1000,
                      .generation_tokens = 77};
  srv_buf_t b;
  srv__buf_init(&b);
  srv__metrics_format(&b, &m, &st, "smol\"2");
  const char *t = b.p;
#define L "{model_name=\"smol\\\"2\"}"
  CHECK(has_line(t, "# TYPE vllm:num_requests_running gauge"));
  CHECK(has_line(t, "vllm:num_requests_running" L " 2"));
  CHECK(has_line(t, "vllm:num_requests_waiting" L " 1"));
  CHECK(has_line(t, "vllm:kv_cache_usage_perc" L " 0.25"));
  CHECK(has_line(t, "# TYPE pressd:kv_blocks_stranded gauge"));
  CHECK(has_line(t, "pressd:kv_blocks_stranded" L " 6"));
  CHECK(has_line(t, "# TYPE vllm:num_preemptions_total counter"));
  CHECK(has_line(t, "vllm:num_preemptions_total" L " 4"));
  CHECK(has_line(t, "vllm:prompt_tokens_total" L " 1000"));
  CHECK(has_line(t, "vllm:generation_tokens_total" L " 77"));
  CHECK(has_line(
      t, "vllm:request_success_total{model_name=\"smol\\\"2\",finished_reason=\"stop\"} 3"));
  CHECK(has_line(
      t, "vllm:request_success_total{model_name=\"smol\\\"2\",finished_reason=\"length\"} 2"));
  CHECK(has_line(t, "# TYPE vllm:time_to_first_token_seconds histogram"));
  CHECK(has_line(
      t, "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"2\",le=\"0.001\"} 1"));
  CHECK(has_line(
      t, "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"2\",le=\"0.005\"} 2"));
  CHECK(has_line(
      t, "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"2\",le=\"0.06\"} 3"));
  CHECK(has_line(
      t, "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"2\",le=\"2560\"} 3"));
  CHECK(has_line(
      t, "vllm:time_to_first_token_seconds_bucket{model_name=\"smol\\\"2\",le=\"+Inf\"} 4"));
  CHECK(has_line(t, "vllm:time_to_first_token_seconds_count" L " 4"));
  CHECK(has_line(t, "vllm:time_per_output_token_seconds_count" L " 0"));
  CHECK(has_line(t, "vllm:e2e_request_latency_seconds_sum" L " 0"));
  CHECK(has_line(t,
                 "vllm:request_queue_time_seconds_bucket{model_name=\"smol\\\"2\",le=\"+Inf\"} 0"));
#undef L
  /* every line is a comment or "name{labels} value" */
  int lines = 0;
  for (const char *p = t; *p;) {
    const char *nl = strchr(p, '\n');
    CHECK(nl);
    if (*p != '#') {
      const char *sp = memchr(p, ' ', (size_t)(nl - p));
      CHECK(sp && sp[-1] == '}');
      char *end;
      strtod(sp + 1, &end);
      CHECK(end == nl);
    }
    lines++;
    p = nl + 1;
  }
  CHECK(lines > 100);
  srv__buf_free(&b);
}

static void test_routes(void) {
  static const struct {
    const char *path;
    int method, status;
    const char *allow;
  } cases[] = {
      {"/v1/completions", HTTP_POST, 200, NULL},
      {"/v1/chat/completions", HTTP_POST, 200, NULL},
      {"/v1/models", HTTP_GET, 200, NULL},
      {"/v1/models", HTTP_HEAD, 200, NULL},
      {"/health", HTTP_GET, 200, NULL},
      {"/ready", HTTP_GET, 200, NULL},
      {"/version", HTTP_GET, 200, NULL},
      {"/metrics", HTTP_GET, 200, NULL},
      {"/tokenize", HTTP_POST, 200, NULL},
      {"/detokenize", HTTP_POST, 200, NULL},
      {"/v1/completions", HTTP_GET, 405, "POST"},
      {"/v1/chat/completions", HTTP_PUT, 405, "POST"},
      {"/health", HTTP_POST, 405, "GET"},
      {"/v1/models", HTTP_DELETE, 405, "GET"},
      {"/tokenize", HTTP_GET, 405, "POST"},
      {"/v1/completion", HTTP_POST, 404, NULL},
      {"/v1/completions/", HTTP_POST, 404, NULL},
      {"/", HTTP_GET, 404, NULL},
      {"", HTTP_GET, 404, NULL},
      {"/HEALTH", HTTP_GET, 404, NULL},
      {"/v2/models", HTTP_GET, 404, NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const srv_route_t *r = NULL;
    const char *allow = NULL;
    int st = srv__route_find(cases[i].path, strlen(cases[i].path), cases[i].method, &r, &allow);
    if (st != cases[i].status)
      FAIL_AT("%s %s: %d, expected %d", llhttp_method_name((llhttp_method_t)cases[i].method),
              cases[i].path, st, cases[i].status);
    CHECK((st == 200) == (r != NULL));
    if (r) CHECK(r->fn != NULL);
    if (cases[i].allow) CHECK_STR_EQ(allow, cases[i].allow);
  }
  /* the path only: the caller strips the query string */
  const srv_route_t *r;
  CHECK_INT_EQ(srv__route_find("/health?x=1", 7, HTTP_GET, &r, NULL), 200);
  CHECK(srv__route_needs_auth("/v1/models", 10));
  CHECK(srv__route_needs_auth("/v1", 3));
  CHECK(!srv__route_needs_auth("/v10", 4));
  CHECK(!srv__route_needs_auth("/health", 7));
  CHECK(!srv__route_needs_auth("/metrics", 8));
  CHECK(!srv__route_needs_auth("/tokenize", 9));
  /* request targets: origin form, absolute form (RFC 9112 3.2.2) */
  static const struct {
    const char *target, *path;
  } targets[] = {
      {"/health?x=1", "/health"},
      {"/v1/models#f", "/v1/models"},
      {"http://localhost:8000/v1/models?x", "/v1/models"},
      {"HTTPS://h/health", "/health"},
      {"http://h", ""},
      {"http://h?x=/health", ""},
      {"*", "*"},
      {"example.com:443", "example.com:443"},
  };
  for (size_t i = 0; i < sizeof targets / sizeof targets[0]; i++) {
    size_t len;
    const char *p = srv__target_path(targets[i].target, &len);
    if (len != strlen(targets[i].path) || memcmp(p, targets[i].path, len) != 0)
      FAIL_AT("%s: path \"%.*s\", expected \"%s\"", targets[i].target, (int)len, p,
              targets[i].path);
  }
}

/* ======================= request validation (tokenizer) ======================= */

static int parse_req(srv_api_t api, const char *body, sched_request_t **r, srv_gen_params_t *gp,
                     srv_error_t *e) {
  size_t n = strlen(body);
  char *copy = malloc(n + 1); /* the server hands over a NUL-terminated body */
  memcpy(copy, body, n + 1);
  int rc = srv__parse_generate(&g_api, api, copy, n, r, gp, e);
  free(copy);
  return rc;
}

static void expect_error(srv_api_t api, const char *body, int status, const char *param) {
  sched_request_t *r = (sched_request_t *)1;
  srv_gen_params_t gp;
  srv_error_t e;
  memset(&e, 0, sizeof e);
  int rc = parse_req(api, body, &r, &gp, &e);
  if (rc != -1) FAIL_AT("accepted: %.300s", body);
  CHECK(r == NULL);
  CHECK(gp.echo_text == NULL);
  if (e.status != status)
    FAIL_AT("%.300s: status %d (%s), expected %d", body, e.status, e.message, status);
  if (strcmp(e.param, param ? param : "") != 0)
    FAIL_AT("%.300s: param \"%s\" (%s), expected \"%s\"", body, e.param, e.message,
            param ? param : "");
  CHECK(e.message[0] && e.type);
}

static sched_request_t *expect_ok(srv_api_t api, const char *body, srv_gen_params_t *gp) {
  sched_request_t *r = NULL;
  srv_error_t e;
  if (parse_req(api, body, &r, gp, &e))
    FAIL_AT("%s: rejected %d %s (%s)", body, e.status, e.message, e.param);
  CHECK(r && r->n_prompt > 0 && r->prompt && r->max_tokens >= 1);
  return r;
}

static int32_t *encode(const char *text, bool bos, size_t *n) {
  size_t cap = strlen(text) + 8;
  int32_t *ids = malloc(cap * sizeof *ids);
  size_t off = bos ? 1 : 0, k = 0;
  CHECK(model_tok_encode(g_tok, text, strlen(text), true, ids + off, cap - off, &k) == 0);
  if (bos) ids[0] = model_tok_bos(g_tok);
  *n = k + off;
  return ids;
}

static void test_validation_errors(void) {
  const srv_api_t C = SRV_API_COMPLETIONS, H = SRV_API_CHAT;
  static char body[16384];
  struct {
    srv_api_t api;
    const char *body;
    int status;
    const char *param;
  } cases[] = {
      {C, "", 400, NULL},
      {C, "{", 400, NULL},
      {C, "[]", 400, NULL},
      {C, "null", 400, NULL},
      {C, "\"prompt\"", 400, NULL},
      {C, "{\"prompt\":\"hi\"} x", 400, NULL},
      {C, "{\"prompt\":\"hi\",}", 400, NULL},
      {C, "{\"prompt\":NaN}", 400, NULL},
      {C, "{\"prompt\":\"a\\u0000b\"}", 400, NULL}, /* cJSON would cut the string */
      {C, "{\"model\":\"" MODEL_NAME "\\u0000x\",\"prompt\":\"a\"}", 400, NULL},
      {C, "{}", 400, "prompt"},
      {C, "{\"prompt\":null}", 400, "prompt"},
      {C, "{\"prompt\":1}", 400, "prompt"},
      {C, "{\"prompt\":{}}", 400, "prompt"},
      {C, "{\"prompt\":[]}", 400, "prompt"},
      {C, "{\"prompt\":[\"a\",\"b\"]}", 400, "prompt"},
      {C, "{\"prompt\":[[1,2],[3]]}", 400, "prompt"},
      {C, "{\"prompt\":[[]]}", 400, "prompt"},
      {C, "{\"prompt\":[1.5]}", 400, "prompt"},
      {C, "{\"prompt\":[-1]}", 400, "prompt"},
      {C, "{\"prompt\":[99999999]}", 400, "prompt"},
      {C, "{\"prompt\":[1,\"a\"]}", 400, "prompt"},
      {C, "{\"prompt\":\"\"}", 400, "prompt"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":-1}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":0}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":1.5}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":\"10\"}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":true}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":1e12}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":1e999}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":100000}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"max_tokens\":4096}", 400, "max_tokens"},
      {C, "{\"prompt\":\"hi\",\"temperature\":-0.5}", 400, "temperature"},
      {C, "{\"prompt\":\"hi\",\"temperature\":\"hot\"}", 400, "temperature"},
      {C, "{\"prompt\":\"hi\",\"temperature\":1e999}", 400, "temperature"},
      {C, "{\"prompt\":\"hi\",\"temperature\":[1]}", 400, "temperature"},
      {C, "{\"prompt\":\"hi\",\"top_p\":0}", 400, "top_p"},
      {C, "{\"prompt\":\"hi\",\"top_p\":1.5}", 400, "top_p"},
      {C, "{\"prompt\":\"hi\",\"top_p\":-1}", 400, "top_p"},
      {C, "{\"prompt\":\"hi\",\"top_k\":-5}", 400, "top_k"},
      {C, "{\"prompt\":\"hi\",\"top_k\":2.5}", 400, "top_k"},
      {C, "{\"prompt\":\"hi\",\"min_p\":2}", 400, "min_p"},
      {C, "{\"prompt\":\"hi\",\"min_p\":-0.1}", 400, "min_p"},
      {C, "{\"prompt\":\"hi\",\"presence_penalty\":3}", 400, "presence_penalty"},
      {C, "{\"prompt\":\"hi\",\"frequency_penalty\":-2.5}", 400, "frequency_penalty"},
      {C, "{\"prompt\":\"hi\",\"repetition_penalty\":0}", 400, "repetition_penalty"},
      {C, "{\"prompt\":\"hi\",\"repetition_penalty\":-1}", 400, "repetition_penalty"},
      {C, "{\"prompt\":\"hi\",\"seed\":\"x\"}", 400, "seed"},
      {C, "{\"prompt\":\"hi\",\"seed\":1.5}", 400, "seed"},
      {C, "{\"prompt\":\"hi\",\"seed\":1e30}", 400, "seed"},
      {C, "{\"prompt\":\"hi\",\"stop\":5}", 400, "stop"},
      {C, "{\"prompt\":\"hi\",\"stop\":[\"a\",1]}", 400, "stop"},
      {C, "{\"prompt\":\"hi\",\"n\":2}", 400, "n"},
      {C, "{\"prompt\":\"hi\",\"n\":0}", 400, "n"},
      {C, "{\"prompt\":\"hi\",\"n\":\"1\"}", 400, "n"},
      {C, "{\"prompt\":\"hi\",\"best_of\":3}", 400, "best_of"},
      {C, "{\"prompt\":\"hi\",\"logprobs\":21}", 400, "logprobs"},
      {C, "{\"prompt\":\"hi\",\"logprobs\":-1}", 400, "logprobs"},
      {C, "{\"prompt\":\"hi\",\"logprobs\":true}", 400, "logprobs"},
      {C, "{\"prompt\":\"hi\",\"stream\":\"yes\"}", 400, "stream"},
      {C, "{\"prompt\":\"hi\",\"stream\":1}", 400, "stream"},
      {C, "{\"prompt\":\"hi\",\"stream_options\":{\"include_usage\":true}}", 400, "stream_options"},
      {C, "{\"prompt\":\"hi\",\"stream\":true,\"stream_options\":{\"include_usage\":1}}", 400,
       "stream_options"},
      {C, "{\"prompt\":\"hi\",\"stream\":true,\"stream_options\":[]}", 400, "stream_options"},
      {C, "{\"prompt\":\"hi\",\"ignore_eos\":1}", 400, "ignore_eos"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":1}", 400, "kv_compression"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":[]}", 400, "kv_compression"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":0.5}}", 400,
       "kv_compression.ratio"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":\"4\"}}", 400,
       "kv_compression.ratio"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":-2}}", 400,
       "kv_compression.ratio"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"zip\"}}", 400,
       "kv_compression.method"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"kvcompress\"}}", 400,
       "kv_compression.ratio"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"layer_budget\":\"tall\"}}", 400,
       "kv_compression.layer_budget"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"protected_window\":1000000000}}", 400,
       "kv_compression.protected_window"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"observation_window\":-1}}", 400,
       "kv_compression.observation_window"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"observation_window\":99999}}", 400,
       "kv_compression.observation_window"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"interval\":-1}}", 400,
       "kv_compression.interval"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"threshold\":1.5}}", 400,
       "kv_compression.threshold"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"max_cache_tokens\":0}}", 400,
       "kv_compression.max_cache_tokens"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"retio\":4}}", 400, "kv_compression"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"score\":\"max\"}}", 400,
       "kv_compression.score"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"criterion\":1}}", 400,
       "kv_compression.criterion"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":4,\"prefill_chunk\":10}}", 400,
       "kv_compression.prefill_chunk"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":4,\"prefill_chunk\":-1}}", 400,
       "kv_compression.prefill_chunk"},
      {C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"dbudget\",\"prefill_chunk\":512}}",
       400, "kv_compression.prefill_chunk"},
      {C, "{\"prompt\":\"hi\",\"model\":\"gpt-4\"}", 404, "model"},
      {C, "{\"prompt\":\"hi\",\"model\":5}", 400, "model"},
      {C, "{\"prompt\":\"hi\",\"user\":5}", 400, "user"},
      {C, "{\"prompt\":\"hi\",\"echo\":\"true\"}", 400, "echo"},
      {C, "{\"prompt\":\"hi\",\"echo\":true,\"logprobs\":1}", 400, "echo"},
      {C, "{\"prompt\":\"hi\",\"suffix\":\"x\"}", 400, "suffix"},
      {H, "{}", 400, "messages"},
      {H, "{\"messages\":\"hi\"}", 400, "messages"},
      {H, "{\"messages\":[]}", 400, "messages"},
      {H, "{\"messages\":[1]}", 400, "messages"},
      {H, "{\"messages\":[{\"content\":\"x\"}]}", 400, "messages"},
      {H, "{\"messages\":[{\"role\":5,\"content\":\"x\"}]}", 400, "messages"},
      {H, "{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", 400, "messages"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages"},
      {H,
       "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{}}]}]"
       "}",
       400, "messages"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}", 400,
       "messages"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":[\"text\"]}]}", 400, "messages"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":\"yes\"}", 400,
       "logprobs"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":5}", 400,
       "top_logprobs"},
      {H,
       "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,\"top_logprobs\":"
       "30}",
       400, "top_logprobs"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":-3}",
       400, "max_completion_tokens"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":0}", 400,
       "max_completion_tokens"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":5000}", 400,
       "max_tokens"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"add_generation_prompt\":\"x\"}",
       400, "add_generation_prompt"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":3}", 400, "n"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"model\":\"other\"}", 404,
       "model"},
      {H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"temperature\":-1}", 400,
       "temperature"},
  };
  int n = (int)(sizeof cases / sizeof cases[0]);
  for (int i = 0; i < n; i++)
    expect_error(cases[i].api, cases[i].body, cases[i].status, cases[i].param);

  /* a prompt as long as the context */
  size_t off = (size_t)snprintf(body, sizeof body, "{\"prompt\":[");
  for (int i = 0; i < MAX_MODEL_LEN && off < sizeof body - 16; i++)
    off += (size_t)snprintf(body + off, sizeof body - off, "%s1", i ? "," : "");
  snprintf(body + off, sizeof body - off, "]}");
  CHECK(strlen(body) < sizeof body - 1);
  expect_error(C, body, 400, "prompt");
  /* 65 stop strings */
  off = (size_t)snprintf(body, sizeof body, "{\"prompt\":\"hi\",\"stop\":[");
  for (int i = 0; i <= SRV_MAX_STOP; i++)
    off += (size_t)snprintf(body + off, sizeof body - off, "%s\"s%d\"", i ? "," : "", i);
  snprintf(body + off, sizeof body - off, "]}");
  expect_error(C, body, 400, "stop");
  /* a raw NUL byte inside a string */
  static const char raw_nul[] = "{\"prompt\":\"a\0b\"}";
  sched_request_t *r = NULL;
  srv_gen_params_t gp;
  srv_error_t e;
  CHECK(srv__parse_generate(&g_api, C, raw_nul, sizeof raw_nul - 1, &r, &gp, &e) == -1);
  CHECK(r == NULL && e.status == 400 && strstr(e.message, "NUL"));
  /* an escaped backslash before "u0000" is text */
  r = expect_ok(C, "{\"prompt\":\"a\\\\u0000b\",\"max_tokens\":1}", &gp);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  fprintf(stderr, "   %d malformed bodies refused with the right status and param\n", n + 3);
}

static void test_validation_ok(void) {
  const srv_api_t C = SRV_API_COMPLETIONS, H = SRV_API_CHAT;
  srv_gen_params_t gp;
  sched_request_t *r = expect_ok(
      C,
      "{\"model\":\"" MODEL_NAME "\",\"prompt\":\"Hello world\",\"max_tokens\":5,"
      "\"temperature\":0,\"top_k\":40,\"top_p\":0.9,\"min_p\":0.05,\"seed\":42,"
      "\"stop\":[\"\\n\",\"END\"],\"ignore_eos\":true,\"logprobs\":3,\"presence_penalty\":0.5,"
      "\"frequency_penalty\":0.25,\"repetition_penalty\":1.1,\"user\":\"u1\",\"n\":1,"
      "\"unknown_field\":{\"x\":[1,2]},\"stream\":false}",
      &gp);
  size_t n;
  int32_t *ids = encode("Hello world", model_tok_add_bos(g_tok), &n);
  CHECK_INT_EQ(r->n_prompt, n);
  CHECK(memcmp(r->prompt, ids, n * sizeof *ids) == 0);
  free(ids);
  CHECK_INT_EQ(r->max_tokens, 5);
  CHECK_NEAR(r->sample.temperature, 0, 0);
  CHECK_INT_EQ(r->sample.top_k, 40);
  CHECK_NEAR(r->sample.top_p, 0.9, 1e-6);
  CHECK_NEAR(r->sample.min_p, 0.05, 1e-6);
  CHECK_NEAR(r->sample.presence_penalty, 0.5, 1e-6);
  CHECK_NEAR(r->sample.frequency_penalty, 0.25, 1e-6);
  CHECK_NEAR(r->sample.repetition_penalty, 1.1, 1e-6);
  CHECK(r->sample.has_seed && r->sample.seed == 42);
  CHECK_INT_EQ(r->n_stop, 2);
  CHECK_STR_EQ(r->stop[0], "\n");
  CHECK_STR_EQ(r->stop[1], "END");
  CHECK(r->ignore_eos);
  CHECK_INT_EQ(r->logprobs, 3);
  CHECK(gp.logprobs && gp.top_logprobs == 3 && !gp.stream && !gp.echo);
  CHECK_INT_EQ(r->kvc.plan.policy, KV_POLICY_NONE); /* the server's default */
  sched_request_free(r);
  srv__gen_params_destroy(&gp);

  /* kv_compression over the server's defaults */
  r = expect_ok(C,
                "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"dbudget\",\"ratio\":8,"
                "\"layer_budget\":\"zigzag\",\"protected_window\":16,\"observation_window\":8,"
                "\"interval\":0,\"sinks\":2,\"threshold\":0.01}}",
                &gp);
  CHECK_INT_EQ(r->kvc.plan.policy, KV_POLICY_DBUDGET);
  CHECK_NEAR(r->kvc.plan.ratio, 8, 0);
  CHECK_INT_EQ(r->kvc.plan.layer_budget, KV_LAYER_ZIGZAG);
  CHECK_INT_EQ(r->kvc.plan.protected_window, 16);
  CHECK_INT_EQ(r->kvc.observation_window, 8);
  CHECK_INT_EQ(r->kvc.interval, 0);
  CHECK_INT_EQ(r->kvc.plan.sinks, 2);
  CHECK_NEAR(r->kvc.plan.dbudget_threshold, 0.01, 1e-7);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":4}}", &gp);
  CHECK_INT_EQ(r->kvc.plan.policy, KV_POLICY_KVCOMPRESS); /* a budget alone: kvcompress */
  CHECK_INT_EQ(r->kvc.observation_window, -1); /* the default window: */
  CHECK_INT_EQ(sched_kv_window(&r->kvc), 32);  /* 32 for kvcompress */
  CHECK(!r->kvc.plan.per_query); /* KV-Compress's sums */
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":\"hi\",\"kv_compression\":{\"ratio\":4,\"score\":\"mean\"}}", &gp);
  CHECK(r->kvc.plan.per_query);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"dbudget\"}}", &gp);
  CHECK_INT_EQ(sched_kv_window(&r->kvc), 32); /* DBudgetKV's mass: the window's scores */
  CHECK_INT_EQ(r->kvc.prefill_chunk, 0);
  CHECK(r->kvc.plan.dbudget_mass); /* the default criterion */
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"dbudget\","
                   "\"criterion\":\"norm\"}}", &gp);
  CHECK(!r->kvc.plan.dbudget_mass);
  CHECK_INT_EQ(sched_kv_window(&r->kvc), 0); /* the norm: the whole prompt's scores */
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":\"hi\",\"kv_compression\":{\"method\":\"dbudget\",\"ratio\":8,"
                   "\"observation_window\":16,\"prefill_chunk\":512}}", &gp);
  CHECK_INT_EQ(sched_kv_window(&r->kvc), 16);
  CHECK_INT_EQ(r->kvc.prefill_chunk, 512);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);

  /* defaults, nulls, token ids, echo */
  r = expect_ok(C,
                "{\"prompt\":[1,2,3],\"temperature\":null,\"stop\":null,\"max_tokens\":null,"
                "\"echo\":true,\"top_k\":-1,\"seed\":-7}",
                &gp);
  CHECK_INT_EQ(r->n_prompt, 3);
  CHECK(r->prompt[0] == 1 && r->prompt[2] == 3);
  CHECK_INT_EQ(r->max_tokens, 16);
  CHECK_NEAR(r->sample.temperature, 1.0, 0);
  CHECK_INT_EQ(r->sample.top_k, 0);
  CHECK(r->sample.has_seed && r->sample.seed == (uint64_t)-7);
  CHECK_INT_EQ(r->n_stop, 0);
  CHECK_INT_EQ(r->logprobs, -1);
  CHECK(gp.echo && gp.echo_text);
  char dec[64];
  int32_t toks[3] = {1, 2, 3};
  model_tok_decode(g_tok, toks, 3, true, dec, sizeof dec);
  CHECK_STR_EQ(gp.echo_text, dec);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);

  r = expect_ok(C,
                "{\"prompt\":[\"one string\"],\"stream\":true,"
                "\"stream_options\":{\"include_usage\":true},\"echo\":true}",
                &gp);
  CHECK(gp.stream && gp.include_usage);
  CHECK_STR_EQ(gp.echo_text, "one string");
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
  r = expect_ok(C, "{\"prompt\":[[5,6]],\"logprobs\":0,\"max_tokens\":4094}", &gp);
  CHECK_INT_EQ(r->n_prompt, 2);
  CHECK_INT_EQ(r->logprobs, 0);
  CHECK_INT_EQ(r->max_tokens, 4094); /* 2 + 4094 = max_model_len fits */
  sched_request_free(r);
  srv__gen_params_destroy(&gp);

  /* chat: the template's prompt, parts joined by "\n", default max_tokens */
  r = expect_ok(H,
                "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hi\"},"
                "{\"type\":\"text\",\"text\":\"there\"}]}],\"logprobs\":true,\"top_logprobs\":2}",
                &gp);
  model_chat_msg_t msgs[2] = {{"system", "Be brief."}, {"user", "Hi\nthere"}};
  char *text = NULL, err[128];
  CHECK(model_chat_render(&g_chat, msgs, 2, true, &text, err, sizeof err) == 0);
  ids = encode(text, model_tok_add_bos(g_tok) && !g_chat.bos, &n);
  CHECK_INT_EQ(r->n_prompt, n);
  CHECK(memcmp(r->prompt, ids, n * sizeof *ids) == 0);
  CHECK_INT_EQ(r->max_tokens, MAX_MODEL_LEN - (int)n);
  CHECK_INT_EQ(r->logprobs, 2);
  CHECK(gp.api == SRV_API_CHAT && gp.logprobs && gp.top_logprobs == 2);
  free(ids);
  free(text);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);

  /* max_completion_tokens wins; developer is a system message; null content */
  r = expect_ok(H,
                "{\"messages\":[{\"role\":\"developer\",\"content\":\"d\"},"
                "{\"role\":\"user\",\"content\":\"u\"},{\"role\":\"assistant\",\"content\":null},"
                "{\"role\":\"user\",\"content\":\"again\"}],"
                "\"max_tokens\":9,\"max_completion_tokens\":3,\"logprobs\":true}",
                &gp);
  CHECK_INT_EQ(r->max_tokens, 3);
  CHECK_INT_EQ(r->logprobs, 0);
  sched_request_free(r);
  srv__gen_params_destroy(&gp);
}

static void tok_call(bool encode_route, const char *body, int status, const char *expect_sub) {
  srv_buf_t out;
  srv_error_t e;
  srv__buf_init(&out);
  size_t n = strlen(body);
  char *copy = strdup(body);
  int rc = encode_route ? srv__tokenize(&g_api, copy, n, &out, &e)
                        : srv__detokenize(&g_api, copy, n, &out, &e);
  free(copy);
  if (status == 200) {
    if (rc) FAIL_AT("%s: %d %s", body, e.status, e.message);
    cJSON_Delete(parse(out.p, out.len));
    if (expect_sub && !strstr(out.p, expect_sub))
      FAIL_AT("%s: %s lacks %s", body, out.p, expect_sub);
  } else {
    CHECK_INT_EQ(rc, -1);
    CHECK_INT_EQ(e.status, status);
  }
  srv__buf_free(&out);
}

static void test_tokenize(void) {
  size_t n;
  int32_t *ids = encode("Hello world", model_tok_add_bos(g_tok), &n);
  char want[256];
  size_t off = (size_t)snprintf(want, sizeof want, "{\"tokens\":[");
  for (size_t i = 0; i < n; i++)
    off += (size_t)snprintf(want + off, sizeof want - off, "%s%d", i ? "," : "", ids[i]);
  snprintf(want + off, sizeof want - off, "],\"count\":%zu,\"max_model_len\":%d", n, MAX_MODEL_LEN);
  tok_call(true, "{\"prompt\":\"Hello world\"}", 200, want);
  tok_call(true, "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}", 200, "\"count\":");
  tok_call(true, "{\"prompt\":5}", 400, NULL);
  tok_call(true, "{}", 400, NULL);
  tok_call(true, "{\"prompt\":\"x\",\"model\":\"nope\"}", 404, NULL);
  tok_call(true, "not json", 400, NULL);
  char body[256];
  off = (size_t)snprintf(body, sizeof body, "{\"tokens\":[");
  for (size_t i = 0; i < n; i++)
    off += (size_t)snprintf(body + off, sizeof body - off, "%s%d", i ? "," : "", ids[i]);
  snprintf(body + off, sizeof body - off, "]}");
  tok_call(false, body, 200, "Hello world\"}");
  tok_call(false, "{\"tokens\":[]}", 200, "{\"prompt\":\"\"}");
  tok_call(false, "{\"tokens\":[-1]}", 400, NULL);
  tok_call(false, "{\"tokens\":\"abc\"}", 400, NULL);
  tok_call(false, "{}", 400, NULL);
  free(ids);
}

/* ======================= the server over sockets, fake engine ======================= */

typedef struct fake_req {
  sched_request_t *r;
  int emitted;
  bool aborted;
  struct fake_req *next;
} fake_req_t;

typedef struct fake {
  pthread_mutex_t mu;
  pthread_t th;
  bool quit;
  fake_req_t *reqs;
  sched_event_t out[4096];
  size_t n_out;
  srv_server_t *srv;
  atomic_int refuse; /* nonzero: what submit returns */
  atomic_int n_submitted, n_aborted;
  int delay_us;
  _Atomic double step_seconds; /* what stats reports: liveness */
  atomic_bool stopped;
} fake_t;

static fake_t g_fake;
/* Requests with this seed fail after two tokens, as a request in a batch
 * whose forward pass failed does. */
#define FAKE_FAIL_SEED 666

/* Text of generated token k: a quote and a non-ASCII char first, then words. */
static void fake_text(int k, char *buf, size_t cap) {
  if (k == 0) snprintf(buf, cap, "\"H\xc3\xa9\"\n");
  else snprintf(buf, cap, "w%d ", k);
}

static void fake_post(fake_t *f, fake_req_t *q, sched_finish_t fin, bool token) {
  if (f->n_out >= sizeof f->out / sizeof f->out[0]) return; /* the test never gets here */
  sched_event_t *ev = &f->out[f->n_out++];
  memset(ev, 0, sizeof *ev);
  ev->id = q->r->id;
  ev->user = q->r->user;
  char text[32] = "";
  if (token) {
    fake_text(q->emitted, text, sizeof text);
    ev->n_tokens = 1;
    ev->token = 300 + q->emitted % 50;
    ev->logprob = -0.5f;
    ev->n_top = q->r->logprobs > 0 ? q->r->logprobs : 0;
    for (int i = 0; i < ev->n_top; i++) {
      ev->top[i].token = 300 + i;
      ev->top[i].logprob = -0.5f - (float)i;
    }
    q->emitted++;
  }
  ev->text = strdup(text);
  ev->text_len = strlen(text);
  ev->finish = fin;
  ev->prompt_tokens = q->r->n_prompt;
  ev->completion_tokens = q->emitted;
}

static void *fake_thread(void *arg) {
  fake_t *f = arg;
  for (;;) {
    usleep((useconds_t)f->delay_us);
    pthread_mutex_lock(&f->mu);
    if (f->quit) {
      pthread_mutex_unlock(&f->mu);
      return NULL;
    }
    bool posted = false;
    for (fake_req_t **pp = &f->reqs; *pp;) {
      fake_req_t *q = *pp;
      if (q->aborted) {
        fake_post(f, q, SCHED_FINISH_ABORT, false);
      } else if (q->r->sample.has_seed && q->r->sample.seed == FAKE_FAIL_SEED && q->emitted == 2) {
        /* the engine failed this request (e.g. a device error in its batch) */
        fake_post(f, q, SCHED_FINISH_ERROR, false);
        snprintf(f->out[f->n_out - 1].message, sizeof f->out[0].message, "the model failed to run");
      } else {
        bool last = q->emitted + 1 >= q->r->max_tokens;
        fake_post(f, q, last ? SCHED_FINISH_LENGTH : SCHED_FINISH_NONE, true);
        if (!last) {
          pp = &q->next;
          posted = true;
          continue;
        }
      }
      posted = true;
      *pp = q->next;
      sched_request_free(q->r);
      free(q);
    }
    pthread_mutex_unlock(&f->mu);
    if (posted) srv_server_notify(&f->srv);
  }
}

static int fake_submit(void *eng, sched_request_t *r) {
  fake_t *f = eng;
  int refuse = atomic_load(&f->refuse);
  if (refuse) return refuse;
  fake_req_t *q = calloc(1, sizeof *q);
  CHECK(q);
  q->r = r;
  pthread_mutex_lock(&f->mu);
  q->next = f->reqs;
  f->reqs = q;
  pthread_mutex_unlock(&f->mu);
  atomic_fetch_add(&f->n_submitted, 1);
  return 0;
}

static void fake_abort(void *eng, uint64_t id) {
  fake_t *f = eng;
  pthread_mutex_lock(&f->mu);
  for (fake_req_t *q = f->reqs; q; q = q->next)
    if (q->r->id == id && !q->aborted) {
      q->aborted = true;
      atomic_fetch_add(&f->n_aborted, 1);
    }
  pthread_mutex_unlock(&f->mu);
}

static size_t fake_poll(void *eng, sched_event_t *evs, size_t max) {
  fake_t *f = eng;
  pthread_mutex_lock(&f->mu);
  size_t n = f->n_out < max ? f->n_out : max;
  memcpy(evs, f->out, n * sizeof *evs);
  memmove(f->out, f->out + n, (f->n_out - n) * sizeof *evs);
  f->n_out -= n;
  pthread_mutex_unlock(&f->mu);
  return n;
}

static void fake_stats(void *eng, sched_stats_t *out) {
  fake_t *f = eng;
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&f->mu);
  for (fake_req_t *q = f->reqs; q; q = q->next) out->running++;
  pthread_mutex_unlock(&f->mu);
  out->kv_blocks_total = 100;
  out->kv_blocks_used = out->running;
  out->step_seconds = atomic_load(&f->step_seconds);
  out->stopped = atomic_load(&f->stopped);
}

static const srv_engine_ops_t fake_ops = {fake_submit, fake_abort, fake_poll, fake_stats};

static void *run_thread(void *arg) {
  srv_server_run(arg);
  return NULL;
}

/* ---- a tiny blocking HTTP client ---- */

typedef struct client {
  int fd;
  char *buf;
  size_t len, cap;
} client_t;

typedef struct resp {
  int status;
  char headers[4096];
  char *body; /* dechunked */
  size_t body_len;
} resp_t;

static int g_port;

static void cli_open(client_t *c, int port) {
  memset(c, 0, sizeof *c);
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(c->fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET,
                          .sin_port = htons((uint16_t)port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK(connect(c->fd, (struct sockaddr *)&a, sizeof a) == 0);
}

static void cli_close(client_t *c) {
  if (c->fd >= 0) close(c->fd);
  free(c->buf);
  memset(c, 0, sizeof *c);
  c->fd = -1;
}

static void cli_send(client_t *c, const char *s, size_t n) {
  while (n) {
    ssize_t k = send(c->fd, s, n, MSG_NOSIGNAL);
    CHECK(k > 0);
    s += k;
    n -= (size_t)k;
  }
}

static void cli_sends(client_t *c, const char *s) { cli_send(c, s, strlen(s)); }

/* Reads more bytes; 0 on EOF, -1 on timeout. */
static int cli_more(client_t *c, int timeout_ms) {
  struct pollfd p = {.fd = c->fd, .events = POLLIN};
  if (poll(&p, 1, timeout_ms) <= 0) return -1;
  if (c->cap - c->len < 65536) {
    c->cap = c->cap * 2 + 65536;
    c->buf = realloc(c->buf, c->cap);
    CHECK(c->buf);
  }
  ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
  if (k <= 0) return 0;
  c->len += (size_t)k;
  c->buf[c->len] = '\0';
  return (int)k;
}

static void cli_consume(client_t *c, size_t n) {
  memmove(c->buf, c->buf + n, c->len - n);
  c->len -= n;
  c->buf[c->len] = '\0';
}

static bool cli_eof(client_t *c, int timeout_ms) {
  return c->len == 0 && cli_more(c, timeout_ms) == 0;
}

static const char *header(const resp_t *r, const char *name) {
  static char val[256];
  size_t n = strlen(name);
  for (const char *p = r->headers; (p = strstr(p, "\r\n")); p += 2) {
    if (strncasecmp(p + 2, name, n) == 0 && p[2 + n] == ':') {
      const char *v = p + 3 + n;
      while (*v == ' ') v++;
      size_t k = strcspn(v, "\r");
      snprintf(val, sizeof val, "%.*s", (int)k, v);
      return val;
    }
  }
  return NULL;
}

/* Reads one response (skipping 1xx); false on EOF or timeout before it. */
static bool cli_response(client_t *c, resp_t *r, int timeout_ms) {
  memset(r, 0, sizeof *r);
  char *end;
  for (;;) {
    while (!c->buf || !(end = strstr(c->buf, "\r\n\r\n")))
      if (cli_more(c, timeout_ms) <= 0) return false;
    size_t hl = (size_t)(end - c->buf) + 4;
    CHECK(hl < sizeof r->headers);
    memcpy(r->headers, c->buf, hl);
    r->headers[hl] = '\0';
    cli_consume(c, hl);
    CHECK(sscanf(r->headers, "HTTP/1.%*d %d", &r->status) == 1);
    if (r->status >= 200) break;
  }
  const char *cl = header(r, "Content-Length"), *te = header(r, "Transfer-Encoding");
  if (cl) {
    size_t n = (size_t)strtoull(cl, NULL, 10);
    while (c->len < n)
      if (cli_more(c, timeout_ms) <= 0) return false;
    r->body = malloc(n + 1);
    memcpy(r->body, c->buf, n);
    r->body[n] = '\0';
    r->body_len = n;
    cli_consume(c, n);
  } else if (te && strstr(te, "chunked")) {
    srv_buf_t b;
    srv__buf_init(&b);
    for (;;) {
      char *eol;
      while (!c->buf || !(eol = strstr(c->buf, "\r\n")))
        if (cli_more(c, timeout_ms) <= 0) return false;
      size_t n = (size_t)strtoull(c->buf, NULL, 16);
      size_t need = (size_t)(eol - c->buf) + 2 + n + 2;
      while (c->len < need)
        if (cli_more(c, timeout_ms) <= 0) return false;
      srv__buf_add(&b, eol + 2, n);
      CHECK(memcmp(c->buf + need - 2, "\r\n", 2) == 0);
      cli_consume(c, need);
      if (n == 0) break;
    }
    r->body_len = b.len;
    r->body = srv__buf_take(&b);
  } else { /* until EOF */
    while (cli_more(c, timeout_ms) > 0) {
    }
    r->body = malloc(c->len + 1);
    memcpy(r->body, c->buf ? c->buf : "", c->len);
    r->body[c->len] = '\0';
    r->body_len = c->len;
    cli_consume(c, c->len);
  }
  return true;
}

static void resp_free(resp_t *r) { free(r->body); }

static char *request(const char *method, const char *path, const char *body, const char *extra) {
  srv_buf_t b;
  srv__buf_init(&b);
  srv__buf_printf(&b, "%s %s HTTP/1.1\r\nHost: t\r\n%s", method, path, extra ? extra : "");
  if (body)
    srv__buf_printf(&b, "Content-Type: application/json\r\nContent-Length: %zu\r\n", strlen(body));
  srv__buf_adds(&b, "\r\n");
  if (body) srv__buf_adds(&b, body);
  return srv__buf_take(&b);
}

#define AUTHZ "Authorization: Bearer " API_KEY "\r\n"

/* One request on a fresh connection. */
static void roundtrip(const char *method, const char *path, const char *body, const char *extra,
                      resp_t *r) {
  client_t c;
  cli_open(&c, g_port);
  char *req = request(method, path, body, extra);
  cli_sends(&c, req);
  free(req);
  if (!cli_response(&c, r, 5000)) FAIL_AT("%s %s: no response", method, path);
  cli_close(&c);
}

static void check_error_body(const resp_t *r, int status, const char *param) {
  if (r->status != status) FAIL_AT("status %d, expected %d: %s", r->status, status, r->body);
  cJSON *j = parse(r->body, r->body_len);
  const cJSON *e = jget(j, "error");
  CHECK(cJSON_IsObject(e));
  CHECK(jstr(e, "message") && jstr(e, "type"));
  CHECK(jget(e, "code") != NULL);
  if (param) CHECK_STR_EQ(jstr(e, "param"), param);
  else CHECK(cJSON_IsNull(jget(e, "param")));
  cJSON_Delete(j);
}

static void test_http_basic(void) {
  resp_t r;
  roundtrip("GET", "/health", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK_STR_EQ(r.body, "{}");
  resp_free(&r);
  /* /health and /ready follow the engine thread: a step stuck for minutes,
   * or a thread that ended, is 503 */
  atomic_store(&g_fake.step_seconds, 30.0);
  roundtrip("GET", "/health", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);
  atomic_store(&g_fake.step_seconds, 500.0);
  const char *paths[2] = {"/health", "/ready"};
  for (int i = 0; i < 2; i++) {
    roundtrip("GET", paths[i], NULL, NULL, &r);
    CHECK_INT_EQ(r.status, 503);
    CHECK(strstr(r.body, "not finished a step"));
    resp_free(&r);
  }
  atomic_store(&g_fake.step_seconds, 0.0);
  atomic_store(&g_fake.stopped, true);
  roundtrip("GET", "/health", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 503);
  CHECK(strstr(r.body, "engine has stopped"));
  resp_free(&r);
  atomic_store(&g_fake.stopped, false);
  roundtrip("GET", "/health", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);
  roundtrip("GET", "/version", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"version\""));
  resp_free(&r);
  roundtrip("GET", "/ready", NULL, NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);
  roundtrip("GET", "/v1/models", NULL, AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"id\":\"" MODEL_NAME "\""));
  resp_free(&r);

  /* auth */
  roundtrip("GET", "/v1/models", NULL, NULL, &r);
  check_error_body(&r, 401, NULL);
  CHECK(header(&r, "WWW-Authenticate"));
  resp_free(&r);
  roundtrip("GET", "/v1/models", NULL, "Authorization: Bearer wrong\r\n", &r);
  check_error_body(&r, 401, NULL);
  resp_free(&r);
  roundtrip("POST", "/v1/completions", "{\"prompt\":\"x\"}", NULL, &r);
  check_error_body(&r, 401, NULL);
  resp_free(&r);
  roundtrip("GET", "/metrics", NULL, NULL, &r); /* public */
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);

  /* routing and validation errors */
  roundtrip("GET", "/nope", NULL, NULL, &r);
  check_error_body(&r, 404, NULL);
  resp_free(&r);
  roundtrip("GET", "/v1/completions", NULL, AUTHZ, &r);
  check_error_body(&r, 405, NULL);
  CHECK_STR_EQ(header(&r, "Allow"), "POST");
  resp_free(&r);
  roundtrip("POST", "/v1/completions", "{\"prompt\": ", AUTHZ, &r);
  check_error_body(&r, 400, NULL);
  resp_free(&r);
  roundtrip("POST", "/v1/completions", "{\"prompt\":\"x\",\"temperature\":-1}", AUTHZ, &r);
  check_error_body(&r, 400, "temperature");
  resp_free(&r);
  roundtrip("POST", "/v1/chat/completions",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
            "\"model\":\"gpt-4o\"}",
            AUTHZ, &r);
  check_error_body(&r, 404, "model");
  resp_free(&r);
  roundtrip("POST", "/tokenize", "{\"prompt\":\"Hello\"}", NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"tokens\":["));
  resp_free(&r);
  roundtrip("POST", "/detokenize", "{\"tokens\":[300]}", NULL, &r);
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);

  /* 429 when the engine's queue is full; 400 when the prompt does not fit
   * in the KV cache; 503 for anything else the engine refuses with */
  atomic_store(&g_fake.refuse, -EAGAIN);
  roundtrip("POST", "/v1/completions", "{\"prompt\":\"x\"}", AUTHZ, &r);
  check_error_body(&r, 429, NULL);
  resp_free(&r);
  atomic_store(&g_fake.refuse, -ENOSPC);
  roundtrip("POST", "/v1/completions", "{\"prompt\":\"x\"}", AUTHZ, &r);
  check_error_body(&r, 400, "prompt");
  CHECK(strstr(r.body, "context_length_exceeded") && strstr(r.body, "KV cache"));
  resp_free(&r);
  atomic_store(&g_fake.refuse, -EIO);
  roundtrip("POST", "/v1/chat/completions", "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
            AUTHZ, &r);
  check_error_body(&r, 503, NULL);
  resp_free(&r);
  atomic_store(&g_fake.refuse, 0);
}

static void test_http_generate(void) {
  resp_t r;
  /* non-streaming completion with echo */
  roundtrip("POST", "/v1/completions",
            "{\"prompt\":\"Say\",\"max_tokens\":4,\"echo\":true,\"model\":\"" MODEL_NAME "\"}",
            AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  cJSON *j = parse(r.body, r.body_len);
  CHECK(strncmp(jstr(j, "id"), "cmpl-", 5) == 0);
  CHECK_STR_EQ(jstr(j, "object"), "text_completion");
  const cJSON *c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_STR_EQ(jstr(c0, "text"), "Say\"H\xc3\xa9\"\nw1 w2 w3 ");
  CHECK_STR_EQ(jstr(c0, "finish_reason"), "length");
  CHECK_INT_EQ(jnum(jget(j, "usage"), "completion_tokens"), 4);
  cJSON_Delete(j);
  resp_free(&r);

  /* chat with logprobs */
  roundtrip("POST", "/v1/chat/completions",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":3,"
            "\"logprobs\":true,\"top_logprobs\":2}",
            AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  j = parse(r.body, r.body_len);
  CHECK(strncmp(jstr(j, "id"), "chatcmpl-", 9) == 0);
  c0 = cJSON_GetArrayItem(jget(j, "choices"), 0);
  CHECK_STR_EQ(jstr(jget(c0, "message"), "content"), "\"H\xc3\xa9\"\nw1 w2 ");
  const cJSON *content = jget(jget(c0, "logprobs"), "content");
  CHECK_INT_EQ(cJSON_GetArraySize(content), 3);
  const cJSON *e0 = cJSON_GetArrayItem(content, 0);
  CHECK_NEAR(jnum(e0, "logprob"), -0.5, 1e-6);
  CHECK_INT_EQ(cJSON_GetArraySize(jget(e0, "top_logprobs")), 2);
  CHECK(cJSON_IsArray(jget(e0, "bytes")));
  cJSON_Delete(j);
  resp_free(&r);

  /* streaming chat with include_usage */
  roundtrip("POST", "/v1/chat/completions",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":5,"
            "\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
            AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(header(&r, "Content-Type"), "text/event-stream"));
  CHECK_STR_EQ(header(&r, "Transfer-Encoding"), "chunked");
  srv_buf_t text;
  srv__buf_init(&text);
  int n_events = 0, n_role = 0, n_finish = 0, n_usage = 0;
  bool done = false;
  for (char *p = r.body; *p;) {
    CHECK(!done);
    CHECK(strncmp(p, "data: ", 6) == 0);
    char *end = strstr(p, "\n\n");
    CHECK(end);
    *end = '\0';
    if (strcmp(p + 6, "[DONE]") == 0) {
      done = true;
    } else {
      j = parse(p + 6, strlen(p + 6));
      CHECK_STR_EQ(jstr(j, "object"), "chat.completion.chunk");
      const cJSON *ch = jget(j, "choices");
      if (cJSON_GetArraySize(ch) == 0) {
        n_usage++;
        CHECK_INT_EQ(jnum(jget(j, "usage"), "completion_tokens"), 5);
      } else {
        c0 = cJSON_GetArrayItem(ch, 0);
        const cJSON *d = jget(c0, "delta");
        if (jstr(d, "role")) {
          CHECK(n_events == 0);
          n_role++;
        }
        if (jstr(d, "content")) srv__buf_adds(&text, jstr(d, "content"));
        if (jstr(c0, "finish_reason")) {
          n_finish++;
          CHECK_STR_EQ(jstr(c0, "finish_reason"), "length");
        }
        CHECK(cJSON_IsNull(jget(j, "usage")));
      }
      cJSON_Delete(j);
    }
    n_events++;
    p = end + 2;
  }
  CHECK(done && n_role == 1 && n_finish == 1 && n_usage == 1);
  CHECK_STR_EQ(text.p, "\"H\xc3\xa9\"\nw1 w2 w3 w4 ");
  srv__buf_free(&text);
  resp_free(&r);

  /* streaming completion over HTTP/1.0: no chunks, closed at the end */
  client_t c;
  cli_open(&c, g_port);
  const char *body = "{\"prompt\":\"Hi\",\"max_tokens\":2,\"stream\":true}";
  char req[512];
  snprintf(req, sizeof req,
           "POST /v1/completions HTTP/1.0\r\n" AUTHZ "Content-Length: %zu\r\n\r\n%s", strlen(body),
           body);
  cli_sends(&c, req);
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  CHECK(header(&r, "Transfer-Encoding") == NULL);
  CHECK_STR_EQ(header(&r, "Connection"), "close");
  CHECK(strstr(r.body, "\"text\":\"w1 \""));
  CHECK(strstr(r.body, "data: [DONE]\n\n"));
  resp_free(&r);
  cli_close(&c);
}

/* A request the engine fails gets a 500 (or, streaming, a final error
 * event after its tokens); a request beside it is served. */
static void test_http_engine_error(void) {
  resp_t r, ok;
  client_t c;
  cli_open(&c, g_port);
  const char *bad = "{\"prompt\":\"Hi\",\"max_tokens\":8,\"seed\":666}";
  const char *good = "{\"prompt\":\"Hi\",\"max_tokens\":8,\"seed\":1}";
  char req[1024];
  snprintf(req, sizeof req,
           "POST /v1/completions HTTP/1.1\r\nHost: t\r\n" AUTHZ "Content-Length: %zu\r\n\r\n%s"
           "POST /v1/completions HTTP/1.1\r\nHost: t\r\n" AUTHZ "Content-Length: %zu\r\n\r\n%s",
           strlen(bad), bad, strlen(good), good);
  cli_sends(&c, req); /* pipelined: the failure must not take the next one along */
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 500);
  cJSON *j = parse(r.body, r.body_len);
  CHECK_STR_EQ(jstr(jget(j, "error"), "message"), "the model failed to run");
  cJSON_Delete(j);
  CHECK(cli_response(&c, &ok, 5000));
  CHECK_INT_EQ(ok.status, 200);
  CHECK(strstr(ok.body, "\"finish_reason\":\"length\""));
  resp_free(&r);
  resp_free(&ok);
  cli_close(&c);

  roundtrip("POST", "/v1/completions",
            "{\"prompt\":\"Hi\",\"max_tokens\":8,\"seed\":666,\"stream\":true}", AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"text\":\"w1 \"")); /* the tokens before the failure */
  CHECK(strstr(r.body, "data: {\"error\":{\"message\":\"the model failed to run\""));
  CHECK(strstr(r.body, "data: [DONE]\n\n"));
  resp_free(&r);
}

static void test_http_pipelining(void) {
  client_t c;
  cli_open(&c, g_port);
  /* a slow generation first: the two quick answers must wait for it */
  char *a = request("POST", "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":30}", AUTHZ);
  char *b = request("GET", "/health", NULL, NULL);
  char *m = request("GET", "/v1/models", NULL, AUTHZ);
  char *s = request("POST", "/v1/completions",
                    "{\"prompt\":\"x\",\"max_tokens\":3,\"stream\":true}", AUTHZ);
  srv_buf_t all;
  srv__buf_init(&all);
  srv__buf_adds(&all, a);
  srv__buf_adds(&all, b);
  srv__buf_adds(&all, m);
  srv__buf_adds(&all, s);
  srv__buf_adds(&all, b);
  cli_send(&c, all.p, all.len);
  resp_t r;
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"text_completion\"") && strstr(r.body, "w29 "));
  resp_free(&r);
  CHECK(cli_response(&c, &r, 5000));
  CHECK_STR_EQ(r.body, "{}");
  resp_free(&r);
  CHECK(cli_response(&c, &r, 5000));
  CHECK(strstr(r.body, "\"object\":\"list\""));
  resp_free(&r);
  CHECK(cli_response(&c, &r, 5000));
  CHECK(strstr(r.body, "data: [DONE]"));
  resp_free(&r);
  CHECK(cli_response(&c, &r, 5000));
  CHECK_STR_EQ(r.body, "{}");
  resp_free(&r);
  CHECK(c.len == 0);

  /* more pipelined requests than the pipeline holds, one write */
  all.len = 0;
  for (int i = 0; i < 3 * SRV_MAX_PIPELINE; i++) srv__buf_adds(&all, i % 2 ? b : m);
  cli_send(&c, all.p, all.len);
  for (int i = 0; i < 3 * SRV_MAX_PIPELINE; i++) {
    CHECK(cli_response(&c, &r, 5000));
    CHECK_INT_EQ(r.status, 200);
    CHECK(i % 2 ? strcmp(r.body, "{}") == 0 : strstr(r.body, "\"list\"") != NULL);
    resp_free(&r);
  }
  /* Connection: close is honoured after the answer */
  cli_sends(
      &c,
      "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  CHECK_STR_EQ(header(&r, "Connection"), "close");
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  cli_close(&c);
  srv__buf_free(&all);
  free(a);
  free(b);
  free(m);
  free(s);
}

static void test_http_limits(void) {
  resp_t r;
  client_t c;
  /* 413 from Content-Length, before the body */
  cli_open(&c, g_port);
  cli_sends(&c,
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\n" AUTHZ "Content-Length: 100000\r\n\r\n{");
  CHECK(cli_response(&c, &r, 5000));
  check_error_body(&r, 413, NULL);
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  cli_close(&c);
  /* 413 from a chunked body */
  cli_open(&c, g_port);
  cli_sends(&c, "POST /v1/completions HTTP/1.1\r\nHost: t\r\n" AUTHZ
                "Transfer-Encoding: chunked\r\n\r\n");
  char chunk[8192 + 16];
  memset(chunk, ' ', sizeof chunk);
  int k = snprintf(chunk, sizeof chunk, "2000\r\n");
  chunk[k] = ' ';
  memcpy(chunk + k + 8192, "\r\n", 2);
  for (int i = 0; i < 10; i++) send(c.fd, chunk, (size_t)k + 8192 + 2, MSG_NOSIGNAL);
  CHECK(cli_response(&c, &r, 5000));
  check_error_body(&r, 413, NULL);
  resp_free(&r);
  cli_close(&c);
  /* 431 */
  cli_open(&c, g_port);
  srv_buf_t h;
  srv__buf_init(&h);
  srv__buf_adds(&h, "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ");
  for (int i = 0; i < 20000; i++) srv__buf_add(&h, "a", 1);
  srv__buf_adds(&h, "\r\n\r\n");
  cli_send(&c, h.p, h.len);
  srv__buf_free(&h);
  CHECK(cli_response(&c, &r, 5000));
  check_error_body(&r, 431, NULL);
  resp_free(&r);
  cli_close(&c);
  /* malformed request line */
  cli_open(&c, g_port);
  cli_sends(&c, "GARBAGE\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  check_error_body(&r, 400, NULL);
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  cli_close(&c);
  /* a chunked body and Expect: 100-continue */
  cli_open(&c, g_port);
  cli_sends(&c, "POST /tokenize HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                "Content-Length: 19\r\n\r\n");
  while (!c.buf || !strstr(c.buf, "\r\n\r\n")) CHECK(cli_more(&c, 5000) > 0);
  CHECK(strncmp(c.buf, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
  cli_sends(&c, "{\"prompt\":\"Hello\"}\n");
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);
  cli_sends(&c, "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\n{\"pro\r\nd\r\nmpt\":\"Hello\"}\r\n0\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"count\""));
  resp_free(&r);
  cli_close(&c);
}

/* Sends the parts of a request as separate reads, then expects one answer
 * (and, for an error, the close). */
static void split_request(const char *const *parts, int n, int status, const char *what) {
  client_t c;
  resp_t r;
  cli_open(&c, g_port);
  for (int i = 0; i < n; i++) {
    cli_sends(&c, parts[i]);
    usleep(30000);
  }
  if (!cli_response(&c, &r, 5000)) FAIL_AT("%s: no response", what);
  if (r.status != status) FAIL_AT("%s: status %d, expected %d: %s", what, r.status, status, r.body);
  if (status >= 400) {
    check_error_body(&r, status, NULL);
    CHECK_STR_EQ(header(&r, "Connection"), "close");
    CHECK(cli_eof(&c, 5000));
  }
  resp_free(&r);
  cli_close(&c);
}

/* What llhttp 8 lets through and the server refuses: obs-fold, whitespace in
 * header names, a second Authorization header, chunk data without its CRLF,
 * padding past the limits; and what it must not do with the rest. */
static void test_http_strict(void) {
  static const struct {
    const char *name, *req;
    int status;
  } cases[] = {
      {"obs-fold", "GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", 400},
      {"obs-fold of an empty value", "GET /health HTTP/1.1\r\nHost: t\r\nX-A:\r\n b\r\n\r\n", 400},
      {"obs-fold of a blank line", "GET /health HTTP/1.1\r\nHost: t\r\nX-A:\r\n  \r\n\r\n", 400},
      {"obs-fold in Transfer-Encoding",
       "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400},
      {"space before the colon", "GET /health HTTP/1.1\r\nHost: t\r\nX-A : b\r\n\r\n", 400},
      {"space in a name", "GET /health HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n", 400},
      {"two Authorization headers",
       "GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bear\r\nAuthorization: er " API_KEY "\r\n\r\n",
       400},
      {"chunk data without its CRLF",
       "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400},
      {"a chunk over the limit",
       "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n{", 413},
      {"HTTP/1.1 without Host", "GET /health HTTP/1.1\r\nX-A: b\r\n\r\n", 400},
      {"two Host headers", "GET /health HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400},
      {"HTTP/2.0 request line", "GET /health HTTP/2.0\r\nHost: t\r\n\r\n", 505},
      {"HTTP/2 connection preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505},
      {"HTTP/1.0 without Host", "GET /health HTTP/1.0\r\n\r\n", 200},
  };
  resp_t r;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *part[1] = {cases[i].req};
    split_request(part, 1, cases[i].status, cases[i].name);
  }

  /* padding counts toward the limits: whitespace llhttp skips, chunk extensions,
   * leading zeros of chunk sizes */
  static const struct {
    const char *name, *head, *tail;
    char fill;
    int status;
  } pads[] = {
      {"spaces before a value", "GET /health HTTP/1.1\r\nHost: t\r\nX-A: ", "v\r\n\r\n", ' ', 431},
      {"spaces in an empty value", "GET /health HTTP/1.1\r\nHost: t\r\nX-A:", "\r\nX-B: 1\r\n\r\n", ' ', 431},
      {"spaces in the request line", "GET", "/health HTTP/1.1\r\nHost: t\r\n\r\n", ' ', 431},
      {"a chunk extension", "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2;",
       "\r\n{}\r\n0\r\n\r\n", 'a', 413},
      {"zeros of a chunk size", "POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
       "2\r\n{}\r\n0\r\n\r\n", '0', 413},
  };
  for (size_t i = 0; i < sizeof pads / sizeof pads[0]; i++) {
    srv_buf_t b;
    srv__buf_init(&b);
    srv__buf_adds(&b, pads[i].head);
    for (int k = 0; k < 100000; k++) srv__buf_add(&b, &pads[i].fill, 1);
    srv__buf_adds(&b, pads[i].tail);
    const char *part[1] = {b.p};
    split_request(part, 1, pads[i].status, pads[i].name);
    srv__buf_free(&b);
  }

  /* the same across reads */
  const char *fold[] = {"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\r\n", " b\r\n\r\n"};
  split_request(fold, 2, 400, "obs-fold across reads");
  const char *fold2[] = {"GET /health HTTP/1.1\r\nHost: t\r\nX-A:\r\n", " b\r\n\r\n"};
  split_request(fold2, 2, 400, "obs-fold of an empty value across reads");
  const char *empty[] = {"GET /health HTTP/1.1\r\nHost: t\r\nX-A:\r\n", "X-B: 1\r\n\r\n"};
  split_request(empty, 2, 200, "an empty value, then a read");
  const char *value[] = {"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a b", " c\r\n\r\n"};
  split_request(value, 2, 200, "a value across reads");
  const char *crlf[] = {"POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}",
                        "\r", "X0\r\n\r\n"};
  split_request(crlf, 3, 400, "chunk data without its CRLF across reads");
  const char *crlf_ok[] = {"POST /tokenize HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "12\r\n{\"prompt\":\"Hello\"}\r",
                           "\n0\r\n\r\n"};
  split_request(crlf_ok, 2, 200, "a chunk's CRLF across reads");

  /* credentials in a trailer are ignored */
  client_t c;
  cli_open(&c, g_port);
  cli_sends(&c, "POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                "e\r\n{\"prompt\":\"x\"}\r\n0\r\nAuthorization: Bearer " API_KEY "\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  check_error_body(&r, 401, NULL);
  resp_free(&r);
  cli_close(&c);

  /* an upgrade is answered, then the connection closes, and says so */
  cli_open(&c, g_port);
  cli_sends(&c, "GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  CHECK_STR_EQ(header(&r, "Connection"), "close");
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  cli_close(&c);

  /* the absolute form is routed by its path */
  roundtrip("GET", "http://localhost:8000/v1/models?x=1", NULL, AUTHZ, &r);
  CHECK_INT_EQ(r.status, 200);
  CHECK(strstr(r.body, "\"object\":\"list\""));
  resp_free(&r);
}

static void test_http_timeouts(void) {
  resp_t r;
  client_t c;
  /* slowloris: headers never finish -> 408, closed */
  cli_open(&c, g_port);
  cli_sends(&c, "GET /health HTTP/1.1\r\nHost: t\r\n");
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < 3; i++) {
    usleep(100000);
    cli_sends(&c, "X-A: b\r\n"); /* trickling does not extend the deadline */
  }
  CHECK(cli_response(&c, &r, 5000));
  clock_gettime(CLOCK_MONOTONIC, &t1);
  check_error_body(&r, 408, NULL);
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  double dt = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
  CHECK(dt < 3.0);
  cli_close(&c);
  /* an idle keep-alive connection is closed */
  cli_open(&c, g_port);
  cli_sends(&c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK(cli_response(&c, &r, 5000));
  resp_free(&r);
  CHECK(cli_eof(&c, 5000));
  cli_close(&c);
}

static void test_http_disconnect(void) {
  int before = atomic_load(&g_fake.n_aborted);
  client_t c;
  cli_open(&c, g_port);
  char *req = request("POST", "/v1/completions",
                      "{\"prompt\":\"x\",\"max_tokens\":3000,\"stream\":true}", AUTHZ);
  cli_sends(&c, req);
  free(req);
  while (!c.buf || !strstr(c.buf, "w2 ")) CHECK(cli_more(&c, 5000) > 0);
  cli_close(&c); /* mid-stream */
  for (int i = 0; i < 500 && atomic_load(&g_fake.n_aborted) == before; i++) usleep(10000);
  CHECK_INT_EQ(atomic_load(&g_fake.n_aborted), before + 1);
  /* a non-streaming one too, and a pipelined one behind it */
  int sub = atomic_load(&g_fake.n_submitted);
  cli_open(&c, g_port);
  req = request("POST", "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":3000}", AUTHZ);
  cli_sends(&c, req);
  cli_sends(&c, req);
  free(req);
  for (int i = 0; i < 500 && atomic_load(&g_fake.n_submitted) < sub + 2; i++) usleep(10000);
  CHECK_INT_EQ(atomic_load(&g_fake.n_submitted), sub + 2);
  cli_close(&c);
  for (int i = 0; i < 500 && atomic_load(&g_fake.n_aborted) < before + 3; i++) usleep(10000);
  if (atomic_load(&g_fake.n_aborted) != before + 3)
    FAIL_AT("aborted %d, submitted %d (was %d)", atomic_load(&g_fake.n_aborted),
            atomic_load(&g_fake.n_submitted), sub);
  /* the metrics saw the aborts once the engine let go */
  resp_t r;
  for (int i = 0; i < 100; i++) {
    roundtrip("GET", "/metrics", NULL, NULL, &r);
    bool ok = strstr(r.body, "finished_reason=\"abort\"} 3\n") != NULL;
    if (ok) break;
    resp_free(&r);
    r.body = NULL;
    usleep(10000);
  }
  CHECK(r.body && strstr(r.body, "finished_reason=\"abort\"} 3\n"));
  CHECK(strstr(r.body, "vllm:num_requests_running{model_name=\"" MODEL_NAME "\"} 0\n"));
  CHECK(
      !strstr(r.body, "vllm:e2e_request_latency_seconds_count{model_name=\"" MODEL_NAME "\"} 0\n"));
  resp_free(&r);
}

static void test_http_max_connections(void) {
  srv_config_t cfg;
  srv_config_default(&cfg);
  cfg.port = 0;
  cfg.max_connections = 2;
  cfg.max_model_len = MAX_MODEL_LEN;
  srv_server_t *s = NULL;
  char err[256];
  CHECK(srv__server_new_ops(&s, &cfg, &fake_ops, &g_fake, g_tok, &g_chat, "m2", err, sizeof err) ==
        0);
  CHECK(srv_server_loop_age(s) == 0); /* not running yet */
  pthread_t th;
  CHECK(pthread_create(&th, NULL, run_thread, s) == 0);
  usleep(1300000); /* the loop beats every second */
  CHECK(srv_server_loop_age(s) > 0 && srv_server_loop_age(s) < 1.2);
  client_t c[3];
  resp_t r;
  for (int i = 0; i < 2; i++) cli_open(&c[i], srv_server_port(s));
  usleep(50000);
  cli_open(&c[2], srv_server_port(s));
  CHECK(cli_response(&c[2], &r, 5000));
  check_error_body(&r, 503, NULL);
  resp_free(&r);
  cli_sends(&c[0], "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK(cli_response(&c[0], &r, 5000));
  CHECK_INT_EQ(r.status, 200);
  resp_free(&r);
  for (int i = 0; i < 3; i++) cli_close(&c[i]);
  /* graceful shutdown: /health answers 503 on an open connection, then it stops */
  cli_open(&c[0], srv_server_port(s));
  usleep(20000);
  srv_server_shutdown(s, 2000);
  usleep(50000);
  cli_sends(&c[0], "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
  bool got = cli_response(&c[0], &r, 5000);
  if (got) { /* unless the (idle) server had already stopped */
    check_error_body(&r, 503, NULL);
    resp_free(&r);
  }
  cli_close(&c[0]);
  CHECK(pthread_join(th, NULL) == 0);
  srv_server_free(s);
}

static int http_tests(void) {
  srv_config_t cfg;
  srv_config_default(&cfg);
  cfg.port = 0;
  cfg.api_key = API_KEY;
  cfg.served_model_name = MODEL_NAME;
  cfg.max_model_len = MAX_MODEL_LEN;
  cfg.max_request_bytes = 64 * 1024;
  cfg.header_timeout_ms = 500;
  cfg.idle_timeout_ms = 700;
  pthread_mutex_init(&g_fake.mu, NULL);
  g_fake.delay_us = 1000;
  char err[256];
  if (srv__server_new_ops(&g_fake.srv, &cfg, &fake_ops, &g_fake, g_tok, &g_chat, "ignored", err,
                          sizeof err))
    FAIL_AT("server: %s", err);
  g_port = srv_server_port(g_fake.srv);
  CHECK(g_port > 0);
  pthread_t srv_th;
  CHECK(pthread_create(&g_fake.th, NULL, fake_thread, &g_fake) == 0);
  CHECK(pthread_create(&srv_th, NULL, run_thread, g_fake.srv) == 0);

  RUN(test_http_basic);
  RUN(test_http_generate);
  RUN(test_http_engine_error);
  RUN(test_http_pipelining);
  RUN(test_http_limits);
  RUN(test_http_strict);
  RUN(test_http_timeouts);
  RUN(test_http_disconnect);
  RUN(test_http_max_connections);

  srv_server_stop(g_fake.srv);
  CHECK(pthread_join(srv_th, NULL) == 0);
  usleep(1500000); /* a loop that no longer turns ages: the watchdog hears of it */
  CHECK(srv_server_loop_age(g_fake.srv) > 1.4);
  pthread_mutex_lock(&g_fake.mu);
  g_fake.quit = true;
  pthread_mutex_unlock(&g_fake.mu);
  CHECK(pthread_join(g_fake.th, NULL) == 0);
  /* the engine goes first (main does the same), then the server */
  for (fake_req_t *q = g_fake.reqs, *n; q; q = n) {
    n = q->next;
    sched_request_free(q->r);
    free(q);
  }
  g_fake.reqs = NULL;
  for (size_t i = 0; i < g_fake.n_out; i++) sched_event_clear(&g_fake.out[i]);
  srv_server_free(g_fake.srv);
  pthread_mutex_destroy(&g_fake.mu);
  return 0;
}

/* ======================================================================== */

static int load_model(void) {
  const char *path = test_model_path();
  if (!path) return -1;
  char err[256];
  if (model_gguf_open(&g_gguf, path, err, sizeof err)) FAIL_AT("%s", err);
  if (model_tok_from_gguf(&g_tok, &g_gguf, err, sizeof err)) FAIL_AT("%s", err);
  model_gguf_str_t t;
  CHECK(model_gguf_get_str(&g_gguf, "tokenizer.chat_template", &t) == 0);
  char *tmpl = strndup(t.ptr, t.len);
  size_t n;
  int32_t bos = model_tok_bos(g_tok), eos = model_tok_eos(g_tok);
  char *bos_s = bos >= 0 ? strdup(model_tok_piece(g_tok, bos, true, &n)) : NULL;
  char *eos_s = eos >= 0 ? strdup(model_tok_piece(g_tok, eos, true, &n)) : NULL;
  if (model_chat_init_detect(&g_chat, tmpl, bos_s, eos_s, err, sizeof err)) FAIL_AT("%s", err);
  free(tmpl);
  free(bos_s);
  free(eos_s);
  g_api = (srv_api_ctx_t){g_tok, &g_chat, MODEL_NAME, MAX_MODEL_LEN, {{0}, 0, 0, 0, 0}, 0};
  sched_kv_compression_default(&g_api.kvc);
  return 0;
}

int main(void) {
  signal(SIGPIPE, SIG_IGN); /* as pressd serve does */
  RUN(test_json_writer);
  RUN(test_errors);
  RUN(test_auth);
  RUN(test_stop);
  RUN(test_sse);
  RUN(test_format);
  RUN(test_metrics);
  RUN(test_routes);
  if (load_model()) {
    fprintf(stderr, "no model (PRESSD_MODEL): request validation and HTTP tests skipped\n");
    return TEST_SKIP;
  }
  RUN(test_validation_errors);
  RUN(test_validation_ok);
  RUN(test_tokenize);
  http_tests();
  model_chat_destroy(&g_chat);
  model_tok_free(g_tok);
  model_gguf_close(&g_gguf);
  fprintf(stderr, "server: all tests passed\n");
  return 0;
}
