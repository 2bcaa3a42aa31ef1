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

pub use backend::BackendChoice;
pub use engine::{Engine, EngineBuilder};
pub use error::{Error, Result};
pub use model::Model;

use std::path::Path;

/// Loads `path` (a checkpoint directory, a .gguf file, an .emoe file, or `builtin:NAME`), or the
/// built-in trained model when `path` is `None`. `builtin:trained` (the default) is embedded in
/// the binary (see [`model::embedded`]); the random models go by their own names
/// (`builtin:default` and the benchmark shapes).
pub fn load_model(path: Option<&Path>) -> Result<Model> {
    match path.map(|p| (p, p.to_str().and_then(|s| s.strip_prefix("builtin:")))) {
        None | Some((_, Some("trained"))) => model::embedded::load(),
        Some((_, Some(name))) => model::synthetic::builtin(name),
        Some((p, None)) => Model::load(p),
    }
}
pub mod cli;
