//! The KV fields of `EdgemoeSessionParams` checked and turned into [`KvOptions`], with messages
//! that name the C fields (the CLI's name its flags).

use super::support::{fail, CResult};
use super::{
    EdgemoeSessionParams, EDGEMOE_ERR_INVALID_INPUT, EDGEMOE_KV_GRANULARITY_HEAD,
    EDGEMOE_KV_GRANULARITY_LAYER, EDGEMOE_KV_POLICY_DEFAULT, EDGEMOE_KV_POLICY_FULL,
    EDGEMOE_KV_POLICY_H2O, EDGEMOE_KV_POLICY_LAZY, EDGEMOE_KV_POLICY_WINDOW,
};
use crate::kv::{Budget, Granularity, KvOptions, Policy};

pub(super) fn kv_options(p: &EdgemoeSessionParams) -> CResult<KvOptions> {
    let bad = |m: String| fail(EDGEMOE_ERR_INVALID_INPUT, m);
    let pct = p.kv_budget_percent;
    let budget = match (p.kv_budget_tokens, pct) {
        (0, 0.0) => None,
        (0, x) if x > 0.0 && x <= 100.0 => Some(Budget::Percent(f64::from(x))),
        (0, x) => {
            return bad(format!(
                "kv_budget_percent is {x}; it must be in (0, 100], or 0 for none"
            ))
        }
        (n, 0.0) => Some(Budget::Tokens(n as usize)),
        (n, x) => {
            return bad(format!(
                "kv_budget_tokens ({n}) and kv_budget_percent ({x}) are both set; give one"
            ))
        }
    };
    let policy = match (p.kv_policy, budget) {
        (EDGEMOE_KV_POLICY_DEFAULT, None) => Policy::Full,
        (EDGEMOE_KV_POLICY_DEFAULT, Some(_)) => Policy::Lazy,
        (EDGEMOE_KV_POLICY_FULL, _) => Policy::Full,
        (EDGEMOE_KV_POLICY_WINDOW, _) => Policy::Window,
        (EDGEMOE_KV_POLICY_H2O, _) => Policy::H2o,
        (EDGEMOE_KV_POLICY_LAZY, _) => Policy::Lazy,
        (other, _) => {
            return bad(format!(
                "kv_policy is {other}; it must be one of EDGEMOE_KV_POLICY_* (0 to 4)"
            ))
        }
    };
    match (policy, budget) {
        (Policy::Full, Some(_)) => {
            return bad("kv_policy FULL keeps every token: it takes no KV budget".into())
        }
        (Policy::Window | Policy::H2o | Policy::Lazy, None) => {
            return bad(format!(
                "kv_policy {policy} needs kv_budget_tokens or kv_budget_percent"
            ))
        }
        _ => {}
    }
    if p.kv_window == 0 {
        return bad(
            "kv_window is 0; it must be at least 1 (start from edgemoe_session_default_params)"
                .into(),
        );
    }
    if !(p.kv_threshold.is_finite() && p.kv_threshold >= 0.0) {
        return bad(format!(
            "kv_threshold is {}; it must be finite and > 0, or 0 for the granularity's default",
            p.kv_threshold
        ));
    }
    let granularity = match p.kv_granularity {
        EDGEMOE_KV_GRANULARITY_LAYER => Granularity::Layer,
        EDGEMOE_KV_GRANULARITY_HEAD => Granularity::Head,
        other => {
            return bad(format!(
                "kv_granularity is {other}; it must be one of EDGEMOE_KV_GRANULARITY_* (0 or 1)"
            ))
        }
    };
    let opts = KvOptions {
        policy,
        budget,
        window: p.kv_window as usize,
        sinks: p.kv_sinks as usize,
        threshold: match p.kv_threshold {
            0.0 => granularity.default_threshold(),
            t => t,
        },
        recent: None,
        granularity,
    };
    // What is left to check (a token budget below the sinks and two windows) names the sizes.
    if let Err(e) = opts.validate() {
        return bad(e.to_string());
    }
    Ok(opts)
}
