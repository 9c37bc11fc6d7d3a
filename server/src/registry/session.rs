//! An agent's session: its hello (identity, re-adoption of the trampolines it
//! re-reports, `reconcile` with the active tracers), the end of its stream, and the
//! end of its process.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use super::Registry;
use super::model::{
    Agent, AgentId, ArchivedProcess, CountTable, MAX_ARCHIVED_PROCESSES, Reply, Request, TState,
    TracerId, TracerState, Trampoline, TrampolineId, fold_counts,
};
use super::validate::validate_hello;
use crate::error::CoreError;
use crate::grace::{GracePeriod, Purpose, Tid};

impl Registry {
    /// An agent said hello. `peer` is (pid, uid) from SO_PEERCRED when known.
    /// Returns the agent id and the welcome to send; on error nothing changed.
    pub fn agent_hello(
        &mut self,
        peer: Option<(u32, u32)>,
        hello: pb::Hello,
        now: Instant,
    ) -> Result<(AgentId, pb::Welcome), CoreError> {
        validate_hello(peer, &hello)?;
        let (id, resumed) = self.identify(&hello)?;
        let me = (hello.pid, hello.start_time);
        let parent = (hello.parent_pid, hello.parent_start_time);
        // The shell checked the claim against /proc (`procfs::parent_claim_ok`) and
        // zeroed it when wrong. A process is never its own parent.
        if parent.0 != 0 && parent.1 != 0 && parent != me {
            self.parents.insert(me, parent);
        }
        if !resumed {
            self.register(id, hello.clone());
        }
        let agent = self.agents.get_mut(&id).expect("registered above");
        agent.connected = true;
        // The hello's epoch, even when lower: within one program image the epoch never
        // goes back, but after an exec (same pid and start time, so the same agent) the
        // new image counts from 1 again. Nothing from before is trusted anyway
        // (`readopt` forgets every stamp), and keeping the old, higher epoch would make
        // every barrier answer of the new image look stale.
        agent.epoch = hello.epoch;
        agent.hello = hello;
        self.readopt(id, now);
        self.reconcile(id, now);
        self.gc_tracers();
        Ok((
            id,
            pb::Welcome {
                agent_id: id,
                settings: Some(self.settings.agent),
                resumed,
                // The engine numbers connections.
                session_id: 0,
            },
        ))
    }

    /// The agent of the hello's identity (pid, start time) and whether it resumes a
    /// known one (a new identity gets a new id). A process connected already is
    /// refused.
    fn identify(&mut self, hello: &pb::Hello) -> Result<(AgentId, bool), CoreError> {
        let key = (hello.pid, hello.start_time);
        match self.by_identity.get(&key) {
            Some(&id) if self.agents[&id].connected => Err(CoreError::AlreadyConnected(hello.pid)),
            Some(&id) => Ok((id, true)),
            None => {
                let id = self.next_agent;
                self.next_agent += 1;
                Ok((id, false))
            }
        }
    }

    /// Records a new process as agent `id`.
    fn register(&mut self, id: AgentId, hello: pb::Hello) {
        // A new process with a reused pid replaces a dead one of the same pid.
        let stale: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.hello.pid == hello.pid)
            .map(|a| a.id)
            .collect();
        for s in stale {
            self.agent_gone(s);
        }
        self.by_identity.insert((hello.pid, hello.start_time), id);
        self.agents.insert(id, Agent::new(id, hello));
    }

    /// Rebuilds trampoline state from the agent's re-report. No quiescent evidence
    /// from before this point is trusted.
    fn readopt(&mut self, id: AgentId, now: Instant) {
        let expedite = self.settings.expedite;
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let hello = agent.hello.clone();
        let live: BTreeSet<Tid> = hello.tids.iter().copied().collect();
        agent.grace.forget_evidence(live.iter().copied());
        agent.stalls.clear();
        let reported: BTreeMap<u64, &pb::TrampolineStatus> = hello
            .trampolines
            .iter()
            .map(|t| (t.trampoline_id, t))
            .collect();
        forget_unreported(agent, &reported, now);
        agent.site_owner.clear();
        let authorize: Vec<GracePeriod> = reported
            .values()
            .filter_map(|st| adopt(agent, st, &live, now))
            .collect();
        let pending = agent.grace.pending().count() > 0;
        for gp in authorize {
            self.grace_done(id, gp, now);
        }
        if pending && expedite {
            self.send(id, ToAgent::Expedite(pb::Expedite {}));
        }
        self.check_detach_ops();
    }

    /// Brings an agent's trampolines in line with the active tracers: tracers gone
    /// are removed from its groups; active tracers that target it are attached.
    /// A re-reported trampoline whose group matches active tracers (same ids and
    /// callbacks) stays live as it is: after a server restart the restored tracers
    /// keep the trampolines the agent already runs, with no reinstall.
    fn reconcile(&mut self, id: AgentId, now: Instant) {
        let agent = &self.agents[&id];
        let mut stale: BTreeSet<TracerId> = BTreeSet::new();
        for t in agent.trampolines.values().filter(|t| t.state.active()) {
            for r in &t.group {
                // A tracer that is gone, detaching, not meant for this process (a
                // forked child inherits its parent's patched code), or that runs
                // another callback than the tracer of that id does, is removed here.
                match self.tracers.get(&r.tracer_id) {
                    Some(x)
                        if x.state == TracerState::Active
                            && x.targets(agent, &self.parents)
                            && x.reference() == *r => {}
                    _ => {
                        stale.insert(r.tracer_id);
                    }
                }
            }
        }
        for tr in stale {
            self.remove_tracer_from_agent(id, tr, now);
        }
        // A live trampoline that no site calls (its sites moved before the agent
        // lost its server) is retired.
        let unused: Vec<TrampolineId> = self.agents[&id]
            .trampolines
            .values()
            .filter(|t| t.state == TState::Live && t.sites.is_empty())
            .map(|t| t.id)
            .collect();
        for t in unused {
            self.retire(id, t, now);
        }
        // Every active tracer meant for the agent is (re)attached: sites whose group
        // already has it are left alone, so a tracer that is fully present costs one
        // function listing and no install, and one whose attach was cut short (the
        // stream broke between installs) gets its missing sites.
        self.attach_targeting_tracers(id);
    }

    /// The agent's stream ended. Its process may still live; it keeps its state.
    pub fn agent_disconnected(&mut self, id: AgentId) {
        let Some(agent) = self.agents.get_mut(&id) else {
            return;
        };
        agent.connected = false;
        // Nobody waits for markers of a session that ended.
        agent.covering.clear();
        agent.last_cover = 0;
        let pid = agent.hello.pid;
        // Syncs cannot observe a disconnected agent: drop it from them.
        let syncs: Vec<u64> = agent
            .grace
            .pending()
            .filter_map(|gp| match gp.purpose {
                Purpose::Sync(s) => Some(s),
                _ => None,
            })
            .collect();
        for s in syncs {
            agent.grace.cancel(Purpose::Sync(s));
        }
        self.fail_requests(id, pid);
        self.sync_progress(id, None);
    }

    /// Requests and attach ops waiting on agent `id` fail: it is lost.
    fn fail_requests(&mut self, id: AgentId, pid: u32) {
        let lost: Vec<(u64, Request)> = self
            .requests
            .iter()
            .filter(|(_, (a, _))| *a == id)
            .map(|(r, (_, req))| (*r, *req))
            .collect();
        for (r, req) in lost {
            self.requests.remove(&r);
            match req {
                Request::Functions { op, .. } => {
                    self.reply(op, Reply::Functions(Err(CoreError::AgentLost { pid })))
                }
                Request::Attach { op: Some(op), .. } => {
                    self.attach_agent_result(op, id, Err(CoreError::AgentLost { pid }))
                }
                Request::Attach { op: None, .. } => {}
            }
        }
        // Attach ops waiting for installs in this agent.
        self.attach_agent_lost(id, pid);
    }

    /// The agent's process is gone: its memory, threads and trampolines with it.
    pub fn agent_gone(&mut self, id: AgentId) {
        let Some(agent) = self.agents.get(&id) else {
            return;
        };
        let pid = agent.hello.pid;
        let key = (pid, agent.hello.start_time);
        self.fail_requests(id, pid);
        let agent = self.agents.remove(&id).expect("checked above");
        self.by_identity.remove(&key);
        for (tracer, counts) in &agent.counts {
            if let Some(t) = self.tracers.get_mut(tracer) {
                fold_counts(&agent, counts, &mut t.archived);
                if t.archived_procs.len() < MAX_ARCHIVED_PROCESSES {
                    let mut table = CountTable::new();
                    fold_counts(&agent, counts, &mut table);
                    t.archived_procs.push(ArchivedProcess {
                        pid,
                        start_time: agent.hello.start_time,
                        exe: agent.hello.exe.clone(),
                        cmdline: agent.hello.cmdline.clone(),
                        counts: table,
                    });
                }
            }
        }
        for (tracer, report) in &agent.latency {
            if let Some(t) = self.tracers.get_mut(tracer) {
                super::latency::fold_latency(&agent, report, &mut t.archived_latency);
            }
        }
        for (tracer, dropped) in &agent.dropped {
            if let Some(t) = self.tracers.get_mut(tracer) {
                t.archived_dropped = t.archived_dropped.saturating_add(*dropped);
            }
        }
        self.sync_progress(id, None);
        self.check_detach_ops();
        self.gc_tracers();
    }

    /// Disconnected agents to check for liveness (pid, start time).
    pub fn disconnected(&self) -> Vec<(AgentId, u32, u64)> {
        self.agents
            .values()
            .filter(|a| !a.connected)
            .map(|a| (a.id, a.hello.pid, a.hello.start_time))
            .collect()
    }
}

/// Trampolines the agent no longer has were freed (or never installed).
fn forget_unreported(
    agent: &mut Agent,
    reported: &BTreeMap<u64, &pb::TrampolineStatus>,
    now: Instant,
) {
    let id = agent.id;
    for t in agent.trampolines.values_mut() {
        if t.state != TState::Freed && !reported.contains_key(&t.id) {
            if t.state != TState::FreeAuthorized && t.state != TState::Requested {
                tracing::warn!(agent = id, trampoline = t.id, state = ?t.state,
                    "agent re-reported without a trampoline it was not authorized to free");
            }
            t.state = TState::Freed;
            t.sites.clear();
            t.since = now;
        }
    }
}

/// Adopts one re-reported trampoline as the agent describes it (its live sites go
/// into the plan); a retired one starts its grace period anew, over the listed
/// threads still alive. Returns that grace period when it is complete at once.
fn adopt(
    agent: &mut Agent,
    st: &pb::TrampolineStatus,
    live: &BTreeSet<Tid>,
    now: Instant,
) -> Option<GracePeriod> {
    let tid = st.trampoline_id;
    agent.next_trampoline = agent.next_trampoline.max(tid + 1);
    let state = match pb::TrampolineState::try_from(st.state) {
        Ok(pb::TrampolineState::Live) => TState::Live,
        _ => TState::Retired,
    };
    let sites: BTreeSet<u64> = if state == TState::Live {
        st.sites.iter().map(|s| s.address).collect()
    } else {
        BTreeSet::new()
    };
    for s in &st.sites {
        agent.site_names.insert(s.address, s.name.clone());
    }
    for s in &sites {
        agent.site_owner.insert(*s, tid);
    }
    agent.trampolines.insert(
        tid,
        Trampoline {
            id: tid,
            group: st.tracers.clone(),
            sites,
            state,
            retired_epoch: st.retired_epoch,
            since: now,
        },
    );
    if state != TState::Retired {
        return None;
    }
    let holdouts = st.retired_tids.iter().copied().filter(|t| live.contains(t));
    agent
        .grace
        .start(Purpose::Trampoline(tid), st.retired_epoch, holdouts, now)
}
