//! The packed expert file: every routed expert written once in the kernels'
//! layout, so that a miss reads exactly one expert's bytes straight into the
//! buffers the kernels use, with no conversion. A GGUF expert converts its
//! blocks into 16-row tiles, and `--quant` quantizes on every read; measured,
//! that costs 1.1-1.4x the read itself (`repack X.XXx read time` in the
//! summary), CPU time a miss then takes from the compute. Dense experts
//! (f32, bf16 or f16 weights as stored) are read from the checkpoint unless
//! `--expert-file on` asks for the file as well.
//!
//! Layout: a 32-byte prefix (magic, format version, length and FNV-1a hash of
//! a JSON header, offset of the data), the JSON header (the checkpoint's
//! identity: each file's path, size and modification time, the format version
//! and the conversion's parameters; per layer, where its experts start, one
//! expert's stride and how its two matrices are stored), then the experts,
//! layer by layer, each at a 4096-byte boundary, every buffer padded to one.
//! Values are in the machine's byte order (little-endian on every target the
//! kernels have).
//!
//! The file is written to a temporary name beside its final one and renamed
//! when complete, so a file under the final name is always whole. Before use,
//! the header must parse, hash and match the checkpoint as it is now, the file
//! must be as long as the header says, and the first expert of each layer must
//! equal that expert converted from the checkpoint (which also catches a
//! change of the kernels' layout); otherwise it is rebuilt. Reads use
//! `O_DIRECT` where the file system takes it (not tmpfs), so the page cache
//! holds no second copy of what the expert cache holds, and a miss waits on
//! the disk instead of copying pages.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{ExpertId, ExpertLayout};
use crate::error::{Error, Result};
use crate::ops::aligned::{ALIGN, AlignedVec, align_up};
use crate::ops::mxfp4::Mxfp4Matrix;
use crate::ops::quant::{PackedFormat, PackedMatrix};
use crate::ops::{Ffn, Linear, LinearWeight, QuantKind};
use crate::weights::ReadStats;

/// Bumped whenever the layout of the file or of what it stores changes.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"SWYDEXPT";

/// Bytes before the JSON header.
const PREFIX: usize = 32;

/// The file's extension.
pub const EXTENSION: &str = "experts";

/// `--expert-file`: whether misses read a packed expert file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertFileMode {
    /// Read the checkpoint, converting on every read.
    Off,
    /// Write and read the packed file when the experts are converted on read
    /// (GGUF blocks, MXFP4, `--quant`); read dense experts from the checkpoint.
    #[default]
    Auto,
    /// Always the packed file; an error where it cannot be written.
    On,
}

impl ExpertFileMode {
    pub const ACCEPTED: &'static str = "off, auto, on";
}

impl std::str::FromStr for ExpertFileMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            _ => Err(Error::InvalidInput(format!(
                "--expert-file {s:?}: expected one of {}",
                Self::ACCEPTED
            ))),
        }
    }
}

impl std::fmt::Display for ExpertFileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Auto => "auto",
            Self::On => "on",
        })
    }
}

/// Where and whether to keep a packed expert file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpertFile {
    pub mode: ExpertFileMode,
    /// `--expert-dir`; by default [`default_dir`], and beside the checkpoint
    /// where that cannot be written.
    pub dir: Option<PathBuf>,
}

/// `$XDG_CACHE_HOME/switchyard`, else `~/.cache/switchyard`.
pub fn default_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("switchyard"))
}

/// How one matrix of an expert is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MatrixRecord {
    Packed {
        format: String,
        rows: usize,
        cols: usize,
        bias: Option<usize>,
    },
    Mxfp4 {
        rows: usize,
        cols: usize,
        q8_activations: bool,
        bias: Option<usize>,
    },
    Dense {
        dtype: String,
        rows: usize,
        cols: usize,
        bias: Option<usize>,
    },
}

const FORMATS: [PackedFormat; 5] = [
    PackedFormat::Q8_0,
    PackedFormat::Q4_0,
    PackedFormat::Q4_1,
    PackedFormat::Q6,
    PackedFormat::Q4K,
];

fn parse_format(name: &str) -> Result<PackedFormat> {
    FORMATS
        .into_iter()
        .find(|f| format!("{f:?}") == name)
        .ok_or_else(|| Error::InvalidInput(format!("unknown packed format {name:?}")))
}

fn parse_dtype(name: &str) -> Result<DType> {
    name.parse()
        .map_err(|_| Error::InvalidInput(format!("unknown dtype {name:?}")))
}

impl MatrixRecord {
    /// How `linear` is stored; `None` for a weight kind the file cannot hold
    /// (GGML types that run on candle's kernels).
    fn of(linear: &Linear) -> Option<Self> {
        let (rows, cols) = linear.dims();
        let bias = linear.bias().map(|b| b.elem_count());
        Some(match linear.weight() {
            LinearWeight::Packed(p) => Self::Packed {
                format: format!("{:?}", p.format()),
                rows,
                cols,
                bias,
            },
            LinearWeight::Mxfp4 { q8_activations, .. } => Self::Mxfp4 {
                rows,
                cols,
                q8_activations: *q8_activations,
                bias,
            },
            LinearWeight::Dense(w) => Self::Dense {
                dtype: w.dtype().as_str().to_string(),
                rows,
                cols,
                bias,
            },
            LinearWeight::Ggml { .. } => return None,
        })
    }

    fn is_dense(&self) -> bool {
        matches!(self, Self::Dense { .. })
    }

    fn bias(&self) -> Option<usize> {
        match self {
            Self::Packed { bias, .. } | Self::Mxfp4 { bias, .. } | Self::Dense { bias, .. } => {
                *bias
            }
        }
    }
}

/// One matrix's buffers, allocated for a read to fill, then made a [`Linear`].
struct Landing {
    weight: LandingWeight,
    bias: Option<AlignedVec<f32>>,
}

enum LandingWeight {
    Packed(PackedMatrix),
    Mxfp4(Mxfp4Matrix, bool),
    Dense {
        dtype: DType,
        shape: [usize; 2],
        bytes: AlignedVec<u8>,
    },
}

impl Landing {
    fn new(record: &MatrixRecord) -> Result<Self> {
        let weight = match record {
            MatrixRecord::Packed {
                format, rows, cols, ..
            } => LandingWeight::Packed(PackedMatrix::empty(parse_format(format)?, *rows, *cols)?),
            MatrixRecord::Mxfp4 {
                rows,
                cols,
                q8_activations,
                ..
            } => LandingWeight::Mxfp4(Mxfp4Matrix::empty(*rows, *cols)?, *q8_activations),
            MatrixRecord::Dense {
                dtype, rows, cols, ..
            } => {
                let dtype = parse_dtype(dtype)?;
                LandingWeight::Dense {
                    dtype,
                    shape: [*rows, *cols],
                    bytes: AlignedVec::zeroed(rows * cols * dtype.size_in_bytes()),
                }
            }
        };
        Ok(Self {
            weight,
            bias: record.bias().map(AlignedVec::zeroed),
        })
    }

    fn buffers_mut(&mut self) -> Vec<&mut [u8]> {
        let mut out: Vec<&mut [u8]> = match &mut self.weight {
            LandingWeight::Packed(p) => p.buffers_mut().into_iter().collect(),
            LandingWeight::Mxfp4(m, _) => m.buffers_mut().into_iter().collect(),
            LandingWeight::Dense { bytes, .. } => vec![bytes.padded_bytes_mut()],
        };
        if let Some(b) = &mut self.bias {
            out.push(b.padded_bytes_mut());
        }
        out
    }

    fn finish(self) -> Result<Linear> {
        let cpu = &Device::Cpu;
        let bias = self
            .bias
            .map(|b| Tensor::from_slice(&b[..], b.len(), cpu))
            .transpose()?;
        let weight = match self.weight {
            LandingWeight::Packed(p) => LinearWeight::Packed(Arc::new(p)),
            LandingWeight::Mxfp4(m, q8_activations) => LinearWeight::Mxfp4 {
                matrix: Arc::new(m),
                q8_activations,
            },
            // Candle tensors own a Vec of their own: dense weights take one copy.
            LandingWeight::Dense {
                dtype,
                shape,
                bytes,
            } => {
                let n = shape[0] * shape[1] * dtype.size_in_bytes();
                LinearWeight::Dense(Tensor::from_raw_buffer(&bytes[..n], dtype, &shape, cpu)?)
            }
        };
        Ok(Linear::from_weight(weight, bias))
    }
}

/// `t`'s values as bytes, in the machine's order.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                name: "packed expert tensor".into(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Appends `bytes` and zeroes up to the next [`ALIGN`] boundary.
fn push_padded(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.resize(align_up(out.len()), 0);
}

/// `linear`'s bytes as the file stores them.
fn push_linear(out: &mut Vec<u8>, linear: &Linear) -> Result<()> {
    match linear.weight() {
        LinearWeight::Packed(p) => p.buffers().iter().for_each(|b| out.extend_from_slice(b)),
        LinearWeight::Mxfp4 { matrix, .. } => matrix
            .buffers()
            .iter()
            .for_each(|b| out.extend_from_slice(b)),
        LinearWeight::Dense(w) => push_padded(out, &tensor_bytes(w)?),
        LinearWeight::Ggml { .. } => {
            return Err(Error::InvalidInput(
                "a GGML weight on candle's kernels has no packed form".into(),
            ));
        }
    }
    if let Some(b) = linear.bias() {
        push_padded(out, &tensor_bytes(&b.to_dtype(DType::F32)?)?);
    }
    Ok(())
}

/// An expert's record: its gate-up matrix, then its down matrix.
fn expert_bytes(ffn: &Ffn) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(align_up(ffn.weight_bytes()) + 4 * ALIGN);
    push_linear(&mut out, ffn.gate_up())?;
    push_linear(&mut out, ffn.down())?;
    Ok(out)
}

/// Where a layer's experts are and how each is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Of expert 0, from the start of the data.
    pub offset: u64,
    /// Bytes from one expert to the next (a multiple of 4096).
    pub stride: u64,
    /// Gate-up, then down.
    pub matrices: Vec<MatrixRecord>,
}

/// A checkpoint file as it was when the packed file was made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: String,
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: i64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self {
            path: path.display().to_string(),
            size: meta.len(),
            mtime_secs: meta.mtime(),
            mtime_nanos: meta.mtime_nsec(),
        })
    }
}

/// What a packed file must have been made from to be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub version: u32,
    pub files: Vec<FileStamp>,
    /// The conversion: `--quant`, dtype, activation, shapes.
    pub params: String,
}

impl Identity {
    pub fn new(files: &[PathBuf], layout: &ExpertLayout, quant: Option<QuantKind>) -> Result<Self> {
        Ok(Self {
            version: FORMAT_VERSION,
            files: files
                .iter()
                .map(|p| FileStamp::of(p))
                .collect::<Result<_>>()?,
            params: format!(
                "quant={quant:?} dtype={:?} activation={:?} dims={:?} layers={}",
                layout.dtype,
                layout.activation,
                layout.dims,
                layout.layers.len()
            ),
        })
    }

    /// The file's name: the first checkpoint file's, and a hash of the paths
    /// and parameters (not the sizes and times, so a changed checkpoint's
    /// file is replaced rather than left beside a new one).
    fn file_name(&self) -> String {
        let mut key = self.params.clone();
        for f in &self.files {
            key.push('\n');
            key.push_str(&f.path);
        }
        let stem = self
            .files
            .first()
            .and_then(|f| Path::new(&f.path).file_name())
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        format!("{stem}-{:016x}.{EXTENSION}", fnv1a(key.as_bytes()))
    }
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub identity: Identity,
    /// `[layer]`; `None` for dense layers.
    pub layers: Vec<Option<LayerRecord>>,
    /// Bytes of the whole file.
    pub file_len: u64,
}

/// FNV-1a, 64 bits: the header's checksum (not a defence against tampering).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Header {
    /// The prefix and JSON, padded to where the data starts.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::InvalidInput(format!("packed expert header: {e}")))?;
        let data_start = align_up(PREFIX + json.len());
        let mut out = Vec::with_capacity(data_start);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&fnv1a(&json).to_le_bytes());
        out.extend_from_slice(&(data_start as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(data_start, 0);
        Ok(out)
    }

    /// The header at the start of `file`, and where the data starts; an
    /// error saying what is wrong with it.
    pub fn decode(file: &File) -> std::result::Result<(Self, u64), String> {
        use std::os::unix::fs::FileExt;
        let mut prefix = [0u8; PREFIX];
        file.read_exact_at(&mut prefix, 0)
            .map_err(|e| format!("no header ({e})"))?;
        if &prefix[..8] != MAGIC {
            return Err("not a packed expert file (bad magic)".into());
        }
        let word = |at: usize| u32::from_le_bytes(prefix[at..at + 4].try_into().unwrap());
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build writes {FORMAT_VERSION}"
            ));
        }
        let json_len = word(12) as usize;
        let hash = u64::from_le_bytes(prefix[16..24].try_into().unwrap());
        let data_start = u64::from_le_bytes(prefix[24..32].try_into().unwrap());
        if json_len > 64 << 20 || data_start != align_up(PREFIX + json_len) as u64 {
            return Err("the header's lengths are inconsistent".into());
        }
        let mut json = vec![0u8; json_len];
        file.read_exact_at(&mut json, PREFIX as u64)
            .map_err(|e| format!("truncated header ({e})"))?;
        if fnv1a(&json) != hash {
            return Err("the header's checksum does not match".into());
        }
        let header: Header =
            serde_json::from_slice(&json).map_err(|e| format!("unreadable header ({e})"))?;
        Ok((header, data_start))
    }
}

/// The layer records for experts shaped like `probes` (expert 0 of each MoE
/// layer, converted), laid out layer after layer; `None` if one holds a weight
/// the file cannot.
pub fn plan_layers(
    layout: &ExpertLayout,
    probes: &[Option<Ffn>],
) -> Result<Option<Vec<Option<LayerRecord>>>> {
    let mut offset = 0u64;
    let mut layers = Vec::with_capacity(probes.len());
    for (l, probe) in probes.iter().enumerate() {
        let Some(ffn) = probe else {
            layers.push(None);
            continue;
        };
        let (Some(g), Some(d)) = (
            MatrixRecord::of(ffn.gate_up()),
            MatrixRecord::of(ffn.down()),
        ) else {
            return Ok(None);
        };
        let stride = expert_bytes(ffn)?.len() as u64;
        layers.push(Some(LayerRecord {
            offset,
            stride,
            matrices: vec![g, d],
        }));
        offset += stride * layout.num_experts(l) as u64;
    }
    Ok(Some(layers))
}

/// Whether every matrix the records describe is dense (stored as the
/// kernels read it, so a read converts nothing that the file would save).
pub fn all_dense(layers: &[Option<LayerRecord>]) -> bool {
    layers
        .iter()
        .flatten()
        .all(|l| l.matrices.iter().all(MatrixRecord::is_dense))
}

/// A packed expert file opened for reads.
pub struct PackedExperts {
    path: PathBuf,
    file: File,
    /// Whether `file` was opened with `O_DIRECT`.
    direct: bool,
    data_start: u64,
    layers: Vec<Option<LayerRecord>>,
    activation: crate::ops::GluActivation,
    stats: Arc<ReadStats>,
}

impl std::fmt::Debug for PackedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedExperts")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// What [`PackedExperts::prepare`] needs.
pub struct PackedPlan<'a> {
    /// The checkpoint's files.
    pub files: &'a [PathBuf],
    pub layout: &'a ExpertLayout,
    pub quant: Option<QuantKind>,
    /// `[layer]`: expert 0 converted from the checkpoint; `None` for dense layers.
    pub probes: &'a [Option<Ffn>],
    pub options: &'a ExpertFile,
    /// Where the file's reads are counted (the checkpoint's counters).
    pub stats: Arc<ReadStats>,
    /// Converts one expert from the checkpoint (for writing the file).
    pub convert: &'a (dyn Fn(ExpertId) -> Result<Ffn> + Sync),
}

/// Deletes a temporary file unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Files at least this large show a progress bar while written.
const PROGRESS_BYTES: u64 = 64 << 20;

impl PackedExperts {
    /// The packed file `plan.options` asks for: reused where a valid one
    /// exists, written otherwise; `None` where the experts are read from the
    /// checkpoint (`--expert-file off`, dense experts under `auto`, or under
    /// `auto` a weight kind the file cannot hold or no writable place).
    pub fn prepare(plan: &PackedPlan<'_>) -> Result<Option<Self>> {
        let mode = plan.options.mode;
        if mode == ExpertFileMode::Off {
            return Ok(None);
        }
        let Some(layers) = plan_layers(plan.layout, plan.probes)? else {
            if mode == ExpertFileMode::On {
                return Err(Error::InvalidInput(
                    "--expert-file on: these experts hold a GGML type that runs on candle's \
                     kernels, which a packed expert file cannot store; use --expert-file off"
                        .into(),
                ));
            }
            return Ok(None);
        };
        if mode == ExpertFileMode::Auto && all_dense(&layers) {
            return Ok(None);
        }
        let identity = Identity::new(plan.files, plan.layout, plan.quant)?;
        let name = identity.file_name();
        let mut dirs = Vec::new();
        match &plan.options.dir {
            Some(dir) => dirs.push(dir.clone()),
            None => {
                dirs.extend(default_dir());
                dirs.extend(
                    plan.files
                        .first()
                        .and_then(|p| p.parent())
                        .map(Path::to_path_buf),
                );
            }
        }
        for dir in &dirs {
            let path = dir.join(&name);
            if !path.exists() {
                continue;
            }
            match Self::open_checked(&path, &identity, &layers, plan) {
                Ok(p) => return Ok(Some(p)),
                Err(reason) => tracing::warn!("{}: {reason}; rebuilding it", path.display()),
            }
        }
        let mut failures = Vec::new();
        for dir in &dirs {
            let path = dir.join(&name);
            match Self::write(&path, &identity, &layers, plan)? {
                Ok(()) => {
                    return Self::open_checked(&path, &identity, &layers, plan)
                        .map(Some)
                        .map_err(|reason| {
                            Error::InvalidInput(format!(
                                "{}: written, then {reason}",
                                path.display()
                            ))
                        });
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        let why = if failures.is_empty() {
            "no directory to write it in (set --expert-dir)".to_string()
        } else {
            failures.join("; ")
        };
        if mode == ExpertFileMode::On {
            return Err(Error::InvalidInput(format!(
                "--expert-file on: cannot write the packed expert file: {why}"
            )));
        }
        tracing::warn!("no packed expert file, reading the checkpoint: {why}");
        Ok(None)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads bypass the page cache (`O_DIRECT`).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Opens `path` if it is whole and made from the checkpoint as it is now;
    /// else why not.
    fn open_checked(
        path: &Path,
        identity: &Identity,
        layers: &[Option<LayerRecord>],
        plan: &PackedPlan<'_>,
    ) -> std::result::Result<Self, String> {
        let plain = File::open(path).map_err(|e| format!("cannot open ({e})"))?;
        let (header, data_start) = Header::decode(&plain)?;
        if header.identity != *identity {
            return Err(
                "made from another checkpoint, or from this one before it changed (size, \
                 modification time or conversion differ)"
                    .into(),
            );
        }
        if header.layers != layers {
            return Err("its experts are laid out unlike this build's".into());
        }
        let len = plain.metadata().map_err(|e| e.to_string())?.len();
        if len != header.file_len {
            return Err(format!(
                "{len} bytes, its header says {} (truncated?)",
                header.file_len
            ));
        }
        let mut file = None;
        if let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            file = Some((f, true));
        }
        let (file, direct) = file.unwrap_or((plain, false));
        let mut packed = Self {
            path: path.to_path_buf(),
            file,
            direct,
            data_start,
            layers: header.layers,
            activation: plan.layout.activation,
            stats: plan.stats.clone(),
        };
        // Expert 0 of each layer as the checkpoint converts it now, byte for
        // byte: this also tries O_DIRECT, which some file systems refuse only
        // at the first read.
        for (l, probe) in plan.probes.iter().enumerate() {
            let Some(probe) = probe else { continue };
            let id = ExpertId {
                layer: l as u32,
                expert: 0,
            };
            let read = match packed.read_uncounted(id) {
                Err(_) if packed.direct => {
                    packed.file = File::open(path).map_err(|e| format!("cannot open ({e})"))?;
                    packed.direct = false;
                    packed.read_uncounted(id)
                }
                r => r,
            }
            .map_err(|e| e.to_string())?;
            let same = expert_bytes(&read)
                .and_then(|a| Ok(a == expert_bytes(probe)?))
                .map_err(|e| e.to_string())?;
            if !same {
                return Err(format!(
                    "expert 0 of layer {l} differs from the checkpoint's (written by another \
                     build, or corrupt)"
                ));
            }
        }
        if !packed.direct {
            // Buffered reads of experts in routing order: readahead would
            // only read (and count) bytes no one asked for.
            // SAFETY: the descriptor is open; fadvise touches no memory of ours.
            unsafe { libc::posix_fadvise(packed.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        }
        Ok(packed)
    }

    /// Writes every expert to a temporary file beside `path`, then renames it
    /// into place. The outer error is a conversion's (reading the
    /// checkpoint); the inner one a failure to write here, where another
    /// directory may do.
    fn write(
        path: &Path,
        identity: &Identity,
        layers: &[Option<LayerRecord>],
        plan: &PackedPlan<'_>,
    ) -> Result<std::result::Result<(), Error>> {
        let data_len: u64 = layers
            .iter()
            .enumerate()
            .filter_map(|(l, r)| {
                r.as_ref()
                    .map(|r| r.stride * plan.layout.num_experts(l) as u64)
            })
            .sum();
        let mut header = Header {
            identity: identity.clone(),
            layers: layers.to_vec(),
            file_len: 0,
        };
        // The file's length is in the header whose length it includes.
        let mut encoded = header.encode()?;
        loop {
            header.file_len = encoded.len() as u64 + data_len;
            let again = header.encode()?;
            let done = again.len() == encoded.len();
            encoded = again;
            if done {
                break;
            }
        }
        let Some(dir) = path.parent() else {
            return Ok(Err(Error::InvalidInput(format!(
                "{}: no directory",
                path.display()
            ))));
        };
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| Error::io(p, e)
        };
        if let Err(e) = std::fs::create_dir_all(dir).map_err(io(dir)) {
            return Ok(Err(e));
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let file_name = path
            .file_name()
            .map_or("experts".into(), |n| n.to_string_lossy());
        let tmp_path = dir.join(format!(".{file_name}.{}.{stamp}.tmp", std::process::id()));
        let file = match File::create(&tmp_path).map_err(io(&tmp_path)) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let tmp = TempFile(Some(tmp_path.clone()));
        let bar = progress_bar(header.file_len, path);
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        if let Err(e) = w.write_all(&encoded).map_err(io(&tmp_path)) {
            return Ok(Err(e));
        }
        for (l, record) in layers.iter().enumerate() {
            let Some(record) = record else { continue };
            for e in 0..plan.layout.num_experts(l) {
                let id = ExpertId {
                    layer: l as u32,
                    expert: e as u32,
                };
                let ffn = (plan.convert)(id)?;
                let bytes = expert_bytes(&ffn)?;
                let kinds = [
                    MatrixRecord::of(ffn.gate_up()),
                    MatrixRecord::of(ffn.down()),
                ];
                if bytes.len() as u64 != record.stride
                    || kinds
                        .iter()
                        .zip(&record.matrices)
                        .any(|(k, r)| k.as_ref() != Some(r))
                {
                    return Err(Error::InvalidInput(format!(
                        "expert {e} of layer {l} is stored unlike expert 0 ({kinds:?}, expected \
                         {:?}): a packed expert file needs one layout per layer; use \
                         --expert-file off",
                        record.matrices
                    )));
                }
                if let Err(err) = w.write_all(&bytes).map_err(io(&tmp_path)) {
                    return Ok(Err(err));
                }
                bar.inc(bytes.len() as u64);
            }
        }
        let file = match w.into_inner() {
            Ok(f) => f,
            Err(e) => return Ok(Err(Error::io(&tmp_path, e.into_error()))),
        };
        // Durable before it is renamed into place, so that a crash leaves
        // either no file or a whole one.
        if let Err(e) = file.sync_all().map_err(io(&tmp_path)) {
            return Ok(Err(e));
        }
        // What was just written need not stay in the page cache: reads go
        // around it.
        // SAFETY: the descriptor is open; fadvise touches no memory of ours.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        drop(file);
        if let Err(e) = std::fs::rename(&tmp_path, path).map_err(io(path)) {
            return Ok(Err(e));
        }
        std::mem::forget(tmp);
        bar.finish_and_clear();
        tracing::info!("wrote the packed expert file {}", path.display());
        Ok(Ok(()))
    }

    /// Expert `id`, read with one vectored read straight into the buffers its
    /// matrices compute from; counted with the checkpoint's reads.
    pub fn read(&self, id: ExpertId) -> Result<Ffn> {
        let t = Instant::now();
        let (ffn, bytes) = self.read_inner(id)?;
        self.stats.record(bytes, t.elapsed().as_nanos() as u64);
        Ok(ffn)
    }

    fn read_uncounted(&self, id: ExpertId) -> Result<Ffn> {
        self.read_inner(id).map(|(ffn, _)| ffn)
    }

    fn read_inner(&self, id: ExpertId) -> Result<(Ffn, u64)> {
        let record = self
            .layers
            .get(id.layer as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::InvalidInput(format!("layer {} has no routed experts", id.layer))
            })?;
        let mut gate_up = Landing::new(&record.matrices[0])?;
        let mut down = Landing::new(&record.matrices[1])?;
        let start = self.data_start + record.offset + record.stride * u64::from(id.expert);
        {
            let mut bufs = gate_up.buffers_mut();
            bufs.extend(down.buffers_mut());
            bufs.retain(|b| !b.is_empty());
            let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            if total != record.stride {
                return Err(Error::InvalidInput(format!(
                    "{}: layer {}'s experts are {} bytes, their matrices {total}",
                    self.path.display(),
                    id.layer,
                    record.stride
                )));
            }
            preadv_exact(&self.file, &mut bufs, start).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    let now = self
                        .file
                        .metadata()
                        .map_or("unknown".to_string(), |m| m.len().to_string());
                    Error::io(
                        &self.path,
                        std::io::Error::new(
                            e.kind(),
                            format!(
                                "cannot read bytes {start}..{}: the file now has {now} bytes \
                                 (truncated after it was opened?)",
                                start + record.stride
                            ),
                        ),
                    )
                } else {
                    Error::io(&self.path, e)
                }
            })?;
        }
        let ffn = Ffn::new(gate_up.finish()?, down.finish()?).with_activation(self.activation);
        Ok((ffn, record.stride))
    }

    /// Drops the file's cached pages (a buffered fallback's) before a measured run.
    pub fn drop_cached_pages(&self) -> Result<()> {
        // SAFETY: the descriptor is open; fadvise touches no memory of ours.
        let rc =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::io(&self.path, std::io::Error::from_raw_os_error(rc)));
        }
        Ok(())
    }
}

fn progress_bar(bytes: u64, path: &Path) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if bytes < PROGRESS_BYTES || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(bytes),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "packing experts {bar:30} {bytes}/{total_bytes} {elapsed} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("(once, into {})", path.display()));
    bar
}

/// Fills `bufs` from `file` at `offset` with as few `preadv` calls as it
/// takes; `UnexpectedEof` if the file ends first.
fn preadv_exact(file: &File, bufs: &mut [&mut [u8]], mut offset: u64) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let count = (iov.len() - first).min(1024);
        // SAFETY: every iovec points into a live, exclusively borrowed buffer
        // of its length (`bufs`), advanced below only within it.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`: still inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            identity: Identity {
                version: FORMAT_VERSION,
                files: vec![FileStamp {
                    path: "/models/a.gguf".into(),
                    size: 123,
                    mtime_secs: 1_700_000_000,
                    mtime_nanos: 5,
                }],
                params: "quant=None".into(),
            },
            layers: vec![
                None,
                Some(LayerRecord {
                    offset: 0,
                    stride: 8192,
                    matrices: vec![
                        MatrixRecord::Packed {
                            format: "Q4_0".into(),
                            rows: 64,
                            cols: 32,
                            bias: None,
                        },
                        MatrixRecord::Dense {
                            dtype: "bf16".into(),
                            rows: 32,
                            cols: 32,
                            bias: Some(32),
                        },
                    ],
                }),
            ],
            file_len: 4096 + 8 * 8192,
        }
    }

    fn decode(bytes: &[u8]) -> std::result::Result<(Header, u64), String> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Header::decode(&f)
    }

    #[test]
    fn header_round_trips_and_starts_the_data_on_a_page() {
        let h = header();
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len() % ALIGN, 0);
        let (back, data_start) = decode(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(data_start, bytes.len() as u64);
        for f in FORMATS {
            assert_eq!(parse_format(&format!("{f:?}")).unwrap(), f);
        }
    }

    #[test]
    fn a_damaged_header_is_refused_saying_why() {
        let bytes = header().encode().unwrap();
        let mut flipped = bytes.clone();
        flipped[PREFIX + 10] ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(decode(&magic).unwrap_err().contains("magic"));
        let mut version = bytes.clone();
        version[8] = 99;
        assert!(decode(&version).unwrap_err().contains("format version 99"));
        assert!(
            decode(&bytes[..PREFIX + 5])
                .unwrap_err()
                .contains("truncated")
        );
        assert!(decode(&bytes[..10]).unwrap_err().contains("no header"));
    }

    #[test]
    fn file_names_depend_on_paths_and_parameters_not_on_times() {
        let a = header().identity;
        let mut later = a.clone();
        later.files[0].mtime_secs += 1;
        assert_eq!(a.file_name(), later.file_name());
        assert!(a.file_name().starts_with("a.gguf-") && a.file_name().ends_with(".experts"));
        let mut quant = a.clone();
        quant.params = "quant=Some(Q8_0)".into();
        assert_ne!(a.file_name(), quant.file_name());
    }

    #[test]
    fn expert_file_modes_parse_and_round_trip() {
        for s in ["off", "auto", "on"] {
            assert_eq!(s.parse::<ExpertFileMode>().unwrap().to_string(), s);
        }
        let err = "yes".parse::<ExpertFileMode>().unwrap_err().to_string();
        assert!(err.contains("off, auto, on"), "{err}");
    }

    #[test]
    fn packed_and_dense_matrices_read_back_bit_identical() {
        // hidden 64, ffn 32: gate-up [64, 64] as Q4_0 with a bias, down [64, 32] bf16.
        let w: Vec<f32> = (0..64 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect();
        let dense = Tensor::from_vec(w, (64, 64), &Device::Cpu).unwrap();
        let bias = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap();
        let gate_up = Linear::new(dense.clone(), Some(bias))
            .quantize(QuantKind::Q4_0)
            .unwrap();
        let down = dense.narrow(1, 0, 32).unwrap().contiguous().unwrap();
        let down = Linear::new(down.to_dtype(DType::BF16).unwrap(), None);
        let ffn = Ffn::new(gate_up, down);
        let bytes = expert_bytes(&ffn).unwrap();
        assert_eq!(bytes.len() % ALIGN, 0);
        let records = [
            MatrixRecord::of(ffn.gate_up()).unwrap(),
            MatrixRecord::of(ffn.down()).unwrap(),
        ];
        assert!(
            matches!(&records[0], MatrixRecord::Packed { format, bias: Some(64), .. } if format == "Q4_0")
        );
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let mut g = Landing::new(&records[0]).unwrap();
        let mut d = Landing::new(&records[1]).unwrap();
        {
            let mut bufs = g.buffers_mut();
            bufs.extend(d.buffers_mut());
            bufs.retain(|b| !b.is_empty());
            preadv_exact(&f, &mut bufs, 0).unwrap();
        }
        let back = Ffn::new(g.finish().unwrap(), d.finish().unwrap());
        assert_eq!(expert_bytes(&back).unwrap(), bytes);
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        assert_eq!(
            back.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            ffn.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        // A file that ends early is an error, not zeros.
        let mut g = Landing::new(&records[0]).unwrap();
        let mut bufs = g.buffers_mut();
        bufs.retain(|b| !b.is_empty());
        f.set_len(100).unwrap();
        let err = preadv_exact(&f, &mut bufs, 0).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
