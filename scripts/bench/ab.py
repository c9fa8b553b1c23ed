#!/usr/bin/env python3
"""A/B of pressd builds on `pressd generate`, runs interleaved.

On a shared or virtual machine the speed drifts by more than most kernel
changes; running the builds in turn, repeat after repeat, puts them through
the same drift. Each case is one prompt file and a number of generated
tokens; the figure kept is prefill or decode tok/s from --stats.

  scripts/bench/ab.py --build before=/tmp/pressd-old --build after=build/pressd \
      --build 'after, AMX off=PRESSD_CPU_AMX=0 build/pressd' \
      --case prefill:PROMPT.txt:8 --case decode:PROMPT.txt:400 --out results.json
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_info  # noqa: E402


def run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        sys.exit("ab: %s failed (%d): %s" % (" ".join(cmd), r.returncode, r.stderr[-2000:]))
    line = r.stderr.strip().splitlines()[-1]
    return json.loads(line[line.index("{"):])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True,
                    help="LABEL=[VAR=VALUE ...] BINARY")
    ap.add_argument("--case", action="append", required=True,
                    help="prefill|decode:PROMPT_FILE:MAX_TOKENS")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="JSON file for every run's figure")
    args = ap.parse_args()
    builds = []
    for b in args.build:
        label, rest = b.split("=", 1)
        parts, env = rest.split(), dict(os.environ)
        while parts and "=" in parts[0]:
            k, v = parts.pop(0).split("=", 1)
            env[k] = v
        builds.append((label, parts, env))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git": git_info(),
              "machine": {"name": os.environ.get("PRESSD_MACHINE", socket.gethostname()),
                          "cpu": cpu_model(), "cores": os.cpu_count()},
              "threads": args.threads, "repeats": args.repeats, "model": args.model,
              "builds": {label: " ".join(p) for label, p, _ in builds}, "cases": {}}
    for c in args.case:
        kind, prompt, ntok = c.split(":")
        key = {"prefill": "prefill_tok_s", "decode": "decode_tok_s"}[kind]
        runs = {label: [] for label, _, _ in builds}
        for _ in range(args.repeats):
            for label, cmd, env in builds:
                st = run(cmd + ["generate", "--model", args.model, "--prompt-file", prompt,
                                "--max-tokens", ntok, "--ignore-eos", "--temperature", "0",
                                "--threads", str(args.threads), "--stats"], env)
                runs[label].append(st[key])
        result["cases"][c] = {label: {"median": statistics.median(v), "runs": v}
                              for label, v in runs.items()}
        print("%s (%s tok/s, median of %d)" % (c, kind, args.repeats))
        for label, v in runs.items():
            print("  %-24s %8.1f   %s"
                  % (label, statistics.median(v), " ".join("%.1f" % x for x in v)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
