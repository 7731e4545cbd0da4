//! Emulated sampling helpers: greedy argmax (with ties), temperature softmax against f64, and categorical
//! draws checked against the f64 CDF of the same probabilities. Vocabularies 17, 1025, 5137; data synthetic.

mod common;

use common::*;
use quantfleet_kernels::Device;
use quantfleet_kernels::ops::sampling::{argmax, categorical, softmax};

fn ints(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn argmax_picks_the_first_maximum<D: Device>(dev: &D) {
    for (i, vocab) in [17usize, 1025, 5137].into_iter().enumerate() {
        let batch = 3;
        let mut logits = synthetic(1000 + i as u64, batch * vocab, 3.0);
        // Row 1: a tie between a late and an early index; the early one must win.
        logits[vocab + vocab - 1] = 50.0;
        logits[vocab + 2] = 50.0;
        let (ld, out) = (up(dev, &f32_bytes(&logits)), out(dev, 4 * batch));
        run(dev, argmax(batch, vocab, &ld, &out).unwrap());
        let want: Vec<i32> = logits
            .chunks(vocab)
            .map(|r| {
                r.iter().enumerate().fold((0, f32::MIN), |(bi, bv), (j, &v)| if v > bv { (j, v) } else { (bi, bv) }).0
                    as i32
            })
            .collect();
        assert_eq!(ints(&fetch(dev, &out, "out")), want, "vocab {vocab}");
        assert_eq!(want[1], 2);
    }
}

fn softmax_and_categorical_match_f64<D: Device>(dev: &D) {
    for (i, vocab) in [17usize, 1025, 5137].into_iter().enumerate() {
        let batch = 4;
        let temperature = 0.7;
        let logits = synthetic(1100 + i as u64, batch * vocab, 2.0);
        let (ld, pd) = (up(dev, &f32_bytes(&logits)), out(dev, 4 * batch * vocab));
        run(dev, softmax(batch, vocab, &ld, &pd, temperature).unwrap());
        let probs = bytes_f32(&fetch(dev, &pd, "pd"));
        let mut want = Vec::new();
        for r in logits.chunks(vocab) {
            let m = r.iter().fold(f64::MIN, |m, &v| m.max(v as f64 / temperature as f64));
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 / temperature as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            want.extend(e.iter().map(|x| x / z));
        }
        let budget: Vec<f64> = want.iter().map(|w| w * 2e-5 + 1e-9).collect();
        assert_close(&format!("softmax vocab {vocab}"), &probs, &want, 0.0, &budget);

        let uniforms = [0.0f32, 0.25, 0.6180339, 0.999_999];
        let (ud, out) = (up(dev, &f32_bytes(&uniforms)), out(dev, 4 * batch));
        run(dev, categorical(batch, vocab, &pd, &ud, &out).unwrap());
        for (b, &k) in ints(&fetch(dev, &out, "out")).iter().enumerate() {
            let row = &probs[b * vocab..(b + 1) * vocab];
            let total: f64 = row.iter().map(|&p| p as f64).sum();
            let target = uniforms[b] as f64 * total;
            let k = k as usize;
            let below: f64 = row[..k].iter().map(|&p| p as f64).sum();
            // fp32 prefix sums may move the boundary by a few ulps of the total.
            let slack = total * 1e-5;
            assert!(
                k < vocab && below <= target + slack && target < below + row[k] as f64 + slack,
                "row {b}: picked {k}"
            );
        }
    }
}

device_tests!(argmax_picks_the_first_maximum, softmax_and_categorical_match_f64);
