//! Routing observers and the analyses built on them: a trace recorder, the
//! Parquet trace writer and reader, expert load entropy and consecutive-token
//! expert reuse (locality).

mod analysis;
mod parquet;
mod recorder;

pub use analysis::{consecutive_reuse, entropy_bits, load_entropy, loads, uniform_reuse};
pub use parquet::{Trace, TraceMeta, TraceRow, TraceRows, TraceWriter, read_trace};
pub use recorder::RoutingTrace;
