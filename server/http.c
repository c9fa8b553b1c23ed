/* Connections: libuv TCP streams parsed by llhttp.
 *
 * Each complete request becomes an exchange (srv_req_t) appended to its
 * connection's queue; responses go out strictly in queue order (pipelining):
 * only the head exchange writes to the socket, the others buffer until they
 * become the head. Parsing pauses while SRV_MAX_PIPELINE exchanges wait.
 *
 * Limits: request line + headers <= max_header_bytes (431), body <=
 * max_request_bytes (413, from Content-Length or a chunk's size before the
 * data is read; a chunked body's framing counts with its data), headers
 * complete within header_timeout_ms of the first byte and the body within
 * body_timeout_ms after them (408), idle keep-alive connections close after
 * idle_timeout_ms. The limits count bytes on the wire: llhttp reports spans
 * (method, URL, header names and values, body data), and the bytes between
 * them (separators, whitespace, chunk sizes and extensions) are counted from
 * the gaps, so that padding cannot get round them.
 *
 * Stricter than llhttp 8: obs-fold and whitespace in a header name are 400
 * (RFC 9112 5.1, 5.2), a chunk's data must be followed by CRLF, a second
 * Authorization header is 400, trailers never carry credentials, and an
 * Upgrade or CONNECT request is answered with Connection: close.
 *
 * A connection that must close (error, Connection: close, HTTP/1.0, upgrade)
 * is shut down after its last write and drained for a moment, so the client
 * reads the response instead of a reset.
 *
 * Lifetime: a connection is freed in the close callback of its last handle;
 * conn_close() inside llhttp_execute() is deferred until it returns. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/log.h"
#include "server/internal.h"

#define LINGER_MS 2000
/* Bytes queued for a client that does not read before it is dropped. */
#define MAX_UNSENT ((size_t)64 << 20)

typedef enum { T_NONE, T_IDLE, T_HEADERS, T_BODY, T_LINGER, T_BROKEN } timer_mode_t;
typedef enum { H_OTHER, H_AUTH, H_EXPECT } header_kind_t;
typedef enum { SPAN_NONE, SPAN_FIELD, SPAN_VALUE, SPAN_OTHER } span_kind_t;

struct srv_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_shutdown_t shutdown_req;
  srv_server_t *srv;
  srv_conn_t *prev, *next; /* in srv->conns */
  llhttp_t parser;

  srv_req_t *cur;         /* owns: the request being parsed */
  srv_req_t *head, *tail; /* owns: exchanges awaiting or writing their response */
  int n_queued;

  srv_buf_t hfield; /* the header field being read */
  header_kind_t hkind;
  char expect[32];
  size_t expect_len;
  size_t header_bytes;
  int error_status;        /* why a callback stopped the parser */
  const char *error_msg;   /* static: its message, NULL for the default one */
  bool auth_seen;          /* this message had an Authorization header */
  bool host_seen;          /* ... a Host header */

  /* wire accounting of the message being parsed (count_gap) */
  const char *mark;     /* in the buffer being parsed: end of the last span, NULL: none */
  const char *feed_end; /* end of the buffer being parsed */
  bool in_message;      /* between message begin and complete */
  bool in_body;         /* its headers are complete */
  bool chunked;
  size_t framing;       /* chunked body bytes that are not data */
  size_t gap;           /* bytes since the last header span */
  bool gap_nl;          /* a line break among them with more bytes after it */
  bool gap_lf_end;      /* their last byte is a line feed */
  span_kind_t last_span;
  int crlf_due;         /* bytes of the CRLF after a chunk's data still to check */

  srv_buf_t pending_in; /* bytes read but not parsed while paused */
  timer_mode_t tmode;
  int n_handles; /* open libuv handles */
  bool paused;   /* pipeline full: parser paused, not reading */
  bool no_more;  /* read no further requests; close after the queue */
  bool reading;
  bool in_execute;
  bool close_pending;
  bool closing;
  bool shutting_down;
  bool shutdown_done; /* every write reached the socket, FIN sent */
  bool eof;           /* the client closed its side while we were shutting down */
  bool broken;        /* a write failed: closed from the timer, writes dropped until then */
};

typedef struct wreq {
  uv_write_t w;
  uv_buf_t b;
  char data[];
} wreq_t;

static void conn_close(srv_conn_t *c);
static void conn_break(srv_conn_t *c);
static void advance(srv_conn_t *c);
static void feed(srv_conn_t *c, const char *data, size_t n);

/* ---- exchanges --------------------------------------------------------------- */

static srv_req_t *req_new(srv_conn_t *c) {
  srv_req_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->srv = c->srv;
  r->conn = c;
  r->keep_alive = false;
  return r;
}

void srv__req_free(srv_req_t *req) {
  if (!req) return;
  srv__buf_free(&req->url);
  srv__buf_free(&req->auth);
  srv__buf_free(&req->body);
  srv__buf_free(&req->out);
  srv__buf_free(&req->text);
  srv__logprobs_destroy(&req->lp);
  srv__gen_params_destroy(&req->gp);
  free(req);
}

static void queue_push(srv_conn_t *c, srv_req_t *r) {
  r->next = NULL;
  if (c->tail) c->tail->next = r;
  else c->head = r;
  c->tail = r;
  c->n_queued++;
}

/* ---- writing ------------------------------------------------------------------ */

static void on_write(uv_write_t *w, int status) {
  srv_conn_t *c = w->data;
  free(w);
  if (status < 0) conn_break(c);
}

static void conn_write(srv_conn_t *c, const void *p, size_t n) {
  if (c->closing || c->broken || n == 0) return;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > MAX_UNSENT) {
    conn_break(c); /* the client stopped reading */
    return;
  }
  uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
  int k = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (k == (int)n) return;
  if (k < 0 && k != UV_EAGAIN && k != UV_ENOSYS) {
    conn_break(c);
    return;
  }
  size_t done = k > 0 ? (size_t)k : 0;
  wreq_t *w = malloc(sizeof *w + (n - done));
  if (!w) {
    conn_break(c);
    return;
  }
  memcpy(w->data, (const char *)p + done, n - done);
  w->b = uv_buf_init(w->data, (unsigned)(n - done));
  w->w.data = c;
  if (uv_write(&w->w, (uv_stream_t *)&c->tcp, &w->b, 1, on_write)) {
    free(w);
    conn_break(c);
  }
}

void srv__req_write(srv_req_t *req, const void *p, size_t n) {
  srv_conn_t *c = req->conn;
  if (!c || c->closing || c->broken || n == 0) return;
  if (req == c->head) conn_write(c, p, n);
  else srv__buf_add(&req->out, p, n);
}

/* One line per exchange: generations and errors at info (5xx at warn),
 * the operational routes' successes at debug. Never the body. */
static void log_exchange(const srv_req_t *req) {
  log_level_t lv = req->status >= 500 ? LOG_WARN
                   : req->id || req->status >= 400 ? LOG_INFO
                                                   : LOG_DEBUG;
  if (!log_enabled(lv)) return;
  const char *url = req->url.p ? req->url.p : "";
  int plen = (int)strcspn(url, "?#");
  plen = plen > 200 ? 200 : plen;
  if (!plen) url = "-", plen = 1; /* refused before a request line was read */
  const char *method = req->method || req->url.len ? llhttp_method_name((llhttp_method_t)req->method)
                                                   : "-";
  double ms = req->t_arrival ? (double)(srv__now_ns() - req->t_arrival) * 1e-6 : 0.0;
  if (req->rid[0])
    log_msg(lv, "%s %s %.*s %d %s prompt_tokens=%d completion_tokens=%d ttft_ms=%.1f ms=%.1f",
            req->rid, method, plen, url, req->status, req->finish ? req->finish : "-",
            req->n_prompt, req->n_gen,
            req->t_first ? (double)(req->t_first - req->t_arrival) * 1e-6 : 0.0, ms);
  else
    log_msg(lv, "%s %.*s %d ms=%.1f", method, plen, url, req->status, ms);
}

void srv__req_end(srv_req_t *req) {
  req->done = true;
  log_exchange(req);
  srv_conn_t *c = req->conn;
  if (c && req == c->head) advance(c);
}

static void respond_head(srv_buf_t *h, srv_req_t *req, int status, const char *content_type,
                         size_t len, const char *extra) {
  req->status = status;
  srv__buf_printf(h, "HTTP/1.1 %d %s\r\nServer: pressd\r\n", status, srv__status_text(status));
  if (content_type) srv__buf_printf(h, "Content-Type: %s\r\n", content_type);
  srv__buf_printf(h, "Content-Length: %zu\r\nConnection: %s\r\n", len,
                  req->keep_alive ? "keep-alive" : "close");
  if (extra) srv__buf_adds(h, extra);
  srv__buf_add(h, "\r\n", 2);
}

void srv__respond(srv_req_t *req, int status, const char *content_type, const char *body,
                  size_t len, const char *extra_headers) {
  char stack[2048];
  srv_buf_t h = {.p = stack, .cap = sizeof stack, .borrowed = true};
  respond_head(&h, req, status, content_type, len, extra_headers);
  bool with_body = req->method != HTTP_HEAD && len;
  if (h.p == stack && with_body && h.len + len < sizeof stack) {
    memcpy(stack + h.len, body, len); /* one write for small responses */
    h.len += len;
    with_body = false;
  }
  srv__req_write(req, h.p, h.len);
  if (with_body) srv__req_write(req, body, len);
  srv__buf_free(&h);
  srv__req_end(req);
}

void srv__respond_error(srv_req_t *req, const srv_error_t *e) {
  char stack[1024];
  srv_buf_t b = {.p = stack, .cap = sizeof stack, .borrowed = true};
  srv__error_json(&b, e);
  srv__respond(req, e->status, "application/json", b.p, b.len,
               e->status == 401 ? "WWW-Authenticate: Bearer\r\n" : NULL);
  srv__buf_free(&b);
}

void srv__respond_stream_head(srv_req_t *req) {
  char hdr[512];
  req->chunked = req->http_minor >= 1;
  req->status = 200;
  if (!req->chunked) req->keep_alive = false; /* HTTP/1.0: the end of the stream is EOF */
  int n = snprintf(hdr, sizeof hdr,
                   "HTTP/1.1 200 OK\r\nServer: pressd\r\n"
                   "Content-Type: text/event-stream; charset=utf-8\r\n"
                   "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n%s"
                   "Connection: %s\r\n\r\n",
                   req->chunked ? "Transfer-Encoding: chunked\r\n" : "",
                   req->keep_alive ? "keep-alive" : "close");
  srv__req_write(req, hdr, (size_t)n);
  req->headers_sent = true;
}

/* ---- timers ------------------------------------------------------------------- */

static void on_timer(uv_timer_t *t);

static void timer_set(srv_conn_t *c, timer_mode_t mode, int64_t ms) {
  if (c->closing || c->broken) return;
  c->tmode = mode;
  if (mode == T_NONE || ms <= 0) uv_timer_stop(&c->timer); /* <= 0: no deadline */
  else uv_timer_start(&c->timer, on_timer, (uint64_t)ms, 0);
}

/* Idle when nothing is parsed or queued; no deadline while responses run. */
static void update_timer(srv_conn_t *c) {
  if (c->closing || c->shutting_down || c->cur) return;
  if (!c->head) {
    if (c->tmode != T_IDLE) timer_set(c, T_IDLE, c->srv->cfg.idle_timeout_ms);
  } else if (c->tmode != T_NONE) {
    timer_set(c, T_NONE, 0);
  }
}

/* ---- closing ------------------------------------------------------------------ */

static void on_handle_close(uv_handle_t *h) {
  srv_conn_t *c = h->data;
  if (--c->n_handles > 0) return;
  srv__buf_free(&c->hfield);
  srv__buf_free(&c->pending_in);
  free(c);
}

static void conn_close(srv_conn_t *c) {
  if (c->closing) return;
  if (c->in_execute) {
    c->close_pending = true;
    return;
  }
  c->closing = true;
  srv_server_t *s = c->srv;
  srv__req_free(c->cur);
  c->cur = NULL;
  for (srv_req_t *r = c->head, *next; r; r = next) {
    next = r->next;
    r->next = NULL;
    if (r->in_engine) srv__gen_orphan(r); /* freed when the engine lets go */
    else srv__req_free(r);
  }
  c->head = c->tail = NULL;
  c->n_queued = 0;
  if (c->prev) c->prev->next = c->next;
  else s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->n_conns--;
  uv_close((uv_handle_t *)&c->tcp, on_handle_close);
  uv_close((uv_handle_t *)&c->timer, on_handle_close);
}

/* Closing from inside a write would free exchanges the caller still uses:
 * stop all I/O now, close from the timer in the next loop iteration. */
static void conn_break(srv_conn_t *c) {
  if (c->closing || c->broken) return;
  c->broken = true;
  if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = false;
  c->tmode = T_BROKEN;
  uv_timer_start(&c->timer, on_timer, 0, 0);
}

void srv__close_all(srv_server_t *s, bool graceful) {
  for (srv_conn_t *c = s->conns, *next; c; c = next) {
    next = c->next;
    if (graceful && c->shutting_down) continue; /* FIN sent: it closes itself soon */
    conn_close(c);
  }
}

void srv__abort_running(srv_server_t *s) {
  for (srv_conn_t *c = s->conns; c; c = c->next)
    for (srv_req_t *r = c->head; r; r = r->next)
      if (r->in_engine) s->ops->abort(s->eng, r->id);
}

static void begin_shutdown(srv_conn_t *c);

void srv__close_idle(srv_server_t *s) {
  for (srv_conn_t *c = s->conns, *next; c; c = next) {
    next = c->next;
    if (c->closing) continue;
    /* no further request on it: after the response in progress the
     * connection sends its FIN behind the last bytes (a plain close at the
     * stop would drop the writes still queued) */
    c->no_more = true;
    if (!c->cur && !c->head) begin_shutdown(c);
  }
}

static void on_shutdown(uv_shutdown_t *sr, int status) {
  srv_conn_t *c = sr->data;
  if (c->closing) return;
  c->shutdown_done = true;
  if (status < 0 || c->eof) conn_close(c);
  else timer_set(c, T_LINGER, LINGER_MS); /* read and discard until EOF or then */
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

/* No more requests and every response handed to the socket: send FIN after
 * the queued writes, keep reading (and discarding) for a moment. */
static void begin_shutdown(srv_conn_t *c) {
  if (c->closing || c->broken || c->shutting_down) return;
  c->shutting_down = true;
  c->no_more = true;
  c->shutdown_req.data = c;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown)) {
    conn_break(c);
    return;
  }
  timer_set(c, T_LINGER, LINGER_MS + 30000); /* bound on writes the client does not read */
  if (!c->reading && uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
    c->reading = true;
}

static void stop_reading(srv_conn_t *c) {
  if (c->shutting_down) return; /* lingering: reads are drained and discarded */
  if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = false;
}

static void maybe_end(srv_conn_t *c) {
  if (!c->closing && c->no_more && !c->head && !c->cur) begin_shutdown(c);
}

/* A final error response for what could not be parsed; nothing after it is read. */
static void fail_request(srv_conn_t *c, int status, const char *message) {
  srv__req_free(c->cur);
  c->cur = NULL;
  c->no_more = true;
  stop_reading(c);
  srv_req_t *r = req_new(c);
  if (!r) {
    conn_close(c);
    return;
  }
  r->http_minor = 1;
  queue_push(c, r);
  srv_error_t e;
  srv__error(&e, status, NULL, "%s", message);
  srv__respond_error(r, &e); /* in order: it waits for the exchanges before it */
}

/* ---- the queue ---------------------------------------------------------------- */

static void resume(srv_conn_t *c) {
  c->paused = false;
  llhttp_resume(&c->parser);
  srv_buf_t in = c->pending_in;
  srv__buf_init(&c->pending_in);
  if (in.len) feed(c, in.p, in.len);
  srv__buf_free(&in);
  if (!c->closing && !c->paused && !c->no_more && !c->reading &&
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
    c->reading = true;
}

/* Retire finished exchanges at the head; flush what the next one buffered. */
static void advance(srv_conn_t *c) {
  while (!c->closing && c->head && c->head->done) {
    srv_req_t *r = c->head;
    c->head = r->next;
    if (!c->head) c->tail = NULL;
    c->n_queued--;
    bool keep_alive = r->keep_alive;
    srv__req_free(r);
    if (!keep_alive) {
      c->no_more = true;
      stop_reading(c);
      break;
    }
    srv_req_t *h = c->head;
    if (h && h->out.len) {
      conn_write(c, h->out.p, h->out.len);
      srv__buf_free(&h->out);
    }
  }
  if (c->closing || c->broken) return;
  if (c->no_more && !c->cur) {
    if (!c->head) begin_shutdown(c);
    else if (c->head->done) advance(c);
    return;
  }
  update_timer(c);
  if (c->paused && !c->in_execute && c->n_queued < SRV_MAX_PIPELINE) resume(c);
}

/* ---- llhttp callbacks ------------------------------------------------------ */

static srv_conn_t *conn_of(llhttp_t *p) { return p->data; }

static int parse_error(srv_conn_t *c, int status, const char *message) {
  c->error_status = status;
  c->error_msg = message;
  return -1;
}

/* 0 while the bytes counted so far are within the limits, else -1 (431, 413). */
static int over_limit(srv_conn_t *c) {
  const srv_config_t *cfg = &c->srv->cfg;
  if (c->header_bytes > cfg->max_header_bytes) return parse_error(c, 431, NULL);
  if (c->cur && c->framing > cfg->max_request_bytes - c->cur->body.len)
    return parse_error(c, 413, NULL);
  return 0;
}

/* Counts the bytes between the last span and at (both in the buffer being
 * parsed): the header section's, or a chunked body's framing. */
static void count_gap(srv_conn_t *c, const char *at) {
  if (!c->mark || at <= c->mark) return;
  size_t n = (size_t)(at - c->mark);
  if (!c->in_body) c->header_bytes += n;
  else if (c->chunked) c->framing += n;
  c->gap += n;
  if (c->gap_lf_end || memchr(c->mark, '\n', n - 1)) c->gap_nl = true;
  c->gap_lf_end = c->mark[n - 1] == '\n';
  c->mark = at;
}

/* A span of the request line or a header (or trailer) line. */
static int header_span(srv_conn_t *c, span_kind_t kind, const char *at, size_t n) {
  count_gap(c, at);
  /* obs-fold: a line break followed by more before a value's first span (an
   * empty value's span starts the next line), or a second span of the same
   * value after a gap (a value split by a read has none) */
  if (kind == SPAN_VALUE && (c->last_span == SPAN_VALUE ? c->gap > 0 : c->gap_nl))
    return parse_error(c, 400, "malformed HTTP request: a header value continues on the next "
                               "line (obs-fold)");
  c->last_span = kind;
  c->gap = 0;
  c->gap_nl = c->gap_lf_end = false;
  c->header_bytes += n;
  c->mark = at + n;
  return over_limit(c);
}

/* The CRLF that must follow a chunk's data, from pos on (llhttp 8 skips two
 * bytes there without looking at them). */
static int check_crlf(srv_conn_t *c, const char *pos) {
  for (; c->crlf_due && pos < c->feed_end; pos++, c->crlf_due--)
    if (*pos != "\r\n"[2 - c->crlf_due])
      return parse_error(c, 400, "malformed HTTP request: chunk data not followed by CRLF");
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  srv_conn_t *c = conn_of(p);
  if (c->no_more || c->closing) return HPE_PAUSED;
  srv__req_free(c->cur);
  if (!(c->cur = req_new(c))) return parse_error(c, 503, NULL);
  c->header_bytes = 0;
  c->hfield.len = 0;
  c->hkind = H_OTHER;
  c->expect_len = 0;
  c->auth_seen = c->host_seen = false;
  c->mark = NULL;
  c->in_message = true;
  c->in_body = c->chunked = false;
  c->framing = c->gap = 0;
  c->gap_nl = c->gap_lf_end = false;
  c->last_span = SPAN_NONE;
  c->crlf_due = 0;
  timer_set(c, T_HEADERS, c->srv->cfg.header_timeout_ms);
  return 0;
}

static int on_method_or_version(llhttp_t *p, const char *at, size_t n) {
  return header_span(conn_of(p), SPAN_OTHER, at, n);
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  srv_conn_t *c = conn_of(p);
  if (header_span(c, SPAN_OTHER, at, n)) return -1;
  srv__buf_add(&c->cur->url, at, n);
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  srv_conn_t *c = conn_of(p);
  if (header_span(c, SPAN_FIELD, at, n)) return -1;
  srv__buf_add(&c->hfield, at, n);
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  srv_conn_t *c = conn_of(p);
  const char *f = c->hfield.p ? c->hfield.p : "";
  size_t len = c->hfield.len;
  c->hfield.len = 0;
  c->hkind = H_OTHER;
  /* llhttp 8 takes "Name :" and "Na me:" as names */
  if (memchr(f, ' ', len) || memchr(f, '\t', len))
    return parse_error(c, 400, "malformed HTTP request: whitespace in a header name");
  if (c->in_body) return 0; /* a trailer: never credentials or an expectation */
  if (len == 13 && strncasecmp(f, "authorization", 13) == 0) {
    if (c->auth_seen)
      return parse_error(c, 400, "malformed HTTP request: more than one Authorization header");
    c->auth_seen = true;
    c->hkind = H_AUTH;
  } else if (len == 6 && strncasecmp(f, "expect", 6) == 0) {
    c->hkind = H_EXPECT;
  } else if (len == 4 && strncasecmp(f, "host", 4) == 0) {
    if (c->host_seen)
      return parse_error(c, 400, "malformed HTTP request: more than one Host header");
    c->host_seen = true;
  }
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  srv_conn_t *c = conn_of(p);
  if (header_span(c, SPAN_VALUE, at, n)) return -1;
  if (c->hkind == H_AUTH) {
    srv__buf_add(&c->cur->auth, at, n);
  } else if (c->hkind == H_EXPECT) {
    size_t k = n < sizeof c->expect - 1 - c->expect_len ? n : sizeof c->expect - 1 - c->expect_len;
    memcpy(c->expect + c->expect_len, at, k);
    c->expect_len += k;
    c->expect[c->expect_len] = '\0';
  }
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  conn_of(p)->hkind = H_OTHER;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  srv_conn_t *c = conn_of(p);
  srv_req_t *r = c->cur;
  r->method = llhttp_get_method(p);
  if (llhttp_get_http_major(p) != 1)
    return parse_error(c, 505, "only HTTP/1.0 and HTTP/1.1 are supported");
  r->http_minor = llhttp_get_http_minor(p);
  if (r->http_minor >= 1 && !c->host_seen) /* RFC 9112 3.2 */
    return parse_error(c, 400, "malformed HTTP request: an HTTP/1.1 request needs a Host header");
  bool has_len = p->flags & F_CONTENT_LENGTH, chunked = p->flags & F_CHUNKED;
  c->in_body = true;
  c->chunked = chunked;
  if (has_len && p->content_length > c->srv->cfg.max_request_bytes)
    return parse_error(c, 413, NULL);
  if ((has_len && p->content_length) || chunked) {
    /* curl waits for "100 Continue" on large bodies; it may only precede
     * this request's response if nothing is answered before it. */
    if (c->expect_len && strncasecmp(c->expect, "100-continue", 12) == 0 && !c->head) {
      static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
      conn_write(c, cont, sizeof cont - 1);
    }
    timer_set(c, T_BODY, c->srv->cfg.body_timeout_ms);
  }
  return 0;
}

/* A chunk larger than what the limit leaves: 413 before its data. */
static int on_chunk_header(llhttp_t *p) {
  srv_conn_t *c = conn_of(p);
  size_t max = c->srv->cfg.max_request_bytes, used = c->cur->body.len + c->framing;
  if (used > max || p->content_length > max - used) return parse_error(c, 413, NULL);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  srv_conn_t *c = conn_of(p);
  srv_buf_t *b = &c->cur->body;
  count_gap(c, at);
  c->mark = at + n;
  c->last_span = SPAN_OTHER;
  c->gap = 0;
  c->gap_nl = c->gap_lf_end = false;
  size_t max = c->srv->cfg.max_request_bytes;
  if (b->len + c->framing > max || n > max - b->len - c->framing) return parse_error(c, 413, NULL);
  srv__buf_add(b, at, n);
  if (b->oom) return parse_error(c, 503, NULL);
  if (c->chunked && p->content_length == 0) { /* the end of a chunk's data */
    c->crlf_due = 2;
    return check_crlf(c, at + n);
  }
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  srv_conn_t *c = conn_of(p);
  srv_req_t *r = c->cur;
  c->cur = NULL;
  c->in_message = c->in_body = false;
  c->mark = NULL;
  bool keep_alive = llhttp_should_keep_alive(p);
  /* what follows an Upgrade or CONNECT request is not HTTP/1.1 */
  r->keep_alive = keep_alive && !c->srv->stopping && !p->upgrade;
  keep_alive = r->keep_alive;
  r->t_arrival = srv__now_ns();
  if (r->url.oom || r->auth.oom) {
    c->cur = r;
    return parse_error(c, 503, NULL);
  }
  timer_set(c, T_NONE, 0);
  queue_push(c, r);
  srv__dispatch(r); /* may answer (and retire r) at once */
  if (c->closing || c->close_pending) return HPE_PAUSED;
  if (!keep_alive) {
    c->no_more = true;
    return HPE_PAUSED;
  }
  if (c->n_queued >= SRV_MAX_PIPELINE) {
    c->paused = true;
    return HPE_PAUSED;
  }
  return 0;
}

void srv__http_settings(llhttp_settings_t *st) {
  llhttp_settings_init(st);
  st->on_message_begin = on_message_begin;
  st->on_method = on_method_or_version;
  st->on_url = on_url;
  st->on_version = on_method_or_version;
  st->on_header_field = on_header_field;
  st->on_header_field_complete = on_header_field_complete;
  st->on_header_value = on_header_value;
  st->on_header_value_complete = on_header_value_complete;
  st->on_headers_complete = on_headers_complete;
  st->on_chunk_header = on_chunk_header;
  st->on_body = on_body;
  st->on_message_complete = on_message_complete;
}

/* ---- reading ------------------------------------------------------------------ */

static void feed(srv_conn_t *c, const char *data, size_t n) {
  llhttp_errno_t err = HPE_USER;
  c->feed_end = data + n;
  c->mark = c->in_message ? data : NULL;
  if (check_crlf(c, data) == 0) {
    c->in_execute = true;
    err = llhttp_execute(&c->parser, data, n);
    c->in_execute = false;
  }
  if (c->close_pending) {
    c->close_pending = false;
    conn_close(c);
    return;
  }
  if (c->closing) return;
  if (err == HPE_OK && c->in_message) { /* the message goes on in the next read */
    count_gap(c, data + n);
    if (over_limit(c)) err = HPE_USER;
  }
  c->mark = NULL;
  if (err == HPE_PAUSED) {
    if (c->paused) { /* keep the rest for resume() */
      const char *at = llhttp_get_error_pos(&c->parser);
      size_t off = at && at >= data && at <= data + n ? (size_t)(at - data) : n;
      srv__buf_add(&c->pending_in, data + off, n - off);
      if (c->pending_in.oom) {
        conn_close(c);
        return;
      }
    }
    stop_reading(c);
  } else if (err == HPE_PAUSED_H2_UPGRADE) { /* the HTTP/2 connection preface */
    fail_request(c, 505, "HTTP/2 is not supported: use HTTP/1.1");
  } else if (err == HPE_PAUSED_UPGRADE) {
    c->no_more = true; /* upgrades are not supported: answer, then close */
    stop_reading(c);
  } else if (err != HPE_OK) {
    int status = c->error_status ? c->error_status : 400;
    const char *msg = c->error_msg     ? c->error_msg
                      : status == 413 ? "the request body is larger than --max-request-bytes"
                      : status == 431 ? "the request headers are too large"
                      : status == 503 ? "out of memory"
                                      : NULL;
    char buf[160];
    if (!msg) {
      const char *why = llhttp_get_error_reason(&c->parser);
      snprintf(buf, sizeof buf, "malformed HTTP request: %s", why ? why : "invalid syntax");
      msg = buf;
    }
    fail_request(c, status, msg);
  }
  if (c->closing) return;
  maybe_end(c);
  update_timer(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  srv_conn_t *c = h->data;
  buf->base = c->srv->readbuf;
  buf->len = sizeof c->srv->readbuf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  srv_conn_t *c = st->data;
  if (c->closing || c->broken) return;
  if (nread < 0) {
    if (nread == UV_EOF && c->shutting_down && !c->shutdown_done) {
      c->eof = true; /* close once the last writes went out */
      uv_read_stop(st);
      c->reading = false;
      return;
    }
    /* EOF or an error: the client is gone (as nginx, an EOF while requests
     * run is a disconnect); what the engine still has is aborted */
    conn_close(c);
    return;
  }
  if (nread == 0) return;
  if (c->shutting_down || c->no_more) return; /* discarded */
  feed(c, buf->base, (size_t)nread);
}

static void on_timer(uv_timer_t *t) {
  srv_conn_t *c = t->data;
  timer_mode_t mode = c->tmode;
  c->tmode = T_NONE;
  if (mode == T_HEADERS || mode == T_BODY) {
    fail_request(c, 408,
                 mode == T_HEADERS ? "timed out waiting for the request headers"
                                   : "timed out waiting for the request body");
    maybe_end(c);
  } else if (mode != T_NONE) {
    conn_close(c); /* idle, or the end of a lingering close */
  }
}

/* ---- accepting ----------------------------------------------------------------- */

void srv__on_connection(uv_stream_t *server, int status) {
  srv_server_t *s = server->data;
  if (status < 0) return;
  srv_conn_t *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = s;
  if (uv_tcp_init(&s->loop, &c->tcp)) {
    free(c);
    return;
  }
  c->tcp.data = c;
  c->n_handles = 1;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) || uv_timer_init(&s->loop, &c->timer)) {
    uv_close((uv_handle_t *)&c->tcp, on_handle_close);
    return;
  }
  c->timer.data = c;
  c->n_handles = 2;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->n_conns++;
  uv_tcp_nodelay(&c->tcp, 1);
  llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
  c->parser.data = c;
  if (s->n_conns > s->cfg.max_connections) {
    fail_request(c, 503, "too many open connections");
    return;
  }
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
    conn_close(c);
    return;
  }
  c->reading = true;
  update_timer(c);
}
