//! `edgemoe profile`: activation-path statistics of a model on a text (per layer how often each
//! expert is chosen, and layer-to-layer transitions), saved as JSON for placement (`--profile`);
//! with `--heldout`, also the next-layer prediction's recall and precision on another text,
//! for each predictor, with the statistics from the first text.

use super::ModelArgs;
use crate::engine::ppl::perplexity;
use crate::experts::paths::PathProfile;
use crate::experts::predict::{PredictSource, Predictor};
use crate::experts::ExpertService;
use crate::{BackendChoice, Engine, EngineBuilder};
use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text the statistics are gathered on.
    #[arg(long)]
    pub text: PathBuf,
    /// Where the statistics go (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Also draw the expert heat map (tokens routed per layer and expert) as an SVG here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Held-out text to measure next-layer prediction on.
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Tokens to use at most (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
}

/// One predictor's quality on the held-out text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictionRow {
    pub source: PredictSource,
    pub extra: usize,
    pub predicted_per_token: usize,
    pub recall: f64,
    pub precision: f64,
}

fn tokens_of(engine: &Engine, path: &Path, max: usize) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not valid UTF-8", path.display()))?;
    let mut t = engine.model().tokenizer.encode(&text, false)?;
    if max > 0 {
        t.truncate(max);
    }
    Ok(t)
}

/// Runs `tokens` through `engine` in windows of `ctx` (all rows, as perplexity does).
fn run_text(engine: &Engine, tokens: &[u32], ctx: usize, what: &str) -> anyhow::Result<()> {
    perplexity(engine, tokens, ctx, |done, total| {
        eprint!("\r{what}: window {done}/{total}");
    })?;
    eprintln!();
    Ok(())
}

pub fn run(a: ProfileArgs) -> anyhow::Result<()> {
    if a.model.paging.mem.is_some() {
        anyhow::bail!("profile runs the experts in place; drop --mem");
    }
    let engine = a.model.engine()?;
    if engine.model().config.num_experts == 0 {
        anyhow::bail!("{} has no routed experts to profile", engine.model().source);
    }
    let tokens = tokens_of(&engine, &a.text, a.max_tokens)?;
    run_text(&engine, &tokens, a.ctx, "profile")?;
    let profile = engine.experts.paths.snapshot();
    profile.save(&a.out)?;
    eprintln!("{} tokens profiled → {}", profile.tokens, a.out.display());
    if let Some(svg) = &a.svg {
        write_svg(&engine, &profile, svg)?;
    }
    let Some(heldout) = &a.heldout else {
        return Ok(());
    };
    let top_k = engine.model().config.top_k;
    let held = tokens_of(&engine, heldout, a.max_tokens)?;
    let mut rows = Vec::new();
    for source in [
        PredictSource::Pregate,
        PredictSource::Transitions,
        PredictSource::Both,
    ] {
        for extra in [0, 1, 2] {
            let row = measure(
                &engine,
                a.model.backend,
                &profile,
                source,
                extra,
                &held,
                a.ctx,
            )?;
            println!(
                "{:<12} top-{top_k}+{extra}: recall {:.1}%, precision {:.1}%",
                format!("{source:?}").to_lowercase(),
                100.0 * row.recall,
                100.0 * row.precision
            );
            rows.push(row);
        }
    }
    let path = a.out.with_extension("prediction.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("prediction quality → {}", path.display());
    Ok(())
}

/// The profile's heat map, drawn as the dashboard draws it (experts run in place here, so
/// every one is in RAM).
fn write_svg(engine: &Engine, profile: &PathProfile, path: &Path) -> anyhow::Result<()> {
    let model = engine.model();
    let (map, _) = engine
        .experts
        .heat_map(model, &profile.counts, |_, _| false);
    let title = format!(
        "{}: tokens routed per expert ({} tokens)",
        Path::new(&model.source).file_name().map_or_else(
            || model.source.clone(),
            |n| n.to_string_lossy().into_owned()
        ),
        profile.tokens
    );
    std::fs::write(path, map.to_svg(&title)).with_context(|| format!("{}", path.display()))?;
    eprintln!("heat map → {}", path.display());
    Ok(())
}

/// One predictor on `tokens`, starting from `profile` (and updating it online, as the runtime
/// does).
fn measure(
    base: &Engine,
    backend: BackendChoice,
    profile: &PathProfile,
    source: PredictSource,
    extra: usize,
    tokens: &[u32],
    ctx: usize,
) -> anyhow::Result<PredictionRow> {
    let model = base.model().clone();
    let top_k = model.config.top_k;
    let service =
        ExpertService::measuring(&model, Predictor::new(source, top_k, extra), Some(profile));
    let engine = EngineBuilder::new(model)
        .backend(backend)
        .threads(base.threads())
        .experts(service)
        .build()?;
    run_text(&engine, tokens, ctx, &format!("{source:?}+{extra}"))?;
    let c = engine.experts.prediction().unwrap_or_default();
    Ok(PredictionRow {
        source,
        extra,
        predicted_per_token: top_k + extra,
        recall: c.recall(),
        precision: c.precision(),
    })
}
