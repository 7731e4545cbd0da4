//! Emulated KV append (FP16, FP8, INT4-KIVI) and paged decode attention against quantfleet-quant: the
//! cache bytes the append kernels write must equal the Rust quantizers' bytes exactly, and attention over
//! them must match an f64 softmax reference. Sequence lengths 1, 17, 45 and 32 with 16-token blocks cross
//! block boundaries, leave residual (unquantized) KIVI tokens, and exactly fill blocks; GQA groups are 8 and 3.
//! Data is synthetic.

mod common;

use common::*;
use quantfleet_kernels::Device;
use quantfleet_kernels::DeviceBuffer;
use quantfleet_kernels::ops::Act;
use quantfleet_kernels::ops::attention::{KvAppendTarget, KvCache, PagedLayout, attn_decode, kv_append};
use quantfleet_quant::MatrixRef;
use quantfleet_quant::int4::{GroupParams, pack_nibbles};
use quantfleet_quant::kv::{KvDtype, KvLayout, attention_reference, quantize_kv_per_token};

const SEQ_LENS: [usize; 4] = [1, 17, 45, 32];
const BLOCK: usize = 16;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    F16,
    Fp8,
    Kivi,
}

struct Setup {
    layout: PagedLayout,
    /// Physical block of (sequence, logical block).
    table: Vec<i32>,
    /// f16-rounded K and V of (sequence, token): `[n_kv * D]` rows.
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

fn setup(head_dim: usize, seed: u64) -> Setup {
    let layout = PagedLayout {
        batch: SEQ_LENS.len(),
        // GQA groups of 8 (D = 64: every query-state slot, two heads merged per warp) and 3 (D = 128:
        // not a power of two, one warp idle in the merge).
        n_heads: if head_dim == 64 { 16 } else { 6 },
        n_kv_heads: 2,
        head_dim,
        block_size: BLOCK,
        num_blocks: 13,
        max_blocks: 3,
    };
    // A scrambled block table (physical blocks are not in logical order; block 0 is never used).
    let table: Vec<i32> = (0..layout.batch * layout.max_blocks).map(|i| 1 + ((i * 5) % 12) as i32).collect();
    let row = layout.n_kv_heads * head_dim;
    let tokens = |salt: u64| -> Vec<Vec<Vec<f32>>> {
        SEQ_LENS
            .iter()
            .enumerate()
            .map(|(b, &len)| {
                (0..len)
                    .map(|t| {
                        let mut r = synthetic(seed + salt + (b * 100 + t) as u64, row, 1.0);
                        // KIVI's premise: a few key channels carry outliers.
                        r.iter_mut().enumerate().filter(|(c, _)| c % 37 == 3).for_each(|(_, x)| *x *= 8.0);
                        to_act(Act::F16, &r).0
                    })
                    .collect()
            })
            .collect()
    };
    Setup { layout, table, k: tokens(1), v: tokens(50_000) }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Cache buffers for one kind: on the device (`B` = the device's buffer) or copied back (`HostBuf`).
struct Cache<B> {
    k: B,
    v: B,
    k_scale: B,
    v_scale: B,
    k_zero: B,
    v_zero: B,
    res_k: B,
    res_v: B,
}

/// A downloaded buffer.
struct HostBuf(Vec<u8>);

impl HostBuf {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<B: DeviceBuffer> Cache<B> {
    fn new<D: Device<Buffer = B>>(dev: &D, kind: Kind, l: &PagedLayout) -> Self {
        let tokens = l.num_blocks * l.n_kv_heads * l.block_size;
        let elems = tokens * l.head_dim;
        let code_bytes = match kind {
            Kind::F16 => 2 * elems,
            Kind::Fp8 => elems,
            Kind::Kivi => elems / 2,
        };
        let channels = l.num_blocks * l.n_kv_heads * l.head_dim;
        let residual = 2 * l.batch * l.n_kv_heads * l.block_size * l.head_dim;
        Cache {
            k: out(dev, code_bytes),
            v: out(dev, code_bytes),
            k_scale: out(dev, 4 * if kind == Kind::Kivi { channels } else { tokens }),
            v_scale: out(dev, 4 * tokens),
            k_zero: out(dev, channels),
            v_zero: out(dev, tokens),
            res_k: out(dev, residual),
            res_v: out(dev, residual),
        }
    }
    fn view(&self, kind: Kind) -> KvCache<'_> {
        match kind {
            Kind::F16 => KvCache::F16 { k: &self.k, v: &self.v },
            Kind::Fp8 => KvCache::Fp8 { k: &self.k, v: &self.v, k_scale: &self.k_scale, v_scale: &self.v_scale },
            Kind::Kivi => KvCache::Kivi {
                k: &self.k,
                v: &self.v,
                k_scale: &self.k_scale,
                v_scale: &self.v_scale,
                k_zero: &self.k_zero,
                v_zero: &self.v_zero,
                res_k: &self.res_k,
                res_v: &self.res_v,
            },
        }
    }
    /// Every buffer copied back, after checking its guard zones.
    fn download<D: Device<Buffer = B>>(&self, dev: &D) -> Cache<HostBuf> {
        let get = |b: &B, name: &str| HostBuf(fetch(dev, b, name));
        Cache {
            k: get(&self.k, "k"),
            v: get(&self.v, "v"),
            k_scale: get(&self.k_scale, "k_scale"),
            v_scale: get(&self.v_scale, "v_scale"),
            k_zero: get(&self.k_zero, "k_zero"),
            v_zero: get(&self.v_zero, "v_zero"),
            res_k: get(&self.res_k, "res_k"),
            res_v: get(&self.res_v, "res_v"),
        }
    }
}

/// Appends every token through the kernel, one decode step (all sequences at once) per launch.
fn fill<D: Device>(dev: &D, kind: Kind, s: &Setup, cache: &Cache<D::Buffer>, table: &D::Buffer) {
    let l = s.layout;
    let row = l.n_kv_heads * l.head_dim;
    for t in 0..*SEQ_LENS.iter().max().unwrap() {
        let live = |b: usize| t < SEQ_LENS[b];
        let pick = |x: &Vec<Vec<Vec<f32>>>| -> Vec<u8> {
            (0..l.batch)
                .flat_map(|b| to_act(Act::F16, &if live(b) { x[b][t].clone() } else { vec![0.0; row] }).1)
                .collect()
        };
        let (kn, vn) = (up(dev, &pick(&s.k)), up(dev, &pick(&s.v)));
        let slots: Vec<i32> =
            (0..l.batch)
                .map(|b| {
                    if live(b) { s.table[b * l.max_blocks + t / BLOCK] * BLOCK as i32 + (t % BLOCK) as i32 } else { -1 }
                })
                .collect();
        let positions: Vec<i32> = (0..l.batch).map(|b| if live(b) { t as i32 } else { -1 }).collect();
        let slots = up(dev, &i32_bytes(&slots));
        let positions = up(dev, &i32_bytes(&positions));
        let target = match kind {
            Kind::F16 => KvAppendTarget::F16 { slot_mapping: &slots, k: &cache.k, v: &cache.v },
            Kind::Fp8 => KvAppendTarget::Fp8 {
                slot_mapping: &slots,
                k: &cache.k,
                v: &cache.v,
                k_scale: &cache.k_scale,
                v_scale: &cache.v_scale,
            },
            Kind::Kivi => KvAppendTarget::Kivi { positions: &positions, block_table: table, cache: cache.view(kind) },
        };
        run(dev, kv_append(target, l, &kn, &vn).unwrap());
    }
}

/// Reference cache contents: (expected bytes at offset) checks, and the dequantized K/V per sequence.
struct Expect {
    k_hat: Vec<Vec<f32>>,
    v_hat: Vec<Vec<f32>>,
}

fn read_f32(buf: &HostBuf, i: usize) -> f32 {
    bytes_f32(&buf.bytes()[4 * i..4 * i + 4])[0]
}

/// Checks the cache bytes against quantfleet-quant and returns the dequantized K/V `[len x row]` per sequence.
fn check_cache(kind: Kind, s: &Setup, c: &Cache<HostBuf>) -> Expect {
    let l = s.layout;
    let (d, nkv) = (l.head_dim, l.n_kv_heads);
    let row = nkv * d;
    let kvl = KvLayout { n_heads: nkv, head_dim: d };
    let tok = |b: usize, t: usize, h: usize| -> usize {
        let blk = s.table[b * l.max_blocks + t / BLOCK] as usize;
        (blk * nkv + h) * BLOCK + t % BLOCK
    };
    let mut e = Expect { k_hat: Vec::new(), v_hat: Vec::new() };
    for (b, &len) in SEQ_LENS.iter().enumerate() {
        let mut k_hat = Vec::new();
        let mut v_hat = Vec::new();
        for (src, cache, scales, zeros, out, is_key) in [
            (&s.k[b], &c.k, &c.k_scale, &c.k_zero, &mut k_hat, true),
            (&s.v[b], &c.v, &c.v_scale, &c.v_zero, &mut v_hat, false),
        ] {
            let flat: Vec<f32> = src.concat();
            match kind {
                Kind::F16 => {
                    for (t, src_t) in src.iter().enumerate() {
                        for h in 0..nkv {
                            let got =
                                from_act(Act::F16, &cache.bytes()[2 * tok(b, t, h) * d..2 * (tok(b, t, h) + 1) * d]);
                            assert_eq!(got, src_t[h * d..(h + 1) * d], "f16 cache b{b} t{t} h{h}");
                        }
                    }
                    out.extend_from_slice(&flat);
                }
                Kind::Fp8 => {
                    // kv_append_fp8 quantizes each head Hadamard-rotated.
                    let mut rotated = flat;
                    rotated.chunks_exact_mut(d).for_each(quantfleet_quant::hadamard::rotate);
                    let m = MatrixRef::new("kv", &rotated, len, row).unwrap();
                    let q = quantize_kv_per_token(&m, kvl, KvDtype::Fp8E4M3).unwrap();
                    for t in 0..len {
                        for h in 0..nkv {
                            let i = tok(b, t, h);
                            assert_eq!(
                                &cache.bytes()[i * d..(i + 1) * d],
                                &q.codes[(t * nkv + h) * d..(t * nkv + h + 1) * d],
                                "fp8 codes b{b} t{t} h{h}"
                            );
                            assert_eq!(read_f32(scales, i), q.scales[t * nkv + h], "fp8 scale b{b} t{t} h{h}");
                        }
                    }
                    // attn_decode_fp8 rotates queries and output, so it attends over the rotated-back rows.
                    let mut deq = q.dequantize();
                    deq.chunks_exact_mut(d).for_each(quantfleet_quant::hadamard::rotate);
                    out.extend(deq);
                }
                Kind::Kivi => {
                    let full = len / BLOCK * BLOCK;
                    let mut deq = flat.clone();
                    for blk0 in (0..full).step_by(BLOCK) {
                        if is_key {
                            // Per channel over the block's tokens (GroupParams::fit, as KiviCache does).
                            for h in 0..nkv {
                                let phys = s.table[b * l.max_blocks + blk0 / BLOCK] as usize;
                                let mut nib = vec![0u8; BLOCK * d];
                                for ch in 0..d {
                                    let col: Vec<f32> = (0..BLOCK).map(|t| src[blk0 + t][h * d + ch]).collect();
                                    let p = GroupParams::fit(&col, false, 1.0);
                                    let ci = (phys * nkv + h) * d + ch;
                                    assert_eq!(
                                        read_f32(scales, ci),
                                        p.scale,
                                        "kivi key scale b{b} blk{blk0} h{h} ch{ch}"
                                    );
                                    assert_eq!(zeros.bytes()[ci], p.zero, "kivi key zero");
                                    for t in 0..BLOCK {
                                        nib[t * d + ch] = p.quantize(col[t]);
                                        deq[(blk0 + t) * row + h * d + ch] = p.dequantize(nib[t * d + ch]);
                                    }
                                }
                                for t in 0..BLOCK {
                                    let i = tok(b, blk0 + t, h);
                                    assert_eq!(
                                        &cache.bytes()[i * d / 2..(i + 1) * d / 2],
                                        &pack_nibbles(&nib[t * d..(t + 1) * d])[..],
                                        "kivi key codes"
                                    );
                                }
                            }
                        } else {
                            let m = MatrixRef::new("v", &flat[blk0 * row..(blk0 + BLOCK) * row], BLOCK, row).unwrap();
                            let q = quantize_kv_per_token(&m, kvl, KvDtype::Int4).unwrap();
                            for t in 0..BLOCK {
                                for h in 0..nkv {
                                    let i = tok(b, blk0 + t, h);
                                    let j = t * nkv + h;
                                    assert_eq!(
                                        &cache.bytes()[i * d / 2..(i + 1) * d / 2],
                                        &q.codes[j * d / 2..(j + 1) * d / 2],
                                        "kivi value codes"
                                    );
                                    assert_eq!(
                                        (read_f32(scales, i), zeros.bytes()[i]),
                                        (q.scales[j], q.zeros[j]),
                                        "kivi value params"
                                    );
                                }
                            }
                            deq[blk0 * row..(blk0 + BLOCK) * row].copy_from_slice(&q.dequantize());
                        }
                    }
                    // Residual tokens stay f16, in the sequence's residual block.
                    let res = if is_key { &c.res_k } else { &c.res_v };
                    for (t, src_t) in src.iter().enumerate().skip(full) {
                        for h in 0..nkv {
                            let off = ((b * nkv + h) * BLOCK + t % BLOCK) * d;
                            assert_eq!(
                                from_act(Act::F16, &res.bytes()[2 * off..2 * (off + d)]),
                                src_t[h * d..(h + 1) * d]
                            );
                        }
                    }
                    out.extend(deq);
                }
            }
        }
        e.k_hat.push(k_hat);
        e.v_hat.push(v_hat);
    }
    e
}

fn run_case<D: Device>(dev: &D, kind: Kind, head_dim: usize) {
    let s = setup(head_dim, 7 + head_dim as u64);
    let l = s.layout;
    let cache = Cache::new(dev, kind, &l);
    let table = up(dev, &i32_bytes(&s.table));
    fill(dev, kind, &s, &cache, &table);
    let expect = check_cache(kind, &s, &cache.download(dev));

    let (q, qbytes) = to_act(Act::F16, &synthetic(99, l.batch * l.n_heads * head_dim, 1.0));
    let qb = up(dev, &qbytes);
    let out_buf = out(dev, qbytes.len());
    let lens = up(dev, &i32_bytes(&SEQ_LENS.map(|x| x as i32)));
    let scale = 1.0 / (head_dim as f32).sqrt();
    run(dev, attn_decode(cache.view(kind), l, &qb, &out_buf, &table, &lens, scale).unwrap());
    let got = from_act(Act::F16, &fetch(dev, &out_buf, "out"));

    // Reference: GQA expanded to one kv head per query head, then quantfleet-quant's f64 attention.
    let group = l.n_heads / l.n_kv_heads;
    let qrow = l.n_heads * head_dim;
    let mut want = Vec::new();
    let mut budget = Vec::new();
    for (b, &len) in SEQ_LENS.iter().enumerate() {
        let expand = |x: &[f32]| -> Vec<f32> {
            (0..len)
                .flat_map(|t| {
                    (0..l.n_heads).flat_map(move |h| {
                        x[t * l.n_kv_heads * head_dim + (h / group) * head_dim..][..head_dim].to_vec()
                    })
                })
                .collect()
        };
        let (ke, ve) = (expand(&expect.k_hat[b]), expand(&expect.v_hat[b]));
        let layout = KvLayout { n_heads: l.n_heads, head_dim };
        let r = attention_reference(&q[b * qrow..(b + 1) * qrow], &ke, &ve, layout).unwrap();
        let vmax = ve.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        want.extend(r.iter().map(|&x| x as f64));
        // fp32 softmax and accumulation over `len` tokens vs f64: a few ulps of the largest value.
        budget.extend(std::iter::repeat_n(vmax * 2f64.powi(-20) * (len as f64).sqrt().max(1.0), r.len()));
    }
    assert_close(&format!("attn {kind:?} d{head_dim}"), &got, &want, out_eps(Act::F16), &budget);
}

fn attention_f16_cache<D: Device>(dev: &D) {
    run_case(dev, Kind::F16, 64);
    run_case(dev, Kind::F16, 128);
}

fn attention_fp8_cache<D: Device>(dev: &D) {
    run_case(dev, Kind::Fp8, 64);
    run_case(dev, Kind::Fp8, 128);
}

fn attention_int4_kivi_cache<D: Device>(dev: &D) {
    run_case(dev, Kind::Kivi, 64);
    run_case(dev, Kind::Kivi, 128);
}

fn attention_refuses_bad_layouts<D: Device>(dev: &D) {
    let s = setup(64, 1);
    let mut l = s.layout;
    let buf = out(dev, 1 << 20);
    let view = || KvCache::F16 { k: &buf, v: &buf };
    l.head_dim = 96;
    assert!(attn_decode(view(), l, &buf, &buf, &buf, &buf, 0.1).unwrap_err().to_string().contains("head_dim"));
    l.head_dim = 64;
    l.n_kv_heads = 3;
    assert!(attn_decode(view(), l, &buf, &buf, &buf, &buf, 0.1).is_err());
    l.n_kv_heads = 1;
    let err = attn_decode(view(), l, &buf, &buf, &buf, &buf, 0.1).unwrap_err().to_string();
    assert!(err.contains("16 query heads per kv head"), "{err}");
    l.n_kv_heads = 2;
    let small = out(dev, 8);
    let err = attn_decode(view(), l, &small, &buf, &buf, &buf, 0.1).unwrap_err().to_string();
    assert!(err.contains("`q`") && small.byte_len() == 8, "{err}");
}

device_tests!(attention_f16_cache, attention_fp8_cache, attention_int4_kivi_cache, attention_refuses_bad_layouts);
