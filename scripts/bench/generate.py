#!/usr/bin/env python3
"""Single-stream generation benchmark: pressd against llama.cpp, same run.

Measures prefill tok/s on a fixed prompt of exactly --prompt-tokens tokens
and decode tok/s over --gen-tokens greedy tokens, for pressd (through its
CLI, `pressd generate ... --stats`) and for llama.cpp (through the
llama-cpp-python package, in a child process), with the same thread count
and batch size. Every repeat starts fresh processes for both; the order
alternates (ABBA) so slow drifts of a shared machine hit both alike. One
warm-up round is run first and discarded.

Run it through scripts/bench-generate, which provides the llama.cpp venv.
Writes bench/results/generate-<YYYYMMDD>-<machine>.json and prints a table.
"""

import argparse
import datetime
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from machine import cpu_model, git_info, gpu_model, sha256_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_worker.py")
TEXT_SOURCES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
                "/usr/share/common-licenses/GFDL-1.3"]


def make_prompt(model, n_tokens):
    """Text that llama.cpp's tokenizer turns into exactly n_tokens tokens."""
    from llama_cpp import Llama
    vocab = Llama(model_path=model, vocab_only=True, verbose=False)
    paras = []
    for src in TEXT_SOURCES:
        try:
            with open(src, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if para:
                paras.append(para)
    if not paras:
        raise SystemExit("bench-generate: no text source found in %s" % TEXT_SOURCES)
    full = "\n\n".join(paras)

    def tok(s):
        return vocab.tokenize(s.encode("utf-8"), add_bos=True, special=False)

    ids = tok(full)
    if len(ids) < n_tokens + 8:
        raise SystemExit("bench-generate: text sources too short for %d tokens" % n_tokens)
    bos = 1 if ids and ids[0] == vocab.token_bos() and not full.startswith("<|") else 0
    # Cut at a token boundary and keep the cut whose text re-tokenizes to
    # exactly n_tokens ids (the boundary token may merge differently).
    for cut in range(n_tokens, n_tokens + 16):
        body = ids[bos:cut]
        text = vocab.detokenize(body).decode("utf-8", errors="strict") if body else ""
        again = tok(text)
        if len(again) == n_tokens:
            return text, again
    raise SystemExit("bench-generate: could not build a %d-token prompt" % n_tokens)


def run_pressd(args, prompt_file):
    cmd = [args.bin, "generate", "--model", args.model, "--prompt-file", prompt_file,
           "--max-tokens", str(args.gen_tokens), "--temperature", "0",
           "--threads", str(args.threads), "--ignore-eos", "--stats",
           "--max-model-len", str(args.ctx)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            _, status, ru = wait4_timeout(p, args.timeout)
        except TimeoutError:
            raise SystemExit("bench-generate: pressd timed out after %ds: %s"
                             % (args.timeout, " ".join(cmd)))
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    rc = os.waitstatus_to_exitcode(status)
    lines = [l for l in stderr.splitlines() if l.strip()]
    if rc != 0 or not lines:
        raise SystemExit("bench-generate: pressd failed (exit %d): %s\n%s"
                         % (rc, " ".join(cmd), stderr[-2000:]))
    try:
        stats = json.loads(lines[-1])
    except ValueError:
        raise SystemExit("bench-generate: pressd --stats line is not JSON: %r" % lines[-1])
    stats["wall_s"] = wall
    stats["rusage_maxrss_mb"] = ru.ru_maxrss / 1024.0
    return stats


def wait4_timeout(p, timeout):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, ru
        if time.monotonic() > deadline:
            p.kill()
            os.wait4(p.pid, 0)
            p.returncode = -9
            raise TimeoutError
        time.sleep(0.01)


def run_llama(args, tokens, warmup=True, baseline=False):
    spec = {"model": args.model, "tokens": tokens, "threads": args.threads,
            "n_batch": args.n_batch, "n_ctx": args.ctx, "gen_tokens": args.gen_tokens,
            "warmup": warmup, "baseline": baseline}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL)
        try:
            _, status, ru = wait4_timeout(p, args.timeout)
        except TimeoutError:
            raise SystemExit("bench-generate: llama.cpp worker timed out after %ds" % args.timeout)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit("bench-generate: llama.cpp worker failed (exit %d)\n%s" % (rc, stderr[-2000:]))
    res = json.loads(stdout.strip().splitlines()[-1])
    res["rusage_maxrss_mb"] = ru.ru_maxrss / 1024.0
    return res


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "pressd"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch/n_ubatch")
    ap.add_argument("--ctx", type=int, default=1024,
                    help="context size: llama.cpp n_ctx and pressd --max-model-len")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per process")
    ap.add_argument("--machine", default=os.environ.get("PRESSD_MACHINE")
                    or socket.gethostname().split(".")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--no-llama-warmup", action="store_true",
                    help="skip llama.cpp's in-process warm-up eval before timing")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    if args.prompt_tokens + args.gen_tokens + 8 > args.ctx:
        ap.error("--ctx must exceed prompt + generated tokens")
    if not os.path.isfile(args.model):
        raise SystemExit("bench-generate: model file %s not found (scripts/fetch-model)" % args.model)
    if not os.access(args.bin, os.X_OK):
        raise SystemExit("bench-generate: pressd binary %s not found (ninja -C build)" % args.bin)

    import llama_cpp
    prompt_text, prompt_ids = make_prompt(args.model, args.prompt_tokens)
    fd, prompt_file = tempfile.mkstemp(prefix="bench-generate-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(prompt_text)

    try:
        version = subprocess.run([args.bin, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = None

    samples = {"pressd": [], "llama.cpp": []}
    try:
        print("bench-generate: warm-up round", file=sys.stderr)
        run_pressd(args, prompt_file)
        run_llama(args, prompt_ids, warmup=not args.no_llama_warmup)
        baseline = run_llama(args, prompt_ids, baseline=True)
        for r in range(args.repeats):
            order = ["pressd", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "pressd"]
            for who in order:
                if who == "pressd":
                    s = run_pressd(args, prompt_file)
                else:
                    s = run_llama(args, prompt_ids, warmup=not args.no_llama_warmup)
                samples[who].append(s)
                print("bench-generate: repeat %d/%d %-9s prefill %8.1f tok/s  decode %7.1f tok/s"
                      % (r + 1, args.repeats, who, s["prefill_tok_s"], s["decode_tok_s"]),
                      file=sys.stderr)
    finally:
        os.unlink(prompt_file)

    warnings = []
    for s in samples["pressd"]:
        if s.get("prompt_tokens") != args.prompt_tokens:
            warnings.append("pressd counted %s prompt tokens, llama.cpp %d"
                            % (s.get("prompt_tokens"), args.prompt_tokens))
            break
    for s in samples["pressd"]:
        if s.get("gen_tokens") != args.gen_tokens:
            warnings.append("pressd generated %s tokens, asked for %d"
                            % (s.get("gen_tokens"), args.gen_tokens))
            break

    stats = {}
    for who, ss in samples.items():
        stats[who] = {
            "prefill_tok_s": summary([s["prefill_tok_s"] for s in ss]),
            "decode_tok_s": summary([s["decode_tok_s"] for s in ss]),
            "peak_rss_mb": summary([s["peak_rss_mb"] for s in ss]),
            "rusage_maxrss_mb": summary([s["rusage_maxrss_mb"] for s in ss]),
            "load_s": summary([s["load_s"] for s in ss if "load_s" in s] or [0.0]),
        }
    ratios = {k: stats["pressd"][k]["median"] / stats["llama.cpp"][k]["median"]
              for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}

    now = datetime.datetime.now()
    result = {
        "benchmark": "generate",
        "description": "single stream: prefill of a fixed prompt, then greedy decode with EOS ignored",
        "date": now.isoformat(timespec="seconds"),
        "machine": args.machine,
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_model": gpu_model(),
        "git": git_info(),
        "pressd_version": version,
        "llama_cpp_python_version": llama_cpp.__version__,
        "model": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "params": {
            "threads": args.threads, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens, "llama_n_batch": args.n_batch,
            "llama_n_ubatch": args.n_batch, "ctx": args.ctx, "temperature": 0,
            "llama_inprocess_warmup": not args.no_llama_warmup, "warmup_rounds": 1,
            "order": "ABBA per repeat, fresh process per measurement",
            "prompt_source": TEXT_SOURCES,
            "prompt_sha256": hashlib.sha256(prompt_text.encode("utf-8")).hexdigest(),
            "pressd_cmd": [args.bin, "generate", "--model", args.model, "--prompt-file", "PROMPT",
                           "--max-tokens", str(args.gen_tokens), "--temperature", "0",
                           "--threads", str(args.threads), "--ignore-eos", "--stats",
                           "--max-model-len", str(args.ctx)],
        },
        "notes": [
            "pressd figures are its own --stats; llama.cpp prefill = time of llm.eval(prompt) + "
            "argmax, decode = gen_tokens x (llm.eval([tok]) + argmax), in a child process",
            "peak_rss_mb: pressd's own report / llama.cpp worker's getrusage (includes the Python "
            "interpreter, numpy and llama_cpp imports; see llama_baseline_rss_mb)",
            "rusage_maxrss_mb: measured by this script with wait4() for both",
        ],
        "llama_baseline_rss_mb": baseline["peak_rss_mb"],
        "warnings": warnings,
        "summary": stats,
        "ratio_pressd_over_llama": ratios,
        "samples": samples,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    base = "generate-%s-%s" % (now.strftime("%Y%m%d"), args.machine)
    path = os.path.join(args.out_dir, base + ".json")
    if os.path.exists(path):
        path = os.path.join(args.out_dir, "%s-%s.json" % (base, now.strftime("%H%M%S")))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    print()
    print("generate: %s, %d threads, %d prompt / %d generated tokens, %d repeats (median [min, max])"
          % (result["model"], args.threads, args.prompt_tokens, args.gen_tokens, args.repeats))
    print("  cpu: %s" % result["cpu_model"])
    print("%-20s %26s %26s %8s" % ("", "pressd", "llama.cpp", "ratio"))
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                       ("peak_rss_mb", "peak RSS MB")):
        cells = []
        for who in ("pressd", "llama.cpp"):
            s = stats[who][key]
            cells.append("%8.1f [%7.1f, %7.1f]" % (s["median"], s["min"], s["max"]))
        print("%-20s %26s %26s %7.2fx" % (label, cells[0], cells[1], ratios[key]))
    print("  (llama.cpp RSS includes %.0f MB of Python + imports)" % baseline["peak_rss_mb"])
    for w in warnings:
        print("  warning: " + w)
    print("wrote " + os.path.relpath(path, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
