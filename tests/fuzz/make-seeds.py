#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses into tests/fuzz/corpus/<name>/.

The files are checked in; run this again after changing it. An input that
reproduces a fixed bug goes next to them as a regression-* file, which this
script leaves alone. Every seed stays small: libFuzzer mutates from them.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "fuzz-key"  # the API key fuzz-http's server accepts


def write(kind, name, data):
    d = os.path.join(HERE, "corpus", kind)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- request bodies (fuzz-request, and fuzz-http's POSTs) ----------------------

COMPLETION_FULL = {
    "model": "fuzz-model", "prompt": "Once upon a time", "max_tokens": 8,
    "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
    "seed": 42, "stop": ["\n\n", "The end"], "stream": True,
    "stream_options": {"include_usage": True}, "logprobs": 2, "echo": False,
    "n": 1, "best_of": 1, "user": "u1", "ignore_eos": False,
    "kv_compression": {"method": "kvcompress", "ratio": 4, "layer_budget": "zigzag",
                       "protected_window": 8, "observation_window": 4, "interval": 16,
                       "sinks": 2, "score": "mean"},
}
CHAT_FULL = {
    "model": "fuzz-model",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "developer", "content": None},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    "max_completion_tokens": 6, "max_tokens": 100, "temperature": 0, "stop": "\n",
    "logprobs": True, "top_logprobs": 3, "stream": False, "add_generation_prompt": True,
    "kv_compression": {"method": "dbudget", "threshold": 0.5},
}
BODIES = {
    "completion-full.json": COMPLETION_FULL,
    "completion-min.json": {"prompt": "Hello", "max_tokens": 2},
    "completion-ids.json": {"prompt": [[1, 2, 3, 28, 1000]], "max_tokens": 3, "echo": True},
    "completion-echo.json": {"prompt": ["caf\u00e9 \u4f60\u597d <|im_end|>"], "echo": True,
                             "stop": None, "kv_compression": {"max_cache_tokens": 64}},
    "chat-full.json": CHAT_FULL,
    "chat-min.json": {"messages": [{"role": "user", "content": "Hi"}]},
    "chat-stream.json": {"messages": [{"role": "user", "content": "\U0001f600 ok"}],
                         "stream": True, "stream_options": {"include_usage": False},
                         "max_tokens": 3, "seed": -7},
    "tokenize-prompt.json": {"model": "fuzz-model", "prompt": "Hello <|im_start|> world",
                             "add_special_tokens": True},
    "tokenize-messages.json": {"messages": [{"role": "user", "content": "Hi"}],
                               "add_generation_prompt": False, "add_special_tokens": True},
    "detokenize.json": {"tokens": [19556, 905, 28, 0, 1, 2, 49151]},
    "bad-types.json": {"prompt": 5, "max_tokens": "x", "temperature": -1, "n": 2,
                       "stop": [1], "kv_compression": {"bogus": 1}},
}


def body(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---- HTTP requests (fuzz-http) --------------------------------------------------

def req(method, path, data=None, headers=(), version="1.1", auth=True):
    lines = [f"{method} {path} HTTP/{version}", "Host: localhost"]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    lines += list(headers)
    raw = b"" if data is None else (data.encode() if isinstance(data, str) else data)
    if data is not None and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def chunked(method, path, data, pieces=3):
    raw = data.encode()
    step = max(1, len(raw) // pieces)
    out = b""
    for i in range(0, len(raw), step):
        part = raw[i:i + step]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    out += b"0\r\n\r\n"
    return req(method, path, out, headers=("Transfer-Encoding: chunked",))


def http_seeds():
    c = body({"prompt": "The capital of France is", "max_tokens": 3})
    s = body({"messages": [{"role": "user", "content": "Hi"}], "stream": True,
              "stream_options": {"include_usage": True}, "max_tokens": 3, "logprobs": True,
              "top_logprobs": 2})
    return {
        "get-health": req("GET", "/health", auth=False),
        "get-models": req("GET", "/v1/models"),
        "get-metrics-version-ready": req("GET", "/metrics", auth=False)
        + req("GET", "/version", auth=False) + req("HEAD", "/ready", auth=False),
        "post-completion": req("POST", "/v1/completions", c),
        "post-completion-full": req("POST", "/v1/completions?x=1", body(COMPLETION_FULL)),
        "post-chat-stream": req("POST", "/v1/chat/completions", s),
        "post-chat-full": req("POST", "/v1/chat/completions", body(CHAT_FULL)),
        "post-chunked": chunked("POST", "/v1/completions", c),
        "post-tokenize": req("POST", "/tokenize", body(BODIES["tokenize-prompt.json"]))
        + req("POST", "/detokenize", body(BODIES["detokenize.json"])),
        "pipelined": req("GET", "/health", auth=False)
        + req("POST", "/v1/completions", body({"prompt": "a", "max_tokens": 2, "seed": 1}))
        + req("POST", "/v1/chat/completions", body({"messages": [{"role": "user",
                                                                  "content": "b"}],
                                                    "seed": 4, "stream": True}))
        + req("GET", "/v1/models") + req("POST", "/v1/completions",
                                         body({"prompt": "c", "seed": 5})),
        # a generation at the head, then more quick requests than the
        # pipeline holds: parsing pauses until the head is answered
        "pipeline-full": req("POST", "/v1/completions", body({"prompt": "Hi", "max_tokens": 4}))
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 20,
        "expect-continue": req("POST", "/v1/completions", c,
                               headers=("Expect: 100-continue",)),
        "http10-close": req("POST", "/v1/completions", body({"prompt": "x", "stream": True}),
                            version="1.0")
        + req("GET", "/health", auth=False),
        "connection-close": req("GET", "/version", headers=("Connection: close",), auth=False)
        + req("GET", "/health", auth=False),
        "unauthorized": req("POST", "/v1/completions", c, auth=False)
        + req("GET", "/v1/models", headers=("Authorization: Basic Zm9v",), auth=False),
        "not-found-and-method": req("GET", "/nope?q=%00", auth=False)
        + req("DELETE", "/v1/completions") + req("GET", "/tokenize", auth=False),
        "too-large": b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        "bad-request": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        "upgrade": req("GET", "/health", headers=("Connection: Upgrade", "Upgrade: h2c"),
                       auth=False),
        "partial-body": req("POST", "/v1/completions", c)[:-5],
    }


# ---- GGUF images (fuzz-gguf) ----------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def g_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def g_val(t, v):
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
    if t == STR:
        return g_str(v)
    if t == ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        return out + b"".join(g_val(et, x) for x in items)
    return struct.pack(fmt[t], v)


def gguf(kvs, tensors=(), version=3, align=32):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += g_str(k) + struct.pack("<I", t) + g_val(t, v)
    off = 0
    infos, data = b"", b""
    for name, dims, ttype, payload in tensors:
        infos += g_str(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ttype, off)
        pad = (-len(payload)) % align
        data += payload + b"\0" * pad
        off += len(payload) + pad
    out += infos
    out += b"\0" * ((-len(out)) % align)
    return out + data


def gguf_seeds():
    # a byte-level BPE vocabulary of a few tokens and merges, enough for the
    # tokenizer to build, with the ChatML template SmolLM2 uses
    byte_toks = ["a", "b", "c", "\u0120", "H", "e", "l", "o", "!", "1", "2"]
    toks = byte_toks + ["ab", "\u0120a", "He", "ll", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    types = [1] * (len(toks) - 3) + [3, 3, 3]
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
              "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok_kvs = [
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "smollm"),
        ("tokenizer.ggml.tokens", ARR, (STR, toks)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b", "\u0120 a", "H e", "l l"])),
        ("tokenizer.ggml.bos_token_id", U32, 15),
        ("tokenizer.ggml.eos_token_id", U32, 16),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
        ("tokenizer.chat_template", STR, chatml),
    ]
    llama_kvs = [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "tiny"),
        ("general.alignment", U32, 32),
        ("llama.block_count", U32, 1),
        ("llama.embedding_length", U32, 8),
        ("llama.feed_forward_length", U32, 16),
        ("llama.attention.head_count", U32, 2),
        ("llama.attention.head_count_kv", U32, 1),
        ("llama.context_length", U32, 64),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
    ]
    spm_toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(0x20, 0x30)] + \
        ["\u2581", "\u2581a", "b", "\u2581ab"]
    spm_kvs = [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, spm_toks)),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 3 + [-1.0] * 16 + [-2.0, -3.0, -4.0, -1.5])),
        ("tokenizer.ggml.token_type", ARR, (I32, [2, 3, 3] + [6] * 16 + [1] * 4)),
        ("tokenizer.ggml.add_space_prefix", BOOL, True),
        ("tokenizer.chat_template", STR, "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"),
    ]
    every_type = [
        ("u8", U8, 200), ("i8", I8, -5), ("u16", U16, 60000), ("i16", I16, -300),
        ("u32", U32, 7), ("i32", I32, -7), ("f32", F32, 0.5), ("bool", BOOL, True),
        ("str", STR, "caf\u00e9"), ("u64", U64, 2**63 + 1), ("i64", I64, -2**40),
        ("f64", F64, 1e300), ("arr.i16", ARR, (I16, [1, -2, 3])),
        ("arr.f64", ARR, (F64, [0.25, -1.0])), ("arr.str", ARR, (STR, ["x", "", "yz"])),
        ("arr.empty", ARR, (U8, [])),
    ]
    f32 = lambda n: struct.pack("<%df" % n, *([0.5] * n))
    return {
        "header-only.gguf": gguf([], version=3),
        "header-v2.gguf": gguf([("general.architecture", STR, "llama")], version=2),
        "every-type.gguf": gguf(every_type, [("t0", [4], 0, f32(4)),
                                             ("t1", [2, 3], 1, b"\0\x3c" * 6)]),
        "tokenizer-bpe.gguf": gguf(tok_kvs + [("general.name", STR, "tiny-bpe")]),
        "tokenizer-spm.gguf": gguf(spm_kvs),
        "chat-llama2.gguf": gguf(tok_kvs[:-1] + [("tokenizer.chat_template", STR,
                                                  "{{ bos_token }}[INST] <<SYS>>\n{{ system }}\n"
                                                  "<</SYS>>\n\n{{ content }} [/INST] "
                                                  "{{ answer }} {{ eos_token }}")]),
        "chat-llama3.gguf": gguf(tok_kvs[:-1] + [("tokenizer.chat_template", STR,
                                                  "<|begin_of_text|><|start_header_id|>system"
                                                  "<|end_header_id|>\n\nBe brief.<|eot_id|>")]),
        "llama-config.gguf": gguf(llama_kvs + tok_kvs, [
            ("token_embd.weight", [8, len(toks)], 0, f32(8 * len(toks))),
            ("output_norm.weight", [8], 0, f32(8)),
        ], align=32),
        "q8-tensor.gguf": gguf([("general.alignment", U32, 64)],
                               [("q", [32, 1], 8, b"\0\x3c" + bytes(range(32)))], align=64),
    }


# ---- text (fuzz-tokenizer) -----------------------------------------------------

TEXTS = {
    "english.txt": "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it?\n",
    "code.txt": "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass\n",
    "french-german.txt": "\u00c9t\u00e9 \u00e0 Z\u00fcrich: \u00fcbergro\u00dfe Stra\u00dfe, na\u00efve fa\u00e7ade.",
    "chinese.txt": "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\u3002",
    "japanese-korean.txt": "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "russian-arabic-hindi.txt": "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 "
                                "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 "
                                "\u0928\u092e\u0938\u094d\u0924\u0947",
    "emoji.txt": "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f3f3\ufe0f\u200d\U0001f308 "
                 "\U0001f1fa\U0001f1f8\U0001f44b\U0001f3fd ok",
    "special.txt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|endoftext|><|im_",
    "spaces-digits.txt": "   \t\t\n\n  1234567890 3.14159 1,000,000   x  ",
}
BINARY = {
    "invalid-utf8.bin": b"ok\xff\xfe\xc3(\xe4\xb8\xed\xa0\x80\xf4\x90\x80\x80\xc0\x80\x80",
    "nul-and-controls.bin": b"a\x00b\x01\x04\x06\x13\x14\x16\x1d\x7f c",
}


def main():
    for name, obj in BODIES.items():
        write("request", name, body(obj))
    for name, data in http_seeds().items():
        write("http", name, data)
    for name, data in gguf_seeds().items():
        write("gguf", name, data)
    for name, text in TEXTS.items():
        write("tokenizer", name, text)
    for name, data in BINARY.items():
        write("tokenizer", name, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
