#!/usr/bin/env python3
"""What `slm quantize` costs and whether llama.cpp reads what it writes (issue 5).

For each type: quantize SmolLM2-135M-Instruct (the Q4_1 GGUF from SLM_ASSETS) with slm, then
  - llama.cpp (llama-cpp-python) loads the file and greedy-decodes 3 prompts, compared (as text)
    with slm's 16-token continuation; where they part, the step and llama.cpp's logit gap there,
  - llama.cpp's sliding-window perplexity on the same text and windows, from its logits,
  - `slm eval compare` against the f32 reference (the original dequantized) on the first 20,000
    characters of WikiText-2 valid: perplexity, KL divergence, top-1 agreement,
  - `slm bench`: decode tok/s (2 threads).
Prints a markdown table for BENCHMARKS.md.

    pip install llama-cpp-python==0.3.16
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
    """llama.cpp's greedy continuation: (text, token ids, per-step logits, the model)."""
    from llama_cpp import Llama
    import numpy as np
    llm = Llama(model_path=str(path), n_threads=2, n_ctx=256, verbose=False, logits_all=True)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out, steps = [], []
    llm.eval(ids)
    for _ in range(n):
        s = np.array(llm.scores[llm.n_tokens - 1])
        t = int(np.argmax(s))
        out.append(t)
        steps.append(s)
        llm.eval([t])
    return llm.detokenize(out).decode("utf-8", errors="replace"), out, steps, llm


def llamacpp_perplexity(path, text, max_length=1024, stride=512, add_bos=False, special=False):
    """transformers' sliding-window perplexity computed from llama.cpp's logits, with the windows
    `slm eval perplexity` uses (and its tokens: a BOS for models whose tokenizer adds one, and
    special tokens written in the text read as such, as transformers' tokenizers do)."""
    from llama_cpp import Llama
    import numpy as np
    # Micro-batches of 16: on this AMX CPU, llama-cpp-python 0.3.16 mis-computes Q4_0/Q4_1
    # products for batches of 32+ tokens (perplexity 214 instead of 15.7 on the original file).
    llm = Llama(model_path=str(path), n_threads=2, n_ctx=max_length, n_batch=max_length,
                n_ubatch=16, verbose=False, logits_all=True)
    ids = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg = end - prev_end
        llm.reset()
        llm.eval(ids[begin:end])
        logits = np.array(llm.scores[:end - begin], dtype=np.float64)
        first = max(end - begin - trg, 1)
        z = logits[first - 1:end - begin - 1]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        target = np.array(ids[begin + first:end])
        nll -= logp[np.arange(len(target)), target].sum()
        count += len(target)
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll / count)), count


def split(llm, prompt, ours, out, steps):
    """Where slm's continuation (re-tokenized by llama.cpp) leaves llama.cpp's: the step, and how
    far below llama.cpp's own choice its logits put slm's token there."""
    n = len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    mine = llm.tokenize((prompt + ours).encode(), add_bos=False, special=True)[n:]
    k = next(i for i in range(min(len(out), len(mine))) if out[i] != mine[i])
    return k, float(steps[k][out[k]] - steps[k][mine[k]])


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
            ours = ours.removesuffix("\n")
            theirs, out, steps, llm = llamacpp_greedy(path, p, 16)
            agree.append(ours == theirs)
            if ours != theirs:
                k, gap = split(llm, p, ours, out, steps)
                print(f"{t}: {p!r}: split at step {k + 1}, where llama.cpp ranks slm's token {gap:.3f} "
                      f"below its own; slm {ours!r} llama.cpp {theirs!r}", file=sys.stderr)
        cmp = json.loads(slm("eval", "compare", "-m", str(SRC), "-m", str(path), "--dtype", "f32", "--dtype", "auto",
                             "--text", str(text), "--json"))
        bench = json.loads(slm("bench", "-m", str(path), "--repeats", "3", "--json"))
        lc_ppl, lc_tokens = llamacpp_perplexity(path, text.read_text())
        print(f"{t}: llama.cpp scored {lc_tokens} tokens, slm {cmp.get('tokens_scored')}", file=sys.stderr)
        rows.append((t or "Q4_1 (original)", path.stat().st_size / 1e6, cmp["perplexity_b"], lc_ppl,
                     cmp["mean_kl"], cmp["top1_agreement"], bench["decode_tok_s"], sum(agree)))
    print("| type | file (MB) | perplexity (slm) | perplexity (llama.cpp) | mean KL vs f32 | top-1 agreement "
          "| decode tok/s | llama.cpp greedy = slm |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mb, ppl, lc_ppl, kl, top1, dec, ok in rows:
        print(f"| {name} | {mb:.1f} | {ppl:.4f} | {lc_ppl:.4f} | {kl:.5f} | {100 * top1:.2f}% | {dec:.1f} "
              f"| {ok}/3 |")


if __name__ == "__main__":
    main()
