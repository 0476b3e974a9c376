//! One error type for the library. Every variant that comes from a file names the file, so the
//! binary can print a single line that tells the user what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something is wrong inside a file: malformed, truncated, or inconsistent with the config.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("unknown architecture '{found}' (from {origin}); supported: {supported}")]
    UnknownArchitecture {
        found: String,
        origin: String,
        supported: String,
    },

    #[error("prompt has {tokens} tokens but the model's context length is {context}")]
    ContextOverflow { tokens: usize, context: usize },

    #[error("{0}")]
    Msg(String),

    /// A model, task or option that training does not support.
    #[error("{0}")]
    Unsupported(String),

    /// A bad dataset row (the message names the file and line).
    #[error("{0}")]
    Data(String),

    /// An output that would replace something already there without being told to.
    #[error("{0}")]
    Exists(String),

    /// A checkpoint that cannot be resumed.
    #[error("{0}")]
    Resume(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// candle appends a backtrace to its messages when RUST_BACKTRACE is set; our messages stay one
/// line.
fn without_backtrace(msg: &str) -> String {
    msg.split("\n   0:")
        .next()
        .unwrap_or(msg)
        .trim_end()
        .to_string()
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            msg: without_backtrace(&msg.to_string()),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn msg(msg: impl std::fmt::Display) -> Self {
        Error::Msg(msg.to_string())
    }
}

/// Attaches a file to errors from crates that do not know which file they were reading.
pub trait Context<T> {
    fn in_file(self, path: &std::path::Path) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn in_file(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::file(path, e))
    }
}

/// Runs code of another crate that may panic on malformed input (candle divides by a GGUF's
/// `general.alignment` unchecked, for one) and turns the panic into an error for `path`. The
/// default hook would print the panic; it stays quiet while such code runs on this thread.
pub(crate) fn guard_foreign<T>(
    path: &std::path::Path,
    what: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    use std::cell::Cell;
    thread_local!(static GUARDED: Cell<bool> = const { Cell::new(false) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    out.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "malformed content".into());
        Err(Error::file(path, format!("{what}: {why}")))
    })
}
