//! Switchyard: run, inspect and slim Mixture-of-Experts language models on
//! machines smaller than the model.
//!
//! Dependencies point one way:
//! `server -> engine -> generate -> model -> experts -> config -> weights -> ops`.

pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod experts;
pub mod generate;
pub mod model;
pub mod ops;
pub mod placement;
pub mod server;
pub mod slim;
pub mod trace;
pub mod train;
pub mod weights;

pub use engine::Engine;
pub use error::{Error, Result};
