#!/usr/bin/env python3
"""Spelling correction pairs for training a small T5 from scratch (README, "Seq2Seq from
scratch"): real English phrases from SST-2 as targets, each with typos a person makes (a letter
dropped, doubled, swapped with its neighbour or replaced by one next to it on the keyboard) as
the input. Deterministic: the same seed gives the same files.

Usage: python3 tools/typo_pairs.py [--assets DIR] [--seed 1] -o DIR
Writes DIR/train.jsonl (phrases of SST-2's train split), DIR/valid.jsonl and DIR/test.jsonl
(sentences of its dev split, disjoint), and DIR/text.txt (every input and target, for training
the tokenizer). Standard library only."""
import argparse
import json
import os
import random
from pathlib import Path

ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
NEAR = {}
for r, row in enumerate(ROWS):
    for c, ch in enumerate(row):
        near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
        near += [ROWS[k][c] for k in (r - 1, r + 1) if 0 <= k < 3 and c < len(ROWS[k])]
        NEAR[ch] = near


def typo(word, rng):
    i = rng.randrange(len(word))
    kind = rng.randrange(4)
    if kind == 0 and len(word) > 3:                      # a letter dropped
        return word[:i] + word[i + 1:]
    if kind == 1:                                        # a letter doubled
        return word[:i] + word[i] + word[i:]
    if kind == 2 and i < len(word) - 1:                  # neighbours swapped
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    near = NEAR.get(word[i])
    if near:                                             # a neighbouring key
        return word[:i] + rng.choice(near) + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def noisy(text, rng, rate):
    words = text.split()
    out = []
    for w in words:
        if len(w) >= 3 and w.isalpha() and rng.random() < rate:
            w = typo(w, rng)
        out.append(w)
    return " ".join(out)


def phrases(path, lo, hi):
    seen, out = set(), []
    for line in Path(path).read_text().splitlines()[1:]:
        text = line.split("\t")[0].strip()
        n = len(text.split())
        if lo <= n <= hi and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=os.environ.get("SLM_ASSETS", "../shared/assets"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=0.25, help="chance that a word gets a typo")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    sst = Path(a.assets) / "classification" / "sst2"
    rng = random.Random(a.seed)
    train = phrases(sst / "train.tsv", 5, 16)
    rng.shuffle(train)
    train = train[: a.train]
    held = phrases(sst / "dev.tsv", 5, 24)
    rng.shuffle(held)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = []
    for name, rows in (("train", train), ("valid", held[:300]), ("test", held[300:800])):
        with open(out / f"{name}.jsonl", "w") as f:
            for t in rows:
                x = noisy(t, rng, a.rate)
                f.write(json.dumps({"input": x, "target": t}) + "\n")
                if name == "train":
                    text += [x, t]
        print(f"{out / name}.jsonl: {len(rows)} pairs")
    (out / "text.txt").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
