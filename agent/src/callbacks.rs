//! Callbacks a program registers by name (attachable as `CALLBACK_KIND_CUSTOM`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::dispatch::Callback;

static REGISTRY: Mutex<BTreeMap<String, Callback>> = Mutex::new(BTreeMap::new());

/// Registers `f` under `name` (replacing an earlier one of the same name). Tools see
/// it in `patchbay agents` and attach it with `patchbay attach --custom NAME`.
/// Registered before the agent connects, it is announced in the hello; later ones are
/// announced at the next reconnect.
pub fn register(name: &str, f: Callback) {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), f);
}

pub fn get(name: &str) -> Option<Callback> {
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
