#!/usr/bin/env python3
"""Parity run: `slm pretrain` against PyTorch's word_language_model loop (tools/wlm_reference.py,
main.py's logic) on the same data, vocabulary, initial weights and hyperparameters, one after the other on this
machine with the same thread count. Reports validation perplexity per epoch and training
tokens/s (training steps only, evaluation excluded) of both.

Data: WikiText-2 valid (SLM_ASSETS), lines 1-3000 to train on, the rest to validate; the
vocabulary is `slm tokenizer train --type word` on the whole file (word_language_model builds
its dictionary from every split). Defaults are main.py's: LSTM, emsize 200, nhid 200, 2 layers,
dropout 0.2, bptt 35, batch 20, lr 20, clip 0.25; eval batch 10.

Run: python tools/bench_wlm.py [--epochs 3] [--seeds 1111 1112 1113] [--threads 2] [--arch lstm|gru] [--slm target/release/slm]
     [--no-mkldnn]
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wlm_reference import RNNModel, train, words  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="lstm", choices=["lstm", "gru"])
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113],
                    help="one paired run (the same initial weights) per seed")
    ap.add_argument("--slm", default=str(ROOT / "target" / "release" / "slm"))
    ap.add_argument("--no-mkldnn", action="store_true",
                    help="PyTorch's own ATen LSTM kernels instead of oneDNN's (torch.backends.mkldnn)")
    a = ap.parse_args()
    if a.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    src = ASSETS / "corpora" / "wikitext-2" / "valid.txt"
    lines = src.read_text(encoding="utf8").splitlines(keepends=True)
    work = Path(tempfile.mkdtemp(prefix="bench_wlm_"))
    (work / "train.txt").write_text("".join(lines[:3000]), encoding="utf8")
    (work / "valid.txt").write_text("".join(lines[3000:]), encoding="utf8")
    subprocess.run([a.slm, "tokenizer", "train", "--type", "word", "--vocab-size", "1000000", "--min-frequency", "1",
                    str(src), "-o", str(work / "tok")], check=True, capture_output=True)
    vocab = json.loads((work / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    ids = lambda f: [vocab.get(w, vocab["<unk>"]) for w in words((work / f).read_text(encoding="utf8").splitlines(keepends=True))]
    train_ids, valid_ids = ids("train.txt"), ids("valid.txt")

    print(f"CPU: {cpu_model()}; {a.threads} threads; torch {torch.__version__}"
          f"{'; oneDNN off' if a.no_mkldnn else ''}")
    print(f"work folder (data, vocabulary, initial weights; tools/wlm_dropout_rng.py reads it): {work}")
    print(f"{a.arch.upper()} 200/200 x2, dropout {a.dropout}, vocab {len(vocab)}, {len(train_ids)} train / {len(valid_ids)} valid tokens")

    torch.set_num_threads(a.threads)
    rows, torch_tok, torch_s, slm_rates = [], 0, 0.0, []
    for seed in a.seeds:
        torch.manual_seed(seed)
        model = RNNModel(a.arch.upper(), len(vocab), 200, 200, 2, dropout=a.dropout)
        # Both start from these weights (slm pretrain --init): only the dropout masks differ.
        init = work / f"init-{seed}"
        init.mkdir()
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(init / "model.safetensors"))
        by_id = sorted(vocab, key=vocab.get)
        (init / "vocab.txt").write_text("".join(w + "\n" for w in by_id), encoding="utf8")
        hist = train(model, train_ids, valid_ids, a.epochs, bsz=20, eval_bsz=10,
                     log=lambda h: print(f"  seed {seed} pytorch epoch {h['epoch']}: valid ppl "
                                         f"{math.exp(h['valid_loss']):.2f}, {h['tokens'] / h['train_seconds']:.0f} tok/s",
                                         flush=True))
        torch_tok += sum(h["tokens"] for h in hist)
        torch_s += sum(h["train_seconds"] for h in hist)
        out = work / f"slm-{seed}"
        r = subprocess.run([a.slm, "pretrain", "--arch", a.arch, "--tokenizer", str(work / "tok"),
                            "--train", str(work / "train.txt"), "--valid", str(work / "valid.txt"),
                            "--init", str(init), "--dropout", str(a.dropout), "--seed", str(seed),
                            "-o", str(out), "--epochs", str(a.epochs), "--threads", str(a.threads)],
                           check=True, capture_output=True, text=True)
        slm_rates.append(float(re.search(r"\(([0-9.]+) tokens/s\)", r.stdout).group(1)))
        evals = [json.loads(l)["eval"]["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in l]
        for h, e in zip(hist, evals):
            rows.append((seed, h["epoch"], math.exp(h["valid_loss"]), math.exp(e)))
            print(f"  seed {seed} slm epoch {h['epoch']}: valid ppl {math.exp(e):.2f}", flush=True)

    print("\n| seed | epoch | PyTorch valid ppl | slm valid ppl | slm / PyTorch |")
    print("|---|---|---|---|---|")
    for seed, ep, p, s in rows:
        print(f"| {seed} | {ep} | {p:.2f} | {s:.2f} | {s / p:.3f} |")
    for ep in range(1, a.epochs + 1):
        ps = [p for _, e, p, _ in rows if e == ep]
        ss = [s for _, e, _, s in rows if e == ep]
        gm = lambda v: math.exp(sum(math.log(x) for x in v) / len(v))
        print(f"| mean | {ep} | {gm(ps):.2f} ({min(ps):.0f}-{max(ps):.0f}) | {gm(ss):.2f} ({min(ss):.0f}-{max(ss):.0f}) "
              f"| {gm(ss) / gm(ps):.3f} |")
    torch_tps = torch_tok / torch_s
    slm_tps = sorted(slm_rates)[len(slm_rates) // 2]
    print(f"\ntraining tokens/s: PyTorch {torch_tps:.0f}, slm {slm_tps:.0f} = {slm_tps / torch_tps:.2f}x")


if __name__ == "__main__":
    main()
