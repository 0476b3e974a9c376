//! `slm chat`: a conversation with the model's chat template, line by line from stdin.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use slm::generate::{Session, StopReason};
use slm::tokenize::Message;

use super::{ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message placed before the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens of conversation kept (default: the model's context); older turns are dropped.
    #[arg(long, short = 'c', value_parser = crate::parse::positive)]
    ctx_size: Option<usize>,
}

const HELP: &str = "/help this list · /clear forget the conversation · /system TEXT set the system message · /exit (or Ctrl-D) end; Ctrl-C stops a reply";

/// What a line of input asks for.
enum Line<'a> {
    Say(&'a str),
    Help,
    Clear,
    System(&'a str),
    Exit,
    Unknown(&'a str),
}

fn parse(line: &str) -> Line<'_> {
    let Some(cmd) = line.strip_prefix('/') else {
        return Line::Say(line);
    };
    let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    match name {
        "help" | "?" => Line::Help,
        "clear" => Line::Clear,
        "system" => Line::System(rest.trim()),
        "exit" | "quit" | "bye" => Line::Exit,
        _ => Line::Unknown(name),
    }
}

/// Reads user turns line by line from stdin; EOF, `/exit` (or, from a pipe, an empty line) ends
/// the chat. The whole history is rendered again each turn and the KV cache is reused for the
/// part that did not change. Ctrl-C stops the reply being generated; at the prompt it ends slm.
pub fn run(a: Args) -> Result<()> {
    let (mut m, tok) = super::load(&a.model)?;
    let template = tok.chat()?;
    let context = a
        .ctx_size
        .unwrap_or(usize::MAX)
        .min(m.model.context_length());
    let mut system: Option<Message> = a.system.as_deref().map(|s| Message::new("system", s));
    let mut turns: Vec<Message> = Vec::new();
    let mut session = Session::new(m.model.as_mut());
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (cancel.clone(), generating.clone());
        ctrlc::set_handler(move || {
            if generating.load(Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    let mut opts = a.sampling.options();
    opts.cancel = Some(cancel.clone());
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!(
            "slm chat with {} ({} tokens of context) · /help for commands",
            a.model.model.display(),
            context
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim_end();
        if line.is_empty() {
            if interactive {
                continue;
            }
            break;
        }
        let text = match parse(line) {
            Line::Say(t) => t,
            Line::Help => {
                eprintln!("{HELP}");
                continue;
            }
            Line::Clear => {
                turns.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            Line::System(s) => {
                system = (!s.is_empty()).then(|| Message::new("system", s));
                eprintln!(
                    "(system message {})",
                    if s.is_empty() { "removed" } else { "set" }
                );
                continue;
            }
            Line::Exit => break,
            Line::Unknown(name) => {
                eprintln!("unknown command /{name}; {HELP}");
                continue;
            }
        };
        turns.push(Message::new("user", text));
        // Room for the reply: the tokens asked for, but no more than half the context.
        let reserve = opts.max_tokens.min(context / 2);
        let ids = loop {
            let messages: Vec<Message> = system.iter().chain(&turns).cloned().collect();
            let ids = tok.encode(&template.render(&messages, true)?, false)?;
            if ids.len() + reserve <= context || turns.len() <= 1 {
                break ids;
            }
            // Drop the oldest exchange (a user turn and the reply to it); keep the system.
            let n = turns.len().min(3) - 1;
            turns.drain(..n);
            eprintln!(
                "(dropped the oldest {n} message{} to stay within {context} tokens)",
                if n > 1 { "s" } else { "" }
            );
        };
        if ids.len() >= context {
            eprintln!(
                "error: this message alone has {} tokens, the context holds {context}; say it shorter",
                ids.len()
            );
            turns.pop();
            continue;
        }
        let mut turn_opts = opts.clone();
        turn_opts.max_tokens = opts.max_tokens.min(context - ids.len());
        let mut reply = String::new();
        cancel.store(false, Ordering::Relaxed);
        generating.store(true, Ordering::Relaxed);
        let result = session.generate(&tok, &ids, &turn_opts, &mut |t| {
            reply.push_str(t);
            crate::output::write(format_args!("{t}"))
                .and_then(|_| crate::output::flush())
                .map_err(|e| slm::Error::io("standard output", e.0))
        });
        generating.store(false, Ordering::Relaxed);
        let (_, stats) = result?;
        outln!();
        let full = stats.stop == StopReason::ContextFull
            || (stats.stop == StopReason::MaxTokens && turn_opts.max_tokens < opts.max_tokens);
        if stats.stop == StopReason::Cancelled {
            eprintln!("(stopped)");
        } else if full {
            eprintln!("(the reply reached the context length of {context} tokens)");
        }
        turns.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}
