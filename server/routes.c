/* The routing table: exact paths (query string ignored, an absolute-form
 * target routed by its path), one method each;
 * an unknown path is a 404, a known path with another method a 405 that
 * lists the allowed method. /v1 and below need the API key when one is set;
 * /metrics, /health, /ready and /version too with metrics_require_key. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "server/handlers.h"
#include "server/internal.h"

static const srv_route_t routes[] = {
    {"/v1/completions", HTTP_POST, srv__h_completions},
    {"/v1/chat/completions", HTTP_POST, srv__h_chat},
    {"/v1/models", HTTP_GET, srv__h_models},
    {"/health", HTTP_GET, srv__h_health},
    {"/ready", HTTP_GET, srv__h_ready},
    {"/version", HTTP_GET, srv__h_version},
    {"/metrics", HTTP_GET, srv__h_metrics},
    {"/tokenize", HTTP_POST, srv__h_tokenize},
    {"/detokenize", HTTP_POST, srv__h_detokenize},
};

int srv__route_find(const char *path, size_t len, int method, const srv_route_t **out,
                    const char **allow) {
  bool known = false;
  *out = NULL;
  for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
    const srv_route_t *r = &routes[i];
    if (strlen(r->path) != len || memcmp(r->path, path, len) != 0) continue;
    /* HEAD is GET without the body */
    if (r->method == method || (method == HTTP_HEAD && r->method == HTTP_GET)) {
      *out = r;
      return 200;
    }
    known = true;
    if (allow) *allow = llhttp_method_name((llhttp_method_t)r->method);
  }
  return known ? 405 : 404;
}

const char *srv__target_path(const char *target, size_t *len) {
  const char *p = target;
  if (strncasecmp(p, "http://", 7) == 0) p += 7;
  else if (strncasecmp(p, "https://", 8) == 0) p += 8;
  else p = NULL;
  if (p) p += strcspn(p, "/?#"); /* past the authority */
  else p = target;
  *len = strcspn(p, "?#");
  return p;
}

bool srv__route_needs_auth(const char *path, size_t len) {
  return len >= 3 && memcmp(path, "/v1", 3) == 0 && (len == 3 || path[3] == '/');
}

/* The operational routes, public unless --metrics-require-key. */
static bool is_ops_route(const char *path, size_t len) {
  static const char *const ops[] = {"/metrics", "/health", "/ready", "/version"};
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
    if (strlen(ops[i]) == len && !memcmp(ops[i], path, len)) return true;
  return false;
}

void srv__dispatch(srv_req_t *req) {
  srv_server_t *s = req->srv;
  srv_error_t e;
  s->metrics.http_requests++;
  size_t len;
  const char *url = srv__target_path(req->url.p ? req->url.p : "", &len);
  if (s->draining) req->keep_alive = false; /* the connection closes after this answer */
  bool auth = srv__route_needs_auth(url, len) || (s->cfg.metrics_require_key && is_ops_route(url, len));
  if (auth && !srv__auth_ok(req->auth.p, req->auth.len, s->keys, s->n_keys)) {
    srv__error(&e, 401, NULL, "Incorrect or missing API key (Authorization: Bearer <key>)");
    e.code = "invalid_api_key";
    srv__respond_error(req, &e);
    return;
  }
  const srv_route_t *r;
  const char *allow = NULL;
  int st = srv__route_find(url, len, req->method, &r, &allow);
  if (st == 404) {
    srv_buf_t b;
    srv__buf_init(&b);
    srv__json_str(&b, url, len < 200 ? len : 200);
    srv__error(&e, 404, NULL, "no route %s %s", llhttp_method_name((llhttp_method_t)req->method),
               b.p ? b.p : "");
    srv__buf_free(&b);
    srv__respond_error(req, &e);
    return;
  }
  if (st == 405) {
    char hdr[64];
    srv_buf_t b;
    srv__error(&e, 405, NULL, "method %s is not allowed here; use %s",
               llhttp_method_name((llhttp_method_t)req->method), allow ? allow : "another");
    snprintf(hdr, sizeof hdr, "Allow: %s\r\n", allow ? allow : "GET");
    srv__buf_init(&b);
    srv__error_json(&b, &e);
    srv__respond(req, 405, "application/json", b.p, b.len, hdr);
    srv__buf_free(&b);
    return;
  }
  r->fn(req);
}
