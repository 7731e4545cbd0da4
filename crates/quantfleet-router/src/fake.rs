//! A scripted node for unit tests (synthetic, labelled as such): deterministic token distributions derived
//! from the prompt, with per-endpoint behaviours (serve, flip some top-1 tokens, fail in a given way).

use crate::backend::*;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Serve. `flip_every` n: at every n-th position the top two tokens swap (a degraded candidate).
    /// `answer`: the text of the output (else "t{id} " per token).
    Serve {
        flip_every: Option<usize>,
        answer: Option<String>,
    },
    Unavailable,
    Saturated,
    Invalid(String),
    /// Fail with INTERNAL after this many tokens.
    FailAfter(usize),
}

#[derive(Clone, Debug)]
pub struct Call {
    pub endpoint: String,
    pub kind: &'static str,
    pub params: Option<GenerateParams>,
}

pub struct FakeNode {
    behaviours: Mutex<HashMap<String, Behaviour>>,
    /// What an endpoint reports in ModelInfo; without an entry a serving endpoint reports itself as model
    /// "fake", tier = its endpoint label, a bf16 tier spec of that name and backend "fake".
    infos: Mutex<HashMap<String, NodeInfo>>,
    pub calls: Mutex<Vec<Call>>,
    /// Delay per generated token.
    pub token_delay: Duration,
}

impl FakeNode {
    pub fn new(behaviours: &[(&str, Behaviour)]) -> Self {
        FakeNode {
            behaviours: Mutex::new(behaviours.iter().map(|(e, b)| ((*e).to_owned(), b.clone())).collect()),
            infos: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            token_delay: Duration::ZERO,
        }
    }
    pub fn set(&self, endpoint: &str, b: Behaviour) {
        self.behaviours.lock().unwrap().insert(endpoint.to_owned(), b);
    }
    /// Sets what `endpoint` reports in ModelInfo.
    pub fn set_info(&self, endpoint: &str, info: NodeInfo) {
        self.infos.lock().unwrap().insert(endpoint.to_owned(), info);
    }
    fn behaviour(&self, endpoint: &str) -> Behaviour {
        self.behaviours.lock().unwrap().get(endpoint).cloned().unwrap_or(Behaviour::Unavailable)
    }
    pub fn calls(&self, kind: &str) -> Vec<Call> {
        self.calls.lock().unwrap().iter().filter(|c| c.kind == kind).cloned().collect()
    }
}

fn prompt_hash(p: &Prompt) -> u32 {
    let text = match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(m) => m.iter().map(|m| format!("{}:{}", m.role, m.content)).collect(),
    };
    text.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 1000
}

/// The distribution at position `i`: 0.6, 0.2, 0.1, 0.05, 0.03 over five consecutive ids.
fn top_at(hash: u32, i: usize, flip_every: Option<usize>, k: usize) -> Vec<(u32, f32)> {
    let fav = hash + (i as u32) * 7;
    let mut top: Vec<(u32, f32)> =
        [0.6f64, 0.2, 0.1, 0.05, 0.03].iter().enumerate().map(|(j, p)| (fav + j as u32, p.ln() as f32)).collect();
    if flip_every.is_some_and(|n| i % n == n - 1) {
        let (a, b) = (top[0].0, top[1].0);
        top[0].0 = b;
        top[1].0 = a;
    }
    top.truncate(k.max(1));
    top
}

impl NodeClient for FakeNode {
    fn generate(
        &self,
        endpoint: &Endpoint,
        params: GenerateParams,
    ) -> BoxFuture<'static, Result<EventStream, NodeError>> {
        self.calls.lock().unwrap().push(Call {
            endpoint: endpoint.0.clone(),
            kind: "generate",
            params: Some(params.clone()),
        });
        let behaviour = self.behaviour(&endpoint.0);
        let delay = self.token_delay;
        Box::pin(async move {
            let (flip_every, answer, fail_after) = match behaviour {
                Behaviour::Serve { flip_every, answer } => (flip_every, answer, None),
                Behaviour::FailAfter(n) => (None, None, Some(n)),
                Behaviour::Unavailable => return Err(NodeError::Unavailable("connection refused".into())),
                Behaviour::Saturated => return Err(NodeError::Saturated("queue full".into())),
                Behaviour::Invalid(m) => return Err(NodeError::InvalidArgument(m)),
            };
            let hash = prompt_hash(&params.prompt);
            let n = params.max_tokens as usize;
            let k = params.top_logprobs as usize;
            let stream = futures::stream::unfold(0usize, move |i| {
                let answer = answer.clone();
                async move {
                    if i > n {
                        return None;
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if fail_after == Some(i) {
                        return Some((Err(NodeError::Failed("numerical fault".into())), n + 1));
                    }
                    if i == n {
                        let done = GenerateEvent::Done {
                            finish: Finish::Length,
                            prompt_tokens: 5,
                            completion_tokens: n as u32,
                        };
                        return Some((Ok(done), i + 1));
                    }
                    let top = top_at(hash, i, flip_every, 5);
                    let token = Token {
                        id: top[0].0,
                        logprob: top[0].1,
                        top: if k > 0 { top[..k.min(5)].to_vec() } else { vec![] },
                    };
                    let text = match &answer {
                        Some(a) if i == 0 => a.clone(),
                        Some(_) => String::new(),
                        None => format!("t{} ", token.id),
                    };
                    Some((Ok(GenerateEvent::Chunk { tokens: vec![token], text }), i + 1))
                }
            });
            Ok(Box::pin(stream) as EventStream)
        })
    }

    fn score(
        &self,
        endpoint: &Endpoint,
        prompt: Prompt,
        continuation: Vec<u32>,
        top_k: u32,
    ) -> BoxFuture<'static, Result<ScoreResult, NodeError>> {
        self.calls.lock().unwrap().push(Call { endpoint: endpoint.0.clone(), kind: "score", params: None });
        let behaviour = self.behaviour(&endpoint.0);
        Box::pin(async move {
            let flip_every = match behaviour {
                Behaviour::Serve { flip_every, .. } => flip_every,
                Behaviour::Saturated => return Err(NodeError::Saturated("queue full".into())),
                _ => return Err(NodeError::Unavailable("down".into())),
            };
            let hash = prompt_hash(&prompt);
            let mut result = ScoreResult { logprobs: vec![], top: vec![] };
            for (i, id) in continuation.iter().enumerate() {
                let full = top_at(hash, i, flip_every, 5);
                let lp = full.iter().find(|(t, _)| t == id).map(|(_, lp)| *lp).unwrap_or((0.01f64).ln() as f32);
                result.logprobs.push(lp);
                result.top.push(full[..(top_k as usize).min(5)].to_vec());
            }
            Ok(result)
        })
    }

    fn model_info(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<NodeInfo, NodeError>> {
        self.calls.lock().unwrap().push(Call { endpoint: endpoint.0.clone(), kind: "model_info", params: None });
        let behaviour = self.behaviour(&endpoint.0);
        let info = self.infos.lock().unwrap().get(&endpoint.0).cloned().unwrap_or_else(|| NodeInfo {
            model: "fake".into(),
            tier: endpoint.0.clone(),
            tier_spec_json: format!(r#"{{"name":"{}","weights":{{"format":"bf16"}}}}"#, endpoint.0),
            weights_loaded: "bf16 (1 matrices)".into(),
            backend: "fake".into(),
            tier_applied: true,
        });
        Box::pin(async move {
            match behaviour {
                Behaviour::Unavailable => Err(NodeError::Unavailable("connection refused".into())),
                _ => Ok(info),
            }
        })
    }

    fn healthy(&self, endpoint: &Endpoint) -> BoxFuture<'static, bool> {
        let b = self.behaviour(&endpoint.0);
        Box::pin(async move { !matches!(b, Behaviour::Unavailable) })
    }
}
