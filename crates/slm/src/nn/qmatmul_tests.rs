//! The quantized products against the scalar reference and each other (kept apart from
//! `qmatmul.rs` for its length).

use super::*;
use crate::nn::qdot::{dot_scalar, quantize_q8, quantize_q8k};
use candle_core::quantized::QTensor;

/// Every block type slm's kernels pack.
const PACKED: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Heights of three stacked parts: eight-row groups, the last part ending outside one where
/// the type allows it (k-quants need whole groups).
fn heights(dtype: GgmlDType) -> &'static [usize] {
    if KKind::of(dtype).is_some() {
        &[16, 8, 24]
    } else {
        &[16, 8, 13]
    }
}

/// `wt` quantized by candle to `dtype`: its bytes, the dequantized weights, and
/// `xt · deqᵀ` in f32 (the product the kernels approximate).
fn quantized(wt: &Tensor, xt: &Tensor, dtype: GgmlDType) -> (Vec<u8>, Tensor, Vec<Vec<f32>>) {
    let q = QTensor::quantize(wt, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    let want = xt
        .matmul(&deq.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    (q.data().unwrap().to_vec(), deq, want)
}

/// Weights stacked into one matrix (fused Q, K, V) give, row for row and bit for bit, what
/// each weight gives alone, for every block type slm packs (the last part ending in rows
/// outside any eight-row group), and every packed byte of each part is released once.
#[test]
fn stacked_weights_match_each_weight_alone() {
    use std::sync::Mutex;
    let (cols, m) = (256, 5);
    let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
    for dtype in PACKED {
        let heights = heights(dtype);
        let ws: Vec<QuantWeight> = heights
            .iter()
            .map(|&rows| {
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                QuantWeight {
                    dtype,
                    rows,
                    cols,
                    data: q.data().unwrap().to_vec().into(),
                    origin: None,
                }
            })
            .collect();
        let refs: Vec<&QuantWeight> = ws.iter().collect();
        if KKind::of(dtype).is_some() && interleaved_isa().is_none() {
            // Without an interleaved kernel (no AVX2, or `SLM_KERNELS=rows`) k-quants stay
            // candle's, one weight at a time.
            assert!(QMatMul::stacked(&refs).is_none(), "{dtype:?}");
            continue;
        }
        let stacked = QMatMul::stacked(&refs).expect("slm's own kernels take these");
        let got = stacked.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let mut r0 = 0;
        for w in &ws {
            let alone = QMatMul::stacked(&[w]).unwrap();
            let want = alone.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for i in 0..m {
                for r in 0..w.rows {
                    assert_eq!(
                        got[i][r0 + r].to_bits(),
                        want[i][r].to_bits(),
                        "{dtype:?} token {i} row {}",
                        r0 + r
                    );
                }
            }
            r0 += w.rows;
        }
        assert_eq!(r0, got[0].len());
        if interleaved_isa().is_some() {
            // What the packing releases: each part's packed groups, each byte once.
            let seen = Mutex::new(vec![Vec::new(); ws.len()]);
            let release = |p: usize, a: usize, b: usize| seen.lock().unwrap()[p].push((a, b));
            let raws: Vec<&[u8]> = ws.iter().map(|w| &w.data[..]).collect();
            let row_bytes = ws[0].data.len() / ws[0].rows;
            let groups: Vec<usize> = ws.iter().map(|w| w.rows / ROWS).collect();
            let src = Groups::new(&raws, &groups, ROWS * row_bytes, &release);
            (0..src.count()).for_each(|g| src.done(g, g + 1));
            for (p, mut ranges) in seen.into_inner().unwrap().into_iter().enumerate() {
                ranges.sort();
                let mut at = 0;
                for (a, b) in ranges {
                    assert_eq!(a, at, "{dtype:?} part {p}: a gap or overlap");
                    at = b;
                }
                assert_eq!(at, groups[p] * ROWS * row_bytes, "{dtype:?} part {p}");
            }
        }
    }
}

/// A product loaded from the packed-weights cache is the one packed at the first load,
/// bit for bit, and maps its planes instead of repacking; an entry whose planes do not fit
/// the weight's shape is repacked, never used.
#[test]
fn cached_packings_give_the_same_products() {
    use crate::io::pack_cache::PackCache;
    use crate::io::Origin;
    let dir = std::env::temp_dir().join(format!("slm-qcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("model.gguf");
    std::fs::write(&src, b"source").unwrap();
    let (cols, m) = (256, 3);
    let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
    let planes_of = |q: &QMatMul| -> Vec<bool> {
        match q {
            QMatMul::Own(o) => {
                let mut v: Vec<bool> = o.packed.iter().flat_map(|p| p.planes_mapped()).collect();
                v.push(o.data.is_mapped());
                v
            }
            QMatMul::OwnK(p) => p.planes_mapped(),
            QMatMul::Candle(_) => Vec::new(),
        }
    };
    for dtype in PACKED {
        if KKind::of(dtype).is_some() && interleaved_isa().is_none() {
            continue;
        }
        let heights = heights(dtype);
        let raws: Vec<Vec<u8>> = heights
            .iter()
            .map(|&rows| {
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
                QTensor::quantize(&w, dtype)
                    .unwrap()
                    .data()
                    .unwrap()
                    .to_vec()
            })
            .collect();
        let weights = |cache: &std::sync::Arc<PackCache>| -> Vec<QuantWeight> {
            raws.iter()
                .zip(heights)
                .enumerate()
                .map(|(i, (raw, &rows))| QuantWeight {
                    dtype,
                    rows,
                    cols,
                    data: raw.clone().into(),
                    origin: Some(Origin {
                        cache: cache.clone(),
                        name: format!("w{i}"),
                    }),
                })
                .collect()
        };
        let layout = format!("{dtype:?}");
        let first = PackCache::in_dir(&dir, &src, &layout).unwrap();
        let ws = weights(&first);
        let refs: Vec<&QuantWeight> = ws.iter().collect();
        let packed = QMatMul::stacked(&refs).unwrap();
        let alone = QMatMul::stacked(&refs[..1]).unwrap();
        assert!(planes_of(&packed).iter().all(|m| !m), "{dtype:?}");
        let want = packed.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let want_alone = alone.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        first.commit().expect("cache written");

        let again = PackCache::in_dir(&dir, &src, &layout).unwrap();
        assert!(again.is_filled());
        let ws = weights(&again);
        let refs: Vec<&QuantWeight> = ws.iter().collect();
        let cached = QMatMul::stacked(&refs).unwrap();
        let mapped = planes_of(&cached);
        assert!(!mapped.is_empty() && mapped.iter().all(|m| *m), "{dtype:?}");
        let got = cached.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let got_alone = QMatMul::stacked(&refs[..1]).unwrap().forward(&x).unwrap();
        let bits =
            |v: &[Vec<f32>]| -> Vec<u32> { v.concat().iter().map(|f| f.to_bits()).collect() };
        assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        assert_eq!(
            bits(&got_alone.to_vec2::<f32>().unwrap()),
            bits(&want_alone)
        );

        // An entry whose first plane is a line longer than this shape's (the others, the
        // rows in the file's layout included, the right length): repacked, with the same
        // products.
        let bad = PackCache::in_dir(&dir, &src, &format!("{layout} bad")).unwrap();
        let lens: Vec<usize> = match &packed {
            QMatMul::Own(o) => o.planes().iter().map(|p| p.len()).collect(),
            QMatMul::OwnK(p) => p.planes().iter().map(|p| p.len()).collect(),
            QMatMul::Candle(_) => unreachable!("slm's kernels pack every type here"),
        };
        let junk: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![7u8; n + if i == 0 { 64 } else { 0 }])
            .collect();
        bad.put("w0+w1+w2", &junk.iter().map(|j| &j[..]).collect::<Vec<_>>());
        bad.commit().unwrap();
        let bad = PackCache::in_dir(&dir, &src, &format!("{layout} bad")).unwrap();
        let ws = weights(&bad);
        let refs: Vec<&QuantWeight> = ws.iter().collect();
        let repacked = QMatMul::stacked(&refs).unwrap();
        assert!(planes_of(&repacked).iter().all(|m| !m), "{dtype:?}");
        let got = repacked.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(bits(&got), bits(&want), "{dtype:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each kernel against the f32 product with candle's dequantized weights: the only
/// difference allowed is the 8-bit quantization of the activations.
#[test]
fn own_kernels_match_dequantized_matmul() {
    let (rows, cols, m) = (70, 256, 6);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
        .collect();
    let x: Vec<f32> = (0..m * cols)
        .map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0)
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let (raw, deq, want) = quantized(&wt, &xt, dtype);
        let kind = own_kind(&QuantWeight {
            dtype,
            rows,
            cols,
            data: Vec::new().into(),
            origin: None,
        })
        .unwrap();
        // The file's layout and every interleaved kernel the CPU runs.
        let mut outputs = Vec::new();
        for pack in [None, Some(Isa::Avx2), Some(Isa::Vnni)] {
            if pack.is_some_and(|i| !i.available()) {
                continue;
            }
            let own = OwnQ::build(kind, cols, &[&raw], pack, &|_, _, _| {});
            // 70 rows: packed, 8 interleaved groups and 6 rows in the file's layout.
            assert_eq!(own.packed_rows(), if pack.is_some() { 64 } else { 0 });
            check(&own, &raw, &x, m, &want, &deq);
            if pack.is_some() {
                let mut y = vec![0f32; m * rows];
                own.matmul(&x, m, &mut y);
                outputs.push((pack, y));
            }
        }
        same_bits_across_kernels(&outputs, &format!("{dtype:?}"));
    }
}

/// The instruction sets compute the same integers, so their results agree bit for bit.
fn same_bits_across_kernels(outputs: &[(Option<Isa>, Vec<f32>)], what: &str) {
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for (isa, y) in outputs.iter().skip(1) {
        assert_eq!(
            bits(y),
            bits(&outputs[0].1),
            "{what}: {isa:?} against {:?}",
            outputs[0].0
        );
    }
}

/// The k-quant kernel against candle's dequantized product (to the activations' 8-bit
/// rounding) and against the scalar reference in the kernel's own arithmetic, for 1 to 5
/// tokens (each token's results independent of the pass it shares).
#[test]
fn k_quant_kernel_matches_dequantized_matmul_and_reference() {
    use crate::nn::qpack_k::dot_scalar;
    let (rows, cols, m) = (72, 512, 5);
    // Rows of different magnitudes and signs, so sub-block scales and minimums vary.
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (0.05 + (r % 7) as f32 * 0.1);
            v + if c / 32 % 3 == 0 { 0.2 } else { -0.05 }
        })
        .collect();
    let x: Vec<f32> = (0..m * cols)
        .map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0)
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
    let mut outputs = Vec::new();
    for (dtype, isa) in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K]
        .into_iter()
        .flat_map(|d| [(d, Isa::Avx2), (d, Isa::Vnni)])
        .filter(|(_, isa)| isa.available())
    {
        let (raw, _, want) = quantized(&wt, &xt, dtype);
        // Loading takes slm's kernel for these wherever it packs weights.
        let loaded = QMatMul::new(QuantWeight {
            dtype,
            rows,
            cols,
            data: raw.clone().into(),
            origin: None,
        })
        .unwrap();
        assert_eq!(
            matches!(loaded, QMatMul::OwnK(_)),
            interleaved_isa().is_some(),
            "{dtype:?}"
        );
        let kind = KKind::of(dtype).unwrap();
        let src = Groups::new(
            &[&raw],
            &[rows / ROWS],
            ROWS * cols / QK_K * kind.block_bytes(),
            &|_, _, _| {},
        );
        let packed = KPacked::new(kind, &src, cols / QK_K, isa);
        assert_eq!((packed.rows(), packed.cols()), (rows, cols));
        let own = QMatMul::OwnK(packed);
        let full = own.forward(&xt).unwrap().flatten_all().unwrap();
        outputs.push((dtype, isa, full.to_vec1::<f32>().unwrap()));
        let bb = kind.block_bytes() * cols / QK_K;
        // candle's k-quant product (its activations quantized per 256 as well).
        let theirs = CandleQMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap())
            .unwrap()
            .forward(&xt)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let alone: Vec<Vec<f32>> = (0..m)
            .map(|i| {
                let y = own.forward(&xt.narrow(0, i, 1).unwrap()).unwrap();
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        for mm in 1..=m {
            let got = own.forward(&xt.narrow(0, 0, mm).unwrap()).unwrap();
            let got = got.to_vec2::<f32>().unwrap();
            for i in 0..mm {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got[i]), bits(&alone[i]), "{dtype:?} m={mm} token {i}");
                let xq = quantize_q8k(&x[i * cols..(i + 1) * cols]);
                for r in 0..rows {
                    let (g, w) = (got[i][r], want[i][r]);
                    assert!(
                        (g - w).abs() < 0.02 * (1.0 + w.abs()),
                        "{dtype:?} [{i},{r}]: {g} vs dequantized {w}"
                    );
                    let c = theirs[i][r];
                    assert!(
                        (g - c).abs() < 1e-4 * (1.0 + c.abs()),
                        "{dtype:?} [{i},{r}]: {g} vs candle's {c}"
                    );
                    let reference = dot_scalar(kind, &raw[r * bb..(r + 1) * bb], &xq);
                    assert!(
                        (g - reference).abs() < 1e-5 * (1.0 + reference.abs()),
                        "{dtype:?} m={mm} [{i},{r}]: {g} vs reference {reference}"
                    );
                }
            }
        }
    }
    assert!(!outputs.is_empty() || !Isa::Avx2.available());
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let same: Vec<_> = outputs
            .iter()
            .filter(|o| o.0 == dtype)
            .map(|o| (Some(o.1), o.2.clone()))
            .collect();
        same_bits_across_kernels(&same, &format!("{dtype:?}"));
    }
}

fn check(own: &OwnQ, raw: &[u8], x: &[f32], m: usize, want: &[Vec<f32>], deq: &Tensor) {
    let (rows, cols, dtype) = (own.rows, own.cols, own.kind);
    let mut got = vec![0f32; m * rows];
    own.matmul(x, m, &mut got);
    let bb = own.kind.block_bytes() * cols / QK;
    for i in 0..m {
        for r in 0..rows {
            let (g, w) = (got[i * rows + r], want[i][r]);
            assert!(
                (g - w).abs() < 0.02 * (1.0 + w.abs()),
                "{dtype:?} [{i},{r}]: {g} vs {w}"
            );
        }
    }
    // Every token count the integer kernels take (1 to 5: the four-token pass and each
    // remainder) against the scalar reference on the file's rows.
    let xs: Vec<Vec<BlockQ8>> = (0..m)
        .map(|i| quantize_q8(&x[i * cols..(i + 1) * cols]))
        .collect();
    let mut alone = vec![vec![0f32; rows]; m];
    for (i, a) in alone.iter_mut().enumerate() {
        own.matmul(&x[i * cols..(i + 1) * cols], 1, a);
    }
    for mm in 1..=5 {
        let mut got = vec![0f32; mm * rows];
        own.matmul(&x[..mm * cols], mm, &mut got);
        for i in 0..mm {
            // Each token's results do not depend on what it shares the pass with.
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got[i * rows..(i + 1) * rows]), bits(&alone[i]));
            for r in 0..rows {
                let want = dot_scalar(own.kind, &raw[r * bb..(r + 1) * bb], &xs[i]);
                let g = got[i * rows + r];
                assert!(
                    (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{dtype:?} m={mm} [{i},{r}]: {g} vs {want}"
                );
            }
        }
    }
    // The repacked rows dequantize to the file's values bit for bit.
    let mut a = vec![0f32; cols];
    let mut b = vec![0f32; cols];
    for r in 0..rows {
        own.dequantize_rows(r, r + 1, &mut a);
        for (blk, o) in raw[r * bb..(r + 1) * bb]
            .chunks_exact(own.kind.block_bytes())
            .zip(b.chunks_exact_mut(QK))
        {
            own.kind.dequantize(blk, o);
        }
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{dtype:?} row {r}"
        );
    }
    // From GEMM_FROM_TOKENS rows on, the file's layout takes the dequantize + f32 GEMM
    // path: no activation quantization, so it agrees with the dequantized product to f32
    // rounding. Packed weights stay on the integer kernel.
    let mb = GEMM_FROM_TOKENS + 3;
    let xb: Vec<f32> = (0..mb * cols)
        .map(|i| ((i * 31 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let want_b = Tensor::from_vec(xb.clone(), (mb, cols), &Device::Cpu)
        .unwrap()
        .matmul(&deq.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut got_b = vec![0f32; mb * rows];
    own.matmul(&xb, mb, &mut got_b);
    for i in 0..mb {
        let xq = quantize_q8(&xb[i * cols..(i + 1) * cols]);
        for r in 0..rows {
            let g = got_b[i * rows + r];
            if own.packed.is_some() {
                let want = dot_scalar(own.kind, &raw[r * bb..(r + 1) * bb], &xq);
                assert!((g - want).abs() < 1e-5 * (1.0 + want.abs()));
                continue;
            }
            let w = want_b[i][r];
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{dtype:?} gemm [{i},{r}]: {g} vs {w}"
            );
        }
    }
    // Four tokens on one unpacked row: bit for bit each token alone, and the scalar
    // reference to rounding.
    let xs4: Vec<Vec<BlockQ8>> = (0..4)
        .map(|i| quantize_q8(&x[i * cols..(i + 1) * cols]))
        .collect();
    for r in 0..rows {
        let wr = &raw[r * bb..(r + 1) * bb];
        let got = dot_xn(own.kind, wr, [&xs4[0], &xs4[1], &xs4[2], &xs4[3]]);
        let two = dot_xn(own.kind, wr, [&xs4[0], &xs4[1]]);
        let three = dot_xn(own.kind, wr, [&xs4[0], &xs4[1], &xs4[2]]);
        assert_eq!(two.map(f32::to_bits), [got[0], got[1]].map(f32::to_bits));
        assert_eq!(
            three.map(f32::to_bits),
            [got[0], got[1], got[2]].map(f32::to_bits)
        );
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g.to_bits(),
                dot(own.kind, wr, &xs4[i]).to_bits(),
                "{dtype:?} row {r} token {i}"
            );
            let want = dot_scalar(own.kind, wr, &xs4[i]);
            assert!(
                (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{dtype:?} x4 row {r}: {g} vs {want}"
            );
        }
    }
    let xq = &xs[0];
    for r in 0..rows {
        let wr = &raw[r * bb..(r + 1) * bb];
        let (a, b) = (dot(own.kind, wr, xq), dot_scalar(own.kind, wr, xq));
        assert!(
            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
            "{dtype:?} row {r}: {a} vs {b}"
        );
    }
}
