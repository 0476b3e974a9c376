//! `slm pull/list/rm` and `--model ORG/NAME` through the binary, against the mock hub.

use crate::common;
use crate::mock_hub;

use std::sync::Arc;

use common::{minilm, run_env, smollm2, tempdir};
use mock_hub::{commit, MockFile, MockHub, MockRepo};

fn env<'a>(hub: &'a MockHub, cache: &'a str) -> [(&'a str, &'a str); 2] {
    [("HF_ENDPOINT", hub.url.as_str()), ("HF_HUB_CACHE", cache)]
}

#[test]
fn pull_then_model_id_runs_from_the_cache_without_requests() {
    let hub = MockHub::start();
    hub.add_repo(
        "sentence-transformers/all-MiniLM-L6-v2",
        mock_hub::minilm_repo(&slm::assets_dir()),
    );
    let cache = tempdir("hub-pull");
    let cache = cache.to_str().unwrap();
    let env = env(&hub, cache);

    let (code, out, err) = run_env(
        &["pull", "sentence-transformers/all-MiniLM-L6-v2"],
        None,
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let snapshot = out.trim();
    assert!(
        snapshot.ends_with(&format!("snapshots/{}", commit("minilm"))),
        "{out}"
    );
    assert!(err.contains("10 files"), "{err}");
    let pulled = hub.requests().len();

    // The id runs from the cache: no request, same vectors as the assets folder.
    let id = "sentence-transformers/all-MiniLM-L6-v2";
    let (code, by_id, err) = run_env(&["embed", "-m", id, "the cat sat"], None, &env);
    assert_eq!(code, 0, "{err}");
    let (code, by_path, err) = run_env(
        &["embed", "-m", minilm().to_str().unwrap(), "the cat sat"],
        None,
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(by_id, by_path);
    let (code, _, err) = run_env(&["pull", id], None, &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(hub.requests().len(), pulled, "the cache must answer");

    let (_, listed, _) = run_env(&["list"], None, &env);
    assert!(
        listed.contains(id) && listed.contains(&format!("main ({})", &commit("minilm")[..8])),
        "{listed}"
    );
    let (code, _, err) = run_env(&["rm", id], None, &env);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed"), "{err}");
    let (_, listed, _) = run_env(&["list", "--json"], None, &env);
    assert_eq!(listed.trim(), "");
    let (code, _, err) = run_env(&["rm", id], None, &env);
    assert_eq!(code, 1);
    assert!(err.contains("not in the cache"), "{err}");
}

#[test]
fn a_gguf_repo_id_with_a_quant_is_pulled_on_first_use() {
    let hub = MockHub::start();
    let gguf = Arc::new(std::fs::read(smollm2()).unwrap());
    hub.add_repo(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        MockRepo {
            commit: commit("smol"),
            files: vec![
                MockFile::new("README.md", Arc::new(b"# SmolLM2\n".to_vec()), false),
                MockFile::new("smollm2-135m-instruct-q4_1.gguf", gguf, true),
            ],
            ..Default::default()
        },
    );
    let cache = tempdir("hub-gguf");
    let env = env(&hub, cache.to_str().unwrap());
    let args = [
        "generate",
        "-m",
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
        // f32 arithmetic: transformers' greedy text (the quantized kernels meet a near-tie).
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "-n",
        "12",
        "Once upon a time, there was a little",
    ];
    let (code, out, err) = run_env(&args, None, &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim_end(),
        " girl named Emma who loved to play in the sun. She"
    );
    assert!(hub.requests().iter().any(|r| r.path.starts_with("/cdn/")));
    let n = hub.requests().len();
    let (code, again, err) = run_env(&args, None, &env);
    assert_eq!((code, again), (0, out), "{err}");
    assert_eq!(hub.requests().len(), n);

    // The quantized kernels pack the file once into the packed-weights cache; removing the
    // model removes that too.
    let packed = cache.join("packed");
    let [e1, e2] = env;
    let env = [e1, e2, ("SLM_PACK_CACHE", packed.to_str().unwrap())];
    let quantized: Vec<&str> = args
        .iter()
        .filter(|a| !["--dtype", "f32"].contains(a))
        .copied()
        .collect();
    let (code, _, err) = run_env(&quantized, None, &env);
    assert_eq!(code, 0, "{err}");
    let caches = || std::fs::read_dir(&packed).unwrap().count();
    assert_eq!(caches(), 1);
    let (code, _, err) = run_env(
        &["rm", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"],
        None,
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("of packed weights"), "{err}");
    assert_eq!(caches(), 0);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A newcomer's machine: no shared assets, nothing cached. The README's main command, exactly
/// as written, takes the default model from the hub into the cache and generates; the second
/// run needs no request. With the hub unreachable the error says what to do.
#[test]
fn the_readme_command_on_a_fresh_machine_downloads_the_default_model() {
    let hub = MockHub::start();
    let gguf = Arc::new(std::fs::read(smollm2()).unwrap());
    hub.add_repo(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        MockRepo {
            commit: commit("smol-default"),
            files: vec![
                MockFile::new("README.md", Arc::new(b"# SmolLM2\n".to_vec()), false),
                MockFile::new("smollm2-135m-instruct-q4_1.gguf", gguf, true),
            ],
            ..Default::default()
        },
    );
    let cache = tempdir("hub-fresh");
    let cache_s = cache.to_str().unwrap();
    let [e1, e2] = env(&hub, cache_s);
    let fresh = [e1, e2, ("SLM_ASSETS", "/nonexistent/assets")];
    let readme = ["generate", "Once upon a time, there was a little"];
    let (code, out, err) = run_env(&readme, None, &fresh);
    assert_eq!(code, 0, "{err}");
    assert!(out.split_whitespace().count() > 20, "{out}");
    assert!(hub.requests().iter().any(|r| r.path.starts_with("/cdn/")));
    let blobs = cache.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF/blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 1);
    // Sampling is seeded: the cached model gives the same text, without a request.
    let n = hub.requests().len();
    let (code, again, err) = run_env(&readme, None, &fresh);
    assert_eq!((code, &again), (0, &out), "{err}");
    assert_eq!(hub.requests().len(), n);

    let empty = tempdir("hub-fresh-unreachable");
    let (code, _, err) = run_env(
        &readme,
        None,
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HUB_CACHE", empty.to_str().unwrap()),
            ("SLM_ASSETS", "/nonexistent/assets"),
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("the default model is neither in SLM_ASSETS (/nonexistent/assets)")
            && err.contains("fetch_assets.sh")
            && err.matches("127.0.0.1:9").count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn offline_and_missing_models_fail_in_one_line() {
    let hub = MockHub::start();
    let cache = tempdir("hub-offline");
    let cache = cache.to_str().unwrap();
    let [e1, e2] = env(&hub, cache);
    let (code, _, err) = run_env(
        &["info", "-m", "org/absent"],
        None,
        &[e1, e2, ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("org/absent"),
        "{err}"
    );
    assert!(hub.requests().is_empty());

    let (code, _, err) = run_env(&["pull", "org/absent"], None, &[e1, e2]);
    assert_eq!(code, 1);
    assert!(err.contains("org/absent not found"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let (code, _, err) = run_env(&["pull", "not a model id"], None, &[e1, e2]);
    assert_eq!(code, 1);
    assert!(err.contains("ORG/NAME"), "{err}");
}
