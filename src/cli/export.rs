//! `edgemoe export`: write any model edgemoe loads (a built-in one included) as a Hugging Face
//! checkpoint directory, for transformers or llama.cpp's converter. Progress on stderr, the
//! summary on stdout.

use crate::model::export::{self, ExportDtype};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Model to export: a checkpoint directory, an .emoe file or builtin:NAME.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (created when missing; files of the same names are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of model.safetensors (bf16 rounds to nearest even).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDtype,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = crate::load_model(Some(&a.model))?;
    eprintln!(
        "loaded {} ({}, {:.1} M params) in {:.2} s",
        model.source,
        model.config.arch.hf_name(),
        model.num_params() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "writing model.safetensors {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let writing = Instant::now();
    let summary = export::export(&model, &a.out, a.dtype, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let secs = writing.elapsed().as_secs_f64();
    println!(
        "exported {} to {}: {} tensors, {:.1} M params, model.safetensors {} bytes ({}) in {:.2} s ({:.0} MB/s); tokenizer.json {}",
        model.source,
        summary.dir.display(),
        summary.tensors,
        summary.params as f64 / 1e6,
        summary.safetensors_bytes,
        a.dtype.name(),
        secs,
        summary.safetensors_bytes as f64 / 1e6 / secs.max(1e-9),
        if summary.generated_tokenizer {
            "generated for the byte-level tokenizer (same ids)"
        } else {
            "from the model's tokenizer"
        }
    );
    Ok(())
}
