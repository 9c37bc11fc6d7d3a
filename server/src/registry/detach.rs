//! Control.Detach, and the withdrawal of tracers: a detached tracer leaves every
//! group (its trampolines retire or its sites move to the reduced group) and is
//! dropped once no trampoline that is not freed calls it.

use std::collections::BTreeSet;
use std::time::Instant;

use patchbay_proto as pb;

use super::Registry;
use super::model::{AgentId, Caller, Op, OpId, Reply, TState, TracerId, TracerState, TrampolineId};
use crate::error::CoreError;

impl Registry {
    /// Control.Detach. With `wait`, the reply comes when the retired trampolines are
    /// authorized for freeing; without, at once.
    pub fn detach(
        &mut self,
        caller: Caller,
        req: pb::DetachRequest,
        now: Instant,
    ) -> Result<OpId, CoreError> {
        let t = self.visible_tracer(caller, req.tracer_id)?;
        if t.state == TracerState::Detaching {
            return Err(CoreError::Invalid(format!(
                "tracer {} is already detaching",
                req.tracer_id
            )));
        }
        let tracer = req.tracer_id;
        self.tracers.get_mut(&tracer).expect("checked").state = TracerState::Detaching;
        self.tracer_generation += 1;
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        let mut waiting = BTreeSet::new();
        for a in agents {
            for tr in self.remove_tracer_from_agent(a, tracer, now) {
                waiting.insert((a, tr));
            }
        }
        for (a, tr) in &waiting {
            self.timelines
                .step(*a, *tr, pb::GraceStep::ServerDetachReceived, 0, now);
        }
        // Also the moved-from trampolines (retired because their sites moved).
        for a in self.agents.values() {
            for t in a.trampolines.values() {
                if t.has_tracer(tracer) && matches!(t.state, TState::Retiring | TState::Retired) {
                    waiting.insert((a.id, t.id));
                }
            }
        }
        let retired = waiting
            .iter()
            .map(|(a, t)| pb::TrampolineRef {
                agent_id: *a,
                trampoline_id: *t,
            })
            .collect();
        self.attach_detached(tracer);
        let op = self.new_op(Op::Detach { waiting, retired });
        if !req.wait {
            self.finish_detach(op, false);
        } else {
            self.check_detach_ops();
        }
        self.gc_tracers();
        Ok(op)
    }

    /// Whether trampoline `t` of agent `a` is authorized for freeing, freed or gone.
    fn trampoline_settled(&self, a: AgentId, t: TrampolineId) -> bool {
        match self.agents.get(&a).and_then(|x| x.trampolines.get(&t)) {
            None => true,
            Some(t) => matches!(t.state, TState::FreeAuthorized | TState::Freed),
        }
    }

    /// Replies to the detach ops whose trampolines are all settled.
    pub(super) fn check_detach_ops(&mut self) {
        let done: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o, Op::Detach { waiting, .. } if waiting.iter().all(|(a, t)| self.trampoline_settled(*a, *t))))
            .map(|(o, _)| *o)
            .collect();
        for op in done {
            self.finish_detach(op, true);
        }
    }

    fn finish_detach(&mut self, op: OpId, complete: bool) {
        if let Some(Op::Detach { waiting, retired }) = self.ops.get(&op) {
            let complete = complete || waiting.iter().all(|(a, t)| self.trampoline_settled(*a, *t));
            let r = pb::DetachResponse {
                retired: retired.clone(),
                complete,
            };
            self.reply(op, Reply::Detach(Ok(r)));
        }
    }

    /// Drops tracers that are detaching and no longer referenced by any trampoline
    /// that is not freed.
    pub(super) fn gc_tracers(&mut self) {
        let referenced: BTreeSet<TracerId> = self
            .agents
            .values()
            .flat_map(|a| a.trampolines.values())
            .filter(|t| t.state != TState::Freed)
            .flat_map(|t| t.group_ids())
            .collect();
        self.tracers
            .retain(|id, t| t.state == TracerState::Active || referenced.contains(id));
    }

    /// Withdraws a tracer at once (a failed pid attach, a tracer that could not be
    /// persisted): it leaves every agent's groups.
    pub(super) fn drop_tracer_everywhere(&mut self, tracer: TracerId) {
        if let Some(t) = self.tracers.get_mut(&tracer) {
            t.state = TracerState::Detaching;
            self.tracer_generation += 1;
        }
        let now = Instant::now();
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        for a in agents {
            self.remove_tracer_from_agent(a, tracer, now);
        }
        self.gc_tracers();
    }

    /// What a timed-out detach op still waited for: trampolines not unpatched yet (with
    /// the agent's error when it gave one) and grace periods still running.
    pub(super) fn detach_timed_out(&self, waiting: &BTreeSet<(AgentId, TrampolineId)>) -> String {
        let mut unpatched = Vec::new();
        let mut pending = Vec::new();
        for (a, t) in waiting
            .iter()
            .filter(|(a, t)| !self.trampoline_settled(*a, *t))
        {
            let agent = &self.agents[a];
            if agent.trampolines[t].state == TState::Retiring {
                // The agent has not unpatched it yet: say why when it said.
                let why = agent
                    .last_error
                    .as_deref()
                    .filter(|e| e.contains(&format!("trampoline {t} ")))
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                unpatched.push(format!(
                    "agent {a} (pid {}) trampoline {t} is not unpatched yet{why}",
                    agent.hello.pid
                ));
            } else {
                pending.push(format!("agent {a} trampoline {t}"));
            }
        }
        let mut parts = unpatched;
        if !pending.is_empty() {
            parts.push(format!(
                "grace periods are still running for {}: see `patchbay gp` for the threads holding them up",
                pending.join(", ")
            ));
        }
        format!("detached, but {}", parts.join("; "))
    }
}
