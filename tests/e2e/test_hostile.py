"""Malformed and hostile requests against one running `pressd serve`.

Each case is data: a category, a name, the exact bytes to send (or a small
action for what one write cannot express) and the expected outcome:
  - a status (or a list of statuses, in order, for pipelined requests), with
    close=True when the server must then close the connection;
  - CLOSE: the server closes the connection within a bounded time, with or
    without an error response first.
Every response is read with a timeout from a raw socket; a reset or EOF is a
close. Error bodies must be OpenAI-shaped JSON (valid UTF-8) that names no
file path or internal state; a response after which the server closes says
"Connection: close"; a keep-alive connection left after a case must still
answer the next request. After EVERY case a normal small completion on a new
connection must succeed with 200.

The server runs with small limits (--max-request-bytes 256K,
--max-connections 64, --request-timeout 3, --idle-timeout 5; headers have
the fixed 10 s and 16 KiB) and an API key. Exit 1 on any failure, 77 (skip)
when the model is missing. Environment: PRESSD_BIN, PRESSD_MODEL.
"""
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

BIN = os.environ.get("PRESSD_BIN", "build/pressd")
MODEL = os.environ.get("PRESSD_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
KEY = "hostile-key"
NAME = "m"
MAX_BODY = 256 * 1024    # --max-request-bytes
MAX_HEADER = 16 * 1024   # the server's bound on the request line and headers
MAX_CONN = 64            # --max-connections
BODY_TIMEOUT = 3         # --request-timeout
IDLE_TIMEOUT = 5         # --idle-timeout
HEADER_TIMEOUT = 10      # fixed in the server
CLOSE = "close"
CLOSE_WAIT = 2.5         # seconds a connection that must close may take (< IDLE_TIMEOUT)
# What an error body must never contain: paths, source locations, pointers.
LEAKS = (b"/work/", b"/home/", b"/tmp/", b"/usr/", b".gguf", b".c:", b"(null)", b"0x",
         b"segfault", b"assert")

PORT = None
SERVER = None


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


# ---- raw HTTP -------------------------------------------------------------------


class Closed(Exception):
    pass


class Timeout(Exception):
    pass


class Resp:
    def __init__(self, status, head, body, interim):
        self.status, self.head, self.body, self.interim = status, head, body, interim
        self.headers = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            self.headers.setdefault(k.strip().lower().decode("latin-1"), v.strip().decode("latin-1"))

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Conn:
    def __init__(self, port=None):
        self.s = socket.create_connection(("127.0.0.1", port or PORT), timeout=10)
        self.buf = b""
        self.eof = False

    def send(self, data):
        """False when the server closed or reset first (it may answer and stop reading)."""
        try:
            self.s.settimeout(10)
            self.s.sendall(data)
            return True
        except OSError:
            return False

    def send_background(self, data):
        """Sends from a thread on a duplicate of the socket (its own timeout), so
        that a large request does not keep the answer from being read."""
        dup = self.s.dup()

        def run():
            try:
                dup.settimeout(15)
                dup.sendall(data)
            except OSError:
                pass
            finally:
                dup.close()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def _more(self, deadline):
        if self.eof:
            raise Closed()
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        self.s.settimeout(left)
        try:
            d = self.s.recv(1 << 16)
        except socket.timeout:
            raise Timeout() from None
        except OSError:
            d = b""
        if not d:
            self.eof = True
            raise Closed()
        self.buf += d

    def response(self, timeout, head=False):
        """One final response (1xx are collected in .interim)."""
        deadline = time.monotonic() + timeout
        interim = []
        while True:
            while b"\r\n\r\n" not in self.buf:
                self._more(deadline)
            hl, _, self.buf = self.buf.partition(b"\r\n\r\n")
            m = re.match(rb"HTTP/1\.1 (\d{3}) [^\r\n]*(\r\n|$)", hl)
            if not m:
                raise Fail(f"malformed response head: {hl[:200]!r}")
            status = int(m.group(1))
            if status >= 200:
                break
            interim.append(status)
        r = Resp(status, hl, b"", interim)
        if head:
            return r
        if r.header("content-length") is not None:
            n = int(r.header("content-length"))
            while len(self.buf) < n:
                self._more(deadline)
            r.body, self.buf = self.buf[:n], self.buf[n:]
        elif "chunked" in (r.header("transfer-encoding") or ""):
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._more(deadline)
                line, _, rest = self.buf.partition(b"\r\n")
                n = int(line, 16)
                while len(rest) < n + 2:
                    self._more(deadline)
                    line, _, rest = self.buf.partition(b"\r\n")
                check(rest[n:n + 2] == b"\r\n", "bad chunk framing in the response")
                body += rest[:n]
                self.buf = rest[n + 2:]
                if n == 0:
                    break
            r.body = body
        else:  # until EOF
            try:
                while True:
                    self._more(deadline)
            except Closed:
                pass
            r.body, self.buf = self.buf, b""
        return r

    def wait_close(self, timeout):
        """Reads until EOF; returns the bytes that came first. Raises Timeout."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._more(deadline)
        except Closed:
            return self.buf

    def reset(self):
        """Abortive close: RST instead of FIN."""
        try:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.s.close()

    def close(self):
        self.s.close()


def enc(x):
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    return json.dumps(x).encode()


def req(method, path, body=None, headers=(), version="1.1", auth=True, ctype=True, length=True):
    """Request bytes: Host, the API key, Content-Type and Content-Length unless told not."""
    h = [f"{method} {path} HTTP/{version}".encode(), b"Host: localhost"]
    if auth:
        h.append(f"Authorization: Bearer {KEY}".encode())
    if body is not None:
        body = enc(body)
        if ctype:
            h.append(b"Content-Type: application/json")
        if length:
            h.append(b"Content-Length: %d" % len(body))
    h += [enc(x) for x in headers]
    return b"\r\n".join(h) + b"\r\n\r\n" + (body or b"")


BASE = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
DROP = object()


def jbody(base, fields=None, raw=None):
    """base with fields merged (DROP removes a key), then raw (bytes: a JSON
    member json.dumps cannot write, e.g. NaN or invalid UTF-8) appended."""
    d = dict(base)
    for k, v in (fields or {}).items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    s = json.dumps(d).encode()
    if raw is not None:
        s = s[:-1] + (b", " if d else b"") + enc(raw) + b"}"
    return s


def cmpl(fields=None, raw=None, **kw):
    return req("POST", "/v1/completions", jbody(BASE, fields, raw), **kw)


def chat(fields=None, raw=None, **kw):
    return req("POST", "/v1/chat/completions", jbody(CHAT, fields, raw), **kw)


def get(path, **kw):
    return req("GET", path, **kw)


def chunked(body, size=7, ext=b""):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
    return out + b"0\r\n\r\n"


def chunked_head(path, extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n%s\r\n"
            % (path.encode(), KEY.encode(), extra))


# ---- checks on responses --------------------------------------------------------


def check_error_body(r):
    if r.status < 400 or not r.body:
        return
    try:
        err = r.json()["error"]
    except Exception as e:  # noqa: BLE001 - any shape problem is the failure
        raise Fail(f"{r.status} body is not an OpenAI error: {type(e).__name__} {r.body[:200]!r}")
    check(isinstance(err.get("message"), str) and err["message"], f"no message: {r.body[:200]!r}")
    check(isinstance(err.get("type"), str) and "code" in err and "param" in err,
          f"error fields: {r.body[:200]!r}")
    low = r.body.lower()
    for pat in LEAKS:
        check(pat not in low, f"error body leaks {pat!r}: {r.body[:300]!r}")


def param(name):
    def f(rs):
        p = rs[0].json()["error"]["param"]
        check(p == name, f"param {p!r}, expected {name!r}")
    return f


def allow(method):
    def f(rs):
        check(rs[0].header("allow") == method, f"Allow: {rs[0].header('allow')!r}, expected {method}")
    return f


def body_has(*subs):
    def f(rs):
        for s in subs:
            check(s in rs[-1].body, f"{s!r} not in {rs[-1].body[:300]!r}")
    return f


def completion_ok(rs):
    for r in rs:
        j = r.json()
        check(j.get("object") == "text_completion" and j["choices"], f"not a completion: {r.body[:200]!r}")


def keep_alive(rs):
    check(rs[-1].header("connection") == "keep-alive", f"Connection: {rs[-1].header('connection')}")


def metric(name):
    c = Conn()
    c.send(get("/metrics"))
    r = c.response(10)
    c.close()
    for line in r.body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise Fail(f"no metric {name}")


def wait_idle_engine(seconds=15):
    """The engine lets go of aborted requests: nothing running or waiting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if metric("vllm:num_requests_running") == 0 and metric("vllm:num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    raise Fail("requests of a gone client still run in the engine")


# ---- the table ------------------------------------------------------------------

CASES = []


def case(cat, name, send, expect=None, close=False, check=None, head=(), bound=10.0, reuse=True):
    """send: bytes, a list of byte strings (sent as separate reads), or an
    action (no arguments; raises Fail) when expect is None."""
    CASES.append(dict(cat=cat, name=name, send=send, expect=expect, close=close, check=check,
                      head=set(head), bound=bound, reuse=reuse))


def action(cat, name):
    def deco(fn):
        case(cat, name, fn)
        return fn
    return deco


# --- JSON syntax -----------------------------------------------------------------
J = "json"
case(J, "truncated object", req("POST", "/v1/completions", b'{"model":"m","prompt":"Hi","max_tokens":2'), 400)
case(J, "truncated inside a string", req("POST", "/v1/completions", b'{"prompt":"Hi'), 400)
case(J, "truncated after a key", req("POST", "/v1/completions", b'{"prompt"'), 400)
case(J, "trailing garbage", req("POST", "/v1/completions", jbody(BASE) + b" xyz"), 400)
case(J, "two objects", req("POST", "/v1/completions", jbody(BASE) + jbody(BASE)), 400)
case(J, "top-level array", req("POST", "/v1/completions", b"[" + jbody(BASE) + b"]"), 400)
case(J, "top-level string", req("POST", "/v1/completions", b'"Hi"'), 400)
case(J, "top-level number", req("POST", "/v1/completions", b"42"), 400)
case(J, "top-level null", req("POST", "/v1/completions", b"null"), 400)
case(J, "top-level true", req("POST", "/v1/chat/completions", b"true"), 400)
case(J, "empty object", req("POST", "/v1/completions", b"{}"), 400, check=param("prompt"))
case(J, "single quotes", req("POST", "/v1/completions", b"{'prompt':'Hi'}"), 400)
case(J, "unquoted key", req("POST", "/v1/completions", b'{prompt:"Hi"}'), 400)
case(J, "trailing comma", req("POST", "/v1/completions", b'{"prompt":"Hi",}'), 400)
case(J, "comment", req("POST", "/v1/completions", b'{"prompt":"Hi" /* c */}'), 400)
# RFC 8259 leaves duplicate names to the implementation; cJSON uses the first,
# and either value makes a valid request.
case(J, "duplicate keys", req("POST", "/v1/completions",
                               b'{"model":"m","prompt":"Hi","prompt":"Yo","max_tokens":2}'), 200)
case(J, "NaN literal", cmpl(raw=b'"temperature": NaN'), 400)
case(J, "Infinity literal", cmpl(raw=b'"temperature": Infinity'), 400)
case(J, "-Infinity literal", cmpl({"top_p": DROP}, raw=b'"top_p": -Infinity'), 400)
case(J, "1e400 temperature", cmpl(raw=b'"temperature": 1e400'), 400, check=param("temperature"))
case(J, "1e400 max_tokens", cmpl({"max_tokens": DROP}, raw=b'"max_tokens": 1e400'), 400,
     check=param("max_tokens"))
case(J, "-1e400 top_p", cmpl(raw=b'"top_p": -1e400'), 400, check=param("top_p"))
case(J, "1e400 token id", cmpl({"prompt": DROP}, raw=b'"prompt": [1e400]'), 400, check=param("prompt"))
# -0 equals 0: a valid (greedy) temperature.
case(J, "-0 temperature", cmpl(raw=b'"temperature": -0'), 200, check=completion_ok)
case(J, "-0 max_tokens", cmpl({"max_tokens": DROP}, raw=b'"max_tokens": -0'), 400,
     check=param("max_tokens"))
case(J, "number as string (max_tokens)", cmpl({"max_tokens": "2"}), 400, check=param("max_tokens"))
case(J, "number as string (temperature)", cmpl({"temperature": "0.5"}), 400,
     check=param("temperature"))
case(J, "100000 nested arrays", req("POST", "/v1/completions", b"[" * 100000), 400)
case(J, "50000 nested objects", req("POST", "/v1/completions", b'{"a":' * 50000), 400)
case(J, "prompt nested 900 deep", cmpl({"prompt": DROP}, raw=b'"prompt": ' + b"[" * 900 + b"]" * 900),
     400, check=param("prompt"))
case(J, "lone surrogate escape", cmpl({"prompt": DROP}, raw=b'"prompt": "\\ud800"'), 400)
case(J, "NUL escape in model", cmpl({"model": DROP}, raw=b'"model": "m\\u0000x"'), 400)
case(J, "NUL escape in prompt", cmpl({"prompt": DROP}, raw=b'"prompt": "Hi\\u0000there"'), 400)
case(J, "raw NUL byte in prompt", cmpl({"prompt": DROP}, raw=b'"prompt": "Hi\x00there"'), 400)
# An escaped backslash before "u0000" is text, not a NUL.
case(J, "escaped backslash before u0000", cmpl({"prompt": "a\\u0000b"}), 200, check=completion_ok)
# RFC 8259 lets a parser ignore a byte order mark.
case(J, "UTF-8 BOM", req("POST", "/v1/completions", b"\xef\xbb\xbf" + jbody(BASE)), 200)

# --- wrong types and values, field by field --------------------------------------
T = "types"
for label, fields, status, par in [
    ("model number", {"model": 5}, 400, "model"),
    ("model array", {"model": ["m"]}, 400, "model"),
    ("model unknown", {"model": "gpt-4"}, 404, "model"),
    ("model empty", {"model": ""}, 404, "model"),
    ("prompt missing", {"prompt": DROP}, 400, "prompt"),
    ("prompt number", {"prompt": 5}, 400, "prompt"),
    ("prompt bool", {"prompt": True}, 400, "prompt"),
    ("prompt object", {"prompt": {"text": "Hi"}}, 400, "prompt"),
    ("prompt empty array", {"prompt": []}, 400, "prompt"),
    ("prompt empty nested array", {"prompt": [[]]}, 400, "prompt"),
    ("prompt fractional token", {"prompt": [1.5]}, 400, "prompt"),
    ("prompt negative token", {"prompt": [-1]}, 400, "prompt"),
    ("prompt token past the vocabulary", {"prompt": [49152]}, 400, "prompt"),
    ("prompt batch of strings", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt batch of token lists", {"prompt": [[1, 2], [3]]}, 400, "prompt"),
    ("prompt [true]", {"prompt": [True]}, 400, "prompt"),
    ("prompt empty string", {"prompt": ""}, 400, "prompt"),
    ("prompt past the context", {"prompt": "hi " * 3000}, 400, "prompt"),
    ("prompt 20000 token ids", {"prompt": [1] * 20000}, 400, "prompt"),
    ("max_tokens negative", {"max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens fractional", {"max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens bool", {"max_tokens": True}, 400, "max_tokens"),
    ("max_tokens 2^31", {"max_tokens": 2 ** 31}, 400, "max_tokens"),
    ("max_tokens past the context", {"max_tokens": 4096}, 400, "max_tokens"),
    ("max_tokens array", {"max_tokens": [2]}, 400, "max_tokens"),
    ("temperature negative", {"temperature": -1}, 400, "temperature"),
    ("temperature huge", {"temperature": 1e7}, 400, "temperature"),
    ("temperature bool", {"temperature": True}, 400, "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "top_p"),
    ("top_p above 1", {"top_p": 1.5}, 400, "top_p"),
    ("top_p string", {"top_p": "1"}, 400, "top_p"),
    ("n two", {"n": 2}, 400, "n"),
    ("n zero", {"n": 0}, 400, "n"),
    ("n string", {"n": "1"}, 400, "n"),
    ("stop number", {"stop": 1}, 400, "stop"),
    ("stop array of numbers", {"stop": [1]}, 400, "stop"),
    ("stop object", {"stop": {"a": 1}}, 400, "stop"),
    ("stop [null]", {"stop": [None]}, 400, "stop"),
    ("stop 65 strings", {"stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    ("stop 10000 strings", {"stop": [f"s{i}" for i in range(10000)]}, 400, "stop"),
    ("stop string of 200 KB", {"stop": "x" * 200000}, 400, "stop"),
    ("stream string", {"stream": "yes"}, 400, "stream"),
    ("stream number", {"stream": 1}, 400, "stream"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("stream_options number", {"stream": True, "stream_options": 1}, 400, "stream_options"),
    ("include_usage string", {"stream": True, "stream_options": {"include_usage": "y"}}, 400,
     "stream_options"),
    ("logprobs bool (completions)", {"logprobs": True}, 400, "logprobs"),
    ("logprobs negative", {"logprobs": -1}, 400, "logprobs"),
    ("logprobs 21", {"logprobs": 21}, 400, "logprobs"),
    ("logprobs string", {"logprobs": "1"}, 400, "logprobs"),
    ("echo with logprobs", {"echo": True, "logprobs": 1}, 400, "echo"),
    ("echo string", {"echo": "yes"}, 400, "echo"),
    ("seed 1e19", {"seed": 1e19}, 400, "seed"),
    ("top_k string", {"top_k": "5"}, 400, "top_k"),
    ("top_k -2", {"top_k": -2}, 400, "top_k"),
    ("min_p 2", {"min_p": 2}, 400, "min_p"),
    ("presence_penalty 3", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty -3", {"frequency_penalty": -3}, 400, "frequency_penalty"),
    ("repetition_penalty 0", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("best_of 2", {"best_of": 2}, 400, "best_of"),
    ("suffix", {"suffix": "x"}, 400, "suffix"),
    ("user number", {"user": 1}, 400, "user"),
    ("ignore_eos string", {"ignore_eos": "yes"}, 400, "ignore_eos"),
    ("kv_compression string", {"kv_compression": "kvcompress"}, 400, "kv_compression"),
    ("kv_compression array", {"kv_compression": []}, 400, "kv_compression"),
    ("kv_compression unknown field", {"kv_compression": {"bogus": 1}}, 400, "kv_compression"),
    ("kv_compression.method unknown", {"kv_compression": {"method": "bogus"}}, 400,
     "kv_compression.method"),
    ("kv_compression.method number", {"kv_compression": {"method": 1}}, 400, "kv_compression.method"),
    ("kv_compression.method without budget", {"kv_compression": {"method": "kvcompress"}}, 400,
     "kv_compression.ratio"),
    ("kv_compression.ratio below 1", {"kv_compression": {"ratio": 0.5}}, 400, "kv_compression.ratio"),
    ("kv_compression.ratio string", {"kv_compression": {"ratio": "2"}}, 400, "kv_compression.ratio"),
    ("kv_compression.ratio negative", {"kv_compression": {"ratio": -1}}, 400, "kv_compression.ratio"),
    ("kv_compression.threshold 1", {"kv_compression": {"method": "dbudget", "threshold": 1}}, 400,
     "kv_compression.threshold"),
    ("kv_compression.sinks negative", {"kv_compression": {"ratio": 2, "sinks": -1}}, 400,
     "kv_compression.sinks"),
    ("kv_compression.interval fractional", {"kv_compression": {"ratio": 2, "interval": 1.5}}, 400,
     "kv_compression.interval"),
    ("kv_compression.max_cache_tokens 0", {"kv_compression": {"max_cache_tokens": 0}}, 400,
     "kv_compression.max_cache_tokens"),
    ("kv_compression.protected_window huge", {"kv_compression": {"ratio": 2, "protected_window": 10 ** 9}},
     400, "kv_compression.protected_window"),
    ("kv_compression.observation_window negative",
     {"kv_compression": {"ratio": 2, "observation_window": -5}}, 400, "kv_compression.observation_window"),
    ("kv_compression.layer_budget unknown", {"kv_compression": {"ratio": 2, "layer_budget": "diagonal"}},
     400, "kv_compression.layer_budget"),
    ("kv_compression.score bool", {"kv_compression": {"ratio": 2, "score": True}}, 400,
     "kv_compression.score"),
    ("kv_compression.criterion unknown", {"kv_compression": {"method": "dbudget",
                                                              "criterion": "entropy"}}, 400,
     "kv_compression.criterion"),
]:
    case(T, label, cmpl(fields), status, check=param(par))
case(T, "kv_compression.ratio 1e400", cmpl(raw=b'"kv_compression": {"ratio": 1e400}'), 400,
     check=param("kv_compression.ratio"))
case(T, "kv_compression valid (sanity)", cmpl({"kv_compression": {"method": "kvcompress", "ratio": 2}}),
     200, check=completion_ok)
for label, fields, status in [
    ("messages string", {"messages": "Hi"}, 400),
    ("messages missing", {"messages": DROP}, 400),
    ("messages empty", {"messages": []}, 400),
    ("messages [1]", {"messages": [1]}, 400),
    ("message without role", {"messages": [{"content": "Hi"}]}, 400),
    ("message role number", {"messages": [{"role": 1, "content": "Hi"}]}, 400),
    ("message role tool", {"messages": [{"role": "tool", "content": "Hi"}]}, 400),
    ("message content number", {"messages": [{"role": "user", "content": 1}]}, 400),
    ("message content part not an object", {"messages": [{"role": "user", "content": [1]}]}, 400),
    ("message content part image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400),
    ("message text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400),
    ("4097 messages", {"messages": [{"role": "user", "content": ""}] * 4097}, 400),
    ("chat logprobs number", {"logprobs": 1}, 400),
    ("chat top_logprobs without logprobs", {"top_logprobs": 2}, 400),
    ("chat top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, 400),
    ("chat max_completion_tokens string", {"max_completion_tokens": "2"}, 400),
]:
    case(T, label, chat(fields), status)

# --- UTF-8 -----------------------------------------------------------------------
U = "utf8"


def valid_json_completion(rs):
    j = rs[0].json()  # raises on invalid UTF-8
    check(j["choices"], "no choices")


# Invalid UTF-8 in a prompt is tokenised as U+FFFD (by design, like a lossy
# decode), never echoed back as invalid bytes.
case(U, "invalid UTF-8 in prompt", cmpl({"prompt": DROP, "echo": True},
                                        raw=b'"prompt": "\xff\xfe\xc0\xaf"'), 200,
     check=valid_json_completion)
case(U, "truncated UTF-8 in prompt", cmpl({"prompt": DROP}, raw=b'"prompt": "Hi \xe2\x82"'), 200,
     check=valid_json_completion)
case(U, "UTF-16 surrogate bytes in prompt", cmpl({"prompt": DROP}, raw=b'"prompt": "\xed\xa0\x80"'),
     200, check=valid_json_completion)
# A stop string of invalid UTF-8 can never match valid output text: harmless.
case(U, "invalid UTF-8 in stop", cmpl(raw=b'"stop": ["\xff\xfe", "\xc0\xaf"]'), 200,
     check=valid_json_completion)
case(U, "truncated UTF-8 in stop", cmpl(raw=b'"stop": "\xe2\x82"'), 200, check=valid_json_completion)
case(U, "invalid UTF-8 in chat content", chat({"messages": DROP},
                                              raw=b'"messages": [{"role": "user", "content": "\xff"}]'),
     200)
case(U, "invalid UTF-8 in model (echoed in the error)", cmpl({"model": DROP}, raw=b'"model": "\xff\xfe"'),
     404)
case(U, "invalid UTF-8 in a kv_compression key", cmpl(raw=b'"kv_compression": {"\xff\xfe": 1}'), 400)
case(U, "invalid UTF-8 in role", chat({"messages": DROP},
                                      raw=b'"messages": [{"role": "us\xffer", "content": "x"}]'), 400)

# --- sizes -----------------------------------------------------------------------
S = "size"


def padded(n):
    b = jbody(BASE)
    return b[:-1] + b" " * (n - len(b)) + b"}"


case(S, "body exactly at the limit", req("POST", "/v1/completions", padded(MAX_BODY)), 200)
case(S, "body one byte over the limit", req("POST", "/v1/completions", padded(MAX_BODY + 1)), 413,
     close=True)
case(S, "megabyte stop string", cmpl({"stop": "x" * (1 << 20)}), 413, close=True)
case(S, "megabyte of whitespace", req("POST", "/v1/completions", b" " * (1 << 20)), 413, close=True)
case(S, "huge Content-Length, no body", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 1099511627776\r\n\r\n", 413, close=True)
case(S, "Content-Length 2^64-1", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 18446744073709551615\r\n\r\n", 413, close=True)
case(S, "Content-Length overflow", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 99999999999999999999999\r\n\r\n", 400, close=True)
case(S, "Expect 100-continue with a too large body", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Expect: 100-continue\r\nContent-Length: 10000000\r\n\r\n", 413, close=True,
     check=lambda rs: check(not rs[0].interim, f"100 Continue before a 413: {rs[0].interim}"))
case(S, "64 stop strings of 1 KiB (the limits)", cmpl({"stop": [f"{i:04d}" + "x" * 1020 for i in range(64)]}),
     200, check=completion_ok)
case(S, "tokenize 200 KB of one letter", req("POST", "/tokenize", {"prompt": "a" * 200000}), 200)
case(S, "detokenize 40000 ids", req("POST", "/detokenize", {"tokens": [300] * 40000}), 200)

# --- framing: Content-Length, chunked --------------------------------------------
F = "framing"
case(F, "empty body", req("POST", "/v1/completions", b""), 400)
case(F, "POST without a body or length", req("POST", "/v1/completions"), 400)
# The server reads JSON whatever the Content-Type says (as vLLM's JSON routes do).
case(F, "no Content-Type", req("POST", "/v1/completions", BASE, ctype=False), 200, check=completion_ok)
case(F, "Content-Type text/plain", req("POST", "/v1/completions", BASE, ctype=False,
                                       headers=["Content-Type: text/plain"]), 200)
case(F, "negative Content-Length", b"POST /tokenize HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, close=True)
case(F, "Content-Length not a number", b"POST /tokenize HTTP/1.1\r\nContent-Length: ab\r\n\r\n", 400,
     close=True)
case(F, "Content-Length +2", b"POST /tokenize HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", 400, close=True)
# The first 10 bytes are the body (invalid JSON); the rest is not a request.
case(F, "Content-Length shorter than the body",
     req("POST", "/v1/completions", BASE, length=False, headers=["Content-Length: 10"]), [400, 400],
     close=True)
case(F, "Content-Length longer than the body (408)",
     req("POST", "/v1/completions", BASE, length=False, headers=["Content-Length: 500"]), 408,
     close=True, bound=BODY_TIMEOUT + 3)
case(F, "chunked body", chunked_head("/v1/completions") + chunked(jbody(BASE)), 200, check=completion_ok)
case(F, "chunked body with extensions", chunked_head("/v1/completions")
     + chunked(jbody(BASE), ext=b';name="va lue";x'), 200)
case(F, "chunked body with a trailer", chunked_head("/v1/completions")
     + chunked(jbody(BASE))[:-2] + b"X-Trailer: 1\r\n\r\n", 200)
case(F, "chunked size not hex", chunked_head("/tokenize") + b"zz\r\n{}\r\n0\r\n\r\n", 400, close=True)
# llhttp 8 skips the two bytes after a chunk's data unseen: the server checks them.
case(F, "chunk without CRLF after its data", chunked_head("/tokenize") + b"2\r\n{}XX0\r\n\r\n", 400,
     close=True)
case(F, "chunk's CRLF replaced, across reads",
     [chunked_head("/tokenize") + b"2\r\n{}", b"\r", b"X0\r\n\r\n"], 400, close=True)
case(F, "chunk's CRLF across reads",
     [chunked_head("/v1/completions") + b"%x\r\n%s\r" % (len(jbody(BASE)), jbody(BASE)), b"\n0\r\n\r\n"],
     200, check=completion_ok)
case(F, "chunk size overflow", chunked_head("/tokenize") + b"F" * 20 + b"\r\n{}", 400, close=True)
case(F, "chunk larger than the body limit", chunked_head("/tokenize") + b"FFFFFFFF\r\n{\"pro", 413,
     close=True)
case(F, "chunks over the body limit", chunked_head("/tokenize")
     + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 9, 413, close=True)
# Chunk extensions and leading zeros count toward the body limit (unbounded otherwise).
case(F, "megabyte chunk extension", chunked_head("/tokenize") + b"2;" + b"a" * (1 << 20)
     + b"\r\n{}\r\n0\r\n\r\n", 413, close=True)
case(F, "megabyte of zeros in a chunk size", chunked_head("/tokenize") + b"0" * (1 << 20)
     + b"2\r\n{}\r\n0\r\n\r\n", 413, close=True)
case(F, "chunked body never terminated (408)", chunked_head("/tokenize") + b"2\r\n{}\r\n", 408, close=True,
     bound=BODY_TIMEOUT + 3)
case(F, "GET with a body", req("GET", "/health", b"abcde"), 200)

# --- smuggling -------------------------------------------------------------------
M = "smuggling"
case(M, "Content-Length and Transfer-Encoding", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400, close=True)
case(M, "Transfer-Encoding then Content-Length", b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n1\r\nZ\r\n0\r\n\r\n", 400, close=True)
case(M, "duplicate Content-Length, different", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 20\r\n\r\n{}GET /health HTTP/1.1\r\n\r\n", 400, close=True)
# Identical duplicates may be merged (RFC 9112 6.3); rejecting them is the safe choice.
case(M, "duplicate Content-Length, same", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 2\r\n\r\n{}", 400, close=True)
case(M, "Content-Length list", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}", 400,
     close=True)
case(M, "Transfer-Encoding gzip", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
     400, close=True)
case(M, "Transfer-Encoding chunked, gzip", b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400, close=True)
case(M, "Transfer-Encoding xchunked", b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400, close=True)
# obs-fold is refused (RFC 9112 5.2 allows 400 or unfolding; a proxy in front may not unfold).
case(M, "Transfer-Encoding obs-fold", b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400, close=True)
case(M, "obs-fold continuation line", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400,
     close=True)
case(M, "obs-fold by a tab", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n", 400, close=True)
case(M, "obs-fold of an empty value", b"GET /health HTTP/1.1\r\nX-A:\r\n b\r\n\r\n", 400, close=True)
case(M, "obs-fold of a blank line", b"GET /health HTTP/1.1\r\nX-A:\r\n   \r\n\r\n", 400, close=True)
case(M, "obs-fold across reads", [b"GET /health HTTP/1.1\r\nX-A: a\r\n", b" b\r\n\r\n"], 400, close=True)
case(M, "obs-fold of an empty value across reads", [b"GET /health HTTP/1.1\r\nX-A:\r\n", b"\tb\r\n\r\n"],
     400, close=True)
case(M, "empty value, then the next header in another read",
     [b"GET /health HTTP/1.1\r\nHost: x\r\nX-A:\r\n", b"X-B: 1\r\n\r\n"], 200)
case(M, "a value split across reads", [b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a b", b" c\r\n\r\n"], 200)
case(M, "bare LF line ends", b"GET /health HTTP/1.1\nHost: x\n\n", 400, close=True)
case(M, "bare LF after a header", b"GET /health HTTP/1.1\r\nHost: x\n\r\n", 400, close=True)
case(M, "bare CR", b"GET /health HTTP/1.1\rHost: x\r\n\r\n", 400, close=True)
case(M, "space before colon", b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400, close=True)
case(M, "space before colon in Transfer-Encoding", b"POST /tokenize HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, close=True)
case(M, "space inside a header name", b"GET /health HTTP/1.1\r\nX Y: z\r\n\r\n", 400, close=True)
case(M, "header line without a colon", b"GET /health HTTP/1.1\r\nX-NoColon\r\n\r\n", 400, close=True)
case(M, "CL.TE smuggled prefix", b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED", 400, close=True)
case(M, "garbage after a valid request", get("/health") + b"GPOST / HTTP/1.1\r\n\r\n", [200, 400], close=True)
case(M, "NUL in a header value", b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400, close=True)
case(M, "NUL in a header name", b"GET /health HTTP/1.1\r\nX\x00A: b\r\n\r\n", 400, close=True)
case(M, "NUL in the path", b"GET /hea\x00lth HTTP/1.1\r\n\r\n", 400, close=True)
case(M, "control byte in a header value", b"GET /health HTTP/1.1\r\nX-A: a\x01b\r\n\r\n", 400, close=True)
case(M, "DEL in a header value", b"GET /health HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n", 400, close=True)
# obs-text (bytes >= 0x80) is allowed in field values by RFC 9110 5.5.
case(M, "high bytes in a header value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\xffb\r\n\r\n", 200)
# Authorization split over two header lines must not authenticate.
case(M, "Authorization split over two headers", req("POST", "/v1/completions", BASE, auth=False,
                                                       headers=["Authorization: Bear",
                                                                f"Authorization: er {KEY}"]), 400,
     close=True)
# A trailer is not a header: credentials in it are ignored.
case(M, "Authorization only in a chunked trailer",
     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + chunked(jbody(BASE))[:-2] + f"Authorization: Bearer {KEY}\r\n\r\n".encode(), 401)

# --- headers ---------------------------------------------------------------------
H = "headers"
case(H, "2000 headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
     + b"\r\n", 431, close=True)
case(H, "one 20 KB header", b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, close=True)
case(H, "headers one byte past the limit", b"GET /health HTTP/1.1\r\nX-Big: "
     + b"a" * (MAX_HEADER - len(b"GET /health HTTP/1.1\r\nX-Big: ") + 1) + b"\r\n\r\n", 431, close=True)
case(H, "one header padded with 100 KB of spaces", b"GET /health HTTP/1.1\r\nX-Big: " + b" " * 100000
     + b"v\r\n\r\n", 431, close=True)
case(H, "header of 100 KB of trailing spaces", b"GET /health HTTP/1.1\r\nX-Big: v" + b" " * 100000
     + b"\r\n\r\n", 431, close=True)
case(H, "empty header value padded with 100 KB of spaces", b"GET /health HTTP/1.1\r\nX-Big:" + b" " * 100000
     + b"\r\nX-Next: 1\r\n\r\n", 431, close=True)
case(H, "request line padded with 100 KB of spaces", b"GET" + b" " * 100000 + b"/health HTTP/1.1\r\n\r\n",
     431, close=True)
case(H, "400 small headers (under the limit)", b"GET /health HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(400)) + b"\r\n", 200)
case(H, "empty header value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Empty:\r\n\r\n", 200)
case(H, "no API key", req("POST", "/v1/completions", BASE, auth=False), 401)
case(H, "wrong API key", req("POST", "/v1/completions", BASE, auth=False,
                             headers=["Authorization: Bearer wrong"]), 401)
case(H, "API key with trailing junk", req("POST", "/v1/completions", BASE, auth=False,
                                          headers=[f"Authorization: Bearer {KEY}x"]), 401)
case(H, "Basic instead of Bearer", req("POST", "/v1/completions", BASE, auth=False,
                                       headers=["Authorization: Basic aG9zdGlsZS1rZXk="]), 401)
case(H, "Bearer without a key", req("POST", "/v1/completions", BASE, auth=False,
                                    headers=["Authorization: Bearer"]), 401)
case(H, "API key in the query string", req("POST", f"/v1/completions?api_key={KEY}", BASE, auth=False), 401)
# The scheme is case-insensitive (RFC 9110 11.1).
case(H, "lower-case bearer", req("POST", "/v1/completions", BASE, auth=False,
                                 headers=[f"Authorization: bearer {KEY}"]), 200)
# RFC 9110 10.1.1: a server MAY answer 417 to an unknown expectation; it may also ignore it.
case(H, "Expect: bogus", req("GET", "/health", headers=["Expect: bogus"]), 200)
case(H, "Expect 100-continue, body sent at once", req("POST", "/v1/completions", BASE,
                                                      headers=["Expect: 100-continue"]), 200,
     check=lambda rs: check(rs[0].interim in ([], [100]), f"interim {rs[0].interim}"))

# --- methods, routes, URLs, versions ---------------------------------------------
R = "routes"
case(R, "unknown method", b"FOO /health HTTP/1.1\r\n\r\n", 400, close=True)
case(R, "lower-case method", b"get /health HTTP/1.1\r\n\r\n", 400, close=True)
case(R, "method of 10000 letters", b"G" * 10000 + b" /health HTTP/1.1\r\n\r\n", 400, close=True)
case(R, "NUL in the method", b"GE\x00T /health HTTP/1.1\r\n\r\n", 400, close=True)
case(R, "PROPFIND /health", req("PROPFIND", "/health"), 405, check=allow("GET"))
case(R, "DELETE /v1/completions", req("DELETE", "/v1/completions"), 405, check=allow("POST"))
case(R, "GET /v1/chat/completions", req("GET", "/v1/chat/completions"), 405, check=allow("POST"))
case(R, "PUT /v1/completions with a body", req("PUT", "/v1/completions", BASE), 405, check=allow("POST"))
case(R, "POST /health", req("POST", "/health", b"{}"), 405, check=allow("GET"))
case(R, "HEAD /health", req("HEAD", "/health"), 200, head=[0])
case(R, "HEAD /v1/completions then GET", req("HEAD", "/v1/completions") + get("/health"), [405, 200],
     head=[0])
# CONNECT switches protocols in llhttp: answered, then the connection closes.
case(R, "CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 404, close=True)
# Upgrade is not supported: the request is answered and the connection closes
# (what follows an upgrade request is not HTTP/1.1).
case(R, "Upgrade: websocket", req("GET", "/health", headers=["Connection: Upgrade", "Upgrade: websocket"])
     + get("/health"), 200, close=True)
case(R, "HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, close=True)
case(R, "HTTP/2.0 request line", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505, close=True)
case(R, "HTTP/1.1 without Host", b"GET /health HTTP/1.1\r\n\r\n", 400, close=True)
case(R, "two Host headers", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, close=True)
case(R, "OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404)
case(R, "unknown route", get("/nope"), 404)
case(R, "/v1 alone", get("/v1"), 404)
case(R, "trailing slash", req("POST", "/v1/completions/", BASE), 404)
case(R, "double slash", req("POST", "//v1/completions", BASE), 404)
case(R, "upper-case path", req("POST", "/V1/COMPLETIONS", BASE), 404)
# Paths are matched as sent: no dot-segment or percent-decoding, so nothing escapes.
case(R, "dot segments", get("/v1/../health"), 404)
case(R, "path traversal", get("/../../../../etc/passwd"), 404,
     check=lambda rs: check(b"root:" not in rs[0].body, "file content in the answer"))
case(R, "percent-encoded NUL", get("/health%00"), 404)
case(R, "query string", get("/health?x=1&y"), 200)
case(R, "high bytes in the path", b"GET /h\xffealth HTTP/1.1\r\nHost: x\r\n\r\n", 404)
# RFC 9112 3.2.2: a server MUST accept the absolute form.
case(R, "absolute-form target", req("POST", f"http://localhost:{0}/v1/completions", BASE), 200)
case(R, "absolute-form target without a path", get("http://localhost"), 404)
case(R, "URL of 10 KB", get("/" + "a" * 10000), 404)
# The request line counts toward the 16 KiB header limit: 431 rather than 414.
case(R, "URL of 20 KB", get("/" + "a" * 20000), 431, close=True)
case(R, "HTTP/3.0", b"GET /health HTTP/3.0\r\n\r\n", 400, close=True)
# Other protocols on the port: an error or a plain close, never a hang.
case(R, "TLS ClientHello", bytes.fromhex("160301009a0100009603035f") + bytes(range(140)), CLOSE)
case(R, "SSH banner", b"SSH-2.0-OpenSSH_9.2p1\r\n", CLOSE)
case(R, "64 KB of random bytes", random.Random(7).randbytes(1 << 16), CLOSE)
case(R, "empty lines, then garbage", b"\r\n" * 1000 + b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", CLOSE)
case(R, "HTTP/1.2", b"GET /health HTTP/1.2\r\n\r\n", 400, close=True)
case(R, "lower-case http version", b"GET /health http/1.1\r\n\r\n", 400, close=True)
case(R, "tab between method and path", b"GET\t/health HTTP/1.1\r\n\r\n", 400, close=True)
# A request line without a version is HTTP/0.9 to llhttp: not supported.
case(R, "request line without a version", b"GET /health\r\n\r\n", 505, close=True)

# --- HTTP/1.0 and Connection -----------------------------------------------------
V = "http10"
case(V, "HTTP/1.0 GET", req("GET", "/health", version="1.0"), 200, close=True)
case(V, "HTTP/1.0 completion", req("POST", "/v1/completions", BASE, version="1.0"), 200, close=True,
     check=completion_ok)
case(V, "HTTP/1.0 keep-alive, two requests", req("GET", "/health", version="1.0",
                                                 headers=["Connection: keep-alive"]) * 2, [200, 200],
     check=keep_alive)
case(V, "HTTP/1.0 streaming completion (ends with EOF)",
     req("POST", "/v1/completions", dict(BASE, stream=True), version="1.0"), 200, close=True,
     check=body_has(b"data: [DONE]\n\n"))
case(V, "HTTP/1.0 chunked body", b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer "
     + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(jbody(BASE)), 200, close=True)
case(V, "Connection: close", req("GET", "/health", headers=["Connection: close"]) + get("/health"), 200,
     close=True)

# --- pipelining ------------------------------------------------------------------


def in_order(rs):
    check(rs[0].body == b"{}", f"1st: {rs[0].body[:100]!r}")
    check(b'"version"' in rs[1].body, f"2nd: {rs[1].body[:100]!r}")
    check(b'"object":"list"' in rs[2].body, f"3rd: {rs[2].body[:100]!r}")
    completion_ok(rs[3:4])
    check(b"no route" in rs[4].body, f"5th: {rs[4].body[:100]!r}")


P = "pipelining"
case(P, "five mixed requests in one write", get("/health") + get("/version") + get("/v1/models")
     + cmpl() + get("/nope"), [200, 200, 200, 200, 404], check=in_order)
case(P, "40 requests in one write", get("/health") * 40, [200] * 40)
case(P, "12 completions in one write", cmpl() * 12, [200] * 12,
     check=lambda rs: check(len({r.json()["id"] for r in rs}) == 12, "ids repeat"))
case(P, "a stream, then a quick request", cmpl({"stream": True, "max_tokens": 8}) + get("/health"),
     [200, 200], check=lambda rs: check(b"[DONE]" in rs[0].body and rs[1].body == b"{}", "order"))
case(P, "malformed request in the middle", get("/health") + get("/version") + b"BAD\r\n\r\n" + get("/health"),
     [200, 200, 400], close=True)
case(P, "validation error in the middle", cmpl() + cmpl({"max_tokens": -1}) + cmpl(), [200, 400, 200])
case(P, "HEAD between GETs", get("/health") + req("HEAD", "/version") + get("/health"), [200, 200, 200],
     head=[1])


@action(P, "a request sent one byte at a time")
def byte_by_byte():
    c = Conn()
    try:
        for b in cmpl():
            c.send(bytes([b]))
        r = c.response(30)
        check(r.status == 200, f"status {r.status}")
    finally:
        c.close()


# --- timeouts --------------------------------------------------------------------
W = "timeouts"


@action(W, "slowloris: headers dribbled past the header timeout")
def slowloris_headers():
    c = Conn()
    t0 = time.monotonic()
    try:
        data = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-S%d: v\r\n" % i for i in range(1000))
        answer = None
        for i in range(len(data)):
            if not c.send(data[i:i + 1]):
                break
            try:  # 0.3 s between bytes, reading meanwhile
                answer = c.response(0.3)
                break
            except Timeout:
                pass
            except Closed:
                break
            check(time.monotonic() - t0 < HEADER_TIMEOUT + 3, "no answer past the header timeout")
        took = time.monotonic() - t0
        if answer is not None:
            check(answer.status == 408, f"status {answer.status}")
            check_error_body(answer)
            c.wait_close(CLOSE_WAIT)
        check(HEADER_TIMEOUT - 1 <= took <= HEADER_TIMEOUT + 3, f"answered after {took:.1f} s")
    finally:
        c.close()


@action(W, "slow body past the request timeout")
def slow_body():
    c = Conn()
    t0 = time.monotonic()
    try:
        body = jbody(BASE)
        c.send(req("POST", "/v1/completions", body)[:-len(body)])
        answer = None
        for b in body:
            c.send(bytes([b]))
            try:
                answer = c.response(0.5)
                break
            except Timeout:
                pass
            check(time.monotonic() - t0 < BODY_TIMEOUT + 3, "no answer past the request timeout")
        took = time.monotonic() - t0
        check(answer is not None and answer.status == 408, f"answer {answer and answer.status}")
        c.wait_close(CLOSE_WAIT)
        check(took <= BODY_TIMEOUT + 1.5, f"answered after {took:.1f} s")
    finally:
        c.close()


@action(W, "idle connection closed by the idle timeout")
def idle_connection():
    c = Conn()
    t0 = time.monotonic()
    try:
        extra = c.wait_close(IDLE_TIMEOUT + 3)
        took = time.monotonic() - t0
        check(extra == b"", f"data on an idle connection: {extra[:100]!r}")
        check(IDLE_TIMEOUT - 1 <= took <= IDLE_TIMEOUT + 2, f"closed after {took:.1f} s")
    except Timeout:
        raise Fail("an idle connection stays open past the idle timeout") from None
    finally:
        c.close()


@action(W, "empty lines dribbled do not keep a connection open")
def crlf_dribble():
    c = Conn()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < IDLE_TIMEOUT + 3:
            if not c.send(b"\r\n"):
                break
            try:
                c.wait_close(0.5)
                break
            except Timeout:
                pass
        took = time.monotonic() - t0
        check(took <= IDLE_TIMEOUT + 2, f"still open after {took:.1f} s")
    finally:
        c.close()


# --- resets and disconnects ------------------------------------------------------
X = "resets"


def reset_after(data, read_first=None):
    c = Conn()
    c.send(data)
    if read_first:
        deadline = time.monotonic() + 30
        while read_first not in c.buf:
            c._more(deadline)
    c.reset()


@action(X, "reset in the middle of the headers")
def reset_headers():
    reset_after(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")


@action(X, "reset in the middle of the body")
def reset_body():
    full = cmpl()
    reset_after(full[:-10])


@action(X, "reset in the middle of a large upload")
def reset_upload():
    full = req("POST", "/v1/completions", padded(MAX_BODY))
    reset_after(full[:len(full) // 2])


@action(X, "reset while the engine generates")
def reset_generating():
    reset_after(cmpl({"max_tokens": 200, "ignore_eos": True}))
    wait_idle_engine()


@action(X, "reset after the first stream chunk")
def reset_streaming():
    reset_after(cmpl({"max_tokens": 400, "ignore_eos": True, "stream": True}), read_first=b"data: ")
    wait_idle_engine()


@action(X, "FIN after the first stream chunk")
def fin_streaming():
    c = Conn()
    c.send(chat({"max_tokens": 400, "ignore_eos": True, "stream": True}))
    deadline = time.monotonic() + 30
    while b"data: " not in c.buf:
        c._more(deadline)
    c.close()
    wait_idle_engine()


@action(X, "reset with 12 pipelined completions queued")
def reset_pipelined():
    reset_after(cmpl({"max_tokens": 50, "ignore_eos": True}) * 12)
    wait_idle_engine()


# The server treats EOF from a client as a disconnect (as nginx does): the
# running request is aborted and the connection closed, with or without its
# answer; never a hang.
@action(X, "half-close after a completion request")
def half_close():
    c = Conn()
    try:
        c.send(cmpl({"max_tokens": 100, "ignore_eos": True}))
        c.s.shutdown(socket.SHUT_WR)
        c.wait_close(CLOSE_WAIT)
    except Timeout:
        raise Fail("not closed after the client's FIN") from None
    finally:
        c.close()
    wait_idle_engine()


@action(X, "200 connections opened and reset at once")
def reset_storm():
    for _ in range(4):
        conns = [Conn() for _ in range(50)]
        for c in conns:
            c.reset()
    # a reset connection counts toward --max-connections until the server has
    # read its reset; the next accept may come first
    time.sleep(0.5)


# --- connections and Expect ------------------------------------------------------
N = "connections"


@action(N, "connections beyond --max-connections")
def too_many_connections():
    extra = 8
    conns = []
    try:
        for _ in range(MAX_CONN + extra):
            try:
                conns.append(Conn())
            except OSError:
                conns.append(None)  # refused: acceptable
        time.sleep(0.5)
        refused, idle = 0, []
        for c in conns:
            if c is None:
                refused += 1
            elif not select.select([c.s], [], [], 0)[0]:
                idle.append(c)  # accepted: waits for a request
            else:
                try:
                    r = c.response(2)
                    check(r.status == 503, f"status {r.status} to a connection past the limit")
                    check_error_body(r)
                except Closed:
                    pass
                refused += 1
        check(refused >= extra, f"only {refused} of {MAX_CONN + extra} connections refused")
        check(len(idle) >= MAX_CONN - 4, f"only {len(idle)} connections accepted")
        c = idle[0]
        c.send(get("/health"))
        r = c.response(5)
        check(r.status == 200, f"an accepted connection got {r.status}")
    finally:
        for c in conns:
            if c:
                c.close()
    time.sleep(0.3)  # the server sees the EOFs


@action(N, "32 connections, a completion on each at once")
def concurrent_completions():
    conns = [Conn() for _ in range(32)]
    try:
        for i, c in enumerate(conns):
            c.send(cmpl({"prompt": f"Number {i}", "max_tokens": 3}))
        ids = set()
        for c in conns:
            r = c.response(60)
            check(r.status == 200, f"status {r.status}: {r.body[:200]!r}")
            ids.add(r.json()["id"])
        check(len(ids) == 32, "ids repeat")
    finally:
        for c in conns:
            c.close()


@action(N, "Expect: 100-continue, body after the interim answer")
def expect_continue():
    c = Conn()
    try:
        body = jbody(BASE)
        c.send(req("POST", "/v1/completions", body, headers=["Expect: 100-continue"])[:-len(body)])
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in c.buf:
            c._more(deadline)
        check(c.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), f"no 100 Continue: {c.buf[:100]!r}")
        c.buf = c.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        c.send(body)
        r = c.response(30)
        check(r.status == 200, f"status {r.status}")
    finally:
        c.close()


# ---- running --------------------------------------------------------------------


def run_raw(cs):
    data = cs["send"]
    expect, bound = cs["expect"], cs["bound"]
    c = Conn()
    try:
        if isinstance(data, list):
            c.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for part in data:
                c.send(part)
                time.sleep(0.05)  # the server reads each part on its own
            sender = c.send_background(b"")
        else:
            if b"http://localhost:0/" in data:  # the absolute-form case names the real port
                data = data.replace(b"http://localhost:0/", f"http://localhost:{PORT}/".encode())
            sender = c.send_background(data)
        if expect == CLOSE:
            try:
                while True:
                    r = c.response(bound)
                    check(r.status >= 400, f"{r.status} before the close")
                    check_error_body(r)
            except Closed:
                return
            except Timeout:
                raise Fail(f"not closed within {bound} s") from None
        want = expect if isinstance(expect, list) else [expect]
        rs = []
        for i in range(len(want)):
            try:
                rs.append(c.response(bound, head=i in cs["head"]))
            except Closed:
                raise Fail(f"closed after {[r.status for r in rs]}, expected {want}") from None
            except Timeout:
                raise Fail(f"no answer within {bound} s after {[r.status for r in rs]}, "
                           f"expected {want}") from None
        got = [r.status for r in rs]
        check(got == want, f"status {got}, expected {want}; body {rs[-1].body[:240]!r}")
        for r in rs:
            check_error_body(r)
        if cs["check"]:
            cs["check"](rs)
        if cs["close"]:
            try:
                extra = c.wait_close(CLOSE_WAIT)
            except Timeout:
                raise Fail(f"connection still open {CLOSE_WAIT} s after the {got[-1]}") from None
            check(not extra, f"bytes after the last answer: {extra[:120]!r}")
            check(rs[-1].header("connection") == "close",
                  f"closed, but the answer said Connection: {rs[-1].header('connection')}")
        elif cs["reuse"] and rs[-1].header("connection") == "keep-alive":
            sender.join(10)
            check(c.send(get("/health")), "the kept-alive connection is gone")
            try:
                r = c.response(10)
            except (Closed, Timeout) as e:
                raise Fail(f"the kept-alive connection does not answer ({type(e).__name__})") from None
            check(r.status == 200, f"the next request on the connection got {r.status}")
    finally:
        c.close()


def healthy():
    check(SERVER.poll() is None, f"the server exited with {SERVER.returncode}")
    c = Conn()
    try:
        c.send(cmpl({"prompt": "Hello", "temperature": 0}))
        try:
            r = c.response(60)
        except (Closed, Timeout) as e:
            raise Fail(f"follow-up completion: {type(e).__name__}") from None
        check(r.status == 200, f"follow-up completion got {r.status}: {r.body[:200]!r}")
        completion_ok([r])
    finally:
        c.close()


def start_server():
    args = [BIN, "serve", "--model", MODEL, "--port", "0", "--served-model-name", NAME,
            "--max-model-len", "2048", "--kv-cache-memory", "256M",
            "--max-request-bytes", str(MAX_BODY), "--max-connections", str(MAX_CONN),
            "--request-timeout", str(BODY_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
            "--api-key", KEY, "--log-level", "info"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, errors="replace")
    log = []
    port = None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if not port:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(log))

    def drain():
        for line in proc.stderr:
            log.append(line)
    threading.Thread(target=drain, daemon=True).start()
    return proc, port, log


def main():
    global PORT, SERVER
    if not os.path.exists(MODEL):
        print("model missing: skipping")
        return 77
    t0 = time.monotonic()
    SERVER, PORT, log = start_server()
    failures, per_cat = [], {}
    try:
        healthy()
        for cs in CASES:
            per_cat[cs["cat"]] = per_cat.get(cs["cat"], 0) + 1
            label = f"{cs['cat']}: {cs['name']}"
            t = time.monotonic()
            try:
                if cs["expect"] is None:
                    cs["send"]()
                else:
                    run_raw(cs)
                detail = None
            except Fail as e:
                detail = str(e)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                detail = f"{type(e).__name__}: {e}"
            try:
                healthy()
            except Fail as e:
                detail = (detail + "; " if detail else "") + "then " + str(e)
            except OSError as e:
                detail = (detail + "; " if detail else "") + f"then {type(e).__name__}: {e}"
            took = time.monotonic() - t
            if detail:
                failures.append(label)
                print(f"FAIL {label}: {detail}", flush=True)
            else:
                print(f"ok   {label} ({took:.2f} s)", flush=True)
            if SERVER.poll() is not None:
                print("the server is gone; stopping", flush=True)
                break
    finally:
        if SERVER.poll() is None:
            SERVER.send_signal(signal.SIGTERM)
            try:
                rc = SERVER.wait(30)
            except subprocess.TimeoutExpired:
                SERVER.kill()
                rc = "killed"
        else:
            rc = SERVER.returncode
    if rc != 0:
        failures.append("exit")
        print(f"FAIL server exit status {rc}:\n" + "".join(log[-30:]))
    print("cases: " + ", ".join(f"{k} {v}" for k, v in per_cat.items()))
    print(f"{len(CASES)} cases, {len(failures)} failed, {time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
