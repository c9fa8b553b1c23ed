#!/usr/bin/env python3
"""Golden tokenizer data for tests/test-tokenizer.c, produced by llama.cpp.

Builds a deterministic corpus (fixed seed) of more than a thousand strings:
hand-written edge cases (whitespace runs, contractions, digits, accents,
combining marks, CJK, emoji with ZWJ sequences and skin tones, special-token
text, code), slices of the license texts every Debian system has under
/usr/share/common-licenses, random mixtures of all of these, random code
points from every plane, a few long strings, and some ill-formed UTF-8 byte
strings. Each is tokenized by
llama.cpp (llama-cpp-python, vocab only) with parse_special=True, and a subset
with parse_special=False as well. Some id sequences are also decoded with
llama_detokenize (with and without special tokens) to check decoding.

Output (compact JSON):
  {"model": file name, "n_vocab": n, "bos": id, "eos": id, "add_bos": bool,
   "eog": [ids],
   "cases":  [{"text": str | "hex": bytes-as-hex (ill-formed UTF-8 or a NUL),
               "special": bool, "ids": [...]}],
   "decode": [{"ids": [...], "special": bool, "hex": bytes-as-hex}],
   "spm": {"gguf_hex": a tiny SentencePiece GGUF image, "add_bos": bool,
           "cases": [{"text", "special", "ids", "hex": its detokenized bytes}]},
   "pre_variants": [{"pre": name, "cases": [{"case": index into cases, "ids"}]}]}
  where pre_variants are the default model's vocabulary and merges under
  other tokenizer.ggml.pre names, tokenized with parse_special=True.

Usage: scripts/reference/tokenizer_fixtures.py MODEL.gguf OUT.json
Needs llama-cpp-python (see scripts/make-reference).
"""

import ctypes
import glob
import json
import os
import random
import struct
import sys
import tempfile

import llama_cpp

SEED = 20240611

SPECIAL_TEXTS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
    "<filename>", "<gh_stars>", "<jupyter_code>", "<empty_output>",
]

EDGE = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n\n", " \n", "\n ", " \t\n ",
    "a", "A", "ab", " a", "a ", " a ", "  a", "a  b", "a   b", "a\tb", "a\nb",
    "a \nb", "a\n\nb", "a \n \n b", "a\r\nb", "\t\tx", "x\t\t", "   x   ",
    "Hello world", "Hello, world!", "Hello  world", "hello\tworld\n",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX", "tHe QuIcK", "CamelCaseIdentifier", "snake_case_name",
    "it's", "It's", "IT'S", "it'S", "don't", "DON'T", "we'll", "WE'LL", "they're",
    "THEY'RE", "I've", "I'VE", "I'm", "I'M", "he'd", "HE'D", "'s", "'t", "'re",
    "'ve", "'m", "'ll", "'d", "' s", "''s", "'", "''", "'''", "rock'n'roll",
    "o'clock", "the dog's bone", "the dogs' bones", " 's", "x's's's",
    "0", "1", "12", "123", "1234", "12345", "123456789012345678901234567890",
    "3.14159", "1,000,000", "1 000 000", "-42", "+7", "1e10", "0x1F", "v1.2.3",
    "2024-06-11", "12:34:56", "$100", "100%", "a1b2c3", "abc123def", "١٢٣٤٥",
    "٣.١٤", "१२३", "①②③", "½ ¾", "Ⅻ", "²³", "٠", "𝟘𝟙𝟚",
    "café", "naïve", "résumé", "Ångström", "façade", "Zürich", "señor", "jalapeño",
    "e\u0301", "cafe\u0301", "a\u0308o\u0308u\u0308", "\u0301", " \u0301",
    "Привет, мир!", "Ελληνικά", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया",
    "สวัสดีชาวโลก", "გამარჯობა", "Բարեւ", "ሰላም", "ᚠᛇᚻ",
    "中文", "你好，世界！", "我爱北京天安门。", "日本語のテキスト", "カタカナ",
    "ひらがな", "한국어 텍스트", "漢字かな交じり文", "中文 English 混合",
    "𠀀𠀁", "𪚥", "\u3000", "a\u3000b",
    "😀", "👍", "👍🏽", "👋🏻👋🏼👋🏽👋🏾👋🏿", "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🏴‍☠️",
    "🇺🇸🇫🇷🇯🇵", "❤️", "✔️", "#️⃣", "1️⃣", "🤖 robots 🤖", "emoji😀inside",
    "🫠🫡🫶", "🪿", "\U0001FA77", "\U0001FAE8",
    "\u200b", "a\u200bb", "\u200d", "\ufeff", "\ufeffBOM", "\u00a0", "a\u00a0b",
    "a\u2028b", "a\u2029b", "a\u0085b", "a\u180eb", "a\u2009b", "\u202f",
    "\x00", "a\x00b", "\x01\x02\x03", "\x1b[31mred\x1b[0m", "\x7f", "\x1c\x1d\x1e\x1f",
    "\ue000", "\uffff", "\U0010FFFF", "\ufffd", "a\ufffdb",
    "\U00031350", "\U0002EBF0", "\U00011F50",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|><|im_start|>", "<|im_start|>  <|im_end|>", " <|im_start|> ",
    "<|im_start", "im_start|>", "<|im_start|", "<<|im_start|>>", "<|<|im_end|>|>",
    "<|endoftext|><|endoftext|>x", "x<|endoftext|>", "text<|im_end|>text",
    "<repo_name>pressd<file_sep>main.c", "<filename>a.py\n<gh_stars>10",
    "<jupyter_code>print(1)<empty_output>", "<|IM_START|>", "< |im_start| >",
    "<s>", "</s>", "[INST]", "<unk>", "<pad>",
    "def f(x):\n    return x * 2\n",
    "int main(void) {\n\treturn 0;\n}\n",
    "for (size_t i = 0; i < n; i++) a[i] += b[i];",
    '{"key": "value", "n": [1, 2, 3], "ok": true}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?query=1&x=y#frag", "user@example.com",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```\n",
    "x^2 + y_1 = z", "∑_{i=1}^{n} i² = n(n+1)(2n+1)/6", "∀x ∈ ℝ: x² ≥ 0", "α β γ δ",
    "→ ← ↑ ↓ ⇒", "©®™", "€£¥₹", "...", "…", "!!!", "???", "?!", "—", "–", "--", "---",
    "((()))", "[[]]", "{{}}", "<<>>", "a.b.c", "a,b,c", "a;b;c", "a/b/c", "a\\b\\c",
    "    indented", "\t\tindented", "trailing   ", "mixed \t \n \r spaces",
    "\n\n\n\n\n\n\n\n", " " * 17, "\t" * 9, " \n" * 7, "a" * 100, "ab" * 60,
    "1" * 40, "!" * 50, "=" * 80, "-" * 64, "😀" * 20, "中" * 30,
]

INVALID = [
    b"\xff", b"\xfe\xff", b"\xc3", b"\xc3(", b"abc\x80def", b"\x80\x81\x82",
    b"\xe4\xb8", b"\xe4\xb8a", b"\xf0\x9f\x98", b"\xf0\x9f\x98 ok", b"\xed\xa0\x80",
    b"\xed\xbf\xbf x", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xf8\x88\x80\x80\x80",
    b"ok\xffok\xfeok", b"<|im_start|>\xff<|im_end|>", b"caf\xe9", b"\xe2\x82",
    b"\x00\xff\x00", b"  \xa0  ", b"12\xb334",
]

WORDS = ("the of and to in is was for on that with as by it at from this be are or have "
         "not but an they which one you all were her she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people Mr how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three").split()

UNI = list("éèêëàâäôöûüçñßøåæœÉÀÇÑ中文字日本語韓국어한글ひらがなカタカナ"
           "абвгдежзийклмнопрстуфхцчшщыэюяΑΒΓΔαβγδεζηθאבגדהوزحطي٠١٢३४५") + [
    "😀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "❤️", "🤔", "\u0301", "\u200d", "\u00a0", "\u3000",
    "\u2028", "\u180e", "\ufeff", "𝕏", "𝟙", "½", "™", "€", "→", "…"]
WS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t", "\u00a0"]
PUNCT = list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + ["...", "--", "'s", "'ll", "'S", "n't"]


def license_text():
    parts = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    return "\n".join(parts) or " ".join(WORDS) * 50


def random_mix(rng, n):
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            w = rng.choice(WORDS)
            c = rng.random()
            out.append(w.upper() if c < 0.1 else w.capitalize() if c < 0.25 else w)
        elif r < 0.55:
            out.append(rng.choice(WS))
        elif r < 0.68:
            out.append(rng.choice(PUNCT))
        elif r < 0.78:
            out.append(str(rng.randrange(10 ** rng.randrange(1, 12))))
        elif r < 0.93:
            out.append("".join(rng.choice(UNI) for _ in range(rng.randrange(1, 5))))
        else:
            out.append(rng.choice(SPECIAL_TEXTS))
    return "".join(out)


def random_codepoints(rng, n):
    """n code points from all planes (unassigned ones too), no surrogates."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            c = rng.randrange(0x20, 0x7F)
        elif r < 0.35:
            c = ord(rng.choice(" \t\n\r\u00a0\u3000\u2028\u0085\u180e\u200b\u2009\u1680"))
        elif r < 0.75:
            c = rng.randrange(0x80, 0x10000)
        else:
            c = rng.randrange(0x10000, 0x110000)
        out.append(chr(0xFFFD if 0xD800 <= c <= 0xDFFF else c))
    return "".join(out)


def build_corpus(rng):
    texts = list(EDGE)
    lic = license_text()
    lines = [ln for ln in lic.split("\n")]
    # license lines and multi-line slices
    for _ in range(250):
        i = rng.randrange(len(lines))
        texts.append(lines[i])
    for _ in range(150):
        i = rng.randrange(len(lines))
        texts.append("\n".join(lines[i:i + rng.randrange(2, 12)]))
    for _ in range(80):
        a = rng.randrange(len(lic))
        texts.append(lic[a:a + rng.randrange(1, 400)])  # arbitrary cut points
    # random mixtures
    for _ in range(400):
        texts.append(random_mix(rng, rng.randrange(1, 40)))
    for _ in range(150):
        texts.append(random_codepoints(rng, rng.randrange(1, 24)))
    # word + specials in chat shape
    for _ in range(40):
        role = rng.choice(["system", "user", "assistant"])
        texts.append(f"<|im_start|>{role}\n{random_mix(rng, rng.randrange(1, 20))}<|im_end|>\n")
    # long strings
    for n in (2000, 5000, 12000):
        a = rng.randrange(len(lic) - n)
        texts.append(lic[a:a + n])
    texts.append(random_mix(rng, 3000))
    return texts


# ---------------------------------------------------------------------------
# A tiny SentencePiece ("llama") vocabulary, written as a GGUF image with no
# tensors: <unk> <s> </s>, 256 byte tokens, single characters and merged pieces
# with descending scores, one user-defined token.

SPM_PIECES = [
    "\u2581t", "he", "\u2581a", "in", "\u2581the", "er", "on", "\u2581s", "\u2581w", "or",
    "ll", "\u2581h", "\u2581o", "en", "\u2581he", "\u2581c", "lo", "\u2581b", "\u2581hel",
    "an", "at", "\u2581hello", "ld", "\u2581wor", "\u2581world", "ing", "\u2581in", "es",
    "\u2581f", "is", "\u2581is", "it", "\u2581it", "\u2581\u2581", "\u2581\u2581\u2581\u2581",
    "\u2581T", "\u2581Th", "\u2581The", "ar", "ou", "\u2581of", "\u2581an", "\u2581and",
    "st", "\u2581st", "\u4e2d", "\u6587", "\u4e2d\u6587", "\u2581\u4e2d",
]
SPM_CHARS = list("\u2581etaoinshrdlcumwfgypbvkjxqzTHEAOISWN.,!?'-0123456789\n\t")


def spm_gguf():
    toks, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    for b in range(256):
        toks.append("<0x%02X>" % b)
        types.append(6)
        scores.append(0.0)
    for i, p in enumerate(SPM_PIECES):
        toks.append(p)
        types.append(1)
        scores.append(-float(i))
    for i, c in enumerate(SPM_CHARS):
        if c in toks:
            continue
        toks.append(c)
        types.append(1)
        scores.append(-1000.0 - i)
    toks.append("<tool>")
    types.append(4)
    scores.append(0.0)

    def s(x):
        b = x.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    kvs = []

    def kv(key, vtype, payload):
        kvs.append(s(key) + struct.pack("<I", vtype) + payload)

    kv("general.architecture", 8, s("llama"))
    kv("general.name", 8, s("tiny-spm"))
    for key, val in (("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                     ("feed_forward_length", 16), ("attention.head_count", 1)):
        kv("llama." + key, 4, struct.pack("<I", val))
    kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5))
    kv("tokenizer.ggml.model", 8, s("llama"))
    kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(toks)) + b"".join(s(t) for t in toks))
    kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, len(scores)) +
       b"".join(struct.pack("<f", x) for x in scores))
    kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(types)) +
       b"".join(struct.pack("<i", x) for x in types))
    for key, val in (("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0)):
        kv("tokenizer.ggml." + key, 4, struct.pack("<I", val))
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    return head + b"".join(kvs)


SPM_TEXTS = [
    "", " ", "hello world", "Hello World", "The theater in the west", "  two  spaces",
    "hello\nworld\t!", "caf\u00e9", "\u4e2d\u6587 \u4e2d\u6587\u4e2d", "emoji \U0001F600!",
    "<s>hello</s>", "<s> hello", "a<tool>b", "x <tool> y", "<unk>", "it is 2024.",
    "the the the", "\u2581literal", "zzz qqq", "'s 'll",
]


def spm_reference():
    image = spm_gguf()
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(image)
        path = f.name
    try:
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        vocab = llm._model.vocab
        cases = []
        for t in SPM_TEXTS:
            for special in (True, False):
                ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=special)
                text = detokenize(vocab, ids, special)
                cases.append({"text": t, "special": special, "ids": ids, "hex": text.hex()})
        return {"gguf_hex": image.hex(), "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                "cases": cases}
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------
# The default model's vocabulary under other pre-tokenizer names: llama.cpp
# runs its custom GPT-2 / Llama-3 / Qwen2 splitters or std::regex for these,
# pressd runs PCRE2; the ids must agree.

PRE_VARIANTS = ["gpt-2", "llama-bpe", "qwen2", "default", "falcon", "deepseek-coder",
                "deepseek-v3", "tekken", "gpt-4o", "bloom", "qwen35", "seed-coder",
                "exaone-moe", "bailingmoe", "minicpm5", "viking", "chatglm-bpe", "starcoder"]
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


def gguf_raw_kvs(path):
    """(key, raw encoded kv bytes) for every metadata entry of a GGUF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"GGUF"
    _, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    off = 24

    def skip(vtype, off):
        if vtype in _SCALAR:
            return off + struct.calcsize(_SCALAR[vtype])
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", data, off)
            return off + 8 + n
        if vtype == 9:
            etype, n = struct.unpack_from("<IQ", data, off)
            off += 12
            if etype in _SCALAR:
                return off + n * struct.calcsize(_SCALAR[etype])
            for _ in range(n):
                off = skip(etype, off)
            return off
        raise ValueError(vtype)

    out = []
    for _ in range(n_kv):
        start = off
        (klen,) = struct.unpack_from("<Q", data, off)
        key = data[off + 8:off + 8 + klen].decode()
        off += 8 + klen
        (vtype,) = struct.unpack_from("<I", data, off)
        off = skip(vtype, off + 4)
        out.append((key, data[start:off]))
    return out


def variant_gguf(kvs, pre):
    def s(x):
        b = x.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    items = []
    for key, raw in kvs:
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.pre":
            items.append(raw)
        elif key == "general.architecture" or key.startswith("llama."):
            items.append(raw)
    items.append(s("tokenizer.ggml.pre") + struct.pack("<I", 8) + s(pre))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(items)) + b"".join(items)


def pre_variants(model_path, cases, rng):
    kvs = gguf_raw_kvs(model_path)
    arch = dict(kvs).get("general.architecture")
    assert arch is not None
    valid = [i for i, c in enumerate(cases) if "text" in c and c["special"]]
    sample = rng.sample(valid, 200) + [i for i, c in enumerate(cases) if "hex" in c][:12]
    out = []
    for pre in PRE_VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
            f.write(variant_gguf(kvs, pre))
            path = f.name
        try:
            llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            rows = []
            for i in sample:
                c = cases[i]
                data = c["text"].encode("utf-8") if "text" in c else bytes.fromhex(c["hex"])
                rows.append({"case": i, "ids": llm.tokenize(data, add_bos=False, special=True)})
            out.append({"pre": pre, "cases": rows})
            del llm
        finally:
            os.unlink(path)
    return out


def detokenize(vocab, ids, special):
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, False, special)
    assert n >= 0, n
    return buf.raw[:n]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: tokenizer_fixtures.py MODEL.gguf OUT.json")
    model_path, out_path = sys.argv[1], sys.argv[2]
    llm = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    rng = random.Random(SEED)

    def tok(data, special):
        return llm.tokenize(data, add_bos=False, special=special)

    cases = []
    texts = build_corpus(rng)
    for i, t in enumerate(texts):
        data = t.encode("utf-8")
        # a NUL would end the string on the C side: those go as hex
        key, val = ("hex", data.hex()) if "\x00" in t else ("text", t)
        cases.append({key: val, "special": True, "ids": tok(data, True)})
        if i % 3 == 0 or "<" in t:
            cases.append({key: val, "special": False, "ids": tok(data, False)})
    for b in INVALID:
        cases.append({"hex": b.hex(), "special": True, "ids": tok(b, True)})

    def detok(ids, special):
        return detokenize(vocab, ids, special)

    decode = []
    for c in rng.sample(cases, 150):
        for special in (True, False):
            decode.append({"ids": c["ids"], "special": special,
                           "hex": detok(c["ids"], special).hex()})
    for _ in range(100):  # arbitrary id sequences, incl. specials and partial UTF-8
        ids = [rng.randrange(n_vocab) if rng.random() < 0.9 else rng.randrange(17)
               for _ in range(rng.randrange(1, 12))]
        for special in (True, False):
            decode.append({"ids": ids, "special": special, "hex": detok(ids, special).hex()})

    out = {
        "model": os.path.basename(model_path),
        "llama_cpp_python": llama_cpp.__version__,
        "n_vocab": n_vocab,
        "bos": llm.token_bos(),
        "eos": llm.token_eos(),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "cases": cases,
        "decode": decode,
        "spm": spm_reference(),
        "pre_variants": pre_variants(model_path, cases, rng),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{out_path}: {len(cases)} cases, {len(decode)} decodes, "
          f"{os.path.getsize(out_path)} bytes")


if __name__ == "__main__":
    main()
