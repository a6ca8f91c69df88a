use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::generate::{Flow, GenerateOptions, SamplingParams};
use switchyard::model::LoadOptions;
use switchyard::ops::QuantKind;

use super::expert_memory::{ExpertMemoryArgs, print_summary, summary_json};
use super::model_arg::{load_engine_opts, model_name, parse_ids, resolve};
use super::routing_flags::{self, RoutingFlags};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model directory (config.json + *.safetensors + tokenizer.json) or GGUF file. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize experts, attention and lm_head at load: q8_0, q4_0 or q4_k.
    #[arg(long)]
    quant: Option<QuantKind>,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print {"token_ids":[...],"text":"...","expert_cache":...} instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    experts: ExpertMemoryArgs,
    #[command(flatten)]
    routing: RoutingFlags,
}

const DEFAULT_PROMPT: &str = "The";

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let dir = resolve(args.model.clone())?;
    let load = LoadOptions {
        quant: args.quant,
        expert_memory: args.experts.memory(),
        expert_top_p: args.routing.expert_top_p()?,
        ..LoadOptions::default()
    };
    let engine = load_engine_opts(&dir, load)?;
    let mut observer = args
        .routing
        .observer(engine.model(), &model_name(args.model.as_deref()))?;
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => parse_ids(ids)?,
        (None, text) => {
            engine.encode_prompt(text.as_deref().unwrap_or(DEFAULT_PROMPT), args.chat)?
        }
    };
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_ids: engine.stop_ids(),
    };
    let mut ids = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = if args.json {
        None
    } else {
        engine.tokenizer().ok().map(|t| t.stream())
    };
    let stats = engine
        .generate(&prompt, &opts, &mut observer, &mut |id| {
            ids.push(id);
            if let Some(stream) = stream.as_mut()
                && let Some(text) = stream.push(id)?
            {
                // A closed stdout (e.g. piped into `head`) ends generation quietly.
                if out
                    .write_all(text.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return Ok(Flow::Stop);
                }
            }
            Ok(Flow::Continue)
        })
        .context("generation failed")?;

    if args.json {
        let text = match engine.tokenizer() {
            Ok(t) => t.decode(&ids, true)?,
            Err(_) => String::new(),
        };
        let tokens = stats.prompt_tokens + stats.generated_tokens;
        let expert_cache = summary_json(engine.model().experts().as_ref(), tokens);
        let json =
            serde_json::json!({ "token_ids": ids, "text": text, "expert_cache": expert_cache });
        writeln!(out, "{json}")?;
    } else if stream.is_none() {
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    } else {
        writeln!(out)?;
    }
    let active = routing_flags::finish(observer, engine.model())?;
    eprintln!(
        "prompt tokens: {} | generated tokens: {} | prefill: {:.1} tokens/s | decode: {:.1} tokens/s | {}",
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.prefill_tokens_per_s(),
        stats.decode_tokens_per_s(),
        active.line(engine.model())
    );
    print_summary(
        engine.model().experts().as_ref(),
        stats.prompt_tokens + stats.generated_tokens,
    );
    Ok(())
}
