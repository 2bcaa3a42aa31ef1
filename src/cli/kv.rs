//! The KV-budget options generate, ppl, bench and serve share.

use crate::kv::{Budget, Granularity, KvOptions, Policy};

#[derive(clap::Args, Debug, Clone)]
pub struct KvArgs {
    /// KV-cache budget per sequence and layer: TOKENS, or PCT% of the tokens the sequence will
    /// reach (prompt + max tokens; ppl: the window). Without it the cache keeps every token.
    #[arg(long = "kv-budget")]
    pub budget: Option<String>,
    /// Which tokens survive eviction: full | window (StreamingLLM) | h2o (heavy hitters) |
    /// lazy (LazyEviction). Default: lazy with a budget, full without.
    #[arg(long = "kv-policy")]
    pub policy: Option<String>,
    /// Observation window W in decode steps: eviction runs once per window, and the last W
    /// tokens are always kept.
    #[arg(long = "kv-window", default_value_t = crate::kv::policy::DEFAULT_WINDOW)]
    pub window: usize,
    /// Attention-sink tokens (the first ones) every policy keeps.
    #[arg(long = "kv-sinks", default_value_t = crate::kv::policy::DEFAULT_SINKS)]
    pub sinks: usize,
    /// lazy: a token's attention at a step is significant above this many times the uniform
    /// share (1 / visible tokens), averaged over the layer's heads (per KV head: over its
    /// query heads). Default 8 (layer granularity), 16 (head).
    #[arg(long = "kv-threshold")]
    pub threshold: Option<f32>,
    /// Share of the budget every policy keeps as the most recent tokens, in [0, 1) (at least
    /// the observation window); the policy ranks only what is older. Default 0.25 for lazy at
    /// layer granularity, 0 otherwise.
    #[arg(long = "kv-recent")]
    pub recent: Option<f32>,
    /// What one eviction decision covers: layer (a slot holds every KV head of its token) |
    /// head (each KV head keeps its own tokens, ranked by its own query heads; CPU only).
    #[arg(long = "kv-granularity", default_value = "layer")]
    pub granularity: String,
}

impl KvArgs {
    pub fn options(&self) -> anyhow::Result<KvOptions> {
        let budget = self
            .budget
            .as_deref()
            .map(str::parse::<Budget>)
            .transpose()?;
        let policy = match (&self.policy, budget) {
            (Some(p), _) => p.parse::<Policy>()?,
            (None, Some(_)) => Policy::Lazy,
            (None, None) => Policy::Full,
        };
        let granularity = self.granularity.parse::<Granularity>()?;
        let opts = KvOptions {
            policy,
            budget,
            window: self.window,
            sinks: self.sinks,
            threshold: self
                .threshold
                .unwrap_or_else(|| granularity.default_threshold()),
            recent: self.recent,
            granularity,
        };
        opts.validate()?;
        Ok(opts)
    }
}
