//! The HTTP side: the model-info API, `resolve/` downloads with redirects, Range resumes,
//! retries with backoff, and verification before a file enters the cache.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::{io_err, is_commit_sha, Cache, HubConfig, HubError, Progress, Result};

#[derive(Debug, Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// One file of a repository as `api/models/{repo}/revision/{rev}?blobs=true` lists it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default, rename = "blobId")]
    pub blob_id: Option<String>,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Lfs {
    pub sha256: String,
    pub size: u64,
}

/// Why one attempt failed: worth another try (network, 429, 5xx) or not.
enum Fail {
    Status(u16),
    Network(String),
    Fatal(HubError),
}

impl From<HubError> for Fail {
    fn from(e: HubError) -> Self {
        Fail::Fatal(e)
    }
}

/// Names the request for error messages: which repo, revision and (for downloads) file.
struct Ctx<'a> {
    repo: &'a str,
    revision: &'a str,
    file: Option<&'a str>,
}

/// Headers of the `resolve/` answer itself: a redirect to a CDN loses them.
#[derive(Default)]
struct Hop {
    commit: Option<String>,
    etag: Option<String>,
}

pub(crate) struct Client<'a> {
    agent: ureq::Agent,
    cfg: &'a HubConfig,
}

impl<'a> Client<'a> {
    pub fn new(cfg: &'a HubConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            // Redirects are followed by hand: the first hop carries the commit and ETag, and
            // the token must not travel to another host.
            .redirects(0)
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(cfg.read_timeout)
            .user_agent(concat!("slm/", env!("CARGO_PKG_VERSION")))
            .build();
        Self { agent, cfg }
    }

    pub fn model_info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.cfg.endpoint,
            revision.replace('/', "%2F")
        );
        let ctx = Ctx {
            repo,
            revision,
            file: None,
        };
        let body = self.with_retries(&url, "model info", &super::NoProgress, &|| 0, || {
            let (resp, _) = self.get(&url, 0, &ctx)?;
            resp.into_string().map_err(|e| Fail::Network(e.to_string()))
        })?;
        let info: RepoInfo = serde_json::from_str(&body).map_err(|e| HubError::Protocol {
            what: "model info",
            detail: format!("{url}: {e}"),
        })?;
        if !is_commit_sha(&info.sha) {
            return Err(HubError::Protocol {
                what: "commit sha",
                detail: format!("{url}: '{}'", info.sha),
            });
        }
        Ok(info)
    }

    /// Downloads the files not yet in the cache, `cfg.parallel` at a time. After the first
    /// error no new file starts; the others finish or keep their partial bytes for a resume.
    pub fn download_all(
        &self,
        repo: &str,
        commit: &str,
        files: &[Sibling],
        cache: &Cache,
        progress: &dyn Progress,
    ) -> Result<()> {
        progress.plan(
            &files
                .iter()
                .map(|f| {
                    let size = f.lfs.as_ref().map(|l| l.size).or(f.size).unwrap_or(0);
                    (f.rfilename.clone(), size)
                })
                .collect::<Vec<_>>(),
        );
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<HubError>> = Mutex::new(None);
        let workers = self.cfg.parallel.clamp(1, files.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if failed.lock().map_or(true, |f| f.is_some()) {
                        break;
                    }
                    let Some(sib) = files.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    if let Err(e) = self.download(repo, commit, sib, cache, progress) {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                    }
                });
            }
        });
        match failed.into_inner() {
            Ok(None) => {
                // Only now does the snapshot show the files: a failed pull leaves no snapshot
                // that looks complete.
                for sib in files {
                    cache.link(repo, commit, &sib.rfilename, &blob_of(sib)?.0)?;
                }
                Ok(())
            }
            Ok(Some(e)) => Err(e),
            Err(_) => Err(HubError::Protocol {
                what: "download",
                detail: "a download thread panicked".into(),
            }),
        }
    }

    /// Downloads one file into `blobs/`; the snapshot links are made once every file is in.
    fn download(
        &self,
        repo: &str,
        commit: &str,
        sib: &Sibling,
        cache: &Cache,
        progress: &dyn Progress,
    ) -> Result<()> {
        let file = sib.rfilename.as_str();
        let (blob, size, check) = blob_of(sib)?;
        let done = cache.blob_path(repo, &blob);
        let have = std::fs::metadata(&done).map(|m| m.len()).ok();
        if have.is_some() && (size.is_none() || have == size) {
            // Another revision or file already brought these bytes.
            progress.file_done(file);
            return Ok(());
        }
        let dir = done.parent().unwrap_or(cache.root());
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let part = dir.join(format!("{blob}.incomplete"));
        let url = format!("{}/{repo}/resolve/{commit}/{file}", self.cfg.endpoint);
        let ctx = Ctx {
            repo,
            revision: commit,
            file: Some(file),
        };
        for round in 0..2 {
            let have = || std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            self.with_retries(&url, file, progress, &have, || {
                self.fetch(&url, &part, size, &blob, commit, &ctx, progress)
            })?;
            match check.verify(&part, &blob, size) {
                Ok(()) => {
                    std::fs::rename(&part, &done).map_err(io_err(&done))?;
                    progress.file_done(file);
                    return Ok(());
                }
                Err(what) => {
                    let _ = std::fs::remove_file(&part);
                    if round == 1 {
                        return Err(HubError::Corrupt {
                            file: file.to_string(),
                            what,
                        });
                    }
                    progress.retrying(file, &format!("{what} mismatch, downloading again"));
                }
            }
        }
        unreachable!("the loop returns in its second round")
    }

    /// One attempt: appends to `part` from where it ends.
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        url: &str,
        part: &Path,
        size: Option<u64>,
        blob: &str,
        commit: &str,
        ctx: &Ctx,
        progress: &dyn Progress,
    ) -> std::result::Result<(), Fail> {
        let mut offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|s| offset > s) {
            let _ = std::fs::remove_file(part);
            offset = 0;
        }
        if offset > 0 && size == Some(offset) {
            return Ok(());
        }
        let (resp, hop) = self.get(url, offset, ctx)?;
        let protocol = |what, detail: String| {
            Fail::Fatal(HubError::Protocol {
                what,
                detail: format!("{url}: {detail}"),
            })
        };
        if let Some(c) = hop.commit.filter(|c| c != commit) {
            return Err(protocol(
                "X-Repo-Commit",
                format!("{c}, asked for {commit}"),
            ));
        }
        if let Some(e) = hop.etag.filter(|e| !e.eq_ignore_ascii_case(blob)) {
            return Err(protocol("ETag", format!("{e}, the model info says {blob}")));
        }
        let append = match resp.status() {
            206 => {
                let range = resp.header("Content-Range").unwrap_or("");
                if !range.starts_with(&format!("bytes {offset}-")) {
                    return Err(protocol(
                        "Content-Range",
                        format!("'{range}' for offset {offset}"),
                    ));
                }
                true
            }
            200 => false,
            s => return Err(Fail::Status(s)),
        };
        if !append {
            offset = 0;
        }
        let length: Option<u64> = resp.header("Content-Length").and_then(|l| l.parse().ok());
        progress.file_started(
            ctx.file.unwrap_or_default(),
            size.or(length.map(|l| l + offset)).unwrap_or(0),
            offset,
        );
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(part)
            .map_err(io_err(part))?;
        let mut body = resp.into_reader();
        let mut buf = vec![0u8; 1 << 18];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // Keep what arrived: the next attempt asks for the rest.
                    out.flush().map_err(io_err(part))?;
                    return Err(Fail::Network(format!("connection lost: {e}")));
                }
            };
            out.write_all(&buf[..n]).map_err(io_err(part))?;
            progress.bytes(ctx.file.unwrap_or_default(), n as u64);
        }
        out.sync_all().map_err(io_err(part))?;
        Ok(())
    }

    /// GET with redirects followed by hand.
    fn get(
        &self,
        url: &str,
        offset: u64,
        ctx: &Ctx,
    ) -> std::result::Result<(ureq::Response, Hop), Fail> {
        let mut url = url.to_string();
        let mut hop = Hop::default();
        for hops in 0..6 {
            let mut req = self.agent.get(&url);
            if offset > 0 {
                req = req.set("Range", &format!("bytes={offset}-"));
            }
            if let Some(t) = &self.cfg.token {
                if origin(&url) == origin(&self.cfg.endpoint) {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, r)) => return Err(self.status_fail(code, &r, ctx)),
                Err(ureq::Error::Transport(t)) => {
                    // ureq starts its message with the URL, which the error names already.
                    let m = t.to_string();
                    let m = m
                        .strip_prefix(&format!("{url}: "))
                        .unwrap_or(&m)
                        .to_string();
                    return Err(Fail::Network(m));
                }
            };
            if hops == 0 {
                hop.commit = resp.header("X-Repo-Commit").map(str::to_string);
                hop.etag = resp
                    .header("X-Linked-Etag")
                    .or_else(|| resp.header("ETag"))
                    .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
            }
            if !(300..400).contains(&resp.status()) {
                return Ok((resp, hop));
            }
            let Some(location) = resp.header("Location") else {
                return Err(Fail::Status(resp.status()));
            };
            url = join_url(&url, location);
        }
        Err(Fail::Network("too many redirects".into()))
    }

    fn status_fail(&self, code: u16, resp: &ureq::Response, ctx: &Ctx) -> Fail {
        if code == 429 || code >= 500 {
            return Fail::Status(code);
        }
        let repo = ctx.repo.to_string();
        let e = match resp.header("X-Error-Code") {
            Some("GatedRepo") => HubError::Gated {
                repo,
                endpoint: self.cfg.endpoint.clone(),
            },
            Some("RevisionNotFound") => HubError::RevisionNotFound {
                repo,
                revision: ctx.revision.to_string(),
            },
            Some("EntryNotFound") => self.file_not_found(ctx),
            Some("RepoNotFound") => self.repo_not_found(ctx),
            _ if code == 401 || code == 403 => HubError::Unauthorized { repo, status: code },
            _ if code == 404 && ctx.file.is_some() => self.file_not_found(ctx),
            _ if code == 404 => self.repo_not_found(ctx),
            _ => return Fail::Status(code),
        };
        Fail::Fatal(e)
    }

    fn file_not_found(&self, ctx: &Ctx) -> HubError {
        HubError::FileNotFound {
            repo: ctx.repo.to_string(),
            revision: ctx.revision.to_string(),
            file: ctx.file.unwrap_or_default().to_string(),
        }
    }

    fn repo_not_found(&self, ctx: &Ctx) -> HubError {
        HubError::RepoNotFound {
            repo: ctx.repo.to_string(),
            endpoint: self.cfg.endpoint.clone(),
            hint: if self.cfg.token.is_none() {
                " (if it is private, set HF_TOKEN)"
            } else {
                ""
            },
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent. `done` says
    /// how many bytes are on disk: an attempt that added some before it stalled or broke does
    /// not count against the retries, since the next one resumes from there. A connection that
    /// keeps stalling but keeps moving finishes; one that gives nothing fails after
    /// `retries + 1` read timeouts.
    fn with_retries<T>(
        &self,
        url: &str,
        what: &str,
        progress: &dyn Progress,
        done: &dyn Fn() -> u64,
        mut attempt: impl FnMut() -> std::result::Result<T, Fail>,
    ) -> Result<T> {
        // Failed attempts in a row since the last one that made progress, and in all.
        let (mut tries, mut attempts) = (0u32, 0u32);
        loop {
            let before = done();
            let result = attempt();
            attempts += 1;
            tries = if done() > before { 1 } else { tries + 1 };
            let fail = match result {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(f) => f,
            };
            if tries > self.cfg.retries {
                return Err(match fail {
                    Fail::Status(status) => HubError::Http {
                        url: url.to_string(),
                        status,
                        attempts,
                    },
                    Fail::Network(message) => HubError::Network {
                        url: url.to_string(),
                        message,
                        attempts,
                    },
                    Fail::Fatal(e) => e,
                });
            }
            let why = match &fail {
                Fail::Status(s) => format!("HTTP {s}"),
                Fail::Network(m) => m.clone(),
                Fail::Fatal(_) => unreachable!(),
            };
            progress.retrying(what, &format!("{why}; retry {tries}/{}", self.cfg.retries));
            std::thread::sleep(self.cfg.backoff * 2u32.saturating_pow(tries - 1));
        }
    }
}

/// The blob a file is stored under, its size and how to check it.
fn blob_of(sib: &Sibling) -> Result<(String, Option<u64>, Check)> {
    let file = &sib.rfilename;
    let (blob, size, check) = match (&sib.lfs, &sib.blob_id) {
        (Some(lfs), _) => (
            lfs.sha256.to_ascii_lowercase(),
            Some(lfs.size),
            Check::Sha256,
        ),
        (None, Some(oid)) => (oid.to_ascii_lowercase(), sib.size, Check::GitOid),
        (None, None) => {
            return Err(HubError::Protocol {
                what: "model info",
                detail: format!("no blobId for {file} (the endpoint must support ?blobs=true)"),
            })
        }
    };
    // The name becomes a path under blobs/: only hex, as the hub's ids are.
    if !matches!(blob.len(), 40 | 64) || !blob.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HubError::Protocol {
            what: "file id",
            detail: format!("{file}: '{blob}'"),
        });
    }
    Ok((blob, size, check))
}

/// How a finished file is checked before it enters the cache.
#[derive(Clone, Copy)]
enum Check {
    /// LFS files: sha256 of the content, which is also the blob name.
    Sha256,
    /// Small files kept in git: sha1 of `blob <len>\0<content>`, git's object id.
    GitOid,
}

impl Check {
    fn verify(
        self,
        path: &Path,
        expected: &str,
        size: Option<u64>,
    ) -> std::result::Result<(), String> {
        let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let len = f
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| e.to_string())?;
        f.rewind().map_err(|e| e.to_string())?;
        if size.is_some_and(|s| s != len) {
            return Err(format!(
                "size ({len} bytes, expected {})",
                size.unwrap_or(0)
            ));
        }
        let digest = match self {
            Check::Sha256 => hash_reader::<Sha256>(&mut f, b""),
            Check::GitOid => hash_reader::<Sha1>(&mut f, format!("blob {len}\0").as_bytes()),
        }
        .map_err(|e| e.to_string())?;
        if digest.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            let name = match self {
                Check::Sha256 => "sha256",
                Check::GitOid => "git blob id",
            };
            Err(format!("{name} ({digest}, expected {expected})"))
        }
    }
}

fn hash_reader<D: Digest>(r: &mut impl Read, prefix: &[u8]) -> std::io::Result<String> {
    let mut h = D::new();
    h.update(prefix);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find('/') {
        Some(i) => &url[..start + i],
        None => url,
    }
}

fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rsplit_once('/').map_or(base, |(d, _)| d);
        format!("{dir}/{location}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_redirect_locations() {
        let base = "http://127.0.0.1:80/org/name/resolve/abc/model.safetensors";
        assert_eq!(origin(base), "http://127.0.0.1:80");
        assert_eq!(
            join_url(base, "/cdn/x?y=1"),
            "http://127.0.0.1:80/cdn/x?y=1"
        );
        assert_eq!(
            join_url(base, "https://cdn.example/x"),
            "https://cdn.example/x"
        );
    }

    #[test]
    fn git_blob_id_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let mut r: &[u8] = b"hello\n";
        let id = hash_reader::<Sha1>(&mut r, b"blob 6\0").unwrap();
        assert_eq!(id, "ce013625030ba8dba906f756967f9e9ca394464a");
    }
}
