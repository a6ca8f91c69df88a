//! GGUF files (llama.cpp's format), memory-mapped. The header, metadata and
//! tensor table are parsed and checked against the file length when the file is
//! opened, so a truncated or corrupt file fails there with its name and the
//! fault, never with a panic or a huge allocation later.
//!
//! Layout (spec: ggml `docs/gguf.md`, versions 2 and 3): magic `GGUF`, version,
//! tensor count, metadata count, metadata key/values, tensor infos (name, dims
//! innermost first, GGML type, offset), padding to `general.alignment`, data.

mod parse;
mod write;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backing::{Backing, ReadStats};
use crate::error::{Error, Result};
use crate::ops::mxfp4::Mxfp4Matrix;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
pub use write::GgufTensorOut;

const MAGIC: &[u8; 4] = b"GGUF";

/// How far around a touched page Linux may map a file's cached pages: the
/// fault-around window (64 KiB by default) or, with large folios in the page
/// cache, the whole folio, up to a PMD (2 MiB).
const MAP_AROUND: usize = 2 << 20;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float, or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// How a GGUF tensor is encoded: a GGML type candle knows, or MXFP4 (GGML
/// type 39, gpt-oss's experts: 17 bytes per 32 values, the E8M0 exponent
/// first), which only our kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDType {
    Ggml(GgmlDType),
    Mxfp4,
}

impl GgufDType {
    pub fn block_size(self) -> usize {
        match self {
            GgufDType::Ggml(d) => d.block_size(),
            GgufDType::Mxfp4 => 32,
        }
    }

    /// Bytes of one block.
    pub fn type_size(self) -> usize {
        match self {
            GgufDType::Ggml(d) => d.type_size(),
            GgufDType::Mxfp4 => 17,
        }
    }

    /// The candle type; `None` for MXFP4.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            GgufDType::Ggml(d) => Some(d),
            GgufDType::Mxfp4 => None,
        }
    }
}

impl From<GgmlDType> for GgufDType {
    fn from(d: GgmlDType) -> Self {
        GgufDType::Ggml(d)
    }
}

/// Where one tensor lives in the file and how it is encoded.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub dtype: GgufDType,
    /// Outermost dimension first, as PyTorch writes shapes (GGUF stores them
    /// innermost first; this is already reversed).
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.end - self.start
    }

    /// Where its bytes start in the file.
    pub fn file_offset(&self) -> usize {
        self.start
    }
}
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    /// Metadata entries' keys and byte ranges in file order (for rewriting).
    entries: Vec<(String, std::ops::Range<usize>)>,
    alignment: usize,
    tensors: HashMap<String, GgufTensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file and validates header, metadata and every tensor's extent.
    pub fn open(path: &Path) -> Result<Self> {
        let backing = Backing::map(path)?;
        let parsed =
            parse::parse(backing.mapped().unwrap_or_default()).map_err(|reason| Error::Gguf {
                path: path.to_path_buf(),
                reason,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            backing,
            version: parsed.version,
            metadata: parsed.metadata,
            entries: parsed.entries,
            alignment: parsed.alignment,
            tensors: parsed.tensors,
        })
    }

    /// The tensor table over positioned reads of the same file (no map, no
    /// metadata): what an expert provider reads experts from after the build.
    pub fn with_positioned_reads(&self) -> Result<(Self, Arc<ReadStats>)> {
        let stats = Arc::new(ReadStats::default());
        let reopened = Self {
            path: self.path.clone(),
            backing: Backing::reads(&self.path, stats.clone())?,
            version: self.version,
            metadata: BTreeMap::new(),
            entries: Vec::new(),
            alignment: self.alignment,
            tensors: self.tensors.clone(),
        };
        Ok((reopened, stats))
    }

    /// Whether `path` looks like a GGUF file: a `.gguf` extension or the magic bytes.
    pub fn is_gguf(path: &Path) -> bool {
        if !path.is_file() {
            return false;
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return true;
        }
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| &magic == MAGIC)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// See [`TensorSource::drop_cached_pages`](crate::weights::TensorSource::drop_cached_pages).
    pub fn drop_cached_pages(&self) -> Result<()> {
        self.backing.drop_cached_pages(&self.path)
    }

    /// `general.file_type` by llama.cpp's name for it (`LlamaFileType`: "Q8_0",
    /// "Q4_K_M", ...), if the file says and the code is known.
    pub fn file_type_name(&self) -> Option<&'static str> {
        Some(match self.get("general.file_type")?.as_u64()? {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            7 => "Q8_0",
            8 => "Q5_0",
            9 => "Q5_1",
            10 => "Q2_K",
            11 => "Q3_K_S",
            12 => "Q3_K_M",
            13 => "Q3_K_L",
            14 => "Q4_K_S",
            15 => "Q4_K_M",
            16 => "Q5_K_S",
            17 => "Q5_K_M",
            18 => "Q6_K",
            32 => "BF16",
            _ => return None,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Tensor names in the order their data lies in the file.
    pub fn tensor_names_in_file_order(&self) -> Vec<&str> {
        let mut names: Vec<(&str, usize)> = (self.tensors.iter())
            .map(|(name, info)| (name.as_str(), info.start))
            .collect();
        names.sort_unstable_by_key(|&(name, start)| (start, name));
        names.into_iter().map(|(name, _)| name).collect()
    }

    /// `general.alignment`, or GGUF's default (32): what tensor data offsets are multiples of.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// A GGUF-named tensor's info, or an error naming the file.
    pub fn require(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            hint: format!(" (searched {})", self.path.display()),
        })
    }

    /// The raw encoded bytes of a tensor (borrowed from the map, or read).
    pub fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let info = self.require(name)?;
        self.backing.range(&self.path, info.start, info.end)
    }

    /// Drops `bytes`, lent by [`Self::bytes`] or [`Self::part_bytes`], from the
    /// resident set once they are converted (see `Backing::release`), together
    /// with [`MAP_AROUND`] bytes on each side: a touch near a slice's ends maps
    /// cached pages around it, parts of neighbouring tensors already converted
    /// included, and those stayed mapped until the file was closed (166 MB of
    /// the bench model's Q8_0 file at the end of the build with only the slice
    /// released, 111 MB with 64 KiB either side, none with 2 MiB). Dropping a
    /// page that is still wanted only costs a minor fault to map it again.
    pub fn release(&self, bytes: &[u8]) {
        let Some(map) = self.backing.mapped() else {
            return;
        };
        let (base, start) = (map.as_ptr() as usize, bytes.as_ptr() as usize);
        match start.checked_sub(base) {
            Some(offset) if offset + bytes.len() <= map.len() => {
                let from = offset.saturating_sub(MAP_AROUND);
                let to = (offset + bytes.len() + MAP_AROUND).min(map.len());
                self.backing.release(&map[from..to]);
            }
            _ => self.backing.release(bytes),
        }
    }

    /// Part `index` of `parts` equal parts of a tensor's bytes (one expert of
    /// a merged `ffn_*_exps` tensor), reading only that part.
    pub fn part_bytes(&self, name: &str, index: usize, parts: usize) -> Result<Cow<'_, [u8]>> {
        let info = self.require(name)?;
        let len = info.size_in_bytes() / parts.max(1);
        let start = info.start + index * len;
        self.backing.range(&self.path, start, start + len)
    }

    /// A GGUF-named tensor decoded to `dtype` (quantized types through f32).
    pub fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let info = self.require(name)?;
        decode(&self.bytes(name)?, info.dtype, &info.shape, dtype)
    }
}

/// Decodes GGML-encoded bytes of `dtype` into a `shape`d tensor of `dtype_out`
/// (quantized types are dequantized through f32).
pub(crate) fn decode(
    bytes: &[u8],
    dtype: GgufDType,
    shape: &[usize],
    dtype_out: DType,
) -> Result<Tensor> {
    let dtype = match dtype {
        GgufDType::Ggml(d) => d,
        GgufDType::Mxfp4 => {
            let numel: usize = shape.iter().product();
            let cols = shape.last().copied().unwrap_or(1);
            let m = Mxfp4Matrix::from_ggml(bytes, numel / cols.max(1), cols)?;
            return Ok(Tensor::from_vec(m.dequantize(), shape, &Device::Cpu)?.to_dtype(dtype_out)?);
        }
    };
    let t = match dtype {
        GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, &Device::Cpu)?,
        GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, &Device::Cpu)?,
        GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, &Device::Cpu)?,
        _ => to_qtensor(bytes, dtype, shape)?.dequantize(&Device::Cpu)?,
    };
    Ok(t.to_dtype(dtype_out)?)
}

/// Wraps GGML-encoded bytes holding exactly `shape` elements as a candle
/// `QTensor` (the bytes are copied).
pub(crate) fn to_qtensor(
    bytes: &[u8],
    dtype: GgmlDType,
    shape: &[usize],
) -> candle_core::Result<QTensor> {
    let numel: usize = shape.iter().product();
    let block = dtype.block_size();
    let expected = numel / block * dtype.type_size();
    if !numel.is_multiple_of(block) || bytes.len() != expected {
        candle_core::bail!(
            "{dtype:?} data of {} bytes does not hold a {shape:?} tensor ({expected} bytes)",
            bytes.len()
        );
    }
    crate::ops::ggml_qtensor(bytes, dtype, shape)
}
