//! Every architecture against transformers: logits, router choices and greedy
//! continuations from the committed golden fixtures.

mod common;

use common::{ALL_FIXTURES, fixture, golden, golden_logits};
use switchyard::model::moe::Routing;
use switchyard::model::{
    ForwardOptions, LoadOptions, LogitsFor, Model, NoObserver, RoutingObserver, RoutingSite,
    SequenceId, SequenceInput,
};

/// Records `[layer] -> per-token expert ids` for one sequence.
#[derive(Default)]
struct Recorder {
    layers: std::collections::BTreeMap<usize, Vec<Vec<u32>>>,
    weights: std::collections::BTreeMap<usize, Vec<Vec<f32>>>,
}

impl RoutingObserver for Recorder {
    fn on_routing(&mut self, site: RoutingSite, routing: &Routing) {
        let ids = self.layers.entry(site.layer).or_default();
        let ws = self.weights.entry(site.layer).or_default();
        for t in 0..routing.n_tokens() {
            ids.push(routing.experts_of(t).to_vec());
            ws.push(routing.weights_of(t).to_vec());
        }
    }
}

fn load(name: &str) -> Model {
    Model::load(&fixture(name), &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_logits_and_routing(name: &str) {
    let model = load(name);
    let g = golden(name);
    assert_eq!(model.config().family.model_type(), g.model_type);
    for (i, p) in g.prompts.iter().enumerate() {
        let mut rec = Recorder::default();
        let ours = model
            .score(&p.input_ids, &mut rec)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let theirs = golden_logits(name, i);
        assert_eq!(ours.len(), theirs.len());
        let max_diff = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-4,
            "{name} prompt {i}: max |logit diff| {max_diff}"
        );

        for (layer, expected) in p.router_topk.iter().enumerate() {
            match expected {
                None => assert!(
                    !rec.layers.contains_key(&layer),
                    "{name}: dense layer {layer} routed"
                ),
                Some(expected) => {
                    assert_eq!(
                        rec.layers.get(&layer),
                        Some(expected),
                        "{name} prompt {i} layer {layer}"
                    );
                    let w_ours = &rec.weights[&layer];
                    let w_theirs = p.router_weights[layer].as_ref().unwrap();
                    for (a, b) in w_ours.iter().flatten().zip(w_theirs.iter().flatten()) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{name} layer {layer}: weight {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

/// Greedy decoding with the KV cache (prefill, then one token per step).
fn check_greedy(name: &str) {
    let model = load(name);
    let g = golden(name);
    for p in &g.prompts {
        let mut cache = model.new_cache(8);
        let mut logits = model
            .forward_last(&p.input_ids, &mut cache, &mut NoObserver)
            .unwrap();
        let mut out = Vec::new();
        for _ in 0..p.greedy.len() {
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            out.push(next);
            logits = model
                .forward_last(&[next], &mut cache, &mut NoObserver)
                .unwrap();
        }
        assert_eq!(out, p.greedy, "{name}: greedy continuation differs");
    }
}

/// Each prompt fed one token at a time through the KV cache (the decode path,
/// e.g. MLA's absorbed form): every position's logits match transformers'.
fn check_decode_logits(name: &str) {
    let model = load(name);
    let g = golden(name);
    for (i, p) in g.prompts.iter().enumerate() {
        let theirs = golden_logits(name, i);
        let mut cache = model.new_cache(2);
        for (pos, &id) in p.input_ids.iter().enumerate() {
            let ours = model
                .forward_last(&[id], &mut cache, &mut NoObserver)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let max_diff = ours
                .iter()
                .zip(&theirs[pos])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_diff < 1e-4,
                "{name} prompt {i} position {pos}: max |logit diff| {max_diff}"
            );
        }
    }
}

macro_rules! golden_tests {
    ($($fixture:ident),*) => {$(
        mod $fixture {
            #[test]
            fn logits_and_router_match_transformers() {
                super::check_logits_and_routing(stringify!($fixture));
            }
            #[test]
            fn greedy_continuation_matches_transformers() {
                super::check_greedy(stringify!($fixture));
            }
            #[test]
            fn decode_logits_match_transformers() {
                super::check_decode_logits(stringify!($fixture));
            }
        }
    )*};
}

golden_tests!(
    qwen3_moe,
    qwen3_moe_fused,
    qwen3_moe_bf16_sharded,
    mixtral,
    qwen2_moe,
    olmoe,
    deepseek_v2_lite,
    deepseek_v2,
    deepseek_v3,
    glm4_moe,
    gpt_oss,
    gpt_oss_bf16,
    flex_olmo,
    ernie4_5_moe
);

#[test]
fn parameter_counts_match_torch_numel() {
    for name in ALL_FIXTURES {
        let g = golden(name);
        let cfg = switchyard::config::load_model_config(&fixture(name)).unwrap();
        let counts = cfg.parameter_counts();
        assert_eq!(counts.total, g.num_parameters, "{name}: total");
        assert_eq!(counts.active, g.num_active_parameters, "{name}: active");
    }
}

/// Every routing site a forward reports: `(sequence, layer, start_position, n_tokens)`.
#[derive(Default)]
struct Sites(Vec<(SequenceId, usize, usize, usize)>);

impl RoutingObserver for Sites {
    fn on_routing(&mut self, site: RoutingSite, routing: &Routing) {
        self.0.push((
            site.sequence,
            site.layer,
            site.start_position,
            routing.n_tokens(),
        ));
    }
}

/// Two sequences in one forward (the batched-decoding path), each with its own
/// cache: prefill together, then a decode step together in the other batch
/// order, same logits as alone, and routing reported under each sequence's id.
#[test]
fn batched_sequences_match_golden_logits() {
    let name = "qwen2_moe";
    let model = load(name);
    let g = golden(name);
    let (a, b) = (&g.prompts[0], &g.prompts[1]);
    let (id_a, id_b) = (SequenceId(7), SequenceId(3));
    let (len_a, len_b) = (a.input_ids.len() - 1, b.input_ids.len() - 1);
    let mut cache_a = model.new_cache(4);
    let mut cache_b = model.new_cache(4);
    let mut sites = Sites::default();
    // Prefill all but the last token of each prompt together.
    let mut seqs = [
        SequenceInput {
            id: id_a,
            tokens: &a.input_ids[..len_a],
            cache: Some(&mut cache_a),
        },
        SequenceInput {
            id: id_b,
            tokens: &b.input_ids[..len_b],
            cache: Some(&mut cache_b),
        },
    ];
    let opts = ForwardOptions {
        logits: LogitsFor::LastOfEachSequence,
        keep_router_logits: false,
    };
    model.forward(&mut seqs, &mut sites, opts).unwrap();
    // One decode step for both, b first now: the last prompt token.
    let mut seqs = [
        SequenceInput {
            id: id_b,
            tokens: &b.input_ids[len_b..],
            cache: Some(&mut cache_b),
        },
        SequenceInput {
            id: id_a,
            tokens: &a.input_ids[len_a..],
            cache: Some(&mut cache_a),
        },
    ];
    let out = model.forward(&mut seqs, &mut sites, opts).unwrap();
    let rows = out.logits.to_vec2::<f32>().unwrap();
    for (row, (prompt, i)) in rows.iter().zip([(b, 1), (a, 0)]) {
        let golden_last = golden_logits(name, i).pop().unwrap();
        let diff = row
            .iter()
            .zip(&golden_last)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "sequence {i} ({} tokens): {diff}",
            prompt.input_ids.len()
        );
    }
    let moe_layers = g.prompts[0].router_topk.iter().flatten().count();
    for (id, len) in [(id_a, len_a), (id_b, len_b)] {
        let mut of_id: Vec<(usize, usize)> = sites
            .0
            .iter()
            .filter(|s| s.0 == id)
            .map(|s| (s.2, s.3))
            .collect();
        of_id.dedup();
        assert_eq!(sites.0.iter().filter(|s| s.0 == id).count(), 2 * moe_layers);
        assert_eq!(of_id, [(0, len), (len, 1)], "sequence {id}");
    }
}

/// gpt-oss's sliding layer keeps only what its window (4) still sees: after
/// the longest prompt and 40 decoded tokens the cache holds every position of
/// the full-attention layer and twice the window of the sliding one.
#[test]
fn gpt_oss_sliding_layer_cache_is_bounded_by_its_window() {
    let model = load("gpt_oss");
    let a = &model.config().attention;
    assert_eq!(a.layer_windows, [Some(4), None]);
    let row_bytes = a.cache_values_per_token() * 4;
    let prompt = &golden("gpt_oss").prompts[1].input_ids;
    let mut cache = model.new_cache(64);
    model
        .forward_last(prompt, &mut cache, &mut NoObserver)
        .unwrap();
    for _ in 0..40 {
        model
            .forward_last(&[3], &mut cache, &mut NoObserver)
            .unwrap();
    }
    let len = cache.len();
    assert_eq!(len, prompt.len() + 40);
    // The full layer's buffer was allocated for 64 positions up front.
    assert_eq!(cache.allocated_bytes(), (64 + 2 * 4) * row_bytes);
    assert_eq!(cache.bytes_bound(len, 1), (len + 2 * 4) * row_bytes);
}

/// The Hub's MXFP4 experts are kept as their codes and exponents (17 bytes per
/// 32 weights), not expanded to floats; the bf16 copy's are f32 as loaded.
#[test]
fn gpt_oss_mxfp4_experts_stay_mxfp4() {
    let model = load("gpt_oss");
    let cfg = model.config();
    let (h, ffn) = (cfg.hidden_size, cfg.moe.expert_ffn);
    let id = switchyard::experts::ExpertId {
        layer: 1,
        expert: 3,
    };
    // Codes and exponents of the three matrices, plus f32 biases (2 ffn + h).
    let want = 3 * h * ffn * 17 / 32 + (2 * ffn + h) * 4;
    assert_eq!(model.experts().expert_bytes(id), want);
    let bf16 = load("gpt_oss_bf16");
    assert_eq!(
        bf16.experts().expert_bytes(id),
        3 * h * ffn * 4 + (2 * ffn + h) * 4
    );
}
