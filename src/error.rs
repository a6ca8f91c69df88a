//! One error type for the library. Messages name the file, tensor or field at fault,
//! because the person reading them usually cannot see the code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source is part of the message (not a `#[source]`), so reports that
    /// print the error chain do not repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: not a valid GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("unknown model_type {found:?}; supported: {}", supported.join(", "))]
    UnknownArchitecture {
        found: String,
        supported: Vec<&'static str>,
    },

    #[error("tensor {name:?} not found in the checkpoint{hint}")]
    MissingTensor { name: String, hint: String },

    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor {name:?} has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },

    /// A routing trace that cannot be read or does not fit what it is used with.
    #[error("{path}: {reason}")]
    Trace { path: PathBuf, reason: String },

    /// An expert read on demand (`--expert-memory`) that failed mid-run.
    #[error("reading expert {expert} of layer {layer}: {reason}")]
    ExpertRead {
        layer: u32,
        expert: u32,
        reason: String,
    },

    #[error("{0}")]
    InvalidInput(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A training run that cannot go on (a non-finite loss or gradient).
    #[error("training: {0}")]
    Training(String),

    /// The HTTP server's listener failed (the model thread stopped with it).
    #[error("the HTTP listener: {0}")]
    Serve(std::io::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn trace(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Trace {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
