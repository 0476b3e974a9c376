//! Q6_K quantization as llama.cpp's current reference (`quantize_row_q6_K_ref`) computes it.
//! candle's quantizer follows ggml's older scale fitting (three rounds of refinement); llama.cpp
//! now tries 19 candidate scales per 16-value group and keeps the best weighted fit, and rounds
//! half to even. Matching it makes slm's files byte-identical to llama-quantize's.

const QK_K: usize = 256;
/// Bytes per block: 128 low nibbles, 64 bytes of high bits, 16 scales, an f16 super-scale.
pub const BLOCK_BYTES: usize = 210;

/// Round to nearest, ties to even, as ggml's `nearest_int` (the 1.5·2²³ trick).
pub(crate) fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights x²) and no importance matrix: levels in
/// `l` (offset by `nmax`), returns the group's scale.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let set = |iscale: f32, l: &mut [i8]| {
        for (li, &v) in l.iter_mut().zip(x) {
            *li = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    set(iscale, l);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            set(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Quantizes `x` (a multiple of 256 values) to Q6_K blocks.
pub fn quantize(x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(QK_K));
    let mut out = Vec::with_capacity(x.len() / QK_K * BLOCK_BYTES);
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for (ib, s) in scales.iter_mut().enumerate() {
            *s = make_qx_quants(
                &xb[16 * ib..16 * ib + 16],
                32,
                &mut l[16 * ib..16 * ib + 16],
            );
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = *s;
            }
        }
        if max_abs < 1e-15 {
            out.extend(std::iter::repeat_n(0u8, BLOCK_BYTES));
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = half::f16::from_f32(1.0 / iscale);
        let sc: Vec<i8> = scales
            .iter()
            .map(|&s| nearest_int(iscale * s).min(127) as i8)
            .collect();
        for (j, &s) in sc.iter().enumerate() {
            let dd = d.to_f32() * s as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / dd).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        for (half_idx, j) in (0..QK_K).step_by(128).enumerate() {
            let (ql, qh) = (&mut ql[64 * half_idx..], &mut qh[32 * half_idx..]);
            for i in 0..32 {
                let q = |o: usize| l[j + i + o] as u8;
                ql[i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[i] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}
