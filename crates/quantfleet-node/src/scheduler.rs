//! The engine loop: one thread owns the KV cache and runs continuous batching across requests. Each step it
//! (1) drops queued or running requests whose client went away or whose deadline passed, returning their KV
//! blocks, (2) admits queued requests while batch slots and KV blocks allow (a request's blocks for its
//! prompt plus max_tokens are reserved at admission, so a running sequence never runs out mid-stream),
//! (3) runs one teacher-forced scoring pass if one is waiting, and (4) runs one batched forward step over all
//! running sequences (chunked prefill for new ones, one token for decoding ones), checks the logits for
//! NaN/Inf and samples. Requests wait in a bounded FIFO; a full queue is refused at submission.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use quantfleet_engine::backend::Backend;
use quantfleet_engine::kv_cache::{KvCache, SeqKv};
use quantfleet_engine::sampler::{Sampler, SamplingParams, logsumexp, top_logprobs};
use quantfleet_engine::{BatchEntry, Engine, Logits};
use quantfleet_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::metrics::{Metrics, Outcome, Rpc};
use crate::text::StopScanner;

/// Prompt tokens one sequence feeds per step: long prompts are prefilled in chunks so decoding sequences in
/// the same batch keep a bounded inter-token latency.
const PREFILL_CHUNK: usize = 256;
/// How often an idle loop wakes to expire queued requests' deadlines.
const IDLE_TICK: Duration = Duration::from_millis(20);

pub struct GenerateJob {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_tokens: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub logprobs: bool,
    pub top_logprobs: usize,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Testing aid (--fault-injection-marker): poison this request's logits with NaN.
    pub inject_fault: bool,
    pub events: mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>,
}

pub struct ScoreJob {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub continuation: Vec<u32>,
    pub top_logprobs: usize,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    pub inject_fault: bool,
    pub reply: oneshot::Sender<Result<pb::ScoreResponse, Status>>,
}

pub enum Job {
    Generate(GenerateJob),
    Score(ScoreJob),
}

impl Job {
    fn client_gone(&self) -> bool {
        match self {
            Job::Generate(g) => g.events.is_closed(),
            Job::Score(s) => s.reply.is_closed(),
        }
    }
    fn deadline(&self) -> Option<Instant> {
        match self {
            Job::Generate(g) => g.deadline,
            Job::Score(s) => s.deadline,
        }
    }
    fn rpc(&self) -> Rpc {
        match self {
            Job::Generate(_) => Rpc::Generate,
            Job::Score(_) => Rpc::Score,
        }
    }
    /// Ends the request with an error status (counted by outcome).
    fn fail(self, status: Status, metrics: &Metrics) {
        metrics.request(self.rpc(), Outcome::of_code(status.code()));
        match self {
            Job::Generate(g) => {
                let _ = g.events.send(Err(status));
            }
            Job::Score(s) => {
                let _ = s.reply.send(Err(status));
            }
        }
    }
}

/// Why a submission was refused.
#[derive(Debug)]
pub enum SubmitError {
    /// The admission queue is full; retry after about this long.
    QueueFull { retry_after: Duration },
    /// The node is draining or stopped.
    Closed,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The shared side of the scheduler: submission, state, and shutdown.
pub struct Scheduler {
    queue: Mutex<Queue>,
    wake: Condvar,
    max_queue: usize,
    /// Set when the drain deadline passed: the loop fails everything left and exits.
    abort: AtomicBool,
    /// Queued plus running requests (for drain).
    in_flight: AtomicU64,
    /// Exponential moving average of request service time, milliseconds (the retry hint).
    ewma_service_ms: AtomicU64,
    faults: AtomicU32,
    fault_threshold: u32,
    /// Called once when faults reach the threshold (flips health to NOT_SERVING).
    on_fault_threshold: Box<dyn Fn() + Send + Sync>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    pub fn new(
        max_queue: usize,
        fault_threshold: u32,
        metrics: Arc<Metrics>,
        on_fault_threshold: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
            max_queue,
            abort: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            ewma_service_ms: AtomicU64::new(100),
            faults: AtomicU32::new(0),
            fault_threshold,
            on_fault_threshold,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let mut q = self.lock();
        if q.closed {
            return Err(SubmitError::Closed);
        }
        if q.jobs.len() >= self.max_queue {
            let ms = self.ewma_service_ms.load(Relaxed).clamp(10, 10_000);
            return Err(SubmitError::QueueFull { retry_after: Duration::from_millis(ms) });
        }
        q.jobs.push_back(job);
        self.in_flight.fetch_add(1, Relaxed);
        self.metrics.gauges.queue_depth.store(q.jobs.len() as u64, Relaxed);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops admission (new submissions get `Closed`); queued and running requests continue.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Fails every remaining request with UNAVAILABLE and stops the loop.
    pub fn abort(&self) {
        self.abort.store(true, Relaxed);
        self.close();
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    pub fn faults(&self) -> u32 {
        self.faults.load(Relaxed)
    }

    fn finished(&self, arrived: Instant) {
        self.in_flight.fetch_sub(1, Relaxed);
        let ms = arrived.elapsed().as_millis().min(u64::MAX as u128) as u64;
        let old = self.ewma_service_ms.load(Relaxed);
        self.ewma_service_ms.store((old * 7 + ms) / 8, Relaxed);
    }

    fn record_fault(&self) {
        self.metrics.numerical_faults.fetch_add(1, Relaxed);
        if self.faults.fetch_add(1, Relaxed) + 1 == self.fault_threshold {
            (self.on_fault_threshold)();
        }
    }
}

/// A generating sequence in the running batch.
struct Running {
    job: GenerateJob,
    seq: SeqKv,
    /// Prompt tokens not yet fed (prefill), or the last sampled token (decode).
    pending: Vec<u32>,
    fed: usize,
    sampler: Sampler,
    generated: Vec<u32>,
    scanner: StopScanner,
    admitted: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

enum StepEnd {
    Continue,
    Done(pb::FinishReason, Option<String>),
    Failed(Status),
}

pub struct EngineLoop<B: Backend> {
    pub engine: Arc<Engine<B>>,
    pub kv: KvCache<B>,
    pub max_batch: usize,
    pub eos: Vec<u32>,
    pub sched: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

impl<B: Backend> EngineLoop<B> {
    /// Runs until aborted, or closed with nothing left in flight.
    pub fn run(mut self) {
        let mut running: Vec<Running> = Vec::new();
        let mut ws = self.engine.model.new_workspace();
        let mut logits = Vec::new();
        loop {
            let before = running.len();
            let score = self.admit(&mut running);
            if running.len() != before {
                // Admission changes the gauges before this step's tokens reach any client: a reader that has
                // seen a token never sees the state from before its sequence was admitted.
                self.publish(&running);
            }
            if self.sched.abort.load(Relaxed) {
                for r in running.drain(..) {
                    self.end(r, StepEnd::Failed(Status::unavailable("node is shutting down: drain deadline passed")));
                }
                let jobs: Vec<Job> = self.sched.lock().jobs.drain(..).collect();
                for job in jobs {
                    self.sched.finished(Instant::now());
                    job.fail(Status::unavailable("node is shutting down: drain deadline passed"), &self.metrics);
                }
                self.publish(&running);
                return;
            }
            if let Some(job) = score {
                self.score(&mut ws, job);
            }
            if !running.is_empty() {
                self.step(&mut ws, &mut running, &mut logits);
            }
            self.publish(&running);
            if running.is_empty() {
                let q = self.sched.lock();
                if q.closed && q.jobs.is_empty() {
                    return;
                }
                if q.jobs.is_empty() || self.kv.free_blocks() == 0 {
                    let _ = self.sched.wake.wait_timeout(q, IDLE_TICK);
                }
            }
        }
    }

    fn publish(&self, running: &[Running]) {
        let g = &self.metrics.gauges;
        g.running_sequences.store(running.len() as u64, Relaxed);
        g.queue_depth.store(self.sched.lock().jobs.len() as u64, Relaxed);
        g.kv_blocks_free.store(self.kv.free_blocks() as u64, Relaxed);
        g.kv_blocks_used.store((self.kv.total_blocks() - self.kv.free_blocks()) as u64, Relaxed);
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        self.kv.blocks_for(tokens)
    }

    /// Expires dead queued requests, moves admissible generate requests into `running` (FIFO, stopping at the
    /// first that does not fit) and returns a scoring request to run this iteration, if it is next in line.
    fn admit(&mut self, running: &mut Vec<Running>) -> Option<ScoreJob> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut q = self.sched.lock();
        let mut i = 0;
        while i < q.jobs.len() {
            let job = &q.jobs[i];
            if job.client_gone() || job.deadline().is_some_and(|d| d <= now) {
                expired.push(q.jobs.remove(i).expect("index in range"));
            } else {
                i += 1;
            }
        }
        let mut score = None;
        while let Some(front) = q.jobs.front() {
            let ok = match front {
                Job::Generate(g) => {
                    running.len() < self.max_batch
                        && self.blocks_for(g.prompt.len() + g.max_tokens) <= self.kv.free_blocks()
                }
                Job::Score(s) => {
                    score.is_none() && self.blocks_for(s.prompt.len() + s.continuation.len()) <= self.kv.free_blocks()
                }
            };
            if !ok {
                break;
            }
            match q.jobs.pop_front().expect("front exists") {
                Job::Score(s) => score = Some(s),
                Job::Generate(g) => {
                    let mut seq = SeqKv::default();
                    // Cannot fail: checked against free blocks above.
                    if let Err(e) = self.kv.reserve(&mut seq, g.prompt.len() + g.max_tokens) {
                        Job::Generate(g).fail(Status::internal(e.to_string()), &self.metrics);
                        continue;
                    }
                    let sampler = match Sampler::new(g.sampling.clone()) {
                        Ok(s) => s,
                        Err(e) => {
                            self.kv.release(&mut seq);
                            self.sched.finished(g.arrived);
                            Job::Generate(g).fail(Status::invalid_argument(e.to_string()), &self.metrics);
                            continue;
                        }
                    };
                    self.metrics.prompt_tokens.fetch_add(g.prompt.len() as u64, Relaxed);
                    tracing::debug!(request_id = %g.request_id, prompt_tokens = g.prompt.len(), "admitted");
                    running.push(Running {
                        pending: g.prompt.clone(),
                        fed: 0,
                        scanner: StopScanner::new(g.stop_strings.clone()),
                        job: g,
                        seq,
                        sampler,
                        generated: Vec::new(),
                        admitted: now,
                        first_token_at: None,
                        last_token_at: None,
                    });
                }
            }
        }
        drop(q);
        for job in expired {
            let arrived = match &job {
                Job::Generate(g) => g.arrived,
                Job::Score(s) => s.arrived,
            };
            self.sched.finished(arrived);
            let status = if job.client_gone() {
                Status::cancelled("client went away while queued")
            } else {
                Status::deadline_exceeded("request deadline passed while queued")
            };
            job.fail(status, &self.metrics);
        }
        score
    }

    fn score(&mut self, ws: &mut quantfleet_engine::model::Workspace<B>, job: ScoreJob) {
        let all: Vec<u32> = job.prompt.iter().chain(&job.continuation).copied().collect();
        let mut seq = SeqKv::default();
        let mut logits = Vec::new();
        let r = self.engine.model.forward_batch(
            ws,
            &mut self.kv,
            &mut [BatchEntry { seq: &mut seq, tokens: &all }],
            Logits::All,
            &mut logits,
        );
        self.kv.release(&mut seq);
        self.sched.finished(job.arrived);
        self.metrics.engine_steps.fetch_add(1, Relaxed);
        let vocab = self.engine.model.config.vocab;
        let result = r.map_err(|e| Status::internal(e.to_string())).and_then(|()| {
            let p = job.prompt.len();
            let mut tokens = Vec::with_capacity(job.continuation.len());
            for (i, &id) in job.continuation.iter().enumerate() {
                let row = &mut logits[(p - 1 + i) * vocab..(p + i) * vocab];
                if job.inject_fault {
                    row[0] = f32::NAN;
                }
                if !row.iter().all(|v| v.is_finite()) {
                    self.sched.record_fault();
                    return Err(Status::internal(format!(
                        "numerical fault: non-finite logits at continuation position {i}"
                    )));
                }
                let lse = logsumexp(row);
                tokens.push(pb::ScoredToken {
                    id,
                    logprob: (row[id as usize] as f64 - lse) as f32,
                    top_logprobs: to_pb(top_logprobs(row, job.top_logprobs, lse)),
                });
            }
            Ok(pb::ScoreResponse { tokens, prompt_tokens: p as u32 })
        });
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(s) => Outcome::of_code(s.code()),
        };
        if job.reply.send(result).is_err() {
            self.metrics.request(Rpc::Score, Outcome::Cancelled);
        } else {
            self.metrics.request(Rpc::Score, outcome);
        }
        tracing::debug!(request_id = %job.request_id, ?outcome, "scored");
    }

    fn step(
        &mut self,
        ws: &mut quantfleet_engine::model::Workspace<B>,
        running: &mut Vec<Running>,
        logits: &mut Vec<f32>,
    ) {
        // Cancellation and deadlines first: a dead sequence's blocks are free before this step runs.
        let now = Instant::now();
        let mut i = 0;
        while i < running.len() {
            let r = &running[i];
            let end = if r.job.events.is_closed() {
                Some(Status::cancelled("client went away"))
            } else if r.job.deadline.is_some_and(|d| d <= now) {
                Some(Status::deadline_exceeded("request deadline passed"))
            } else {
                None
            };
            match end {
                Some(status) => {
                    let r = running.swap_remove(i);
                    self.end(r, StepEnd::Failed(status));
                }
                None => i += 1,
            }
        }
        if running.is_empty() {
            return;
        }
        let chunks: Vec<usize> = running.iter().map(|r| r.pending.len().min(PREFILL_CHUNK)).collect();
        let mut batch: Vec<BatchEntry> = running
            .iter_mut()
            .zip(&chunks)
            .map(|(r, &n)| BatchEntry { seq: &mut r.seq, tokens: &r.pending[..n] })
            .collect();
        let result = self.engine.model.forward_batch(ws, &mut self.kv, &mut batch, Logits::Last, logits);
        drop(batch);
        self.metrics.engine_steps.fetch_add(1, Relaxed);
        if let Err(e) = result {
            tracing::error!(error = %e, "batched forward step failed");
            for r in running.drain(..) {
                self.end(r, StepEnd::Failed(Status::internal(format!("engine error: {e}"))));
            }
            return;
        }
        let vocab = self.engine.model.config.vocab;
        let mut ends = Vec::new();
        for (idx, (r, n)) in running.iter_mut().zip(chunks).enumerate() {
            r.pending.drain(..n);
            r.fed += n;
            if !r.pending.is_empty() {
                continue; // still prefilling
            }
            let row = &mut logits[idx * vocab..(idx + 1) * vocab];
            let end = self.sample(r, row);
            if !matches!(end, StepEnd::Continue) {
                ends.push((idx, end));
            }
        }
        for (idx, end) in ends.into_iter().rev() {
            let r = running.swap_remove(idx);
            self.end(r, end);
        }
    }

    fn sample(&self, r: &mut Running, row: &mut [f32]) -> StepEnd {
        if r.job.inject_fault {
            row[0] = f32::NAN;
        }
        if !row.iter().all(|v| v.is_finite()) {
            self.sched.record_fault();
            return StepEnd::Failed(Status::internal(format!(
                "numerical fault: non-finite logits at generated position {}",
                r.generated.len()
            )));
        }
        let id = match r.sampler.sample(row) {
            Ok(id) => id,
            Err(e) => return StepEnd::Failed(Status::internal(format!("sampling failed: {e}"))),
        };
        let now = Instant::now();
        match r.last_token_at {
            None => {
                r.first_token_at = Some(now);
                self.metrics.ttft.observe(now - r.job.arrived);
            }
            Some(prev) => self.metrics.inter_token.observe(now - prev),
        }
        r.last_token_at = Some(now);
        self.metrics.generated_tokens.fetch_add(1, Relaxed);
        r.generated.push(id);
        let tok = &self.engine.tokenizer;
        let lse = if r.job.logprobs || r.job.top_logprobs > 0 { logsumexp(row) } else { 0.0 };
        let stop_token = r.job.stop_tokens.contains(&id);
        let length = r.generated.len() >= r.job.max_tokens;
        let full = tok.decode(&r.generated, true).unwrap_or_default();
        let delta = r.scanner.advance(&full, stop_token || length);
        let token = pb::GeneratedToken {
            id,
            text: tok.decode(&[id], false).unwrap_or_default(),
            logprob: if r.job.logprobs { (row[id as usize] as f64 - lse) as f32 } else { 0.0 },
            top_logprobs: to_pb(top_logprobs(row, r.job.top_logprobs, lse)),
        };
        let msg = pb::GenerateResponse { tokens: vec![token], text: delta.text, summary: None };
        if r.job.events.send(Ok(msg)).is_err() {
            return StepEnd::Failed(Status::cancelled("client went away"));
        }
        if let Some(stop) = delta.stop {
            StepEnd::Done(pb::FinishReason::StopString, Some(stop))
        } else if stop_token {
            StepEnd::Done(pb::FinishReason::StopToken, None)
        } else if length {
            StepEnd::Done(pb::FinishReason::Length, None)
        } else {
            r.pending.push(id);
            StepEnd::Continue
        }
    }

    /// Releases the sequence's KV blocks and ends its stream.
    fn end(&mut self, mut r: Running, end: StepEnd) {
        self.kv.release(&mut r.seq);
        self.sched.finished(r.job.arrived);
        let (outcome, log) = match end {
            StepEnd::Continue => unreachable!("only finished sequences end"),
            StepEnd::Done(reason, stop) => {
                let summary = pb::GenerateSummary {
                    finish_reason: reason as i32,
                    prompt_tokens: r.job.prompt.len() as u32,
                    completion_tokens: r.generated.len() as u32,
                    matched_stop: stop.unwrap_or_default(),
                    queue_micros: micros(r.admitted - r.job.arrived),
                    time_to_first_token_micros: r.first_token_at.map_or(0, |t| micros(t - r.job.arrived)),
                    total_micros: r.last_token_at.map_or(0, |t| micros(t - r.job.arrived)),
                };
                let msg = pb::GenerateResponse { tokens: vec![], text: String::new(), summary: Some(summary) };
                let outcome = if r.job.events.send(Ok(msg)).is_ok() { Outcome::Ok } else { Outcome::Cancelled };
                (outcome, reason.as_str_name().to_string())
            }
            StepEnd::Failed(status) => {
                let outcome = Outcome::of_code(status.code());
                let log = format!("{:?}: {}", status.code(), status.message());
                let _ = r.job.events.send(Err(status));
                (outcome, log)
            }
        };
        self.metrics.request(Rpc::Generate, outcome);
        tracing::info!(
            request_id = %r.job.request_id,
            outcome = outcome.label(),
            end = %log,
            prompt_tokens = r.job.prompt.len(),
            completion_tokens = r.generated.len(),
            prefilled = r.fed,
            "generate finished"
        );
    }
}

fn to_pb(v: Vec<(u32, f32)>) -> Vec<pb::TokenLogprob> {
    v.into_iter().map(|(id, logprob)| pb::TokenLogprob { id, logprob }).collect()
}
