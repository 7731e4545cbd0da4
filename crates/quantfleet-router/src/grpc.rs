//! [`NodeClient`] over the nodes' gRPC API (`quantfleet.inference.v1`). One HTTP/2 channel per endpoint,
//! created lazily and reused by every request (HTTP/2 multiplexes them), so the pool costs one connection per
//! node. gRPC status codes map to what the router does about them: INVALID_ARGUMENT is the client's error,
//! RESOURCE_EXHAUSTED and UNAVAILABLE (and connection failures) are retried elsewhere before the first token.

use crate::backend::*;
use futures::StreamExt;
use futures::future::BoxFuture;
use quantfleet_proto::v1 as pb;
use quantfleet_proto::v1::inference_client::InferenceClient;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub struct GrpcClient {
    channels: Mutex<HashMap<Endpoint, Channel>>,
    connect_timeout: Duration,
    /// Deadline of a whole Generate or Score call.
    request_timeout: Duration,
}

impl GrpcClient {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Self {
        GrpcClient { channels: Mutex::new(HashMap::new()), connect_timeout, request_timeout }
    }

    fn channel(&self, endpoint: &Endpoint) -> Result<Channel, NodeError> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", endpoint.0))
            .map_err(|e| NodeError::Unavailable(format!("bad endpoint {endpoint}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        channels.insert(endpoint.clone(), channel.clone());
        Ok(channel)
    }
}

fn node_error(status: Status) -> NodeError {
    let msg = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => NodeError::InvalidArgument(msg),
        Code::ResourceExhausted => NodeError::Saturated(msg),
        Code::Unavailable | Code::Cancelled => {
            NodeError::Unavailable(if msg.is_empty() { status.to_string() } else { msg })
        }
        // A transport failure before any response surfaces as Unknown with the connect error as source.
        Code::Unknown if status.metadata().is_empty() => NodeError::Unavailable(status.to_string()),
        _ => NodeError::Failed(status.to_string()),
    }
}

fn prompt_pb(p: Prompt) -> pb::Prompt {
    let kind = match p {
        Prompt::Text(t) => pb::prompt::Kind::Text(t),
        Prompt::Chat(messages) => pb::prompt::Kind::Chat(pb::ChatMessages {
            messages: messages.into_iter().map(|m| pb::ChatMessage { role: m.role, content: m.content }).collect(),
        }),
    };
    pb::Prompt { kind: Some(kind) }
}

fn top(list: Vec<pb::TokenLogprob>) -> Vec<(u32, f32)> {
    list.into_iter().map(|t| (t.id, t.logprob)).collect()
}

fn events(msg: pb::GenerateResponse) -> Vec<Result<GenerateEvent, NodeError>> {
    let mut out = Vec::with_capacity(2);
    if !msg.tokens.is_empty() || !msg.text.is_empty() {
        let tokens =
            msg.tokens.into_iter().map(|t| Token { id: t.id, logprob: t.logprob, top: top(t.top_logprobs) }).collect();
        out.push(Ok(GenerateEvent::Chunk { tokens, text: msg.text }));
    }
    if let Some(s) = msg.summary {
        let finish = match pb::FinishReason::try_from(s.finish_reason) {
            Ok(pb::FinishReason::Length) => Finish::Length,
            Ok(pb::FinishReason::StopToken | pb::FinishReason::StopString) => Finish::Stop,
            _ => return vec![Err(NodeError::Failed(format!("unknown finish reason {}", s.finish_reason)))],
        };
        out.push(Ok(GenerateEvent::Done {
            finish,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
        }));
    }
    out
}

fn with_request_id<T>(message: T, request_id: &str, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    if let Ok(v) = request_id.parse() {
        req.metadata_mut().insert(quantfleet_proto::REQUEST_ID_METADATA, v);
    }
    req
}

impl NodeClient for GrpcClient {
    /// Drops the pooled channel: requests running on it keep their own handle to the connection, which closes
    /// when the last of them ends.
    fn forget(&self, endpoint: &Endpoint) {
        self.channels.lock().expect("channels lock").remove(endpoint);
    }

    fn generate(
        &self,
        endpoint: &Endpoint,
        params: GenerateParams,
    ) -> BoxFuture<'static, Result<EventStream, NodeError>> {
        let channel = self.channel(endpoint);
        let timeout = self.request_timeout;
        Box::pin(async move {
            let mut client = InferenceClient::new(channel?);
            let message = pb::GenerateRequest {
                prompt: Some(prompt_pb(params.prompt)),
                sampling: Some(pb::SamplingParams {
                    temperature: params.temperature,
                    top_p: if params.top_p >= 1.0 { 0.0 } else { params.top_p },
                    top_k: 0,
                    seed: params.seed,
                }),
                max_tokens: params.max_tokens,
                stop: params.stop,
                logprobs: params.logprobs,
                top_logprobs: params.top_logprobs,
                ..Default::default()
            };
            let stream =
                client.generate(with_request_id(message, &params.request_id, timeout)).await.map_err(node_error)?;
            let events = stream.into_inner().flat_map(|item| {
                futures::stream::iter(match item {
                    Ok(msg) => events(msg),
                    Err(status) => vec![Err(node_error(status))],
                })
            });
            Ok(Box::pin(events) as EventStream)
        })
    }

    fn score(
        &self,
        endpoint: &Endpoint,
        prompt: Prompt,
        continuation: Vec<u32>,
        top_k: u32,
    ) -> BoxFuture<'static, Result<ScoreResult, NodeError>> {
        let channel = self.channel(endpoint);
        let timeout = self.request_timeout;
        Box::pin(async move {
            let mut client = InferenceClient::new(channel?);
            let message = pb::ScoreRequest {
                prompt: Some(prompt_pb(prompt)),
                continuation: Some(pb::Continuation {
                    kind: Some(pb::continuation::Kind::Tokens(pb::TokenIds { ids: continuation })),
                }),
                top_logprobs: top_k,
                ..Default::default()
            };
            let response =
                client.score(with_request_id(message, "shadow-score", timeout)).await.map_err(node_error)?.into_inner();
            let (logprobs, top): (Vec<f32>, Vec<Vec<(u32, f32)>>) =
                response.tokens.into_iter().map(|t| (t.logprob, top(t.top_logprobs))).unzip();
            Ok(ScoreResult { logprobs, top })
        })
    }

    fn model_info(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<NodeInfo, NodeError>> {
        let channel = self.channel(endpoint);
        let timeout = self.connect_timeout.max(Duration::from_secs(2));
        Box::pin(async move {
            let mut client = InferenceClient::new(channel?);
            let mut req = tonic::Request::new(pb::ModelInfoRequest {});
            req.set_timeout(timeout);
            let info = client.model_info(req).await.map_err(node_error)?.into_inner();
            Ok(NodeInfo {
                model: info.model,
                tier: info.tier,
                tier_spec_json: info.tier_spec_json,
                weights_loaded: info.weights_loaded,
                backend: info.backend,
                tier_applied: info.tier_applied,
            })
        })
    }

    fn healthy(&self, endpoint: &Endpoint) -> BoxFuture<'static, bool> {
        let channel = self.channel(endpoint);
        Box::pin(async move {
            let Ok(channel) = channel else { return false };
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: quantfleet_proto::INFERENCE_SERVICE_NAME.to_owned(),
            });
            req.set_timeout(Duration::from_secs(2));
            matches!(
                client.check(req).await.map(|r| r.into_inner().status()),
                Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
            )
        })
    }
}
