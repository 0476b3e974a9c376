//! `slm generate` on an encoder-decoder: the tiny T5 v1.1 fixture with a unigram tokenizer that
//! slm trains on tiny shakespeare. Greedy outputs of a batch (`-i`) equal each input's alone,
//! and `--beams` prints the library's beam search.

use std::path::{Path, PathBuf};

use crate::common::{asset, fixtures, run, tempdir};

/// The T5 fixture with a 320-token unigram vocabulary (`<pad>` 0, `</s>` 1, `<unk>` 2).
fn t5_with_tokenizer(dir: &Path) -> PathBuf {
    let model = dir.join("t5");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("t5/t5_gated/safetensors").join(f),
            model.join(f),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt")).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text[..100_000]).unwrap();
    let tok = dir.join("tok");
    let (code, _, err) = run(
        &[
            "tokenizer",
            "train",
            "--type",
            "unigram",
            "--vocab-size",
            "320",
            "--special",
            "<pad>",
            "--special",
            "</s>",
            "--special",
            "<unk>",
            corpus.to_str().unwrap(),
            "-o",
            tok.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), model.join(f)).unwrap();
    }
    model
}

const INPUTS: [&str; 3] = [
    "To be, or not to be",
    "First Citizen: Before we proceed any further, hear me speak.",
    "What?",
];

#[test]
fn t5_generates_greedy_batched_and_beam_outputs() {
    let dir = tempdir("t5-generate");
    let model = t5_with_tokenizer(&dir);
    let m = model.to_str().unwrap();
    let alone: Vec<String> = INPUTS
        .iter()
        .map(|text| {
            let (code, out, err) = run(
                &["generate", "-m", m, text, "--temperature", "0", "-n", "10"],
                None,
            );
            assert_eq!(code, 0, "{err}");
            out.trim_end_matches('\n').to_string()
        })
        .collect();
    assert!(alone.iter().all(|o| !o.is_empty()), "{alone:?}");
    let file = dir.join("inputs.txt");
    std::fs::write(&file, INPUTS.join("\n")).unwrap();
    let (code, out, err) = run(
        &[
            "generate",
            "-m",
            m,
            "-i",
            file.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "10",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        alone,
        "a batch gives each input's output"
    );

    // Beams: the library's best two, decoded.
    let loaded = slm::models::seq2seq::load_seq2seq(&model).unwrap();
    let tok = slm::tokenize::Tokenizer::load(&loaded.files).unwrap();
    let opts = slm::generate::beam::BeamOptions {
        beams: 3,
        num_return: 2,
        max_new_tokens: 9,
        no_repeat_ngram: 2,
        eos: Some(1),
        ..Default::default()
    };
    let src = tok.encode(INPUTS[1], true).unwrap();
    let hyps = slm::generate::beam::seq2seq(loaded.model.as_ref(), &src, &opts).unwrap();
    let want: Vec<String> = hyps
        .iter()
        .map(|h| tok.decode(&h.tokens, true).unwrap())
        .collect();
    let (code, out, err) = run(
        &[
            "generate",
            "-m",
            m,
            INPUTS[1],
            "--beams",
            "3",
            "--num-return",
            "2",
            "-n",
            "9",
            "--no-repeat-ngram-size",
            "2",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    assert_ne!(
        want[0], alone[1],
        "beam search found another output than greedy"
    );

    let (code, _, err) = run(
        &[
            "generate",
            "-m",
            m,
            "x",
            "--beams",
            "2",
            "--num-return",
            "3",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("--num-return 3 is more than --beams 2"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
