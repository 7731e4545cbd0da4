//! Token selection from logits: greedy, or temperature sampling restricted by top-k and top-p (nucleus),
//! driven by a seeded RNG so a request with a seed is reproducible. Also log-probabilities of chosen and
//! top alternative tokens, always from the model's raw distribution (before temperature and truncation),
//! which is what scoring and quality comparisons between tiers need.

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 disables.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(EngineError::InvalidRequest(format!("temperature {} must be >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidRequest(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and stable across platforms and releases (a
/// dependency's RNG could change its stream in an update and silently change seeded outputs).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Scratch (token, weight) pairs, reused between calls.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Self { params, rng, candidates: Vec::new() })
    }

    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(EngineError::InvalidRequest("logits are empty or contain NaN".into()));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Most likely first; ties broken by token id so results do not depend on sort stability.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.params.top_k > 0 && self.params.top_k < c.len() {
            c.select_nth_unstable_by(self.params.top_k - 1, by_logit);
            c.truncate(self.params.top_k);
        }
        c.sort_unstable_by(by_logit);
        let max = c[0].1;
        let inv_t = 1.0 / self.params.temperature;
        let mut total = 0.0f64;
        for e in c.iter_mut() {
            e.1 = ((e.1 - max) * inv_t).exp();
            total += e.1 as f64;
        }
        if self.params.top_p < 1.0 {
            let mut cum = 0.0f64;
            let keep = c
                .iter()
                .position(|e| {
                    cum += e.1 as f64 / total;
                    cum >= self.params.top_p as f64
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep);
            total = c.iter().map(|e| e.1 as f64).sum();
        }
        let mut u = self.rng.next_f64() * total;
        for e in c.iter() {
            u -= e.1 as f64;
            if u < 0.0 {
                return Ok(e.0);
            }
        }
        Ok(c[c.len() - 1].0)
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    // First maximum, as numpy's argmax.
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-sum-exp of the logits, accumulated in f64.
pub fn logsumexp(logits: &[f32]) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

/// The `k` most likely tokens with their log-probabilities, most likely first (ties: lower id first).
/// One pass keeping a sorted list of the best k: no vocabulary-sized allocation per generated token.
pub fn top_logprobs(logits: &[f32], k: usize, lse: f64) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in logits.iter().enumerate() {
        if best.len() == k && v <= best[k - 1].1 {
            continue; // not better than the current k-th (equal loses: lower ids came first)
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best.into_iter().map(|(i, v)| (i, (v as f64 - lse) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_at_any_temperature() {
        let logits = [0.5, 2.0, 1.9, -4.0];
        for params in [
            SamplingParams { temperature: 5.0, top_k: 1, top_p: 1.0, seed: 3 },
            SamplingParams { temperature: 5.0, top_k: 0, top_p: 1e-6, seed: 3 },
        ] {
            let mut s = Sampler::new(params).unwrap();
            assert!((0..200).all(|_| s.sample(&logits).unwrap() == 1));
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax_and_seeds_reproduce() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // probabilities 1/6, 2/6, 3/6
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42 };
        let mut s = Sampler::new(params.clone()).unwrap();
        let mut counts = [0usize; 3];
        let draws: Vec<u32> = (0..60_000).map(|_| s.sample(&logits).unwrap()).collect();
        for &d in &draws {
            counts[d as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / 60_000.0;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
        let mut again = Sampler::new(params).unwrap();
        assert!(draws.iter().take(100).all(|&d| again.sample(&logits).unwrap() == d));
    }

    #[test]
    fn top_p_drops_the_tail() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.75 keeps the first two only.
        let logits = [(0.5f32).ln(), (0.3f32).ln(), (0.2f32).ln()];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.75, seed: 9 }).unwrap();
        assert!((0..2000).all(|_| s.sample(&logits).unwrap() != 2));
    }

    #[test]
    fn bad_parameters_and_nan_logits_are_errors() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn top_logprobs_are_normalised_and_ordered() {
        let logits = [1.0f32, 3.0, 2.0];
        let lse = logsumexp(&logits);
        let top = top_logprobs(&logits, 2, lse);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(top_logprobs(&logits, 0, lse).is_empty());
        let ties = [5.0f32, 7.0, 5.0, 7.0, 1.0];
        let order: Vec<u32> = top_logprobs(&ties, 9, logsumexp(&ties)).iter().map(|t| t.0).collect();
        assert_eq!(order, vec![1, 3, 0, 2, 4]);
        let total: f64 = logits.iter().map(|&l| (l as f64 - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((top[0].1 - (3.0 - lse as f32)).abs() < 1e-6);
    }
}
