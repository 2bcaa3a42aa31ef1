//! A device op that fails inside a step (`backend::health::fail_step`, what the CUDA backend
//! does on a failed launch, copy or allocation) ends that step with its error: no panic reaches
//! the caller, the caches are back where they stood, and the next step computes exactly what
//! an engine that never failed computes. The failure is injected from a linear-layer observer,
//! which runs inside the step on the backend's worker threads like a device op.

use edgemoe::backend::health::fail_step;
use edgemoe::engine::{BatchItem, LinearObserver, Logits};
use edgemoe::model::weights::Linear;
use edgemoe::{Engine, Error, Model};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Fails the first linear of layer 1 while armed (layer 0 has appended its keys by then).
struct FailingOp {
    armed: AtomicBool,
}

impl LinearObserver for FailingOp {
    fn observe(&self, linear: &Linear, _x: &[f32], rows: usize) {
        if self.armed.load(Ordering::SeqCst) && linear.name.contains("layers.1.") {
            fail_step(Error::invalid(format!(
                "test op {} on {rows} rows failed",
                linear.name
            )));
        }
    }
}

fn step(
    engine: &Engine,
    cache: &mut edgemoe::kv::KvCache,
    tokens: &[u32],
) -> edgemoe::Result<Vec<f32>> {
    let mut batch = [BatchItem {
        tokens,
        cache,
        logits: Logits::Last,
    }];
    Ok(engine.forward(&mut batch)?.remove(0))
}

#[test]
fn a_failed_device_op_ends_the_step_with_its_error_and_loses_nothing() {
    let model = Arc::new(Model::builtin_default());
    let prompt: Vec<u32> = (1..40).collect();
    let next = [7u32, 8, 9];

    let reference = Engine::new(model.clone(), 2).unwrap();
    let mut ref_cache = reference.new_cache();
    step(&reference, &mut ref_cache, &prompt).unwrap();
    let want = step(&reference, &mut ref_cache, &next).unwrap();

    let observer = Arc::new(FailingOp {
        armed: AtomicBool::new(false),
    });
    let engine = Engine::new(model, 2)
        .unwrap()
        .with_observer(observer.clone());
    let mut cache = engine.new_cache();
    step(&engine, &mut cache, &prompt).unwrap();
    let held = cache.len_tokens();

    observer.armed.store(true, Ordering::SeqCst);
    let err = step(&engine, &mut cache, &next).expect_err("the op failed");
    assert!(
        err.to_string().contains("test op ") && err.to_string().contains("3 rows"),
        "the error names the op and its size: {err}"
    );
    assert_eq!(
        cache.len_tokens(),
        held,
        "the failed step's rows were taken back"
    );
    assert_eq!(cache.next_position(), prompt.len());

    observer.armed.store(false, Ordering::SeqCst);
    let got = step(&engine, &mut cache, &next).unwrap();
    assert_eq!(got, want, "the retried step equals a run that never failed");
}
