//! The thread that owns the model: it takes requests from the HTTP handlers, runs them in one
//! continuous batch ([`Batcher`]) and sends each request's events back on its own channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use burn::prelude::Backend;
use kiln_core::batching::{BatchEvent, BatchRequest, BatchSink, Batcher};
use kiln_core::{CausalLm, Tokenizer};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Sends a request's events to its handler; closed once the handler (the client's
/// connection) is gone.
struct ChannelSink(UnboundedSender<BatchEvent>);

impl BatchSink for ChannelSink {
    fn send(&mut self, event: BatchEvent) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// What a handler gives the engine: the request minus its sink.
pub struct Job {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Stopping and sampling.
    pub config: kiln_core::GenerationConfig,
    /// OpenAI penalties.
    pub frequency_penalty: f32,
    /// OpenAI penalties.
    pub presence_penalty: f32,
}

/// The handlers' side of the engine: submits jobs and counts what is queued or running.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<(Job, UnboundedSender<BatchEvent>)>,
    stats: Arc<Stats>,
    cancel: Arc<AtomicBool>,
}

/// The bound on requests admitted (running or waiting).
pub struct Admission {
    admitted: Arc<AtomicUsize>,
    limit: usize,
}

/// What `/health` reports of the engine.
#[derive(Default)]
pub struct Stats {
    /// Sequences decoding now.
    pub running: AtomicUsize,
    /// Most sequences that ever decoded in one step.
    pub peak_running: AtomicUsize,
}

/// A slot in the engine's bound; given back when dropped (the response ended or its client
/// left).
pub struct Slot {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// At most `limit` requests at a time.
    pub fn new(limit: usize) -> Self {
        Self {
            admitted: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Takes a slot unless `limit` requests are already admitted.
    pub fn admit(&self) -> Option<Slot> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                admitted: self.admitted.clone(),
            })
    }

    /// Requests admitted (running or waiting).
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}

impl EngineHandle {
    /// Ends every running sequence at its next step (each stream gets its last chunk) and
    /// refuses what is queued or comes later: the end of a shutdown's grace period.
    pub fn cancel_all(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues `job`; its events arrive on the returned channel. `None` when the engine has
    /// stopped.
    pub fn submit(&self, job: Job) -> Option<UnboundedReceiver<BatchEvent>> {
        let (tx, rx) = unbounded_channel();
        self.jobs.send((job, tx)).ok()?;
        Some(rx)
    }
}

/// Starts the engine thread over `model`; it runs until every handle is dropped and the last
/// sequence has ended. At most `max_concurrent` sequences decode together; the rest wait.
pub fn start<B, M>(
    model: M,
    tokenizer: Tokenizer,
    max_concurrent: usize,
) -> (EngineHandle, std::thread::JoinHandle<()>)
where
    B: Backend,
    M: CausalLm<B> + Send + 'static,
{
    let (jobs, rx) = mpsc::channel::<(Job, UnboundedSender<BatchEvent>)>();
    let stats = Arc::new(Stats::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let (engine_stats, engine_cancel) = (stats.clone(), cancel.clone());
    let thread = std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || {
            let limits = (max_concurrent.max(1), &*engine_stats, &*engine_cancel);
            run(model, tokenizer, rx, limits)
        })
        .expect("spawning the engine thread");
    let handle = EngineHandle {
        jobs,
        stats,
        cancel,
    };
    (handle, thread)
}

/// The engine's bound, counters and cancel flag.
type Limits<'a> = (usize, &'a Stats, &'a AtomicBool);

fn run<B: Backend, M: CausalLm<B>>(
    model: M,
    tokenizer: Tokenizer,
    jobs: mpsc::Receiver<(Job, UnboundedSender<BatchEvent>)>,
    limits: Limits<'_>,
) {
    // A panic inside the model (a bug, not a request's fault) ends the requests in flight,
    // whose handlers then answer 500, and the engine goes on with a fresh batch: the server
    // never dies of a request.
    loop {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batches(&model, &tokenizer, &jobs, limits)
        }));
        match served {
            Ok(()) => return,
            Err(panic) => eprintln!(
                "kiln serve: a decode step failed ({}); its requests were ended",
                kiln_core::panic_message(panic.as_ref())
            ),
        }
    }
}

/// Runs requests until every handle is dropped and the last sequence has ended.
fn run_batches<B: Backend, M: CausalLm<B>>(
    model: &M,
    tokenizer: &Tokenizer,
    jobs: &mpsc::Receiver<(Job, UnboundedSender<BatchEvent>)>,
    (max_concurrent, stats, cancel): Limits<'_>,
) {
    let mut batcher = Batcher::new(model, Some(tokenizer));
    let mut waiting = VecDeque::new();
    let mut open = true;
    loop {
        if batcher.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if cancel.load(Ordering::Acquire) {
            batcher.finish_all();
            for (_, tx) in waiting.drain(..) {
                let _ = tx.send(BatchEvent::Failed(kiln_core::Error::arg(
                    "server",
                    "it is shutting down",
                )));
            }
            continue;
        }
        // New sequences join between steps; each prefill delays the running ones once.
        while batcher.len() < max_concurrent {
            let Some((job, tx)) = waiting.pop_front() else {
                break;
            };
            if tx.is_closed() {
                continue;
            }
            batcher.add(BatchRequest {
                prompt: job.prompt,
                config: job.config,
                frequency_penalty: job.frequency_penalty,
                presence_penalty: job.presence_penalty,
                sink: Box::new(ChannelSink(tx)),
            });
        }
        let running = batcher.len();
        stats.running.store(running, Ordering::Relaxed);
        stats.peak_running.fetch_max(running, Ordering::Relaxed);
        if !batcher.is_empty() {
            batcher.step();
        }
    }
}
