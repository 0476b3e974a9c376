//! `slm pull`, `slm list`, `slm rm`: the Hugging Face hub cache.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use slm::hub::{HubConfig, ModelRef, Progress, Selection};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// ORG/NAME[@REVISION][:QUANT], e.g. sentence-transformers/all-MiniLM-L6-v2 or
    /// bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M.
    model: String,
    /// Branch, tag or commit (overrides @REVISION).
    #[arg(long)]
    revision: Option<String>,
    /// Only files matching this glob (repeatable); replaces the default choice of model files.
    #[arg(long)]
    include: Vec<String>,
    /// Skip files matching this glob (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// GGUF repos: the quantization to take (Q4_K_M, Q8_0, ...).
    #[arg(long)]
    quant: Option<String>,
    /// Access token for gated or private repos (default: $HF_TOKEN or the saved login).
    #[arg(long)]
    token: Option<String>,
    /// Ask the hub for the revision's latest commit even when the cache has the model.
    #[arg(long)]
    refresh: bool,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
}

pub fn pull(a: PullArgs) -> Result<()> {
    let mut model = ModelRef::parse(&a.model)?;
    if let Some(r) = a.revision {
        model.revision = ModelRef::parse(&format!("{}@{r}", model.repo))?.revision;
    }
    let mut cfg = HubConfig::from_env();
    if a.token.is_some() {
        cfg.token = a.token;
    }
    cfg.parallel = a.parallel.max(1);
    let selection = Selection {
        include: a.include,
        exclude: a.exclude,
        quant: a.quant.or(model.quant.clone()),
        refresh: a.refresh,
    };
    let bars = Bars::new();
    let snap = slm::hub::pull(&model, &selection, &cfg, &bars)?;
    bars.multi.clear()?;
    let size: u64 = snap
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(snap.dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "{}@{} is commit {} ({} file{}, {})",
        snap.repo,
        model.revision(),
        &snap.commit[..12],
        snap.files.len(),
        if snap.files.len() == 1 { "" } else { "s" },
        indicatif::HumanBytes(size)
    );
    outln!("{}", snap.model_path().display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn list(a: ListArgs) -> Result<()> {
    let cfg = HubConfig::from_env();
    let repos = cfg.cache().list()?;
    if a.json {
        for r in &repos {
            let refs: serde_json::Map<String, serde_json::Value> = r
                .refs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            let line = serde_json::json!({
                "repo": r.repo, "refs": refs, "snapshots": r.snapshots, "size": r.size,
                "incomplete": r.incomplete, "path": r.dir,
            });
            outln!("{line}");
        }
        return Ok(());
    }
    if repos.is_empty() {
        eprintln!("no models in {}", cfg.cache_dir.display());
        return Ok(());
    }
    outln!("{:<48} {:<28} {:>10}", "MODEL", "REVISION", "SIZE");
    for r in &repos {
        let mut revisions: Vec<String> = r
            .refs
            .iter()
            .map(|(name, c)| format!("{name} ({})", c.get(..8).unwrap_or(c)))
            .collect();
        // Snapshots pinned by commit have no ref.
        for s in &r.snapshots {
            if !r.refs.iter().any(|(_, c)| c == s) {
                revisions.push(s.get(..8).unwrap_or(s).to_string());
            }
        }
        let mut size = indicatif::HumanBytes(r.size).to_string();
        if r.incomplete > 0 {
            size.push_str(&format!(
                " (+{} partial)",
                indicatif::HumanBytes(r.incomplete)
            ));
        }
        outln!("{:<48} {:<28} {:>10}", r.repo, revisions.join(", "), size);
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// ORG/NAME of a cached model.
    model: String,
}

pub fn rm(a: RmArgs) -> Result<()> {
    let model = ModelRef::parse(&a.model)?;
    let cfg = HubConfig::from_env();
    let freed = cfg.cache().remove(&model.repo)?;
    // The weights slm's kernels packed from the removed files go with them.
    let packed = slm::io::pack_cache::remove_orphans();
    let also = if packed > 0 {
        format!(", and {} of packed weights", indicatif::HumanBytes(packed))
    } else {
        String::new()
    };
    eprintln!(
        "removed {} ({} freed{also})",
        model.repo,
        indicatif::HumanBytes(freed)
    );
    Ok(())
}

/// One bar per file and one for the whole pull, drawn on stderr when it is a terminal.
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    files: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        let multi = MultiProgress::new();
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{msg:<32!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        total.set_message("total");
        Self {
            multi,
            total,
            files: Mutex::default(),
        }
    }

    fn file_bar(&self, file: &str) -> ProgressBar {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .entry(file.to_string())
            .or_insert_with(|| {
                let bar = self.multi.insert_before(&self.total, ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template("{msg:<32!} {bar:30} {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(file.to_string());
                bar
            })
            .clone()
    }
}

impl Progress for Bars {
    fn plan(&self, files: &[(String, u64)]) {
        self.total.set_length(files.iter().map(|f| f.1).sum());
    }

    fn file_started(&self, file: &str, size: u64, resumed_from: u64) {
        let bar = self.file_bar(file);
        let before = bar.position();
        bar.set_length(size);
        bar.set_position(resumed_from);
        let total = self.total.position() + resumed_from;
        self.total.set_position(total.saturating_sub(before));
        if resumed_from > 0 {
            bar.set_message(format!("{file} (resumed)"));
        }
    }

    fn bytes(&self, file: &str, n: u64) {
        self.file_bar(file).inc(n);
        self.total.inc(n);
    }

    fn file_done(&self, file: &str) {
        let bar = self.file_bar(file);
        if bar.length() == Some(0) {
            // Already in the cache: nothing was downloaded.
            bar.finish_and_clear();
        } else {
            bar.finish();
        }
    }

    fn retrying(&self, file: &str, why: &str) {
        let _ = self.multi.println(format!("{file}: {why}"));
    }
}
