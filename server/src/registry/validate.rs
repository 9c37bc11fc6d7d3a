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

/// What /proc says now about a hello's parent claim (`Hello.parent_pid`,
/// `parent_start_time`): the agent's own parent pid, and the start time of the process
/// that now has the claimed parent pid (`None`: no such process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentFacts {
    pub own_ppid: Option<u32>,
    pub claimed_parent_start: Option<u64>,
}

/// Whether a hello's parent claim `(ppid, pstart)` agrees with /proc (pure). A live
/// process of that pid must have that start time (else the pid was recycled: the claim
/// names a process that is gone) and, when it is the claimed parent, must still be the
/// agent's parent (a live process that is not its parent is a false claim). A parent
/// that is gone cannot be checked: the claim stands, and names a process the server
/// knows only if that one said hello itself.
pub fn parent_claim_ok(ppid: u32, pstart: u64, facts: ParentFacts) -> bool {
    if ppid == 0 || pstart == 0 {
        return false;
    }
    match facts.claimed_parent_start {
        Some(now) if now != pstart => false,
        Some(_) => facts.own_ppid.is_none_or(|own| own == ppid),
        None => true,
    }
}

#[cfg(test)]
mod parent_tests {
    use super::*;

    #[test]
    fn parent_claims_are_checked_against_proc() {
        let facts = |own, start| ParentFacts {
            own_ppid: own,
            claimed_parent_start: start,
        };
        // The parent lives and is ours.
        assert!(parent_claim_ok(10, 500, facts(Some(10), Some(500))));
        // The pid now belongs to another process: recycled, never our parent.
        assert!(!parent_claim_ok(10, 500, facts(Some(1), Some(900))));
        assert!(!parent_claim_ok(10, 500, facts(Some(10), Some(900))));
        // A live process that is not our parent.
        assert!(!parent_claim_ok(10, 500, facts(Some(11), Some(500))));
        // The parent is gone (we were reparented): the claim stands.
        assert!(parent_claim_ok(10, 500, facts(Some(1), None)));
        // No claim.
        assert!(!parent_claim_ok(0, 0, facts(Some(1), None)));
        assert!(!parent_claim_ok(10, 0, facts(Some(10), Some(500))));
    }
}
