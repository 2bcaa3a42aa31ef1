//! `edgemoe ppl`: perplexity of a text file with the GPTQ/SmoothQuant protocol; with a KV budget
//! scored decode-style, and with `--facts` the recall of the text's facts.

use super::ModelArgs;
use crate::engine::ppl::{score, score_against, Steps, PROTOCOL};
use crate::engine::recall::recall;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// With a KV budget, run one token per step (the exact decode path) instead of one
    /// observation window per step (the same evictions, faster).
    #[arg(long)]
    pub kv_exact: bool,
    /// File of fact strings, one per line: also report loss and top-1 rate on their first
    /// mention in each window and on their repeats.
    #[arg(long)]
    pub facts: Option<PathBuf>,
    /// A reference model (e.g. the f32 checkpoint a quantized one came from): also report the
    /// KL divergence of this model's next-token distributions from its, top-1 agreement and
    /// the reference's perplexity on the same windows (the reference runs with a full cache; a
    /// .gguf reference is decoded to f32, as `--gguf-f32` does).
    #[arg(long, value_name = "MODEL")]
    pub kl_ref: Option<PathBuf>,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

fn read_text(path: &PathBuf) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not valid UTF-8", path.display()))
}

pub fn run(a: PplArgs) -> anyhow::Result<()> {
    let text = read_text(&a.text)?;
    let facts: Option<Vec<String>> = match &a.facts {
        Some(p) => Some(
            read_text(p)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        ),
        None => None,
    };
    let options = a.kv.options()?;
    // One window's cache at a time.
    let engine = a.model.engine_for(|_| {
        Ok(crate::kv::KvDemand {
            options,
            reach: a.ctx,
            sequences: 1,
        })
    })?;
    let tokens = engine.model().tokenizer.encode(&text, false)?;
    eprintln!("protocol: {PROTOCOL}; ctx {}", a.ctx);
    let started = std::time::Instant::now();
    let steps = if a.kv_exact {
        Steps::TokenByToken
    } else {
        Steps::Chunked
    };
    let progress = |done, total| {
        // Progress only for a person watching: a log gets no carriage returns.
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\rwindow {done}/{total}");
        }
    };
    let (scored, divergence) = match &a.kl_ref {
        Some(path) => {
            // A GGUF reference is decoded to f32: its exact values, not int8 rows.
            let gguf = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            let reference = super::ModelArgs {
                model: Some(path.clone()),
                gguf_f32: gguf,
                ..a.model.clone()
            }
            .engine()?;
            let (s, d) = score_against(&engine, &reference, &tokens, a.ctx, steps, progress)?;
            (s, Some(d))
        }
        None => (score(&engine, &tokens, a.ctx, steps, progress)?, None),
    };
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(" ({seconds:.1} s)");
    let recall = match &facts {
        Some(f) => Some(recall(&engine.model().tokenizer, &tokens, &scored, f)?),
        None => None,
    };
    let result = &scored.result;
    if a.json {
        let mut v = serde_json::to_value(result)?;
        v["seconds"] = serde_json::json!(seconds);
        if let Some(r) = &recall {
            v["recall"] = serde_json::to_value(r)?;
        }
        if let Some(d) = &divergence {
            v["against_reference"] = serde_json::to_value(d)?;
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let kv = match result.kv_budget {
            Some(b) => format!("; KV {} at {b} tokens", result.kv_policy),
            None => String::new(),
        };
        println!(
            "ppl {:.4} over {} windows of {} tokens ({} tokens in the file){kv}",
            result.ppl, result.windows, result.ctx, result.tokens
        );
        if let Some(r) = &recall {
            println!(
                "facts: first mentions {} tokens, nll {:.3}, top-1 {:.3}; repeats {} tokens, nll {:.3}, top-1 {:.3}",
                r.first_tokens, r.first_nll, r.first_top1, r.repeat_tokens, r.repeat_nll, r.repeat_top1
            );
            println!(
                "facts greedy generation reproduces: {:.1}% of {} first mentions, {:.1}% of {} repeats",
                100.0 * r.first_reproduced,
                r.first_mentions,
                100.0 * r.repeat_reproduced,
                r.repeat_mentions
            );
        }
        if let Some(d) = &divergence {
            println!(
                "against the reference (ppl {:.4}, {:+.3}% ± {:.3}% by chance): KL mean {:.6} nats, p99 {:.5}, max {:.4}; same top-1 {:.2}%",
                d.reference_ppl,
                (result.ppl / d.reference_ppl - 1.0) * 100.0,
                d.delta_nll_se * 100.0,
                d.kl_mean,
                d.kl_p99,
                d.kl_max,
                d.top1_agree * 100.0
            );
        }
    }
    a.model.paging.report(&engine);
    Ok(())
}
