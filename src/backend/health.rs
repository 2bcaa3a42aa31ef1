//! Whether the device can still be used. Some GPU failures are sticky: once a kernel faults, the
//! CUDA context refuses every later call. Such a failure is recorded here once, so `serve`
//! reports unhealthy (`/health` 503) and refuses work with the reason instead of failing each
//! request anew, and the C API returns it.

use std::sync::OnceLock;

static UNUSABLE: OnceLock<String> = OnceLock::new();

/// Records that the device cannot be used any more (the first reason is kept).
pub fn mark_unusable(reason: String) {
    let _ = UNUSABLE.set(reason);
}

/// Why the device cannot be used, once a sticky failure happened.
pub fn unusable() -> Option<&'static str> {
    UNUSABLE.get().map(String::as_str)
}

/// A device op that failed inside a step. Backend ops return values, not results (the forward
/// pass is written once for every backend), so a device backend ends the step by unwinding
/// with this payload through [`fail_step`]; `Engine::forward` catches it and returns its error
/// for that step alone.
pub struct StepFailure(pub crate::error::Error);

/// Ends the current step with `error` (naming the op and its sizes). Unwinds without the panic
/// hook, so nothing is printed: the caller of `Engine::forward` gets `error` back.
pub fn fail_step(error: crate::error::Error) -> ! {
    std::panic::resume_unwind(Box::new(StepFailure(error)))
}
