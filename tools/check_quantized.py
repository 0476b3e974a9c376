#!/usr/bin/env python3
"""What `slm quantize` costs and whether llama.cpp reads what it writes (issue 5).

For each type: quantize SmolLM2-135M-Instruct (the Q4_1 GGUF from SLM_ASSETS) with slm, then
  - llama.cpp (llama-cpp-python) loads the file and greedy-decodes 3 prompts; slm must produce the
    same 16-token continuation (compared as text),
  - `slm eval compare` against the f32 reference (the original dequantized) on the first 20,000
    characters of WikiText-2 valid: perplexity, KL divergence, top-1 agreement,
  - `slm bench`: decode tok/s (2 threads).
Prints a markdown table for BENCHMARKS.md.

    pip install llama-cpp-python==0.3.2
    cargo build --release && python tools/check_quantized.py
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
SRC = ASSETS / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
SLM = ROOT / "target/release/slm"
PROMPTS = ["Once upon a time, there was a little", "The capital of France is", "def fibonacci(n):"]
TYPES = ["f32", "q8_0", "q4_0", "q4_k", None]  # None: the original Q4_1 file


def slm(*args):
    return subprocess.run([str(SLM), "--threads", "2", *args], check=True, capture_output=True, text=True).stdout


def llamacpp_greedy(path, prompt, n):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_threads=2, n_ctx=256, verbose=False, logits_all=True)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out = []
    llm.eval(ids)
    for _ in range(n):
        import numpy as np
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return llm.detokenize(out).decode("utf-8", errors="replace")


def main():
    tmp = Path(tempfile.mkdtemp())
    text = tmp / "wikitext.txt"
    text.write_text((ASSETS / "corpora/wikitext-2/valid.txt").read_text()[:20000])
    rows = []
    for t in TYPES:
        path = SRC if t is None else tmp / f"smollm2-{t}.gguf"
        if t is not None:
            slm("quantize", "-m", str(SRC), "-t", t, "-o", str(path))
        agree = []
        for p in PROMPTS:
            ours = slm("generate", "-m", str(path), "--temperature", "0", "-n", "16", "--ignore-eos", p)
            theirs = llamacpp_greedy(path, p, 16)
            agree.append(ours.strip() == theirs.strip())
            if ours != theirs:
                print(f"{t}: {p!r}: slm {ours} llama.cpp {theirs}", file=sys.stderr)
        cmp = json.loads(slm("eval", "compare", "-m", str(SRC), "-m", str(path), "--dtype", "f32", "--dtype", "auto",
                             "--text", str(text), "--json"))
        bench = json.loads(slm("bench", "-m", str(path), "--repeats", "3", "--json"))
        rows.append((t or "Q4_1 (original)", path.stat().st_size / 1e6, cmp["perplexity_b"], cmp["mean_kl"],
                     cmp["top1_agreement"], bench["decode_tok_s"], sum(agree)))
    print("| type | file (MB) | perplexity | mean KL vs f32 | top-1 agreement | decode tok/s | llama.cpp greedy = slm |")
    print("|---|---|---|---|---|---|---|")
    for name, mb, ppl, kl, top1, dec, ok in rows:
        print(f"| {name} | {mb:.1f} | {ppl:.4f} | {kl:.5f} | {100 * top1:.2f}% | {dec:.1f} | {ok}/3 |")


if __name__ == "__main__":
    main()
