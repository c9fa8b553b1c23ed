#!/usr/bin/env python3
"""One llama.cpp single-stream measurement, run as its own process so that
its peak RSS is its own. Used by scripts/bench/generate.py.

Usage: llamacpp_worker.py SPEC_JSON
SPEC_JSON: {"model", "tokens" (prompt ids), "threads", "n_batch", "n_ctx",
            "gen_tokens", "warmup" (bool), "baseline" (bool: import only)}
Prints one JSON object on stdout.
"""

import json
import resource
import sys
import time


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    spec = json.loads(sys.argv[1])
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    if spec.get("baseline"):
        print(json.dumps({"peak_rss_mb": rss_mb()}))
        return 0

    t0 = time.perf_counter()
    llm = Llama(model_path=spec["model"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"],
                n_ubatch=spec["n_batch"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax():
        ptr = llm._ctx.get_logits_ith(-1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    tokens = spec["tokens"]
    if spec.get("warmup", True):
        llm.reset()
        llm.eval(tokens[:16])
        for _ in range(4):
            llm.eval([last_argmax()])

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    tok = last_argmax()
    t1 = time.perf_counter()
    generated = []
    for _ in range(spec["gen_tokens"]):
        llm.eval([tok])
        tok = last_argmax()
        generated.append(tok)
    t2 = time.perf_counter()

    prefill_s = t1 - t0
    decode_s = t2 - t1
    print(json.dumps({
        "prompt_tokens": len(tokens),
        "prefill_s": prefill_s,
        "prefill_tok_s": len(tokens) / prefill_s,
        "gen_tokens": spec["gen_tokens"],
        "decode_s": decode_s,
        "decode_tok_s": spec["gen_tokens"] / decode_s,
        "load_s": load_s,
        "peak_rss_mb": rss_mb(),
        "first_tokens": generated[:16],
        "llama_cpp_python_version": llama_cpp.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
