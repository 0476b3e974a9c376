//! A mock of the part of the Hugging Face hub slm speaks, on 127.0.0.1 at a random port:
//! `api/models/{repo}/revision/{rev}?blobs=true`, `{repo}/resolve/{rev}/{file}` (LFS files
//! redirect to `/cdn/{sha256}` with X-Repo-Commit and X-Linked-Etag, as the hub does), Range
//! requests, and faults to inject: cut connections, corrupted bytes, error statuses.
//! Shared by the library's and the CLI's tests.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

pub struct MockFile {
    pub name: String,
    pub data: Arc<Vec<u8>>,
    pub lfs: bool,
    sha256: String,
    oid: String,
}

impl MockFile {
    pub fn new(name: &str, data: Arc<Vec<u8>>, lfs: bool) -> Self {
        let sha256 = hex(&Sha256::digest(data.as_slice()));
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", data.len()).as_bytes());
        h.update(data.as_slice());
        let oid = hex(&h.finalize());
        Self {
            name: name.into(),
            data,
            lfs,
            sha256,
            oid,
        }
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The name the cache stores it under: sha256 for LFS files, the git blob id otherwise.
    pub fn blob(&self) -> &str {
        if self.lfs {
            &self.sha256
        } else {
            &self.oid
        }
    }
}

#[derive(Default)]
pub struct MockRepo {
    pub commit: String,
    /// Branch or tag → commit; `main` → `commit` is implied.
    pub branches: Vec<(String, String)>,
    pub files: Vec<MockFile>,
    /// Files need `Authorization: Bearer <token>`; without it the hub answers 401 GatedRepo.
    pub gated_token: Option<String>,
    /// Listed in the model info as they are, served by nobody (hostile or missing names).
    pub extra_siblings: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Fault {
    /// Send the headers for the whole body, then only this many bytes, then close.
    Cut(usize),
    /// Flip one byte of the body.
    Corrupt,
    /// Send the headers for the whole body, then this many bytes, then nothing for 5 s.
    Stall(usize),
    /// Answer `resolve/` with this status.
    Status(u16),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, MockRepo>,
    faults: HashMap<String, VecDeque<Fault>>,
    log: Vec<Request>,
}

#[derive(Clone)]
pub struct MockHub {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl MockHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Self {
            url,
            state: Arc::default(),
        };
        let h = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let h = h.clone();
                std::thread::spawn(move || h.serve(stream));
            }
        });
        hub
    }

    pub fn add_repo(&self, id: &str, repo: MockRepo) {
        self.state.lock().unwrap().repos.insert(id.into(), repo);
    }

    pub fn fault(&self, file: &str, faults: &[Fault]) {
        let mut s = self.state.lock().unwrap();
        s.faults
            .entry(file.into())
            .or_default()
            .extend(faults.iter().cloned());
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let path = target.split('?').next().unwrap_or("").to_string();
        let req = Request {
            method,
            path: path.clone(),
            range: headers.get("range").cloned(),
            auth: headers.get("authorization").cloned(),
        };
        self.state.lock().unwrap().log.push(req.clone());
        let mut out = stream;
        let _ = self.route(&req, &mut out);
    }

    fn route(&self, req: &Request, out: &mut TcpStream) -> std::io::Result<()> {
        let path = req.path.replace("%2F", "/");
        if let Some(rest) = path.strip_prefix("/api/models/") {
            return self.model_info(rest, out);
        }
        if let Some(sha) = path.strip_prefix("/cdn/") {
            let state = self.state.lock().unwrap();
            let file = state
                .repos
                .values()
                .flat_map(|r| &r.files)
                .find(|f| f.sha256 == sha)
                .map(|f| (f.name.clone(), f.data.clone()));
            drop(state);
            return match file {
                Some((name, data)) => self.send_data(req, &name, &data, &[], out),
                None => respond(out, 404, &[], b""),
            };
        }
        // /{org}/{name}/resolve/{rev}/{file...}
        let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if segs.len() == 5 && segs[2] == "resolve" {
            return self.resolve(
                &format!("{}/{}", segs[0], segs[1]),
                segs[3],
                segs[4],
                req,
                out,
            );
        }
        respond(out, 404, &[], b"")
    }

    fn model_info(&self, rest: &str, out: &mut TcpStream) -> std::io::Result<()> {
        let Some((repo_id, rev)) = rest.split_once("/revision/") else {
            return respond(out, 404, &[], b"");
        };
        let state = self.state.lock().unwrap();
        let Some(repo) = state.repos.get(repo_id) else {
            return respond(out, 404, &[("X-Error-Code", "RepoNotFound".into())], b"");
        };
        let Some(commit) = resolve_rev(repo, rev) else {
            return respond(
                out,
                404,
                &[("X-Error-Code", "RevisionNotFound".into())],
                b"",
            );
        };
        let mut siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({
                    "rfilename": f.name,
                    "size": if f.lfs { 134 } else { f.data.len() },
                    "blobId": f.oid,
                });
                if f.lfs {
                    s["size"] = f.data.len().into();
                    s["lfs"] = serde_json::json!({
                        "sha256": f.sha256, "size": f.data.len(), "pointerSize": 134
                    });
                }
                s
            })
            .collect();
        for name in &repo.extra_siblings {
            siblings.push(serde_json::json!({
                "rfilename": name, "size": 5,
                "blobId": "0123456789abcdef0123456789abcdef01234567",
            }));
        }
        let body = serde_json::json!({"id": repo_id, "sha": commit, "siblings": siblings});
        drop(state);
        respond(out, 200, &[], body.to_string().as_bytes())
    }

    fn resolve(
        &self,
        repo_id: &str,
        rev: &str,
        name: &str,
        req: &Request,
        out: &mut TcpStream,
    ) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if let Some(Fault::Status(code)) = state.faults.get(name).and_then(|q| q.front()) {
            let code = *code;
            state.faults.get_mut(name).unwrap().pop_front();
            return respond(out, code, &[], b"");
        }
        let Some(repo) = state.repos.get(repo_id) else {
            return respond(out, 404, &[("X-Error-Code", "RepoNotFound".into())], b"");
        };
        let Some(commit) = resolve_rev(repo, rev) else {
            return respond(
                out,
                404,
                &[("X-Error-Code", "RevisionNotFound".into())],
                b"",
            );
        };
        if let Some(token) = &repo.gated_token {
            if req.auth.as_deref() != Some(&format!("Bearer {token}")) {
                return respond(out, 401, &[("X-Error-Code", "GatedRepo".into())], b"");
            }
        }
        let Some(f) = repo.files.iter().find(|f| f.name == name) else {
            return respond(out, 404, &[("X-Error-Code", "EntryNotFound".into())], b"");
        };
        let mut headers = vec![("X-Repo-Commit", commit.clone())];
        if f.lfs {
            headers.push(("X-Linked-Etag", format!("\"{}\"", f.sha256)));
            headers.push(("X-Linked-Size", f.data.len().to_string()));
            headers.push(("ETag", "\"pointer-file-oid\"".into()));
            headers.push(("Location", format!("/cdn/{}", f.sha256)));
            drop(state);
            return respond(out, 302, &headers, b"");
        }
        headers.push(("ETag", format!("\"{}\"", f.oid)));
        let (name, data) = (f.name.clone(), f.data.clone());
        drop(state);
        self.send_data(req, &name, &data, &headers, out)
    }

    fn send_data(
        &self,
        req: &Request,
        name: &str,
        data: &[u8],
        extra: &[(&str, String)],
        out: &mut TcpStream,
    ) -> std::io::Result<()> {
        let fault = {
            let mut s = self.state.lock().unwrap();
            let q = s.faults.entry(name.into()).or_default();
            match q.front() {
                Some(Fault::Cut(_) | Fault::Corrupt | Fault::Stall(_)) => q.pop_front(),
                _ => None,
            }
        };
        let start = req
            .range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        let mut headers: Vec<(&str, String)> = extra.to_vec();
        let (status, body) = match start {
            Some(s) if s < data.len() => {
                headers.push((
                    "Content-Range",
                    format!("bytes {s}-{}/{}", data.len() - 1, data.len()),
                ));
                (206, &data[s..])
            }
            Some(_) => return respond(out, 416, &headers, b""),
            None => (200, data),
        };
        match fault {
            Some(Fault::Cut(n)) => {
                headers.push(("Content-Length", body.len().to_string()));
                write_head(out, status, &headers, body.len())?;
                out.write_all(&body[..n.min(body.len())])?;
                out.flush()?;
                out.shutdown(std::net::Shutdown::Both)
            }
            Some(Fault::Stall(n)) => {
                headers.push(("Content-Length", body.len().to_string()));
                write_head(out, status, &headers, body.len())?;
                out.write_all(&body[..n.min(body.len())])?;
                out.flush()?;
                std::thread::sleep(std::time::Duration::from_secs(5));
                out.shutdown(std::net::Shutdown::Both)
            }
            Some(Fault::Corrupt) => {
                let mut bad = body.to_vec();
                let mid = bad.len() / 2;
                bad[mid] ^= 0x55;
                respond(out, status, &headers, &bad)
            }
            _ => respond(out, status, &headers, body),
        }
    }
}

fn resolve_rev(repo: &MockRepo, rev: &str) -> Option<String> {
    if rev == repo.commit || rev == "main" {
        return Some(repo.commit.clone());
    }
    repo.branches
        .iter()
        .find(|(b, c)| b == rev || c == rev)
        .map(|(_, c)| c.clone())
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    len: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fake but well-formed commit sha.
pub fn commit(seed: &str) -> String {
    hex(&Sha1::digest(seed.as_bytes()))
}

/// The real all-MiniLM-L6-v2 folder from the assets as a hub repo: weights over LFS, the small
/// files in git, as on the hub.
pub fn minilm_repo(assets: &Path) -> MockRepo {
    let dir = assets.join("models/all-MiniLM-L6-v2");
    let files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "README.md",
        "model.safetensors",
    ];
    MockRepo {
        commit: commit("minilm"),
        files: files
            .iter()
            .map(|f| {
                let data = std::fs::read(dir.join(f))
                    .unwrap_or_else(|e| panic!("{}: {e} (set SLM_ASSETS)", dir.join(f).display()));
                MockFile::new(f, Arc::new(data), f.ends_with(".safetensors"))
            })
            .collect(),
        ..Default::default()
    }
}
