//! Switchyard: run, inspect and slim Mixture-of-Experts language models on
//! machines smaller than the model.
//!
//! Dependencies point one way:
//! `generate -> model -> experts -> config -> weights -> ops`.

pub mod config;
pub mod error;
pub mod experts;
pub mod model;
pub mod ops;
pub mod weights;

pub use error::{Error, Result};
