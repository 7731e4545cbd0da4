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
}
