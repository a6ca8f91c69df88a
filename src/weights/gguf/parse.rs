//! Parsing and validating a GGUF header, metadata and tensor table against the
//! file length: every count, length and extent is checked before it is used.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::{GgufDType, GgufTensorInfo, GgufValue, MAGIC};

const DEFAULT_ALIGNMENT: usize = 32;
/// GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
/// Nesting limit for array values (real files use one level).
const MAX_ARRAY_DEPTH: usize = 4;

/// The GGML types Switchyard decodes, by their number in `ggml.h`.
fn ggml_dtype(code: u32) -> std::result::Result<GgufDType, String> {
    Ok(GgufDType::Ggml(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        39 => return Ok(GgufDType::Mxfp4),
        other => {
            let name = match other {
                9 => "Q8_1",
                15 => "Q8_K",
                16..=23 | 29 => "an IQ type",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                34 | 35 => "a ternary type",
                _ => "unknown",
            };
            return Err(format!(
                "GGML type {other} ({name}) is not supported \
                 (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, MXFP4)"
            ));
        }
    }))
}
/// A GGML type's number in `ggml.h`, the inverse of [`ggml_dtype`].
pub(super) fn ggml_code(dtype: GgufDType) -> u32 {
    let GgufDType::Ggml(dtype) = dtype else {
        return 39;
    };
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

pub(super) struct Parsed {
    pub(super) version: u32,
    pub(super) metadata: BTreeMap<String, GgufValue>,
    /// Each metadata entry's key and byte range (key, type and value), in file
    /// order: what a rewrite copies unchanged.
    pub(super) entries: Vec<(String, Range<usize>)>,
    pub(super) alignment: usize,
    pub(super) tensors: HashMap<String, GgufTensorInfo>,
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

type Parse<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Parse<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, but the file ends at byte {}",
                self.pos,
                self.data.len()
            ));
        }
        // invariant: n <= remaining, checked just above.
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count or length, checked to fit what is left of the file when each
    /// item takes at least `min_item_bytes`.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Parse<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_item_bytes) <= self.remaining());
        fits.ok_or_else(|| {
            format!(
                "{what} at byte {at} is {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            )
        })
    }

    fn string(&mut self, what: &str) -> Parse<String> {
        let len = self.count(1, &format!("length of {what}"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("{what} at byte {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Parse<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{what}: bool byte is {b}, expected 0 or 1")),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let elem_ty = self.u32(&format!("element type of {what}"))?;
                let min = min_value_bytes(elem_ty)
                    .ok_or_else(|| format!("{what}: unknown array element type {elem_ty}"))?;
                let n = self.count(min, &format!("element count of {what}"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1, what)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` occupies.
fn min_value_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

pub(super) fn parse(data: &[u8]) -> Parse<Parsed> {
    let mut r = Reader { data, pos: 0 };
    let magic = r
        .take(4, "magic")
        .map_err(|_| format!("file is {} bytes, too short for a GGUF header", data.len()))?;
    if magic != MAGIC {
        return Err(format!(
            "bad magic {magic:02x?} (expected \"GGUF\"); not a GGUF file"
        ));
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are; a huge number means a big-endian file)"
        ));
    }
    // A tensor info takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes.
    let n_tensors = r.count(32, "tensor count")?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes.
    let n_kv = r.count(13, "metadata count")?;

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let entry_start = r.pos;
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("type of metadata `{key}`"))?;
        let value = r.value(ty, 0, &format!("metadata `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        entries.push((key, entry_start..r.pos));
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if *a > 0 && a.is_multiple_of(8) => *a as usize,
        Some(other) => {
            return Err(format!(
                "general.alignment is {other:?}; it must be a uint32 multiple of 8"
            ));
        }
    };

    struct Raw {
        name: String,
        dtype: GgufDType,
        shape: Vec<usize>,
        offset: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor #{i}"))?;
        let n_dims = r.u32(&format!("dimension count of tensor `{name}`"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = r.u64(&format!("dimensions of tensor `{name}`"))?;
            let d = usize::try_from(d)
                .map_err(|_| format!("tensor `{name}` has dimension {d}, too large"))?;
            dims.push(d);
        }
        let code = r.u32(&format!("type of tensor `{name}`"))?;
        let dtype = ggml_dtype(code).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let offset = r.u64(&format!("data offset of tensor `{name}`"))?;
        dims.reverse();
        raws.push(Raw {
            name,
            dtype,
            shape: dims,
            offset,
        });
    }

    let data_start = r.pos.div_ceil(alignment) * alignment;
    let file_len = data.len();
    let mut tensors = HashMap::with_capacity(raws.len());
    for raw in raws {
        let name = &raw.name;
        let numel = raw
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}` shape {:?} overflows", raw.shape))?;
        let block = raw.dtype.block_size();
        let row = raw.shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}` has rows of {row} elements, not a multiple of the {:?} block size {block}",
                raw.dtype
            ));
        }
        let size = (numel / block)
            .checked_mul(raw.dtype.type_size())
            .ok_or_else(|| format!("tensor `{name}` shape {:?} overflows", raw.shape))?;
        let start = usize::try_from(raw.offset)
            .ok()
            .and_then(|o| data_start.checked_add(o))
            .ok_or_else(|| {
                format!(
                    "tensor `{name}` has data offset {} out of range",
                    raw.offset
                )
            })?;
        if !raw.offset.is_multiple_of(alignment as u64) {
            return Err(format!(
                "tensor `{name}` data offset {} is not a multiple of the alignment {alignment}",
                raw.offset
            ));
        }
        let end = start
            .checked_add(size)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                format!(
                    "truncated: tensor `{name}` ({:?} {:?}) needs bytes {start}..{}, but the file is {file_len} bytes",
                    raw.dtype,
                    raw.shape,
                    start.saturating_add(size)
                )
            })?;
        let info = GgufTensorInfo {
            dtype: raw.dtype,
            shape: raw.shape,
            start,
            end,
        };
        if tensors.insert(raw.name.clone(), info).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
    }
    Ok(Parsed {
        version,
        metadata,
        entries,
        alignment,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    fn err(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn rejects_wrong_magic_and_short_files() {
        assert!(err(b"GGU").contains("too short"));
        assert!(err(b"GGML\x03\0\0\0").contains("bad magic"));
    }

    #[test]
    fn rejects_counts_larger_than_the_file() {
        let e = err(&header(u64::MAX, 0));
        assert!(e.contains("tensor count"), "{e}");
        let mut b = header(0, 1);
        b.extend(u64::MAX.to_le_bytes()); // key length
        b.extend([0u8; 16]);
        let e = err(&b);
        assert!(e.contains("length of metadata key #0"), "{e}");
    }

    #[test]
    fn reads_metadata_and_a_tensor() {
        let mut b = header(1, 1);
        let key = b"general.architecture";
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key);
        b.extend(8u32.to_le_bytes());
        b.extend(8u64.to_le_bytes());
        b.extend(b"qwen3moe");
        let name = b"w";
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name);
        b.extend(2u32.to_le_bytes());
        b.extend(3u64.to_le_bytes()); // innermost
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        let full: Vec<u8> = b.iter().copied().chain([0u8; 24]).collect();
        let p = parse(&full).unwrap();
        assert_eq!(
            p.metadata["general.architecture"].as_str(),
            Some("qwen3moe")
        );
        assert_eq!(p.tensors["w"].shape, vec![2, 3]);
        let e = err(&full[..full.len() - 1]);
        assert!(e.starts_with("truncated: tensor `w`"), "{e}");
    }
}
