//! The expert cache: a fixed set of slots sized from the memory budget, filled from the .emoe
//! file by reads that bypass the page cache (see `blockio`), on demand by the forward pass or
//! ahead of it by I/O threads (prefetch). Eviction follows the chosen policy. Each block's
//! checksum and int8 values are verified the first time it is read; later reads trust them.

use super::blockio::{BlockReader, ReadMode, DIRECT_ALIGN};
use super::counters::{CacheStats, Counters};
use super::paths::PathStats;
use super::slots::{new_slot, rebase, refill, BlockSpan};
use crate::error::{Error, Result};
use crate::model::buf::SharedMap;
use crate::model::weights::{Ffn, GatedMlp};
use crate::model::Model;
use memmap2::Mmap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// Which resident expert gives way when a slot is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Least frequently chosen (online counts), then least recently used.
    Lfu,
    /// Keeps a resident set (most expected hits per byte) and the predicted next experts;
    /// among the rest, least frequently chosen.
    Stats,
}

struct BlockInfo {
    layer: usize,
    expert: usize,
    span: BlockSpan,
    crc32c: u32,
}

struct Slot {
    /// The block it holds (or is being filled with).
    key: Option<usize>,
    /// `None` while a read fills it.
    mem: Option<SharedMap>,
    loading: bool,
    /// Filled by a prefetch and not used since.
    prefetched: bool,
    last_use: u64,
}

struct State {
    /// `None`: a slot given back after the budget shrank (indices stay stable for readers).
    slots: Vec<Option<Slot>>,
    /// Per block, the slot that holds it.
    at: Vec<Option<usize>>,
    tick: u64,
    target_slots: usize,
    /// Per block: in the `stats` policy's resident set.
    resident: Vec<bool>,
    /// Per block: predicted for the next layer.
    predicted: Vec<bool>,
}

struct Inner {
    model: Arc<Model>,
    path: PathBuf,
    file_map: SharedMap,
    blocks: Vec<Option<BlockInfo>>,
    experts: usize,
    top_k: usize,
    reader: BlockReader,
    state: Mutex<State>,
    changed: Condvar,
    verdicts: Vec<OnceLock<std::result::Result<(), String>>>,
    counters: Counters,
    /// Per block: times it was read from the file (the dashboard's per-expert reads).
    block_reads: Vec<AtomicU64>,
    slot_bytes: usize,
    policy: Policy,
    paths: Arc<PathStats>,
}

/// A block read into its slot: everything a job carries.
struct Job {
    slot: usize,
    block: usize,
    mem: Mmap,
}

pub struct Pager {
    inner: Arc<Inner>,
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// One MoE layer at a time: a layer's chunk may need every slot.
    serial: Mutex<()>,
}

/// More prefetch threads than this only queue on the same disk.
pub const MAX_IO_THREADS: usize = 256;

pub struct PagerOptions {
    pub policy: Policy,
    pub read_mode: ReadMode,
    /// I/O threads for prefetch (0: no prefetch).
    pub io_threads: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pager {
    /// A cache of `slots` slots for the experts of `model`, which must come from an .emoe
    /// (every expert in its own block); the blocks' pages are dropped from the page cache.
    pub fn new(
        model: Arc<Model>,
        slots: usize,
        opts: &PagerOptions,
        paths: Arc<PathStats>,
    ) -> Result<Pager> {
        // Refused before any is started: spawning until the OS says no (EAGAIN) exhausts the
        // user's thread limit for every other process meanwhile.
        if opts.io_threads > MAX_IO_THREADS {
            return Err(Error::invalid(format!(
                "{} I/O threads is too many (at most {MAX_IO_THREADS})",
                opts.io_threads
            )));
        }
        let (blocks, file_map, path) = collect_blocks(&model)?;
        let reader = BlockReader::open(&path, opts.read_mode).map_err(|e| Error::io(&path, e))?;
        let slot_bytes = blocks
            .iter()
            .flatten()
            .map(|b| b.span.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN)
            .max()
            .unwrap_or(DIRECT_ALIGN);
        release_expert_pages(&file_map, &reader, &blocks);
        let n_blocks = blocks.len();
        let inner = Arc::new(Inner {
            experts: model.config.num_experts,
            top_k: model.config.top_k,
            model,
            path,
            file_map,
            blocks,
            reader,
            state: Mutex::new(State {
                slots: Vec::new(),
                at: vec![None; n_blocks],
                tick: 0,
                target_slots: 0,
                resident: vec![false; n_blocks],
                predicted: vec![false; n_blocks],
            }),
            changed: Condvar::new(),
            verdicts: (0..n_blocks).map(|_| OnceLock::new()).collect(),
            counters: Counters::default(),
            block_reads: (0..n_blocks).map(|_| AtomicU64::new(0)).collect(),
            slot_bytes,
            policy: opts.policy,
            paths,
        });
        inner.resize(slots)?;
        let (jobs, threads) = if opts.io_threads > 0 {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            let threads = (0..opts.io_threads)
                .map(|i| {
                    let (inner, rx) = (inner.clone(), rx.clone());
                    std::thread::Builder::new()
                        .name(format!("edgemoe-io{i}"))
                        .stack_size(256 << 10)
                        .spawn(move || loop {
                            let job = lock(&rx).recv();
                            let Ok(job) = job else { break };
                            let res = inner.load(job.mem, job.block);
                            inner.install(job.slot, job.block, res);
                        })
                        .map_err(|e| Error::invalid(format!("cannot start an I/O thread: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            (Some(tx), threads)
        } else {
            (None, Vec::new())
        };
        Ok(Pager {
            inner,
            jobs,
            threads,
            serial: Mutex::new(()),
        })
    }

    pub fn slot_bytes(&self) -> usize {
        self.inner.slot_bytes
    }

    pub fn read_mode(&self) -> ReadMode {
        self.inner.reader.mode()
    }

    pub fn slots(&self) -> usize {
        lock(&self.inner.state).target_slots
    }

    /// Grows or shrinks the cache to `slots` slots while requests run: slots in use are given
    /// back as soon as their step ends.
    pub fn resize(&self, slots: usize) -> Result<()> {
        self.inner.resize(slots)
    }

    pub fn stats(&self, tokens: u64) -> CacheStats {
        self.inner
            .counters
            .snapshot(self.slots(), self.inner.slot_bytes as u64, tokens)
    }

    /// Per block (`layer * experts + expert`): whether it sits read in a slot now, and how
    /// many times it has been read from the file.
    pub fn residency(&self) -> Vec<(bool, u64)> {
        let st = lock(&self.inner.state);
        st.at
            .iter()
            .zip(&self.inner.block_reads)
            .map(|(slot, reads)| {
                let held = slot
                    .and_then(|s| st.slots.get(s)?.as_ref())
                    .is_some_and(|s| !s.loading && s.mem.is_some());
                (held, reads.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Runs `run` on experts `ids` of `layer`, at most a cache's worth at a time, with the
    /// experts' matrices in cache slots; `next` (layer, experts) is prefetched once this
    /// layer's slots are reserved. `run` gets the chunk's start in `ids` and its experts.
    pub fn with_experts<R>(
        &self,
        layer: usize,
        ids: &[usize],
        next: Option<(usize, Vec<usize>)>,
        mut run: impl FnMut(usize, &[&GatedMlp]) -> Vec<R>,
    ) -> Result<Vec<R>> {
        let _one_layer = lock(&self.serial);
        let mut next = next;
        let mut out = Vec::with_capacity(ids.len());
        let mut start = 0;
        while start < ids.len() {
            let cap = self.slots().max(1);
            let chunk = &ids[start..(start + cap).min(ids.len())];
            let mlps = self.fetch(layer, chunk, next.take())?;
            let refs: Vec<&GatedMlp> = mlps.iter().collect();
            out.extend(run(start, &refs));
            drop(refs);
            drop(mlps);
            // Slots above a budget that shrank during the chunk go back now that it is done.
            self.inner.retire_extra(&mut lock(&self.inner.state));
            start += chunk.len();
        }
        Ok(out)
    }

    /// The experts `chunk` of `layer` in slots (reading the missing ones here and waiting for
    /// those a prefetch is reading); the time spent counts as stall.
    fn fetch(
        &self,
        layer: usize,
        chunk: &[usize],
        next: Option<(usize, Vec<usize>)>,
    ) -> Result<Vec<GatedMlp>> {
        let inner = &self.inner;
        let started = Instant::now();
        let keys: Vec<usize> = chunk.iter().map(|&e| layer * inner.experts + e).collect();
        let mut got: Vec<Option<SharedMap>> = vec![None; keys.len()];
        let mut waits = Vec::new();
        let mut reads = Vec::new();
        {
            let mut st = lock(&inner.state);
            st.tick += 1;
            let tick = st.tick;
            // First pin what is there, so that finding room for the rest cannot evict it.
            for (i, &b) in keys.iter().enumerate() {
                let Some(s) = st.at[b] else { continue };
                let Some(slot) = st.slots[s].as_mut() else {
                    continue;
                };
                slot.last_use = tick;
                if slot.prefetched {
                    slot.prefetched = false;
                    Counters::add(&inner.counters.prefetch_hits, 1);
                } else {
                    Counters::add(&inner.counters.hits, 1);
                }
                if slot.loading {
                    waits.push((i, s));
                } else {
                    got[i] = slot.mem.clone();
                }
            }
            for (i, &b) in keys.iter().enumerate() {
                if st.at[b].is_some() {
                    continue;
                }
                let s;
                (st, s) = inner.room(st)?;
                let mem = inner.claim(&mut st, s, b, tick, false);
                Counters::add(&inner.counters.misses, 1);
                reads.push((i, s, b, mem));
            }
            st.predicted.iter_mut().for_each(|p| *p = false);
        }
        if let Some((nl, ids)) = next {
            self.prefetch(nl, &ids);
        }
        let mut first_error = None;
        for (i, s, b, mem) in reads {
            let res = inner.load(mem, b);
            if let Ok(m) = &res {
                got[i] = Some(m.clone());
            }
            if let Err(e) = &res {
                first_error.get_or_insert_with(|| e.clone());
            }
            inner.install(s, b, res);
        }
        for (i, s) in waits {
            got[i] = inner.wait_loaded(s, keys[i]);
        }
        // A prefetch that failed leaves a hole: read it here (or report why not).
        for (i, &b) in keys.iter().enumerate() {
            if got[i].is_none() && first_error.is_none() {
                match inner.demand_read(b) {
                    Ok(m) => got[i] = Some(m),
                    Err(e) => first_error = Some(e),
                }
            }
        }
        Counters::add(
            &inner.counters.stall_ns,
            started.elapsed().as_nanos() as u64,
        );
        if let Some(reason) = first_error {
            return Err(Error::Emoe {
                path: inner.path.clone(),
                reason,
            });
        }
        keys.iter()
            .zip(got)
            .map(|(&b, mem)| {
                let mem = mem.ok_or_else(|| Error::invalid("expert slot vanished"))?;
                inner.handle(b, &mem)
            })
            .collect()
    }

    /// Starts reading the missing experts `ids` of `layer` on the I/O threads, into slots no
    /// one is using; stops at the first that finds none free.
    pub fn prefetch(&self, layer: usize, ids: &[usize]) {
        let Some(jobs) = &self.jobs else { return };
        let inner = &self.inner;
        if layer * inner.experts >= inner.blocks.len() {
            return;
        }
        let mut st = lock(&inner.state);
        let tick = st.tick;
        for &e in ids {
            let b = layer * inner.experts + e;
            if inner.blocks.get(b).is_none_or(|x| x.is_none()) {
                continue;
            }
            st.predicted[b] = true;
            if st.at[b].is_some() {
                continue;
            }
            let Some(s) = inner.victim(&st, true) else {
                break;
            };
            let mem = inner.claim(&mut st, s, b, tick, true);
            Counters::add(&inner.counters.prefetches, 1);
            if let Err(mpsc::SendError(job)) = jobs.send(Job {
                slot: s,
                block: b,
                mem,
            }) {
                inner.install_failed(&mut st, job.slot, job.block);
            }
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn template(&self, b: usize) -> Option<&GatedMlp> {
        let info = self.blocks.get(b)?.as_ref()?;
        match &self.model.weights.layers.get(info.layer)?.ffn {
            Ffn::Moe(block) => block.experts.get(info.expert),
            _ => None,
        }
    }

    fn handle(&self, b: usize, mem: &SharedMap) -> Result<GatedMlp> {
        let (Some(info), Some(t)) = (self.blocks[b].as_ref(), self.template(b)) else {
            return Err(Error::invalid(format!("no expert block {b}")));
        };
        rebase(t, &self.file_map, info.span, mem)
            .ok_or_else(|| Error::invalid(format!("expert block {b} cannot be paged")))
    }

    /// Reads block `b` into `slot` and verifies it the first time.
    fn load(&self, slot: Mmap, b: usize) -> std::result::Result<SharedMap, String> {
        let info = self.blocks[b].as_ref().ok_or("no such expert block")?;
        let what = || {
            format!(
                "expert block (layer {}, expert {}) at offset {}",
                info.layer, info.expert, info.span.offset
            )
        };
        let started = Instant::now();
        let mem = refill(slot, |buf| {
            self.reader
                .read(buf, info.span.offset as u64, info.span.len)
        })
        .map_err(|e| format!("{}: read failed: {e}", what()))?;
        Counters::add(&self.counters.read_ns, started.elapsed().as_nanos() as u64);
        Counters::add(&self.counters.bytes_read, info.span.len as u64);
        if let Some(c) = self.block_reads.get(b) {
            Counters::add(c, 1);
        }
        self.verdicts[b]
            .get_or_init(|| {
                let computed = crc32c::crc32c(&mem[..info.span.len]);
                if computed != info.crc32c {
                    return Err(format!(
                        "{}: checksum mismatch (stored crc32c {:#010x}, computed {computed:#010x}): the file is corrupt",
                        what(),
                        info.crc32c
                    ));
                }
                let mlp = self.handle(b, &mem).map_err(|e| e.to_string())?;
                for lin in [&mlp.gate, &mlp.up, &mlp.down] {
                    lin.validate_quantized()
                        .map_err(|e| format!("{}: {}: {e}", what(), lin.name))?;
                }
                Ok(())
            })
            .clone()?;
        Ok(mem)
    }

    /// Puts a finished read into its slot and wakes whoever waits.
    fn install(&self, s: usize, b: usize, res: std::result::Result<SharedMap, String>) {
        let mut st = lock(&self.state);
        match res {
            Ok(mem) => {
                if let Some(slot) = st.slots[s].as_mut() {
                    slot.mem = Some(mem);
                    slot.loading = false;
                }
            }
            Err(_) => self.install_failed(&mut st, s, b),
        }
        self.retire_extra(&mut st);
        drop(st);
        self.changed.notify_all();
    }

    fn install_failed(&self, st: &mut State, s: usize, b: usize) {
        st.at[b] = None;
        if let Some(slot) = st.slots[s].as_mut() {
            slot.key = None;
            slot.loading = false;
            slot.prefetched = false;
            slot.mem = new_slot(self.slot_bytes).ok();
            if slot.mem.is_none() {
                st.slots[s] = None;
            }
        }
    }

    fn wait_loaded(&self, s: usize, b: usize) -> Option<SharedMap> {
        let mut st = lock(&self.state);
        loop {
            match st.slots[s].as_ref() {
                Some(slot) if slot.key == Some(b) && slot.loading => {}
                Some(slot) if slot.key == Some(b) => return slot.mem.clone(),
                _ => return None,
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Reads block `b` on the calling thread into a free slot.
    fn demand_read(&self, b: usize) -> std::result::Result<SharedMap, String> {
        let (s, mem) = {
            let (mut st, s) = self.room(lock(&self.state)).map_err(|e| e.to_string())?;
            let tick = st.tick;
            (s, self.claim(&mut st, s, b, tick, false))
        };
        Counters::add(&self.counters.misses, 1);
        let res = self.load(mem, b);
        self.install(s, b, res.clone());
        res
    }

    /// A slot to fill: a victim, else (once a read in flight lands) the next one; where none
    /// is in flight and every slot is in use (the budget shrank under a running step), one
    /// extra slot, given back when the step ends.
    fn room<'s>(&self, mut st: MutexGuard<'s, State>) -> Result<(MutexGuard<'s, State>, usize)> {
        loop {
            if let Some(s) = self.victim(&st, false) {
                return Ok((st, s));
            }
            if !st.slots.iter().flatten().any(|x| x.loading) {
                let mem = new_slot(self.slot_bytes)
                    .map_err(|e| Error::invalid(format!("cannot allocate an expert slot: {e}")))?;
                st.slots.push(Some(Slot {
                    key: None,
                    mem: Some(mem),
                    loading: false,
                    prefetched: false,
                    last_use: 0,
                }));
                let s = st.slots.len() - 1;
                return Ok((st, s));
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes slot `s` for block `b`: evicts what it held and hands out its memory to fill.
    fn claim(&self, st: &mut State, s: usize, b: usize, tick: u64, prefetch: bool) -> Mmap {
        let slot = st.slots[s].as_mut().expect("victim is a live slot");
        if let Some(old) = slot.key.take() {
            if slot.prefetched {
                Counters::add(&self.counters.wasted_prefetches, 1);
            }
            st.at[old] = None;
        }
        let slot = st.slots[s].as_mut().expect("victim is a live slot");
        let mem = slot.mem.take().expect("a victim is not loading");
        slot.key = Some(b);
        slot.loading = true;
        slot.prefetched = prefetch;
        slot.last_use = tick;
        st.at[b] = Some(s);
        // The victim had no other reference (checked by `victim`).
        Arc::try_unwrap(mem).expect("victim slot is unshared")
    }

    /// The slot to refill: an empty one, else the policy's choice among slots nobody uses.
    /// A prefetch never evicts an expert used in the current step or another prefetch of it.
    fn victim(&self, st: &State, prefetch: bool) -> Option<usize> {
        let free = |slot: &Slot| {
            !slot.loading && slot.mem.as_ref().is_some_and(|m| Arc::strong_count(m) == 1)
        };
        let mut best: Option<((u8, u64, u64), usize)> = None;
        for (s, slot) in st.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if !free(slot) {
                continue;
            }
            let Some(b) = slot.key else { return Some(s) };
            // A speculative read never evicts what this step uses, nor a pinned (resident) block.
            if prefetch && (slot.last_use == st.tick || st.resident[b]) {
                continue;
            }
            let (layer, e) = (b / self.experts, b % self.experts);
            let rank = match self.policy {
                Policy::Lru => (0, 0, slot.last_use),
                Policy::Lfu => (0, self.paths.count(layer, e), slot.last_use),
                Policy::Stats => {
                    let class = if st.resident[b] {
                        2
                    } else if st.predicted[b] {
                        1
                    } else {
                        0
                    };
                    (class, self.paths.count(layer, e), slot.last_use)
                }
            };
            if best.is_none_or(|(r, _)| rank < r) {
                best = Some((rank, s));
            }
        }
        best.map(|(_, s)| s)
    }

    fn resize(&self, slots: usize) -> Result<()> {
        let mut st = lock(&self.state);
        st.target_slots = slots;
        let live = st.slots.iter().flatten().count();
        for _ in live..slots {
            let mem = new_slot(self.slot_bytes)
                .map_err(|e| Error::invalid(format!("cannot allocate an expert slot: {e}")))?;
            let slot = Some(Slot {
                key: None,
                mem: Some(mem),
                loading: false,
                prefetched: false,
                last_use: 0,
            });
            match st.slots.iter().position(Option::is_none) {
                Some(i) => st.slots[i] = slot,
                None => st.slots.push(slot),
            }
        }
        self.retire_extra(&mut st);
        self.choose_resident_set(&mut st);
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// Gives back slots beyond the target that nobody uses (least valuable first).
    fn retire_extra(&self, st: &mut State) {
        while st.slots.iter().flatten().count() > st.target_slots {
            let Some(s) = self.victim(st, false) else {
                return;
            };
            if let Some(b) = st.slots[s].as_ref().and_then(|x| x.key) {
                st.at[b] = None;
            }
            st.slots[s] = None;
        }
    }

    /// The `stats` policy's resident set: the blocks with the most expected hits per byte (all
    /// blocks of a model have about the same size, so the most chosen), leaving room for a
    /// layer's experts plus a prediction's worth streaming through.
    fn choose_resident_set(&self, st: &mut State) {
        st.resident.iter_mut().for_each(|r| *r = false);
        if self.policy != Policy::Stats {
            return;
        }
        // Room for the current layer's experts plus the next layer's prefetch (top-k each); a
        // prefetch cannot evict a resident block, so it reads only into these slots. Measured
        // on the 2 GB benchmark model: more streaming slots only lower the hit rate.
        let streaming = 2 * self.top_k;
        let keep = st.target_slots.saturating_sub(streaming);
        let mut ranked: Vec<(f64, usize)> = self
            .blocks
            .iter()
            .enumerate()
            .filter_map(|(b, info)| {
                let info = info.as_ref()?;
                let hits = self.paths.count(info.layer, info.expert) as f64;
                Some((hits / info.span.len as f64, b))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        for &(score, b) in ranked.iter().take(keep) {
            if score > 0.0 {
                st.resident[b] = true;
            }
        }
    }

    /// Recomputes the resident set from the online counts.
    fn refresh_resident_set(&self) {
        let mut st = lock(&self.state);
        self.choose_resident_set(&mut st);
    }
}

impl Pager {
    /// Re-ranks the `stats` policy's resident set from the statistics as they are now.
    pub fn refresh_placement(&self) {
        self.inner.refresh_resident_set();
    }

    /// Bytes of all expert blocks.
    pub fn expert_bytes(&self) -> u64 {
        self.inner
            .blocks
            .iter()
            .flatten()
            .map(|b| b.span.len as u64)
            .sum()
    }

    pub fn counters_reset(&self) {
        let c = &self.inner.counters;
        for a in [
            &c.hits,
            &c.misses,
            &c.prefetch_hits,
            &c.wasted_prefetches,
            &c.prefetches,
            &c.bytes_read,
            &c.read_ns,
            &c.stall_ns,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

type Blocks = (Vec<Option<BlockInfo>>, SharedMap, PathBuf);

/// Every expert's block, indexed `layer × experts + expert`; an error unless every expert of
/// every MoE layer has one in the same file and can be re-pointed into a slot.
fn collect_blocks(model: &Model) -> Result<Blocks> {
    let e_n = model.config.num_experts;
    let mut blocks: Vec<Option<BlockInfo>> = (0..model.weights.layers.len() * e_n)
        .map(|_| None)
        .collect();
    let mut file: Option<(SharedMap, PathBuf)> = None;
    let needs_emoe = || {
        Error::invalid(format!(
            "--mem pages experts from an .emoe store; {} is not one (quantize it first: edgemoe quantize)",
            model.source
        ))
    };
    for (l, layer) in model.weights.layers.iter().enumerate() {
        let Ffn::Moe(block) = &layer.ffn else {
            continue;
        };
        for (e, mlp) in block.experts.iter().enumerate() {
            let sb = mlp.block.as_ref().ok_or_else(needs_emoe)?;
            if let Some((map, _)) = &file {
                if !Arc::ptr_eq(map, &sb.map) {
                    return Err(needs_emoe());
                }
            } else {
                file = Some((sb.map.clone(), sb.path.clone()));
            }
            let span = BlockSpan {
                offset: sb.offset,
                len: sb.len,
            };
            let probe = new_slot(sb.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN)
                .map_err(|e| Error::invalid(format!("cannot allocate an expert slot: {e}")))?;
            if rebase(mlp, &sb.map, span, &probe).is_none()
                || !sb.offset.is_multiple_of(DIRECT_ALIGN)
            {
                return Err(Error::invalid(format!(
                    "{}: expert (layer {l}, expert {e}) has weights outside its block; it cannot be paged",
                    sb.path.display()
                )));
            }
            blocks[l * e_n + e] = Some(BlockInfo {
                layer: l,
                expert: e,
                span,
                crc32c: sb.crc32c,
            });
        }
    }
    let (map, path) = file.ok_or_else(|| {
        Error::invalid(format!(
            "--mem: {} has no routed experts to page",
            model.source
        ))
    })?;
    Ok((blocks, map, path))
}

/// Drops the expert blocks' pages from this process's map and from the page cache (loading
/// touched the few that hold small vectors): from here on they are read only into slots.
fn release_expert_pages(map: &SharedMap, reader: &BlockReader, blocks: &[Option<BlockInfo>]) {
    for b in blocks.iter().flatten() {
        crate::model::buf::release_pages(map, b.span.offset, b.span.len);
        reader.drop_cached(b.span.offset as u64, b.span.len);
    }
}
