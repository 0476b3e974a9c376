//! Attention over Q, K and V read in place: encoders' bidirectional attention straight from
//! the fused projection, decoders' causal attention over a KV cache (query blocks for a prompt,
//! key tiles for a decoded token), and cross-attention over an encoder's keys. One head at a
//! time through [`head_attention`]; the pool takes heads (and query blocks) as tasks.

use super::kernels::softmax_in_place;
use super::pool::{self, SharedMut};

/// One head's attention: `S = scale·QKᵀ` (`t × nk`), a softmax of each row `i` over the keys
/// `keys(i)` only (the rest get probability 0), then `O = PV` written to `out` with row stride
/// `out_rs`. Q and V are read in place with row strides `q_rs` and `v_rs`, K where `keys_at`
/// says.
///
/// # Safety
/// Every pointer must address `t` (Q, out) or `nk` (K, V) rows of `hd` floats at the given
/// strides (K: tiles holding those keys), and no other thread may write the `out` rows' `hd`
/// columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn head_attention(
    (q, q_rs): (*const f32, usize),
    keys_at: KeysAt,
    (v, v_rs): (*const f32, usize),
    (out, out_rs): (*mut f32, usize),
    t: usize,
    nk: usize,
    hd: usize,
    sc: Scores,
    bias: Option<HeadBias>,
    keys: impl Fn(usize) -> std::ops::Range<usize>,
) {
    // Each thread's score rows are kept from call to call: a decoded token's heads allocate
    // nothing.
    // SAFETY (the block): the pointers are this function's, under its contract.
    SCORES.with_borrow_mut(|scores| unsafe {
        scores.clear();
        scores.resize(t * nk, 0.0);
        let decoded_from_tiles = t == 1 && matches!(keys_at, KeysAt::Tiles(..));
        match keys_at {
            KeysAt::Tiles(tiles, k0) if t == 1 => {
                tile_scores(q, tiles, k0, nk, hd, sc.scale, scores)
            }
            // A prompt's rows: the GEMM wants the keys as rows (it packs them anyway).
            KeysAt::Tiles(tiles, k0) => {
                let rows = untile(tiles, k0, nk, hd);
                qk_gemm((q, q_rs), (rows.as_ptr(), hd), t, nk, hd, sc.scale, scores)
            }
            KeysAt::Rows(k, k_rs) => qk_gemm((q, q_rs), (k, k_rs), t, nk, hd, sc.scale, scores),
        }
        for (i, row) in scores.chunks_mut(nk).enumerate() {
            let r = keys(i);
            row[..r.start].fill(0.0);
            row[r.end..].fill(0.0);
            if let Some(b) = &bias {
                b.add(&mut row[r.clone()], r.start, i);
            }
            if let Some(cap) = sc.softcap {
                row[r.clone()]
                    .iter_mut()
                    .for_each(|s| *s = cap * (*s / cap).tanh());
            }
            softmax_in_place(&mut row[r]);
        }
        if decoded_from_tiles {
            return row_values(scores, keys(0), (v, v_rs), hd, out);
        }
        gemm::gemm(
            t,
            hd,
            nk,
            out,
            1,
            out_rs as isize,
            false,
            scores.as_ptr(),
            1,
            nk as isize,
            v,
            1,
            v_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    })
}

thread_local! {
    /// Each thread's scores for [`head_attention`].
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `scores = scale·QKᵀ` (`t × nk`) with K as rows of `hd` at stride `k_rs`.
///
/// # Safety
/// As [`head_attention`].
#[allow(clippy::too_many_arguments)]
unsafe fn qk_gemm(
    (q, q_rs): (*const f32, usize),
    (k, k_rs): (*const f32, usize),
    t: usize,
    nk: usize,
    hd: usize,
    scale: f32,
    scores: &mut [f32],
) {
    gemm::gemm(
        t,
        nk,
        hd,
        scores.as_mut_ptr(),
        1,
        nk as isize,
        false,
        q,
        1,
        q_rs as isize,
        k,
        k_rs as isize,
        1,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `out[j] = scale · q·k_(k0 + j)` for `nk` keys stored in tiles from `tiles` (one head).
///
/// # Safety
/// `q` must hold `hd` values and `tiles` every tile up to the one holding key `k0 + nk - 1`.
unsafe fn tile_scores(
    q: *const f32,
    tiles: *const f32,
    k0: usize,
    nk: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    const L: usize = KEY_TILE;
    let q = std::slice::from_raw_parts(q, hd);
    for tile in k0 / L..(k0 + nk).div_ceil(L) {
        let base = tiles.add(tile * L * hd);
        // Four chains of multiply-adds over the dimensions, so that their latency overlaps.
        let mut acc = [[0f32; L]; 4];
        for (d, &qd) in q.iter().enumerate() {
            let keys = &*(base.add(d * L) as *const [f32; L]);
            let (qd, a) = (qd * scale, &mut acc[d % 4]);
            for l in 0..L {
                a[l] = qd.mul_add(keys[l], a[l]);
            }
        }
        let acc: [f32; L] =
            std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let (a, b) = ((tile * L).max(k0), ((tile + 1) * L).min(k0 + nk));
        out[a - k0..b - k0].copy_from_slice(&acc[a - tile * L..b - tile * L]);
    }
}

/// Keys `k0..k0 + nk` of one head's tiles as rows of `hd`.
///
/// # Safety
/// As [`tile_scores`].
unsafe fn untile(tiles: *const f32, k0: usize, nk: usize, hd: usize) -> Vec<f32> {
    const L: usize = KEY_TILE;
    let mut rows = vec![0f32; nk * hd];
    for (j, row) in rows.chunks_exact_mut(hd).enumerate() {
        let key = k0 + j;
        let base = tiles.add(key / L * L * hd + key % L);
        for (d, x) in row.iter_mut().enumerate() {
            *x = *base.add(d * L);
        }
    }
    rows
}

/// `out = Σ_j p_j v_j` over the keys `keys` (the others have probability 0): a whole row of
/// 64, 128 or 256 columns at a time, so that each V row is read once with the sums in
/// registers (Gemma 3's 256-wide heads in four 64-column passes read V four times); 64 at a
/// time for other widths.
///
/// # Safety
/// As [`head_attention`] for one query row.
unsafe fn row_values(
    p: &[f32],
    keys: std::ops::Range<usize>,
    v: (*const f32, usize),
    hd: usize,
    out: *mut f32,
) {
    let out = std::slice::from_raw_parts_mut(out, hd);
    match hd {
        256 => row_values_by::<256>(p, keys, v, 0, out),
        128 => row_values_by::<128>(p, keys, v, 0, out),
        _ => {
            let mut c0 = 0;
            while c0 + 64 <= hd {
                row_values_by::<64>(p, keys.clone(), v, c0, &mut out[c0..c0 + 64]);
                c0 += 64;
            }
            let (v, v_rs) = v;
            for (c, o) in out.iter_mut().enumerate().skip(c0) {
                *o = keys
                    .clone()
                    .fold(0f32, |a, j| p[j].mul_add(*v.add(j * v_rs + c), a));
            }
        }
    }
}

/// Columns `c0..c0 + C` of [`row_values`] into `out` (`C` values).
///
/// # Safety
/// As [`head_attention`] for one query row.
unsafe fn row_values_by<const C: usize>(
    p: &[f32],
    keys: std::ops::Range<usize>,
    (v, v_rs): (*const f32, usize),
    c0: usize,
    out: &mut [f32],
) {
    let mut acc = [0f32; C];
    for j in keys {
        let vr = &*(v.add(j * v_rs + c0) as *const [f32; C]);
        for (a, x) in acc.iter_mut().zip(vr) {
            *a = p[j].mul_add(*x, *a);
        }
    }
    out.copy_from_slice(&acc);
}

/// Bidirectional attention straight from a fused projection `qkv` (`[b, t, (nh + 2·nkv)·hd]`,
/// Q then K then V): row `i` of sequence `s` attends to keys `0..lengths[s]`, so padding is
/// excluded exactly as transformers' additive mask of the dtype minimum does. Returns
/// `[b, t, nh·hd]` with heads side by side, ready for the output projection. One task per
/// (sequence, head); no head is ever copied out of the projection.
#[allow(clippy::too_many_arguments)]
pub fn bidirectional_attention(
    qkv: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    lengths: &[usize],
    sc: Scores,
    bias: Option<RelBias>,
) -> Vec<f32> {
    let b = lengths.len();
    assert_eq!(qkv.len(), b * t * (nh + 2 * nkv) * hd);
    let width = (nh + 2 * nkv) * hd;
    let hidden = nh * hd;
    let groups = nh / nkv;
    let mut y = vec![0f32; b * t * hidden];
    let out = SharedMut(y.as_mut_ptr());
    pool::for_each(b * nh, |task| {
        let (s, h) = (task / nh, task % nh);
        let kvh = h / groups;
        let len = lengths[s].clamp(1, t);
        let base = s * t * width;
        // SAFETY: rows are `width` apart inside `qkv` (length checked above); this task alone
        // writes head h's columns of rows s·t.. of `y` (b·t × hidden).
        unsafe {
            head_attention(
                (qkv[base + h * hd..].as_ptr(), width),
                KeysAt::Rows(qkv[base + hidden + kvh * hd..].as_ptr(), width),
                (qkv[base + hidden + (nkv + kvh) * hd..].as_ptr(), width),
                (out.ptr().add(s * t * hidden + h * hd), hidden),
                t,
                len,
                hd,
                sc,
                bias.map(|b| b.head(h, 0, 0)),
                |_| 0..len,
            )
        }
    });
    y
}

/// How a head's attention scores are formed from `q·kᵀ`, and which keys a query sees.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub scale: f32,
    /// `cap·tanh(s/cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// Sliding window: a query sees this many positions, itself included.
    pub window: Option<usize>,
}

impl Scores {
    /// `q·kᵀ/√hd` over every earlier key.
    pub fn standard(hd: usize) -> Self {
        Scores {
            scale: 1.0 / (hd as f32).sqrt(),
            softcap: None,
            window: None,
        }
    }
}

/// T5's learned relative position bias as the kernels read it: head `h` adds
/// `table[h·(2d+1) + clamp(key − query, −d, d) + d]` to each score, `d` being the distance from
/// which every bias is the same (T5's `max_distance`: its buckets saturate there).
#[derive(Clone, Copy)]
pub struct RelBias<'a> {
    pub table: &'a [f32],
    pub d: usize,
}

impl<'a> RelBias<'a> {
    /// Head `h`'s biases for queries whose first row sits at position `q0`, against keys
    /// whose first sits at `k0`.
    fn head(&self, h: usize, q0: usize, k0: usize) -> HeadBias<'a> {
        let n = 2 * self.d + 1;
        HeadBias {
            row: &self.table[h * n..(h + 1) * n],
            d: self.d as isize,
            q0,
            k0,
        }
    }
}

/// One head's relative biases (see [`RelBias`]).
struct HeadBias<'a> {
    row: &'a [f32],
    d: isize,
    q0: usize,
    k0: usize,
}

impl HeadBias<'_> {
    /// Adds the biases of keys `k0..k0 + scores.len()` (counted from the view's first key) to
    /// query row `i`'s scores.
    fn add(&self, scores: &mut [f32], k0: usize, i: usize) {
        let q = (self.q0 + i) as isize;
        for (j, s) in scores.iter_mut().enumerate() {
            let r = ((self.k0 + k0 + j) as isize - q).clamp(-self.d, self.d);
            *s += self.row[(r + self.d) as usize];
        }
    }
}

/// Keys per tile of a KV cache's K (see [`KeyView`]).
pub const KEY_TILE: usize = 16;

/// A KV cache as the attention kernel reads it: per head `cap` positions of `hd` values, the
/// first `len` filled. V is a row per position. K is a row per position too, or (`k_tiled`)
/// tiles of [`KEY_TILE`] positions stored by dimension (`[heads, cap / 16, hd, 16]`, `cap` a
/// multiple of 16): a decoded token's scores for a tile are then one register of sums, one
/// broadcast multiply-add per dimension over one sequential read, with no sum across lanes
/// per key (SmolLM2's heads alone, as a row per dimension: 3.8 -> 1.4 µs at 256 keys, 17.0 ->
/// 5.7 at 1024; that layout read each head as 64 streams and was slower end to end).
pub struct KeyView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub cap: usize,
    pub len: usize,
    pub k_tiled: bool,
}

/// Where one head's keys start: rows (pointer at the first key, row stride), or tiles (the
/// head's first tile, and the first key wanted).
#[derive(Clone, Copy)]
enum KeysAt {
    Rows(*const f32, usize),
    Tiles(*const f32, usize),
}

impl KeyView<'_> {
    fn keys_of(&self, h: usize, k0: usize, hd: usize) -> KeysAt {
        if self.k_tiled {
            KeysAt::Tiles(self.k[h * self.cap * hd..].as_ptr(), k0)
        } else {
            KeysAt::Rows(self.k[(h * self.cap + k0) * hd..].as_ptr(), hd)
        }
    }
}

/// Query rows per attention task of a long prompt.
const QUERY_BLOCK: usize = 64;

/// Causal attention of `t` new queries at positions `pos..pos+t` (`q`: `[nh, t, hd]`) over the
/// cached keys, with an optional sliding window. Returns `[t, nh·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    pos: usize,
    sc: Scores,
    bias: Option<RelBias>,
) -> Vec<f32> {
    let mut y = vec![0f32; q.len()];
    causal_attention_into(q, kv, nh, nkv, hd, pos, sc, bias, &mut y);
    y
}

/// [`causal_attention`] into `y` (`[t, nh·hd]`, overwritten).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_into(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    pos: usize,
    sc: Scores,
    bias: Option<RelBias>,
    y: &mut [f32],
) {
    let t = q.len() / (nh * hd);
    assert!(pos + t <= kv.len);
    let keys = |i: usize| {
        let qpos = pos + i;
        let lo = sc.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        lo..qpos + 1
    };
    cached_attention(q, kv, nh, nkv, hd, sc, bias.map(|b| (b, pos)), keys, y)
}

/// Cross-attention of `t` decoder queries (`[nh, t, hd]`) over every key of the encoder's
/// (`kv`, computed once per source). Returns `[t, nh·hd]`.
pub fn cross_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    sc: Scores,
) -> Vec<f32> {
    let len = kv.len;
    let mut y = vec![0f32; q.len()];
    cached_attention(q, kv, nh, nkv, hd, sc, None, |_| 0..len, &mut y);
    y
}

/// Each head of `q` over the keys `keys(i)` of its K/V head in `kv`, rows `i` of query
/// positions `q0 + i` when biased.
#[allow(clippy::too_many_arguments)]
fn cached_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    sc: Scores,
    bias: Option<(RelBias, usize)>,
    keys: impl Fn(usize) -> std::ops::Range<usize> + Sync,
    y: &mut [f32],
) {
    let t = q.len() / (nh * hd);
    assert_eq!(q.len(), nh * t * hd);
    assert!(kv.k.len() == nkv * kv.cap * hd && kv.v.len() == kv.k.len());
    assert!(kv.len <= kv.cap);
    let hidden = nh * hd;
    let groups = nh / nkv;
    assert_eq!(y.len(), t * hidden);
    y.fill(0.0);
    let out = SharedMut(y.as_mut_ptr());
    // A long prompt's queries go in blocks, so that a causal block computes the scores of the
    // keys it can see and no more (5/8 of the full square for four blocks, not all of it), and
    // the pool gets more tasks than heads to balance.
    let block = if t >= 2 * QUERY_BLOCK {
        QUERY_BLOCK
    } else {
        t.max(1)
    };
    let blocks = t.div_ceil(block);
    let run = |task: usize| {
        let (h, i0) = (task / blocks, task % blocks * block);
        let i1 = (i0 + block).min(t);
        let kvh = h / groups;
        // Keys' ranges only move forward with the query (causal, sliding window, or all).
        let (k0, k1) = (keys(i0).start, keys(i1 - 1).end);
        // SAFETY: q is [nh, t, hd] and each head of the cache holds `cap >= len >= k1` rows of
        // hd (checked above); this call alone writes rows i0..i1 of head h's columns of `y`
        // (t × hidden).
        unsafe {
            head_attention(
                (q[(h * t + i0) * hd..].as_ptr(), hd),
                kv.keys_of(kvh, k0, hd),
                (kv.v[(kvh * kv.cap + k0) * hd..].as_ptr(), hd),
                (out.ptr().add(i0 * hidden + h * hd), hidden),
                i1 - i0,
                k1 - k0,
                hd,
                sc,
                bias.map(|(b, q0)| b.head(h, q0 + i0, k0)),
                |i| {
                    let r = keys(i0 + i);
                    r.start - k0..r.end - k0
                },
            )
        }
    };
    // A decoded token's heads go to the pool from 256 keys on: reading the cache is then what
    // attention waits for, and two threads read it faster (SmolLM2 at 1024 keys: decode
    // 97-108 -> 116-125 tok/s); below that, handing out the heads costs more than it saves.
    if t * kv.len >= 256 {
        pool::for_each(nh * blocks, run);
    } else {
        (0..nh * blocks).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive softmax, short (one task per head) and long (query blocks, each over
    /// the keys it can see), with and without a sliding window and relative position biases.
    #[test]
    fn causal_attention_matches_a_naive_softmax() {
        // Two query heads per K/V head, and four on one (Gemma 3's shape).
        // Head widths of 64 and more take the decoded token's register sums of whole rows.
        for (nh, nkv, hd) in [
            (4, 2, 3),
            (4, 1, 3),
            (2, 1, 64),
            (2, 1, 128),
            (2, 1, 256),
            (2, 1, 72),
        ] {
            causal_attention_case(nh, nkv, hd);
        }
    }

    fn causal_attention_case(nh: usize, nkv: usize, hd: usize) {
        let f = |n: usize, m: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * m % 17) as f32 - 8.0) / 7.0).collect()
        };
        let d = 5;
        let table = f(nh * (2 * d + 1), 13);
        // Decoded tokens too (t = 1), alone and on the pool (from 256 keys); the cache holds
        // more rows than are filled, as it does while decoding.
        for (pos, t) in [(2, 3), (7, 150), (9, 1), (300, 1)] {
            let total = pos + t;
            let cap = (total + 3usize).next_multiple_of(KEY_TILE);
            let (q, k, v) = (
                f(nh * t * hd, 5),
                f(nkv * cap * hd, 3),
                f(nkv * cap * hd, 11),
            );
            // The same keys in tiles, as the KV cache holds them.
            let mut tiled = vec![0f32; k.len()];
            for (h, j, d) in
                (0..nkv).flat_map(|h| (0..cap).flat_map(move |j| (0..hd).map(move |d| (h, j, d))))
            {
                let at = h * cap * hd + j / KEY_TILE * KEY_TILE * hd + d * KEY_TILE + j % KEY_TILE;
                tiled[at] = k[(h * cap + j) * hd + d];
            }
            let cases = [None, Some(2), Some(70)]
                .into_iter()
                .flat_map(|w| [(w, false), (w, true)])
                .flat_map(|(w, b)| [(w, b, false), (w, b, true)]);
            for (window, biased, tiles) in cases {
                let kv = KeyView {
                    k: if tiles { &tiled } else { &k },
                    v: &v,
                    cap,
                    len: total,
                    k_tiled: tiles,
                };
                let bias = biased.then_some(RelBias { table: &table, d });
                let y = causal_attention(
                    &q,
                    kv,
                    nh,
                    nkv,
                    hd,
                    pos,
                    Scores {
                        window,
                        ..Scores::standard(hd)
                    },
                    bias,
                );
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    for i in 0..t {
                        let qp = pos + i;
                        let lo = window.map_or(0, |w| (qp + 1).saturating_sub(w));
                        let s: Vec<f32> = (lo..=qp)
                            .map(|j| {
                                let dot = (0..hd)
                                    .map(|c| q[(h * t + i) * hd + c] * k[(kvh * cap + j) * hd + c])
                                    .sum::<f32>()
                                    / (hd as f32).sqrt();
                                let r = (j as isize - qp as isize).clamp(-5, 5) + 5;
                                dot + if biased {
                                    table[h * (2 * d + 1) + r as usize]
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f32::MIN, f32::max);
                        let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                        for c in 0..hd {
                            let want: f32 = (lo..=qp)
                                .map(|j| (s[j - lo] - m).exp() / z * v[(kvh * cap + j) * hd + c])
                                .sum();
                            let got = y[i * nh * hd + h * hd + c];
                            assert!(
                                (got - want).abs() < 1e-5,
                                "t {t} {window:?} bias {biased} tiles {tiles} h{h} i{i} c{c}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_ignores_padded_keys() {
        // One head, hd 2, a sequence of length 2 padded to 3: the padding row's K/V are huge
        // and must not change the real rows.
        let (t, hd) = (3, 2);
        let mut qkv = vec![
            1.0, 0.0, 1.0, 0.0, 1.0, 2.0, //
            0.0, 1.0, 0.0, 1.0, 3.0, 4.0, //
            0.0, 0.0, 9e3, 9e3, 9e3, 9e3,
        ];
        let y = bidirectional_attention(&qkv, t, 1, 1, hd, &[2], Scores::standard(hd), None);
        let s = 1.0 / 2f32.sqrt();
        let (e1, e0) = (s.exp(), 1.0f32);
        let p = e1 / (e1 + e0);
        assert!((y[0] - (p * 1.0 + (1.0 - p) * 3.0)).abs() < 1e-5);
        assert!((y[1] - (p * 2.0 + (1.0 - p) * 4.0)).abs() < 1e-5);
        qkv[14] = -5.0;
        assert_eq!(
            bidirectional_attention(&qkv, t, 1, 1, hd, &[2], Scores::standard(hd), None)[..4],
            y[..4]
        );
    }
}
