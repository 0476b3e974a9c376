#!/usr/bin/env python3
"""A recurrent LM that slm wrote (slm pretrain, or slm finetune of one) loads into PyTorch's
word_language_model RNNModel with load_state_dict(strict=True) and evaluates, as one stream in
eval mode, to the perplexity slm reports for the same text (within 1e-4 relative).

Run by hand: python tools/check_rnn_export.py MODEL_DIR TEXT [--slm target/release/slm]
(torch and safetensors from tools/requirements.txt)
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wlm_reference import RNNModel, evaluate, words  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--slm", default=str(ROOT / "target" / "release" / "slm"))
    a = ap.parse_args()
    d = Path(a.model)
    cfg = json.loads((d / "config.json").read_text())
    model = RNNModel(cfg["rnn_type"], cfg["ntoken"], cfg["ninp"], cfg["nhid"], cfg["nlayers"],
                     dropout=cfg.get("dropout", 0.0), tie_weights=cfg.get("tie_weights", False))
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    vocab = {w: i for i, w in enumerate((d / "vocab.txt").read_text(encoding="utf8").splitlines())}
    text = Path(a.text).read_text(encoding="utf8").splitlines(keepends=True)
    ids = [vocab.get(w, vocab.get("<unk>", 0)) for w in words(text)]
    torch_ppl = math.exp(evaluate(model, ids, bptt=35, bsz=1))
    r = subprocess.run([a.slm, "eval", "perplexity", "-m", str(d), "--text", a.text, "--json"],
                       check=True, capture_output=True, text=True)
    slm = json.loads(r.stdout)
    ok = abs(slm["perplexity"] / torch_ppl - 1) < 1e-4 and slm["text_tokens"] == len(ids)
    print(f"{d}: PyTorch RNNModel perplexity {torch_ppl:.4f} over {len(ids)} tokens; "
          f"slm {slm['perplexity']:.4f} over {slm['text_tokens']} tokens: {'OK' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
