#!/usr/bin/env python3
"""What slm fine-tunes, transformers and PEFT load with the same numbers (run by hand).

For the tiny random-init GPT-2 and Phi-3 of tests/fixtures (with the tiny byte-level BPE of
tests/fixtures/gpt2/tokenizer: both have 320 ids), slm fine-tunes on tiny shakespeare in full and
with LoRA (PEFT's default targets: c_attn with fan_in_fan_out for GPT-2, qkv_proj for Phi-3).
Then transformers loads the full model, and PEFT the adapter on the base, and their perplexity
on held-out text (windows of 64 tokens, stride 32, transformers' recipe) is compared with
`slm eval perplexity` on the same files.

    python tools/check_finetune_interop.py      (needs tools/requirements.txt and target/release/slm)
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import PeftModel

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
SLM = ROOT / "target/release/slm"
FIX = ROOT / "tests/fixtures"


def hf_perplexity(model, ids, max_length=64, stride=32):
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll_sum / n_tokens))


def slm(*args):
    out = subprocess.run([str(SLM), *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"slm {' '.join(args[:3])} failed:\n{out.stderr}")
    return out.stdout


def main():
    work = Path(tempfile.mkdtemp(prefix="slm-ft-interop-"))
    text = (ASSETS / "corpora/tinyshakespeare/input.txt").read_text()
    train, held = work / "train.txt", work / "held.txt"
    train.write_text(text[:20_000])
    held.write_text(text[100_000:102_000])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIX / "gpt2/tokenizer/tokenizer.json"))
    ids = tok(held.read_text())["input_ids"]
    rows = []
    for family in ("gpt2", "phi3"):
        base = work / family
        base.mkdir()
        for f in list((FIX / family / "safetensors").iterdir()) + list((FIX / "gpt2/tokenizer").iterdir()):
            shutil.copy(f, base / f.name)
        for method in ("full", "lora"):
            out = work / f"{family}-{method}"
            slm("finetune", "--task", "causal-lm", "-m", str(base), "--train", str(train), "-o", str(out),
                "--method", method, "--max-steps", "30", "--batch-size", "4", "--max-length", "64",
                "--lr", "3e-3", "--seed", "1", "--threads", "2")
            if method == "full":
                model = transformers.AutoModelForCausalLM.from_pretrained(out)
                args = ["-m", str(out)]
            else:
                model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out)
                args = ["-m", str(base), "--adapter", str(out)]
            model.eval()
            theirs = hf_perplexity(model, ids)
            ours = json.loads(slm("eval", "perplexity", *args, "--text", str(held), "--max-length", "64",
                                  "--stride", "32", "--dtype", "f32", "--json"))["perplexity"]
            base_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
            rows.append((family, method, hf_perplexity(base_model, ids), theirs, ours))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| family | method | base ppl | transformers/PEFT ppl | slm ppl | rel. diff |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for family, method, before, theirs, ours in rows:
        d = abs(theirs - ours) / theirs
        worst = max(worst, d)
        print(f"| {family} | {method} | {before:.3f} | {theirs:.5f} | {ours:.5f} | {d:.1e} |")
    shutil.rmtree(work)
    if worst > 1e-4:
        sys.exit(f"slm and transformers disagree by {worst:.1e}")


if __name__ == "__main__":
    main()
