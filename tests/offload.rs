//! Experts read on demand under `--expert-memory`: logits bit-identical to the
//! all-resident model under a budget that evicts at every layer call, the
//! budget never exceeded, the live counting equal to the replay simulator's,
//! and a checkpoint truncated after load failing the run with a clear error.

mod common;

use std::path::Path;

use common::{ALL_FIXTURES, fixture, golden};
use switchyard::config::{ByteSize, load_model_config};
use switchyard::experts::{
    CacheOutcome, Capacity, ExpertCache, ExpertDims, ExpertFile, ExpertFileMode, ExpertId,
    ExpertLayout, ExpertMemory, ExpertProvider, ExpertReads, LayerCall, LayerExperts,
    MissPrecision, PackedExperts, PackedPlan, PolicyKind, Prefetch, replay,
};
use switchyard::model::{LoadOptions, Model, NoObserver};
use switchyard::ops::QuantKind;
use switchyard::weights::{SafetensorsFiles, TensorSource};

fn load(dir: &Path, quant: Option<QuantKind>, memory: Option<ExpertMemory>) -> Model {
    let opts = LoadOptions {
        quant,
        expert_memory: memory,
        ..LoadOptions::default()
    };
    Model::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn minimum_budget(dir: &Path, quant: Option<QuantKind>) -> u64 {
    let resident = load(dir, quant, None);
    let experts = resident.experts();
    let top_k = resident.config().moe.top_k;
    let largest = (0..resident.layers().len())
        .map(|l| {
            experts.expert_bytes(switchyard::experts::ExpertId {
                layer: l as u32,
                expert: 0,
            })
        })
        .max()
        .unwrap();
    (top_k * largest) as u64
}

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    model
        .score(ids, &mut NoObserver)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A packed expert file in `dir` (a test's own), or none.
fn packed_in(mode: ExpertFileMode, dir: &tempfile::TempDir) -> ExpertFile {
    ExpertFile {
        mode,
        dir: Some(dir.path().to_path_buf()),
    }
}

/// Every fixture, float and `--quant`, under both policies: the same bits,
/// read from a packed expert file (LRU) and from the checkpoint (LFU).
#[test]
fn logits_under_eviction_at_every_call_are_bit_identical() {
    let packed_dir = tempfile::tempdir().unwrap();
    for name in ALL_FIXTURES {
        let dir = fixture(name);
        for quant in [None, Some(QuantKind::Q8_0), Some(QuantKind::Q4_0)] {
            let resident = load(&dir, quant, None);
            let budget = minimum_budget(&dir, quant);
            for policy in [PolicyKind::Lru, PolicyKind::Lfu { half_life: None }] {
                let mode = match policy {
                    PolicyKind::Lru => ExpertFileMode::On,
                    _ => ExpertFileMode::Off,
                };
                let memory = ExpertMemory {
                    budget: ByteSize::Bytes(budget),
                    policy,
                    prefetch: Prefetch::Off,
                    miss_precision: MissPrecision::Off,
                    record_routing: true,
                    expert_file: packed_in(mode, &packed_dir),
                };
                let cached = load(&dir, quant, Some(memory));
                for p in &golden(name).prompts {
                    assert_eq!(
                        logits(&cached, &p.input_ids),
                        logits(&resident, &p.input_ids),
                        "{name} {quant:?} {policy}"
                    );
                }
                let report = cached.experts().cache_report().unwrap();
                assert_eq!(report.budget_bytes, budget);
                assert!(report.peak_resident_bytes as u64 <= budget, "{report:?}");
                assert!(report.counts.evictions > 0, "{name}: {report:?}");
                assert!(report.counts.hit_rate() < 1.0);
                assert!(
                    report.optimal.unwrap().hits >= report.counts.hits,
                    "{report:?}"
                );
                assert!(report.read.bytes > 0);
                assert_eq!(
                    report.expert_file.is_some(),
                    mode == ExpertFileMode::On,
                    "{name} {quant:?}: {report:?}"
                );
            }
        }
    }
}

#[test]
fn budget_below_one_decode_step_states_the_minimum() {
    let dir = fixture("qwen3_moe");
    let minimum = minimum_budget(&dir, None);
    let opts = LoadOptions {
        expert_memory: Some(ExpertMemory {
            budget: ByteSize::Bytes(minimum - 1),
            policy: PolicyKind::Lru,
            prefetch: Prefetch::Off,
            miss_precision: MissPrecision::Off,
            record_routing: true,
            expert_file: ExpertFile::default(),
        }),
        ..LoadOptions::default()
    };
    let err = Model::load(&dir, &opts).unwrap_err().to_string();
    assert!(
        err.contains(&format!("minimum of {minimum} bytes")) && err.contains("top_k = 2"),
        "{err}"
    );
}

#[test]
fn a_percentage_is_of_all_routed_experts_bytes() {
    let dir = fixture("qwen3_moe");
    let resident = load(&dir, None, None);
    let total = resident
        .experts()
        .total_expert_bytes(resident.layers().len());
    let cached = load(
        &dir,
        None,
        Some(ExpertMemory {
            budget: "50%".parse().unwrap(),
            policy: PolicyKind::Lru,
            prefetch: Prefetch::Off,
            miss_precision: MissPrecision::Off,
            record_routing: true,
            expert_file: ExpertFile::default(),
        }),
    );
    let report = cached.experts().cache_report().unwrap();
    assert_eq!(report.total_expert_bytes, total);
    assert_eq!(report.budget_bytes, total / 2);
}

/// Copies a fixture to a temporary directory, loads it under the smallest
/// budget, then truncates its weights file: the next forward must fail with an
/// error naming the file and the expert, not panic.
#[test]
fn checkpoint_truncated_after_load_fails_the_run_naming_file_and_expert() {
    let src = fixture("qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let budget = minimum_budget(&src, None);
    let model = load(
        tmp.path(),
        None,
        Some(ExpertMemory {
            budget: ByteSize::Bytes(budget),
            policy: PolicyKind::Lru,
            prefetch: Prefetch::Off,
            miss_precision: MissPrecision::Off,
            record_routing: true,
            expert_file: ExpertFile::default(),
        }),
    );
    let weights = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let ids: Vec<u32> = (0..16).collect();
    let err = model.score(&ids, &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("reading expert"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

/// The `qwen3_moe` fixture copied to a directory of its own (so that its
/// files can be touched, truncated and rewritten).
fn fixture_copy() -> tempfile::TempDir {
    let src = fixture("qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    tmp
}

/// `dir`'s packed expert files, and its other entries (temporary files).
fn packed_files(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .partition(|p| p.extension().is_some_and(|x| x == "experts"))
}

/// `--quant q8_0` under the smallest budget, misses read from a packed expert
/// file in `packed`: the model, and the file it reads.
fn load_packed(model_dir: &Path, packed: &tempfile::TempDir) -> (Model, std::path::PathBuf) {
    let quant = Some(QuantKind::Q8_0);
    let memory = ExpertMemory {
        budget: ByteSize::Bytes(minimum_budget(model_dir, quant)),
        policy: PolicyKind::Lru,
        prefetch: Prefetch::Off,
        miss_precision: MissPrecision::Off,
        record_routing: true,
        expert_file: packed_in(ExpertFileMode::Auto, packed),
    };
    let model = load(model_dir, quant, Some(memory));
    let report = model.experts().cache_report().unwrap();
    let file = report.expert_file.expect("a packed expert file").path;
    (model, file)
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// The packed file is written once and reused; a checkpoint whose
/// modification time or size changed gets a new one; a damaged file (header,
/// the first expert of a layer, length) is rebuilt. Every time the logits are
/// those of the all-resident model.
#[test]
fn packed_file_is_reused_until_the_checkpoint_changes_and_rebuilt_when_damaged() {
    let model_dir = fixture_copy();
    let packed = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..16).collect();
    let expected = logits(&load(model_dir.path(), Some(QuantKind::Q8_0), None), &ids);
    let (model, file) = load_packed(model_dir.path(), &packed);
    assert_eq!(logits(&model, &ids), expected);
    assert_eq!(packed_files(packed.path()), (vec![file.clone()], vec![]));
    let first = inode(&file);
    // Unchanged checkpoint: the same file, not rewritten.
    let (model, again) = load_packed(model_dir.path(), &packed);
    assert_eq!((again.clone(), inode(&again)), (file.clone(), first));
    assert_eq!(logits(&model, &ids), expected);
    // A newer modification time: rebuilt under the same name.
    let weights = model_dir.path().join("model.safetensors");
    let later = std::fs::metadata(&weights).unwrap().modified().unwrap()
        + std::time::Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (model, rebuilt) = load_packed(model_dir.path(), &packed);
    assert_eq!(rebuilt, file);
    assert_ne!(
        inode(&rebuilt),
        first,
        "not rebuilt after the checkpoint changed"
    );
    assert_eq!(logits(&model, &ids), expected);
    // Damage: a header byte, a byte of the first expert's quants, the length.
    let len = std::fs::metadata(&file).unwrap().len();
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 3] = [
        ("header", |b| b[40] ^= 0x20),
        ("expert", |b| b[4096 + 100] ^= 0x01),
        ("length", |b| b.truncate(b.len() - 4096)),
    ];
    for (what, damage) in damages {
        let before = inode(&file);
        let mut bytes = std::fs::read(&file).unwrap();
        damage(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();
        let (model, rebuilt) = load_packed(model_dir.path(), &packed);
        assert_eq!(rebuilt, file);
        assert_ne!(inode(&rebuilt), before, "{what}: the damaged file was used");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len, "{what}");
        assert_eq!(logits(&model, &ids), expected, "{what}");
    }
    assert_eq!(packed_files(packed.path()), (vec![file], vec![]));
}

/// A packed file truncated while a model reads it fails the run with an
/// error naming the file and the expert.
#[test]
fn packed_file_truncated_after_load_fails_the_run_naming_file_and_expert() {
    let packed = tempfile::tempdir().unwrap();
    let (model, file) = load_packed(&fixture("qwen3_moe"), &packed);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let ids: Vec<u32> = (0..16).collect();
    let err = model.score(&ids, &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains(".experts"), "{err}");
    assert!(err.contains("reading expert"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

/// A conversion that fails half-way through writing the packed file (a
/// checkpoint read error) leaves neither the file nor its temporary behind;
/// `--expert-file on` where nothing can be written is an error saying so.
#[test]
fn a_failed_packed_file_write_leaves_no_file() {
    let dir = fixture("qwen3_moe");
    let cfg = load_model_config(&dir).unwrap();
    let files = SafetensorsFiles::open_dir(&dir).unwrap();
    let layout = fixture_layout(&cfg, &files);
    let probes: Vec<_> = (0..cfg.num_layers)
        .map(|l| {
            layout.layers[l].as_ref().map(|_| {
                layout
                    .load(
                        &files,
                        ExpertId {
                            layer: l as u32,
                            expert: 0,
                        },
                    )
                    .unwrap()
            })
        })
        .collect();
    let packed = tempfile::tempdir().unwrap();
    let options = packed_in(ExpertFileMode::On, &packed);
    let convert = |id: ExpertId| {
        if id.layer == 2 && id.expert == 3 {
            return Err(switchyard::Error::InvalidInput(
                "checkpoint read failed".into(),
            ));
        }
        layout.load(&files, id)
    };
    let plan = PackedPlan {
        files: files.paths(),
        layout: &layout,
        quant: None,
        probes: &probes,
        options: &options,
        stats: Default::default(),
        convert: &convert,
    };
    let err = PackedExperts::prepare(&plan).unwrap_err().to_string();
    assert!(err.contains("checkpoint read failed"), "{err}");
    assert_eq!(packed_files(packed.path()), (vec![], vec![]));
    // A directory that cannot be made (under a file).
    let blocked = packed.path().join("file");
    std::fs::write(&blocked, b"").unwrap();
    let options = ExpertFile {
        mode: ExpertFileMode::On,
        dir: Some(blocked.join("sub")),
    };
    let plan = PackedPlan {
        options: &options,
        convert: &|id| layout.load(&files, id),
        ..plan
    };
    let err = PackedExperts::prepare(&plan).unwrap_err().to_string();
    assert!(err.contains("cannot write the packed expert file"), "{err}");
    // Under auto the same falls back to checkpoint reads.
    let auto = ExpertFile {
        mode: ExpertFileMode::Auto,
        ..options.clone()
    };
    let plan = PackedPlan {
        options: &auto,
        ..plan
    };
    assert!(PackedExperts::prepare(&plan).unwrap().is_none());
}

/// An expert cache over the `qwen3_moe` fixture with room for `capacity` experts.
fn fixture_cache(capacity: usize, policy: PolicyKind) -> (ExpertCache, usize) {
    let cache = fixture_cache_with(
        ByteSize::Bytes((capacity * FIXTURE_EXPERT_BYTES + FIXTURE_EXPERT_BYTES / 2) as u64),
        policy,
        MissPrecision::Off,
        true,
    );
    assert_eq!(cache.capacity(), capacity);
    (cache, FIXTURE_EXPERT_BYTES)
}

/// The fixture's experts: gate-up and down, 64 x 32, f32.
const FIXTURE_EXPERT_BYTES: usize = 3 * 64 * 32 * 4;

fn fixture_cache_with(
    budget: ByteSize,
    policy: PolicyKind,
    miss_precision: MissPrecision,
    record_routing: bool,
) -> ExpertCache {
    let dir = fixture("qwen3_moe");
    let cfg = load_model_config(&dir).unwrap();
    let files = SafetensorsFiles::open_dir(&dir).unwrap();
    let layout = fixture_layout(&cfg, &files);
    assert_eq!(
        3 * cfg.hidden_size * cfg.moe.expert_ffn * 4,
        FIXTURE_EXPERT_BYTES
    );
    let reads = ExpertReads {
        layout,
        quant: None,
        top_k: cfg.moe.top_k,
    };
    let memory = ExpertMemory {
        budget,
        policy,
        prefetch: Prefetch::Off,
        miss_precision,
        record_routing,
        expert_file: ExpertFile::default(),
    };
    let reopened = TensorSource::reopen_for_reads(&files).unwrap().unwrap();
    ExpertCache::open(reopened, reads, memory).unwrap()
}

/// Where the fixture's experts are, in f32.
fn fixture_layout(cfg: &switchyard::config::ModelConfig, files: &SafetensorsFiles) -> ExpertLayout {
    let layers = (0..cfg.num_layers)
        .map(|l| {
            (cfg.moe.sparse_layers[l]).then(|| {
                LayerExperts::locate(&cfg.family.names, cfg.family.experts, files, l).unwrap()
            })
        })
        .collect();
    ExpertLayout {
        layers,
        dims: ExpertDims {
            hidden: cfg.hidden_size,
            ffn: cfg.moe.expert_ffn,
            num_experts: cfg.moe.num_experts,
        },
        dtype: candle_core::DType::F32,
        activation: cfg.moe.expert_activation,
    }
}

fn random_calls() -> impl proptest::strategy::Strategy<Value = Vec<LayerCall>> {
    use proptest::prelude::*;
    // The fixture's MoE layers are 0 and 2, with 8 experts each.
    prop::collection::vec(
        (
            prop::sample::select(vec![0u32, 2]),
            prop::collection::vec(0u32..8, 1..3),
        ),
        1..40,
    )
    .prop_map(|v| v.into_iter().map(|(l, e)| LayerCall::new(l, e)).collect())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Under random routing the resident bytes never pass the budget, every
    /// call is served whole, and the live cache counts exactly as the replay
    /// simulator does on the same calls.
    #[test]
    fn budget_is_never_exceeded_and_counts_match_replay(
        calls in random_calls(),
        capacity in 2usize..6,
        lfu in proptest::bool::ANY,
    ) {
        let policy = if lfu { PolicyKind::Lfu { half_life: None } } else { PolicyKind::Lru };
        let (cache, expert_bytes) = fixture_cache(capacity, policy);
        for call in &calls {
            let got = cache.experts_for_call(call.layer, &call.experts).unwrap();
            proptest::prop_assert_eq!(got.ffns.len(), call.experts.len());
            proptest::prop_assert!(cache.resident_bytes() <= cache.budget_bytes() as usize);
            proptest::prop_assert!(cache.resident_bytes() <= capacity * expert_bytes);
        }
        let report = cache.cache_report().unwrap();
        let replayed = replay(&calls, Capacity::Global(capacity), policy);
        proptest::prop_assert_eq!(report.counts, replayed);
        proptest::prop_assert!(report.optimal.unwrap().hits >= report.counts.hits);
        // One read per miss: each expert's three matrices, f32 as stored.
        proptest::prop_assert_eq!(report.read.bytes, report.counts.misses * expert_bytes as u64);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// With stand-ins on, full copies, stand-ins and reads in flight together
    /// never pass the budget, every call is served whole, the full copies
    /// count as the replay does, and every stand-in served is counted.
    #[test]
    fn stand_in_budget_is_never_exceeded_and_stand_ins_are_counted(
        calls in random_calls(),
        budget in (2 * FIXTURE_EXPERT_BYTES)..(8 * FIXTURE_EXPERT_BYTES),
    ) {
        let cache = fixture_cache_with(
            ByteSize::Bytes(budget as u64),
            PolicyKind::Lru,
            MissPrecision::Q4,
            true,
        );
        let mut stood_in = 0;
        for call in &calls {
            let got = cache.experts_for_call(call.layer, &call.experts).unwrap();
            proptest::prop_assert_eq!(got.ffns.len(), call.experts.len());
            let outcomes = got.outcomes.unwrap();
            stood_in += outcomes.iter().filter(|(_, o)| *o == CacheOutcome::StandIn).count() as u64;
            proptest::prop_assert!(cache.resident_bytes() <= budget);
            let report = cache.cache_report().unwrap();
            proptest::prop_assert!(report.peak_resident_bytes <= budget);
        }
        let report = cache.cache_report().unwrap();
        let stand_ins = report.stand_ins.unwrap();
        proptest::prop_assert_eq!(stand_ins.served, stood_in);
        proptest::prop_assert!(stand_ins.budget_bytes <= budget as u64 / 2);
        let replayed = replay(&calls, Capacity::Global(cache.capacity()), PolicyKind::Lru);
        // Misses are not compared with the replay: a stand-in miss queues its
        // full copy on the background reader, and when that copy lands (and
        // what it evicts) depends on timing, so the engine's miss count can
        // differ from a synchronous LRU replay by the copies in flight.
        proptest::prop_assert_eq!(report.counts.lookups, replayed.lookups);
    }
}

/// Budget for 2 full copies plus room for stand-ins: a miss whose stand-in
/// is resident is computed with it, no demand read is made, and the full copy
/// arrives in the background (the next call waits for it and hits).
#[test]
fn a_miss_with_a_stand_in_reads_only_in_the_background() {
    let cache = fixture_cache_with(
        ByteSize::Bytes(3 * FIXTURE_EXPERT_BYTES as u64),
        PolicyKind::Lru,
        MissPrecision::Q4,
        true,
    );
    assert_eq!(cache.capacity(), 2);
    assert!(
        cache.stand_in_capacity() >= 4,
        "{}",
        cache.stand_in_capacity()
    );
    cache.experts_for_call(0, &[1, 2]).unwrap();
    cache.experts_for_call(0, &[3, 4]).unwrap();
    let before = cache.cache_report().unwrap();
    assert_eq!(before.loads, 4);
    let got = cache.experts_for_call(0, &[1, 2]).unwrap();
    assert_eq!(
        got.outcomes.unwrap(),
        vec![(1, CacheOutcome::StandIn), (2, CacheOutcome::StandIn)]
    );
    let after = cache.cache_report().unwrap();
    assert_eq!(
        after.loads, before.loads,
        "no read made while the caller waited"
    );
    assert_eq!(after.stand_ins.unwrap().served, 2);
    assert!((after.stand_in_share().unwrap() - 2.0 / 6.0).abs() < 1e-12);
    // A stand-in is a Q4_0 copy: smaller, and close to the full expert.
    let full = fixture_cache(2, PolicyKind::Lru).0;
    let exact = full.experts_for_call(0, &[1]).unwrap().ffns.remove(0);
    assert!(got.ffns[0].weight_bytes() * 4 < exact.weight_bytes());
    let again = cache.experts_for_call(0, &[1, 2]).unwrap();
    assert_eq!(
        again.outcomes.unwrap(),
        vec![(1, CacheOutcome::Hit), (2, CacheOutcome::Hit)]
    );
    assert_eq!(
        cache
            .cache_report()
            .unwrap()
            .stand_ins
            .unwrap()
            .background_reads,
        2
    );
    let line = cache.cache_report().unwrap().summary_line(1);
    assert!(line.contains("| stand-ins 25.0 %"), "{line}");
}

/// A cache that does not record routing keeps no history and reports no
/// optimum; one that does replays it from a snapshot, a value the cache
/// goes on without.
#[test]
fn routing_history_only_when_asked_and_reports_replay_a_snapshot() {
    let budget = ByteSize::Bytes(2 * FIXTURE_EXPERT_BYTES as u64);
    let server = fixture_cache_with(budget, PolicyKind::Lru, MissPrecision::Off, false);
    server.experts_for_call(0, &[1, 2]).unwrap();
    let snap = server.snapshot();
    assert_eq!(snap.recorded_calls(), 0);
    let report = snap.into_report();
    assert_eq!(report.optimal, None);
    assert!(report.summary_line(1).contains("optimal not recorded"));
    let run = fixture_cache_with(budget, PolicyKind::Lru, MissPrecision::Off, true);
    run.experts_for_call(0, &[1, 2]).unwrap();
    let snap = run.snapshot();
    // The cache serves on while the snapshot is held; the snapshot keeps its moment.
    run.experts_for_call(0, &[1, 2]).unwrap();
    run.experts_for_call(2, &[3]).unwrap();
    assert_eq!(snap.recorded_calls(), 1);
    let then = snap.into_report();
    assert_eq!(then.counts.lookups, 2);
    assert_eq!(then.optimal.unwrap().lookups, 2);
    let now = run.cache_report().unwrap();
    assert_eq!(now.optimal.unwrap().lookups, 5);
    assert_eq!(now.optimal.unwrap().hits, now.counts.hits);
}

#[test]
fn reset_empties_the_cache_and_its_counters() {
    let (cache, _) = fixture_cache(2, PolicyKind::Lru);
    cache.experts_for_call(0, &[1, 2]).unwrap();
    cache.experts_for_call(0, &[1, 2]).unwrap();
    assert_eq!(cache.cache_report().unwrap().counts.hits, 2);
    cache.reset_cache();
    assert_eq!(cache.resident_bytes(), 0);
    cache.experts_for_call(0, &[1, 2]).unwrap();
    let report = cache.cache_report().unwrap();
    assert_eq!((report.counts.hits, report.counts.misses), (0, 2));
}

fn switchyard(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `run --json` under a budget: the same tokens as all-resident, the summary
/// line on stderr and its fields in the JSON.
#[test]
fn run_under_a_budget_generates_the_same_tokens_and_reports_the_cache() {
    let dir = fixture("qwen3_moe");
    let dir = dir.to_str().unwrap();
    let base = [
        "run",
        "--model",
        dir,
        "--prompt-ids",
        "1,2,3,4",
        "--max-tokens",
        "6",
        "--json",
    ];
    let (ok, resident, _) = switchyard(&base);
    assert!(ok);
    let resident: serde_json::Value = serde_json::from_str(&resident).unwrap();
    assert!(resident["expert_cache"].is_null());
    let mut args = base.to_vec();
    args.extend(["--expert-memory", "25%", "--expert-cache", "lfu"]);
    let (ok, cached, stderr) = switchyard(&args);
    assert!(ok, "{stderr}");
    let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
    assert_eq!(cached["token_ids"], resident["token_ids"]);
    let cache = &cached["expert_cache"];
    assert_eq!(cache["policy"], "lfu");
    let (hit, optimal) = (
        cache["hit_rate"].as_f64().unwrap(),
        cache["optimal_hit_rate"].as_f64().unwrap(),
    );
    assert!(hit <= optimal && optimal < 1.0, "{cache}");
    assert!(cache["read_bytes"].as_u64().unwrap() > 0);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("expert cache: hit "))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    assert!(
        line.contains("% (optimal ") && line.contains("MiB/token"),
        "{line}"
    );
}

#[test]
fn bad_budget_strings_list_the_accepted_forms() {
    let dir = fixture("qwen3_moe");
    for bad in ["4 apples", "0%", "-1GiB"] {
        let flag = format!("--expert-memory={bad}");
        let (ok, _, stderr) = switchyard(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "1",
            &flag,
        ]);
        assert!(!ok);
        assert!(
            stderr.contains("accepted forms") && stderr.contains("25%"),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (ok, _, stderr) = switchyard(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--out",
        "/dev/null",
        "--expert-memory",
        "1KiB",
    ]);
    assert!(!ok);
    assert!(stderr.contains("below the minimum"), "{stderr}");
    let (ok, _, stderr) = switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--expert-memory",
        "50%",
        "--expert-cache",
        "fifo",
    ]);
    assert!(!ok);
    assert!(stderr.contains("lru, lfu"), "{stderr}");
}

/// The demo model (trained, so its routing is predictable) at a quarter of its
/// experts' bytes: next-layer prefetch keeps the logits' bits, predicts most of
/// the next layer's experts, and serves more lookups from memory than demand
/// reads alone.
#[test]
fn next_layer_prefetch_keeps_logits_and_raises_the_hit_rate() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let text = std::fs::read_to_string(dir.join("heldout.txt")).unwrap();
    let tokenizer = switchyard::generate::TextTokenizer::from_dir(&dir).unwrap();
    let ids: Vec<u32> = tokenizer.encode(&text[..2000], true).unwrap()[..96].to_vec();
    // Token by token, as decode runs: one layer call per token and layer.
    let decode = |model: &Model| {
        let mut cache = model.new_cache(ids.len());
        ids.iter()
            .map(|&id| {
                model
                    .forward_last(&[id], &mut cache, &mut NoObserver)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let expected = decode(&load(&dir, None, None));
    let mut hit_rates = Vec::new();
    for prefetch in [Prefetch::Off, Prefetch::NextLayer] {
        let memory = ExpertMemory {
            budget: "25%".parse().unwrap(),
            policy: PolicyKind::Lru,
            prefetch,
            miss_precision: MissPrecision::Off,
            record_routing: true,
            expert_file: ExpertFile::default(),
        };
        let cached = load(&dir, None, Some(memory));
        assert!(decode(&cached) == expected, "{prefetch}: logits differ");
        let report = cached.experts().cache_report().unwrap();
        assert!(report.peak_resident_bytes as u64 <= report.budget_bytes);
        match (prefetch, report.prefetch) {
            (Prefetch::Off, None) => {}
            (Prefetch::NextLayer, Some(p)) => {
                assert!(p.reads > 0 && p.hits > 0, "{p:?}");
                assert!(p.precision() > 0.5 && p.recall() > 0.5, "{p:?}");
            }
            other => panic!("{other:?}"),
        }
        hit_rates.push(report.counts.hit_rate());
    }
    assert!(hit_rates[1] > hit_rates[0] + 0.05, "{hit_rates:?}");
}

/// A one-repeat `bench` of a fixture (8 prompt tokens, 4 generated) with half
/// its expert bytes and next-layer prefetch; `weights` picks dtype or quant.
fn short_bench_under_half_budget(name: &str, weights: &[&str]) -> (bool, String, String) {
    let dir = fixture(name);
    let packed_dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--expert-dir",
        packed_dir.path().to_str().unwrap(),
    ];
    args.extend_from_slice(weights);
    args.extend_from_slice(&[
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--repeat",
        "1",
        "--expert-memory",
        "50%",
        "--prefetch",
        "next-layer",
    ]);
    switchyard(&args)
}

/// `bench` under a budget reports the cache, the engine's bytes beside the
/// process's `read_bytes`, and peak RSS against its bound.
#[test]
fn bench_under_a_budget_checks_peak_rss_against_its_bound() {
    let (ok, _, stderr) = short_bench_under_half_budget("qwen3_moe", &["--dtype", "f32"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("expert cache: hit "), "{stderr}");
    assert!(stderr.contains("prefetch precision"), "{stderr}");
    assert!(stderr.contains("process read_bytes"), "{stderr}");
    let memory = stderr
        .lines()
        .find(|l| l.starts_with("memory: peak RSS"))
        .unwrap_or_else(|| panic!("no memory line in {stderr}"));
    assert!(memory.contains(" within bound "), "{memory}");
}

/// DeepSeek-V3 (selection bias, group limits, latent attention) decoded token by
/// token under a budget with next-layer prefetch: the same bits as resident, the
/// predictor (which routes with the next layer's selection bias) prefetching.
#[test]
fn deepseek_v3_under_a_budget_with_prefetch_keeps_the_logits() {
    let dir = fixture("deepseek_v3");
    // A prompt and its continuation (the fixture's context is 64 positions).
    let ids: Vec<u32> = common::texts("deepseek_v3").swap_remove(1);
    let decode = |model: &Model| {
        let mut cache = model.new_cache(4);
        ids.iter()
            .map(|&id| {
                model
                    .forward_last(&[id], &mut cache, &mut NoObserver)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let packed_dir = tempfile::tempdir().unwrap();
    for quant in [None, Some(QuantKind::Q8_0)] {
        let expected = decode(&load(&dir, quant, None));
        let memory = ExpertMemory {
            budget: "50%".parse().unwrap(),
            policy: PolicyKind::Lru,
            prefetch: Prefetch::NextLayer,
            miss_precision: MissPrecision::Off,
            record_routing: true,
            expert_file: packed_in(ExpertFileMode::Auto, &packed_dir),
        };
        let cached = load(&dir, quant, Some(memory));
        assert!(decode(&cached) == expected, "{quant:?}: logits differ");
        let report = cached.experts().cache_report().unwrap();
        assert!(report.peak_resident_bytes as u64 <= report.budget_bytes);
        let p = report.prefetch.expect("prefetch report");
        assert!(p.reads > 0, "{p:?}");
    }
}

/// `bench` runs the MLA families, gpt-oss (MXFP4 experts reading Q8
/// activations), FlexOlmo's post-norms and ERNIE's interleaved layers
/// quantized under a budget.
#[test]
fn bench_runs_the_newer_families_quantized_under_a_budget() {
    for name in [
        "deepseek_v2_lite",
        "deepseek_v3",
        "gpt_oss",
        "flex_olmo",
        "ernie4_5_moe",
    ] {
        let (ok, stdout, stderr) = short_bench_under_half_budget(name, &["--quant", "q8_0"]);
        assert!(ok, "{name}: {stderr}");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("| switchyard | q8_0 |")),
            "{name}: {stdout}"
        );
        assert!(stderr.contains("expert cache: hit "), "{name}: {stderr}");
    }
}
