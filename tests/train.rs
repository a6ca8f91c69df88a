//! Training: loss goes down, balancing does what it says, checkpoints round-trip
//! and resume exactly. Tiny model, few-KB generated corpus, a few seconds each.

use std::collections::BTreeMap;

use candle_core::Tensor;
use switchyard::model::{LoadOptions, Model, NoObserver};
use switchyard::train::{
    Corpus, ENDOFTEXT, TrainConfig, Trainer, VarStore, train_tokenizer, write_tokenizer_files,
};

/// A few KB of two "domains": simple English sentences and German-ish ones.
fn texts() -> Vec<String> {
    let subjects = [
        "the cat",
        "a dog",
        "my friend",
        "the old man",
        "the king",
        "a small bird",
    ];
    let verbs = ["sees", "likes", "follows", "finds", "carries", "watches"];
    let objects = [
        "the red ball",
        "a green tree",
        "the river",
        "an apple",
        "the house",
        "the moon",
    ];
    let de = [
        "der Hund",
        "die Katze",
        "ein Vogel",
        "das Haus",
        "der Mond",
        "ein Baum",
    ];
    let de_verbs = ["sieht", "mag", "findet", "sucht"];
    let mut en = String::new();
    let mut ge = String::new();
    let mut x: u64 = 7;
    let mut next = |n: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % n
    };
    for _ in 0..300 {
        en += &format!(
            "{} {} {}. ",
            subjects[next(subjects.len())],
            verbs[next(verbs.len())],
            objects[next(objects.len())]
        );
        ge += &format!(
            "{} {} {}. ",
            de[next(de.len())],
            de_verbs[next(de_verbs.len())],
            de[next(de.len())]
        );
    }
    vec![en, ge]
}

fn tiny(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        warmup_steps: 5,
        eval_batches: 2,
        ..TrainConfig::preset("tiny").expect("tiny preset")
    }
}

fn corpus(cfg: &TrainConfig) -> (Corpus, tokenizers::Tokenizer) {
    let texts = texts();
    let tok = train_tokenizer(&texts, cfg.vocab_size).expect("tokenizer");
    let eot = tok.token_to_id(ENDOFTEXT).expect("eot");
    let corpus = Corpus::build(&texts, &tok, cfg.holdout_fraction, eot).expect("corpus");
    (corpus, tok)
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    model
        .score(tokens, &mut NoObserver)
        .expect("forward")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("logits")
}

fn to_vecs(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f32>> {
    t.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.flatten_all()
                    .and_then(|v| v.to_vec1::<f32>())
                    .expect("values"),
            )
        })
        .collect()
}

#[test]
fn fifty_steps_lower_heldout_loss() {
    let cfg = tiny(50);
    let (corpus, _) = corpus(&cfg);
    let mut trainer = Trainer::new(cfg, corpus).expect("trainer");
    let before = trainer.eval_loss().expect("eval");
    while !trainer.is_done() {
        trainer.step().expect("step");
    }
    let after = trainer.eval_loss().expect("eval");
    eprintln!("held-out loss {before:.3} -> {after:.3}");
    assert!(
        after < before - 1.0,
        "held-out loss {before:.3} -> {after:.3}"
    );
}

#[test]
fn balancing_loss_keeps_expert_load_more_even() {
    // Mean load entropy over the last steps, without and with the Switch loss.
    let entropy = |balance_coef: f64| {
        let cfg = TrainConfig {
            balance_coef,
            z_loss_coef: 0.0,
            lr: 1e-2,
            ..tiny(60)
        };
        let (corpus, _) = corpus(&cfg);
        let mut trainer = Trainer::new(cfg, corpus).expect("trainer");
        let mut tail = Vec::new();
        while !trainer.is_done() {
            let s = trainer.step().expect("step");
            if s.step > 40 {
                tail.push(
                    s.load_entropy_bits.iter().sum::<f64>() / s.load_entropy_bits.len() as f64,
                );
            }
        }
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let (off, on) = (entropy(0.0), entropy(0.01));
    eprintln!("load entropy: coef 0 -> {off:.3} bits, coef 0.01 -> {on:.3} bits (max 3)");
    assert!(
        on > off,
        "load entropy: coef 0 -> {off:.3} bits, coef 0.01 -> {on:.3} bits"
    );
}

#[test]
fn save_then_load_gives_identical_logits() {
    let cfg = tiny(5);
    let (corpus, tok) = corpus(&cfg);
    let tokens: Vec<u32> = corpus.heldout[..20].to_vec();
    let mut trainer = Trainer::new(cfg, corpus).expect("trainer");
    for _ in 0..5 {
        trainer.step().expect("step");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    trainer.export(dir.path()).expect("export");
    write_tokenizer_files(&tok, dir.path(), 64).expect("tokenizer files");
    let loaded = Model::load(dir.path(), &LoadOptions::default()).expect("load export");
    assert_eq!(
        logits(&trainer.model().expect("model"), &tokens),
        logits(&loaded, &tokens)
    );
    // The export is a complete model directory for the engine too.
    let engine = switchyard::Engine::load(dir.path(), &LoadOptions::default()).expect("engine");
    assert!(!engine.stop_ids().is_empty());
}

#[test]
fn optimizer_step_reaches_the_rebuilt_model() {
    // The loader fuses gate/up with a copy; a model rebuilt after a step must see
    // the updated vars, i.e. equal a model built from a snapshot of them.
    let cfg = tiny(3);
    let (corpus, _) = corpus(&cfg);
    let tokens: Vec<u32> = corpus.heldout[..16].to_vec();
    let mut trainer = Trainer::new(cfg.clone(), corpus).expect("trainer");
    let before = logits(&trainer.model().expect("model"), &tokens);
    trainer.step().expect("step");
    let after = logits(&trainer.model().expect("model"), &tokens);
    assert_ne!(before, after, "a step must change the output");
    let snapshot =
        VarStore::from_tensors(&cfg.model_config(), trainer.vars().tensors()).expect("snapshot");
    let fresh = Model::from_source(
        &cfg.model_config(),
        &snapshot.frozen(),
        &LoadOptions::default(),
    )
    .expect("fresh model");
    assert_eq!(after, logits(&fresh, &tokens));
}

#[test]
fn resume_equals_uninterrupted_run() {
    let cfg = tiny(6);
    let (corpus, _) = corpus(&cfg);
    let mut straight = Trainer::new(cfg.clone(), corpus.clone()).expect("trainer");
    let mut straight_losses = Vec::new();
    while !straight.is_done() {
        straight_losses.push(straight.step().expect("step").loss);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = Trainer::new(cfg, corpus.clone()).expect("trainer");
    let mut losses = Vec::new();
    for _ in 0..3 {
        losses.push(first.step().expect("step").loss);
    }
    first.save_checkpoint(dir.path()).expect("save");
    drop(first);
    let mut resumed = Trainer::resume(dir.path(), corpus, None).expect("resume");
    assert_eq!(resumed.step_count(), 3);
    while !resumed.is_done() {
        losses.push(resumed.step().expect("step").loss);
    }
    assert_eq!(losses, straight_losses);
    assert_eq!(
        to_vecs(&resumed.vars().tensors()),
        to_vecs(&straight.vars().tensors())
    );
}

#[test]
fn toml_config_overrides_preset_and_rejects_unknown_keys() {
    let base = TrainConfig::preset("tiny").expect("preset");
    let path = std::path::Path::new("x.toml");
    let c =
        TrainConfig::with_toml(&base, "num_experts = 4\nbalance_coef = 0.0\n", path).expect("toml");
    assert_eq!(
        (c.num_experts, c.balance_coef, c.hidden_size),
        (4, 0.0, base.hidden_size)
    );
    assert!(TrainConfig::with_toml(&base, "experts = 4\n", path).is_err());
    let shared = TrainConfig {
        shared_expert_ffn: 16,
        ..base
    };
    assert_eq!(shared.model_config().family.model_type(), "qwen2_moe");
}
