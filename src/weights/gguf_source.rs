//! A GGUF file as a [`TensorSource`]. The model asks for Hugging Face names;
//! this translates them with the family's [`MoeNames`] and the shared table in
//! `names` (llama.cpp's gguf-py `tensor_mapping.py`), slices each routed expert out of the merged
//! 3-D `ffn_*_exps` tensors, undoes the q/k row permutation that
//! `convert_hf_to_gguf.py` applies for the `llama` architecture, and joins the
//! halves it splits multi-head latent attention's `kv_b_proj` into.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::TensorSource;
use super::gguf::{GgufDType, GgufFile, GgufTensorInfo, decode, to_qtensor};
use super::names::{GgufLocation, MoeNames};
use super::source::{Reopened, load_stacked};
use crate::error::{Error, Result};
use crate::ops::mxfp4::Mxfp4Matrix;
use crate::ops::{BlockRows, Embedding, Linear};

/// Query/key head counts, for undoing the converter's rotary permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkHeads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

pub struct GgufSource {
    file: GgufFile,
    /// The family's MoE tensor names, to translate Hugging Face names.
    names: &'static MoeNames,
    /// `Some` for files whose q/k rows are in llama.cpp's interleaved rotary
    /// order (architecture `llama`): `LlamaModel.permute` in `convert_hf_to_gguf.py`.
    permuted_qk: Option<QkHeads>,
}

/// Quantized row blocks stacked into one matrix.
enum Stacked {
    Ggml(QTensor),
    Mxfp4(Mxfp4Matrix),
}

/// One tensor's encoded bytes, ready to decode.
struct Piece<'a> {
    info: &'a GgufTensorInfo,
    bytes: Cow<'a, [u8]>,
    /// The shape of this piece (one expert's matrix for merged experts).
    shape: Vec<usize>,
}

impl GgufSource {
    pub fn new(file: GgufFile, names: &'static MoeNames, permuted_qk: Option<QkHeads>) -> Self {
        Self {
            file,
            names,
            permuted_qk,
        }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn locate(&self, hf: &str) -> Result<GgufLocation> {
        self.names
            .gguf_location(hf)
            .ok_or_else(|| Error::MissingTensor {
                name: hf.to_string(),
                hint: format!(
                    " (no GGUF name is known for it; reading {})",
                    self.file.path().display()
                ),
            })
    }

    /// The location in this file: merged experts, or the per-expert tensors
    /// (`blk.N.ffn_gate.E.weight`) of GGUFs converted before llama.cpp merged them.
    fn resolve(&self, loc: GgufLocation) -> GgufLocation {
        match loc.expert {
            Some(e) if !self.file.contains(&loc.name) => {
                let legacy = loc.name.replace("_exps.weight", &format!(".{e}.weight"));
                if self.file.contains(&legacy) {
                    return GgufLocation {
                        name: legacy,
                        expert: None,
                    };
                }
                loc
            }
            _ => loc,
        }
    }

    /// The bytes and shape of `hf`, checked against `shape` (dimensions of size
    /// one are ignored: the converter squeezes them), q/k rows un-permuted.
    fn piece(&self, hf: &str, shape: &[usize]) -> Result<Piece<'_>> {
        let loc = self.resolve(self.locate(hf)?);
        let info = self.file.require(&loc.name)?;
        let (bytes, stored_shape) = match loc.expert {
            None => (self.file.bytes(&loc.name)?, info.shape.clone()),
            Some(e) => {
                // Merged matrices `[n, rows, cols]`, merged biases `[n, width]`.
                let (n, inner) = match info.shape.split_first() {
                    Some((&n, inner)) if matches!(inner.len(), 1 | 2) => (n, inner.to_vec()),
                    _ => {
                        return Err(self.bad(
                            &loc.name,
                            format!(
                                "merged expert tensor has shape {:?}, expected 2 or 3 dimensions",
                                info.shape
                            ),
                        ));
                    }
                };
                if e >= n {
                    return Err(
                        self.bad(&loc.name, format!("has {n} experts, expert {e} requested"))
                    );
                }
                (self.file.part_bytes(&loc.name, e, n)?, inner)
            }
        };
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&stored_shape) != squeeze(shape) {
            return Err(Error::ShapeMismatch {
                name: format!("{hf} (GGUF `{}`)", loc.name),
                expected: shape.to_vec(),
                found: stored_shape,
            });
        }
        let bytes = match self.heads_to_unpermute(&loc.name) {
            Some(heads) => {
                let rows = shape.first().copied().unwrap_or(0);
                Cow::Owned(self.unpermute_rows(&loc.name, &bytes, rows, heads)?)
            }
            None => bytes,
        };
        Ok(Piece {
            info,
            bytes,
            shape: shape.to_vec(),
        })
    }

    fn heads_to_unpermute(&self, gguf_name: &str) -> Option<usize> {
        let heads = self.permuted_qk?;
        let (_, local) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
        match local {
            "attn_q.weight" | "attn_q.bias" => Some(heads.num_heads),
            "attn_k.weight" | "attn_k.bias" => Some(heads.num_kv_heads),
            _ => None,
        }
    }

    /// Inverse of `LlamaModel.permute`: within each head the converter stores row
    /// `2 i + j` for Hugging Face row `j * head_dim / 2 + i` (`j` in 0..2).
    fn unpermute_rows(
        &self,
        gguf_name: &str,
        bytes: &[u8],
        rows: usize,
        heads: usize,
    ) -> Result<Vec<u8>> {
        if heads == 0
            || rows == 0
            || !rows.is_multiple_of(heads)
            || !(rows / heads).is_multiple_of(2)
            || !bytes.len().is_multiple_of(rows)
        {
            return Err(self.bad(
                gguf_name,
                format!("{rows} rows cannot be split into {heads} heads of an even size"),
            ));
        }
        let head_dim = rows / heads;
        let half = head_dim / 2;
        // invariant: rows = heads * head_dim divides the byte length (checked above),
        // so every `src < rows` row lies inside `bytes`.
        let row_bytes = bytes.len() / rows;
        let mut out = Vec::with_capacity(bytes.len());
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_dim + 2 * i + j;
                    out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        Ok(out)
    }

    /// `attn_k_b` and `attn_v_b` where the file has them instead of the
    /// `attn_kv_b` that `hf` names.
    fn split_kv_b(&self, hf: &str) -> Option<[String; 2]> {
        let name = self.names.gguf_location(hf)?.name;
        let block = name.strip_suffix("attn_kv_b.weight")?;
        let halves = ["attn_k_b", "attn_v_b"].map(|h| format!("{block}{h}.weight"));
        (!self.file.contains(&name) && halves.iter().all(|h| self.file.contains(h)))
            .then_some(halves)
    }

    /// Checks llama.cpp's split of `kv_b_proj` against its `shape`
    /// (`[heads * (nope + v), rank]`, per head its key rows then its value
    /// rows): `attn_k_b` keeps each head's key part transposed for llama.cpp's
    /// absorbed decode, `[heads, rank, nope]`, `attn_v_b` the value part as is,
    /// `[heads, v, rank]`.
    fn check_kv_b(&self, hf: &str, [k_name, v_name]: &[String; 2], shape: &[usize]) -> Result<()> {
        let (k, v) = (self.file.require(k_name)?, self.file.require(v_name)?);
        let fits = match (&k.shape[..], &v.shape[..]) {
            (&[heads, rank, nope], &[v_heads, vd, v_rank]) => {
                v_heads == heads && v_rank == rank && shape == [heads * (nope + vd), rank]
            }
            _ => false,
        };
        if fits {
            return Ok(());
        }
        Err(self.bad(
            k_name,
            format!(
                "{:?} and `{v_name}` {:?} are not the halves of `{hf}` {shape:?}: expected [heads, rank, nope] and [heads, v, rank]",
                k.shape, v.shape
            ),
        ))
    }

    /// `kv_b_proj` joined from its halves ([`Self::check_kv_b`]), decoded to
    /// floats: the halves are not row blocks of one quantized matrix.
    fn joined_kv_b(
        &self,
        hf: &str,
        halves: &[String; 2],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        self.check_kv_b(hf, halves, shape)?;
        let [k, v] = halves.each_ref().map(|name| -> Result<Tensor> {
            let info = self.file.require(name)?;
            decode(&self.file.bytes(name)?, info.dtype, &info.shape, DType::F32)
        });
        let k = k?.transpose(1, 2)?; // [heads, nope, rank]
        Ok(Tensor::cat(&[k, v?], 1)?
            .reshape((shape[0], shape[1]))?
            .to_dtype(dtype)?)
    }

    fn bad(&self, gguf_name: &str, reason: String) -> Error {
        Error::Gguf {
            path: self.file.path().to_path_buf(),
            reason: format!("tensor `{gguf_name}` {reason}"),
        }
    }

    /// Row blocks of one quantized GGML type stacked into one `QTensor` (MXFP4:
    /// one [`Mxfp4Matrix`] for our kernels), or `None` when a part is a float
    /// type or the parts' types differ.
    fn stacked_quantized(&self, parts: &[(&str, usize)], cols: usize) -> Result<Option<Stacked>> {
        if parts
            .iter()
            .any(|&(name, _)| self.split_kv_b(name).is_some())
        {
            return Ok(None);
        }
        let pieces = parts
            .iter()
            .map(|&(name, rows)| self.piece(name, &[rows, cols]))
            .collect::<Result<Vec<_>>>()?;
        let Some(dtype) = pieces.first().map(|p| p.info.dtype) else {
            return Ok(None);
        };
        if matches!(
            dtype.ggml(),
            Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        ) || pieces.iter().any(|p| p.info.dtype != dtype)
        {
            return Ok(None);
        }
        let rows: usize = parts.iter().map(|&(_, r)| r).sum();
        // Rows are whole blocks, so stacking rows is concatenating bytes.
        let bytes: Cow<'_, [u8]> = if let [one] = &pieces[..] {
            Cow::Borrowed(&one.bytes)
        } else {
            let mut bytes = Vec::with_capacity(pieces.iter().map(|p| p.bytes.len()).sum());
            for p in &pieces {
                bytes.extend_from_slice(&p.bytes);
            }
            Cow::Owned(bytes)
        };
        let stacked = match dtype {
            GgufDType::Mxfp4 => Stacked::Mxfp4(Mxfp4Matrix::from_ggml(&bytes, rows, cols)?),
            GgufDType::Ggml(d) => Stacked::Ggml(to_qtensor(&bytes, d, &[rows, cols])?),
        };
        drop(bytes);
        for p in &pieces {
            self.file.release(&p.bytes);
        }
        Ok(Some(stacked))
    }
}

impl TensorSource for GgufSource {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if let Some(halves) = self.split_kv_b(name) {
            return self.joined_kv_b(name, &halves, shape, dtype);
        }
        let p = self.piece(name, shape)?;
        let t = decode(&p.bytes, p.info.dtype, &p.shape, dtype);
        self.file.release(&p.bytes);
        t
    }

    /// A table in a quantized GGML type stays in the file: each lookup reads its
    /// tokens' rows ([`FileRows`]). Float tables are loaded in `dtype`.
    fn load_embedding(&self, name: &str, shape: [usize; 2], dtype: DType) -> Result<Embedding> {
        let p = self.piece(name, &shape)?;
        match p.info.dtype.ggml() {
            Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) | None => {
                let table = decode(&p.bytes, p.info.dtype, &p.shape, dtype);
                self.file.release(&p.bytes);
                Embedding::dense(table?)
            }
            // The map lent `p.bytes` untouched; nothing was faulted in to release.
            Some(d) => {
                let gguf_name = self.resolve(self.locate(name)?).name;
                let rows = FileRows::open(self.file.path(), &gguf_name, p.info)?;
                Embedding::blocks(d, shape[0], shape[1], Box::new(rows))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        (self.names.gguf_location(name))
            .is_some_and(|loc| self.file.contains(&self.resolve(loc).name))
            || self.split_kv_b(name).is_some()
    }

    fn drop_cached_pages(&self) -> Result<()> {
        self.file.drop_cached_pages()
    }

    fn reopen_for_reads(&self) -> Result<Option<Reopened>> {
        let (file, stats) = self.file.with_positioned_reads()?;
        Ok(Some(Reopened {
            files: vec![file.path().to_path_buf()],
            source: Box::new(GgufSource::new(file, self.names, self.permuted_qk)),
            stats,
        }))
    }

    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.split_kv_b(name) {
            Some(halves) => self.check_kv_b(name, &halves, shape),
            None => self.piece(name, shape).map(|_| ()),
        }
    }

    /// Quantized GGUF matrices stay quantized (Q8_0 / Q4_0 on our kernels, other
    /// GGML types on candle's); float ones are converted to `dtype`.
    fn load_linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        dtype: DType,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        match self.stacked_quantized(parts, cols)? {
            Some(Stacked::Ggml(q)) => Linear::from_qtensor(q, bias),
            Some(Stacked::Mxfp4(m)) => Ok(Linear::from_mxfp4(m, bias)),
            None => Ok(Linear::new(load_stacked(self, parts, cols, dtype)?, bias)),
        }
    }
}

/// A tensor's bytes read from its GGUF file on demand (the token embedding):
/// a lookup reads only its tokens' rows, one positioned read each, so the
/// table costs the process no memory, as llama.cpp's map, which faults in only
/// the rows it touches. Unlike a map, a file truncated after load fails the
/// lookup with an error naming it instead of SIGBUS.
#[derive(Debug)]
pub struct FileRows {
    file: File,
    path: PathBuf,
    /// The tensor's GGUF name, for errors.
    name: String,
    start: u64,
    len: usize,
}

impl FileRows {
    fn open(path: &Path, name: &str, info: &GgufTensorInfo) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // Lookups jump around the table: readahead would only fill the page
        // cache with rows no one asked for. Advice only, so a refusal is not an error.
        // SAFETY: the descriptor is open; fadvise touches no memory of ours.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            name: name.to_string(),
            start: info.file_offset() as u64,
            len: info.size_in_bytes(),
        })
    }
}

impl BlockRows for FileRows {
    fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let end = offset + out.len();
        if end > self.len {
            return Err(Error::InvalidInput(format!(
                "{}: bytes {offset}..{end} are outside tensor `{}` of {} bytes",
                self.path.display(),
                self.name,
                self.len
            )));
        }
        self.file
            .read_exact_at(out, self.start + offset as u64)
            .map_err(|e| {
                let e = std::io::Error::new(
                    e.kind(),
                    format!(
                        "reading tensor `{}` bytes {offset}..{end}: {e} (truncated after load?)",
                        self.name
                    ),
                );
                Error::io(&self.path, e)
            })
    }

    fn resident_bytes(&self) -> usize {
        0
    }
}
