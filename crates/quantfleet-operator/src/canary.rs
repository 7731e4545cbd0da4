//! The canary state machine, as a pure function of the policy's spec, the canary status it left last time
//! and what it observes now (candidate readiness, the router's cumulative comparison counters, the promote
//! and abort annotations).
//!
//! ```text
//! Pending --candidate ready--> Shadowing --all classes pass--> Stepping[0] -> ... -> Stepping[n-1] --pass-->
//!   Promoted (promotion: automatic) | Paused (promotion: manual) --promote annotation--> Promoted
//! Shadowing | Stepping --any gate fails--> RolledBack (onFailure: rollback) | Paused (onFailure: pause)
//! any non-final phase --abort annotation--> RolledBack
//! ```
//! Every phase and step measures a fresh window: the counters at its start are kept in status
//! (`evidence[].windowStart`), so an operator restart resumes the same window and never repeats a step.
//! Changing `spec.canary.candidateTier` starts a new canary from Pending.
//!
//! Incomplete evidence (a router replica could not be read: [`Observation::evidence_problem`]) never starts a
//! window or passes one: the canary holds where it is and says why in `status.canary.message` (and once in a
//! `CanaryEvidenceIncomplete` Warning Event). A gate that fails on the samples that were read still acts (rolling
//! back or pausing is the safe direction).

use quantfleet_api::policy::{CanarySpec, PrecisionPolicySpec, QualityGate};
use quantfleet_api::stats::ComparisonSums;
use quantfleet_api::{CanaryPhase, CanaryStatus, ClassEvidence, FailureAction, GateVerdict, PromotionMode, TaskClass};
use std::collections::BTreeMap;

/// Annotation a person sets (to "true") to promote a paused canary.
pub const PROMOTE_ANNOTATION: &str = "quantfleet.io/promote";
/// Annotation a person sets (to "true") to abort a canary (in-scope traffic back to the incumbents).
pub const ABORT_ANNOTATION: &str = "quantfleet.io/abort";

/// Event reasons for canary transitions (fixed strings: usable as metric labels).
pub mod reason {
    pub const SHADOWING: &str = "CanaryShadowing";
    pub const STEPPED: &str = "CanaryStepped";
    pub const PAUSED: &str = "CanaryPaused";
    pub const PROMOTED: &str = "CanaryPromoted";
    pub const ROLLED_BACK: &str = "CanaryRolledBack";
    /// Not a phase change: the canary holds because a router replica could not be read.
    pub const EVIDENCE_INCOMPLETE: &str = "CanaryEvidenceIncomplete";
}

/// How a canary held by incomplete evidence says so in its message.
pub const HOLDING_PREFIX: &str = "holding: canary evidence is incomplete";

/// What the operator observes this reconcile.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The candidate tier has at least one serving replica.
    pub candidate_ready: bool,
    /// The router's cumulative counters per class for this policy and candidate (missing classes: none yet).
    pub stats: BTreeMap<TaskClass, ComparisonSums>,
    pub promote_requested: bool,
    pub abort_requested: bool,
    /// RFC 3339 time of this reconcile, recorded when a phase starts.
    pub now: String,
    /// Why `stats` may be missing samples (a router replica could not be read); None when every replica was.
    pub evidence_problem: Option<String>,
}

/// A phase change, for an Event and the logs.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub reason: &'static str,
    pub message: String,
}

/// The defaults for a class without an applicable gate (documented on `spec.canary.gates`).
pub fn builtin_gate() -> QualityGate {
    QualityGate {
        task_class: None,
        min_samples: 200,
        max_mean_kl_divergence: Some(0.05),
        min_top1_agreement: Some(0.9),
        max_perplexity_ratio: None,
        max_structured_invalid_rate: None,
        max_latency_ratio: None,
    }
}

/// The gate in force for `class`: its own, else the default gate (no taskClass), else the built-in one.
pub fn gate_for(canary: &CanarySpec, class: TaskClass) -> QualityGate {
    canary
        .gates
        .iter()
        .find(|g| g.task_class == Some(class))
        .or_else(|| canary.gates.iter().find(|g| g.task_class.is_none()))
        .cloned()
        .unwrap_or_else(builtin_gate)
}

/// Verdict of one class's window, and the threshold that decided a failure.
fn evaluate(gate: &QualityGate, required: i64, window: &ComparisonSums) -> (GateVerdict, Option<String>) {
    if window.samples < required {
        return (GateVerdict::Pending, None);
    }
    let checks: [(&str, Option<f64>, Option<f64>, bool); 5] = [
        ("maxMeanKlDivergence", gate.max_mean_kl_divergence, window.mean_kl_divergence(), true),
        ("minTop1Agreement", gate.min_top1_agreement, window.top1_agreement(), false),
        ("maxPerplexityRatio", gate.max_perplexity_ratio, window.perplexity_ratio(), true),
        ("maxStructuredInvalidRate", gate.max_structured_invalid_rate, window.structured_invalid_rate(), true),
        ("maxLatencyRatio", gate.max_latency_ratio, window.latency_ratio(), true),
    ];
    for (name, threshold, observed, is_max) in checks {
        if let (Some(threshold), Some(observed)) = (threshold, observed) {
            let failed = if is_max { observed > threshold } else { observed < threshold } || observed.is_nan();
            if failed {
                let op = if is_max { ">" } else { "<" };
                return (GateVerdict::Fail, Some(format!("{name}: {observed:.4} {op} {threshold}")));
            }
        }
    }
    (GateVerdict::Pass, None)
}

fn fresh_evidence(canary: &CanarySpec, obs: &Observation) -> Vec<ClassEvidence> {
    canary
        .task_classes
        .iter()
        .map(|&class| ClassEvidence {
            task_class: class,
            samples: 0,
            window_start: obs.stats.get(&class).copied().unwrap_or_default(),
            mean_kl_divergence: None,
            top1_agreement: None,
            perplexity_ratio: None,
            structured_invalid_rate: None,
            latency_ratio: None,
            verdict: GateVerdict::Pending,
            deciding_gate: None,
        })
        .collect()
}

/// Recomputes every class's window from the counters now; returns whether all passed and the first failure.
fn measure(canary: &CanarySpec, status: &mut CanaryStatus, obs: &Observation) -> (bool, Option<String>) {
    let step_min = status.step.and_then(|i| canary.steps.get(i as usize)).and_then(|s| s.min_samples);
    let mut all_pass = true;
    let mut failure = None;
    for ev in &mut status.evidence {
        let gate = gate_for(canary, ev.task_class);
        let window = obs.stats.get(&ev.task_class).copied().unwrap_or_default().since(&ev.window_start);
        let (verdict, deciding) = evaluate(&gate, i64::from(step_min.unwrap_or(gate.min_samples)), &window);
        ev.samples = window.samples;
        ev.mean_kl_divergence = window.mean_kl_divergence();
        ev.top1_agreement = window.top1_agreement();
        ev.perplexity_ratio = window.perplexity_ratio();
        ev.structured_invalid_rate = window.structured_invalid_rate();
        ev.latency_ratio = window.latency_ratio();
        ev.verdict = verdict;
        if verdict == GateVerdict::Fail && failure.is_none() {
            failure = Some(format!("{} {}", ev.task_class, deciding.clone().unwrap_or_default()));
        }
        ev.deciding_gate = deciding;
        all_pass &= verdict == GateVerdict::Pass;
    }
    (all_pass && failure.is_none(), failure)
}

fn enter(status: &mut CanaryStatus, canary: &CanarySpec, obs: &Observation, phase: CanaryPhase, step: Option<i32>) {
    status.phase = phase;
    status.step = step;
    status.phase_since = Some(obs.now.clone());
    if matches!(phase, CanaryPhase::Shadowing | CanaryPhase::Stepping) {
        status.evidence = fresh_evidence(canary, obs);
    }
}

/// Advances the canary of `spec` one reconcile. Returns None when the policy has no canary.
pub fn advance(
    spec: &PrecisionPolicySpec,
    previous: Option<&CanaryStatus>,
    obs: &Observation,
) -> Option<(CanaryStatus, Option<Transition>)> {
    let canary = spec.canary.as_ref()?;
    let candidate = &canary.candidate_tier;
    let mut st = match previous {
        Some(p) if &p.candidate_tier == candidate => p.clone(),
        _ => CanaryStatus {
            phase: CanaryPhase::Pending,
            candidate_tier: candidate.clone(),
            phase_since: Some(obs.now.clone()),
            ..CanaryStatus::default()
        },
    };
    if matches!(st.phase, CanaryPhase::Promoted | CanaryPhase::RolledBack) {
        return Some((st, None));
    }
    if obs.abort_requested {
        enter(&mut st, canary, obs, CanaryPhase::RolledBack, None);
        st.live_percent = 0;
        let msg = format!("aborted by the {ABORT_ANNOTATION} annotation; in-scope traffic is back on the incumbents");
        st.message = Some(msg.clone());
        st.recommended_spec_change = crate::routes::recommended_spec_change(spec, &st);
        return Some((st, Some(Transition { reason: reason::ROLLED_BACK, message: msg })));
    }

    // Holding on incomplete evidence: a message, and an Event only when the hold starts.
    let hold = |st: &mut CanaryStatus, why: &str| {
        let first = !st.message.as_deref().is_some_and(|m| m.starts_with(HOLDING_PREFIX));
        let msg = format!("{HOLDING_PREFIX} ({why}); not advancing until every router replica is read");
        st.message = Some(msg.clone());
        first.then_some(Transition { reason: reason::EVIDENCE_INCOMPLETE, message: msg })
    };
    let transition = match st.phase {
        CanaryPhase::Pending if obs.candidate_ready && obs.evidence_problem.is_some() => {
            hold(&mut st, obs.evidence_problem.as_deref().unwrap_or_default())
        }
        CanaryPhase::Pending => {
            if obs.candidate_ready {
                enter(&mut st, canary, obs, CanaryPhase::Shadowing, None);
                let msg = format!(
                    "mirroring {}% of {} requests to {candidate}",
                    canary.shadow_percent,
                    canary.task_classes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                );
                st.message = Some(msg.clone());
                Some(Transition { reason: reason::SHADOWING, message: msg })
            } else {
                st.message = Some(format!("waiting for tier {candidate} to have a serving replica"));
                None
            }
        }
        CanaryPhase::Shadowing | CanaryPhase::Stepping => {
            let (all_pass, failure) = if obs.evidence_problem.is_some() && obs.stats.is_empty() {
                // Nothing read at all: keep the evidence in status as it was.
                (false, None)
            } else {
                measure(canary, &mut st, obs)
            };
            if let Some(failure) = failure {
                let (phase, reason, live) = match canary.on_failure {
                    FailureAction::Rollback => (CanaryPhase::RolledBack, reason::ROLLED_BACK, 0),
                    FailureAction::Pause => (CanaryPhase::Paused, reason::PAUSED, st.live_percent),
                };
                let (kept, step) = (std::mem::take(&mut st.evidence), st.step);
                enter(&mut st, canary, obs, phase, step);
                st.evidence = kept; // keep the evidence that decided
                st.live_percent = live;
                let msg = format!("gate failed for {failure}");
                st.message = Some(msg.clone());
                Some(Transition { reason, message: msg })
            } else if let Some(why) = &obs.evidence_problem {
                hold(&mut st, why)
            } else if !obs.candidate_ready {
                st.message =
                    Some(format!("tier {candidate} has no serving replica; holding at {}% live", st.live_percent));
                None
            } else if all_pass {
                let next = match st.phase {
                    CanaryPhase::Shadowing => 0,
                    _ => st.step.unwrap_or(0) + 1,
                };
                if let Some(step) = canary.steps.get(next as usize) {
                    enter(&mut st, canary, obs, CanaryPhase::Stepping, Some(next));
                    st.live_percent = step.live_percent;
                    let msg =
                        format!("gates passed; {candidate} now serves {}% of in-scope live traffic", step.live_percent);
                    st.message = Some(msg.clone());
                    Some(Transition { reason: reason::STEPPED, message: msg })
                } else {
                    promote_or_pause(canary, &mut st, obs)
                }
            } else {
                st.message = Some("collecting samples".to_owned());
                None
            }
        }
        CanaryPhase::Paused => {
            if obs.promote_requested {
                promote(&mut st, canary, obs, format!("promoted by the {PROMOTE_ANNOTATION} annotation"))
            } else {
                None
            }
        }
        CanaryPhase::Promoted | CanaryPhase::RolledBack => None,
    };
    if transition.is_some() {
        st.recommended_spec_change = crate::routes::recommended_spec_change(spec, &st);
    }
    Some((st, transition))
}

fn promote_or_pause(canary: &CanarySpec, st: &mut CanaryStatus, obs: &Observation) -> Option<Transition> {
    match canary.promotion {
        PromotionMode::Automatic => promote(st, canary, obs, "every gate passed at every step".to_owned()),
        PromotionMode::Manual => {
            let (kept, step) = (std::mem::take(&mut st.evidence), st.step);
            enter(st, canary, obs, CanaryPhase::Paused, step);
            st.evidence = kept;
            let msg = format!("every gate passed; set the {PROMOTE_ANNOTATION}=true annotation to promote");
            st.message = Some(msg.clone());
            Some(Transition { reason: reason::PAUSED, message: msg })
        }
    }
}

fn promote(st: &mut CanaryStatus, canary: &CanarySpec, obs: &Observation, why: String) -> Option<Transition> {
    let kept = std::mem::take(&mut st.evidence);
    enter(st, canary, obs, CanaryPhase::Promoted, None);
    st.evidence = kept;
    st.live_percent = 100;
    let msg = format!("{} promoted: {why}", canary.candidate_tier);
    st.message = Some(msg.clone());
    Some(Transition { reason: reason::PROMOTED, message: msg })
}

#[cfg(test)]
mod tests;
