//! `edgemoe serve`: JSON lines over stdin/stdout (see `crate::serve`). Logs go to stderr.

use super::ModelArgs;
use crate::serve::{serve, ServeOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Most requests decoded together in one step.
    #[arg(long = "max-batch", default_value_t = 16)]
    pub max_batch: usize,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let engine = a.model.engine()?;
    let stdin = std::io::BufReader::new(std::io::stdin());
    serve(
        &engine,
        stdin,
        std::io::stdout().lock(),
        &ServeOptions {
            max_batch: a.max_batch,
        },
    )?;
    Ok(())
}
