//! Memory before trust: a file that claims an absurd size (a string, array or tensor larger
//! than the file, a config whose dimensions would take terabytes) is a clear error, and the
//! loader allocates little before saying so (measured with a counting global allocator).

use std::path::Path;

use crate::common::{B, device, fixture};
use crate::fuzzing::peak_during;
use kiln_gguf::GgufFile;

/// At most this much may be allocated while rejecting a file.
const SMALL: usize = 16 << 20;

/// A GGUF v3 file from parts: header counts, raw metadata bytes, raw tensor-info bytes.
fn gguf(n_tensors: u64, n_kv: u64, kv: &[u8], infos: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(kv);
    b.extend(infos);
    b.resize(b.len().next_multiple_of(32) + 64, 0);
    b
}

fn string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = string(key);
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

fn gguf_rejected(what: &str, bytes: Vec<u8>) {
    let (result, peak) = peak_during(|| GgufFile::from_bytes("absurd.gguf", bytes));
    let err = result.err().unwrap_or_else(|| panic!("{what}: loaded"));
    assert!(err.to_string().contains("absurd.gguf"), "{what}: {err}");
    assert!(
        peak < SMALL,
        "{what}: {peak} bytes allocated before the error"
    );
}

#[test]
fn gguf_claims() {
    gguf_rejected("metadata count 2^62", gguf(0, 1 << 62, &[], &[]));
    gguf_rejected("tensor count 2^62", gguf(1 << 62, 0, &[], &[]));
    // A string value of 2^40 bytes.
    let mut len = (1u64 << 40).to_le_bytes().to_vec();
    len.extend(b"abc");
    gguf_rejected(
        "string length",
        gguf(0, 1, &kv("general.name", 8, &len), &[]),
    );
    // Arrays of 2^40 u32s and of 2^40 strings (a vocabulary).
    for (elem, what) in [(4u32, "u32 array"), (8u32, "string array")] {
        let mut v = elem.to_le_bytes().to_vec();
        v.extend((1u64 << 40).to_le_bytes());
        v.extend([0u8; 16]);
        gguf_rejected(what, gguf(0, 1, &kv("tokenizer.ggml.tokens", 9, &v), &[]));
    }
    // A tensor of 2^32 x 2^32 x 2^32 x 2^32 elements (the product overflows u64).
    let mut info = string("blk.0.attn_q.weight");
    info.extend(4u32.to_le_bytes());
    for _ in 0..4 {
        info.extend((1u64 << 32).to_le_bytes());
    }
    info.extend(0u32.to_le_bytes());
    info.extend(0u64.to_le_bytes());
    gguf_rejected("tensor dims", gguf(1, 0, &[], &info));
    // A plausible 2^20 x 2^20 f32 tensor (4 TiB) in a file of a few bytes.
    let mut info = string("token_embd.weight");
    info.extend(2u32.to_le_bytes());
    info.extend((1u64 << 20).to_le_bytes());
    info.extend((1u64 << 20).to_le_bytes());
    info.extend(0u32.to_le_bytes());
    info.extend(0u64.to_le_bytes());
    gguf_rejected("tensor past the end", gguf(1, 0, &[], &info));
}

fn safetensors_rejected(what: &str, bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let (result, peak) =
        peak_during(|| kiln::core::loading::SafetensorsWeights::open_dir(dir.path()));
    let err = result.err().unwrap_or_else(|| panic!("{what}: opened"));
    assert!(
        err.to_string().contains("model.safetensors"),
        "{what}: {err}"
    );
    assert!(
        peak < SMALL,
        "{what}: {peak} bytes allocated before the error"
    );
}

#[test]
fn safetensors_claims() {
    // A header of 2^60 bytes.
    let mut b = (1u64 << 60).to_le_bytes().to_vec();
    b.extend(b"{}");
    safetensors_rejected("header length", &b);
    // A 2^31 x 2^31 tensor whose data is 16 bytes.
    let header = br#"{"w":{"dtype":"F32","shape":[2147483648,2147483648],"data_offsets":[0,16]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 16]);
    safetensors_rejected("shape vs data", &b);
    // Offsets past the end of the file.
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1099511627776]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 16]);
    safetensors_rejected("offsets", &b);
}

/// A config whose sizes would take terabytes, with the fixture's real (small) weights.
fn config_rejected(name: &str, field: &str, value: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[field] = value.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let (result, peak) = peak_during(|| load(dir));
    assert!(
        peak < SMALL,
        "{name} {field}: {peak} bytes allocated ({result:?})"
    );
    // Sizes that set only a bound (the context length) load; nothing is allocated from them.
    if field == "max_position_embeddings" {
        return;
    }
    let err = result
        .err()
        .unwrap_or_else(|| panic!("{name} {field}: loaded"));
    assert!(
        err.contains(field) || err.contains("config implies"),
        "{name} {field}: {err}"
    );
}

macro_rules! config_claims {
    ($($test:ident: $name:literal $field:literal $value:expr;)*) => {$(
        #[test]
        fn $test() {
            config_rejected($name, $field, $value);
        }
    )*};
}

config_claims! {
    llama_vocab: "llama2-mha" "vocab_size" 1 << 40;
    llama_hidden: "llama2-mha" "hidden_size" 1 << 40;
    llama_intermediate: "llama2-mha" "intermediate_size" 1 << 40;
    llama_positions: "llama2-mha" "max_position_embeddings" 1 << 40;
    llama_layers: "llama2-mha" "num_hidden_layers" 1 << 30;
    llama_heads: "llama2-mha" "num_attention_heads" 1 << 30;
    t5_d_model: "t5-relu-tied" "d_model" 1 << 40;
    t5_layers: "t5-relu-tied" "num_layers" 1 << 30;
    t5_buckets: "t5-relu-tied" "relative_attention_num_buckets" 1 << 40;
    m2m100_positions: "nllb-tiny" "max_position_embeddings" 1 << 40;
    m2m100_d_model: "nllb-tiny" "d_model" 1 << 40;
    m2m100_vocab: "nllb-tiny" "vocab_size" 1 << 40;
}

fn load(dir: &Path) -> Result<(), String> {
    let spec = dir.to_str().unwrap();
    let device = device();
    let seq2seq = matches!(
        kiln::auto::model_type(spec).as_deref(),
        Ok("t5") | Ok("m2m_100")
    );
    let result = if seq2seq {
        kiln::auto::load_seq2seq::<B>(spec, &device).map(|_| ())
    } else {
        kiln::auto::load::<B>(spec, &device).map(|_| ())
    };
    result.map_err(|e| e.to_string())
}
