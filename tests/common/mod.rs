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

/// Whether this backend holds matrices as Burn tensors (a GPU backend) and computes in f16:
/// where `--dtype f16` keeps the matrices in f16 and the half-precision parity checks run.
#[allow(dead_code)]
pub fn gpu_f16() -> bool {
    !matches!(kiln::backend::NAME, "flex" | "ndarray")
        && <B as burn::tensor::backend::Backend>::supports_dtype(
            &device(),
            burn::tensor::DType::F16,
        )
}

/// How far HF transformers' own f16 forward is from its f32 reference on a fixture: max |Δ| of
/// the logits (prefill and cached steps for decoder-only models, teacher-forced for
/// encoder-decoders) and of the encoder states. Measured with `tools/hf_half_precision.py`
/// (transformers 5.23, torch 2.15, CPU). kiln with `--dtype f16` on a GPU backend (matrices in
/// f16, activations in f32) must be at least as close to the f32 reference as this.
#[allow(dead_code)]
pub fn hf_f16_deviation(name: &str) -> HalfDeviation {
    let (logits, encoder) = match name {
        "llama2-mha" => (2.636e-2, None),
        "llama3-gqa" | "llama3-gqa-oldconfig" => (3.679e-2, None),
        "llama-tied" => (4.094e-2, None),
        "yi" => (2.806e-2, None),
        "mistral-sw" => (2.590e-2, None),
        "llama2-bf16" => (2.569e-2, None),
        "llama3-sharded" => (2.691e-2, None),
        "nllb-tiny" => (9.030e-2, Some(1.246e-2)),
        "t5-relu-tied" => (3.820e-1, Some(6.686e-2)),
        "t5v11-gated-untied" => (9.064e-2, Some(1.095e-2)),
        "t5v11-gated-tied-noscale" => (4.833e-1, Some(1.516e-2)),
        "flan-t5-current" => (1.141e-1, Some(1.152e-2)),
        other => panic!("no f16 measurement for fixture {other}"),
    };
    HalfDeviation { logits, encoder }
}

/// See [`hf_f16_deviation`].
#[allow(dead_code)]
pub struct HalfDeviation {
    /// Max |Δlogit|.
    pub logits: f32,
    /// Max |Δ| of the encoder's last hidden states (encoder-decoders).
    pub encoder: Option<f32>,
}

/// An encoder-decoder fixture's encoder states and its teacher-forced logits fed one cached
/// step at a time, against HF's (`encoder_hidden`, `decoder_logits`): the max |Δ| of each.
pub fn seq2seq_deviation<D, M>(model: &M, reference: &Reference) -> Seq2SeqDeviation
where
    D: burn::tensor::backend::Backend,
    M: kiln::core::seq2seq::Seq2SeqLm<D>,
{
    use burn::tensor::{Int, Tensor, TensorData};
    let device = model.device();
    let tokens = |ids: &[u32]| {
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        Tensor::<D, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device)
    };
    let host = |t: Tensor<D, 3>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let (_, input) = reference.ids("input_ids");
    let (_, expected_hidden) = reference.f32("encoder_hidden");
    let (_, dec_in) = reference.ids("decoder_input_ids");
    let (lshape, expected_logits) = reference.f32("decoder_logits");

    let encoded = model.encode(tokens(&input), None);
    let encoder = max_abs_diff(&host(encoded.hidden.clone()), &expected_hidden);
    let mut cache = model.new_decoder_cache(&encoded);
    let mut cached_logits: f32 = 0.0;
    for (i, expected) in expected_logits.chunks_exact(lshape[1]).enumerate() {
        let step = host(model.decode_step(tokens(&dec_in[i..i + 1]), &mut cache));
        cached_logits = cached_logits.max(max_abs_diff(&step, expected));
    }
    Seq2SeqDeviation {
        encoder,
        cached_logits,
    }
}

/// See [`seq2seq_deviation`].
pub struct Seq2SeqDeviation {
    /// Max |Δ| of the encoder's last hidden states.
    pub encoder: f32,
    /// Max |Δlogit| over the cached decode steps.
    pub cached_logits: f32,
}

impl Seq2SeqDeviation {
    /// Prints the encoder deviation and asserts both bounds, naming `fixture`.
    pub fn assert_within(&self, fixture: &str, encoder: f32, cached_logits: f32) {
        println!("{fixture}: encoder max |Δ| = {:e}", self.encoder);
        assert!(
            self.encoder <= encoder,
            "{fixture}: encoder hidden differs by {}",
            self.encoder
        );
        assert!(
            self.cached_logits <= cached_logits,
            "{fixture}: cached step logits differ by {}",
            self.cached_logits
        );
    }
}
