#!/usr/bin/env python3
"""transformers' sliding-window perplexity of SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to
f32 by transformers' GGUF reader) on the whole WikiText-2 validation file: the reference figure
for `slm eval perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf --dtype f32 --text valid.txt`
(windows of 1024 tokens, stride 512). Slow on a CPU (about half an hour on 2 cores).

    python tools/wikitext_perplexity.py [--threads 2]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ASSETS, hf_perplexity  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gguf = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.eval()
    text = (ASSETS / "corpora" / "wikitext-2" / "valid.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    print(json.dumps({"file": "corpora/wikitext-2/valid.txt", **hf_perplexity(model, ids, 1024, 512)}))


if __name__ == "__main__":
    main()
