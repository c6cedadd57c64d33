//! `dagrun serve`: one model artifact (`node.model` from a pipeline's cache, or a Hugging Face
//! directory) behind an OpenAI-compatible HTTP API — `/v1/chat/completions`,
//! `/v1/completions` (both with `stream: true` as server-sent events), `/v1/models`, `/health`.
//!
//! This crate owns the HTTP side (axum on tokio: routes, request validation, OpenAI-shaped
//! responses and errors, streaming, shutdown on SIGINT/SIGTERM) and the scheduler that batches
//! requests onto the model. It does not own generation itself — that is
//! `dagrun_model::decoder` (the step-wise batched KV-cache sampler every stage shares) — nor
//! the chat conventions (`dagrun_stages::chat::ChatFormat`: template, stop ids, the reply's
//! `<think>` opening), nor finding artifacts in a cache (`dagrun_engine::cli`).
//!
//! Threads: tokio's workers parse, tokenize and answer; one scheduler thread owns the model and
//! runs continuous batching (`scheduler.rs`); the two talk through a bounded queue and one
//! channel per request.

mod errors;
mod http;
mod model;
mod request;
mod response;
mod scheduler;
mod stream;
mod text;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use dagrun_engine::cli::{EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, GlobalArgs, resolve_artifact};
use dagrun_model::device::{DeviceSpec, run_on};
use futures_util::future::{Either, select};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::http::{AppState, router};
use crate::model::ServedModel;
use crate::scheduler::{Queue, Scheduler};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// `node.model` from a pipeline's cache, or a Hugging Face model directory.
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port; the address is printed on stdout either way.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Most sequences generated together (a request with `n` choices counts `n`).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most sequences waiting for a place in the batch; requests past it get 503.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The pipeline whose cache holds `node.model`.
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

pub fn serve_command(a: ServeArgs, g: &GlobalArgs) -> i32 {
    if a.max_batch == 0 || a.max_queue == 0 {
        eprintln!("--max-batch and --max-queue must be at least 1");
        return EXIT_USAGE;
    }
    let device: DeviceSpec = match a.device.parse() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("--device {}: {e}", a.device);
            return EXIT_USAGE;
        }
    };
    // Held while serving, so that `gc` cannot remove the model meanwhile.
    let artifact = match resolve_artifact(&a.model, a.pipeline.as_deref(), g) {
        Ok(d) => d,
        Err(d) => return dagrun_engine::cli::report(Err(d)),
    };
    match serve(&a, &artifact.path, device) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_STAGE_FAILED
        }
    }
}

fn serve(a: &ServeArgs, dir: &Path, device: DeviceSpec) -> anyhow::Result<()> {
    let model = Arc::new(ServedModel::load(&a.model, dir, a.max_batch)?);
    let queue = Arc::new(Queue::new(a.max_queue));
    let (ready, loaded) = std::sync::mpsc::channel();
    let scheduler = Scheduler {
        dir: dir.to_path_buf(),
        model: model.clone(),
        queue: queue.clone(),
        ready,
    };
    let worker = std::thread::Builder::new()
        .name("dagrun-serve-scheduler".into())
        .spawn(move || run_on(&device, scheduler))
        .context("starting the scheduler thread")?;
    match loaded.recv() {
        Ok(Ok(())) => {}
        Ok(Err(message)) => bail!("loading {}: {message}", dir.display()),
        Err(_) => bail!("the scheduler stopped before the model loaded"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let state = AppState {
        model,
        queue: queue.clone(),
    };
    let served = runtime.block_on(listen(&a.host, a.port, state));
    // Whatever ended the server, let the scheduler finish what it holds and stop.
    queue.close();
    let stopped = match worker.join() {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("the scheduler thread panicked")),
    };
    served.and(stopped)
}

async fn listen(host: &str, port: u16, state: AppState) -> anyhow::Result<()> {
    // Handlers first, so a signal that comes as soon as the address is printed is caught.
    let mut signals = Signals::new()?;
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening on {host}:{port}"))?;
    let address = listener.local_addr()?;
    println!("dagrun serve: {} on http://{address}/v1", state.model.id);
    let _ = std::io::stdout().flush();
    let queue = state.queue.clone();
    let shutdown = async move {
        let signalled = {
            let signal = Box::pin(signals.next());
            let stopped = Box::pin(queue.stopped());
            matches!(select(signal, stopped).await, Either::Left(_))
        };
        if !signalled {
            eprintln!("error: the scheduler stopped; shutting down");
            return;
        }
        eprintln!(
            "stopping: no new requests; finishing those in flight (a second Ctrl-C cancels them)"
        );
        queue.close();
        tokio::spawn(async move {
            signals.next().await;
            eprintln!("cancelling the requests in flight");
            queue.cancel();
        });
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}

/// SIGINT (Ctrl-C) and SIGTERM, either of which asks the server to stop.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("handling SIGTERM")?,
        })
    }

    async fn next(&mut self) {
        let interrupt = Box::pin(self.interrupt.recv());
        let terminate = Box::pin(self.terminate.recv());
        select(interrupt, terminate).await;
    }
}
