//! Small typed helpers over the raw Control client, for tests.

use std::time::Duration;

use patchbay_proto::*;
use tonic::{Code, Status};

use crate::agent::{LINE_TIMEOUT, ScriptAgent};
use crate::server::Control;

/// A tracer spec for one pid.
pub fn spec_pid(pid: u32, pattern: &str, kind: CallbackKind) -> TracerSpec {
    spec(target::Target::Pid(pid), pattern, kind)
}

/// A tracer spec for every agent.
pub fn spec_all(pattern: &str, kind: CallbackKind) -> TracerSpec {
    spec(target::Target::All(true), pattern, kind)
}

/// A tracer spec for a target.
pub fn spec(target: target::Target, pattern: &str, kind: CallbackKind) -> TracerSpec {
    TracerSpec {
        target: Some(Target {
            target: Some(target),
        }),
        pattern: pattern.into(),
        callback: Some(CallbackSpec {
            kind: kind as i32,
            custom_name: String::new(),
            arg_count: 0,
        }),
        name: String::new(),
    }
}

/// Attach, returning the raw result.
pub async fn try_attach(c: &mut Control, spec: TracerSpec) -> Result<AttachResponse, Status> {
    c.attach(AttachRequest {
        spec: Some(spec),
        timeout_ms: 0,
    })
    .await
    .map(|r| r.into_inner())
}

/// Attach a tracer and return its id, panicking on error.
pub async fn attach(c: &mut Control, spec: TracerSpec) -> (u64, AttachResponse) {
    let what = format!("{spec:?}");
    let resp = try_attach(c, spec)
        .await
        .unwrap_or_else(|s| panic!("attach {what} failed: {s:?}"));
    let id = resp
        .tracer
        .as_ref()
        .unwrap_or_else(|| panic!("attach answer has no tracer: {resp:?}"))
        .tracer_id;
    assert_ne!(id, 0, "tracer ids start at 1: {resp:?}");
    (id, resp)
}

/// Detach without waiting.
pub async fn detach(c: &mut Control, tracer_id: u64) -> DetachResponse {
    try_detach(c, tracer_id, false, 0)
        .await
        .unwrap_or_else(|s| panic!("detach {tracer_id} failed: {s:?}"))
}

/// Detach, returning the raw result.
pub async fn try_detach(
    c: &mut Control,
    tracer_id: u64,
    wait: bool,
    timeout_ms: u32,
) -> Result<DetachResponse, Status> {
    c.detach(DetachRequest {
        tracer_id,
        wait,
        timeout_ms,
    })
    .await
    .map(|r| r.into_inner())
}

/// Every agent visible.
pub async fn agents(c: &mut Control) -> Vec<AgentInfo> {
    c.list_agents(ListAgentsRequest {})
        .await
        .expect("ListAgents")
        .into_inner()
        .agents
}

/// Every tracer visible.
pub async fn tracers(c: &mut Control) -> Vec<Tracer> {
    c.list_tracers(ListTracersRequest {})
        .await
        .expect("ListTracers")
        .into_inner()
        .tracers
}

/// Trampolines (all pids), optionally with freed ones.
pub async fn trampolines(c: &mut Control, include_freed: bool) -> Vec<TrampolineInfo> {
    let mut t = c
        .list_trampolines(ListTrampolinesRequest {
            pid: 0,
            include_freed,
        })
        .await
        .expect("ListTrampolines")
        .into_inner()
        .trampolines;
    t.sort_by_key(|t| (t.agent_id, t.trampoline_id));
    t
}

/// Pending grace periods.
pub async fn grace_periods(c: &mut Control) -> Vec<GracePeriodInfo> {
    c.grace_periods(GracePeriodsRequest::default())
        .await
        .expect("GracePeriods")
        .into_inner()
        .pending
}

/// Trampoline state as an enum.
pub fn state(t: &TrampolineInfo) -> TrampolineState {
    TrampolineState::try_from(t.state).unwrap_or(TrampolineState::Unspecified)
}

/// Sorted holdouts of a trampoline.
pub fn holdouts(t: &TrampolineInfo) -> Vec<u32> {
    let mut h = t.holdouts.clone();
    h.sort_unstable();
    h
}

/// What the server shows of its registry, with time-varying fields cleared: used to
/// check that a rejected request changed nothing.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub agents: Vec<AgentInfo>,
    pub tracers: Vec<Tracer>,
    pub trampolines: Vec<TrampolineInfo>,
}

/// Takes a [`Snapshot`].
pub async fn snapshot(c: &mut Control) -> Snapshot {
    let mut agents = agents(c).await;
    agents.sort_by_key(|a| a.agent_id);
    let mut tracers = tracers(c).await;
    tracers.sort_by_key(|t| t.tracer_id);
    let mut trampolines = trampolines(c, true).await;
    for t in &mut trampolines {
        t.state_age_ms = 0;
        t.holdouts.sort_unstable();
    }
    Snapshot {
        agents,
        tracers,
        trampolines,
    }
}

/// Asserts that `r` is an error with `code` whose message contains every one of `needles`
/// (case-insensitive).
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needles: &[&str]) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong status code: {s:?}");
            let msg = s.message().to_lowercase();
            for n in needles {
                assert!(
                    msg.contains(&n.to_lowercase()),
                    "status message {:?} does not mention {n:?}",
                    s.message()
                );
            }
        }
    }
}

/// A full barrier between the test, the server and one agent: asks the server to list
/// the agent's functions, which the server forwards on the agent's stream. When it
/// returns, the server has processed every message the agent sent before (the agent
/// answers in order), and every message the server sent the agent before is among the
/// agent's lines.
pub async fn sync_point(c: &mut Control, agent: &mut ScriptAgent) {
    let pattern = "sync-point-*";
    c.list_functions(ListFunctionsRequest {
        pid: agent.pid(),
        pattern: pattern.into(),
        limit: 0,
    })
    .await
    .unwrap_or_else(|s| panic!("sync point ListFunctions failed: {s:?}"));
    agent
        .expect("the sync-point list line", LINE_TIMEOUT, |l| {
            l.starts_with("list ") && l.contains(" pattern=sync-point-* ")
        })
        .await;
}

/// Default wait for server-side state changes.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);
