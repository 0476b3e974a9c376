//! `slm pretrain` of a recurrent LM on real text (WikiText-2 valid lines): the loss falls, the
//! saved model is read back (config, tied weights, tokenizer) and its stream perplexity in
//! inference equals the trainer's last evaluation; bad input gets clear errors.

mod common;

use std::path::{Path, PathBuf};

use slm::eval::perplexity::{perplexity, Options};
use slm::models::{load_causal, ComputeDtype, ModelConfig};
use slm::nn::recurrent::Cell;
use slm::tokenize::train::{self as tok_train, Kind, TrainOptions};
use slm::tokenize::Tokenizer;
use slm::train::optim::{OptimConfig, Optimizer, Schedule};
use slm::train::pretrain::{run, Pretrain, RnnSizes};
use slm::train::trainer::{NoHooks, TrainConfig};

/// Lines `a..b` of WikiText-2 valid in a file of `dir`.
fn wiki_lines(dir: &Path, name: &str, a: usize, b: usize) -> PathBuf {
    let src = common::assets().join("corpora/wikitext-2/valid.txt");
    let text = std::fs::read_to_string(&src)
        .unwrap_or_else(|e| panic!("{}: {e} (set SLM_ASSETS)", src.display()));
    let part: String = text.split_inclusive('\n').skip(a).take(b - a).collect();
    let p = dir.join(name);
    std::fs::write(&p, part).unwrap();
    p
}

fn word_tokenizer(dir: &Path, files: &[PathBuf]) -> PathBuf {
    let o = TrainOptions {
        kind: Kind::Word,
        vocab_size: 100_000,
        min_frequency: 2,
        special_tokens: Kind::Word.default_specials(),
    };
    let tok = tok_train::train(files, &o).unwrap();
    let out = dir.join("tok");
    tok_train::save(&tok, &o, &out).unwrap();
    out
}

fn job(
    dir: &Path,
    tok: PathBuf,
    train: PathBuf,
    valid: PathBuf,
    cell: Cell,
    tied: bool,
) -> Pretrain {
    Pretrain {
        rnn: RnnSizes {
            cell,
            emsize: 24,
            nhid: 24,
            nlayers: 2,
            dropout: 0.1,
            tied,
        },
        init: None,
        tokenizer: tok,
        train: vec![train],
        valid: vec![valid],
        output: dir.join("out"),
        bptt: 20,
        batch_size: 8,
        eval_batch_size: 1,
        config: TrainConfig {
            epochs: 3,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            optim: OptimConfig {
                optimizer: Optimizer::Sgd,
                plateau_factor: Some(0.25),
                lr: 20.0,
                weight_decay: 0.0,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                warmup_steps: 0,
                schedule: Schedule::Constant,
                max_grad_norm: 0.25,
            },
            seed: 7,
            eval_every: None,
            save_every: None,
            patience: None,
            keep_best: true,
            shuffle: false,
        },
        resume: false,
        force: false,
    }
}

fn eval_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval"]["loss"].as_f64())
        .collect()
}

#[test]
fn a_recurrent_lm_from_scratch_learns_and_reloads_with_the_same_perplexity() {
    for (cell, tied) in [(Cell::Lstm, false), (Cell::Gru, true)] {
        let dir = common::tempdir(&format!("pretrain_{cell:?}_{tied}"));
        let train = wiki_lines(&dir, "train.txt", 0, 300);
        let valid = wiki_lines(&dir, "valid.txt", 300, 360);
        let tok = word_tokenizer(&dir, &[train.clone(), valid.clone()]);
        let p = job(&dir, tok, train, valid.clone(), cell, tied);
        let summary = run(&p, &NoHooks).unwrap();
        let evals = eval_losses(&p.output);
        assert_eq!(evals.len(), 3, "{cell:?}: one evaluation per epoch");
        let vocab = Tokenizer::from_hf_folder(&p.output).unwrap().vocab_size() as f64;
        // Far below a uniform guess, and better after the second epoch than after the first
        // (on 300 lines, a third may already overfit).
        assert!(
            evals[0] < vocab.ln() - 1.0,
            "{cell:?}: {evals:?} vs ln V {}",
            vocab.ln()
        );
        assert!(evals[1] < evals[0], "{cell:?}: validation loss {evals:?}");
        // The saved folder is a recurrent model with the same sizes and tying.
        let mut m = load_causal(&p.output, ComputeDtype::Auto).unwrap();
        let ModelConfig::Rnn(c) = &m.config else {
            panic!("{cell:?}: saved model is not recurrent");
        };
        assert_eq!(
            (c.rnn_type, c.nhid, c.nlayers, c.tie_weights),
            (cell, 24, 2, tied)
        );
        // Inference over the validation text as one stream gives the trainer's last
        // evaluation (one stream, state carried): two executors, one number.
        let files = slm::io::ModelFiles::locate(&p.output).unwrap();
        let tok = Tokenizer::load(&files).unwrap();
        let ids = tok
            .encode(&std::fs::read_to_string(&valid).unwrap(), false)
            .unwrap();
        let opts = Options {
            max_length: 64,
            stride: 64,
        };
        let got = perplexity(m.model.as_mut(), &ids, opts, |_, _| {}).unwrap();
        let last = summary.final_eval.unwrap().loss;
        assert!(
            (got.mean_nll - last).abs() < 1e-4,
            "{cell:?}: inference mean NLL {} vs training evaluation {last}",
            got.mean_nll
        );
        // PyTorch's RNNModel state_dict keys, tied decoder included; the vocabulary as a list.
        let names: Vec<String> = slm::io::open_weights(&files)
            .unwrap()
            .tensors()
            .into_iter()
            .map(|t| t.name)
            .collect();
        for n in [
            "encoder.weight",
            "decoder.weight",
            "decoder.bias",
            "rnn.weight_hh_l1",
        ] {
            assert!(
                names.iter().any(|x| x == n),
                "{cell:?}: no {n} in {names:?}"
            );
        }
        assert!(p.output.join("vocab.txt").is_file());
        // Nothing is overwritten without --force.
        let again = run(&p, &NoHooks).expect_err("a second run into the same folder");
        assert!(again.to_string().contains("--force"), "{again}");
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let dir = common::tempdir("pretrain_bad");
    let train = wiki_lines(&dir, "train.txt", 0, 50);
    let valid = wiki_lines(&dir, "valid.txt", 50, 60);
    let tok = word_tokenizer(&dir, std::slice::from_ref(&train));
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let mut p = job(&dir, tok.clone(), empty, valid.clone(), Cell::Lstm, false);
    let e = run(&p, &NoHooks).unwrap_err().to_string();
    assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
    p.train = vec![train.clone()];
    p.rnn.tied = true;
    p.rnn.emsize = 16;
    let e = run(&p, &NoHooks).unwrap_err().to_string();
    assert!(e.contains("tied") && e.contains("--emsize"), "{e}");
    p.rnn.tied = false;
    p.batch_size = 100_000;
    let e = run(&p, &NoHooks).unwrap_err().to_string();
    assert!(e.contains("cannot fill 100000 streams"), "{e}");
    let no_tok = job(&dir, dir.join("nothing"), train, valid, Cell::Gru, false);
    assert!(run(&no_tok, &NoHooks).is_err());
}

/// A config.json that disagrees with the tensors of a word_language_model checkpoint.
#[test]
fn a_config_that_contradicts_the_state_dict_is_refused() {
    let dir = common::tempdir("rnn_bad_config");
    let src = common::fixtures().join("rnn/wlm_lstm");
    for f in ["model.pt", "vocab.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cfg = serde_json::json!({"model_type": "rnn_lm", "rnn_type": "LSTM", "ntoken": 1489,
                                 "ninp": 24, "nhid": 32, "nlayers": 2});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_causal(&dir, ComputeDtype::Auto)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json says LSTM") && e.contains("nhid=32") && e.contains("nhid=24"),
        "{e}"
    );
    let cfg = serde_json::json!({"model_type": "rnn_lm", "rnn_type": "GRU", "ntoken": 1489,
                                 "ninp": 24, "nhid": 24, "nlayers": 2});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_causal(&dir, ComputeDtype::Auto)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("GRU") && e.contains("weights are LSTM"), "{e}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_causal(&dir, ComputeDtype::Auto).is_ok());
}

/// A stream's chunks hold the same tokens every epoch: their dropout masks must still differ
/// from epoch to epoch (the step enters the seed), and repeat for the same step (resume).
#[test]
fn stream_chunks_draw_new_dropout_masks_each_epoch() {
    use slm::train::causal::CausalRun;
    use slm::train::lm::CausalLm;
    use slm::train::stream::{StreamRun, Streams};
    use slm::train::tape::Dropout;
    use slm::train::trainer::Model;
    let dir = common::fixtures().join("rnn/wlm_lstm");
    let mut model = CausalLm::load(&dir, None, 3).unwrap();
    model.dropout = Dropout::Rate(0.5);
    let mut run = StreamRun::new(CausalRun {
        model,
        source: dir.clone(),
    });
    let ids: Vec<u32> = (0..400).map(|i| (i * 7 % 1489) as u32).collect();
    let chunk = Streams::new(&ids, 4, "ids").unwrap().chunk(0, 20);
    let mut loss_at = |step: usize| {
        run.begin_step(step);
        let l = run.forward_backward(&chunk, 1).unwrap();
        run.params_mut().zero_grad();
        l
    };
    let (first, next_epoch, again) = (loss_at(0), loss_at(250), loss_at(0));
    assert_ne!(first, next_epoch, "the same masks in two epochs");
    assert_eq!(first, again, "a resumed step must draw the masks it drew");
}

/// A run stopped in the middle of an epoch and resumed from its checkpoint (the carried state
/// included) ends with the same weights as the run that was never stopped.
#[test]
fn a_stopped_stream_run_resumes_to_the_same_weights() {
    struct StopAt(usize);
    impl slm::train::trainer::Hooks for StopAt {
        fn step(&self, s: &slm::train::trainer::StepInfo) {
            if s.step == self.0 {
                panic!("stopped at step {}", s.step);
            }
        }
    }
    let dir = common::tempdir("pretrain_resume");
    let train = wiki_lines(&dir, "train.txt", 0, 100);
    let valid = wiki_lines(&dir, "valid.txt", 100, 120);
    let tok = word_tokenizer(&dir, &[train.clone(), valid.clone()]);
    let mut p = job(&dir, tok, train, valid, Cell::Lstm, false);
    p.config.epochs = 2;
    p.config.save_every = Some(20);
    p.output = dir.join("whole");
    let whole = run(&p, &NoHooks).unwrap();
    p.output = dir.join("stopped");
    // Step 43 is before the first epoch's end: the checkpoint of step 40 holds a carried state.
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&p, &StopAt(43))));
    assert!(stopped.is_err(), "the run was not stopped");
    p.resume = true;
    let resumed = run(&p, &NoHooks).unwrap();
    assert_eq!(resumed.steps, whole.steps);
    let read = |d: &str| std::fs::read(dir.join(d).join("model.safetensors")).unwrap();
    assert!(
        read("whole") == read("stopped"),
        "the resumed run ended elsewhere"
    );
}
