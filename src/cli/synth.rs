//! `edgemoe synth-moe`: writes a synthetic W8A8 MoE .emoe whose routing is skewed and
//! correlated from layer to layer like a trained model's (see `experts::synth`), for paging
//! benchmarks at sizes no fixture has.

use crate::experts::synth::{routed_model, RoutingShape};
use crate::model::synthetic::mixtral_bench_config;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// The .emoe file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Decoder layers.
    #[arg(long, default_value_t = 22)]
    pub layers: usize,
    /// Model width (hidden_size).
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// Hidden width of one expert.
    #[arg(long, default_value_t = 4096)]
    pub ffn: usize,
    /// Experts per layer.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Experts each token is routed to.
    #[arg(long = "top-k", default_value_t = 2)]
    pub top_k: usize,
    /// Slope of expert popularity: the expert of rank r gets router logit offset −skew·ln(1 + r).
    #[arg(long, default_value_t = 2.0)]
    pub skew: f32,
    /// Layer-to-layer correlation of the router rows (0 to 1).
    #[arg(long, default_value_t = 0.8)]
    pub corr: f32,
    /// Defaults tuned so the trained fixture's statistics are matched: top expert ~30-40% of
    /// a layer's picks, top transition ~0.4, pre-gating top-k recall ~80% (fixture: 74%).
    #[arg(long, default_value_t = 0.7)]
    pub drift: f32,
    /// Spread of the token-dependent part of the router logits.
    #[arg(long, default_value_t = 2.0)]
    pub spread: f32,
    /// Seed of the generated weights and routing.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    if a.top_k == 0 || a.top_k > a.experts || a.hidden < 64 || !a.hidden.is_multiple_of(64) {
        anyhow::bail!("need 1 <= --top-k <= --experts and --hidden a multiple of 64");
    }
    // NaN or infinite shapes make NaN routers: a file whose every generation fails.
    let finite = [a.skew, a.corr, a.drift, a.spread]
        .iter()
        .all(|v| v.is_finite());
    if !finite || !(0.0..=1.0).contains(&a.corr) || a.spread < 0.0 {
        anyhow::bail!("need finite --skew, --drift and --spread (>= 0), and --corr in [0, 1]");
    }
    let mut cfg = mixtral_bench_config(a.layers);
    cfg.vocab_size = crate::model::tokenizer::BYTE_VOCAB;
    cfg.bos_token_id = Some(crate::model::tokenizer::BYTE_BOS);
    cfg.eos_token_ids = vec![crate::model::tokenizer::BYTE_EOS];
    cfg.hidden_size = a.hidden;
    cfg.word_embed_proj_dim = a.hidden;
    // At least one head, and a KV head count that divides it (`--hidden 64` made 0 heads and
    // `--hidden 1152` 9 heads over 2 KV heads: files no reader accepts).
    cfg.num_heads = (a.hidden / 128).max(1);
    cfg.num_kv_heads = (1..=(a.hidden / 512).max(1))
        .rev()
        .find(|kv| cfg.num_heads.is_multiple_of(*kv))
        .unwrap_or(1);
    cfg.head_dim = 64;
    cfg.expert_ffn = a.ffn;
    cfg.dense_ffn = a.ffn;
    cfg.num_experts = a.experts;
    cfg.top_k = a.top_k;
    // The same check the reader runs, before minutes of generation write a file it refuses.
    cfg.check()
        .map_err(|(field, why)| anyhow::anyhow!("the synthetic config's `{field}`: {why}"))?;
    let shape = RoutingShape {
        skew: a.skew,
        corr: a.corr,
        drift: a.drift,
        spread: a.spread,
        seed: a.seed,
    };
    eprintln!(
        "generating {} layers × {} experts of {}×{} int8 ({:.2} GB of experts)",
        a.layers,
        a.experts,
        a.hidden,
        a.ffn,
        (a.layers * a.experts * 3 * a.hidden * a.ffn) as f64 / 1e9
    );
    let model = routed_model(cfg, &shape)?;
    let quant = serde_json::json!({"method": "synthetic", "routing": shape});
    let summary = crate::quant::store::write_emoe(&model, quant, &a.out)?;
    eprintln!(
        "wrote {} ({:.2} GB, {} expert blocks)",
        a.out.display(),
        summary.total_bytes as f64 / 1e9,
        summary.expert_blocks
    );
    Ok(())
}
