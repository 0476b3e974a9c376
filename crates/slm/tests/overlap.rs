//! BLEU and chrF against sacrebleu, ROUGE against rouge-score (with NLTK's Porter stemmer) on
//! recorded hypothesis/reference sets (tools/make_fixtures.py overlap).

use slm::eval::overlap;

use crate::common::{fixtures, read_json};

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bleu_chrf_and_rouge_equal_sacrebleu_and_rouge_score() {
    let f = read_json(fixtures().join("overlap.json"));
    let (hyps, refs) = (strings(&f["hyps"]), strings(&f["refs"]));
    let (h, r): (Vec<&str>, Vec<&str>) = (
        hyps.iter().map(String::as_str).collect(),
        refs.iter().map(String::as_str).collect(),
    );
    let close = |a: f64, b: &serde_json::Value, what: &str| {
        let b = b.as_f64().unwrap();
        assert!((a - b).abs() < 1e-9, "{what}: {a} vs sacrebleu's {b}");
    };
    let b = overlap::bleu(&h, &r);
    close(b.score, &f["bleu"], "BLEU");
    close(b.brevity_penalty, &f["bleu_bp"], "brevity penalty");
    for (i, p) in b.precisions.iter().enumerate() {
        close(*p, &f["bleu_precisions"][i], "precision");
    }
    close(overlap::chrf(&h, &r), &f["chrf"], "chrF");
    let n = h.len();
    for (name, range) in [("first10", 0..10), ("hand", n - 5..n)] {
        let s = &f["subsets"][name];
        close(
            overlap::bleu(&h[range.clone()], &r[range.clone()]).score,
            &s["bleu"],
            name,
        );
        close(
            overlap::chrf(&h[range.clone()], &r[range]),
            &s["chrf"],
            name,
        );
    }
    for (i, t) in strings(&f["tokens_13a"]).iter().enumerate() {
        assert_eq!(&overlap::tokenize_13a(h[n - 5 + i]), t);
    }
    for (i, want) in f["rouge"].as_array().unwrap().iter().enumerate() {
        let got = overlap::rouge(h[i], r[i]);
        for (k, prf) in [
            ("rouge1", got.rouge1),
            ("rouge2", got.rouge2),
            ("rougeL", got.rouge_l),
        ] {
            let w: Vec<f64> = want[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let g = [prf.precision, prf.recall, prf.fmeasure];
            for (a, b) in g.iter().zip(&w) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "pair {i} {k}: {g:?} vs {w:?}\n{}\n{}",
                    h[i],
                    r[i]
                );
            }
        }
    }
}

#[test]
fn porter_stems_equal_nltk_on_every_word_of_tiny_shakespeare() {
    let f = read_json(fixtures().join("overlap.json"));
    let stems = f["stems"].as_object().unwrap();
    let wrong: Vec<String> = stems
        .iter()
        .filter_map(|(w, s)| {
            let got = overlap::porter_stem(w);
            (got != s.as_str().unwrap()).then(|| format!("{w}: {got} vs {s}"))
        })
        .collect();
    assert!(stems.len() > 10_000);
    assert!(
        wrong.is_empty(),
        "{} of {} differ: {:?}",
        wrong.len(),
        stems.len(),
        &wrong[..wrong.len().min(20)]
    );
}
