//! N-gram overlap scores of generated text against references, computed exactly as the
//! tools papers report them with: BLEU and chrF as sacrebleu 2.x computes them (BLEU over
//! 13a-tokenized words, exponential smoothing; chrF with character 6-grams and β = 2), and
//! ROUGE-1/2/L as Google's `rouge-score` computes them (its tokenizer and NLTK's Porter
//! stemmer), averaged over the pairs.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// Corpus BLEU and what it is made of (sacrebleu's `BLEUScore`).
#[derive(Debug, Clone, Serialize)]
pub struct Bleu {
    pub score: f64,
    pub precisions: [f64; 4],
    pub brevity_penalty: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

/// sacrebleu's `13a` tokenizer (mteval-v13a's, as WMT uses).
pub fn tokenize_13a(line: &str) -> String {
    static RULES: LazyLock<[(Regex, &str); 4]> = LazyLock::new(|| {
        let re = |p: &str| Regex::new(p).expect("a valid pattern");
        [
            // Punctuation and symbols: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
            (
                re(r"([\x7B-\x7E\x5B-\x60\x20-\x26\x28-\x2B\x3A-\x40/])"),
                " ${1} ",
            ),
            // Periods and commas unless between digits.
            (re(r"([^0-9])([\.,])"), "${1} ${2} "),
            (re(r"([\.,])([^0-9])"), " ${1} ${2}"),
            // A dash after a digit.
            (re(r"([0-9])(-)"), "${1} ${2} "),
        ]
    });
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut s = format!(" {line} ");
    for (re, to) in RULES.iter() {
        s = re.replace_all(&s, *to).into_owned();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn counts<T: std::hash::Hash + Eq>(items: impl Iterator<Item = T>) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// Matches of `hyp` clipped by `reference`, and `hyp`'s total.
fn clipped<T: std::hash::Hash + Eq>(
    hyp: &HashMap<T, usize>,
    reference: &HashMap<T, usize>,
) -> (usize, usize) {
    let total = hyp.values().sum();
    let matched = hyp
        .iter()
        .map(|(g, &c)| reference.get(g).map_or(0, |&r| c.min(r)))
        .sum();
    (matched, total)
}

/// Corpus BLEU of `hyps` against one reference each (sacrebleu's `corpus_bleu` defaults).
pub fn bleu(hyps: &[&str], refs: &[&str]) -> Bleu {
    let (mut correct, mut total) = ([0usize; 4], [0usize; 4]);
    let (mut sys_len, mut ref_len) = (0, 0);
    for (h, r) in hyps.iter().zip(refs) {
        let (h, r) = (tokenize_13a(h.trim_end()), tokenize_13a(r.trim_end()));
        let (h, r): (Vec<&str>, Vec<&str>) = (
            h.split_whitespace().collect(),
            r.split_whitespace().collect(),
        );
        sys_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            let (m, t) = clipped(&counts(h.windows(n)), &counts(r.windows(n)));
            correct[n - 1] += m;
            total[n - 1] += t;
        }
    }
    let brevity_penalty = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0; 4];
    if correct.iter().all(|&c| c == 0) {
        return Bleu {
            score: 0.0,
            precisions,
            brevity_penalty,
            sys_len,
            ref_len,
        };
    }
    let mut smooth = 1.0;
    for n in 0..4 {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // sacrebleu's `my_log`: log 0 is floored, not −∞.
    let log = |p: f64| if p == 0.0 { -9999999999.0 } else { p.ln() };
    let score = brevity_penalty * (precisions.iter().map(|&p| log(p)).sum::<f64>() / 4.0).exp();
    Bleu {
        score,
        precisions,
        brevity_penalty,
        sys_len,
        ref_len,
    }
}

/// Corpus chrF (sacrebleu's `CHRF()`: character n-grams up to 6, whitespace ignored, β = 2).
pub fn chrf(hyps: &[&str], refs: &[&str]) -> f64 {
    const ORDER: usize = 6;
    let mut stats = [[0usize; 3]; ORDER];
    for (h, r) in hyps.iter().zip(refs) {
        let chars = |s: &str| -> Vec<char> { s.chars().filter(|c| !c.is_whitespace()).collect() };
        let (h, r) = (chars(h), chars(r));
        for n in 1..=ORDER {
            let rc = counts(r.windows(n));
            let (m, t) = clipped(&counts(h.windows(n)), &rc);
            // A hypothesis n-gram counts only where the reference has n-grams of that order.
            let s = &mut stats[n - 1];
            s[0] += if rc.is_empty() { 0 } else { t };
            s[1] += rc.values().sum::<usize>();
            s[2] += m;
        }
    }
    let factor = 4.0; // β²
    let (mut prec, mut rec, mut order) = (0.0, 0.0, 0);
    for [h, r, m] in stats {
        if h > 0 && r > 0 {
            prec += m as f64 / h as f64;
            rec += m as f64 / r as f64;
            order += 1;
        }
    }
    if order == 0 {
        return 0.0;
    }
    let (p, r) = (prec / order as f64, rec / order as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * p * r / (factor * p + r)
}

/// Precision, recall and F1 of one ROUGE variant.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Prf {
    fn new(matched: usize, hyp: usize, reference: usize) -> Self {
        let precision = matched as f64 / hyp.max(1) as f64;
        let recall = matched as f64 / reference.max(1) as f64;
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Prf {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one prediction against its reference.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Rouge {
    pub rouge1: Prf,
    pub rouge2: Prf,
    #[serde(rename = "rougeL")]
    pub rouge_l: Prf,
}

/// `rouge_score.tokenize`: lowercase, alphanumeric runs, Porter stems of words over 3 letters.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_lowercase() && !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.len() > 3 {
                porter_stem(t)
            } else {
                t.to_string()
            }
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, prediction)`.
pub fn rouge(prediction: &str, reference: &str) -> Rouge {
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    let n_gram = |n: usize| {
        let (pc, rc) = (counts(p.windows(n)), counts(r.windows(n)));
        let (m, t) = clipped(&pc, &rc);
        Prf::new(m, t, rc.values().sum())
    };
    let rouge_l = if p.is_empty() || r.is_empty() {
        Prf::default()
    } else {
        Prf::new(lcs(&r, &p), p.len(), r.len())
    };
    Rouge {
        rouge1: n_gram(1),
        rouge2: n_gram(2),
        rouge_l,
    }
}

/// The mean of each score over the pairs (rouge-score's per-pair scores, averaged).
pub fn rouge_mean(predictions: &[&str], references: &[&str]) -> Rouge {
    let all: Vec<Rouge> = predictions
        .iter()
        .zip(references)
        .map(|(p, r)| rouge(p, r))
        .collect();
    let n = all.len().max(1) as f64;
    let mean = |f: fn(&Rouge) -> Prf| {
        let s = all.iter().map(f).fold(Prf::default(), |a, b| Prf {
            precision: a.precision + b.precision,
            recall: a.recall + b.recall,
            fmeasure: a.fmeasure + b.fmeasure,
        });
        Prf {
            precision: s.precision / n,
            recall: s.recall / n,
            fmeasure: s.fmeasure / n,
        }
    };
    Rouge {
        rouge1: mean(|r| r.rouge1),
        rouge2: mean(|r| r.rouge2),
        rouge_l: mean(|r| r.rouge_l),
    }
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// NLTK's `PorterStemmer()` (its default `NLTK_EXTENSIONS` mode, which rouge-score uses) of a
/// lowercase ASCII word.
pub fn porter_stem(word: &str) -> String {
    const IRREGULAR: [(&str, &str); 16] = [
        ("sky", "sky"),
        ("skies", "sky"),
        ("dying", "die"),
        ("lying", "lie"),
        ("tying", "tie"),
        ("news", "news"),
        ("innings", "inning"),
        ("inning", "inning"),
        ("outings", "outing"),
        ("outing", "outing"),
        ("cannings", "canning"),
        ("canning", "canning"),
        ("howe", "howe"),
        ("proceed", "proceed"),
        ("exceed", "exceed"),
        ("succeed", "succeed"),
    ];
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == word) {
        return s.to_string();
    }
    if word.len() <= 2 || !word.is_ascii() {
        return word.to_string();
    }
    let w = step1a(word.as_bytes().to_vec());
    let w = step1b(w);
    let w = step1c(w);
    let w = step2(w);
    let w = step3(w);
    let w = step4(w);
    let w = step5a(w);
    let w = step5b(w);
    String::from_utf8(w).unwrap_or_default()
}

type Cond<'a> = Option<&'a dyn Fn(&[u8]) -> bool>;

fn consonant(w: &[u8], i: usize) -> bool {
    match w[i] {
        b'a' | b'e' | b'i' | b'o' | b'u' => false,
        b'y' => i == 0 || !consonant(w, i - 1),
        _ => true,
    }
}

/// Porter's m: the number of vowel-consonant sequences.
fn measure(w: &[u8]) -> usize {
    (1..w.len())
        .filter(|&i| !consonant(w, i - 1) && consonant(w, i))
        .count()
}

fn has_vowel(w: &[u8]) -> bool {
    (0..w.len()).any(|i| !consonant(w, i))
}

fn double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && consonant(w, n - 1)
}

fn cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3
        && consonant(w, n - 3)
        && !consonant(w, n - 2)
        && consonant(w, n - 1)
        && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !consonant(w, 0) && consonant(w, 1))
}

/// The first rule whose suffix `word` ends with decides: its replacement if the stem meets
/// the condition, else the word unchanged. `*d` is a double consonant.
fn rules(word: Vec<u8>, list: &[(&str, &str, Cond)]) -> Vec<u8> {
    for &(suffix, to, cond) in list {
        if suffix == "*d" {
            if double_consonant(&word) {
                let stem = &word[..word.len() - 2];
                return if cond.is_none_or(|c| c(stem)) {
                    [stem, to.as_bytes()].concat()
                } else {
                    word
                };
            }
            continue;
        }
        if word.ends_with(suffix.as_bytes()) {
            let stem = &word[..word.len() - suffix.len()];
            return if cond.is_none_or(|c| c(stem)) {
                [stem, to.as_bytes()].concat()
            } else {
                word
            };
        }
    }
    word
}

fn positive(s: &[u8]) -> bool {
    measure(s) > 0
}

fn replace(w: &[u8], suffix: usize, to: &str) -> Vec<u8> {
    [&w[..w.len() - suffix], to.as_bytes()].concat()
}

fn step1a(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ies") && w.len() == 4 {
        return replace(&w, 3, "ie");
    }
    rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ied") {
        return replace(&w, 3, if w.len() == 4 { "ie" } else { "i" });
    }
    if w.ends_with(b"eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 {
            [stem, b"ee"].concat()
        } else {
            w
        };
    }
    let Some(stem) = ["ed", "ing"].iter().find_map(|s| {
        let stem = w.strip_suffix(s.as_bytes())?;
        has_vowel(stem).then(|| stem.to_vec())
    }) else {
        return w;
    };
    let last = *stem.last().unwrap_or(&b'a');
    let last_s = (last as char).to_string();
    let keep_double = move |_: &[u8]| !matches!(last, b'l' | b's' | b'z');
    let add_e = |s: &[u8]| measure(s) == 1 && cvc(s);
    rules(
        stem,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", &last_s, Some(&keep_double)),
            ("", "e", Some(&add_e)),
        ],
    )
}

fn step1c(w: Vec<u8>) -> Vec<u8> {
    let cond = |s: &[u8]| s.len() > 1 && consonant(s, s.len() - 1);
    rules(w, &[("y", "i", Some(&cond))])
}

fn step2(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"alli") && positive(&w[..w.len() - 4]) {
        return step2(replace(&w, 4, "al"));
    }
    let p: Cond = Some(&positive);
    let outer = w.clone();
    let logi = move |_: &[u8]| positive(&outer[..outer.len() - 3]);
    rules(
        w,
        &[
            ("ational", "ate", p),
            ("tional", "tion", p),
            ("enci", "ence", p),
            ("anci", "ance", p),
            ("izer", "ize", p),
            ("bli", "ble", p),
            ("alli", "al", p),
            ("entli", "ent", p),
            ("eli", "e", p),
            ("ousli", "ous", p),
            ("ization", "ize", p),
            ("ation", "ate", p),
            ("ator", "ate", p),
            ("alism", "al", p),
            ("iveness", "ive", p),
            ("fulness", "ful", p),
            ("ousness", "ous", p),
            ("aliti", "al", p),
            ("iviti", "ive", p),
            ("biliti", "ble", p),
            ("fulli", "ful", p),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: Vec<u8>) -> Vec<u8> {
    let p: Cond = Some(&positive);
    rules(
        w,
        &[
            ("icate", "ic", p),
            ("ative", "", p),
            ("alize", "al", p),
            ("iciti", "ic", p),
            ("ical", "ic", p),
            ("ful", "", p),
            ("ness", "", p),
        ],
    )
}

fn step4(w: Vec<u8>) -> Vec<u8> {
    let gt1 = |s: &[u8]| measure(s) > 1;
    let ion = |s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    let m: Cond = Some(&gt1);
    rules(
        w,
        &[
            ("al", "", m),
            ("ance", "", m),
            ("ence", "", m),
            ("er", "", m),
            ("ic", "", m),
            ("able", "", m),
            ("ible", "", m),
            ("ant", "", m),
            ("ement", "", m),
            ("ment", "", m),
            ("ent", "", m),
            ("ion", "", Some(&ion)),
            ("ou", "", m),
            ("ism", "", m),
            ("ate", "", m),
            ("iti", "", m),
            ("ous", "", m),
            ("ive", "", m),
            ("ize", "", m),
        ],
    )
}

fn step5a(w: Vec<u8>) -> Vec<u8> {
    if let Some(stem) = w.strip_suffix(b"e") {
        let m = measure(stem);
        if m > 1 || (m == 1 && !cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Vec<u8>) -> Vec<u8> {
    let outer = w.clone();
    let cond = move |_: &[u8]| measure(&outer[..outer.len() - 1]) > 1;
    rules(w, &[("ll", "l", Some(&cond))])
}
