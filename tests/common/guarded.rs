//! A CPU backend in a GPU's role that keeps the books a GPU would: which routed experts are
//! admitted into its slots. It runs every op on an inner `CpuBackend`, and
//! - fails `admit_expert` for the experts a test names, after admitting part of one (a copy
//!   that fails midway, as a device's can);
//! - records a violation whenever a routed expert's matrix is used without being admitted
//!   (on a GPU: an implicit upload outside the budget), or more experts are admitted than the
//!   tier has slots.

use edgemoe::backend::cpu::ops::RopeTable;
use edgemoe::backend::cpu::{CpuBackend, Rows};
use edgemoe::backend::{AttentionShape, Backend, Pick, Segment, Tasks};
use edgemoe::kv::{EvictionConfig, LayerCache, SlotStats};
use edgemoe::model::config::Activation;
use edgemoe::model::weights::{Ffn, GatedMlp, Linear, Norm};
use edgemoe::{Error, Model, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

pub type Key = (usize, usize);

pub struct Guarded {
    inner: CpuBackend,
    /// Every routed expert's matrix names, to its (layer, expert).
    routed: HashMap<String, Key>,
    /// Matrix names admitted now.
    admitted: Mutex<HashSet<String>>,
    /// Experts whose admission fails.
    pub faults: Mutex<HashSet<Key>>,
    pub violations: Mutex<Vec<String>>,
    slots: Mutex<usize>,
}

fn mlp_names(mlp: &GatedMlp) -> [&str; 3] {
    [&mlp.gate.name, &mlp.up.name, &mlp.down.name]
}

impl Guarded {
    pub fn new(model: &Model, slots: usize) -> Guarded {
        let mut routed = HashMap::new();
        for (l, layer) in model.weights.layers.iter().enumerate() {
            if let Ffn::Moe(b) = &layer.ffn {
                for (e, mlp) in b.experts.iter().enumerate() {
                    for n in mlp_names(mlp) {
                        routed.insert(n.to_string(), (l, e));
                    }
                }
            }
        }
        Guarded {
            inner: CpuBackend::new(1).unwrap(),
            routed,
            admitted: Mutex::new(HashSet::new()),
            faults: Mutex::new(HashSet::new()),
            violations: Mutex::new(Vec::new()),
            slots: Mutex::new(slots),
        }
    }

    pub fn set_slots(&self, slots: usize) {
        *self.slots.lock().unwrap() = slots;
    }

    /// The experts whose three matrices are all admitted.
    pub fn resident(&self) -> HashSet<Key> {
        let admitted = self.admitted.lock().unwrap();
        let mut count: HashMap<Key, usize> = HashMap::new();
        for n in admitted.iter() {
            *count.entry(self.routed[n]).or_default() += 1;
        }
        count
            .into_iter()
            .filter(|&(_, c)| c == 3)
            .map(|(k, _)| k)
            .collect()
    }

    /// Matrices admitted without the rest of their expert (a failed admission not undone).
    pub fn partial(&self) -> usize {
        let full = self.resident();
        let admitted = self.admitted.lock().unwrap();
        admitted
            .iter()
            .filter(|n| !full.contains(&self.routed[*n]))
            .count()
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    fn check(&self, lin: &Linear) {
        if let Some(key) = self.routed.get(&lin.name) {
            if !self.admitted.lock().unwrap().contains(&lin.name) {
                self.violations.lock().unwrap().push(format!(
                    "expert {key:?} ran without admission ({})",
                    lin.name
                ));
            }
        }
    }
}

impl Backend for Guarded {
    type Act = Rows;
    type Rope = RopeTable;

    fn name(&self) -> &'static str {
        "guarded"
    }
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        self.inner.run(step)
    }
    fn upload_rows(&self, data: Vec<f32>, cols: usize) -> Rows {
        self.inner.upload_rows(data, cols)
    }
    fn admit_expert(&self, mlp: &GatedMlp) -> Result<usize> {
        let key = self.routed[&mlp.gate.name];
        let names = mlp_names(mlp);
        let failing = self.faults.lock().unwrap().contains(&key);
        let mut admitted = self.admitted.lock().unwrap();
        // A failing copy gets two of the three matrices in before it fails.
        let take = if failing { 2 } else { 3 };
        for n in &names[..take] {
            admitted.insert(n.to_string());
        }
        if failing {
            return Err(Error::OutOfMemory(format!(
                "the test device refused expert {key:?}"
            )));
        }
        drop(admitted);
        let (held, slots) = (self.resident().len(), *self.slots.lock().unwrap());
        if held > slots {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{held} experts admitted into {slots} slots"));
        }
        Ok(mlp.weight_bytes())
    }
    fn release_expert(&self, mlp: &GatedMlp) {
        let mut admitted = self.admitted.lock().unwrap();
        for n in mlp_names(mlp) {
            admitted.remove(n);
        }
    }
    fn rows(&self, x: &Rows) -> usize {
        self.inner.rows(x)
    }
    fn to_host<'a>(&self, x: &'a Rows) -> Cow<'a, [f32]> {
        self.inner.to_host(x)
    }
    fn select_rows(&self, x: &Rows, rows: &[usize]) -> Rows {
        self.inner.select_rows(x, rows)
    }
    fn concat_rows(&self, parts: Vec<Rows>) -> Rows {
        self.inner.concat_rows(parts)
    }
    fn embed(&self, table: &Linear, tokens: &[u32]) -> Rows {
        self.inner.embed(table, tokens)
    }
    fn add_table_rows(&self, x: &mut Rows, table: &[f32], index: &[usize]) {
        self.inner.add_table_rows(x, table, index)
    }
    fn norm(&self, norm: &Norm, x: &Rows) -> Rows {
        self.inner.norm(norm, x)
    }
    fn norm_runs(&self, norm: &Norm, x: &Rows, dim: usize) -> Rows {
        self.inner.norm_runs(norm, x, dim)
    }
    fn clamp(&self, x: &mut Rows, limit: f32) {
        self.inner.clamp(x, limit)
    }
    fn apply_rope_partial(
        &self,
        x: &mut Rows,
        rope: &RopeTable,
        first_row: usize,
        dims: (usize, usize),
    ) {
        self.inner.apply_rope_partial(x, rope, first_row, dims)
    }
    fn scale(&self, x: &mut Rows, factor: f32) {
        self.inner.scale(x, factor)
    }
    fn linear(&self, lin: &Linear, x: &Rows) -> Rows {
        self.check(lin);
        self.inner.linear(lin, x)
    }
    fn linears<const N: usize>(&self, lins: [&Linear; N], x: &Rows) -> [Rows; N] {
        lins.iter().for_each(|l| self.check(l));
        self.inner.linears(lins, x)
    }
    fn rope_table(&self, head_dim: usize, theta: f32, positions: &[usize]) -> RopeTable {
        self.inner.rope_table(head_dim, theta, positions)
    }
    fn rope_table_freqs(&self, inv_freq: &[f32], scale: f32, positions: &[usize]) -> RopeTable {
        self.inner.rope_table_freqs(inv_freq, scale, positions)
    }
    fn apply_rope(&self, x: &mut Rows, rope: &RopeTable, first_row: usize) {
        self.inner.apply_rope(x, rope, first_row)
    }
    fn append_kv(
        &self,
        cache: &mut LayerCache,
        k: &Rows,
        v: &Rows,
        rows: std::ops::Range<usize>,
        positions: &[usize],
    ) {
        self.inner.append_kv(cache, k, v, rows, positions)
    }
    fn attention(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize) {
        self.inner.attention(shape, q, positions, segments)
    }
    fn attention_with_mass(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize, Vec<f32>) {
        self.inner
            .attention_with_mass(shape, q, positions, segments)
    }
    fn attention_with_head_mass(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize, Vec<f32>) {
        self.inner
            .attention_with_head_mass(shape, q, positions, segments)
    }
    fn evicts_per_head(&self) -> bool {
        self.inner.evicts_per_head()
    }
    fn evict_heads(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut [SlotStats],
        now: usize,
    ) -> edgemoe::Result<()> {
        self.inner.evict_heads(config, cache, stats, now)
    }
    fn evict(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut SlotStats,
        now: usize,
    ) -> edgemoe::Result<()> {
        self.inner.evict(config, cache, stats, now)
    }
    fn new_kv(&self, layout: edgemoe::kv::KvLayout) -> Box<dyn edgemoe::kv::KvStorage> {
        self.inner.new_kv(layout)
    }
    fn activate(&self, act: Activation, x: &mut Rows) {
        self.inner.activate(act, x)
    }
    fn gated_activation(&self, act: Activation, gate: &mut Rows, up: &Rows) {
        self.inner.gated_activation(act, gate, up)
    }
    fn clamped_swiglu(&self, gate: &mut Rows, up: &Rows, s: edgemoe::model::config::ClampedSwiglu) {
        self.inner.clamped_swiglu(gate, up, s)
    }
    fn add(&self, x: &mut Rows, y: &Rows) {
        self.inner.add(x, y)
    }
    fn rotate_rows(&self, x: &mut Rows, block: usize) {
        self.inner.rotate_rows(x, block)
    }
    fn route(&self, logits: &Rows, top_k: usize, renormalize: bool, first_row: usize) -> Vec<Pick> {
        self.inner.route(logits, top_k, renormalize, first_row)
    }
    fn mix_rows(&self, out: &mut Rows, y: &Rows, picks: &[Pick]) {
        self.inner.mix_rows(out, y, picks)
    }
    fn add_gated(&self, out: &mut Rows, y: &Rows, gate: &Rows) {
        self.inner.add_gated(out, y, gate)
    }
    fn zeros(&self, rows: usize, cols: usize) -> Rows {
        self.inner.zeros(rows, cols)
    }
    fn run_tasks<T: Send, R: Send>(
        &self,
        kind: Tasks,
        tasks: Vec<T>,
        cost: impl Fn(&T) -> usize,
        task: impl Fn(T) -> R + Sync,
    ) -> Vec<R> {
        self.inner.run_tasks(kind, tasks, cost, task)
    }
    fn sequence_groups(
        &self,
        sequences: usize,
        decoding: bool,
        layer_weight_bytes: usize,
    ) -> usize {
        self.inner
            .sequence_groups(sequences, decoding, layer_weight_bytes)
    }
}
