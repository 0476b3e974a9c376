//! PyTorch `.bin`/`.pth` zip-pickle checkpoints. candle's reader interprets only the pickle opcodes
//! that describe tensors; no Python object is ever constructed or called. Before candle sees a
//! file, [`check_archive`] reads it once to refuse what candle would not survive or would read
//! wrongly: damaged bytes, big-endian storage, and pickles that nest or multiply without bound.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;

use super::{to_f32, ShardIndex, TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

pub struct PickleStore {
    files: Vec<PthTensors>,
    shards: ShardIndex,
    /// Bytes in each zip entry of each file, so a tensor cannot claim more than its storage.
    entry_sizes: Vec<HashMap<String, u64>>,
}

/// Bounds on what data.pkl may build. A real state_dict nests five deep and holds a few objects
/// per tensor; candle's reader copies memoised objects by value and drops them recursively, so
/// a deep or self-multiplying pickle would overflow the stack or exhaust memory.
const MAX_DEPTH: u32 = 100;
const MAX_NODES: u64 = 1 << 24;
const MAX_PICKLE_BYTES: u64 = 1 << 30;

impl PickleStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut shards = ShardIndex::new();
        let mut entry_sizes = Vec::new();
        for path in paths {
            let not_readable = |e: &dyn std::fmt::Display| {
                Error::file(path, format!("not a readable PyTorch checkpoint: {e}"))
            };
            let sizes = check_archive(path).map_err(|e| not_readable(&e))?;
            let what = "not a readable PyTorch checkpoint";
            let pth = crate::error::guard_foreign(path, what, || {
                PthTensors::new(path, None).map_err(|e| not_readable(&e))
            })?;
            shards.add(path, pth.tensor_infos().keys().cloned());
            files.push(pth);
            entry_sizes.push(sizes);
        }
        Ok(Self {
            files,
            shards,
            entry_sizes,
        })
    }
}

impl WeightStore for PickleStore {
    fn file_of(&self, name: &str) -> &Path {
        self.shards.file_of(name)
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut out: Vec<TensorMeta> = self
            .files
            .iter()
            .flat_map(|f| f.tensor_infos().values())
            .map(|t| TensorMeta {
                name: t.name.clone(),
                dtype: format!("{:?}", t.dtype),
                shape: t.layout.shape().dims().to_vec(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn contains(&self, name: &str) -> bool {
        self.shards.contains(name)
    }

    fn load(&self, name: &str, _keep_quant: bool) -> Result<Weight> {
        let i = self.shards.find(name)?;
        let path = &self.shards.paths[i];
        if let Some(info) = self.files[i].tensor_infos().get(name) {
            // candle allocates the shape's size before reading: check it against the storage.
            let dims = info.layout.shape().dims();
            let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let need = elems
                .and_then(|n| n.checked_add(info.layout.start_offset()))
                .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()));
            let have = self.entry_sizes[i].get(&info.path).copied().unwrap_or(0);
            if need.is_none_or(|n| n as u64 > have) {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor '{name}' of shape {dims:?} needs more than the {have} bytes of '{}'",
                        info.path
                    ),
                ));
            }
        }
        let t = self.files[i]
            .get(name)
            .map_err(|e| Error::file(path, format!("tensor '{name}': {e}")))?
            .ok_or_else(|| super::missing(path, name))?;
        Ok(Weight::Dense(to_f32(t)?))
    }
}

/// Reads every entry of the zip once: the CRC check catches flipped bits in tensor bytes (the
/// zip crate verifies it only when an entry is read to its end, which candle never does), the
/// byte order must be little-endian, and data.pkl must stay within [`MAX_DEPTH`]/[`MAX_NODES`].
/// Returns each entry's size.
fn check_archive(path: &Path) -> std::result::Result<HashMap<String, u64>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut sizes = HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.to_string();
        let damaged = |e: std::io::Error| format!("entry '{name}' is damaged: {e}");
        sizes.insert(name.clone(), entry.size());
        let base = name.rsplit('/').next().unwrap_or(&name);
        if base != "data.pkl" && base != "byteorder" {
            std::io::copy(&mut entry, &mut std::io::sink()).map_err(damaged)?;
            continue;
        }
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!("entry '{name}' is {} bytes", entry.size()));
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(damaged)?;
        if base == "byteorder" {
            let order = String::from_utf8_lossy(&bytes);
            if order.trim() != "little" {
                return Err(format!(
                    "tensors are stored with byte order '{}'; only little-endian checkpoints are supported",
                    order.trim()
                ));
            }
        } else {
            check_pickle(&bytes).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(sizes)
}

/// What the pickle stack holds, as far as the bounds care.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Mark,
    List,
    Dict,
    /// `collections.OrderedDict` or `defaultdict`, which REDUCE calls to make a dict (a
    /// `state_dict` saved with torch.save), as candle's reader does.
    DictClass,
    Other,
}

#[derive(Clone, Copy)]
struct Obj {
    kind: Kind,
    depth: u32,
    nodes: u64,
}

impl Obj {
    fn leaf(kind: Kind) -> Self {
        Obj {
            kind,
            depth: 1,
            nodes: 1,
        }
    }

    fn parent(kind: Kind, items: &[Obj]) -> Self {
        Obj {
            kind,
            depth: 1 + items.iter().map(|o| o.depth).max().unwrap_or(0),
            nodes: 1 + items.iter().map(|o| o.nodes).sum::<u64>(),
        }
    }
}

type Check<T> = std::result::Result<T, String>;

/// The abstract pickle machine: candle's opcodes with its value semantics (a memo read is a deep
/// copy), tracking only each object's depth and size.
struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    /// Objects built so far, copies included.
    total: u64,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Check<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("ends inside an opcode")?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Check<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn made(&mut self, o: Obj) -> Check<Obj> {
        self.total = self.total.saturating_add(o.nodes);
        if o.depth > MAX_DEPTH {
            return Err(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        if self.total > MAX_NODES {
            return Err(format!("builds more than {MAX_NODES} objects"));
        }
        Ok(o)
    }

    fn push_made(&mut self, o: Obj) -> Check<()> {
        let o = self.made(o)?;
        self.stack.push(o);
        Ok(())
    }

    fn pop(&mut self) -> Check<Obj> {
        self.stack.pop().ok_or_else(|| "pops an empty stack".into())
    }

    fn pop_n(&mut self, n: usize) -> Check<Vec<Obj>> {
        if self.stack.len() < n {
            return Err("pops an empty stack".into());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_to_mark(&mut self) -> Check<Vec<Obj>> {
        let m = self.stack.iter().rposition(|o| o.kind == Kind::Mark);
        let items = self.stack.split_off(m.ok_or("no mark on the stack")? + 1);
        self.stack.pop();
        Ok(items)
    }

    /// APPEND(S), SETITEM(S): items into the list or dict on top of the stack.
    fn extend(&mut self, want: Kind, items: Vec<Obj>) -> Check<()> {
        let c = *self.stack.last().ok_or("pops an empty stack")?;
        if c.kind != want {
            return Err("adds items to something that is not a container".into());
        }
        let inner = Obj::parent(want, &items);
        let grown = Obj {
            kind: want,
            depth: c.depth.max(inner.depth),
            nodes: c.nodes + inner.nodes - 1,
        };
        let grown = self.made(grown)?;
        *self.stack.last_mut().expect("checked above") = grown;
        Ok(())
    }

    fn run(&mut self) -> Check<()> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => drop(self.take(1)?),
                b'c' => {
                    let mut names = [&[][..]; 2];
                    for name in names.iter_mut() {
                        let nl = self.data[self.at..].iter().position(|&b| b == b'\n');
                        let nl = nl.ok_or("GLOBAL without a newline")?;
                        *name = &self.data[self.at..self.at + nl];
                        self.at += nl + 1;
                    }
                    let dict = names[0] == b"collections"
                        && matches!(names[1], b"OrderedDict" | b"defaultdict");
                    let kind = if dict { Kind::DictClass } else { Kind::Other };
                    self.stack.push(Obj::leaf(kind));
                }
                b'K' | b'M' | b'J' | b'G' => {
                    let n = match op {
                        b'K' => 1,
                        b'M' => 2,
                        b'J' => 4,
                        _ => 8,
                    };
                    self.take(n)?;
                    self.stack.push(Obj::leaf(Kind::Other));
                }
                0x8a => {
                    let n = self.take(1)?[0] as usize;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes"));
                    }
                    self.take(n)?;
                    self.stack.push(Obj::leaf(Kind::Other));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.stack.push(Obj::leaf(Kind::Other));
                }
                b'N' | 0x88 | 0x89 | b')' => self.stack.push(Obj::leaf(Kind::Other)),
                b']' => self.stack.push(Obj::leaf(Kind::List)),
                // candle reads DICT ('d') as an empty dict.
                b'}' | b'd' => self.stack.push(Obj::leaf(Kind::Dict)),
                b'(' => self.stack.push(Obj::leaf(Kind::Mark)),
                b'Q' => {
                    let id = self.pop()?;
                    self.push_made(Obj::parent(Kind::Other, &[id]))?;
                }
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push_made(Obj::parent(Kind::Other, &items))?;
                }
                0x85..=0x87 => {
                    let items = self.pop_n((op - 0x84) as usize)?;
                    self.push_made(Obj::parent(Kind::Other, &items))?;
                }
                b'R' | b'b' | 0x81 => {
                    let items = self.pop_n(2)?;
                    let dict = op == b'R' && items[0].kind == Kind::DictClass;
                    let kind = if dict { Kind::Dict } else { Kind::Other };
                    self.push_made(Obj::parent(kind, &items))?;
                }
                b'a' => {
                    let v = self.pop_n(1)?;
                    self.extend(Kind::List, v)?;
                }
                b's' => {
                    let kv = self.pop_n(2)?;
                    self.extend(Kind::Dict, kv)?;
                }
                b'e' | b'u' => {
                    let items = self.pop_to_mark()?;
                    let kind = if op == b'e' { Kind::List } else { Kind::Dict };
                    self.extend(kind, items)?;
                }
                b'h' | b'j' => {
                    let id = if op == b'h' {
                        self.take(1)?[0] as u32
                    } else {
                        self.u32()?
                    };
                    let o = *self.memo.get(&id).ok_or("reads an empty memo slot")?;
                    self.push_made(o)?;
                }
                b'q' | b'r' => {
                    let id = if op == b'q' {
                        self.take(1)?[0] as u32
                    } else {
                        self.u32()?
                    };
                    let o = *self.stack.last().ok_or("pops an empty stack")?;
                    let o = self.made(o)?;
                    self.memo.insert(id, o);
                }
                b'.' => return Ok(()),
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

fn check_pickle(data: &[u8]) -> Check<()> {
    Machine {
        data,
        at: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        total: 0,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[[[...]]]` n deep, as pickle protocol 2 writes nested lists.
    fn nested_lists(n: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        for _ in 0..n {
            p.extend([b']', b'(']);
        }
        p.push(b']');
        p.extend(std::iter::repeat_n(b'e', n));
        p.push(b'.');
        p
    }

    #[test]
    fn depth_and_copies_are_bounded() {
        assert!(check_pickle(&nested_lists(50)).is_ok());
        let err = check_pickle(&nested_lists(100_000)).unwrap_err();
        assert!(err.contains("nest deeper"), "{err}");
        // x = []; then 64 times x = [x, x] through the memo: 2^64 objects by value.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend([b']', b'h', 0, b'a', b'h', 0, b'a', b'q', 0]);
        }
        p.push(b'.');
        let err = check_pickle(&p).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        assert!(check_pickle(&[0x80, 2, b']'])
            .unwrap_err()
            .contains("ends inside"));
    }
}
