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
        let values = to_f32(bytes, dtype).map_err(|message| Error::TensorData {
            tensor: name.to_string(),
            file: self.file_of(name).to_path_buf(),
            message,
        })?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::TensorData {
                tensor: name.to_string(),
                file: self.file_of(name).to_path_buf(),
                message: format!("holds a non-finite value ({}) at flat index {i}", values[i]),
            });
        }
        Ok(TensorData::new(values, shape))
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

/// Little-endian stored values to f32. Checkpoints on the hub are f32, f16 or bf16; f64 appears
/// in a few small ones.
fn to_f32(bytes: &[u8], dtype: Dtype) -> std::result::Result<Vec<f32>, String> {
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
    let chunks = bytes.chunks_exact(width);
    Ok(match dtype {
        Dtype::F32 => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => chunks
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => chunks
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => chunks
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
            .collect(),
    })
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
