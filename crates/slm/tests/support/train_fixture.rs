//! The tiny BERT training fixture (tools/make_fixtures.py, part `train`), shared by the
//! training and PEFT tests.

#![allow(dead_code)]

use std::path::PathBuf;

use slm::train::bert::Batch;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn reference() -> serde_json::Value {
    let p = fixtures().join("train_bert.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn labels() -> Vec<String> {
    ["negative", "neutral", "positive"]
        .map(String::from)
        .to_vec()
}

/// The fixture's padded batch (pad id 0) with its labels.
pub fn batch(r: &serde_json::Value) -> Batch {
    let rows: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let t = rows[0].len();
    Batch {
        lengths: rows
            .iter()
            .map(|r| r.iter().filter(|&&i| i != 0).count())
            .collect(),
        ids: rows.concat(),
        types: vec![0; rows.len() * t],
        t,
        labels: serde_json::from_value(r["labels"].clone()).unwrap(),
        targets: vec![],
    }
}

/// The batch's texts unpadded, as the inference executor takes them (one segment).
pub fn encoder_batch(b: &Batch) -> slm::models::bert::EncoderBatch {
    let inputs: Vec<slm::tokenize::EncoderInput> = (0..b.size())
        .map(|s| {
            let ids = b.ids[s * b.t..][..b.lengths[s]].to_vec();
            slm::tokenize::EncoderInput {
                type_ids: vec![0; ids.len()],
                full_len: ids.len(),
                ids,
            }
        })
        .collect();
    slm::models::bert::EncoderBatch::new(&inputs, 0).unwrap()
}
