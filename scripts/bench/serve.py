#!/usr/bin/env python3
"""The `cpu-short` serving workload (shared BENCH.md): pressd against
llama.cpp's server, same GGUF, same threads, same prompts, in one run.

Starts `pressd serve` and the peer on free 127.0.0.1 ports, runs
scripts/pressd-bench (a separate process) against each at every concurrency,
alternating which goes first (ABBA across concurrencies), stops both, and
writes bench/results/serve-cpu-short-<YYYYMMDD>-<machine>.json (+ a PNG when
matplotlib is importable) with the pressd/peer ratios of throughput and of
the TTFT/TPOT/ITL/e2e percentiles, then prints a table. A second section
measures GET /health requests/s on the idle pressd (wrk if installed, else a
built-in asyncio client; the result says which).

Run it through scripts/bench-serve, which provides the llama.cpp venv.

Peers:
  llama-cpp-python  (default) `python -m llama_cpp.server` from the venv. Its
                    server has no parallel slots in the versions checked
                    (0.3.x: one llama context behind a lock, requests served
                    one at a time); the script checks the installed settings
                    for a parallel-slots field and uses it when present.
  llama-server      a llama.cpp `llama-server` binary (--llama-server PATH),
                    restarted per concurrency with --parallel = concurrency.
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from machine import cpu_model, git_info, sha256_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BENCH = os.path.join(ROOT, "scripts", "pressd-bench")
STANDARD = {"input_len": 128, "output_len": 128, "num_prompts": 64, "concurrency": [1, 8, 32]}

PROCS = []   # servers and load generators this script started
CLEANUP = []  # temporary directories to remove on exit


# ---------------------------------------------------------------------------
# Processes


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(name, cmd, logdir):
    log = open(os.path.join(logdir, name + ".log"), "wb")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd=ROOT)
    p.name, p.log_path, p.cmd = name, log.name, cmd
    log.close()
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
    if p in PROCS:
        PROCS.remove(p)


def stop_all():
    for p in reversed(list(PROCS)):   # the load generator before the servers
        stop(p)
    for d in CLEANUP:
        shutil.rmtree(d, ignore_errors=True)
    del CLEANUP[:]


def on_signal(signum, frame):
    stop_all()
    sys.exit(128 + signum)


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None, None


def wait_ready(p, url, timeout):
    """Waits until GET url answers 200 (the server loaded its model)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            raise SystemExit("bench-serve: %s exited with %s during start-up; log %s:\n%s"
                             % (p.name, p.returncode, p.log_path, tail(p.log_path)))
        status, _ = http_get(url, timeout=2)
        if status == 200:
            return time.time() - t0
        time.sleep(0.25)
    raise SystemExit("bench-serve: %s not ready after %ds; log %s:\n%s"
                     % (p.name, timeout, p.log_path, tail(p.log_path)))


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Facts about the machine and the software


def llama_cpp_python_info():
    """(version, name of its parallel-slots setting or None, server fields)."""
    try:
        import llama_cpp
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise SystemExit("bench-serve: llama-cpp-python's server is not importable (%s); "
                         "scripts/bench-serve installs its extras" % e)
    fields = set(getattr(ModelSettings, "model_fields", {})) | \
        set(getattr(ServerSettings, "model_fields", {}))
    slot = next((f for f in ("n_parallel", "parallel", "n_seq_max", "n_slots") if f in fields),
                None)
    return llama_cpp.__version__, slot, fields


# ---------------------------------------------------------------------------
# The servers


class Managed:
    """A server process this script started on a local port."""
    proc = port = None

    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def stop(self):
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class Pressd(Managed):
    name = "pressd"

    def __init__(self, args, logdir):
        self.args, self.logdir = args, logdir
        self.proc = self.port = None
        self.version = None
        self.startup_log = None
        self.warning = None

    def cmd(self):
        a = self.args
        c = [a.bin, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", str(self.port),
             "--threads", str(a.threads), "--max-model-len", str(a.ctx)]
        if a.kv_cache_memory:
            c += ["--kv-cache-memory", a.kv_cache_memory]
        return c + a.pressd_arg

    def ensure(self, concurrency):
        if self.proc is None:
            self.port = free_port()
            self.proc = start("pressd", self.cmd(), self.logdir)
            self.ready_s = wait_ready(self.proc, self.url() + "/health", self.args.start_timeout)
            st, body = http_get(self.url() + "/version")
            if st == 200:
                try:
                    self.version = json.loads(body).get("version")
                except ValueError:
                    pass
            self.startup_log = tail(self.proc.log_path, 10)
            m = re.search(r"= (\d+) tokens per head", self.startup_log)
            need = max(self.args.conc) * (self.args.input_len + self.args.output_len + 16)
            if m and int(m.group(1)) < need:
                self.warning = ("pressd's KV cache holds %s tokens, less than the %d that "
                                "concurrency %d needs: raise --kv-cache-memory"
                                % (m.group(1), need, max(self.args.conc)))
                sys.stderr.write("bench-serve: warning: %s\n" % self.warning)
        return self.url()

    def describe(self):
        return {"cmd": self.cmd(), "version": self.version, "startup_log": self.startup_log,
                "parallel_slots": "continuous batching (--max-num-seqs, default 256)"}


class LlamaCppPython(Managed):
    name = "llama.cpp"

    def __init__(self, args, logdir):
        self.args, self.logdir = args, logdir
        self.version, self.slot_field, _ = llama_cpp_python_info()
        self.proc = self.port = None
        self.slots = None
        self.started_for = []

    def cmd(self, slots):
        a = self.args
        c = [sys.executable, "-m", "llama_cpp.server", "--model", a.model,
             "--host", "127.0.0.1", "--port", str(self.port),
             "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
             "--n_ctx", str(a.ctx * (slots or 1)),
             # Concurrent streams must queue, not cancel each other (the default
             # interrupts the running request when a new one arrives).
             "--interrupt_requests", "False",
             # Logits for the last prompt token only, as pressd computes them.
             "--logits_all", "False",
             "--verbose", "False"]
        if self.slot_field and slots:
            c += ["--" + self.slot_field, str(slots)]
        return c + a.peer_arg

    def ensure(self, concurrency):
        want = concurrency if self.slot_field else None
        if self.proc is not None and self.slots != want:
            self.stop()
        if self.proc is None:
            self.port = free_port()
            self.slots = want
            self.proc = start("llama-cpp-python", self.cmd(want), self.logdir)
            wait_ready(self.proc, self.url() + "/v1/models", self.args.start_timeout)
            self.started_for.append(concurrency)
        return self.url()

    def parallel_note(self):
        if self.slot_field:
            return ("llama-cpp-python %s: parallel slots = concurrency (--%s), restarted per "
                    "concurrency" % (self.version, self.slot_field))
        return ("llama-cpp-python %s's server has no parallel-slots setting (no n_parallel): "
                "it serves one request at a time (one llama context behind a lock), so its "
                "concurrency > 1 figures are a queue in front of one sequence. For llama.cpp "
                "with parallel slots use --llama-server PATH (llama-server --parallel N)."
                % self.version)

    def describe(self):
        return {"kind": "llama-cpp-python server", "version": self.version,
                "cmd": self.cmd(self.slots), "parallel_slots_field": self.slot_field,
                "parallel_note": self.parallel_note()}


class LlamaServer(Managed):
    name = "llama.cpp"

    def __init__(self, args, logdir):
        self.args, self.logdir = args, logdir
        self.proc = self.port = None
        self.slots = None
        self.version = None
        try:
            r = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True,
                               timeout=30)
            self.version = (r.stdout + r.stderr).strip().splitlines()[-1:] or None
        except (OSError, subprocess.SubprocessError):
            pass

    def cmd(self, slots):
        a = self.args
        return [a.llama_server, "--model", a.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--threads", str(a.threads),
                "--threads-batch", str(a.threads), "--parallel", str(slots),
                "--ctx-size", str(a.ctx * slots), "--metrics"] + a.peer_arg

    def ensure(self, concurrency):
        if self.proc is not None and self.slots != concurrency:
            self.stop()
        if self.proc is None:
            self.port = free_port()
            self.slots = concurrency
            self.proc = start("llama-server", self.cmd(concurrency), self.logdir)
            wait_ready(self.proc, self.url() + "/health", self.args.start_timeout)
        return self.url()

    def parallel_note(self):
        return "llama-server: --parallel = concurrency, restarted per concurrency"

    def describe(self):
        return {"kind": "llama-server", "version": self.version,
                "cmd": self.cmd(self.slots or 1), "parallel_note": self.parallel_note()}


# ---------------------------------------------------------------------------
# One pressd-bench run


def run_bench(args, url, concurrency, label, tmpdir):
    out = os.path.join(tmpdir, "%s-c%d.json" % (label.replace(".", ""), concurrency))
    cmd = [sys.executable, BENCH, "--base-url", url, "--endpoint", "completions",
           "--dataset", "random", "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--seed", str(args.seed), "--prompt-mode", "text", "--warmup", str(args.warmup),
           "--result-json", out, "--label", "%s c=%d" % (label, concurrency), "--quiet"]
    sys.stderr.write("bench-serve: %s, concurrency %d\n" % (label, concurrency))
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    p.name = "pressd-bench"
    PROCS.append(p)
    try:
        rc = p.wait(args.run_timeout)
    except subprocess.TimeoutExpired:
        return {"error": "pressd-bench ran past %ds" % args.run_timeout}
    finally:
        stop(p)
    if not os.path.exists(out):
        return {"error": "pressd-bench exited %d without a result" % rc}
    with open(out) as f:
        return json.load(f)


KEYS = ("mean", "median", "p90", "p99")


def brief(res):
    if "summary" not in res:
        return {"error": res.get("error")}
    s = res["summary"]
    b = {k: s[k] for k in ("completed", "failed", "first_errors", "duration_s",
                           "request_throughput", "input_throughput", "output_throughput",
                           "total_token_throughput", "mean_concurrency", "peak_running",
                           "output_len_mismatches", "output_tokens_counted_by")}
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        b[m] = {k: s[m][k] for k in KEYS + ("min", "max")}
    b["notes"] = res.get("notes", [])
    return b


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(p, q):
    """pressd over the peer: above 1 is better for throughputs, below 1 for latencies."""
    if "error" in p or "error" in q:
        return None
    r = {k: ratio(p[k], q[k]) for k in ("total_token_throughput", "output_throughput",
                                       "request_throughput")}
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        r[m] = {k: ratio(p[m][k], q[m][k]) for k in KEYS}
    return r


# ---------------------------------------------------------------------------
# GET /health requests/s


def ensure_wrk(allow_install):
    path = shutil.which("wrk")
    if path or not allow_install:
        return path, None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "wrk not installed (apt package wrk; installing needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sys.stderr.write("bench-serve: installing wrk (apt-get install -y wrk)\n")
    for cmds in ([["apt-get", "install", "-y", "-q", "wrk"]],
                 [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]]):
        try:
            if all(subprocess.run(c, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=300).returncode == 0
                   for c in cmds):
                break
        except (OSError, subprocess.SubprocessError):
            pass
    path = shutil.which("wrk")
    return path, None if path else "apt-get install -y wrk failed"


def health_wrk(wrk, url, connections, duration):
    cmd = [wrk, "-t1", "-c%d" % connections, "-d%ds" % duration, "--latency", url + "/health"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"Requests/sec:\s*([\d.]+)", r.stdout)
    lat = {}
    for pct in ("50%", "90%", "99%"):
        mm = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(pct), r.stdout, re.M)
        if mm:
            lat["p" + pct[:-1] + "_ms"] = float(mm.group(1)) * {"us": 1e-3, "ms": 1.0,
                                                                 "s": 1e3}[mm.group(2)]
    errs = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", r.stdout)
    sock = re.search(r"Socket errors:.*", r.stdout)
    return {"tool": "wrk", "cmd": cmd, "requests_per_s": float(m.group(1)) if m else None,
            "latency": lat, "non_2xx": int(errs.group(1)) if errs else 0,
            "socket_errors": sock.group(0) if sock else None, "raw": r.stdout}


async def _health_asyncio(port, connections, duration):
    req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    counts = {"ok": 0, "bad": 0, "errors": 0}
    lat = []
    deadline = time.perf_counter() + duration

    async def worker():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["errors"] += 1
            return
        try:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                if m and int(m.group(1)):
                    await r.readexactly(int(m.group(1)))
                if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"):
                    counts["ok"] += 1
                else:
                    counts["bad"] += 1
                if len(lat) < 200000:
                    lat.append(time.perf_counter() - t)
                if re.search(rb"\r\nconnection:\s*close", head, re.I):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            counts["errors"] += 1
        finally:
            w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(connections)])
    el = time.perf_counter() - t0
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1000 if lat else None
    return {"tool": "asyncio (built in; wrk not available)", "requests_per_s": counts["ok"] / el,
            "latency": {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99)},
            "non_2xx": counts["bad"], "socket_errors": counts["errors"],
            "note": "a single-threaded Python client: likely the bottleneck, so a lower bound "
                    "of the server's rate"}


def health_rps(args, url, port):
    wrk, why = (None, "--health-tool asyncio") if args.health_tool == "asyncio" else \
        ensure_wrk(args.health_tool in ("auto", "wrk"))
    sys.stderr.write("bench-serve: GET /health, %d keep-alive connections, %ds, %s\n"
                     % (args.health_connections, args.health_duration, wrk or "asyncio client"))
    if wrk:
        res = health_wrk(wrk, url, args.health_connections, args.health_duration)
    else:
        res = asyncio.run(_health_asyncio(port, args.health_connections, args.health_duration))
        res["why_not_wrk"] = why
    res.update({"connections": args.health_connections, "duration_s": args.health_duration,
                "threads": 1, "target_requests_per_s": 20000})
    return res


# ---------------------------------------------------------------------------
# Output


def show_path(path):
    """Relative to the repository when inside it."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def fnum(v, spec="%.1f"):
    return "-" if v is None else spec % v


def print_table(result):
    p = result["params"]
    print()
    print("serve %s: %s, %d in / %d out tokens, %d prompts, %d threads each, peer: %s"
          % (result["workload"], result["model"], p["input_len"], p["output_len"],
             p["num_prompts"], p["threads"], result["peer"]["kind"]))
    print("  cpu: %s" % result["cpu_model"])
    print("  %s" % result["peer"]["parallel_note"])
    hdr = "%5s  %-10s %11s %10s  %-22s %-22s %s" % (
        "conc", "server", "total tok/s", "out tok/s", "TTFT p50/p90/p99 ms",
        "TPOT p50/p90/p99 ms", "failed")
    print(hdr)
    print("-" * len(hdr))

    def trio(d, spec):
        return "/".join(fnum(d.get(k), spec) for k in ("median", "p90", "p99"))
    for row in result["runs"]:
        c = row["concurrency"]
        for who in ("pressd", "llama.cpp"):
            x = row[who]
            if "error" in x:
                if who in row.get("order", []):
                    print("%5d  %-10s error: %s" % (c, who, x["error"]))
                continue
            print("%5d  %-10s %11s %10s  %-22s %-22s %d%s" % (
                c, who, fnum(x["total_token_throughput"]), fnum(x["output_throughput"]),
                trio(x["ttft_ms"], "%.0f"), trio(x["tpot_ms"], "%.1f"), x["failed"],
                " (%d wrong lengths)" % x["output_len_mismatches"]
                if x["output_len_mismatches"] else ""))
        r = row.get("ratio_pressd_over_llama")
        if r:
            print("%5d  %-10s %10sx %9sx  %-22s %-22s" % (
                c, "ratio", fnum(r["total_token_throughput"], "%.2f"),
                fnum(r["output_throughput"], "%.2f"), trio(r["ttft_ms"], "%.2f") + "x",
                trio(r["tpot_ms"], "%.2f") + "x"))
    h = result.get("health")
    if h:
        print("GET /health on idle pressd: %s req/s (%s, %d connections, %ds; p99 %s ms)%s"
              % (fnum(h.get("requests_per_s"), "%.0f"), h["tool"], h["connections"],
                 h["duration_s"], fnum(h.get("latency", {}).get("p99_ms"), "%.2f"),
                 "; errors: %s" % h.get("socket_errors") if h.get("socket_errors") else ""))
    print("ratio = pressd / llama.cpp (throughput: higher is better for pressd; latency: lower)")
    print("result: %s" % result.get("path"))


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG (pip install matplotlib)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    drawn = 0
    for who, color in (("pressd", "C0"), ("llama.cpp", "C1")):
        rows = [r for r in result["runs"] if "error" not in r[who]]
        if not rows:
            continue
        drawn += 1
        cs = [r["concurrency"] for r in rows]
        axes[0].plot(cs, [r[who]["total_token_throughput"] for r in rows], "o-", color=color,
                     label=who)
        for stat, style in (("median", "o-"), ("p99", "s:")):
            axes[1].plot(cs, [r[who]["ttft_ms"][stat] for r in rows], style, color=color,
                         label="%s %s" % (who, stat))
            axes[2].plot(cs, [r[who]["tpot_ms"][stat] for r in rows], style, color=color,
                         label="%s %s" % (who, stat))
    if not drawn:
        plt.close(fig)
        return "no complete run: no PNG"
    cs = sorted({r["concurrency"] for r in result["runs"]})
    for ax, title, yl in ((axes[0], "throughput", "total tokens/s"),
                          (axes[1], "time to first token", "ms"),
                          (axes[2], "time per output token", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs)
        ax.set_xticklabels([str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    p = result["params"]
    fig.suptitle("%s: %s, %d/%d tokens, %d prompts, %d threads, %s (%s)" % (
        result["workload"], result["model"], p["input_len"], p["output_len"], p["num_prompts"],
        p["threads"], result["machine"], result["date"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(
        prog="bench-serve", description="cpu-short serving workload: pressd vs llama.cpp's "
        "server in one run (throughput, TTFT, TPOT at several concurrencies), plus GET /health "
        "requests/s.")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "pressd"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2, help="threads for each server [2]")
    ap.add_argument("--concurrency", default="1,8,32", help="comma list [1,8,32]")
    ap.add_argument("--num-prompts", type=int, default=64, help="per run [64]")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up requests per run [1]")
    ap.add_argument("--ctx", type=int, default=2048,
                    help="pressd --max-model-len; llama.cpp n_ctx per slot [2048]")
    ap.add_argument("--kv-cache-memory", default="512M",
                    help="pressd --kv-cache-memory ('' = its default) [512M]")
    ap.add_argument("--pressd-arg", action="append", default=[],
                    help="extra argument for pressd serve (repeatable; use --pressd-arg=--x)")
    ap.add_argument("--peer-arg", action="append", default=[],
                    help="extra argument for the peer server (repeatable)")
    ap.add_argument("--llama-server", metavar="PATH",
                    help="use this llama.cpp llama-server binary as the peer instead of "
                    "llama-cpp-python's server")
    ap.add_argument("--no-peer", action="store_true", help="measure pressd only")
    ap.add_argument("--health", choices=("on", "off", "only"), default="on",
                    help="the GET /health requests/s section [on]")
    ap.add_argument("--health-rps", dest="health", action="store_const", const="only",
                    help="same as --health only")
    ap.add_argument("--health-tool", choices=("auto", "wrk", "asyncio", "no-install"),
                    default="auto",
                    help="auto: wrk, installing it with apt-get when root; no-install: wrk "
                    "only if present; asyncio: the built-in client [auto]")
    ap.add_argument("--health-connections", type=int, default=64)
    ap.add_argument("--health-duration", type=int, default=10)
    ap.add_argument("--start-timeout", type=int, default=180, help="seconds per server start")
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds per pressd-bench run")
    ap.add_argument("--machine", default=os.environ.get("PRESSD_MACHINE")
                    or socket.gethostname().split(".")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (printed)")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    try:
        conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error("--concurrency: a comma list of integers")
    if not conc or min(conc) < 1:
        ap.error("--concurrency: positive integers")
    args.conc = conc
    if args.input_len + args.output_len + 8 > args.ctx:
        ap.error("--ctx must exceed input + output tokens")
    if not os.path.isfile(args.model):
        raise SystemExit("bench-serve: model %s not found (scripts/fetch-model)" % args.model)
    if not os.access(args.bin, os.X_OK):
        raise SystemExit("bench-serve: pressd binary %s not found (scripts/build)" % args.bin)
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        raise SystemExit("bench-serve: %s is not an executable" % args.llama_server)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    logdir = tempfile.mkdtemp(prefix="bench-serve-")
    if not args.keep_logs:
        CLEANUP.append(logdir)
    tmpdir = os.path.join(logdir, "runs")
    os.makedirs(tmpdir)
    pressd = Pressd(args, logdir)
    peer = None
    if not args.no_peer and args.health != "only":
        peer = LlamaServer(args, logdir) if args.llama_server else LlamaCppPython(args, logdir)
        sys.stderr.write("bench-serve: %s\n" % peer.parallel_note())
    now = datetime.datetime.now()
    standard = (args.input_len, args.output_len, args.num_prompts, conc, args.threads) == \
        (STANDARD["input_len"], STANDARD["output_len"], STANDARD["num_prompts"],
         STANDARD["concurrency"], 2)
    runs, health, warnings = [], None, []
    load0 = os.getloadavg()
    try:
        if args.health != "only":
            for k, c in enumerate(conc):
                order = [pressd, peer] if k % 2 == 0 else [peer, pressd]
                row = {"concurrency": c, "order": [s.name for s in order if s]}
                full = {}
                for srv in order:
                    if srv is None:
                        continue
                    url = srv.ensure(c)
                    full[srv.name] = run_bench(args, url, c, srv.name, tmpdir)
                    row[srv.name] = brief(full[srv.name])
                if peer:
                    row["ratio_pressd_over_llama"] = ratios(row["pressd"], row["llama.cpp"])
                else:
                    row["llama.cpp"] = {"error": "no peer (--no-peer)"}
                    row["ratio_pressd_over_llama"] = None
                row["full"] = full
                runs.append(row)
            if peer:
                peer.stop()
        if args.health != "off":
            pressd.ensure(1)
            time.sleep(1.0)   # let the engine settle: idle
            health = health_rps(args, pressd.url(), pressd.port)
    finally:
        pressd_desc = pressd.describe() if pressd.proc or pressd.port else None
        peer_desc = peer.describe() if peer else {"kind": "none", "parallel_note": "no peer"}
        stop_all()

    if pressd.warning:
        warnings.append(pressd.warning)
    for row in runs:
        for who in ("pressd", "llama.cpp"):
            x = row.get(who, {})
            if "error" in x and who in row.get("order", []):
                warnings.append("c=%d %s: %s" % (row["concurrency"], who, x["error"]))
            elif x.get("failed"):
                warnings.append("c=%d %s: %d failed requests, first: %s"
                                % (row["concurrency"], who, x["failed"], x["first_errors"][:1]))
            elif x.get("output_len_mismatches"):
                warnings.append("c=%d %s: %d requests with an output length other than %d"
                                % (row["concurrency"], who, x["output_len_mismatches"],
                                   args.output_len))
    import llama_cpp
    result = {
        "benchmark": "serve",
        "workload": "cpu-short" if standard else "cpu-short (non-standard parameters)",
        "standard_workload": standard,
        "description": "streaming /v1/completions, random-word prompts of exactly input_len "
                       "tokens (same text for both servers), max_tokens = min_tokens = "
                       "output_len with ignore_eos, temperature 0; one pressd-bench process "
                       "per server and concurrency, servers alternating first (ABBA)",
        "date": now.isoformat(timespec="seconds"),
        "machine": args.machine,
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "git": git_info(),
        "model": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "params": {"threads": args.threads, "concurrency": conc,
                   "num_prompts": args.num_prompts, "input_len": args.input_len,
                   "output_len": args.output_len, "seed": args.seed, "warmup": args.warmup,
                   "ctx": args.ctx, "kv_cache_memory": args.kv_cache_memory,
                   "request_rate": "inf", "endpoint": "completions", "prompt_mode": "text",
                   "temperature": 0},
        "pressd": pressd_desc,
        "peer": peer_desc,
        "llama_cpp_python_version": llama_cpp.__version__,
        "warnings": warnings,
        "runs": runs,
        "health": health,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    base = "serve-cpu-short-%s-%s%s" % (now.strftime("%Y%m%d"), args.machine,
                                        "" if standard else "-smoke")
    if args.health == "only":
        base = "serve-health-%s-%s" % (now.strftime("%Y%m%d"), args.machine)
    path = os.path.join(args.out_dir, base + ".json")
    if os.path.exists(path):
        base += "-" + now.strftime("%H%M%S")
        path = os.path.join(args.out_dir, base + ".json")
    result["path"] = show_path(path)
    if runs:
        why = plot(result, os.path.join(args.out_dir, base + ".png"))
        if why:
            result["plot"] = None
            warnings.append(why)
        else:
            result["plot"] = show_path(os.path.join(args.out_dir, base + ".png"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    if runs:
        print_table(result)
    elif health:
        print("GET /health on idle pressd: %s req/s (%s, %d connections, %ds). Result: %s"
              % (fnum(health.get("requests_per_s"), "%.0f"), health["tool"],
                 health["connections"], health["duration_s"], result["path"]))
    for w in warnings:
        print("warning: %s" % w)
    if args.keep_logs:
        print("server logs: %s" % logdir)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
