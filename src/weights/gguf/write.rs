//! Writing a GGUF file derived from another: the source's metadata entries
//! copied byte for byte (so key order, array element types and values nothing
//! here parses survive), except the ones replaced or added, and a new tensor
//! table over tensors given as encoded bytes, copied as stored (quantized
//! blocks are never re-encoded). Offsets are recomputed and every tensor's data
//! starts on the source's alignment, as the GGUF spec requires.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::parse::ggml_code;
use super::{GgufDType, GgufFile, GgufValue, MAGIC};
use crate::error::{Error, Result};

/// One tensor of the file being written.
#[derive(Debug, Clone)]
pub struct GgufTensorOut<'a> {
    pub name: String,
    pub dtype: GgufDType,
    /// Outermost dimension first (as [`GgufTensorInfo::shape`](super::GgufTensorInfo)).
    pub shape: Vec<usize>,
    /// The encoded bytes, concatenated from these pieces (slices of a mapped
    /// file stay borrowed: nothing is copied in memory): exactly what `dtype`
    /// and `shape` take.
    pub data: Vec<Cow<'a, [u8]>>,
}

impl GgufFile {
    /// Writes a GGUF file at `out` with this file's version, alignment and
    /// metadata, each key in `replace` given its new value (appended when the
    /// source lacks it), and `tensors` in the order given. Writes `out`
    /// directly: callers that need atomicity pass a temporary path and rename.
    /// Returns the bytes written.
    pub fn write_edited(
        &self,
        out: &Path,
        replace: &[(String, GgufValue)],
        tensors: &[GgufTensorOut<'_>],
    ) -> Result<u64> {
        let bad = |reason: String| Error::Gguf {
            path: out.to_path_buf(),
            reason,
        };
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend(self.version.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        let added: Vec<&(String, GgufValue)> = (replace.iter())
            .filter(|(key, _)| !self.entries.iter().any(|(k, _)| k == key))
            .collect();
        head.extend(((self.entries.len() + added.len()) as u64).to_le_bytes());
        for (key, range) in &self.entries {
            match replace.iter().find(|(k, _)| k == key) {
                Some((_, value)) => put_entry(&mut head, key, value).map_err(bad)?,
                None => head.extend_from_slice(&self.backing.range(
                    &self.path,
                    range.start,
                    range.end,
                )?),
            }
        }
        for (key, value) in added {
            put_entry(&mut head, key, value).map_err(bad)?;
        }
        let align = self.alignment as u64;
        let mut offset = 0u64;
        for t in tensors {
            let len: usize = t.data.iter().map(|p| p.len()).sum();
            let expected = encoded_size(t.dtype, &t.shape).ok_or_else(|| {
                bad(format!(
                    "tensor `{}`: shape {:?} overflows",
                    t.name, t.shape
                ))
            })?;
            if len != expected || t.shape.is_empty() || t.shape.len() > 4 {
                return Err(bad(format!(
                    "tensor `{}`: {len} bytes given for a {:?} {:?} tensor ({expected} bytes, 1 to 4 dimensions)",
                    t.name, t.dtype, t.shape
                )));
            }
            put_string(&mut head, &t.name);
            head.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend((d as u64).to_le_bytes());
            }
            head.extend(ggml_code(t.dtype).to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset = (offset + len as u64).div_ceil(align) * align;
        }
        pad(&mut head, align);

        let file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
        let mut w = BufWriter::new(file);
        let io = |e| Error::io(out, e);
        w.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        for t in tensors {
            for piece in &t.data {
                w.write_all(piece).map_err(io)?;
                written += piece.len() as u64;
            }
            let padding = written.div_ceil(align) * align - written;
            w.write_all(&vec![0u8; padding as usize]).map_err(io)?;
            written += padding;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(written)
    }
}

/// Bytes a `dtype` tensor of `shape` takes (whole blocks along the innermost dimension).
fn encoded_size(dtype: GgufDType, shape: &[usize]) -> Option<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let row = shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(dtype.block_size()) {
        return None;
    }
    (numel / dtype.block_size()).checked_mul(dtype.type_size())
}

fn pad(buf: &mut Vec<u8>, align: u64) {
    let len = buf.len() as u64;
    buf.resize((len.div_ceil(align) * align) as usize, 0);
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_entry(buf: &mut Vec<u8>, key: &str, value: &GgufValue) -> std::result::Result<(), String> {
    put_string(buf, key);
    buf.extend(value_type(value).to_le_bytes());
    put_value(buf, value).map_err(|e| format!("metadata `{key}`: {e}"))
}

/// The GGUF value type number (`gguf_type` in the spec).
fn value_type(value: &GgufValue) -> u32 {
    match value {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, value: &GgufValue) -> std::result::Result<(), String> {
    match value {
        GgufValue::U8(v) => buf.push(*v),
        GgufValue::I8(v) => buf.extend(v.to_le_bytes()),
        GgufValue::U16(v) => buf.extend(v.to_le_bytes()),
        GgufValue::I16(v) => buf.extend(v.to_le_bytes()),
        GgufValue::U32(v) => buf.extend(v.to_le_bytes()),
        GgufValue::I32(v) => buf.extend(v.to_le_bytes()),
        GgufValue::U64(v) => buf.extend(v.to_le_bytes()),
        GgufValue::I64(v) => buf.extend(v.to_le_bytes()),
        GgufValue::F32(v) => buf.extend(v.to_le_bytes()),
        GgufValue::F64(v) => buf.extend(v.to_le_bytes()),
        GgufValue::Bool(v) => buf.push(u8::from(*v)),
        GgufValue::String(s) => put_string(buf, s),
        GgufValue::Array(items) => {
            // An array's elements share one type, written once before them.
            let ty = items.first().map_or(0, value_type);
            if items.iter().any(|v| value_type(v) != ty) {
                return Err("array elements of different types".to_string());
            }
            buf.extend(ty.to_le_bytes());
            buf.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;

    /// A file written from scratch reads back with the same metadata and tensors.
    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.gguf");
        // A minimal source: one metadata entry, no tensors.
        let mut b = MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_entry(
            &mut b,
            "general.architecture",
            &GgufValue::String("x".into()),
        )
        .unwrap();
        std::fs::write(&src, &b).unwrap();
        let file = GgufFile::open(&src).unwrap();
        let out = dir.path().join("out.gguf");
        let q8 = [7u8; 34 * 2];
        let tensors = [
            GgufTensorOut {
                name: "a".into(),
                dtype: GgmlDType::F32.into(),
                shape: vec![3],
                data: vec![Cow::Owned(vec![1u8; 12])],
            },
            GgufTensorOut {
                name: "b".into(),
                dtype: GgmlDType::Q8_0.into(),
                shape: vec![2, 32],
                data: vec![Cow::Borrowed(&q8[..34]), Cow::Borrowed(&q8[34..])],
            },
        ];
        let replace = [
            (
                "general.architecture".to_string(),
                GgufValue::String("yz".into()),
            ),
            (
                "x.list".to_string(),
                GgufValue::Array(vec![GgufValue::U32(4), GgufValue::U32(5)]),
            ),
        ];
        file.write_edited(&out, &replace, &tensors).unwrap();
        let back = GgufFile::open(&out).unwrap();
        assert_eq!(
            back.get("general.architecture").unwrap().as_str(),
            Some("yz")
        );
        assert_eq!(back.get("x.list"), Some(&replace[1].1));
        assert_eq!(back.tensor_names_in_file_order(), ["a", "b"]);
        assert_eq!(back.tensor_info("b").unwrap().shape, vec![2, 32]);
        assert_eq!(&*back.bytes("b").unwrap(), &q8[..]);
        assert_eq!(back.tensor_info("b").unwrap().start % 32, 0);
        // Bytes that do not fit the shape are refused, naming the tensor.
        let wrong = [GgufTensorOut {
            data: vec![Cow::Owned(vec![0u8; 11])],
            ..tensors[0].clone()
        }];
        let err = file
            .write_edited(&out, &[], &wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor `a`: 11 bytes"), "{err}");
    }
}
