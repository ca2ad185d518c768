use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::TensorData;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{TensorInfo, WeightSource};
use crate::{Error, Result};

/// The safetensors files of a checkpoint (one file, or shards listed by an index json),
/// memory-mapped; headers are validated when opened, data is read one tensor at a time.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    /// Tensor name -> (file index, stored shape, dtype).
    index: BTreeMap<String, (usize, Vec<usize>, Dtype)>,
}

impl SafetensorsWeights {
    /// Opens the weights of the HF checkpoint in `dir`: `model.safetensors`, or the shards named
    /// by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open_files(&[single])
        } else if index.is_file() {
            Self::open_files(&shards_of_index(&index)?)
        } else {
            Err(Error::MissingFile {
                path: single,
                hint: format!(" (nor {})", index.display()),
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => Error::MissingFile {
                    path: path.clone(),
                    hint: String::new(),
                },
                _ => Error::Io {
                    path: path.clone(),
                    source,
                },
            })?;
            // SAFETY: the map is read-only; a file truncated underneath us is outside what any
            // mmap-based loader (safetensors, candle, burn-store) can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let parsed = SafeTensors::deserialize(&mmap).map_err(|e| Error::WeightFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for (name, view) in parsed.tensors() {
                index.insert(name, (i, view.shape().to_vec(), view.dtype()));
            }
            files.push((path.clone(), Arc::new(mmap)));
        }
        Ok(Self { files, index })
    }

    /// Drops the mapped pages of a tensor that has been copied out from this process's resident
    /// memory (`madvise(MADV_DONTNEED)` on the whole pages inside it), so that loading peaks at
    /// the converted weights, not the converted weights plus the file.
    fn release(&self, name: &str, bytes: &[u8]) {
        #[cfg(unix)]
        if let Some((file, _, _)) = self.index.get(name) {
            const PAGE: usize = 4096;
            let mmap = &self.files[*file].1;
            let start = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
            let (first, last) = (
                start.next_multiple_of(PAGE),
                (start + bytes.len()) / PAGE * PAGE,
            );
            if last > first {
                // Safety: a read-only mapping of a file not written while mapped (see `open_dir`):
                // dropped pages read back unchanged from the page cache.
                let _ = unsafe {
                    mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (name, bytes);
    }

    fn view_bytes(&self, name: &str) -> Result<(&[u8], Dtype, Vec<usize>)> {
        let (file, shape, dtype) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            files: self.describe(),
        })?;
        let (path, mmap) = &self.files[*file];
        let parsed = SafeTensors::deserialize(mmap).map_err(|e| Error::WeightFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = parsed.tensor(name).map_err(|e| Error::WeightFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // The view borrows `parsed`, which borrows the mmap; re-slice from the mmap so the
        // returned bytes live as long as `self`.
        let data = view.data();
        let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
        Ok((&mmap[start..start + data.len()], *dtype, shape.clone()))
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensors(&self) -> Vec<TensorInfo> {
        self.index
            .iter()
            .map(|(name, (_, shape, _))| TensorInfo {
                name: name.clone(),
                shape: shape.clone(),
            })
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<TensorData> {
        let (bytes, dtype, shape) = self.view_bytes(name)?;
        let error = |message| Error::TensorData {
            tensor: name.to_string(),
            file: self.file_of(name).to_path_buf(),
            message,
        };
        let values = to_finite_f32(bytes, dtype).map_err(error)?;
        self.release(name, bytes);
        Ok(TensorData::new(values, shape))
    }

    fn stored_dtype(&self, name: &str) -> Option<burn::tensor::DType> {
        match self.index.get(name)?.2 {
            Dtype::F16 => Some(burn::tensor::DType::F16),
            Dtype::BF16 => Some(burn::tensor::DType::BF16),
            _ => None,
        }
    }

    fn file_of(&self, name: &str) -> &Path {
        match self.index.get(name) {
            Some((i, _, _)) => &self.files[*i].0,
            None => self
                .files
                .first()
                .map(|f| f.0.as_path())
                .unwrap_or(Path::new("")),
        }
    }

    fn describe(&self) -> String {
        let names: Vec<_> = self
            .files
            .iter()
            .map(|f| f.0.display().to_string())
            .collect();
        names.join(", ")
    }
}

/// Little-endian stored values to f32, all finite (a NaN or infinity is an error naming its
/// index). Checkpoints on the hub are f32, f16 or bf16; f64 appears in a few small ones.
///
/// Converted and checked in parallel chunks of 64k values, each checked while it is in cache:
/// at TinyLlama size, load was bound by this copy out of the mmap, the page faults of the fresh
/// buffer (which the cores then share) and a second pass for the check.
fn to_finite_f32(bytes: &[u8], dtype: Dtype) -> std::result::Result<Vec<f32>, String> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F64 => 8,
        other => return Err(format!("dtype {other:?} is not a float type kiln can load")),
    };
    if !bytes.len().is_multiple_of(width) {
        return Err(format!(
            "{} bytes is not a whole number of {dtype:?} values",
            bytes.len()
        ));
    }
    // One loop per dtype, each with its conversion inlined: through a function pointer, the
    // call per value was a fifth of an NLLB-600M load's profile.
    fn fill<const W: usize>(out: &mut [f32], raw: &[u8], convert: impl Fn([u8; W]) -> f32) {
        for (v, c) in out.iter_mut().zip(raw.chunks_exact(W)) {
            *v = convert(c.try_into().expect("chunks of W bytes"));
        }
    }
    let mut values = vec![0f32; bytes.len() / width];
    let all_finite = values
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .map(|(out, raw)| {
            match dtype {
                Dtype::F32 => fill(out, raw, f32::from_le_bytes),
                Dtype::F16 => fill(out, raw, |c| half::f16::from_le_bytes(c).to_f32()),
                Dtype::BF16 => fill(out, raw, |c| half::bf16::from_le_bytes(c).to_f32()),
                _ => fill(out, raw, |c| f64::from_le_bytes(c) as f32),
            }
            out.iter().all(|v| v.is_finite())
        })
        .reduce(|| true, |a, b| a && b);
    if !all_finite {
        let i = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(format!(
            "holds a non-finite value ({}) at flat index {i}",
            values[i]
        ));
    }
    Ok(values)
}

/// The shard files named by a `model.safetensors.index.json`, in a stable order.
fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = super::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::config(index, "`weight_map` lists no files"));
    }
    for name in &names {
        if name.contains('/') || name.contains("..") {
            return Err(Error::config(
                index,
                format!("shard name `{name}` is not a plain file name"),
            ));
        }
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_float_dtype_across_chunks() {
        // More than one parallel chunk, and a length that is not a multiple of it.
        let values: Vec<f32> = (0..150_001)
            .map(|i| (i % 1000) as f32 * 0.25 - 100.0)
            .collect();
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f64_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(to_finite_f32(&f32_bytes, Dtype::F32).unwrap(), values);
        assert_eq!(to_finite_f32(&f64_bytes, Dtype::F64).unwrap(), values);
        // Quarter steps up to ±150 are exact in f16; bf16 keeps 8 significant bits.
        assert_eq!(to_finite_f32(&f16_bytes, Dtype::F16).unwrap(), values);
        let bf16: Vec<f32> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(to_finite_f32(&bf16_bytes, Dtype::BF16).unwrap(), bf16);
    }

    #[test]
    fn names_the_first_non_finite_value_in_a_later_chunk() {
        let mut values = vec![1.0f32; 200_000];
        values[140_000] = f32::INFINITY;
        values[190_000] = f32::NAN;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let err = to_finite_f32(&bytes, Dtype::F32).unwrap_err();
        assert!(err.contains("(inf) at flat index 140000"), "{err}");
    }

    #[test]
    fn rejects_ragged_bytes_and_integer_dtypes() {
        assert!(to_finite_f32(&[0; 7], Dtype::F32).is_err());
        assert!(to_finite_f32(&[0; 8], Dtype::I64).is_err());
    }
}
