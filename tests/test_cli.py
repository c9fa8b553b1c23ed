#!/usr/bin/env python3
"""Tests of the pressd executable's command line: bad input must end in a
clean error (exit status 1, or 2 for usage errors, never a signal), with a
one-line "pressd: ..." message on stderr that names the problem; the basic
positive paths must work.

Environment (set by meson):
  PRESSD_BIN       the pressd executable
  PRESSD_MODEL     the SmolLM2-135M Q4_1 GGUF; exit 77 (skip) when absent
  PRESSD_FIXTURES  tests/fixtures (unused here)
Optional:
  PRESSD_FUZZ_SEED          seed of the corrupted-header loop (default 20241)
  PRESSD_FUZZ_CASES         number of corrupted truncated headers (default 200)
  PRESSD_FUZZ_FULL_SECONDS  time budget for corrupted full-size models (default 15)

Standard library only. Run: python3 tests/test_cli.py
"""

import array
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.environ.get("PRESSD_BIN") or os.path.join(ROOT, "build", "pressd")
MODEL = os.environ.get("PRESSD_MODEL") or os.path.join(
    ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

FUZZ_SEED = int(os.environ.get("PRESSD_FUZZ_SEED", "20241"))
FUZZ_CASES = int(os.environ.get("PRESSD_FUZZ_CASES", "200"))
FUZZ_FULL_SECONDS = float(os.environ.get("PRESSD_FUZZ_FULL_SECONDS", "15"))

# ---------------------------------------------------------------------------
# GGUF reading and writing (just enough for the tests)

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
SCALAR_FMT = {T_U8: "B", T_I8: "b", T_U16: "H", T_I16: "h", T_U32: "I", T_I32: "i",
              T_F32: "f", T_BOOL: "?", T_U64: "Q", T_I64: "q", T_F64: "d"}
GGML_F32, GGML_F16, GGML_Q6_K = 0, 1, 14


class GGUFHeader:
    """Parsed header of a GGUF file: metadata and where the regions lie."""

    def __init__(self, path):
        with open(path, "rb") as f:
            # The SmolLM2 header is ~1.8 MB; read generously.
            self.buf = f.read(8 << 20)
        self.off = 0
        magic = self._take(4)
        if magic != b"GGUF":
            raise ValueError("not a GGUF file")
        self.version, self.n_tensors, self.n_kv = self._unpack("IQQ")
        self.kv = {}
        self.kv_start = self.off
        for _ in range(self.n_kv):
            key = self._str()
            (vtype,) = self._unpack("I")
            self.kv[key] = (vtype, self._value(vtype))
        self.kv_end = self.ti_start = self.off
        self.tensors = []
        for _ in range(self.n_tensors):
            name = self._str()
            (nd,) = self._unpack("I")
            ne = self._unpack("Q" * nd)
            ttype, offset = self._unpack("IQ")
            self.tensors.append((name, ne, ttype, offset))
        self.ti_end = self.off
        align = self.kv.get("general.alignment", (T_U32, 32))[1]
        self.data_start = (self.off + align - 1) // align * align

    def _take(self, n):
        if self.off + n > len(self.buf):
            raise ValueError("header larger than expected")
        b = self.buf[self.off:self.off + n]
        self.off += n
        return b

    def _unpack(self, fmt):
        fmt = "<" + fmt
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _str(self):
        (n,) = self._unpack("Q")
        return self._take(n).decode("utf-8", "replace")

    def _value(self, vtype):
        if vtype == T_STR:
            return self._str()
        if vtype == T_ARR:
            etype, n = self._unpack("IQ")
            return (etype, [self._value(etype) for _ in range(n)])
        return self._unpack(SCALAR_FMT[vtype])[0]


def _w_str(out, s):
    b = s.encode("utf-8")
    out += struct.pack("<Q", len(b)) + b


def _w_value(out, vtype, value):
    if vtype == T_STR:
        _w_str(out, value)
    elif vtype == T_ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype in SCALAR_FMT:
            out += struct.pack("<%d%s" % (len(items), SCALAR_FMT[etype]), *items)
        else:
            for item in items:
                _w_value(out, etype, item)
    else:
        out += struct.pack("<" + SCALAR_FMT[vtype], value)


def build_gguf(kvs, tensors, alignment=32):
    """kvs: [(key, vtype, value)], arrays as (T_ARR, (etype, items));
    tensors: [(name, ne, ggml_type, data_bytes)]. Returns the file bytes."""
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        _w_str(out, key)
        out += struct.pack("<I", vtype)
        _w_value(out, vtype, value)
    offset = 0
    offsets = []
    for name, ne, ttype, data in tensors:
        offsets.append(offset)
        _w_str(out, name)
        out += struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        out += struct.pack("<IQ", ttype, offset)
        offset += (len(data) + alignment - 1) // alignment * alignment
    out += b"\0" * (-len(out) % alignment)
    for (name, ne, ttype, data), off in zip(tensors, offsets):
        out += data
        out += b"\0" * (-len(out) % alignment)
    return bytes(out)


def bytes_to_unicode():
    """The GPT-2 byte-level alphabet: byte value -> printable character."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


TINY = {"n_embd": 128, "n_head": 2, "n_head_kv": 1, "n_ff": 256, "n_layer": 1, "n_ctx": 256}


def tiny_model(variant="ok", chat_template=None):
    """A tiny random-weight Llama GGUF with a byte-level BPE vocabulary.
    variant: "ok", "q6k" (ffn_down stored as Q6_K), "shape" (attn_q of the
    wrong size), "missing" (no ffn_up)."""
    rng = random.Random(7)
    d, ff, nh, nkv = TINY["n_embd"], TINY["n_ff"], TINY["n_head"], TINY["n_head_kv"]
    hd = d // nh
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = bytes_to_unicode()
    merges = ["\u0120 t", "h e", "\u0120t he", "i n"]
    tokens = specials + [byte_chars[b] for b in range(256)] + ["\u0120t", "he", "\u0120the", "in"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    n_vocab = len(tokens)

    def f32(*ne, scale=0.05, fill=None):
        n = 1
        for x in ne:
            n *= x
        if fill is not None:
            a = array.array("f", [fill]) * n
        else:
            a = array.array("f", (rng.gauss(0.0, scale) for _ in range(n)))
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()

    kvs = [
        ("general.architecture", T_STR, "llama"),
        ("general.name", T_STR, "pressd test tiny"),
        ("general.file_type", T_U32, 0),
        ("llama.block_count", T_U32, TINY["n_layer"]),
        ("llama.context_length", T_U32, TINY["n_ctx"]),
        ("llama.embedding_length", T_U32, d),
        ("llama.feed_forward_length", T_U32, ff),
        ("llama.attention.head_count", T_U32, nh),
        ("llama.attention.head_count_kv", T_U32, nkv),
        ("llama.rope.freq_base", T_F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
        ("llama.vocab_size", T_U32, n_vocab),
        ("llama.rope.dimension_count", T_U32, hd),
        ("tokenizer.ggml.add_space_prefix", T_BOOL, False),
        ("tokenizer.ggml.add_bos_token", T_BOOL, False),
        ("tokenizer.ggml.model", T_STR, "gpt2"),
        ("tokenizer.ggml.pre", T_STR, "smollm"),
        ("tokenizer.ggml.tokens", T_ARR, (T_STR, tokens)),
        ("tokenizer.ggml.token_type", T_ARR, (T_I32, types)),
        ("tokenizer.ggml.merges", T_ARR, (T_STR, merges)),
        ("tokenizer.ggml.bos_token_id", T_U32, 1),
        ("tokenizer.ggml.eos_token_id", T_U32, 2),
        ("tokenizer.ggml.unknown_token_id", T_U32, 0),
        ("tokenizer.ggml.padding_token_id", T_U32, 2),
    ]
    if chat_template:
        kvs.append(("tokenizer.chat_template", T_STR, chat_template))
    kvs.append(("general.quantization_version", T_U32, 2))

    q_ne = (d, d // 2) if variant == "shape" else (d, d)
    tensors = [
        ("token_embd.weight", (d, n_vocab), GGML_F32, f32(d, n_vocab, scale=0.5)),
        ("blk.0.attn_norm.weight", (d,), GGML_F32, f32(d, fill=1.0)),
        ("blk.0.attn_q.weight", q_ne, GGML_F32, f32(*q_ne)),
        ("blk.0.attn_k.weight", (d, nkv * hd), GGML_F32, f32(d, nkv * hd)),
        ("blk.0.attn_v.weight", (d, nkv * hd), GGML_F32, f32(d, nkv * hd)),
        ("blk.0.attn_output.weight", (d, d), GGML_F32, f32(d, d)),
        ("blk.0.ffn_norm.weight", (d,), GGML_F32, f32(d, fill=1.0)),
        ("blk.0.ffn_gate.weight", (d, ff), GGML_F32, f32(d, ff)),
    ]
    if variant != "missing":
        tensors.append(("blk.0.ffn_up.weight", (d, ff), GGML_F32, f32(d, ff)))
    if variant == "q6k":
        # Q6_K: 256 values per 210-byte block; one block per row of ff values.
        block = bytearray(rng.getrandbits(8) for _ in range(208)) + struct.pack("<e", 0.01)
        tensors.append(("blk.0.ffn_down.weight", (ff, d), GGML_Q6_K, bytes(block) * d))
    else:
        tensors.append(("blk.0.ffn_down.weight", (ff, d), GGML_F32, f32(ff, d)))
    tensors.append(("output_norm.weight", (d,), GGML_F32, f32(d, fill=1.0)))
    return build_gguf(kvs, tensors)


# ---------------------------------------------------------------------------
# Running pressd and checking results

results = []


def run(args, timeout=60):
    """(returncode, stdout, stderr); returncode None on timeout."""
    try:
        p = subprocess.run([BIN] + args, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode("utf-8", "replace"), \
            (e.stderr or b"").decode("utf-8", "replace")
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def describe_rc(rc):
    if rc is None:
        return "timed out"
    if rc < 0:
        try:
            import signal
            return "killed by %s" % signal.Signals(-rc).name
        except (ValueError, AttributeError):
            return "killed by signal %d" % -rc
    return "exit %d" % rc


SANITIZER = re.compile(r"Sanitizer|runtime error:|Segmentation fault|core dumped|Assertion .* failed")


def error_problem(rc, stderr, rcs=(1, 2), keywords=None):
    """None when (rc, stderr) is a clean error as required, else why not."""
    if rc is None or rc < 0 or rc not in rcs:
        return "%s (want exit %s)" % (describe_rc(rc), " or ".join(map(str, rcs)))
    if SANITIZER.search(stderr):
        return "sanitizer/crash report on stderr: %s" % stderr.strip().splitlines()[0][:200]
    lines = [l for l in stderr.splitlines() if l.strip()]
    if not lines:
        return "no message on stderr"
    last = lines[-1]
    if not last.startswith("pressd: "):
        return "last stderr line does not start with 'pressd: ': %r" % last[:200]
    if keywords and not any(k.lower() in last.lower() for k in keywords):
        return "message %r names none of %s" % (last[:200], keywords)
    return None


def record(name, problem, detail=""):
    ok = problem is None
    results.append((name, ok))
    line = "%-4s %s" % ("ok" if ok else "FAIL", name)
    if not ok:
        line += ": " + problem
    elif detail:
        line += "  (" + detail + ")"
    print(line, flush=True)


def last_line(stderr):
    lines = [l for l in stderr.splitlines() if l.strip()]
    return lines[-1][:160] if lines else ""


def expect_error(name, args, keywords, rcs=(1, 2), timeout=60):
    rc, out, err = run(args, timeout=timeout)
    record(name, error_problem(rc, err, rcs, keywords), last_line(err))


def gen_args(model, *extra):
    return ["generate", "--model", model, "--prompt", "Hello", "--max-tokens", "2",
            "--max-model-len", "128"] + list(extra)


# ---------------------------------------------------------------------------


def main():
    if not os.path.isfile(MODEL):
        print("skip: model %s not present (scripts/fetch-model)" % MODEL)
        return 77
    if not os.access(BIN, os.X_OK):
        print("FAIL: pressd binary %s not found or not executable" % BIN)
        return 1
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="pressd-test-cli-")
    try:
        run_cases(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [n for n, ok in results if not ok]
    print("\n%d cases, %d passed, %d failed (%.1f s)" % (
        len(results), len(results) - len(failed), len(failed), time.monotonic() - t_start))
    for n in failed[:40]:
        print("  failed: " + n)
    return 1 if failed else 0


def run_cases(tmp):
    hdr = GGUFHeader(MODEL)
    with open(MODEL, "rb") as f:
        head = f.read(max(2 << 20, hdr.data_start + 4096))
    real_template = hdr.kv.get("tokenizer.chat_template", (T_STR, None))[1]

    def write(name, data):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    # --- basics -------------------------------------------------------------
    rc, out, err = run(["--version"], timeout=30)
    problem = None
    if rc != 0:
        problem = describe_rc(rc)
    elif not re.search(r"\d+\.\d+", out + err):
        problem = "no version number in %r" % (out + err)[:200]
    record("--version prints a version", problem, (out or err).strip()[:60])

    rc, out, err = run(["--help"], timeout=30)
    problem = None
    if rc != 0:
        problem = describe_rc(rc)
    elif "generate" not in (out + err):
        problem = "help text does not mention 'generate'"
    record("--help exits 0 and lists generate", problem)

    # --- usage errors ---------------------------------------------------------
    expect_error("unknown top-level option", ["--frobnicate"],
                 ["unknown", "unrecognized", "invalid", "frobnicate"], rcs=(2,))
    expect_error("unknown generate option", gen_args(MODEL, "--frobnicate"),
                 ["unknown", "unrecognized", "invalid", "frobnicate"], rcs=(2,))
    expect_error("generate without --model", ["generate", "--prompt", "Hello"],
                 ["model"], rcs=(1, 2))
    expect_error("bad --max-tokens value", gen_args(MODEL, "--max-tokens", "abc"),
                 ["max-tokens", "invalid", "number", "integer"], rcs=(1, 2))

    # --- model files that are not models --------------------------------------
    expect_error("missing model file", gen_args(os.path.join(tmp, "no-such-model.gguf")),
                 ["no such file", "not found", "cannot open", "does not exist", "missing"])
    # A directory is how a safetensors model is given; an empty one has none
    # of its files.
    empty_dir = os.path.join(tmp, "empty-dir")
    os.mkdir(empty_dir)
    expect_error("empty directory as model", gen_args(empty_dir),
                 ["directory", "not a regular file", "is a dir", "config.json", "safetensors"])
    expect_error("empty model file", gen_args(write("empty.gguf", b"")),
                 ["empty", "too small", "truncated", "too short"])
    expect_error("truncated GGUF (first 1 KiB)", gen_args(write("trunc-1k.gguf", head[:1024])),
                 ["truncated", "past the end", "end of file", "too short"])
    trunc10 = os.path.join(tmp, "trunc-10m.gguf")
    with open(MODEL, "rb") as src, open(trunc10, "wb") as dst:
        dst.write(src.read(10 << 20))
    expect_error("truncated GGUF (first 10 MiB)", gen_args(trunc10),
                 ["truncated", "past the end", "end of file", "too short"])
    os.unlink(trunc10)
    expect_error("wrong magic", gen_args(write("magic.gguf", b"GGUX" + head[4:])),
                 ["magic", "not a gguf"])
    expect_error("text file as model", gen_args(write("text.gguf", b"hello world\n" * 100)),
                 ["magic", "not a gguf"])
    expect_error("unsupported GGUF version", gen_args(
        write("version.gguf", head[:4] + struct.pack("<I", 99) + head[8:])), ["version"])

    # --- hand-built tiny models -----------------------------------------------
    tiny_ok = write("tiny-ok.gguf", tiny_model("ok", real_template))
    rc, out, err = run(["generate", "--model", tiny_ok, "--prompt", "the cat", "--max-tokens", "4",
                        "--max-model-len", "64"], timeout=60)
    problem = None if rc == 0 else "%s: %s" % (describe_rc(rc), last_line(err))
    record("tiny valid GGUF (F32, 1 layer) loads and generates", problem)
    expect_error("tiny GGUF with a Q6_K weight", gen_args(
        write("tiny-q6k.gguf", tiny_model("q6k", real_template))), ["q6_k", "type 14"])
    expect_error("tiny GGUF with attn_q of the wrong shape", gen_args(
        write("tiny-shape.gguf", tiny_model("shape", real_template))),
        ["shape", "dimension", "mismatch", "size"])
    expect_error("tiny GGUF without ffn_up", gen_args(
        write("tiny-missing.gguf", tiny_model("missing", real_template))),
        ["ffn_up", "missing", "not found"])

    # --- --config files, --print-config, COMMAND --version ---------------------
    run_config_cases(tmp, tiny_ok)

    # --- the real model --------------------------------------------------------
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    expect_error("prompt longer than --max-model-len",
                 ["generate", "--model", MODEL, "--prompt", long_prompt, "--max-tokens", "4",
                  "--max-model-len", "64"],
                 ["context", "max-model-len", "too long", "exceed"], timeout=120)

    rc, out, err = run(["generate", "--model", MODEL, "--prompt", "The capital of France is",
                        "--max-tokens", "8"], timeout=300)
    problem = None
    if rc != 0:
        problem = "%s: %s" % (describe_rc(rc), last_line(err))
    elif not out.strip():
        problem = "empty completion on stdout"
    record("generate 'The capital of France is' (8 tokens)", problem, repr(out.strip()[:60]))

    rc, out, err = run(["generate", "--model", MODEL, "--prompt", "Hi", "--max-tokens", "4",
                        "--stats"], timeout=300)
    problem = None
    if rc != 0:
        problem = "%s: %s" % (describe_rc(rc), last_line(err))
    else:
        import json
        lines = [l for l in err.splitlines() if l.strip()]
        try:
            stats = json.loads(lines[-1]) if lines else None
            if not isinstance(stats, dict):
                raise ValueError
            missing = [k for k in ("prompt_tokens", "prefill_tok_s", "gen_tokens", "decode_tok_s",
                                   "peak_rss_mb", "load_s") if k not in stats]
            if missing:
                problem = "--stats JSON lacks %s" % missing
        except ValueError:
            problem = "--stats: last stderr line is not a JSON object: %r" % last_line(err)
    record("generate --stats prints a JSON line", problem)

    # --- eval-kv: JSON jobs on stdin, one result line per config ---------------
    run_eval_kv_cases()

    # --- corrupted headers (truncated copies: must always fail cleanly) -------
    fuzz_truncated(tmp, hdr, head[:2 << 20])
    # --- corrupted headers of full-size copies (may load; must not crash) -----
    fuzz_full(tmp, hdr)
    # --- safetensors directories and --load-format dummy ---------------------
    run_load_format_cases(tmp, real_template)


EXAMPLE_CONFIG = os.path.join(ROOT, "config", "pressd.example.json")
EXAMPLE_MODEL = "/var/lib/pressd/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_config_cases(tmp, model):
    import json

    def write_config(name, obj):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))
        return path

    def gen_tokens(args):
        """(tokens generated per --stats, None) or (None, problem)."""
        rc, out, err = run(args, timeout=60)
        if rc != 0:
            return None, "%s: %s" % (describe_rc(rc), last_line(err))
        lines = [l for l in err.splitlines() if l.strip()]
        try:
            return json.loads(lines[-1])["gen_tokens"], None
        except (IndexError, ValueError, KeyError, TypeError):
            return None, "--stats line missing: %r" % last_line(err)

    # The file drives generate: max-tokens and the flags come from it
    # (ignore_eos in snake case), the command line overrides it wherever
    # --config stands.
    cfg = write_config("generate.json", {
        "#": "a comment", "# max-tokens": "also a comment", "max-tokens": 3,
        "ignore_eos": True, "stats": True, "max-model-len": 64, "prompt": "the cat",
        "temperature": None})
    for name, args, want in [
            ("--config sets max-tokens", ["--config", cfg], 3),
            ("--max-tokens before --config overrides the file",
             ["--max-tokens", "5", "--config", cfg], 5),
            ("--max-tokens after --config overrides the file",
             ["--config=" + cfg, "--max-tokens=2"], 2)]:
        n, problem = gen_tokens(["generate", "--model", model] + args)
        if problem is None and n != want:
            problem = "generated %s tokens, want %d" % (n, want)
        record(name, problem)

    expect_error("--config with an unknown key", ["generate", "--config", write_config(
        "unknown.json", {"max-token": 3}), "--model", model], ["'max-token'"], rcs=(2,))
    expect_error("--config with a bad value", ["generate", "--config", write_config(
        "badvalue.json", {"max_tokens": "lots"}), "--model", model], ["'max_tokens'"], rcs=(2,))
    expect_error("--config with invalid JSON", ["generate", "--config", write_config(
        "syntax.json", '{\n"max-tokens": 3\n"chat": true}'), "--model", model],
        ["line 3"], rcs=(2,))
    expect_error("--config with a missing file", ["generate", "--config",
                                                  os.path.join(tmp, "none.json")],
                 ["none.json"], rcs=(2,))

    # The example file is --print-config's output for the defaults and one
    # model path, byte for byte.
    rc, out, err = run(["serve", "--print-config", "--model", EXAMPLE_MODEL], timeout=30)
    problem = None
    if rc != 0:
        problem = "%s: %s" % (describe_rc(rc), last_line(err))
    else:
        with open(EXAMPLE_CONFIG, encoding="utf-8") as f:
            example = f.read()
        if out != example:
            problem = ("config/pressd.example.json differs from the output of pressd serve "
                       "--print-config --model %s (regenerate it)" % EXAMPLE_MODEL)
    record("config/pressd.example.json is --print-config's output", problem)

    # What --print-config prints, --config reads back unchanged.
    rc, out, err = run(["generate", "--config", cfg, "--model", model, "--max-tokens", "7",
                        "--print-config"], timeout=30)
    problem = None
    if rc != 0:
        problem = "%s: %s" % (describe_rc(rc), last_line(err))
    else:
        printed = json.loads(out)
        if printed.get("max-tokens") != 7 or printed.get("ignore-eos") is not True:
            problem = "printed options are not the effective ones: %r" % {
                k: printed.get(k) for k in ("max-tokens", "ignore-eos")}
        else:
            rc2, out2, err2 = run(["generate", "--config", write_config("printed.json", out),
                                   "--print-config"], timeout=30)
            if rc2 != 0:
                problem = "reading it back: %s: %s" % (describe_rc(rc2), last_line(err2))
            elif out2 != out:
                problem = "printed again, the options differ"
    record("--print-config output reads back with --config", problem)

    for command in ("serve", "generate"):
        rc, out, err = run([command, "--version"], timeout=30)
        problem = None
        if rc != 0:
            problem = describe_rc(rc)
        elif not re.search(r"^pressd \d+\.\d+", out):
            problem = "no version on stdout: %r" % (out + err)[:200]
        record("pressd %s --version prints the version" % command, problem, out.strip())


def run_eval_kv_cases():
    import json
    jobs = [
        {"id": "ok", "prompt": "The quick brown fox jumps over the lazy dog. " * 30,
         "mode": "ppl", "eval_tokens": 16,
         "configs": [{"method": "none"}, {"ratio": 2, "protected_window": 8, "observation_window": 0},
                     {"method": "streaming", "ratio": 2, "protected_window": 8}]},
        {"id": "gen", "messages": [{"role": "user", "content": "Count: one, two, three"}],
         "mode": "generate", "max_tokens": 4, "configs": [{"method": "none"}, {"method": "dbudget"}]},
        {"id": "bad-mode", "prompt": "x", "mode": "sing", "configs": [{}]},
        {"id": "bad-config", "prompt": "hello there", "mode": "generate", "max_tokens": 2,
         "configs": [{"ratio": 0.5}]},
        {"id": "too-long", "prompt_tokens": [1] * 600, "mode": "generate", "max_tokens": 2,
         "configs": [{}]},
        # the last 16 queries observed apart: a windowed and a whole-prompt config from one prefill
        {"id": "window", "prompt": "The quick brown fox jumps over the lazy dog. " * 30,
         "mode": "ppl", "eval_tokens": 16,
         "configs": [{"ratio": 2, "protected_window": 8, "observation_window": 16},
                     {"ratio": 2, "protected_window": 8, "observation_window": 0}]},
        # compressed between prefill chunks of 64 tokens: a prefill of its own, the same budget
        {"id": "chunked", "prompt": "The quick brown fox jumps over the lazy dog. " * 30,
         "mode": "ppl", "eval_tokens": 16,
         "configs": [{"ratio": 2, "protected_window": 8, "prefill_chunk": 64},
                     {"ratio": 2, "protected_window": 8}]},
        {"id": "two-windows", "prompt": "hello there " * 20, "mode": "ppl", "eval_tokens": 4,
         "configs": [{"ratio": 2, "observation_window": 8},
                     {"ratio": 2, "observation_window": 16}]},
        # teacher-forced on given tokens: the argmax after P + [500, 600] is what a plain
        # generation from that prompt gives
        {"id": "ref", "prompt_tokens": list(range(100, 140)), "mode": "generate", "max_tokens": 3,
         "teacher_forced": True, "reference_tokens": [500, 600, 700],
         "configs": [{"method": "none"}]},
        {"id": "ref-check", "prompt_tokens": list(range(100, 140)) + [500, 600],
         "mode": "generate", "max_tokens": 1, "configs": [{"method": "none"}]},
        {"id": "ref-short", "prompt_tokens": [5, 6, 7], "mode": "generate", "max_tokens": 3,
         "teacher_forced": True, "reference_tokens": [500, 600], "configs": [{}]},
        {"id": "ref-vocab", "prompt_tokens": [5, 6, 7], "mode": "generate", "max_tokens": 2,
         "teacher_forced": True, "reference_tokens": [500, 10 ** 7], "configs": [{}]},
    ]
    stdin = "\n".join(json.dumps(j) for j in jobs) + "\nnot json\n"
    try:
        p = subprocess.run([BIN, "eval-kv", "--model", MODEL, "--max-model-len", "512"],
                           input=stdin.encode(), capture_output=True, timeout=300)
        rc, out, err = p.returncode, p.stdout.decode(), p.stderr.decode()
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", ""
    problem = None
    try:
        rows = [json.loads(l) for l in out.splitlines() if l.strip()]
        by = {}
        for r in rows:
            by.setdefault(r.get("id"), []).append(r)
        ok = by.get("ok", [])
        if rc != 1:  # some jobs were bad: exit 1, the good ones still answered
            problem = "%s (want exit 1 after bad jobs)" % describe_rc(rc)
        elif SANITIZER.search(err):
            problem = "sanitizer/crash report on stderr"
        elif len(ok) != 3 or any("ppl" not in r or not r["ppl"] > 1 for r in ok):
            problem = "ppl job: %r" % ok
        elif ok[0]["kv_tokens_evicted"] != 0 or ok[1]["kv_tokens_evicted"] <= 0:
            problem = "eviction counts: %r" % ok
        elif len(by.get("gen", [])) != 2 or any(len(r.get("tokens", [])) != 4 for r in by["gen"]):
            problem = "generate job: %r" % by.get("gen")
        elif (len(by.get("window", [])) != 2 or any(r.get("kv_tokens_evicted", 0) <= 0 for r in by["window"])
              or abs(by["window"][1]["ppl"] - ok[1]["ppl"]) > 0.05 * ok[1]["ppl"]):
            problem = "observation window job: %r (whole-prompt config %r)" % (by.get("window"), ok[1:2])
        elif (len(by.get("chunked", [])) != 2 or any(not r.get("ppl", 0) > 1 for r in by["chunked"])
              or abs(by["chunked"][0]["kv_tokens_kept"] - by["chunked"][1]["kv_tokens_kept"]) > 16
              or by["chunked"][0]["kv_tokens_kept"] + by["chunked"][0]["kv_tokens_evicted"]
              != by["chunked"][0]["n_context"]):
            problem = "chunked prefill job: %r" % by.get("chunked")
        elif (len(by.get("ref", [])) != 1 or len(by.get("ref-check", [])) != 1
              or by["ref"][0]["forced_tokens"][2] != by["ref-check"][0]["tokens"][0]
              or by["ref"][0]["forced_tokens"][0] != by["ref"][0]["tokens"][0]):
            problem = "reference_tokens job: %r vs %r" % (by.get("ref"), by.get("ref-check"))
        elif not all("error" in by.get(k, [{}])[0] for k in ("bad-mode", "bad-config", "too-long",
                                                              "two-windows", "ref-short",
                                                              "ref-vocab")):
            problem = "bad jobs not reported as errors: %r" % rows
        elif not any(r.get("id") is None and "error" in r for r in rows):
            problem = "a line that is not JSON was not reported"
    except (ValueError, KeyError, TypeError) as e:
        problem = "output is not JSON lines (%s): %r" % (e, out[:300])
    record("eval-kv: results per config, bad jobs reported, others go on", problem,
           "%d result lines" % len(out.splitlines()))


def flip_region(rng, hdr):
    r = rng.random()
    if r < 0.25:
        return 0, min(1024, hdr.kv_end)            # fixed header + first metadata
    if r < 0.5:
        return hdr.ti_start, hdr.ti_end            # tensor descriptors
    return 0, min(64 << 10, hdr.kv_end)            # first 64 KiB


def corrupt(rng, base, hdr):
    data = bytearray(base)
    lo, hi = flip_region(rng, hdr)
    flips = []
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(lo, hi)
        data[pos] ^= rng.randrange(1, 256)
        flips.append(pos)
    return data, flips


def fuzz_truncated(tmp, hdr, base):
    rng = random.Random(FUZZ_SEED)
    path = os.path.join(tmp, "fuzz.gguf")
    bad = []
    t0 = time.monotonic()
    for i in range(FUZZ_CASES):
        data, flips = corrupt(rng, base, hdr)
        with open(path, "wb") as f:
            f.write(data)
        rc, out, err = run(gen_args(path), timeout=20)
        problem = error_problem(rc, err)
        if problem:
            bad.append("case %d (flips at %s): %s" % (i, flips, problem))
    detail = "%d cases, seed %d, %.1f s" % (FUZZ_CASES, FUZZ_SEED, time.monotonic() - t0)
    for b in bad[:10]:
        print("     " + b)
    record("corrupted truncated GGUF headers fail cleanly",
           None if not bad else "%d of %d cases: first: %s" % (len(bad), FUZZ_CASES, bad[0]),
           detail)


def fuzz_full(tmp, hdr):
    """Flip header bytes of a full-size copy; pressd may accept the file (some
    bytes do not matter) but must never crash or hang."""
    rng = random.Random(FUZZ_SEED + 1)
    path = os.path.join(tmp, "fuzz-full.gguf")
    shutil.copyfile(MODEL, path)
    with open(MODEL, "rb") as f:
        orig = f.read(hdr.ti_end)
    bad, n, accepted = [], 0, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < FUZZ_FULL_SECONDS and n < 400:
        data, flips = corrupt(rng, orig, hdr)
        with open(path, "r+b") as f:
            f.write(data)
        rc, out, err = run(gen_args(path), timeout=60)
        n += 1
        if rc == 0:
            accepted += 1
            problem = None if not SANITIZER.search(err) else "sanitizer report on stderr"
        else:
            problem = error_problem(rc, err)
        if problem:
            bad.append("case %d (flips at %s): %s" % (n - 1, flips, problem))
    os.unlink(path)
    for b in bad[:10]:
        print("     " + b)
    record("corrupted full-size GGUF headers never crash",
           None if not bad else "%d of %d cases: first: %s" % (len(bad), n, bad[0]),
           "%d cases, %d accepted, %.1f s" % (n, accepted, time.monotonic() - t0))


# ---------------------------------------------------------------------------
# Hugging Face directories (config.json, model.safetensors, tokenizer.json,
# tokenizer_config.json) made from the tiny GGUF, and --load-format dummy.

HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
            "output": "lm_head", "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_rows(data, rows, cols, n_head):
    """GGUF q/k rows (adjacent RoPE pairs) back to Hugging Face's rotate-half
    order: the inverse of convert_hf_to_gguf.py's permute."""
    rb = cols * 4
    hd = rows // n_head
    half = hd // 2
    out = [None] * rows
    for h in range(n_head):
        for i in range(half):
            for j in range(2):
                src = h * hd + 2 * i + j
                out[h * hd + j * half + i] = data[src * rb:(src + 1) * rb]
    return b"".join(out)


def build_safetensors(tensors):
    """tensors: [(name, shape, dtype, data_bytes)] -> file bytes."""
    import json
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [off, off + len(data)]}
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def hf_dir_from_gguf(path, gguf_path, chat_template):
    """A Hugging Face directory holding the same model as a tiny F32 GGUF."""
    import json
    g = GGUFHeader(gguf_path)
    with open(gguf_path, "rb") as f:
        blob = f.read()
    kv = {k: v[1] for k, v in g.kv.items()}
    n_head, n_kv = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    tensors = []
    for name, ne, ttype, offset in g.tensors:
        assert ttype == GGML_F32
        cols, rows = ne[0], (ne[1] if len(ne) > 1 else 1)
        data = blob[g.data_start + offset:g.data_start + offset + rows * cols * 4]
        base = name[:-len(".weight")]
        parts = base.split(".")
        if parts[0] == "blk":
            hf = "model.layers.%s.%s.weight" % (parts[1], HF_NAMES[parts[2]])
            if parts[2] in ("attn_q", "attn_k"):
                data = hf_rows(data, rows, cols, n_head if parts[2] == "attn_q" else n_kv)
        else:
            hf = HF_NAMES[base] + ".weight"
        tensors.append((hf, (rows, cols) if len(ne) > 1 else (cols,), "F32", data))
    os.mkdir(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(build_safetensors(tensors))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": kv["llama.embedding_length"],
              "num_hidden_layers": kv["llama.block_count"], "num_attention_heads": n_head,
              "num_key_value_heads": n_kv, "intermediate_size": kv["llama.feed_forward_length"],
              "vocab_size": kv["llama.vocab_size"],
              "max_position_embeddings": kv["llama.context_length"],
              "rope_theta": kv["llama.rope.freq_base"],
              "rms_norm_eps": kv["llama.attention.layer_norm_rms_epsilon"],
              "tie_word_embeddings": not any(t[0] == "output.weight" for t in g.tensors)}
    tokens = kv["tokenizer.ggml.tokens"][1]
    types = kv["tokenizer.ggml.token_type"][1]
    merges = kv["tokenizer.ggml.merges"][1]
    tok = {"version": "1.0",
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, t in enumerate(tokens) if types[i] == 3],
           "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                             "trim_offsets": True, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel"},
           "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                     "merges": merges}}
    tok_config = {"bos_token": tokens[kv["tokenizer.ggml.bos_token_id"]],
                  "eos_token": tokens[kv["tokenizer.ggml.eos_token_id"]],
                  "add_bos_token": False}
    if chat_template:
        tok_config["chat_template"] = chat_template
    for name, obj in (("config.json", config), ("tokenizer.json", tok),
                      ("tokenizer_config.json", tok_config)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)
    return path


def sharp_tiny_gguf(path, chat_template):
    """tiny_model's vocabulary and shapes with larger random weights, large
    q/k above all, so that attention (and so the q/k row order) decides the
    greedy text: with q/k rows left in Hugging Face order the text differs."""
    src = path + ".src"
    with open(src, "wb") as f:
        f.write(tiny_model("ok", chat_template))
    h = GGUFHeader(src)
    os.unlink(src)
    rng = random.Random(11)
    scale = {"attn_q": 0.6, "attn_k": 0.6, "token_embd": 1.0}
    tensors = []
    for name, ne, ttype, offset in h.tensors:
        n = 1
        for x in ne:
            n *= x
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        if "norm" in kind:
            a = array.array("f", [1.0]) * n
        else:
            a = array.array("f", (rng.gauss(0.0, scale.get(kind, 0.15)) for _ in range(n)))
        if sys.byteorder != "little":
            a.byteswap()
        tensors.append((name, ne, GGML_F32, a.tobytes()))
    with open(path, "wb") as f:
        f.write(build_gguf([(k, v[0], v[1]) for k, v in h.kv.items()], tensors))
    return path


def run_load_format_cases(tmp, real_template):
    import json
    tiny_gguf = sharp_tiny_gguf(os.path.join(tmp, "tiny-for-hf.gguf"), real_template)
    hf = hf_dir_from_gguf(os.path.join(tmp, "tiny-hf"), tiny_gguf, real_template)

    # The same weights from the GGUF and from the directory: the same greedy
    # text (q/k rows un-permuted right, tokenizer.json read right).
    args = ["--prompt", "the the in the cat in the hat", "--max-tokens", "24",
            "--max-model-len", "256", "--ignore-eos"]
    rc1, out1, err1 = run(["generate", "--model", tiny_gguf] + args)
    rc2, out2, err2 = run(["generate", "--model", hf] + args)
    problem = None
    if rc1 != 0:
        problem = "GGUF: %s: %s" % (describe_rc(rc1), last_line(err1))
    elif rc2 != 0:
        problem = "directory: %s: %s" % (describe_rc(rc2), last_line(err2))
    elif out1 != out2:
        problem = "greedy text differs: GGUF %r, directory %r" % (out1[:80], out2[:80])
    record("safetensors directory generates what the same GGUF does", problem, repr(out2[:40]))
    rc, out, err = run(["generate", "--model", hf, "--load-format", "safetensors", "--chat"]
                       + args)
    record("safetensors directory --chat (template from tokenizer_config.json)",
           None if rc == 0 else "%s: %s" % (describe_rc(rc), last_line(err)))

    # Damaged directory contents.
    st_path = os.path.join(hf, "model.safetensors")
    with open(st_path, "rb") as f:
        good = f.read()
    with open(st_path, "wb") as f:
        f.write(good[:len(good) // 2])
    expect_error("truncated model.safetensors", gen_args(hf),
                 ["past the end", "truncated", "model.safetensors"], rcs=(1,))
    with open(st_path, "wb") as f:
        f.write(good)
    os.unlink(os.path.join(hf, "tokenizer.json"))
    expect_error("directory without tokenizer.json", gen_args(hf), ["tokenizer.json"], rcs=(1,))
    expect_error("--load-format gguf with a directory", gen_args(hf, "--load-format", "gguf"),
                 ["directory", "gguf"], rcs=(1,))
    expect_error("--load-format safetensors with a file",
                 gen_args(tiny_gguf, "--load-format", "safetensors"), ["directory"], rcs=(1,))

    # --load-format dummy: a tiny Llama shape; the default GGUF's tokenizer.
    cfg = os.path.join(tmp, "dummy-config.json")
    with open(cfg, "w") as f:
        json.dump({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 128, "vocab_size": 49152,
                   "max_position_embeddings": 256, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": True}, f)
    dummy = ["generate", "--load-format", "dummy", "--prompt", "hi", "--max-tokens", "4"]
    rc, out, err = run(dummy + ["--dummy-config", cfg, "--model", MODEL], timeout=120)
    record("--load-format dummy --dummy-config (2 layers, hidden 64) generates",
           None if rc == 0 else "%s: %s" % (describe_rc(rc), last_line(err)),
           repr(out.strip()[:40]))
    rc2, out2, err2 = run(dummy + ["--dummy-config", cfg, "--model", MODEL], timeout=120)
    record("--load-format dummy is deterministic (same seed, same text)",
           None if (rc, out) == (rc2, out2) else "%r then %r" % (out[:60], out2[:60]))
    expect_error("--load-format dummy without --dummy-config", dummy + ["--model", MODEL],
                 ["dummy-config"], rcs=(1,))
    expect_error("--load-format dummy without --model", dummy + ["--dummy-config", cfg],
                 ["--model", "tokenizer"], rcs=(1,))
    small = os.path.join(tmp, "dummy-small-vocab.json")
    with open(cfg) as f:
        c = json.load(f)
    c["vocab_size"] = 1000
    with open(small, "w") as f:
        json.dump(c, f)
    expect_error("--load-format dummy with a vocab smaller than the tokenizer's",
                 dummy + ["--dummy-config", small, "--model", MODEL], ["vocab"], rcs=(1,))
    with open(small, "w") as f:
        f.write('{"num_hidden_layers": ')
    expect_error("--load-format dummy with a bad --dummy-config",
                 dummy + ["--dummy-config", small, "--model", MODEL], ["dummy-config"], rcs=(1,))

if __name__ == "__main__":
    sys.exit(main())
