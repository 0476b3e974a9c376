#!/usr/bin/env python3
"""Tokenizers trained by `slm tokenizer train` load in transformers (run by hand):
`AutoTokenizer.from_pretrained(DIR)` gives the ids the `tokenizers` library gives on the same
file, with the special tokens in their roles, for every type.

  for k in bpe byte-bpe wordpiece unigram word char; do
    slm tokenizer train --type $k --vocab-size 2000 ../shared/assets/corpora/tinyshakespeare/input.txt -o /tmp/tok-$k --force
  done
  python3 tools/check_tokenizer_train.py /tmp/tok-*
"""
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         "ROMEO: O, she doth teach the torches to burn bright!", "zyzzyva qwerty"]

ok = True
for d in sys.argv[1:]:
    hf = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(f"{d}/tokenizer.json")
    for t in TEXTS:
        a = hf(t)["input_ids"]
        b = raw.encode(t).ids
        same = a == b
        ok &= same
        print(f"{'ok ' if same else 'BAD'} {d}: {len(a)} ids; decoded {hf.decode(a, skip_special_tokens=True)!r}")
    print(f"    special tokens: {hf.special_tokens_map}")
sys.exit(0 if ok else 1)
