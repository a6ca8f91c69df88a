use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::model::LoadOptions;
use switchyard::ops::QuantKind;

use super::expert_memory::{ExpertMemoryArgs, print_summary};
use super::model_arg::{load_engine_opts, model_name, parse_ids};
use super::routing_flags::{self, RoutingFlags};

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Model directory or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Quantize experts, attention and lm_head at load: q8_0, q4_0 or q4_k.
    #[arg(long)]
    quant: Option<QuantKind>,
    /// Comma-separated token ids.
    #[arg(long)]
    prompt_ids: String,
    /// Output .npy file: float32, shape [seq, vocab].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    experts: ExpertMemoryArgs,
    #[command(flatten)]
    routing: RoutingFlags,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.out.is_dir(),
        "--out {} is a directory; name a .npy file",
        args.out.display()
    );
    let load = LoadOptions {
        quant: args.quant,
        expert_memory: args.experts.memory(),
        expert_top_p: args.routing.expert_top_p()?,
        ..LoadOptions::default()
    };
    let engine = load_engine_opts(&args.model, load)?;
    let ids = parse_ids(&args.prompt_ids)?;
    anyhow::ensure!(!ids.is_empty(), "--prompt-ids is empty");
    let mut observer = args
        .routing
        .observer(engine.model(), &model_name(Some(&args.model)))?;
    let logits = engine.score(&ids, &mut observer)?;
    let active = routing_flags::finish(observer, engine.model())?;
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    // Write next to the target, then rename: a failed run never leaves half a
    // file, nor the temporary one.
    let tmp = args.out.with_extension("npy.tmp");
    let written = logits
        .write_npy(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, &args.out)
                .with_context(|| format!("writing {}", args.out.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    eprintln!(
        "wrote {:?} logits to {} | {}",
        logits.dims(),
        args.out.display(),
        active.line(engine.model())
    );
    print_summary(engine.model().experts().as_ref(), ids.len());
    Ok(())
}
