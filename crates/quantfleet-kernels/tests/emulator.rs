//! The emulator's CUDA semantics, checked with the selftest kernels (kernels/common/selftest.cu) against
//! what the CUDA programming guide specifies: barriers, shuffles with their out-of-range rules, votes,
//! atomics, and a divergent full-mask shuffle reported as an error instead of hanging.

use quantfleet_kernels::emu::{EmuBuffer, EmuRunner};
use quantfleet_kernels::launch::{DeviceBuffer, KernelArg, Launch, LaunchConfig, Runner};

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn launch(kernel: &'static str, grid: u32, block: u32, args: Vec<KernelArg>) -> quantfleet_kernels::Result<()> {
    let config = LaunchConfig { grid: [grid, 1, 1], block: [block, 1, 1], shared_mem_bytes: 0 };
    EmuRunner.launch(&Launch { module: "selftest", kernel, config, args })
}

#[test]
fn syncthreads_is_a_block_barrier() {
    let (grid, block) = (3u32, 96u32);
    let input: Vec<u32> = (0..grid * block).map(|i| i * 7 + 1).collect();
    let (inb, out) = (EmuBuffer::from_bytes(&bytes(&input)), EmuBuffer::poisoned(input.len() * 4));
    launch(
        "selftest_block_reverse",
        grid,
        block,
        vec![KernelArg::Ptr(inb.device_addr()), KernelArg::Ptr(out.device_addr())],
    )
    .unwrap();
    let got = u32s(out.bytes());
    for b in 0..grid as usize {
        for t in 0..block as usize {
            assert_eq!(got[b * 96 + t], input[b * 96 + 95 - t]);
        }
    }
}

#[test]
fn warp_shuffles_and_votes_follow_cuda_rules() {
    let block = 64u32;
    let input: Vec<u32> = (0..block).map(|i| (i * 37 + 11) % 101).collect();
    let threshold = 50;
    let (inb, out) = (EmuBuffer::from_bytes(&bytes(&input)), EmuBuffer::poisoned(input.len() * 6 * 4));
    let args = vec![KernelArg::Ptr(inb.device_addr()), KernelArg::Ptr(out.device_addr()), KernelArg::U32(threshold)];
    launch("selftest_warp_ops", 1, block, args).unwrap();
    let got = u32s(out.bytes());
    for i in 0..block as usize {
        let (w, lane) = (i / 32 * 32, i % 32);
        let warp = &input[w..w + 32];
        let o = &got[i * 6..i * 6 + 6];
        assert_eq!(o[0], warp[lane ^ 1], "xor, thread {i}");
        assert_eq!(o[1], if lane + 3 < 32 { warp[lane + 3] } else { warp[lane] }, "down keeps own value past the end");
        assert_eq!(o[2], if lane >= 2 { warp[lane - 2] } else { warp[lane] }, "up keeps own value below 0");
        assert_eq!(o[3], warp[31 - lane], "indexed");
        let ballot = warp.iter().enumerate().fold(0u32, |m, (l, v)| m | ((v & 1) << l));
        assert_eq!(o[4], ballot, "ballot");
        let any = warp.iter().any(|&v| v > threshold) as u32;
        let all = warp.iter().all(|&v| v > threshold) as u32;
        assert_eq!(o[5], any | (all << 1), "any/all");
    }
}

#[test]
fn atomics_count_every_thread() {
    let (counter, fsum) = (EmuBuffer::from_bytes(&[0; 4]), EmuBuffer::from_bytes(&0f32.to_le_bytes()));
    launch("selftest_atomics", 5, 200, vec![KernelArg::Ptr(counter.device_addr()), KernelArg::Ptr(fsum.device_addr())])
        .unwrap();
    assert_eq!(u32s(counter.bytes()), vec![1000]);
    assert_eq!(f32::from_le_bytes(fsum.bytes().try_into().unwrap()), 500.0);
}

#[test]
fn divergent_full_mask_shuffle_is_reported() {
    let out = EmuBuffer::poisoned(4 * 32);
    let err =
        launch("selftest_partial_shuffle", 1, 32, vec![KernelArg::Ptr(out.device_addr())]).unwrap_err().to_string();
    assert!(err.contains("deadlock") && err.contains("__shfl_sync"), "{err}");
}
