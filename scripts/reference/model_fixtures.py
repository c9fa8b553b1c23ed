#!/usr/bin/env python3
"""Reference outputs of the model forward pass, computed with llama.cpp.

Usage: model_fixtures.py MODEL_PATH OUT_PATH

Runs llama.cpp (through the llama-cpp-python package) on a fixed set of
prompts and writes, per prompt:

  prompt, tokens        the prompt text and llama.cpp's token ids for it
                        (BOS added only if the model's metadata asks for it)
  greedy, greedy_margin the first 32 greedy tokens (argmax of the raw logits,
                        one low-level eval per token, EOS ignored) and the
                        top1 - top2 logit gap at each step
  tf_tokens             prompt tokens + 64 tokens of a fixed natural
                        continuation text (not the model's own output)
  tf_top1, tf_margin    argmax and top1 - top2 gap at each of the last 64
                        positions of tf_tokens (entry j is the prediction for
                        position tf_start + j + 1 given tf_tokens[0 .. tf_start + j])
  tf_logprob_next       log-probability of the actual next token at those
                        positions (63 values; the last position has no next token)
  logits_sample         (first 3 prompts only) the full logit vector at the
                        last prompt position, rounded to 4 decimals

The continuation texts are excerpts of licence texts shipped by Debian in
/usr/share/common-licenses (embedded here verbatim, whitespace reflowed, so
the output does not depend on the machine) and hand-written answers for the
chat-formatted prompts. Output is deterministic for a given llama.cpp build.
"""

import hashlib
import json
import math
import os
import sys

import numpy as np

N_GREEDY = 32
N_TF = 64
N_LOGITS_SAMPLE = 3


def chat(user, system=None):
    s = ""
    if system is not None:
        s += "<|im_start|>system\n" + system + "<|im_end|>\n"
    return s + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


# (name, kind, prompt, continuation). The continuation must tokenize to at
# least N_TF tokens; only its first N_TF tokens are used.
CASES = [
    ("capital-france", "question",
     "The capital of France is",
     " Paris, which is also the largest city in the country. Situated on the river Seine, in the north"
     " of the country, it is at the heart of the Ile-de-France region. The city has an estimated"
     " population of just over two million residents, while its metropolitan area is home to more"
     " than twelve million people. Paris is known for its museums, its architecture and its cafes."),
    ("gpl3-preamble", "prose",
     "The GNU General Public License is a free, copyleft license for software and other kinds of works.",
     " The licenses for most software and other practical works are designed to take away your freedom"
     " to share and change the works. By contrast, the GNU General Public License is intended to"
     " guarantee your freedom to share and change all versions of a program--to make sure it remains"
     " free software for all its users. We, the Free Software Foundation, use the GNU General Public"
     " License for most of our software; it applies also to any other work released this way by its"
     " authors."),
    ("chat-capital", "chat",
     chat("What is the capital of France?"),
     "The capital of France is Paris. It is located in the north-central part of the country, on the"
     " banks of the Seine river. Paris is the political, economic and cultural center of France and is"
     " famous for landmarks such as the Eiffel Tower, the Louvre Museum and the Cathedral of Notre-Dame."
     " About two million people live in the city itself.<|im_end|>"),
    ("apache-definitions", "prose",
     "\"License\" shall mean the terms and conditions for use, reproduction,",
     " and distribution as defined by Sections 1 through 9 of this document. \"Licensor\" shall mean the"
     " copyright owner or entity authorized by the copyright owner that is granting the License."
     " \"Legal Entity\" shall mean the union of the acting entity and all other entities that control,"
     " are controlled by, or are under common control with that entity. For the purposes of this"
     " definition, \"control\" means (i) the power, direct or indirect, to cause the direction or"
     " management of such entity."),
    ("apache-copyright-grant", "prose",
     "2. Grant of Copyright License. Subject to the terms and conditions of this License,",
     " each Contributor hereby grants to You a perpetual, worldwide, non-exclusive, no-charge,"
     " royalty-free, irrevocable copyright license to reproduce, prepare Derivative Works of, publicly"
     " display, publicly perform, sublicense, and distribute the Work and such Derivative Works in"
     " Source or Object form. 3. Grant of Patent License. Subject to the terms and conditions of this"
     " License, each Contributor hereby grants to You a perpetual, worldwide, non-exclusive, no-charge,"
     " royalty-free, irrevocable patent license."),
    ("gpl3-free-software", "prose",
     "When we speak of free software, we are referring to freedom, not price.",
     " Our General Public Licenses are designed to make sure that you have the freedom to distribute"
     " copies of free software (and charge for them if you wish), that you receive source code or can"
     " get it if you want it, that you can change the software or use pieces of it in new free"
     " programs, and that you know you can do these things. To protect your rights, we need to prevent"
     " others from denying you these rights or asking you to surrender the rights."),
    ("mpl2-definitions", "prose",
     "Mozilla Public License Version 2.0\n\n1. Definitions\n\n1.1. \"Contributor\"\n",
     "    means each individual or legal entity that creates, contributes to\n"
     "    the creation of, or owns Covered Software.\n\n"
     "1.2. \"Contributor Version\"\n"
     "    means the combination of the Contributions of others (if any) used\n"
     "    by a Contributor and that particular Contributor's Contribution.\n\n"
     "1.3. \"Contribution\"\n"
     "    means Covered Software of a particular Contributor.\n\n"
     "1.4. \"Covered Software\"\n"
     "    means Source Code Form to which the initial Contributor has attached\n"
     "    the notice in Exhibit A, the Executable Form of such Source Code\n"
     "    Form, and Modifications of such Source Code Form.\n"),
    ("bsd-conditions", "list",
     "Redistribution and use in source and binary forms, with or without\n"
     "modification, are permitted provided that the following conditions\n"
     "are met:\n",
     "1. Redistributions of source code must retain the above copyright\n"
     "   notice, this list of conditions and the following disclaimer.\n"
     "2. Redistributions in binary form must reproduce the above copyright\n"
     "   notice, this list of conditions and the following disclaimer in the\n"
     "   documentation and/or other materials provided with the distribution.\n"
     "3. Neither the name of the University nor the names of its contributors\n"
     "   may be used to endorse or promote products derived from this software\n"
     "   without specific prior written permission.\n"),
    ("artistic-preamble", "prose",
     "The intent of this document is to state the conditions under which a Package may be copied,",
     " such that the Copyright Holder maintains some semblance of artistic control over the development"
     " of the package, while giving the users of the package the right to use and distribute the"
     " Package in a more-or-less customary fashion, plus the right to make reasonable modifications."
     " Definitions: \"Package\" refers to the collection of files distributed by the Copyright Holder,"
     " and derivatives of that collection of files created through textual modification."),
    ("cc0-purpose", "prose",
     "Statement of Purpose\n\nThe laws of most jurisdictions throughout the world automatically confer",
     " exclusive Copyright and Related Rights (defined below) upon the creator and subsequent owner(s)"
     " (each and all, an \"owner\") of an original work of authorship and/or a database (each, a"
     " \"Work\"). Certain owners wish to permanently relinquish those rights to a Work for the purpose"
     " of contributing to a commons of creative, cultural and scientific works (\"Commons\") that the"
     " public can reliably and without fear of later claims of infringement build upon."),
    ("gfdl-purpose", "prose",
     "The purpose of this License is to make a manual, textbook, or other functional and useful document",
     " \"free\" in the sense of freedom: to assure everyone the effective freedom to copy and"
     " redistribute it, with or without modifying it, either commercially or noncommercially."
     " Secondarily, this License preserves for the author and publisher a way to get credit for their"
     " work, while not being considered responsible for modifications made by others. This License is"
     " a kind of \"copyleft\", which means that derivative works of the document must themselves be"
     " free in the same sense."),
    ("lgpl21-preamble", "prose",
     "This license, the Lesser General Public License, applies to some specially designated software",
     " packages--typically libraries--of the Free Software Foundation and other authors who decide to"
     " use it. You can use it too, but we suggest you first think carefully about whether this license"
     " or the ordinary General Public License is the better strategy to use in any particular case,"
     " based on the explanations below. When we speak of free software, we are referring to freedom of"
     " use, not price."),
    ("python-fib", "code",
     "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
     "    if n < 0:\n"
     "        raise ValueError(\"n must be non-negative\")\n"
     "    a, b = 0, 1\n"
     "    for _ in range(n):\n"
     "        a, b = b, a + b\n"
     "    return a\n\n\n"
     "def main():\n"
     "    for i in range(10):\n"
     "        print(i, fibonacci(i))\n\n\n"
     "if __name__ == \"__main__\":\n"
     "    main()\n"),
    ("c-main", "code",
     "#include <stdio.h>\n#include <stdlib.h>\n\nint main(int argc, char **argv)\n{\n",
     "    if (argc < 2) {\n"
     "        fprintf(stderr, \"usage: %s FILE\\n\", argv[0]);\n"
     "        return 1;\n"
     "    }\n"
     "    FILE *f = fopen(argv[1], \"r\");\n"
     "    if (!f) {\n"
     "        perror(argv[1]);\n"
     "        return 1;\n"
     "    }\n"
     "    int c;\n"
     "    long lines = 0;\n"
     "    while ((c = fgetc(f)) != EOF)\n"
     "        if (c == '\\n')\n"
     "            lines++;\n"
     "    fclose(f);\n"
     "    printf(\"%ld\\n\", lines);\n"
     "    return 0;\n"
     "}\n"),
    ("js-fetch", "code",
     "// Fetch a JSON document and print the names it contains.\nasync function listNames(url) {\n",
     "  const response = await fetch(url);\n"
     "  if (!response.ok) {\n"
     "    throw new Error(`request failed with status ${response.status}`);\n"
     "  }\n"
     "  const data = await response.json();\n"
     "  for (const item of data.items) {\n"
     "    console.log(item.name);\n"
     "  }\n"
     "  return data.items.length;\n"
     "}\n"),
    ("shell-backup", "code",
     "#!/bin/sh\n# Back up the home directory to a dated archive.\nset -e\n",
     "dest=/var/backups/home\n"
     "stamp=$(date +%Y%m%d)\n"
     "mkdir -p \"$dest\"\n"
     "tar -czf \"$dest/home-$stamp.tar.gz\" -C / home\n"
     "# keep only the seven newest archives\n"
     "ls -1t \"$dest\"/home-*.tar.gz | tail -n +8 | xargs -r rm --\n"
     "echo \"backup written to $dest/home-$stamp.tar.gz\"\n"),
    ("sql-query", "code",
     "-- Total sales per customer in 2023\nSELECT",
     " c.customer_id,\n"
     "       c.name,\n"
     "       SUM(o.amount) AS total_amount,\n"
     "       COUNT(*) AS order_count\n"
     "FROM customers AS c\n"
     "JOIN orders AS o ON o.customer_id = c.customer_id\n"
     "WHERE o.order_date >= '2023-01-01'\n"
     "  AND o.order_date < '2024-01-01'\n"
     "GROUP BY c.customer_id, c.name\n"
     "ORDER BY total_amount DESC\n"
     "LIMIT 10;\n"),
    ("list-fruits", "list",
     "Here is a list of common fruits:\n1.",
     " Apple\n2. Banana\n3. Orange\n4. Grape\n5. Strawberry\n6. Pineapple\n7. Mango\n8. Watermelon\n"
     "9. Peach\n10. Pear\n11. Cherry\n12. Lemon\n13. Kiwi\n14. Plum\n15. Blueberry\n"),
    ("recipe", "list",
     "Pancakes\n\nIngredients:\n- 1 1/2 cups all-purpose flour\n-",
     " 3 1/2 teaspoons baking powder\n- 1 tablespoon white sugar\n- 1/4 teaspoon salt\n"
     "- 1 1/4 cups milk\n- 1 egg\n- 3 tablespoons butter, melted\n\n"
     "Instructions:\n1. In a large bowl, sift together the flour, baking powder, salt and sugar.\n"
     "2. Make a well in the center and pour in the milk, egg and melted butter; mix until smooth.\n"),
    ("qa-boiling", "question",
     "Q: What is the boiling point of water at sea level?\nA:",
     " The boiling point of water at sea level is 100 degrees Celsius, or 212 degrees Fahrenheit."
     " At higher altitudes the air pressure is lower, so water boils at a lower temperature.\n\n"
     "Q: What is the freezing point of water?\nA: Water freezes at 0 degrees Celsius, or 32 degrees"
     " Fahrenheit, under normal atmospheric pressure.\n"),
    ("why-sky-blue", "question",
     "Why is the sky blue?",
     " The sky appears blue because of a process called Rayleigh scattering. Sunlight is made of many"
     " colors, and when it enters the atmosphere it collides with the molecules of the gases in the"
     " air. Shorter wavelengths, such as blue and violet, are scattered much more strongly than longer"
     " wavelengths such as red. Our eyes are more sensitive to blue than to violet, so the sky looks"
     " blue."),
    ("chat-haiku", "chat",
     chat("Write a haiku about the ocean."),
     "Waves fold into foam,\nsalt wind carries the gull's cry,\nthe tide keeps its time.\n\n"
     "This haiku follows the traditional pattern of five, seven and five syllables. It describes the"
     " movement of the waves, the sound of the sea birds and the steady rhythm of the tides, which"
     " rise and fall twice a day.<|im_end|>"),
    ("chat-hash-table", "chat",
     chat("Explain what a hash table is in one paragraph."),
     "A hash table is a data structure that stores key-value pairs and lets you look up a value by its"
     " key in constant time on average. It works by passing each key through a hash function, which"
     " turns the key into an index in an array of buckets. When two keys map to the same bucket, the"
     " table resolves the collision, for example by keeping a short list in each bucket.<|im_end|>"),
    ("chat-system-reverse", "chat",
     chat("How do I reverse a list in Python?",
          system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
     "You can reverse a list in Python in several ways. To reverse it in place, call the reverse"
     " method:\n\n```python\nnumbers = [1, 2, 3, 4]\nnumbers.reverse()\nprint(numbers)  # [4, 3, 2, 1]\n```\n\n"
     "To get a new reversed list and keep the original unchanged, use slicing: `numbers[::-1]`.<|im_end|>"),
    ("chat-translate", "chat",
     chat("Translate 'good morning' into French and Spanish."),
     "In French, \"good morning\" is \"bonjour\". In Spanish, it is \"buenos d\u00edas\". Both greetings"
     " are used from the early morning until around midday. In the afternoon, French speakers usually"
     " keep saying \"bonjour\", while Spanish speakers switch to \"buenas tardes\". In the evening,"
     " the French say \"bonsoir\" and the Spanish say \"buenas noches\".<|im_end|>"),
    ("chat-sleep-tips", "chat",
     chat("Give me three tips for better sleep."),
     "Here are three tips for better sleep:\n\n1. Keep a regular schedule: go to bed and wake up at the"
     " same time every day, even on weekends.\n2. Limit screens before bed: the light from phones and"
     " laptops can make it harder to fall asleep.\n3. Avoid caffeine in the afternoon and evening.<|im_end|>"),
    ("chat-multi-turn", "chat",
     "<|im_start|>user\nHi! Can you help me plan a trip?<|im_end|>\n"
     "<|im_start|>assistant\nOf course! Where would you like to go, and for how long?<|im_end|>\n"
     "<|im_start|>user\nThree days in Rome in the spring.<|im_end|>\n<|im_start|>assistant\n",
     "Three days in Rome is a great plan. On the first day, visit the Colosseum, the Roman Forum and the"
     " Palatine Hill. On the second day, see Vatican City, including St. Peter's Basilica and the"
     " Vatican Museums with the Sistine Chapel. On the third day, walk from the Pantheon to the Trevi"
     " Fountain and the Spanish Steps.<|im_end|>"),
    ("counting", "list",
     "1, 2, 3, 4, 5,",
     " 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,"
     " 31, 32, 33, 34, 35, 36, 37, 38, 39, 40"),
    ("french-prose", "prose",
     "La tour Eiffel est",
     " une tour de fer puddl\u00e9 de 330 m\u00e8tres de hauteur situ\u00e9e \u00e0 Paris, \u00e0"
     " l'extr\u00e9mit\u00e9 nord-ouest du parc du Champ-de-Mars en bordure de la Seine. Construite"
     " par Gustave Eiffel et ses collaborateurs pour l'Exposition universelle de 1889, elle est devenue"
     " le symbole de la capitale fran\u00e7aise."),
    ("json-object", "code",
     "{\"name\": \"pressd\", \"version\": \"0.1.0\", \"dependencies\": {",
     "\"libuv\": \"1.44\", \"cjson\": \"1.7\", \"pcre2\": \"10.42\", \"openblas\": \"0.3.21\"},"
     " \"scripts\": {\"build\": \"meson setup build && ninja -C build\", \"test\": \"meson test -C build\"},"
     " \"license\": \"Apache-2.0\", \"keywords\": [\"llm\", \"server\", \"inference\"]}"),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top2(row):
    """Index of the max and the gap to the second largest value."""
    i = int(np.argmax(row))
    best = float(row[i])
    second = float(np.max(np.delete(row, i)))
    return i, best - second


def r4(x):
    return float(round(float(x), 4))


def main():
    if len(sys.argv) != 3:
        print("usage: model_fixtures.py MODEL_PATH OUT_PATH", file=sys.stderr)
        return 2
    model_path, out_path = sys.argv[1], sys.argv[2]

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=2048, logits_all=True, n_threads=2,
                n_batch=512, verbose=False, seed=0)
    add_bos_meta = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"
    n_vocab = llm.n_vocab()

    bos_text = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")

    def tokenize(text, with_bos):
        toks = llm.tokenize(text.encode("utf-8"), add_bos=with_bos, special=True)
        if (not with_bos and toks and toks[0] == llm.token_bos()
                and not text.startswith(bos_text)):
            # llama.cpp decides BOS from the vocabulary; with add_bos_token
            # false it must not have added one.
            raise SystemExit("unexpected BOS in tokenization of %r" % text[:40])
        return toks

    cases = []
    for idx, (name, kind, prompt, continuation) in enumerate(CASES):
        toks = tokenize(prompt, add_bos_meta)
        cont = tokenize(continuation, False)
        if add_bos_meta and cont and cont[0] == llm.token_bos():
            cont = cont[1:]
        if len(cont) < N_TF:
            raise SystemExit("continuation of case %r has only %d tokens (need %d)"
                             % (name, len(cont), N_TF))

        # Greedy: full prompt eval, then one token at a time.
        llm.reset()
        llm.eval(toks)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits_sample = None
        if idx < N_LOGITS_SAMPLE:
            logits_sample = [r4(v) for v in last]
        greedy, greedy_margin = [], []
        row = last
        for _ in range(N_GREEDY):
            t, m = top2(row)
            greedy.append(t)
            greedy_margin.append(r4(m))
            llm.eval([t])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

        # Teacher forcing over prompt + continuation in one eval.
        tf_tokens = toks + cont[:N_TF]
        llm.reset()
        llm.eval(tf_tokens)
        n = len(tf_tokens)
        start = n - N_TF
        tf_top1, tf_margin, tf_lp = [], [], []
        for i in range(start, n):
            row = np.array(llm.scores[i], dtype=np.float64)
            t, m = top2(row)
            tf_top1.append(t)
            tf_margin.append(r4(m))
            if i + 1 < n:
                mx = row.max()
                lse = mx + math.log(float(np.exp(row - mx).sum()))
                tf_lp.append(r4(row[tf_tokens[i + 1]] - lse))

        case = {
            "name": name,
            "kind": kind,
            "prompt": prompt,
            "tokens": toks,
            "greedy": greedy,
            "greedy_margin": greedy_margin,
            "tf_tokens": tf_tokens,
            "tf_start": start,
            "tf_top1": tf_top1,
            "tf_margin": tf_margin,
            "tf_logprob_next": tf_lp,
        }
        if logits_sample is not None:
            case["logits_sample"] = logits_sample
        cases.append(case)
        print("%-24s prompt %3d tok  greedy min margin %.3f  tf min margin %.3f" % (
            name, len(toks), min(greedy_margin), min(tf_margin)), file=sys.stderr)

    out = {
        "description": "llama.cpp reference for the SmolLM2 forward pass; see "
                       "scripts/reference/model_fixtures.py for field meanings",
        "generator": "scripts/reference/model_fixtures.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": sha256_file(model_path),
        "n_vocab": n_vocab,
        "add_bos": add_bos_meta,
        "eos_token_id": llm.token_eos(),
        "settings": {"n_ctx": 2048, "n_batch": 512, "n_threads": 2, "logits_all": True,
                     "greedy_tokens": N_GREEDY, "greedy_ignores_eos": True,
                     "tf_positions": N_TF, "logits_sample_cases": N_LOGITS_SAMPLE,
                     "rounding_decimals": 4},
        "cases": cases,
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, out_path)
    print("wrote %s (%d cases, %d bytes)" % (out_path, len(cases), os.path.getsize(out_path)),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
