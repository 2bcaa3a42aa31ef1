//! `edgemoe bench`: llama-bench style sweeps. Comma lists sweep a parameter; every combination
//! runs `-r` times after a warm-up. Table on stdout (or `--json` / `--csv`), progress on stderr.

use super::ModelArgs;
use crate::bench::report::{self, ModelInfo};
use crate::bench::{run_point, BenchPoint};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory; the built-in default model when omitted.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Prompt lengths (prompt processing, ppN), comma separated.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "64"
    )]
    pub prompt: Vec<usize>,
    /// Generated tokens (tgN), comma separated.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "64"
    )]
    pub gen: Vec<usize>,
    /// Concurrent sequences decoded together, comma separated.
    #[arg(
        short = 'b',
        long = "batch",
        value_delimiter = ',',
        default_value = "1"
    )]
    pub batch: Vec<usize>,
    /// Worker threads, comma separated (0 = all cores).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub threads: Vec<usize>,
    /// Repetitions per combination.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    #[arg(long)]
    pub csv: bool,
    /// Quantize the loaded model in memory first (round-to-nearest W8A8, head included; use
    /// `edgemoe quantize` for calibrated methods).
    #[arg(long, value_parser = ["rtn"])]
    pub quant: Option<String>,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Also draw tokens/s against the swept parameter into this SVG file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.reps == 0 {
        anyhow::bail!("-r must be at least 1");
    }
    if a.batch.contains(&0) {
        anyhow::bail!("-b values must be at least 1");
    }
    let base = ModelArgs {
        model: a.model.clone(),
        threads: 0,
    };
    let mut model = crate::load_model(base.model.as_deref())?;
    if a.quant.is_some() {
        let mut opts = crate::quant::QuantOptions::new(crate::quant::Method::Rtn, &model);
        // Like llama.cpp's Q8_0 files, the output head is int8 too.
        opts.head = crate::quant::HeadQuant::W8A8;
        model = crate::quant::quantize(model, &[], 0, &opts, |_, _, _| {})?.0;
        // The f32 model is gone: the rows' peak RSS is the quantized model's, not its.
        crate::util::memory::reset_peak_rss();
    }
    let model = Arc::new(model);
    let info = ModelInfo::of(&model, if a.quant.is_some() { "cpu-w8a8" } else { "cpu" });
    let mut points = Vec::new();
    for &threads in &a.threads {
        for &batch in &a.batch {
            for &prompt in &a.prompt {
                for &gen in &a.gen {
                    points.push(BenchPoint {
                        threads,
                        batch,
                        prompt,
                        gen,
                    });
                }
            }
        }
    }
    let bar = indicatif::ProgressBar::new(points.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut results = Vec::new();
    for p in &points {
        let mut engine = crate::Engine::new(model.clone(), p.threads)?;
        a.kv.apply(&mut engine)?;
        let p = BenchPoint {
            threads: engine.threads(),
            ..p.clone()
        };
        bar.set_message(format!(
            "threads {} batch {} pp{} tg{} ×{}",
            p.threads, p.batch, p.prompt, p.gen, a.reps
        ));
        results.push(run_point(&engine, &p, a.reps)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::json(&info, &results))?
        );
    } else if a.csv {
        print!("{}", report::csv(&info, &results));
    } else {
        print!("{}", report::table(&info, &results));
    }
    if let Some(path) = &a.plot {
        report::plot(path, &results)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}
