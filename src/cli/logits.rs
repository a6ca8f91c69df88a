use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::model::NoObserver;
use switchyard::ops::QuantKind;

use super::expert_memory::{ExpertMemoryArgs, print_summary};
use super::model_arg::{load_engine_with, parse_ids};

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
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.out.is_dir(),
        "--out {} is a directory; name a .npy file",
        args.out.display()
    );
    let engine = load_engine_with(&args.model, args.quant, args.experts.memory())?;
    let ids = parse_ids(&args.prompt_ids)?;
    anyhow::ensure!(!ids.is_empty(), "--prompt-ids is empty");
    let logits = engine.score(&ids, &mut NoObserver)?;
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
    eprintln!("wrote {:?} logits to {}", logits.dims(), args.out.display());
    print_summary(engine.model().experts().as_ref(), ids.len());
    Ok(())
}
