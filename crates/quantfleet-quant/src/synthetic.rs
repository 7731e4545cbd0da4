//! SYNTHETIC, seeded test data: a small deterministic PRNG and generators for weights and activations with
//! planted outlier input channels (the structure AWQ, SmoothQuant and KIVI exploit in real LLMs). Used by
//! the algorithm tests and the bench binary; never a stand-in for real model data in reports.

/// SplitMix64: tiny, fast, and good enough for test fixtures (not for cryptography).
#[derive(Clone, Debug)]
pub struct SynthRng(u64);

impl SynthRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// `n` values drawn from N(0, std^2).
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// SYNTHETIC linear layer with planted outlier input channels.
#[derive(Clone, Debug)]
pub struct SyntheticLayer {
    pub out_features: usize,
    pub in_features: usize,
    /// `[out x in]` weights ~ N(0, 0.02^2) with a few heavy-tailed entries.
    pub weight: Vec<f32>,
    /// `[n_tokens x in]` activations: correlated (a rank in/8 latent mix plus 0.2 noise, roughly unit scale,
    /// as real hidden states are far from independent), outlier channels multiplied by `outlier_gain`.
    pub activations: Vec<f32>,
    pub n_tokens: usize,
    pub outlier_channels: Vec<usize>,
}

/// Build a SYNTHETIC layer: every `in / n_outliers`-th input channel gets activations `outlier_gain` times
/// larger than the rest, as in the activation outliers of real transformer layers. Correlated inputs matter:
/// GPTQ's error feedback only has something to exploit when X^T X is far from diagonal.
pub fn synthetic_layer(
    out_features: usize,
    in_features: usize,
    n_tokens: usize,
    n_outliers: usize,
    outlier_gain: f32,
    seed: u64,
) -> SyntheticLayer {
    let mut rng = SynthRng::new(seed);
    let mut weight = rng.normal_vec(out_features * in_features, 0.02);
    // A sprinkle of large weights so per-group ranges differ, as in trained layers.
    for w in weight.iter_mut() {
        if rng.uniform() < 0.002 {
            *w *= 6.0;
        }
    }
    let stride = (in_features / n_outliers.max(1)).max(1);
    let outlier_channels: Vec<usize> = (0..n_outliers).map(|i| (i * stride + stride / 3) % in_features).collect();
    let rank = (in_features / 8).max(4);
    let mixing = rng.normal_vec(rank * in_features, 1.0 / (rank as f32).sqrt());
    let mut activations = rng.normal_vec(n_tokens * in_features, 0.2);
    for t in 0..n_tokens {
        let z = rng.normal_vec(rank, 1.0);
        let row = &mut activations[t * in_features..(t + 1) * in_features];
        for (k, &zk) in z.iter().enumerate() {
            for (a, &m) in row.iter_mut().zip(&mixing[k * in_features..(k + 1) * in_features]) {
                *a += zk * m;
            }
        }
    }
    for t in 0..n_tokens {
        for &c in &outlier_channels {
            activations[t * in_features + c] *= outlier_gain;
        }
    }
    SyntheticLayer { out_features, in_features, weight, activations, n_tokens, outlier_channels }
}
