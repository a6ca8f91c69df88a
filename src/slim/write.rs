//! Writing a checkpoint with experts removed: every MoE layer keeps the same
//! experts count, its router rows and expert tensors are cut to the kept ones
//! (renumbered in order), and the config says the new count. Tensor bytes are
//! copied as stored, so kept weights are bit-identical.
//!
//! Written into a temporary directory beside the target, renamed into place
//! at the end: an interrupted prune leaves no half checkpoint.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::View;

use crate::config::{ModelConfig, load_model_config};
use crate::error::{Error, Result};
use crate::experts::moe_prefix;
use crate::weights::{GgufFile, MoeNames, SafetensorsFiles, StoredDtype};

/// Which experts each MoE layer keeps (original ids, ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunePlan {
    num_experts: usize,
    kept: BTreeMap<usize, Vec<u32>>,
}

impl PrunePlan {
    /// Every layer must keep the same number of experts, at least one, with
    /// distinct ids below `num_experts`.
    pub fn new(num_experts: usize, mut kept: BTreeMap<usize, Vec<u32>>) -> Result<Self> {
        let mut count = None;
        for (layer, ids) in kept.iter_mut() {
            ids.sort_unstable();
            ids.dedup();
            if ids.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "layer {layer} would keep no expert"
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&e| e as usize >= num_experts) {
                return Err(Error::InvalidInput(format!(
                    "layer {layer}: expert {bad} does not exist (the model has {num_experts})"
                )));
            }
            match count {
                None => count = Some(ids.len()),
                Some(n) if n != ids.len() => {
                    return Err(Error::InvalidInput(format!(
                        "layer {layer} keeps {} experts, other layers {n}: every layer must keep the same number",
                        ids.len()
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(Self { num_experts, kept })
    }

    pub fn kept(&self, layer: usize) -> Option<&[u32]> {
        self.kept.get(&layer).map(Vec::as_slice)
    }

    pub fn keep_per_layer(&self) -> usize {
        self.kept.values().next().map_or(0, Vec::len)
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
}

/// What [`write_pruned`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneSummary {
    pub experts_before: usize,
    pub experts_after: usize,
    pub top_k_before: usize,
    pub top_k_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Tokenizer and generation files copied alongside.
    pub copied: Vec<String>,
}

/// Files that travel with the weights unchanged.
const COMPANION_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Writes `src` pruned by `plan` to `out`: a Hugging Face safetensors
/// directory to a directory, a GGUF file to a file whose name ends in `.gguf`.
/// An existing `out` is refused unless `force`; `record` is stored as the
/// pruning record's `"how"` (criterion, calibration, scores).
pub fn write_pruned(
    src: &Path,
    plan: &PrunePlan,
    out: &Path,
    force: bool,
    record: serde_json::Value,
) -> Result<PruneSummary> {
    check_out(src, out, force)?;
    if GgufFile::is_gguf(src) {
        return super::gguf::write_pruned_gguf(src, plan, out, record);
    }
    let config = load_model_config(src)?;
    let moe_layers = check_plan(plan, &config)?;
    let keep = plan.keep_per_layer();
    let top_k_after = config.moe.top_k.min(keep);
    let config_path = src.join("config.json");
    let expert_count_keys = config.family.hf.num_experts;
    let new_config = rewrite_config(&config_path, expert_count_keys, keep, top_k_after)?;

    let files = SafetensorsFiles::open_dir(src)?;
    let names = &config.family.names;
    let mut prefixes = HashMap::new();
    for &l in &moe_layers {
        prefixes.insert(l, moe_prefix(names, &files, l)?);
    }
    let mut names: Vec<&str> = files.names().collect();
    names.sort_unstable();
    let mut views = Vec::with_capacity(names.len());
    let (mut bytes_before, mut bytes_after) = (0u64, 0u64);
    for name in names {
        let meta = files.meta(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            hint: String::new(),
        })?;
        let bytes = files.bytes(name)?;
        bytes_before += bytes.len() as u64;
        let cut = match moe_part(name, &prefixes) {
            Some((layer, rest)) => {
                let kept = plan.kept(layer).unwrap_or(&[]);
                cut_tensor(name, rest, kept, plan, &config.family.names)?
            }
            None => Cut::Copy,
        };
        let view = match cut {
            Cut::Drop => continue,
            Cut::Copy => RawView {
                dtype: meta.dtype,
                shape: meta.shape.clone(),
                data: bytes,
                name: name.to_string(),
            },
            Cut::Renamed(new_name) => RawView {
                dtype: meta.dtype,
                shape: meta.shape.clone(),
                data: bytes,
                name: new_name,
            },
            Cut::Rows(kept) => {
                let rows = meta.shape.first().copied().unwrap_or(0);
                if rows != plan.num_experts {
                    return Err(Error::ShapeMismatch {
                        name: name.to_string(),
                        expected: vec![plan.num_experts],
                        found: meta.shape.clone(),
                    });
                }
                // invariant: rows == num_experts >= 1 (checked above), the reader checked
                // the byte length against the shape, and every kept id is < num_experts.
                let data = expert_slices(bytes, rows, kept).concat();
                let mut shape = meta.shape.clone();
                shape[0] = kept.len();
                RawView {
                    dtype: meta.dtype,
                    shape,
                    data: Cow::Owned(data),
                    name: name.to_string(),
                }
            }
        };
        bytes_after += view.data.len() as u64;
        views.push(view);
    }

    let tmp = sibling(out, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        let weights = tmp.join("model.safetensors");
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            views.iter().map(|v| (v.name.as_str(), v)),
            Some(metadata),
            &weights,
        )
        .map_err(|e| Error::Safetensors {
            path: weights.clone(),
            reason: format!("writing: {e}"),
        })?;
        write_file(&tmp.join("config.json"), new_config.as_bytes())?;
        let mut copied = Vec::new();
        for file in COMPANION_FILES {
            let from = src.join(file);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(file)).map_err(|e| Error::io(&from, e))?;
                copied.push(file.to_string());
            }
        }
        let pruning = pruning_record(src, plan, config.moe.top_k, top_k_after, record);
        let text = serde_json::to_string_pretty(&pruning)
            .map_err(|e| Error::InvalidInput(format!("pruning.json: {e}")))?;
        write_file(&tmp.join("pruning.json"), text.as_bytes())?;
        replace_path(&tmp, out)?;
        Ok(copied)
    })();
    let copied = match result {
        Ok(copied) => copied,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    Ok(PruneSummary {
        experts_before: plan.num_experts,
        experts_after: keep,
        top_k_before: config.moe.top_k,
        top_k_after,
        bytes_before,
        bytes_after,
        copied,
    })
}

/// Refuses an output the input cannot be written to, before any work: GGUF
/// in gives one `.gguf` file, safetensors in a directory; an existing `out`
/// only with `force`, never a directory replaced by a file.
pub fn check_out(src: &Path, out: &Path, force: bool) -> Result<()> {
    if !src.exists() {
        return Err(Error::InvalidInput(format!(
            "{}: no such file or directory (the model to prune)",
            src.display()
        )));
    }
    let is_gguf_name = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if GgufFile::is_gguf(src) {
        if !is_gguf_name {
            return Err(Error::InvalidInput(format!(
                "--out {}: a GGUF model is pruned into one GGUF file; give a file name ending in .gguf",
                out.display()
            )));
        }
        if out.is_dir() {
            return Err(Error::InvalidInput(format!(
                "--out {}: is a directory; a GGUF model is pruned into one file",
                out.display()
            )));
        }
    } else if is_gguf_name {
        return Err(Error::InvalidInput(format!(
            "--out {}: a safetensors checkpoint is pruned into a Hugging Face directory, not a GGUF file (prune the GGUF file to get one)",
            out.display()
        )));
    }
    if out.exists() && !force {
        return Err(Error::InvalidInput(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        )));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent.filter(|p| !p.is_dir()) {
        return Err(Error::InvalidInput(format!(
            "--out {}: the directory {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Refuses a plan that does not cover exactly the model's MoE layers and
/// experts; returns those layers.
pub(super) fn check_plan(plan: &PrunePlan, config: &ModelConfig) -> Result<Vec<usize>> {
    let moe_layers: Vec<usize> = (config.moe.sparse_layers.iter().enumerate())
        .filter_map(|(l, &sparse)| sparse.then_some(l))
        .collect();
    let planned: Vec<usize> = plan.kept.keys().copied().collect();
    if planned != moe_layers || plan.num_experts != config.moe.num_experts {
        return Err(Error::InvalidInput(format!(
            "the plan covers layers {planned:?} of {} experts; the model's MoE layers are {moe_layers:?} with {} experts",
            plan.num_experts, config.moe.num_experts
        )));
    }
    Ok(moe_layers)
}

/// The pruning record (`pruning.json`): kept and removed experts per layer,
/// the counts before and after, and `how` (criterion, calibration, scores).
pub(super) fn pruning_record(
    src: &Path,
    plan: &PrunePlan,
    top_k_before: usize,
    top_k_after: usize,
    how: serde_json::Value,
) -> serde_json::Value {
    let removed: BTreeMap<usize, Vec<u32>> = (plan.kept.iter())
        .map(|(&l, kept)| {
            let gone = (0..plan.num_experts as u32).filter(|e| !kept.contains(e));
            (l, gone.collect())
        })
        .collect();
    serde_json::json!({
        "source": src.display().to_string(),
        "experts_before": plan.num_experts,
        "experts_after": plan.keep_per_layer(),
        "top_k_before": top_k_before,
        "top_k_after": top_k_after,
        "kept": plan.kept,
        "removed": removed,
        "how": how,
    })
}

/// What happens to one tensor.
enum Cut<'a> {
    Copy,
    Drop,
    /// A per-expert tensor of a kept expert, under its new index.
    Renamed(String),
    /// Keep these rows of dimension 0 (router rows, fused expert stacks).
    Rows(&'a [u32]),
}

/// `(layer, rest)` when `name` is `{prefix}.{rest}` for a MoE layer's prefix.
fn moe_part<'n>(name: &'n str, prefixes: &HashMap<usize, String>) -> Option<(usize, &'n str)> {
    let layer: usize = name
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    let prefix = prefixes.get(&layer)?;
    let rest = name.strip_prefix(prefix.as_str())?.strip_prefix('.')?;
    Some((layer, rest))
}

fn cut_tensor<'a>(
    name: &str,
    rest: &str,
    kept: &'a [u32],
    plan: &PrunePlan,
    names: &MoeNames,
) -> Result<Cut<'a>> {
    // The shared expert and its gate (`shared_expert.*`, `shared_expert_gate.*`).
    if names.shared_expert.is_some_and(|s| {
        rest.starts_with(s.module) || s.gate.is_some_and(|g| rest.starts_with(g.0))
    }) {
        return Ok(Cut::Copy);
    }
    if let Some(tail) = rest.strip_prefix("experts.") {
        let (head, after) = tail.split_once('.').unwrap_or((tail, ""));
        if let Ok(e) = head.parse::<u32>() {
            return Ok(match kept.iter().position(|&k| k == e) {
                Some(new) => {
                    let prefix = &name[..name.len() - rest.len()];
                    Cut::Renamed(format!("{prefix}experts.{new}.{after}"))
                }
                None => Cut::Drop,
            });
        }
        // A fused stack `[E, ...]` of every expert.
        return Ok(Cut::Rows(kept));
    }
    if rest
        .strip_prefix(names.router.0)
        .is_some_and(|r| r.starts_with('.'))
    {
        // Router weight `[E, hidden]`, and any per-expert bias beside it.
        return Ok(Cut::Rows(kept));
    }
    Err(Error::InvalidInput(format!(
        "tensor {name:?}: not a router, expert or shared-expert tensor; do not know how to prune it (the model has {} experts per layer)",
        plan.num_experts
    )))
}

/// `config.json` with the expert count (under the family's own field) and
/// `num_experts_per_tok` rewritten; every other field as it was.
fn rewrite_config(path: &Path, count_keys: &[&str], keep: usize, top_k: usize) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| Error::config(path, "not a JSON object"))?;
    let mut found = false;
    for &field in count_keys {
        if obj.get(field).is_some_and(|v| !v.is_null()) {
            obj.insert(field.to_string(), keep.into());
            found = true;
        }
    }
    if !found {
        return Err(Error::config(
            path,
            format!(
                "no expert count field ({}) to rewrite",
                count_keys.join(", ")
            ),
        ));
    }
    obj.insert("num_experts_per_tok".to_string(), top_k.into());
    let mut out = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::config(path, format!("writing JSON: {e}")))?;
    out.push('\n');
    Ok(out)
}

/// `.{name}.{what}.{pid}` beside `path`.
pub(super) fn sibling(path: &Path, what: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidInput(format!("--out {}: needs a directory name", path.display()))
    })?;
    Ok(path.with_file_name(format!(
        ".{}.{what}.{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Moves `tmp` (a directory or a file) to `out`; an existing `out` is moved
/// aside first and deleted only once the new one is in place.
pub(super) fn replace_path(tmp: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out).map_err(|e| Error::io(out, e));
    }
    let old = sibling(out, "old")?;
    std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    if let Err(e) = std::fs::rename(tmp, out) {
        let _ = std::fs::rename(&old, out);
        return Err(Error::io(out, e));
    }
    if old.is_dir() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
    } else {
        std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// A tensor as stored, for the safetensors writer.
struct RawView<'a> {
    dtype: StoredDtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
    name: String,
}

impl View for &RawView<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            StoredDtype::F32 => Dtype::F32,
            StoredDtype::F16 => Dtype::F16,
            StoredDtype::BF16 => Dtype::BF16,
            StoredDtype::U8 => Dtype::U8,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The kept experts' runs of a tensor whose outermost dimension is the
/// `n_experts` experts, borrowed when the tensor is. Callers check that the
/// outermost dimension is `n_experts` and every kept id is below it.
pub(super) fn expert_slices<'a>(
    bytes: Cow<'a, [u8]>,
    n_experts: usize,
    kept: &[u32],
) -> Vec<Cow<'a, [u8]>> {
    let len = bytes.len() / n_experts.max(1);
    let run = |e: u32| e as usize * len..(e as usize + 1) * len;
    match bytes {
        Cow::Borrowed(b) => kept.iter().map(|&e| Cow::Borrowed(&b[run(e)])).collect(),
        Cow::Owned(v) => kept
            .iter()
            .map(|&e| Cow::Owned(v[run(e)].to_vec()))
            .collect(),
    }
}
