//! The library's typed errors. Each variant carries enough context (file, tensor, field) for one
//! clear line at the CLI edge; nothing here panics on data from outside the process.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The message carries the OS's reason; it is not also a `source`, or error chains
    // (`anyhow`'s `{:#}`) would print it twice.
    #[error("{path}: {reason}")]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: GGUF: {reason}")]
    Gguf { path: PathBuf, reason: String },

    #[error("{path}: not a valid .emoe file: {reason}")]
    Emoe { path: PathBuf, reason: String },

    #[error("{path}: config field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("{path}: unsupported architecture `{name}` (supported: MixtralForCausalLM, Qwen2MoeForCausalLM, OPTForCausalLM, LlamaForCausalLM)")]
    UnknownArchitecture { path: PathBuf, name: String },

    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor { name: String },

    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?} ({why})")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
        why: String,
    },

    #[error("tensor `{name}`: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// The CUDA backend: no usable device, or a driver call that failed.
    #[error("cuda: {0}")]
    Cuda(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, reason: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            reason,
        }
    }

    pub fn config(path: impl Into<PathBuf>, field: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    pub fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidInput(reason.into())
    }
}
