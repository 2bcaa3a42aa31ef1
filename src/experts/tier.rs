//! The fast expert tier: a fixed number of slots for experts on the device the engine runs on
//! (the GPU), keyed by (layer, expert). For each routed expert of a step the tier says where it
//! runs: on the device (resident, or fetched into a slot now), or on the host CPU's int8 kernels
//! side by side with the device. `--placement gpu` fetches every miss, `cpu` runs every miss on
//! the host (slots then fill only by prefetch), `auto` asks a cost model fed with the copy and
//! compute rates measured as the run goes. This file is bookkeeping only: it knows nothing of
//! the backend, so CI runs the very same code with a CPU backend in the device's role.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
}

/// One resident expert's standing.
#[derive(Debug, Clone, Copy)]
struct Tenant {
    last_use: u64,
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
    /// The coldest tenant not in `pinned` (ties: the least recently used).
    fn victim(&self, pinned: &[ExpertKey]) -> Option<ExpertKey> {
        self.tenants
            .iter()
            .filter(|(k, _)| !pinned.contains(k))
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

    fn admit(&mut self, key: ExpertKey, evict: Option<ExpertKey>) {
        if let Some(v) = evict {
            self.tenants.remove(&v);
        }
        self.tenants.insert(
            key,
            Tenant {
                last_use: self.clock,
            },
        );
    }
}

/// The tier's counters (`--stats`, serve's stats, `/metrics`).
#[derive(Default)]
pub struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetched: AtomicU64,
    pub host_runs: AtomicU64,
    pub prefetched: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub copy_ns: AtomicU64,
    pub evicted: AtomicU64,
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
    pub evicted: u64,
    pub bytes_copied: u64,
    pub copy_gb_per_s: f64,
    pub hit_rate: f64,
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

    pub fn is_resident(&self, key: ExpertKey) -> bool {
        self.state().tenants.contains_key(&key)
    }

    pub fn rates(&self) -> Rates {
        self.state().rates
    }

    /// Where each of layer `layer`'s routed experts runs this step. `groups` are (expert,
    /// tokens routed to it); `bytes` and `macs` one expert's weight bytes and multiply-adds per
    /// token. Slots change here (the caller copies what a `Fetch` names and releases what it
    /// evicts): experts routed this step are never evicted for one another.
    pub fn place(
        &self,
        layer: usize,
        groups: &[(usize, usize)],
        bytes: usize,
        macs: usize,
    ) -> Vec<Site> {
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
            if let Some(t) = st.tenants.get_mut(&key) {
                t.last_use = now;
                sites[i] = Site::Resident;
                Counters::inc(&self.counters.hits, 1);
                continue;
            }
            Counters::inc(&self.counters.misses, 1);
            let wants_fetch = match self.placement {
                Placement::Gpu => true,
                Placement::Cpu => false,
                Placement::Auto => {
                    st.rates.fetch_s(bytes, macs, tokens) <= st.rates.host_s(bytes, macs, tokens)
                }
            };
            sites[i] = match st.room(&pinned).filter(|_| wants_fetch) {
                Some(evict) => {
                    st.admit(key, evict);
                    Counters::inc(&self.counters.fetched, 1);
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
    /// colder expert that is not itself predicted. Slots change here, as in [`Self::place`].
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
            st.admit(key, evict);
            Counters::inc(&self.counters.prefetched, 1);
            Counters::inc(&self.counters.evicted, evict.is_some() as u64);
            out.push((e, evict));
        }
        out
    }

    /// Changes the slot count between steps; returns the tenants that must go (coldest first).
    pub fn resize(&self, slots: usize) -> Vec<ExpertKey> {
        let mut st = self.state();
        st.capacity = slots;
        let mut gone = Vec::new();
        while st.tenants.len() > slots {
            let Some(v) = st.victim(&[]) else { break };
            st.tenants.remove(&v);
            gone.push(v);
        }
        Counters::inc(&self.counters.evicted, gone.len() as u64);
        gone
    }

    /// Records a copy of `bytes` that took `took`, for the counters and the cost model.
    pub fn record_copy(&self, bytes: usize, took: Duration) {
        Counters::inc(&self.counters.bytes_copied, bytes as u64);
        Counters::inc(&self.counters.copy_ns, took.as_nanos() as u64);
        self.follow(|r| &mut r.copy_bytes_per_s, bytes as f64, took);
    }

    /// Records an expert run of `bytes` weights on `tokens` tokens that took `took`, on the
    /// host or on the device. Small runs teach the bandwidth, large ones the arithmetic rate.
    pub fn record_run(
        &self,
        on_host: bool,
        bytes: usize,
        macs: usize,
        tokens: usize,
        took: Duration,
    ) {
        let work = (macs * tokens) as f64;
        let by_bytes = bytes as f64 >= work * 0.01;
        match (on_host, by_bytes) {
            (true, true) => self.follow(|r| &mut r.host_bytes_per_s, bytes as f64, took),
            (true, false) => self.follow(|r| &mut r.host_macs_per_s, work, took),
            (false, true) => self.follow(|r| &mut r.device_bytes_per_s, bytes as f64, took),
            (false, false) => self.follow(|r| &mut r.device_macs_per_s, work, took),
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
        let st = self.state();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        let (hits, misses) = (g(&c.hits), g(&c.misses));
        TierStats {
            slots: st.capacity,
            resident: st.tenants.len(),
            hits,
            misses,
            fetched: g(&c.fetched),
            host_runs: g(&c.host_runs),
            prefetched: g(&c.prefetched),
            evicted: g(&c.evicted),
            bytes_copied: g(&c.bytes_copied),
            copy_gb_per_s: g(&c.bytes_copied) as f64 / (g(&c.copy_ns) as f64).max(1.0),
            hit_rate: hits as f64 / ((hits + misses) as f64).max(1.0),
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

    #[test]
    fn hits_fetches_and_host_runs_follow_the_placement() {
        let tier = ExpertTier::new(2, 2, 4, Placement::Gpu, false);
        let sites = tier.place(0, &[(0, 3), (1, 1), (2, 2)], 1000, 10);
        // Two slots: the two most-routed fetched, the third runs on the host.
        assert_eq!(sites[0], Site::Fetch { evict: None });
        assert_eq!(sites[1], Site::Host);
        assert_eq!(sites[2], Site::Fetch { evict: None });
        let sites = tier.place(0, &[(0, 1)], 1000, 10);
        assert_eq!(sites, vec![Site::Resident]);
        // Layer 1's expert evicts the colder of layer 0's tenants (expert 2: heat 2 < 3+1).
        let sites = tier.place(1, &[(3, 1)], 1000, 10);
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
    fn auto_follows_the_cost_model() {
        let tier = ExpertTier::new(4, 1, 8, Placement::Auto, false);
        // A slow copy, a fast host: one token runs on the host; many tokens favour the device.
        {
            let mut st = tier.state();
            st.rates = Rates {
                copy_bytes_per_s: 1e9,
                device_bytes_per_s: 1e12,
                device_macs_per_s: 1e14,
                host_bytes_per_s: 2e10,
                host_macs_per_s: 1e11,
            };
        }
        let (bytes, macs) = (4 << 20, 4 << 20);
        assert_eq!(tier.place(0, &[(0, 1)], bytes, macs), vec![Site::Host]);
        assert_eq!(
            tier.place(0, &[(1, 512)], bytes, macs),
            vec![Site::Fetch { evict: None }]
        );
    }

    #[test]
    fn zero_slots_run_everything_on_the_host_and_resize_evicts_the_coldest() {
        let tier = ExpertTier::new(0, 1, 4, Placement::Gpu, true);
        assert_eq!(tier.place(0, &[(0, 1), (1, 1)], 10, 1), vec![Site::Host; 2]);
        assert!(tier.prefetch(0, &[2]).is_empty());
        assert!(tier.resize(3).is_empty());
        assert_eq!(tier.prefetch(0, &[2, 3]).len(), 2);
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
