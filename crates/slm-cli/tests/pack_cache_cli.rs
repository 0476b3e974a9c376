//! The packed-weights cache seen from the command line: it changes no output, a first load
//! leaves exactly one whole cache file, later loads read it, and a damaged one is rewritten.

use crate::common::{run_env, smollm2, tempdir};

fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn the_packed_weights_cache_is_written_once_read_after_and_rewritten_when_damaged() {
    let dir = tempdir("pack-cache");
    let cache = dir.join("packed");
    let model = smollm2();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "24",
        "The three primary colors are",
    ];
    let with = |c: &str| {
        let (code, out, err) = run_env(&args, None, &[("SLM_PACK_CACHE", c)]);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("cache"), "{err}");
        out
    };
    let want = with("off");
    assert!(!cache.exists());
    let c = cache.to_str().unwrap();
    let info = |c: &str| {
        let (code, out, err) = run_env(
            &["info", "--model", model.to_str().unwrap()],
            None,
            &[("SLM_PACK_CACHE", c)],
        );
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.starts_with("packed cache:"))
            .unwrap_or_default()
            .to_string()
    };
    assert!(info("off").ends_with(" off"), "{}", info("off"));
    assert!(
        info(c).ends_with("(written at the next load)"),
        "{}",
        info(c)
    );

    // The first load packs, writes the cache and waits for it before exiting.
    assert_eq!(with(c), want);
    let files = cache_files(&cache);
    assert_eq!(
        files.len(),
        1,
        "one cache file, no temporary ones: {files:?}"
    );
    let file = &files[0];
    assert_eq!(file.extension().unwrap(), "slmpack");
    let whole = std::fs::read(file).unwrap();
    let shown = info(c);
    assert!(
        shown.contains(file.to_str().unwrap()) && shown.ends_with(" MB)"),
        "{shown}"
    );

    // The next loads map it: the same output, the file untouched.
    assert_eq!(with(c), want);
    assert_eq!(cache_files(&cache), files);
    assert!(
        std::fs::read(file).unwrap() == whole,
        "a filled cache is not rewritten"
    );

    // Its planes really are what runs: zeros over a stretch of them change the output.
    let mut zeroed = whole.clone();
    let mid = whole.len() / 2;
    zeroed[mid - (4 << 20)..mid + (4 << 20)].fill(0);
    std::fs::write(file, &zeroed).unwrap();
    assert_ne!(
        with(c),
        want,
        "the output did not come from the cache's planes"
    );

    // A cut file is no cache: the load repacks (same output) and writes it whole again.
    std::fs::write(file, &whole[..whole.len() - 100]).unwrap();
    assert_eq!(with(c), want);
    assert_eq!(cache_files(&cache), files);
    assert!(std::fs::read(file).unwrap() == whole, "rewritten whole");

    // A cache that cannot be written costs nothing but a warning.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::write(&cache, b"a file where the folder should be").unwrap();
    let (code, out, err) = run_env(&args, None, &[("SLM_PACK_CACHE", c)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, want);
    assert_eq!(
        err.matches("cannot write the packed-weights cache").count(),
        1,
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
