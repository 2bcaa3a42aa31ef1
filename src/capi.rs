//! The C ABI, in the manner of llama.h: opaque handles with create/free pairs, a default-params
//! function for each options struct, integer return codes and a per-thread last-error string.
//!
//! `include/edgemoe.h` is generated from this file by cbindgen (config: `cbindgen.toml`) and checked
//! in; `tests/capi_header.rs` fails when it is stale. Every exported item lives in this file so the
//! generator reads only it; the machinery (handle registry, panic guard, buffers) is in
//! `capi/support.rs`. Every entry point runs inside `support::guard`, so no panic crosses the boundary.

#![deny(unsafe_op_in_unsafe_fn)]

mod kv_params;
mod support;

use crate::engine::generation::{generate, FinishReason, GenerateRequest};
use crate::engine::sampling::SamplingParams;
use crate::error::Error;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use support::{fail, guard, out_ref, out_slice, read_str, write_text, CResult, Failure, Session};

/// Success.
pub const EDGEMOE_OK: c_int = 0;
/// A required pointer argument (or handle) was NULL.
pub const EDGEMOE_ERR_NULL_ARG: c_int = 1;
/// The handle was already freed, or was not returned by this library.
pub const EDGEMOE_ERR_INVALID_HANDLE: c_int = 2;
/// The model could not be loaded (missing files, bad config, bad weights).
pub const EDGEMOE_ERR_LOAD: c_int = 3;
/// An argument was out of range, a string was not UTF-8, or a token id was outside the vocabulary.
pub const EDGEMOE_ERR_INVALID_INPUT: c_int = 4;
/// The output buffer was too small: what fits was written and `*n_out` holds the size needed.
pub const EDGEMOE_ERR_BUFFER_TOO_SMALL: c_int = 5;
/// Generation was stopped by `edgemoe_session_cancel`; the text so far was written.
pub const EDGEMOE_ERR_CANCELLED: c_int = 6;
/// The session is in use by another call (another thread, or its own callback).
pub const EDGEMOE_ERR_BUSY: c_int = 7;
/// An internal error (a Rust panic) was caught at the boundary.
pub const EDGEMOE_ERR_PANIC: c_int = 8;
/// Any other internal failure (e.g. worker threads could not be started).
pub const EDGEMOE_ERR_INTERNAL: c_int = 9;

/// A loaded model: immutable, so any number of threads may use one model handle at once.
/// Sessions keep their model alive, so models and sessions may be freed in any order.
pub struct EdgemoeModel {
    _opaque: [u8; 0],
}

/// A generation session over a model, with its own worker threads. One thread at a time:
/// a call on a session that is busy returns EDGEMOE_ERR_BUSY (edgemoe_session_cancel excepted).
pub struct EdgemoeSession {
    _opaque: [u8; 0],
}

/// Options for edgemoe_model_load; start from edgemoe_model_default_params().
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EdgemoeModelParams {
    /// Reserved for backend and expert-memory options; must stay zero, as the defaults set it.
    pub reserved: [u64; 8],
}

/// kv_policy: lazy with a KV budget, full without (as the CLI's default).
pub const EDGEMOE_KV_POLICY_DEFAULT: c_int = 0;
/// kv_policy: keep every token (no budget may be set).
pub const EDGEMOE_KV_POLICY_FULL: c_int = 1;
/// kv_policy: StreamingLLM, the sink tokens and the most recent ones.
pub const EDGEMOE_KV_POLICY_WINDOW: c_int = 2;
/// kv_policy: H2O, heavy hitters by accumulated attention plus the most recent.
pub const EDGEMOE_KV_POLICY_H2O: c_int = 3;
/// kv_policy: LazyEviction, by time since the last significant attention over the longest
/// recurrence interval.
pub const EDGEMOE_KV_POLICY_LAZY: c_int = 4;

/// kv_granularity: a layer evicts as a whole (a slot holds every KV head of its token).
pub const EDGEMOE_KV_GRANULARITY_LAYER: c_int = 0;
/// kv_granularity: each KV head of a layer keeps its own tokens, ranked by its own query
/// heads' attention (CPU backend only).
pub const EDGEMOE_KV_GRANULARITY_HEAD: c_int = 1;

/// Options for edgemoe_session_new; start from edgemoe_session_default_params().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgemoeSessionParams {
    /// Worker threads for this session's forward pass, at most 1024 and at most 4 per core (or
    /// 16); 0 means one per core.
    pub n_threads: u32,
    /// Memory budget in bytes for everything the session keeps resident (weights, expert
    /// cache, KV cache, workspaces); an .emoe's experts are then paged through a cache sized
    /// from it. 0 means unlimited (experts used in place). The KV part is one sequence of the
    /// model's context, or of the KV budget when one is set.
    pub mem_bytes: u64,
    /// KV-cache budget per layer of a generation, in tokens; 0 means none. At most one of
    /// kv_budget_tokens and kv_budget_percent may be set.
    pub kv_budget_tokens: u32,
    /// KV-cache budget as a percentage in (0, 100] of the tokens a generation reaches (prompt
    /// plus max_tokens); 0 means none.
    pub kv_budget_percent: f32,
    /// Which tokens survive eviction: one of EDGEMOE_KV_POLICY_*.
    pub kv_policy: c_int,
    /// Observation window W in decode steps (eviction runs once per window and the last W
    /// tokens are kept); at least 1. Default 64.
    pub kv_window: u32,
    /// Attention-sink tokens (the first ones) every policy keeps. Default 4.
    pub kv_sinks: u32,
    /// lazy: a token's attention at a step is significant above this many times the uniform
    /// share, averaged over the heads (per KV head: over its query heads); finite and > 0, or
    /// 0 for the granularity's default (8 for LAYER, 16 for HEAD). Default 8.
    pub kv_threshold: f32,
    /// GPU memory in bytes for the GPU expert tier (non-expert weights, KV, workspaces, the
    /// rest expert slots); 0 means none (the session runs on the CPU). Needs a build with the
    /// `cuda` feature and a GPU; otherwise edgemoe_session_new fails with
    /// EDGEMOE_ERR_INVALID_INPUT naming why.
    pub gpu_mem_bytes: u64,
    /// What one eviction decision covers: one of EDGEMOE_KV_GRANULARITY_*. Default LAYER.
    pub kv_granularity: c_int,
}

impl Default for EdgemoeSessionParams {
    fn default() -> Self {
        let kv = crate::kv::KvOptions::default();
        EdgemoeSessionParams {
            n_threads: 0,
            mem_bytes: 0,
            kv_budget_tokens: 0,
            kv_budget_percent: 0.0,
            kv_policy: EDGEMOE_KV_POLICY_DEFAULT,
            kv_window: kv.window as u32,
            kv_sinks: kv.sinks as u32,
            kv_threshold: kv.threshold,
            gpu_mem_bytes: 0,
            kv_granularity: EDGEMOE_KV_GRANULARITY_LAYER,
        }
    }
}

/// Options for edgemoe_generate; start from edgemoe_generate_default_params().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgemoeGenerateParams {
    /// Tokens to generate at most (an end-of-sequence token stops earlier).
    pub max_tokens: u32,
    /// Sampling temperature, finite and >= 0; 0 is greedy (always the most likely token).
    pub temperature: f32,
    /// Sample among the K most likely tokens; 0 disables.
    pub top_k: u32,
    /// Sample among the fewest tokens holding this much probability, in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Seed of the sampler; the same seed and options reproduce a completion exactly.
    pub seed: u64,
}

/// Receives each piece of generated text as it becomes final (never half a UTF-8 character):
/// `len` bytes at `piece`, followed by a NUL, valid only during the call. Return 0 to go on,
/// non-zero to stop (edgemoe_generate then returns EDGEMOE_OK). It runs on the thread that
/// called edgemoe_generate and must not unwind or longjmp out.
pub type EdgemoeTokenCallback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> c_int>;

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
/// Session threads beyond this are surely a mistake (rayon would start them all at once).
const MAX_THREADS: u32 = 1024;

impl Default for EdgemoeGenerateParams {
    fn default() -> Self {
        let s = SamplingParams::default();
        EdgemoeGenerateParams {
            max_tokens: 64,
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: s.top_p,
            seed: s.seed,
        }
    }
}

// Handles are registry ids carried in pointer types; they are never dereferenced.
fn handle<T>(id: usize) -> *mut T {
    std::ptr::without_provenance_mut(id)
}

/// The library version, e.g. "0.1.0". Static; never NULL.
#[no_mangle]
pub extern "C" fn edgemoe_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// The message of the last failed call on this thread ("" if none). Never NULL; valid until the
/// next edgemoe_* call on this thread.
#[no_mangle]
pub extern "C" fn edgemoe_last_error() -> *const c_char {
    support::last_error_ptr()
}

/// The default model options.
#[no_mangle]
pub extern "C" fn edgemoe_model_default_params() -> EdgemoeModelParams {
    EdgemoeModelParams::default()
}

/// The default session options: one worker thread per core, no memory budget, no KV budget
/// (the KV window, sinks and threshold at the CLI's defaults).
#[no_mangle]
pub extern "C" fn edgemoe_session_default_params() -> EdgemoeSessionParams {
    EdgemoeSessionParams::default()
}

/// The default generation options: greedy, at most 64 tokens.
#[no_mangle]
pub extern "C" fn edgemoe_generate_default_params() -> EdgemoeGenerateParams {
    EdgemoeGenerateParams::default()
}

/// Loads the Hugging Face checkpoint directory at `path` (UTF-8); NULL or "" loads the built-in
/// trained model (builtin:trained). `params` may be NULL for the defaults. On success `*out` is the new model; on
/// failure it is NULL and the code is EDGEMOE_ERR_LOAD (or an argument error).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or points to an
/// EdgemoeModelParams; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_model_load(
    path: *const c_char,
    params: *const EdgemoeModelParams,
    out: *mut *mut EdgemoeModel,
) -> c_int {
    guard(|| {
        // SAFETY: `out` is NULL or writable (the contract above).
        let out = unsafe { out_ref(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: `params` is NULL or points to an EdgemoeModelParams.
        let params = unsafe { params.as_ref() }.copied().unwrap_or_default();
        if params.reserved.iter().any(|&r| r != 0) {
            return fail(
                EDGEMOE_ERR_INVALID_INPUT,
                "EdgemoeModelParams.reserved must be zero (start from edgemoe_model_default_params)",
            );
        }
        let path = if path.is_null() {
            None
        } else {
            // SAFETY: non-NULL, so a NUL-terminated string by the contract above.
            Some(unsafe { read_str(path, "path") }?).filter(|p| !p.is_empty())
        };
        let mut model = crate::load_model(path.map(Path::new)).map_err(|e| Failure {
            code: EDGEMOE_ERR_LOAD,
            message: e.to_string(),
        })?;
        // Its sessions share it: prepared for the CPU once, before it is shared.
        crate::backend::prepare_model(&mut model, crate::BackendChoice::Auto);
        *out = handle(support::register_model(Arc::new(model)));
        Ok(())
    })
}

/// Frees a model. Sessions made from it stay usable (they hold the weights until freed).
/// NULL is a no-op, as with free(); a freed or unknown handle gives EDGEMOE_ERR_INVALID_HANDLE.
#[no_mangle]
pub extern "C" fn edgemoe_model_free(model: *mut EdgemoeModel) -> c_int {
    guard(|| {
        if !model.is_null() {
            support::unregister_model(model.addr())?;
        }
        Ok(())
    })
}

/// Writes the model's vocabulary size (the number of logits per token) to `*n_vocab`.
///
/// # Safety
/// `n_vocab` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_model_vocab_size(
    model: *const EdgemoeModel,
    n_vocab: *mut usize,
) -> c_int {
    guard(|| {
        let model = support::model(model.addr())?;
        // SAFETY: `n_vocab` is NULL or writable.
        *unsafe { out_ref(n_vocab, "n_vocab") }? = model.config.vocab_size;
        Ok(())
    })
}

/// Creates a session over `model`; `params` may be NULL for the defaults.
///
/// # Safety
/// `params` is NULL or points to an EdgemoeSessionParams; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_session_new(
    model: *const EdgemoeModel,
    params: *const EdgemoeSessionParams,
    out: *mut *mut EdgemoeSession,
) -> c_int {
    guard(|| {
        // SAFETY: `out` is NULL or writable.
        let out = unsafe { out_ref(out, "out") }?;
        *out = std::ptr::null_mut();
        let model = support::model(model.addr())?;
        // SAFETY: `params` is NULL or points to an EdgemoeSessionParams.
        let params = unsafe { params.as_ref() }.copied().unwrap_or_default();
        if params.n_threads > MAX_THREADS {
            return fail(
                EDGEMOE_ERR_INVALID_INPUT,
                format!("n_threads is {}; at most {MAX_THREADS}", params.n_threads),
            );
        }
        // More than the machine takes is the caller's argument, not an internal failure.
        crate::backend::cpu::backend::worker_threads(params.n_threads as usize).map_err(|e| {
            Failure {
                code: EDGEMOE_ERR_INVALID_INPUT,
                message: format!("n_threads: {e}"),
            }
        })?;
        let kv = kv_params::kv_options(&params)?;
        let mut builder = crate::EngineBuilder::new(model.clone())
            .backend(crate::BackendChoice::Cpu)
            .threads(params.n_threads as usize)
            // A session runs one generation at a time, of any length the context allows.
            .kv_demand(crate::kv::KvDemand {
                options: kv,
                ..crate::kv::KvDemand::default()
            });
        if params.gpu_mem_bytes > 0 {
            builder = builder.backend(crate::BackendChoice::Cuda).device_tier(
                crate::engine::builder::DeviceTierOptions {
                    mem: crate::experts::budget::MemBudget::Bytes(params.gpu_mem_bytes),
                    placement: crate::experts::tier::Placement::Auto,
                    prefetch: true,
                },
            );
        }
        if params.mem_bytes > 0 {
            builder = builder.paging(crate::experts::PagingOptions::with_budget(
                crate::experts::budget::MemBudget::Bytes(params.mem_bytes),
            ));
        }
        // The thread count and KV options were checked above, so what can still fail is the
        // budget (the caller's input) or starting the worker threads (an internal failure).
        let engine = builder.build().map_err(|e| Failure {
            code: if params.mem_bytes > 0 || params.gpu_mem_bytes > 0 {
                EDGEMOE_ERR_INVALID_INPUT
            } else {
                EDGEMOE_ERR_INTERNAL
            },
            message: e.to_string(),
        })?;
        *out = handle(support::register_session(Session::new(engine)));
        Ok(())
    })
}

/// Frees a session. NULL is a no-op; a freed or unknown handle gives EDGEMOE_ERR_INVALID_HANDLE.
/// Should a call still be running on it on another thread (which the threading rule forbids),
/// that call is cancelled and the session's memory is released when it returns.
#[no_mangle]
pub extern "C" fn edgemoe_session_free(session: *mut EdgemoeSession) -> c_int {
    guard(|| {
        if !session.is_null() {
            let s = support::unregister_session(session.addr())?;
            s.cancel.store(true, Ordering::Release);
        }
        Ok(())
    })
}

/// Changes the memory budget of a session created with `mem_bytes` > 0 to `mem_bytes`: the
/// expert cache shrinks or grows at once, under a generation running on another thread too
/// (nothing restarts). Too small a budget gives EDGEMOE_ERR_INVALID_INPUT (the message names
/// the smallest workable value) and leaves the cache as it was.
#[no_mangle]
pub extern "C" fn edgemoe_session_set_mem(session: *mut EdgemoeSession, mem_bytes: u64) -> c_int {
    guard(|| {
        let s = support::session(session.addr())?;
        s.engine.experts.set_mem(mem_bytes).map_err(|e| Failure {
            code: EDGEMOE_ERR_INVALID_INPUT,
            message: e.to_string(),
        })?;
        Ok(())
    })
}

/// Changes the GPU expert tier's budget of a session created with `gpu_mem_bytes` > 0 to
/// `gpu_mem_bytes`: slots are given back or added at once (between steps of a generation running
/// on another thread). Too small a budget, or a session without the tier, gives
/// EDGEMOE_ERR_INVALID_INPUT and leaves the tier as it was.
#[no_mangle]
pub extern "C" fn edgemoe_session_set_gpu_mem(
    session: *mut EdgemoeSession,
    gpu_mem_bytes: u64,
) -> c_int {
    guard(|| {
        let s = support::session(session.addr())?;
        s.engine.set_gpu_mem(gpu_mem_bytes).map_err(|e| Failure {
            code: EDGEMOE_ERR_INVALID_INPUT,
            message: e.to_string(),
        })?;
        Ok(())
    })
}

/// Asks the generation running on `session` to stop after its current token; that
/// edgemoe_generate returns EDGEMOE_ERR_CANCELLED. Safe to call from any thread at any time,
/// including from the token callback; with no generation running it has no effect.
#[no_mangle]
pub extern "C" fn edgemoe_session_cancel(session: *mut EdgemoeSession) -> c_int {
    guard(|| {
        support::session(session.addr())?
            .cancel
            .store(true, Ordering::Release);
        Ok(())
    })
}

/// Tokenizes UTF-8 `text`; `add_special` adds what the tokenizer adds around a sequence (e.g.
/// BOS). Writes up to `capacity` ids to `tokens` and the full count to `*n_out`; returns
/// EDGEMOE_ERR_BUFFER_TOO_SMALL when `capacity` is short (`tokens` may be NULL when it is 0).
///
/// # Safety
/// `text` is NULL or a NUL-terminated string; `tokens` is NULL or writable for `capacity` ids;
/// `n_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_tokenize(
    model: *const EdgemoeModel,
    text: *const c_char,
    add_special: bool,
    tokens: *mut i32,
    capacity: usize,
    n_out: *mut usize,
) -> c_int {
    guard(|| {
        let model = support::model(model.addr())?;
        // SAFETY: each pointer is NULL or valid as the contract above says.
        let (text, tokens, n_out) = unsafe {
            (
                read_str(text, "text")?,
                out_slice(tokens, capacity, "tokens")?,
                out_ref(n_out, "n_out")?,
            )
        };
        let ids = model
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| input_failure(&e))?;
        *n_out = ids.len();
        for (dst, &id) in tokens.iter_mut().zip(&ids) {
            *dst = i32::try_from(id).or_else(|_| {
                fail(
                    EDGEMOE_ERR_INTERNAL,
                    format!("token id {id} overflows int32"),
                )
            })?;
        }
        if ids.len() > capacity {
            return fail(
                EDGEMOE_ERR_BUFFER_TOO_SMALL,
                format!("`tokens` holds {capacity} ids; {} needed", ids.len()),
            );
        }
        Ok(())
    })
}

/// Turns `n` token ids into UTF-8 text (special tokens skipped), NUL-terminated in `buf` of `cap`
/// bytes; `*n_out` gets the text's length without the NUL. Returns EDGEMOE_ERR_BUFFER_TOO_SMALL
/// when `cap < *n_out + 1` (having written what fits, cut on a character boundary).
///
/// # Safety
/// `tokens` is NULL or readable for `n` ids; `buf` is NULL or writable for `cap` bytes;
/// `n_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_detokenize(
    model: *const EdgemoeModel,
    tokens: *const i32,
    n: usize,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> c_int {
    guard(|| {
        let model = support::model(model.addr())?;
        let tokens: &[i32] = match n {
            0 => &[],
            _ if tokens.is_null() => return fail(EDGEMOE_ERR_NULL_ARG, "`tokens` is NULL"),
            // SAFETY: non-NULL and readable for `n` ids by the contract above.
            _ => unsafe { std::slice::from_raw_parts(tokens, n) },
        };
        // SAFETY: each pointer is NULL or valid as the contract above says.
        let (buf, n_out) = unsafe { (out_slice(buf, cap, "buf")?, out_ref(n_out, "n_out")?) };
        let vocab = model.config.vocab_size.max(model.tokenizer.vocab_size());
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| match u32::try_from(t) {
                Ok(id) if (id as usize) < vocab => Ok(id),
                _ => fail(
                    EDGEMOE_ERR_INVALID_INPUT,
                    format!("token {i} is {t}, outside the vocabulary of {vocab}"),
                ),
            })
            .collect::<CResult<Vec<u32>>>()?;
        let text = model.tokenizer.decode(&ids);
        *n_out = text.len();
        write_text(&text, buf, "buf")
    })
}

/// Generates a completion of UTF-8 `prompt` (tokenized with special tokens, as the Rust API
/// does). `params` may be NULL for the defaults. Each final piece of text goes to `callback`
/// (may be NULL) with `user_data`; a non-zero return stops generation early. The whole text is
/// written NUL-terminated to `out_text` (`cap` bytes) and its length to `*n_out` (may be NULL).
/// With `cap` 0 (`out_text` may then be NULL) nothing is copied: the callback is enough. When
/// the text does not fit, generation still completes, what fits is written and the code is
/// EDGEMOE_ERR_BUFFER_TOO_SMALL. After edgemoe_session_cancel the text so far is written and
/// the code is EDGEMOE_ERR_CANCELLED (the cancel flag is checked after each piece of text).
///
/// # Safety
/// `prompt` is NULL or a NUL-terminated string; `params` is NULL or points to an
/// EdgemoeGenerateParams; `out_text` is NULL or writable for `cap` bytes; `n_out` is NULL or
/// writable; `callback`, if not NULL, may be called with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn edgemoe_generate(
    session: *mut EdgemoeSession,
    prompt: *const c_char,
    params: *const EdgemoeGenerateParams,
    callback: EdgemoeTokenCallback,
    user_data: *mut c_void,
    out_text: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> c_int {
    guard(|| {
        let session = support::session(session.addr())?;
        let _claim = session.acquire()?;
        // SAFETY: each pointer is NULL or valid as the contract above says.
        let (prompt, params, out_text) = unsafe {
            (
                read_str(prompt, "prompt")?,
                params.as_ref().copied(),
                out_slice(out_text, cap, "out_text")?,
            )
        };
        let request = generate_request(prompt, &params.unwrap_or_default())?;
        // A sticky device failure fails every later step: say so up front.
        if let Some(reason) = crate::backend::health::unusable() {
            return Err(Failure {
                code: EDGEMOE_ERR_INTERNAL,
                message: reason.to_string(),
            });
        }
        session.cancel.store(false, Ordering::Release);
        let mut piece_buf = Vec::new();
        let out = generate(&session.engine, &request, |piece| {
            if let (Some(callback), false) = (callback, piece.is_empty()) {
                piece_buf.clear();
                piece_buf.extend_from_slice(piece.as_bytes());
                piece_buf.push(0);
                // SAFETY: the caller vouches for `callback` with `user_data`; the piece is
                // `len` bytes plus a NUL and lives until the call returns.
                if unsafe { callback(piece_buf.as_ptr().cast(), piece.len(), user_data) } != 0 {
                    return false;
                }
            }
            !session.cancel.load(Ordering::Acquire)
        })
        .map_err(|e| input_failure(&e))?;
        // SAFETY: `n_out` is NULL or writable.
        if let Some(n) = unsafe { n_out.as_mut() } {
            *n = out.text.len();
        }
        // A size query makes no sense after the work is done: cap 0 means "no copy wanted".
        let written = match cap {
            0 => Ok(()),
            _ => write_text(&out.text, out_text, "out_text"),
        };
        if out.finish_reason == FinishReason::Cancelled && session.cancel.load(Ordering::Acquire) {
            return fail(
                EDGEMOE_ERR_CANCELLED,
                "generation cancelled by edgemoe_session_cancel",
            );
        }
        written
    })
}

fn generate_request(prompt: &str, p: &EdgemoeGenerateParams) -> CResult<GenerateRequest> {
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return fail(
            EDGEMOE_ERR_INVALID_INPUT,
            format!(
                "temperature is {}; it must be finite and >= 0",
                p.temperature
            ),
        );
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return fail(
            EDGEMOE_ERR_INVALID_INPUT,
            format!("top_p is {}; it must be in (0, 1]", p.top_p),
        );
    }
    Ok(GenerateRequest {
        prompt: prompt.to_string(),
        max_tokens: p.max_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            seed: p.seed,
        },
        stop: Vec::new(),
    })
}

/// A library error during tokenize or generate: the caller's input, or else an internal failure.
fn input_failure(e: &Error) -> Failure {
    let code = match e {
        Error::InvalidInput(_) | Error::Tokenizer { .. } => EDGEMOE_ERR_INVALID_INPUT,
        _ => EDGEMOE_ERR_INTERNAL,
    };
    Failure {
        code,
        message: e.to_string(),
    }
}
