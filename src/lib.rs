//! edgemoe: run Mixture-of-Experts language models fast on machines with too little memory.
//!
//! Data flows one way: checkpoint → [`model::Model`] → [`engine::Engine`] (the forward pass over a
//! backend) → tokens → interface (CLI, serve, C ABI).

pub mod backend;
pub mod bench;
pub mod capi;
pub mod engine;
pub mod error;
pub mod experts;
pub mod kv;
pub mod model;
pub mod quant;
pub mod serve;
pub mod util;

pub use engine::Engine;
pub use error::{Error, Result};
pub use model::Model;

use std::path::Path;

/// The model loaded when none is named (`builtin:trained`): tests/fixtures/trained-moe, a
/// 3.9 M-parameter Mixtral trained on the King James Bible, so a first run prints readable text.
/// It is read from the source tree this binary was built from; the random models stay under
/// their own names (`builtin:default` and the benchmark shapes).
pub const TRAINED_MODEL_DIR: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trained-moe");

/// Loads `path` (a checkpoint directory, a .gguf file, an .emoe file, or `builtin:NAME`), or the
/// built-in trained model when `path` is `None`.
pub fn load_model(path: Option<&Path>) -> Result<Model> {
    match path.map(|p| (p, p.to_str().and_then(|s| s.strip_prefix("builtin:")))) {
        None | Some((_, Some("trained"))) => load_trained(),
        Some((_, Some(name))) => model::synthetic::builtin(name),
        Some((p, None)) => Model::load(p),
    }
}

fn load_trained() -> Result<Model> {
    let dir = Path::new(TRAINED_MODEL_DIR);
    if !dir.join("config.json").exists() {
        return Err(error::Error::invalid(format!(
            "the built-in trained model is read from {TRAINED_MODEL_DIR}, which is gone; pass --model (builtin:default is a random model that needs no files)"
        )));
    }
    let mut model = Model::load(dir)?;
    model.source = "builtin:trained".into();
    Ok(model)
}
pub mod cli;
