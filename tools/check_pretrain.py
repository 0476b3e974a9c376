#!/usr/bin/env python3
"""A transformer that `slm pretrain` (or `slm finetune`) wrote loads in transformers
(AutoModelForCausalLM, AutoTokenizer, no warnings about missing or unexpected weights) and
computes what slm computes on it: the same token ids for TEXT, the sliding-window perplexity
`slm eval perplexity` reports (within 1e-5 relative) and the same greedy continuation of PROMPT
as `slm generate --temperature 0`.

Run by hand: python tools/check_pretrain.py MODEL_DIR TEXT [--prompt P] [--slm target/release/slm]
(torch and transformers from tools/requirements.txt)
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import hf_perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slm", default=str(ROOT / "target" / "release" / "slm"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, info = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers loaded the folder with {bad}"
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    ctx = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") \
        else model.config.n_positions
    text = Path(a.text).read_text(encoding="utf8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    hf = hf_perplexity(model, ids, ctx, ctx // 2)
    r = subprocess.run([a.slm, "eval", "perplexity", "-m", a.model, "--text", a.text,
                        "--max-length", str(ctx), "--stride", str(ctx // 2), "--json"],
                       capture_output=True, text=True, check=True)
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    rel = abs(ours["mean_nll"] - hf["mean_nll"]) / hf["mean_nll"]
    print(f"perplexity: transformers {hf['perplexity']:.5f} slm {ours['perplexity']:.5f} "
          f"over {hf['tokens']} tokens (relative NLL difference {rel:.2e})")
    assert ours["tokens_scored"] == hf["tokens"], (ours, hf)
    assert rel < 1e-5, rel

    prompt = tok(a.prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=a.tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    hf_text = tok.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    r = subprocess.run([a.slm, "generate", "-m", a.model, "--temperature", "0", "-n", str(a.tokens),
                        a.prompt], capture_output=True, text=True, check=True)
    ours = r.stdout
    print(f"greedy after {a.prompt!r}:\n  transformers {hf_text!r}\n  slm          {ours!r}")
    assert ours.strip() == (a.prompt + hf_text).strip() or ours.strip() == hf_text.strip(), \
        "greedy continuations differ"
    print("OK")


if __name__ == "__main__":
    main()
