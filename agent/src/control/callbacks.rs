//! Callbacks a program registers by name (attachable as `CALLBACK_KIND_CUSTOM`): Rust
//! functions through [`register`], C functions through the exported
//! `patchbay_register_callback`. The registry (agent side: it locks); the types the
//! dispatcher calls through live in `hot::dispatch`.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hot::dispatch::{CCallback, Callback, Registered};

static REGISTRY: Mutex<BTreeMap<String, Registered>> = Mutex::new(BTreeMap::new());
/// Bumped at every registration, so the agent announces changes to the server.
static GENERATION: AtomicU64 = AtomicU64::new(0);

fn insert(name: &str, f: Registered) {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), f);
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// Registers `f` under `name` (replacing an earlier one of the same name). Tools see
/// it in `patchbay agents` and attach it with `patchbay attach --custom NAME`.
pub fn register(name: &str, f: Callback) {
    insert(name, Registered::Rust(f));
}

/// C entry point: `int patchbay_register_callback(const char *name, void (*f)(const
/// patchbay_call_ctx *))`. Returns 0, or -1 for a null or non-UTF-8 name.
///
/// # Safety
/// `name` must be null or a valid NUL-terminated string.
// SAFETY: `patchbay_register_callback` is the agent's own C entry point (no libc or
// program symbol of that name); its signature is the one the C header documents.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn patchbay_register_callback(name: *const c_char, f: CCallback) -> c_int {
    if name.is_null() {
        return -1;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    match unsafe { CStr::from_ptr(name) }.to_str() {
        Ok(n) if !n.is_empty() => {
            insert(n, Registered::C(f));
            0
        }
        _ => -1,
    }
}

pub fn get(name: &str) -> Option<Registered> {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .copied()
}

pub fn names() -> Vec<String> {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect()
}

pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}
