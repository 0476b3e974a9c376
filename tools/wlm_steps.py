#!/usr/bin/env python3
"""Step-by-step comparison of PyTorch's word_language_model loop (main.py's logic, dropout off)
with a `slm pretrain` run of `tools/bench_wlm.py --dropout 0`: each step's loss and gradient
norm side by side, from the same initial weights. `--exact-clip` sums PyTorch's clipping norm
in float64 (its float32 `clip_grad_norm_` is off by ~1e-3 on large gradients, which alone sets
the two runs apart within a few steps); `--no-mkldnn` runs ATen's LSTM kernels.

    python tools/bench_wlm.py --epochs 1 --seeds 1111 --dropout 0     # prints its work folder
    python tools/wlm_steps.py WORK_DIR [--seed 1111] [--steps 60] [--exact-clip] [--no-mkldnn]
"""
import argparse, json, sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wlm_reference import RNNModel, batchify, exact_clip_, get_batch, repackage, words  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("work")
ap.add_argument("--seed", type=int, default=1111)
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--exact-clip", action="store_true")
ap.add_argument("--no-mkldnn", action="store_true")
a = ap.parse_args()
torch.backends.mkldnn.enabled = not a.no_mkldnn
torch.set_num_threads(2)
work = Path(a.work)
vocab = json.loads((work / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
text = (work / "train.txt").read_text(encoding="utf8").splitlines(keepends=True)
data = batchify([vocab.get(w, vocab["<unk>"]) for w in words(text)], 20)
model = RNNModel("LSTM", len(vocab), 200, 200, 2, dropout=0.0)
model.load_state_dict(load_file(str(work / f"init-{a.seed}" / "model.safetensors")))
slm = [json.loads(l) for l in (work / f"slm-{a.seed}" / "metrics.jsonl").read_text().splitlines()
       if '"grad_norm"' in l]
params, crit = list(model.parameters()), nn.CrossEntropyLoss()
model.train()
hidden = model.init_hidden(20)
print("step | PyTorch loss | slm loss | relative | PyTorch norm | slm norm")
for step, i in enumerate(range(0, data.size(0) - 1, 35)):
    if step >= min(a.steps, len(slm)):
        break
    x, y = get_batch(data, i, 35)
    model.zero_grad()
    hidden = repackage(hidden)
    out, hidden = model(x, hidden)
    loss = crit(out, y)
    loss.backward()
    if a.exact_clip:
        norm = exact_clip_(params, 0.25)
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, 0.25))
    for p in params:
        p.data.add_(p.grad, alpha=-20.0)
    s = slm[step]
    print(f"{step + 1} | {loss.item():.6f} | {s['loss']:.6f} | {abs(loss.item() / s['loss'] - 1):.1e}"
          f" | {norm:.6f} | {s['grad_norm']:.6f}")
