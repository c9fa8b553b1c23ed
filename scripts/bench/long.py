#!/usr/bin/env python3
"""The `cpu-long` serving workload (shared BENCH.md): what KV compression buys.

One KV pool, sized for exactly four full sequences (2,000 prompt + 200
output tokens, plus block rounding), and the same 32 prompts served at
compression ratios 1 (no compression), 2, 4, 8 and 16, one pressd after the
other in one run. For each: total and output tok/s, requests/s, TTFT/TPOT
percentiles and the peak of running sequences (scripts/pressd-bench), and from
/metrics the blocks compression freed, the time compression took and the time
the engine was busy. Writes bench/results/serve-cpu-long-<YYYYMMDD>-<machine>.json
and a PNG (tok/s and peak batch against the ratio), and prints a table.

  scripts/bench-long                          (the workload)
  scripts/bench-long --ratios 1,8 --num-prompts 8     (a smoke run)
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_info  # noqa: E402
from serve import free_port  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BENCH = os.path.join(ROOT, "scripts", "pressd-bench")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
BLOCK = 16


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        key = re.sub(r"\{model_name=\"[^\"]*\"", "{", name).replace("{}", "").replace("{,", "{")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def kv_bytes_for(seqs, tokens, el_bytes, layers=30, kv_heads=3, head_dim=64):
    """Bytes of pressd's KV pool for `seqs` sequences of `tokens` tokens, K
    and V of el_bytes each (plus a score and a position per slot)."""
    blocks = seqs * layers * kv_heads * -(-tokens // BLOCK)
    return blocks * BLOCK * (2 * head_dim * el_bytes + 4 + 4)


def serve(args, ratio, port, log, interval=None):
    cmd = [args.pressd, "serve", "--model", args.model, "--port", str(port),
           "--threads", str(args.threads), "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory", str(args.kv_bytes), "--kv-cache-dtype", args.kv_dtype]
    if ratio > 1:
        cmd += ["--kv-compression", "kvcompress", "--kv-compression-ratio", str(ratio),
                "--kv-layer-budget", args.layer_budget]
        if interval is not None:
            cmd += ["--kv-compression-interval", str(interval)]
    for a in args.serve_arg:
        cmd += a.split(None, 1)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return proc, base, cmd
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None:
                raise RuntimeError(f"pressd exited with {proc.returncode}")
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("pressd did not start")


def run_one(args, ratio, tmp, interval=None, num_prompts=None):
    port = free_port()
    with open(os.path.join(tmp, f"pressd-{ratio}-{interval}.log"), "w") as log:
        proc, base, cmd = serve(args, ratio, port, log, interval)
        try:
            out = os.path.join(tmp, f"bench-{ratio}.json")
            bench = [sys.executable, BENCH, "--base-url", base, "--dataset", "random",
                     "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                     "--num-prompts", str(num_prompts or args.num_prompts), "--request-rate", "inf",
                     "--seed", "7", "--result-json", out, "--quiet",
                     "--label", f"cpu-long ratio {ratio}"]
            t0 = time.time()
            subprocess.run(bench, check=True, timeout=args.timeout)
            wall = time.time() - t0
            m = metrics(base)
            with open(out) as f:
                res = json.load(f)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    s = res["summary"]
    busy = m.get("pressd:engine_busy_seconds_total", 0.0)
    comp = m.get("pressd:kv_compression_seconds_sum", 0.0)
    return {
        "ratio": ratio,
        "interval": interval,
        "command": cmd,
        "wall_seconds": wall,
        "summary": s,
        "peak_running": s.get("peak_running"),
        "kv_blocks_total": m.get("pressd:kv_blocks_total"),
        "kv_blocks_freed": m.get("pressd:kv_blocks_freed_total", 0.0),
        "kv_compressions": m.get("pressd:kv_compression_seconds_count", 0.0),
        "kv_compression_seconds": comp,
        "kv_forced_compressions": m.get("pressd:kv_forced_compressions_total", 0.0),
        "engine_busy_seconds": busy,
        "compression_fraction_of_engine": comp / busy if busy else None,
        "preemptions": m.get("vllm:num_preemptions_total", 0.0),
        "kept_fraction": m.get("pressd:kv_kept_fraction"),
    }


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG (pip install matplotlib)"
    r = [x["ratio"] for x in runs]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(r, [x["summary"]["total_token_throughput"] for x in runs], "o-", label="total")
    ax[0].plot(r, [x["summary"]["output_throughput"] for x in runs], "s-", label="output")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("compression ratio")
    ax[0].set_ylabel("tok/s")
    ax[0].legend()
    ax[0].set_title("throughput, cpu-long")
    ax[1].plot(r, [x["peak_running"] or 0 for x in runs], "o-")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("compression ratio")
    ax[1].set_ylabel("peak running sequences")
    ax[1].set_title("peak decode batch, same KV memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pressd", default=os.path.join(ROOT, "build", "pressd"))
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--ratios", default="1,2,4,8,16")
    ap.add_argument("--input-len", type=int, default=2000)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--full-seqs", type=int, default=4,
                    help="the pool holds this many full sequences uncompressed [4]")
    ap.add_argument("--kv-dtype", default="f16", choices=("f16", "f32"),
                    help="--kv-cache-dtype of every run; the pool is sized for it [f16]")
    ap.add_argument("--layer-budget", default="global", choices=("global", "uniform", "zigzag"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval-sweep", default="",
                    help="then, at --interval-ratio, these --kv-compression-interval values "
                         "(comma list; with --interval-prompts prompts)")
    ap.add_argument("--interval-ratio", type=float, default=8)
    ap.add_argument("--interval-prompts", type=int, default=16)
    ap.add_argument("--serve-arg", action="append", default=[], metavar="'--FLAG VALUE'",
                    help="one more option for every pressd serve (repeatable), for example "
                         "--serve-arg '--max-num-batched-tokens 512'")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per ratio [3600]")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--replot", metavar="JSON",
                    help="only draw the PNG of an earlier result file (next to it); run nothing")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as fh:
            old = json.load(fh)
        png = os.path.splitext(args.replot)[0] + ".png"
        why = plot(old["runs"], png)
        print(why or png)
        return 1 if why else 0
    seq_tokens = args.input_len + args.output_len + 10  # the prompt's BOS and rounding slack
    args.max_model_len = seq_tokens + 64
    args.kv_bytes = kv_bytes_for(args.full_seqs, seq_tokens, 2 if args.kv_dtype == "f16" else 4)
    ratios = [float(x) if "." in x else int(x) for x in args.ratios.split(",")]
    tmp = tempfile.mkdtemp(prefix="pressd-long-")
    runs = []
    for r in ratios:
        print(f"cpu-long: ratio {r} ...", file=sys.stderr, flush=True)
        runs.append(run_one(args, r, tmp))
        x = runs[-1]
        print(f"  {x['summary']['total_token_throughput']:.1f} tok/s, peak running {x['peak_running']}, "
              f"{x['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    sweep = []
    for iv in [int(x) for x in args.interval_sweep.split(",") if x]:
        print(f"cpu-long: ratio {args.interval_ratio}, interval {iv} ...", file=sys.stderr, flush=True)
        sweep.append(run_one(args, args.interval_ratio, tmp, iv, args.interval_prompts))
    base = runs[0] if runs[0]["ratio"] == 1 else None
    for x in runs:
        if base:
            x["total_tok_s_vs_ratio1"] = x["summary"]["total_token_throughput"] / base["summary"]["total_token_throughput"]
            x["peak_running_vs_ratio1"] = (x["peak_running"] or 0) / (base["peak_running"] or 1)
    day = datetime.date.today().strftime("%Y%m%d")
    machine = os.environ.get("PRESSD_MACHINE", socket.gethostname())
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"serve-cpu-long-{day}-{machine}")
    result = {
        "workload": "cpu-long",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": git_info(),
        "machine": {"name": machine, "cpu": cpu_model(), "cores": os.cpu_count()},
        "parameters": {k: v for k, v in vars(args).items()},
        "runs": runs,
        "interval_sweep": sweep,
    }
    note = plot(runs, stem + ".png")
    if note:
        result["note"] = note
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"| ratio | total tok/s | output tok/s | peak running | vs ratio 1 (tok/s, peak) | "
          f"compression / engine time | TTFT p50 s | TPOT p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for x in runs:
        s = x["summary"]
        vs = (f"{x.get('total_tok_s_vs_ratio1', 0):.2f}x, {x.get('peak_running_vs_ratio1', 0):.2f}x"
              if base else "-")
        cf = x["compression_fraction_of_engine"]
        print(f"| {x['ratio']} | {s['total_token_throughput']:.1f} | {s['output_throughput']:.1f} | "
              f"{x['peak_running']} | {vs} | {cf * 100 if cf is not None else 0:.2f}% | "
              f"{(s['ttft_ms']['median'] or 0) / 1000:.2f} | {s['tpot_ms']['median'] or 0:.1f} |")
    if sweep:
        print(f"\ninterval sweep at ratio {args.interval_ratio}, {args.interval_prompts} prompts:")
        print("| interval | total tok/s | peak running | compressions | compression / engine time |")
        print("|---|---|---|---|---|")
        for x in sweep:
            cf = x["compression_fraction_of_engine"] or 0
            print(f"| {x['interval']} | {x['summary']['total_token_throughput']:.1f} | {x['peak_running']} | "
                  f"{x['kv_compressions']:.0f} | {cf * 100:.2f}% |")
    print(f"results: {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
