//! The machinery behind the C ABI: the handle registry, the per-thread last error, the panic guard
//! and the buffer conventions. Nothing here is `extern "C"`, so the header never sees it.
//!
//! Handles are ids, not addresses: the registry maps each live id to an `Arc` of the object, so an
//! entry point never dereferences what C hands it, a freed or made-up handle is simply not found,
//! and ids are never reused (a stale handle cannot alias a newer object).

use super::{
    EDGEMOE_ERR_BUFFER_TOO_SMALL, EDGEMOE_ERR_BUSY, EDGEMOE_ERR_INVALID_HANDLE,
    EDGEMOE_ERR_INVALID_INPUT, EDGEMOE_ERR_NULL_ARG, EDGEMOE_ERR_PANIC, EDGEMOE_OK,
};
use crate::engine::Engine;
use crate::model::Model;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A failed call: its return code and the message kept as the thread's last error.
pub(super) struct Failure {
    pub code: c_int,
    pub message: String,
}

pub(super) type CResult<T = ()> = Result<T, Failure>;

pub(super) fn fail<T>(code: c_int, message: impl Into<String>) -> CResult<T> {
    Err(Failure {
        code,
        message: message.into(),
    })
}

/// Runs an entry point's body: an error or a panic becomes its code, with the message recorded.
pub(super) fn guard(body: impl FnOnce() -> CResult) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => EDGEMOE_OK,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".to_string());
            set_last_error(&format!("internal error (panic): {what}"));
            EDGEMOE_ERR_PANIC
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(super) fn set_last_error(message: &str) {
    // An interior NUL would cut the C string short; show it instead.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: a call from a thread-local destructor must not panic outside the guard.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// The thread's last error; the pointer lives until the thread's next failing call replaces it.
pub(super) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// A session: its own engine (and so its own worker threads) over a shared model.
pub(super) struct Session {
    pub engine: Engine,
    /// Set by `edgemoe_session_cancel` from any thread; read by the generating thread.
    pub cancel: AtomicBool,
    /// Held while a call runs on the session: a second, concurrent call gets EDGEMOE_ERR_BUSY.
    in_use: AtomicBool,
}

impl Session {
    pub fn new(engine: Engine) -> Session {
        Session {
            engine,
            cancel: AtomicBool::new(false),
            in_use: AtomicBool::new(false),
        }
    }

    /// Claims the session for the calling thread until the returned guard drops.
    pub fn acquire(&self) -> CResult<SessionUse<'_>> {
        match self
            .in_use
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => Ok(SessionUse(self)),
            Err(_) => fail(
                EDGEMOE_ERR_BUSY,
                "the session is already in use by another call (one session, one thread at a time)",
            ),
        }
    }
}

pub(super) struct SessionUse<'a>(&'a Session);

impl Drop for SessionUse<'_> {
    fn drop(&mut self) {
        self.0.in_use.store(false, Ordering::Release);
    }
}

struct Registry {
    /// The next handle id; one counter for both kinds, so a model id is never a session id.
    next_id: usize,
    models: BTreeMap<usize, Arc<Model>>,
    sessions: BTreeMap<usize, Arc<Session>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 1,
    models: BTreeMap::new(),
    sessions: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // No code that can panic runs under the lock, but a poisoned map is still consistent.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    fn issue_id(&mut self) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

fn not_live(kind: &str, id: usize, made_by: &str) -> Failure {
    let code = if id == 0 {
        EDGEMOE_ERR_NULL_ARG
    } else {
        EDGEMOE_ERR_INVALID_HANDLE
    };
    let message = if id == 0 {
        format!("the {kind} handle is NULL")
    } else {
        format!("not a live {kind} handle (already freed, or not returned by {made_by})")
    };
    Failure { code, message }
}

pub(super) fn register_model(model: Arc<Model>) -> usize {
    let mut r = registry();
    let id = r.issue_id();
    r.models.insert(id, model);
    id
}

pub(super) fn model(id: usize) -> CResult<Arc<Model>> {
    let found = registry().models.get(&id).cloned();
    found.ok_or_else(|| not_live("EdgemoeModel", id, "edgemoe_model_load"))
}

pub(super) fn unregister_model(id: usize) -> CResult<Arc<Model>> {
    let found = registry().models.remove(&id);
    found.ok_or_else(|| not_live("EdgemoeModel", id, "edgemoe_model_load"))
}

pub(super) fn register_session(session: Session) -> usize {
    let mut r = registry();
    let id = r.issue_id();
    r.sessions.insert(id, Arc::new(session));
    id
}

pub(super) fn session(id: usize) -> CResult<Arc<Session>> {
    let found = registry().sessions.get(&id).cloned();
    found.ok_or_else(|| not_live("EdgemoeSession", id, "edgemoe_session_new"))
}

pub(super) fn unregister_session(id: usize) -> CResult<Arc<Session>> {
    let found = registry().sessions.remove(&id);
    found.ok_or_else(|| not_live("EdgemoeSession", id, "edgemoe_session_new"))
}

/// Borrows a NUL-terminated UTF-8 string from C.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a` and is not written meanwhile.
pub(super) unsafe fn read_str<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return fail(EDGEMOE_ERR_NULL_ARG, format!("`{what}` is NULL"));
    }
    // SAFETY: non-NULL, and the caller guarantees a live NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().or_else(|e| {
        fail(
            EDGEMOE_ERR_INVALID_INPUT,
            format!("`{what}` is not UTF-8: {e}"),
        )
    })
}

/// Borrows an out-parameter.
///
/// # Safety
/// `p` is NULL or valid for writes of one `T`, unaliased for `'a`.
pub(super) unsafe fn out_ref<'a, T>(p: *mut T, what: &str) -> CResult<&'a mut T> {
    // SAFETY: the caller guarantees a NULL or valid, unaliased pointer.
    match unsafe { p.as_mut() } {
        Some(r) => Ok(r),
        None => fail(EDGEMOE_ERR_NULL_ARG, format!("`{what}` is NULL")),
    }
}

/// Views the caller's buffer of `cap` elements; NULL is allowed only with `cap == 0`.
///
/// # Safety
/// Unless NULL, `p` is valid for writes of `cap` elements, unaliased for `'a`.
pub(super) unsafe fn out_slice<'a, T>(p: *mut T, cap: usize, what: &str) -> CResult<&'a mut [T]> {
    if cap == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return fail(
            EDGEMOE_ERR_NULL_ARG,
            format!("`{what}` is NULL but its capacity is {cap}"),
        );
    }
    // SAFETY: non-NULL, and the caller guarantees `cap` writable elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, cap) })
}

/// Writes `text` NUL-terminated into `buf`; when it does not fit, writes the longest prefix that
/// ends on a character boundary and reports EDGEMOE_ERR_BUFFER_TOO_SMALL.
pub(super) fn write_text(text: &str, buf: &mut [c_char], what: &str) -> CResult {
    let Some(room) = buf.len().checked_sub(1) else {
        return fail(
            EDGEMOE_ERR_BUFFER_TOO_SMALL,
            format!("`{what}` has no room; {} bytes needed", text.len() + 1),
        );
    };
    let mut n = text.len().min(room);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    for (dst, &b) in buf.iter_mut().zip(&text.as_bytes()[..n]) {
        *dst = b as c_char;
    }
    buf[n] = 0;
    if text.len() > room {
        return fail(
            EDGEMOE_ERR_BUFFER_TOO_SMALL,
            format!(
                "`{what}` holds {} bytes; {} needed (text and NUL)",
                buf.len(),
                text.len() + 1
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_code_with_its_message() {
        let code = guard(|| panic!("boom {}", 42));
        assert_eq!(code, EDGEMOE_ERR_PANIC);
        // SAFETY: the pointer is this thread's last error, not replaced since.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap();
        assert!(msg.contains("boom 42"), "{msg}");
    }

    #[test]
    fn text_is_truncated_on_a_character_boundary() {
        let mut buf = [1 as c_char; 4];
        let err = write_text("aé€", &mut buf, "buf").unwrap_err();
        assert_eq!(err.code, EDGEMOE_ERR_BUFFER_TOO_SMALL);
        // "a" + "é" is 3 bytes; the NUL takes the fourth.
        assert_eq!(buf.map(|c| c as u8), [b'a', 0xC3, 0xA9, 0]);
        let mut buf = [1 as c_char; 3];
        assert!(write_text("ab", &mut buf, "buf").is_ok());
        assert_eq!(buf.map(|c| c as u8), [b'a', b'b', 0]);
        assert!(write_text("", &mut [], "buf").is_err());
    }

    #[test]
    fn freed_ids_are_never_found_again() {
        let id = register_model(Arc::new(Model::builtin_default()));
        assert!(model(id).is_ok());
        assert!(unregister_model(id).is_ok());
        assert_eq!(
            model(id).err().map(|f| f.code),
            Some(EDGEMOE_ERR_INVALID_HANDLE)
        );
        assert_eq!(model(0).err().map(|f| f.code), Some(EDGEMOE_ERR_NULL_ARG));
        let other = register_model(Arc::new(Model::builtin_default()));
        assert_ne!(other, id);
        assert!(unregister_model(other).is_ok());
    }
}
