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

/// `fentry`, `fentry-got`, `nop5`, `nop-sled`, `relocated`, `none` (no site; or
/// `unknown`), as the agent names them.
pub fn site_kind(kind: i32) -> &'static str {
    match SiteKind::try_from(kind) {
        Ok(SiteKind::Fentry) => "fentry",
        Ok(SiteKind::FentryGot) => "fentry-got",
        Ok(SiteKind::Nop5) => "nop5",
        Ok(SiteKind::NopSled) => "nop-sled",
        Ok(SiteKind::Relocated) => "relocated",
        Ok(SiteKind::Unspecified) => "none",
        Err(_) => "unknown",
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
        Some(target::Target::Tree(pid)) => format!("tree {pid}"),
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
    use crate::{Target as T, Tracer};

    fn cb(spec: crate::TracerSpec) -> CallbackSpec {
        spec.as_proto().callback.clone().unwrap()
    }

    #[test]
    fn enum_words() {
        assert_eq!(callback_kind(CallbackKind::Count as i32), "count");
        assert_eq!(callback_kind(CallbackKind::Custom as i32), "custom");
        assert_eq!(callback_kind(0), "unspecified");
        assert_eq!(callback_kind(99), "unknown");
        assert_eq!(site_kind(SiteKind::NopSled as i32), "nop-sled");
        assert_eq!(site_kind(SiteKind::FentryGot as i32), "fentry-got");
        assert_eq!(site_kind(0), "none");
        assert_eq!(site_kind(99), "unknown");
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
        assert_eq!(target_label(Some(T::pid(3).as_proto())), "pid 3");
        assert_eq!(
            target_label(Some(T::exe("/bin/x").as_proto())),
            "exe /bin/x"
        );
        assert_eq!(target_label(Some(T::all().as_proto())), "all");
        assert_eq!(target_label(None), "none");
        let count = cb(Tracer::count(T::all(), "f"));
        assert_eq!(callback_label(Some(&count)), "count");
        let trace = cb(Tracer::trace(T::all(), "f"));
        assert_eq!(callback_label(Some(&trace)), "trace");
        let trace2 = cb(Tracer::trace(T::all(), "f").args(2));
        assert_eq!(callback_label(Some(&trace2)), "trace(args=2)");
        let custom = cb(Tracer::custom(T::all(), "f", "x"));
        assert_eq!(callback_label(Some(&custom)), "custom:x");
        let latency = CallbackSpec {
            kind: CallbackKind::Latency as i32,
            ..CallbackSpec::default()
        };
        assert_eq!(callback_label(Some(&latency)), "latency");
        assert_eq!(callback_label(None), "none");
    }
}
