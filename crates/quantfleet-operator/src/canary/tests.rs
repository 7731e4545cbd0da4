//! Table-driven tests of every canary transition and gate.

use super::*;
use quantfleet_api::policy::{CanaryStep, ModelRef, RouteSpec};
use quantfleet_api::{ClassifierSpec, TaskClass};

const CODE: TaskClass = TaskClass::Code;
const MATH: TaskClass = TaskClass::Math;

fn gate(class: Option<TaskClass>, min_samples: i32) -> QualityGate {
    QualityGate {
        task_class: class,
        min_samples,
        max_mean_kl_divergence: Some(0.05),
        min_top1_agreement: Some(0.9),
        max_perplexity_ratio: Some(1.1),
        max_structured_invalid_rate: Some(0.05),
        max_latency_ratio: Some(1.5),
    }
}

/// code and math in scope; code has its own gate (100 samples), math uses the default gate (50 samples).
fn spec() -> PrecisionPolicySpec {
    PrecisionPolicySpec {
        model_ref: ModelRef { name: "m".into() },
        classifier: ClassifierSpec::default(),
        routes: vec![RouteSpec { task_class: CODE, tier: "fp8".into(), fallbacks: vec!["bf16".into()] }],
        default_tier: "bf16".into(),
        canary: Some(CanarySpec {
            candidate_tier: "int4".into(),
            task_classes: vec![CODE, MATH],
            shadow_percent: 10.0,
            steps: vec![
                CanaryStep { live_percent: 10, min_samples: None },
                CanaryStep { live_percent: 50, min_samples: Some(20) },
            ],
            gates: vec![gate(Some(CODE), 100), gate(None, 50)],
            promotion: PromotionMode::Automatic,
            on_failure: FailureAction::Rollback,
        }),
    }
}

/// `n` pairs each with mean KL `kl` and otherwise healthy metrics.
fn sums(n: i64, kl: f64) -> ComparisonSums {
    ComparisonSums {
        samples: n,
        kl_divergence_sum: n as f64 * kl,
        top1_agreement_sum: n as f64 * 0.95,
        log_perplexity_ratio_sum: n as f64 * 1.02f64.ln(),
        structured_samples: 0,
        structured_invalid: 0,
        latency_ratio_sum: n as f64 * 1.1,
    }
}

/// Counters `start` followed by a window `window`.
fn add(start: ComparisonSums, window: ComparisonSums) -> ComparisonSums {
    ComparisonSums {
        samples: start.samples + window.samples,
        kl_divergence_sum: start.kl_divergence_sum + window.kl_divergence_sum,
        top1_agreement_sum: start.top1_agreement_sum + window.top1_agreement_sum,
        log_perplexity_ratio_sum: start.log_perplexity_ratio_sum + window.log_perplexity_ratio_sum,
        structured_samples: start.structured_samples + window.structured_samples,
        structured_invalid: start.structured_invalid + window.structured_invalid,
        latency_ratio_sum: start.latency_ratio_sum + window.latency_ratio_sum,
    }
}

fn obs(code: ComparisonSums, math: ComparisonSums) -> Observation {
    Observation {
        candidate_ready: true,
        stats: [(CODE, code), (MATH, math)].into_iter().collect(),
        promote_requested: false,
        abort_requested: false,
        now: "2026-11-23T12:00:00Z".into(),
        evidence_problem: None,
    }
}

fn run(spec: &PrecisionPolicySpec, prev: Option<&CanaryStatus>, o: &Observation) -> (CanaryStatus, Option<Transition>) {
    advance(spec, prev, o).expect("the spec has a canary")
}

/// Drives the canary from Pending through `n` reconciles with ever-growing healthy counters.
fn drive_to(spec: &PrecisionPolicySpec, phase: CanaryPhase, step: Option<i32>) -> (CanaryStatus, i64) {
    let mut total = 0;
    let (mut st, _) = run(spec, None, &obs(sums(0, 0.01), sums(0, 0.01)));
    for _ in 0..10 {
        if st.phase == phase && st.step == step {
            return (st, total);
        }
        total += 200;
        st = run(spec, Some(&st), &obs(sums(total, 0.01), sums(total, 0.01))).0;
    }
    panic!("never reached {phase:?} {step:?}; stuck at {:?} {:?}", st.phase, st.step);
}

#[test]
fn no_canary_no_status() {
    let mut s = spec();
    s.canary = None;
    assert!(advance(&s, None, &Observation::default()).is_none());
}

#[test]
fn pending_waits_for_a_ready_candidate_then_shadows_from_the_current_counters() {
    let s = spec();
    let mut o = obs(sums(500, 0.2), sums(500, 0.2));
    o.candidate_ready = false;
    let (st, t) = run(&s, None, &o);
    assert_eq!((st.phase, t), (CanaryPhase::Pending, None));
    assert!(st.message.as_ref().unwrap().contains("waiting for tier int4"));

    o.candidate_ready = true;
    let (st, t) = run(&s, Some(&st), &o);
    assert_eq!(st.phase, CanaryPhase::Shadowing);
    assert_eq!(t.unwrap().reason, reason::SHADOWING);
    assert!(st.evidence.iter().all(|e| e.window_start.samples == 500 && e.samples == 0), "old pairs must not count");
}

#[test]
fn shadowing_collects_until_every_class_has_its_minimum() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Shadowing, None);
    // code needs 100 (its own gate), math 50 (the default gate): 60 new pairs pass math only.
    let (st, t) = run(&s, Some(&st), &obs(sums(base + 60, 0.01), sums(base + 60, 0.01)));
    assert_eq!((st.phase, t), (CanaryPhase::Shadowing, None));
    let verdict = |c| st.evidence.iter().find(|e| e.task_class == c).unwrap().verdict;
    assert_eq!((verdict(CODE), verdict(MATH)), (GateVerdict::Pending, GateVerdict::Pass));
    assert_eq!(st.evidence[0].samples, 60);
}

#[test]
fn passing_gates_step_through_live_percentages_then_promote() {
    let s = spec();
    let (shadowing, base) = drive_to(&s, CanaryPhase::Shadowing, None);
    let (st, t) = run(&s, Some(&shadowing), &obs(sums(base + 100, 0.01), sums(base + 100, 0.01)));
    assert_eq!((st.phase, st.step, st.live_percent), (CanaryPhase::Stepping, Some(0), 10));
    assert_eq!(t.unwrap().reason, reason::STEPPED);
    assert!(
        st.evidence.iter().all(|e| e.samples == 0 && e.window_start.samples == base + 100),
        "a step is a fresh window"
    );

    // Step 1 requires only its own minSamples (20) instead of the gates' 100 and 50.
    let (st, _) = run(&s, Some(&st), &obs(sums(base + 200, 0.01), sums(base + 200, 0.01)));
    assert_eq!((st.phase, st.step, st.live_percent), (CanaryPhase::Stepping, Some(1), 50));
    let (st, t) = run(&s, Some(&st), &obs(sums(base + 220, 0.01), sums(base + 220, 0.01)));
    assert_eq!((st.phase, st.live_percent), (CanaryPhase::Promoted, 100));
    assert_eq!(t.unwrap().reason, reason::PROMOTED);
    assert!(st.recommended_spec_change.unwrap().contains("{taskClass: code, tier: int4, fallbacks: [fp8, bf16]}"));
}

#[test]
fn manual_promotion_pauses_until_the_annotation() {
    let mut s = spec();
    s.canary.as_mut().unwrap().promotion = PromotionMode::Manual;
    let (st, _) = drive_to(&s, CanaryPhase::Paused, Some(1));
    assert_eq!(st.live_percent, 50, "paused at the last step's share");
    assert!(st.message.as_ref().unwrap().contains(PROMOTE_ANNOTATION));
    let mut o = obs(sums(9999, 0.01), sums(9999, 0.01));
    assert_eq!(run(&s, Some(&st), &o).1, None, "no promotion without the annotation");
    o.promote_requested = true;
    let (st, t) = run(&s, Some(&st), &o);
    assert_eq!((st.phase, t.unwrap().reason), (CanaryPhase::Promoted, reason::PROMOTED));
}

#[test]
fn a_failed_gate_rolls_back_and_keeps_the_evidence() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Stepping, Some(0));
    let start = st.evidence[0].window_start;
    let (st, t) = run(&s, Some(&st), &obs(add(start, sums(100, 0.2)), sums(base + 100, 0.01)));
    assert_eq!((st.phase, st.live_percent), (CanaryPhase::RolledBack, 0));
    let t = t.unwrap();
    assert_eq!(t.reason, reason::ROLLED_BACK);
    assert_eq!(t.message, "gate failed for code maxMeanKlDivergence: 0.2000 > 0.05");
    let code = st.evidence.iter().find(|e| e.task_class == CODE).unwrap();
    assert_eq!((code.verdict, code.samples), (GateVerdict::Fail, 100));
    assert_eq!(code.deciding_gate.as_deref(), Some("maxMeanKlDivergence: 0.2000 > 0.05"));
    assert!(st.recommended_spec_change.unwrap().contains("remove spec.canary"));
}

#[test]
fn on_failure_pause_holds_the_step() {
    let mut s = spec();
    s.canary.as_mut().unwrap().on_failure = FailureAction::Pause;
    let (st, base) = drive_to(&s, CanaryPhase::Stepping, Some(1));
    let (st, t) = run(&s, Some(&st), &obs(sums(base + 20, 0.01), sums(base + 20, 0.3)));
    assert_eq!((st.phase, st.step, st.live_percent), (CanaryPhase::Paused, Some(1), 50));
    assert_eq!(t.unwrap().reason, reason::PAUSED);
}

#[test]
fn every_threshold_can_fail_a_class() {
    type Spoil = fn(&mut ComparisonSums);
    let cases: [(&str, Spoil); 5] = [
        ("maxMeanKlDivergence", |s| s.kl_divergence_sum = s.samples as f64 * 0.06),
        ("minTop1Agreement", |s| s.top1_agreement_sum = s.samples as f64 * 0.89),
        ("maxPerplexityRatio", |s| s.log_perplexity_ratio_sum = s.samples as f64 * 1.11f64.ln()),
        ("maxStructuredInvalidRate", |s| {
            s.structured_samples = s.samples;
            s.structured_invalid = s.samples / 10;
        }),
        ("maxLatencyRatio", |s| s.latency_ratio_sum = s.samples as f64 * 1.6),
    ];
    let s = spec();
    for (name, spoil) in cases {
        let (st, base) = drive_to(&s, CanaryPhase::Shadowing, None);
        let mut window = sums(100, 0.01);
        spoil(&mut window);
        let total = add(st.evidence[0].window_start, window);
        let (st, t) = run(&s, Some(&st), &obs(total, sums(base + 100, 0.01)));
        assert_eq!(st.phase, CanaryPhase::RolledBack, "{name} should fail");
        assert!(t.unwrap().message.contains(name), "{name}");
    }
}

#[test]
fn a_structured_gate_without_structured_requests_does_not_block() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Shadowing, None);
    let (st, _) = run(&s, Some(&st), &obs(sums(base + 100, 0.01), sums(base + 100, 0.01)));
    assert_eq!(st.phase, CanaryPhase::Stepping);
}

#[test]
fn abort_rolls_back_from_any_running_phase() {
    let s = spec();
    for (phase, step) in
        [(CanaryPhase::Pending, None), (CanaryPhase::Shadowing, None), (CanaryPhase::Stepping, Some(1))]
    {
        let (st, _) = if phase == CanaryPhase::Pending {
            let mut o = obs(sums(0, 0.0), sums(0, 0.0));
            o.candidate_ready = false;
            (run(&s, None, &o).0, 0)
        } else {
            drive_to(&s, phase, step)
        };
        let mut o = obs(sums(5, 0.0), sums(5, 0.0));
        o.abort_requested = true;
        let (st, t) = run(&s, Some(&st), &o);
        assert_eq!((st.phase, st.live_percent), (CanaryPhase::RolledBack, 0), "from {phase:?}");
        assert!(t.unwrap().message.contains(ABORT_ANNOTATION));
    }
}

#[test]
fn final_phases_stay_final_and_write_nothing_new() {
    let s = spec();
    let (promoted, _) = drive_to(&s, CanaryPhase::Promoted, None);
    let (st, t) = run(&s, Some(&promoted), &obs(sums(99_999, 0.9), sums(99_999, 0.9)));
    assert_eq!((st, t), (promoted, None));
}

#[test]
fn a_new_candidate_starts_over() {
    let s = spec();
    let (promoted, _) = drive_to(&s, CanaryPhase::Promoted, None);
    let mut s2 = spec();
    s2.canary.as_mut().unwrap().candidate_tier = "int8".into();
    s2.routes[0].tier = "int4".into();
    let mut o = obs(sums(0, 0.0), sums(0, 0.0));
    o.candidate_ready = false;
    let (st, _) = run(&s2, Some(&promoted), &o);
    assert_eq!((st.phase, st.candidate_tier.as_str()), (CanaryPhase::Pending, "int8"));
}

#[test]
fn a_restarted_operator_resumes_the_same_window_and_repeats_nothing() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Stepping, Some(0));
    // Round-trip the status through JSON as the API server stores it, then reconcile twice with the same data.
    let stored: CanaryStatus = serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
    let o = obs(sums(base + 40, 0.01), sums(base + 40, 0.01));
    let (a, ta) = run(&s, Some(&stored), &o);
    let (b, tb) = run(&s, Some(&a), &o);
    assert_eq!((ta, tb), (None, None));
    assert_eq!(a, b, "the same observation twice must produce identical status (no steady-state writes)");
    assert_eq!((a.step, a.evidence[0].samples), (Some(0), 40));
}

#[test]
fn a_router_restart_restarts_the_count_instead_of_going_negative() {
    let s = spec();
    let (st, _) = drive_to(&s, CanaryPhase::Shadowing, None);
    let (st, _) = run(&s, Some(&st), &obs(sums(30, 0.01), sums(30, 0.01)));
    assert_eq!(st.evidence[0].samples, 30);
}

#[test]
fn an_unready_candidate_holds_the_step() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Stepping, Some(0));
    let mut o = obs(sums(base + 500, 0.01), sums(base + 500, 0.01));
    o.candidate_ready = false;
    let (st, t) = run(&s, Some(&st), &o);
    assert_eq!((st.phase, st.step, t), (CanaryPhase::Stepping, Some(0), None));
    assert!(st.message.unwrap().contains("no serving replica"));
}

#[test]
fn gates_fall_back_to_the_default_then_the_builtin() {
    let mut c = spec().canary.unwrap();
    assert_eq!(gate_for(&c, CODE).min_samples, 100);
    assert_eq!(gate_for(&c, MATH).min_samples, 50);
    c.gates.clear();
    assert_eq!(gate_for(&c, MATH), builtin_gate());
}

/// Incomplete evidence (a router replica unreadable): no window starts or passes; a failure still acts; the hold
/// is announced once and lifts when every replica is read again.
#[test]
fn incomplete_evidence_never_advances_a_canary() {
    let s = spec();
    let why = Some("read 1 of 2 router replicas; router replica b: router stats answered HTTP 503".to_owned());
    let with_problem = |mut o: Observation| {
        o.evidence_problem = why.clone();
        o
    };
    // (name, phase/step to start from, counters of the window on top of the start, expected phase/step, Event)
    type Case = (&'static str, CanaryPhase, Option<i32>, i64, f64, CanaryPhase, Option<i32>, Option<&'static str>);
    let cases: [Case; 5] = [
        (
            "pending does not start shadowing",
            CanaryPhase::Pending,
            None,
            0,
            0.01,
            CanaryPhase::Pending,
            None,
            Some(reason::EVIDENCE_INCOMPLETE),
        ),
        (
            "shadowing with enough passing samples holds",
            CanaryPhase::Shadowing,
            None,
            500,
            0.01,
            CanaryPhase::Shadowing,
            None,
            Some(reason::EVIDENCE_INCOMPLETE),
        ),
        (
            "a step with enough passing samples holds",
            CanaryPhase::Stepping,
            Some(0),
            500,
            0.01,
            CanaryPhase::Stepping,
            Some(0),
            Some(reason::EVIDENCE_INCOMPLETE),
        ),
        (
            "the last step does not promote",
            CanaryPhase::Stepping,
            Some(1),
            500,
            0.01,
            CanaryPhase::Stepping,
            Some(1),
            Some(reason::EVIDENCE_INCOMPLETE),
        ),
        (
            "a failing gate still rolls back",
            CanaryPhase::Stepping,
            Some(0),
            500,
            0.3,
            CanaryPhase::RolledBack,
            Some(0),
            Some(reason::ROLLED_BACK),
        ),
    ];
    for (name, phase, step, n, kl, want_phase, want_step, want_event) in cases {
        let (start, base) = if phase == CanaryPhase::Pending {
            let mut o = obs(sums(0, 0.01), sums(0, 0.01));
            o.candidate_ready = false;
            (run(&s, None, &o).0, 0)
        } else {
            drive_to(&s, phase, step)
        };
        let o = with_problem(obs(sums(base + n, kl), sums(base + n, kl)));
        let (st, t) = run(&s, Some(&start), &o);
        assert_eq!((st.phase, st.step), (want_phase, want_step), "{name}");
        assert_eq!(t.as_ref().map(|t| t.reason), want_event, "{name}");
        if want_event == Some(reason::EVIDENCE_INCOMPLETE) {
            let msg = st.message.clone().unwrap();
            assert!(msg.starts_with(HOLDING_PREFIX) && msg.contains("HTTP 503"), "{name}: {msg}");
            assert_eq!(st.live_percent, start.live_percent, "{name}: live traffic unchanged");
            // Held again: no second Event; the same counters with every replica read advance it.
            let (again, t) = run(&s, Some(&st), &o);
            assert_eq!((again.phase, again.step, t), (want_phase, want_step, None), "{name}");
            let mut complete = o.clone();
            complete.evidence_problem = None;
            let (moved, t) = run(&s, Some(&again), &complete);
            assert!(t.is_some() && (moved.phase, moved.step) != (want_phase, want_step), "{name}: {moved:?}");
        }
    }
}

#[test]
fn nothing_read_keeps_the_evidence_in_status() {
    let s = spec();
    let (st, base) = drive_to(&s, CanaryPhase::Stepping, Some(0));
    let (st, _) = run(&s, Some(&st), &obs(sums(base + 40, 0.01), sums(base + 40, 0.01)));
    let before: Vec<i64> = st.evidence.iter().map(|e| e.samples).collect();
    let o = Observation {
        stats: BTreeMap::new(),
        evidence_problem: Some("no router".into()),
        ..obs(sums(0, 0.0), sums(0, 0.0))
    };
    let (held, _) = run(&s, Some(&st), &o);
    assert_eq!(held.evidence.iter().map(|e| e.samples).collect::<Vec<_>>(), before);
    assert_eq!(held.phase, CanaryPhase::Stepping);
}
