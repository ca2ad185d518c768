//! The GGUF container: header, metadata, tensor infos, data section.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::Path;

use crate::error::{GgufError, Result};
use crate::types::{GgmlType, Value, ValueType};

/// The default alignment of the data section and of every tensor in it.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Nested arrays deeper than this are rejected (llama.cpp itself reads no nested arrays at all).
const MAX_ARRAY_DEPTH: usize = 8;

/// Preallocation from counts read in the file is capped at this many items; vectors grow as
/// items are actually read, so a lying count cannot make a huge allocation.
const MAX_PREALLOC: u64 = 1 << 16;

/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    n_elements: u64,
    n_bytes: u64,
}

impl TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dimensions in ggml's order (`ne[0]` first: the innermost, contiguous one).
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// The shape in row-major order, outermost dimension first (ggml's `dims` reversed), as a
    /// PyTorch / Burn / safetensors tensor would have it. A 2-D weight of `ne = [in, out]` has
    /// shape `[out, in]`, which is the Hugging Face `nn.Linear` layout.
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension fits in usize: the tensor's byte size was checked against the file.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Offset of the data, relative to the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// Size of the data in bytes.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }
}

/// The file's bytes: memory-mapped, or owned (for [`GgufFile::from_bytes`]).
enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open GGUF file (v2 or v3): its metadata and tensor infos, parsed and checked, and its
/// data section, memory-mapped and read on demand.
pub struct GgufFile {
    path: String,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path` and parses its header, metadata and tensor infos.
    ///
    /// Every count, length and offset in the file is checked against the file size before it
    /// is used, so a corrupt or hostile file gives a [`GgufError`], never a panic or a huge
    /// allocation. Tensor data is not read here.
    ///
    /// The file must not be modified while the returned value lives (it is memory-mapped).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path_ref = path.as_ref();
        let name = path_ref.display().to_string();
        let io = |source| GgufError::Io {
            path: name.clone(),
            source,
        };
        let file = std::fs::File::open(path_ref).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and only read through `&[u8]`; as documented above,
            // the caller must not modify the file while it is mapped (the usual mmap contract).
            Bytes::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(name, bytes)
    }

    /// Parses a GGUF file held in memory. `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: String, bytes: Bytes) -> Result<Self> {
        let header = Parser::new(&path, &bytes).parse()?;
        Ok(GgufFile {
            path,
            bytes,
            version: header.version,
            metadata: header.metadata,
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    /// The file name as given to [`GgufFile::open`].
    pub fn path(&self) -> &str {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key/value pairs, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of one metadata key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of one tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data section's alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_start
    }

    /// The raw bytes of a tensor's data, as stored (quantised blocks, f16 values, …).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.lookup(name)?;
        // Both were checked against the file size in `parse`.
        let start = (self.data_start + info.offset) as usize;
        let end = start + info.n_bytes as usize;
        Ok(&self.bytes[start..end])
    }

    /// Tells the kernel that this process is done with a tensor's bytes, so the mapped pages
    /// stop counting towards its resident memory (`madvise(MADV_DONTNEED)` on the whole pages
    /// inside the tensor; a later read maps them in again from the page cache). A loader that
    /// copies tensors out one by one calls it after each, so its peak memory is the copies, not
    /// the copies plus the file. Does nothing for in-memory files or off Unix.
    pub fn release_tensor(&self, name: &str) {
        #[cfg(unix)]
        if let (Bytes::Mmap(map), Ok(info)) = (&self.bytes, self.lookup(name)) {
            const PAGE: usize = 4096;
            let start = (self.data_start + info.offset) as usize;
            let end = start + info.n_bytes as usize;
            let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if last > first {
                // Safety: the mapping is read-only and the file is not written while mapped
                // (the contract of `open`), so the dropped pages read back unchanged.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// A tensor dequantised to `f32`: its shape (row-major, outermost first, i.e. ggml's
    /// `ne` reversed; see [`TensorInfo::shape`]) and its values in that order.
    ///
    /// Large tensors are dequantised on several threads.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.lookup(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ggml_type: info.ggml_type,
            });
        }
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; info.n_elements as usize];
        crate::quant::dequantize_into(info.ggml_type, bytes, &mut out).map_err(|e| match e {
            GgufError::UnsupportedType { ggml_type, .. } => GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ggml_type,
            },
            other => other,
        })?;
        Ok((info.shape(), out))
    }

    fn lookup(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The chat template (`tokenizer.chat_template`), a Jinja string, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(Value::as_str)
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

/// Not enough bytes: `needed` at `offset`.
struct Short {
    offset: u64,
    needed: u64,
}

/// A bounds-checked little-endian cursor over the file.
struct Parser<'a> {
    path: &'a str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(path: &'a str, buf: &'a [u8]) -> Self {
        Parser { path, buf, pos: 0 }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], Short> {
        if n > self.remaining() {
            return Err(Short {
                offset: self.pos as u64,
                needed: n,
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], Short> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> std::result::Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> std::result::Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> std::result::Result<String, Short> {
        let start = self.pos;
        let len = self.u64()?;
        let bytes = self.take(len).map_err(|s| Short {
            offset: start as u64,
            needed: s.needed.saturating_add(8),
        })?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn truncated(&self, what: impl Into<String>, s: Short) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_string(),
            what: what.into(),
            offset: s.offset,
            needed: s.needed,
            file_size: self.buf.len() as u64,
        }
    }

    fn invalid(&self, what: impl Into<String>, detail: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_string(),
            what: what.into(),
            detail: detail.into(),
        }
    }

    fn parse(mut self) -> Result<Header> {
        let magic = self.buf.get(..4).unwrap_or(self.buf);
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: self.path.to_string(),
                found: magic.to_vec(),
            });
        }
        self.pos = 4;
        let version = self
            .u32()
            .map_err(|s| self.truncated("header (version)", s))?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(GgufError::UnsupportedVersion {
                    path: self.path.to_string(),
                    version,
                    hint: "GGUF v1 (32-bit lengths, August 2023) is not read; re-convert the model with a current llama.cpp",
                });
            }
            v if v.swap_bytes() <= 3 => {
                return Err(GgufError::UnsupportedVersion {
                    path: self.path.to_string(),
                    version,
                    hint: "this looks like a big-endian GGUF file; only little-endian files are read",
                });
            }
            _ => {
                return Err(GgufError::UnsupportedVersion {
                    path: self.path.to_string(),
                    version,
                    hint: "only GGUF v2 and v3 are read",
                });
            }
        }
        let n_tensors = self
            .u64()
            .map_err(|s| self.truncated("header (tensor count)", s))?;
        let n_kv = self
            .u64()
            .map_err(|s| self.truncated("header (metadata count)", s))?;

        // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info
        // at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        if n_kv.checked_mul(13).is_none_or(|n| n > self.remaining()) {
            return Err(self.invalid(
                "header",
                format!(
                    "metadata count {n_kv} cannot fit in the {} bytes left",
                    self.remaining()
                ),
            ));
        }
        if n_tensors
            .checked_mul(24)
            .is_none_or(|n| n > self.remaining())
        {
            return Err(self.invalid(
                "header",
                format!(
                    "tensor count {n_tensors} cannot fit in the {} bytes left",
                    self.remaining()
                ),
            ));
        }

        let cap = n_kv.min(MAX_PREALLOC) as usize;
        let mut metadata = Vec::with_capacity(cap);
        let mut key_index = HashMap::with_capacity(cap);
        for i in 0..n_kv {
            let key = self
                .string()
                .map_err(|s| self.truncated(format!("key of metadata entry #{i}"), s))?;
            let what = || format!("metadata key `{key}`");
            let ty = self.u32().map_err(|s| self.truncated(what(), s))?;
            let value = self.value(ty, 0, &what)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(self.invalid(what(), "duplicate key"));
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(self.invalid(
                        "metadata key `general.alignment`",
                        format!("{} is not a power of two", v.describe()),
                    ));
                }
            },
        };

        let cap = n_tensors.min(MAX_PREALLOC) as usize;
        let mut tensors = Vec::with_capacity(cap);
        let mut tensor_index = HashMap::with_capacity(cap);
        for i in 0..n_tensors {
            let name = self
                .string()
                .map_err(|s| self.truncated(format!("name of tensor info #{i}"), s))?;
            let what = || format!("tensor `{name}`");
            let n_dims = self.u32().map_err(|s| self.truncated(what(), s))?;
            if n_dims > MAX_DIMS {
                return Err(self.invalid(
                    what(),
                    format!("{n_dims} dimensions (ggml has at most {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64().map_err(|s| self.truncated(what(), s))?);
            }
            let type_id = self.u32().map_err(|s| self.truncated(what(), s))?;
            let offset = self.u64().map_err(|s| self.truncated(what(), s))?;
            let Some(ggml_type) = GgmlType::from_id(type_id) else {
                return Err(GgufError::UnknownGgmlType {
                    path: self.path.to_string(),
                    tensor: name,
                    type_id,
                });
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    self.invalid(what(), format!("element count of {dims:?} overflows"))
                })?;
            let block = ggml_type.block_size() as u64;
            let ne0 = dims.first().copied().unwrap_or(1);
            if ne0 % block != 0 {
                return Err(self.invalid(
                    what(),
                    format!(
                        "row length {ne0} is not a multiple of the {ggml_type} block size {block}"
                    ),
                ));
            }
            let n_bytes = (n_elements / block)
                .checked_mul(ggml_type.type_size() as u64)
                .ok_or_else(|| self.invalid(what(), "byte size overflows"))?;
            if offset % alignment != 0 {
                return Err(self.invalid(
                    what(),
                    format!("data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(self.invalid(what(), "duplicate tensor name"));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_elements,
                n_bytes,
            });
        }

        // The data section starts at the next multiple of the alignment.
        let header_end = self.pos as u64;
        let data_start = header_end.div_ceil(alignment).saturating_mul(alignment);
        let file_size = self.buf.len() as u64;
        let data_len = file_size.saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|end| end > data_len) {
                if t.n_bytes == 0 && t.offset <= data_len {
                    continue;
                }
                return Err(GgufError::TensorOutOfBounds {
                    path: self.path.to_string(),
                    tensor: t.name.clone(),
                    start: t.offset,
                    end: end.unwrap_or(u64::MAX),
                    data_len,
                });
            }
        }

        Ok(Header {
            version,
            metadata,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_start: data_start.min(file_size),
        })
    }

    /// Reads one value of type id `ty`.
    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        let Some(vt) = ValueType::from_id(ty) else {
            return Err(self.invalid(what(), format!("unknown value type id {ty}")));
        };
        let t = |p: &Self, s| p.truncated(what(), s);
        Ok(match vt {
            ValueType::U8 => Value::U8(self.array::<1>().map_err(|s| t(self, s))?[0]),
            ValueType::I8 => Value::I8(self.array::<1>().map_err(|s| t(self, s))?[0] as i8),
            ValueType::Bool => Value::Bool(self.array::<1>().map_err(|s| t(self, s))?[0] != 0),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::U32 => Value::U32(self.u32().map_err(|s| t(self, s))?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::U64 => Value::U64(self.u64().map_err(|s| t(self, s))?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array().map_err(|s| t(self, s))?)),
            ValueType::String => Value::String(self.string().map_err(|s| t(self, s))?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(
                        what(),
                        format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem_id = self.u32().map_err(|s| t(self, s))?;
                let Some(elem_type) = ValueType::from_id(elem_id) else {
                    return Err(
                        self.invalid(what(), format!("unknown array element type id {elem_id}"))
                    );
                };
                let count = self.u64().map_err(|s| t(self, s))?;
                if count
                    .checked_mul(elem_type.min_size())
                    .is_none_or(|n| n > self.remaining())
                {
                    return Err(self.invalid(
                        what(),
                        format!(
                            "array of {count} {elem_type} cannot fit in the {} bytes left",
                            self.remaining()
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(count.min(MAX_PREALLOC) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_id, depth + 1, what)?);
                }
                Value::Array { elem_type, items }
            }
        })
    }
}
