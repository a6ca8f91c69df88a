//! Where checkpoint bytes come from. Safetensors files are memory-mapped so that
//! a tensor costs nothing until it is read; GGUF files likewise, their Hugging
//! Face names translated by one table (`names`).

mod backing;
mod gguf;
mod gguf_source;
mod names;
mod safetensors;
mod source;

pub use self::safetensors::{SafetensorsFiles, StoredDtype, TensorMeta};
pub use backing::{ReadStats, ReadTotals};
pub use gguf::{GgufDType, GgufFile, GgufTensorInfo, GgufTensorOut, GgufValue};
pub use gguf_source::{GgufSource, QkHeads};
pub use names::{MoeNames, NamePair, SharedExpertNames};
pub use source::{MatrixLayout, Reopened, TensorSource, deinterleave, mxfp4_blocks_per_row};
