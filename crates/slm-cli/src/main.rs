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
    #[command(subcommand)]
    command: Command,
}

/// A command that computes, with the thread count it runs on; the others (pull, list, rm, info,
/// tokenize) do not offer `--threads`.
#[derive(clap::Args)]
struct Compute<A: clap::Args> {
    #[command(flatten)]
    args: A,
    /// Worker threads for matrix products (default: all cores).
    #[arg(long, global = true, value_parser = parse::positive)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(subcommand)]
    command: commands::eval::Command,
}

#[derive(clap::Args)]
struct TokenizerArgs {
    #[command(subcommand)]
    command: commands::tokenizer::Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a continuation of a prompt.
    Generate(Compute<commands::generate::Args>),
    /// Chat interactively using the model's chat template.
    Chat(Compute<commands::chat::Args>),
    /// Print the token ids of a text (or of a rendered chat).
    Tokenize(commands::tokenize::Args),
    /// Train a tokenizer on your text (BPE, byte-level BPE, WordPiece, Unigram, words, characters).
    Tokenizer(TokenizerArgs),
    /// Describe a model: architecture, parameters, tensor types, context, vocabulary.
    Info(commands::info::Args),
    /// Sentence embeddings of texts (JSONL or .npy), with the model's pooling.
    Embed(Compute<commands::embed::Args>),
    /// Cosine similarity matrix of texts.
    Similarity(Compute<commands::similarity::Args>),
    /// Label and probabilities per text, with a sequence-classification model.
    Classify(Compute<commands::classify::Args>),
    /// Most likely tokens for each [MASK] in a text, with a masked-LM model.
    FillMask(Compute<commands::fill_mask::Args>),
    /// Evaluate models: perplexity, classification metrics, comparison of two models.
    Eval(Compute<EvalArgs>),
    /// Quantize a GGUF model or a Hugging Face folder to GGUF (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    Quantize(Compute<commands::quantize::Args>),
    /// Write a GGUF model as a Hugging Face folder (safetensors, config, tokenizer).
    Convert(Compute<commands::convert::Args>),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(Compute<commands::bench::Args>),
    /// Fine-tune a model on your data (full or LoRA).
    Finetune(Compute<commands::finetune::Args>),
    /// Train a recurrent (LSTM/GRU) language model from random init, as PyTorch's word_language_model does.
    Pretrain(Compute<commands::pretrain::Args>),
    /// Hyperparameter search over fine-tuning runs (grid or random).
    Tune(Compute<commands::tune::TuneArgs>),
    /// Merge a LoRA adapter into its base model (a folder transformers and slm load).
    Merge(Compute<commands::merge::Args>),
    /// Serve models over HTTP with OpenAI's API (chat, completions, embeddings).
    Serve(Compute<commands::serve::Args>),
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
    let threads = match &cli.command {
        Command::Generate(c) => c.threads,
        Command::Chat(c) => c.threads,
        Command::Embed(c) => c.threads,
        Command::Similarity(c) => c.threads,
        Command::Classify(c) => c.threads,
        Command::FillMask(c) => c.threads,
        Command::Eval(c) => c.threads,
        Command::Quantize(c) => c.threads,
        Command::Convert(c) => c.threads,
        Command::Bench(c) => c.threads,
        Command::Finetune(c) => c.threads,
        Command::Pretrain(c) => c.threads,
        Command::Tune(c) => c.threads,
        Command::Merge(c) => c.threads,
        Command::Serve(c) => c.threads,
        Command::Tokenize(_)
        | Command::Tokenizer(_)
        | Command::Info(_)
        | Command::Pull(_)
        | Command::List(_)
        | Command::Rm(_) => None,
    };
    if let Some(n) = threads {
        // candle's CPU kernels size their pools from RAYON_NUM_THREADS.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // The command runs on a worker of the pool, so parallel kernels start without waking a
    // thread and blocking this one on a futex: that hand-off costs more than a small matmul.
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot start worker threads: {e}");
            return ExitCode::from(1);
        }
    };
    let result = pool.install(|| match cli.command {
        Command::Generate(c) => commands::generate::run(c.args),
        Command::Chat(c) => commands::chat::run(c.args),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Tokenizer(a) => commands::tokenizer::run(a.command),
        Command::Info(a) => commands::info::run(a),
        Command::Bench(c) => commands::bench::run(c.args),
        Command::Embed(c) => commands::embed::run(c.args),
        Command::Similarity(c) => commands::similarity::run(c.args),
        Command::Classify(c) => commands::classify::run(c.args),
        Command::FillMask(c) => commands::fill_mask::run(c.args),
        Command::Eval(c) => commands::eval::run(c.args.command),
        Command::Quantize(c) => commands::quantize::run(c.args),
        Command::Convert(c) => commands::convert::run(c.args),
        Command::Serve(c) => commands::serve::run(c.args),
        Command::Finetune(c) => commands::finetune::run(c.args),
        Command::Pretrain(c) => commands::pretrain::run(c.args),
        Command::Tune(c) => commands::tune::run(c.args),
        Command::Merge(c) => commands::merge::run(c.args),
        Command::Pull(a) => commands::hub::pull(a),
        Command::List(a) => commands::hub::list(a),
        Command::Rm(a) => commands::hub::rm(a),
    });
    let result = result.and_then(|()| Ok(output::flush()?));
    // A first load's packed-weights cache may still be syncing; the output is already out.
    slm::io::pack_cache::wait_for_commits();
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
