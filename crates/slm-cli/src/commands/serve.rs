//! `slm serve`: parsing the flags into the server's options and printing where it listens.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Result};
use slm::models::ComputeDtype;
use slm_server::{ModelSpec, ServeOptions, Server};

use super::Dtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model to serve (repeatable): a causal model (chat and completions) or an encoder
    /// (embeddings); a folder, a .gguf file or a hub id, as for the other commands.
    #[arg(long, short = 'm', required = true)]
    model: Vec<PathBuf>,
    /// The name requests use for each -m, in order (default: its file or folder name).
    #[arg(long)]
    alias: Vec<String>,
    /// The address to listen on; anything but loopback makes the server reachable from other
    /// machines.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests must send `Authorization: Bearer KEY` (default: the SLM_API_KEY variable, if set).
    #[arg(long, env = "SLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sequences decoded together per causal model, in one batched forward pass.
    #[arg(long, default_value_t = 4, value_parser = crate::parse::positive)]
    parallel: usize,
    /// Requests that wait for a slot; the next one gets 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Positions per sequence (default: the model's context length).
    #[arg(long, short = 'c', value_parser = crate::parse::positive)]
    ctx_size: Option<usize>,
    /// A PEFT LoRA adapter applied to the first -m.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// `f32` dequantizes every weight; `auto` keeps GGUF weights quantized.
    #[arg(long, value_enum, default_value = "auto")]
    dtype: Dtype,
}

pub fn run(a: Args) -> Result<()> {
    if a.alias.len() > a.model.len() {
        bail!(
            "{} --alias for {} -m: give one name per model, in order",
            a.alias.len(),
            a.model.len()
        );
    }
    let mut models = Vec::new();
    for (i, mut path) in a.model.into_iter().enumerate() {
        super::resolve_model(&mut path)?;
        models.push(ModelSpec {
            path,
            alias: a.alias.get(i).cloned(),
            adapter: if i == 0 { a.adapter.clone() } else { None },
        });
    }
    let names: Vec<String> = models
        .iter()
        .map(|m| m.path.display().to_string())
        .collect();
    let server = Server::start(ServeOptions {
        models,
        addr: SocketAddr::new(a.host, a.port),
        api_key: a.api_key,
        parallel: a.parallel,
        queue: a.queue,
        ctx_size: a.ctx_size,
        dtype: match a.dtype {
            Dtype::Auto => ComputeDtype::Auto,
            Dtype::F32 => ComputeDtype::F32,
        },
    })?;
    // Tests and scripts read this line to find the port.
    eprintln!(
        "slm serve: listening on http://{} ({}; {} parallel) · Ctrl-C to stop",
        server.addr(),
        names.join(", "),
        a.parallel
    );
    server.wait()?;
    eprintln!("slm serve: stopped");
    Ok(())
}
