use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::config::{load_model_config, open_gguf};
use switchyard::model::check_checkpoint;
use switchyard::weights::{GgufFile, SafetensorsFiles};

use super::model_arg::resolve;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Model directory or GGUF file. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let dir = resolve(args.model)?;
    // Bytes per parameter as stored: taken from the checkpoint's own tensors.
    let (mut stored_bytes, mut stored_params) = (0usize, 0usize);
    // The configuration is checked against every tensor exactly as loading does
    // (from metadata only), so what is printed is what would run.
    let cfg = if GgufFile::is_gguf(&dir) {
        let (cfg, src) = open_gguf(&dir)?;
        let file = src.file();
        for name in file.tensor_names() {
            if let Some(info) = file.tensor_info(name) {
                stored_bytes = stored_bytes.saturating_add(info.size_in_bytes());
                stored_params = stored_params.saturating_add(info.numel());
            }
        }
        check_checkpoint(&cfg, &src).with_context(|| format!("checking {}", dir.display()))?;
        cfg
    } else {
        let cfg = load_model_config(&dir)?;
        let files = SafetensorsFiles::open_dir(&dir)?;
        for name in files.names() {
            if let Some(meta) = files.meta(name) {
                stored_bytes = stored_bytes
                    .saturating_add(meta.numel().saturating_mul(meta.dtype.size_in_bytes()));
                stored_params = stored_params.saturating_add(meta.numel());
            }
        }
        let report = check_checkpoint(&cfg, &files)
            .with_context(|| format!("checking {}", dir.display()))?;
        if let Some(warning) = report.unused_warning() {
            eprintln!("warning: {warning}");
        }
        cfg
    };
    let counts = cfg.parameter_counts();
    let bytes_per_param = stored_bytes as f64 / stored_params.max(1) as f64;
    let expert_bytes = (counts.per_expert as f64 * bytes_per_param) as usize;
    let all_experts_bytes = (counts.routed_experts as f64 * bytes_per_param) as usize;
    let non_expert_bytes = (counts.non_expert as f64 * bytes_per_param) as usize;
    let m = &cfg.moe;
    let a = &cfg.attention;
    // The KV cache holds f32, like the activations. Sliding-window layers keep
    // a bounded buffer (`KvCache`: twice the window while decoding), so only the
    // full-attention layers grow with the sequence.
    let sliding: Vec<usize> = (0..cfg.num_layers).filter_map(|l| a.window(l)).collect();
    let growing_layers = cfg.num_layers - sliding.len();
    let row_bytes = a.cache_values_per_token() * std::mem::size_of::<f32>();
    let kv_bytes = row_bytes * growing_layers;
    let kv_full_bytes =
        a.full_cache_values_per_token() * std::mem::size_of::<f32>() * growing_layers;
    let sliding_bound_bytes: usize = sliding.iter().map(|w| 2 * w * row_bytes).sum();
    let json = serde_json::json!({
        "model_dir": dir.display().to_string(),
        "architecture": cfg.family.model_type(),
        "layers": cfg.num_layers,
        "moe_layers": m.num_sparse_layers(),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "attention_heads": a.num_heads,
        "kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "rotary_dim": a.rotary_dim,
        "experts_per_layer": m.num_experts,
        "top_k": m.top_k,
        "shared_experts": usize::from(m.shared_expert_ffn.is_some()),
        "shared_expert_ffn": m.shared_expert_ffn.unwrap_or(0),
        "expert_ffn": m.expert_ffn,
        "norm_topk_prob": m.router.norm_topk_prob,
        "context": cfg.max_position_embeddings,
        "kv_cache_bytes_per_token": kv_bytes,
        "kv_cache_bytes_per_token_full_attention": kv_full_bytes,
        "sliding_window_layers": sliding.len(),
        "sliding_window": sliding.first(),
        "kv_cache_bytes_sliding_layers_bound": sliding_bound_bytes,
        "total_parameters": counts.total,
        "active_parameters_per_token": counts.active,
        "parameters_per_expert": counts.per_expert,
        "bytes_per_expert": expert_bytes,
        "bytes_all_experts": all_experts_bytes,
        "bytes_non_expert": non_expert_bytes,
        "stored_parameters": stored_params,
        "stored_bytes": stored_bytes,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("model:            {}", dir.display());
    println!("architecture:     {}", cfg.family.model_type());
    println!(
        "layers:           {} ({} MoE, {} dense)",
        cfg.num_layers,
        m.num_sparse_layers(),
        cfg.num_layers - m.num_sparse_layers()
    );
    match a.mla {
        Some(mla) => println!(
            "attention:        {} heads, multi-head latent, q_lora_rank {}, kv_lora_rank {}, q/k {} + rotary {}, v {}",
            a.num_heads,
            mla.q_lora_rank.map_or("none".into(), |r| r.to_string()),
            mla.kv_lora_rank,
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim
        ),
        None => println!(
            "attention:        {} query / {} KV heads of {}{}",
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            if a.rotary_dim < a.head_dim {
                format!(", rotary on the first {}", a.rotary_dim)
            } else {
                String::new()
            }
        ),
    }
    match a.mla {
        Some(mla) => println!(
            "kv cache:         {} per token (latent {} + rotary key {} per layer); full multi-head attention: {}",
            human_bytes(kv_bytes),
            mla.kv_lora_rank,
            mla.qk_rope_head_dim,
            human_bytes(kv_full_bytes)
        ),
        None if sliding.is_empty() => {
            println!("kv cache:         {} per token", human_bytes(kv_bytes))
        }
        None => println!(
            "kv cache:         {} per token in full-attention layers ({growing_layers}); sliding-window layers ({}, window {}) keep at most twice their window while decoding: {} whatever the length",
            human_bytes(kv_bytes),
            sliding.len(),
            sliding[0],
            human_bytes(sliding_bound_bytes)
        ),
    }
    // Several shared experts (DeepSeek's `n_shared_experts`) run as one SwiGLU
    // of their summed width, so the width is what there is to state.
    println!(
        "experts:          {} per layer, top-{}, width {}, {}",
        m.num_experts,
        m.top_k,
        m.expert_ffn,
        match m.shared_expert_ffn {
            Some(w) => format!("shared expert width {w}"),
            None => "no shared expert".to_string(),
        }
    );
    println!(
        "parameters:       {} total, {} active per token",
        counts.total, counts.active
    );
    println!("bytes per expert: {}", human_bytes(expert_bytes));
    println!("all experts:      {}", human_bytes(all_experts_bytes));
    println!("non-expert:       {}", human_bytes(non_expert_bytes));
    Ok(())
}

fn human_bytes(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {} ({bytes} bytes)", units[unit])
    }
}
