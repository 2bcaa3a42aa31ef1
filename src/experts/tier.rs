//! The fast expert tier: a fixed number of slots for experts on the device the engine runs on
//! (the GPU), keyed by (layer, expert). For each routed expert of a step the tier says where it
//! runs: on the device (resident, or fetched into a slot now), or on the host CPU's int8 kernels
//! side by side with the device. `--placement gpu` fetches every miss, `cpu` runs every miss on
//! the host (slots then fill only by prefetch), `auto` asks a cost model fed with the copy and
//! compute rates measured as the run goes: the device's own times of its copies and expert runs
//! where it only queues them (events, read once complete), wall-clock times where work is done
//! when the call returns. A fetch reserves its slot and the expert counts as resident only once
//! the copy succeeded, so a failure leaves the tier as it was minus the evicted tenant. This
//! file is bookkeeping only: it never calls the backend, so CI runs the very same code with a
//! CPU backend in the device's role.

use crate::backend::DeviceTiming;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

/// Where a routed expert that is not resident runs (`--placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// The cost model decides per expert and step.
    #[default]
    Auto,
    /// Every miss is copied to the device and runs there.
    Gpu,
    /// Every miss runs on the host CPU; slots fill by prefetch only.
    Cpu,
}

/// Where one routed expert runs this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Already in a device slot.
    Resident,
    /// Copied into a slot now (its previous tenant, if any, given back first).
    Fetch { evict: Option<ExpertKey> },
    /// Run on the host CPU.
    Host,
}

/// An expert's identity across the tiers: (layer, expert).
pub type ExpertKey = (usize, usize);

/// The rates the cost model weighs, in bytes or multiply-adds per second. They start from
/// conservative guesses and follow what the run measures (an exponential moving average), so a
/// decision reflects this machine rather than an assumption.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rates {
    /// Host → device copy bandwidth.
    pub copy_bytes_per_s: f64,
    /// Weight bytes per second an expert streams on the device (decode is bound by it).
    pub device_bytes_per_s: f64,
    /// Multiply-adds per second on the device (prefill is bound by it).
    pub device_macs_per_s: f64,
    pub host_bytes_per_s: f64,
    pub host_macs_per_s: f64,
}

impl Default for Rates {
    fn default() -> Self {
        // PCIe 4 x16 in practice, an H100-class device, and 2 cores of a recent x86 with VNNI.
        Rates {
            copy_bytes_per_s: 20e9,
            device_bytes_per_s: 1.5e12,
            device_macs_per_s: 200e12,
            host_bytes_per_s: 20e9,
            host_macs_per_s: 100e9,
        }
    }
}

impl Rates {
    /// Seconds to run an expert of `bytes` weights (`macs` multiply-adds per token) on `tokens`
    /// tokens: weights streamed once, then the arithmetic.
    fn run_s(bytes: f64, macs: f64, tokens: f64, bytes_per_s: f64, macs_per_s: f64) -> f64 {
        bytes / bytes_per_s + macs * tokens / macs_per_s
    }

    /// Seconds to fetch the expert and run it on the device.
    pub fn fetch_s(&self, bytes: usize, macs: usize, tokens: usize) -> f64 {
        bytes as f64 / self.copy_bytes_per_s
            + Self::run_s(
                bytes as f64,
                macs as f64,
                tokens as f64,
                self.device_bytes_per_s,
                self.device_macs_per_s,
            )
    }

    /// Seconds to run the expert on the host.
    pub fn host_s(&self, bytes: usize, macs: usize, tokens: usize) -> f64 {
        Self::run_s(
            bytes as f64,
            macs as f64,
            tokens as f64,
            self.host_bytes_per_s,
            self.host_macs_per_s,
        )
    }

    /// Whether fetching a missed expert and running it on the device is expected to take no
    /// longer than running it on the host (`--placement auto`).
    pub fn prefers_fetch(&self, bytes: usize, macs: usize, tokens: usize) -> bool {
        self.fetch_s(bytes, macs, tokens) <= self.host_s(bytes, macs, tokens)
    }
}

/// One slot's tenant. A fetch or prefetch reserves the slot first (`ready` false) and the
/// expert counts as resident only once the backend has admitted it, so a failed copy leaves
/// nothing behind that a later step would take for resident.
#[derive(Debug, Clone, Copy)]
struct Tenant {
    last_use: u64,
    ready: bool,
    /// Admitted by prefetch and not routed to since.
    prefetched: bool,
}

/// Decayed routing counts per expert: what a victim is chosen by and what prefetch admits by.
struct Heat {
    experts: usize,
    values: Vec<f64>,
}

impl Heat {
    /// Each step multiplies old heat by this, so a burst fades within a few hundred steps.
    const DECAY: f64 = 0.99;

    fn get(&self, (l, e): ExpertKey) -> f64 {
        self.values
            .get(l * self.experts + e)
            .copied()
            .unwrap_or(0.0)
    }

    fn add(&mut self, (l, e): ExpertKey, tokens: usize) {
        if let Some(v) = self.values.get_mut(l * self.experts + e) {
            *v += tokens as f64;
        }
    }

    fn decay(&mut self) {
        self.values.iter_mut().for_each(|v| *v *= Self::DECAY);
    }
}

struct State {
    capacity: usize,
    tenants: HashMap<ExpertKey, Tenant>,
    heat: Heat,
    clock: u64,
    rates: Rates,
}

impl State {
    /// The coldest admitted tenant not in `pinned` (ties: the least recently used). A slot
    /// reserved for a copy under way is never a victim.
    fn victim(&self, pinned: &[ExpertKey]) -> Option<ExpertKey> {
        self.tenants
            .iter()
            .filter(|(k, t)| t.ready && !pinned.contains(k))
            .min_by(|(ka, a), (kb, b)| {
                self.heat
                    .get(**ka)
                    .total_cmp(&self.heat.get(**kb))
                    .then(a.last_use.cmp(&b.last_use))
                    .then(ka.cmp(kb))
            })
            .map(|(k, _)| *k)
    }

    /// A free slot, or the victim to make one (`None`: nothing may go).
    fn room(&self, pinned: &[ExpertKey]) -> Option<Option<ExpertKey>> {
        if self.tenants.len() < self.capacity {
            Some(None)
        } else {
            self.victim(pinned).map(Some)
        }
    }

    /// Takes a slot for `key` (its previous tenant `evict` leaves now); the expert becomes
    /// resident at [`ExpertTier::commit`]. Returns whether the tenant that left had been
    /// prefetched and never used.
    fn reserve(&mut self, key: ExpertKey, evict: Option<ExpertKey>, prefetched: bool) -> bool {
        let unused = evict
            .and_then(|v| self.tenants.remove(&v))
            .is_some_and(|t| t.prefetched);
        self.tenants.insert(
            key,
            Tenant {
                last_use: self.clock,
                ready: false,
                prefetched,
            },
        );
        unused
    }
}

/// A measurement for the cost model: a wall-clock time, or device work still under way.
pub enum Measured {
    /// The work had finished when the caller's clock stopped.
    Took(Duration),
    /// The backend only queued it; its time is learned once it completes.
    Queued(Box<dyn DeviceTiming>),
}

impl Measured {
    /// The backend's handle when it gave one, else the caller's wall-clock time.
    pub fn from(took: Duration, queued: Option<Box<dyn DeviceTiming>>) -> Measured {
        queued.map_or(Measured::Took(took), Measured::Queued)
    }
}

/// What a measurement was of.
#[derive(Debug, Clone, Copy)]
enum Sample {
    Copy {
        bytes: usize,
    },
    Run {
        on_host: bool,
        bytes: usize,
        macs: usize,
        tokens: usize,
    },
}

/// Device measurements not yet complete, oldest first.
struct Queued {
    samples: Vec<(Sample, Box<dyn DeviceTiming>)>,
}

impl Queued {
    /// More than this many unfinished measurements means the device is far behind the host;
    /// the oldest are dropped rather than held without bound.
    const MAX: usize = 256;
}

/// The tier's counters (`--stats`, serve's stats, `/metrics`).
#[derive(Default)]
pub struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetched: AtomicU64,
    pub host_runs: AtomicU64,
    pub prefetched: AtomicU64,
    /// Routed experts found resident because a prefetch had copied them in.
    pub prefetch_hits: AtomicU64,
    /// Prefetched experts that left their slot before any token was routed to them.
    pub prefetch_unused: AtomicU64,
    /// Fetches and prefetches whose copy failed (the expert stayed out of the tier).
    pub fetch_failures: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Bytes of the copies whose time is known, and that time (copy GB/s).
    pub timed_copy_bytes: AtomicU64,
    pub copy_ns: AtomicU64,
    pub evicted: AtomicU64,
    /// Time a step spent waiting on the tier: fetches on its path, and the device side waiting
    /// for the host's experts.
    pub stall_ns: AtomicU64,
    /// Tokens the tier's steps carried (stall per token).
    pub tokens: AtomicU64,
}

/// A snapshot of [`TierCounters`] with the slot count.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TierStats {
    pub slots: usize,
    pub resident: usize,
    pub hits: u64,
    pub misses: u64,
    pub fetched: u64,
    pub host_runs: u64,
    pub prefetched: u64,
    pub prefetch_hits: u64,
    pub prefetch_unused: u64,
    pub fetch_failures: u64,
    pub evicted: u64,
    pub bytes_copied: u64,
    pub copy_gb_per_s: f64,
    pub hit_rate: f64,
    pub tokens: u64,
    pub stall_ms_per_token: f64,
}

/// What a device budget must hold besides expert slots, and one slot's size: what resizing the
/// tier by bytes (`set_gpu_mem`) plans against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBudget {
    pub fixed: u64,
    pub slot_bytes: u64,
    pub top_k: usize,
}

/// The device's expert slots and the decisions about them.
pub struct ExpertTier {
    budget: Mutex<Option<DeviceBudget>>,
    state: Mutex<State>,
    queued: Mutex<Queued>,
    placement: Placement,
    prefetch: bool,
    pub counters: TierCounters,
}

impl ExpertTier {
    /// A tier of `slots` device slots for a model of `layers` × `experts` routed experts.
    pub fn new(
        slots: usize,
        layers: usize,
        experts: usize,
        placement: Placement,
        prefetch: bool,
    ) -> ExpertTier {
        ExpertTier {
            budget: Mutex::new(None),
            state: Mutex::new(State {
                capacity: slots,
                tenants: HashMap::new(),
                heat: Heat {
                    experts,
                    values: vec![0.0; layers * experts],
                },
                clock: 0,
                rates: Rates::default(),
            }),
            queued: Mutex::new(Queued {
                samples: Vec::new(),
            }),
            placement,
            prefetch,
            counters: TierCounters::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what the tier was planned against, so it can be resized by bytes.
    pub fn set_budget(&self, budget: DeviceBudget) {
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget);
    }

    /// The slot count a device budget of `bytes` gives (refused as at start when too small).
    pub fn slots_for(&self, bytes: u64) -> Result<usize> {
        let budget = *self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let b = budget.ok_or_else(|| {
            Error::invalid("the expert tier was sized by slots, not by a device budget")
        })?;
        plan_device_slots(bytes, b.fixed, b.slot_bytes, b.top_k)
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    pub fn prefetches(&self) -> bool {
        self.prefetch
    }

    /// Whether expert `key` is in a device slot (admitted, not merely reserved).
    pub fn is_resident(&self, key: ExpertKey) -> bool {
        self.state().tenants.get(&key).is_some_and(|t| t.ready)
    }

    /// Whether a slot is reserved for `key` and its copy has neither succeeded nor failed.
    pub fn is_reserved(&self, key: ExpertKey) -> bool {
        self.state().tenants.get(&key).is_some_and(|t| !t.ready)
    }

    /// The experts in device slots, in no particular order.
    pub fn resident(&self) -> Vec<ExpertKey> {
        let st = self.state();
        st.tenants
            .iter()
            .filter(|(_, t)| t.ready)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn rates(&self) -> Rates {
        self.state().rates
    }

    /// Where each of layer `layer`'s routed experts runs this step. `groups` are (expert,
    /// tokens routed to it); `bytes` and `macs` one expert's weight bytes and multiply-adds per
    /// token. A `Fetch` reserves its slot: the caller copies the expert in (after releasing
    /// what it evicts) and then settles the reservation with [`Self::commit`] or
    /// [`Self::abort`]. Experts routed this step are never evicted for one another.
    pub fn place(
        &self,
        layer: usize,
        groups: &[(usize, usize)],
        bytes: usize,
        macs: usize,
    ) -> Vec<Site> {
        self.learn_queued();
        let mut st = self.state();
        st.clock += 1;
        st.heat.decay();
        let now = st.clock;
        for &(e, tokens) in groups {
            st.heat.add((layer, e), tokens);
        }
        let pinned: Vec<ExpertKey> = groups.iter().map(|&(e, _)| (layer, e)).collect();
        // Misses are decided most-routed first, so a scarce slot goes to the expert with the
        // most tokens; the sites come back in `groups`' order.
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(groups[i].1));
        let mut sites = vec![Site::Host; groups.len()];
        for i in order {
            let (e, tokens) = groups[i];
            let key = (layer, e);
            match st.tenants.get_mut(&key) {
                Some(t) if t.ready => {
                    t.last_use = now;
                    sites[i] = Site::Resident;
                    Counters::inc(&self.counters.hits, 1);
                    if std::mem::take(&mut t.prefetched) {
                        Counters::inc(&self.counters.prefetch_hits, 1);
                    }
                    continue;
                }
                // A reservation nobody settled (the engine settles every one): the slot is
                // held, so copy the expert into it now.
                Some(t) => {
                    t.last_use = now;
                    t.prefetched = false;
                    Counters::inc(&self.counters.misses, 1);
                    sites[i] = Site::Fetch { evict: None };
                    continue;
                }
                None => {}
            }
            Counters::inc(&self.counters.misses, 1);
            let wants_fetch = match self.placement {
                Placement::Gpu => true,
                Placement::Cpu => false,
                Placement::Auto => st.rates.prefers_fetch(bytes, macs, tokens),
            };
            sites[i] = match st.room(&pinned).filter(|_| wants_fetch) {
                Some(evict) => {
                    let unused = st.reserve(key, evict, false);
                    Counters::inc(&self.counters.prefetch_unused, unused as u64);
                    Counters::inc(&self.counters.evicted, evict.is_some() as u64);
                    Site::Fetch { evict }
                }
                None => {
                    Counters::inc(&self.counters.host_runs, 1);
                    Site::Host
                }
            };
        }
        sites
    }

    /// Of `predicted` (layer `layer`'s likely experts, most likely first), the ones to copy in
    /// ahead of need, each with the tenant it replaces: into free slots, or in place of a
    /// colder expert that is not itself predicted. Slots are reserved as in [`Self::place`].
    pub fn prefetch(&self, layer: usize, predicted: &[usize]) -> Vec<(usize, Option<ExpertKey>)> {
        if !self.prefetch {
            return Vec::new();
        }
        let mut st = self.state();
        let pinned: Vec<ExpertKey> = predicted.iter().map(|&e| (layer, e)).collect();
        let mut out = Vec::new();
        for &e in predicted {
            let key = (layer, e);
            if st.tenants.contains_key(&key) {
                continue;
            }
            let Some(evict) = st.room(&pinned) else {
                break;
            };
            if let Some(v) = evict {
                if st.heat.get(v) >= st.heat.get(key) {
                    continue;
                }
            }
            let unused = st.reserve(key, evict, true);
            Counters::inc(&self.counters.prefetch_unused, unused as u64);
            Counters::inc(&self.counters.evicted, evict.is_some() as u64);
            out.push((e, evict));
        }
        out
    }

    /// The copy reserved for `key` succeeded: the expert is resident from now on.
    pub fn commit(&self, key: ExpertKey) {
        let mut st = self.state();
        let Some(t) = st.tenants.get_mut(&key).filter(|t| !t.ready) else {
            return;
        };
        t.ready = true;
        let counter = if t.prefetched {
            &self.counters.prefetched
        } else {
            &self.counters.fetched
        };
        Counters::inc(counter, 1);
    }

    /// The copy reserved for `key` failed or never ran: its slot is free again and nothing
    /// counts it as fetched. (A tenant it evicted has left for good: the caller gave its
    /// device slot back before copying.)
    pub fn abort(&self, key: ExpertKey) {
        let mut st = self.state();
        if st.tenants.get(&key).is_some_and(|t| !t.ready) {
            st.tenants.remove(&key);
            Counters::inc(&self.counters.fetch_failures, 1);
        }
    }

    /// Changes the slot count between steps; returns the tenants that must go (coldest first).
    pub fn resize(&self, slots: usize) -> Vec<ExpertKey> {
        let mut st = self.state();
        st.capacity = slots;
        let mut gone = Vec::new();
        while st.tenants.len() > slots {
            let Some(v) = st.victim(&[]) else { break };
            let unused = st.tenants.remove(&v).is_some_and(|t| t.prefetched);
            Counters::inc(&self.counters.prefetch_unused, unused as u64);
            gone.push(v);
        }
        Counters::inc(&self.counters.evicted, gone.len() as u64);
        gone
    }

    /// Records a copy of `bytes`, for the counters and the cost model.
    pub fn record_copy(&self, bytes: usize, took: Measured) {
        Counters::inc(&self.counters.bytes_copied, bytes as u64);
        self.learn(Sample::Copy { bytes }, took);
    }

    /// Records an expert run of `bytes` weights on `tokens` tokens, on the host or on the
    /// device. Small runs teach the bandwidth, large ones the arithmetic rate.
    pub fn record_run(
        &self,
        on_host: bool,
        bytes: usize,
        macs: usize,
        tokens: usize,
        took: Measured,
    ) {
        let sample = Sample::Run {
            on_host,
            bytes,
            macs,
            tokens,
        };
        self.learn(sample, took);
    }

    /// Records time a step waited on the tier.
    pub fn record_stall(&self, waited: Duration) {
        Counters::inc(&self.counters.stall_ns, waited.as_nanos() as u64);
    }

    /// Records the tokens of a step that ran through the tier.
    pub fn record_tokens(&self, tokens: usize) {
        Counters::inc(&self.counters.tokens, tokens as u64);
    }

    fn learn(&self, sample: Sample, took: Measured) {
        match took {
            Measured::Took(t) => self.apply(sample, t),
            Measured::Queued(timing) => {
                let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
                if q.samples.len() >= Queued::MAX {
                    q.samples.remove(0);
                }
                q.samples.push((sample, timing));
            }
        }
    }

    /// Feeds the queued measurements that have completed to the cost model (never waits).
    pub fn learn_queued(&self) {
        let done: Vec<(Sample, Option<Duration>)> = {
            let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = Vec::new();
            q.samples.retain(|(sample, timing)| match timing.poll() {
                Poll::Pending => true,
                Poll::Ready(t) => {
                    done.push((*sample, t));
                    false
                }
            });
            done
        };
        for (sample, took) in done {
            if let Some(t) = took {
                self.apply(sample, t);
            }
        }
    }

    /// Device measurements not yet complete.
    pub fn queued_measurements(&self) -> usize {
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .samples
            .len()
    }

    fn apply(&self, sample: Sample, took: Duration) {
        match sample {
            Sample::Copy { bytes } => {
                Counters::inc(&self.counters.timed_copy_bytes, bytes as u64);
                Counters::inc(&self.counters.copy_ns, took.as_nanos() as u64);
                self.follow(|r| &mut r.copy_bytes_per_s, bytes as f64, took);
            }
            Sample::Run {
                on_host,
                bytes,
                macs,
                tokens,
            } => {
                let work = (macs * tokens) as f64;
                let by_bytes = bytes as f64 >= work * 0.01;
                match (on_host, by_bytes) {
                    (true, true) => self.follow(|r| &mut r.host_bytes_per_s, bytes as f64, took),
                    (true, false) => self.follow(|r| &mut r.host_macs_per_s, work, took),
                    (false, true) => self.follow(|r| &mut r.device_bytes_per_s, bytes as f64, took),
                    (false, false) => self.follow(|r| &mut r.device_macs_per_s, work, took),
                }
            }
        }
    }

    fn follow(&self, field: impl Fn(&mut Rates) -> &mut f64, amount: f64, took: Duration) {
        let s = took.as_secs_f64();
        if s <= 0.0 || amount <= 0.0 {
            return;
        }
        let mut st = self.state();
        let rate = field(&mut st.rates);
        *rate = 0.8 * *rate + 0.2 * (amount / s);
    }

    pub fn stats(&self) -> TierStats {
        self.learn_queued();
        let st = self.state();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        let (hits, misses) = (g(&c.hits), g(&c.misses));
        TierStats {
            slots: st.capacity,
            resident: st.tenants.values().filter(|t| t.ready).count(),
            hits,
            misses,
            fetched: g(&c.fetched),
            host_runs: g(&c.host_runs),
            prefetched: g(&c.prefetched),
            prefetch_hits: g(&c.prefetch_hits),
            prefetch_unused: g(&c.prefetch_unused),
            fetch_failures: g(&c.fetch_failures),
            evicted: g(&c.evicted),
            bytes_copied: g(&c.bytes_copied),
            copy_gb_per_s: g(&c.timed_copy_bytes) as f64 / (g(&c.copy_ns) as f64).max(1.0),
            hit_rate: hits as f64 / ((hits + misses) as f64).max(1.0),
            tokens: g(&c.tokens),
            stall_ms_per_token: g(&c.stall_ns) as f64 / 1e6 / (g(&c.tokens) as f64).max(1.0),
        }
    }
}

struct Counters;

impl Counters {
    fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Device slots for experts of `slot_bytes` each within `budget` bytes of device memory, after
/// `fixed` bytes of non-expert weights, KV caches and workspaces. Fewer than `top_k` slots
/// would leave a token's experts unable to share the device, so that is refused, naming the
/// smallest workable budget.
pub fn plan_device_slots(budget: u64, fixed: u64, slot_bytes: u64, top_k: usize) -> Result<usize> {
    let smallest = fixed.saturating_add(slot_bytes.saturating_mul(top_k as u64));
    if budget < smallest {
        return Err(Error::invalid(format!(
            "--gpu-mem {}: the device needs {} for weights other than experts, KV caches and \
             workspaces, and {} per expert slot with at least {top_k} slots: the smallest \
             workable budget is {}",
            super::budget::human(budget),
            super::budget::human(fixed),
            super::budget::human(slot_bytes),
            super::budget::human(smallest)
        )));
    }
    Ok(((budget - fixed) / slot_bytes.max(1)) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Commits every fetch of `sites` (layer `layer`, `groups`' experts): what the engine does
    /// once the backend admitted them.
    fn admit_all(tier: &ExpertTier, layer: usize, groups: &[(usize, usize)], sites: &[Site]) {
        for (&(e, _), site) in groups.iter().zip(sites) {
            if matches!(site, Site::Fetch { .. }) {
                tier.commit((layer, e));
            }
        }
    }

    fn place_and_admit(
        tier: &ExpertTier,
        layer: usize,
        groups: &[(usize, usize)],
        bytes: usize,
        macs: usize,
    ) -> Vec<Site> {
        let sites = tier.place(layer, groups, bytes, macs);
        admit_all(tier, layer, groups, &sites);
        sites
    }

    #[test]
    fn hits_fetches_and_host_runs_follow_the_placement() {
        let tier = ExpertTier::new(2, 2, 4, Placement::Gpu, false);
        let sites = place_and_admit(&tier, 0, &[(0, 3), (1, 1), (2, 2)], 1000, 10);
        // Two slots: the two most-routed fetched, the third runs on the host.
        assert_eq!(sites[0], Site::Fetch { evict: None });
        assert_eq!(sites[1], Site::Host);
        assert_eq!(sites[2], Site::Fetch { evict: None });
        let sites = place_and_admit(&tier, 0, &[(0, 1)], 1000, 10);
        assert_eq!(sites, vec![Site::Resident]);
        // Layer 1's expert evicts the colder of layer 0's tenants (expert 2: heat 2 < 3+1).
        let sites = place_and_admit(&tier, 1, &[(3, 1)], 1000, 10);
        assert_eq!(
            sites,
            vec![Site::Fetch {
                evict: Some((0, 2))
            }]
        );
        let s = tier.stats();
        assert_eq!(
            (s.hits, s.misses, s.fetched, s.host_runs, s.evicted),
            (1, 4, 3, 1, 1)
        );

        let cpu = ExpertTier::new(2, 2, 4, Placement::Cpu, false);
        assert_eq!(cpu.place(0, &[(0, 3)], 1000, 10), vec![Site::Host]);
    }

    #[test]
    fn a_fetch_counts_only_once_admitted_and_a_failed_one_leaves_nothing_behind() {
        let tier = ExpertTier::new(1, 1, 4, Placement::Gpu, false);
        assert_eq!(
            tier.place(0, &[(0, 1)], 10, 1),
            vec![Site::Fetch { evict: None }]
        );
        // Reserved, not yet resident, not yet counted.
        assert!(tier.is_reserved((0, 0)) && !tier.is_resident((0, 0)));
        assert_eq!((tier.stats().fetched, tier.stats().resident), (0, 0));
        tier.commit((0, 0));
        assert!(tier.is_resident((0, 0)) && !tier.is_reserved((0, 0)));
        assert_eq!((tier.stats().fetched, tier.stats().resident), (1, 1));

        // Expert 1 takes expert 0's slot, and its copy fails.
        let sites = tier.place(0, &[(1, 5)], 10, 1);
        assert_eq!(
            sites,
            vec![Site::Fetch {
                evict: Some((0, 0))
            }]
        );
        tier.abort((0, 1));
        let s = tier.stats();
        assert!(!tier.is_resident((0, 1)) && !tier.is_reserved((0, 1)));
        // The evicted tenant left for good (its device slot was given back before the copy).
        assert!(!tier.is_resident((0, 0)));
        assert_eq!(
            (s.resident, s.fetched, s.fetch_failures, s.misses, s.evicted),
            (0, 1, 1, 2, 1)
        );
        assert!(tier.resident().is_empty());
        // Settling twice changes nothing.
        tier.abort((0, 1));
        tier.commit((0, 1));
        assert_eq!(tier.stats().fetch_failures, 1);
        assert!(!tier.is_resident((0, 1)));
        // The slot is free: the next miss takes it without evicting; hits count only after.
        assert_eq!(
            place_and_admit(&tier, 0, &[(1, 1)], 10, 1),
            vec![Site::Fetch { evict: None }]
        );
        assert_eq!(tier.place(0, &[(1, 1)], 10, 1), vec![Site::Resident]);
        assert_eq!(tier.resident(), vec![(0, 1)]);
    }

    #[test]
    fn a_reserved_slot_is_never_a_victim() {
        let tier = ExpertTier::new(1, 2, 4, Placement::Gpu, true);
        assert_eq!(tier.prefetch(1, &[2]), vec![(2, None)]);
        // Expert (1, 2)'s copy is under way: layer 0's miss finds no slot and runs on the host.
        assert_eq!(tier.place(0, &[(0, 9)], 10, 1), vec![Site::Host]);
        assert!(tier.resize(0).is_empty(), "a reservation is not evicted");
        tier.abort((1, 2));
        assert_eq!(tier.stats().resident, 0);
    }

    #[test]
    fn prefetch_hits_and_unused_prefetches_are_counted() {
        let tier = ExpertTier::new(3, 2, 4, Placement::Gpu, true);
        let got = tier.prefetch(1, &[1, 2]);
        assert_eq!(got, vec![(1, None), (2, None)]);
        assert_eq!(tier.stats().prefetched, 0, "counted once admitted");
        tier.commit((1, 1));
        tier.commit((1, 2));
        assert_eq!(tier.place(1, &[(1, 1)], 10, 1), vec![Site::Resident]);
        // A second hit on the same expert is not another prefetch hit.
        assert_eq!(tier.place(1, &[(1, 1)], 10, 1), vec![Site::Resident]);
        let s = tier.stats();
        assert_eq!((s.prefetched, s.prefetch_hits, s.hits), (2, 1, 2));
        // Expert 2 was prefetched and never used: it goes first, and is counted unused.
        assert_eq!(tier.resize(1), vec![(1, 2)]);
        assert_eq!(tier.stats().prefetch_unused, 1);
        // A disabled prefetch reserves nothing.
        let off = ExpertTier::new(3, 2, 4, Placement::Gpu, false);
        assert!(off.prefetch(1, &[1]).is_empty());
    }

    /// The rates of the `auto` tests: a slow copy, a fast device, a modest host.
    fn test_rates() -> Rates {
        Rates {
            copy_bytes_per_s: 1e9,
            device_bytes_per_s: 1e12,
            device_macs_per_s: 1e14,
            host_bytes_per_s: 2e10,
            host_macs_per_s: 1e11,
        }
    }

    #[test]
    fn the_cost_model_breaks_even_where_the_arithmetic_says() {
        let r = test_rates();
        let (bytes, macs) = (4_000_000, 4_000_000);
        // Fetch: 4e6/1e9 + 4e6/1e12 + 4e6·t/1e14 = 4.004 ms + 0.04 µs·t.
        // Host: 4e6/2e10 + 4e6·t/1e11 = 0.2 ms + 40 µs·t.
        // Equal at t = 3.804 ms / 39.96 µs = 95.2 tokens.
        assert!((r.fetch_s(bytes, macs, 1) - (4.004e-3 + 4e-8)).abs() < 1e-12);
        assert!((r.host_s(bytes, macs, 1) - (2e-4 + 4e-5)).abs() < 1e-12);
        assert!(
            !r.prefers_fetch(bytes, macs, 1),
            "decode runs a cold expert on the host"
        );
        assert!(!r.prefers_fetch(bytes, macs, 95));
        assert!(r.prefers_fetch(bytes, macs, 96), "a long prefill fetches");
        // A copy ten times faster moves the break-even to (0.404 - 0.2) ms / 39.96 µs = 5.1.
        let fast = Rates {
            copy_bytes_per_s: 1e10,
            ..r
        };
        assert!(!fast.prefers_fetch(bytes, macs, 5));
        assert!(fast.prefers_fetch(bytes, macs, 6));
    }

    #[test]
    fn auto_follows_the_cost_model() {
        let tier = ExpertTier::new(4, 1, 8, Placement::Auto, false);
        tier.state().rates = test_rates();
        let (bytes, macs) = (4 << 20, 4 << 20);
        assert_eq!(tier.place(0, &[(0, 1)], bytes, macs), vec![Site::Host]);
        assert_eq!(
            tier.place(0, &[(1, 512)], bytes, macs),
            vec![Site::Fetch { evict: None }]
        );
        // One step of both: each expert decided on its own tokens.
        assert_eq!(
            tier.place(0, &[(2, 1), (3, 200)], bytes, macs),
            vec![Site::Host, Site::Fetch { evict: None }]
        );
    }

    /// Device work whose completion the test controls.
    struct Pending(Arc<Mutex<Poll<Option<Duration>>>>);

    impl DeviceTiming for Pending {
        fn poll(&self) -> Poll<Option<Duration>> {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn queued_timings_teach_the_cost_model_once_complete() {
        let tier = ExpertTier::new(4, 1, 8, Placement::Auto, false);
        tier.state().rates = test_rates();
        let done = Arc::new(Mutex::new(Poll::Pending));
        // A 4 MB copy that will have taken 0.4 ms: 1e10 bytes/s.
        tier.record_copy(4_000_000, Measured::Queued(Box::new(Pending(done.clone()))));
        tier.learn_queued();
        assert_eq!(
            tier.rates().copy_bytes_per_s,
            1e9,
            "not learned while pending"
        );
        assert_eq!(tier.queued_measurements(), 1);
        assert_eq!(tier.stats().copy_gb_per_s, 0.0);
        *done.lock().unwrap() = Poll::Ready(Some(Duration::from_micros(400)));
        tier.learn_queued();
        assert_eq!(tier.queued_measurements(), 0);
        let want = 0.8 * 1e9 + 0.2 * 1e10;
        assert!((tier.rates().copy_bytes_per_s - want).abs() < 1.0);
        assert!((tier.stats().copy_gb_per_s - 10.0).abs() < 1e-9);
        assert_eq!(tier.stats().bytes_copied, 4_000_000);

        // A measurement lost to a device error teaches nothing.
        let lost = Arc::new(Mutex::new(Poll::Ready(None)));
        tier.record_copy(1, Measured::Queued(Box::new(Pending(lost))));
        tier.learn_queued();
        assert!((tier.rates().copy_bytes_per_s - want).abs() < 1.0);

        // Host runs measured far slower than assumed (a one-token run of a 4 MB expert taking
        // 40 ms: 1e8 bytes/s) turn decode's choice to fetching.
        let (bytes, macs) = (4_000_000, 4_000_000);
        assert_eq!(tier.place(0, &[(0, 1)], bytes, macs), vec![Site::Host]);
        for _ in 0..60 {
            tier.record_run(
                true,
                bytes,
                macs,
                1,
                Measured::Took(Duration::from_millis(40)),
            );
        }
        let r = tier.rates();
        assert!((r.host_bytes_per_s - 1e8).abs() < 1e6, "{r:?}");
        assert!(r.prefers_fetch(bytes, macs, 1), "{r:?}");
        assert_eq!(
            tier.place(0, &[(1, 1)], bytes, macs),
            vec![Site::Fetch { evict: None }]
        );
    }

    #[test]
    fn unfinished_timings_are_bounded() {
        let tier = ExpertTier::new(1, 1, 1, Placement::Auto, false);
        let never = Arc::new(Mutex::new(Poll::Pending));
        for _ in 0..Queued::MAX + 10 {
            tier.record_copy(1, Measured::Queued(Box::new(Pending(never.clone()))));
        }
        assert_eq!(tier.queued_measurements(), Queued::MAX);
    }

    #[test]
    fn stall_is_reported_per_token() {
        let tier = ExpertTier::new(1, 1, 1, Placement::Auto, false);
        tier.record_tokens(4);
        tier.record_stall(Duration::from_millis(6));
        assert!((tier.stats().stall_ms_per_token - 1.5).abs() < 1e-12);
    }

    #[test]
    fn zero_slots_run_everything_on_the_host_and_resize_evicts_the_coldest() {
        let tier = ExpertTier::new(0, 1, 4, Placement::Gpu, true);
        assert_eq!(tier.place(0, &[(0, 1), (1, 1)], 10, 1), vec![Site::Host; 2]);
        assert!(tier.prefetch(0, &[2]).is_empty());
        assert!(tier.resize(3).is_empty());
        assert_eq!(tier.prefetch(0, &[2, 3]).len(), 2);
        tier.commit((0, 2));
        tier.commit((0, 3));
        tier.place(0, &[(2, 5)], 10, 1);
        // Expert 3 (never routed) is colder than expert 2.
        assert_eq!(tier.resize(1), vec![(0, 3)]);
        assert!(tier.is_resident((0, 2)));
    }

    #[test]
    fn a_budget_too_small_names_the_smallest_workable_one() {
        assert_eq!(plan_device_slots(1000, 200, 100, 2).unwrap(), 8);
        let err = plan_device_slots(350, 200, 100, 2).unwrap_err().to_string();
        assert!(err.contains("smallest workable budget is"), "{err}");
    }
}
