//! The huggingface_hub cache layout:
//! `models--org--name/blobs/<sha256 or git oid>` holds each file once,
//! `refs/<revision>` holds the commit a branch or tag pointed to when last fetched, and
//! `snapshots/<commit>/<file>` links to the blob.

use std::path::{Path, PathBuf};

use super::{io_err, is_commit_sha, HubError, Result};
use crate::io::write::write_atomic;

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// One cached repository, as `slm list` shows it.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo: String,
    pub dir: PathBuf,
    /// (revision, commit) for every ref.
    pub refs: Vec<(String, String)>,
    pub snapshots: Vec<String>,
    /// Bytes of complete blobs.
    pub size: u64,
    /// Bytes of interrupted downloads waiting to resume.
    pub incomplete: u64,
}

impl Cache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    pub fn blob_path(&self, repo: &str, blob: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(blob)
    }

    /// The commit a revision stands for, from the cache alone: a commit sha with a snapshot
    /// folder is itself, a branch or tag is read from `refs/`.
    pub fn commit_for(&self, repo: &str, revision: &str) -> Option<String> {
        if is_commit_sha(revision) {
            return self
                .snapshot_dir(repo, revision)
                .is_dir()
                .then(|| revision.to_string());
        }
        let commit =
            std::fs::read_to_string(self.repo_dir(repo).join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        is_commit_sha(commit).then(|| commit.to_string())
    }

    pub fn write_ref(&self, repo: &str, revision: &str, commit: &str) -> Result<()> {
        let path = self.repo_dir(repo).join("refs").join(revision);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_atomic(&path, |w| std::io::Write::write_all(w, commit.as_bytes()))?;
        Ok(())
    }

    /// Makes `snapshots/<commit>/<file>` point at the blob: a relative symlink as
    /// huggingface_hub makes it, or a copy where the system has no symlinks.
    pub fn link(&self, repo: &str, commit: &str, file: &str, blob: &str) -> Result<()> {
        let target = self.snapshot_dir(repo, commit).join(file);
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!(".{blob}.{}.link", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        #[cfg(unix)]
        {
            let depth = 2 + file.matches('/').count();
            let rel = format!("{}blobs/{blob}", "../".repeat(depth));
            std::os::unix::fs::symlink(rel, &tmp).map_err(io_err(&tmp))?;
        }
        #[cfg(not(unix))]
        std::fs::copy(self.blob_path(repo, blob), &tmp).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io_err(&target))
    }

    pub fn list(&self) -> Result<Vec<CachedRepo>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut repos = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("models--") else {
                continue;
            };
            let dir = entry.path();
            let refs = files_under(&dir.join("refs"))
                .into_iter()
                .filter_map(|r| {
                    let c = std::fs::read_to_string(dir.join("refs").join(&r)).ok()?;
                    Some((r, c.trim().to_string()))
                })
                .collect();
            let mut snapshots: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            snapshots.sort();
            let (mut size, mut incomplete) = (0, 0);
            for blob in std::fs::read_dir(dir.join("blobs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let len = blob.metadata().map(|m| m.len()).unwrap_or(0);
                if blob.file_name().to_string_lossy().ends_with(".incomplete") {
                    incomplete += len;
                } else {
                    size += len;
                }
            }
            repos.push(CachedRepo {
                repo: rest.replacen("--", "/", 1),
                dir,
                refs,
                snapshots,
                size,
                incomplete,
            });
        }
        repos.sort_by(|a, b| a.repo.cmp(&b.repo));
        Ok(repos)
    }

    /// Deletes a repository's folder; returns the bytes freed.
    pub fn remove(&self, repo: &str) -> Result<u64> {
        let found = self.list()?.into_iter().find(|r| r.repo == repo);
        let Some(r) = found else {
            return Err(HubError::NotCached(repo.to_string()));
        };
        std::fs::remove_dir_all(&r.dir).map_err(io_err(&r.dir))?;
        Ok(r.size + r.incomplete)
    }
}

/// Relative paths (with `/`) of the files under `dir`, sorted; empty when it does not exist.
pub(crate) fn files_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            // metadata() follows the snapshot symlinks: a dangling link is not a file.
            match std::fs::metadata(e.path()) {
                Ok(m) if m.is_dir() => walk(&e.path(), &format!("{rel}/"), out),
                Ok(_) => out.push(rel),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}
