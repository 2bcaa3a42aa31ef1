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

/// Loads `path` (a checkpoint directory, a .gguf file, an .emoe file, or `builtin:NAME`), or the built-in
/// default model when `path` is `None`.
pub fn load_model(path: Option<&Path>) -> Result<Model> {
    match path {
        None => Ok(Model::builtin_default()),
        Some(p) => match p.to_str().and_then(|s| s.strip_prefix("builtin:")) {
            Some(name) => model::synthetic::builtin(name),
            None => Model::load(p),
        },
    }
}
pub mod cli;
