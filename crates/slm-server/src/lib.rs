//! `slm serve`: the models slm runs behind OpenAI's HTTP API. Causal models answer
//! `/v1/chat/completions` and `/v1/completions` from a decoding engine each (batched decode of
//! up to `parallel` streams, see [`engine`]); encoders answer `/v1/embeddings`.

pub mod api;
pub mod engine;
pub mod metrics;
mod routes;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use slm::encode::Encoder;
use slm::models::ComputeDtype;
use slm::tokenize::{ChatTemplate, Tokenizer};

use engine::Engine;
use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Model(#[from] slm::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("the server stopped: {0}")]
    Runtime(std::io::Error),
}

pub type Result<T, E = ServeError> = std::result::Result<T, E>;

/// One `-m`: a causal model or an encoder, with the name requests use for it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub alias: Option<String>,
    /// A PEFT LoRA adapter applied to this model's weights.
    pub adapter: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub models: Vec<ModelSpec>,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// Sequences decoded together per causal model.
    pub parallel: usize,
    /// Requests waiting for a slot before the next gets 429.
    pub queue: usize,
    /// Positions per sequence (default: the model's context).
    pub ctx_size: Option<usize>,
    pub dtype: ComputeDtype,
}

pub(crate) enum Served {
    Causal {
        engine: Engine,
        tok: Arc<Tokenizer>,
        template: Box<std::result::Result<ChatTemplate, String>>,
        /// The vocabulary for constrained decoding, built at the first request that needs it.
        grammars: std::sync::OnceLock<std::result::Result<Arc<slm::generate::Grammars>, String>>,
    },
    Encoder(Arc<Encoder>),
}

pub(crate) struct Model {
    pub name: String,
    pub served: Served,
    pub created: u64,
}

pub(crate) struct AppState {
    pub models: Vec<Model>,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    pub fn queued(&self) -> usize {
        self.models
            .iter()
            .map(|m| match &m.served {
                Served::Causal { engine, .. } => engine.queued(),
                Served::Encoder(_) => 0,
            })
            .sum()
    }
}

/// The name a model is served under when no alias is given: its file or folder name.
fn default_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn load(opts: &ServeOptions, metrics: &Arc<Metrics>) -> Result<Vec<Model>> {
    if opts.models.is_empty() {
        return Err(ServeError::Options("give at least one model (-m)".into()));
    }
    if opts.parallel == 0 {
        return Err(ServeError::Options("--parallel must be at least 1".into()));
    }
    let mut models: Vec<Model> = Vec::new();
    for spec in &opts.models {
        let name = spec
            .alias
            .clone()
            .unwrap_or_else(|| default_name(&spec.path));
        if models.iter().any(|m| m.name == name) {
            return Err(ServeError::Options(format!(
                "two models are named '{name}'; give one an --alias"
            )));
        }
        let files = slm::io::ModelFiles::locate(&spec.path)?;
        let served = if slm::models::config_of(&files)?.architecture().is_encoder() {
            Served::Encoder(Arc::new(Encoder::load_with(
                &spec.path,
                spec.adapter.as_deref(),
            )?))
        } else {
            let m = slm::models::load_causal_with(&spec.path, opts.dtype, spec.adapter.as_deref())?;
            let tok = Tokenizer::load(&m.files)?;
            tok.check_matches(m.config.vocab_size())?;
            let context = opts
                .ctx_size
                .unwrap_or(usize::MAX)
                .min(m.model.context_length());
            let template = Box::new(tok.chat().map_err(|e| e.to_string()));
            let tok = Arc::new(tok);
            let engine = Engine::start(
                m.model,
                tok.clone(),
                opts.parallel,
                opts.queue,
                context,
                metrics.clone(),
            );
            Served::Causal {
                engine,
                tok,
                template,
                grammars: Default::default(),
            }
        };
        models.push(Model {
            name,
            served,
            created: now(),
        });
    }
    Ok(models)
}

/// A running server: dropping it (or [`Server::stop`]) shuts it down gracefully.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Loads the models, binds the address (port 0: any free port) and serves in the
    /// background until stopped, SIGTERM or Ctrl-C. Running requests finish first.
    pub fn start(opts: ServeOptions) -> Result<Server> {
        let metrics = Arc::new(Metrics::default());
        let models = load(&opts, &metrics)?;
        let listener = TcpListener::bind(opts.addr).map_err(|source| ServeError::Bind {
            addr: opts.addr,
            source,
        })?;
        let addr = listener.local_addr().map_err(ServeError::Runtime)?;
        listener
            .set_nonblocking(true)
            .map_err(ServeError::Runtime)?;
        let state = Arc::new(AppState {
            models,
            api_key: opts.api_key.clone(),
            metrics,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("slm-http".into())
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, routes::router(state))
                        .with_graceful_shutdown(async move {
                            tokio::select! {
                                _ = stopped => {}
                                _ = shutdown_signal() => {}
                            }
                        })
                        .await
                })
            })
            .map_err(ServeError::Runtime)?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server has shut down (after SIGTERM or Ctrl-C).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stops accepting connections, lets running requests finish, and returns.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(ServeError::Runtime),
            Some(Err(_)) => Err(ServeError::Options("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.join();
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
