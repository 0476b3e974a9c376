#!/usr/bin/env python3
"""Checks that transformers reads a T5 that slm trained (README, "Seq2Seq from scratch"): on
the pairs of a JSONL file, the teacher-forced loss per target token and the greedy outputs of
`T5ForConditionalGeneration` and its tokenizer, to compare with `slm eval seq2seq --json` and
its `--report` outputs.

Usage: python3 tools/check_seq2seq_hf.py MODEL_DIR PAIRS.jsonl [--report DIR]
(pip install torch transformers sentencepiece)"""
import argparse
import json

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("pairs")
    ap.add_argument("--report", help="an `slm eval seq2seq --generate --report` folder to compare outputs with")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = T5ForConditionalGeneration.from_pretrained(a.model).eval()
    eos = model.config.eos_token_id

    def ids(text):
        x = tok.encode(text)
        return x if x and x[-1] == eos else x + [eos]

    rows = [json.loads(l) for l in open(a.pairs) if l.strip()]
    total, n, outs = 0.0, 0, []
    with torch.no_grad():
        for r in rows:
            src, tgt = torch.tensor([ids(r["input"])]), torch.tensor([ids(r["target"])])
            loss = model(input_ids=src, labels=tgt).loss.item()
            total += loss * tgt.shape[1]
            n += tgt.shape[1]
            g = model.generate(src, max_new_tokens=a.max_new_tokens, do_sample=False)
            outs.append(tok.decode(g[0], skip_special_tokens=True))
    print(json.dumps({"pairs": len(rows), "target_tokens": n, "mean_nll": total / n}))
    if a.report:
        slm = [json.loads(l)["output"] for l in open(f"{a.report}/outputs.jsonl")]
        same = sum(x.strip() == y.strip() for x, y in zip(outs, slm))
        print(f"greedy outputs equal to slm's: {same} of {len(slm)}")
        for x, y in zip(outs, slm):
            if x.strip() != y.strip():
                print("  transformers:", repr(x), " slm:", repr(y))


if __name__ == "__main__":
    main()
