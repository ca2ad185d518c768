//! What a decode step can at best reach on this machine: its read bandwidth and the bytes of
//! weights a step streams. Shared by the benchmark examples (included with `#[path]`; not an
//! example itself).

use std::time::Instant;

use burn::prelude::*;
use kiln::core::loading::PackSlot;

/// Best-of-three read bandwidth in GB/s: a parallel sum over 1 GiB of f32 on rayon's threads.
pub fn probe_bandwidth() -> f64 {
    use rayon::prelude::*;
    let data: Vec<f32> = (0..1usize << 28)
        .into_par_iter()
        .map(|i| (i & 7) as f32)
        .collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for k in 0..16 {
                        acc[k] += v[k];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        best = best.max((data.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Bytes a product with this slot's matrix streams: the packed bytes, or 4 per value when it is
/// a dense f32 tensor.
pub fn slot_bytes<B: Backend>(slot: &PackSlot<'_, B>) -> usize {
    let dense = |numel: usize| numel * std::mem::size_of::<f32>();
    match slot {
        PackSlot::Linear(l) => l.packed.as_ref().map_or_else(
            || dense(l.weight.lazy_shape().num_elements()),
            |p| p.byte_len(),
        ),
        PackSlot::Embedding(e) => e.packed.as_ref().map_or_else(
            || dense(e.weight.lazy_shape().num_elements()),
            |p| p.byte_len(),
        ),
    }
}
