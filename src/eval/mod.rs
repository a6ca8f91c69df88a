//! Model quality yardsticks: sliding-window perplexity on a text.

mod perplexity;

pub use perplexity::{PerplexityOptions, PerplexityReport, Window, perplexity, windows};
