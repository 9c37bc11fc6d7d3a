//! The server's state machine: agents, threads, tracers, trampolines, and the
//! operations clients wait on. Plain synchronous Rust with no I/O: every input is a
//! method call, every output an [`Effect`] the shell carries out (a message to an
//! agent, a reply to a waiting client, events for watchers).
//!
//! One module per concern, each with its `impl Registry` block:
//! - `model` — ids, [`Caller`], [`Settings`], [`Effect`], [`Reply`], and the records
//!   ([`Agent`], [`Trampoline`] with its [`TState`], [`Tracer`], waiting ops);
//! - `validate` — checks of patterns, callbacks and hellos (pure functions);
//! - `session` — an agent's hello (re-adoption of its trampolines, `reconcile`),
//!   disconnect and exit;
//! - `reports` — the entry of every agent message (`agent_message`) and the plain
//!   reports: threads, quiescent stamps, stalls, counts, events, callbacks, errors;
//! - `functions` — Control.ListFunctions and the agent's function lists;
//! - `attach` — Control.Attach and the (re)attach of tracers to agents;
//! - `plan` — site planning: moving sites between trampolines of callback groups,
//!   retiring trampolines;
//! - `trampolines` — the agent's trampoline reports and the end of grace periods;
//! - `detach` — Control.Detach and the withdrawal and garbage collection of tracers;
//! - `sync` — Control.Synchronize and barrier answers;
//! - `persist` — the tracer generation, saved and restored tracers;
//! - `views` — the queries (agents, tracers, trampolines, grace periods, counts);
//! - `invariants` — [`Registry::check_invariants`].
//!
//! Invariants kept here:
//! - a trampoline is authorized for freeing only when the [`Grace`] engine of its agent
//!   completes the grace period started by its `Retired` report (see `grace.rs`);
//! - the planned site assignment (`Agent::site_owner`) is updated when the server
//!   sends `Install`/`Remove`; the agent applies them in stream order, so the agent's
//!   view converges to the plan;
//! - a failed request (bad input, unknown pid/tracer, no permission) changes nothing;
//! - tracers restored after a server restart ([`Registry::restore_tracers`]) keep their
//!   ids, and ids are never reused; a re-reported trampoline whose group names active
//!   tracers with their callbacks stays live untouched (`reconcile`), and a retired one
//!   is freed only after a grace period started by this registry.
//!
//! [`Grace`]: crate::grace::Grace

use std::collections::{BTreeMap, HashMap};

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use crate::error::CoreError;

mod attach;
mod detach;
mod functions;
mod invariants;
mod latency;
mod model;
mod persist;
mod plan;
mod reports;
mod session;
mod sync;
mod trampolines;
mod validate;
mod views;

pub use model::{
    Agent, AgentId, Caller, Effect, OpId, Reply, Settings, TState, Tracer, TracerId, TracerState,
    Trampoline, TrampolineId,
};
pub use persist::SavedTracer;
pub use validate::{ParentFacts, parent_claim_ok};

use model::{Op, Request};

/// The registry and state machine.
#[derive(Default)]
pub struct Registry {
    pub settings: Settings,
    agents: BTreeMap<AgentId, Agent>,
    by_identity: HashMap<(u32, u64), AgentId>,
    /// Parentage from the hellos (kept after the agents left), for tree tracers.
    parents: model::Parents,
    tracers: BTreeMap<TracerId, Tracer>,
    requests: HashMap<u64, (AgentId, Request)>,
    ops: BTreeMap<OpId, Op>,
    next_agent: AgentId,
    next_tracer: TracerId,
    next_request: u64,
    next_op: OpId,
    next_sync: u64,
    effects: Vec<Effect>,
    /// The newest trampoline grace periods, step by step (diagnostic only).
    timelines: crate::timeline::Timelines,
    /// Bumped whenever the set of active tracers (or the next tracer id) changes:
    /// the shell persists [`Registry::saved_tracers`] when it moves.
    tracer_generation: u64,
}

impl Registry {
    pub fn new(settings: Settings) -> Self {
        Registry {
            settings,
            next_agent: 1,
            next_tracer: 1,
            next_request: 1,
            next_op: 1,
            next_sync: 1,
            ..Default::default()
        }
    }

    /// Takes the effects produced since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn send(&mut self, agent: AgentId, msg: ToAgent) {
        self.effects.push(Effect::Send(agent, msg));
    }

    fn reply(&mut self, op: OpId, r: Reply) {
        self.ops.remove(&op);
        self.effects.push(Effect::Reply(op, r));
    }

    fn new_op(&mut self, op: Op) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, op);
        id
    }

    /// The shell gave up waiting on an operation (deadline). Grace periods of a
    /// cancelled sync are abandoned; a detach's grace periods go on. Returns what the
    /// operation was still waiting for, in words.
    pub fn cancel(&mut self, op: OpId) -> Option<String> {
        let o = self.ops.remove(&op)?;
        Some(match o {
            Op::Sync {
                sync_id, waiting, ..
            } => self.sync_timed_out(sync_id, waiting),
            Op::Detach { waiting, .. } => self.detach_timed_out(&waiting),
            Op::Attach { steps, .. } => self.attach_timed_out(&steps),
            Op::Functions => "the agent did not answer in time".into(),
        })
    }

    pub fn agent(&self, id: AgentId) -> Option<&Agent> {
        self.agents.get(&id)
    }

    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    pub fn tracer(&self, id: TracerId) -> Option<&Tracer> {
        self.tracers.get(&id)
    }

    /// The connected agent of `pid`, if `caller` may trace it.
    fn agent_by_pid(&self, caller: Caller, pid: u32) -> Result<AgentId, CoreError> {
        let found = self
            .agents
            .values()
            .filter(|a| a.hello.pid == pid && a.connected)
            .map(|a| (a.id, a.hello.uid))
            .next();
        match found {
            None => Err(CoreError::NoAgent(pid)),
            Some((_, uid)) if !caller.may_see(uid) => Err(CoreError::PermissionDenied(format!(
                "pid {pid} belongs to uid {uid}; you are uid {}: only its owner or root may trace it",
                caller.uid
            ))),
            Some((id, _)) => Ok(id),
        }
    }

    /// Tracer `id`, if `caller` may see it.
    fn visible_tracer(&self, caller: Caller, id: TracerId) -> Result<&Tracer, CoreError> {
        let t = self.tracers.get(&id).ok_or(CoreError::UnknownTracer(id))?;
        if !caller.may_see(t.owner_uid) {
            return Err(CoreError::PermissionDenied(format!(
                "tracer {id} belongs to uid {}; you are uid {}",
                t.owner_uid, caller.uid
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile_tests;
