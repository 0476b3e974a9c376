#!/usr/bin/env python3
"""The real Gemma 3 270M (Q4_K_M GGUF, `tools/fetch_assets.sh --large`) in slm and in llama.cpp
(issue 14): perplexity on the first 20,000 characters of WikiText-2 valid with the same tokens and
windows (1024, stride 512; llama.cpp's logits through the same sliding-window sum), and greedy
continuations of the fixture prompts. With --gguf FILE, the same for another Gemma GGUF (one
slm wrote).

    cargo build --release
    LLAMA_CPP_LIB_PATH=... PYTHONPATH=... python tools/check_gemma.py   # or pip install llama-cpp-python==0.3.36
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_quantized import ASSETS, ROOT, llamacpp_perplexity  # noqa: E402

SLM = ROOT / "target" / "release" / "slm"
GGUF = ROOT / "target" / "models" / "gemma-3-270m-q4_k_m" / "gemma-3-270m-q4_k_m.gguf"


def slm(*args):
    return subprocess.run([str(SLM), *args, "--threads", "2"], check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=str(GGUF))
    a = ap.parse_args()
    from llama_cpp import Llama
    text = (ASSETS / "corpora" / "wikitext-2" / "valid.txt").read_text()[:20000]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    rows = {}
    for dtype in ["auto", "f32"]:
        r = json.loads(slm("eval", "perplexity", "-m", a.gguf, "--dtype", dtype, "--text", f.name,
                           "--max-length", "1024", "--stride", "512", "--json"))
        rows[dtype] = r
    # WikiText writes "<unk>", Gemma's unknown token: read as that token, as transformers does.
    lc, n = llamacpp_perplexity(a.gguf, text, add_bos=True, special=True)
    auto = rows["auto"]["perplexity"]
    print(f"perplexity: slm (quantized) {auto:.4f}, slm (f32) {rows['f32']['perplexity']:.4f}, "
          f"llama.cpp {lc:.4f} ({n} tokens; slm scored {rows['auto'].get('tokens_scored')}); "
          f"slm/llama.cpp {auto / lc:.5f}")
    fixture = json.loads((ROOT / "tests" / "fixtures" / "gemma3_270m.json").read_text())
    llm = Llama(model_path=a.gguf, n_threads=2, n_ctx=256, verbose=False)
    for case in fixture["cases"]:
        p = case["prompt"]
        ours = slm("generate", "-m", a.gguf, p, "-n", "16", "--temperature", "0")
        theirs = llm(p, max_tokens=16, temperature=0.0)["choices"][0]["text"]
        print(f"{p!r}: slm {ours!r} | llama.cpp {theirs!r} | same: {ours.strip() == theirs.strip()}")


if __name__ == "__main__":
    main()
