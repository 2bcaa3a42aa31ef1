//! Subcommands, one file each. They live in the library so tests can drive them too.

pub(crate) mod bench;
pub(crate) mod export;
pub(crate) mod generate;
pub(crate) mod inspect;
pub(crate) mod kv;
pub(crate) mod paging;
pub(crate) mod ppl;
pub(crate) mod profile;
pub(crate) mod quantize;
pub(crate) mod serve;
pub(crate) mod synth;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// The folder an output file goes into (`.` for a bare file name).
pub fn output_dir(out: &Path) -> &Path {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "edgemoe",
    version,
    about = "Run Mixture-of-Experts language models fast on small machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for a prompt.
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file (GPTQ/SmoothQuant protocol: non-overlapping windows).
    Ppl(ppl::PplArgs),
    /// Latency/throughput sweeps (llama-bench style).
    Bench(bench::BenchArgs),
    /// Quantize a checkpoint to W8A8 (SmoothQuant + GPTQ) into an .emoe store.
    Quantize(quantize::QuantizeArgs),
    /// Serve completions as JSON lines over stdin/stdout, with continuous batching.
    Serve(serve::ServeArgs),
    /// Activation-path statistics (expert choices, layer-to-layer transitions) of a text.
    Profile(profile::ProfileArgs),
    /// Write a synthetic W8A8 MoE .emoe with trained-like (skewed, correlated) routing.
    SynthMoe(synth::SynthArgs),
    /// Print an .emoe file's header, bytes per tensor class and expert-block layout.
    Inspect(inspect::InspectArgs),
    /// Write a model (a built-in one too) as a Hugging Face checkpoint directory.
    Export(export::ExportArgs),
}

/// Options every model-running command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json),
    /// a .gguf file, an .emoe file, or a built-in one (builtin:trained, a small model trained on
    /// the KJV Bible, the default; random ones: builtin:default, builtin:mixtral-bench,
    /// builtin:mixtral-1g, builtin:smol-moe).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A .gguf's quantized matrices (Q4_K, Q8_0, …) decoded to f32 at load, exactly the
    /// file's values, instead of converted to weight-only int8 rows (the default, which holds
    /// no f32 copy of the model): the reference that quantization is measured against.
    #[arg(long = "gguf-f32")]
    pub gguf_f32: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where the model runs: the GPU when this build has CUDA and a device exists (auto).
    #[arg(long, value_enum, default_value_t = crate::backend::BackendChoice::Auto)]
    pub backend: crate::backend::BackendChoice,
    #[command(flatten)]
    pub paging: paging::PagingArgs,
    /// GPU memory for everything edgemoe allocates there (non-expert weights, KV caches and
    /// workspaces first, the rest expert slots): a size (8G) or a percentage of the model's
    /// weight bytes. Routed experts not on the GPU are fetched or run on the CPU (--placement).
    #[arg(long = "gpu-mem")]
    pub gpu_mem: Option<crate::experts::budget::MemBudget>,
    /// Where a routed expert that is not on the GPU runs (with --gpu-mem): a cost model of
    /// measured copy and compute rates decides (auto), every miss is copied (gpu), or every
    /// miss runs on the CPU's int8 kernels beside the GPU (cpu).
    #[arg(long, value_enum, default_value_t = crate::experts::tier::Placement::Auto, requires = "gpu_mem")]
    pub placement: crate::experts::tier::Placement,
}

impl ModelArgs {
    /// The engine for a run whose KV caches need no particular room (one sequence, full cache).
    pub fn engine(&self) -> anyhow::Result<crate::Engine> {
        self.engine_for(|_| Ok(crate::kv::KvDemand::default()))
    }

    /// The engine with `kv`'s options (found from the loaded model, e.g. a prompt's length), its
    /// caches counted against `--mem`.
    pub fn engine_for(
        &self,
        kv: impl FnOnce(&crate::Model) -> anyhow::Result<crate::kv::KvDemand>,
    ) -> anyhow::Result<crate::Engine> {
        let started = std::time::Instant::now();
        let model = match self.model.as_deref() {
            Some(p) if self.gguf_f32 => {
                let is_gguf = p
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                anyhow::ensure!(
                    is_gguf,
                    "--gguf-f32 is for .gguf files, not {}",
                    p.display()
                );
                crate::Model::load_f32(p)?
            }
            path => crate::load_model(path)?,
        };
        eprintln!(
            "loaded {} ({}, {:.1} M params) in {:.2} s",
            model.source,
            model.config.arch.hf_name(),
            model.num_params() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        let demand = kv(&model)?;
        let builder = crate::EngineBuilder::new(std::sync::Arc::new(model))
            .backend(self.backend)
            .threads(self.threads)
            .kv_demand(demand);
        let builder = match self.gpu_mem {
            Some(mem) => builder.device_tier(crate::engine::builder::DeviceTierOptions {
                mem,
                placement: self.placement,
                prefetch: true,
            }),
            None => builder,
        };
        self.paging.build(builder)
    }
}

/// The parser, with every option that takes a value taking a negative number as its value
/// (`--temp -1` is then a range error naming the option, not "unexpected argument '-1'").
pub fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    negatives(<Cli as clap::CommandFactory>::command())
}

/// Parses the process's arguments with [`command`].
pub fn parse() -> Cli {
    let matches = command().get_matches();
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Profile(a) => profile::run(a),
        Command::SynthMoe(a) => synth::run(a),
        Command::Export(a) => export::run(a),
    }
}
