//! Pruning a GGUF file into a GGUF file. Routed experts live in merged
//! `blk.{l}.ffn_{gate,up,down}_exps` tensors (`[n_experts, out, in]`, outermost
//! first), so an expert is one contiguous run of whole quantized blocks: the
//! kept runs are copied as stored, never re-quantized. The router
//! (`ffn_gate_inp`, `[n_experts, hidden]`) keeps the kept rows, every other
//! tensor and metadata entry is copied byte for byte, and `{arch}.expert_count`
//! (and `{arch}.expert_used_count`, if above what is kept) is rewritten. The
//! tensor names are the family's ([`MoeNames`]), as the loader reads them.

use std::path::Path;

use super::write::{
    PrunePlan, PruneSummary, check_plan, expert_slices, pruning_record, replace_path, sibling,
};
use crate::config::config_from_gguf;
use crate::error::{Error, Result};
use crate::weights::{GgufFile, GgufTensorOut, GgufValue, MoeNames};

/// The metadata key the pruning record (the `pruning.json` of a Hugging Face
/// output) is embedded under, as a JSON string.
pub const PRUNING_KEY: &str = "switchyard.pruning";

/// Writes `src` (a GGUF file) pruned by `plan` to the file `out`, through a
/// temporary file beside it renamed into place, with the pruning record both
/// embedded (under [`PRUNING_KEY`]) and beside it as `{stem}.pruning.json`.
pub(super) fn write_pruned_gguf(
    src: &Path,
    plan: &PrunePlan,
    out: &Path,
    record: serde_json::Value,
) -> Result<PruneSummary> {
    let file = GgufFile::open(src)?;
    let config = config_from_gguf(&file)?;
    check_plan(plan, &config)?;
    let keep = plan.keep_per_layer();
    let top_k_after = config.moe.top_k.min(keep);
    // A GGUF file's config came from a family with GGUF keys.
    let arch = config.family.gguf.map_or("", |g| g.arch);
    let names = &config.family.names;

    let (mut bytes_before, mut bytes_after) = (0u64, 0u64);
    let mut tensors = Vec::new();
    for name in file.tensor_names_in_file_order() {
        let info = file.require(name)?;
        let bytes = file.bytes(name)?;
        bytes_before += bytes.len() as u64;
        let mut shape = info.shape.clone();
        let data = match expert_indexed(names, name).and_then(|l| plan.kept(l)) {
            None => vec![bytes],
            Some(kept) => {
                if shape.first() != Some(&plan.num_experts()) {
                    return Err(Error::ShapeMismatch {
                        name: name.to_string(),
                        expected: vec![plan.num_experts()],
                        found: shape,
                    });
                }
                shape[0] = kept.len();
                expert_slices(bytes, plan.num_experts(), kept)
            }
        };
        bytes_after += data.iter().map(|p| p.len() as u64).sum::<u64>();
        tensors.push(GgufTensorOut {
            name: name.to_string(),
            dtype: info.dtype,
            shape,
            data,
        });
    }

    let pruning = pruning_record(src, plan, config.moe.top_k, top_k_after, record);
    let text = serde_json::to_string_pretty(&pruning)
        .map_err(|e| Error::InvalidInput(format!("pruning record: {e}")))?;
    let count_key = format!("{arch}.expert_count");
    let used_key = format!("{arch}.expert_used_count");
    let mut replace = vec![
        (count_key.clone(), same_type(file.get(&count_key), keep)),
        (PRUNING_KEY.to_string(), GgufValue::String(text.clone())),
    ];
    if top_k_after != config.moe.top_k {
        replace.push((
            used_key.clone(),
            same_type(file.get(&used_key), top_k_after),
        ));
    }

    let tmp = sibling(out, "tmp")?;
    let sidecar = sidecar_path(out);
    let sidecar_tmp = sibling(&sidecar, "tmp")?;
    let result = (|| {
        file.write_edited(&tmp, &replace, &tensors)?;
        std::fs::write(&sidecar_tmp, text.as_bytes()).map_err(|e| Error::io(&sidecar_tmp, e))?;
        replace_path(&tmp, out)?;
        std::fs::rename(&sidecar_tmp, &sidecar).map_err(|e| Error::io(&sidecar, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&sidecar_tmp);
        return Err(e);
    }
    Ok(PruneSummary {
        experts_before: plan.num_experts(),
        experts_after: keep,
        top_k_before: config.moe.top_k,
        top_k_after,
        bytes_before,
        bytes_after,
        copied: Vec::new(),
    })
}

/// `{dir}/{stem}.pruning.json` for the output `{dir}/{stem}.gguf`.
pub fn sidecar_path(out: &Path) -> std::path::PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}.pruning.json"))
}

/// The layer of a tensor indexed by routed expert along its outermost
/// dimension: the merged experts (`ffn_*_exps`, not the shared `*_shexp`),
/// the router and its selection bias (`exp_probs_b.bias`).
fn expert_indexed(names: &MoeNames, name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let is_bias = names.selection_bias.is_some_and(|(_, g)| g == rest);
    let is_matrix = rest.strip_suffix(".weight").is_some_and(|base| {
        let mut routed = std::iter::once(names.router).chain(names.experts);
        routed.any(|(_, g)| g == base)
    });
    (is_bias || is_matrix).then(|| layer.parse().ok()).flatten()
}

/// `value` in the integer type the source stored the key with (uint32 when absent).
fn same_type(old: Option<&GgufValue>, value: usize) -> GgufValue {
    match old {
        Some(GgufValue::U64(_)) => GgufValue::U64(value as u64),
        Some(GgufValue::I32(_)) => GgufValue::I32(value as i32),
        Some(GgufValue::I64(_)) => GgufValue::I64(value as i64),
        Some(GgufValue::U16(_)) => GgufValue::U16(value as u16),
        _ => GgufValue::U32(value as u32),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn expert_indexed_tensors_are_the_experts_and_router() {
        let names = &crate::config::family::QWEN2_MOE.names;
        let expert_indexed = |name| expert_indexed(names, name);
        assert_eq!(expert_indexed("blk.3.ffn_gate_exps.weight"), Some(3));
        assert_eq!(expert_indexed("blk.0.ffn_down_exps.weight"), Some(0));
        assert_eq!(expert_indexed("blk.1.ffn_gate_inp.weight"), Some(1));
        for shared in [
            "blk.1.ffn_gate_inp_shexp.weight",
            "blk.1.ffn_up_shexp.weight",
            "blk.1.attn_q.weight",
            "token_embd.weight",
        ] {
            assert_eq!(expert_indexed(shared), None, "{shared}");
        }
    }

    #[test]
    fn the_selection_bias_is_pruned_with_its_experts() {
        let names = &crate::config::family::DEEPSEEK_V3.names;
        assert_eq!(expert_indexed(names, "blk.2.exp_probs_b.bias"), Some(2));
        assert_eq!(expert_indexed(names, "blk.2.ffn_gate_inp.weight"), Some(2));
        assert_eq!(expert_indexed(names, "blk.2.ffn_up_shexp.weight"), None);
        assert_eq!(expert_indexed(names, "blk.2.attn_k_b.weight"), None);
    }

    #[test]
    fn expert_slices_pick_whole_runs_in_order() {
        let bytes: Vec<u8> = (0..12).collect();
        let parts = expert_slices(Cow::Borrowed(&bytes), 4, &[1, 3]);
        assert_eq!(parts.concat(), vec![3, 4, 5, 9, 10, 11]);
        assert!(parts.iter().all(|p| matches!(p, Cow::Borrowed(_))));
    }
}
