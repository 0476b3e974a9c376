#!/usr/bin/env python3
"""Do llama.cpp and transformers read what `slm quantize` and `slm convert` write? (issue 5)

For each tiny random-init fixture (gpt2, llama with Llama 3 RoPE scaling, qwen2, phi3, gemma2
with soft-capping and alternating sliding layers, gemma3 with q/k norms and two RoPE bases), with
the real GPT-2 BPE cut to its 320 tokens as tokenizer:
  1. `slm quantize -m FOLDER -t f32|q8_0` writes a GGUF;
  2. llama.cpp (llama-cpp-python) loads it: its logits on the fixture prompts are compared with
     transformers' (expected.json), and its greedy tokens with transformers' (f32) and with slm's
     on the same file (q8_0, from text prompts);
  3. `slm convert` turns the f32 GGUF back into a folder that transformers loads: logits and
     greedy tokens against expected.json, and the tokenizer against the original.
Also a Llama and a Phi-3 with the real Llama 2 SentencePiece vocabulary: llama.cpp's logits against
transformers', the converted folder in transformers, and llama.cpp's own tokenizer test vectors on
the GGUF slm wrote.

    pip install -r tools/requirements.txt llama-cpp-python==0.3.36
    (on a CPU with AMX, build it with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON
    -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF": its AMX path crashes on Q8_0)
    cargo build --release && python tools/check_gguf_export.py [gpt2 llama qwen2 gemma2 gemma3 spm-llama spm-phi3]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
FIX = ROOT / "tests" / "fixtures"
SLM = ROOT / "target" / "release" / "slm"


def slm(*args):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    return subprocess.run([str(SLM), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def bpe_320(dst):
    enc = json.loads((ASSETS / "tokenizers/gpt2/encoder.json").read_text())
    vocab = {t: i for t, i in enc.items() if i < 320}
    merges = [l for l in (ASSETS / "tokenizers/gpt2/vocab.bpe").read_text().splitlines()
              if not l.startswith("#version")][:64]
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def llamacpp(path):
    # f32 KV cache: llama.cpp's default f16 cache rounds keys and values, slm keeps f32.
    return Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False,
                 type_k=0, type_v=0)


def llamacpp_run(llm, ids, n_new):
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:llm.n_tokens])
    out = []
    for _ in range(n_new):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return logits, out


PROMPTS = ["Hello world", "the tiny tokenizer is", "and then"]


def llamacpp_text(llm, prompt, n_new):
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    _, out = llamacpp_run(llm, ids, n_new)
    return llm.detokenize(out).decode("utf-8", errors="replace")


GELU = ("gpt2", "gemma2", "gemma3")
GELU_TOL = 2e-3


def same_as_llama_quantize(tmp, family, ours):
    """slm's Q8_0 file against llama.cpp's own quantization of slm's f32 file, tensor by tensor."""
    import ctypes
    import gguf as gguf_py
    import llama_cpp
    theirs = tmp / f"{family}-llama-q8_0.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tmp / f"{family}-f32.gguf").encode(), str(theirs).encode(),
                                          ctypes.byref(p)) == 0
    a = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf_py.GGUFReader(str(ours)).tensors}
    b = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf_py.GGUFReader(str(theirs)).tensors}
    differ = sorted(n for n in b if a.get(n) != b[n]) + sorted(set(a) - set(b))
    print(f"{family} q8_0: {len(a)} tensors, {len(differ)} differ from llama.cpp's own quantization"
          + (f": {differ[:5]}" if differ else ""))
    return not differ


def main():
    if sys.argv[1:2] == ["--q8-greedy"]:
        llm = llamacpp(Path(sys.argv[2]))
        print(json.dumps([llamacpp_text(llm, p, 10) for p in PROMPTS]))
        return
    tmp = Path(tempfile.mkdtemp())
    ok = True
    # Phi-3 ships with SentencePiece only and llama.cpp looks up its added tokens: checked below.
    only = sys.argv[1:]
    for family in [f for f in ["gpt2", "llama", "qwen2", "gemma2", "gemma3"] if not only or f in only]:
        hf = tmp / family
        shutil.copytree(FIX / family / "safetensors", hf)
        bpe_320(hf)
        exp = json.loads((FIX / family / "expected.json").read_text())
        if family == "gemma2":
            # The fixture's query_pre_attn_scalar (20) is not the one llama.cpp derives (24):
            # slm refuses to export it (tests/gguf_export.rs); checked here that it does.
            r = subprocess.run([str(SLM), "quantize", "-m", str(hf), "-t", "f32", "-o",
                                str(tmp / "gemma2.gguf")], capture_output=True, text=True)
            good = r.returncode != 0 and "query_pre_attn_scalar" in r.stderr
            ok &= good
            print(f"gemma2: export {'refused' if good else 'NOT refused'}: {r.stderr.strip()}")
            continue
        for qtype in ["f32", "q8_0"]:
            gguf = tmp / f"{family}-{qtype}.gguf"
            slm("quantize", "-m", str(hf), "-t", qtype, "-o", str(gguf))
            if qtype == "f32":
                llm = llamacpp(gguf)
                for case in exp["cases"]:
                    ids, want = case["input_ids"], case["greedy"]
                    logits, greedy = llamacpp_run(llm, ids, len(want))
                    diff = float(np.abs(logits - np.array(case["logits"])).max())
                    scale = float(np.abs(np.array(case["logits"])).max())
                    # GELU families: llama.cpp's GELU is an f16 lookup table.
                    good = greedy == want and diff < (GELU_TOL if family in GELU else 1e-3) * max(scale, 1)
                    ok &= good
                    print(f"{family} f32 in llama.cpp: max |logit - transformers| {diff:.2e} "
                          f"(max |logit| {scale:.2f}), greedy {'=' if greedy == want else '!='} transformers")
                del llm
            else:
                ok &= same_as_llama_quantize(tmp, family, gguf)
                # In a child: llama-cpp-python 0.3.36 built with GGML_NATIVE crashes evaluating
                # Q8_0 models on AMX CPUs (its own quantization of them as well).
                r = subprocess.run([sys.executable, __file__, "--q8-greedy", str(gguf)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{family} q8_0: llama.cpp exited with {r.returncode} evaluating it "
                          f"(an AMX build does so on its own Q8_0 of the same file too)")
                    continue
                for prompt, theirs in zip(PROMPTS, json.loads(r.stdout.splitlines()[-1])):
                    ours = slm("generate", "-m", str(gguf), "--temperature", "0", "-n", "10",
                               "--ignore-eos", "--no-special", prompt).removesuffix("\n")
                    good = ours == theirs
                    ok &= good
                    print(f"{family} q8_0: llama.cpp greedy {'=' if good else '!='} slm greedy "
                          f"from {prompt!r}" + ("" if good else f": {theirs!r} vs {ours!r}"))
        if family.startswith("gemma"):
            # transformers 4.46 (tools/requirements.txt) has no Gemma 3; tests/gguf_export.rs
            # checks the converted Gemma folders against the fixtures' transformers outputs.
            continue
        back = tmp / f"{family}-back"
        slm("convert", "-m", str(tmp / f"{family}-f32.gguf"), "-o", str(back))
        model = AutoModelForCausalLM.from_pretrained(back, torch_dtype=torch.float32).eval()
        for case in exp["cases"]:
            x = torch.tensor([case["input_ids"]])
            with torch.no_grad():
                logits = model(x).logits[0].numpy()
                out = model.generate(x, max_new_tokens=len(case["greedy"]), do_sample=False,
                                     min_new_tokens=len(case["greedy"]), pad_token_id=0,
                                     eos_token_id=None)[0, x.shape[1]:].tolist()
            diff = float(np.abs(logits - np.array(case["logits"])).max())
            good = diff < 1e-4 and out == case["greedy"]
            ok &= good
            print(f"{family} converted, in transformers: max |logit diff| {diff:.2e}, greedy "
                  f"{'=' if out == case['greedy'] else '!='}")
        a = AutoTokenizer.from_pretrained(back)
        text = "Hello world, the tiny tokenizer"
        b_ids = json.loads(slm("tokenize", "-m", str(hf), "--json", text))["ids"]
        good = a(text, add_special_tokens=False)["input_ids"] == b_ids
        ok &= good
        print(f"{family} converted tokenizer in transformers {'=' if good else '!='} original")

    # SentencePiece: the Llama 2 vocabulary on tiny random Llama and Phi-3 models with 32000 and
    # 32064 rows (Phi-3's 64 extra rows are unused padding, as in Phi-3-mini).
    for family, rows in [(f, r) for f, r in [("llama", 32000), ("phi3", 32064)]
                         if not only or f"spm-{f}" in only]:
        sp = tmp / f"spm-{family}"
        cfg = AutoConfig.from_pretrained(FIX / family / "safetensors")
        cfg.vocab_size = rows
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(1.0, 0.1)
                else:
                    p.normal_(0.0, 0.25 if ("q_proj" in n or "k_proj" in n or "qkv" in n) else 0.08)
        model.save_pretrained(sp)
        shutil.copy(ASSETS / "tokenizers/llama2-spm/tokenizer.model", sp / "tokenizer.model")
        if family == "phi3":
            # Phi-3-mini's tokens on top of Llama 2's (its tokenizer_config.json); llama.cpp looks
            # some of them up by name for any model called phi3.
            names = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                     "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
                     "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
            added = {str(32000 + i): {"content": n, "special": i == 0 or n in ("<|end|>",)}
                     for i, n in enumerate(names)}
            (sp / "tokenizer_config.json").write_text(json.dumps(
                {"added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "<|endoftext|>",
                 "add_bos_token": False}))
        gguf = tmp / f"spm-{family}.gguf"
        slm("quantize", "-m", str(sp), "-t", "f32", "-o", str(gguf))
        llm = llamacpp(gguf)
        ids = [1] + llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=False)
        with torch.no_grad():
            x = torch.tensor([ids])
            want = model(x).logits[0].numpy()
            want_greedy = model.generate(x, max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                         pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
        logits, greedy = llamacpp_run(llm, ids, 10)
        diff = float(np.abs(logits - want).max())
        good = diff < 1e-3 and greedy == want_greedy
        ok &= good
        print(f"spm {family} f32 in llama.cpp: max |logit - transformers| {diff:.2e}, greedy "
              f"{'=' if greedy == want_greedy else '!='} transformers")
        del llm
        back = tmp / f"spm-{family}-back"
        slm("convert", "-m", str(gguf), "-o", str(back))
        again = AutoModelForCausalLM.from_pretrained(back, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            diff = float(np.abs(again(x).logits[0].numpy() - want).max())
        text = "The quick brown fox jumps over the lazy dog."
        with_bos = family != "phi3"  # the Phi-3 config above sets add_bos_token false
        same_ids = AutoTokenizer.from_pretrained(back)(text)["input_ids"] == (ids if with_bos else ids[1:])
        good = diff < 1e-4 and same_ids
        ok &= good
        print(f"spm {family} converted, in transformers: max |logit diff| {diff:.2e}, "
              f"tokenizer {'=' if same_ids else '!='} llama.cpp's ids")
        vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        vec = ASSETS / "tokenizers/vectors/ggml-vocab-llama-spm.gguf"
        cases = Path(str(vec) + ".inp").read_text().split("\n__ggml_vocab_test__\n")
        if cases and cases[-1] == "":
            cases.pop()
        want = [[int(t) for t in l.split()] for l in Path(str(vec) + ".out").read_text().splitlines()]
        same = sum(vocab.tokenize(c.encode(), add_bos=False, special=False) == w
                   for c, w in zip(cases, want))
        ok &= same == len(want)
        print(f"spm {family}: llama.cpp tokenizes {same}/{len(want)} of its test vectors as expected")
    print("ALL OK" if ok else "MISMATCHES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
