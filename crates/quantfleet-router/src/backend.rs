//! What the router needs from an inference node, independent of the wire: a streaming `generate`, a
//! teacher-forced `score`, a health probe and the node's own description (ModelInfo). The gRPC client implements it for real nodes; unit tests use a
//! scripted fake. Keeping the trait small keeps routing, retries and shadow comparison testable without
//! processes.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::fmt;

/// One chat message as the node's chat template sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The prompt of a generation: raw text (completions) or chat messages (rendered by the node's template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

/// Decoding parameters the router forwards.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub prompt: Prompt,
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Stop strings: generation ends before any of them.
    pub stop: Vec<String>,
    /// Report each token's log-probability.
    pub logprobs: bool,
    /// How many alternatives (with log-probabilities) to report per generated token; 0 for none.
    pub top_logprobs: u32,
    /// Propagated to the node for its logs.
    pub request_id: String,
}

/// A generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    /// Log-probability under the model's raw distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens at this position, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One event of a generation stream: chunks of tokens, then exactly one `Done`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerateEvent {
    /// New tokens and the text they add (complete UTF-8 characters only; nothing at or after a stop string).
    Chunk {
        tokens: Vec<Token>,
        text: String,
    },
    Done {
        finish: Finish,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// The candidate's teacher-forced view of a continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreResult {
    /// Per continuation position: log-probability of the given token.
    pub logprobs: Vec<f32>,
    /// Per continuation position: the top-k tokens, most likely first.
    pub top: Vec<Vec<(u32, f32)>>,
}

/// A failure talking to a node, classified by what the router should do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The request itself is wrong (the node said INVALID_ARGUMENT): no retry, a 4xx to the client.
    #[error("{0}")]
    InvalidArgument(String),
    /// The node's admission queue is full (RESOURCE_EXHAUSTED): another endpoint may take it.
    #[error("node is saturated: {0}")]
    Saturated(String),
    /// The node could not be reached, is loading or draining (UNAVAILABLE, connect errors): retry elsewhere.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// Anything else (INTERNAL, a numerical fault, a broken stream).
    #[error("node failed: {0}")]
    Failed(String),
}

impl NodeError {
    /// Whether another endpoint may succeed where this one failed (only before the first token is sent).
    pub fn retryable(&self) -> bool {
        matches!(self, NodeError::Saturated(_) | NodeError::Unavailable(_))
    }
    /// A fixed label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            NodeError::InvalidArgument(_) => "invalid_argument",
            NodeError::Saturated(_) => "saturated",
            NodeError::Unavailable(_) => "unavailable",
            NodeError::Failed(_) => "failed",
        }
    }
}

/// What a node reports about itself (its ModelInfo): the model and tier it serves, the tier as it was
/// configured (the TierSpec as JSON), the weight formats in memory and the compute backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub model: String,
    pub tier: String,
    pub tier_spec_json: String,
    pub weights_loaded: String,
    pub backend: String,
    /// Whether the tier's formats were applied at load (false: the checkpoint's native weights).
    pub tier_applied: bool,
}

/// A node endpoint's address, `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(pub String);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type EventStream = BoxStream<'static, Result<GenerateEvent, NodeError>>;

/// The router's view of the node API.
pub trait NodeClient: Send + Sync + 'static {
    /// Starts a generation; the stream yields tokens and ends with `Done` (or an error). Dropping the stream
    /// cancels the generation on the node.
    fn generate(
        &self,
        endpoint: &Endpoint,
        params: GenerateParams,
    ) -> BoxFuture<'static, Result<EventStream, NodeError>>;

    /// Scores `continuation` (token ids) after `prompt`, reporting `top_k` alternatives per position.
    fn score(
        &self,
        endpoint: &Endpoint,
        prompt: Prompt,
        continuation: Vec<u32>,
        top_k: u32,
    ) -> BoxFuture<'static, Result<ScoreResult, NodeError>>;

    /// Whether the endpoint reports SERVING.
    fn healthy(&self, endpoint: &Endpoint) -> BoxFuture<'static, bool>;

    /// What the endpoint reports about the model and precision it serves.
    fn model_info(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<NodeInfo, NodeError>>;

    /// The endpoint left the pool: release what is kept for it (requests still running on it are unaffected).
    fn forget(&self, _endpoint: &Endpoint) {}
}
