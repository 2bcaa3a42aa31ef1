//! A sparse block's experts across the device tier and the host CPU. The tier
//! ([`ExpertTier`]) says per routed expert: resident on the device, fetch it into a slot now, or
//! run it on the host. Device experts run on the engine's backend; host experts run on a CPU
//! backend on another thread at the same time; their outputs come back to the device and are
//! mixed in expert order, so the result is the same wherever each expert ran. Written against
//! the [`Backend`] trait only: CI runs it with a CPU backend in the device's role.
//!
//! A fetch is a transaction: the tier reserves the slot, the backend admits the expert, and the
//! reservation is committed, or on failure dropped (with whatever part of the expert reached
//! the device given back), so no expert is ever taken for resident that is not.

use super::{gated_mlp_on, Engine};
use crate::backend::{Backend, ExpertWork, HostBackend, Pick, Tasks};
use crate::error::{Error, Result};
use crate::experts::predict::{PredictSource, Predictor};
use crate::experts::tier::{ExpertKey, ExpertTier, Measured, Site};
use crate::model::weights::{Ffn, GatedMlp, MoeBlock};
use std::time::{Duration, Instant};

/// The device tier and the host backend for the experts it does not hold.
pub struct Tiered {
    pub tier: ExpertTier,
    pub host: HostBackend,
    /// Predicts the next layer's experts for the tier's prefetch when the RAM tier makes no
    /// prediction (experts in place, or paged without prefetch).
    predictor: Predictor,
}

impl Tiered {
    /// `tier` with `host` for the experts it does not hold, on a model routing `top_k`
    /// experts per token.
    pub fn new(tier: ExpertTier, host: HostBackend, top_k: usize) -> Tiered {
        Tiered {
            tier,
            host,
            predictor: Predictor::new(PredictSource::Both, top_k, 0),
        }
    }
}

/// Expert `e` of layer `layer`, if that layer is sparse.
fn expert<B: Backend>(engine: &Engine<B>, (layer, e): ExpertKey) -> Option<&GatedMlp> {
    match &engine.model().weights.layers.get(layer)?.ffn {
        Ffn::Moe(b) => b.experts.get(e),
        _ => None,
    }
}

/// Gives back the device slot of expert `key` (it left the tier).
pub fn release<B: Backend>(engine: &Engine<B>, key: ExpertKey) {
    if let Some(mlp) = expert(engine, key) {
        engine.backend().release_expert(mlp);
    }
}

/// `e` with what failed prefixed, keeping its kind (a device error stays one).
fn failed_fetch(what: String, e: Error) -> Error {
    match e {
        Error::Cuda(m) => Error::Cuda(format!("{what}: {m}")),
        Error::OutOfMemory(m) => Error::OutOfMemory(format!("{what}: {m}")),
        Error::InvalidInput(m) => Error::InvalidInput(format!("{what}: {m}")),
        other => Error::invalid(format!("{what}: {other}")),
    }
}

/// Copies expert `key` (`mlp`) into the slot the tier reserved for it, after giving back
/// `evict`'s, and settles the reservation: committed when the backend admitted the expert;
/// else dropped, with whatever part of it reached the device given back, and an error naming
/// the op, the expert and its size. Returns the wall time the caller spent in it.
fn fetch<B: Backend>(
    engine: &Engine<B>,
    tier: &ExpertTier,
    key: ExpertKey,
    mlp: &GatedMlp,
    evict: Option<ExpertKey>,
) -> Result<Duration> {
    let be = engine.backend();
    if let Some(v) = evict {
        release(engine, v);
    }
    let started = Instant::now();
    let admitted = mlp.ensure_verified().and_then(|()| {
        let (bytes, timing) = be.timed(ExpertWork::Copy, || be.admit_expert(mlp));
        bytes.map(|b| (b, timing))
    });
    let took = started.elapsed();
    match admitted {
        Ok((bytes, timing)) => {
            tier.commit(key);
            if bytes > 0 {
                tier.record_copy(bytes, Measured::from(took, timing));
            }
            Ok(took)
        }
        Err(e) => {
            be.release_expert(mlp);
            tier.abort(key);
            let what = format!(
                "admit_expert: copying expert {} of layer {} ({} bytes) into a slot of the {} backend",
                key.1,
                key.0,
                mlp.weight_bytes(),
                be.name()
            );
            Err(failed_fetch(what, e))
        }
    }
}

/// Drops the reservations of `fetches` (expert, the tenant it evicts) that no fetch settled
/// (the RAM tier failed before handing the expert over), giving back the evicted tenants'
/// device slots, which no fetch released.
fn settle<B: Backend>(
    engine: &Engine<B>,
    tier: &ExpertTier,
    fetches: &[(ExpertKey, Option<ExpertKey>)],
) {
    for &(key, evict) in fetches {
        if tier.is_reserved(key) {
            if let Some(v) = evict {
                release(engine, v);
            }
            tier.abort(key);
        }
    }
}

/// `mlp` on rows `rows` of `x` on the device backend, timed for the cost model.
fn run_on_device<B: Backend>(
    engine: &Engine<B>,
    tier: &ExpertTier,
    mlp: &GatedMlp,
    x: &B::Act,
    rows: &[usize],
) -> B::Act {
    let (be, cfg) = (engine.backend(), &engine.model().config);
    let xs = be.select_rows(x, rows);
    let started = Instant::now();
    let (y, timing) = be.timed(ExpertWork::Run, || gated_mlp_on(be, cfg, mlp, &xs));
    let macs = 3 * cfg.hidden_size * cfg.expert_ffn;
    let took = Measured::from(started.elapsed(), timing);
    tier.record_run(false, mlp.weight_bytes(), macs, rows.len(), took);
    y
}

fn rows_of(picks: &[Pick]) -> Vec<usize> {
    picks.iter().map(|p| p.row).collect()
}

/// The device tier's own guess of layer `layer + 1`'s experts (for its prefetch) from the
/// rows' choices at `layer` and their pre-gating probabilities for `layer + 1`; `None` when the
/// tier does not prefetch or the next layer is not sparse.
pub fn predict_next<B: Backend>(
    engine: &Engine<B>,
    tiered: &Tiered,
    layer: usize,
    rows: &[Vec<usize>],
    pregate_probs: Option<&[f32]>,
) -> Option<(usize, Vec<usize>)> {
    let next = engine.model().weights.layers.get(layer + 1)?;
    if !tiered.tier.prefetches() || !matches!(next.ffn, Ffn::Moe(_)) {
        return None;
    }
    Some(crate::experts::prefetch_request(
        &engine.experts.paths,
        &tiered.predictor,
        layer,
        layer + 1,
        rows,
        pregate_probs,
    ))
}

/// One output per group (`(expert, its picks)`, in expert order) of layer `layer`'s block on
/// rows `x`. `next` is the RAM tier's prefetch request; `device_next` names the experts the
/// device tier copies in ahead of need (the same request, or the tier's own prediction).
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    engine: &Engine<B>,
    tiered: &Tiered,
    layer: usize,
    block: &MoeBlock,
    x: &B::Act,
    groups: &[(usize, &[Pick])],
    next: Option<(usize, Vec<usize>)>,
    device_next: Option<(usize, Vec<usize>)>,
) -> Result<Vec<B::Act>> {
    let cfg = &engine.model().config;
    let be = engine.backend();
    let tier = &tiered.tier;
    let first_sparse = engine
        .model()
        .weights
        .layers
        .iter()
        .position(|l| matches!(l.ffn, Ffn::Moe(_)));
    if first_sparse == Some(layer) {
        tier.record_tokens(be.rows(x));
    }
    let bytes = block.experts.first().map_or(0, GatedMlp::weight_bytes);
    let macs = 3 * cfg.hidden_size * cfg.expert_ffn;
    let counts: Vec<(usize, usize)> = groups.iter().map(|&(e, t)| (e, t.len())).collect();
    let sites = tier.place(layer, &counts, bytes, macs);
    let fetches: Vec<(ExpertKey, Option<ExpertKey>)> = groups
        .iter()
        .zip(&sites)
        .filter_map(|(&(e, _), site)| match site {
            Site::Fetch { evict } => Some(((layer, e), *evict)),
            _ => None,
        })
        .collect();
    let mut outputs: Vec<Option<B::Act>> = (0..groups.len()).map(|_| None).collect();
    // The host's experts read their rows from a host copy taken before any device work of this
    // layer is queued, so on a GPU they need not wait for it.
    let host_x = sites.contains(&Site::Host).then(|| {
        let values = be.to_host(x).into_owned();
        let cols = values.len() / be.rows(x).max(1);
        (values, cols)
    });

    // Resident experts: their weights are on the device, so the RAM tier is not asked. They
    // run on the first chunk the RAM tier hands over, beside that chunk's host experts.
    let mut resident: Option<Vec<usize>> = Some(
        (0..groups.len())
            .filter(|&i| sites[i] == Site::Resident)
            .collect(),
    );
    let weights = cfg.hidden_size * cfg.expert_ffn;
    let run_resident = |resident: Vec<usize>| -> Vec<(usize, Result<B::Act>)> {
        let ys = be.run_tasks(
            Tasks::Matrices { weights },
            resident.clone(),
            |&i| groups[i].1.len(),
            |i| {
                let mlp = &block.experts[groups[i].0];
                run_on_device(engine, tier, mlp, x, &rows_of(groups[i].1))
            },
        );
        resident.into_iter().zip(ys.into_iter().map(Ok)).collect()
    };

    // The rest come through the RAM tier: fetched ones run on the device, host ones on the
    // CPU on another thread meanwhile.
    let others: Vec<usize> = (0..groups.len())
        .filter(|&i| sites[i] != Site::Resident)
        .collect();
    let ids: Vec<usize> = others.iter().map(|&i| groups[i].0).collect();
    let chunks = engine.experts.run(layer, block, &ids, next, |start, mlps| {
        let chunk = &others[start..start + mlps.len()];
        let (host_jobs, device_jobs): (Vec<_>, Vec<_>) = chunk
            .iter()
            .zip(mlps)
            .map(|(&i, &mlp)| (i, mlp))
            .partition(|&(i, _)| sites[i] == Site::Host);
        std::thread::scope(|s| {
            let host = (!host_jobs.is_empty()).then(|| {
                s.spawn(|| match &host_x {
                    Some((xs, cols)) => run_on_host(engine, tiered, xs, *cols, groups, &host_jobs),
                    None => Vec::new(),
                })
            });
            let mut done = resident.take().map(&run_resident).unwrap_or_default();
            let mut stalled = Duration::ZERO;
            for (i, mlp) in device_jobs {
                let Site::Fetch { evict } = sites[i] else {
                    continue;
                };
                let key = (layer, groups[i].0);
                let y = fetch(engine, tier, key, mlp, evict).map(|took| {
                    stalled += took;
                    run_on_device(engine, tier, mlp, x, &rows_of(groups[i].1))
                });
                done.push((i, y));
            }
            let waiting = Instant::now();
            let host = host.map_or_else(Vec::new, |h| {
                h.join().unwrap_or_else(|_| {
                    vec![(
                        usize::MAX,
                        Err(Error::invalid("a host expert task panicked")),
                    )]
                })
            });
            tier.record_stall(stalled + waiting.elapsed());
            done.extend(host);
            done
        })
    });
    // Whatever the RAM tier did, no reservation outlives the step.
    settle(engine, tier, &fetches);
    let mut chunks = chunks?;
    if let Some(resident) = resident.take() {
        // The RAM tier had nothing to hand over.
        chunks.extend(run_resident(resident));
    }
    for (i, y) in chunks {
        let slot = outputs
            .get_mut(i)
            .ok_or_else(|| Error::invalid("a host expert task failed"))?;
        *slot = Some(y?);
    }
    if let Some((next_layer, predicted)) = device_next {
        prefetch_next(engine, tier, next_layer, &predicted)?;
    }
    outputs
        .into_iter()
        .map(|y| y.ok_or_else(|| Error::invalid("an expert of the step produced no output")))
        .collect()
}

/// The host's experts on their rows of `x` (a host copy, `cols` values a row), run on the CPU
/// backend, their outputs copied to the device backend.
fn run_on_host<B: Backend>(
    engine: &Engine<B>,
    tiered: &Tiered,
    x: &[f32],
    cols: usize,
    groups: &[(usize, &[Pick])],
    jobs: &[(usize, &GatedMlp)],
) -> Vec<(usize, Result<B::Act>)> {
    let (be, host) = (engine.backend(), &tiered.host);
    let cfg = &engine.model().config;
    let hidden = cfg.hidden_size;
    let macs = 3 * cfg.hidden_size * cfg.expert_ffn;
    jobs.iter()
        .map(|&(i, mlp)| {
            let y = mlp.ensure_verified().map(|()| {
                let rows = rows_of(groups[i].1);
                let xs: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| &x[r * cols..(r + 1) * cols])
                    .copied()
                    .collect();
                let started = Instant::now();
                let y = gated_mlp_on(host, cfg, mlp, &host.upload_rows(xs, cols));
                let took = Measured::Took(started.elapsed());
                tiered
                    .tier
                    .record_run(true, mlp.weight_bytes(), macs, rows.len(), took);
                be.upload_rows(host.to_host(&y).into_owned(), hidden)
            });
            (i, y)
        })
        .collect()
}

/// Copies the tier's pick of layer `layer`'s predicted experts into device slots ahead of need
/// (through the RAM tier, which reads them if it must).
fn prefetch_next<B: Backend>(
    engine: &Engine<B>,
    tier: &ExpertTier,
    layer: usize,
    predicted: &[usize],
) -> Result<()> {
    let Some(Ffn::Moe(block)) = engine.model().weights.layers.get(layer).map(|l| &l.ffn) else {
        return Ok(());
    };
    let admitted = tier.prefetch(layer, predicted);
    if admitted.is_empty() {
        return Ok(());
    }
    let ids: Vec<usize> = admitted.iter().map(|&(e, _)| e).collect();
    let results = engine.experts.run(layer, block, &ids, None, |start, mlps| {
        mlps.iter()
            .zip(&admitted[start..])
            .map(|(mlp, &(e, evict))| fetch(engine, tier, (layer, e), mlp, evict))
            .collect::<Vec<_>>()
    });
    let fetches: Vec<(ExpertKey, Option<ExpertKey>)> =
        admitted.iter().map(|&(e, v)| ((layer, e), v)).collect();
    settle(engine, tier, &fetches);
    results?.into_iter().try_for_each(|r| r.map(|_| ()))
}
