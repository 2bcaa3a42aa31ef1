//! Subcommands, one file each. They live in the library so tests can drive them too.

pub mod bench;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod kv;
pub mod ppl;
pub mod quantize;
pub mod serve;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// Print an .emoe file's header, bytes per tensor class and expert-block layout.
    Inspect(inspect::InspectArgs),
    /// Write a model (a built-in one too) as a Hugging Face checkpoint directory.
    Export(export::ExportArgs),
}

/// Options every model-running command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory (Hugging Face layout), .gguf file or .emoe file; the built-in
    /// default model when omitted.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ModelArgs {
    pub fn engine(&self) -> anyhow::Result<crate::Engine> {
        let started = std::time::Instant::now();
        let model = crate::load_model(self.model.as_deref())?;
        eprintln!(
            "loaded {} ({:?}, {:.1} M params) in {:.2} s",
            model.source,
            model.config.arch,
            model.num_params() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        Ok(crate::Engine::new(
            std::sync::Arc::new(model),
            self.threads,
        )?)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Export(a) => export::run(a),
    }
}
