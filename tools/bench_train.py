#!/usr/bin/env python3
"""Training throughput of slm against PyTorch (+ PEFT), same machine, same threads, same data.

1. LoRA r=8 (alpha 16, q_proj/v_proj) on SmolLM2-135M in f32, sequences of 256 tokens, batch 4:
   training tokens/s. PyTorch loads the GGUF with transformers' own GGUF reader (dequantized to
   f32); slm trains from the same GGUF (converted once to f32 safetensors).
2. Full fine-tuning of all-MiniLM-L6-v2 with a new classification head on SST-2, batch 32,
   sentences up to 64 tokens: samples/s.

Each run is its own process, so peak RSS (from /usr/bin/time) is that run's alone. Step times are
medians over the timed steps after warm-up.

    python tools/bench_train.py --threads 2 [--steps 6]

Two slm binaries side by side (a change against the previous build), without PyTorch:

    python tools/bench_train.py --no-torch --slm before=/tmp/slm-before --slm after=target/release/slm --reps 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
GGUF = ASSETS / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = ASSETS / "models/all-MiniLM-L6-v2"
SHAKESPEARE = ASSETS / "corpora/tinyshakespeare/input.txt"
SST2 = ASSETS / "classification/sst2/train.tsv"
SLM = ROOT / "target/release/slm"


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (stdout, peak RSS MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name] + cmd, capture_output=True,
                             text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
        return out.stdout, int(t.read().strip().splitlines()[-1]) / 1024


# ---- PyTorch side (runs in a child process: python bench_train.py --torch-lora ...) ----

def torch_lora(threads, steps):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import time
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    ids = tok(SHAKESPEARE.read_text()[:200_000])["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for s in range(steps):
        x = torch.tensor([ids[(s * 4 + i) * 256:(s * 4 + i + 1) * 256] for i in range(4)])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": statistics.median(times[2:]), "tokens": 1024}))


def torch_cls(threads, steps):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import time
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model.train()
    rows = [l.split("\t") for l in SST2.read_text().splitlines()[1:]]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    times = []
    for s in range(steps):
        batch = rows[s * 32:(s + 1) * 32]
        enc = tok([r[0] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        y = torch.tensor([int(r[1]) for r in batch])
        t0 = time.perf_counter()
        loss = model(**enc, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": statistics.median(times[2:]), "samples": 32}))


# ---- slm side ----

def slm_step_s(out_dir):
    """Median step time of the timed steps, from metrics.jsonl's elapsed times."""
    recs = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    el = [r["elapsed_s"] for r in recs if "elapsed_s" in r]
    return statistics.median([b - a for a, b in zip(el[1:], el[2:])])


def slm_lora(slm, base, text, work, a, env):
    out_dir = work / "lora-run"
    subprocess.run(["rm", "-rf", str(out_dir)])
    out, rss = timed([str(slm), "finetune", "--task", "causal-lm", "-m", str(base), "--train", str(text),
                      "--valid-split", "0", "-o", str(out_dir), "--method", "lora", "--lora-r", "8",
                      "--lora-alpha", "16", "--max-steps", str(a.steps), "--batch-size", "4",
                      "--max-length", "256", "--threads", str(a.threads), *extra(slm, a)], env)
    return {"tokens_per_s": 1024 / slm_step_s(out_dir), "rss_mib": rss}


def slm_cls(slm, sst, work, a, env):
    out_dir = work / "cls-run"
    subprocess.run(["rm", "-rf", str(out_dir)])
    out, rss = timed([str(slm), "finetune", "-m", str(MINILM), "--train", str(sst), "--valid-split", "0",
                      "-o", str(out_dir), "--max-steps", str(a.steps), "--batch-size", "32",
                      "--max-length", "64", "--threads", str(a.threads), *extra(slm, a)], env)
    return {"samples_per_s": 32 / slm_step_s(out_dir), "rss_mib": rss}


def extra(slm, a):
    """--slm-args NAME="ARGS": more finetune flags for the binary NAME (e.g. --no-dropout)."""
    for spec in a.slm_args:
        name, args = spec.split("=", 1)
        if any(n == name and str(p) == str(slm) for n, p in (b.split("=", 1) for b in a.slm)):
            return args.split()
    return []


def compare_binaries(a, env, work, base, text, sst):
    bins = [b.split("=", 1) for b in a.slm]
    runs = {name: {"lora": [], "cls": []} for name, _ in bins}
    for rep in range(a.reps):
        # Alternate the order so that neither binary always runs on a warmer machine.
        for name, path in (bins if rep % 2 == 0 else bins[::-1]):
            runs[name]["lora"].append(slm_lora(path, base, text, work, a, env))
            if not a.lora_only:
                runs[name]["cls"].append(slm_cls(path, sst, work, a, env))
    med = lambda rs, k: statistics.median(r[k] for r in rs) if rs else float("nan")
    print("| binary | LoRA SmolLM2 tok/s | peak RSS | MiniLM samples/s | peak RSS |")
    print("|---|---|---|---|---|")
    for name, _ in bins:
        r = runs[name]
        print(f"| {name} | {med(r['lora'], 'tokens_per_s'):.0f} | {med(r['lora'], 'rss_mib'):.0f} MiB | "
              f"{med(r['cls'], 'samples_per_s'):.1f} | {med(r['cls'], 'rss_mib'):.0f} MiB |")
    print(json.dumps(runs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--torch-lora", action="store_true")
    ap.add_argument("--torch-cls", action="store_true")
    ap.add_argument("--slm", action="append", default=[], help="NAME=PATH of an slm binary (repeat)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--slm-args", action="append", default=[], help='NAME="FLAGS" for one --slm binary')
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--lora-only", action="store_true", help="with --no-torch: skip the MiniLM run")
    a = ap.parse_args()
    if a.torch_lora:
        return torch_lora(a.threads, a.steps)
    if a.torch_cls:
        return torch_cls(a.threads, a.steps)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads))
    work = Path(tempfile.mkdtemp(prefix="slm-bench-train-"))
    results = {}

    # The f32 base both sides train from in slm is converted once, outside the timing.
    base = work / "lora" / "base"
    subprocess.run([str(SLM), "convert", "-m", str(GGUF), "-o", str(base), "--dtype", "f32"], check=True,
                   capture_output=True)
    text = work / "shakespeare.txt"
    text.write_text(SHAKESPEARE.read_text()[:200_000])
    sst = work / "sst2.tsv"
    sst.write_text("\n".join(SST2.read_text().splitlines()[:1 + 32 * a.steps]) + "\n")
    if a.no_torch:
        return compare_binaries(a, env, work, base, text, sst)
    out, rss = timed([str(SLM), "finetune", "--task", "causal-lm", "-m", str(base), "--train", str(text),
                      "--valid-split", "0", "-o", str(work / "lora"), "--method", "lora", "--lora-r", "8",
                      "--lora-alpha", "16", "--max-steps", str(a.steps), "--batch-size", "4",
                      "--max-length", "256", "--threads", str(a.threads)], env)
    results["lora_slm"] = {"tokens_per_s": 1024 / slm_step_s(work / "lora"), "rss_mib": rss}
    out, rss = timed([sys.executable, __file__, "--torch-lora", "--threads", str(a.threads),
                      "--steps", str(a.steps)], env)
    r = json.loads(out.strip().splitlines()[-1])
    results["lora_torch"] = {"tokens_per_s": r["tokens"] / r["step_s"], "rss_mib": rss}

    out, rss = timed([str(SLM), "finetune", "-m", str(MINILM), "--train", str(sst), "--valid-split", "0",
                      "-o", str(work / "cls"), "--max-steps", str(a.steps), "--batch-size", "32",
                      "--max-length", "64", "--threads", str(a.threads)], env)
    results["cls_slm"] = {"samples_per_s": 32 / slm_step_s(work / "cls"), "rss_mib": rss}
    out, rss = timed([sys.executable, __file__, "--torch-cls", "--threads", str(a.threads),
                      "--steps", str(a.steps)], env)
    r = json.loads(out.strip().splitlines()[-1])
    results["cls_torch"] = {"samples_per_s": r["samples"] / r["step_s"], "rss_mib": rss}

    print(json.dumps(results, indent=1))
    lr = results["lora_slm"]["tokens_per_s"] / results["lora_torch"]["tokens_per_s"]
    cr = results["cls_slm"]["samples_per_s"] / results["cls_torch"]["samples_per_s"]
    print(f"| LoRA r=8 SmolLM2-135M, 4×256 | {results['lora_slm']['tokens_per_s']:.0f} tok/s | "
          f"{results['lora_torch']['tokens_per_s']:.0f} tok/s | {lr:.2f}× | "
          f"{results['lora_slm']['rss_mib']:.0f} / {results['lora_torch']['rss_mib']:.0f} MiB |")
    print(f"| full MiniLM classifier, batch 32 | {results['cls_slm']['samples_per_s']:.1f} samples/s | "
          f"{results['cls_torch']['samples_per_s']:.1f} samples/s | {cr:.2f}× | "
          f"{results['cls_slm']['rss_mib']:.0f} / {results['cls_torch']['rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
