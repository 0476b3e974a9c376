#!/usr/bin/env python3
"""Reference fixtures for slm's recurrent models, made with PyTorch (torch==2.5.1, pinned in
tools/requirements.txt), under tests/fixtures/rnn/.

- cells.json: nn.LSTM and nn.GRU (2 layers, 3 sequences of 7 steps, a random initial state as
  carried from a previous chunk): outputs, final states, and the gradients of sum(out * R) with
  respect to the input and every parameter.
- wlm_lstm/ and wlm_gru_tied/: checkpoints of PyTorch's word_language_model `RNNModel`
  (github.com/pytorch/examples, word_language_model/model.py; the class below has its
  structure and parameter names) trained by that example's loop (SGD, lr 20, clip 0.25,
  bptt 35, batch 20, dropout 0.2, lr / 4 when validation does not improve) on the first lines
  of WikiText-2 valid, saved as a bare state_dict with torch.save (LSTM) or as safetensors (GRU,
  tied), each with its vocab.txt. reference.json holds the perplexity of later lines run as one
  stream in eval mode, as main.py's evaluate() computes it, and the loss and gradients of a
  second chunk whose hidden state is carried (detached) from the first.

- bilstm_max/ and gru_mean/: text classifiers (wlm_reference.RNNClassifier: a 2-layer
  bidirectional LSTM with max pooling, a 1-layer GRU with mean pooling) at PyTorch's
  initialisation with a word-level tokenizer.json, and in reference.json the logits of a padded
  batch of texts of different lengths (eval mode) and the cross-entropy loss and gradients of
  every parameter for their labels (dropout off).

Words seen fewer than 3 times in the training lines are <unk>, as slm's word tokenizer maps
words missing from vocab.txt.

- wlm_lstm/trajectory.json: main.py's training loop continued from that checkpoint for three
  epochs with dropout off, the clipping norm summed exactly: each step's loss and norm.
- wlm_lstm/dropout.json and wlm_gru_tied/dropout.json: reference.json's second chunk in
  training mode with dropout 0.2 at main.py's three sites (embedding, between the recurrent
  layers, output), the masks those slm draws for that batch (its generator replicated below),
  applied by PyTorch: the loss and gradients.
- bilstm_max/dropout.json and gru_mean/dropout.json: the same for the classifiers' batch
  (dropout 0.3 on the embedding, between the layers and on the pooled vector).

Run: python tools/make_rnn_fixtures.py [classifiers|trajectory|dropout]   (SLM_ASSETS defaults to ../shared/assets)
"""
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from wlm_reference import (RNNClassifier, RNNModel, batchify, evaluate, exact_clip_, get_batch, repackage,
                           train, words)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "rnn"
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
WIKI = ASSETS / "corpora" / "wikitext-2" / "valid.txt"
TRAIN_LINES = (0, 600)
EVAL_LINES = (600, 700)
GRAD_LINES = (700, 760)
TRAJECTORY_LINES = (760, 1400)
TRAJECTORY_VALID = (1400, 1500)


def lines(span):
    with open(WIKI, encoding="utf8") as f:
        all_lines = f.readlines()
    return all_lines[span[0]:span[1]]


def flat(t):
    return [round(float(v), 8) for v in t.detach().reshape(-1).tolist()]


def sampled_grads(named):
    """Every gradient of the recurrent layers and the decoder bias; 64 samples and the absolute
    sum of the larger ones."""
    grads = {}
    for n, prm in named.items():
        g = prm.grad.reshape(-1)
        if n.startswith("rnn.") or n == "decoder.bias":
            grads[n] = {"all": flat(g)}
        else:
            idx = torch.linspace(0, g.numel() - 1, 64).long()
            grads[n] = {"idx": idx.tolist(), "val": flat(g[idx]), "abs_sum": float(g.abs().sum())}
    return grads


def one_layer_modules(rnn, layers, bidirectional=False):
    """Copies each layer of the stacked `rnn` into the one-layer module `layers[k]` (so that a
    mask can be given between them) and returns the copies' parameters under `rnn`'s names."""
    named = {}
    with torch.no_grad():
        for k, l in enumerate(layers):
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                for sfx in [""] + (["_reverse"] if bidirectional else []):
                    getattr(l, f"{n}_l0{sfx}").copy_(getattr(rnn, f"{n}_l{k}{sfx}"))
                    named[f"rnn.{n}_l{k}{sfx}"] = getattr(l, f"{n}_l0{sfx}")
    return named


def record_cells():
    torch.manual_seed(7)
    out = {}
    ninp, nhid, layers, b, t = 5, 6, 2, 3, 7
    for kind in ["LSTM", "GRU"]:
        rnn = getattr(nn, kind)(ninp, nhid, layers)
        x = torch.randn(t, b, ninp, requires_grad=True)
        h0 = torch.randn(layers, b, nhid) * 0.5
        c0 = torch.randn(layers, b, nhid) * 0.5
        state = (h0, c0) if kind == "LSTM" else h0
        y, hn = rnn(x, state)
        r = torch.randn_like(y)
        (y * r).sum().backward()
        seq_major = lambda v: flat(v.transpose(0, 1))  # [t, b, w] -> rows s*t + τ
        case = {
            "ninp": ninp, "nhid": nhid, "layers": layers, "b": b, "t": t,
            "x": seq_major(x), "r": seq_major(r), "y": seq_major(y),
            "h0": flat(h0), "dx": seq_major(x.grad),
            "params": {n: flat(p) for n, p in rnn.named_parameters()},
            "grads": {n: flat(p.grad) for n, p in rnn.named_parameters()},
        }
        if kind == "LSTM":
            case.update(c0=flat(c0), hn=flat(hn[0]), cn=flat(hn[1]))
        else:
            case.update(hn=flat(hn))
        out[kind] = case
    (OUT / "cells.json").write_text(json.dumps(out))


def record_wlm(name, rnn_type, ninp, nhid, tied, safetensors):
    torch.manual_seed(1111)
    train_words = words(lines(TRAIN_LINES))
    counts = Counter(train_words)
    vocab = ["<unk>", "<eos>"] + sorted(w for w, c in counts.items() if c >= 3 and w not in ("<unk>", "<eos>"))
    index = {w: i for i, w in enumerate(vocab)}
    to_ids = lambda ws: [index.get(w, 0) for w in ws]
    train_ids = to_ids(train_words)
    eval_ids = to_ids(words(lines(EVAL_LINES)))
    model = RNNModel(rnn_type, len(vocab), ninp, nhid, 2, dropout=0.2, tie_weights=tied)
    train(model, train_ids, eval_ids, epochs=3)
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    sd = model.state_dict()
    if safetensors:
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "model.pt")
    mean_nll = evaluate(model, eval_ids)
    # A second chunk after a carried (detached) state, dropout off, as one training step sees it.
    model.eval()
    grad_ids = to_ids(words(lines(GRAD_LINES)))
    data = batchify(grad_ids, 4)
    bptt = 12
    hidden = model.init_hidden(4)
    x1, _ = get_batch(data, 0, bptt)
    with torch.no_grad():
        _, hidden = model(x1, hidden)
    x2, y2 = get_batch(data, bptt, bptt)
    model.zero_grad()
    out, _ = model(x2, repackage(hidden))
    loss = nn.CrossEntropyLoss()(out, y2)
    loss.backward()
    grads = sampled_grads(dict(model.named_parameters()))
    ref = {
        "rnn_type": rnn_type, "ntoken": len(vocab), "ninp": ninp, "nhid": nhid, "nlayers": 2,
        "tied": tied, "eval_lines": list(EVAL_LINES), "eval_tokens": len(eval_ids),
        "mean_nll": mean_nll, "perplexity": math.exp(mean_nll),
        "grad": {"lines": list(GRAD_LINES), "batch": 4, "bptt": bptt,
                 "chunk1": flat(x1.t()), "chunk2": flat(x2.t()), "targets2": flat(y2.view(bptt, 4).t()),
                 "loss": loss.item(), "grads": grads},
    }
    (d / "reference.json").write_text(json.dumps(ref, indent=1))
    print(name, "vocab", len(vocab), "eval ppl", math.exp(mean_nll), "loss2", loss.item())


def record_trajectory():
    """main.py's training loop from the wlm_lstm checkpoint, dropout off (nothing random): three
    epochs of SGD (lr 20, clip 0.25, bptt 35, batch 20) with the lr annealing after each
    evaluation, the clipping norm exact. Every step's loss and gradient norm, and each epoch's
    validation loss (eval batch 10). Also, unasserted, the stock clip_grad_norm_'s norm."""
    d = OUT / "wlm_lstm"
    vocab = (d / "vocab.txt").read_text().splitlines()
    index = {w: i for i, w in enumerate(vocab)}
    to_ids = lambda span: [index.get(w, 0) for w in words(lines(span))]
    sd = torch.load(d / "model.pt", weights_only=True)
    model = RNNModel("LSTM", len(vocab), 24, 24, 2, dropout=0.0)
    model.load_state_dict(sd)
    data = batchify(to_ids(TRAJECTORY_LINES), 20)
    valid = to_ids(TRAJECTORY_VALID)
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    lr, best, steps, epochs = 20.0, None, [], []
    for epoch in range(3):
        model.train()
        hidden = model.init_hidden(20)
        for i in range(0, data.size(0) - 1, 35):
            x, y = get_batch(data, i, 35)
            model.zero_grad()
            hidden = repackage(hidden)
            out, hidden = model(x, hidden)
            loss = crit(out, y)
            loss.backward()
            stock = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
            norm = exact_clip_(params, 0.25)
            for p in params:
                p.data.add_(p.grad, alpha=-lr)
            steps.append({"loss": loss.item(), "grad_norm": norm, "stock_grad_norm": stock, "lr": lr})
        v = evaluate(model, valid, 35, 10)
        epochs.append({"valid_loss": v, "lr": lr})
        if best is None or v < best:
            best = v
        else:
            lr /= 4.0
    ref = {"train_lines": list(TRAJECTORY_LINES), "valid_lines": list(TRAJECTORY_VALID),
           "batch": 20, "bptt": 35, "eval_batch": 10, "lr": 20.0, "clip": 0.25, "dropout": 0.0,
           "steps": steps, "epochs": epochs}
    (d / "trajectory.json").write_text(json.dumps(ref, indent=1))
    print("trajectory", len(steps), "steps; valid ppl", [math.exp(e["valid_loss"]) for e in epochs])


G = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def slm_step_seed(seed, ids):
    """slm's train::params::step_seed: FNV-1a of the batch's ids from the run's seed."""
    h = seed ^ 0xCBF29CE484222325
    for i in ids:
        h = ((h ^ i) * 0x100000001B3) & M64
    return h


def slm_mask(n, p, seed):
    """slm's train::params::dropout_mask: element i is kept (scaled by 1/(1-p)) unless
    splitmix64(seed + i·G) falls below p·2^64."""
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + i * np.uint64(G)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    threshold = np.uint64(int(float(np.float32(p)) * float(M64)))
    return np.where(z < threshold, 0.0, 1.0 / (1.0 - float(np.float32(p)))).astype(np.float32)


def record_dropout(name, rnn_type, ninp, nhid, tied):
    """reference.json's carried-state chunk in training mode with slm's dropout masks (seed 5,
    p 0.2): slm's sites are the tape's nodes 1 (embedding), 4 (between the layers) and 7
    (output), each mask over slm's [sequence, position, feature] rows. PyTorch runs the two
    layers as one-layer modules so the between-layer mask can be given (nn.LSTM(dropout=p)
    equals that with F.dropout's mask, bit for bit)."""
    d = OUT / name
    r = json.loads((d / "reference.json").read_text())
    g = r["grad"]
    b, t, seed, p = g["batch"], g["bptt"], 5, 0.2
    vocab = (d / "vocab.txt").read_text().splitlines()
    model = RNNModel(rnn_type, len(vocab), ninp, nhid, 2, dropout=p, tie_weights=tied)
    if (d / "model.pt").exists():
        model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    else:
        from safetensors.torch import load_file
        sd = load_file(str(d / "model.safetensors"))
        if tied:
            sd["decoder.weight"] = sd["encoder.weight"]
        model.load_state_dict(sd)
    as_tb = lambda v: torch.tensor([int(i) for i in v]).view(b, t).t()
    x1, x2, y2 = as_tb(g["chunk1"]), as_tb(g["chunk2"]), as_tb(g["targets2"]).reshape(-1)
    model.eval()
    with torch.no_grad():
        _, hidden = model(x1, model.init_hidden(b))
    step = slm_step_seed(seed, [int(i) for i in g["chunk2"]])
    masks = [torch.from_numpy(slm_mask(b * t * w, p, step ^ ((site * G) & M64))).view(b, t, w).transpose(0, 1)
             for site, w in ((1, ninp), (4, nhid), (7, nhid))]
    layers = [getattr(nn, rnn_type)(ninp if k == 0 else nhid, nhid) for k in range(2)]
    copies = one_layer_modules(model.rnn, layers)
    state = lambda k: tuple(h[k:k + 1] for h in hidden) if rnn_type == "LSTM" else hidden[k:k + 1]
    model.zero_grad()
    x = model.encoder(x2) * masks[0]
    x, _ = layers[0](x, state(0))
    x, _ = layers[1](x * masks[1], state(1))
    out = model.decoder(x * masks[2]).view(-1, len(vocab))
    loss = nn.CrossEntropyLoss()(out, y2)
    loss.backward()
    grads = sampled_grads({**dict(model.named_parameters()), **copies})
    ref = {"seed": seed, "dropout": p, "sites": [1, 4, 7], "loss": loss.item(), "grads": grads}
    (d / "dropout.json").write_text(json.dumps(ref, indent=1))
    print(name, "dropout loss", loss.item())


def record_classifier(name, rnn_type, nlayers, bidirectional, pooling):
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(11)
    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(30)]
    ntoken, ninp, nhid, nclass = len(words), 6, 5, 3
    model = RNNClassifier(rnn_type, ntoken, ninp, nhid, nlayers, nclass,
                          bidirectional=bidirectional, pooling=pooling, dropout=0.0)
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"))
    cfg = {"model_type": "rnn_classifier", "rnn_type": rnn_type, "ntoken": ntoken, "ninp": ninp,
           "nhid": nhid, "nlayers": nlayers, "bidirectional": bidirectional, "pooling": pooling,
           "dropout": 0.0, "labels": ["neg", "neu", "pos"]}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "pad_token": "<pad>"}))
    texts = ["w3 w7 w1 w20 w5 w9 w2", "w4 w4 zz", "w11", "w29 w0 w13 w8 w6"]
    ids = [tok.encode(t).ids for t in texts]
    labels = [2, 0, 1, 0]
    t = max(map(len, ids))
    x = torch.tensor([i + [0] * (t - len(i)) for i in ids])
    lengths = torch.tensor([len(i) for i in ids])
    model.eval()
    with torch.no_grad():
        logits = model(x, lengths)
        pooled = model.pooled(x, lengths)
    model.train()
    loss = nn.functional.cross_entropy(model(x, lengths), torch.tensor(labels))
    loss.backward()
    ref = {"texts": texts, "ids": ids, "labels": labels, "logits": [flat(r) for r in logits],
           "pooled": [flat(r) for r in pooled],
           "loss": float(loss), "grads": {k: flat(p.grad) for k, p in model.named_parameters()}}
    (d / "reference.json").write_text(json.dumps(ref, indent=1))


def record_classifier_dropout(name, rnn_type, nlayers, bidirectional, pooling):
    """The classifier's batch in training mode with the dropout masks slm draws (seed 5, p 0.3).
    slm's tape numbers its nodes embedding 0, dropout 1, then per layer a projection and a
    recurrence per direction and a concatenation of two directions, a dropout before every
    layer but the first, then the pooling and the head's dropout; PyTorch runs the layers as
    one-layer modules over packed sequences so the between-layer mask can be given."""
    d = OUT / name
    r = json.loads((d / "reference.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    from safetensors.torch import load_file
    sd = load_file(str(d / "model.safetensors"))
    seed, p = 5, 0.3
    ninp, nhid, dirs = cfg["ninp"], cfg["nhid"], 2 if bidirectional else 1
    model = RNNClassifier(rnn_type, cfg["ntoken"], ninp, nhid, nlayers, len(cfg["labels"]),
                          bidirectional=bidirectional, pooling=pooling, dropout=p)
    model.load_state_dict(sd)
    ids = r["ids"]
    b, t = len(ids), max(map(len, ids))
    padded = [i + [0] * (t - len(i)) for i in ids]
    x, lengths = torch.tensor(padded), torch.tensor([len(i) for i in ids])
    step = slm_step_seed(seed, [i for row in padded for i in row])
    node, sites = 2, [(1, b * t * ninp)]
    for k in range(nlayers):
        if k > 0:
            sites.append((node, b * t * nhid * dirs))
            node += 1
        node += 2 * dirs + (1 if dirs == 2 else 0)
    node += 1  # the pooling
    sites.append((node, b * nhid * dirs))
    masks = [torch.from_numpy(slm_mask(n, p, step ^ ((site * G) & M64))) for site, n in sites]
    layers = [getattr(nn, rnn_type)(ninp if k == 0 else nhid * dirs, nhid, 1, batch_first=True,
                                    bidirectional=bidirectional) for k in range(nlayers)]
    copies = one_layer_modules(model.rnn, layers, bidirectional)
    model.train()
    model.zero_grad()
    h = model.encoder(x) * masks[0].view(b, t, ninp)
    for k, l in enumerate(layers):
        if k > 0:
            h = h * masks[k].view(b, t, nhid * dirs)
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        out, _ = l(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).unsqueeze(-1)
    if pooling == "max":
        pooled = h.masked_fill(~mask, float("-inf")).max(1).values
    else:
        pooled = (h * mask).sum(1) / lengths[:, None].to(h.dtype)
    logits = model.classifier(pooled * masks[-1].view(b, nhid * dirs))
    loss = nn.functional.cross_entropy(logits, torch.tensor(r["labels"]))
    loss.backward()
    named = {n: prm for n, prm in model.named_parameters() if not n.startswith("rnn.")}
    named.update(copies)
    ref = {"seed": seed, "dropout": p, "sites": [s for s, _ in sites], "loss": float(loss),
           "grads": {n: flat(prm.grad) for n, prm in named.items()}}
    (d / "dropout.json").write_text(json.dumps(ref, indent=1))
    print(name, "dropout loss", float(loss), "sites", ref["sites"])


def main():
    print("torch", torch.__version__)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["trajectory"]:
        return record_trajectory()
    if sys.argv[1:] == ["dropout"]:
        record_dropout("wlm_lstm", "LSTM", 24, 24, tied=False)
        record_dropout("wlm_gru_tied", "GRU", 20, 20, tied=True)
        record_classifier_dropout("bilstm_max", "LSTM", 2, True, "max")
        return record_classifier_dropout("gru_mean", "GRU", 1, False, "mean")
    if sys.argv[1:] != ["classifiers"]:
        record_cells()
        record_wlm("wlm_lstm", "LSTM", 24, 24, tied=False, safetensors=False)
        record_wlm("wlm_gru_tied", "GRU", 20, 20, tied=True, safetensors=True)
        record_trajectory()
        record_dropout("wlm_lstm", "LSTM", 24, 24, tied=False)
        record_dropout("wlm_gru_tied", "GRU", 20, 20, tied=True)
    record_classifier("bilstm_max", "LSTM", 2, True, "max")
    record_classifier("gru_mean", "GRU", 1, False, "mean")
    record_classifier_dropout("bilstm_max", "LSTM", 2, True, "max")
    record_classifier_dropout("gru_mean", "GRU", 1, False, "mean")


if __name__ == "__main__":
    main()
