//! The training loop, for any model that can run a forward and backward pass on a batch:
//! gradient accumulation, schedule, clipping, evaluation every N steps, early stopping, keeping
//! the best model, `metrics.jsonl`, atomic checkpoints and an exact resume.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use super::optim::{clip_factor, grad_norm, scale_grads, sgd_step, AdamW, OptimConfig, Optimizer};
use super::params::{seeded, Params};
use super::TrainResult;

/// What the loop needs from a model.
pub trait Model {
    type Batch;
    fn params(&self) -> &Params;
    fn params_mut(&mut self) -> &mut Params;
    /// Adds the gradients of (the batch's mean loss / `accum`); returns the batch's mean loss.
    fn forward_backward(&mut self, batch: &Self::Batch, accum: usize) -> TrainResult<f64>;
    /// Loss (and metric) over `batches`; `done(k)` is called after the k-th batch.
    fn evaluate(&self, batches: &[Self::Batch], done: &dyn Fn(usize)) -> TrainResult<Evaluation>;
    /// Tokens in a batch, for tokens/s.
    fn tokens(batch: &Self::Batch) -> usize;
    /// Writes a loadable model (or adapter) to `dir`.
    fn save(&self, dir: &Path) -> TrainResult<()>;
    /// Optimizer step `step` (from 0) is about to run its batches.
    fn begin_step(&mut self, _step: usize) {}
    /// What the model carries between steps, for the checkpoint.
    fn extra_state(&self) -> checkpoint::Extra {
        Vec::new()
    }
    /// Takes back what [`Model::extra_state`] saved, when resuming.
    fn restore_extra(
        &mut self,
        _saved: std::collections::HashMap<String, crate::io::write::F32Tensor>,
    ) -> TrainResult<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    /// A higher-is-better metric (accuracy) when the task has one.
    pub metric: Option<(String, f64)>,
}

impl Evaluation {
    /// The loss per token over `batches`, from each batch's summed loss and token count;
    /// `done(k)` after the k-th batch.
    pub fn mean_token_loss<B>(
        batches: &[B],
        done: &dyn Fn(usize),
        mut loss_sum: impl FnMut(&B) -> TrainResult<(f64, usize)>,
    ) -> TrainResult<Self> {
        let (mut sum, mut n) = (0.0, 0usize);
        for (i, b) in batches.iter().enumerate() {
            let (s, c) = loss_sum(b)?;
            sum += s;
            n += c;
            done(i + 1);
        }
        Ok(Evaluation {
            loss: sum / n.max(1) as f64,
            metric: None,
        })
    }

    /// What early stopping and keep-best compare: the metric, else the negated loss.
    fn score(&self) -> f64 {
        self.metric.as_ref().map_or(-self.loss, |m| m.1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    pub eval_every: Option<usize>,
    pub save_every: Option<usize>,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    pub keep_best: bool,
    /// Examples in a new random order every epoch; off for consecutive chunks of streams,
    /// whose recurrent state runs from one chunk into the next.
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn yes() -> bool {
    true
}

impl TrainConfig {
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size).div_ceil(self.grad_accum).max(1)
    }

    /// `max_steps` when given (as transformers, it overrides the epochs), else the epochs'.
    pub fn total_steps(&self, n: usize) -> usize {
        self.max_steps
            .unwrap_or(self.epochs * self.steps_per_epoch(n))
    }
}

/// One step as the progress display sees it.
pub struct StepInfo {
    pub step: usize,
    pub total: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f32,
    pub tokens_per_s: f64,
}

/// Where the loop reports; the CLI draws a progress bar.
pub trait Hooks {
    fn step(&self, _s: &StepInfo) {}
    /// Evaluation is under way: `done` of `total` validation batches.
    fn evaluating(&self, _done: usize, _total: usize) {}
    fn eval(&self, _step: usize, _e: &Evaluation, _best: bool) {}
    fn message(&self, _m: &str) {}
}

pub struct NoHooks;
impl Hooks for NoHooks {}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    pub final_eval: Option<Evaluation>,
    pub best: Option<(usize, f64)>,
    pub stopped_early: bool,
    pub seconds: f64,
    /// Seconds spent in training steps alone (no evaluation, no saving): what tokens/s is of.
    pub train_seconds: f64,
    pub tokens: usize,
}

/// The example order of an epoch: a shuffle seeded by (seed, epoch), so a resumed run sees
/// the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut seeded(
        seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1)),
    ));
    order
}

/// Trains `model` on `n_train` examples that `make_batch` turns into batches, evaluating on
/// `valid`. Output in `out`: `metrics.jsonl`, `checkpoint/`, `best/`, and the final model.
#[allow(clippy::too_many_arguments)]
pub fn train<M: Model>(
    model: &mut M,
    n_train: usize,
    make_batch: &dyn Fn(&[usize]) -> M::Batch,
    valid: &[M::Batch],
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    hooks: &dyn Hooks,
) -> TrainResult<Summary> {
    if n_train == 0 {
        return Err(crate::Error::Data("the training set is empty".into()));
    }
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let mut opt = AdamW::new(model.params());
    let mut state = TrainState::default();
    if resume {
        state = checkpoint::load(out, model.params_mut(), &mut opt, cfg)?;
        model.restore_extra(checkpoint::load_extra(out)?)?;
        hooks.message(&format!(
            "resumed at step {} (epoch {})",
            state.step,
            state.epoch + 1
        ));
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = checkpoint::open_metrics(&metrics_path, state.step)?;
    let mut log = |v: serde_json::Value| -> TrainResult<()> {
        writeln!(metrics, "{v}")
            .and_then(|_| metrics.flush())
            .map_err(|e| crate::Error::io(&metrics_path, e))
    };
    let total = cfg.total_steps(n_train);
    let started = Instant::now();
    let mut tokens_total = 0usize;
    let mut last_loss = state.last_loss;
    let mut stopped_early = false;
    let mut train_seconds = 0.0;
    // The last evaluation, so that one at the final step is not run (and logged) twice.
    let mut last_eval: Option<(usize, Evaluation)> = None;
    let evaluate = |model: &M| {
        hooks.evaluating(0, valid.len());
        model.evaluate(valid, &|k| hooks.evaluating(k, valid.len()))
    };
    model.params_mut().zero_grad();
    'epochs: while state.step < total {
        let order = if cfg.shuffle {
            epoch_order(n_train, cfg.seed, state.epoch)
        } else {
            (0..n_train).collect()
        };
        let batches: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
        while state.batch < batches.len() && state.step < total {
            let t0 = Instant::now();
            let mut loss = 0.0;
            let mut tokens = 0;
            let micro = (batches.len() - state.batch).min(cfg.grad_accum);
            model.begin_step(state.step);
            for _ in 0..micro {
                let batch = make_batch(batches[state.batch]);
                tokens += M::tokens(&batch);
                loss += model.forward_backward(&batch, micro)?;
                state.batch += 1;
            }
            loss /= micro as f64;
            let grad_norm = grad_norm(model.params());
            let clip = clip_factor(grad_norm, cfg.optim.max_grad_norm);
            let annealed = cfg
                .optim
                .plateau_factor
                .map_or(1.0, |f| f.powi(state.plateau_cuts as i32));
            let lr = cfg.optim.lr_at(state.step, total) * annealed;
            match cfg.optim.optimizer {
                Optimizer::AdamW => {
                    scale_grads(model.params_mut(), clip);
                    opt.step(model.params_mut(), &cfg.optim, lr);
                    model.params_mut().zero_grad();
                }
                // Scales, steps and zeroes in one pass.
                Optimizer::Sgd => sgd_step(model.params_mut(), lr, cfg.optim.weight_decay, clip),
            }
            state.step += 1;
            last_loss = loss;
            tokens_total += tokens;
            let step_seconds = t0.elapsed().as_secs_f64();
            train_seconds += step_seconds;
            let tps = tokens as f64 / step_seconds.max(1e-9);
            log(serde_json::json!({
                "step": state.step, "epoch": state.epoch + 1, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": tps,
                "elapsed_s": started.elapsed().as_secs_f64(),
            }))?;
            hooks.step(&StepInfo {
                step: state.step,
                total,
                epoch: state.epoch + 1,
                loss,
                lr,
                tokens_per_s: tps,
            });
            if cfg.eval_every.is_some_and(|e| state.step % e == 0) && !valid.is_empty() {
                let e = evaluate(model)?;
                last_eval = Some((state.step, e.clone()));
                let improved = state.best.is_none_or(|(_, b)| e.score() > b);
                log(serde_json::json!({"step": state.step, "eval": e}))?;
                hooks.eval(state.step, &e, improved);
                if improved {
                    state.best = Some((state.step, e.score()));
                    state.bad_evals = 0;
                    if cfg.keep_best {
                        model.save(&out.join("best"))?;
                    }
                } else {
                    state.bad_evals += 1;
                    if let Some(f) = cfg.optim.plateau_factor {
                        state.plateau_cuts += 1;
                        hooks.message(&format!(
                            "no improvement at step {}: learning rate × {f} (now × {})",
                            state.step,
                            f.powi(state.plateau_cuts as i32)
                        ));
                    }
                    if cfg.patience.is_some_and(|p| state.bad_evals >= p) {
                        hooks.message(&format!(
                            "early stop at step {}: no improvement in {} evaluations",
                            state.step, state.bad_evals
                        ));
                        stopped_early = true;
                        break 'epochs;
                    }
                }
            }
            if cfg.save_every.is_some_and(|s| state.step % s == 0) {
                state.last_loss = last_loss;
                checkpoint::save(out, model.params(), &opt, &state, cfg, &model.extra_state())?;
            }
        }
        state.epoch += 1;
        state.batch = 0;
    }
    let final_eval = match last_eval {
        Some((step, e)) if step == state.step => Some(e),
        _ if valid.is_empty() => None,
        _ => {
            let e = evaluate(model)?;
            log(serde_json::json!({"step": state.step, "eval": e, "final": true}))?;
            Some(e)
        }
    };
    model.save(out)?;
    state.last_loss = last_loss;
    checkpoint::save(out, model.params(), &opt, &state, cfg, &model.extra_state())?;
    checkpoint::loss_curve(&metrics_path, &out.join("loss.svg"))?;
    Ok(Summary {
        steps: state.step,
        final_loss: last_loss,
        final_eval,
        best: state.best,
        stopped_early,
        seconds: started.elapsed().as_secs_f64(),
        train_seconds,
        tokens: tokens_total,
    })
}
