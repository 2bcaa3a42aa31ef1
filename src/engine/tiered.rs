//! A sparse block's experts across the device tier and the host CPU. The tier
//! ([`ExpertTier`]) says per routed expert: resident on the device, fetch it into a slot now, or
//! run it on the host. Device experts run on the engine's backend; host experts run on a CPU
//! backend on another thread at the same time; their outputs come back to the device and are
//! mixed in expert order, so the result is the same wherever each expert ran. Written against
//! the [`Backend`] trait only: CI runs it with a CPU backend in the device's role.

use super::{gated_mlp_on, Engine};
use crate::backend::{Backend, HostBackend, Pick, Tasks};
use crate::error::{Error, Result};
use crate::experts::tier::{ExpertKey, ExpertTier, Site};
use crate::model::weights::{Ffn, GatedMlp, MoeBlock};
use std::time::Instant;

/// The device tier and the host backend for the experts it does not hold.
pub struct Tiered {
    pub tier: ExpertTier,
    pub host: HostBackend,
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

/// Copies `mlp` into the device slot the tier gave it, after releasing `evict`'s.
fn fetch<B: Backend>(
    engine: &Engine<B>,
    tier: &ExpertTier,
    mlp: &GatedMlp,
    evict: Option<ExpertKey>,
) -> Result<()> {
    if let Some(v) = evict {
        release(engine, v);
    }
    mlp.ensure_verified()?;
    let started = Instant::now();
    let bytes = engine.backend().admit_expert(mlp)?;
    if bytes > 0 {
        tier.record_copy(bytes, started.elapsed());
    }
    Ok(())
}

/// One output per group (`(expert, its picks)`, in expert order) of layer `layer`'s block on
/// rows `x`. `next` is the RAM tier's prefetch request, which also names the experts the device
/// tier copies in ahead of need.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    tiered: &Tiered,
    layer: usize,
    block: &MoeBlock,
    x: &B::Act,
    groups: &[(usize, &[Pick])],
    next: Option<(usize, Vec<usize>)>,
) -> Result<Vec<B::Act>> {
    let cfg = &engine.model().config;
    let be = engine.backend();
    let tier = &tiered.tier;
    let bytes = block.experts.first().map_or(0, GatedMlp::weight_bytes);
    let macs = 3 * cfg.hidden_size * cfg.expert_ffn;
    let counts: Vec<(usize, usize)> = groups.iter().map(|&(e, t)| (e, t.len())).collect();
    let sites = tier.place(layer, &counts, bytes, macs);
    let rows_of = |picks: &[Pick]| picks.iter().map(|p| p.row).collect::<Vec<usize>>();
    let mut outputs: Vec<Option<B::Act>> = (0..groups.len()).map(|_| None).collect();

    // Resident experts: their weights are on the device, so the RAM tier is not asked.
    let resident: Vec<usize> = (0..groups.len())
        .filter(|&i| sites[i] == Site::Resident)
        .collect();
    let weights = cfg.hidden_size * cfg.expert_ffn;
    let ys = be.run_tasks(
        Tasks::Matrices { weights },
        resident.clone(),
        |&i| groups[i].1.len(),
        |i| {
            let mlp = &block.experts[groups[i].0];
            gated_mlp_on(be, cfg, mlp, &be.select_rows(x, &rows_of(groups[i].1)))
        },
    );
    for (i, y) in resident.into_iter().zip(ys) {
        outputs[i] = Some(y);
    }

    // The rest come through the RAM tier: fetched ones run on the device, host ones on the
    // CPU on another thread meanwhile.
    let others: Vec<usize> = (0..groups.len())
        .filter(|&i| sites[i] != Site::Resident)
        .collect();
    let ids: Vec<usize> = others.iter().map(|&i| groups[i].0).collect();
    let prefetch = next.clone();
    let chunks = engine
        .experts
        .run(layer, block, &ids, next, |start, mlps| {
            let chunk = &others[start..start + mlps.len()];
            let (host_jobs, device_jobs): (Vec<_>, Vec<_>) = chunk
                .iter()
                .zip(mlps)
                .map(|(&i, &mlp)| (i, mlp))
                .partition(|&(i, _)| sites[i] == Site::Host);
            std::thread::scope(|s| {
                let host = s.spawn(|| run_on_host(engine, tiered, x, groups, &host_jobs));
                let mut done: Vec<(usize, Result<B::Act>)> = Vec::new();
                for (i, mlp) in device_jobs {
                    let Site::Fetch { evict } = sites[i] else {
                        continue;
                    };
                    let y = fetch(engine, tier, mlp, evict).map(|()| {
                        let started = Instant::now();
                        let y =
                            gated_mlp_on(be, cfg, mlp, &be.select_rows(x, &rows_of(groups[i].1)));
                        tier.record_run(false, bytes, macs, groups[i].1.len(), started.elapsed());
                        y
                    });
                    done.push((i, y));
                }
                let host = host.join().unwrap_or_else(|_| {
                    vec![(
                        usize::MAX,
                        Err(Error::invalid("a host expert task panicked")),
                    )]
                });
                done.extend(host);
                done
            })
        })?;
    for (i, y) in chunks {
        let slot = outputs
            .get_mut(i)
            .ok_or_else(|| Error::invalid("a host expert task failed"))?;
        *slot = Some(y?);
    }
    if let Some((next_layer, predicted)) = prefetch {
        prefetch_next(engine, tier, next_layer, &predicted)?;
    }
    outputs
        .into_iter()
        .map(|y| y.ok_or_else(|| Error::invalid("an expert of the step produced no output")))
        .collect()
}

/// The host's experts: rows copied to the host, run on the CPU backend, copied back.
fn run_on_host<B: Backend>(
    engine: &Engine<B>,
    tiered: &Tiered,
    x: &B::Act,
    groups: &[(usize, &[Pick])],
    jobs: &[(usize, &GatedMlp)],
) -> Vec<(usize, Result<B::Act>)> {
    let (be, host) = (engine.backend(), &tiered.host);
    let cfg = &engine.model().config;
    let (cols, hidden) = (be.to_host(x).len() / be.rows(x).max(1), cfg.hidden_size);
    let macs = 3 * cfg.hidden_size * cfg.expert_ffn;
    jobs.iter()
        .map(|&(i, mlp)| {
            let y = mlp.ensure_verified().map(|()| {
                let rows: Vec<usize> = groups[i].1.iter().map(|p| p.row).collect();
                let xs = be.to_host(&be.select_rows(x, &rows)).into_owned();
                let started = Instant::now();
                let y = gated_mlp_on(host, cfg, mlp, &host.upload_rows(xs, cols));
                let took = started.elapsed();
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
    let admitted = tier.prefetch(layer, predicted);
    if admitted.is_empty() {
        return Ok(());
    }
    let Some(Ffn::Moe(block)) = engine.model().weights.layers.get(layer).map(|l| &l.ffn) else {
        return Ok(());
    };
    let ids: Vec<usize> = admitted.iter().map(|&(e, _)| e).collect();
    let results = engine
        .experts
        .run(layer, block, &ids, None, |start, mlps| {
            mlps.iter()
                .zip(&admitted[start..])
                .map(|(mlp, &(_, evict))| fetch(engine, tier, mlp, evict))
                .collect::<Vec<_>>()
        })?;
    results.into_iter().collect()
}
