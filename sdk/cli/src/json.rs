//! The `--json` form of every message the CLI prints: field names follow the proto,
//! enums are lowercase words, and unset optional messages are `null`.

use patchbay_sdk::names;
use patchbay_sdk::proto::{
    AgentAttachResult, AgentInfo, CallbackSpec, Event, EventBatchView, Function, GracePeriodInfo,
    Holdout, Stall, Target, Tracer, TracerSpec, TrampolineInfo, TrampolineRef, grace_period_info,
    target,
};
use serde_json::{Value, json};

pub fn agent(a: &AgentInfo) -> Value {
    json!({
        "agent_id": a.agent_id,
        "pid": a.pid,
        "start_time": a.start_time,
        "uid": a.uid,
        "exe": a.exe,
        "build_id": a.build_id,
        "agent_version": a.agent_version,
        "connected": a.connected,
        "threads": a.threads,
        "epoch": a.epoch,
        "callbacks": a.callbacks,
        "trampolines": a.trampolines,
        "arrival": arrival(a.arrival),
    })
}

/// How an agent arrived, for people and scripts: `preloaded`, `linked`, `injected`, or
/// `-` when it did not say.
pub fn arrival(arrival: i32) -> &'static str {
    use patchbay_sdk::proto::Arrival;
    match Arrival::try_from(arrival) {
        Ok(Arrival::Preloaded) => "preloaded",
        Ok(Arrival::Linked) => "linked",
        Ok(Arrival::Injected) => "injected",
        _ => "-",
    }
}

pub fn function(f: &Function) -> Value {
    json!({
        "name": f.name,
        "mangled": f.mangled,
        "address": f.address,
        "object": f.object,
        "patchable": f.patchable,
        "site_kind": names::site_kind(f.site_kind),
        "reason": f.reason,
    })
}

pub fn target(t: Option<&Target>) -> Value {
    match t.and_then(|t| t.target.as_ref()) {
        Some(target::Target::Pid(pid)) => json!({ "pid": pid }),
        Some(target::Target::Tree(pid)) => json!({ "tree": pid }),
        Some(target::Target::Exe(exe)) => json!({ "exe": exe }),
        Some(target::Target::All(all)) => json!({ "all": all }),
        None => Value::Null,
    }
}

pub fn callback(c: Option<&CallbackSpec>) -> Value {
    match c {
        Some(c) => json!({
            "kind": names::callback_kind(c.kind),
            "custom_name": c.custom_name,
            "arg_count": c.arg_count,
        }),
        None => Value::Null,
    }
}

pub fn spec(s: Option<&TracerSpec>) -> Value {
    match s {
        Some(s) => json!({
            "target": target(s.target.as_ref()),
            "pattern": s.pattern,
            "callback": callback(s.callback.as_ref()),
            "name": s.name,
        }),
        None => Value::Null,
    }
}

pub fn tracer(t: &Tracer) -> Value {
    json!({
        "tracer_id": t.tracer_id,
        "spec": spec(t.spec.as_ref()),
        "owner_uid": t.owner_uid,
        "state": names::tracer_state(t.state),
        "agents": t.agents,
        "sites": t.sites,
        "dropped": t.dropped,
    })
}

pub fn attach_result(r: &AgentAttachResult) -> Value {
    json!({
        "agent_id": r.agent_id,
        "pid": r.pid,
        "sites_patched": r.sites_patched,
        "sites_skipped": r.sites_skipped,
        "error": r.error,
    })
}

pub fn trampoline_ref(r: &TrampolineRef) -> Value {
    json!({ "agent_id": r.agent_id, "trampoline_id": r.trampoline_id })
}

pub fn trampoline(t: &TrampolineInfo) -> Value {
    json!({
        "agent_id": t.agent_id,
        "pid": t.pid,
        "trampoline_id": t.trampoline_id,
        "tracer_ids": t.tracer_ids,
        "sites": t.sites,
        "state": names::trampoline_state(t.state),
        "retired_epoch": t.retired_epoch,
        "holdouts": t.holdouts,
        "state_age_ms": t.state_age_ms,
    })
}

pub fn stall(s: &Stall) -> Value {
    json!({
        "tid": s.tid,
        "pc": s.pc,
        "symbol": s.symbol,
        "duration_ms": s.duration_ms,
        "reason": s.reason,
    })
}

pub fn holdout(h: &Holdout) -> Value {
    json!({
        "tid": h.tid,
        "stall": h.stall.as_ref().map_or(Value::Null, stall),
    })
}

pub fn grace_period(g: &GracePeriodInfo) -> Value {
    let (trampoline_id, synchronize_id) = match g.purpose {
        Some(grace_period_info::Purpose::TrampolineId(id)) => (Some(id), None),
        Some(grace_period_info::Purpose::SynchronizeId(id)) => (None, Some(id)),
        None => (None, None),
    };
    json!({
        "agent_id": g.agent_id,
        "pid": g.pid,
        "trampoline_id": trampoline_id,
        "synchronize_id": synchronize_id,
        "epoch": g.epoch,
        "waited_ms": g.waited_ms,
        "holdouts": g.holdouts.iter().map(holdout).collect::<Vec<_>>(),
    })
}

/// One event with the fields of its batch, as printed one per line by `watch --json`.
pub fn event(batch: &EventBatchView, e: &Event) -> Value {
    json!({
        "agent_id": batch.agent_id,
        "pid": batch.pid,
        "tracer_id": batch.tracer_id,
        "timestamp_ns": e.timestamp_ns,
        "tid": e.tid,
        "address": e.address,
        "function": e.function,
        "args": e.args,
        "dropped": batch.dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::{CallbackKind, TracerState, TrampolineState};
    use patchbay_sdk::{Target, Tracer as Spec};

    #[test]
    fn tracer_json_uses_words_for_enums() {
        let t = Tracer {
            tracer_id: 3,
            spec: Some(
                Spec::trace(Target::pid(42), "sqlite3*")
                    .args(2)
                    .name("q")
                    .into_proto(),
            ),
            owner_uid: 1000,
            state: TracerState::Active as i32,
            agents: 1,
            sites: 12,
            dropped: 0,
            processes_matched: 1,
        };
        assert_eq!(
            tracer(&t),
            json!({
                "tracer_id": 3,
                "spec": {
                    "target": {"pid": 42},
                    "pattern": "sqlite3*",
                    "callback": {"kind": "trace", "custom_name": "", "arg_count": 2},
                    "name": "q",
                },
                "owner_uid": 1000,
                "state": "active",
                "agents": 1,
                "sites": 12,
                "dropped": 0,
            })
        );
        assert_eq!(target(Some(Target::all().as_proto())), json!({"all": true}));
        assert_eq!(target(None), Value::Null);
        let count = Spec::count(Target::all(), "f").into_proto();
        assert_eq!(callback(count.callback.as_ref())["kind"], "count");
        assert_eq!(CallbackKind::Count as i32, 1);
    }

    #[test]
    fn grace_period_json_flattens_purpose_and_stalls() {
        let g = GracePeriodInfo {
            agent_id: 1,
            pid: 42,
            purpose: Some(grace_period_info::Purpose::TrampolineId(7)),
            epoch: 5,
            waited_ms: 1500,
            holdouts: vec![
                Holdout {
                    tid: 43,
                    stall: None,
                },
                Holdout {
                    tid: 44,
                    stall: Some(Stall {
                        tid: 44,
                        pc: 0x1000,
                        symbol: "trampoline #7".into(),
                        duration_ms: 1200,
                        reason: String::new(),
                    }),
                },
            ],
        };
        let v = grace_period(&g);
        assert_eq!(v["trampoline_id"], 7);
        assert_eq!(v["synchronize_id"], Value::Null);
        assert_eq!(v["holdouts"][0]["stall"], Value::Null);
        assert_eq!(v["holdouts"][1]["stall"]["symbol"], "trampoline #7");
        assert_eq!(v["holdouts"][1]["stall"]["pc"], 0x1000);
    }

    #[test]
    fn trampoline_and_event_json() {
        let t = TrampolineInfo {
            agent_id: 1,
            pid: 2,
            trampoline_id: 3,
            tracer_ids: vec![4, 5],
            sites: 6,
            state: TrampolineState::FreeAuthorized as i32,
            retired_epoch: 7,
            holdouts: vec![],
            state_age_ms: 8,
        };
        assert_eq!(trampoline(&t)["state"], "free_authorized");
        let batch = EventBatchView {
            agent_id: 1,
            pid: 2,
            tracer_id: 3,
            events: vec![Event {
                timestamp_ns: 10,
                tid: 11,
                address: 12,
                function: "f".into(),
                args: vec![1, 2],
            }],
            dropped: 9,
        };
        let v = event(&batch, &batch.events[0]);
        assert_eq!(v["pid"], 2);
        assert_eq!(v["function"], "f");
        assert_eq!(v["args"], json!([1, 2]));
        assert_eq!(v["dropped"], 9);
    }
}
