//! Rotary position embeddings in HF's "rotate half" layout, with the frequency scalings that
//! transformers' `ROPE_INIT_FUNCTIONS` define.

use candle_core::{DType, Device, Tensor};

use super::kernels::{tensor, with_f32};
use super::pool;
use serde::Deserialize;

use crate::error::{Error, Result};

/// `rope_scaling` from config.json. `type` is the older spelling of `rope_type`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// llama.cpp's form of any scaling: one divisor per frequency (GGUF `rope_freqs.weight`).
    /// GGUF files keep only these, not the parameters that produced them.
    #[serde(skip)]
    pub freq_factors: Option<Vec<f32>>,
}

impl RopeScaling {
    /// Anything but plain RoPE.
    pub fn is_scaled(&self) -> bool {
        self.freq_factors.is_some() || self.rope_type.as_deref().is_some_and(|t| t != "default")
    }
}

/// transformers 5.x writes RoPE's theta and scaling inside `rope_parameters`; 4.x writes
/// `rope_theta` and `rope_scaling` at the top of config.json. Rewrites the 5.x keys into the 4.x
/// ones so one `Config` reads both. A config that gives both and disagrees, a theta that is not a
/// number or a partial rotary factor other than 1 is an error naming the key, never a default.
pub fn read_rope_parameters(json: &mut serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    let Some(p) = json
        .get("rope_parameters")
        .filter(|p| !p.is_null())
        .cloned()
    else {
        return Ok(());
    };
    let Some(p) = p.as_object() else {
        return Err("rope_parameters is not an object".into());
    };
    if !p.is_empty() && p.values().all(Value::is_object) {
        return Err(format!(
            "rope_parameters per layer type ({}) are not supported for this architecture",
            p.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let theta = p
        .get("rope_theta")
        .filter(|t| t.is_number())
        .ok_or("rope_parameters.rope_theta is missing or not a number")?;
    let agree = |key: &str, v: &Value, json: &Value| match json.get(key) {
        Some(old) if !old.is_null() && old != v => {
            Err(format!("{key} ({old}) and rope_parameters ({v}) disagree"))
        }
        _ => Ok(()),
    };
    agree("rope_theta", theta, json)?;
    if let Some(f) = p.get("partial_rotary_factor") {
        if f.as_f64() != Some(1.0) {
            return Err(format!(
                "rope_parameters.partial_rotary_factor {f} is not supported (only 1)"
            ));
        }
    }
    let mut scaling = p.clone();
    scaling.remove("rope_theta");
    scaling.remove("partial_rotary_factor");
    let rope_type = scaling
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let scaled = rope_type != "default";
    let scaling = Value::Object(scaling);
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    obj.insert("rope_theta".into(), theta.clone());
    if scaled {
        if let Some(old) = obj.get("rope_scaling").filter(|o| !o.is_null()) {
            let same_type = old.get("rope_type").or_else(|| old.get("type"));
            if same_type.and_then(Value::as_str) != Some(rope_type.as_str()) {
                return Err(format!(
                    "rope_scaling ({old}) and rope_parameters ({scaling}) disagree"
                ));
            }
        }
        obj.insert("rope_scaling".into(), scaling);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: std::sync::Arc<Vec<f64>>,
    max_pos: usize,
    /// `[n, head_dim / 2]` cos and sin tables for the first `n` positions, grown (doubling) as
    /// a sequence reaches them: tables for a whole 32k context are 17 MB each, and Gemma has
    /// four, where a chat uses the first few hundred rows.
    grown: std::sync::Arc<std::sync::Mutex<Option<(Tensor, Tensor)>>>,
    /// The same tables as plain rows `[max_pos, head_dim / 2]`, made on first use (training
    /// only: inference does not pay their memory).
    rows: std::sync::Arc<std::sync::OnceLock<(Vec<f32>, Vec<f32>)>>,
}

/// The rotation frequencies, one per pair of dimensions, as transformers' `ROPE_INIT_FUNCTIONS`
/// compute them.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Result<Vec<f64>> {
    let mut inv_freq: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let Some(s) = scaling else {
        return Ok(inv_freq);
    };
    if let Some(f) = &s.freq_factors {
        if f.len() != inv_freq.len() {
            return Err(Error::msg(format!(
                "rope_freqs holds {} factors, the head needs {}",
                f.len(),
                inv_freq.len()
            )));
        }
        inv_freq
            .iter_mut()
            .zip(f)
            .for_each(|(v, &d)| *v /= d as f64);
        return Ok(inv_freq);
    }
    let factor = s.factor.unwrap_or(1.0);
    match s.rope_type.as_deref().unwrap_or("default") {
        "default" => {}
        "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
        "llama3" => {
            let lo = s.low_freq_factor.unwrap_or(1.0);
            let hi = s.high_freq_factor.unwrap_or(4.0);
            let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (lo_wl, hi_wl) = (old / lo, old / hi);
            for f in inv_freq.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                if wl > lo_wl {
                    *f /= factor;
                } else if wl >= hi_wl {
                    let smooth = (old / wl - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        other => {
            return Err(Error::msg(format!(
                "rope_scaling type '{other}' is not supported (supported: default, linear, llama3)"
            )))
        }
    }
    Ok(inv_freq)
}

/// The cos and sin tables, `[max_pos, head_dim / 2]` row-major, as transformers computes them.
pub fn tables(
    head_dim: usize,
    theta: f64,
    max_pos: usize,
    scaling: Option<&RopeScaling>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok(tables_for(&inv_freq(head_dim, theta, scaling)?, max_pos))
}

fn tables_for(inv_freq: &[f64], positions: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions * inv_freq.len());
    let mut sin = Vec::with_capacity(positions * inv_freq.len());
    for p in 0..positions {
        for f in inv_freq {
            // transformers computes the angles in f32; do the same so tables agree bit for bit
            // as far as possible.
            let a = (p as f32) * (*f as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_pos: usize,
        scaling: Option<&RopeScaling>,
    ) -> Result<Self> {
        Ok(Self {
            inv_freq: inv_freq(head_dim, theta, scaling)?.into(),
            max_pos,
            grown: Default::default(),
            rows: Default::default(),
        })
    }

    /// `(cos, sin)` as rows `[max_pos, head_dim / 2]`.
    pub fn rows(&self) -> (&[f32], &[f32]) {
        let (c, s) = self
            .rows
            .get_or_init(|| tables_for(&self.inv_freq, self.max_pos));
        (c, s)
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// Tables that cover the first `n` positions (`n` at most `max_pos`).
    fn tables_to(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let mut grown = self.grown.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, s)) = grown.as_ref().filter(|(c, _)| c.dims()[0] >= n) {
            return Ok((c.clone(), s.clone()));
        }
        let have = grown.as_ref().map_or(0, |(c, _)| c.dims()[0]);
        let len = n.max(2 * have).max(256).min(self.max_pos);
        let (cos, sin) = tables_for(&self.inv_freq, len);
        let half = self.inv_freq.len();
        let c = Tensor::from_vec(cos, (len, half), &Device::Cpu)?;
        let s = Tensor::from_vec(sin, (len, half), &Device::Cpu)?;
        *grown = Some((c.clone(), s.clone()));
        Ok((c, s))
    }

    /// `x` is `[b, heads, t, head_dim]` for positions `pos..pos+t`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        if pos + t > self.max_positions() {
            return Err(Error::ContextOverflow {
                tokens: pos + t,
                context: self.max_positions(),
            });
        }
        let (cos, sin) = self.tables_to(pos + t)?;
        let cos = cos.narrow(0, pos, t)?;
        let sin = sin.narrow(0, pos, t)?;
        if x.dtype() != DType::F32 {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
        }
        let d = x.dim(3)?;
        let y = with_f32(x, |x| {
            with_f32(&cos, |c| with_f32(&sin, |s| rotate_halves(x, c, s, t, d)))
        })????;
        tensor(y, x.dims().to_vec())
    }
}

impl Rope {
    /// [`Rope::apply`] to one position's heads in place (`x`: heads of `head_dim` values), the
    /// same products: a decoded token's queries and keys.
    pub fn rotate_one(&self, x: &mut [f32], pos: usize) -> Result<()> {
        if pos >= self.max_positions() {
            return Err(Error::ContextOverflow {
                tokens: pos + 1,
                context: self.max_positions(),
            });
        }
        let (cos, sin) = self.tables_to(pos + 1)?;
        let half = self.inv_freq.len();
        if !x.len().is_multiple_of(2 * half) {
            return Err(Error::msg(format!(
                "internal: rope over heads of {} with {} values",
                2 * half,
                x.len()
            )));
        }
        with_f32(&cos, |c| {
            with_f32(&sin, |s| {
                let (c, s) = (&c[pos * half..][..half], &s[pos * half..][..half]);
                for head in x.chunks_exact_mut(2 * half) {
                    let (x1, x2) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * c[j] - b * s[j];
                        x2[j] = a * s[j] + b * c[j];
                    }
                }
            })
        })?
    }
}

/// candle's `rope` (each row's two halves rotated by the position's angles, the same products
/// in the same order, so bit for bit its result), with the heads spread over the forward
/// pass's pool. `x` holds heads of `t` rows of `d`; `cos` and `sin` rows of `d / 2`.
fn rotate_halves(x: &[f32], cos: &[f32], sin: &[f32], t: usize, d: usize) -> Result<Vec<f32>> {
    let half = d / 2;
    if !d.is_multiple_of(2)
        || !x.len().is_multiple_of(t * d)
        || cos.len() != t * half
        || sin.len() != t * half
    {
        return Err(Error::msg(format!(
            "internal: rope over rows of {d} with {} angles for {t} positions",
            cos.len()
        )));
    }
    let mut y = vec![0f32; x.len()];
    pool::chunks_mut(&mut y, t * d, 1 << 15, |h, dst| {
        let src = &x[h * t * d..(h + 1) * t * d];
        for ((s, o), (c, sn)) in src
            .chunks_exact(d)
            .zip(dst.chunks_exact_mut(d))
            .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
        {
            let (s1, s2) = s.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for j in 0..half {
                o1[j] = s1[j] * c[j] - s2[j] * sn[j];
                o2[j] = s1[j] * sn[j] + s2[j] * c[j];
            }
        }
    });
    Ok(y)
}

/// llama.cpp's per-frequency divisors (`rope_freqs.weight`) for a scaling: what GGUF stores in
/// place of transformers' `rope_scaling` parameters.
pub fn freq_factors(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Result<Vec<f32>> {
    let base = inv_freq(head_dim, theta, None)?;
    let scaled = inv_freq(head_dim, theta, Some(scaling))?;
    Ok(base
        .iter()
        .zip(&scaled)
        .map(|(b, s)| (b / s) as f32)
        .collect())
}

/// transformers' `llama3` parameters that reproduce a GGUF file's per-frequency divisors, so a
/// converted config.json gives the same rotations. The divisors fix only two ratios of the
/// parameters (`s = A/wavelength − B` on the blended band), so `original_max_position_embeddings`
/// is taken from `original` when the file records it. None when no llama3 scaling fits.
pub fn llama3_from_factors(
    head_dim: usize,
    theta: f64,
    factors: &[f32],
    original: Option<usize>,
) -> Option<RopeScaling> {
    use std::f64::consts::PI;
    let base = inv_freq(head_dim, theta, None).ok()?;
    if factors.len() != base.len() {
        return None;
    }
    let factor = factors.iter().fold(1f32, |a, &b| a.max(b)) as f64;
    if factor <= 1.0 {
        return None;
    }
    let wl: Vec<f64> = base.iter().map(|f| 2.0 * PI / f).collect();
    // The blend weight: 1 where a frequency is left alone, 0 where divided by the full factor.
    let s: Vec<f64> = factors
        .iter()
        .map(|&d| (1.0 / d as f64 - 1.0 / factor) / (1.0 - 1.0 / factor))
        .collect();
    let tol = 1e-4;
    let blended: Vec<usize> = (0..s.len())
        .filter(|&i| s[i] > tol && s[i] < 1.0 - tol)
        .collect();
    let max_kept = (0..s.len())
        .filter(|&i| s[i] >= 1.0 - tol)
        .map(|i| wl[i])
        .fold(0f64, f64::max);
    let min_scaled = (0..s.len())
        .filter(|&i| s[i] <= tol)
        .map(|i| wl[i])
        .fold(f64::INFINITY, f64::min);
    // (A, B) with low-frequency wavelength A/B and high-frequency wavelength A/(B+1).
    let (a, b) = match blended.as_slice() {
        [i, .., j] => {
            let a = (s[*i] - s[*j]) / (1.0 / wl[*i] - 1.0 / wl[*j]);
            (a, a / wl[*i] - s[*i])
        }
        [i] => {
            let lo_wl = if min_scaled.is_finite() {
                (wl[*i] * min_scaled).sqrt()
            } else {
                2.0 * wl[*i]
            };
            let b = s[*i] / (lo_wl / wl[*i] - 1.0);
            (b * lo_wl, b)
        }
        [] => {
            let lo_wl = if max_kept > 0.0 {
                (max_kept * min_scaled).sqrt()
            } else {
                min_scaled / 2.0
            };
            let hi_wl = if max_kept > 0.0 {
                (max_kept * lo_wl).sqrt()
            } else {
                lo_wl / 2.0
            };
            let b = hi_wl / (lo_wl - hi_wl);
            (b * lo_wl, b)
        }
    };
    if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) {
        return None;
    }
    let old = original.unwrap_or((a / b).round().max(1.0) as usize) as f64;
    let lo = b * old / a;
    let fit = RopeScaling {
        rope_type: Some("llama3".into()),
        factor: Some(factor),
        low_freq_factor: Some(lo),
        high_freq_factor: Some(lo + old / a),
        original_max_position_embeddings: Some(old as usize),
        freq_factors: None,
    };
    let again = freq_factors(head_dim, theta, &fit).ok()?;
    let same = again
        .iter()
        .zip(factors)
        .all(|(x, y)| ((x - y) / y).abs() < 1e-5);
    same.then_some(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation against candle's `rope` on the same tables: bit for bit, for a prompt (the
    /// pool's path), one decoded token and positions further on.
    #[test]
    fn rotation_matches_candles_rope() {
        let rope = Rope::new(64, 10000.0, 4096, None).unwrap();
        for (heads, t, pos) in [(9, 256, 0), (3, 1, 700), (2, 37, 1000)] {
            let x = Tensor::randn(0f32, 1.0, (1, heads, t, 64), &Device::Cpu).unwrap();
            let ours = rope.apply(&x, pos).unwrap();
            let (cos, sin) = rope.tables_to(pos + t).unwrap();
            let (cos, sin) = (
                cos.narrow(0, pos, t).unwrap(),
                sin.narrow(0, pos, t).unwrap(),
            );
            let want = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
            let bits = |v: &Tensor| -> Vec<u32> {
                let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(ours.dims(), want.dims());
            assert_eq!(bits(&ours), bits(&want), "{heads} heads, {t} rows at {pos}");
        }
    }

    fn llama3(factor: f64, lo: f64, hi: f64, old: usize) -> RopeScaling {
        RopeScaling {
            rope_type: Some("llama3".into()),
            factor: Some(factor),
            low_freq_factor: Some(lo),
            high_freq_factor: Some(hi),
            original_max_position_embeddings: Some(old),
            freq_factors: None,
        }
    }

    /// Llama 3.1's parameters (several blended frequencies), the test fixture's (one), and a
    /// step with none all come back as parameters giving the same frequencies.
    #[test]
    fn llama3_parameters_are_recovered_from_gguf_factors() {
        for (hd, theta, s, original) in [
            (128, 500000.0, llama3(8.0, 1.0, 4.0, 8192), Some(8192)),
            (128, 500000.0, llama3(32.0, 1.0, 4.0, 8192), None),
            (16, 10000.0, llama3(8.0, 1.0, 4.0, 16), None),
            (16, 10000.0, llama3(4.0, 1.0, 1.0001, 64), None),
        ] {
            let f = freq_factors(hd, theta, &s).unwrap();
            let fit = llama3_from_factors(hd, theta, &f, original).expect("a fit");
            let want = inv_freq(hd, theta, Some(&s)).unwrap();
            let got = inv_freq(hd, theta, Some(&fit)).unwrap();
            for (w, g) in want.iter().zip(&got) {
                assert!(((w - g) / w).abs() < 1e-6, "{s:?} → {fit:?}");
            }
            if original.is_some() {
                assert_eq!(fit.low_freq_factor.map(|v| (v * 1e6).round()), Some(1e6));
                assert_eq!(fit.high_freq_factor.map(|v| (v * 1e6).round()), Some(4e6));
            }
        }
        assert!(llama3_from_factors(16, 10000.0, &[1.0; 8], None).is_none());
        // Divisors that fall and rise again are no llama3 scaling.
        let odd = [1.0, 8.0, 1.0, 8.0, 1.0, 8.0, 1.0, 8.0];
        assert!(llama3_from_factors(16, 10000.0, &odd, None).is_none());
    }

    #[test]
    fn factors_reproduce_the_scaled_frequencies() {
        let s = llama3(8.0, 1.0, 4.0, 16);
        let f = freq_factors(16, 10000.0, &s).unwrap();
        let via = RopeScaling {
            freq_factors: Some(f),
            ..Default::default()
        };
        let a = inv_freq(16, 10000.0, Some(&s)).unwrap();
        let b = inv_freq(16, 10000.0, Some(&via)).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!(((x - y) / x).abs() < 1e-6);
        }
    }
}
