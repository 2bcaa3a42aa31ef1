//! The device expert tier changes where experts run, never what is computed. The engine runs on a
//! CPU backend in the device's role and a second CPU backend runs the host's experts, so CI
//! drives the very code a GPU runs (slot pool, placement, the cost model's decisions, fetches,
//! prefetch, running host experts beside the device and merging their outputs): at every slot
//! count × placement × prefetch on/off, in prefill and decode, batched, and with the tier resized
//! between steps, the logits must equal the single-backend run's exactly.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::experts::budget::MemBudget;
use edgemoe::experts::tier::{ExpertTier, Placement};
use edgemoe::experts::{ExpertService, PagingOptions};
use edgemoe::Model;
use std::sync::Arc;

#[path = "common/trained.rs"]
mod trained;
use trained::{fixture, quantized};

fn tokens(model: &Model, at: usize, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let all = model.tokenizer.encode(&text, false).unwrap();
    all[at..at + n].to_vec()
}

/// Logits of two sequences prefilled together (every row), then decoded together one token
/// each per step, with `between(step)` called before every decode step.
fn run(
    engine: &Engine,
    prompts: [&[u32]; 2],
    decode: &[u32],
    mut between: impl FnMut(usize),
) -> Vec<Vec<f32>> {
    let (mut a, mut b) = (engine.new_cache(), engine.new_cache());
    let mut out = engine
        .forward(&mut [
            BatchItem {
                tokens: prompts[0],
                cache: &mut a,
                logits: Logits::All,
            },
            BatchItem {
                tokens: prompts[1],
                cache: &mut b,
                logits: Logits::All,
            },
        ])
        .unwrap();
    for (step, t) in decode.iter().enumerate() {
        between(step);
        let other = decode[decode.len() - 1 - step];
        out.extend(
            engine
                .forward(&mut [
                    BatchItem {
                        tokens: &[*t],
                        cache: &mut a,
                        logits: Logits::Last,
                    },
                    BatchItem {
                        tokens: &[other],
                        cache: &mut b,
                        logits: Logits::Last,
                    },
                ])
                .unwrap(),
        );
    }
    out
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|f| f.to_bits()).collect())
        .collect()
}

/// The RAM tier under the device tier: in place, or paged with prediction (what the device
/// tier's prefetch follows).
fn service(model: &Arc<Model>, paged: bool) -> ExpertService {
    if !paged {
        return ExpertService::in_place(model);
    }
    let opts = |mem| PagingOptions {
        io_threads: 1,
        ..PagingOptions::with_budget(MemBudget::Bytes(mem))
    };
    // Six RAM slots: fewer than the experts a step routes to, so the RAM tier pages too.
    let probe = ExpertService::paged(model.clone(), &opts(1 << 40)).unwrap();
    let plan = *probe.plan().unwrap();
    drop(probe);
    ExpertService::paged(
        model.clone(),
        &opts(plan.fixed.total() + 6 * plan.slot_bytes),
    )
    .unwrap()
}

#[test]
fn tiered_logits_equal_the_single_backend_run_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let (p1, p2, decode) = (
        tokens(&model, 0, 29),
        tokens(&model, 400, 17),
        tokens(&model, 900, 6),
    );
    let reference = run(
        &Engine::new(model.clone(), 2).unwrap(),
        [&p1, &p2],
        &decode,
        |_| {},
    );
    let want = bits(&reference);
    let mut host_runs = 0;
    let mut fetched = 0;
    for slots in [0, 1, 2, 5, layers * experts] {
        for placement in [Placement::Auto, Placement::Gpu, Placement::Cpu] {
            for prefetch in [false, true] {
                let tier = ExpertTier::new(slots, layers, experts, placement, prefetch);
                let engine = Engine::new(model.clone(), 1)
                    .unwrap()
                    .with_experts(service(&model, prefetch))
                    .unwrap()
                    .with_tier(tier, 1)
                    .unwrap();
                let got = run(&engine, [&p1, &p2], &decode, |_| {});
                assert!(
                    bits(&got) == want,
                    "slots {slots}, {placement:?}, prefetch {prefetch}: logits differ"
                );
                let s = engine.tier().unwrap().stats();
                assert!(s.resident <= slots, "{s:?}");
                assert_eq!(s.hits + s.misses, s.hits + s.fetched + s.host_runs, "{s:?}");
                if placement == Placement::Cpu {
                    assert_eq!(s.fetched, 0, "{s:?}");
                }
                if slots == 0 {
                    assert_eq!((s.fetched, s.prefetched, s.hits), (0, 0, 0), "{s:?}");
                }
                if placement == Placement::Gpu && slots == layers * experts {
                    assert_eq!(s.host_runs, 0, "{s:?}");
                }
                host_runs += s.host_runs;
                fetched += s.fetched;
            }
        }
    }
    // Both paths really ran.
    assert!(
        host_runs > 0 && fetched > 0,
        "{host_runs} host runs, {fetched} fetched"
    );
}

#[test]
fn resizing_the_tier_between_steps_changes_nothing_computed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let (p1, p2, decode) = (
        tokens(&model, 50, 21),
        tokens(&model, 700, 9),
        tokens(&model, 1200, 8),
    );
    let want = bits(&run(
        &Engine::new(model.clone(), 2).unwrap(),
        [&p1, &p2],
        &decode,
        |_| {},
    ));
    for placement in [Placement::Auto, Placement::Gpu] {
        let tier = ExpertTier::new(layers * experts, layers, experts, placement, true);
        let engine = Engine::new(model.clone(), 1)
            .unwrap()
            .with_experts(service(&model, true))
            .unwrap()
            .with_tier(tier, 1)
            .unwrap();
        let sizes = [3, 0, 1, 7, 2, layers * experts, 4, 1];
        let got = run(&engine, [&p1, &p2], &decode, |step| {
            engine.set_tier_slots(sizes[step % sizes.len()]).unwrap();
            let s = engine.tier().unwrap().stats();
            assert!(s.resident <= sizes[step % sizes.len()], "{s:?}");
        });
        assert!(
            bits(&got) == want,
            "{placement:?}: logits differ after resizing"
        );
        assert!(engine.tier().unwrap().stats().evicted > 0);
    }
}

#[test]
fn set_gpu_mem_resizes_the_tier_by_bytes() {
    use edgemoe::experts::tier::DeviceBudget;
    let model = Arc::new(Model::builtin_default());
    let cfg = &model.config;
    let tier = ExpertTier::new(8, cfg.num_layers, cfg.num_experts, Placement::Gpu, false);
    let plain = Engine::new(model.clone(), 1).unwrap();
    assert!(
        plain.set_gpu_mem(1 << 30).is_err(),
        "an engine without a tier"
    );
    let engine = Engine::new(model.clone(), 1)
        .unwrap()
        .with_tier(tier, 1)
        .unwrap();
    // Sized by slots: there is no budget to plan bytes against.
    assert!(engine.set_gpu_mem(1 << 30).is_err());
    engine.tier().unwrap().set_budget(DeviceBudget {
        fixed: 1000,
        slot_bytes: 100,
        top_k: 2,
    });
    assert_eq!(engine.set_gpu_mem(1550).unwrap(), 5);
    assert_eq!(engine.tier().unwrap().stats().slots, 5);
    let err = engine.set_gpu_mem(1150).unwrap_err().to_string();
    assert!(err.contains("smallest workable budget is"), "{err}");
    assert_eq!(
        engine.tier().unwrap().stats().slots,
        5,
        "a refused budget changes nothing"
    );
}

/// Without the `cuda` feature there is no GPU tier: `--gpu-mem` is refused with the reason (not
/// silently ignored), by generate and by bench's sweep; `--placement` alone is refused too.
#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_mem_without_a_cuda_build_is_refused() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for args in [
        &["generate", "--prompt", "And", "-n", "2", "--gpu-mem", "50%"][..],
        &["bench", "--gpu-mem", "50%", "-p", "4", "-n", "4", "-r", "1"][..],
    ] {
        let (ok, err) = run(args);
        assert!(!ok && err.contains("`cuda` feature"), "{args:?}: {err}");
    }
    let (ok, err) = run(&[
        "generate",
        "--prompt",
        "And",
        "-n",
        "2",
        "--placement",
        "cpu",
    ]);
    assert!(!ok && err.contains("--gpu-mem"), "{err}");
}
