//! The hub client against a mock hub on 127.0.0.1 serving real files from the assets.

use crate::mock_hub;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock_hub::{commit, Fault, MockFile, MockHub, MockRepo};
use slm::hub::{self, HubConfig, HubError, ModelRef, NoProgress, Progress, Selection};

fn scratch(name: &str) -> crate::scratch::Scratch {
    crate::scratch::Scratch::new(&format!("hub-{name}"))
}

fn config(hub: &MockHub, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: hub.url.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        retries: 2,
        backoff: Duration::from_millis(50),
        read_timeout: Duration::from_secs(10),
        parallel: 4,
    }
}

fn asset(rel: &str) -> Arc<Vec<u8>> {
    let p = slm::assets_dir().join(rel);
    Arc::new(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (set SLM_ASSETS)", p.display())))
}

/// Three real files, the tokenizer (466 kB) over LFS: small enough to download many times.
fn small_repo() -> MockRepo {
    let m = "models/all-MiniLM-L6-v2/";
    MockRepo {
        commit: commit("small"),
        files: vec![
            MockFile::new("config.json", asset(&format!("{m}config.json")), false),
            MockFile::new("vocab.txt", asset(&format!("{m}vocab.txt")), false),
            MockFile::new("tokenizer.json", asset(&format!("{m}tokenizer.json")), true),
        ],
        ..Default::default()
    }
}

fn everything() -> Selection {
    Selection {
        include: vec!["*".into()],
        ..Default::default()
    }
}

fn pull(id: &str, sel: &Selection, cfg: &HubConfig) -> hub::Result<hub::Snapshot> {
    hub::pull(&ModelRef::parse(id).unwrap(), sel, cfg, &NoProgress)
}

fn blob(cache: &Path, repo: &str, name: &str) -> PathBuf {
    cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("blobs")
        .join(name)
}

#[test]
fn pull_builds_the_hf_cache_layout_and_a_second_pull_makes_no_request() {
    let hub = MockHub::start();
    let repo = mock_hub::minilm_repo(&slm::assets_dir());
    let sha = repo.commit.clone();
    let expected: Vec<(String, Vec<u8>, String)> = repo
        .files
        .iter()
        .map(|f| (f.name.clone(), f.data.to_vec(), f.blob().to_string()))
        .collect();
    hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", repo);
    let cache = scratch("layout");
    let cfg = config(&hub, &cache);

    let snap = pull(
        "sentence-transformers/all-MiniLM-L6-v2",
        &Selection::default(),
        &cfg,
    )
    .unwrap();
    let repo_dir = cache.join("models--sentence-transformers--all-MiniLM-L6-v2");
    assert_eq!(snap.commit, sha);
    assert_eq!(snap.dir, repo_dir.join("snapshots").join(&sha));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        sha
    );
    for (name, data, blob_name) in &expected {
        let link = snap.dir.join(name);
        if name == "README.md" {
            assert!(!link.exists(), "README.md is not a model file");
            continue;
        }
        // A relative symlink into blobs/, as huggingface_hub makes it.
        let target = std::fs::read_link(&link).unwrap();
        let up = "../".repeat(2 + name.matches('/').count());
        assert_eq!(
            target,
            PathBuf::from(format!("{up}blobs/{blob_name}")),
            "{name}"
        );
        assert_eq!(&std::fs::read(&link).unwrap(), data, "{name}");
    }
    let requests = hub.requests().len();

    // The cache answers: no request, for pull and for resolving a --model id.
    let again = pull(
        "sentence-transformers/all-MiniLM-L6-v2",
        &Selection::default(),
        &cfg,
    )
    .unwrap();
    assert_eq!(again.dir, snap.dir);
    let path =
        hub::resolve_model("sentence-transformers/all-MiniLM-L6-v2", &cfg, &NoProgress).unwrap();
    assert_eq!(path, snap.dir);
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    assert_eq!(
        pull(
            "sentence-transformers/all-MiniLM-L6-v2",
            &Selection::default(),
            &offline
        )
        .unwrap()
        .dir,
        snap.dir
    );
    assert_eq!(hub.requests().len(), requests);

    // The snapshot is a model folder the loaders open.
    let enc = slm::models::load_encoder(&path).unwrap();
    assert_eq!(enc.model.config.hidden_size, 384);

    // list and rm see it.
    let listed = cfg.cache().list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].repo, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(listed[0].refs, vec![("main".to_string(), sha.clone())]);
    let total: u64 = expected
        .iter()
        .filter(|e| e.0 != "README.md")
        .map(|e| e.1.len() as u64)
        .sum();
    assert_eq!(listed[0].size, total);
    assert_eq!(
        cfg.cache()
            .remove("sentence-transformers/all-MiniLM-L6-v2")
            .unwrap(),
        total
    );
    assert!(!repo_dir.exists());
    assert!(matches!(
        cfg.cache().remove("sentence-transformers/all-MiniLM-L6-v2"),
        Err(HubError::NotCached(_))
    ));
}

#[test]
fn a_cut_download_resumes_from_the_byte_it_had() {
    let hub = MockHub::start();
    let repo = small_repo();
    let tok = repo.files[2].sha256().to_string();
    let size = repo.files[2].data.len();
    hub.add_repo("org/small", repo);
    let cache = scratch("resume");
    let cut = 100_000;
    hub.fault("tokenizer.json", &[Fault::Cut(cut)]);

    // No retries: the pull fails and leaves the partial file, never a complete-looking one.
    let cfg = HubConfig {
        retries: 0,
        ..config(&hub, &cache)
    };
    let err = pull("org/small", &everything(), &cfg).unwrap_err();
    assert!(matches!(err, HubError::Network { .. }), "{err}");
    let partial = blob(&cache, "org/small", &format!("{tok}.incomplete"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), cut as u64);
    assert!(!blob(&cache, "org/small", &tok).exists());
    let snap_file = cache
        .join("models--org--small/snapshots")
        .join(commit("small"))
        .join("tokenizer.json");
    assert!(!snap_file.exists());

    // The next pull asks for the rest.
    let before = hub.requests().len();
    let snap = pull("org/small", &everything(), &cfg).unwrap();
    let ranges: Vec<_> = hub.requests()[before..]
        .iter()
        .filter_map(|r| r.range.clone())
        .collect();
    assert_eq!(
        ranges,
        vec![format!("bytes={cut}-"), format!("bytes={cut}-")],
        "resolve, then the CDN"
    );
    assert_eq!(
        std::fs::read(snap.dir.join("tokenizer.json")).unwrap(),
        *asset("models/all-MiniLM-L6-v2/tokenizer.json")
    );
    assert!(!partial.exists());
    assert_eq!(
        std::fs::metadata(blob(&cache, "org/small", &tok))
            .unwrap()
            .len(),
        size as u64
    );
}

/// A server that stops sending: each attempt ends after the read timeout
/// (`HF_HUB_DOWNLOAD_TIMEOUT`). Attempts that brought bytes do not use up the retries, so a
/// connection that stalls but moves finishes; one that brings nothing fails after
/// `retries + 1` timeouts, not minutes.
#[test]
fn stalled_downloads_time_out_and_resume_while_they_progress() {
    let hub = MockHub::start();
    let repo = small_repo();
    let size = repo.files[2].data.len();
    hub.add_repo("org/small", repo);
    let cache = scratch("stall");
    let cfg = HubConfig {
        retries: 1,
        read_timeout: Duration::from_millis(300),
        ..config(&hub, &cache)
    };
    // Four stalls, each after 50,000 more bytes: more stalls than retries, all progressing.
    hub.fault("tokenizer.json", &vec![Fault::Stall(50_000); 4]);
    let t = std::time::Instant::now();
    let snap = pull("org/small", &everything(), &cfg).unwrap();
    assert_eq!(
        std::fs::read(snap.dir.join("tokenizer.json"))
            .unwrap()
            .len(),
        size
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // Nothing at all, every time: two timeouts and one backoff, then a network error.
    let cache = scratch("stall-dead");
    let cfg = HubConfig {
        cache_dir: cache.to_path_buf(),
        ..cfg
    };
    hub.fault("tokenizer.json", &vec![Fault::Stall(0); 8]);
    let t = std::time::Instant::now();
    let err = pull("org/small", &everything(), &cfg).unwrap_err();
    assert!(
        matches!(err, HubError::Network { attempts: 2, .. }),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn a_cut_download_is_resumed_within_one_pull_by_the_retry() {
    let hub = MockHub::start();
    hub.add_repo("org/small", small_repo());
    let cache = scratch("retry-resume");
    hub.fault("tokenizer.json", &[Fault::Cut(50_000), Fault::Cut(70_000)]);
    let snap = pull("org/small", &everything(), &config(&hub, &cache)).unwrap();
    let ranges: Vec<_> = hub
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .map(|r| r.range.clone())
        .collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=50000-".into()),
            Some("bytes=120000-".into())
        ]
    );
    assert_eq!(
        std::fs::read(snap.dir.join("tokenizer.json")).unwrap(),
        *asset("models/all-MiniLM-L6-v2/tokenizer.json")
    );
}

#[test]
fn corrupted_bytes_are_fetched_again_once_then_refused() {
    let hub = MockHub::start();
    let repo = small_repo();
    let (tok, vocab) = (
        repo.files[2].sha256().to_string(),
        repo.files[1].blob().to_string(),
    );
    hub.add_repo("org/small", repo);

    // Once: detected, fetched again, fine.
    let cache = scratch("corrupt-once");
    hub.fault("tokenizer.json", &[Fault::Corrupt]);
    let snap = pull("org/small", &everything(), &config(&hub, &cache)).unwrap();
    assert_eq!(
        std::fs::read(snap.dir.join("tokenizer.json")).unwrap(),
        *asset("models/all-MiniLM-L6-v2/tokenizer.json")
    );

    // Twice (an LFS file and a git file): a clear error, nothing in the cache.
    for (file, blob_name) in [("tokenizer.json", &tok), ("vocab.txt", &vocab)] {
        let cache = scratch(&format!("corrupt-twice-{file}"));
        hub.fault(file, &[Fault::Corrupt, Fault::Corrupt]);
        let err = pull("org/small", &everything(), &config(&hub, &cache)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HubError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains(file) && msg.contains("nothing was put in the cache"),
            "{msg}"
        );
        let blobs = cache.join("models--org--small/blobs");
        assert!(!blobs.join(blob_name).exists());
        assert!(!blobs.join(format!("{blob_name}.incomplete")).exists());
        assert!(!cache
            .join("models--org--small/snapshots")
            .join(commit("small"))
            .join(file)
            .exists());
    }
}

#[test]
fn gated_missing_and_failing_repos_give_clear_errors() {
    let hub = MockHub::start();
    hub.add_repo(
        "org/gated",
        MockRepo {
            gated_token: Some("hf_secret".into()),
            ..small_repo()
        },
    );
    hub.add_repo(
        "org/holes",
        MockRepo {
            extra_siblings: vec!["missing.json".into()],
            ..small_repo()
        },
    );
    let cache = scratch("errors");
    let cfg = config(&hub, &cache);

    let err = pull("org/gated", &everything(), &cfg).unwrap_err();
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    let with_token = HubConfig {
        token: Some("hf_secret".into()),
        ..cfg.clone()
    };
    pull("org/gated", &everything(), &with_token).unwrap();
    assert!(hub
        .requests()
        .iter()
        .filter(|r| r.path.contains("/resolve/"))
        .any(|r| r.auth.as_deref() == Some("Bearer hf_secret")));

    let err = pull("org/nothing", &everything(), &cfg).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
    assert!(err.to_string().contains("org/nothing"), "{err}");

    let only_missing = Selection {
        include: vec!["missing.json".into()],
        ..Default::default()
    };
    let err = pull("org/holes", &only_missing, &cfg).unwrap_err();
    assert!(matches!(err, HubError::FileNotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.json"), "{err}");

    let err = pull("org/small-but-absent@v9", &everything(), &cfg).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
}

#[test]
fn server_errors_are_retried_with_backoff() {
    let hub = MockHub::start();
    hub.add_repo("org/small", small_repo());
    let cache = scratch("retry-500");
    let cfg = config(&hub, &cache);
    hub.fault("config.json", &[Fault::Status(500), Fault::Status(503)]);
    let t = Instant::now();
    let only_config = Selection {
        include: vec!["config.json".into()],
        ..Default::default()
    };
    pull("org/small", &only_config, &cfg).unwrap();
    // Backoff 50 ms, then 100 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    let resolves = hub
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/config.json"))
        .count();
    assert_eq!(resolves, 3);

    let cache = scratch("retry-500-gives-up");
    let cfg = config(&hub, &cache);
    hub.fault(
        "config.json",
        &[Fault::Status(500), Fault::Status(500), Fault::Status(500)],
    );
    let err = pull("org/small", &only_config, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Http {
                status: 500,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn revisions_pin_commits_and_branches_resolve_to_theirs() {
    let hub = MockHub::start();
    let dev = commit("dev");
    let mut repo = small_repo();
    repo.branches = vec![("dev".into(), dev.clone())];
    let main = repo.commit.clone();
    hub.add_repo("org/small", repo);
    let cache = scratch("revisions");
    let cfg = config(&hub, &cache);

    let snap = pull(&format!("org/small@{main}"), &everything(), &cfg).unwrap();
    assert_eq!(snap.commit, main);
    assert!(
        !cache.join("models--org--small/refs").exists(),
        "a pinned commit writes no ref"
    );

    let snap = pull("org/small@dev", &everything(), &cfg).unwrap();
    assert_eq!(snap.commit, dev);
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--small/refs/dev")).unwrap(),
        dev
    );
    assert!(snap.dir.ends_with(&dev));
    // The blobs are shared between the two snapshots.
    assert_eq!(
        std::fs::read_dir(cache.join("models--org--small/blobs"))
            .unwrap()
            .count(),
        3
    );

    let err = pull("org/small@nope", &everything(), &cfg).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err}");
}

#[test]
fn offline_mode_never_touches_the_network() {
    let hub = MockHub::start();
    hub.add_repo("org/small", small_repo());
    let cache = scratch("offline");
    let offline = HubConfig {
        offline: true,
        ..config(&hub, &cache)
    };
    let err = pull("org/small", &everything(), &offline).unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(hub.requests().is_empty());

    pull("org/small", &everything(), &config(&hub, &cache)).unwrap();
    let n = hub.requests().len();
    let snap = pull("org/small", &everything(), &offline).unwrap();
    assert_eq!(snap.files.len(), 3);
    // Even --refresh stays offline.
    let refresh = Selection {
        refresh: true,
        ..everything()
    };
    pull("org/small", &refresh, &offline).unwrap();
    assert_eq!(hub.requests().len(), n);
}

#[test]
fn hostile_file_names_are_refused() {
    for name in [
        "../../outside.json",
        "/tmp/slm-hub-absolute.json",
        "a/../../../x.json",
    ] {
        let hub = MockHub::start();
        hub.add_repo(
            "org/hostile",
            MockRepo {
                extra_siblings: vec![name.into()],
                ..small_repo()
            },
        );
        let cache = scratch("hostile");
        let err = pull("org/hostile", &everything(), &config(&hub, &cache)).unwrap_err();
        assert!(matches!(err, HubError::HostileName(_)), "{err}");
        assert!(err.to_string().contains(name), "{err}");
        assert!(
            !cache.join("outside.json").exists()
                && !cache.parent().unwrap().join("outside.json").exists()
        );
        assert!(!Path::new("/tmp/slm-hub-absolute.json").exists());
        assert!(
            !hub.requests().iter().any(|r| r.path.contains("/resolve/")),
            "nothing downloaded"
        );
    }
}

/// Counts what the progress callbacks report.
#[derive(Default)]
struct Tally(Mutex<(u64, usize)>);
impl Progress for Tally {
    fn bytes(&self, _: &str, n: u64) {
        self.0.lock().unwrap().0 += n;
    }
    fn file_done(&self, _: &str) {
        self.0.lock().unwrap().1 += 1;
    }
}

#[test]
fn progress_reports_every_byte_and_file() {
    let hub = MockHub::start();
    let repo = small_repo();
    let total: u64 = repo.files.iter().map(|f| f.data.len() as u64).sum();
    hub.add_repo("org/small", repo);
    let tally = Tally::default();
    let cache = scratch("progress");
    let cfg = config(&hub, &cache);
    hub::pull(
        &ModelRef::parse("org/small").unwrap(),
        &everything(),
        &cfg,
        &tally,
    )
    .unwrap();
    assert_eq!(*tally.0.lock().unwrap(), (total, 3));
}
