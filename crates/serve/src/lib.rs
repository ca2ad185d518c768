//! # kiln-serve
//!
//! An OpenAI-compatible HTTP server over any kiln decoder model ([`CausalLm`]), with continuous
//! batching: requests that arrive while others decode join the running batch at the next step
//! and leave it when they finish ([`kiln_core::batching`]).
//!
//! Endpoints: `POST /v1/chat/completions` (through the model's chat template),
//! `POST /v1/completions`, both with `stream: true` as server-sent events; `GET /v1/models`;
//! `GET /health`; for encoder-decoders (NLLB-200, T5) `POST /v1/translations` instead
//! ([`serve_translator`]). The `kiln serve` command loads a model and calls these; an
//! application that holds its own model calls them the same way.
//!
//! ```no_run
//! # fn demo<B: burn::prelude::Backend>(model: kiln_llama::Llama<B>, tokenizer: kiln_core::Tokenizer) {
//! use kiln_core::loading::GenerationDefaults;
//! use kiln_serve::{ServeConfig, serve};
//!
//! let config = ServeConfig::default().with_port(8080).with_model_id("my-model");
//! serve(model, tokenizer, GenerationDefaults::default(), config, |addr| {
//!     eprintln!("listening on http://{addr}")
//! })
//! .unwrap();
//! # }
//! ```

mod api;
mod engine;
mod routes;
mod translate;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use burn::prelude::Backend;
use kiln_core::loading::GenerationDefaults;
use kiln_core::{CausalLm, Tokenizer};

pub use api::ApiError;
pub use translate::{Translation, TranslationRequest, Translator};

/// Where and how [`serve`] listens.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind (default `127.0.0.1`: loopback only).
    pub host: String,
    /// Port (default 8080; 0 picks a free one, passed to `on_ready`).
    pub port: u16,
    /// Sequences decoded together (default 16).
    pub max_concurrent: usize,
    /// Requests that may wait for a place beyond those (default 64); more get a 503.
    pub queue: usize,
    /// When set, every request but `GET /health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The model's id in responses and `/v1/models`.
    pub model_id: String,
    /// After SIGINT/SIGTERM, how long in-flight responses may take to finish before the
    /// server stops anyway (default 10 s).
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_concurrent: 16,
            queue: 64,
            api_key: None,
            model_id: "kiln".into(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ServeConfig {
    /// Sets the host.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }
    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Sets how many sequences decode together.
    pub fn with_max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }
    /// Sets how many requests may wait.
    pub fn with_queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }
    /// Requires this bearer token.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }
    /// Sets the model id.
    pub fn with_model_id(mut self, id: impl Into<String>) -> Self {
        self.model_id = id.into();
        self
    }
    /// Sets the shutdown grace period.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// `host:port`.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The async runtime or the connection loop failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
}

/// Serves `model` over HTTP until SIGINT or SIGTERM (see the crate docs). `defaults` gives EOS
/// ids and the sampling a request gets when it sets none. `on_ready` receives the bound
/// address once the server accepts connections.
pub fn serve<B, M>(
    model: M,
    tokenizer: Tokenizer,
    defaults: GenerationDefaults,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError>
where
    B: Backend,
    M: CausalLm<B> + Send + 'static,
{
    if config.max_concurrent == 0 {
        return Err(ServeError::Config(
            "max_concurrent must be at least 1".into(),
        ));
    }
    let context = model.max_context();
    let (engine, thread) = engine::start(model, tokenizer.clone(), config.max_concurrent);
    let decoder = routes::Decoder::new(engine, tokenizer, defaults, context);
    run(
        routes::Served::Decoder(Box::new(decoder)),
        thread,
        config,
        on_ready,
    )
}

/// Serves an encoder-decoder model's `POST /v1/translations` (NLLB-200, T5; requests run one
/// at a time) until SIGINT or SIGTERM, with the same `/v1/models`, `/health`, API key, bound
/// and shutdown as [`serve`].
pub fn serve_translator<T: Translator>(
    translator: T,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let (handle, thread) = translate::start(translator);
    run(routes::Served::Translator(handle), thread, config, on_ready)
}

fn run(
    served: routes::Served,
    thread: std::thread::JoinHandle<()>,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cancel = served.canceller();
    let state = routes::AppState::new(served, &config);
    let result = runtime.block_on(async move {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        on_ready(listener.local_addr()?);
        let app = routes::router(state);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(());
        });
        let mut server = std::pin::pin!(server.into_future());
        let grace = config.shutdown_grace;
        // After a signal, open responses get `grace` to finish; then the running sequences
        // are ended (each stream gets its last chunk and `[DONE]`) and the server has a moment
        // to send that before it stops regardless.
        tokio::select! {
            r = &mut server => return r.map_err(ServeError::from),
            _ = async move {
                let _ = stop_rx.await;
                tokio::time::sleep(grace).await;
            } => {}
        }
        eprintln!("kiln serve: responses still open after {grace:?}; ending them");
        cancel();
        tokio::select! {
            r = &mut server => r.map_err(ServeError::from),
            _ = tokio::time::sleep(Duration::from_secs(2)) => Ok(()),
        }
    });
    // Dropping the runtime drops every handler, so the model thread's channel closes; its
    // running sequences find their clients gone at the next step.
    drop(runtime);
    let _ = thread.join();
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("kiln serve: shutting down; finishing open responses");
}
