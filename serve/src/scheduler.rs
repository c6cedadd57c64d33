//! The scheduler: one thread owns the model and a running batch ([`Decoder`]); requests wait in
//! a bounded queue and join the batch between decoding steps (continuous batching), so requests
//! that arrive together are generated together and a late one does not wait for the batch to
//! finish. Each step's tokens go straight to their requests' channels (streaming).
//!
//! A request's choices are seeded `row_seed(seed, i)`, as `generate` seeds its rows, so a
//! request's samples do not depend on what else is in the batch.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use axum::http::StatusCode;
use burn::tensor::backend::{AutodiffBackend, Backend};
use dagrun_model::decoder::{Decoder, Sequence};
use dagrun_model::device::BackendTask;
use dagrun_model::generate::{Completion, SamplingParams, TooLarge, row_seed};
use tokio::sync::mpsc::UnboundedSender;

use crate::model::ServedModel;
use crate::request::GenerationRequest;

/// What a request's channel receives. `choice` numbers the request's sequences (prompt-major).
#[derive(Debug)]
pub enum Event {
    Token {
        choice: usize,
        token: u32,
        logprob: f32,
    },
    Done {
        choice: usize,
        completion: Completion,
    },
    /// The request ends without its completions (a runtime error, or cancelled at shutdown).
    Failed { status: StatusCode, message: String },
}

struct Job {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
}

impl Job {
    fn sequences(&self) -> usize {
        self.request.prompts.len() * self.request.n
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
    /// More sequences than the queue ever holds: retrying cannot help.
    TooLarge {
        most: usize,
    },
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Sequences of the queued jobs.
    waiting: usize,
    /// No more jobs: finish what is queued and running, then stop.
    closing: bool,
    /// Stop now: fail what is queued and running.
    cancelling: bool,
}

/// Requests waiting for the scheduler, at most `max_waiting` sequences.
pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    max_waiting: usize,
    /// Told when the scheduler has stopped, however it stopped.
    gone: tokio::sync::Notify,
}

impl Queue {
    pub fn new(max_waiting: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            max_waiting,
            gone: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn submit(
        &self,
        request: GenerationRequest,
        events: UnboundedSender<Event>,
    ) -> Result<(), Refused> {
        let job = Job { request, events };
        let mut state = self.lock();
        if state.closing || state.cancelling {
            return Err(Refused::Closed);
        }
        if job.sequences() > self.max_waiting {
            return Err(Refused::TooLarge {
                most: self.max_waiting,
            });
        }
        if state.waiting + job.sequences() > self.max_waiting {
            return Err(Refused::Full);
        }
        state.waiting += job.sequences();
        state.jobs.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// Refuses new requests; the scheduler finishes the queued and running ones, then stops.
    pub fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    /// Refuses new requests and fails the queued and running ones; the scheduler stops.
    pub fn cancel(&self) {
        let mut state = self.lock();
        state.closing = true;
        state.cancelling = true;
        self.wake.notify_one();
    }

    /// Completes once the scheduler has stopped (after a shutdown, or if it died).
    pub async fn stopped(&self) {
        self.gone.notified().await;
    }

    /// The scheduler is gone: refuse new requests and fail the waiting ones, so that no
    /// client waits for an answer that will not come.
    fn abandon(&self) {
        let mut state = self.lock();
        state.closing = true;
        state.waiting = 0;
        for job in state.jobs.drain(..) {
            let message = "the scheduler stopped before this request ran";
            fail(&job.events, StatusCode::SERVICE_UNAVAILABLE, message);
        }
        drop(state);
        self.gone.notify_one();
    }
}

/// Abandons the queue when the scheduler returns or unwinds from a panic.
struct AbandonOnExit<'a>(&'a Queue);

impl Drop for AbandonOnExit<'_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Where a sequence of the running batch reports to.
struct Live {
    events: UnboundedSender<Event>,
    choice: usize,
}

/// The scheduler's work, run on the device's backend by `run_on`. `ready` hears once that the
/// model loaded (or why it did not).
pub struct Scheduler {
    pub dir: PathBuf,
    pub model: Arc<ServedModel>,
    pub queue: Arc<Queue>,
    pub ready: std::sync::mpsc::Sender<Result<(), String>>,
}

impl BackendTask for Scheduler {
    type Output = ();

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<()> {
        // Running requests hear of a panic by their channels closing as the batch unwinds.
        let _abandon = AbandonOnExit(&self.queue);
        let lm = match dagrun_model::load_model::<B::InnerBackend>(&self.dir, &device) {
            Ok(lm) => {
                let _ = self.ready.send(Ok(()));
                lm
            }
            Err(e) => {
                let _ = self.ready.send(Err(format!("{e:#}")));
                return Err(e);
            }
        };
        let mut batch = Batch {
            decoder: Decoder::new(&lm, Some(&self.model.format.tokenizer)),
            live: HashMap::new(),
            next_key: 0,
            deferred: VecDeque::new(),
        };
        loop {
            let admitted = {
                let mut state = self.queue.lock();
                loop {
                    if state.cancelling {
                        let jobs: Vec<Job> = state.jobs.drain(..).collect();
                        batch.cancel(jobs);
                        return Ok(());
                    }
                    if !batch.is_idle() || !state.jobs.is_empty() {
                        break;
                    }
                    if state.closing {
                        return Ok(());
                    }
                    state = self
                        .queue
                        .wake
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                batch.admit(&mut state, self.model.max_batch)
            };
            batch.drop_abandoned();
            batch.start(admitted);
            batch.step();
        }
    }
}

/// The running batch and where its sequences report to.
struct Batch<'a, B: Backend> {
    decoder: Decoder<'a, B>,
    live: HashMap<u64, Live>,
    next_key: u64,
    /// Jobs that did not fit in memory beside the running batch: they go first once it is
    /// empty.
    deferred: VecDeque<Job>,
}

impl<B: Backend> Batch<'_, B> {
    fn is_idle(&self) -> bool {
        self.decoder.is_empty() && self.deferred.is_empty()
    }

    /// Takes whole jobs, oldest first, while the batch has room for their sequences; the
    /// deferred ones only once the batch is empty (they did not fit beside it).
    fn admit(&mut self, state: &mut QueueState, max_batch: usize) -> Vec<Job> {
        let mut taken = Vec::new();
        let mut size = self.decoder.len();
        let from_queue = self.deferred.is_empty();
        let source = if from_queue {
            &mut state.jobs
        } else if size == 0 {
            &mut self.deferred
        } else {
            return taken;
        };
        while let Some(job) = source.front() {
            // A job alone always fits: `n` × prompts ≤ max_batch is checked on arrival.
            if size > 0 && size + job.sequences() > max_batch {
                break;
            }
            let Some(job) = source.pop_front() else {
                break;
            };
            size += job.sequences();
            taken.push(job);
        }
        if from_queue {
            state.waiting -= taken.iter().map(Job::sequences).sum::<usize>();
        }
        taken
    }

    /// Sequences whose client went away (its channel closed) leave the batch.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = (self.live.iter())
            .filter(|(_, l)| l.events.is_closed())
            .map(|(k, _)| *k)
            .collect();
        if !gone.is_empty() {
            self.decoder.remove(&gone);
            for k in &gone {
                self.live.remove(k);
            }
        }
    }

    /// Prefills the admitted jobs' sequences into the batch; choice `i` of a request samples
    /// with `row_seed(seed, i)`.
    fn start(&mut self, admitted: Vec<Job>) {
        let admitted: Vec<Job> = admitted
            .into_iter()
            .filter(|j| !j.events.is_closed())
            .collect();
        if admitted.is_empty() {
            return;
        }
        let mut sequences = Vec::new();
        let mut entries = Vec::new();
        for job in &admitted {
            let r = &job.request;
            for (p, prompt) in r.prompts.iter().enumerate() {
                for i in 0..r.n {
                    let key = self.next_key;
                    self.next_key += 1;
                    sequences.push(Sequence {
                        key,
                        prompt: prompt.clone(),
                        params: SamplingParams {
                            // Every choice its own stream, across prompts too.
                            seed: row_seed(r.params.seed, p * r.n + i),
                            ..r.params.clone()
                        },
                        stop_ids: r.stop_ids.clone(),
                    });
                    let live = Live {
                        events: job.events.clone(),
                        choice: p * r.n + i,
                    };
                    entries.push((key, live));
                }
            }
        }
        let running = self.decoder.len();
        match self.decoder.add(sequences) {
            Ok(()) => self.live.extend(entries),
            Err(e) if e.is::<TooLarge>() && running > 0 && self.decoder.len() == running => {
                self.deferred.extend(admitted);
            }
            Err(e) => {
                // Too large alone is the request's fault; anything else is ours.
                let status = if e.is::<TooLarge>() {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                for job in &admitted {
                    fail(&job.events, status, &format!("{e:#}"));
                }
                if self.decoder.len() != running {
                    self.fail_all(&e);
                }
            }
        }
    }

    /// One decoding step; its tokens (and finished completions) go to their requests.
    fn step(&mut self) {
        if self.decoder.is_empty() {
            return;
        }
        let tokens = match self.decoder.step() {
            Ok(tokens) => tokens,
            Err(e) => return self.fail_all(&e),
        };
        for t in tokens {
            let Some(l) = self.live.get(&t.key) else {
                continue;
            };
            let _ = l.events.send(Event::Token {
                choice: l.choice,
                token: t.token,
                logprob: t.logprob,
            });
            if let Some(completion) = t.finished {
                let _ = l.events.send(Event::Done {
                    choice: l.choice,
                    completion,
                });
                self.live.remove(&t.key);
            }
        }
    }

    /// A decoding error takes the whole batch with it: every running request fails with it.
    fn fail_all(&mut self, e: &anyhow::Error) {
        tracing::error!("generation failed: {e:#}");
        let message = format!("generation failed: {e:#}");
        for l in self.live.values() {
            fail(&l.events, StatusCode::INTERNAL_SERVER_ERROR, &message);
        }
        let keys: Vec<u64> = self.live.keys().copied().collect();
        self.decoder.remove(&keys);
        self.live.clear();
    }

    /// Shutdown without waiting: every queued, deferred and running request gets a 503.
    fn cancel(&mut self, queued: Vec<Job>) {
        let message = "the server is shutting down; the request was cancelled";
        for job in self.deferred.drain(..).chain(queued) {
            fail(&job.events, StatusCode::SERVICE_UNAVAILABLE, message);
        }
        for l in self.live.values() {
            fail(&l.events, StatusCode::SERVICE_UNAVAILABLE, message);
        }
    }
}

fn fail(events: &UnboundedSender<Event>, status: StatusCode, message: &str) {
    let _ = events.send(Event::Failed {
        status,
        message: message.to_string(),
    });
}
