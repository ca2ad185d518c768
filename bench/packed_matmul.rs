//! Speed of kiln's host kernels (`kiln_core::packed`) alone, without a model around them: for
//! each storage format and activation row count, the time of `x · Wᵀ` and the weight bytes it
//! streams per second. Used to choose `MATVEC_MAX_ROWS` and to see how far the matrix-vector
//! kernels are from the machine's read bandwidth.
//!
//! ```text
//! cargo run --release --example packed_matmul -- --rows 5632 --cols 2048
//! cargo run --release --example packed_matmul -- --rows 49152 --cols 576 --m 1
//! cargo run --release --example packed_matmul -- --rows 49152 --cols 4096 --m 1 --vecmat \
//!     --activations f32 --formats f32,f16,bf16,q8_0    # DeePEn's dense relative matrix
//! ```

use std::time::Instant;

use clap::Parser;
use kiln::core::packed::{ActivationPrecision, PackedFormat, PackedMatrix};

#[derive(Parser, Debug)]
struct Args {
    /// Output features (weight rows).
    #[arg(long, default_value_t = 5632)]
    rows: usize,
    /// Input features (weight columns, a multiple of 32; of 256 for the K-quants).
    #[arg(long, default_value_t = 2048)]
    cols: usize,
    /// Activation row counts to time.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,9,16,32,128")]
    m: Vec<usize>,
    /// Timed calls per case (the best is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Activations of the block formats: f32, q8 (8-bit, as llama.cpp), or both.
    #[arg(long, value_delimiter = ',', default_value = "f32,q8")]
    activations: Vec<ActivationPrecision>,
    /// Formats to time (default: all).
    #[arg(long, value_delimiter = ',')]
    formats: Vec<String>,
    /// Also time `x · W` (`PackedMatrix::vecmat`, DeePEn's `p · R`) for one vector over the rows,
    /// and `matvec_softmax_vecmat` (a search step: `R · g`, softmax, `p · R` in one pass).
    #[arg(long)]
    vecmat: bool,
}

fn main() {
    let args = Args::parse();
    let values: Vec<f32> = (0..args.rows * args.cols)
        .map(|i| ((i as f32) * 0.618).sin() * 0.05)
        .collect();
    for format in PackedFormat::ALL {
        if !args.formats.is_empty() && !args.formats.iter().any(|f| f == format.name()) {
            continue;
        }
        let block = format.block_len() > 1;
        for &act in &args.activations {
            // Float weights always take f32 activations.
            if !block && act != ActivationPrecision::F32 {
                continue;
            }
            let w = PackedMatrix::from_f32(args.rows, args.cols, &values, format)
                .unwrap()
                .with_activations(act);
            if args.vecmat && act == ActivationPrecision::F32 {
                // A distribution with no zero entries: every row is read.
                let x: Vec<f32> = (0..args.rows).map(|i| 1.0 + (i % 7) as f32).collect();
                std::hint::black_box(w.vecmat(&x));
                let mut best = f64::INFINITY;
                for _ in 0..args.repeats {
                    let t = Instant::now();
                    std::hint::black_box(w.vecmat(&x));
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{format:>5}     {}x{} vecmat {:8.3} ms  {:6.1} GB/s of weights",
                    args.rows,
                    args.cols,
                    best * 1e3,
                    w.byte_len() as f64 / best / 1e9
                );
                // DeePEn's search step: `R · g`, a logit per row, `softmax(z) · R` in one pass.
                // Logits of spread ~6: no softmax weight underflows, so every row is added.
                let g: Vec<f32> = (0..args.cols).map(|i| (i as f32 * 0.1).cos()).collect();
                let mut z: Vec<f32> = (0..args.rows).map(|i| (i % 7) as f32).collect();
                let step = |z: &mut Vec<f32>| {
                    w.matvec_softmax_vecmat(
                        &g,
                        z,
                        None,
                        |_| true,
                        |_, y, z| {
                            *z = 0.5 * *z + 1e-3 * y.unwrap_or(0.0);
                            *z
                        },
                    )
                };
                std::hint::black_box(step(&mut z));
                let mut best = f64::INFINITY;
                for _ in 0..args.repeats {
                    let t = Instant::now();
                    std::hint::black_box(step(&mut z));
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{format:>5}     {}x{} matvec+softmax+vecmat {:8.3} ms  {:6.1} GB/s of weights",
                    args.rows,
                    args.cols,
                    best * 1e3,
                    w.byte_len() as f64 / best / 1e9
                );
            }
            for &m in &args.m {
                let x: Vec<f32> = (0..m * args.cols).map(|i| (i as f32 * 0.1).cos()).collect();
                std::hint::black_box(w.matmul_t(&x, m));
                let mut best = f64::INFINITY;
                for _ in 0..args.repeats {
                    let t = Instant::now();
                    std::hint::black_box(w.matmul_t(&x, m));
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let gflops = 2.0 * (m * args.rows * args.cols) as f64 / best / 1e9;
                println!(
                    "{format:>5} {:>3} {}x{} m={m:<4} {:8.3} ms  {:6.1} GB/s of weights  {gflops:6.1} GFLOP/s",
                    if block {
                        format!("{act:?}").to_lowercase()
                    } else {
                        String::new()
                    },
                    args.rows,
                    args.cols,
                    best * 1e3,
                    w.byte_len() as f64 / best / 1e9
                );
            }
        }
    }
}
