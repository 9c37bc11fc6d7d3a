//! Checks of client and agent input that need no registry state: function patterns,
//! callback specs, and an agent's hello with the trampolines it re-reports.

use std::collections::{BTreeMap, BTreeSet};

use patchbay_proto as pb;

use crate::error::CoreError;

pub(super) fn validate_pattern(pattern: &str) -> Result<(), CoreError> {
    if pattern.is_empty() {
        return Err(CoreError::Invalid(
            "empty function pattern: give a glob such as 'sqlite3_*' or '*'".into(),
        ));
    }
    glob::Pattern::new(pattern)
        .map(|_| ())
        .map_err(|e| CoreError::BadPattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })
}

pub(super) fn validate_callback(cb: Option<&pb::CallbackSpec>) -> Result<(), CoreError> {
    let cb = cb.ok_or_else(|| CoreError::Invalid("missing callback".into()))?;
    match pb::CallbackKind::try_from(cb.kind) {
        Ok(pb::CallbackKind::Unspecified) | Err(_) => Err(CoreError::Invalid(format!(
            "unknown callback kind {}: use count, trace, latency, graph or custom",
            cb.kind
        ))),
        Ok(pb::CallbackKind::Custom) if cb.custom_name.is_empty() => Err(CoreError::Invalid(
            "a custom callback needs the name the program registered".into(),
        )),
        Ok(_) if cb.arg_count > 6 => Err(CoreError::Invalid(format!(
            "arg_count {} is more than the 6 argument registers",
            cb.arg_count
        ))),
        Ok(_) => Ok(()),
    }
}

/// Checks the trampolines an agent re-reports in its hello: the server rebuilds its
/// plan from them, so they must describe a possible state.
fn validate_rereport(trampolines: &[pb::TrampolineStatus]) -> Result<(), CoreError> {
    let mut ids = BTreeSet::new();
    let mut sites: BTreeMap<u64, u64> = BTreeMap::new();
    for t in trampolines {
        let id = t.trampoline_id;
        // Servers number trampolines from 1; 2^63 is never reached (and leaves room
        // to count on without overflow).
        if id == 0 || id >= 1 << 63 {
            return Err(CoreError::Invalid(format!(
                "hello: trampoline id {id} was never assigned by a server"
            )));
        }
        if !ids.insert(id) {
            return Err(CoreError::Invalid(format!(
                "hello: trampoline {id} re-reported twice"
            )));
        }
        let mut tracers = BTreeSet::new();
        for r in &t.tracers {
            if !tracers.insert(r.tracer_id) {
                return Err(CoreError::Invalid(format!(
                    "hello: trampoline {id} lists tracer {} twice",
                    r.tracer_id
                )));
            }
        }
        if t.state == pb::TrampolineState::Live as i32 {
            if tracers.is_empty() {
                return Err(CoreError::Invalid(format!(
                    "hello: live trampoline {id} has no tracer"
                )));
            }
            for s in &t.sites {
                if let Some(other) = sites.insert(s.address, id) {
                    return Err(CoreError::Invalid(format!(
                        "hello: site {:#x} is re-reported by trampolines {other} and {id}: a site calls one trampoline",
                        s.address
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks an agent's hello before anything changes: protocol version, the claimed
/// identity against the connecting process (`peer` = (pid, uid) from SO_PEERCRED when
/// known), and the trampolines it re-reports.
pub(super) fn validate_hello(peer: Option<(u32, u32)>, hello: &pb::Hello) -> Result<(), CoreError> {
    if hello.protocol_version != pb::PROTOCOL_VERSION {
        return Err(CoreError::VersionMismatch(format!(
            "protocol version mismatch: the agent speaks {}, this server speaks {}: use an agent and a server from the same release",
            hello.protocol_version,
            pb::PROTOCOL_VERSION
        )));
    }
    if let Some((pid, uid)) = peer {
        if hello.pid != pid {
            return Err(CoreError::PermissionDenied(format!(
                "agent claims pid {} but the connecting process is pid {pid}: an agent may only register its own process",
                hello.pid
            )));
        }
        if hello.uid != uid {
            return Err(CoreError::PermissionDenied(format!(
                "agent claims uid {} but the connecting process runs as uid {uid}",
                hello.uid
            )));
        }
    }
    if hello.pid == 0 {
        return Err(CoreError::Invalid("hello: pid 0".into()));
    }
    for t in &hello.trampolines {
        let st = pb::TrampolineState::try_from(t.state).unwrap_or_default();
        if !matches!(
            st,
            pb::TrampolineState::Live
                | pb::TrampolineState::Retired
                | pb::TrampolineState::FreeAuthorized
        ) {
            return Err(CoreError::Invalid(format!(
                "hello: trampoline {} re-reported in state {}: only live, retired and free-authorized trampolines can be re-reported",
                t.trampoline_id, t.state
            )));
        }
    }
    validate_rereport(&hello.trampolines)
}
