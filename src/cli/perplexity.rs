//! `switchyard perplexity`: sliding-window perplexity of a text and the speed
//! it was computed at, the yardstick for `--expert-top-p` and `prune`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::eval::{PerplexityOptions, perplexity};
use switchyard::model::LoadOptions;
use switchyard::ops::QuantKind;

use super::expert_memory::{ExpertMemoryArgs, summary_json};
use super::model_arg::{load_engine_opts, model_name, resolve};
use super::routing_flags::{self, RoutingFlags};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Model directory or GGUF file. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize experts, attention and lm_head at load: q8_0, q4_0 or q4_k.
    #[arg(long)]
    quant: Option<QuantKind>,
    /// Plain text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window. Default: the model's context (max_position_embeddings).
    #[arg(long)]
    context: Option<usize>,
    /// Tokens between window starts. Default: half the context.
    #[arg(long)]
    stride: Option<usize>,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    routing: RoutingFlags,
    #[command(flatten)]
    experts: ExpertMemoryArgs,
}

/// Windows per forward: enough rows for the experts' batched matmuls, few
/// enough that the logits (`windows x context x vocab` f32) stay small.
const WINDOWS_PER_FORWARD: usize = 4;

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let dir = resolve(args.model.clone())?;
    let load = LoadOptions {
        quant: args.quant,
        expert_top_p: args.routing.expert_top_p()?,
        expert_memory: args.experts.memory(),
        ..LoadOptions::default()
    };
    let engine = load_engine_opts(&dir, load)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    // As the guide's `tokenizer(text)`: with the tokenizer's special tokens.
    let mut ids = engine.tokenizer()?.encode(&text, true)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    let model = engine.model();
    let context = args
        .context
        .unwrap_or(model.config().max_position_embeddings);
    let stride = args.stride.unwrap_or((context / 2).max(1));
    let mut observer = args
        .routing
        .observer(model, &model_name(args.model.as_deref()))?;
    let opts = PerplexityOptions {
        context,
        stride,
        windows_per_forward: WINDOWS_PER_FORWARD,
    };
    let report = perplexity(model, &ids, opts, &mut observer)
        .with_context(|| format!("scoring {}", args.text.display()))?;
    let active = routing_flags::finish(observer, model)?;
    let experts = model.experts();
    if args.json {
        let json = serde_json::json!({
            "perplexity": report.perplexity(),
            "mean_nll": report.mean_nll(),
            "scored_tokens": report.scored_tokens,
            "forwarded_tokens": report.forwarded_tokens,
            "windows": report.windows,
            "context": context,
            "stride": stride,
            "tokens_per_s": report.tokens_per_s(),
            "experts_per_token": active.mean_active_per_token,
            "expert_bytes_per_token": active.expert_bytes_per_token,
            "expert_cache": summary_json(experts.as_ref(), report.forwarded_tokens),
        });
        println!("{json}");
    } else {
        println!(
            "perplexity: {:.3} | {} tokens scored in {} windows (context {context}, stride {stride}) | {:.1} tokens/s forwarded | {}",
            report.perplexity(),
            report.scored_tokens,
            report.windows,
            report.tokens_per_s(),
            active.line(model)
        );
        super::expert_memory::print_summary(experts.as_ref(), report.forwarded_tokens);
    }
    Ok(())
}
