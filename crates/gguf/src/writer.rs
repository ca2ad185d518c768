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
