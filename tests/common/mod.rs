//! Shared helpers of the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

#[allow(unused_imports)] // not every test binary uses both
pub use kiln::backend::{Backend as B, device};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The real SmolLM2 GGUF that `tools/fetch_smollm2.sh` fetches, or `None` after a note on
/// stderr; with `KILN_REQUIRE_DATA` set (as `tools/test.sh` sets it) a missing file fails the
/// test instead, so CI never passes a test that did not run.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = kiln::auto::default_gguf_path();
    if path.is_file() {
        return Some(path);
    }
    let reason = format!("{} absent; run tools/fetch_smollm2.sh", path.display());
    if std::env::var_os("KILN_REQUIRE_DATA").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("KILN_REQUIRE_DATA is set and {reason}");
    }
    eprintln!("SKIP: {reason}");
    None
}

/// The tensors of a fixture's `reference.safetensors`.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let path = fixture(name).join("reference.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference has no `{name}`"));
        (t.shape().to_vec(), t.dtype(), t.data().to_vec())
    }

    /// A float tensor, flattened, with its shape.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        (
            shape,
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }

    /// An integer tensor, flattened, with its shape.
    pub fn ids(&self, name: &str) -> (Vec<usize>, Vec<u32>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        (
            shape,
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect(),
        )
    }
}

/// Largest absolute difference; panics on length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits tolerance against HF in f32.
pub const TOL: f32 = 1e-4;
