#!/usr/bin/env python3
"""PyTorch's word_language_model loop (main.py's logic, the two LSTM layers as two modules so
that the dropout between them is ours) from a tools/bench_wlm.py work folder's initial weights,
with the dropout masks drawn either by torch.rand (`rand`) or by F.dropout (`torch`, PyTorch's
bernoulli_ path). Shows how much the epoch-3 perplexity depends on where the masks come from.

    python tools/wlm_dropout_rng.py WORK_DIR SEED EPOCHS rand|torch
(WORK_DIR: the bench_wlm_* folder with tok/, train.txt, valid.txt, init-SEED/)
"""
import json, math, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch, torch.nn as nn
from safetensors.torch import load_file
from wlm_reference import words, batchify, get_batch, repackage

work = sys.argv[1]; seed = int(sys.argv[2]); epochs = int(sys.argv[3]); mode = sys.argv[4]
torch.set_num_threads(2)
vocab = json.loads(open(f"{work}/tok/tokenizer.json").read())["model"]["vocab"]
ids = lambda f: [vocab.get(w, vocab["<unk>"]) for w in words(open(f"{work}/{f}", encoding="utf8").read().splitlines(keepends=True))]
tr, va = ids("train.txt"), ids("valid.txt")
sd = load_file(f"{work}/init-{seed}/model.safetensors")
V = len(vocab)

def drop(x, p, train):
    if not train or p == 0: return x
    if mode == "rand":
        return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)
    return nn.functional.dropout(x, p, True)

class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = nn.Embedding(V, 200); s.l0 = nn.LSTM(200, 200); s.l1 = nn.LSTM(200, 200); s.dec = nn.Linear(200, V)
        s.enc.weight.data.copy_(sd["encoder.weight"]); s.dec.weight.data.copy_(sd["decoder.weight"]); s.dec.bias.data.copy_(sd["decoder.bias"])
        for l, m in ((0, s.l0), (1, s.l1)):
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(m, n + "_l0").data.copy_(sd[f"rnn.{n}_l{l}"])
    def forward(s, x, h):
        e = drop(s.enc(x), 0.2, s.training)
        o0, h0 = s.l0(e, h[0]); o1, h1 = s.l1(drop(o0, 0.2, s.training), h[1])
        return s.dec(drop(o1, 0.2, s.training)).view(-1, V), (h0, h1)

def zeros(b): return tuple((torch.zeros(1, b, 200), torch.zeros(1, b, 200)) for _ in range(2))
torch.manual_seed(seed)
m = M(); crit = nn.CrossEntropyLoss(); data = batchify(tr, 20); lr = 20.0; best = None
for ep in range(epochs):
    m.train(); h = zeros(20)
    for i in range(0, data.size(0) - 1, 35):
        x, y = get_batch(data, i, 35); m.zero_grad(); h = repackage(h)
        out, h = m(x, h); crit(out, y).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.25)
        for p in m.parameters(): p.data.add_(p.grad, alpha=-lr)
    m.eval(); vd = batchify(va, 10); h = zeros(10); tot = 0.0
    with torch.no_grad():
        for i in range(0, vd.size(0) - 1, 35):
            x, y = get_batch(vd, i, 35); out, h = m(x, h); h = repackage(h); tot += len(x) * crit(out, y).item()
    v = tot / (len(vd) - 1)
    print(f"{mode} seed {seed} epoch {ep+1}: valid ppl {math.exp(v):.2f}", flush=True)
    if best is None or v < best: best = v
    else: lr /= 4
