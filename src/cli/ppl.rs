//! `edgemoe ppl`: perplexity of a text file with the GPTQ/SmoothQuant protocol.

use super::ModelArgs;
use crate::engine::ppl::{perplexity, PROTOCOL};
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PplArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.text).with_context(|| format!("{}", a.text.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not valid UTF-8", a.text.display()))?;
    let engine = a.model.engine()?;
    let tokens = engine.model().tokenizer.encode(&text, false)?;
    eprintln!("protocol: {PROTOCOL}; ctx {}", a.ctx);
    let started = std::time::Instant::now();
    let result = perplexity(&engine, &tokens, a.ctx, |done, total| {
        // Progress only for a person watching: a log gets no carriage returns.
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\rwindow {done}/{total}");
        }
    })?;
    eprintln!(" ({:.1} s)", started.elapsed().as_secs_f64());
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "ppl {:.4} over {} windows of {} tokens ({} tokens in the file)",
            result.ppl, result.windows, result.ctx, result.tokens
        );
    }
    a.model.paging.report(&engine);
    Ok(())
}
