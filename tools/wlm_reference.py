"""PyTorch's word_language_model (github.com/pytorch/examples, word_language_model/model.py and
main.py), as the fixtures and the parity benchmark run it: the RNNModel class with that file's
structure and parameter names, batchify/get_batch, evaluate() and the training loop of main.py
(SGD by hand after clip_grad_norm_, the learning rate divided by 4 when validation does not
improve). Written out here because the example is not a package; the logic follows main.py.
"""
import math
import time

import torch
import torch.nn as nn


class RNNModel(nn.Module):
    """word_language_model's RNNModel: encoder, LSTM/GRU, decoder, dropout, optional tying."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return decoded, hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))
        return w.new_zeros(self.nlayers, bsz, self.nhid)


def repackage(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage(v) for v in h)


def words(ls):
    out = []
    for line in ls:
        out += line.split() + ["<eos>"]
    return out


def batchify(ids, bsz):
    n = len(ids) // bsz
    return torch.tensor(ids[: n * bsz]).view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def evaluate(model, ids, bptt=35, bsz=1):
    """main.py's evaluate() over `bsz` streams: mean NLL over every predicted token."""
    model.eval()
    data = batchify(ids, bsz)
    hidden = model.init_hidden(bsz)
    crit = nn.CrossEntropyLoss()
    total = 0.0
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            x, y = get_batch(data, i, bptt)
            out, hidden = model(x, hidden)
            hidden = repackage(hidden)
            total += len(x) * crit(out, y).item()
    return total / (len(data) - 1)


def exact_clip_(params, max_norm):
    """clip_grad_norm_ with the norm summed in float64. PyTorch's own float32 norm of a 1e6-value
    gradient is off by up to ~1e-3 relative on CPU (-1.1e-3 for a 13777 x 200 decoder), which
    changes the clipped step, so its trajectory leaves any other implementation's after a few
    steps whatever else they do."""
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def train_epoch(model, data, lr, clip=0.25, bptt=35):
    """One epoch of main.py's train(); returns the seconds it took."""
    model.train()
    crit = nn.CrossEntropyLoss()
    hidden = model.init_hidden(data.size(1))
    t0 = time.perf_counter()
    for i in range(0, data.size(0) - 1, bptt):
        x, y = get_batch(data, i, bptt)
        model.zero_grad()
        hidden = repackage(hidden)
        out, hidden = model(x, hidden)
        loss = crit(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
    return time.perf_counter() - t0


def train(model, ids, valid_ids, epochs, lr=20.0, clip=0.25, bptt=35, bsz=20, eval_bsz=1, log=None):
    """main.py's epoch loop: evaluate after each epoch, lr / 4 when it did not improve."""
    data = batchify(ids, bsz)
    best = None
    history = []
    for epoch in range(epochs):
        seconds = train_epoch(model, data, lr, clip, bptt)
        v = evaluate(model, valid_ids, bptt, eval_bsz)
        history.append({"epoch": epoch + 1, "valid_loss": v, "train_seconds": seconds,
                        "tokens": data.size(1) * (data.size(0) - 1), "lr": lr})
        if log:
            log(history[-1])
        if best is None or v < best:
            best = v
        else:
            lr /= 4.0
    return history


class RNNClassifier(nn.Module):
    """The text classifier `slm finetune --task classify --arch bilstm|bigru|lstm|gru` builds,
    with slm's parameter names: embedding -> dropout -> (bi)LSTM/GRU over packed sequences
    (dropout between layers) -> mean or max over each text's positions -> dropout -> linear.
    PyTorch's default initialisation (the embedding N(0, 1))."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, nclass, bidirectional=True,
                 pooling="max", dropout=0.3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, batch_first=True,
                                         dropout=dropout if nlayers > 1 else 0.0,
                                         bidirectional=bidirectional)
        self.classifier = nn.Linear(nhid * (2 if bidirectional else 1), nclass)
        self.pooling = pooling

    def forward(self, ids, lengths):
        """ids [b, t] right-padded, lengths [b] (CPU int64): logits [b, nclass]."""
        return self.classifier(self.drop(self.pooled(ids, lengths)))

    def pooled(self, ids, lengths):
        """Each text's pooled recurrent states [b, nhid * directions]: what `slm embed` gives."""
        x = self.drop(self.encoder(ids))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        if self.pooling == "max":
            pooled = out.masked_fill(~mask, float("-inf")).max(1).values
        else:
            pooled = (out * mask).sum(1) / lengths[:, None].to(out.dtype)
        return pooled
