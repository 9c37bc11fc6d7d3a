//! [`Registry::check_invariants`]: the structural invariants of the registry (identity
//! index, plan ↔ trampolines, grace periods ↔ trampolines and syncs, holdouts and
//! stalls ⊆ known threads, tracers, requests, ops), checked by the tests after every
//! step and by debug builds of the engine.

use std::collections::BTreeSet;

use super::Registry;
use super::model::{Agent, AgentId, Op, TState, TracerId, TracerState};
use crate::grace::{Purpose, Tid};

impl Registry {
    /// Checks the registry's structural invariants; `Err` names the first one broken.
    /// Used by the tests after every step; cheap enough for debugging a live server.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_identities()?;
        let mut pids = BTreeSet::new();
        for (id, a) in &self.agents {
            if a.id != *id {
                return Err(format!("agent {id} stored as {}", a.id));
            }
            if self.by_identity.get(&(a.hello.pid, a.hello.start_time)) != Some(id) {
                return Err(format!("agent {id} missing from the identity index"));
            }
            if !pids.insert(a.hello.pid) {
                return Err(format!("two agents for pid {}", a.hello.pid));
            }
            if *id >= self.next_agent {
                return Err(format!(
                    "agent id {id} not below next id {}",
                    self.next_agent
                ));
            }
            self.check_plan(*id, a)?;
            self.check_trampolines(*id, a)?;
            let alive: BTreeSet<Tid> = a.grace.threads().collect();
            self.check_grace_periods(*id, a, &alive)?;
            if let Some(t) = a.stalls.keys().find(|t| !alive.contains(t)) {
                return Err(format!("agent {id}: stall of thread {t} not known alive"));
            }
        }
        self.check_tracers()?;
        self.check_requests_and_ops()
    }

    /// The identity index names each agent by its (pid, start time).
    fn check_identities(&self) -> Result<(), String> {
        for (key, id) in &self.by_identity {
            let a = self
                .agents
                .get(id)
                .ok_or_else(|| format!("identity {key:?} names missing agent {id}"))?;
            if (a.hello.pid, a.hello.start_time) != *key {
                return Err(format!(
                    "identity {key:?} names agent {id} of another identity"
                ));
            }
        }
        Ok(())
    }

    /// Every planned site is held by the active trampoline the plan names.
    fn check_plan(&self, id: AgentId, a: &Agent) -> Result<(), String> {
        for (site, owner) in &a.site_owner {
            let t = a.trampolines.get(owner).ok_or_else(|| {
                format!("agent {id}: site {site:#x} planned on missing trampoline {owner}")
            })?;
            if !t.state.active() || !t.sites.contains(site) {
                return Err(format!(
                    "agent {id}: site {site:#x} planned on trampoline {owner} ({:?}) that does not hold it",
                    t.state
                ));
            }
        }
        Ok(())
    }

    /// Trampoline ids, groups, sites (an active trampoline holds exactly the sites
    /// planned on it and calls only active tracers meant for the agent; others hold
    /// none), and a pending grace period exactly for each retired one.
    fn check_trampolines(&self, id: AgentId, a: &Agent) -> Result<(), String> {
        for (tid, t) in &a.trampolines {
            if t.id != *tid || *tid == 0 || *tid >= a.next_trampoline {
                return Err(format!("agent {id}: trampoline {tid} has a bad id"));
            }
            let ids = t.group_ids();
            if ids.iter().collect::<BTreeSet<_>>().len() != ids.len() {
                return Err(format!(
                    "agent {id}: trampoline {tid} group {ids:?} has duplicates"
                ));
            }
            if t.state.active() {
                if ids.is_empty() {
                    return Err(format!("agent {id}: active trampoline {tid} has no tracer"));
                }
                for s in &t.sites {
                    if a.site_owner.get(s) != Some(tid) {
                        return Err(format!(
                            "agent {id}: trampoline {tid} holds site {s:#x} planned on {:?}",
                            a.site_owner.get(s)
                        ));
                    }
                }
                for tr in &ids {
                    match self.tracers.get(tr) {
                        Some(x)
                            if x.state == TracerState::Active && x.targets(a, &self.parents) => {}
                        other => {
                            return Err(format!(
                                "agent {id}: active trampoline {tid} calls tracer {tr} which is {:?}",
                                other.map(|x| x.state)
                            ));
                        }
                    }
                }
            } else if !t.sites.is_empty() {
                return Err(format!(
                    "agent {id}: trampoline {tid} is {:?} but holds sites",
                    t.state
                ));
            }
            let pending = a.grace.get(Purpose::Trampoline(*tid)).is_some();
            if pending != (t.state == TState::Retired) {
                return Err(format!(
                    "agent {id}: trampoline {tid} is {:?} with{} a pending grace period",
                    t.state,
                    if pending { "" } else { "out" }
                ));
            }
        }
        Ok(())
    }

    /// Each pending grace period belongs to a trampoline of the agent or to a sync op
    /// that waits for the agent, and waits for threads known alive.
    fn check_grace_periods(
        &self,
        id: AgentId,
        a: &Agent,
        alive: &BTreeSet<Tid>,
    ) -> Result<(), String> {
        for gp in a.grace.pending() {
            match gp.purpose {
                Purpose::Trampoline(t) if !a.trampolines.contains_key(&t) => {
                    return Err(format!(
                        "agent {id}: grace period of missing trampoline {t}"
                    ));
                }
                Purpose::Sync(s) => {
                    let waited = self.ops.values().any(|o| {
                        matches!(o, Op::Sync { sync_id, waiting, .. } if *sync_id == s && waiting.contains(&id))
                    });
                    if !waited {
                        return Err(format!(
                            "agent {id}: grace period of sync {s} no op waits for"
                        ));
                    }
                }
                _ => {}
            }
            if gp.holdouts.is_empty() {
                return Err(format!(
                    "agent {id}: pending {:?} has no holdout",
                    gp.purpose
                ));
            }
            if let Some(t) = gp.holdouts.iter().find(|t| !alive.contains(t)) {
                return Err(format!(
                    "agent {id}: {:?} waits for thread {t} not known alive",
                    gp.purpose
                ));
            }
        }
        Ok(())
    }

    /// Tracer ids; a detaching tracer is still called by some trampoline.
    fn check_tracers(&self) -> Result<(), String> {
        let referenced: BTreeSet<TracerId> = self
            .agents
            .values()
            .flat_map(|a| a.trampolines.values())
            .filter(|t| t.state != TState::Freed)
            .flat_map(|t| t.group_ids())
            .collect();
        for (id, t) in &self.tracers {
            if t.id != *id || *id >= self.next_tracer {
                return Err(format!("tracer {id} has a bad id"));
            }
            if t.state == TracerState::Detaching && !referenced.contains(id) {
                return Err(format!(
                    "detaching tracer {id} is referenced by no trampoline"
                ));
            }
        }
        Ok(())
    }

    /// Requests and sync ops wait only for connected agents; ids below the next.
    fn check_requests_and_ops(&self) -> Result<(), String> {
        for (rid, (agent, _)) in &self.requests {
            if *rid >= self.next_request {
                return Err(format!("request {rid} has a bad id"));
            }
            if !self.agents.get(agent).is_some_and(|a| a.connected) {
                return Err(format!(
                    "request {rid} waits for agent {agent} which is not connected"
                ));
            }
        }
        for (op, o) in &self.ops {
            if *op >= self.next_op {
                return Err(format!("op {op} has a bad id"));
            }
            if let Op::Sync { waiting, .. } = o
                && let Some(a) = waiting
                    .iter()
                    .find(|a| !self.agents.get(a).is_some_and(|x| x.connected))
            {
                return Err(format!(
                    "sync op {op} waits for agent {a} which is not connected"
                ));
            }
        }
        Ok(())
    }
}
