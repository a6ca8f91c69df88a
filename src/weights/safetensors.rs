//! Memory-mapped safetensors checkpoints: one file, or many shards listed by
//! `model.safetensors.index.json` (or else every `model*.safetensors` in the directory).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::backing::{Backing, ReadStats};
use crate::error::{Error, Result};

/// Element type as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    /// Raw bytes: MXFP4 blocks and scales (gpt-oss's `*_blocks` / `*_scales`).
    U8,
}

impl StoredDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::F16 | StoredDtype::BF16 => 2,
            StoredDtype::U8 => 1,
        }
    }

    pub(crate) fn candle(self) -> DType {
        match self {
            StoredDtype::F32 => DType::F32,
            StoredDtype::F16 => DType::F16,
            StoredDtype::BF16 => DType::BF16,
            StoredDtype::U8 => DType::U8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range inside the mapped file (header included in the offset).
    start: usize,
    end: usize,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsFiles {
    paths: Vec<PathBuf>,
    /// One per path.
    files: Vec<Backing>,
    tensors: HashMap<String, TensorMeta>,
}

impl SafetensorsFiles {
    /// Opens every weight file of a model directory and validates each header.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let paths = shard_paths(dir)?;
        Self::open_files(&paths)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (file_idx, path) in paths.iter().enumerate() {
            // mmap of a directory fails with ENODEV, "No such device".
            if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                return Err(Error::Safetensors {
                    path: path.clone(),
                    reason: "it is a directory, not a file".into(),
                });
            }
            let backing = Backing::map(path)?;
            let map = backing.mapped().unwrap_or_default();
            let (header_len, metadata) =
                SafeTensors::read_metadata(map).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => StoredDtype::F32,
                    Dtype::F16 => StoredDtype::F16,
                    Dtype::BF16 => StoredDtype::BF16,
                    Dtype::U8 => StoredDtype::U8,
                    other => {
                        return Err(Error::UnsupportedDtype {
                            name,
                            dtype: format!("{other:?} (in {})", path.display()),
                        });
                    }
                };
                let (start, end) = info.data_offsets;
                let meta = TensorMeta {
                    dtype,
                    shape: info.shape.clone(),
                    file: file_idx,
                    start: data_start + start,
                    end: data_start + end,
                };
                if tensors.insert(name.clone(), meta).is_some() {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor {name:?} also appears in an earlier shard"),
                    });
                }
            }
            files.push(backing);
        }
        Ok(Self {
            paths: paths.to_vec(),
            files,
            tensors,
        })
    }

    /// The same files opened again for positioned reads (no map), sharing one
    /// read counter: what an expert provider reads experts from after the build.
    pub fn with_positioned_reads(&self) -> Result<(Self, Arc<ReadStats>)> {
        let stats = Arc::new(ReadStats::default());
        let files = self
            .paths
            .iter()
            .map(|p| Backing::reads(p, stats.clone()))
            .collect::<Result<_>>()?;
        let reopened = Self {
            paths: self.paths.clone(),
            files,
            tensors: self.tensors.clone(),
        };
        Ok((reopened, stats))
    }

    /// See [`TensorSource::drop_cached_pages`](super::TensorSource::drop_cached_pages).
    pub fn drop_cached_pages(&self) -> Result<()> {
        self.files
            .iter()
            .zip(&self.paths)
            .try_for_each(|(f, p)| f.drop_cached_pages(p))
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The raw little-endian bytes of a tensor (borrowed from the map, or read).
    pub fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let meta = self.require(name)?;
        self.range(meta, meta.start, meta.end)
    }

    fn range(&self, meta: &TensorMeta, start: usize, end: usize) -> Result<Cow<'_, [u8]>> {
        // invariant: `meta.file` is the index of the file the header was read from.
        self.files[meta.file].range(&self.paths[meta.file], start, end)
    }

    fn require(&self, name: &str) -> Result<&TensorMeta> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            hint: format!(" (searched {})", self.describe_files()),
        })
    }

    fn describe_files(&self) -> String {
        match self.paths.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} shards", many.len()),
        }
    }

    /// That `name` exists with `shape`, from the header alone.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<&TensorMeta> {
        let meta = self.require(name)?;
        if meta.shape != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: meta.shape.clone(),
            });
        }
        Ok(meta)
    }

    /// [`Self::check`], and that raw bytes are asked of a U8 tensor and numbers
    /// of a float one: converting between them would give values, not an error.
    fn check_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<&TensorMeta> {
        let meta = self.check(name, shape)?;
        if (meta.dtype == StoredDtype::U8) != (dtype == DType::U8) {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{:?} where {dtype:?} is expected", meta.dtype),
            });
        }
        Ok(meta)
    }

    /// Loads a tensor, checks its shape and converts it to `dtype`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let meta = self.check_as(name, shape, dtype)?;
        let bytes = self.range(meta, meta.start, meta.end)?;
        let tensor =
            Tensor::from_raw_buffer(&bytes, meta.dtype.candle(), &meta.shape, &Device::Cpu)?;
        Ok(tensor.to_dtype(dtype)?)
    }

    /// Slice `index` along the first dimension of a tensor of `shape`, reading
    /// only that slice's bytes (one expert of a fused expert tensor).
    pub fn load_index(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let meta = self.check_as(name, shape, dtype)?;
        let (n, inner) = shape.split_first().ok_or_else(|| {
            Error::InvalidInput(format!("tensor {name:?} is a scalar, it has no slices"))
        })?;
        if index >= *n {
            return Err(Error::InvalidInput(format!(
                "tensor {name:?} has {n} slices along its first dimension, slice {index} requested"
            )));
        }
        let slice_bytes = (meta.end - meta.start) / n;
        let start = meta.start + index * slice_bytes;
        let bytes = self.range(meta, start, start + slice_bytes)?;
        let tensor = Tensor::from_raw_buffer(&bytes, meta.dtype.candle(), inner, &Device::Cpu)?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// Finds the weight files of a model directory: the shards named by the index if
/// there is one, else every `model*.safetensors` file, in name order.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&index_path, format!("invalid JSON: {e}")))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index_path, "missing object field `weight_map`"))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::config(&index_path, format!("weight_map.{tensor} is not a string"))
            })?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for path in &paths {
            if !path.exists() {
                return Err(Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in model.safetensors.index.json is missing",
                    ),
                ));
            }
        }
        return Ok(paths);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        // Only `model*.safetensors`: directories often hold other safetensors
        // (Mistral's duplicate `consolidated.safetensors`, adapters, test records).
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(Error::io(
            dir.join("model.safetensors"),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model*.safetensors weight files in the model directory",
            ),
        ));
    }
    Ok(paths)
}
