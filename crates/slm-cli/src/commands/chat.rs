use std::io::{BufRead, Write};

use anyhow::Result;
use slm::generate::Session;
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
}

/// Reads user turns line by line from stdin (an empty line or EOF ends the chat). The whole
/// history is re-rendered each turn; the KV cache is reused for the part that did not change.
pub fn run(a: Args) -> Result<()> {
    let (mut m, tok) = super::load(&a.model)?;
    let template = tok.chat()?;
    let mut messages: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut session = Session::new(m.model.as_mut());
    let opts = a.sampling.options();
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        messages.push(Message::new("user", &line));
        let text = template.render(&messages, true)?;
        let ids = tok.encode(&text, false)?;
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        session.generate(&tok, &ids, &opts, &mut |t| {
            reply.push_str(t);
            out.write_all(t.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| slm::Error::msg(format!("writing to stdout: {e}")))
        })?;
        writeln!(out)?;
        messages.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}
