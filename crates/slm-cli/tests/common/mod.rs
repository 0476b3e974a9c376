#![allow(dead_code)]
//! Helpers shared by the binary's integration tests.

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A file or folder of the shared assets; missing is a failure that says how to get it.
pub fn asset(rel: &str) -> PathBuf {
    let p = slm::assets_dir().join(rel);
    assert!(
        p.exists(),
        "missing {} (set SLM_ASSETS, or run tools/fetch_assets.sh)",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    asset("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn minilm() -> PathBuf {
    asset("models/all-MiniLM-L6-v2")
}

/// A fresh, empty folder unique to this process and `name`, removed when dropped.
pub fn tempdir(name: &str) -> super::scratch::Scratch {
    super::scratch::Scratch::new(name)
}

/// Runs the binary (without RUST_BACKTRACE, so errors are one line): exit code, stdout, stderr.
pub fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    run_env(args, stdin, &[])
}

/// The binary without the caller's RUST_BACKTRACE (errors stay one line) or hub variables.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slm"));
    for k in [
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
    ] {
        cmd.env_remove(k);
    }
    // Packed-weights caches of the many models tests write go under target/, not ~/.cache.
    cmd.env(
        "SLM_PACK_CACHE",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pack-cache"),
    );
    cmd
}

/// `run` with extra environment variables; the hub variables of the caller are not passed on.
pub fn run_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = command();
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
