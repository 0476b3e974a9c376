#!/usr/bin/env python3
"""Date normalization pairs for training a small T5 from scratch (README, "Seq2Seq from
scratch"): a date written the ways people write it ("Friday, March 5, 2021", "5th of Mar
2021", "03.05.21"…) as the input, its ISO 8601 form ("2021-03-05") as the target: the classic
attention exercise, where every output digit comes from a different place of the input.
Deterministic: the same seed gives the same files. Standard library only.

Usage: python3 tools/date_pairs.py [--seed 1] [--train 20000] -o DIR
Writes DIR/train.jsonl, DIR/valid.jsonl and DIR/test.jsonl (disjoint dates) and DIR/text.txt
(every input and target, for training the tokenizer)."""
import argparse
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def written(d, rng):
    m, mon, wd = MONTHS[d.month - 1], MONTHS[d.month - 1][:3], DAYS[d.weekday()]
    forms = [
        f"{m} {d.day}, {d.year}",
        f"{d.day} {m} {d.year}",
        f"{mon} {d.day} {d.year}",
        f"{ordinal(d.day)} of {m}, {d.year}",
        f"{wd}, {m} {d.day}, {d.year}",
        f"{wd[:3]} {d.day} {mon} {d.year}",
        f"{m} {ordinal(d.day)} {d.year}",
        f"{d.month}/{d.day}/{d.year}",
        f"{d.day:02d}.{d.month:02d}.{d.year}",
        f"{d.year}/{d.month}/{d.day}",
        f"{mon}. {d.day}, '{d.year % 100:02d}",
        f"the {ordinal(d.day)} of {m} {d.year}",
    ]
    s = rng.choice(forms)
    return s.lower() if rng.random() < 0.15 else s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), a.train + 1000)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = []
    splits = (("train", days[: a.train]), ("valid", days[a.train: a.train + 500]),
              ("test", days[a.train + 500:]))
    for name, chunk in splits:
        with open(out / f"{name}.jsonl", "w") as f:
            for k in chunk:
                d = start + dt.timedelta(days=k)
                x, y = written(d, rng), d.isoformat()
                f.write(json.dumps({"input": x, "target": y}) + "\n")
                if name == "train":
                    text += [x, y]
        print(f"{out / name}.jsonl: {len(chunk)} pairs")
    (out / "text.txt").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
