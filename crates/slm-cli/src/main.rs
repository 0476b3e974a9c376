//! The `slm` binary: argument parsing and printing. All work happens in the `slm` library.

#[macro_use]
mod output;
mod commands;
mod parse;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "slm",
    version,
    about = "Small language models on the CPU: download, run, evaluate, fine-tune and quantize"
)]
struct Cli {
    /// Worker threads for matrix products (default: all cores).
    #[arg(long, global = true, value_parser = parse::positive)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a continuation of a prompt.
    Generate(commands::generate::Args),
    /// Chat interactively using the model's chat template.
    Chat(commands::chat::Args),
    /// Print the token ids of a text (or of a rendered chat).
    Tokenize(commands::tokenize::Args),
    /// Describe a model: architecture, parameters, tensor types, context, vocabulary.
    Info(commands::info::Args),
    /// Sentence embeddings of texts (JSONL or .npy), with the model's pooling.
    Embed(commands::embed::Args),
    /// Cosine similarity matrix of texts.
    Similarity(commands::similarity::Args),
    /// Label and probabilities per text, with a sequence-classification model.
    Classify(commands::classify::Args),
    /// Most likely tokens for each [MASK] in a text, with a masked-LM model.
    FillMask(commands::fill_mask::Args),
    /// Evaluate models: perplexity, classification metrics, comparison of two models.
    #[command(subcommand)]
    Eval(commands::eval::Command),
    /// Quantize a GGUF model or a Hugging Face folder to GGUF (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    Quantize(commands::quantize::Args),
    /// Write a GGUF model as a Hugging Face folder (safetensors, config, tokenizer).
    Convert(commands::convert::Args),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(commands::bench::Args),
    /// Fine-tune a model on your data (full or LoRA).
    Finetune(commands::finetune::Args),
    /// Hyperparameter search over fine-tuning runs (grid or random).
    Tune(commands::tune::TuneArgs),
    /// Merge a LoRA adapter into its base model (a folder transformers and slm load).
    Merge(commands::merge::Args),
    /// Download a model from the Hugging Face hub into the shared cache.
    Pull(commands::hub::PullArgs),
    /// List the models in the Hugging Face cache.
    List(commands::hub::ListArgs),
    /// Remove a model from the Hugging Face cache.
    Rm(commands::hub::RmArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(n) = cli.threads {
        // candle's CPU kernels size their pools from RAYON_NUM_THREADS.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // The command runs on a worker of the pool, so parallel kernels start without waking a
    // thread and blocking this one on a futex: that hand-off costs more than a small matmul.
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot start worker threads: {e}");
            return ExitCode::from(1);
        }
    };
    let result = pool.install(|| match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Info(a) => commands::info::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Embed(a) => commands::embed::run(a),
        Command::Similarity(a) => commands::similarity::run(a),
        Command::Classify(a) => commands::classify::run(a),
        Command::FillMask(a) => commands::fill_mask::run(a),
        Command::Eval(c) => commands::eval::run(c),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Finetune(a) => commands::finetune::run(a),
        Command::Tune(a) => commands::tune::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Pull(a) => commands::hub::pull(a),
        Command::List(a) => commands::hub::list(a),
        Command::Rm(a) => commands::hub::rm(a),
    });
    let result = result.and_then(|()| Ok(output::flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // RUST_BACKTRACE is often set for other programs; only the library-specific switch
            // turns a one-line error into the full chain and backtrace.
            if std::env::var("RUST_LIB_BACKTRACE").is_ok_and(|v| v != "0") {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {}", one_line(&e));
            }
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line; candle appends backtraces to some messages, which
/// are cut here.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        let s = s.split("\n   0:").next().unwrap_or("").replace('\n', " ");
        if !parts.iter().any(|p| p.contains(s.trim())) {
            parts.push(s.trim().to_string());
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    /// clap checks the argument definitions only in debug builds, and only when a command is
    /// parsed; this checks every subcommand in any build.
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
