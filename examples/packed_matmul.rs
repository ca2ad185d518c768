//! Speed of kiln's host kernels (`kiln_core::packed`) alone, without a model around them: for
//! each storage format and activation row count, the time of `x · Wᵀ` and the weight bytes it
//! streams per second. Used to choose `MATVEC_MAX_ROWS` and to see how far the matrix-vector
//! kernels are from the machine's read bandwidth.
//!
//! ```text
//! cargo run --release --example packed_matmul -- --rows 5632 --cols 2048
//! cargo run --release --example packed_matmul -- --rows 49152 --cols 576 --m 1
//! ```

use std::time::Instant;

use clap::Parser;
use kiln::core::packed::{PackedFormat, PackedMatrix};

#[derive(Parser, Debug)]
struct Args {
    /// Output features (weight rows).
    #[arg(long, default_value_t = 5632)]
    rows: usize,
    /// Input features (weight columns, a multiple of 32).
    #[arg(long, default_value_t = 2048)]
    cols: usize,
    /// Activation row counts to time.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,9,16,32,128")]
    m: Vec<usize>,
    /// Timed calls per case (the best is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
}

fn main() {
    let args = Args::parse();
    let values: Vec<f32> = (0..args.rows * args.cols)
        .map(|i| ((i as f32) * 0.618).sin() * 0.05)
        .collect();
    for format in [
        PackedFormat::F32,
        PackedFormat::F16,
        PackedFormat::BF16,
        PackedFormat::Q8_0,
        PackedFormat::Q4_1,
        PackedFormat::Q4_0,
    ] {
        let w = PackedMatrix::from_f32(args.rows, args.cols, &values, format).unwrap();
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
                "{format:>5} {}x{} m={m:<4} {:8.3} ms  {:6.1} GB/s of weights  {gflops:6.1} GFLOP/s",
                args.rows,
                args.cols,
                best * 1e3,
                w.byte_len() as f64 / best / 1e9
            );
        }
    }
}
