//! `edgemoe serve`: JSON lines over stdin/stdout (see `crate::serve`). Logs go to stderr.

use super::ModelArgs;
use crate::serve::{serve, ServeOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Most requests decoded together in one step (at least 1).
    #[arg(long = "max-batch", default_value_t = 16, value_parser = batch_size)]
    pub max_batch: usize,
}

fn batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a batch size from 1 to 4096")),
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let mut engine = a.model.engine()?;
    a.kv.apply(&mut engine)?;
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
