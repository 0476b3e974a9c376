//! Several sequences in one forward pass (`CausalLM::forward_batch`, what `slm serve` decodes
//! with) give each sequence the logits it gets alone: on the tiny fixtures (learned positions,
//! RoPE, Gemma 2's sliding window shorter than the prompts and soft-capping) and on the real
//! quantized SmolLM2, bit for bit.

use crate::common;

use std::path::Path;

use slm::models::{load_causal, CausalLM, ComputeDtype, SeqCache};

/// Logits of the last position of `ids` run alone from an empty cache, then of each greedy
/// step, for `steps` steps.
fn alone(m: &mut dyn CausalLM, ids: &[u32], steps: usize) -> Vec<Vec<f32>> {
    m.clear_cache();
    let mut out = vec![m
        .forward(ids, 0, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()];
    for pos in ids.len()..ids.len() + steps {
        let next = argmax(out.last().unwrap());
        let l = m.forward(&[next], pos, false).unwrap();
        out.push(l.flatten_all().unwrap().to_vec1().unwrap());
    }
    out
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: logits differ by {worst} (tolerance {tol})"
    );
}

pub fn check(path: &Path, prompts: &[Vec<u32>], tol: f32) {
    let mut loaded = load_causal(path, ComputeDtype::Auto).unwrap();
    let m = loaded.model.as_mut();
    let steps = 6;
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| alone(m, p, steps)).collect();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| m.new_cache()).collect();
    // The first prompt runs alone; the others join it in one pass, as a server admits requests
    // between decode steps, so one batch mixes a decode row with whole prompts.
    let first = m
        .forward_batch(&mut [(&mut caches[0], prompts[0].as_slice())])
        .unwrap();
    close(
        &first.flatten_all().unwrap().to_vec1().unwrap(),
        &want[0][0],
        tol,
        "alone",
    );
    let mut next = vec![argmax(&want[0][0])];
    let mut step = vec![1usize];
    {
        let (head, rest) = caches.split_at_mut(1);
        let mut seqs: Vec<(&mut SeqCache, &[u32])> = vec![(&mut head[0], &next[..1])];
        for (c, p) in rest.iter_mut().zip(&prompts[1..]) {
            seqs.push((c, p.as_slice()));
        }
        let y = m
            .forward_batch(&mut seqs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y.len(), prompts.len());
        close(&y[0], &want[0][1], tol, "sequence 0, step 1 beside prompts");
        for (i, row) in y.iter().enumerate().skip(1) {
            close(
                row,
                &want[i][0],
                tol,
                &format!("prompt {i} beside a decode row"),
            );
        }
        next = y.iter().map(|r| argmax(r)).collect();
        step = (0..prompts.len())
            .map(|i| usize::from(i == 0) + 1)
            .collect();
    }
    // Then every sequence decodes one token per pass, all in the same pass.
    while step.iter().all(|&s| s <= steps) {
        let mut seqs: Vec<(&mut SeqCache, &[u32])> = caches
            .iter_mut()
            .zip(&next)
            .map(|(c, id)| (c, std::slice::from_ref(id)))
            .collect();
        let y = m
            .forward_batch(&mut seqs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in y.iter().enumerate() {
            close(
                row,
                &want[i][step[i]],
                tol,
                &format!("sequence {i}, step {}", step[i]),
            );
            assert_eq!(
                argmax(row),
                argmax(&want[i][step[i]]),
                "greedy token of sequence {i}"
            );
        }
        next = y.iter().map(|r| argmax(r)).collect();
        step.iter_mut().for_each(|s| *s += 1);
    }
    // A cache cut back to a shared prefix continues as if only the prefix had been run.
    let p = &prompts[1];
    let keep = p.len() / 2;
    caches[1].truncate(keep);
    let y = m
        .forward_batch(&mut [(&mut caches[1], &p[keep..])])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    close(&y, &want[1][0], tol, "after truncating to a prefix");
}

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let p = |n: usize, s: u32| (0..n as u32).map(|i| (i * 7 + s) % vocab).collect();
    vec![p(5, 3), p(11, 1), p(2, 9)]
}

#[test]
fn fixtures_batched_equal_alone() {
    for family in ["gpt2", "llama", "qwen2", "phi3", "gemma2", "gemma3"] {
        let dir = common::fixtures().join(family).join("safetensors");
        check(&dir, &prompts(90), 1e-5);
    }
}

/// Quantized weights under `uniform_rows` rows per pass: bit for bit what each sequence gets
/// alone, which is what lets the server promise concurrent answers equal to lone ones.
#[test]
fn smollm2_q4_1_batched_equal_alone_bit_for_bit() {
    let prompts = vec![
        vec![1, 9690, 198, 2683, 359, 253, 5356, 5646],
        vec![1, 504, 3458, 282, 4649, 314],
        vec![1, 2],
        vec![1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    ];
    let rows: usize = prompts.iter().map(Vec::len).sum::<usize>() + 1;
    let m = load_causal(&common::smollm2_gguf(), ComputeDtype::Auto).unwrap();
    assert!(
        rows < m.model.uniform_rows(),
        "the test's batch must stay under the bound"
    );
    check(&common::smollm2_gguf(), &prompts, 0.0);
}

/// Heap allocations the calling thread makes for each of `steps` greedy tokens decoded after
/// `prompt` and two warm-up tokens (a growing KV cache or score buffer reallocates now and
/// then, by doubling: the positions here cross no doubling).
pub fn decode_allocations(m: &mut dyn CausalLM, prompt: &[u32], steps: usize) -> Vec<usize> {
    m.clear_cache();
    let logits = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut next = argmax(&logits(m.forward(prompt, 0, false).unwrap()));
    let mut made = Vec::new();
    for (i, pos) in (prompt.len()..).take(2 + steps).enumerate() {
        let before = crate::allocations::made();
        let y = m.forward(&[next], pos, false).unwrap();
        if i >= 2 {
            made.push(crate::allocations::made() - before);
        }
        next = argmax(&logits(y));
    }
    made
}

/// A decoded token runs over buffers kept from the token before: the only allocations left
/// are the logits tensor handed back (3,127 a token when every op made a candle tensor).
#[test]
fn a_decoded_token_allocates_only_its_logits() {
    let prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646];
    for dtype in [ComputeDtype::Auto, ComputeDtype::F32] {
        let mut m = load_causal(&common::smollm2_gguf(), dtype).unwrap();
        let made = decode_allocations(m.model.as_mut(), &prompt, 4);
        assert!(
            made.iter().all(|&n| n <= 8),
            "{dtype:?}: allocations per decoded token {made:?}"
        );
    }
}
