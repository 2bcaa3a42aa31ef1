//! The device KV storage against the CPU's: the same appends (a prefill, then single tokens),
//! attention with per-slot mass, an h2o eviction, growth and shrinking, and adopting a host
//! cache must leave the same slots, positions and rows (copies are exact), and attend within
//! 1e-4.

use super::common::{device, Rng};
use edgemoe::backend::cpu::{CpuBackend, HostKv};
use edgemoe::backend::cuda::kv::DeviceKv;
use edgemoe::backend::{AttentionShape, Backend, Segment};
use edgemoe::kv::{Budget, KvOptions, LayerCache, Policy, SlotStats};

const SHAPE: AttentionShape<'static> = AttentionShape {
    num_heads: 6,
    num_kv_heads: 2,
    head_dim: 32,
    value_dim: 32,
    sliding_window: None,
    sink_logits: None,
};
const KV_DIM: usize = 64;

fn rows_of(cache: &LayerCache) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let rows = cache
        .storage()
        .expect("storage")
        .to_host()
        .expect("read back");
    (
        rows.keys.into_owned(),
        rows.values.into_owned(),
        cache.positions().to_vec(),
    )
}

/// Appends `n` random tokens at `first..` to both caches (one call each).
fn append_both<G: Backend>(
    gpu: &G,
    cpu: &CpuBackend,
    caches: (&mut LayerCache, &mut LayerCache),
    rng: &mut Rng,
    first: usize,
    n: usize,
) {
    let (k, v) = (rng.f32s(n * KV_DIM, 1.0), rng.f32s(n * KV_DIM, 1.0));
    let positions: Vec<usize> = (first..first + n).collect();
    let (gk, gv) = (
        gpu.upload_rows(k.clone(), KV_DIM),
        gpu.upload_rows(v.clone(), KV_DIM),
    );
    gpu.append_kv(caches.0, &gk, &gv, 0..n, &positions);
    let (ck, cv) = (cpu.upload_rows(k, KV_DIM), cpu.upload_rows(v, KV_DIM));
    cpu.append_kv(caches.1, &ck, &cv, 0..n, &positions);
}

#[test]
fn device_kv_storage_matches_the_cpu() {
    let Some(gpu) = device("kv") else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let mut rng = Rng(17);
    let mut g = LayerCache::default();
    let mut c = LayerCache::default();
    append_both(gpu, &cpu, (&mut g, &mut c), &mut rng, 0, 40);
    for p in 40..100 {
        append_both(gpu, &cpu, (&mut g, &mut c), &mut rng, p, 1);
    }
    assert!(g.storage_as::<DeviceKv>().is_some() && c.storage_as::<HostKv>().is_some());
    assert_eq!(rows_of(&g), rows_of(&c), "appends");

    // Two query rows attend with their mass.
    let positions = [98usize, 99];
    let q = rng.f32s(2 * 6 * 32, 1.0);
    let (go, gn, gm) = gpu.attention_with_mass(
        &SHAPE,
        &gpu.upload_rows(q.clone(), 6 * 32),
        &positions,
        &[Segment {
            rows: 0..2,
            cache: &g,
        }],
    );
    let (co, cn, cm) = cpu.attention_with_mass(
        &SHAPE,
        &cpu.upload_rows(q, 6 * 32),
        &positions,
        &[Segment {
            rows: 0..2,
            cache: &c,
        }],
    );
    assert_eq!((gn, gm.len()), (cn, cm.len()));
    let go = gpu.to_host(&go).into_owned();
    for (a, b) in go.iter().zip(&co.data).chain(gm.iter().zip(&cm)) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }

    // An h2o eviction down to 48 slots keeps the same slots and rows on both.
    let config = KvOptions {
        policy: Policy::H2o,
        budget: Some(Budget::Tokens(64)),
        window: 16,
        sinks: 4,
        ..KvOptions::default()
    }
    .resolve(100)
    .unwrap()
    .unwrap();
    let mut stats = SlotStats::default();
    stats.sync(c.positions());
    for (s, m) in stats.mass.iter_mut().enumerate() {
        *m = ((s * 7919) % 13) as f32;
    }
    let capacity = g.storage().unwrap().capacity_slots();
    gpu.evict(&config, &mut g, &mut stats.clone(), 100).unwrap();
    cpu.evict(&config, &mut c, &mut stats, 100).unwrap();
    assert_eq!(g.len(), 48);
    assert_eq!(rows_of(&g), rows_of(&c), "eviction");
    assert_eq!(g.storage().unwrap().capacity_slots(), capacity);
    append_both(gpu, &cpu, (&mut g, &mut c), &mut rng, 100, 3);
    assert_eq!(rows_of(&g), rows_of(&c), "appends after an eviction");

    // Growth by exact reservation, and shrinking to what is held.
    let mut storage = gpu.new_kv(edgemoe::kv::KvLayout::separate(KV_DIM));
    storage.reserve_exact(10);
    assert_eq!(storage.capacity_slots(), 10);
    storage.shrink_to(0);
    assert_eq!(storage.capacity_slots(), 0);

    // A host cache adopted by the device's first append: the same slots, then the new one.
    let (keys, values, positions) = rows_of(&c);
    let mut from_host =
        LayerCache::with_storage(positions, Box::new(HostKv::from_rows(KV_DIM, keys, values)))
            .unwrap();
    append_both(gpu, &cpu, (&mut from_host, &mut c), &mut rng, 103, 1);
    assert!(from_host.storage_as::<DeviceKv>().is_some());
    assert_eq!(rows_of(&from_host), rows_of(&c), "adopted");
}

/// Latent rows (multi-head latent attention's layout: one KV head whose value is the first
/// `value_dim` floats of the key row): the device holds the keys alone, attends with the keys
/// as values and narrows each head's output to `value_dim`, as the CPU does, within 1e-4;
/// an eviction keeps the same rows.
#[test]
fn latent_rows_match_the_cpu() {
    use edgemoe::kv::KvLayout;
    let Some(gpu) = device("kv latent rows") else {
        return;
    };
    let cpu = CpuBackend::new(1).unwrap();
    let mut rng = Rng(23);
    let (key_dim, value_dim, heads) = (48, 32, 4);
    let layout = KvLayout::key_prefix(key_dim, value_dim);
    let shape = AttentionShape {
        num_heads: heads,
        num_kv_heads: 1,
        head_dim: key_dim,
        value_dim,
        sliding_window: None,
        sink_logits: None,
    };
    let mut g = LayerCache::with_storage(Vec::new(), gpu.new_kv(layout)).unwrap();
    let mut c = LayerCache::with_storage(Vec::new(), cpu.new_kv(layout)).unwrap();
    for (first, n) in [(0, 30), (30, 1), (31, 1)] {
        let k = rng.f32s(n * key_dim, 1.0);
        let positions: Vec<usize> = (first..first + n).collect();
        let gk = gpu.upload_rows(k.clone(), key_dim);
        gpu.append_kv(&mut g, &gk, &gk, 0..n, &positions);
        let ck = cpu.upload_rows(k, key_dim);
        cpu.append_kv(&mut c, &ck, &ck, 0..n, &positions);
    }
    assert_eq!(g.storage().unwrap().layout(), layout);
    assert_eq!(g.storage().unwrap().bytes(), 32 * key_dim * 4, "keys alone");
    assert_eq!(rows_of(&g), rows_of(&c), "appends");
    let q = rng.f32s(heads * key_dim, 1.0);
    let seg = |cache| [Segment { rows: 0..1, cache }];
    let (go, gn, gm) = gpu.attention_with_mass(
        &shape,
        &gpu.upload_rows(q.clone(), heads * key_dim),
        &[31],
        &seg(&g),
    );
    let (co, cn, cm) = cpu.attention_with_mass(
        &shape,
        &cpu.upload_rows(q, heads * key_dim),
        &[31],
        &seg(&c),
    );
    let go = gpu.to_host(&go).into_owned();
    assert_eq!((gn, go.len(), gm.len()), (cn, co.data.len(), cm.len()));
    assert_eq!(go.len(), heads * value_dim);
    for (a, b) in go.iter().zip(&co.data).chain(gm.iter().zip(&cm)) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let config = KvOptions {
        policy: Policy::Window,
        budget: Some(Budget::Tokens(24)),
        window: 4,
        sinks: 2,
        ..KvOptions::default()
    }
    .resolve(32)
    .unwrap()
    .unwrap();
    let mut stats = SlotStats::default();
    gpu.evict(&config, &mut g, &mut stats.clone(), 32).unwrap();
    cpu.evict(&config, &mut c, &mut stats, 32).unwrap();
    assert_eq!(rows_of(&g), rows_of(&c), "eviction");
}
