//! Classification metrics as scikit-learn computes them (`classification_report`,
//! `confusion_matrix`), with `zero_division=0`: a class never predicted has precision 0 and F1 0,
//! never NaN.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Average {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub accuracy: f64,
    pub per_class: Vec<ClassScores>,
    pub macro_avg: Average,
    pub micro_avg: Average,
    pub weighted_avg: Average,
    /// `confusion[true][predicted]`, as scikit-learn orders it.
    pub confusion: Vec<Vec<usize>>,
    pub total: usize,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

impl Report {
    /// `truth` and `pred` hold class indices into `labels`.
    pub fn new(labels: &[String], truth: &[usize], pred: &[usize]) -> Self {
        assert_eq!(truth.len(), pred.len());
        let n = labels.len();
        let mut confusion = vec![vec![0usize; n]; n];
        for (&t, &p) in truth.iter().zip(pred) {
            confusion[t][p] += 1;
        }
        let total = truth.len();
        let correct: usize = (0..n).map(|c| confusion[c][c]).sum();
        let per_class: Vec<ClassScores> = (0..n)
            .map(|c| {
                let tp = confusion[c][c];
                let predicted: usize = (0..n).map(|t| confusion[t][c]).sum();
                let support: usize = confusion[c].iter().sum();
                let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
                ClassScores {
                    label: labels[c].clone(),
                    precision,
                    recall,
                    f1: f1(precision, recall),
                    support,
                }
            })
            .collect();
        let mean = |f: &dyn Fn(&ClassScores) -> f64| {
            per_class.iter().map(f).sum::<f64>() / n.max(1) as f64
        };
        let weighted = |f: &dyn Fn(&ClassScores) -> f64| {
            let w: usize = per_class.iter().map(|c| c.support).sum();
            if w == 0 {
                0.0
            } else {
                per_class
                    .iter()
                    .map(|c| f(c) * c.support as f64)
                    .sum::<f64>()
                    / w as f64
            }
        };
        // Single-label: every error is one false positive and one false negative, so micro
        // precision = recall = F1 = accuracy.
        let micro = ratio(correct, total);
        Report {
            accuracy: micro,
            macro_avg: Average {
                precision: mean(&|c| c.precision),
                recall: mean(&|c| c.recall),
                f1: mean(&|c| c.f1),
            },
            micro_avg: Average {
                precision: micro,
                recall: micro,
                f1: micro,
            },
            weighted_avg: Average {
                precision: weighted(&|c| c.precision),
                recall: weighted(&|c| c.recall),
                f1: weighted(&|c| c.f1),
            },
            per_class,
            confusion,
            total,
        }
    }

    /// The report as a text table, in scikit-learn's layout.
    pub fn table(&self) -> String {
        let w = self
            .per_class
            .iter()
            .map(|c| c.label.chars().count())
            .max()
            .unwrap_or(0)
            .max(12);
        let mut s = format!(
            "{:>w$} {:>9} {:>9} {:>9} {:>9}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for c in &self.per_class {
            s += &format!(
                "{:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                c.label, c.precision, c.recall, c.f1, c.support
            );
        }
        s += &format!(
            "\n{:>w$} {:>9} {:>9} {:>9.4} {:>9}\n",
            "accuracy", "", "", self.accuracy, self.total
        );
        for (name, a) in [
            ("macro avg", &self.macro_avg),
            ("micro avg", &self.micro_avg),
            ("weighted avg", &self.weighted_avg),
        ] {
            s += &format!(
                "{:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                name, a.precision, a.recall, a.f1, self.total
            );
        }
        s += "\nconfusion matrix (rows: true, columns: predicted)\n";
        s += &format!("{:>w$}", "");
        for c in &self.per_class {
            s += &format!(" {:>9}", truncate(&c.label, 9));
        }
        s += "\n";
        for (c, row) in self.per_class.iter().zip(&self.confusion) {
            s += &format!("{:>w$}", c.label);
            for v in row {
                s += &format!(" {v:>9}");
            }
            s += "\n";
        }
        s
    }

    /// The confusion matrix as an SVG heat map (cell shade by row-normalised count).
    pub fn confusion_svg(&self) -> String {
        let n = self.per_class.len();
        let (cell, left, top) = (56.0, 120.0, 70.0);
        let (wd, ht) = (left + cell * n as f64 + 20.0, top + cell * n as f64 + 20.0);
        let esc = |t: &str| {
            t.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{wd}\" height=\"{ht}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{left}\" y=\"20\">predicted</text><text x=\"10\" y=\"{top}\">true</text>\n"
        );
        for (j, c) in self.per_class.iter().enumerate() {
            let x = left + cell * (j as f64 + 0.5);
            s += &format!(
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                top - 8.0,
                esc(&c.label)
            );
        }
        for (i, row) in self.confusion.iter().enumerate() {
            let y = top + cell * i as f64;
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                left - 6.0,
                y + cell / 2.0 + 4.0,
                esc(&self.per_class[i].label)
            );
            let sum: usize = row.iter().sum();
            for (j, &v) in row.iter().enumerate() {
                let frac = ratio(v, sum);
                let shade = (255.0 * (1.0 - 0.8 * frac)) as u8;
                let x = left + cell * j as f64;
                let ink = if frac > 0.5 { "white" } else { "black" };
                s += &format!(
                    "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#888\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\">{v}</text>\n",
                    x + cell / 2.0,
                    y + cell / 2.0 + 4.0
                );
            }
        }
        s + "</svg>\n"
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_predicted_class_has_zero_f1_not_nan() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = Report::new(&labels, &[0, 1, 2, 2], &[0, 0, 0, 1]);
        assert_eq!(r.per_class[2].precision, 0.0);
        assert_eq!(r.per_class[2].f1, 0.0);
        assert_eq!(
            r.confusion,
            vec![vec![1, 0, 0], vec![1, 0, 0], vec![1, 1, 0]]
        );
        assert!(r.confusion_svg().starts_with("<svg"));
        assert!(r.table().contains("accuracy"));
    }
}
