//! Micro-benchmark behind a possible change to kiln's Linear layout: one TinyLlama MLP weight
//! (2048 → 5632), multiplied the way burn-nn's `Linear` does (`x · W` with `W` stored `[in, out]`,
//! which makes loading transpose every checkpoint weight) against `(W · xᵀ)ᵀ` with `W` kept in the
//! checkpoint's `[out, in]` (as candle does; no transpose at load), and `x · Wᵀ` through a
//! transposed view of that weight (flex hands the strides to gemm, no copy), for a decode step
//! (m = 1), small batches and a 128-token prefill. See bench/README.md. Measure release builds:
//! the dev profile keeps debug assertions in the dependencies and runs ~10× slower.
//!
//! ```text
//! cargo run --release --example matmul_layout
//! ```

use burn::prelude::*;
use kiln::backend::{self, Backend as B};
use std::time::Instant;

fn main() {
    let device = backend::device();
    let (inp, out) = (2048usize, 5632usize);
    let w_io = Tensor::<B, 2>::random(
        [inp, out],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        &device,
    );
    let w_oi = Tensor::<B, 2>::random(
        [out, inp],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        &device,
    );
    for m in [1usize, 4, 8, 16, 32, 64, 96, 128, 256, 512] {
        let x = Tensor::<B, 2>::random(
            [m, inp],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        for round in 0..3 {
            let t = Instant::now();
            for _ in 0..20 {
                let y = x.clone().matmul(w_io.clone());
                let _ = y.into_data();
            }
            let a = t.elapsed().as_secs_f64() / 20.0;
            let t = Instant::now();
            for _ in 0..20 {
                let y = w_oi.clone().matmul(x.clone().transpose()).transpose();
                let _ = y.into_data();
            }
            let b = t.elapsed().as_secs_f64() / 20.0;
            let t = Instant::now();
            for _ in 0..20 {
                let y = x.clone().matmul(w_oi.clone().transpose());
                let _ = y.into_data();
            }
            let c = t.elapsed().as_secs_f64() / 20.0;
            println!(
                "m={m} round {round}: x·W[in,out] {:.2} ms | (W[out,in]·xᵀ)ᵀ {:.2} ms | x·W[out,in]ᵀ {:.2} ms",
                a * 1e3,
                b * 1e3,
                c * 1e3
            );
        }
    }
}
