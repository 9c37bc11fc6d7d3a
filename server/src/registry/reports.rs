//! The entry of every agent message after the hello ([`Registry::agent_message`]) and
//! the plain reports: thread births and exits, quiescent stamps, stalls, counts,
//! events, registered callbacks and errors. Function lists, trampoline reports and
//! barrier answers have their own modules (`functions`, `trampolines`, `sync`).

use std::collections::BTreeSet;
use std::time::Instant;

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;

use super::Registry;
use super::model::{Agent, AgentId, Effect, TracerId};
use crate::error::CoreError;
use crate::grace::Tid;

impl Registry {
    pub(super) fn agent_mut(&mut self, id: AgentId) -> Result<&mut Agent, CoreError> {
        self.agents.get_mut(&id).ok_or(CoreError::UnknownAgent(id))
    }

    /// One message of an agent's stream (after its hello). `Err` says precisely why
    /// the message was rejected; a rejected message changes nothing. Messages that are
    /// stale but possible in a correct agent (a stamp of a thread that exited, counts
    /// of a tracer an inherited trampoline still calls) are accepted and ignored.
    pub fn agent_message(
        &mut self,
        id: AgentId,
        body: Option<FromAgent>,
        now: Instant,
    ) -> Result<(), CoreError> {
        if !self.agents.get(&id).is_some_and(|a| a.connected) {
            return Err(CoreError::UnknownAgent(id));
        }
        let Some(body) = body else {
            return Err(CoreError::Protocol("empty agent message".into()));
        };
        match body {
            FromAgent::Hello(_) => Err(CoreError::Protocol(
                "second Hello on one session: an agent says hello once per connection".into(),
            )),
            FromAgent::ThreadsBorn(t) => self.threads_born(id, &t.tids),
            FromAgent::ThreadsExited(t) => self.threads_exited(id, &t.tids, now),
            FromAgent::Quiescent(q) => self.quiescent(id, &q.reports, now),
            FromAgent::FunctionList(l) => self.function_list(id, l, now),
            FromAgent::Trampoline(t) => self.trampoline_report(id, t, now),
            FromAgent::Stalls(s) => self.stalls(id, s.stalls, now),
            FromAgent::Events(e) => self.events(id, e),
            FromAgent::Counts(c) => self.count_report(id, c),
            FromAgent::Latency(l) => self.latency_report(id, l),
            FromAgent::Error(e) => {
                self.agent_error(id, &e.message);
                Ok(())
            }
            FromAgent::Barrier(b) => self.barrier_report(id, b, now),
            FromAgent::Callbacks(c) => self.callbacks_changed(id, c.names),
            FromAgent::FunctionsAdded(f) => self.functions_added(id, f),
            FromAgent::FunctionsRemoved(r) => {
                self.sites_removed(id, &r.sites, now);
                Ok(())
            }
            FromAgent::GraceTimeline(t) => {
                // Diagnostic only: kept for `GracePeriods` timelines, never trusted.
                self.timelines.agent_steps(id, t);
                Ok(())
            }
        }
    }

    /// Threads were created. A tid already known alive is left as it is (the kernel
    /// never reuses the tid of a live thread, so it is the same thread).
    pub fn threads_born(&mut self, id: AgentId, tids: &[Tid]) -> Result<(), CoreError> {
        if tids.contains(&0) {
            return Err(CoreError::Protocol("thread birth of tid 0".into()));
        }
        let a = self.agent_mut(id)?;
        for t in tids {
            a.grace.thread_born(*t);
        }
        Ok(())
    }

    /// Threads exited. Exits of threads not known alive are ignored.
    pub fn threads_exited(
        &mut self,
        id: AgentId,
        tids: &[Tid],
        now: Instant,
    ) -> Result<(), CoreError> {
        let a = self.agent_mut(id)?;
        let mut done = Vec::new();
        let mut steps = Vec::new();
        for t in tids {
            a.stalls.remove(t);
            holdout_steps(a, *t, u64::MAX, &mut steps);
            done.extend(a.grace.thread_exited(*t));
        }
        for (tramp, tid) in steps {
            self.timelines
                .step(id, tramp, pb::GraceStep::ServerExitReceived, tid, now);
        }
        for gp in done {
            self.grace_done(id, gp, now);
        }
        Ok(())
    }

    /// Quiescent stamps. Stamps of threads not known alive are ignored (see `grace.rs`).
    pub fn quiescent(
        &mut self,
        id: AgentId,
        reports: &[pb::Quiescent],
        now: Instant,
    ) -> Result<(), CoreError> {
        let a = self.agent_mut(id)?;
        let mut done = Vec::new();
        let mut steps = Vec::new();
        for q in reports {
            a.stalls.remove(&q.tid);
            if a.grace.threads().any(|t| t == q.tid) {
                holdout_steps(a, q.tid, q.epoch, &mut steps);
            }
            done.extend(a.grace.quiescent(q.tid, q.epoch));
        }
        for (tramp, tid) in steps {
            self.timelines
                .step(id, tramp, pb::GraceStep::ServerStampReceived, tid, now);
        }
        for gp in done {
            self.grace_done(id, gp, now);
        }
        Ok(())
    }

    /// Stall reports. Reports about threads not known alive are ignored.
    pub fn stalls(
        &mut self,
        id: AgentId,
        stalls: Vec<pb::Stall>,
        now: Instant,
    ) -> Result<(), CoreError> {
        let a = self.agent_mut(id)?;
        let alive: BTreeSet<Tid> = a.grace.threads().collect();
        for s in stalls {
            if alive.contains(&s.tid) {
                a.stalls.insert(s.tid, (s, now));
            }
        }
        Ok(())
    }

    pub fn count_report(&mut self, id: AgentId, report: pb::CountReport) -> Result<(), CoreError> {
        if !self.agents.contains_key(&id) {
            return Err(CoreError::UnknownAgent(id));
        }
        if !self.tracer_applies(report.tracer_id, id) {
            // E.g. a forked child still running its parent's inherited trampoline
            // until reconcile removes it: its calls are not the tracer's.
            return Ok(());
        }
        let a = self.agent_mut(id)?;
        for c in &report.counts {
            if let Some(site) = &c.site
                && !site.name.is_empty()
            {
                a.site_names.insert(site.address, site.name.clone());
            }
        }
        a.counts.insert(report.tracer_id, report.counts);
        Ok(())
    }

    /// Whether tracer `tracer` exists and is meant for agent `id`.
    pub(super) fn tracer_applies(&self, tracer: TracerId, id: AgentId) -> bool {
        match (self.tracers.get(&tracer), self.agents.get(&id)) {
            (Some(t), Some(a)) => t.targets(a, &self.parents),
            _ => false,
        }
    }

    /// Decodes an event batch. A malformed batch is rejected whole.
    pub fn events(&mut self, id: AgentId, batch: pb::EventBatch) -> Result<(), CoreError> {
        if !self.agents.contains_key(&id) {
            return Err(CoreError::UnknownAgent(id));
        }
        let events = pb::events::decode(&batch.data, batch.record_count)
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
        self.decoded_events(id, batch.tracer_id, batch.dropped, events)
    }

    /// An event batch of the agent's `Events` stream, decoded by the caller outside
    /// the registry's lock (`pb::events::decode`: a malformed batch never gets here):
    /// names the events and hands them to the tracer's watchers. `dropped` is the
    /// batch's cumulative drop count.
    pub fn decoded_events(
        &mut self,
        id: AgentId,
        tracer_id: TracerId,
        dropped: u64,
        mut events: Vec<pb::Event>,
    ) -> Result<(), CoreError> {
        if !self.agents.get(&id).is_some_and(|a| a.connected) {
            return Err(CoreError::UnknownAgent(id));
        }
        if !self.tracer_applies(tracer_id, id) {
            return Ok(());
        }
        let a = self.agent_mut(id)?;
        let prev = a.dropped.entry(tracer_id).or_insert(0);
        *prev = (*prev).max(dropped);
        // Events of a flood mostly come from a few sites: look each name up once per
        // run of equal addresses.
        let mut last: Option<(u64, String)> = None;
        for e in &mut events {
            let name = match &last {
                Some((addr, name)) if *addr == e.address => name.clone(),
                _ => {
                    let name = a.name_of(e.address);
                    last = Some((e.address, name.clone()));
                    name
                }
            };
            e.function = name;
        }
        let view = pb::EventBatchView {
            agent_id: id,
            pid: a.hello.pid,
            tracer_id,
            events,
            dropped,
        };
        self.effects.push(Effect::Events(tracer_id, view));
        Ok(())
    }

    /// The program registered callbacks after its hello.
    pub fn callbacks_changed(&mut self, id: AgentId, names: Vec<String>) -> Result<(), CoreError> {
        self.agent_mut(id)?.hello.callbacks = names;
        Ok(())
    }

    pub fn agent_error(&mut self, id: AgentId, message: &str) {
        tracing::warn!(agent = id, "agent reported: {message}");
        if let Some(a) = self.agents.get_mut(&id) {
            a.last_error = Some(message.to_string());
        }
    }
}

/// The trampoline grace periods of `a` that `tid` holds and that evidence at `epoch`
/// releases: `(trampoline, tid)` for their timelines.
fn holdout_steps(a: &Agent, tid: Tid, epoch: u64, out: &mut Vec<(u64, Tid)>) {
    for gp in a.grace.pending() {
        if let crate::grace::Purpose::Trampoline(tramp) = gp.purpose
            && gp.epoch <= epoch
            && gp.holdouts.contains(&tid)
        {
            out.push((tramp, tid));
        }
    }
}
