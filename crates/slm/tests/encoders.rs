//! Encoders against the references written by tools/make_fixtures.py: tiny random-init BERT,
//! DistilBERT and RoBERTa with each head (transformers 4.46.3) from safetensors and
//! pytorch_model.bin, and the real all-MiniLM-L6-v2 through sentence-transformers 3.3.1.

use crate::common;

use serde_json::Value;
use slm::encode::Encoder;
use slm::models::bert::EncoderBatch;

fn max_diff(got: &[f32], want: &Value) -> f32 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs())
        .fold(0.0, f32::max)
}

fn flat(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) if a.first().is_some_and(|x| x.is_array()) => {
            a.iter().flat_map(flat).collect()
        }
        Value::Array(a) => a.clone(),
        x => vec![x.clone()],
    }
}

fn tiny(name: &str, format: &str) {
    let root = common::fixtures().join("encoders");
    let expected = common::read_json(root.join("expected.json"));
    let enc = Encoder::load(&root.join(name).join(format)).unwrap();
    let texts: Vec<(String, Option<String>)> = expected["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                t[1].as_str().map(String::from),
            )
        })
        .collect();
    let refs: Vec<(&str, Option<&str>)> = texts
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_deref()))
        .collect();
    let (inputs, cut) = enc.prepare(&refs, enc.max_len, true).unwrap();
    assert!(cut.is_empty());
    for (inp, want) in inputs.iter().zip(expected["input_ids"].as_array().unwrap()) {
        assert_eq!(inp.ids, common::ids(want), "{name}: token ids");
    }
    // One padded batch, as the reference ran it.
    let batch = EncoderBatch::new(&inputs, enc.tokenizer.pad_id()).unwrap();
    let rec = &expected["models"][name];
    let check = |got: Vec<f32>, want: &Value, what: &str| {
        let d = max_diff(&got, &Value::Array(flat(want)));
        assert!(d <= 1e-4, "{name}/{format} {what}: max |diff| {d}");
    };
    if let Some(hidden) = rec.get("hidden") {
        let h = enc.model.hidden_states(&batch).unwrap();
        for (i, want) in hidden.as_array().unwrap().iter().enumerate() {
            let rows = h.get(i).unwrap().narrow(0, 0, inputs[i].ids.len()).unwrap();
            check(
                rows.flatten_all().unwrap().to_vec1().unwrap(),
                want,
                "hidden",
            );
        }
        let pooled = enc
            .model
            .pooled(&h)
            .unwrap()
            .expect("BertModel has a pooler");
        check(
            pooled.flatten_all().unwrap().to_vec1().unwrap(),
            &rec["pooled"],
            "pooler",
        );
        return;
    }
    let logits = enc.model.logits(&batch).unwrap();
    let want = rec["logits"].as_array().unwrap();
    if logits.rank() == 2 {
        check(
            logits.flatten_all().unwrap().to_vec1().unwrap(),
            &rec["logits"],
            "logits",
        );
    } else {
        for (i, w) in want.iter().enumerate() {
            let rows = logits
                .get(i)
                .unwrap()
                .narrow(0, 0, inputs[i].ids.len())
                .unwrap();
            check(
                rows.flatten_all().unwrap().to_vec1().unwrap(),
                w,
                "token logits",
            );
        }
    }
}

macro_rules! tiny_tests {
    ($($fn:ident: $name:literal),*) => {$(
        mod $fn {
            #[test]
            fn safetensors() { super::tiny($name, "safetensors") }
            #[test]
            fn pytorch_bin() { super::tiny($name, "bin") }
        }
    )*};
}

tiny_tests!(
    bert_base: "bert_base",
    bert_mlm: "bert_mlm",
    bert_cls: "bert_cls",
    bert_tok: "bert_tok",
    distilbert_mlm: "distilbert_mlm",
    distilbert_cls: "distilbert_cls",
    distilbert_tok: "distilbert_tok",
    roberta_mlm: "roberta_mlm",
    roberta_cls: "roberta_cls"
);

#[test]
fn labels_come_from_id2label_or_default_to_label_i() {
    let root = common::fixtures().join("encoders");
    let named = Encoder::load(&root.join("bert_cls/safetensors")).unwrap();
    assert_eq!(named.model.labels, ["negative", "neutral", "positive"]);
    // Saved without id2label: three outputs in the weights, three default names.
    let unnamed = Encoder::load(&root.join("distilbert_cls/safetensors")).unwrap();
    assert_eq!(unnamed.model.labels, ["LABEL_0", "LABEL_1", "LABEL_2"]);
}

fn minilm() -> (Encoder, Value) {
    let enc = Encoder::load(&common::assets().join("models/all-MiniLM-L6-v2")).unwrap();
    (
        enc,
        common::read_json(common::fixtures().join("minilm.json")),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn minilm_matches_sentence_transformers_single_and_batched() {
    let (enc, want) = minilm();
    assert_eq!(
        enc.max_len,
        want["max_seq_length"].as_u64().unwrap() as usize
    );
    assert!(enc.pooling.normalize, "modules.json lists Normalize");
    let sentences: Vec<&str> = want["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let texts: Vec<(&str, Option<&str>)> = sentences.iter().map(|s| (*s, None)).collect();
    let (inputs, cut) = enc.prepare(&texts, enc.max_len, true).unwrap();
    assert_eq!(
        cut,
        [sentences.len() - 1],
        "only the 300-word sentence is truncated"
    );
    let batched = enc.embed(&inputs, 3, enc.pooling).unwrap();
    for (i, reference) in want["embeddings"].as_array().unwrap().iter().enumerate() {
        let single = enc
            .embed(&inputs[i..i + 1], 1, enc.pooling)
            .unwrap()
            .remove(0);
        let r: Vec<f32> = reference
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        for (what, got) in [("single", &single), ("batched", &batched[i])] {
            let d = max_diff(got, reference);
            let c = cosine(got, &r);
            assert!(
                d <= 1e-5 && c >= 0.99999,
                "sentence {i} {what}: max |diff| {d}, cosine {c}"
            );
        }
        let d = max_diff(&batched[i], &Value::from(single.clone()));
        assert!(
            d <= 1e-5,
            "sentence {i}: batched differs from single by {d}"
        );
    }
}

fn check_hf_batch(enc: &Encoder, a: &[&str], b: Option<&[&str]>, want: &Value) {
    let max_len = want["max_length"].as_u64().unwrap() as usize;
    let texts: Vec<(&str, Option<&str>)> = (0..a.len()).map(|i| (a[i], b.map(|b| b[i]))).collect();
    let (inputs, _) = enc.prepare(&texts, max_len, true).unwrap();
    let batch = EncoderBatch::new(&inputs, enc.tokenizer.pad_id()).unwrap();
    let as_u32 = |t: &candle_core::Tensor| t.to_vec2::<u32>().unwrap();
    let rows = |k: &str| -> Vec<Vec<u32>> {
        want[k]
            .as_array()
            .unwrap()
            .iter()
            .map(common::ids)
            .collect()
    };
    assert_eq!(as_u32(&batch.ids), rows("input_ids"));
    assert_eq!(as_u32(&batch.type_ids), rows("token_type_ids"));
    let mask: Vec<Vec<u32>> = batch
        .mask
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    assert_eq!(mask, rows("attention_mask"));
}

#[test]
fn minilm_tokenizer_matches_hf_on_pairs_truncation_and_padding() {
    let (enc, want) = minilm();
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let p = &want["pairs"];
    let (a, b) = (strs(&p["a"]), strs(&p["b"]));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    check_hf_batch(&enc, &a, Some(&b), p);
    let t = &want["truncated"];
    let texts = strs(&t["texts"]);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    check_hf_batch(&enc, &texts, None, t);
}

#[test]
fn over_long_input_is_an_error_without_truncation() {
    let (enc, _) = minilm();
    let long = "word ".repeat(400);
    let err = enc
        .prepare(&[("ok", None), (&long, None)], 128, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input 2 has 402 tokens, more than the limit of 128"),
        "{err}"
    );
}

#[test]
fn fill_mask_on_tiny_bert_returns_softmax_of_reference_logits() {
    // The reference logits of the first text's mask position give the expected ranking.
    let root = common::fixtures().join("encoders");
    let expected = common::read_json(root.join("expected.json"));
    let enc = Encoder::load(&root.join("bert_mlm/safetensors")).unwrap();
    let text = expected["texts"][0][0].as_str().unwrap();
    let ids = common::ids(&expected["input_ids"][0]);
    let mask_pos = ids
        .iter()
        .position(|&i| Some(i) == enc.tokenizer.token_to_id("[MASK]"))
        .unwrap();
    let logits: Vec<f64> = expected["models"]["bert_mlm"]["logits"][0][mask_pos]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let got = enc.fill_mask(text, 3).unwrap();
    assert_eq!(got.len(), 1);
    for (p, &want) in got[0].iter().zip(&order) {
        assert_eq!(p.id as usize, want);
        let prob = (logits[want] - max).exp() / z;
        assert!((p.probability as f64 - prob).abs() < 1e-5);
    }
    let err = Encoder::load(&root.join("bert_cls/safetensors"))
        .unwrap()
        .fill_mask(text, 3)
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "fill-mask needs a *ForMaskedLM checkpoint; this one is BertForSequenceClassification"
        ),
        "{err}"
    );
}

#[test]
fn vocab_txt_alone_tokenizes_like_tokenizer_json() {
    // Older BERT checkpoints ship vocab.txt + tokenizer_config.json only.
    let src = common::fixtures().join("encoders/bert_mlm/safetensors");
    let dir = std::env::temp_dir().join(format!("slm-vocab-txt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tokenizer.json" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let expected = common::read_json(common::fixtures().join("encoders/expected.json"));
    let enc = Encoder::load(&dir).unwrap();
    assert!(enc.tokenizer.origin.ends_with("vocab.txt"));
    for (t, want) in expected["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected["input_ids"].as_array().unwrap())
    {
        let got = enc
            .tokenizer
            .encode_pair(t[0].as_str().unwrap(), t[1].as_str(), 64)
            .unwrap();
        assert_eq!(got.ids, common::ids(want), "{t}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
