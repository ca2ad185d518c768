//! Prints a GGUF file's metadata and tensors; with `--dequant`, dequantises every tensor and
//! reports how long it took.
//!
//! ```text
//! cargo run --release -p kiln-gguf --example gguf_info -- FILE.gguf [--dequant]
//! ```

use std::time::Instant;

use kiln_gguf::{GgufFile, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: gguf_info FILE.gguf [--dequant]");
        std::process::exit(2);
    };
    let dequant = args.any(|a| a == "--dequant");

    let start = Instant::now();
    let f = GgufFile::open(&path)?;
    println!(
        "{path}: GGUF v{}, {} metadata keys, {} tensors, alignment {}, data at {} (parsed in {:.2?})",
        f.version(),
        f.metadata().len(),
        f.tensors().len(),
        f.alignment(),
        f.data_offset(),
        start.elapsed()
    );
    for (k, v) in f.metadata() {
        let shown = match v {
            Value::Array { items, .. } if items.len() > 8 => v.describe(),
            Value::String(s) if s.len() > 80 => v.describe(),
            other => format!("{other:?}"),
        };
        println!("  {k} = {shown}");
    }
    for t in f.tensors().iter().take(12) {
        println!(
            "  {:<28} {:>6} {:?}",
            t.name(),
            t.ggml_type().name(),
            t.shape()
        );
    }
    if f.tensors().len() > 12 {
        println!("  … {} more tensors", f.tensors().len() - 12);
    }
    match f.llama_metadata() {
        Ok(m) => println!("{m:#?}"),
        Err(e) => println!("no Llama metadata: {e}"),
    }

    if dequant {
        let start = Instant::now();
        let mut n = 0usize;
        for t in f.tensors() {
            n += f.tensor_f32(t.name())?.1.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "dequantised {} tensors, {n} values, in {secs:.3} s ({:.0} M values/s, {} threads)",
            f.tensors().len(),
            n as f64 / secs / 1e6,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let start = Instant::now();
        match f.tokenizer() {
            Ok(t) => println!(
                "tokenizer: {} tokens, built in {:.3} s",
                t.get_vocab_size(true),
                start.elapsed().as_secs_f64()
            ),
            Err(e) => println!("no tokenizer: {e}"),
        }
    }
    Ok(())
}
