//! Writing GGUF files: what kiln's tests and the random-weight benchmark checkpoints use.
//!
//! The inverse of [`crate::GgufFile`]'s parser, for files kiln makes itself (small test
//! fixtures, random weights at real shapes); it trusts its input.

use crate::{GgmlType, Value};

/// A tensor to write: name, ggml dims (`ne`, innermost first), type, raw data.
pub struct TensorSpec {
    /// Tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dims, innermost first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Raw data, whole blocks.
    pub data: Vec<u8>,
}

/// Writes a GGUF file (little-endian, version `version`) with the given metadata and tensors.
pub fn write_gguf(
    version: u32,
    kvs: &[(&str, Value)],
    tensors: &[TensorSpec],
    alignment: u64,
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        b.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(alignment) * alignment;
    }
    while !(b.len() as u64).is_multiple_of(alignment) {
        b.push(0);
    }
    let data_start = b.len() as u64;
    for (t, off) in tensors.iter().zip(offsets) {
        while (b.len() as u64) < data_start + off {
            b.push(0);
        }
        b.extend_from_slice(&t.data);
    }
    b
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    v.value_type().id()
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Array { elem_type, items } => {
            b.extend_from_slice(&elem_type.id().to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, i);
            }
        }
    }
}

/// What llama.cpp's `llama-quantize … Q4_K_M` (without an importance matrix) picks for a 2-D
/// tensor of `cols` columns in a model of `n_layers` blocks: Q6_K for the output and
/// embedding matrices and for `attn_v`/`ffn_down` in the layers its `use_more_bits` names (the
/// first and last eighth, and every third between), Q4_K for the other matrices. (llama.cpp
/// gives the embedding Q6_K only when it is also the output, tied, as in SmolLM2; a decode step
/// reads one row of it either way.) Where `cols` is not a whole number of 256-value
/// super-blocks, llama.cpp's fallback (`convert_incompatible_tensor`): Q5_0 for Q4_K, Q8_0
/// for Q6_K. Always `Some` (an `Option` for [`requantize`]'s `pick`).
pub fn q4_k_m_type(name: &str, cols: usize, n_layers: usize) -> Option<GgmlType> {
    let k_type = q4_k_m_k_type(name, n_layers);
    if cols.is_multiple_of(256) {
        return Some(k_type);
    }
    Some(match k_type {
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::Q5_0,
    })
}

/// [`q4_k_m_type`] before the fallback for widths that are not whole super-blocks.
fn q4_k_m_k_type(name: &str, n_layers: usize) -> GgmlType {
    if name == "token_embd.weight" || name == "output.weight" {
        return GgmlType::Q6_K;
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let more_bits = |i: usize| {
        i < n_layers / 8
            || i >= 7 * n_layers / 8
            // i ≥ n_layers/8 here, as `||` got this far.
            || (i - n_layers / 8) % 3 == 2
    };
    match layer {
        Some(i) if (name.contains(".attn_v.") || name.contains(".ffn_down.")) && more_bits(i) => {
            GgmlType::Q6_K
        }
        _ => GgmlType::Q4_K,
    }
}

/// Rewrites `file` with the 2-D tensors `pick` names a type for dequantised and quantised to
/// it ([`crate::quantize`]); the metadata and every other tensor are copied as stored, except
/// `general.file_type` (llama.cpp's "mostly Q4_1" and so on), which is dropped once a tensor
/// changes type: it would name the old mix, and readers such as llama.cpp guess the mix from
/// the tensors without it. `pick` gets the GGUF tensor name, `[rows, cols]` and the stored
/// type.
pub fn requantize(
    file: &crate::GgufFile,
    pick: impl Fn(&str, [usize; 2], GgmlType) -> Option<GgmlType>,
) -> crate::Result<Vec<u8>> {
    let mut specs = Vec::new();
    let mut changed = false;
    for info in file.tensors() {
        let name = info.name();
        let stored = file.tensor_bytes(name)?;
        let target = match info.shape().as_slice() {
            [rows, cols] => pick(name, [*rows, *cols], info.ggml_type()),
            _ => None,
        };
        let (ggml_type, data) = match target {
            Some(t) if t != info.ggml_type() => {
                changed = true;
                let (_, values) = file.tensor_f32(name)?;
                (t, crate::quantize(t, &values)?)
            }
            _ => (info.ggml_type(), stored.to_vec()),
        };
        file.release_tensor(name);
        specs.push(TensorSpec {
            name: name.to_string(),
            dims: info.dims().to_vec(),
            ggml_type,
            data,
        });
    }
    let kvs: Vec<(&str, Value)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| !(changed && k == "general.file_type"))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    Ok(write_gguf(file.version(), &kvs, &specs, file.alignment()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    #[test]
    fn q4_k_m_picks_as_llama_cpp_does() {
        // 24 layers: more bits in 0..3, 21..24, and 3 + 2, 3 + 5, ...
        let t = |name: &str| q4_k_m_type(name, 512, 24);
        assert_eq!(t("token_embd.weight"), Some(GgmlType::Q6_K));
        assert_eq!(t("blk.0.ffn_down.weight"), Some(GgmlType::Q6_K));
        assert_eq!(t("blk.3.ffn_down.weight"), Some(GgmlType::Q4_K));
        assert_eq!(t("blk.5.attn_v.weight"), Some(GgmlType::Q6_K));
        assert_eq!(t("blk.5.attn_q.weight"), Some(GgmlType::Q4_K));
        assert_eq!(t("blk.22.ffn_down.weight"), Some(GgmlType::Q6_K));
        // Widths that are not whole super-blocks: llama.cpp's fallbacks.
        let t = |name: &str| q4_k_m_type(name, 576, 24);
        assert_eq!(t("blk.0.ffn_down.weight"), Some(GgmlType::Q8_0));
        assert_eq!(t("blk.3.ffn_down.weight"), Some(GgmlType::Q5_0));
        assert_eq!(t("token_embd.weight"), Some(GgmlType::Q8_0));
    }

    #[test]
    fn requantize_rewrites_the_picked_matrices_and_copies_the_rest() {
        let w: Vec<f32> = (0..2 * 256)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensors = [
            TensorSpec {
                name: "blk.0.ffn_up.weight".into(),
                dims: vec![256, 2],
                ggml_type: GgmlType::F32,
                data: f32_bytes(&w),
            },
            TensorSpec {
                name: "blk.0.ffn_norm.weight".into(),
                dims: vec![256],
                ggml_type: GgmlType::F32,
                data: f32_bytes(&w[..256]),
            },
        ];
        // llama.cpp's `LLAMA_FTYPE_ALL_F32` (0): stale once a matrix is Q4_K.
        let kvs = [
            ("general.name", Value::String("t".into())),
            ("general.file_type", Value::U32(0)),
        ];
        let file = GgufFile::from_bytes("t.gguf", write_gguf(3, &kvs, &tensors, 32)).unwrap();
        // Nothing changes type: everything is copied, the file type included.
        let same = requantize(&file, |_, _, _| None).unwrap();
        let same = GgufFile::from_bytes("same.gguf", same).unwrap();
        assert_eq!(same.metadata(), file.metadata());
        let out = requantize(&file, |_, [_, cols], _| q4_k_m_type("x", cols, 1)).unwrap();
        let out = GgufFile::from_bytes("out.gguf", out).unwrap();
        let up = out.tensor_info("blk.0.ffn_up.weight").unwrap();
        assert_eq!((up.ggml_type(), up.shape()), (GgmlType::Q4_K, vec![2, 256]));
        let (_, back) = out.tensor_f32("blk.0.ffn_up.weight").unwrap();
        assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.1));
        let norm = out.tensor_info("blk.0.ffn_norm.weight").unwrap();
        assert_eq!(norm.ggml_type(), GgmlType::F32);
        assert_eq!(out.tensor_f32("blk.0.ffn_norm.weight").unwrap().1, w[..256]);
        assert_eq!(out.metadata(), &file.metadata()[..1]);
        assert!(out.get("general.file_type").is_none());
    }
}
