//! Routing traces as Parquet: one row per (sequence, position, layer, rank),
//! readable by pandas and polars as is.
//!
//! | column | type | meaning |
//! |---|---|---|
//! | sequence | UInt64 | stable sequence id |
//! | position | UInt32 | absolute token position in its sequence |
//! | layer | UInt32 | decoder layer index (dense layers write no rows) |
//! | rank | UInt32 | 0 = the router's best choice |
//! | expert | UInt32 | expert id |
//! | weight | Float32 | mixing weight applied |
//! | score | Float32 | router probability before any selection bias |
//! | cache | Utf8, nullable | hit / miss / prefetched / stand_in under an expert budget, else null |
//!
//! File key-value metadata: `switchyard.num_layers`, `switchyard.num_experts`,
//! `switchyard.top_k`, `switchyard.moe_layers` (comma-separated layer ids) and
//! `switchyard.model`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::parquet::arrow::ArrowWriter;
use ::parquet::arrow::ProjectionMask;
use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ::parquet::basic::Compression;
use ::parquet::file::metadata::KeyValue;
use ::parquet::file::properties::WriterProperties;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};

use crate::config::{ModelConfig, limits};
use crate::error::{Error, Result};
use crate::experts::CacheOutcome;
use crate::model::moe::Routing;
use crate::model::{RoutingObserver, RoutingSite};

/// Rows buffered before a row group is written out: about 9 MB of columns, so a
/// long trace never holds more than one row group in memory.
const ROW_GROUP_ROWS: usize = 1 << 18;

const KEY_NUM_LAYERS: &str = "switchyard.num_layers";
const KEY_NUM_EXPERTS: &str = "switchyard.num_experts";
const KEY_TOP_K: &str = "switchyard.top_k";
const KEY_MOE_LAYERS: &str = "switchyard.moe_layers";
const KEY_MODEL: &str = "switchyard.model";

/// The model a trace was taken from, as stored in the file's key-value metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceMeta {
    /// Decoder layers of the model, dense ones included.
    pub num_layers: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts each token is routed to (rows per (token, layer) are at most this).
    pub top_k: usize,
    /// The layers that route, ascending.
    pub moe_layers: Vec<usize>,
    /// The model path or name as given.
    pub model: String,
}

impl TraceMeta {
    pub fn of_model(config: &ModelConfig, model: impl Into<String>) -> Self {
        Self {
            num_layers: config.num_layers,
            num_experts: config.moe.num_experts,
            top_k: config.moe.top_k,
            moe_layers: (config.moe.sparse_layers.iter().enumerate())
                .filter_map(|(l, &sparse)| sparse.then_some(l))
                .collect(),
            model: model.into(),
        }
    }

    /// Refuses a trace taken from a model of another shape, naming both shapes.
    pub fn check_model(&self, config: &ModelConfig, trace_path: &Path) -> Result<()> {
        let model = TraceMeta::of_model(config, "");
        if (self.num_experts, &self.moe_layers) == (model.num_experts, &model.moe_layers) {
            return Ok(());
        }
        Err(Error::trace(
            trace_path,
            format!(
                "the trace is of a model with {} experts in MoE layers [{}] ({} layers), \
                 the model has {} experts in MoE layers [{}] ({} layers)",
                self.num_experts,
                join(&self.moe_layers),
                self.num_layers,
                model.num_experts,
                join(&model.moe_layers),
                model.num_layers
            ),
        ))
    }

    fn key_values(&self) -> Vec<KeyValue> {
        [
            (KEY_NUM_LAYERS, self.num_layers.to_string()),
            (KEY_NUM_EXPERTS, self.num_experts.to_string()),
            (KEY_TOP_K, self.top_k.to_string()),
            (KEY_MOE_LAYERS, join(&self.moe_layers)),
            (KEY_MODEL, self.model.clone()),
        ]
        .into_iter()
        .map(|(k, v)| KeyValue::new(k.to_string(), v))
        .collect()
    }

    fn from_key_values(path: &Path, kv: Option<&Vec<KeyValue>>) -> Result<Self> {
        let get = |key: &str| -> Result<&str> {
            kv.into_iter()
                .flatten()
                .find(|e| e.key == key)
                .and_then(|e| e.value.as_deref())
                .ok_or_else(|| {
                    Error::trace(
                        path,
                        format!("file metadata lacks {key} (not a Switchyard routing trace?)"),
                    )
                })
        };
        let number = |key: &str| -> Result<usize> {
            let text = get(key)?;
            text.trim().parse().map_err(|_| {
                Error::trace(path, format!("file metadata {key}={text:?} is not a count"))
            })
        };
        let moe_layers: Vec<usize> = get(KEY_MOE_LAYERS)?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::trace(
                    path,
                    format!("file metadata {KEY_MOE_LAYERS} is not a list of layer ids"),
                )
            })?;
        let meta = Self {
            num_layers: number(KEY_NUM_LAYERS)?,
            num_experts: number(KEY_NUM_EXPERTS)?,
            top_k: number(KEY_TOP_K)?,
            moe_layers,
            model: get(KEY_MODEL)?.to_string(),
        };
        // The shape sizes what analysis allocates (co-activation keeps `E * E`
        // counts per layer pair), so it meets the same limits as a model config.
        for (key, value, max) in [
            (KEY_NUM_LAYERS, meta.num_layers, limits::MAX_LAYERS),
            (KEY_NUM_EXPERTS, meta.num_experts, limits::MAX_EXPERTS),
        ] {
            if value == 0 || value > max {
                return Err(Error::trace(
                    path,
                    format!("file metadata {key}={value} exceeds the limit 1..={max}"),
                ));
            }
        }
        if meta.moe_layers.is_empty() {
            return Err(Error::trace(
                path,
                format!("file metadata {KEY_MOE_LAYERS} lists no MoE layer"),
            ));
        }
        if meta.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::trace(
                path,
                format!(
                    "file metadata {KEY_MOE_LAYERS}=[{}] is not strictly ascending",
                    join(&meta.moe_layers)
                ),
            ));
        }
        if let Some(&bad) = meta.moe_layers.iter().find(|&&l| l >= meta.num_layers) {
            return Err(Error::trace(
                path,
                format!(
                    "file metadata lists MoE layer {bad} but {KEY_NUM_LAYERS} is {}",
                    meta.num_layers
                ),
            ));
        }
        if meta.top_k == 0 || meta.top_k > meta.num_experts {
            return Err(Error::trace(
                path,
                format!(
                    "file metadata {KEY_TOP_K}={} does not fit {KEY_NUM_EXPERTS}={}",
                    meta.top_k, meta.num_experts
                ),
            ));
        }
        Ok(meta)
    }
}

fn join(ids: &[usize]) -> String {
    ids.iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A trace's rows, column by column (row `i` is the `i`-th entry of each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceRows {
    pub sequence: Vec<u64>,
    pub position: Vec<u32>,
    pub layer: Vec<u32>,
    pub rank: Vec<u32>,
    pub expert: Vec<u32>,
    pub weight: Vec<f32>,
    pub score: Vec<f32>,
    pub cache: Vec<Option<CacheOutcome>>,
}

/// One row of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    pub sequence: u64,
    pub position: u32,
    pub layer: u32,
    pub rank: u32,
    pub expert: u32,
    pub weight: f32,
    pub score: f32,
    pub cache: Option<CacheOutcome>,
}

impl TraceRows {
    pub fn len(&self) -> usize {
        self.sequence.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequence.is_empty()
    }

    pub fn push(&mut self, row: TraceRow) {
        self.sequence.push(row.sequence);
        self.position.push(row.position);
        self.layer.push(row.layer);
        self.rank.push(row.rank);
        self.expert.push(row.expert);
        self.weight.push(row.weight);
        self.score.push(row.score);
        self.cache.push(row.cache);
    }

    pub fn row(&self, i: usize) -> Option<TraceRow> {
        Some(TraceRow {
            sequence: *self.sequence.get(i)?,
            position: *self.position.get(i)?,
            layer: *self.layer.get(i)?,
            rank: *self.rank.get(i)?,
            expert: *self.expert.get(i)?,
            weight: *self.weight.get(i)?,
            score: *self.score.get(i)?,
            cache: *self.cache.get(i)?,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = TraceRow> + '_ {
        (0..self.len()).filter_map(|i| self.row(i))
    }

    fn clear(&mut self) {
        *self = TraceRows::default();
    }

    fn to_batch(&self, schema: &Arc<Schema>) -> std::result::Result<RecordBatch, String> {
        let cache: StringArray = self
            .cache
            .iter()
            .map(|c| c.map(CacheOutcome::as_str))
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(self.sequence.clone())),
            Arc::new(UInt32Array::from(self.position.clone())),
            Arc::new(UInt32Array::from(self.layer.clone())),
            Arc::new(UInt32Array::from(self.rank.clone())),
            Arc::new(UInt32Array::from(self.expert.clone())),
            Arc::new(Float32Array::from(self.weight.clone())),
            Arc::new(Float32Array::from(self.score.clone())),
            Arc::new(cache),
        ];
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
    }
}

/// A routing trace read back into memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub meta: TraceMeta,
    pub rows: TraceRows,
}

fn schema() -> Arc<Schema> {
    let field = |name: &str, ty: DataType| Field::new(name, ty, false);
    Arc::new(Schema::new(vec![
        field("sequence", DataType::UInt64),
        field("position", DataType::UInt32),
        field("layer", DataType::UInt32),
        field("rank", DataType::UInt32),
        field("expert", DataType::UInt32),
        field("weight", DataType::Float32),
        field("score", DataType::Float32),
        Field::new("cache", DataType::Utf8, true),
    ]))
}

/// Writes every routing decision it observes to a Parquet file. Rows are flushed
/// as row groups fill, so memory stays bounded however long the run; the file
/// appears under its name only when [`TraceWriter::finish`] succeeds (it is
/// written to a temporary name beside it, then renamed).
///
/// The `cache` column is filled from [`RoutingSite::cache`]: an expert cache that
/// reports its per-expert outcomes there gets them recorded with no change here.
pub struct TraceWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    writer: Option<ArrowWriter<File>>,
    schema: Arc<Schema>,
    buffer: TraceRows,
    rows_written: u64,
    /// The first error while observing; reported by `finish` (the observer
    /// interface cannot return one).
    error: Option<Error>,
}

impl TraceWriter {
    pub fn create(path: &Path, meta: &TraceMeta) -> Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::trace(path, "a trace file needs a file name"))?;
        let tmp_path = path.with_file_name(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(meta.key_values()))
            .build();
        let schema = schema();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(Error::trace(
                    path,
                    format!("cannot start the Parquet writer: {e}"),
                ));
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            tmp_path,
            writer: Some(writer),
            schema,
            buffer: TraceRows::default(),
            rows_written: 0,
            error: None,
        })
    }

    /// Appends rows directly (the observer hook does this for each routing).
    pub fn push(&mut self, row: TraceRow) {
        if self.error.is_some() {
            return;
        }
        self.buffer.push(row);
        if self.buffer.len() >= ROW_GROUP_ROWS
            && let Err(e) = self.flush_row_group()
        {
            self.error = Some(e);
        }
    }

    /// Writes what is buffered as one row group.
    fn flush_row_group(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        let batch = self
            .buffer
            .to_batch(&self.schema)
            .map_err(|e| Error::trace(&self.path, e))?;
        writer
            .write(&batch)
            .and_then(|_| writer.flush())
            .map_err(|e| Error::trace(&self.path, format!("writing a row group: {e}")))?;
        self.rows_written += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the remaining rows and the footer, then renames the file into
    /// place. Returns the number of rows written.
    pub fn finish(mut self) -> Result<u64> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.flush_row_group()?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::trace(&self.path, "already finished"))?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::trace(&self.path, format!("writing the Parquet footer: {e}")))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp_path, e))?;
        std::fs::rename(&self.tmp_path, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.rows_written)
    }
}

impl Drop for TraceWriter {
    /// An unfinished trace (an error, or a run that stopped) leaves nothing behind.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

impl RoutingObserver for TraceWriter {
    fn on_routing(&mut self, site: RoutingSite<'_>, routing: &Routing) {
        routing_rows(site, routing, |row| self.push(row));
    }
}

/// Records a trace in memory (an analysis of a run that writes no file).
impl RoutingObserver for TraceRows {
    fn on_routing(&mut self, site: RoutingSite<'_>, routing: &Routing) {
        routing_rows(site, routing, |row| self.push(row));
    }
}

/// One row per (token, rank) of one sequence's routing in one layer call.
fn routing_rows(site: RoutingSite<'_>, routing: &Routing, mut push: impl FnMut(TraceRow)) {
    for t in 0..routing.n_tokens() {
        let experts = routing.experts_of(t);
        let weights = routing.weights_of(t);
        let scores = routing.scores_of(t);
        for (rank, ((&expert, &weight), &score)) in
            experts.iter().zip(weights).zip(scores).enumerate()
        {
            push(TraceRow {
                sequence: site.sequence.0,
                position: (site.start_position + t) as u32,
                layer: site.layer as u32,
                rank: rank as u32,
                expert,
                weight,
                score,
                cache: site.cache_outcome(expert),
            });
        }
    }
}

/// Reads a trace written by [`TraceWriter`] (or by anything else that writes
/// the same columns and metadata), checking every column's presence and type
/// and every value against the metadata's shape.
pub fn read_trace(path: &Path) -> Result<Trace> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::trace(path, format!("not a Parquet file: {e}")))?;
    let meta = TraceMeta::from_key_values(
        path,
        builder.metadata().file_metadata().key_value_metadata(),
    )?;
    let arrow_schema = builder.schema().clone();
    let mut roots = Vec::new();
    for field in schema().fields() {
        match arrow_schema.index_of(field.name()) {
            Ok(i) => roots.push(i),
            // Written by older tools or by hand: no cache column means no budget.
            Err(_) if field.name() == "cache" => {}
            Err(_) => {
                return Err(Error::trace(
                    path,
                    format!("the trace lacks the column `{}`", field.name()),
                ));
            }
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::trace(path, format!("reading: {e}")))?;
    let mut rows = TraceRows::default();
    for batch in reader {
        let batch = batch.map_err(|e| Error::trace(path, format!("reading: {e}")))?;
        let first_row = rows.len();
        let col = Columns {
            path,
            batch: &batch,
            first_row,
        };
        rows.sequence.extend(col.integers("sequence", u64::MAX)?);
        rows.position.extend(col.u32s("position", u32::MAX as u64)?);
        // invariant: from_key_values refused zero layers, experts and top_k.
        rows.layer
            .extend(col.u32s("layer", meta.num_layers as u64 - 1)?);
        rows.rank.extend(col.u32s("rank", meta.top_k as u64 - 1)?);
        rows.expert
            .extend(col.u32s("expert", meta.num_experts as u64 - 1)?);
        rows.weight.extend(col.floats("weight")?);
        rows.score.extend(col.floats("score")?);
        rows.cache.extend(col.cache()?);
    }
    let trace = Trace { meta, rows };
    check_layers(path, &trace)?;
    Ok(trace)
}

/// Every row's layer must be one the metadata lists as routing.
fn check_layers(path: &Path, trace: &Trace) -> Result<()> {
    let moe = &trace.meta.moe_layers;
    if let Some((i, l)) = (trace.rows.layer.iter().enumerate())
        .find(|(_, l)| moe.binary_search(&(**l as usize)).is_err())
    {
        return Err(Error::trace(
            path,
            format!(
                "row {i}: layer {l} is not a MoE layer of the trace's model ({KEY_MOE_LAYERS} = [{}])",
                join(moe)
            ),
        ));
    }
    Ok(())
}

/// Typed access to one record batch's columns, errors naming column and row.
struct Columns<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
    first_row: usize,
}

impl Columns<'_> {
    fn column(&self, name: &str) -> Result<&ArrayRef> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| Error::trace(self.path, format!("the trace lacks the column `{name}`")))
    }

    fn no_nulls(&self, name: &str, array: &dyn Array) -> Result<()> {
        match (0..array.len()).find(|&i| array.is_null(i)) {
            None => Ok(()),
            Some(i) => Err(Error::trace(
                self.path,
                format!("row {}: column `{name}` is null", self.first_row + i),
            )),
        }
    }

    /// An integer column of any integer Arrow type (pandas writes int64), each
    /// value checked to lie in `0..=max`.
    fn integers(&self, name: &str, max: u64) -> Result<Vec<u64>> {
        let array = self.column(name)?;
        self.no_nulls(name, array)?;
        let values = match array.data_type() {
            DataType::UInt8 => widen::<UInt8Type>(array),
            DataType::UInt16 => widen::<UInt16Type>(array),
            DataType::UInt32 => widen::<UInt32Type>(array),
            DataType::UInt64 => widen::<UInt64Type>(array),
            DataType::Int8 => widen::<Int8Type>(array),
            DataType::Int16 => widen::<Int16Type>(array),
            DataType::Int32 => widen::<Int32Type>(array),
            DataType::Int64 => widen::<Int64Type>(array),
            other => {
                return Err(Error::trace(
                    self.path,
                    format!(
                        "column `{name}` has type {other}, expected an unsigned integer (UInt32/UInt64)"
                    ),
                ));
            }
        };
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) if *v <= max => {}
                _ => {
                    let shown = match v {
                        Some(v) => v.to_string(),
                        None => "negative".to_string(),
                    };
                    return Err(Error::trace(
                        self.path,
                        format!(
                            "row {}: column `{name}` is {shown}, outside 0..={max} (the trace's metadata)",
                            self.first_row + i
                        ),
                    ));
                }
            }
        }
        Ok(values.into_iter().flatten().collect())
    }

    fn u32s(&self, name: &str, max: u64) -> Result<Vec<u32>> {
        let max = max.min(u32::MAX as u64);
        Ok(self
            .integers(name, max)?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    }

    fn floats(&self, name: &str) -> Result<Vec<f32>> {
        let array = self.column(name)?;
        self.no_nulls(name, array)?;
        match array.data_type() {
            DataType::Float32 => Ok(array.as_primitive::<Float32Type>().values().to_vec()),
            DataType::Float64 => Ok(array
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|&v| v as f32)
                .collect()),
            other => Err(Error::trace(
                self.path,
                format!("column `{name}` has type {other}, expected Float32"),
            )),
        }
    }

    fn cache(&self) -> Result<Vec<Option<CacheOutcome>>> {
        let Some(array) = self.batch.column_by_name("cache") else {
            return Ok(vec![None; self.batch.num_rows()]);
        };
        let strings: Vec<Option<&str>> = match array.data_type() {
            DataType::Utf8 => array.as_string::<i32>().iter().collect(),
            DataType::LargeUtf8 => array.as_string::<i64>().iter().collect(),
            DataType::Utf8View => array.as_string_view().iter().collect(),
            DataType::Null => vec![None; array.len()],
            other => {
                return Err(Error::trace(
                    self.path,
                    format!("column `cache` has type {other}, expected Utf8"),
                ));
            }
        };
        (strings.into_iter().enumerate())
            .map(|(i, s)| match s {
                None => Ok(None),
                Some(s) => CacheOutcome::parse(s).map(Some).ok_or_else(|| {
                    Error::trace(
                        self.path,
                        format!(
                            "row {}: column `cache` is {s:?}, expected one of hit, miss, prefetched, stand_in or null",
                            self.first_row + i
                        ),
                    )
                }),
            })
            .collect()
    }
}

/// Values as u64; `None` for a negative value.
fn widen<T: ArrowPrimitiveType>(array: &ArrayRef) -> Vec<Option<u64>>
where
    T::Native: TryInto<u64>,
{
    (array.as_primitive::<T>().values().iter())
        .map(|&v| v.try_into().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SequenceId;

    fn meta() -> TraceMeta {
        TraceMeta {
            num_layers: 3,
            num_experts: 4,
            top_k: 2,
            moe_layers: vec![1, 2],
            model: "tiny".into(),
        }
    }

    fn routing(ids: &[u32]) -> Routing {
        Routing {
            top_k: 2,
            expert_ids: ids.to_vec(),
            weights: ids.iter().map(|&e| 0.1 * e as f32).collect(),
            scores: ids.iter().map(|&e| 0.05 * e as f32).collect(),
        }
    }

    #[test]
    fn rows_round_trip_with_cache_outcomes_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut w = TraceWriter::create(&path, &meta()).unwrap();
        let site = |layer, sequence, start_position, cache| RoutingSite {
            layer,
            sequence: SequenceId(sequence),
            start_position,
            cache,
        };
        w.on_routing(site(1, 0, 5, None), &routing(&[3, 1, 0, 2]));
        let outcomes = [(0, CacheOutcome::Hit), (2, CacheOutcome::StandIn)];
        w.on_routing(site(2, 7, 0, Some(&outcomes)), &routing(&[2, 0]));
        assert!(!path.exists(), "the trace appears only when finished");
        assert_eq!(w.finish().unwrap(), 6);

        let t = read_trace(&path).unwrap();
        assert_eq!(t.meta, meta());
        let rows: Vec<TraceRow> = t.rows.iter().collect();
        assert_eq!(rows.len(), 6);
        // Token 1 of sequence 0 sits at absolute position 6, its second choice is expert 2.
        assert_eq!(
            (
                rows[3].sequence,
                rows[3].position,
                rows[3].layer,
                rows[3].rank,
                rows[3].expert
            ),
            (0, 6, 1, 1, 2)
        );
        assert!((rows[3].weight - 0.2).abs() < 1e-7 && (rows[3].score - 0.1).abs() < 1e-7);
        assert_eq!(rows[0].cache, None);
        assert_eq!(
            (rows[4].sequence, rows[4].cache, rows[5].cache),
            (7, Some(CacheOutcome::StandIn), Some(CacheOutcome::Hit))
        );
    }

    #[test]
    fn row_groups_are_flushed_as_they_fill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.parquet");
        let mut w = TraceWriter::create(&path, &meta()).unwrap();
        let n = ROW_GROUP_ROWS + 10;
        for i in 0..n {
            w.push(TraceRow {
                sequence: 0,
                position: (i / 2) as u32,
                layer: 1,
                rank: (i % 2) as u32,
                expert: (i % 4) as u32,
                weight: 0.5,
                score: 0.25,
                cache: None,
            });
        }
        // One full row group is out of memory before finish.
        assert_eq!(w.rows_written, ROW_GROUP_ROWS as u64);
        assert!(w.buffer.len() < ROW_GROUP_ROWS);
        assert_eq!(w.finish().unwrap(), n as u64);
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        assert_eq!(builder.metadata().num_row_groups(), 2);
        assert_eq!(read_trace(&path).unwrap().rows.len(), n);
    }

    #[test]
    fn an_unfinished_trace_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut w = TraceWriter::create(&path, &meta()).unwrap();
        w.on_routing(
            RoutingSite {
                layer: 1,
                sequence: SequenceId(0),
                start_position: 0,
                cache: None,
            },
            &routing(&[0, 1]),
        );
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A Parquet file with the given columns (all Int64 unless named float) and metadata.
    fn write_custom(path: &Path, columns: &[(&str, ArrayRef)], kv: Option<Vec<KeyValue>>) {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(
            schema.clone(),
            columns.iter().map(|(_, a)| a.clone()).collect(),
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_key_value_metadata(kv)
            .build();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    fn pandas_style_columns(expert: i64) -> Vec<(&'static str, ArrayRef)> {
        let ints = |v: i64| -> ArrayRef { Arc::new(arrow_array::Int64Array::from(vec![v])) };
        let float = || -> ArrayRef { Arc::new(arrow_array::Float64Array::from(vec![0.5])) };
        vec![
            ("sequence", ints(0)),
            ("position", ints(0)),
            ("layer", ints(1)),
            ("rank", ints(0)),
            ("expert", ints(expert)),
            ("weight", float()),
            ("score", float()),
        ]
    }

    fn error_of(path: &Path) -> String {
        read_trace(path).unwrap_err().to_string()
    }

    #[test]
    fn int64_columns_as_pandas_writes_them_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pandas.parquet");
        write_custom(&path, &pandas_style_columns(3), Some(meta().key_values()));
        let t = read_trace(&path).unwrap();
        assert_eq!(
            (t.rows.expert.clone(), t.rows.cache.clone()),
            (vec![3], vec![None])
        );
    }

    #[test]
    fn a_file_that_is_not_parquet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        std::fs::write(&path, "sequence,position\n0,0\n").unwrap();
        let err = error_of(&path);
        assert!(
            err.contains("not a Parquet file") && err.contains("t.parquet"),
            "{err}"
        );
        let err = error_of(&dir.path().join("missing.parquet"));
        assert!(err.contains("missing.parquet"), "{err}");
    }

    #[test]
    fn a_missing_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut cols = pandas_style_columns(0);
        cols.retain(|(n, _)| *n != "score");
        write_custom(&path, &cols, Some(meta().key_values()));
        let err = error_of(&path);
        assert!(err.contains("lacks the column `score`"), "{err}");
    }

    #[test]
    fn a_column_of_the_wrong_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut cols = pandas_style_columns(0);
        cols[4].1 = Arc::new(StringArray::from(vec!["3"]));
        write_custom(&path, &cols, Some(meta().key_values()));
        let err = error_of(&path);
        assert!(err.contains("column `expert` has type Utf8"), "{err}");
    }

    #[test]
    fn values_outside_the_metadata_shape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_custom(&path, &pandas_style_columns(4), Some(meta().key_values()));
        let err = error_of(&path);
        assert!(
            err.contains("row 0: column `expert` is 4, outside 0..=3"),
            "{err}"
        );
        write_custom(&path, &pandas_style_columns(-1), Some(meta().key_values()));
        assert!(error_of(&path).contains("`expert` is negative"));
        // Layer 0 is dense in the metadata.
        let mut cols = pandas_style_columns(0);
        cols[2].1 = Arc::new(arrow_array::Int64Array::from(vec![0]));
        write_custom(&path, &cols, Some(meta().key_values()));
        let err = error_of(&path);
        assert!(err.contains("layer 0 is not a MoE layer"), "{err}");
    }

    /// Metadata is file-controlled: a zero layer count once underflowed the layer
    /// bound, a huge expert count sized the co-activation matrix (`E * E` counts),
    /// and unsorted layer ids broke the binary search that checks rows.
    #[test]
    fn metadata_out_of_shape_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let with = |edits: &[(&str, &str)]| {
            let mut kv = meta().key_values();
            kv.retain(|e| !edits.iter().any(|(k, _)| e.key == *k));
            kv.extend(
                edits
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string())),
            );
            kv
        };
        let cases: [(&[(&str, &str)], &str); 6] = [
            (
                &[(KEY_NUM_LAYERS, "0"), (KEY_MOE_LAYERS, "")],
                "num_layers=0 exceeds",
            ),
            (&[(KEY_MOE_LAYERS, "")], "lists no MoE layer"),
            (
                &[(KEY_NUM_EXPERTS, "4294967296")],
                "switchyard.num_experts=4294967296 exceeds",
            ),
            (
                &[(KEY_NUM_LAYERS, "1000000000")],
                "switchyard.num_layers=1000000000 exceeds",
            ),
            (&[(KEY_MOE_LAYERS, "2,1")], "strictly ascending"),
            (&[(KEY_MOE_LAYERS, "1,1,2")], "strictly ascending"),
        ];
        for (edits, says) in cases {
            write_custom(&path, &pandas_style_columns(0), Some(with(edits)));
            let err = error_of(&path);
            assert!(err.contains(says), "{edits:?}: {err}");
        }
    }

    #[test]
    fn missing_metadata_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut kv = meta().key_values();
        kv.retain(|e| e.key != KEY_NUM_EXPERTS);
        write_custom(&path, &pandas_style_columns(0), Some(kv));
        let err = error_of(&path);
        assert!(err.contains("lacks switchyard.num_experts"), "{err}");
    }

    #[test]
    fn a_trace_of_another_model_shape_is_refused_naming_both() {
        let config = crate::config::load_model_config(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/qwen3_moe"
        )))
        .unwrap();
        let own = TraceMeta::of_model(&config, "fixture");
        assert!(own.check_model(&config, Path::new("t.parquet")).is_ok());
        let err = meta()
            .check_model(&config, Path::new("t.parquet"))
            .unwrap_err()
            .to_string();
        let expected = format!(
            "the trace is of a model with 4 experts in MoE layers [1,2] (3 layers), the model has {} experts in MoE layers [{}]",
            config.moe.num_experts,
            join(&own.moe_layers)
        );
        assert!(err.contains(&expected), "{err}");
    }
}
