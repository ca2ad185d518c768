//! Helpers shared by the integration tests: locating real data, and writing small GGUF files.
#![allow(dead_code)]

use std::path::PathBuf;

use kiln_gguf::Value;

/// The project's `shared/` folder (real tokenizer files), if it can be found:
/// `$KILN_SHARED_DIR`, or `shared/` beside or inside the checkout.
pub fn shared_dir() -> Option<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("KILN_SHARED_DIR") {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(manifest.join("../../shared"));
    candidates.push(manifest.join("../../../shared"));
    candidates.push(PathBuf::from("/work/shared"));
    candidates
        .into_iter()
        .find(|p| p.join("tokenizers").is_dir())
}

/// A file under `shared/tokenizers/`, or `None` (with a note on stderr) when absent.
pub fn shared_tokenizer_file(rel: &str) -> Option<PathBuf> {
    let Some(dir) = shared_dir() else {
        eprintln!("SKIP: shared/ not found (set KILN_SHARED_DIR); cannot use {rel}");
        return None;
    };
    let p = dir.join("tokenizers").join(rel);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: {} is missing", p.display());
        None
    }
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), if present: `$KILN_SMOLLM2_GGUF`, or where
/// `tools/fetch_smollm2.sh` puts it. `None` (with the reason on stderr) otherwise.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("KILN_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("KILN_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")));
            let Some(cache) = cache else {
                eprintln!("SKIP: neither KILN_SMOLLM2_GGUF, KILN_CACHE nor HOME is set");
                return None;
            };
            cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIP: {} not found; run tools/fetch_smollm2.sh (or set KILN_SMOLLM2_GGUF) to run this test",
            path.display()
        );
        None
    }
}

#[allow(unused_imports)] // not every test binary writes files
pub use kiln_gguf::writer::{TensorSpec, write_gguf};

/// `Value::Array` of strings.
pub fn str_array(items: &[&str]) -> Value {
    Value::Array {
        elem_type: kiln_gguf::ValueType::String,
        items: items.iter().map(|s| Value::String(s.to_string())).collect(),
    }
}

/// `Value::String`.
pub fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// Reads a little-endian f32 file.
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The directory of the committed fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
