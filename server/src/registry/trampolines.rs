//! The agent's trampoline reports (`Live`, `InstallFailed`, `Retired`, `Freed`) and
//! the end of grace periods: a retired trampoline is authorized for freeing only when
//! the grace period its `Retired` report started completes ([`Registry::grace_done`]).

use std::collections::BTreeSet;
use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;
use pb::trampoline_report::Report;

use super::Registry;
use super::model::{AgentId, TState, TrampolineId};
use crate::error::CoreError;
use crate::grace::{GracePeriod, Purpose};

/// Freed trampolines remembered per agent for `ListTrampolines { include_freed }`.
const FREED_HISTORY: usize = 256;

fn unexpected(what: &str, tramp: TrampolineId, st: TState) -> CoreError {
    CoreError::Protocol(format!("{what} for trampoline {tramp} which is {st:?}"))
}

impl Registry {
    /// Live reports, retirements and frees. A report that does not fit the
    /// trampoline's state is rejected and changes nothing.
    pub fn trampoline_report(
        &mut self,
        id: AgentId,
        r: pb::TrampolineReport,
        now: Instant,
    ) -> Result<(), CoreError> {
        let tramp = r.trampoline_id;
        let agent = self.agents.get(&id).ok_or(CoreError::UnknownAgent(id))?;
        if !agent.trampolines.contains_key(&tramp) {
            return Err(CoreError::Protocol(format!(
                "report about unknown trampoline {tramp}"
            )));
        }
        match r.report {
            Some(Report::Live(live)) => self.trampoline_live(id, tramp, live, now),
            Some(Report::Failed(f)) => self.trampoline_failed(id, tramp, f, now),
            Some(Report::Retired(ret)) => self.trampoline_retired(id, tramp, ret, now),
            Some(Report::Freed(_)) => self.trampoline_freed(id, tramp, now),
            None => Err(CoreError::Protocol(format!(
                "empty report for trampoline {tramp}"
            ))),
        }
    }

    /// The agent installed the trampoline (or installed it after it was retired):
    /// sites it skipped leave the plan; attach ops waiting on it learn its sites.
    fn trampoline_live(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        live: pb::Live,
        now: Instant,
    ) -> Result<(), CoreError> {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let t = agent.trampolines.get_mut(&tramp).expect("caller checked");
        if t.state == TState::Requested {
            t.state = TState::Live;
            t.since = now;
        } else if t.state != TState::Retiring {
            return Err(unexpected("live report", tramp, t.state));
        }
        let patched = u32::try_from(live.sites.len()).unwrap_or(u32::MAX);
        let skipped_n = u32::try_from(live.skipped.len()).unwrap_or(u32::MAX);
        for e in &live.skipped {
            if let Some(s) = &e.site {
                t.sites.remove(&s.address);
                if agent.site_owner.get(&s.address) == Some(&tramp) {
                    agent.site_owner.remove(&s.address);
                }
                tracing::info!(agent = id, site = %s.name, "site skipped: {}", e.reason);
            }
        }
        for s in &live.sites {
            agent.site_names.insert(s.address, s.name.clone());
        }
        let empty_live = t.sites.is_empty() && t.state == TState::Live;
        let group = t.group_ids();
        self.attach_progress(id, tramp, &group, patched, skipped_n);
        if empty_live {
            self.retire(id, tramp, now);
        }
        Ok(())
    }

    /// The install failed: nothing was allocated, the trampoline never existed in the
    /// agent; attach ops waiting on it fail for this agent.
    fn trampoline_failed(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        f: pb::InstallFailed,
        now: Instant,
    ) -> Result<(), CoreError> {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let t = agent.trampolines.get_mut(&tramp).expect("caller checked");
        if t.state != TState::Requested && t.state != TState::Retiring {
            return Err(unexpected("install failure", tramp, t.state));
        }
        t.state = TState::Freed;
        t.since = now;
        for s in std::mem::take(&mut t.sites) {
            if agent.site_owner.get(&s) == Some(&tramp) {
                agent.site_owner.remove(&s);
            }
        }
        let pid = agent.hello.pid;
        self.attach_install_failed(id, tramp, pid, &f.reason);
        self.prune_freed(id);
        self.check_detach_ops();
        self.gc_tracers();
        Ok(())
    }

    /// The agent unpatched the trampoline and bumped its epoch: the grace period over
    /// the threads it lists starts.
    fn trampoline_retired(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        ret: pb::Retired,
        now: Instant,
    ) -> Result<(), CoreError> {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let t = agent.trampolines.get_mut(&tramp).expect("caller checked");
        if t.state != TState::Retiring {
            return Err(unexpected("retired report", tramp, t.state));
        }
        if ret.epoch < agent.epoch {
            // Ignored: the trampoline stays allocated.
            return Err(CoreError::Protocol(format!(
                "retired report of trampoline {tramp} at epoch {} older than epoch {} already seen",
                ret.epoch, agent.epoch
            )));
        }
        agent.epoch = ret.epoch;
        self.timelines
            .step(id, tramp, pb::GraceStep::ServerRetiredReceived, 0, now);
        self.timelines.epoch(id, tramp, ret.epoch);
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let t = agent.trampolines.get_mut(&tramp).expect("caller checked");
        t.state = TState::Retired;
        t.retired_epoch = ret.epoch;
        t.since = now;
        let done = if self.settings.fault_skip_grace_period {
            // TEST-ONLY fault injection: an empty grace period (see `Settings`).
            tracing::warn!(
                agent = id,
                trampoline = tramp,
                "fault injection: grace period skipped"
            );
            Some(GracePeriod {
                purpose: Purpose::Trampoline(tramp),
                epoch: ret.epoch,
                holdouts: BTreeSet::new(),
                started: now,
            })
        } else {
            agent
                .grace
                .start(Purpose::Trampoline(tramp), ret.epoch, ret.tids, now)
        };
        // A Live report might still be pending for an attach op waiting on it.
        let group = t.group_ids();
        self.attach_progress(id, tramp, &group, 0, 0);
        match done {
            Some(gp) => self.grace_done(id, gp, now),
            None if self.settings.expedite => {
                self.timelines
                    .step(id, tramp, pb::GraceStep::ServerExpediteSent, 0, now);
                self.send(id, ToAgent::Expedite(pb::Expedite {}))
            }
            None => {}
        }
        Ok(())
    }

    /// The agent freed the trampoline. Only an authorized free is recorded: the agent
    /// frees a trampoline when (and only when) it receives AuthorizeFree.
    fn trampoline_freed(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        now: Instant,
    ) -> Result<(), CoreError> {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let t = agent.trampolines.get_mut(&tramp).expect("caller checked");
        if t.state != TState::FreeAuthorized {
            tracing::error!(agent = id, trampoline = tramp, state = ?t.state,
                "agent claims it freed a trampoline without authorization");
            return Err(unexpected(
                "free report without authorization",
                tramp,
                t.state,
            ));
        }
        t.state = TState::Freed;
        t.since = now;
        self.timelines
            .step(id, tramp, pb::GraceStep::ServerFreedReceived, 0, now);
        self.prune_freed(id);
        self.check_detach_ops();
        self.gc_tracers();
        Ok(())
    }

    /// Forgets the oldest freed trampolines beyond [`FREED_HISTORY`].
    fn prune_freed(&mut self, id: AgentId) {
        let Some(a) = self.agents.get_mut(&id) else {
            return;
        };
        let freed: Vec<TrampolineId> = a
            .trampolines
            .values()
            .filter(|t| t.state == TState::Freed)
            .map(|t| t.id)
            .collect();
        if freed.len() > FREED_HISTORY {
            for t in &freed[..freed.len() - FREED_HISTORY] {
                a.trampolines.remove(t);
            }
        }
    }

    /// Grace period `gp` of agent `id` completed: a retired trampoline is authorized
    /// for freeing, a sync learns the agent is done.
    pub(super) fn grace_done(&mut self, id: AgentId, gp: GracePeriod, now: Instant) {
        match gp.purpose {
            Purpose::Trampoline(tramp) => {
                let Some(a) = self.agents.get_mut(&id) else {
                    return;
                };
                if let Some(t) = a.trampolines.get_mut(&tramp)
                    && t.state == TState::Retired
                {
                    t.state = TState::FreeAuthorized;
                    t.since = now;
                    self.timelines
                        .step(id, tramp, pb::GraceStep::ServerAuthorizeSent, 0, now);
                    self.send(
                        id,
                        ToAgent::AuthorizeFree(pb::AuthorizeFree {
                            trampoline_ids: vec![tramp],
                        }),
                    );
                }
                self.check_detach_ops();
            }
            Purpose::Sync(sync_id) => self.sync_progress(id, Some(sync_id)),
        }
    }
}
