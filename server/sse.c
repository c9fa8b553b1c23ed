/* Server-sent events: each event is "data: <json>\n\n"; the stream ends with
 * "data: [DONE]\n\n". Over HTTP/1.1 each event travels as one chunk of a
 * chunked body, so the connection can be kept alive after the stream. */
#include "server/internal.h"

static void frame(srv_buf_t *out, const char *payload, size_t n, bool chunked) {
  static const char pre[] = "data: ", post[] = "\n\n";
  if (chunked) srv__buf_printf(out, "%zx\r\n", sizeof pre - 1 + n + sizeof post - 1);
  srv__buf_add(out, pre, sizeof pre - 1);
  srv__buf_add(out, payload, n);
  srv__buf_add(out, post, sizeof post - 1);
  if (chunked) srv__buf_add(out, "\r\n", 2);
}

void srv__sse_data(srv_buf_t *out, const char *json, size_t n, bool chunked) {
  frame(out, json, n, chunked);
}

void srv__sse_done(srv_buf_t *out, bool chunked) {
  frame(out, "[DONE]", 6, chunked);
  if (chunked) srv__buf_add(out, "0\r\n\r\n", 5);
}
