//! Lowercase words for the wire's enums and short labels for specs, shared by the CLI and
//! by tools that show patchbay state to people.

use patchbay_proto::{
    CallbackKind, CallbackSpec, SiteKind, Target, TracerState, TrampolineState, target,
};

/// `count`, `trace`, `latency`, `graph`, `custom` (or `unspecified` / `unknown`).
pub fn callback_kind(kind: i32) -> &'static str {
    match CallbackKind::try_from(kind) {
        Ok(CallbackKind::Unspecified) => "unspecified",
        Ok(CallbackKind::Count) => "count",
        Ok(CallbackKind::Trace) => "trace",
        Ok(CallbackKind::Latency) => "latency",
        Ok(CallbackKind::Graph) => "graph",
        Ok(CallbackKind::Custom) => "custom",
        Err(_) => "unknown",
    }
}

/// `fentry`, `nop5`, `nop_sled`, `relocated` (or `unknown`).
pub fn site_kind(kind: i32) -> &'static str {
    match SiteKind::try_from(kind) {
        Ok(SiteKind::Fentry) => "fentry",
        Ok(SiteKind::Nop5) => "nop5",
        Ok(SiteKind::NopSled) => "nop_sled",
        Ok(SiteKind::Relocated) => "relocated",
        Ok(SiteKind::Unspecified) | Err(_) => "unknown",
    }
}

/// `requested`, `live`, `retiring`, `retired`, `free_authorized`, `freed` (or
/// `unspecified` / `unknown`).
pub fn trampoline_state(state: i32) -> &'static str {
    match TrampolineState::try_from(state) {
        Ok(TrampolineState::Unspecified) => "unspecified",
        Ok(TrampolineState::Requested) => "requested",
        Ok(TrampolineState::Live) => "live",
        Ok(TrampolineState::Retiring) => "retiring",
        Ok(TrampolineState::Retired) => "retired",
        Ok(TrampolineState::FreeAuthorized) => "free_authorized",
        Ok(TrampolineState::Freed) => "freed",
        Err(_) => "unknown",
    }
}

/// `active`, `detaching` (or `unspecified` / `unknown`).
pub fn tracer_state(state: i32) -> &'static str {
    match TracerState::try_from(state) {
        Ok(TracerState::Unspecified) => "unspecified",
        Ok(TracerState::Active) => "active",
        Ok(TracerState::Detaching) => "detaching",
        Err(_) => "unknown",
    }
}

/// `pid 42`, `exe /usr/bin/foo`, `all` (or `none` when unset).
pub fn target_label(target: Option<&Target>) -> String {
    match target.and_then(|t| t.target.as_ref()) {
        Some(target::Target::Pid(pid)) => format!("pid {pid}"),
        Some(target::Target::Exe(exe)) => format!("exe {exe}"),
        Some(target::Target::All(_)) => "all".to_owned(),
        None => "none".to_owned(),
    }
}

/// `count`, `trace(args=2)`, `custom:NAME`, ...
pub fn callback_label(callback: Option<&CallbackSpec>) -> String {
    let Some(cb) = callback else {
        return "none".to_owned();
    };
    match CallbackKind::try_from(cb.kind) {
        Ok(CallbackKind::Trace) if cb.arg_count > 0 => format!("trace(args={})", cb.arg_count),
        Ok(CallbackKind::Custom) => format!("custom:{}", cb.custom_name),
        _ => callback_kind(cb.kind).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    #[test]
    fn enum_words() {
        assert_eq!(callback_kind(CallbackKind::Count as i32), "count");
        assert_eq!(callback_kind(CallbackKind::Custom as i32), "custom");
        assert_eq!(callback_kind(0), "unspecified");
        assert_eq!(callback_kind(99), "unknown");
        assert_eq!(site_kind(SiteKind::NopSled as i32), "nop_sled");
        assert_eq!(site_kind(0), "unknown");
        assert_eq!(trampoline_state(TrampolineState::Live as i32), "live");
        assert_eq!(trampoline_state(TrampolineState::Retired as i32), "retired");
        assert_eq!(
            trampoline_state(TrampolineState::FreeAuthorized as i32),
            "free_authorized"
        );
        assert_eq!(trampoline_state(-1), "unknown");
        assert_eq!(tracer_state(TracerState::Active as i32), "active");
        assert_eq!(tracer_state(TracerState::Detaching as i32), "detaching");
    }

    #[test]
    fn labels() {
        assert_eq!(target_label(Some(&spec::pid(3))), "pid 3");
        assert_eq!(target_label(Some(&spec::exe("/bin/x"))), "exe /bin/x");
        assert_eq!(target_label(Some(&spec::all())), "all");
        assert_eq!(target_label(None), "none");
        assert_eq!(callback_label(Some(&spec::count())), "count");
        assert_eq!(callback_label(Some(&spec::trace(0))), "trace");
        assert_eq!(callback_label(Some(&spec::trace(2))), "trace(args=2)");
        assert_eq!(callback_label(Some(&spec::custom("x"))), "custom:x");
        assert_eq!(callback_label(None), "none");
    }
}
