//! The library's typed errors. Each variant carries enough context (file, tensor, field) for one
//! clear line at the CLI edge; nothing here panics on data from outside the process.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with; each message is one line that names the file, tensor
/// or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The message carries the OS's reason; it is not also a `source`, or error chains
    // (`anyhow`'s `{:#}`) would print it twice.
    /// Reading or mapping a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        reason: std::io::Error,
    },

    /// A malformed safetensors file.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A malformed or unsupported GGUF file.
    #[error("{path}: GGUF: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A malformed .emoe file.
    #[error("{path}: not a valid .emoe file: {reason}")]
    Emoe {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A configuration field that is missing, malformed or out of range.
    #[error("{path}: config field `{field}`: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },

    /// A config.json naming an architecture edgemoe does not implement.
    #[error("{path}: unsupported architecture `{name}` (supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM, Glm4MoeForCausalLM, GptOssForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, OPTForCausalLM, LlamaForCausalLM)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture it names.
        name: String,
    },

    /// A tensor the configuration needs is not in the checkpoint.
    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor {
        /// The tensor.
        name: String,
    },

    /// A tensor whose shape disagrees with the configuration.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?} ({why})")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
        /// Which configuration values imply it.
        why: String,
    },

    /// A tensor stored in a type edgemoe does not read.
    #[error("tensor `{name}`: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
        /// Its stored type.
        dtype: String,
    },

    /// A tokenizer that cannot be read or used.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// An argument or request out of range.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A memory budget that cannot be met, or an allocation that failed.
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// The CUDA backend: no usable device, or a driver call that failed.
    #[error("cuda: {0}")]
    Cuda(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, reason: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            reason,
        }
    }

    /// An [`Error::Config`] naming `field` of `path`.
    pub fn config(path: impl Into<PathBuf>, field: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidInput`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidInput(reason.into())
    }
}
