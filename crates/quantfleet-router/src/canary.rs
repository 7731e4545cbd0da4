//! Canary bookkeeping: which requests are mirrored or sent live to the candidate (an exact, deterministic
//! share of each class's requests), and the cumulative comparison sums per (class, candidate) that
//! `GET /v1/canary/stats` reports in the operator's [`CanaryStatsReport`] format.

use crate::compare::PairComparison;
use quantfleet_api::TaskClass;
use quantfleet_api::stats::{CanaryStatsReport, ClassComparison, ComparisonSums, PolicyComparison};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Selects an exact share of calls: call n (0-based) is selected when floor((n+1)·p) > floor(n·p), so after
/// N calls exactly floor(N·p) were selected, spread evenly (no randomness, so tests can count).
#[derive(Default)]
pub struct ShareSelector {
    calls: AtomicU64,
}

impl ShareSelector {
    /// `percent` in [0, 100].
    pub fn select(&self, percent: f64) -> bool {
        let p = (percent / 100.0).clamp(0.0, 1.0);
        if p <= 0.0 {
            return false;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * p + 1e-9).floor() > (n * p + 1e-9).floor()
    }
}

/// One class's accumulated evidence.
#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Accum {
    sums: ComparisonSums,
    dropped: i64,
}

/// Cumulative comparison sums per (task class, candidate tier).
#[derive(Default)]
pub struct CanaryStats {
    classes: Mutex<BTreeMap<(TaskClass, String), Accum>>,
}

/// One compared pair's contribution.
pub struct PairRecord<'a> {
    pub class: TaskClass,
    pub candidate: &'a str,
    pub comparison: &'a PairComparison,
    /// For structured requests: whether the candidate's own answer was valid.
    pub structured_valid: Option<bool>,
    /// Candidate seconds per token / incumbent seconds per token.
    pub latency_ratio: f64,
}

impl CanaryStats {
    pub fn record(&self, pair: &PairRecord<'_>) {
        let mut map = self.classes.lock().expect("stats lock");
        let a = map.entry((pair.class, pair.candidate.to_owned())).or_default();
        a.sums.samples += 1;
        a.sums.kl_divergence_sum += pair.comparison.mean_kl;
        a.sums.top1_agreement_sum += pair.comparison.top1_agreement;
        a.sums.log_perplexity_ratio_sum += pair.comparison.log_perplexity_ratio;
        a.sums.latency_ratio_sum += pair.latency_ratio;
        if let Some(valid) = pair.structured_valid {
            a.sums.structured_samples += 1;
            a.sums.structured_invalid += i64::from(!valid);
        }
    }

    pub fn record_dropped(&self, class: TaskClass, candidate: &str) {
        self.classes.lock().expect("stats lock").entry((class, candidate.to_owned())).or_default().dropped += 1;
    }

    /// The sums of one class (zero when nothing was recorded).
    pub fn sums(&self, class: TaskClass, candidate: &str) -> (ComparisonSums, i64) {
        let map = self.classes.lock().expect("stats lock");
        map.get(&(class, candidate.to_owned())).map(|a| (a.sums, a.dropped)).unwrap_or_default()
    }

    /// The report for one policy. Every candidate that has evidence is listed (a candidate changed by a new
    /// policy keeps its old counters under its own name), with its classes in [`TaskClass::ALL`] order.
    pub fn report(&self, namespace: &str, policy: &str) -> CanaryStatsReport {
        let map = self.classes.lock().expect("stats lock");
        let mut by_candidate: BTreeMap<&str, Vec<ClassComparison>> = BTreeMap::new();
        for ((class, candidate), a) in map.iter() {
            by_candidate.entry(candidate).or_default().push(ClassComparison {
                task_class: *class,
                sums: a.sums,
                dropped: a.dropped,
            });
        }
        CanaryStatsReport {
            policies: by_candidate
                .into_iter()
                .map(|(candidate, mut classes)| {
                    classes.sort_by_key(|c| TaskClass::ALL.iter().position(|t| *t == c.task_class));
                    PolicyComparison {
                        namespace: namespace.to_owned(),
                        policy: policy.to_owned(),
                        candidate_tier: candidate.to_owned(),
                        classes,
                    }
                })
                .collect(),
            nodes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_exact_and_spread() {
        let s = ShareSelector::default();
        let picks: Vec<bool> = (0..100).map(|_| s.select(10.0)).collect();
        assert_eq!(picks.iter().filter(|p| **p).count(), 10);
        assert!(picks[9] && !picks[8] && picks[19], "every tenth call");
        let s = ShareSelector::default();
        assert_eq!((0..1000).filter(|_| s.select(2.5)).count(), 25);
        let s = ShareSelector::default();
        assert!((0..50).all(|_| s.select(100.0)));
        assert!(!(0..50).any(|_| ShareSelector::default().select(0.0)));
    }

    fn pair(kl: f64, agree: f64) -> PairComparison {
        PairComparison {
            positions: 4,
            mean_kl: kl,
            top1_agreement: agree,
            first_divergence: None,
            log_perplexity_ratio: 0.1,
        }
    }

    #[test]
    fn sums_accumulate_per_class_and_candidate_in_the_operator_format() {
        let stats = CanaryStats::default();
        let (a, b) = (pair(0.02, 1.0), pair(0.04, 0.5));
        stats.record(&PairRecord {
            class: TaskClass::Code,
            candidate: "int4",
            comparison: &a,
            structured_valid: None,
            latency_ratio: 1.0,
        });
        stats.record(&PairRecord {
            class: TaskClass::Code,
            candidate: "int4",
            comparison: &b,
            structured_valid: None,
            latency_ratio: 2.0,
        });
        stats.record(&PairRecord {
            class: TaskClass::Agent,
            candidate: "int4",
            comparison: &a,
            structured_valid: Some(false),
            latency_ratio: 1.0,
        });
        stats.record_dropped(TaskClass::Code, "int4");
        let report = stats.report("default", "smollm2-135m");
        assert_eq!(report.policies.len(), 1);
        let p = &report.policies[0];
        assert_eq!((p.policy.as_str(), p.candidate_tier.as_str()), ("smollm2-135m", "int4"));
        let code = &p.classes[0];
        assert_eq!((code.task_class, code.sums.samples, code.dropped), (TaskClass::Code, 2, 1));
        assert!((code.sums.mean_kl_divergence().unwrap() - 0.03).abs() < 1e-12);
        assert_eq!(code.sums.top1_agreement(), Some(0.75));
        assert_eq!(code.sums.latency_ratio(), Some(1.5));
        assert_eq!(code.sums.structured_invalid_rate(), None);
        let agent = &p.classes[1];
        assert_eq!(
            (agent.task_class, agent.sums.structured_samples, agent.sums.structured_invalid),
            (TaskClass::Agent, 1, 1)
        );
        // The operator's reader decodes exactly this JSON.
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<CanaryStatsReport>(&json).unwrap(), report);
    }
}
