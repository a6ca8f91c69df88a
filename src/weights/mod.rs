//! Where checkpoint bytes come from. Safetensors files are memory-mapped so that
//! a tensor costs nothing until it is read; GGUF files likewise, their Hugging
//! Face names translated by one table (`gguf_source`).

mod backing;
mod gguf;
mod gguf_source;
mod safetensors;
mod source;

pub use self::safetensors::{SafetensorsFiles, StoredDtype, TensorMeta};
pub use backing::{ReadStats, ReadTotals};
pub use gguf::{GgufFile, GgufTensorInfo, GgufValue};
pub use gguf_source::{
    EXPERT_NAMES, GLOBAL_NAMES, GgufLocation, GgufSource, LAYER_NAMES, QkHeads, gguf_location,
};
pub use source::{Reopened, TensorSource};
