//! The device expert tier changes where experts run, never what is computed. The engine runs on a
//! CPU backend in the device's role and a second CPU backend runs the host's experts, so CI
//! drives the very code a GPU runs (slot pool, placement, the cost model's decisions, fetches,
//! prefetch, running host experts beside the device and merging their outputs): at every slot
//! count × placement × prefetch on/off, in prefill and decode, batched, and with the tier resized
//! between steps, the logits must equal the single-backend run's exactly.

use edgemoe::backend::Backend;
use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::experts::budget::MemBudget;
use edgemoe::experts::tier::{ExpertTier, Placement, TierStats};
use edgemoe::experts::{ExpertService, PagingOptions};
use edgemoe::Model;
use std::collections::HashSet;
use std::sync::Arc;

#[path = "common/trained.rs"]
mod trained;
use trained::{fixture, quantized};
#[path = "common/guarded.rs"]
mod guarded;
use guarded::Guarded;

fn tokens(model: &Model, at: usize, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let all = model.tokenizer.encode(&text, false).unwrap();
    all[at..at + n].to_vec()
}

/// The two sequences' steps: both prompts prefilled together (every row), then one token
/// each per step, with `between(step)` called before every decode step.
fn steps(
    engine: &Engine<impl Backend>,
    prompts: [&[u32]; 2],
    decode: &[u32],
    mut between: impl FnMut(usize),
) -> edgemoe::Result<Vec<Vec<f32>>> {
    let (mut a, mut b) = (engine.new_cache(), engine.new_cache());
    let mut out = engine.forward(&mut [
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
    ])?;
    for (step, t) in decode.iter().enumerate() {
        between(step);
        let other = decode[decode.len() - 1 - step];
        out.extend(engine.forward(&mut [
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
        ])?);
    }
    Ok(out)
}

/// Logits of [`steps`], which must succeed.
fn run(
    engine: &Engine<impl Backend>,
    prompts: [&[u32]; 2],
    decode: &[u32],
    between: impl FnMut(usize),
) -> Vec<Vec<f32>> {
    steps(engine, prompts, decode, between).unwrap()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|f| f.to_bits()).collect())
        .collect()
}

/// The RAM tier under the device tier.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ram {
    /// Experts used in place: no RAM-tier prediction, so the device tier predicts for itself.
    InPlace,
    /// Paged, with or without the RAM tier's prediction and prefetch (which the device tier's
    /// prefetch then follows).
    Paged { prefetch: bool },
}

fn service(model: &Arc<Model>, ram: Ram) -> ExpertService {
    let Ram::Paged { prefetch } = ram else {
        return ExpertService::in_place(model);
    };
    let opts = |mem| PagingOptions {
        io_threads: 1,
        prefetch,
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

/// Every miss was fetched, run on the host, or (after a failed copy) neither.
fn assert_books_balance(s: &TierStats) {
    assert_eq!(
        s.misses,
        s.fetched + s.host_runs + s.fetch_failures,
        "{s:?}"
    );
}

/// A tiered engine on a [`Guarded`] device of `slots` slots over the RAM tier `ram`.
fn tiered(
    model: &Arc<Model>,
    slots: usize,
    placement: Placement,
    prefetch: bool,
    ram: Ram,
) -> Engine<Guarded> {
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let tier = ExpertTier::new(slots, layers, experts, placement, prefetch);
    Engine::with_backend(model.clone(), Guarded::new(model, slots))
        .with_experts(service(model, ram))
        .unwrap()
        .with_tier(tier, 1)
        .unwrap()
}

/// The device holds exactly what the tier counts resident, whole, and never ran an expert it
/// did not hold.
fn assert_device_agrees(engine: &Engine<Guarded>, what: &str) {
    let device = engine.backend();
    let tier = engine.tier().unwrap();
    assert_eq!(device.violations(), Vec::<String>::new(), "{what}");
    let counted: HashSet<(usize, usize)> = tier.resident().into_iter().collect();
    assert_eq!(
        device.resident(),
        counted,
        "{what}: device and tier disagree"
    );
    assert_eq!(
        device.partial(),
        0,
        "{what}: part of an expert left on the device"
    );
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
                for ram in [Ram::InPlace, Ram::Paged { prefetch: true }] {
                    let what =
                        format!("slots {slots}, {placement:?}, prefetch {prefetch}, {ram:?}");
                    let engine = tiered(&model, slots, placement, prefetch, ram);
                    let got = run(&engine, [&p1, &p2], &decode, |_| {});
                    assert!(bits(&got) == want, "{what}: logits differ");
                    assert_device_agrees(&engine, &what);
                    let s = engine.tier().unwrap().stats();
                    assert!(s.resident <= slots, "{what}: {s:?}");
                    assert_books_balance(&s);
                    assert_eq!(s.fetch_failures, 0, "{what}: {s:?}");
                    if placement == Placement::Cpu {
                        assert_eq!(s.fetched, 0, "{what}: {s:?}");
                    }
                    if slots == 0 {
                        assert_eq!((s.fetched, s.prefetched, s.hits), (0, 0, 0), "{s:?}");
                    }
                    if !prefetch {
                        assert_eq!(s.prefetched, 0, "{what}: {s:?}");
                    }
                    if placement == Placement::Gpu && slots == layers * experts {
                        assert_eq!(s.host_runs, 0, "{what}: {s:?}");
                    }
                    host_runs += s.host_runs;
                    fetched += s.fetched;
                }
            }
        }
    }
    // Both paths really ran.
    assert!(
        host_runs > 0 && fetched > 0,
        "{host_runs} host runs, {fetched} fetched"
    );
}

/// Prefetch copies the next layer's predicted experts in ahead of need — by the RAM tier's
/// prediction when it pages with prefetch, by the device tier's own otherwise — and routed
/// experts are then found resident because of it. With `cpu` placement a miss is never
/// fetched, so every expert in a slot got there by prefetch.
#[test]
fn prefetch_copies_experts_ahead_of_need_with_and_without_paging() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let (p1, p2, decode) = (
        tokens(&model, 100, 13),
        tokens(&model, 600, 11),
        tokens(&model, 1100, 10),
    );
    let want = bits(&run(
        &Engine::new(model.clone(), 2).unwrap(),
        [&p1, &p2],
        &decode,
        |_| {},
    ));
    for ram in [
        Ram::InPlace,
        Ram::Paged { prefetch: false },
        Ram::Paged { prefetch: true },
    ] {
        for slots in [experts, layers * experts] {
            let what = format!("{ram:?}, {slots} slots");
            let engine = tiered(&model, slots, Placement::Cpu, true, ram);
            let got = run(&engine, [&p1, &p2], &decode, |_| {});
            assert!(bits(&got) == want, "{what}: logits differ");
            assert_device_agrees(&engine, &what);
            let s = engine.tier().unwrap().stats();
            assert_books_balance(&s);
            assert_eq!(s.fetched, 0, "{what}: {s:?}");
            assert!(s.prefetched > 0, "{what}: nothing prefetched: {s:?}");
            assert!(s.prefetch_hits > 0, "{what}: no prefetch was used: {s:?}");
            assert!(
                s.prefetch_hits <= s.prefetched && s.prefetch_hits <= s.hits,
                "{s:?}"
            );
            assert!(s.hits > 0, "{what}: {s:?}");
        }
        // The same engine without prefetch never fills a slot.
        let engine = tiered(&model, layers * experts, Placement::Cpu, false, ram);
        assert!(bits(&run(&engine, [&p1, &p2], &decode, |_| {})) == want);
        let s = engine.tier().unwrap().stats();
        assert_eq!(
            (s.prefetched, s.hits, s.resident),
            (0, 0, 0),
            "{ram:?}: {s:?}"
        );
    }
}

/// A copy that fails (here: a device that refuses chosen experts after taking part of one) ends
/// the step with an error naming the op, the expert and its size; the expert is not taken for
/// resident afterwards, nothing of it stays on the device, and once the faults stop the same
/// engine computes exactly what the single-backend run does.
#[test]
fn a_failed_fetch_fails_the_step_and_leaves_the_tier_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&quantized(tmp.path())).unwrap());
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let (p1, p2, decode) = (
        tokens(&model, 200, 15),
        tokens(&model, 800, 12),
        tokens(&model, 1300, 6),
    );
    let want = bits(&run(
        &Engine::new(model.clone(), 2).unwrap(),
        [&p1, &p2],
        &decode,
        |_| {},
    ));
    let faulty: Vec<(usize, usize)> = (0..experts).map(|e| (layers - 1, e)).collect();
    for (prefetch, ram) in [
        (false, Ram::InPlace),
        (true, Ram::InPlace),
        (true, Ram::Paged { prefetch: true }),
    ] {
        for slots in [5, layers * experts] {
            let what = format!("prefetch {prefetch}, {ram:?}, {slots} slots");
            let engine = tiered(&model, slots, Placement::Gpu, prefetch, ram);
            // A short clean step first, so a small tier is full and the failing fetch evicts,
            // while a large one still misses most experts.
            run(&engine, [&p1[..2], &p2[..2]], &[], |_| {});
            let before: HashSet<(usize, usize)> =
                engine.tier().unwrap().resident().into_iter().collect();
            *engine.backend().faults.lock().unwrap() = faulty.iter().copied().collect();
            let err = steps(&engine, [&p2, &p1], &decode, |_| {})
                .expect_err("a step whose fetch fails must fail")
                .to_string();
            assert!(
                err.contains("admit_expert")
                    && err.contains(&format!("of layer {}", layers - 1))
                    && err.contains(" bytes)")
                    && err.contains("the test device refused"),
                "{what}: {err}"
            );
            assert_device_agrees(&engine, &what);
            let s = engine.tier().unwrap().stats();
            assert!(s.fetch_failures > 0, "{what}: {s:?}");
            assert!(s.resident <= slots, "{what}: {s:?}");
            // A refused expert is resident only if it already was before the faults.
            for key in &faulty {
                let tier = engine.tier().unwrap();
                assert!(
                    !tier.is_resident(*key) || before.contains(key),
                    "{what}: {key:?}"
                );
                assert!(!tier.is_reserved(*key), "{what}: {key:?}");
            }
            if !prefetch {
                assert_books_balance(&s);
            }
            // Faults off: fresh sequences on the same engine compute exactly the reference,
            // fetching the experts that failed before.
            engine.backend().faults.lock().unwrap().clear();
            let fetched = s.fetched;
            let got = run(&engine, [&p1, &p2], &decode, |_| {});
            assert!(
                bits(&got) == want,
                "{what}: logits differ after a failed fetch"
            );
            assert_device_agrees(&engine, &what);
            let after = engine.tier().unwrap().stats();
            assert!(
                after.fetched + after.prefetched > fetched,
                "{what}: {after:?}"
            );
            assert_eq!(after.fetch_failures, s.fetch_failures, "{what}: {after:?}");
        }
    }
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
        for ram in [Ram::InPlace, Ram::Paged { prefetch: true }] {
            let engine = tiered(&model, layers * experts, placement, true, ram);
            let sizes = [3, 0, 1, 7, 2, layers * experts, 4, 1];
            let got = run(&engine, [&p1, &p2], &decode, |step| {
                let size = sizes[step % sizes.len()];
                engine.set_tier_slots(size).unwrap();
                engine.backend().set_slots(size);
                let s = engine.tier().unwrap().stats();
                assert!(s.resident <= size, "{s:?}");
                assert_device_agrees(&engine, "after resizing");
            });
            assert!(
                bits(&got) == want,
                "{placement:?}, {ram:?}: logits differ after resizing"
            );
            assert_device_agrees(&engine, "resized");
            assert!(engine.tier().unwrap().stats().evicted > 0);
        }
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
