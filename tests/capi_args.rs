//! C API arguments out of range come back as EDGEMOE_ERR_INVALID_INPUT with a message naming
//! the field, as the header documents, not as an internal failure.

use edgemoe::capi::*;
use std::ffi::CStr;

/// n_threads within the API's cap (1024) but past what the machine takes (4 per core, or 16)
/// was EDGEMOE_ERR_INTERNAL ("Any other internal failure").
#[test]
fn too_many_threads_for_the_machine_is_invalid_input() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = 1024u32;
    if (4 * cores).max(16) >= threads as usize {
        eprintln!("skipped: {cores} cores take {threads} threads");
        return;
    }
    let (mut model, mut session) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: NULL path (the built-in model), NULL params, valid out-pointers.
    unsafe {
        assert_eq!(
            edgemoe_model_load(std::ptr::null(), std::ptr::null(), &mut model),
            EDGEMOE_OK
        );
        let params = EdgemoeSessionParams {
            n_threads: threads,
            ..edgemoe_session_default_params()
        };
        let rc = edgemoe_session_new(model, &params, &mut session);
        let msg = CStr::from_ptr(edgemoe_last_error()).to_string_lossy();
        assert_eq!(rc, EDGEMOE_ERR_INVALID_INPUT, "{msg}");
        assert!(
            msg.contains("n_threads") && msg.contains("too many"),
            "{msg}"
        );
        assert!(session.is_null());
        assert_eq!(edgemoe_model_free(model), EDGEMOE_OK);
    }
}
