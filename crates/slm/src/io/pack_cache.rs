//! The repacked-weights cache: the planes slm's kernels repack a GGUF file's weights into,
//! written to a file on the first load and mapped, not rebuilt, on every later one.
//!
//! Why: llama.cpp maps a GGUF file and reads it in place, so its load writes almost nothing.
//! slm repacks every weight into interleaved layouts, which means writing the whole model into
//! fresh memory at each load; on a VM whose host backs guest memory lazily, faulting in those
//! fresh huge pages took 0.02-0.42 s for 160 MB, from run to run. A mapped cache file is read
//! from the page cache instead: written in 2 MB pieces, a file on a filesystem that keeps
//! large folios (ext4 on Linux 6.18, measured) is mapped with 2 MB pages as well, so decode
//! keeps the huge-page TLB reach the anonymous planes had; elsewhere it is mapped with 4 kB
//! pages. (The same idea as XNNPACK's weight cache file.)
//!
//! The file: `SLMPACK1`, the identity's length (u64 LE) and the identity (the text the cache
//! is keyed by, compared whole at open); the planes, each on 64 bytes; the index (entry count,
//! then per entry its key and its planes' offsets and lengths, all u64 LE); the index's offset
//! and length, the first 8 bytes of its SHA-256, and `SLMPEND1`.
//!
//! The cache is keyed by the source file (canonical path, size, modification time, inode) and
//! by the packing code itself (a hash of its sources, and the kernel chosen for this CPU), so
//! an edited model or a changed layout never meets a stale plane. Written as every output is:
//! a temporary file, synced, then renamed. Whatever goes wrong with the cache (no place for
//! it, a full disk, a damaged file) costs a repack, never the load.
//!
//! `SLM_PACK_CACHE=off` turns it off; `SLM_PACK_CACHE=DIR` puts it in DIR; else it lives in
//! `$XDG_CACHE_HOME/slm/packed` or `~/.cache/slm/packed`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

/// Changed whenever the file's format changes (the planes' contents are keyed apart).
const MAGIC: &[u8; 8] = b"SLMPACK1";
const FOOTER: &[u8; 8] = b"SLMPEND1";
/// Bytes written at a time: each write is one 2 MB folio of the page cache, which is what lets
/// the kernel map the file with huge pages (odd-sized writes left 80% of a test file on 4 kB
/// pages).
const CHUNK: usize = 2 << 20;
/// Planes start on cache lines, as the kernels' own planes do.
const ALIGN: usize = 64;

/// A plane of the cache file, mapped read-only.
pub struct Plane {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for Plane {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// One GGUF file's cache: what an earlier load wrote, or a new cache being written.
pub struct PackCache {
    path: PathBuf,
    identity: String,
    reader: Option<Reader>,
    writer: Mutex<Option<Writer>>,
    /// Set once writing failed: this load makes no second try (and no second warning).
    gave_up: std::sync::atomic::AtomicBool,
}

struct Reader {
    map: Arc<Mmap>,
    index: HashMap<String, Vec<(usize, usize)>>,
}

struct Writer {
    tmp: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Bytes of the file before `buf`.
    written: u64,
    index: Vec<(String, Vec<(u64, u64)>)>,
    seen: std::collections::HashSet<String>,
}

/// Where caches live, None when turned off.
fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    match var("SLM_PACK_CACHE") {
        Some(v) if v == "off" || v == "0" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
            .map(|c| c.join("slm").join("packed")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short_hash(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes())[..8])
}

impl PackCache {
    /// The cache of the GGUF file at `source` for packing code `layout` (a string that changes
    /// whenever the packed bytes would); None when the cache is off or the file is unknown.
    pub fn for_file(source: &Path, layout: &str) -> Option<Arc<Self>> {
        let dir = cache_dir()?;
        // A cache this process is still committing (the same model loaded again at once, as
        // `slm bench --repeats` does) is read, not written a second time.
        wait_for_commits();
        Self::in_dir(&dir, source, layout)
    }

    pub(crate) fn in_dir(dir: &Path, source: &Path, layout: &str) -> Option<Arc<Self>> {
        let canon = source.canonicalize().ok()?;
        let meta = std::fs::metadata(&canon).ok()?;
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            format!("{}:{}", meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let inode = String::new();
        let identity = format!(
            "source: {}\nsize: {}\nmtime: {}.{:09}\ninode: {inode}\nlayout: {layout}\n",
            canon.display(),
            meta.len(),
            mtime.as_secs(),
            mtime.subsec_nanos(),
        );
        let path = dir.join(format!(
            "{}-{}.slmpack",
            short_hash(&canon.to_string_lossy()),
            short_hash(&identity)
        ));
        let reader = Reader::open(&path, &identity);
        Some(Arc::new(Self {
            path,
            identity,
            reader,
            writer: Mutex::new(None),
            gave_up: Default::default(),
        }))
    }

    /// Where the cache is, or will be once a load writes it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an earlier load's planes are there to map.
    pub fn is_filled(&self) -> bool {
        self.reader.is_some()
    }

    /// The planes stored under `key`, when the cache has them.
    pub fn take(&self, key: &str) -> Option<Vec<Plane>> {
        let r = self.reader.as_ref()?;
        let planes = r.index.get(key)?;
        Some(
            planes
                .iter()
                .map(|&(start, len)| Plane {
                    map: r.map.clone(),
                    start,
                    len,
                })
                .collect(),
        )
    }

    /// Stores `planes` under `key` for later loads. Only a cache that had nothing to read is
    /// written; a failed write drops the new cache, never the load.
    pub fn put(&self, key: &str, planes: &[&[u8]]) {
        if self.reader.is_some() || self.gave_up.load(Ordering::Relaxed) {
            return;
        }
        let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Writer::create(&self.path, &self.identity);
        }
        let result = match guard.as_mut() {
            Some(w) => w.put(key, planes),
            None => {
                self.gave_up.store(true, Ordering::Relaxed);
                return;
            }
        };
        if let Err(e) = result {
            self.gave_up.store(true, Ordering::Relaxed);
            let w = guard.take().expect("present");
            w.abandon(&self.path, &e);
        }
    }

    /// [`PackCache::commit`] on a thread of its own: syncing ~100 MB to disk is the slowest
    /// part of a first load, and nothing in this process waits for it. A process that ends
    /// before it is done leaves a temporary file, which the next commit removes.
    pub fn commit_in_background(self: &Arc<Self>) {
        let has_writer = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if has_writer {
            let me = self.clone();
            let handle = std::thread::spawn(move || {
                me.commit();
            });
            PENDING
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
    }

    /// Finishes the cache written by this load: the index, a sync, the rename; and removes the
    /// caches of older versions of the same source. Returns where it went, None when nothing
    /// was written (or the write failed, which only costs a repack at the next load).
    pub fn commit(&self) -> Option<PathBuf> {
        let w = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let tmp = w.tmp.clone();
        match w.finish() {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                warn(&self.path, &e);
                return None;
            }
        }
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            warn(&self.path, &e);
            return None;
        }
        self.remove_retired();
        Some(self.path.clone())
    }

    /// Removes what no load will read again: temporary files of ended processes, caches of
    /// older versions of this source, and caches whose source is gone (models in folders
    /// since deleted).
    fn remove_retired(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        super::write::clean_stale_temps(dir);
        let name = name.to_string_lossy().into_owned();
        let ours = format!("{}-", name.split('-').next().unwrap_or_default());
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let other = e.file_name().to_string_lossy().into_owned();
            if other == name || !other.ends_with(".slmpack") {
                continue;
            }
            if other.starts_with(&ours) || source_of(&e.path()).is_some_and(|s| !s.exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes the caches whose model file is gone (`slm rm` calls it after deleting a model);
/// returns the bytes freed.
pub fn remove_orphans() -> u64 {
    let Some(dir) = cache_dir() else {
        return 0;
    };
    let mut freed = 0;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "slmpack")
            && source_of(&path).is_some_and(|s| !s.exists())
        {
            let size = e.metadata().map_or(0, |m| m.len());
            if std::fs::remove_file(&path).is_ok() {
                freed += size;
            }
        }
    }
    freed
}

/// A cache's source file, from its header.
fn source_of(cache: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = vec![0u8; 16 + 4096];
    let mut f = File::open(cache).ok()?;
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    if head.get(..8)? != MAGIC {
        return None;
    }
    let len = (u64_at(head, 8)? as usize).min(head.len() - 16);
    let identity = std::str::from_utf8(&head[16..16 + len]).ok()?;
    let line = identity.lines().next()?;
    Some(PathBuf::from(line.strip_prefix("source: ")?))
}

/// A cache this load began but did not finish (the model failed to load) leaves no file.
impl Drop for PackCache {
    fn drop(&mut self) {
        if let Some(w) = self
            .writer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            drop(w.file);
            let _ = std::fs::remove_file(&w.tmp);
        }
    }
}

/// Commits still running on their threads.
static PENDING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits for the caches this process is still writing: a short command (one `generate`)
/// would otherwise end before its first load's cache is on disk, and every run would repack.
pub fn wait_for_commits() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    for h in pending {
        let _ = h.join();
    }
}

/// The library has no logger; a cache that cannot be written is worth one line, since every
/// load will repack until it can.
fn warn(path: &Path, e: &std::io::Error) {
    eprintln!(
        "slm: cannot write the packed-weights cache {}: {e} (loads repack; SLM_PACK_CACHE=off silences this)",
        path.display()
    );
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Reader {
    /// The cache at `path` when it is whole and made for `identity`; anything else is as if
    /// there were none (it is rewritten).
    fn open(path: &Path, identity: &str) -> Option<Reader> {
        let file = File::open(path).ok()?;
        // SAFETY: a read-only mapping; the cache is only ever replaced by rename, never
        // written in place, so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.ok()?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let b = &map[..];
        let n = b.len();
        if b.get(..8)? != MAGIC || n < 8 + 32 {
            return None;
        }
        let id_len = u64_at(b, 8)? as usize;
        if b.get(16..16usize.checked_add(id_len)?)? != identity.as_bytes() {
            return None;
        }
        if &b[n - 8..] != FOOTER {
            return None;
        }
        let (index_at, index_len) = (u64_at(b, n - 32)? as usize, u64_at(b, n - 24)? as usize);
        let sum = b.get(n - 16..n - 8)?;
        let index = b.get(index_at..index_at.checked_add(index_len)?)?;
        if &Sha256::digest(index)[..8] != sum {
            return None;
        }
        let data_end = index_at;
        let mut entries = HashMap::new();
        let mut at = 0;
        let mut next = |len: usize| {
            let s = index.get(at..at + len);
            at += len;
            s
        };
        let count = u64::from_le_bytes(next(8)?.try_into().ok()?);
        for _ in 0..count {
            let klen = u64::from_le_bytes(next(8)?.try_into().ok()?) as usize;
            let key = std::str::from_utf8(next(klen)?).ok()?.to_string();
            let np = u64::from_le_bytes(next(8)?.try_into().ok()?) as usize;
            let mut planes = Vec::with_capacity(np.min(64));
            for _ in 0..np {
                let start = u64::from_le_bytes(next(8)?.try_into().ok()?) as usize;
                let len = u64::from_le_bytes(next(8)?.try_into().ok()?) as usize;
                if start.checked_add(len)? > data_end || !start.is_multiple_of(ALIGN) {
                    return None;
                }
                planes.push((start, len));
            }
            entries.insert(key, planes);
        }
        Some(Reader {
            map: Arc::new(map),
            index: entries,
        })
    }
}

impl Writer {
    fn create(path: &Path, identity: &str) -> Option<Writer> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = path.parent()?;
        if let Err(e) = std::fs::create_dir_all(dir) {
            warn(path, &e);
            return None;
        }
        let name = path.file_name()?.to_string_lossy().into_owned();
        // Unique per writer: two tests (threads) may load the same model at once.
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            N.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        ));
        let file = match File::create(&tmp) {
            Ok(f) => f,
            Err(e) => {
                warn(path, &e);
                return None;
            }
        };
        let mut buf = Vec::with_capacity(CHUNK);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(identity.len() as u64).to_le_bytes());
        buf.extend_from_slice(identity.as_bytes());
        Some(Writer {
            tmp,
            file,
            buf,
            written: 0,
            index: Vec::new(),
            seen: Default::default(),
        })
    }

    fn pos(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Appends `bytes`, writing whole 2 MB chunks as they fill.
    fn push(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = (CHUNK - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == CHUNK {
                self.file.write_all(&self.buf)?;
                self.written += CHUNK as u64;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn put(&mut self, key: &str, planes: &[&[u8]]) -> std::io::Result<()> {
        // A weight loaded twice (an embedding that is also the output layer) is stored once.
        if !self.seen.insert(key.to_string()) {
            return Ok(());
        }
        let mut at = Vec::with_capacity(planes.len());
        for p in planes {
            let pad = (ALIGN as u64 - self.pos() % ALIGN as u64) % ALIGN as u64;
            self.push(&[0u8; ALIGN][..pad as usize])?;
            at.push((self.pos(), p.len() as u64));
            self.push(p)?;
        }
        self.index.push((key.to_string(), at));
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        let mut index = Vec::new();
        index.extend_from_slice(&(self.index.len() as u64).to_le_bytes());
        for (key, planes) in &self.index {
            index.extend_from_slice(&(key.len() as u64).to_le_bytes());
            index.extend_from_slice(key.as_bytes());
            index.extend_from_slice(&(planes.len() as u64).to_le_bytes());
            for &(start, len) in planes {
                index.extend_from_slice(&start.to_le_bytes());
                index.extend_from_slice(&len.to_le_bytes());
            }
        }
        let index_at = self.pos();
        self.push(&index)?;
        let mut tail = Vec::with_capacity(32);
        tail.extend_from_slice(&index_at.to_le_bytes());
        tail.extend_from_slice(&(index.len() as u64).to_le_bytes());
        tail.extend_from_slice(&Sha256::digest(&index)[..8]);
        tail.extend_from_slice(FOOTER);
        self.push(&tail)?;
        self.file.write_all(&self.buf)?;
        self.file.sync_all()
    }

    fn abandon(self, path: &Path, e: &std::io::Error) {
        drop(self.file);
        let _ = std::fs::remove_file(&self.tmp);
        warn(path, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in source file in a new `dir`.
    fn source(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("model.gguf");
        std::fs::write(&p, b"not really a model").unwrap();
        p
    }

    /// Planes written by one load come back whole at the next, on cache lines; a cache made
    /// for another layout or another version of the source is not read.
    #[test]
    fn planes_round_trip_and_stale_caches_are_not_read() {
        let dir = std::env::temp_dir().join(format!("slm-pack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = source(&dir.join("src"));
        let cache = dir.join("cache");
        let a: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7) as u8).collect();
        let b = vec![9u8; 77];
        let c = PackCache::in_dir(&cache, &src, "v1").unwrap();
        assert!(!c.is_filled());
        assert!(c.take("w").is_none());
        c.put("w", &[&a, &b, &[]]);
        c.put("w", &[&b]); // a second put of the same key is ignored
        c.put("x", &[&b]);
        let written = c.commit().expect("written");
        let c = PackCache::in_dir(&cache, &src, "v1").unwrap();
        assert!(c.is_filled());
        let w = c.take("w").unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(&w[0][..], &a[..]);
        assert_eq!(&w[1][..], &b[..]);
        assert!(w[2].is_empty());
        assert!(w
            .iter()
            .all(|p| (p.as_ptr() as usize).is_multiple_of(ALIGN)));
        assert_eq!(&c.take("x").unwrap()[0][..], &b[..]);
        assert!(c.take("y").is_none());
        // A filled cache is not written again.
        c.put("y", &[&b]);
        assert!(c.commit().is_none());
        // Another layout: a new file; committing it removes the old one.
        let other = PackCache::in_dir(&cache, &src, "v2").unwrap();
        assert!(!other.is_filled());
        other.put("w", &[&b]);
        let newer = other.commit().unwrap();
        assert!(!written.exists() && newer.exists());
        // A load that never finishes leaves nothing behind.
        let unfinished = PackCache::in_dir(&cache, &src, "v3").unwrap();
        unfinished.put("w", &[&b]);
        drop(unfinished);
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&cache).len(), 1, "{:?}", names(&cache));
        // The cache of a source that is gone goes at the next commit.
        let gone = source(&dir.join("gone"));
        let g = PackCache::in_dir(&cache, &gone, "v1").unwrap();
        g.put("w", &[&b]);
        let g = g.commit().unwrap();
        std::fs::remove_dir_all(dir.join("gone")).unwrap();
        let keep = PackCache::in_dir(&cache, &src, "v4").unwrap();
        keep.put("w", &[&b]);
        let keep = keep.commit().unwrap();
        assert!(!g.exists() && keep.exists());
        assert_eq!(names(&cache).len(), 1);
        // The source changed: its size and time are part of the key.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&src, b"another model, longer").unwrap();
        assert!(!PackCache::in_dir(&cache, &src, "v4").unwrap().is_filled());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every way a cache file can be cut or damaged reads as no cache, never as planes.
    #[test]
    fn damaged_caches_are_not_read() {
        let dir = std::env::temp_dir().join(format!("slm-pack-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = source(&dir);
        let cache = dir.join("cache");
        let c = PackCache::in_dir(&cache, &src, "v1").unwrap();
        c.put("w", &[&[1u8; 1000], &[2u8; 5000]]);
        let path = c.commit().unwrap();
        let good = std::fs::read(&path).unwrap();
        let reads = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            PackCache::in_dir(&cache, &src, "v1").unwrap().is_filled()
        };
        assert!(reads(&good));
        for cut in [0, 7, 16, 100, good.len() / 2, good.len() - 1] {
            assert!(!reads(&good[..cut]), "cut at {cut}");
        }
        // A flipped byte in the index fails its checksum; in the identity, its comparison.
        let n = good.len();
        for at in [n - 40, 20, n - 20] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(!reads(&bad), "byte {at} flipped");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
