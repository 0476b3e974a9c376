//! Classification metrics against scikit-learn (tools/make_fixtures.py, `metrics` part), including
//! classes that are never predicted (precision and F1 0, no NaN).

use crate::common;

use slm::eval::metrics::Report;

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn indices(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn report_matches_scikit_learn() {
    let want = common::read_json(common::fixtures().join("metrics.json"));
    for case in want["cases"].as_array().unwrap() {
        let labels: Vec<String> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let r = Report::new(&labels, &indices(&case["truth"]), &indices(&case["pred"]));
        let close =
            |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-12, "{what}: {a} vs {b}");
        close(r.accuracy, case["accuracy"].as_f64().unwrap(), "accuracy");
        let (p, rc, f) = (
            floats(&case["precision"]),
            floats(&case["recall"]),
            floats(&case["f1"]),
        );
        for (i, c) in r.per_class.iter().enumerate() {
            close(c.precision, p[i], "precision");
            close(c.recall, rc[i], "recall");
            close(c.f1, f[i], "f1");
            assert!(c.f1.is_finite());
            assert_eq!(c.support, indices(&case["support"])[i]);
        }
        for (name, got) in [
            ("macro", &r.macro_avg),
            ("micro", &r.micro_avg),
            ("weighted", &r.weighted_avg),
        ] {
            let w = floats(&case["average"][name]);
            close(got.precision, w[0], name);
            close(got.recall, w[1], name);
            close(got.f1, w[2], name);
        }
        let confusion: Vec<Vec<usize>> = case["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .map(indices)
            .collect();
        assert_eq!(r.confusion, confusion);
    }
    // The fixture includes a class that is never predicted.
    assert!(want["cases"][1]["precision"][3].as_f64() == Some(0.0));
}
