/* Errors in the OpenAI shape:
 *   {"error":{"message":"...","type":"invalid_request_error","param":"temperature","code":null}} */
#include <stdio.h>
#include <string.h>

#include "server/internal.h"

static const char *type_of(int status) {
  switch (status) {
  case 401: return "authentication_error";
  case 404: return "not_found_error";
  case 429: return "rate_limit_error";
  case 503: return "service_unavailable_error";
  case 505: return "invalid_request_error"; /* the client's protocol version */
  default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

int srv__error(srv_error_t *e, int status, const char *param, const char *fmt, ...) {
  e->status = status;
  e->type = type_of(status);
  e->code = NULL;
  snprintf(e->param, sizeof e->param, "%s", param ? param : "");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  return -1;
}

void srv__error_json(srv_buf_t *b, const srv_error_t *e) {
  srv__buf_adds(b, "{\"error\":{\"message\":");
  srv__json_cstr(b, e->message);
  srv__buf_adds(b, ",\"type\":");
  srv__json_cstr(b, e->type ? e->type : type_of(e->status));
  srv__buf_adds(b, ",\"param\":");
  srv__json_cstr(b, e->param[0] ? e->param : NULL);
  srv__buf_adds(b, ",\"code\":");
  if (e->code) srv__json_cstr(b, e->code);
  else srv__buf_printf(b, "%d", e->status);
  srv__buf_adds(b, "}}");
}

const char *srv__status_text(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 411: return "Length Required";
  case 413: return "Payload Too Large";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  case 505: return "HTTP Version Not Supported";
  default: return "Unknown";
  }
}
