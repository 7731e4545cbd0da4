//! The tonic `Inference` service: validates requests (INVALID_ARGUMENT names the field), turns them into
//! scheduler jobs, and maps the scheduler's answers to gRPC. Every request gets a request id (the caller's
//! `x-request-id` metadata, else a generated one), logged and echoed in the response metadata.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use quantfleet_engine::Engine;
use quantfleet_engine::backend::Backend;
use quantfleet_engine::chat::ChatMessage;
use quantfleet_engine::sampler::SamplingParams;
use quantfleet_engine::tokenizer::Tokenizer;
use quantfleet_proto::v1::{self as pb, inference_server::Inference};
use quantfleet_proto::{REQUEST_ID_METADATA, RETRY_AFTER_MS_METADATA};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::metrics::{Metrics, Outcome, Rpc};
use crate::scheduler::{GenerateJob, Job, Scheduler, ScoreJob, SubmitError};

const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_LEN: usize = 256;
const MAX_TOP_LOGPROBS: u32 = 20;

/// Node lifecycle, shared by the service, the health reporter and the drain logic.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading = 0,
    Serving = 1,
    Draining = 2,
}

/// An engine on any backend, seen through its tokenizer.
pub trait HasTokenizer: Send + Sync {
    fn tokenizer(&self) -> &Tokenizer;
}

impl<B: Backend> HasTokenizer for Engine<B>
where
    Engine<B>: Send + Sync,
{
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// What the service needs once the model is loaded.
pub struct Ready {
    /// The loaded engine, whichever backend serves it (the service needs only its tokenizer).
    pub engine: Arc<dyn HasTokenizer>,
    pub sched: Arc<Scheduler>,
    pub info: pb::ModelInfoResponse,
    pub context: usize,
    pub eos: Vec<u32>,
}

pub struct NodeService {
    pub phase: Arc<AtomicU8>,
    pub ready: Arc<std::sync::OnceLock<Ready>>,
    pub metrics: Arc<Metrics>,
    pub tier: String,
    pub default_max_tokens: usize,
    pub request_timeout: Option<Duration>,
    pub fault_marker: Option<String>,
    pub next_id: AtomicU64,
}

type GenerateStream = UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>;

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Parses the `grpc-timeout` header ("100m", "5S", ...): the client's deadline.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl NodeService {
    fn ready(&self) -> Result<&Ready, Status> {
        match self.phase.load(Relaxed) {
            p if p == Phase::Draining as u8 => Err(Status::unavailable("node is draining")),
            _ => self.ready.get().ok_or_else(|| Status::unavailable("model is loading")),
        }
    }

    fn request_id(&self, meta: &tonic::metadata::MetadataMap) -> String {
        meta.get(REQUEST_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(|| format!("node-{}", self.next_id.fetch_add(1, Relaxed)))
    }

    fn deadline(&self, meta: &tonic::metadata::MetadataMap, timeout_ms: u32, now: Instant) -> Option<Instant> {
        [grpc_timeout(meta), (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into())), self.request_timeout]
            .into_iter()
            .flatten()
            .min()
            .map(|d| now + d)
    }

    fn check_tier(&self, tier: &str) -> Result<(), Status> {
        if !tier.is_empty() && tier != self.tier {
            return Err(invalid(format!("tier: this node serves tier {:?}, not {tier:?}", self.tier)));
        }
        Ok(())
    }

    /// Tokenizes a prompt; returns the ids and the text it was made from (for fault injection), if any.
    fn prompt(&self, r: &Ready, p: Option<pb::Prompt>) -> Result<(Vec<u32>, String), Status> {
        let kind = p.and_then(|p| p.kind).ok_or_else(|| invalid("prompt: required (text, tokens or chat)"))?;
        let tok = &r.engine.tokenizer();
        let (ids, text) = match kind {
            pb::prompt::Kind::Text(t) => (tok.encode_prompt(&t).map_err(|e| invalid(format!("prompt.text: {e}")))?, t),
            pb::prompt::Kind::Tokens(t) => {
                let vocab = r.info.vocab_size;
                if let Some(bad) = t.ids.iter().find(|&&id| id >= vocab) {
                    return Err(invalid(format!("prompt.tokens: id {bad} is outside the vocabulary of {vocab}")));
                }
                (t.ids, String::new())
            }
            pb::prompt::Kind::Chat(c) => {
                if c.messages.is_empty() {
                    return Err(invalid("prompt.chat: needs at least one message"));
                }
                let template =
                    tok.chat_template().ok_or_else(|| invalid("prompt.chat: the model has no chat template"))?;
                let msgs: Vec<ChatMessage> = c.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
                let text = template.render(&msgs, true).map_err(|e| invalid(format!("prompt.chat: {e}")))?;
                (tok.encode_prompt(&text).map_err(|e| invalid(format!("prompt.chat: {e}")))?, text)
            }
        };
        if ids.is_empty() {
            return Err(invalid("prompt: empty (no tokens after tokenization)"));
        }
        Ok((ids, text))
    }

    fn inject(&self, text: &str) -> bool {
        self.fault_marker.as_deref().is_some_and(|m| text.contains(m))
    }

    fn submit(&self, r: &Ready, job: Job) -> Result<(), Status> {
        r.sched.submit(job).map_err(|e| match e {
            SubmitError::QueueFull { retry_after } => {
                let mut s = Status::resource_exhausted(format!(
                    "admission queue full ({} waiting); retry after {} ms",
                    r.info.max_queue,
                    retry_after.as_millis()
                ));
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    s.metadata_mut().insert(RETRY_AFTER_MS_METADATA, v);
                }
                s
            }
            SubmitError::Closed => Status::unavailable("node is draining"),
        })
    }

    fn generate_job(
        &self,
        r: &Ready,
        req: pb::GenerateRequest,
        request_id: String,
        deadline: Option<Instant>,
        arrived: Instant,
        events: mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<GenerateJob, Status> {
        self.check_tier(&req.tier)?;
        let (prompt, text) = self.prompt(r, req.prompt)?;
        let s = req.sampling.unwrap_or_default();
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(invalid(format!("sampling.temperature: {} must be finite and >= 0", s.temperature)));
        }
        if !(s.top_p.is_finite() && (0.0..=1.0).contains(&s.top_p)) {
            return Err(invalid(format!("sampling.top_p: {} must be in [0, 1] (0 disables)", s.top_p)));
        }
        let room = r.context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(invalid(format!(
                "prompt: {} tokens leave no room in the context of {}",
                prompt.len(),
                r.context
            )));
        }
        let max_tokens = match req.max_tokens as usize {
            0 => self.default_max_tokens.min(room),
            n if n > room => {
                return Err(invalid(format!(
                    "max_tokens: {n} plus {} prompt tokens exceeds the context of {} tokens",
                    prompt.len(),
                    r.context
                )));
            }
            n => n,
        };
        // The capacity is the longest sequence the whole cache holds (whole blocks; KIVI: window plus groups).
        if prompt.len() + max_tokens > r.info.kv_capacity_tokens as usize {
            return Err(invalid(format!(
                "max_tokens: prompt plus max_tokens ({} tokens) exceeds the node's KV-cache capacity of {} tokens",
                prompt.len() + max_tokens,
                r.info.kv_capacity_tokens
            )));
        }
        if req.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(format!("stop: {} strings, at most {MAX_STOP_STRINGS}", req.stop.len())));
        }
        if let Some(bad) = req.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(invalid(format!("stop: {bad:?} must be 1..={MAX_STOP_LEN} bytes")));
        }
        if let Some(bad) = req.stop_token_ids.iter().find(|&&id| id >= r.info.vocab_size) {
            return Err(invalid(format!("stop_token_ids: id {bad} is outside the vocabulary")));
        }
        if req.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!("top_logprobs: {} exceeds {MAX_TOP_LOGPROBS}", req.top_logprobs)));
        }
        let mut stop_tokens = req.stop_token_ids;
        if !req.ignore_eos {
            stop_tokens.extend(&r.eos);
        }
        let seed = s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        let top_p = if s.top_p == 0.0 { 1.0 } else { s.top_p };
        Ok(GenerateJob {
            request_id,
            inject_fault: self.inject(&text),
            prompt,
            max_tokens,
            sampling: SamplingParams { temperature: s.temperature, top_k: s.top_k as usize, top_p, seed },
            stop_tokens,
            stop_strings: req.stop,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs as usize,
            deadline,
            arrived,
            events,
        })
    }
}

fn with_request_id<T>(mut resp: Response<T>, id: &str) -> Response<T> {
    if let Ok(v) = id.parse() {
        resp.metadata_mut().insert(REQUEST_ID_METADATA, v);
    }
    resp
}

#[tonic::async_trait]
impl Inference for NodeService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let request_id = self.request_id(request.metadata());
        let deadline = self.deadline(request.metadata(), request.get_ref().timeout_ms, arrived);
        let result = self.ready().and_then(|r| {
            let (tx, rx) = mpsc::unbounded_channel();
            let job = self.generate_job(r, request.into_inner(), request_id.clone(), deadline, arrived, tx)?;
            tracing::info!(request_id = %request_id, prompt_tokens = job.prompt.len(), max_tokens = job.max_tokens, "generate");
            self.submit(r, Job::Generate(job))?;
            Ok(rx)
        });
        match result {
            Ok(rx) => Ok(with_request_id(Response::new(UnboundedReceiverStream::new(rx)), &request_id)),
            Err(status) => {
                tracing::info!(request_id = %request_id, code = ?status.code(), message = status.message(), "generate refused");
                self.metrics.request(Rpc::Generate, Outcome::of_code(status.code()));
                Err(status)
            }
        }
    }

    async fn score(&self, request: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
        let arrived = Instant::now();
        let request_id = self.request_id(request.metadata());
        let deadline = self.deadline(request.metadata(), request.get_ref().timeout_ms, arrived);
        let submitted = self.ready().and_then(|r| {
            let req = request.into_inner();
            self.check_tier(&req.tier)?;
            let (prompt, text) = self.prompt(r, req.prompt)?;
            let continuation = match req.continuation.and_then(|c| c.kind) {
                Some(pb::continuation::Kind::Text(t)) => {
                    r.engine.tokenizer().encode(&t).map_err(|e| invalid(format!("continuation.text: {e}")))?
                }
                Some(pb::continuation::Kind::Tokens(t)) => t.ids,
                None => return Err(invalid("continuation: required (text or tokens)")),
            };
            if continuation.is_empty() {
                return Err(invalid("continuation: empty (no tokens)"));
            }
            if let Some(bad) = continuation.iter().find(|&&id| id >= r.info.vocab_size) {
                return Err(invalid(format!("continuation.tokens: id {bad} is outside the vocabulary")));
            }
            let total = prompt.len() + continuation.len();
            if total > r.context {
                return Err(invalid(format!(
                    "continuation: prompt plus continuation ({total} tokens) exceeds the context of {}",
                    r.context
                )));
            }
            if total as u64 > r.info.kv_capacity_tokens {
                return Err(invalid(format!(
                    "continuation: {total} tokens exceed the node's KV-cache capacity of {}",
                    r.info.kv_capacity_tokens
                )));
            }
            if req.top_logprobs > MAX_TOP_LOGPROBS {
                return Err(invalid(format!("top_logprobs: {} exceeds {MAX_TOP_LOGPROBS}", req.top_logprobs)));
            }
            let (tx, rx) = oneshot::channel();
            tracing::info!(request_id = %request_id, prompt_tokens = prompt.len(), continuation_tokens = continuation.len(), "score");
            let job = ScoreJob {
                request_id: request_id.clone(),
                inject_fault: self.inject(&text),
                prompt,
                continuation,
                top_logprobs: req.top_logprobs as usize,
                deadline,
                arrived,
                reply: tx,
            };
            self.submit(r, Job::Score(job))?;
            Ok(rx)
        });
        let rx = match submitted {
            Ok(rx) => rx,
            Err(status) => {
                self.metrics.request(Rpc::Score, Outcome::of_code(status.code()));
                return Err(status);
            }
        };
        // The scheduler counts the outcome of submitted requests.
        match rx.await {
            Ok(Ok(resp)) => Ok(with_request_id(Response::new(resp), &request_id)),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable("node is shutting down")),
        }
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let r = self.ready.get().ok_or_else(|| Status::unavailable("model is loading"))?;
        Ok(Response::new(r.info.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_units() {
        let mut m = tonic::metadata::MetadataMap::new();
        for (v, want) in
            [("250m", Duration::from_millis(250)), ("3S", Duration::from_secs(3)), ("1M", Duration::from_secs(60))]
        {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(want), "{v}");
        }
        m.insert("grpc-timeout", "12x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
