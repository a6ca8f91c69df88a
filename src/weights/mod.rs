//! Where checkpoint bytes come from. Safetensors files are memory-mapped so that
//! a tensor costs nothing until it is read.

mod safetensors;
mod source;

pub use self::safetensors::{SafetensorsFiles, StoredDtype, TensorMeta};
pub use source::TensorSource;
