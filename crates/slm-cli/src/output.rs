//! Standard output that reports instead of panicking. `println!` panics when stdout is closed
//! (`slm info | head -1`) or full (`> /dev/full`); these macros return the error, so a closed
//! pipe ends the command quietly, as other Unix tools do, and a full disk is an error line.

use std::io::Write;

/// A failed write to standard output.
#[derive(Debug)]
pub struct StdoutError(pub std::io::Error);

impl std::fmt::Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write to standard output: {}", self.0)
    }
}

impl std::error::Error for StdoutError {}

pub fn write(args: std::fmt::Arguments) -> Result<(), StdoutError> {
    std::io::stdout()
        .lock()
        .write_fmt(args)
        .map_err(StdoutError)
}

pub fn flush() -> Result<(), StdoutError> {
    std::io::stdout().lock().flush().map_err(StdoutError)
}

/// The reader went away (`| head`): nothing to report.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c
            .downcast_ref::<StdoutError>()
            .map(|s| &s.0)
            .or_else(|| c.downcast_ref::<std::io::Error>());
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `print!` that returns [`StdoutError`] through `?`.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::write(format_args!($($t)*))?
    };
}

/// `println!` that returns [`StdoutError`] through `?`.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))?
    };
    ($($t:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($t)*)))?
    };
}
