//! `--mem SIZE|PCT`: the budget for everything edgemoe keeps resident, and how many expert cache
//! slots it leaves once the non-expert weights, the KV cache and the workspaces are counted.

use crate::error::{Error, Result};
use crate::kv::KvPlan;

/// A memory budget as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemBudget {
    /// This many bytes.
    Bytes(u64),
    /// Percent of the model's weight bytes (what an unlimited run keeps resident).
    Percent(f64),
}

impl std::str::FromStr for MemBudget {
    type Err = String;

    /// `300M`, `1.5G`, `2GiB`, `4096`, `512K` (binary units) or `40%`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let bad = || format!("bad memory size `{s}` (e.g. 300M, 1.5G, 4096 or 40%)");
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("--mem {s}: a percentage must be in (0, 100]"));
            }
            return Ok(MemBudget::Percent(v));
        }
        let upper = s.to_ascii_uppercase();
        let digits = upper.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &upper[digits.len()..];
        let mult: u64 = match unit.trim_end_matches('B').trim_end_matches('I') {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(bad()),
        };
        let v: f64 = digits.trim().parse().map_err(|_| bad())?;
        if !(v.is_finite() && v > 0.0) {
            return Err(bad());
        }
        let bytes = v * mult as f64;
        // `as` would saturate a size past u64 silently into "unlimited".
        if bytes >= u64::MAX as f64 {
            return Err(format!("--mem {s}: larger than any memory (2^64 bytes)"));
        }
        Ok(MemBudget::Bytes(bytes as u64))
    }
}

impl MemBudget {
    /// The budget in bytes for a model whose weights take `weight_bytes`.
    pub fn bytes(self, weight_bytes: u64) -> u64 {
        match self {
            MemBudget::Bytes(b) => b,
            MemBudget::Percent(p) => (weight_bytes as f64 * p / 100.0) as u64,
        }
    }
}

/// What the budget must hold besides the expert cache.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FixedCosts {
    /// Non-expert weights (mapped in place or owned) and the process's own heap at setup.
    pub resident_bytes: u64,
    /// The KV caches the run can allocate: `kv.bytes()`.
    pub kv_bytes: u64,
    /// Activations, logits and the I/O threads' stacks.
    pub workspace_bytes: u64,
    /// Where `kv_bytes` comes from: sequences × slots each × bytes per slot.
    pub kv: KvPlan,
}

impl FixedCosts {
    pub fn total(&self) -> u64 {
        self.resident_bytes + self.kv_bytes + self.workspace_bytes
    }
}

/// How the budget splits: fixed costs, then whole cache slots.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SlotPlan {
    pub budget_bytes: u64,
    pub fixed: FixedCosts,
    pub slot_bytes: u64,
    pub slots: usize,
}

/// Slots that fit in `budget` after `fixed`; an error naming the smallest workable budget when
/// fewer than `min_slots` do (one MoE step needs its top-k experts resident at once).
pub fn plan_slots(
    budget: u64,
    fixed: FixedCosts,
    slot_bytes: u64,
    min_slots: usize,
    max_slots: usize,
) -> Result<SlotPlan> {
    let left = budget.saturating_sub(fixed.total());
    let slots = ((left / slot_bytes.max(1)) as usize).min(max_slots);
    if slots < min_slots {
        let need = fixed.total() + min_slots as u64 * slot_bytes;
        return Err(Error::invalid(format!(
            "--mem {}: too small for this model: non-expert weights and runtime {}, KV cache ({} × {} tokens of {} bytes; a smaller --kv-budget or batch lowers it) {}, workspaces {} and {} expert slots of {} need at least {} ({} bytes)",
            human(budget),
            human(fixed.resident_bytes),
            fixed.kv.sequences,
            fixed.kv.tokens_per_sequence,
            fixed.kv.bytes_per_token,
            human(fixed.kv_bytes),
            human(fixed.workspace_bytes),
            min_slots,
            human(slot_bytes),
            human(need),
            need
        )));
    }
    Ok(SlotPlan {
        budget_bytes: budget,
        fixed,
        slot_bytes,
        slots,
    })
}

/// `123.4M`-style binary size.
pub fn human(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2}G", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1}M", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_percentages() {
        let p = |s: &str| s.parse::<MemBudget>();
        assert_eq!(p("300M"), Ok(MemBudget::Bytes(300 << 20)));
        assert_eq!(p("2GiB"), Ok(MemBudget::Bytes(2 << 30)));
        assert_eq!(p("1.5g"), Ok(MemBudget::Bytes(3 << 29)));
        assert_eq!(p("4096"), Ok(MemBudget::Bytes(4096)));
        assert_eq!(p("40%"), Ok(MemBudget::Percent(40.0)));
        assert!(p("0%").is_err() && p("120%").is_err() && p("12X").is_err() && p("").is_err());
        assert!(p("99999999999999999999G").is_err() && p("16777216T").is_err());
        assert_eq!(p("16777215T"), Ok(MemBudget::Bytes(16_777_215 << 40)));
        assert_eq!(MemBudget::Percent(50.0).bytes(1000), 500);
    }

    #[test]
    fn too_small_a_budget_names_the_smallest_workable_one() {
        let kv = KvPlan {
            tokens_per_sequence: 256,
            sequences: 2,
            bytes_per_token: 2048,
        };
        let fixed = FixedCosts {
            resident_bytes: 10 << 20,
            kv_bytes: kv.bytes(),
            workspace_bytes: 1 << 20,
            kv,
        };
        let ok = plan_slots(20 << 20, fixed, 1 << 20, 2, 100).unwrap();
        assert_eq!(ok.slots, 8);
        assert_eq!(
            plan_slots(1 << 40, fixed, 1 << 20, 2, 100).unwrap().slots,
            100
        );
        let err = plan_slots(12 << 20, fixed, 1 << 20, 2, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{} bytes", 14u64 << 20)), "{err}");
        assert!(
            err.contains("KV cache (2 × 256 tokens of 2048 bytes"),
            "{err}"
        );
    }
}
