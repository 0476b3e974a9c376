#!/usr/bin/env python3
"""Embedding throughput, side by side in one run: slm vs sentence-transformers (PyTorch) vs
onnxruntime, on all-MiniLM-L6-v2 and the 872 SST-2 test sentences, batch 32, same thread count.
Tokenization, length-sorted batching, mean pooling and normalisation are timed for every engine;
model load is not. Each engine runs `--repeats` times, interleaved; medians are reported.

    pip install -r tools/requirements.txt
    cargo build --release && python tools/bench_encoders.py [--threads 2] [--repeats 5]
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models/all-MiniLM-L6-v2"
DATA = ASSETS / "classification/sst2/test.tsv"


def sentences():
    with open(DATA, newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def bench_st(texts, threads, batch):
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    st = SentenceTransformer(str(MODEL), device="cpu")
    st.encode(texts[:64], batch_size=batch)
    t = time.perf_counter()
    st.encode(texts, batch_size=batch)
    return len(texts) / (time.perf_counter() - t)


def export_onnx(path):
    import torch
    from transformers import AutoModel
    m = AutoModel.from_pretrained(str(MODEL)).eval()
    x = torch.ones(1, 8, dtype=torch.long)
    torch.onnx.export(m, (x, x, torch.zeros_like(x)), str(path),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "b", 1: "t"} for n in ["input_ids", "attention_mask", "token_type_ids"]},
                      opset_version=17)


def bench_ort(texts, threads, batch, onnx_path):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(str(MODEL))

    def run():
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [None] * len(texts)
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="np")
            h = sess.run(None, {k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]})[0]
            m = enc["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            v /= np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
            for j, i in enumerate(idx):
                out[i] = v[j]
        return out

    run()
    t = time.perf_counter()
    run()
    return len(texts) / (time.perf_counter() - t)


def bench_slm(threads, batch):
    exe = ROOT / "target/release/slm"
    out = subprocess.run([str(exe), "bench", "--json", "--threads", str(threads), "--repeats", "1",
                          "--batch-size", str(batch), "-m", str(MODEL), "--input", str(DATA)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["sentences_per_s"]


def child(engine, threads, batch, onnx_path):
    """Each measurement runs in its own process so thread pools and caches start cold alike."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench_encoders as b; "
            f"t = b.sentences(); ")
    if engine == "st":
        code += f"print(b.bench_st(t, {threads}, {batch}))"
    else:
        code += f"print(b.bench_ort(t, {threads}, {batch}, {str(onnx_path)!r}))"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    import onnxruntime
    import sentence_transformers
    import torch
    tmp = Path(tempfile.mkdtemp())
    onnx_path = tmp / "minilm.onnx"
    export_onnx(onnx_path)
    res = {"slm": [], "sentence-transformers": [], "onnxruntime": []}
    for _ in range(a.repeats):
        res["slm"].append(bench_slm(a.threads, a.batch))
        res["sentence-transformers"].append(child("st", a.threads, a.batch, onnx_path))
        res["onnxruntime"].append(child("ort", a.threads, a.batch, onnx_path))
    n = len(sentences())
    print(f"all-MiniLM-L6-v2, {n} SST-2 sentences, batch {a.batch}, {a.threads} threads, "
          f"{a.repeats} runs each (torch {torch.__version__}, sentence-transformers "
          f"{sentence_transformers.__version__}, onnxruntime {onnxruntime.__version__})")
    base = statistics.median(res["sentence-transformers"])
    print(f"{'engine':<24}{'median sent/s':>14}{'min':>8}{'max':>8}{'vs ST':>8}")
    for k, v in res.items():
        med = statistics.median(v)
        print(f"{k:<24}{med:>14.1f}{min(v):>8.1f}{max(v):>8.1f}{med / base:>7.2f}x")


if __name__ == "__main__":
    main()
