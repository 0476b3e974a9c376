#!/usr/bin/env python3
"""Encoder-decoder speed, slm against transformers, side by side on the same random T5s and the
same threads (BENCHMARKS.md, "Seq2Seq"): encoder tokens/s over a 256-token source, decode
tokens/s of 128 greedy steps and of a 4-beam search over its states (EOS suppressed, so every
run decodes the same length). Models: the tiny T5 fixtures and a random-init t5-small
(T5Config() defaults: 60M parameters, 32,128 tokens), saved to target/bench/.

Usage: python3 tools/bench_seq2seq.py [--slm target/release/slm] [--threads 2] [--rounds 2]
(pip install torch transformers)"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def models():
    from transformers import T5Config, T5ForConditionalGeneration
    out = {"t5_relu (fixture)": ROOT / "tests/fixtures/t5/t5_relu/safetensors",
           "t5_gated (fixture)": ROOT / "tests/fixtures/t5/t5_gated/safetensors"}
    small = ROOT / "target/bench/t5-small-random"
    if not (small / "model.safetensors").exists():
        import torch
        torch.manual_seed(0)
        T5ForConditionalGeneration(T5Config(decoder_start_token_id=0)).save_pretrained(small)
    out["t5-small (random)"] = small
    return out


def hf_run(path, src_len, gen, beams, repeats):
    import torch
    from transformers import T5ForConditionalGeneration
    m = T5ForConditionalGeneration.from_pretrained(path).eval()
    v = m.config.vocab_size
    ids = torch.tensor([[3 + (i * 7919) % (v - 3) for i in range(src_len)]])
    enc, greedy, beam = [], [], []
    kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
    with torch.no_grad():
        m.generate(ids[:, :8], max_new_tokens=2)  # warm up
        for _ in range(repeats):
            t = time.perf_counter()
            states = m.encoder(input_ids=ids)
            enc.append(src_len / (time.perf_counter() - t))
            t = time.perf_counter()
            m.generate(encoder_outputs=states, **kw)
            greedy.append(gen / (time.perf_counter() - t))
            t = time.perf_counter()
            m.generate(encoder_outputs=states, num_beams=beams, early_stopping=False, **kw)
            beam.append(gen / (time.perf_counter() - t))
    med = statistics.median
    return {"encoder_tok_s": med(enc), "greedy_decode_tok_s": med(greedy), "beam_decode_tok_s": med(beam)}


def slm_run(slm, path, src_len, gen, beams, repeats, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([slm, "bench", "-m", str(path), "--prompt-tokens", str(src_len), "--gen-tokens",
                          str(gen), "--beams", str(beams), "--repeats", str(repeats), "--json"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default=str(ROOT / "target/release/slm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch
    import transformers
    torch.set_num_threads(a.threads)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}; {a.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}")
    keys = [("encoder_tok_s", "encoder"), ("greedy_decode_tok_s", "greedy"), ("beam_decode_tok_s", "4-beam")]
    print("| model | " + " | ".join(f"{n} slm / transformers (tok/s)" for _, n in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, path in models().items():
        runs = {"slm": [], "hf": []}
        for _ in range(a.rounds):
            runs["hf"].append(hf_run(path, 256, 128, 4, a.repeats))
            runs["slm"].append(slm_run(a.slm, path, 256, 128, 4, a.repeats, a.threads))
        cells = []
        for k, _ in keys:
            s = statistics.median(r[k] for r in runs["slm"])
            h = statistics.median(r[k] for r in runs["hf"])
            cells.append(f"{s:,.0f} / {h:,.0f} = {s / h:.2f}×")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
