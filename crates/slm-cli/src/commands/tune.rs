//! `slm tune`: a hyperparameter search over `slm finetune` runs.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::finetune::{self, Method};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every combination (the first --trials of them when given).
    Grid,
    /// --trials combinations drawn without replacement (seeded by --seed).
    Random,
}

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    base: finetune::Args,
    /// grid: every combination of the value lists; random: --trials draws from them.
    #[arg(long, value_enum, default_value = "grid")]
    search: Search,
    /// How many trials to run (default: the whole grid).
    #[arg(long)]
    trials: Option<usize>,
    /// Learning rates to try (comma-separated).
    #[arg(long, value_delimiter = ',')]
    lr_values: Vec<f32>,
    /// Batch sizes to try (comma-separated).
    #[arg(long, value_delimiter = ',')]
    batch_size_values: Vec<usize>,
    /// LoRA ranks to try (with --method lora).
    #[arg(long, value_delimiter = ',')]
    lora_r_values: Vec<usize>,
    /// Epoch counts to try (comma-separated).
    #[arg(long, value_delimiter = ',')]
    epochs_values: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Trial {
    lr: Option<f32>,
    batch: usize,
    r: usize,
    epochs: usize,
}

fn or_base<T: Copy>(values: &[T], base: T) -> Vec<T> {
    if values.is_empty() {
        vec![base]
    } else {
        values.to_vec()
    }
}

pub fn run(a: TuneArgs) -> Result<()> {
    let b = &a.base;
    let lrs: Vec<Option<f32>> = if a.lr_values.is_empty() {
        vec![b.lr]
    } else {
        a.lr_values.iter().map(|&l| Some(l)).collect()
    };
    if !a.lora_r_values.is_empty() && b.method != Method::Lora {
        bail!("--lora-r-values needs --method lora");
    }
    let mut grid = Vec::new();
    for &lr in &lrs {
        for &batch in &or_base(&a.batch_size_values, b.batch_size) {
            for &r in &or_base(&a.lora_r_values, b.lora_r) {
                for &epochs in &or_base(&a.epochs_values, b.epochs) {
                    grid.push(Trial {
                        lr,
                        batch,
                        r,
                        epochs,
                    });
                }
            }
        }
    }
    if a.search == Search::Random {
        grid.shuffle(&mut rand::rngs::StdRng::seed_from_u64(b.seed));
    }
    let n = a.trials.unwrap_or(grid.len()).min(grid.len());
    if n == 0 {
        bail!("--trials must be at least 1");
    }
    let root = b.output.clone();
    std::fs::create_dir_all(&root)?;
    let mut log = std::fs::File::create(root.join("trials.jsonl"))?;
    let mut rows = Vec::new();
    for (i, t) in grid.iter().take(n).enumerate() {
        let mut args = b.clone();
        args.lr = t.lr;
        args.batch_size = t.batch;
        args.lora_r = t.r;
        args.epochs = t.epochs;
        args.output = root.join(format!("trial-{}", i + 1));
        args.force = true;
        args.resume = false;
        eprintln!("trial {}/{n}: {}", i + 1, describe(t, b.method));
        let (summary, out) = finetune::train(args)?;
        let eval = summary.final_eval.clone();
        // Higher is better: the task's metric, else the negated validation loss.
        let score = eval
            .as_ref()
            .map(|e| e.metric.as_ref().map_or(-e.loss, |m| m.1))
            .unwrap_or(f64::NEG_INFINITY);
        writeln!(
            log,
            "{}",
            serde_json::json!({
                "trial": i + 1, "lr": t.lr, "batch_size": t.batch, "lora_r": t.r,
                "epochs": t.epochs, "eval": eval, "train_loss": summary.final_loss,
                "seconds": summary.seconds, "output": out,
            })
        )?;
        rows.push((i + 1, *t, summary, score, out));
    }
    let best = rows
        .iter()
        .max_by(|x, y| x.3.total_cmp(&y.3))
        .map(|r| r.0)
        .unwrap_or(0);
    let metric_name = rows
        .iter()
        .find_map(|r| {
            r.2.final_eval
                .as_ref()?
                .metric
                .as_ref()
                .map(|m| m.0.clone())
        })
        .unwrap_or_else(|| "perplexity".into());
    outln!(
        "  {:>5} {:>9} {:>6} {:>5} {:>6} {:>10} {:>10} {:>8}",
        "trial",
        "lr",
        "batch",
        "r",
        "epochs",
        "valid loss",
        metric_name,
        "seconds"
    );
    for (i, t, s, _, _) in &rows {
        let (loss, metric) = match &s.final_eval {
            Some(e) => (
                format!("{:.4}", e.loss),
                e.metric
                    .as_ref()
                    .map_or(format!("{:.3}", e.loss.exp()), |m| format!("{:.4}", m.1)),
            ),
            None => ("-".into(), "-".into()),
        };
        let lr = t.lr.map_or("default".into(), |l| format!("{l:.1e}"));
        let r = if b.method == Method::Lora {
            t.r.to_string()
        } else {
            "-".into()
        };
        outln!(
            "{} {:>5} {:>9} {:>6} {:>5} {:>6} {:>10} {:>10} {:>8.1}",
            if *i == best { "*" } else { " " },
            i,
            lr,
            t.batch,
            r,
            t.epochs,
            loss,
            metric,
            s.seconds
        );
    }
    let best_dir: Option<&PathBuf> = rows.iter().find(|r| r.0 == best).map(|r| &r.4);
    if let Some(d) = best_dir {
        outln!("best: trial {best} ({})", d.display());
    }
    Ok(())
}

fn describe(t: &Trial, method: Method) -> String {
    let lr = t.lr.map_or("default".into(), |l| format!("{l:e}"));
    let r = if method == Method::Lora {
        format!(", lora r {}", t.r)
    } else {
        String::new()
    };
    format!("lr {lr}, batch {}, epochs {}{r}", t.batch, t.epochs)
}
