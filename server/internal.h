/* Internals shared by the server's files. Everything here runs on the loop
 * thread unless marked otherwise. */
#ifndef PRESSD_SERVER_INTERNAL_H
#define PRESSD_SERVER_INTERNAL_H

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "server/server.h"

/* Pipelined requests parsed ahead of their responses, per connection. */
#define SRV_MAX_PIPELINE 16
/* Engine events drained per poll call. */
#define SRV_POLL_BATCH 64
/* Stop strings per request, and bytes per stop string. */
#define SRV_MAX_STOP 64
#define SRV_MAX_STOP_LEN 1024
/* Messages per chat request. */
#define SRV_MAX_MESSAGES 4096

/* ---- buf.c: growable byte buffer and a JSON writer over it -------------- */

typedef struct srv_buf {
  char *p; /* owns: [cap], NUL-terminated when len < cap */
  size_t len, cap;
  bool oom;      /* an append failed; the content is truncated */
  bool borrowed; /* p is the caller's (e.g. on the stack): copied, not realloc'd, on growth */
} srv_buf_t;

void srv__buf_init(srv_buf_t *b);
void srv__buf_free(srv_buf_t *b); /* NULL-safe */
void srv__buf_add(srv_buf_t *b, const void *p, size_t n);
void srv__buf_adds(srv_buf_t *b, const char *s);
void srv__buf_printf(srv_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Takes the content (NUL-terminated, caller frees); leaves b empty. */
char *srv__buf_take(srv_buf_t *b);

/* A JSON string literal; bytes that are not valid UTF-8 become U+FFFD. */
void srv__json_str(srv_buf_t *b, const char *s, size_t n);
void srv__json_cstr(srv_buf_t *b, const char *s); /* NULL: null */
/* A float; non-finite values become -9999.0 (as vLLM writes -inf logprobs). */
void srv__json_float(srv_buf_t *b, double v);
/* True when s[0..n) is valid UTF-8. */
bool srv__utf8_valid(const char *s, size_t n);

/* ---- errors (errors.c) ----------------------------------------------------- */

typedef struct srv_error {
  int status;       /* HTTP status */
  const char *type; /* static: "invalid_request_error", ... */
  const char *code; /* static or NULL */
  char param[64];   /* the offending parameter, "" for none */
  char message[512];
} srv_error_t;

/* Fills e (type from the status) and returns -1, so that callers can
 * `return srv__error(...)`. param may be NULL. */
int srv__error(srv_error_t *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* {"error":{"message":...,"type":...,"param":...,"code":...}} */
void srv__error_json(srv_buf_t *b, const srv_error_t *e);
const char *srv__status_text(int status);

/* ---- auth.c ------------------------------------------------------------------ */

/* True when there is no key, or the Authorization header value (may be
 * NULL) is "Bearer <key>" (scheme case-insensitive) for one of the keys.
 * Every key is compared, each in time independent of where the strings
 * differ, so the time tells neither which key nor how much of it matched. */
bool srv__auth_ok(const char *header, size_t header_len, char *const *keys, int n_keys);
/* Constant-time equality of two byte strings (time depends on the lengths only). */
bool srv__ct_equal(const void *a, size_t alen, const void *b, size_t blen);

/* ---- openai.c: request validation --------------------------------------- */

typedef enum srv_api { SRV_API_COMPLETIONS, SRV_API_CHAT } srv_api_t;

typedef struct srv_api_ctx {
  const model_tok_t *tok;   /* borrows */
  const model_chat_t *chat; /* borrows; NULL: chat requests get 400 */
  const char *model_name;   /* borrows: the served name */
  int32_t max_model_len;
  sched_kv_compression_t kvc; /* the server's KV compression, requests override it */
  int32_t max_tokens_limit;   /* a request's max_tokens at most; 0: none */
} srv_api_ctx_t;

/* What the server keeps of a generation request besides the engine request. */
typedef struct srv_gen_params {
  srv_api_t api;
  bool stream;
  bool include_usage;
  bool echo;            /* completions: prepend the prompt text */
  bool logprobs;        /* report the sampled token's logprob */
  int32_t top_logprobs; /* alternatives per token (0..20) */
  char *echo_text;      /* owns: the prompt text when echo */
  size_t echo_len;
} srv_gen_params_t;

/* Parses and validates a /v1/completions or /v1/chat/completions body into
 * a new engine request (*out, caller frees with sched_request_free) and gp.
 * On error returns -1 with e filled (status 400 or 404) and nothing
 * allocated. */
int srv__parse_generate(const srv_api_ctx_t *ctx, srv_api_t api, const char *body, size_t len,
                        sched_request_t **out, srv_gen_params_t *gp, srv_error_t *e);
void srv__gen_params_destroy(srv_gen_params_t *gp); /* NULL-safe */
/* "stop": null, a string or an array of strings. */
int srv__parse_stop(const cJSON *v, char ***stop, int32_t *n_stop, srv_error_t *e);
/* POST /tokenize and /detokenize: the JSON answer in out, or -1 and e. */
int srv__tokenize(const srv_api_ctx_t *ctx, const char *body, size_t len, srv_buf_t *out,
                  srv_error_t *e);
int srv__detokenize(const srv_api_ctx_t *ctx, const char *body, size_t len, srv_buf_t *out,
                    srv_error_t *e);

/* ---- format.c: response bodies and stream chunks ------------------------ */

typedef struct srv_resp_info {
  srv_api_t api;
  const char *id; /* "cmpl-..." / "chatcmpl-..." */
  const char *model;
  int64_t created; /* unix seconds */
  bool include_usage;
} srv_resp_info_t;

/* Logprob entries of one response or chunk, rendered as tokens arrive. */
typedef struct srv_logprobs {
  srv_buf_t tokens, token_logprobs, top, offsets; /* completions: four arrays */
  srv_buf_t content;                              /* chat: "content" entries */
  int32_t n;
} srv_logprobs_t;

void srv__logprobs_init(srv_logprobs_t *l);
void srv__logprobs_destroy(srv_logprobs_t *l);
void srv__logprobs_reset(srv_logprobs_t *l);
/* Appends the event's token (ev->n_tokens == 1); text_offset for completions. */
void srv__logprobs_add(srv_logprobs_t *l, srv_api_t api, const model_tok_t *tok,
                       const sched_event_t *ev, size_t text_offset);

const char *srv__finish_name(sched_finish_t f); /* "stop" | "length" | NULL */

/* A whole non-streaming response. lp may be NULL. */
/* A response's usage. The KV fields (tokens of KV cache the request kept
 * and evicted, per head on average) appear when it was compressed. */
typedef struct srv_usage {
  int32_t prompt_tokens, completion_tokens;
  int32_t kv_tokens_kept, kv_tokens_evicted;
} srv_usage_t;

void srv__fmt_response(srv_buf_t *b, const srv_resp_info_t *ri, const char *text, size_t len,
                       const char *finish, const srv_logprobs_t *lp, const srv_usage_t *u);
/* One stream chunk's JSON: text delta (chat: content; role when role is set),
 * finish reason or NULL, logprobs or NULL. */
void srv__fmt_chunk(srv_buf_t *b, const srv_resp_info_t *ri, const char *role, const char *text,
                    size_t len, const char *finish, const srv_logprobs_t *lp);
/* The include_usage chunk: choices [] and usage. */
void srv__fmt_usage_chunk(srv_buf_t *b, const srv_resp_info_t *ri, const srv_usage_t *u);
void srv__fmt_models(srv_buf_t *b, const char *model, int64_t created, int32_t max_model_len);

/* ---- sse.c: event-stream framing (optionally in HTTP/1.1 chunks) ---------- */

/* "data: <json>\n\n", wrapped in one HTTP chunk when chunked. */
void srv__sse_data(srv_buf_t *out, const char *json, size_t n, bool chunked);
/* "data: [DONE]\n\n" and, when chunked, the terminating zero chunk. */
void srv__sse_done(srv_buf_t *out, bool chunked);

/* ---- metrics.c ----------------------------------------------------------- */

#define SRV_HIST_MAX_BUCKETS 32

typedef struct srv_hist {
  const double *bounds; /* view: upper bounds, ascending */
  int n_bounds;
  uint64_t counts[SRV_HIST_MAX_BUCKETS + 1]; /* per bucket, last = +Inf */
  uint64_t count;
  double sum;
} srv_hist_t;

enum { SRV_FIN_STOP, SRV_FIN_LENGTH, SRV_FIN_ABORT, SRV_FIN_ERROR, SRV_FIN_COUNT };

typedef struct srv_metrics {
  srv_hist_t ttft, tpot, e2e, queue;
  uint64_t finished[SRV_FIN_COUNT];
  uint64_t http_requests;
  uint64_t rejected; /* 429 */
} srv_metrics_t;

void srv__metrics_init(srv_metrics_t *m);
void srv__hist_observe(srv_hist_t *h, double v);
/* Prometheus text exposition format 0.0.4. */
void srv__metrics_format(srv_buf_t *b, const srv_metrics_t *m, const sched_stats_t *st,
                         const char *model_name);

/* ---- routes.c -------------------------------------------------------------- */

typedef struct srv_req srv_req_t;
typedef void (*srv_handler_fn)(srv_req_t *req);

typedef struct srv_route {
  const char *path;
  uint8_t method; /* llhttp_method_t */
  srv_handler_fn fn;
} srv_route_t;

/* Looks up a path (query string already stripped) and method: 200 with
 * *out set, 404 unknown path, 405 known path but other method (allow then
 * lists the methods, e.g. "POST"). */
int srv__route_find(const char *path, size_t len, int method, const srv_route_t **out,
                    const char **allow);
/* The path of a request target without its query or fragment ([*len]):
 * the origin form as it is, the absolute form ("http://host:port/path?q",
 * RFC 9112 3.2.2) past its authority. */
const char *srv__target_path(const char *target, size_t *len);
/* True for paths the API key protects (/v1 and below). */
bool srv__route_needs_auth(const char *path, size_t len);
/* Routes, authenticates and runs the handler of a complete request. */
void srv__dispatch(srv_req_t *req);

/* ---- engine access (server.c), replaceable for tests ----------------------- */

typedef struct srv_engine_ops {
  int (*submit)(void *eng, sched_request_t *r);
  void (*abort)(void *eng, uint64_t id);
  size_t (*poll)(void *eng, sched_event_t *evs, size_t max);
  void (*stats)(void *eng, sched_stats_t *out);
} srv_engine_ops_t;

/* srv_server_new with another engine behind ops (tests use a fake one). */
int srv__server_new_ops(srv_server_t **out, const srv_config_t *cfg, const srv_engine_ops_t *ops,
                        void *eng, const model_tok_t *tok, const model_chat_t *chat,
                        const char *model_name, char *err, size_t errlen);

/* ---- http.c: connections and exchanges -------------------------------------- */

typedef struct srv_conn srv_conn_t;

/* One request and its response (an "exchange"). Lives in its connection's
 * queue until its response is complete and written, or, when the client
 * went away while the engine still had it, in the server's live list until
 * the engine's last event for it arrives. */
struct srv_req {
  srv_server_t *srv;
  srv_conn_t *conn;                 /* borrows; NULL once the connection is gone */
  srv_req_t *next;                  /* in the connection's queue */
  srv_req_t *live_prev, *live_next; /* in srv->live while in the engine */

  /* the parsed request */
  uint8_t method;
  uint8_t http_minor;
  bool keep_alive;
  srv_buf_t url;
  srv_buf_t auth; /* Authorization header value */
  srv_buf_t body;
  uint64_t t_arrival; /* uv_hrtime at message complete */

  /* the response */
  srv_buf_t out; /* bytes written while the exchange was not at the head */
  bool done;     /* the response is complete */
  bool chunked;  /* streaming in HTTP/1.1 chunks */

  /* a generation in the engine */
  bool in_engine;
  bool headers_sent;
  uint64_t id;
  char rid[48]; /* "cmpl-..." */
  int64_t created;
  srv_gen_params_t gp;
  srv_buf_t text;    /* non-streaming: the completion so far */
  size_t text_total; /* bytes of completion text produced */
  srv_logprobs_t lp;
  uint64_t t_submit, t_first, t_last;
  int32_t n_prompt, n_gen;
  int status;         /* the response's HTTP status, once sent */
  const char *finish; /* static: how a generation ended, for the log */
};

/* Write response bytes in request order: at once when req is the head of its
 * connection's queue, else buffered until it is. No-op for orphans. */
void srv__req_write(srv_req_t *req, const void *p, size_t n);
/* The response is complete. May free req (and start closing the connection):
 * the caller must not touch req afterwards. */
void srv__req_end(srv_req_t *req);
/* A complete response with a body (Content-Length) and srv__req_end. */
void srv__respond(srv_req_t *req, int status, const char *content_type, const char *body,
                  size_t len, const char *extra_headers);
void srv__respond_error(srv_req_t *req, const srv_error_t *e);
/* The status line and headers of a streaming response. */
void srv__respond_stream_head(srv_req_t *req);
void srv__req_free(srv_req_t *req); /* NULL-safe */

/* Aborts every request its connection still waits for (drain timeout). */
void srv__abort_running(srv_server_t *s);
/* Drain: no connection takes another request; those with nothing parsed or
 * queued shut down now, the others after their response. */
void srv__close_idle(srv_server_t *s);
/* Accept callback of the listening socket. */
void srv__on_connection(uv_stream_t *server, int status);
/* Closes every connection (stop); graceful: except those already sending
 * their FIN after their last response, which close themselves. */
void srv__close_all(srv_server_t *s, bool graceful);
void srv__http_settings(llhttp_settings_t *st);

/* ---- gen.c: generation requests --------------------------------------------- */

void srv__handle_generate(srv_req_t *req, srv_api_t api);
/* One engine event, on the loop thread. */
void srv__on_event(srv_server_t *s, sched_event_t *ev);
/* The connection of req closed while the engine had it: abort, orphan. */
void srv__gen_orphan(srv_req_t *req);

/* ---- the server ------------------------------------------------------------- */

struct srv_server {
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t wake; /* engine events are ready */
  uv_async_t ctl;  /* stop / shutdown requested from another thread */
  uv_timer_t drain_timer;
  uv_timer_t beat_timer; /* the loop's sign of life, every SRV_BEAT_MS */
  bool listener_open, wake_open, ctl_open, drain_timer_open, beat_timer_open, loop_open;
  atomic_llong beat_ns;  /* srv__now_ns() of the last beat; 0 before the loop runs */

  srv_config_t cfg;
  char *host, *model_name; /* owns; cfg's pointers point here */
  char **keys;              /* owns: the accepted API keys ([n_keys]) */
  int n_keys;
  int port;

  const srv_engine_ops_t *ops;
  void *eng; /* borrows */
  srv_api_ctx_t api;
  llhttp_settings_t settings;

  srv_conn_t *conns; /* owns: open connections (list) */
  int n_conns;
  srv_req_t *live; /* requests in the engine whose connection is gone */
  int n_active;    /* requests in the engine (orphans included) */

  uint64_t next_id;
  uint64_t rng[2];
  int64_t started; /* unix seconds */
  srv_metrics_t metrics;
  srv_buf_t scratch; /* JSON of one chunk */
  srv_buf_t frame;   /* its SSE framing */
  sched_event_t evs[SRV_POLL_BATCH];
  char readbuf[64 * 1024];
  bool in_read; /* readbuf is lent to libuv */

  atomic_int stop_requested;
  atomic_int drain_requested;
  atomic_llong drain_timeout_ms;
  bool draining, stopping;
  bool drain_aborting; /* the drain timed out: the rest were aborted */
};

/* Unique 32-hex-digit suffix for response ids. */
void srv__new_rid(srv_server_t *s, const char *prefix, char *out, size_t cap);
/* Starts stopping if draining and nothing is left in flight. */
void srv__drain_check(srv_server_t *s);
uint64_t srv__now_ns(void);

#endif
