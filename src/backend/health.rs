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
