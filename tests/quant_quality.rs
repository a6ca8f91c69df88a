//! Quantized models stay close to float32.
//!
//! On the tiny random fixtures a single Q8_0 matmul already differs from f32 by
//! ~0.75 % relative RMS (weights 0.53 %, activations the rest) and Q4_0 by ~8.5 %,
//! and three random layers amplify that (position 0 alone: 1.4-1.7 % for Q8_0),
//! so the fixture bounds below are what the formats reach there (the mixtral
//! fixture's width of 48 is off the 32-element block, so it stays f32). The issue's
//! bounds (q8_0 logits within 1 %, q4 perplexity within 5 %) are asserted on the
//! trained demo model (`models/demo`, measured 0.94 % and 0.55 %).

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{ALL_FIXTURES, fixture, perplexity, texts};
use switchyard::model::{LoadOptions, Model, NoObserver};
use switchyard::ops::QuantKind;

fn load(dir: &Path, quant: Option<QuantKind>) -> Model {
    let opts = LoadOptions {
        quant,
        ..LoadOptions::default()
    };
    Model::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// `[seq, vocab]` logits of every position.
fn logits(model: &Model, ids: &[u32]) -> Tensor {
    model.score(ids, &mut NoObserver).unwrap()
}

fn relative_rms(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap();
    let n = b.sqr().unwrap().mean_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

/// [`perplexity`] of `[seq, vocab]` logits.
fn ppl_of(logits: &Tensor, ids: &[u32]) -> f32 {
    perplexity(&logits.to_vec2::<f32>().unwrap(), ids) as f32
}

/// Worst q8_0 logits error and worst q4 perplexity ratio (|ppl / f32 ppl - 1|) of a model.
fn errors(dir: &Path, texts: &[Vec<u32>]) -> (f32, f32) {
    let base = load(dir, None);
    let q8 = load(dir, Some(QuantKind::Q8_0));
    let q4 = [
        load(dir, Some(QuantKind::Q4_0)),
        load(dir, Some(QuantKind::Q4K)),
    ];
    let (mut q8_err, mut q4_err) = (0f32, 0f32);
    for ids in texts {
        let want = logits(&base, ids);
        q8_err = q8_err.max(relative_rms(&logits(&q8, ids), &want));
        let ppl = ppl_of(&want, ids);
        for m in &q4 {
            q4_err = q4_err.max((ppl_of(&logits(m, ids), ids) / ppl - 1.0).abs());
        }
    }
    (q8_err, q4_err)
}

#[test]
fn quantized_fixtures_stay_close_to_f32() {
    for name in ALL_FIXTURES {
        let (q8, q4) = errors(&fixture(name), &texts(name));
        eprintln!(
            "{name}: q8_0 logits {:.2} %, q4 perplexity {:.1} %",
            q8 * 100.0,
            q4 * 100.0
        );
        // Measured: q8_0 3.6-7.1 %, q4 35-111 % (a broken kernel gives ~10x).
        // The DeepSeek fixtures: q8_0 6.5-19 %, q4 87-124 %. Their position-0
        // logits move 2.5-3.2 % under q8_0 (qwen2_moe: 2.4 %), but q8_0 flips
        // 8-12 of 232 token-layer expert choices (qwen2_moe: 3 of 166): V3's
        // selection bias and the group limits leave many tokens near a tie.
        // GLM-4 MoE has V3's router: q8_0 12.9 %, q4 75 %.
        // gpt-oss (MXFP4 experts on Q8 activations, or its bf16 copy's experts
        // as Q8_0): q8_0 13-14 %, q4 240-263 %, both copies alike: position 0 moves
        // 2-5 % (qwen2_moe 1.3-2.5 %), but its large clamped expert weights and
        // router bias make the 1-3 of 66-88 flipped expert choices costly.
        // ERNIE's selection bias leaves ties as V3's does (q8_0 17 %, position 0 3.7 %,
        // 20 of 232 choices flipped; Q4_0 flips 106, V3 107), and its four
        // layers take the continuation of the one-token prompt from
        // perplexity 9.9 to 37.5 under Q4_0 (logits 71 % off, V3 61 %).
        // FlexOlmo's post-norms rescale each block's output, error included,
        // to the residual stream's size rather than adding it small (q8_0
        // 12 %, position 0 2.5 % as qwen2_moe, 4 choices flipped).
        let (q8_max, q4_max) = match name {
            n if n.starts_with("deepseek") || n.starts_with("glm4") => (0.25, 1.5),
            n if n.starts_with("gpt_oss") => (0.25, 3.5),
            "ernie4_5_moe" => (0.25, 3.5),
            "flex_olmo" => (0.16, 1.25),
            _ => (0.08, 1.25),
        };
        assert!(q8 < q8_max, "{name}: q8_0 logits relative rms {q8}");
        assert!(
            q4 < q4_max,
            "{name}: q4 perplexity off by {:.0} %",
            q4 * 100.0
        );
    }
}

#[test]
fn quantized_demo_model_meets_the_issue_bounds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    if !dir.join("config.json").exists() {
        eprintln!("skipped: no models/demo");
        return;
    }
    // English text, the kind the demo model was trained on.
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "The old lighthouse keeper climbed the stairs every evening to light the lamp. \
        Ships passing in the night saw the beam sweep across the water and knew the rocks were near. \
        One winter a storm broke the windows, and the keeper worked until morning to keep the light \
        burning, because a fishing boat was still out at sea and its crew depended on him.";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let (q8, q4) = errors(&dir, &[ids]);
    eprintln!(
        "demo: q8_0 logits {:.2} % relative RMS, q4 perplexity {:.2} %",
        q8 * 100.0,
        q4 * 100.0
    );
    assert!(q8 < 0.01, "demo: q8_0 logits relative rms {q8}");
    assert!(q4 < 0.05, "demo: q4 perplexity off by {:.1} %", q4 * 100.0);
}
