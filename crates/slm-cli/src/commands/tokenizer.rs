//! `slm tokenizer train`: flags to `slm::tokenize::train`, and a summary of what it made.

use std::path::PathBuf;

use anyhow::Result;
use slm::tokenize::preprocess::{self, Preprocess, Punctuation};
use slm::tokenize::train::{self, Kind, TrainOptions};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Train a tokenizer on text files (a tokenizer.json transformers and slm load).
    Train(TrainArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum KindArg {
    /// SentencePiece-style BPE (`▁` for spaces, <unk> for the unseen).
    Bpe,
    /// GPT-2's byte-level BPE (nothing is unknown).
    ByteBpe,
    /// BERT's WordPiece (lowercased, [CLS] … [SEP]).
    Wordpiece,
    /// SentencePiece's Unigram.
    Unigram,
    /// Whitespace-separated words, <eos> at each line end (PyTorch's word_language_model).
    Word,
    /// One token per character.
    Char,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Text files to learn from.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long = "type", value_enum)]
    kind: KindArg,
    /// Tokens in the vocabulary, special tokens included (an upper bound for word and char).
    #[arg(long, value_parser = crate::parse::positive)]
    vocab_size: usize,
    /// Merges (BPE, WordPiece) and words (word) seen fewer times are not kept.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// A special token (repeatable, in id order; default: the type's usual ones).
    #[arg(long = "special")]
    special: Vec<String>,
    #[command(flatten)]
    preprocess: PreprocessArgs,
    /// The output folder (tokenizer.json, tokenizer_config.json).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Replace an existing tokenizer in the output folder.
    #[arg(long)]
    force: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum PunctArg {
    Keep,
    Split,
    Remove,
}

/// Classic preprocessing for word and char tokenizers, built into tokenizer.json (so every
/// command that reads the model applies it).
#[derive(clap::Args, Debug, Clone)]
pub struct PreprocessArgs {
    /// Lowercase the text.
    #[arg(long)]
    lowercase: bool,
    /// Strip accents (é → e).
    #[arg(long)]
    strip_accents: bool,
    /// Punctuation: left in words, split into words of its own, or removed.
    #[arg(long, value_enum, default_value = "keep")]
    punctuation: PunctArg,
    /// Remove the stop words of a language (ISO 639-1: en, de, fr, ...; NLTK's lists).
    #[arg(long, value_name = "LANG")]
    remove_stopwords: Option<String>,
    /// Remove the stop words in this file (one per line).
    #[arg(long, value_name = "FILE", conflicts_with = "remove_stopwords")]
    stopwords: Option<PathBuf>,
}

impl PreprocessArgs {
    pub fn preprocess(&self) -> Result<Preprocess> {
        let stopwords = match (&self.remove_stopwords, &self.stopwords) {
            (Some(lang), _) => preprocess::stopwords_for(lang)?,
            (None, Some(f)) => preprocess::stopwords_file(f)?,
            (None, None) => Vec::new(),
        };
        Ok(Preprocess {
            lowercase: self.lowercase,
            strip_accents: self.strip_accents,
            punctuation: match self.punctuation {
                PunctArg::Keep => Punctuation::Keep,
                PunctArg::Split => Punctuation::Split,
                PunctArg::Remove => Punctuation::Remove,
            },
            stopwords,
        })
    }
}

pub fn run(c: Command) -> Result<()> {
    let Command::Train(a) = c;
    let kind = match a.kind {
        KindArg::Bpe => Kind::Bpe,
        KindArg::ByteBpe => Kind::ByteBpe,
        KindArg::Wordpiece => Kind::WordPiece,
        KindArg::Unigram => Kind::Unigram,
        KindArg::Word => Kind::Word,
        KindArg::Char => Kind::Char,
    };
    slm::io::write::check_overwrite(&a.output.join("tokenizer.json"), a.force)?;
    let opts = TrainOptions {
        kind,
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency,
        special_tokens: if a.special.is_empty() {
            kind.default_specials()
        } else {
            a.special
        },
        preprocess: a.preprocess.preprocess()?,
    };
    let t = std::time::Instant::now();
    let tok = train::train(&a.files, &opts)?;
    train::save(&tok, &opts, &a.output)?;
    let text = std::fs::read_to_string(&a.files[0])
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.files[0].display()))?;
    let sample: String = text.chars().take(100_000).collect();
    let n = tok
        .encode(sample.as_str(), false)
        .map_err(|e| anyhow::anyhow!("encoding a sample: {e}"))?
        .len();
    outln!(
        "{}: {} tokens in the vocabulary, trained in {:.1} s; {:.2} characters per token on the first 100,000 characters of {}",
        a.output.join("tokenizer.json").display(),
        tok.get_vocab_size(true),
        t.elapsed().as_secs_f64(),
        sample.chars().count() as f64 / n.max(1) as f64,
        a.files[0].display()
    );
    Ok(())
}
