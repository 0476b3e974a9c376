#!/usr/bin/env python3
"""Side-by-side decode/prefill benchmark: slm vs llama.cpp on the same GGUF, the same 256-token
prompt (tiny shakespeare) and the same thread count, alternating runs.

Two peers, each optional:
- native `llama-bench` (`--llama-bench PATH`): prefill = `-p 256 -n 0`, decode = `-p 0 -n 128
  -d 256` (128 tokens after a 256-token context), what issue 18 compares against. Build it from
  the llama.cpp source inside the llama-cpp-python 0.3.36 sdist:
      cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DLLAMA_CURL=OFF && cmake --build build --target llama-bench
- the Python binding (`pip install llama-cpp-python==0.3.36 numpy`; skipped with `--no-binding`),
  which also gives llama.cpp's load time and peak RSS (its decode carries the binding's
  per-token overhead).

    cargo build --release && python tools/bench_vs_llamacpp.py [--model F.gguf] \
        [--llama-bench build/bin/llama-bench] [--threads 2] [--repeats 5]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ASSETS / "corpora/tinyshakespeare/input.txt"


def llamacpp_once(model, threads, prompt_tokens, gen_tokens):
    """Runs in a child process so its load time and peak RSS are its own."""
    import numpy as np
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, verbose=False)
    load = time.perf_counter() - t
    text = TEXT.read_text()[: prompt_tokens * 8]
    ids = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    t = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    # Without logits_all (which would make llama.cpp compute logits for every prompt token and
    # slow its prefill unfairly) this row may not hold the last logits, so the decoded tokens
    # are not meaningful; each step still costs one full forward pass, which is what is timed.
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(gen_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = gen_tokens / (time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_mib": rss}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--model", default=str(MODEL), help="a GGUF file (default: the SmolLM2 Q4_1 asset)")
    ap.add_argument("--llama-bench", help="native llama-bench binary to run beside slm")
    ap.add_argument("--no-binding", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--slm", default=str(ROOT / "target/release/slm"), help="the slm binary")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        return llamacpp_once(a.model, a.threads, a.prompt_tokens, a.gen_tokens)
    slm = a.slm
    runs = {"slm": []}
    if not a.no_binding:
        runs["llama.cpp"] = []
    if a.llama_bench:
        runs["llama-bench"] = []
    commit = None
    slm_cmd = [str(slm), "bench", "--threads", str(a.threads), "--repeats", "1", "--prompt-tokens",
               str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--json", "--model", a.model]
    # One untimed run first: a model's first load writes slm's packed-weights cache (the
    # timed loads map it), as llama.cpp's first read of a file fills the page cache.
    first = json.loads(subprocess.check_output(slm_cmd))
    print(f"slm first load (packs, writes the packed-weights cache when it is on): "
          f"{first['load_s']:.3f} s")
    for _ in range(a.repeats):
        out = subprocess.check_output(slm_cmd)
        runs["slm"].append(json.loads(out))
        if not a.no_binding:
            out = subprocess.check_output([sys.executable, __file__, "--child", "--model", a.model,
                                           "--threads", str(a.threads),
                                           "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens",
                                           str(a.gen_tokens)])
            runs["llama.cpp"].append(json.loads(out))
        if a.llama_bench:
            row = {}
            for key, args in [("prefill_tok_s", ["-p", str(a.prompt_tokens), "-n", "0"]),
                              ("decode_tok_s", ["-p", "0", "-n", str(a.gen_tokens),
                                                "-d", str(a.prompt_tokens)])]:
                out = subprocess.check_output([a.llama_bench, "-m", a.model, "-t", str(a.threads),
                                               "-r", "1", "-o", "json", *args],
                                              stderr=subprocess.DEVNULL)
                res = json.loads(out)[0]
                row[key] = res["avg_ts"]
                commit = res.get("build_commit")
            runs["llama-bench"].append(row)
    keys = ["load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mib"]
    peers = [n for n in runs if n != "slm"]
    print(f"{Path(a.model).name}, {a.threads} threads, prompt {a.prompt_tokens}, "
          f"decode {a.gen_tokens}, medians of {a.repeats} alternating runs"
          + (f"; llama-bench commit {commit}" if commit else ""))
    print("| metric | slm | " + " | ".join(peers) + " | " + " | ".join(f"slm / {p}" for p in peers)
          + " |\n|---|---|" + "---|" * (2 * len(peers)))
    for k in keys:
        med = {n: statistics.median(r[k] for r in rs) if all(k in r for r in rs) else None
               for n, rs in runs.items()}
        s = med["slm"]
        vals = [f"{med[p]:.3f}" if med[p] is not None else "-" for p in peers]
        ratios = [f"{s / med[p]:.2f}x" if med[p] else "-" for p in peers]
        print(f"| {k} | {s:.3f} | " + " | ".join(vals) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
