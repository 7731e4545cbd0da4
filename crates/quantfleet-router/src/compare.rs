//! Shadow comparison of one (incumbent, candidate) pair on the incumbent's tokens.
//!
//! The incumbent generated tokens t_1..t_n with its top-k log-probabilities at each position; the candidate
//! scored the same tokens teacher-forced (same prefixes) with its own top-k. Per position:
//! - KL(incumbent || candidate) over the incumbent's top-k plus one "everything else" bucket. This is the KL
//!   of both distributions coarse-grained onto those k+1 outcomes: when the candidate's top-k covers the
//!   incumbent's, it never exceeds the true KL (data processing inequality), and it is exact when k spans the
//!   vocabulary. A token of the incumbent's top-k missing from the candidate's top-k gets an estimate of its
//!   candidate probability: the candidate's remaining mass shared among the missing tokens, capped by the
//!   candidate's k-th probability (a bound it cannot exceed).
//! - top-1 agreement: the candidate's most likely token equals the incumbent's.
//!
//! Per pair: the mean KL, the agreement fraction, the first position where the top-1 tokens differ, and
//! ln(candidate perplexity / incumbent perplexity) on the incumbent's tokens = mean(ln p_inc - ln p_cand).

use crate::backend::{ScoreResult, Token};

/// Probabilities below this are treated as this (a candidate that gives a token zero mass would make the
/// KL infinite; one part in 10^9 keeps it large but finite).
const MIN_PROB: f64 = 1e-9;

/// The comparison of one pair.
#[derive(Clone, Debug, PartialEq)]
pub struct PairComparison {
    /// Positions compared.
    pub positions: usize,
    pub mean_kl: f64,
    pub top1_agreement: f64,
    /// First position (0-based) where the top-1 tokens differ; None when they agree everywhere.
    pub first_divergence: Option<usize>,
    /// ln(candidate perplexity / incumbent perplexity).
    pub log_perplexity_ratio: f64,
}

/// Why a pair could not be compared.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompareError {
    #[error("the incumbent generated no tokens")]
    Empty,
    #[error("the candidate scored {scored} positions for {generated} generated tokens")]
    LengthMismatch { generated: usize, scored: usize },
    #[error("position {0} has no top-k log-probabilities (the incumbent or candidate was asked for none)")]
    MissingTopK(usize),
}

/// KL(P || Q) over P's top-k plus a remainder bucket, in nats. `p_top` and `q_top` are (token, logprob),
/// most likely first.
pub fn topk_kl(p_top: &[(u32, f32)], q_top: &[(u32, f32)]) -> f64 {
    let q_mass: f64 = q_top.iter().map(|&(_, lp)| (lp as f64).exp()).sum();
    let q_kth = q_top.last().map(|&(_, lp)| (lp as f64).exp()).unwrap_or(1.0);
    let missing = p_top.iter().filter(|(t, _)| !q_top.iter().any(|(u, _)| u == t)).count();
    let missing_share = if missing > 0 { ((1.0 - q_mass).max(0.0) / missing as f64).min(q_kth) } else { 0.0 };
    let (mut kl, mut p_sum, mut q_sum) = (0.0, 0.0, 0.0);
    for &(t, lp) in p_top {
        let p = (lp as f64).exp();
        let q = q_top.iter().find(|(u, _)| *u == t).map(|&(_, lq)| (lq as f64).exp()).unwrap_or(missing_share);
        let q = q.max(MIN_PROB);
        p_sum += p;
        q_sum += q;
        if p > 0.0 {
            kl += p * (p / q).ln();
        }
    }
    let p_rest = (1.0 - p_sum).max(0.0);
    let q_rest = (1.0 - q_sum).max(MIN_PROB);
    if p_rest > 0.0 {
        kl += p_rest * (p_rest / q_rest).ln();
    }
    kl.max(0.0)
}

/// Compares the incumbent's generated tokens (with their top-k) to the candidate's score of them.
pub fn compare(incumbent: &[Token], candidate: &ScoreResult) -> Result<PairComparison, CompareError> {
    let n = incumbent.len();
    if n == 0 {
        return Err(CompareError::Empty);
    }
    if candidate.logprobs.len() != n || candidate.top.len() != n {
        return Err(CompareError::LengthMismatch {
            generated: n,
            scored: candidate.logprobs.len().min(candidate.top.len()),
        });
    }
    let (mut kl, mut agree, mut log_ratio) = (0.0, 0usize, 0.0);
    let mut first_divergence = None;
    for (i, tok) in incumbent.iter().enumerate() {
        let (p_top, q_top) = (&tok.top, &candidate.top[i]);
        if p_top.is_empty() || q_top.is_empty() {
            return Err(CompareError::MissingTopK(i));
        }
        kl += topk_kl(p_top, q_top);
        if p_top[0].0 == q_top[0].0 {
            agree += 1;
        } else if first_divergence.is_none() {
            first_divergence = Some(i);
        }
        log_ratio += tok.logprob as f64 - (candidate.logprobs[i] as f64).max(MIN_PROB.ln());
    }
    Ok(PairComparison {
        positions: n,
        mean_kl: kl / n as f64,
        top1_agreement: agree as f64 / n as f64,
        first_divergence,
        log_perplexity_ratio: log_ratio / n as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(p: f64) -> f32 {
        p.ln() as f32
    }

    /// Exact KL of two full distributions (a slow reference for the bucketed estimate).
    fn exact_kl(p: &[f64], q: &[f64]) -> f64 {
        p.iter().zip(q).filter(|(p, _)| **p > 0.0).map(|(p, q)| p * (p / q).ln()).sum()
    }

    fn top(dist: &[f64], k: usize) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = dist.iter().enumerate().map(|(i, &p)| (i as u32, lp(p))).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.truncate(k);
        v
    }

    #[test]
    fn identical_distributions_have_zero_kl() {
        let p = [0.5, 0.3, 0.1, 0.06, 0.04];
        assert!(topk_kl(&top(&p, 3), &top(&p, 3)).abs() < 1e-6);
    }

    #[test]
    fn with_the_whole_vocabulary_in_top_k_the_estimate_is_exact() {
        let p = [0.5, 0.3, 0.1, 0.06, 0.04];
        let q = [0.3, 0.4, 0.2, 0.05, 0.05];
        let est = topk_kl(&top(&p, 5), &top(&q, 5));
        assert!((est - exact_kl(&p, &q)).abs() < 1e-6, "{est} vs {}", exact_kl(&p, &q));
    }

    #[test]
    fn the_bucketed_estimate_is_a_lower_bound_and_positive_when_they_differ() {
        let p = [0.5, 0.3, 0.1, 0.06, 0.04];
        let q = [0.3, 0.4, 0.2, 0.05, 0.05];
        let est = topk_kl(&top(&p, 2), &top(&q, 2));
        assert!(est > 0.01 && est <= exact_kl(&p, &q) + 1e-9, "{est} vs {}", exact_kl(&p, &q));
    }

    #[test]
    fn tokens_missing_from_the_candidates_top_k_are_bounded() {
        // The candidate puts the incumbent's favourite outside its own top-2.
        let p = [0.9, 0.05, 0.03, 0.02];
        let q = [0.02, 0.5, 0.4, 0.08];
        let est = topk_kl(&top(&p, 2), &top(&q, 2));
        // Its candidate probability is at most min(remaining 0.1 / 1 missing, 2nd prob 0.4) = 0.1.
        assert!(est > 0.9 * (0.9f64 / 0.1).ln() - 0.3, "{est}");
        assert!(est <= exact_kl(&p, &q) + 1e-9);
    }

    fn token(id: u32, dist: &[f64]) -> Token {
        Token { id, logprob: lp(dist[id as usize]), top: top(dist, 3) }
    }

    #[test]
    fn a_pair_reports_agreement_divergence_and_perplexity() {
        let a = [0.7, 0.2, 0.05, 0.05];
        let b = [0.2, 0.7, 0.05, 0.05];
        let incumbent = vec![token(0, &a), token(0, &a), token(1, &b), token(0, &a)];
        // The candidate agrees at positions 0 and 2, flips at 1 and 3.
        let cand = [&a, &b, &b, &b];
        let score = ScoreResult {
            logprobs: incumbent.iter().zip(cand).map(|(t, d)| lp(d[t.id as usize])).collect(),
            top: cand.iter().map(|d| top(d.as_slice(), 3)).collect(),
        };
        let c = compare(&incumbent, &score).unwrap();
        assert_eq!(c.positions, 4);
        assert_eq!(c.top1_agreement, 0.5);
        assert_eq!(c.first_divergence, Some(1));
        // ln p_inc - ln p_cand: 0, ln(0.7/0.2), 0, ln(0.7/0.2).
        assert!((c.log_perplexity_ratio - 2.0 * (3.5f64).ln() / 4.0).abs() < 1e-6);
        assert!((c.mean_kl - 2.0 * topk_kl(&top(&a, 3), &top(&b, 3)) / 4.0).abs() < 1e-9);

        let same = ScoreResult {
            logprobs: incumbent.iter().map(|t| t.logprob).collect(),
            top: incumbent.iter().map(|t| t.top.clone()).collect(),
        };
        let c = compare(&incumbent, &same).unwrap();
        assert_eq!((c.top1_agreement, c.first_divergence), (1.0, None));
        assert!(c.mean_kl.abs() < 1e-6 && c.log_perplexity_ratio.abs() < 1e-9);
    }

    #[test]
    fn malformed_pairs_are_errors() {
        let a = [0.7, 0.3];
        let score = ScoreResult { logprobs: vec![], top: vec![] };
        assert_eq!(compare(&[], &score), Err(CompareError::Empty));
        assert!(matches!(compare(&[token(0, &a)], &score), Err(CompareError::LengthMismatch { .. })));
        let score = ScoreResult { logprobs: vec![-0.1], top: vec![vec![]] };
        assert_eq!(compare(&[token(0, &a)], &score), Err(CompareError::MissingTopK(0)));
    }
}
