//! Fetching models from the Hugging Face hub.
//!
//! Files land in the cache layout of Python's `huggingface_hub`
//! (`models--org--name/{blobs,refs,snapshots}`), so a model downloaded by either tool is reused by
//! the other. `hf-hub` 0.4 knows that layout but verifies nothing, reads neither `HF_HUB_CACHE`
//! nor `HF_HUB_OFFLINE`, downloads one file at a time and panics on some malformed responses, so
//! the client here is our own, on `ureq` with rustls:
//! - every file is checked before it enters the cache: LFS files against their sha256, small git
//!   files against their git blob id, both against their size; a mismatch is fetched once more,
//!   then reported;
//! - interrupted downloads resume with HTTP `Range` from `blobs/<id>.incomplete`, the name
//!   `huggingface_hub` uses, so either tool resumes the other's partial file;
//! - a model already in the cache is used without any network call.

mod cache;
mod client;
mod select;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cache::{Cache, CachedRepo};
pub use select::Selection;

use client::Client;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("'{0}' is not a hub model id: expected ORG/NAME[@REVISION][:QUANT]")]
    BadId(String),
    #[error("{repo}: HTTP {status}: the repository is private or gated, or the token has no access to it; set HF_TOKEN (or pass --token) to a token that can read it")]
    Unauthorized { repo: String, status: u16 },
    #[error("{repo} is gated: accept its conditions at {endpoint}/{repo}, then set HF_TOKEN (or pass --token) to a token of that account")]
    Gated { repo: String, endpoint: String },
    #[error("repository {repo} not found on {endpoint}{hint}")]
    RepoNotFound {
        repo: String,
        endpoint: String,
        hint: &'static str,
    },
    #[error("revision '{revision}' not found in {repo}")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{file} not found in {repo}@{revision}")]
    FileNotFound {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("{url}: HTTP {status} (gave up after {attempts} attempts)")]
    Http {
        url: String,
        status: u16,
        attempts: u32,
    },
    #[error("{url}: {message} (gave up after {attempts} attempts)")]
    Network {
        url: String,
        message: String,
        attempts: u32,
    },
    #[error("{file}: the downloaded bytes do not match the hub's {what} twice; nothing was put in the cache")]
    Corrupt { file: String, what: String },
    #[error("refusing the file name '{0}' sent by the hub: it would be written outside the cache")]
    HostileName(String),
    #[error("the hub sent a malformed {what}: {detail}")]
    Protocol { what: &'static str, detail: String },
    #[error("HF_HUB_OFFLINE is set and {model} is not in the cache at {}", cache.display())]
    Offline { model: String, cache: PathBuf },
    #[error("{repo}: {detail}")]
    Selection { repo: String, detail: String },
    #[error("{0} is not in the cache")]
    NotCached(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::Error),
}

pub type Result<T> = std::result::Result<T, HubError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `ORG/NAME[@REVISION][:QUANT]`, the way llama.cpp's `-hf` and `huggingface-cli` name models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub repo: String,
    pub revision: Option<String>,
    /// For GGUF repos: which quantization to take (`Q4_K_M`).
    pub quant: Option<String>,
}

impl ModelRef {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || HubError::BadId(s.to_string());
        let (rest, quant) = match s.rsplit_once(':') {
            Some((r, q))
                if !q.is_empty() && q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                (r, Some(q.to_string()))
            }
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) if valid_revision(rev) => (r, Some(rev.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        if !valid_repo_id(repo) {
            return Err(bad());
        }
        Ok(Self {
            repo: repo.to_string(),
            revision,
            quant,
        })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision())?;
        if let Some(q) = &self.quant {
            write!(f, ":{q}")?;
        }
        Ok(())
    }
}

/// huggingface_hub's rule: `org/name`, each part of word characters, `-` and `.`, no `--`/`..`.
fn valid_repo_id(id: &str) -> bool {
    let Some((org, name)) = id.split_once('/') else {
        return false;
    };
    [org, name].iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.contains("--")
            && !p.contains("..")
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    })
}

/// Branches, tags, `refs/pr/N` and commit shas; never a path that climbs out of `refs/`.
fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && rev
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

pub(crate) fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where and how to reach the hub, from the same environment variables huggingface_hub reads.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// Retries after a network error, HTTP 429 or 5xx, with exponential backoff.
    pub retries: u32,
    pub backoff: Duration,
    /// How long a download may go without a byte before the attempt is abandoned (and resumed
    /// by a retry). `HF_HUB_DOWNLOAD_TIMEOUT` in seconds, as huggingface_hub; default 10.
    pub read_timeout: Duration,
    /// Files downloaded at once.
    pub parallel: usize,
}

impl HubConfig {
    /// `HF_ENDPOINT`, `HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`),
    /// `HF_TOKEN` (else the token file `huggingface-cli login` writes), `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token,
            offline,
            retries: 3,
            backoff: Duration::from_millis(500),
            read_timeout: var("HF_HUB_DOWNLOAD_TIMEOUT")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(Duration::from_secs(10)),
            parallel: 4,
        }
    }

    pub fn cache(&self) -> Cache {
        Cache::new(self.cache_dir.clone())
    }
}

/// What a download reports as it goes; the CLI draws progress bars from it.
pub trait Progress: Sync {
    /// The files a pull will fetch or find, with their sizes.
    fn plan(&self, _files: &[(String, u64)]) {}
    fn file_started(&self, _file: &str, _size: u64, _resumed_from: u64) {}
    fn bytes(&self, _file: &str, _n: u64) {}
    fn file_done(&self, _file: &str) {}
    fn retrying(&self, _file: &str, _why: &str) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// A model's files at one commit, in the cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub repo: String,
    pub commit: String,
    pub dir: PathBuf,
    pub files: Vec<String>,
}

impl Snapshot {
    /// What a loader opens: the GGUF file of a GGUF pick, else the snapshot folder.
    pub fn model_path(&self) -> PathBuf {
        match self.files.as_slice() {
            [one] if one.to_ascii_lowercase().ends_with(".gguf") => self.dir.join(one),
            _ => self.dir.clone(),
        }
    }
}

/// The cached snapshot that holds `selection` for `model`, found without any network call.
pub fn cached(model: &ModelRef, selection: &Selection, cfg: &HubConfig) -> Option<Snapshot> {
    let cache = cfg.cache();
    let commit = cache.commit_for(&model.repo, model.revision())?;
    let dir = cache.snapshot_dir(&model.repo, &commit);
    let present = cache::files_under(&dir);
    let files = selection.satisfied_by(model, &dir, &present)?;
    Some(Snapshot {
        repo: model.repo.clone(),
        commit,
        dir,
        files,
    })
}

/// Downloads the files `selection` picks (or finds them in the cache) and returns the snapshot.
pub fn pull(
    model: &ModelRef,
    selection: &Selection,
    cfg: &HubConfig,
    progress: &dyn Progress,
) -> Result<Snapshot> {
    // With --include only the hub knows whether every matching file is already here.
    if (!selection.refresh && selection.include.is_empty()) || cfg.offline {
        if let Some(s) = cached(model, selection, cfg) {
            return Ok(s);
        }
    }
    if cfg.offline {
        return Err(HubError::Offline {
            model: model.to_string(),
            cache: cfg.cache_dir.clone(),
        });
    }
    let client = Client::new(cfg);
    let info = client.model_info(&model.repo, model.revision())?;
    let chosen = selection.choose(model, &info.siblings)?;
    let cache = cfg.cache();
    if model.revision() != info.sha {
        cache.write_ref(&model.repo, model.revision(), &info.sha)?;
    }
    client.download_all(&model.repo, &info.sha, &chosen, &cache, progress)?;
    Ok(Snapshot {
        repo: model.repo.clone(),
        dir: cache.snapshot_dir(&model.repo, &info.sha),
        commit: info.sha,
        files: chosen.iter().map(|s| s.rfilename.clone()).collect(),
    })
}

/// The path a `--model` argument names: an existing local path as it is, else a hub id taken
/// from the cache or pulled with the default selection.
pub fn resolve_model(spec: &str, cfg: &HubConfig, progress: &dyn Progress) -> Result<PathBuf> {
    let model = ModelRef::parse(spec)?;
    let selection = Selection {
        quant: model.quant.clone(),
        ..Selection::default()
    };
    Ok(pull(&model, &selection, cfg, progress)?.model_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_refs() {
        let r = ModelRef::parse("HuggingFaceTB/SmolLM2-135M@v1.0:Q4_K_M").unwrap();
        assert_eq!(r.repo, "HuggingFaceTB/SmolLM2-135M");
        assert_eq!(r.revision(), "v1.0");
        assert_eq!(r.quant.as_deref(), Some("Q4_K_M"));
        let r = ModelRef::parse("org/name").unwrap();
        assert_eq!((r.revision(), r.quant.as_deref()), ("main", None));
        assert_eq!(
            ModelRef::parse("org/name@refs/pr/1").unwrap().revision(),
            "refs/pr/1"
        );
        for bad in [
            "name",
            "org/",
            "/name",
            "a/b/c",
            "org/na..me",
            "org/name@../../x",
            "org/name@",
            "../x/y",
            "org/name:Q4 K",
            "/abs/path.gguf",
            "./model",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
