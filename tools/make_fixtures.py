#!/usr/bin/env python3
"""Builds the reference fixtures under tests/fixtures/ with Hugging Face transformers.

Pinned (tools/requirements.txt): torch==2.5.1, transformers==4.46.3, gguf==0.10.0, numpy<2.

For every causal family (gpt2, llama, qwen2, phi3) a tiny random-init model of the real architecture
is saved as safetensors (llama: sharded) AND pytorch_model.bin, with the logits of a few prompts and a
greedy continuation. The real SmolLM2-135M-Instruct GGUF from SLM_ASSETS is dequantized by
transformers' own GGUF loader and its greedy continuation and last-position logits are recorded, and
its chat template is rendered by `apply_chat_template` on several message lists.

Encoders: tiny BERT/DistilBERT/RoBERTa models with each head (base, masked LM, sequence and token
classification), and the real all-MiniLM-L6-v2 embedded by sentence-transformers (pinned).

Quant: llama.cpp's own quantization (llama_model_quantize) of f32 rows, per type.
Metrics: scikit-learn's report on recorded predictions (one class never predicted).
Perplexity: transformers' sliding-window perplexity of the tiny models, and of SmolLM2 (dequantized)
on the first 20,000 characters of WikiText-2 valid.
Train: loss, gradients and AdamW steps of the tiny BERT classifier (PyTorch, dropout off).
PEFT (peft==0.13.2): an adapter PEFT made, with its logits; PEFT's logits for the adapter slm wrote.

Run: python tools/make_fixtures.py [gpt2 llama qwen2 phi3 smollm2 encoders minilm perplexity metrics quant train peft]
(SLM_ASSETS defaults to ../shared/assets)

transformers 5.x: `python tools/make_fixtures.py v5` with tools/requirements-v5.txt installed
(torch==2.6.0, transformers==5.24.0, peft==0.21.2) re-saves the 4.x fixtures as 5.x writes them
and records what 5.x computes on them, under tests/fixtures/v5/.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import peft
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
ASSETS = Path(os.environ.get("SLM_ASSETS", ROOT.parent / "shared" / "assets"))
VOCAB = 320
PROMPTS = [[1, 17, 42, 99, 3, 250], [5], [300, 301, 302, 7, 7, 7, 7, 9, 11, 13, 200, 100, 64]]
GREEDY_NEW = 10


def tiny_models():
    yield "gpt2", GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                   bos_token_id=0, eos_token_id=0)
    ), {}
    yield "llama", LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ), {"max_shard_size": "100KB"}
    yield "qwen2", Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    use_sliding_window=False)
    ), {}
    yield "phi3", Phi3ForCausalLM(
        Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   original_max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=None)
    ), {}


def record_tiny(name, model, save_kw):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    # Random weights are drawn larger than the default init so that logits differ meaningfully;
    # norm gains near 1 and larger query/key projections make attention sharp, so a wrong RoPE,
    # head layout or Q/K permutation moves the logits far beyond the 1e-4 tolerance.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and n.endswith("weight") and ("norm" in n or "ln_" in n):
                p.normal_(1.0, 0.1)
            elif any(k in n for k in ("q_proj", "k_proj", "qkv_proj", "c_attn")):
                p.normal_(0.0, 0.25)
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(d / "safetensors", safe_serialization=True, **save_kw)
    if transformers.__version__.startswith("4."):
        # transformers 5.x writes safetensors only.
        model.save_pretrained(d / "bin", safe_serialization=False)
    write_causal_cases(name, model, d)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params")


def write_causal_cases(name, model, d):
    """The logits of PROMPTS and their greedy continuations, to d/expected.json."""
    cases = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0]
            out = model.generate(x, max_new_tokens=GREEDY_NEW, do_sample=False, min_new_tokens=GREEDY_NEW,
                                 pad_token_id=0, eos_token_id=None)
        cases.append({
            "input_ids": ids,
            "logits": logits.numpy().round(7).tolist(),
            "greedy": out[0, len(ids):].tolist(),
        })
    (d / "expected.json").write_text(json.dumps({"family": name, "cases": cases}))


def record_tiny_tokenizer():
    """A byte-level BPE of the tiny GPT-2's 320 ids (id 0 <|endoftext|>, the 256 bytes, 63
    merges learned on tiny shakespeare), so the tiny GPT-2 can be fine-tuned on text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = (ASSETS / "corpora/tinyshakespeare/input.txt").read_text()[:50_000]
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    d = OUT / "gpt2" / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 64}))
    print("gpt2 tokenizer:", tok.get_vocab_size(), "ids")


SMOL_PROMPT = "Once upon a time, there was a little"
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another  one\nplease ✨"}],
]


def record_smollm2():
    gguf = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        sys.exit(f"missing {gguf}: set SLM_ASSETS")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # The GGUF has no output.weight: the head is tied to the embeddings, which transformers 4.46's
    # GGUF loader does not infer.
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.eval()
    ids = tok(SMOL_PROMPT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, -1]
        out = model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    top = torch.topk(logits, 20)
    from gguf import GGUFReader
    reader = GGUFReader(str(gguf))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    tok.chat_template = template
    chats = []
    for msgs in CHATS:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        chats.append({"messages": msgs, "rendered": text,
                      "ids": tok(text, add_special_tokens=False)["input_ids"]})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "smollm2.json").write_text(json.dumps({
        "prompt": SMOL_PROMPT,
        "prompt_ids": ids,
        "greedy_ids": new,
        "greedy_text": tok.decode(new),
        "last_logits_top20": {"ids": top.indices.tolist(), "values": top.values.numpy().round(6).tolist()},
        "last_logits_sum": float(logits.sum()),
        "chats": chats,
    }, indent=1, ensure_ascii=False))
    print("smollm2:", repr(tok.decode(new)))


# ---------------------------------------------------------------------------------------------
# Encoders: tiny random-init BERT / DistilBERT / RoBERTa with every head, sharing one small
# WordPiece vocabulary cut from MiniLM's, and the real all-MiniLM-L6-v2 through sentence-transformers.

ENC_TEXTS = [
    ("the capital of france is [MASK].", None),
    ("hello world!", None),
    ("a man is playing a guitar.", "someone plays music on stage"),
    ("unbelievably, the cats sat quietly on the old red mat while it rained", None),
]


def tiny_vocab():
    words = sorted({w for a, b in ENC_TEXTS for w in (a + " " + (b or "")).replace("[MASK]", "").split()})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars[:36]]
    for w in words + ["the", "un", "##believ", "##ably", "cat", "##s", "play", "##ing", "rain", "##ed"]:
        w = w.strip(".,!?")
        if w and w not in vocab:
            vocab.append(w)
    return vocab


def tiny_encoders(n_vocab):
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification,
                              BertForTokenClassification, BertModel, DistilBertConfig,
                              DistilBertForMaskedLM, DistilBertForSequenceClassification,
                              DistilBertForTokenClassification, RobertaConfig, RobertaForMaskedLM,
                              RobertaForSequenceClassification)
    bert = dict(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    labels3 = {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
               "label2id": {"negative": 0, "neutral": 1, "positive": 2}}
    distil = dict(vocab_size=n_vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                  pad_token_id=0)
    roberta = dict(bert, type_vocab_size=1, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                   max_position_embeddings=66)
    yield "bert_base", BertModel(BertConfig(**bert)), False
    yield "bert_mlm", BertForMaskedLM(BertConfig(**bert)), False
    yield "bert_cls", BertForSequenceClassification(BertConfig(**bert, **labels3)), False
    yield "bert_tok", BertForTokenClassification(BertConfig(**bert, num_labels=5)), False
    yield "distilbert_mlm", DistilBertForMaskedLM(DistilBertConfig(**distil)), False
    # Saved without id2label: slm must name the labels LABEL_0.. from the weight shape.
    yield "distilbert_cls", DistilBertForSequenceClassification(DistilBertConfig(**distil, num_labels=3)), True
    yield "distilbert_tok", DistilBertForTokenClassification(DistilBertConfig(**distil, num_labels=4)), False
    yield "roberta_mlm", RobertaForMaskedLM(RobertaConfig(**roberta)), False
    yield "roberta_cls", RobertaForSequenceClassification(RobertaConfig(**roberta, **labels3)), False


def record_encoders():
    from transformers import BertTokenizerFast
    vocab = tiny_vocab()
    root = OUT / "encoders"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(4321)
    enc_single = [tok(t, p) for t, p in ENC_TEXTS]
    # HF does not take a list that mixes pairs and single texts: encode each, then pad as HF pads.
    batch = tok.pad([{k: v for k, v in e.items()} for e in enc_single], return_tensors="pt")
    cases = {"texts": [[t, p] for t, p in ENC_TEXTS],
             "input_ids": [e["input_ids"] for e in enc_single]}
    models = {}
    for name, model, strip_labels in tiny_encoders(len(vocab)):
        d = root / name
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.08)
        model.eval()
        model.save_pretrained(d / "safetensors", safe_serialization=True)
        model.save_pretrained(d / "bin", safe_serialization=False)
        if strip_labels:
            for sub in ("safetensors", "bin"):
                cfg = json.loads((d / sub / "config.json").read_text())
                cfg.pop("id2label", None)
                cfg.pop("label2id", None)
                (d / sub / "config.json").write_text(json.dumps(cfg, indent=2))
        for sub in ("safetensors", "bin"):
            tok.save_pretrained(d / sub)
        inputs = dict(batch)
        if not name.startswith("bert"):
            # DistilBERT has no segments; RoBERTa has one, and its tokenizer gives all zeros.
            inputs.pop("token_type_ids")
        with torch.no_grad():
            out = model(**inputs)
        rec = {}
        if hasattr(out, "logits"):
            lg = out.logits
            if lg.dim() == 3:
                rec["logits"] = [lg[i, :len(e["input_ids"])].numpy().round(7).tolist()
                                 for i, e in enumerate(enc_single)]
            else:
                rec["logits"] = lg.numpy().round(7).tolist()
        else:
            rec["hidden"] = [out.last_hidden_state[i, :len(e["input_ids"])].numpy().round(7).tolist()
                             for i, e in enumerate(enc_single)]
            rec["pooled"] = out.pooler_output.numpy().round(7).tolist()
        models[name] = rec
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params")
    cases["models"] = models
    (root / "expected.json").write_text(json.dumps(cases))


MINILM_SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée costs €5 — naïve café prices!",
    "A",
    "Sentence embeddings map text to vectors; similar meanings end up close together in that space.",
    "东京 is the capital of Japan.",
    " ".join(["long"] * 300) + " end",
]


def record_minilm():
    from sentence_transformers import SentenceTransformer
    import sentence_transformers
    path = ASSETS / "models" / "all-MiniLM-L6-v2"
    st = SentenceTransformer(str(path), device="cpu")
    single = [st.encode([s], convert_to_numpy=True)[0] for s in MINILM_SENTENCES]
    batched = st.encode(MINILM_SENTENCES, batch_size=4, convert_to_numpy=True)
    assert np.abs(np.stack(single) - batched).max() < 1e-5
    tok = AutoTokenizer.from_pretrained(str(path))
    pairs_a = ["How old are you?", "What is the weather like in Paris today, and tomorrow?", "Hi"]
    pairs_b = ["I am six years old.", "It will rain.", "An extremely long second text that needs truncating " * 3]
    pair_batch = tok(pairs_a, pairs_b, padding=True, truncation=True, max_length=24)
    single_batch = tok(MINILM_SENTENCES[:4], padding=True, truncation=True, max_length=10)
    (OUT / "minilm.json").write_text(json.dumps({
        "sentence_transformers": sentence_transformers.__version__,
        "max_seq_length": st.max_seq_length,
        "sentences": MINILM_SENTENCES,
        "embeddings": np.stack(single).round(8).tolist(),
        "pairs": {"a": pairs_a, "b": pairs_b, "max_length": 24, **{k: v for k, v in pair_batch.items()}},
        "truncated": {"texts": MINILM_SENTENCES[:4], "max_length": 10,
                      **{k: v for k, v in single_batch.items()}},
    }, ensure_ascii=False))
    print("minilm: dim", len(single[0]))


# ---------------------------------------------------------------------------------------------
# Perplexity with transformers' sliding window, every scored token weighted once.

def hf_perplexity(model, ids, max_length, stride):
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    return {"max_length": max_length, "stride": stride, "tokens": n_tokens, "windows": windows,
            "mean_nll": nll_sum / n_tokens, "perplexity": float(np.exp(nll_sum / n_tokens))}


WIKITEXT_CHARS = 20000


def record_perplexity():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, VOCAB, 150).tolist()
    out = {"ids": ids, "cases": []}
    for family in ["gpt2", "llama"]:
        model = AutoModelForCausalLM.from_pretrained(OUT / family / "safetensors", torch_dtype=torch.float32).eval()
        for max_length, stride in [(40, 16), (32, 32), (64, 64)]:
            out["cases"].append({"family": family, **hf_perplexity(model, ids, max_length, stride)})
    # KL(P_gpt2 || P_llama) and top-1 agreement over the same windows, as llama-perplexity reports.
    a = AutoModelForCausalLM.from_pretrained(OUT / "gpt2" / "safetensors", torch_dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(OUT / "llama" / "safetensors", torch_dtype=torch.float32).eval()
    max_length, stride = 40, 16
    kls, agree, prev_end = [], 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            la = torch.log_softmax(a(x).logits[0].double(), -1)
            lb = torch.log_softmax(b(x).logits[0].double(), -1)
        for target in range(max(prev_end, begin + 1), end):
            p = target - 1 - begin
            kls.append(float((la[p].exp() * (la[p] - lb[p])).sum()))
            agree += int(la[p].argmax() == lb[p].argmax())
        prev_end = end
        if end == len(ids):
            break
    out["compare"] = {"a": "gpt2", "b": "llama", "max_length": max_length, "stride": stride,
                      "mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)),
                      "top1_agreement": agree / len(kls), "tokens": len(kls)}
    gguf = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.eval()
    text = (ASSETS / "corpora" / "wikitext-2" / "valid.txt").read_text()[:WIKITEXT_CHARS]
    wids = tok(text, add_special_tokens=False)["input_ids"]
    out["smollm2_wikitext2"] = {"chars": WIKITEXT_CHARS, **hf_perplexity(model, wids, 1024, 512)}
    (OUT / "perplexity.json").write_text(json.dumps(out, indent=1))
    print("perplexity:", out["smollm2_wikitext2"])


# ---------------------------------------------------------------------------------------------
# Classification metrics from scikit-learn on recorded predictions (zero_division=0).

def record_metrics():
    import sklearn
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
    rng = np.random.default_rng(11)
    cases = []
    for n_classes, n, never_predicted in [(2, 60, None), (4, 97, 3), (5, 40, 0)]:
        truth = rng.integers(0, n_classes, n)
        pred = np.where(rng.random(n) < 0.6, truth, rng.integers(0, n_classes, n))
        if never_predicted is not None:
            pred[pred == never_predicted] = (never_predicted + 1) % n_classes
        labels = list(range(n_classes))
        p, r, f, s = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
        avg = {}
        for a in ["macro", "micro", "weighted"]:
            ap, ar, af, _ = precision_recall_fscore_support(truth, pred, labels=labels, average=a, zero_division=0)
            avg[a] = [ap, ar, af]
        cases.append({"labels": [f"class_{i}" for i in labels], "truth": truth.tolist(), "pred": pred.tolist(),
                      "accuracy": accuracy_score(truth, pred), "precision": p.tolist(), "recall": r.tolist(),
                      "f1": f.tolist(), "support": s.tolist(), "average": avg,
                      "confusion": confusion_matrix(truth, pred, labels=labels).tolist()})
    (OUT / "metrics.json").write_text(json.dumps({"sklearn": sklearn.__version__, "cases": cases}))
    print("metrics: sklearn", sklearn.__version__)


# ---------------------------------------------------------------------------------------------
# Quantization vectors: llama.cpp's own quantization of the same f32 rows. `slm quantize -t f32`
# writes SmolLM2 (dequantized) as an f32 GGUF; llama.cpp's llama_model_quantize (llama-cpp-python)
# quantizes it to each type; the first rows of a tensor that got exactly that type are recorded,
# f32 input and llama.cpp's bytes. Needs `cargo build --release` first.

QUANT_TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k": 14, "q5_k": 16, "q6_k": 18}


def record_quant_vectors():
    import subprocess
    import tempfile
    import llama_cpp
    from gguf import GGUFReader
    gguf = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tmp = Path(tempfile.mkdtemp())
    f32 = tmp / "f32.gguf"
    subprocess.run([str(ROOT / "target/release/slm"), "quantize", "-m", str(gguf), "-t", "f32", "-o", str(f32)],
                   check=True)
    # The dequantized weights lie on Q4_1's grid, which makes low-bit quantization trivially
    # exact; overwrite the first rows of every layer's tensors with Gaussian values so each type's
    # rounding and scale search is really exercised.
    rng = np.random.default_rng(5)
    reader = GGUFReader(str(f32), "r+")
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.data.shape) == 2:
            t.data[:2] = (rng.standard_normal(t.data[:2].shape) * 0.05).astype(np.float32)
    del reader
    src = {t.name: t for t in GGUFReader(str(f32)).tensors}
    cases = []
    for name, ftype in QUANT_TYPES.items():
        out = tmp / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        assert rc == 0, f"llama_model_quantize {name}: {rc}"
        want = name.upper().replace("_K", "_K")
        for t in GGUFReader(str(out)).tensors:
            if t.tensor_type.name == want and t.name.startswith("blk."):
                rows = 2
                row_bytes = t.data.shape[-1]
                cases.append({"type": name, "tensor": t.name,
                              "input": np.asarray(src[t.name].data[:rows]).astype(np.float32).ravel().round(9).tolist(),
                              "cols": int(src[t.name].data.shape[-1]), "rows": rows,
                              "bytes": np.asarray(t.data[:rows]).ravel().tolist()})
                break
        else:
            raise SystemExit(f"no tensor of type {want} in llama.cpp's {name} output")
    (OUT / "quant_vectors.json").write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "cases": cases}))
    print("quant vectors:", [(c["type"], c["tensor"]) for c in cases])


TRAIN_GRADS = [
    "classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
    "bert.encoder.layer.1.output.LayerNorm.weight", "bert.encoder.layer.1.output.dense.weight",
    "bert.encoder.layer.1.intermediate.dense.bias", "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.key.bias", "bert.encoder.layer.0.attention.self.value.weight",
    "bert.encoder.layer.0.attention.output.dense.weight", "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias", "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
]


def record_train():
    """Loss and gradients of the tiny BertForSequenceClassification on a padded batch (dropout
    off), then the losses of 3 AdamW steps with HF Trainer's decay groups and a linear schedule."""
    from transformers import BertForSequenceClassification, BertTokenizerFast
    src = OUT / "encoders" / "bert_cls" / "safetensors"
    tok = BertTokenizerFast.from_pretrained(src)
    texts = [t for t, p in ENC_TEXTS if p is None][:6]
    labels = [0, 2, 1, 2, 0, 1][:len(texts)]
    enc = tok(texts, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(
        src, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model.train()
    y = torch.tensor(labels)
    out = model(**enc, labels=y)
    out.loss.backward()
    named = dict(model.named_parameters())
    rec = {"texts": texts, "labels": labels, "input_ids": enc["input_ids"].tolist(),
           "loss": out.loss.item(),
           "grads": {n: named[n].grad.flatten().tolist() for n in TRAIN_GRADS}}
    nonzero = sum(int(p.grad.abs().sum() > 0) for p in model.parameters())
    rec["params_with_grad"] = nonzero
    rec["params"] = len(list(model.parameters()))
    model.zero_grad()
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, 4)
    losses = []
    for _ in range(3):
        out = model(**enc, labels=y)
        losses.append(out.loss.item())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    rec["step_losses"] = losses
    with torch.no_grad():
        rec["final_loss"] = model(**enc, labels=y).loss.item()
    # Masked LM: positions 1 and 3 of every text masked, loss only there.
    from transformers import BertForMaskedLM
    mlm = BertForMaskedLM.from_pretrained(OUT / "encoders" / "bert_mlm" / "safetensors",
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mlm.train()
    ids = enc["input_ids"].clone()
    mlm_labels = torch.full_like(ids, -100)
    for i in range(ids.shape[0]):
        for j in (1, 3):
            mlm_labels[i, j] = ids[i, j]
            ids[i, j] = tok.mask_token_id
    out = mlm(input_ids=ids, attention_mask=enc["attention_mask"], labels=mlm_labels)
    out.loss.backward()
    named = dict(mlm.named_parameters())
    rec["mlm"] = {"input_ids": ids.tolist(), "labels": mlm_labels.tolist(), "loss": out.loss.item(),
                  "grads": {n: named[n].grad.flatten().tolist() for n in [
                      "cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight",
                      "cls.predictions.transform.LayerNorm.bias", "cls.predictions.bias",
                      "bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"]}}
    (OUT / "train_bert.json").write_text(json.dumps(rec))
    print("train_bert: loss", rec["loss"], "steps", losses, rec["final_loss"])


ENCODER_GRADS = {
    "bert_tok": ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.key.weight",
                 "bert.encoder.layer.1.output.dense.weight", "classifier.weight", "classifier.bias"],
    "distilbert_cls": ["distilbert.embeddings.word_embeddings.weight", "distilbert.embeddings.LayerNorm.weight",
                       "distilbert.transformer.layer.0.attention.q_lin.weight",
                       "distilbert.transformer.layer.1.ffn.lin2.weight",
                       "distilbert.transformer.layer.1.output_layer_norm.bias",
                       "pre_classifier.weight", "classifier.weight"],
    "distilbert_mlm": ["distilbert.embeddings.word_embeddings.weight", "distilbert.transformer.layer.0.attention.v_lin.bias",
                       "vocab_transform.weight", "vocab_layer_norm.weight", "vocab_projector.bias"],
    "distilbert_tok": ["distilbert.transformer.layer.1.attention.out_lin.weight", "classifier.weight"],
    "roberta_cls": ["roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight",
                    "roberta.encoder.layer.0.attention.self.query.weight", "roberta.encoder.layer.1.intermediate.dense.bias",
                    "classifier.dense.weight", "classifier.out_proj.weight"],
    "roberta_mlm": ["roberta.embeddings.word_embeddings.weight", "roberta.encoder.layer.1.attention.output.LayerNorm.weight",
                    "lm_head.dense.weight", "lm_head.layer_norm.bias", "lm_head.bias"],
    "roberta_tok": ["roberta.encoder.layer.0.attention.self.value.weight", "classifier.weight"],
}


def record_train_encoders(root=OUT, names=None, model_dir=lambda n: OUT / "encoders" / n / "safetensors"):
    """Loss and gradients (eval mode: no dropout) of every encoder flavor with every head on the
    train_bert.json batch: sequence labels, per-token tags (id % 3 on each non-special token),
    masked-LM targets at positions 2 and 3, and the logits of that batch. roberta_tok is RoBERTa
    with a token head, saved here. Written to root/train_encoders.json."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
    rec_bert = json.loads((OUT / "train_bert.json").read_text())
    ids = torch.tensor(rec_bert["input_ids"])
    mask = (ids != 0).long()
    lengths = mask.sum(1).tolist()
    seq_labels = torch.tensor(rec_bert["labels"])
    tags = torch.full_like(ids, -100)
    mlm = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        for j in range(1, n - 1):
            tags[i, j] = int(ids[i, j]) % 3
        for j in (2, 3):
            mlm[i, j] = ids[i, j]
    tok_dir = OUT / "encoders" / "roberta_tok" / "safetensors"
    if not tok_dir.exists():
        torch.manual_seed(21)
        m = AutoModelForTokenClassification.from_pretrained(OUT / "encoders" / "roberta_cls" / "safetensors",
                                                            num_labels=3)
        m.save_pretrained(tok_dir)
        for f in (OUT / "encoders" / "roberta_cls" / "safetensors").iterdir():
            if not (tok_dir / f.name).exists():
                shutil.copy(f, tok_dir / f.name)
    out_rec = {"input_ids": ids.tolist(), "seq_labels": seq_labels.tolist(), "tags": tags.tolist(),
               "mlm_labels": mlm.tolist(), "models": {}}
    for name, grad_names in ENCODER_GRADS.items():
        if names is not None and name not in names:
            continue
        d = model_dir(name)
        cls = {"cls": AutoModelForSequenceClassification, "tok": AutoModelForTokenClassification,
               "mlm": AutoModelForMaskedLM}[name.split("_")[1]]
        labels = {"cls": seq_labels, "tok": tags, "mlm": mlm}[name.split("_")[1]]
        from safetensors.torch import load_file
        sd = load_file(str(d / "model.safetensors"))
        kw = {}
        for k in ("classifier.weight", "classifier.out_proj.weight"):
            if k in sd:
                kw["num_labels"] = sd[k].shape[0]
        model = cls.from_pretrained(d, **kw)
        if name == "roberta_mlm" and transformers.__version__.startswith("4."):
            # transformers 4.46 ties lm_head.bias to the decoder's bias, which the safetensors
            # file (deduplicated on save) lacks, so the loaded model has a zero bias: put the
            # stored one back, as the model that was saved had it.
            with torch.no_grad():
                model.lm_head.decoder.bias.copy_(sd["lm_head.bias"])
                model.lm_head.bias = model.lm_head.decoder.bias
        model.eval()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        named = dict(model.named_parameters())
        out_rec["models"][name] = {"loss": out.loss.item(),
                                   "grads": {n: grad_list(named[n].grad) for n in grad_names},
                                   "logits": out.logits.detach().numpy().round(7).tolist()}
        print(f"train_encoders {name}: loss {out.loss.item():.6f}")
    (root / "train_encoders.json").write_text(json.dumps(out_rec))


CAUSAL_GRADS = {
    "llama": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"],
    "qwen2": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
              "model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight",
              "model.norm.weight"],
    # Conv1D weights are [in, out] here, as stored.
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
             "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias",
             "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
             "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.ln_2.bias", "transformer.ln_f.weight"],
    "phi3": ["model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight",
             "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
             "model.norm.weight", "lm_head.weight"],
}
CAUSAL_LORA = {
    "llama": dict(target_modules=["q_proj", "v_proj"]),
    "qwen2": dict(target_modules=["q_proj", "v_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "phi3": dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def grad_list(t):
    """A gradient as a list, to 7 significant digits (the tests compare at 1e-4 relative)."""
    return [float(f"{x:.7g}") for x in t.flatten().tolist()]


def record_train_causal(root=OUT, names=("llama", "qwen2", "gpt2", "phi3"),
                        model_dir=lambda n: OUT / n / "safetensors"):
    """Loss and gradients of the tiny Llama (GQA, llama3 RoPE, untied), Qwen2 (biases, tied),
    GPT-2 (Conv1D, learned positions, tied) and Phi-3 (fused qkv and gate_up) on two sequences
    with ignored positions, full and with a PEFT LoRA (random A and B, saved to root/peft). Dropout
    off (eval mode: GPT-2's config has 0.1), so both sides compute the same function. Written to
    root/train_causal.json."""
    from peft import LoraConfig, get_peft_model
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 7, 9, 11, 13, 200],
                        [300, 301, 302, 7, 7, 7, 7, 9, 11, 13, 200, 100]])
    labels = ids.clone()
    labels[1, :4] = -100   # a prompt: no loss on its tokens
    labels[0, 6] = -100
    rec = {"input_ids": ids.tolist(), "labels": labels.tolist(), "models": {}}
    for name in names:
        # Gemma 2's soft-capped attention is computed by the eager implementation only.
        kw = {"attn_implementation": "eager"} if name.startswith("gemma") else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir(name), **kw)
        model.eval()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        named = dict(model.named_parameters())
        r = {"loss": out.loss.item(),
             "grads": {n: grad_list(named[n].grad) for n in CAUSAL_GRADS[name]},
             "params_with_grad": sum(int(p.grad.abs().sum() > 0) for p in model.parameters())}
        model.zero_grad()
        torch.manual_seed(11)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                         init_lora_weights=False, **CAUSAL_LORA[name])
        pm = get_peft_model(model, cfg)
        pm.eval()
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        pm.save_pretrained(root / "peft" / f"{name}_lora")
        r["lora_loss"] = out.loss.item()
        with torch.no_grad():
            r["lora_logits"] = pm(input_ids=ids[:1]).logits[0].numpy().round(7).tolist()
        r["lora_grads"] = {n.removeprefix("base_model.model.").replace(".default", ""): grad_list(p.grad)
                           for n, p in pm.named_parameters() if p.requires_grad and ("layers.0." in n or ".h.0." in n)}
        rec["models"][name] = r
        print(f"train_causal {name}: loss {r['loss']:.6f} lora {r['lora_loss']:.6f}")
    (root / "train_causal.json").write_text(json.dumps(rec))


def record_peft():
    """PEFT interop on the tiny bare BERT: an adapter made by PEFT (random A and B, a new
    classifier) with its logits, and the logits PEFT gives for the adapter slm wrote
    (tests/fixtures/peft/slm_adapter, written by `SLM_WRITE_FIXTURES=1 cargo test -p slm --test integration peft::`)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification
    base = OUT / "encoders" / "bert_base" / "safetensors"
    train = json.loads((OUT / "train_bert.json").read_text())
    ids = torch.tensor(train["input_ids"])
    mask = (ids != 0).long()
    root = OUT / "peft"
    root.mkdir(exist_ok=True)
    torch.manual_seed(99)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                     lora_dropout=0.0, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    pm.eval()
    pm.save_pretrained(root / "python_adapter")
    rec = {"peft": peft.__version__}
    with torch.no_grad():
        rec["python_adapter_logits"] = pm(input_ids=ids, attention_mask=mask).logits.tolist()
    slm_dir = root / "slm_adapter"
    if slm_dir.exists():
        torch.manual_seed(5)
        model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
        pm = PeftModel.from_pretrained(model, slm_dir)
        pm.eval()
        with torch.no_grad():
            rec["slm_adapter_logits"] = pm(input_ids=ids, attention_mask=mask).logits.tolist()
    # Causal adapters slm trained (tests/fixtures/peft/slm_{gpt2,phi3}_adapter, written by
    # `SLM_WRITE_FIXTURES=1 cargo test -p slm --test integration peft::`): PEFT's logits for them.
    ids = torch.tensor([json.loads((OUT / "train_causal.json").read_text())["input_ids"][0]])
    for name in ("gpt2", "phi3"):
        d = root / f"slm_{name}_adapter"
        if d.exists():
            model = transformers.AutoModelForCausalLM.from_pretrained(OUT / name / "safetensors")
            pm = PeftModel.from_pretrained(model, d)
            pm.eval()
            with torch.no_grad():
                rec[f"slm_{name}_logits"] = pm(input_ids=ids).logits[0].numpy().round(7).tolist()
    (root / "expected.json").write_text(json.dumps(rec))
    print("peft:", {k: (v if isinstance(v, str) else len(v)) for k, v in rec.items()})


V5_CAUSAL = ["gpt2", "phi3", "llama", "qwen2"]
V5_ENCODERS = ["distilbert_cls", "distilbert_mlm", "distilbert_tok", "roberta_cls", "roberta_mlm", "roberta_tok"]


def record_v5():
    """The same tiny models as transformers 5.x saves them (config.json with `rope_parameters`
    and `dtype`, its safetensors, its tokenizer files) under tests/fixtures/v5/, with what 5.x
    and its PEFT compute on them: logits and greedy ids, loss and gradients, PEFT LoRA, and
    PEFT's logits for the adapters slm wrote. Run with tools/requirements-v5.txt installed."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
    from peft import PeftModel
    from safetensors.torch import load_file
    assert transformers.__version__ == "5.24.0", transformers.__version__
    root = OUT / "v5"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    for name in V5_CAUSAL:
        model = AutoModelForCausalLM.from_pretrained(OUT / name / "safetensors")
        model.save_pretrained(root / name)
        model = AutoModelForCausalLM.from_pretrained(root / name)
        model.eval()
        write_causal_cases(f"v5/{name}", model, root / name)
    heads = {"cls": AutoModelForSequenceClassification, "tok": AutoModelForTokenClassification,
             "mlm": AutoModelForMaskedLM}
    for name in V5_ENCODERS:
        src = OUT / "encoders" / name / "safetensors"
        sd = load_file(str(src / "model.safetensors"))
        # distilbert_cls has no id2label: the head's size comes from its weight.
        kw = {"num_labels": sd[k].shape[0] for k in ("classifier.weight",) if k in sd}
        model = heads[name.split("_")[1]].from_pretrained(src, **kw)
        if name == "roberta_mlm":
            with torch.no_grad():
                model.lm_head.bias.copy_(sd["lm_head.bias"])
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(src).save_pretrained(root / name)
    record_train_causal(root, V5_CAUSAL, lambda n: root / n)
    record_train_encoders(root, V5_ENCODERS, lambda n: root / n)
    ids = torch.tensor([json.loads((OUT / "train_causal.json").read_text())["input_ids"][0]])
    rec = {"transformers": transformers.__version__, "peft": peft.__version__}
    for name in ("gpt2", "phi3"):
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / name),
                                       OUT / "peft" / f"slm_{name}_adapter")
        pm.eval()
        with torch.no_grad():
            rec[f"slm_{name}_logits"] = pm(input_ids=ids).logits[0].numpy().round(7).tolist()
    (root / "peft" / "expected.json").write_text(json.dumps(rec))
    print("v5:", sorted(p.name for p in root.iterdir()))


PEFT_ENCODERS = {"distilbert_cls": ("SEQ_CLS", ["q_lin", "v_lin"]), "roberta_tok": ("TOKEN_CLS", ["query", "value"])}


def record_peft_encoders():
    """PEFT interop for DistilBERT (SEQ_CLS) and RoBERTa (TOKEN_CLS): adapters PEFT made (random
    A and B, a head in modules_to_save moved away from the base's) with their logits, and PEFT's
    logits for the adapters slm trained (tests/fixtures/peft/slm_<name>_adapter, written by
    `SLM_WRITE_FIXTURES=1 cargo test -p slm --test integration peft::`). Each text runs alone: no padding."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    train = json.loads((OUT / "train_bert.json").read_text())
    rows = [[i for i in r if i != 0] for r in train["input_ids"]]
    root = OUT / "peft"
    rec = {"peft": peft.__version__, "input_ids": rows}

    def logits(m):
        with torch.no_grad():
            return [m(input_ids=torch.tensor([r])).logits[0].numpy().round(7).tolist() for r in rows]

    for name, (task, targets) in PEFT_ENCODERS.items():
        src = OUT / "encoders" / name / "safetensors"
        cls = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
        n = load_file(str(src / "model.safetensors"))["classifier.weight"].shape[0]
        torch.manual_seed(77)
        pm = get_peft_model(cls.from_pretrained(src, num_labels=n),
                            LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets,
                                       lora_dropout=0.0, init_lora_weights=False))
        with torch.no_grad():
            for pn, p in pm.named_parameters():
                if "modules_to_save" in pn:
                    p.add_(torch.randn_like(p) * 0.2)
        pm.eval()
        pm.save_pretrained(root / f"{name}_lora")
        rec[f"{name}_lora_logits"] = logits(pm)
        slm_dir = root / f"slm_{name}_adapter"
        if slm_dir.exists():
            pm = PeftModel.from_pretrained(cls.from_pretrained(src, num_labels=n), slm_dir)
            pm.eval()
            rec[f"slm_{name}_logits"] = logits(pm)
    (root / "encoders.json").write_text(json.dumps(rec))
    print("peft encoders:", sorted(rec))


def tiny_gemmas():
    """Gemma 2 (soft-capped attention and logits, alternating sliding/global layers) and Gemma 3
    (q/k norms, two RoPE bases with linear scaling on the global layers only), each with a
    sliding window of 4 (shorter than the prompts), GQA and a head_dim other than hidden/heads;
    Gemma 2's query_pre_attn_scalar is not its head size."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=4,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
                  attn_implementation="eager")
    yield "gemma2", Gemma2ForCausalLM(Gemma2Config(
        **common, num_hidden_layers=3, query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, rope_theta=10000.0)), {}
    # Gemma 3 scales queries by its head size, as llama.cpp assumes (so that its GGUF export
    # can be checked against these logits); Gemma 2 keeps a scalar of its own.
    yield "gemma3", Gemma3ForCausalLM(Gemma3TextConfig(
        **common, num_hidden_layers=3, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})), {}


GEMMA_GRADS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight",
               "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
               "model.layers.2.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.1.post_attention_layernorm.weight", "model.layers.2.pre_feedforward_layernorm.weight",
               "model.layers.0.post_feedforward_layernorm.weight", "model.norm.weight"]


def record_gemma():
    """Tiny Gemma 2 and Gemma 3 (transformers 5.x: Gemma 3 is not in the pinned 4.46): logits
    and greedy ids, loss and gradients (with Gemma 3's q/k norms), a PEFT LoRA."""
    assert transformers.__version__.startswith("5."), transformers.__version__
    for name, model, kw in tiny_gemmas():
        record_tiny(name, model, kw)
    global CAUSAL_GRADS, CAUSAL_LORA
    CAUSAL_GRADS = dict(CAUSAL_GRADS, gemma2=GEMMA_GRADS, gemma3=GEMMA_GRADS + [
        "model.layers.0.self_attn.q_norm.weight", "model.layers.2.self_attn.k_norm.weight"])
    CAUSAL_LORA = dict(CAUSAL_LORA, gemma2=dict(target_modules=["q_proj", "v_proj"]),
                       gemma3=dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    root = OUT / "gemma"
    root.mkdir(exist_ok=True)
    record_train_causal(root, ["gemma2", "gemma3"], lambda n: OUT / n / "safetensors")
    record_gemma_peft()


def record_gemma_peft():
    """PEFT's logits for the Gemma adapters slm trained (tests/fixtures/gemma/peft/slm_<name>_adapter,
    written by `SLM_WRITE_FIXTURES=1 cargo test -p slm --test integration peft::`)."""
    from peft import PeftModel
    root = OUT / "gemma"
    ids = torch.tensor([json.loads((root / "train_causal.json").read_text())["input_ids"][0]])
    rec = {"peft": peft.__version__, "transformers": transformers.__version__}
    for name in ("gemma2", "gemma3"):
        d = root / "peft" / f"slm_{name}_adapter"
        if d.exists():
            model = AutoModelForCausalLM.from_pretrained(OUT / name / "safetensors", attn_implementation="eager")
            pm = PeftModel.from_pretrained(model, d)
            pm.eval()
            with torch.no_grad():
                rec[f"slm_{name}_logits"] = pm(input_ids=ids).logits[0].numpy().round(7).tolist()
    (root / "peft" / "expected.json").write_text(json.dumps(rec))
    print("gemma peft:", sorted(rec))


GEMMA_270M_PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]


def record_gemma3_270m():
    """The real Gemma 3 270M GGUF dequantized by transformers' own GGUF loader (5.x): the
    prompts' ids, 16 greedy tokens after each and the top-5 next-token logits."""
    assert transformers.__version__.startswith("5."), transformers.__version__
    models = Path(os.environ.get("SLM_MODELS", ROOT / "target" / "models"))
    d, f = models / "gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    out = {"transformers": transformers.__version__, "cases": []}
    for p in GEMMA_270M_PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            g = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        new = g[0, ids.shape[1]:].tolist()
        top = torch.topk(logits, 5)
        out["cases"].append({"prompt": p, "input_ids": ids[0].tolist(), "greedy": new, "text": tok.decode(new),
                             "top5": top.indices.tolist(), "top5_logits": top.values.tolist()})
        print(p, "->", repr(tok.decode(new)))
    (OUT / "gemma3_270m.json").write_text(json.dumps(out, indent=1))


T5_SOURCES = [[17, 42, 99, 3, 250, 1], [5, 1],
              [300, 301, 302, 7, 7, 7, 7, 9, 11, 13, 200, 100, 64, 33, 21, 8, 150, 151, 152, 1]]
T5_TARGETS = [[0, 12, 13, 14, 88, 1], [0, 5, 1], [0, 301, 300, 7, 9, 11, 13, 1]]
# Beam searches: (num_beams, max_new_tokens, length_penalty, early_stopping, no_repeat_ngram_size,
# num_return_sequences); each runs with the model's eos and with an eos the model emits early.
BEAMS = [(4, 10, 1.0, False, 0, 1), (4, 9, 0.6, True, 0, 2), (3, 12, 2.0, False, 2, 3), (4, 8, 1.0, "never", 0, 1)]


def tiny_t5s():
    """T5 (ReLU, tied head scaled by d_model^-1/2, a decoder deeper than the encoder, 8 buckets up
    to distance 12 so the third source reaches the saturated buckets) and T5 v1.1 / Flan-T5
    (gated-GELU, untied head, heads of 24 so num_heads·d_kv is not d_model)."""
    from transformers import T5Config, T5ForConditionalGeneration
    common = dict(vocab_size=VOCAB, d_model=64, num_heads=4, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0, dropout_rate=0.1)
    yield "t5_relu", T5ForConditionalGeneration(T5Config(
        **common, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, feed_forward_proj="relu",
        relative_attention_num_buckets=8, relative_attention_max_distance=12, tie_word_embeddings=True))
    yield "t5_gated", T5ForConditionalGeneration(T5Config(
        **common, d_kv=24, d_ff=80, num_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False))


def beam_cases(model, ids, eos, extra=None):
    """transformers' beam search of `ids` under each setting of BEAMS: the returned rows (padded
    as generate() pads them) and their scores."""
    out = []
    for nb, new, lp, early, ngram, ret in BEAMS:
        kw = dict(num_beams=nb, max_new_tokens=new, length_penalty=lp, early_stopping=early,
                  no_repeat_ngram_size=ngram, num_return_sequences=ret, do_sample=False,
                  eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        kw.update(extra or {})
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), **kw)
        out.append({"num_beams": nb, "max_new_tokens": new, "length_penalty": lp, "early_stopping": early,
                    "no_repeat_ngram_size": ngram, "num_return": ret, "eos": eos,
                    "sequences": g.sequences.tolist(), "scores": g.sequences_scores.tolist()})
    return out


def perturb_t5(model, qk, other):
    """Random weights larger than T5's init, so that a tiny model's outputs differ by input:
    norm gains near 1, position biases N(0, 1), queries and keys N(0, qk), the rest N(0, other)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
            elif "relative_attention_bias" in n:
                p.normal_(0.0, 1.0)
            elif n.endswith((".q.weight", ".k.weight")):
                p.normal_(0.0, qk)
            else:
                p.normal_(0.0, other)


def record_t5():
    """Tiny T5s: encoder states (alone and as a padded batch), teacher-forced decoder logits and
    loss, greedy ids and beam searches; the relative-position buckets; beam searches of the tiny
    GPT-2 (beam search of a causal model)."""
    from transformers.models.t5.modeling_t5 import T5Attention
    root = OUT / "t5"
    root.mkdir(exist_ok=True)
    for name, model in tiny_t5s():
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        perturb_t5(model, 0.15, 0.08)
        model.eval()
        model.save_pretrained(d / "safetensors", safe_serialization=True)
        if name == "t5_relu":
            model.save_pretrained(d / "bin", safe_serialization=False)
        cfg = model.config
        cases = []
        for src, tgt in zip(T5_SOURCES, T5_TARGETS):
            x = torch.tensor([src])
            with torch.no_grad():
                enc = model.encoder(input_ids=x).last_hidden_state[0]
                dec = torch.tensor([tgt[:-1]])
                logits = model(input_ids=x, decoder_input_ids=dec).logits[0]
                loss = model(input_ids=x, labels=torch.tensor([tgt[1:]])).loss.item()
                greedy = model.generate(x, max_new_tokens=12, do_sample=False)[0].tolist()
            early = greedy[3] if len(greedy) > 3 else 1
            cases.append({"input_ids": src, "encoder": enc.numpy().round(7).tolist(),
                          "decoder_input_ids": tgt[:-1], "logits": logits.numpy().round(7).tolist(),
                          "labels": tgt[1:], "loss": loss, "greedy": greedy,
                          "beams": beam_cases(model, src, 1) + beam_cases(model, src, early)})
        # The sources as one padded batch.
        n = max(len(s) for s in T5_SOURCES)
        ids = torch.tensor([s + [0] * (n - len(s)) for s in T5_SOURCES])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in T5_SOURCES])
        with torch.no_grad():
            batch = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        batch = [batch[i, :len(s)].numpy().round(7).tolist() for i, s in enumerate(T5_SOURCES)]
        rel = torch.arange(-150, 151)
        buckets = {str(bi): T5Attention._relative_position_bucket(
            rel, bidirectional=bi, num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance).tolist() for bi in (True, False)}
        (d / "expected.json").write_text(json.dumps({
            "family": name, "transformers": transformers.__version__, "cases": cases,
            "batch_encoder": batch, "relative": list(range(-150, 151)), "buckets": buckets}))
        print(name, sum(p.numel() for p in model.parameters()), "params; greedy",
              [c["greedy"] for c in cases])
    # Beam search of a causal model: the tiny GPT-2.
    gpt2 = AutoModelForCausalLM.from_pretrained(OUT / "gpt2" / "safetensors")
    gpt2.eval()
    causal = []
    for ids in PROMPTS:
        with torch.no_grad():
            greedy = gpt2.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        early = greedy[0, len(ids) + 2].item()
        causal.append({"input_ids": ids, "beams": beam_cases(gpt2, ids, None) + beam_cases(gpt2, ids, early)})
    (root / "gpt2_beams.json").write_text(json.dumps({"transformers": transformers.__version__, "cases": causal}))


T5_GRADS = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.1.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.layer_norm.weight",
            "decoder.block.0.layer.1.EncDecAttention.k.weight", "decoder.block.1.layer.1.EncDecAttention.q.weight",
            "decoder.block.1.layer.0.SelfAttention.v.weight", "encoder.final_layer_norm.weight",
            "decoder.final_layer_norm.weight"]
T5_GRADS_BY = {"t5_relu": ["decoder.block.2.layer.2.DenseReluDense.wo.weight", "encoder.block.1.layer.1.DenseReluDense.wi.weight"],
               "t5_gated": ["decoder.block.1.layer.2.DenseReluDense.wi_0.weight",
                            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight", "lm_head.weight"]}


def record_train_t5():
    """Teacher-forced loss and gradients of the tiny T5s on a padded batch of all three pairs
    (sources padded and masked, targets padded with -100), full and with a PEFT LoRA
    (SEQ_2_SEQ_LM on q, v and wo, random A and B, saved to t5/peft/<name>_lora) with its
    logits; dropout off; and PEFT's logits for the adapters slm trained
    (t5/peft/slm_<name>_adapter, written by `SLM_WRITE_FIXTURES=1 cargo test -p slm --test
    integration seq2seq_train::`). Written to t5/train.json."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import T5ForConditionalGeneration
    root = OUT / "t5"
    ns, nt = max(map(len, T5_SOURCES)), max(len(t) - 1 for t in T5_TARGETS)
    ids = torch.tensor([s + [0] * (ns - len(s)) for s in T5_SOURCES])
    mask = (torch.arange(ns)[None] < torch.tensor([len(s) for s in T5_SOURCES])[:, None]).long()
    labels = torch.tensor([t[1:] + [-100] * (nt - len(t) + 1) for t in T5_TARGETS])
    rec = {"sources": T5_SOURCES, "targets": [t[1:] for t in T5_TARGETS], "peft": peft.__version__, "models": {}}
    for name in ("t5_relu", "t5_gated"):
        model = T5ForConditionalGeneration.from_pretrained(root / name / "safetensors")
        model.eval()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        named = dict(model.named_parameters())
        r = {"loss": out.loss.item(),
             "grads": {n: grad_list(named[n].grad) for n in T5_GRADS + T5_GRADS_BY[name]}}
        model.zero_grad()
        torch.manual_seed(12)
        cfg = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                         init_lora_weights=False, target_modules=["q", "v", "wo"])
        pm = get_peft_model(model, cfg)
        pm.eval()
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        pm.save_pretrained(root / "peft" / f"{name}_lora")
        r["lora_loss"] = out.loss.item()
        r["lora_grads"] = {n.removeprefix("base_model.model.").replace(".default", ""): grad_list(p.grad)
                           for n, p in pm.named_parameters() if p.requires_grad and "block.1." in n}
        x, dec = torch.tensor([T5_SOURCES[0]]), torch.tensor([T5_TARGETS[0][:-1]])
        with torch.no_grad():
            r["lora_logits"] = pm(input_ids=x, decoder_input_ids=dec).logits[0].numpy().round(7).tolist()
        slm = root / "peft" / f"slm_{name}_adapter"
        if slm.exists():
            base = T5ForConditionalGeneration.from_pretrained(root / name / "safetensors")
            pm = PeftModel.from_pretrained(base, slm)
            pm.eval()
            with torch.no_grad():
                r["slm_adapter_logits"] = pm(input_ids=x, decoder_input_ids=dec).logits[0].numpy().round(7).tolist()
        rec["models"][name] = r
        print(f"train_t5 {name}: loss {r['loss']:.6f} lora {r['lora_loss']:.6f}")
    (root / "train.json").write_text(json.dumps(rec))


def tiny_barts():
    """BART (post-norm layers with biases, learned positions offset by 2, a layernorm on the
    embeddings, exact GELU, a tied head with a final_logits_bias, a decoder deeper than the
    encoder) with embeddings scaled by sqrt(d_model); Marian (sinusoidal positions that are not
    saved, no embedding layernorm, swish, EOS 0 and the last id as padding and decoder start),
    each with its (sources, targets, pad, eos)."""
    from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel
    yield "bart", (BART_SOURCES, BART_TARGETS, 1, 2), BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
        activation_function="gelu", scale_embedding=True, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, forced_bos_token_id=None,
        no_repeat_ngram_size=0, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1))
    pad = VOCAB - 1
    sources = [[t if t != 2 else 0 for t in s[1:]] for s in BART_SOURCES]
    targets = [[pad] + [t if t != 2 else 0 for t in x[2:]] for x in BART_TARGETS]
    yield "marian", (sources, targets, pad, 0), MarianMTModel(MarianConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=None, dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.1))


BART_SOURCES = [[0, 17, 42, 99, 3, 250, 2], [0, 5, 2],
                [0, 300, 301, 302, 7, 7, 7, 7, 9, 11, 13, 200, 100, 64, 33, 21, 8, 150, 151, 152, 2]]
BART_TARGETS = [[2, 0, 12, 13, 14, 88, 2], [2, 0, 5, 2], [2, 0, 301, 300, 7, 9, 11, 13, 2]]
BART_GRADS = ["model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight",
              "model.encoder.layernorm_embedding.weight", "model.encoder.layers.1.self_attn.q_proj.weight",
              "model.encoder.layers.0.self_attn.k_proj.bias", "model.encoder.layers.0.fc1.weight",
              "model.decoder.layers.0.encoder_attn.k_proj.weight", "model.decoder.layers.2.encoder_attn_layer_norm.bias",
              "model.decoder.layers.1.self_attn.v_proj.bias", "model.decoder.layers.2.fc2.weight",
              "model.decoder.layers.2.final_layer_norm.weight"]


def record_bart():
    """The tiny BART: encoder states (alone and as a padded batch), teacher-forced logits and
    loss, greedy ids and beam searches (tests/seq2seq.rs), and the loss and gradients of a
    padded batch, full and with a PEFT LoRA on q_proj and v_proj (tests/seq2seq_train.rs).
    Written to bart/."""
    from peft import LoraConfig, get_peft_model
    root = OUT / "bart"
    root.mkdir(exist_ok=True)
    for name, (sources, targets, pad, eos), model in tiny_barts():
        d = root / name
        for sub in ("safetensors", "peft_lora"):  # slm_adapter is slm's, read below
            if (d / sub).exists():
                shutil.rmtree(d / sub)
        torch.manual_seed(77)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    continue  # Marian's sinusoidal positions: fixed, and not saved
                if p.dim() == 1:
                    p.normal_(1.0 if n.endswith("weight") else 0.0, 0.1)
                else:
                    p.normal_(0.0, 0.08)
            model.final_logits_bias.normal_(0.0, 0.05)
            # Random weights may favour EOS or padding at once; this makes the outputs run.
            model.final_logits_bias[0, eos] = -2.0
            model.final_logits_bias[0, pad] = -2.0
        model.eval()
        model.save_pretrained(d / "safetensors", safe_serialization=True)
        cases = []
        for src, tgt in zip(sources, targets):
            x = torch.tensor([src])
            with torch.no_grad():
                enc = model.model.encoder(input_ids=x).last_hidden_state[0]
                dec = torch.tensor([tgt[:-1]])
                logits = model(input_ids=x, decoder_input_ids=dec).logits[0]
                loss = model(input_ids=x, decoder_input_ids=dec, labels=torch.tensor([tgt[1:]])).loss.item()
                greedy = model.generate(x, max_new_tokens=12, do_sample=False)[0].tolist()
            early = greedy[3] if len(greedy) > 3 else eos
            kw = {"pad_token_id": pad}
            cases.append({"input_ids": src, "encoder": enc.numpy().round(7).tolist(),
                          "decoder_input_ids": tgt[:-1], "logits": logits.numpy().round(7).tolist(),
                          "labels": tgt[1:], "loss": loss, "greedy": greedy,
                          "beams": beam_cases(model, src, eos, kw) + beam_cases(model, src, early, kw)})
        n = max(len(s) for s in sources)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in sources])
        mask = (torch.arange(n)[None] < torch.tensor([len(s) for s in sources])[:, None]).long()
        with torch.no_grad():
            batch = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        batch = [batch[i, :len(s)].numpy().round(7).tolist() for i, s in enumerate(sources)]
        (d / "expected.json").write_text(json.dumps({
            "family": name, "transformers": transformers.__version__, "cases": cases, "batch_encoder": batch}))
        # Training: the padded batch, labels padded with -100 (decoder inputs given, as the
        # tests build them: the start id, then the target).
        nt = max(len(t) - 1 for t in targets)
        dec = torch.tensor([t[:-1] + [pad] * (nt - len(t) + 1) for t in targets])
        labels = torch.tensor([t[1:] + [-100] * (nt - len(t) + 1) for t in targets])
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        out.loss.backward()
        named = dict(model.named_parameters())
        grads = [k for k in BART_GRADS if k in named and named[k].requires_grad]
        rec = {"sources": sources, "targets": [t[1:] for t in targets], "loss": out.loss.item(),
               "grads": {k: grad_list(named[k].grad) for k in grads}}
        model.zero_grad()
        torch.manual_seed(13)
        cfg = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                         init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        pm = get_peft_model(model, cfg)
        pm.eval()
        out = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        out.loss.backward()
        pm.save_pretrained(d / "peft_lora")
        rec["lora_loss"] = out.loss.item()
        rec["lora_grads"] = {k.removeprefix("base_model.model.").replace(".default", ""): grad_list(p.grad)
                             for k, p in pm.named_parameters() if p.requires_grad and "layers.1." in k}
        x, first = torch.tensor([sources[0]]), torch.tensor([targets[0][:-1]])
        with torch.no_grad():
            rec["lora_logits"] = pm(input_ids=x, decoder_input_ids=first).logits[0].numpy().round(7).tolist()
        # The adapter slm trained (written by `SLM_WRITE_FIXTURES=1 cargo test -p slm --test
        # integration seq2seq_train::`), applied by PEFT to the saved base.
        slm = d / "slm_adapter"
        if slm.exists():
            from peft import PeftModel
            base = type(model).from_pretrained(d / "safetensors")
            sm = PeftModel.from_pretrained(base, slm).eval()
            with torch.no_grad():
                rec["slm_adapter_logits"] = sm(input_ids=x, decoder_input_ids=first).logits[0].numpy().round(7).tolist()
        (d / "train.json").write_text(json.dumps(rec))
        print(name, sum(p.numel() for p in model.parameters()), "params; greedy", [c["greedy"] for c in cases],
              "loss", rec["loss"], "lora", rec["lora_loss"])


def overlap_pairs():
    """Hypothesis/reference pairs from tiny shakespeare lines, each hypothesis damaged a
    different way (words dropped, swapped, replaced, case, punctuation, digits, HTML entities,
    accents, an empty one), with a few hand-made pairs for the tokenizers' edge cases."""
    import random
    rng = random.Random(7)
    text = (ASSETS / "corpora" / "tinyshakespeare" / "input.txt").read_text()
    lines = [l.strip() for l in text.splitlines() if len(l.split()) >= 4][:400]
    refs, hyps = [], []
    for i, ref in enumerate(lines[::4][:90]):
        w = ref.split()
        k = i % 6
        if k == 0:
            w = [x for j, x in enumerate(w) if rng.random() > 0.25 or j == 0]
        elif k == 1 and len(w) > 2:
            a = rng.randrange(len(w) - 1); w[a], w[a + 1] = w[a + 1], w[a]
        elif k == 2:
            w = [rng.choice(["the", "a", "lord", "good", "sir"]) if rng.random() < 0.3 else x for x in w]
        elif k == 3:
            w = [x.upper() if rng.random() < 0.3 else x for x in w] + ["indeed."]
        elif k == 4:
            w = w[: max(1, len(w) // 2)]
        hyps.append(" ".join(w)); refs.append(ref)
    hand = [("The price is 1,000.50 dollars - or 3-4 euros.", "The price is 1,000.50 dollars, or 3-4 euros!"),
            ("&quot;Café&quot; &amp; crème &lt;br&gt; {x} [y] ~z~ `q` @home #tag $5 %",
             "\"Café\" & crème <br> {x} [y] ~z~ `q` @home #tag $5 %"),
            ("", "Nothing was generated here."),
            ("generously connected happiness relational conditional hopefully", "generous connection happy relate condition hope"),
            ("The runners were running faster than the ran race", "A runner runs fast in races")]
    for h, r in hand:
        hyps.append(h); refs.append(r)
    return hyps, refs


def record_overlap():
    """BLEU and chrF by sacrebleu, ROUGE-1/2/L by rouge-score (stemmed), per pair and over the
    corpus; NLTK's Porter stems of every distinct word of tiny shakespeare (rouge-score's
    stemmer) to tests/fixtures/overlap.json."""
    import re
    import nltk
    import rouge_score
    import sacrebleu
    from nltk.stem import porter
    from rouge_score import rouge_scorer
    hyps, refs = overlap_pairs()
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    chrf = sacrebleu.corpus_chrf(hyps, [refs])
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = []
    for h, r in zip(hyps, refs):
        s = sc.score(r, h)
        pairs.append({k: [v.precision, v.recall, v.fmeasure] for k, v in s.items()})
    subsets = {"first10": (hyps[:10], refs[:10]), "hand": (hyps[-5:], refs[-5:])}
    sub = {k: {"bleu": sacrebleu.corpus_bleu(h, [r]).score, "chrf": sacrebleu.corpus_chrf(h, [r]).score}
           for k, (h, r) in subsets.items()}
    text = (ASSETS / "corpora" / "tinyshakespeare" / "input.txt").read_text().lower()
    words = sorted(set(re.findall(r"[a-z0-9]+", text)))
    stem = porter.PorterStemmer()
    stems = {w: stem.stem(w) for w in words if len(w) > 3}
    out = {"sacrebleu": sacrebleu.__version__, "rouge_score": "0.1.2", "nltk": nltk.__version__,
           "hyps": hyps, "refs": refs, "bleu": bleu.score, "bleu_precisions": bleu.precisions,
           "bleu_bp": bleu.bp, "chrf": chrf.score, "subsets": sub, "rouge": pairs,
           "tokens_13a": [sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(h) for h in hyps[-5:]],
           "stems": stems}
    (OUT / "overlap.json").write_text(json.dumps(out))
    print("overlap: bleu", bleu.score, "chrf", chrf.score, len(stems), "stems")


def record_marian_tokenizer():
    """A Marian translator's tokenizer as opus-mt models ship it (source.spm, target.spm, one
    vocab.json whose ids are not the SentencePiece ids, EOS 0, UNK 1, padding last), with two
    unigram SentencePiece models trained by the sentencepiece library on real text: the source
    with Marian's nmt_nfkc normalization (a precompiled charsmap), the target without any
    (identity). MarianTokenizer's ids of source and target texts (the llama.cpp tokenizer test
    inputs among them) and its decoding, and a tiny random MarianMTModel in the same folder with
    its greedy translations decoded: written to marian_tok/."""
    import io
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer
    d = OUT / "marian_tok"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    sst = [l.split("\t")[0] for l in (ASSETS / "classification/sst2/train.tsv").read_text().splitlines()[1:]]
    shakespeare = [l for l in (ASSETS / "corpora/tinyshakespeare/input.txt").read_text().splitlines() if l.strip()]
    models = {}
    for side, lines, vocab, rule in (("source", sst[:20000], 900, "nmt_nfkc"),
                                     ("target", shakespeare[:20000], 700, "identity")):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab,
                                       model_type="unigram", normalization_rule_name=rule,
                                       character_coverage=0.9995, num_threads=1, seed_sentencepiece_size=100000,
                                       minloglevel=2)
        (d / f"{side}.spm").write_bytes(buf.getvalue())
        models[side] = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    # Marian's vocab.json: EOS and UNK first, then the pieces of both sides (the shared ones once),
    # padding last.
    vocab = {"</s>": 0, "<unk>": 1}
    for m in (models["source"], models["target"]):
        for i in range(m.get_piece_size()):
            p = m.id_to_piece(i)
            if not (m.is_control(i) or m.is_unknown(i)) and p not in vocab:
                vocab[p] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2))
    tok = MarianTokenizer(str(d / "source.spm"), str(d / "target.spm"), str(d / "vocab.json"),
                          source_lang="en", target_lang="xx")
    tok.save_pretrained(d)
    inp = (ASSETS / "tokenizers/vectors/ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    texts = sst[20000:20060] + inp + [">>fra<< The house is wonderful.", ">>deu<<Guten Tag", "a >>x<< b",
                                       "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ and ﬁ ligatures", "", "   ", "tab\there\nnewline"]
    targets = shakespeare[20000:20060] + inp[:20]
    src_ids = [tok(t).input_ids for t in texts]
    tgt_ids = [tok(text_target=t).input_ids for t in targets]
    decoded = [{"ids": ids, "skip": tok.decode(ids, skip_special_tokens=True),
                "keep": tok.decode(ids, skip_special_tokens=False)} for ids in tgt_ids + src_ids[:20]]
    pad = vocab["<pad>"]
    mixed = [[5, 1, 7, 0, 9], [pad, 40, 41, 0, pad, pad], [0], [len(vocab) - 2, 3, 1, 1]]
    decoded += [{"ids": ids, "skip": tok.decode(ids, skip_special_tokens=True),
                 "keep": tok.decode(ids, skip_special_tokens=False)} for ids in mixed]
    torch.manual_seed(5)
    model = MarianMTModel(MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=128,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, max_length=24, num_beams=1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and p.dim() > 1:
                p.normal_(0.0, 0.3)
        model.final_logits_bias[0, 0] = -3.0
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    translate = texts[:3] + [texts[61]]
    batch = tok(translate, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, num_beams=1)
    greedy = [{"input": t, "ids": o.tolist(), "text": tok.decode(o, skip_special_tokens=True)}
              for t, o in zip(translate, out)]
    (d / "expected.json").write_text(json.dumps({
        "transformers": transformers.__version__, "sentencepiece": spm.__version__,
        "source": [{"text": t, "ids": i} for t, i in zip(texts, src_ids)],
        "target": [{"text": t, "ids": i} for t, i in zip(targets, tgt_ids)],
        "decode": decoded, "greedy": greedy}, ensure_ascii=False))
    print("marian_tok:", len(vocab), "ids;", len(texts), "sources,", len(targets), "targets")


def bart_folder(d):
    """A BART tokenizer folder as facebook/bart-* ship it without tokenizer.json: vocab.json with
    <s> <pad> </s> <unk> first and <mask> last around GPT-2's byte-level BPE (GPT-2's ids moved up
    by 4), merges.txt, and config.json naming the model type. Built from the GPT-2 asset the same
    way by the Rust test, so no copy of the vocabulary is committed."""
    enc = json.loads((ASSETS / "tokenizers/gpt2/encoder.json").read_text())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({t: i + 4 for t, i in enc.items()})
    vocab["<mask>"] = len(vocab)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    shutil.copy(ASSETS / "tokenizers/gpt2/vocab.bpe", d / "merges.txt")
    (d / "config.json").write_text(json.dumps({"model_type": "bart", "bos_token_id": 0, "eos_token_id": 2,
                                               "pad_token_id": 1, "decoder_start_token_id": 2}))


def record_bart_tokenizer():
    """BartTokenizer (the Python one, reading vocab.json + merges.txt) on a BART folder built by
    bart_folder(): ids with <s> ... </s> of single texts (the llama.cpp GPT-2 tokenizer test inputs
    among them) and of pairs, and decoding with and without special tokens: bart_tok/expected.json."""
    import tempfile
    from transformers import BartTokenizer, BartTokenizerFast
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bart_folder(d)
        slow = BartTokenizer.from_pretrained(d)
        fast = BartTokenizerFast.from_pretrained(d)
        sst = [l.split("\t")[0] for l in (ASSETS / "classification/sst2/test.tsv").read_text().splitlines()[1:]]
        inp = (ASSETS / "tokenizers/vectors/ggml-vocab-gpt-2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
        texts = sst[:40] + inp + ["<s>Hello</s>", "a <mask> b", "Hello<mask>world", "  <mask>", "<pad><unk>x",
                                 "</s></s>", "The house is wonderful.", ""]
        single = []
        for t in texts:
            ids = slow(t).input_ids
            assert ids == fast(t).input_ids, t
            single.append({"text": t, "ids": ids})
        pairs = []
        for a, b in zip(sst[40:50], sst[50:60]):
            ids = slow(a, b).input_ids
            assert ids == fast(a, b).input_ids
            pairs.append({"a": a, "b": b, "ids": ids})
        decoded = [{"ids": e["ids"], "skip": slow.decode(e["ids"], skip_special_tokens=True),
                    "keep": slow.decode(e["ids"], skip_special_tokens=False)} for e in single[:50]]
    out = OUT / "bart_tok"
    out.mkdir(parents=True, exist_ok=True)
    (out / "expected.json").write_text(json.dumps({
        "transformers": transformers.__version__, "single": single, "pairs": pairs, "decode": decoded},
        ensure_ascii=False))
    print("bart_tok:", len(single), "texts,", len(pairs), "pairs")


def record_t5_gguf():
    """T5 as llama.cpp's GGUF: a Flan-T5-style model (gated GELU, untied head, a decoder shallower
    than the encoder: the converter maps only the encoder's count of blocks) and a t5-small-style one (ReLU, tied head), each with a T5-layout
    SentencePiece unigram vocabulary trained by the sentencepiece library on SST-2 (<pad> 0,
    </s> 1, <unk> 2, nmt_nfkc, 8 extra ids) and relative positions as llama.cpp assumes them
    (32 buckets, max distance 128). Each HF folder is converted to f32 GGUF by llama.cpp's own
    convert_hf_to_gguf.py (LLAMA_CPP: its source folder). T5Tokenizer's ids, teacher-forced
    decoder logits and greedy generate() outputs: t5_gguf/NAME/{hf/, NAME.gguf, expected.json}."""
    import io
    import subprocess
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
    llama_cpp = Path(os.environ["LLAMA_CPP"])
    root = OUT / "t5_gguf"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    sst = [l.split("\t")[0] for l in (ASSETS / "classification/sst2/train.tsv").read_text().splitlines()[1:]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sst[:20000]), model_writer=buf, vocab_size=400,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    dev = [l.split("\t")[0] for l in (ASSETS / "classification/sst2/dev.tsv").read_text().splitlines()[1:]]
    texts = ["translate English to German: The house is wonderful.", "summarize: " + dev[0], dev[1],
             "Ｆｕｌｌ－ｗｉｄｔｈ <extra_id_0> and <extra_id_3>!"]
    common = dict(vocab_size=408, d_model=32, num_heads=4, d_kv=8, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, n_positions=512)
    models = {
        "flan": T5Config(**common, d_ff=48, num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                         tie_word_embeddings=False),
        "t5": T5Config(**common, d_ff=64, num_layers=2, feed_forward_proj="relu", tie_word_embeddings=True),
    }
    for name, cfg in models.items():
        d = root / name
        hf = d / "hf"
        hf.mkdir(parents=True)
        (hf / "spiece.model").write_bytes(buf.getvalue())
        tok = T5Tokenizer(str(hf / "spiece.model"), extra_ids=8, legacy=True)
        tok.save_pretrained(hf)
        torch.manual_seed(11)
        model = T5ForConditionalGeneration(cfg)
        perturb_t5(model, 0.3, 0.15)
        model.eval()
        model.save_pretrained(hf, safe_serialization=True)
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(d / f"{name}.gguf")], check=True, capture_output=True)
        cases = []
        for t in texts:
            x = tok(t, return_tensors="pt").input_ids
            with torch.no_grad():
                greedy = model.generate(x, max_new_tokens=10, do_sample=False)[0]
                dec = greedy[:-1].unsqueeze(0) if len(greedy) > 1 else greedy.unsqueeze(0)
                logits = model(input_ids=x, decoder_input_ids=dec).logits[0]
            cases.append({"text": t, "input_ids": x[0].tolist(), "decoder_input_ids": dec[0].tolist(),
                          "logits": logits.numpy().round(7).tolist(), "greedy": greedy.tolist(),
                          "greedy_text": tok.decode(greedy, skip_special_tokens=True)})
        (d / "expected.json").write_text(json.dumps({
            "transformers": transformers.__version__, "sentencepiece": spm.__version__,
            "llama_cpp_converter": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/convert_hf_to_gguf.py",
            "cases": cases}, ensure_ascii=False))
        print("t5_gguf", name, sum(p.numel() for p in model.parameters()), "params; greedy",
              [c["greedy_text"] for c in cases])
    # T5Tokenizer (SentencePiece itself) on more texts: SST-2, the llama.cpp tokenizer test
    # inputs, T5's sentinels with the spaces around them.
    tok = T5Tokenizer.from_pretrained(root / "t5" / "hf")
    inp = (ASSETS / "tokenizers/vectors/ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    more = dev[2:42] + inp + ["<extra_id_0>", "a<extra_id_1>b", "x <extra_id_7> y </s> z", "<pad>hi<unk>", "</s>"]
    enc = [{"text": t, "ids": tok(t).input_ids} for t in more]
    dec = [{"ids": e["ids"], "skip": tok.decode(e["ids"], skip_special_tokens=True),
            "keep": tok.decode(e["ids"], skip_special_tokens=False)} for e in enc[:60]]
    (root / "tokens.json").write_text(json.dumps({"transformers": transformers.__version__, "encode": enc,
                                                  "decode": dec}, ensure_ascii=False))


def main():
    torch.manual_seed(1234)
    print("torch", torch.__version__, "transformers", transformers.__version__)
    OUT.mkdir(parents=True, exist_ok=True)
    only = sys.argv[1:]
    if only == ["v5"]:
        return record_v5()
    if only == ["gemma"]:
        return record_gemma()
    if only == ["gemma_peft"]:
        return record_gemma_peft()
    if only == ["gemma270m"]:
        return record_gemma3_270m()
    if only == ["t5"]:
        return record_t5()
    if only == ["t5_train"]:
        return record_train_t5()
    if only == ["bart"]:
        return record_bart()
    if only == ["marian_tok"]:
        return record_marian_tokenizer()
    if only == ["bart_tok"]:
        return record_bart_tokenizer()
    if only == ["t5_gguf"]:
        return record_t5_gguf()
    if only == ["overlap"]:
        return record_overlap()
    for name, model, kw in tiny_models():
        if not only or name in only:
            record_tiny(name, model, kw)
    if not only or "tokenizer" in only:
        record_tiny_tokenizer()
    if not only or "smollm2" in only:
        record_smollm2()
    if not only or "encoders" in only:
        record_encoders()
    if not only or "minilm" in only:
        record_minilm()
    if not only or "perplexity" in only:
        record_perplexity()
    if not only or "metrics" in only:
        record_metrics()
    if not only or "quant" in only:
        record_quant_vectors()
    if not only or "train" in only:
        record_train()
        record_train_causal()
        record_train_encoders()
    if not only or "peft" in only:
        record_peft()
        record_peft_encoders()


if __name__ == "__main__":
    main()
