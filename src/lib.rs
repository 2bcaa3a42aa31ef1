//! edgemoe: run Mixture-of-Experts language models fast on machines with too little memory.
//!
//! Data flows one way: checkpoint → [`Model`] → [`Engine`] (the forward pass over a backend) →
//! tokens → interface (CLI, HTTP server, C ABI).
//!
//! # The Rust API
//!
//! The items at the crate root are the supported surface:
//!
//! - [`load_model`]: a checkpoint directory, a .gguf or .emoe file, or a built-in model (the
//!   default, `builtin:trained`, is embedded in the library).
//! - [`EngineBuilder`] → [`Engine`]: backend ([`BackendChoice`]), threads, KV cache options
//!   ([`KvOptions`]), expert paging under a memory budget ([`PagingOptions`]).
//! - [`Engine::stream`]: a completion ([`GenerateRequest`], [`SamplingParams`]) as an iterator
//!   of text pieces ([`TokenStream`]); [`generate`] is the same with a callback.
//! - [`HttpServer`]: the OpenAI-compatible HTTP server, embedded in a program.
//!
//! ```no_run
//! use edgemoe::{EngineBuilder, GenerateRequest, SamplingParams};
//! let model = std::sync::Arc::new(edgemoe::load_model(None)?);
//! let engine = EngineBuilder::new(model).build()?;
//! let req = GenerateRequest {
//!     prompt: "And God said".into(),
//!     max_tokens: 30,
//!     sampling: SamplingParams::default(),
//!     stop: vec![],
//! };
//! for piece in engine.stream(&req)? {
//!     print!("{}", piece?);
//! }
//! # Ok::<(), edgemoe::Error>(())
//! ```
//!
//! The modules are the implementation: public because the `edgemoe` binary, the tests and the
//! benchmarks reach into them, hidden from these docs, and free to change between versions.
//! The C ABI is documented by include/edgemoe.h.

#![warn(missing_docs)]

#[doc(hidden)]
#[allow(missing_docs)]
pub mod backend;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod bench;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod capi;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod cli;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod engine;
mod error;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod experts;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod kv;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod model;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod quant;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod serve;
#[doc(hidden)]
#[allow(missing_docs)]
pub mod util;

pub use backend::BackendChoice;
pub use engine::generation::{generate, FinishReason, GenerateOutput, GenerateRequest};
pub use engine::sampling::SamplingParams;
pub use engine::stream::TokenStream;
pub use engine::{Engine, EngineBuilder};
pub use error::{Error, Result};
pub use experts::budget::MemBudget;
pub use experts::PagingOptions;
pub use kv::{Budget as KvBudget, KvOptions, Policy as KvPolicy};
pub use model::Model;
pub use serve::http::{HttpOptions, HttpServer};

use std::path::Path;

/// Loads `path` (a checkpoint directory, a .gguf file, an .emoe file, or `builtin:NAME`), or the
/// built-in trained model when `path` is `None`. `builtin:trained` (the default, a 3.9 M-parameter
/// Mixtral trained on the King James Bible) is embedded in the library as bf16; the random models
/// go by their own names (`builtin:default` and the benchmark shapes `builtin:mixtral-bench`,
/// `builtin:mixtral-1g`, `builtin:smol-moe`).
pub fn load_model(path: Option<&Path>) -> Result<Model> {
    match path.map(|p| (p, p.to_str().and_then(|s| s.strip_prefix("builtin:")))) {
        None | Some((_, Some("trained"))) => model::embedded::load(),
        Some((_, Some(name))) => model::synthetic::builtin(name),
        Some((p, None)) => Model::load(p),
    }
}
