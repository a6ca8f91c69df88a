//! Locating and loading the model a subcommand works on.

use std::path::PathBuf;

use anyhow::Context;
use switchyard::Engine;
use switchyard::experts::ExpertMemory;
use switchyard::model::LoadOptions;
use switchyard::ops::QuantKind;

/// The demo model that ships in the repository, used when no `--model` is given:
/// the checkout the binary was built from, else `models/demo` under the working
/// directory (a binary copied out of its checkout and run from a clone).
pub fn demo_model_dir() -> Option<PathBuf> {
    [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo"),
        PathBuf::from("models/demo"),
    ]
    .into_iter()
    .find(|dir| dir.join("config.json").exists())
}

pub fn resolve(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir),
        None => demo_model_dir().with_context(|| {
            format!(
                "no --model given and the bundled demo model is missing (looked in {}/models/demo and ./models/demo)",
                env!("CARGO_MANIFEST_DIR")
            )
        }),
    }
}

pub fn load_engine(dir: &std::path::Path) -> anyhow::Result<Engine> {
    load_engine_with(dir, None, None)
}

/// The model as the user named it, for traces and summaries: no machine path
/// when the default was used.
pub fn model_name(model: Option<&std::path::Path>) -> String {
    match model {
        Some(m) => m.display().to_string(),
        None => "the demo model (models/demo)".to_string(),
    }
}

/// [`load_engine`] with the matrices quantized at load (`--quant`) and the
/// routed experts under an expert cache (`--expert-memory`).
pub fn load_engine_with(
    dir: &std::path::Path,
    quant: Option<QuantKind>,
    expert_memory: Option<ExpertMemory>,
) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        quant,
        expert_memory,
        ..LoadOptions::default()
    };
    load_engine_opts(dir, opts)
}

/// Any [`LoadOptions`] (progress bar on), e.g. with `--expert-top-p`.
pub fn load_engine_opts(dir: &std::path::Path, opts: LoadOptions) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        progress: true,
        ..opts
    };
    Engine::load(dir, &opts).with_context(|| format!("loading model from {}", dir.display()))
}

/// Parses `1,2,3` into token ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("--prompt-ids: {s:?} is not a token id"))
        })
        .collect()
}
