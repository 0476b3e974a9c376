//! Checkpoints that survive a kill at any moment, and the loss curve.
//!
//! A checkpoint is a folder: `params.safetensors` (the trained tensors), `optimizer.safetensors`
//! (AdamW's moments), `state.json` (step, epoch, position in the epoch, best score, AdamW's step
//! count, the training config). It is written under a temporary name and renamed into place;
//! the previous one is kept as `checkpoint.old` until the new one is complete, so some complete
//! checkpoint exists whenever the process dies.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::params::Params;
use super::trainer::TrainConfig;
use super::TrainResult;
use crate::io::write::{read_safetensors_f32, write_atomic, write_safetensors, F32Tensor};
use crate::Error;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub epoch: usize,
    /// Batches of the current epoch already used.
    pub batch: usize,
    /// (step, score) of the best evaluation.
    pub best: Option<(usize, f64)>,
    pub bad_evals: usize,
    pub adam_t: u64,
    pub last_loss: f64,
    /// Evaluations that cut the learning rate (`plateau_factor`).
    #[serde(default)]
    pub plateau_cuts: u32,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    state: TrainState,
    config: TrainConfig,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> crate::Error + '_ {
    move |e| Error::io(path, e)
}

/// What a model carries from one step to the next besides its parameters (a recurrent
/// model's state between chunks), saved with the checkpoint so a resumed run goes on from it.
pub type Extra = Vec<(String, Vec<usize>, Vec<f32>)>;

pub fn save(
    out: &Path,
    p: &Params,
    opt: &AdamW,
    state: &TrainState,
    cfg: &TrainConfig,
    extra: &Extra,
) -> TrainResult<()> {
    let tmp = out.join(format!(".checkpoint.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let trained: Vec<usize> = (0..p.list.len()).filter(|&i| p.trainable(i)).collect();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = trained
        .iter()
        .map(|&i| (p.list[i].name.clone(), p.list[i].shape.clone(), p.value(i)))
        .collect();
    write_safetensors(&tmp.join("params.safetensors"), &tensors, None)?;
    let moments: Vec<(String, Vec<usize>, &[f32])> = trained
        .iter()
        .flat_map(|&i| {
            let (name, shape) = (&p.list[i].name, &p.list[i].shape);
            [
                (
                    format!("{name}.exp_avg"),
                    shape.clone(),
                    opt.m[i].as_slice(),
                ),
                (
                    format!("{name}.exp_avg_sq"),
                    shape.clone(),
                    opt.v[i].as_slice(),
                ),
            ]
        })
        .collect();
    write_safetensors(&tmp.join("optimizer.safetensors"), &moments, None)?;
    if !extra.is_empty() {
        let tensors: Vec<(String, Vec<usize>, &[f32])> = extra
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
            .collect();
        write_safetensors(&tmp.join("extra.safetensors"), &tensors, None)?;
    }
    let file = StateFile {
        state: TrainState {
            adam_t: opt.t,
            ..state.clone()
        },
        config: cfg.clone(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), |w| w.write_all(&json))?;
    let (cur, old) = (out.join("checkpoint"), out.join("checkpoint.old"));
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(io(&cur))?;
    }
    std::fs::rename(&tmp, &cur).map_err(io(&cur))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The newest complete checkpoint: `checkpoint/`, or `checkpoint.old/` when the process died
/// between the two renames of [`save`].
fn find(out: &Path) -> Option<PathBuf> {
    ["checkpoint", "checkpoint.old"]
        .iter()
        .map(|n| out.join(n))
        .find(|d| d.join("state.json").is_file())
}

/// Restores parameters, optimizer and position; the config must be the one it was saved with.
pub fn load(
    out: &Path,
    p: &mut Params,
    opt: &mut AdamW,
    cfg: &TrainConfig,
) -> TrainResult<TrainState> {
    let Some(dir) = find(out) else {
        return Err(crate::Error::Resume(format!(
            "{}: no checkpoint to resume from (checkpoint/state.json)",
            out.display()
        )));
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let file: StateFile = serde_json::from_str(&text).map_err(|e| Error::file(&state_path, e))?;
    if &file.config != cfg {
        return Err(crate::Error::Resume(format!(
            "{}: the run was started with other training options; resume with the same ones",
            state_path.display()
        )));
    }
    let values = read_safetensors_f32(&dir.join("params.safetensors"))?;
    let moments = read_safetensors_f32(&dir.join("optimizer.safetensors"))?;
    let take = |map: &HashMap<String, F32Tensor>, name: &str, len: usize, file: &str| match map
        .get(name)
    {
        Some((_, v)) if v.len() == len => Ok(v.clone()),
        _ => Err(crate::Error::Resume(format!(
            "{}: {name} is missing or has the wrong size",
            dir.join(file).display()
        ))),
    };
    for i in 0..p.list.len() {
        if !p.trainable(i) {
            continue;
        }
        let (name, len) = (p.list[i].name.clone(), p.list[i].value.len());
        p.list[i].value = take(&values, &name, len, "params.safetensors")?;
        opt.m[i] = take(
            &moments,
            &format!("{name}.exp_avg"),
            len,
            "optimizer.safetensors",
        )?;
        opt.v[i] = take(
            &moments,
            &format!("{name}.exp_avg_sq"),
            len,
            "optimizer.safetensors",
        )?;
    }
    opt.t = file.state.adam_t;
    Ok(file.state)
}

/// The [`Extra`] tensors of the checkpoint [`load`] reads (none when it has no such file).
pub fn load_extra(out: &Path) -> TrainResult<HashMap<String, F32Tensor>> {
    match find(out).map(|d| d.join("extra.safetensors")) {
        Some(f) if f.is_file() => read_safetensors_f32(&f),
        _ => Ok(HashMap::new()),
    }
}

/// Opens `metrics.jsonl` for appending, first dropping the records after `step` (written by a
/// run that died after its last checkpoint).
pub fn open_metrics(path: &Path, step: usize) -> TrainResult<std::fs::File> {
    let keep: Vec<String> = if step == 0 {
        Vec::new()
    } else {
        match std::fs::File::open(path) {
            Ok(f) => std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let mut text = keep.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    write_atomic(path, |w| w.write_all(text.as_bytes()))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io(path))
}

/// Training loss per step (and evaluation loss where there is one) as an SVG line chart.
pub fn loss_curve(metrics: &Path, out: &Path) -> TrainResult<()> {
    let text = std::fs::read_to_string(metrics).map_err(io(metrics))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.pointer("/eval/loss").and_then(|l| l.as_f64()) {
            eval.push((step, l));
        }
    }
    let svg = svg_chart(&[
        ("train loss", "#1f77b4", &train),
        ("eval loss", "#d62728", &eval),
    ]);
    write_atomic(out, |w| w.write_all(svg.as_bytes()))?;
    Ok(())
}

/// (name, colour, points) of one line.
type Series<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

fn svg_chart(series: &[Series]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xr, yr) = ((x1 - x0).max(1e-9), (y1 - y0).max(1e-9));
    let px = |x: f64| pad + (x - x0) / xr * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / yr * (h - 2.0 * pad);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad
    );
    s += &format!(
        "<text x=\"{pad}\" y=\"{}\">step {x0}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x1}</text>\n",
        h - pad + 16.0,
        w - pad,
        h - pad + 16.0
    );
    s += &format!(
        "<text x=\"4\" y=\"{}\">{y0:.3}</text><text x=\"4\" y=\"{}\">{y1:.3}</text>\n",
        h - pad,
        pad + 4.0
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        if data.is_empty() {
            continue;
        }
        let path: Vec<String> = data
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            path.join(" ")
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
            w - pad - 100.0,
            pad + 16.0 * i as f64
        );
    }
    s + "</svg>\n"
}
