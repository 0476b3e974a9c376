//! Counters and latency histograms for `GET /metrics`, in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    fn new() -> Self {
        Self {
            bounds: LATENCY,
            inner: Mutex::new((vec![0; LATENCY.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (b, c) in self.bounds.iter().zip(g.0.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

pub struct Metrics {
    /// Requests answered, by endpoint and status code.
    requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicUsize,
    pub completion_tokens: AtomicUsize,
    pub cached_tokens: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub rejected: AtomicUsize,
    /// Sequences decoding now, over all models.
    pub active: AtomicUsize,
    pub decode_steps: AtomicUsize,
    /// Decode rows summed over steps: divided by the steps, the mean batch.
    pub batched_rows: AtomicUsize,
    pub ttft: Histogram,
    pub latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            prompt_tokens: Default::default(),
            completion_tokens: Default::default(),
            cached_tokens: Default::default(),
            cancelled: Default::default(),
            rejected: Default::default(),
            active: Default::default(),
            decode_steps: Default::default(),
            batched_rows: Default::default(),
            ttft: Histogram::new(),
            latency: Histogram::new(),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *r.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// The text `GET /metrics` returns; `queued` is read from the engines at the time.
    pub fn render(&self, queued: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP slm_requests_total HTTP requests answered.\n# TYPE slm_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "slm_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "slm_prompt_tokens_total",
                "Prompt tokens received.",
                &self.prompt_tokens,
            ),
            (
                "slm_prompt_tokens_cached_total",
                "Prompt tokens whose KV cache was reused.",
                &self.cached_tokens,
            ),
            (
                "slm_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            (
                "slm_requests_cancelled_total",
                "Generations ended because the client went away.",
                &self.cancelled,
            ),
            (
                "slm_requests_rejected_total",
                "Requests refused because the queue was full.",
                &self.rejected,
            ),
            (
                "slm_decode_steps_total",
                "Batched forward passes run.",
                &self.decode_steps,
            ),
            (
                "slm_decode_rows_total",
                "Decode rows over all passes (divided by the passes: the mean batch).",
                &self.batched_rows,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            ("slm_queue_depth", "Requests waiting for a slot.", queued),
            (
                "slm_active_sequences",
                "Sequences decoding.",
                self.active.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.ttft.write(
            &mut out,
            "slm_time_to_first_token_seconds",
            "From request to first generated token.",
        );
        self.latency.write(
            &mut out,
            "slm_request_duration_seconds",
            "From request to the end of its answer.",
        );
        out
    }
}
