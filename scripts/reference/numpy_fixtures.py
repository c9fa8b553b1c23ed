"""Exact reference for the model test: the Llama forward of the default
model written out in NumPy, float64 throughout, on weights dequantised by
the `gguf` package (independent of both pressd and llama.cpp's C code).

For every case of tests/fixtures/model-smollm2.json (written first by
model_fixtures.py) it records, at the same teacher-forced positions, the
exact top-1 token and top-1 - top-2 margin, and the exact greedy
continuation (16 tokens). The model test uses it to measure how far pressd
and llama.cpp each are from exact arithmetic.

usage: numpy_fixtures.py MODEL_PATH OUT_PATH
"""
import json
import os
import sys

import numpy as np
import gguf
from gguf import dequantize

N_GREEDY = 16


def load(path):
    r = gguf.GGUFReader(path)
    f = r.fields

    def val(key):
        return f[key].contents()

    cfg = dict(
        L=int(val("llama.block_count")), H=int(val("llama.attention.head_count")),
        KV=int(val("llama.attention.head_count_kv")), E=int(val("llama.embedding_length")),
        eps=float(val("llama.attention.layer_norm_rms_epsilon")),
        theta=float(val("llama.rope.freq_base")))
    cfg["D"] = cfg["E"] // cfg["H"]
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else a.reshape(-1)
    return cfg, W


def forward(cfg, W, toks):
    L, H, KV, D, eps = cfg["L"], cfg["H"], cfg["KV"], cfg["D"], cfg["eps"]
    n = len(toks)
    E = W["token_embd.weight"]
    x = E[toks].copy()
    inv = cfg["theta"] ** (-np.arange(0, D, 2) / D)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    def rope(v):  # GGML "normal" RoPE: adjacent pairs
        x0, x1 = v[..., 0::2], v[..., 1::2]
        o = np.empty_like(v)
        o[..., 0::2] = x0 * cos - x1 * sin
        o[..., 1::2] = x0 * sin + x1 * cos
        return o

    mask = np.triu(np.full((n, n), -np.inf), 1)
    G = H // KV
    for l in range(L):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).reshape(n, H, D))
        k = rope((h @ W[p + "attn_k.weight"].T).reshape(n, KV, D))
        v = (h @ W[p + "attn_v.weight"].T).reshape(n, KV, D)
        out = np.empty((n, H, D))
        for hh in range(H):
            s = q[:, hh, :] @ k[:, hh // G, :].T / np.sqrt(D) + mask
            pr = np.exp(s - s.max(1, keepdims=True))
            pr /= pr.sum(1, keepdims=True)
            out[:, hh, :] = pr @ v[:, hh // G, :]
        x = x + out.reshape(n, H * D) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    out_w = W.get("output.weight", E)
    return rms(x, W["output_norm.weight"]) @ out_w.T


def top2(row):
    i = np.argsort(row)[-2:]
    return int(i[1]), float(row[i[1]] - row[i[0]])


def main():
    model, out = sys.argv[1], sys.argv[2]
    fx = json.load(open(os.path.join(os.path.dirname(out), "model-smollm2.json")))
    cfg, W = load(model)
    cases = []
    for c in fx["cases"]:
        toks = c["tf_tokens"]
        lg = forward(cfg, W, toks)
        start = c["tf_start"]
        tops = [top2(lg[i]) for i in range(start, len(toks))]
        seq = list(c["tokens"])
        greedy, gm = [], []
        for _ in range(N_GREEDY):
            t, m = top2(forward(cfg, W, seq)[-1])
            greedy.append(t)
            gm.append(round(m, 4))
            seq.append(t)
        cases.append({"name": c["name"], "tf_top1": [t for t, _ in tops],
                      "tf_margin": [round(m, 4) for _, m in tops],
                      "greedy": greedy, "greedy_margin": gm})
        print(c["name"], file=sys.stderr)
    json.dump({"description": "exact float64 NumPy forward on gguf-dequantised weights",
               "numpy_version": np.__version__, "model_sha256": fx.get("model_sha256"),
               "cases": cases}, open(out, "w"), separators=(",", ":"))


if __name__ == "__main__":
    main()
