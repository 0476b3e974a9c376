#!/usr/bin/env python3
"""A BiLSTM text classifier trained from scratch by slm and by PyTorch, side by side in one run,
on the same data, vocabulary, preprocessing, sizes, optimizer and epochs: test accuracy and
training time, without and with stop-word removal.

slm builds the vocabulary (`slm finetune --task classify --arch bilstm`, its word tokenizer with
the preprocessing trained in); PyTorch reads the same tokenizer.json with the `tokenizers`
package, so both models see the same ids. The PyTorch model is wlm_reference.RNNClassifier (the
same modules and parameter names), trained as slm trains: AdamW (weight decay on matrices
only), a linear decay to 0, gradient norm clipped to 1, shuffled batches, dropout, CE loss.

    python tools/bench_rnn_classifier.py [--slm target/release/slm] [--epochs 2] [--threads 2]
(torch from tools/requirements.txt)
"""
import argparse
import csv
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wlm_reference import RNNClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))


def rows(path):
    with open(path, encoding="utf8", newline="") as f:
        r = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"], int(row["label"])) for row in r]


def encode(tok, texts, unk):
    out = []
    for t in texts:
        ids = tok.encode(t).ids[:256]
        out.append(ids if ids else [unk])
    return out


def batch(ids, labels):
    t = max(map(len, ids))
    x = torch.tensor([i + [0] * (t - len(i)) for i in ids])
    return x, torch.tensor([len(i) for i in ids]), torch.tensor(labels)


def torch_run(a, tok_dir, train, test, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    unk = tok.token_to_id("<unk>")
    t0 = time.perf_counter()
    tr_ids = encode(tok, [t for t, _ in train], unk)
    tr_lab = [l for _, l in train]
    model = RNNClassifier("LSTM", tok.get_vocab_size(), a.emsize, a.nhid, 1, 2,
                          bidirectional=True, pooling="max", dropout=a.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    steps = a.epochs * ((len(train) + a.batch_size - 1) // a.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    order = list(range(len(train)))
    model.train()
    for _ in range(a.epochs):
        random.shuffle(order)
        for k in range(0, len(order), a.batch_size):
            idx = order[k:k + a.batch_size]
            x, lengths, y = batch([tr_ids[i] for i in idx], [tr_lab[i] for i in idx])
            loss = nn.functional.cross_entropy(model(x, lengths), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    te_ids = encode(tok, [t for t, _ in test], unk)
    correct = 0
    with torch.no_grad():
        for k in range(0, len(test), 64):
            x, lengths, y = batch(te_ids[k:k + 64], [l for _, l in test[k:k + 64]])
            correct += int((model(x, lengths).argmax(-1) == y).sum())
    n_params = sum(p.numel() for p in model.parameters())
    return {"accuracy": correct / len(test), "train_s": train_s, "params": n_params}


def slm_run(a, variant, out, seed):
    args = [a.slm, "finetune", "--task", "classify", "--arch", "bilstm", "--train", str(a.train),
            "--valid", str(a.test), "-o", str(out), "--epochs", str(a.epochs), "--emsize",
            str(a.emsize), "--nhid", str(a.nhid), "--batch-size", str(a.batch_size), "--lr",
            str(a.lr), "--dropout", str(a.dropout), "--seed", str(seed), "--threads",
            str(a.threads), "--force"]
    if variant == "stop-words removed":
        args += ["--remove-stopwords", "en"]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = re.search(r"(\d+) steps in ([\d.]+) s", r.stdout)
    acc = re.search(r"accuracy ([\d.]+)", r.stdout)
    info = next(l for l in r.stderr.splitlines() + r.stdout.splitlines() if "parameters;" in l)
    return {"accuracy": float(acc.group(1)), "train_s": float(m.group(2)), "wall_s": wall,
            "summary": info.strip()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default=str(ROOT / "target" / "release" / "slm"))
    ap.add_argument("--train", default=str(ASSETS / "classification" / "sst2" / "train.tsv"))
    ap.add_argument("--test", default=str(ASSETS / "classification" / "sst2" / "test.tsv"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--emsize", type=int, default=128)
    ap.add_argument("--nhid", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--out", default="/tmp/bench_rnn_classifier")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l),
               platform.processor())
    print(f"# {cpu}, {a.threads} threads, torch {torch.__version__}; BiLSTM emsize {a.emsize} "
          f"nhid {a.nhid}, max pooling, dropout {a.dropout}, batch {a.batch_size}, lr {a.lr}, "
          f"{a.epochs} epochs on {a.train}, accuracy on {a.test}")
    train, test = rows(a.train), rows(a.test)
    results = []
    for variant in ["no preprocessing", "stop-words removed"]:
        for seed in map(int, a.seeds.split(",")):
            out = Path(a.out) / f"{variant.split()[0]}-{seed}"
            s = slm_run(a, variant, out, seed)
            t = torch_run(a, out, train, test, seed)
            row = {"variant": variant, "seed": seed, "slm": s, "pytorch": t}
            results.append(row)
            print(f"{variant:20s} seed {seed}: accuracy slm {s['accuracy']:.4f} pytorch "
                  f"{t['accuracy']:.4f}; training s slm {s['train_s']:.1f} pytorch "
                  f"{t['train_s']:.1f} ({t['train_s'] / s['train_s']:.2f}x); {s['summary']}",
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
