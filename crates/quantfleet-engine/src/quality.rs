//! Quality of a tier against a reference, from teacher-forced logits over the same tokens: mean KL divergence
//! KL(reference || tier) per position, top-1 agreement, the first position where the greedy token differs,
//! and perplexity. All sums in f64.

/// Log-softmax of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(p || q) for two rows of logits: sum p (log p - log q).
pub fn kl_divergence(reference: &[f32], candidate: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(reference), log_softmax(candidate));
    lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

/// Divergence of `candidate` from `reference` over `positions` rows of `vocab` logits each.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Divergence {
    pub positions: usize,
    pub kl_sum: f64,
    pub top1_agree: usize,
    /// First position (0-based, within the rows compared) whose greedy token differs; None if none does.
    pub first_divergent: Option<usize>,
}

impl Divergence {
    pub fn measure(reference: &[f32], candidate: &[f32], vocab: usize) -> Self {
        assert_eq!(reference.len(), candidate.len(), "logit shapes");
        let mut d = Divergence::default();
        for (i, (r, c)) in reference.chunks_exact(vocab).zip(candidate.chunks_exact(vocab)).enumerate() {
            d.positions += 1;
            d.kl_sum += kl_divergence(r, c);
            if argmax(r) == argmax(c) {
                d.top1_agree += 1;
            } else if d.first_divergent.is_none() {
                d.first_divergent = Some(i);
            }
        }
        d
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }

    pub fn top1(&self) -> f64 {
        self.top1_agree as f64 / self.positions.max(1) as f64
    }

    /// Accumulates another measurement (first divergence kept per sample by the caller).
    pub fn add(&mut self, other: &Divergence) {
        self.positions += other.positions;
        self.kl_sum += other.kl_sum;
        self.top1_agree += other.top1_agree;
    }
}

/// A percentile interval `[lo, hi]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    pub fn contains(&self, v: f64) -> bool {
        self.lo <= v && v <= self.hi
    }
}

/// Confidence intervals of a tier's pooled mean KL divergence and top-1 agreement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DivergenceIntervals {
    pub mean_kl: Interval,
    pub top1: Interval,
}

/// Percentile-bootstrap intervals (`level`, e.g. 0.95) of the pooled mean KL divergence and top-1 agreement of
/// prompts grouped in strata (the task classes), from `resamples` draws seeded by `seed`. Each draw keeps the
/// number of prompts of every stratum and resamples whole prompts with replacement: the positions of one
/// prompt share its context and are not independent, so resampling positions would give intervals that are
/// too narrow. Returns None when there is no position to measure.
pub fn bootstrap_intervals(
    strata: &[Vec<Divergence>],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<DivergenceIntervals> {
    check_arguments(resamples, level);
    if no_positions(strata) {
        return None;
    }
    let (mut kls, mut top1s) = (Vec::with_capacity(resamples), Vec::with_capacity(resamples));
    resample(strata, resamples, seed, |draw| {
        let mut pooled = Divergence::default();
        draw.for_each(|(s, i)| pooled.add(&strata[s][i]));
        // A draw can pick only empty prompts when some are; it has no rate to give.
        if pooled.positions > 0 {
            kls.push(pooled.mean_kl());
            top1s.push(pooled.top1());
        }
    });
    Some(DivergenceIntervals { mean_kl: percentiles(&mut kls, level), top1: percentiles(&mut top1s, level) })
}

/// Percentile-bootstrap interval of `mean_kl(with) - mean_kl(without)`: what a change (e.g. a quantized KV
/// cache) adds over the same tier without it, measured on the same prompts. Paired: every draw takes the same
/// prompts from both, so the prompts' own difficulty cancels. `with` and `without` must have the same strata
/// and prompt counts. Returns None when either side has no position.
pub fn bootstrap_kl_difference(
    with: &[Vec<Divergence>],
    without: &[Vec<Divergence>],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<Interval> {
    check_arguments(resamples, level);
    let shape = |strata: &[Vec<Divergence>]| strata.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(shape(with), shape(without), "paired bootstrap: the same prompts on both sides");
    if no_positions(with) || no_positions(without) {
        return None;
    }
    let mut diffs = Vec::with_capacity(resamples);
    resample(with, resamples, seed, |draw| {
        let (mut a, mut b) = (Divergence::default(), Divergence::default());
        draw.for_each(|(s, i)| {
            a.add(&with[s][i]);
            b.add(&without[s][i]);
        });
        if a.positions > 0 && b.positions > 0 {
            diffs.push(a.mean_kl() - b.mean_kl());
        }
    });
    Some(percentiles(&mut diffs, level))
}

fn check_arguments(resamples: usize, level: f64) {
    assert!(resamples > 0 && level > 0.0 && level < 1.0, "bootstrap: {resamples} resamples at level {level}");
}

fn no_positions(strata: &[Vec<Divergence>]) -> bool {
    strata.iter().flatten().all(|d| d.positions == 0)
}

/// Calls `f` `resamples` times with one stratified draw: (stratum, prompt) pairs, each stratum's prompt count
/// drawn uniformly with replacement.
fn resample(
    strata: &[Vec<Divergence>],
    resamples: usize,
    seed: u64,
    mut f: impl FnMut(&mut dyn Iterator<Item = (usize, usize)>),
) {
    let mut rng = crate::sampler::Rng::new(seed);
    for _ in 0..resamples {
        let mut draw =
            strata.iter().enumerate().flat_map(|(s, stratum)| std::iter::repeat_n((s, stratum.len()), stratum.len()));
        // Multiply-shift maps 64 random bits onto 0..len without modulo bias worth speaking of.
        let mut picks = std::iter::from_fn(|| {
            draw.next().map(|(s, len)| (s, ((rng.next_u64() as u128 * len as u128) >> 64) as usize))
        });
        f(&mut picks);
    }
}

/// The central `level` interval of `values` by their percentiles (sorts them); `values` must not be empty.
fn percentiles(values: &mut [f64], level: f64) -> Interval {
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    let at = |q: f64| values[((q * values.len() as f64).floor() as usize).min(values.len() - 1)];
    Interval { lo: at(tail), hi: at(1.0 - tail) }
}

/// Negative log-likelihood (nats) of `targets[i]` under logits row i.
pub fn nll(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    logits
        .chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            lse - row[t as usize] as f64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_of_identical_and_shifted_distributions() {
        let a = [1.0f32, 2.0, 3.0, 0.5, 0.0, -1.0];
        let d = Divergence::measure(&a, &a, 3);
        assert_eq!((d.positions, d.top1_agree, d.first_divergent), (2, 2, None));
        assert!(d.mean_kl() < 1e-12);
        // Adding a constant to logits changes nothing.
        let b: Vec<f32> = a.iter().map(|v| v + 5.0).collect();
        assert!(Divergence::measure(&a, &b, 3).mean_kl() < 1e-9);
        // Swapping the top token: disagreement at row 0, positive KL by hand: p=(e^1,e^2,e^3)/Z vs q swapped.
        let c = [3.0f32, 2.0, 1.0, 0.5, 0.0, -1.0];
        let d = Divergence::measure(&a, &c, 3);
        assert_eq!((d.top1_agree, d.first_divergent), (1, Some(0)));
        let z: f64 = [1f64, 2., 3.].iter().map(|v| v.exp()).sum();
        let p: Vec<f64> = [1f64, 2., 3.].iter().map(|v| v.exp() / z).collect();
        let want = p[0] * (p[0] / p[2]).ln() + p[2] * (p[2] / p[0]).ln();
        assert!((d.kl_sum - want).abs() < 1e-9, "{} vs {want}", d.kl_sum);
        // Uniform logits: nll = ln(vocab).
        assert!((nll(&[0.0; 4], 4, &[2]) - 4f64.ln()).abs() < 1e-12);
    }

    fn prompt(positions: usize, kl_sum: f64, top1_agree: usize) -> Divergence {
        Divergence { positions, kl_sum, top1_agree, first_divergent: None }
    }

    #[test]
    fn bootstrap_intervals_of_identical_prompts_are_the_point_estimate() {
        let strata = vec![vec![prompt(32, 0.32, 30); 5], vec![prompt(16, 0.08, 16); 3]];
        let ci = bootstrap_intervals(&strata, 200, 0.95, 7).unwrap();
        let (kl, top1) = ((5.0 * 0.32 + 3.0 * 0.08) / 208.0, (5.0 * 30.0 + 3.0 * 16.0) / 208.0);
        assert!((ci.mean_kl.lo - kl).abs() < 1e-12 && (ci.mean_kl.hi - kl).abs() < 1e-12, "{ci:?}");
        assert!((ci.top1.lo - top1).abs() < 1e-12 && (ci.top1.hi - top1).abs() < 1e-12, "{ci:?}");
    }

    #[test]
    fn bootstrap_intervals_cover_the_estimate_and_shrink_with_more_prompts() {
        // Prompts alternate between a good and a bad one: the point estimate is their mean.
        let varied = |n: usize| -> Vec<Divergence> {
            (0..n).map(|i| if i % 2 == 0 { prompt(32, 0.0, 32) } else { prompt(32, 0.64, 28) }).collect()
        };
        let few = bootstrap_intervals(&[varied(8)], 2000, 0.95, 1).unwrap();
        let many = bootstrap_intervals(&[varied(128)], 2000, 0.95, 1).unwrap();
        for ci in [few, many] {
            assert!(ci.mean_kl.contains(0.01) && ci.top1.contains(60.0 / 64.0), "{ci:?}");
            // Never outside what a resample can produce: all-good prompts to all-bad prompts.
            assert!(ci.mean_kl.lo >= 0.0 && ci.mean_kl.hi <= 0.02 && ci.top1.lo >= 28.0 / 32.0, "{ci:?}");
        }
        let width = |i: Interval| i.hi - i.lo;
        assert!(width(many.top1) < width(few.top1) / 2.0, "{few:?} vs {many:?}");
        assert!(width(few.top1) > 0.0);
        // Seeded: the same draws give the same interval.
        assert_eq!(bootstrap_intervals(&[varied(8)], 2000, 0.95, 1).unwrap(), few);
        // Strata keep their sizes: one class of only perfect prompts cannot be drawn away.
        let strat = bootstrap_intervals(&[vec![prompt(32, 0.0, 32); 4], varied(4)], 2000, 0.95, 3).unwrap();
        assert!(strat.top1.lo >= (32.0 * 4.0 + 28.0 * 4.0) / 256.0, "{strat:?}");
        assert!(bootstrap_intervals(&[vec![], vec![prompt(0, 0.0, 0)]], 10, 0.95, 0).is_none());
    }

    #[test]
    fn paired_difference_cancels_the_prompts_own_difficulty() {
        // Prompts of very different difficulty; the change adds exactly 0.002 nats per position to each.
        let without: Vec<Vec<Divergence>> =
            vec![(0..16).map(|i| prompt(32, 32.0 * 0.001 * (1 + i % 4 * 10) as f64, 30)).collect()];
        let with = vec![without[0].iter().map(|d| Divergence { kl_sum: d.kl_sum + 32.0 * 0.002, ..*d }).collect()];
        let paired = bootstrap_kl_difference(&with, &without, 2000, 0.95, 9).unwrap();
        assert!((paired.lo - 0.002).abs() < 1e-12 && (paired.hi - 0.002).abs() < 1e-12, "{paired:?}");
        // Unpaired, the prompts' spread would swamp it: each side's own interval is far wider than 0.002.
        let alone = bootstrap_intervals(&without, 2000, 0.95, 9).unwrap();
        assert!(alone.mean_kl.hi - alone.mean_kl.lo > 0.005, "{alone:?}");
        // A change that helps some prompts and hurts others: the interval straddles zero.
        let mixed: Vec<Divergence> = without[0]
            .iter()
            .enumerate()
            .map(|(i, d)| Divergence { kl_sum: d.kl_sum + if i % 2 == 0 { 0.1 } else { -0.1 }, ..*d })
            .collect();
        let ci = bootstrap_kl_difference(&[mixed], &without, 2000, 0.95, 9).unwrap();
        assert!(ci.contains(0.0) && ci.lo < 0.0 && ci.hi > 0.0, "{ci:?}");
    }
}
