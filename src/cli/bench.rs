//! `edgemoe bench`: llama-bench style sweeps. Comma lists sweep a parameter; every combination
//! runs `-r` times after a warm-up. Table on stdout (or `--json` / `--csv`), progress on stderr.

use crate::bench::report::{self, ModelInfo};
use crate::bench::{run_point, BenchPoint};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory, .gguf or .emoe file, or builtin:NAME; the random builtin:default
    /// model when omitted.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Where the model runs (auto: the GPU when this build has CUDA and a device exists).
    #[arg(long, value_enum, default_value_t = crate::backend::BackendChoice::Auto)]
    pub backend: crate::backend::BackendChoice,
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
    /// Print the results as one JSON object.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the results as CSV.
    #[arg(long)]
    pub csv: bool,
    /// Quantize the loaded model in memory first (round-to-nearest W8A8, head included; use
    /// `edgemoe quantize` for calibrated methods).
    #[arg(long, value_parser = ["rtn"])]
    pub quant: Option<String>,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Also measure this machine's memory read bandwidth (a 1 GiB buffer streamed by the sweep's
    /// largest thread count) and print it beside the decode figures: the roofline a decode
    /// step's bytes per token sets.
    #[arg(long)]
    pub membw: bool,
    /// Also draw tokens/s into this SVG file: a panel per test kind and swept parameter.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// Memory budgets to sweep (comma separated, e.g. 600M,50%): pages an .emoe's experts
    /// and reports hit rate, stall per token and decode tokens/s per budget × policy.
    #[arg(long, value_delimiter = ',')]
    pub mem: Vec<crate::experts::budget::MemBudget>,
    /// Expert policies to sweep with --mem.
    #[arg(
        long = "expert-policy",
        value_enum,
        value_delimiter = ',',
        default_value = "stats"
    )]
    pub expert_policy: Vec<crate::experts::pager::Policy>,
    /// Prefetch settings to sweep with --mem (on, off).
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = ["on", "off"])]
    pub prefetch: Vec<String>,
    /// Activation-path statistics to start from (`edgemoe profile --out`).
    #[arg(long)]
    pub profile: Option<std::path::PathBuf>,
    /// Experts predicted per token beyond top-k (with --mem).
    #[arg(long = "predict-extra", default_value_t = 0)]
    pub predict_extra: usize,
    /// I/O threads that prefetch (with --mem).
    #[arg(long = "io-threads", default_value_t = 2)]
    pub io_threads: usize,
    /// GPU expert tier budgets to sweep (comma separated, e.g. 100%,40%,8G; needs the cuda
    /// feature): prefill and decode tokens/s and the tier's counters per budget × placement.
    #[arg(long = "gpu-mem", value_delimiter = ',')]
    pub gpu_mem: Vec<crate::experts::budget::MemBudget>,
    /// Placements to sweep with --gpu-mem.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub placement: Vec<crate::experts::tier::Placement>,
}

/// Sequences one point may decode together (serve's --max-batch limit).
const MAX_BATCH: usize = 4096;

/// Every -p + -n must fit the model's context: a longer sequence is outside what the model
/// was made for (generate and serve refuse it) and its KV cache is allocated up front
/// (`-p 99999999` once aborted on a 102 GB allocation).
fn check_context(a: &BenchArgs, model: &crate::Model) -> anyhow::Result<()> {
    let context = model.config.max_position_embeddings;
    for &p in &a.prompt {
        for &n in &a.gen {
            let tokens = p.max(1).saturating_add(n);
            if tokens > context {
                anyhow::bail!(
                    "-p {p} -n {n} is {tokens} tokens, past the model's context of {context}"
                );
            }
        }
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.reps == 0 {
        anyhow::bail!("-r must be at least 1");
    }
    if a.batch.contains(&0) {
        anyhow::bail!("-b values must be at least 1");
    }
    // As serve's --max-batch: every sequence gets a KV cache up front.
    if let Some(b) = a.batch.iter().find(|&&b| b > MAX_BATCH) {
        anyhow::bail!("-b {b}: at most {MAX_BATCH} sequences");
    }
    // Found out now, not after the whole sweep has run.
    if let Some(plot) = &a.plot {
        anyhow::ensure!(
            super::output_dir(plot).is_dir() && !plot.is_dir(),
            "--plot {}: not a file in an existing directory",
            plot.display()
        );
    }
    // Sweeps default to the random model, whose figures do not depend on any file.
    let path = a
        .model
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("builtin:default"));
    let mut model = crate::load_model(Some(&path))?;
    if a.quant.is_some() {
        let mut opts = crate::quant::QuantOptions::new(crate::quant::Method::Rtn, &model);
        // Like llama.cpp's Q8_0 files, the output head is int8 too.
        opts.head = crate::quant::HeadQuant::W8A8;
        model = crate::quant::quantize(model, &[], 0, &opts, |_, _, _| {})?.0;
        // The f32 model is gone: the rows' peak RSS is the quantized model's, not its.
        crate::util::memory::reset_peak_rss();
    }
    // Every engine of the sweep shares the model: prepared once, before it is shared.
    crate::backend::prepare_model(&mut model, a.backend);
    let model = Arc::new(model);
    check_context(&a, &model)?;
    if !a.gpu_mem.is_empty() {
        return run_tier(&a, model);
    }
    if !a.mem.is_empty() {
        return run_paging(&a, model);
    }
    let info = ModelInfo::of(&model);
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
        let engine = crate::EngineBuilder::new(model.clone())
            .backend(a.backend)
            .threads(p.threads)
            .kv_options(a.kv.options()?)
            .build()?;
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
    // Measured after the runs, with the model's pages already resident, so it competes with
    // nothing; its buffer is freed before anything prints.
    let bandwidth = a.membw.then(|| {
        let threads = results.iter().map(|r| r.point.threads).max().unwrap_or(1);
        (
            threads,
            crate::util::membw::read_bandwidth_gbs(1 << 30, threads, 5),
        )
    });
    if a.json {
        let mut doc = report::json(&info, &results);
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("cpu_kernels".into(), crate::backend::cpu::kernel_tiers());
            if let Some((threads, gbs)) = bandwidth {
                obj.insert(
                    "read_bandwidth".into(),
                    serde_json::json!({"threads": threads, "gb_per_s": gbs}),
                );
            }
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if a.csv {
        print!("{}", report::csv(&info, &results));
    } else {
        print!("{}", report::table(&info, &results));
        if let Some((threads, gbs)) = bandwidth {
            print!("{}", report::roofline(&results, threads, gbs));
        }
    }
    if let Some(path) = &a.plot {
        report::plot(path, &results)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// `--mem`: one paged engine per budget × policy × prefetch setting.
fn run_paging(a: &BenchArgs, model: Arc<crate::Model>) -> anyhow::Result<()> {
    use crate::bench::paging::{plot, run_paged, table};
    let prompt = a.prompt.first().copied().unwrap_or(16);
    let gen = a.gen.first().copied().unwrap_or(32);
    let mut rows = Vec::new();
    for &mem in &a.mem {
        for &policy in &a.expert_policy {
            for pf in &a.prefetch {
                let paging = super::paging::PagingArgs {
                    mem: Some(mem),
                    expert_policy: policy,
                    no_prefetch: pf == "off",
                    profile: a.profile.clone(),
                    predict_extra: a.predict_extra,
                    io_threads: a.io_threads,
                    ..super::paging::PagingArgs::default()
                };
                // One sequence of prompt + gen tokens.
                let kv = crate::kv::KvDemand {
                    options: a.kv.options()?,
                    reach: prompt.max(1) + gen,
                    sequences: 1,
                };
                let builder = crate::EngineBuilder::new(model.clone())
                    .backend(a.backend)
                    .threads(a.threads.first().copied().unwrap_or(0))
                    .kv_demand(kv);
                let engine = paging.build(builder)?;
                let row = run_paged(&engine, policy, pf == "on", prompt, gen, a.reps)?;
                eprintln!("{}", super::paging::stats_line(&engine));
                rows.push(row);
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    if let Some(path) = &a.plot {
        plot(path, &rows)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// `--gpu-mem`: one engine with the GPU expert tier per budget × placement.
fn run_tier(a: &BenchArgs, model: Arc<crate::Model>) -> anyhow::Result<()> {
    use crate::bench::tier::{run_tiered, table};
    if !a.mem.is_empty() {
        anyhow::bail!("bench sweeps --gpu-mem or --mem, not both at once");
    }
    let prompt = a.prompt.first().copied().unwrap_or(64);
    let gen = a.gen.first().copied().unwrap_or(64);
    let mut rows = Vec::new();
    for &mem in &a.gpu_mem {
        for &placement in &a.placement {
            let kv = crate::kv::KvDemand {
                options: a.kv.options()?,
                reach: prompt.max(1) + gen,
                sequences: 1,
            };
            let engine = crate::EngineBuilder::new(model.clone())
                .backend(a.backend)
                .threads(a.threads.first().copied().unwrap_or(0))
                .kv_demand(kv)
                .device_tier(crate::engine::builder::DeviceTierOptions {
                    mem,
                    placement,
                    prefetch: true,
                })
                .build()?;
            let label = match mem {
                crate::experts::budget::MemBudget::Bytes(b) => crate::experts::budget::human(b),
                crate::experts::budget::MemBudget::Percent(p) => format!("{p}%"),
            };
            rows.push(run_tiered(&engine, label, placement, prompt, gen, a.reps)?);
            eprintln!("{}", super::paging::stats_line(&engine));
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}
