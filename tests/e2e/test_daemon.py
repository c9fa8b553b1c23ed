"""End-to-end tests of `pressd serve` as a daemon: systemd's notification
protocol (READY, STATUS, WATCHDOG, STOPPING) read from a socket this test
binds, graceful shutdown on SIGTERM (new requests 503, running ones finish,
or end with an error event past --shutdown-timeout), the log (levels, one
line per request, SIGHUP reopening --log-file), API keys from a file,
--metrics-require-key and --max-tokens-limit.

Starts the real daemon on 127.0.0.1 (a free port) and stops it. Exit 77
(skip) when the model is missing. Environment: PRESSD_BIN, PRESSD_MODEL.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from pressd_proc import Daemon

BIN = os.environ.get("PRESSD_BIN", "build/pressd")
MODEL = os.environ.get("PRESSD_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
failures = []


class Server(Daemon):
    def __init__(self, *extra, env=None, log_file=None):
        super().__init__([BIN, "serve", "--model", MODEL, "--port", "0", "--max-model-len",
                          "2048", "--kv-cache-memory", "256M", "--served-model-name", "m",
                          *extra], env=env, log_file=log_file)

    def raw(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body,
                  headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed"

    def stop(self):
        self.signal(signal.SIGTERM)
        return self.wait()



class Stream(threading.Thread):
    """A streaming completion read chunk by chunk on its own connection."""

    def __init__(self, port, max_tokens):
        super().__init__(daemon=True)
        self.port, self.max_tokens = port, max_tokens
        self.events, self.done, self.status, self.error = [], False, None, None
        self.first = threading.Event()

    def run(self):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            c.request("POST", "/v1/completions", body=json.dumps({
                "model": "m", "prompt": "Once upon a time", "max_tokens": self.max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0}),
                headers={"Content-Type": "application/json"})
            r = c.getresponse()
            self.status = r.status
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    break
                self.events.append(json.loads(line[6:]))
                self.first.set()
            c.close()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        self.first.set()

    def finish_reason(self):
        for ev in reversed(self.events):
            for ch in ev.get("choices", []):
                if ch.get("finish_reason"):
                    return ch["finish_reason"]
        return None

    def tokens(self):
        return sum(1 for ev in self.events for ch in ev.get("choices", []) if ch.get("text"))


def case(fn):
    name = fn.__name__
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def error_message(data):
    return json.loads(data)["error"]["message"]


def notify_protocol():
    """READY=1 only once requests are served; WATCHDOG=1 from the engine at
    half the period systemd asks for; STOPPING=1 on SIGTERM."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        msgs = []

        def recv_until(pred, seconds):
            end = time.time() + seconds
            while time.time() < end:
                try:
                    m = sock.recv(4096).decode()
                except socket.timeout:
                    continue
                msgs.append((time.time(), m))
                if pred(m):
                    return True
            return False

        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
        srv = Server(env=env)
        try:
            check(recv_until(lambda m: "READY=1" in m, 30), f"no READY=1: {msgs}")
            status, _ = srv.raw("GET", "/health")
            check(status == 200, f"/health {status} right after READY=1")
            states = [m for _, m in msgs]
            check(any(m.startswith("STATUS=loading") for m in states), f"no loading status: {states}")
            check(any("STATUS=warming up" in m for m in states), f"no warm-up status: {states}")
            check(states.index(next(m for m in states if "READY=1" in m)) ==
                  len(states) - 1, f"READY=1 is not the last start-up state: {states}")
            t0 = time.time()
            recv_until(lambda m: False, 2.6)
            pings = [t for t, m in msgs if m == "WATCHDOG=1" and t >= t0]
            check(len(pings) >= 3, f"{len(pings)} WATCHDOG=1 in 2.6 s at WATCHDOG_USEC=1s")
            srv.signal(signal.SIGTERM)
            check(recv_until(lambda m: "STOPPING=1" in m, 10), f"no STOPPING=1: {msgs[-5:]}")
            rc = srv.wait()
            check(rc == 0, f"exit {rc}")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
            sock.close()


def graceful_drain():
    """SIGTERM: the running stream finishes normally; new requests and
    /health get 503 with a clear message; exit 0."""
    srv = Server("--shutdown-timeout", "120")
    try:
        st = Stream(srv.port, 400)
        st.start()
        check(st.first.wait(60) and not st.error and st.status == 200,
              f"stream did not start: {st.status} {st.error}")
        srv.signal(signal.SIGTERM)
        time.sleep(0.3)
        status, data = srv.raw("POST", "/v1/completions", {"model": "m", "prompt": "hi",
                                                           "max_tokens": 2})
        check(status == 503, f"new request during the drain: {status} {data[:200]}")
        check("shutting down" in error_message(data), data)
        status, data = srv.raw("GET", "/health")
        check(status == 503, f"/health during the drain: {status}")
        st.join(120)
        check(st.done and st.finish_reason() == "length", f"stream: done={st.done} "
              f"finish={st.finish_reason()} error={st.error}")
        check(st.tokens() >= 390, f"stream cut short: {st.tokens()} tokens")
        rc = srv.wait(60)
        check(rc == 0, f"exit {rc}")
        check("shutting down: 1 request running" in srv.text(), srv.text()[-2000:])
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def shutdown_timeout_aborts():
    """Past --shutdown-timeout the running stream ends with an error event
    and [DONE]; the daemon exits 0."""
    srv = Server("--shutdown-timeout", "1")
    try:
        st = Stream(srv.port, 1900)
        st.start()
        check(st.first.wait(60) and not st.error and st.status == 200,
              f"stream did not start: {st.status} {st.error}")
        t0 = time.time()
        srv.signal(signal.SIGTERM)
        st.join(60)
        took = time.time() - t0
        check(st.done, f"no [DONE] after the abort (error {st.error})")
        errs = [ev["error"] for ev in st.events if "error" in ev]
        check(errs and "shutting down" in errs[-1]["message"], f"no final error event: "
              f"{st.events[-2:]}")
        check(st.tokens() < 1800, "the stream ran to its end")
        rc = srv.wait(30)
        check(rc == 0, f"exit {rc}")
        check(took < 15, f"the abort took {took:.1f} s")
        check("shutdown timeout: aborting 1 running request" in srv.text(), srv.text()[-2000:])
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def request_log_and_sighup():
    """One info line per request (never its body), journald-free format;
    SIGHUP reopens --log-file after a rotation."""
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "pressd.log")
        srv = Server("--log-level", "info", log_file=log)
        try:
            secret = "purple-elephant-prompt"
            status, data = srv.raw("POST", "/v1/completions", {"model": "m", "prompt": secret,
                                                               "max_tokens": 3})
            check(status == 200, data)
            rid = json.loads(data)["id"]
            status, _ = srv.raw("GET", "/health")
            time.sleep(0.2)
            text = open(log).read()
            line = next((ln for ln in text.splitlines() if rid in ln), None)
            check(line and re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info: ", line),
                  f"no request line: {text[-1500:]}")
            check("POST /v1/completions 200 length prompt_tokens=" in line, line)
            check(secret not in text, "the request body is in the log")
            check("/health" not in text, "/health logged at info")
            os.rename(log, log + ".1")
            srv.signal(signal.SIGHUP)
            time.sleep(0.3)
            status, data = srv.raw("POST", "/v1/completions", {"model": "m", "prompt": "x",
                                                               "max_tokens": 2})
            rid2 = json.loads(data)["id"]
            time.sleep(0.2)
            check(os.path.exists(log) and rid2 in open(log).read(), "SIGHUP did not reopen")
            check(rid2 not in open(log + ".1").read(), "wrote to the rotated file")
            check(srv.stop() == 0, "exit")
            check("stopped" in open(log).read(), "no 'stopped' line")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()


def api_keys_and_metrics():
    with tempfile.TemporaryDirectory() as d:
        kf = os.path.join(d, "keys")
        with open(kf, "w") as f:
            f.write("# operators\n  key-one  \n\nkey-two\n")
        srv = Server("--api-key-file", kf, "--metrics-require-key")
        try:
            for k in ("key-one", "key-two"):
                status, _ = srv.raw("GET", "/v1/models", headers={"Authorization": "Bearer " + k})
                check(status == 200, f"{k}: {status}")
            for h in ({}, {"Authorization": "Bearer key-three"}, {"Authorization": "Bearer key"}):
                status, data = srv.raw("GET", "/v1/models", headers=h)
                check(status == 401 and "API key" in error_message(data), f"{h}: {status}")
                check(b"key-one" not in data and b"key-two" not in data, data)
            for path in ("/metrics", "/health"):
                status, _ = srv.raw("GET", path)
                check(status == 401, f"{path} without a key: {status}")
                status, _ = srv.raw("GET", path, headers={"Authorization": "Bearer key-two"})
                check(status == 200, f"{path} with a key: {status}")
            check(srv.stop() == 0, "exit")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
        srv = Server("--api-key", "k")
        try:
            status, _ = srv.raw("GET", "/metrics")
            check(status == 200, f"/metrics is public by default: {status}")
            status, _ = srv.raw("GET", "/v1/models")
            check(status == 401, f"/v1 without a key: {status}")
            check(srv.stop() == 0, "exit")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
        r = subprocess.run([BIN, "serve", "--model", MODEL, "--port", "0", "--api-key-file",
                            os.path.join(d, "missing")], capture_output=True, text=True,
                           timeout=60)
        check(r.returncode != 0 and "api-key-file" in r.stderr, f"missing key file: {r.returncode} "
              f"{r.stderr[-300:]}")


def max_tokens_limit():
    srv = Server("--max-tokens-limit", "8")
    try:
        status, data = srv.raw("POST", "/v1/completions", {"model": "m", "prompt": "hi",
                                                           "max_tokens": 9})
        check(status == 400, f"{status} {data[:200]}")
        err = json.loads(data)["error"]
        check(err["param"] == "max_tokens" and "at most 8" in err["message"], err)
        status, data = srv.raw("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Count to a hundred."}],
            "ignore_eos": True})
        check(status == 200, data[:300])
        check(json.loads(data)["usage"]["completion_tokens"] == 8, data[:300])
        status, data = srv.raw("POST", "/v1/completions", {"model": "m", "prompt": "hi",
                                                           "max_tokens": 8})
        check(status == 200, data[:200])
        check(srv.stop() == 0, "exit")
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def step_and_kv_defaults():
    """--max-num-batched-tokens 0 (the default) resolves per backend: 512 on
    the CPU, raised to --max-num-seqs; a value given stands. A long prompt
    is served in chunks of it. --kv-cache-dtype auto is f16 on the CPU, f32
    with exact numerics; f32 and f16 can be asked for."""
    for extra, wants in (((), ("K and V in f16; max concurrency",
                               "steps of up to 512 tokens and 256 sequences")),
                         (("--max-num-seqs", "600"),
                          ("steps of up to 600 tokens and 600 sequences",)),
                         (("--max-num-batched-tokens", "96", "--max-num-seqs", "4"),
                          ("steps of up to 96 tokens and 4 sequences",)),
                         (("--cpu-numerics", "exact"), ("K and V in f32;",)),
                         (("--kv-cache-dtype", "f32"), ("K and V in f32;",)),
                         (("--cpu-numerics", "exact", "--kv-cache-dtype", "f16"),
                          ("K and V in f16;",))):
        srv = Server(*extra)
        try:
            status, data = srv.raw("POST", "/v1/completions", {
                "model": "m", "prompt": "The quick brown fox jumps over the lazy dog. " * 60,
                "max_tokens": 4})
            check(status == 200 and json.loads(data)["usage"]["prompt_tokens"] > 512,
                  f"{status} {data[:300]}")
            check(srv.stop() == 0, "exit")
            for want in wants:
                check(want in srv.text(), f"{extra}: no '{want}' in {srv.text()[-1500:]}")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()


def startup_faults():
    """Start-up failures: a clear message on stderr and a non-zero exit, no
    crash: missing or corrupt model, port taken, KV pool too large for the
    memory, an unwritable --log-file."""
    def serve(*args):
        return subprocess.run([BIN, "serve", "--port", "0", *args], capture_output=True,
                              text=True, timeout=120)

    def expect(name, r, words):
        check(r.returncode not in (0, None) and r.returncode > 0,
              f"{name}: exit {r.returncode}")
        check("ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr and
              "Segmentation" not in r.stderr, f"{name}: crash")
        low = r.stderr.lower()
        check(any(w in low for w in words), f"{name}: unclear message {r.stderr[-300:]!r}")

    with tempfile.TemporaryDirectory() as d:
        expect("missing model", serve("--model", os.path.join(d, "none.gguf")),
               ["no such file", "cannot open", "not found"])
        bad = os.path.join(d, "cut.gguf")
        with open(MODEL, "rb") as src, open(bad, "wb") as dst:
            dst.write(src.read(300000))
        expect("corrupt model", serve("--model", bad), ["truncated", "gguf", "corrupt", "past the end"])
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([BIN, "serve", "--model", MODEL, "--port", str(port),
                            "--kv-cache-memory", "64M", "--max-model-len", "1024"],
                           capture_output=True, text=True, timeout=120)
        s.close()
        expect("port taken", r, ["address already in use", "cannot listen"])
        expect("KV pool beyond memory", serve("--model", MODEL, "--kv-cache-memory", "4000G"),
               ["kv cache", "cannot allocate", "memory"])
        expect("unwritable log file", serve("--model", MODEL, "--log-file", "/proc/pressd.log"),
               ["log-file"])
        expect("KV type the CPU lacks", serve("--model", MODEL, "--kv-cache-dtype", "bf16"),
               ["--kv-cache-dtype bf16: the cpu backend holds k and v as f32 or f16"])
        expect("unknown KV type", serve("--model", MODEL, "--kv-cache-dtype", "q4"),
               ["kv-cache-dtype"])


def fault_server(d, name):
    """A Server whose attention calls fail while the file d/fail-now exists,
    and that path; None where the build has no fault injection."""
    ver = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout
    if "fault-injection" not in ver:
        print(f"     (this build has no fault injection: {name} not run)")
        return None, None
    trigger = os.path.join(d, "fail-now")
    return Server(env=dict(os.environ, PRESSD_INJECT_DEVICE_ERROR=trigger)), trigger


def device_error_recovery():
    """A device error at run time (a fault-injection build makes every
    attention call fail while a file exists): the requests running then end
    with an error (a final stream event; 500 with an OpenAI error body), the
    daemon keeps serving, and the next requests succeed with their blocks
    returned. Builds without fault injection skip this case."""
    with tempfile.TemporaryDirectory() as d:
        srv, trigger = fault_server(d, "device_error_recovery")
        if not srv:
            return
        try:
            ok = {"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                  "ignore_eos": True}
            status, want = srv.raw("POST", "/v1/completions", ok)
            check(status == 200, f"before: {status} {want[:200]}")
            st = Stream(srv.port, 1500)
            st.start()
            check(st.first.wait(60) and not st.error and st.status == 200,
                  f"stream did not start: {st.status} {st.error}")
            open(trigger, "w").close()
            st.join(60)
            check(st.done, f"no [DONE] after the device error (error {st.error})")
            errs = [ev["error"] for ev in st.events if "error" in ev]
            check(errs and "model failed" in errs[-1]["message"], f"no final error event: "
                  f"{st.events[-2:]}")
            check(st.tokens() < 1400, "the stream ran to its end")
            status, data = srv.raw("POST", "/v1/completions", ok)
            check(status == 500, f"during: {status} {data[:200]}")
            err = json.loads(data)["error"]
            check("model failed" in err["message"] and "/" not in err["message"], err)
            status, _ = srv.raw("GET", "/health")
            check(status == 200, f"health during the fault: {status}")
            os.remove(trigger)
            status, data = srv.raw("POST", "/v1/completions", ok)
            check(status == 200 and json.loads(data)["choices"][0]["text"] ==
                  json.loads(want)["choices"][0]["text"], f"after: {status} {data[:200]}")
            metrics = srv.raw("GET", "/metrics")[1].decode()
            used = re.search(r"^vllm:kv_cache_usage_perc(?:\{[^}]*\})? (\S+)", metrics, re.M)
            check(used and float(used.group(1)) == 0, "KV blocks not returned after the errors")
            check(srv.stop() == 0, "exit")
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()


def device_error_sticky():
    """A device error that sticks (as a sticky CUDA error does; the
    fault-injection build's trigger file says "sticky"): the running requests
    end with an error that says so, and the daemon exits non-zero by itself,
    so that systemd (Restart=on-failure) starts a fresh process."""
    with tempfile.TemporaryDirectory() as d:
        srv, trigger = fault_server(d, "device_error_sticky")
        if not srv:
            return
        try:
            st = Stream(srv.port, 1500)
            st.start()
            check(st.first.wait(60) and not st.error and st.status == 200,
                  f"stream did not start: {st.status} {st.error}")
            with open(trigger, "w") as f:
                f.write("sticky\n")
            st.join(60)
            errs = [ev["error"] for ev in st.events if "error" in ev]
            check(errs and ("model failed" in errs[-1]["message"] or
                            "cannot recover" in errs[-1]["message"]),
                  f"no final error event: {st.events[-2:]}")
            rc = srv.wait(30)
            check(rc not in (0, "killed"), f"exit {rc}: the daemon should exit non-zero by itself")
            check("cannot recover" in srv.text(), srv.text()[-1500:])
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()


def install_layout():
    """scripts/install --destdir: binary, unit and configuration in place; the
    unit passes systemd-analyze verify; the installed configuration loads."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    builddir = os.path.dirname(os.path.abspath(BIN))
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([os.path.join(root, "scripts", "install"), "--destdir", d, "--no-model",
                            "--builddir", builddir], capture_output=True, text=True, timeout=600)
        check(r.returncode == 0, f"install: {r.returncode} {r.stderr[-1000:]}")
        unit = open(os.path.join(d, "etc/systemd/system/pressd.service")).read()
        m = re.search(r"^ExecStart=(\S+) serve --config /etc/pressd/pressd.json$", unit, re.M)
        check(m, "no ExecStart with the configuration")
        binary = d + m.group(1)
        check(os.access(binary, os.X_OK), f"{binary} not installed")
        for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "PrivateTmp=yes", "User=pressd"):
            check(key in unit, f"unit lacks {key}")
        v = subprocess.run([binary, "--version"], capture_output=True, text=True)
        check(v.returncode == 0 and v.stdout.startswith("pressd "), v.stdout)
        conf = os.path.join(d, "etc/pressd/pressd.json")
        p = subprocess.run([binary, "serve", "--config", conf, "--print-config"],
                           capture_output=True, text=True)
        check(p.returncode == 0, p.stderr)
        check(json.loads(p.stdout)["model"].startswith("/var/lib/pressd/models/"), p.stdout[:300])
        if subprocess.run(["sh", "-c", "command -v systemd-analyze"],
                          capture_output=True).returncode == 0:
            staged = os.path.join(d, "pressd-staged.service")
            with open(staged, "w") as f:
                f.write(unit.replace(m.group(1), binary).replace("/etc/pressd/pressd.json", conf))
            a = subprocess.run(["systemd-analyze", "verify", staged], capture_output=True,
                               text=True, timeout=60)
            check(a.returncode == 0 and not a.stderr.strip(), f"verify: {a.stderr[-800:]}")
        r = subprocess.run([os.path.join(root, "scripts", "install"), "--destdir", d, "--no-model",
                            "--builddir", builddir], capture_output=True, text=True, timeout=600)
        check(r.returncode == 0 and "kept /etc/pressd/pressd.json" in r.stdout,
              "a second install must keep the configuration")


def main():
    if not os.path.exists(MODEL):
        print("model missing: skipping")
        return 77
    for fn in (notify_protocol, graceful_drain, shutdown_timeout_aborts, request_log_and_sighup,
               api_keys_and_metrics, max_tokens_limit, step_and_kv_defaults, startup_faults, device_error_recovery,
               device_error_sticky, install_layout):
        case(fn)
    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
