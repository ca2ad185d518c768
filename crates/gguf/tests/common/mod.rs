//! Helpers shared by the integration tests: locating real data, and writing small GGUF files.
#![allow(dead_code)]

use std::path::PathBuf;

use kiln_gguf::Value;

/// Real tokenizer files committed under `tests/data/tokenizers/` (source and licence in
/// `tests/data/README.md`).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

/// A file under `tests/data/tokenizers/`. Always `Some`: the files are part of the checkout,
/// and a missing one fails the test.
pub fn shared_tokenizer_file(rel: &str) -> Option<PathBuf> {
    let p = data_dir().join("tokenizers").join(rel);
    assert!(p.is_file(), "{} is missing from the checkout", p.display());
    Some(p)
}

/// Skips a test whose input is not here, saying why, or fails it when `KILN_REQUIRE_DATA` is
/// set (as `tools/test.sh` does), so CI never passes a test that did not run.
pub fn skip(reason: &str) {
    if std::env::var_os("KILN_REQUIRE_DATA").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("KILN_REQUIRE_DATA is set and {reason}");
    }
    eprintln!("SKIP: {reason}");
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
                skip("neither KILN_SMOLLM2_GGUF, KILN_CACHE nor HOME is set");
                return None;
            };
            cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        skip(&format!(
            "{} not found; run tools/fetch_smollm2.sh (or set KILN_SMOLLM2_GGUF) to run this test",
            path.display()
        ));
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
