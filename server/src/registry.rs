//! The server's state machine: agents, threads, tracers, trampolines, and the
//! operations clients wait on. Plain synchronous Rust with no I/O: every input is a
//! method call, every output an [`Effect`] the shell carries out (a message to an
//! agent, a reply to a waiting client, events for watchers).
//!
//! Invariants kept here:
//! - a trampoline is authorized for freeing only when the [`Grace`] engine of its agent
//!   completes the grace period started by its `Retired` report (see `grace.rs`);
//! - the planned site assignment (`Agent::site_owner`) is updated when the server
//!   sends `Install`/`Remove`; the agent applies them in stream order, so the agent's
//!   view converges to the plan;
//! - a failed request (bad input, unknown pid/tracer, no permission) changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use crate::error::CoreError;
use crate::grace::{Grace, GracePeriod, Purpose, Tid};

pub type AgentId = u64;
pub type TracerId = u64;
pub type TrampolineId = u64;
/// A client operation waiting for agents (attach, detach, sync, function listing).
pub type OpId = u64;

/// Freed trampolines remembered per agent for `ListTrampolines { include_freed }`.
const FREED_HISTORY: usize = 256;

/// Who is asking. Clients over TCP hold the token and act as root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0 };
    fn may_see(self, uid: u32) -> bool {
        self.uid == 0 || self.uid == uid
    }
}

/// Server settings the core needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub stall_threshold: Duration,
    /// Ask agents to expedite (signal running threads) as soon as a grace period starts.
    pub expedite: bool,
    pub agent: pb::AgentSettings,
    /// TEST-ONLY FAULT INJECTION (`patchbayd --fault-skip-grace-period`, hidden): a
    /// retired trampoline is authorized for freeing at once, without its grace period.
    /// This is the bug the torture test must catch (`integration-tests/tests/torture.rs`);
    /// never enable it anywhere else.
    pub fault_skip_grace_period: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stall_threshold: Duration::from_millis(1000),
            expedite: true,
            agent: pb::AgentSettings {
                qs_signal: 0,
                stall_threshold_ms: 1000,
                flush_interval_ms: 100,
            },
            fault_skip_grace_period: false,
        }
    }
}

/// What the shell must do after a call into the core.
#[derive(Debug)]
pub enum Effect {
    /// Send a message to a connected agent.
    Send(AgentId, ToAgent),
    /// Answer a waiting client operation.
    Reply(OpId, Reply),
    /// Decoded trace events for watchers of a tracer.
    Events(TracerId, pb::EventBatchView),
}

#[derive(Debug)]
pub enum Reply {
    Functions(Result<pb::ListFunctionsResponse, CoreError>),
    Attach(Result<pb::AttachResponse, CoreError>),
    Detach(Result<pb::DetachResponse, CoreError>),
    Sync(Result<pb::SynchronizeResponse, CoreError>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TState {
    Requested,
    Live,
    Retiring,
    Retired,
    FreeAuthorized,
    Freed,
}

impl TState {
    pub fn to_proto(self) -> pb::TrampolineState {
        match self {
            TState::Requested => pb::TrampolineState::Requested,
            TState::Live => pb::TrampolineState::Live,
            TState::Retiring => pb::TrampolineState::Retiring,
            TState::Retired => pb::TrampolineState::Retired,
            TState::FreeAuthorized => pb::TrampolineState::FreeAuthorized,
            TState::Freed => pb::TrampolineState::Freed,
        }
    }
    /// Sites may call it (or will, once installed).
    fn active(self) -> bool {
        matches!(self, TState::Requested | TState::Live)
    }
}

#[derive(Clone, Debug)]
pub struct Trampoline {
    pub id: TrampolineId,
    pub group: Vec<pb::TracerRef>,
    pub sites: BTreeSet<u64>,
    pub state: TState,
    pub retired_epoch: u64,
    pub since: Instant,
}

impl Trampoline {
    fn has_tracer(&self, t: TracerId) -> bool {
        self.group.iter().any(|r| r.tracer_id == t)
    }
    fn group_ids(&self) -> Vec<TracerId> {
        self.group.iter().map(|r| r.tracer_id).collect()
    }
}

#[derive(Debug)]
pub struct Agent {
    pub id: AgentId,
    pub hello: pb::Hello,
    pub connected: bool,
    pub epoch: u64,
    pub grace: Grace,
    pub trampolines: BTreeMap<TrampolineId, Trampoline>,
    next_trampoline: TrampolineId,
    /// Planned owner trampoline of each patched site.
    site_owner: BTreeMap<u64, TrampolineId>,
    site_names: HashMap<u64, String>,
    stalls: BTreeMap<Tid, (pb::Stall, Instant)>,
    counts: BTreeMap<TracerId, Vec<pb::SiteCount>>,
    dropped: BTreeMap<TracerId, u64>,
}

impl Agent {
    fn live_trampolines(&self) -> usize {
        self.trampolines
            .values()
            .filter(|t| t.state != TState::Freed)
            .count()
    }
    fn name_of(&self, addr: u64) -> String {
        self.site_names.get(&addr).cloned().unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracerState {
    Active,
    Detaching,
}

#[derive(Clone, Debug)]
pub struct Tracer {
    pub id: TracerId,
    pub spec: pb::TracerSpec,
    pub owner_uid: u32,
    pub state: TracerState,
    /// Counts and drops of agents whose process exited, kept for the tracer's life.
    archived: CountTable,
    archived_dropped: u64,
}

/// Counts by function name, with the agents that contributed.
type CountTable = BTreeMap<String, (u64, BTreeSet<AgentId>)>;

fn fold_counts(agent: &Agent, counts: &[pb::SiteCount], into: &mut CountTable) {
    for c in counts {
        let (addr, name) = c
            .site
            .as_ref()
            .map(|s| (s.address, s.name.clone()))
            .unwrap_or_default();
        let name = if name.is_empty() {
            agent.name_of(addr)
        } else {
            name
        };
        let name = if name.is_empty() {
            format!("{addr:#x}")
        } else {
            name
        };
        let e = into.entry(name).or_default();
        e.0 += c.count;
        e.1.insert(agent.id);
    }
}

impl Tracer {
    fn reference(&self) -> pb::TracerRef {
        pb::TracerRef {
            tracer_id: self.id,
            callback: self.spec.callback.clone(),
        }
    }
    fn targets(&self, agent: &Agent) -> bool {
        let uid_ok = self.owner_uid == 0 || self.owner_uid == agent.hello.uid;
        uid_ok
            && match self.spec.target.as_ref().and_then(|t| t.target.as_ref()) {
                Some(pb::target::Target::Pid(p)) => *p == agent.hello.pid,
                Some(pb::target::Target::Exe(e)) => *e == agent.hello.exe,
                Some(pb::target::Target::All(all)) => *all,
                None => false,
            }
    }
}

/// Why an agent was asked for its functions.
#[derive(Clone, Copy, Debug)]
enum Request {
    Functions { op: OpId, limit: u32 },
    Attach { tracer: TracerId, op: Option<OpId> },
}

#[derive(Debug)]
enum AttachStep {
    Listing,
    Installing(BTreeSet<TrampolineId>),
    Done,
}

#[derive(Debug)]
enum Op {
    Functions,
    Attach {
        tracer: TracerId,
        pid_target: bool,
        steps: BTreeMap<AgentId, AttachStep>,
        results: BTreeMap<AgentId, pb::AgentAttachResult>,
        errors: BTreeMap<AgentId, CoreError>,
    },
    Detach {
        waiting: BTreeSet<(AgentId, TrampolineId)>,
        retired: Vec<pb::TrampolineRef>,
    },
    Sync {
        sync_id: u64,
        waiting: BTreeSet<AgentId>,
        agents: u32,
        threads: u32,
        started: Instant,
    },
}

/// The registry and state machine.
#[derive(Default)]
pub struct Registry {
    pub settings: Settings,
    agents: BTreeMap<AgentId, Agent>,
    by_identity: HashMap<(u32, u64), AgentId>,
    tracers: BTreeMap<TracerId, Tracer>,
    requests: HashMap<u64, (AgentId, Request)>,
    ops: BTreeMap<OpId, Op>,
    next_agent: AgentId,
    next_tracer: TracerId,
    next_request: u64,
    next_op: OpId,
    next_sync: u64,
    effects: Vec<Effect>,
}

fn validate_pattern(pattern: &str) -> Result<(), CoreError> {
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

fn validate_callback(cb: Option<&pb::CallbackSpec>) -> Result<(), CoreError> {
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

    pub fn agent(&self, id: AgentId) -> Option<&Agent> {
        self.agents.get(&id)
    }

    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    pub fn tracer(&self, id: TracerId) -> Option<&Tracer> {
        self.tracers.get(&id)
    }

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

    // ----------------------------------------------------------------- agents

    /// An agent said hello. `peer` is (pid, uid) from SO_PEERCRED when known.
    /// Returns the agent id and the welcome to send; on error nothing changed.
    pub fn agent_hello(
        &mut self,
        peer: Option<(u32, u32)>,
        hello: pb::Hello,
        now: Instant,
    ) -> Result<(AgentId, pb::Welcome), CoreError> {
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
        let key = (hello.pid, hello.start_time);
        let (id, resumed) = match self.by_identity.get(&key) {
            Some(&id) if self.agents[&id].connected => {
                return Err(CoreError::AlreadyConnected(hello.pid));
            }
            Some(&id) => (id, true),
            None => {
                let id = self.next_agent;
                self.next_agent += 1;
                (id, false)
            }
        };
        if !resumed {
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
            self.agents.insert(
                id,
                Agent {
                    id,
                    hello: hello.clone(),
                    connected: true,
                    epoch: hello.epoch,
                    grace: Grace::new(),
                    trampolines: BTreeMap::new(),
                    next_trampoline: 1,
                    site_owner: BTreeMap::new(),
                    site_names: HashMap::new(),
                    stalls: BTreeMap::new(),
                    counts: BTreeMap::new(),
                    dropped: BTreeMap::new(),
                },
            );
            self.by_identity.insert(key, id);
        }
        let agent = self.agents.get_mut(&id).expect("inserted above");
        agent.connected = true;
        agent.epoch = agent.epoch.max(hello.epoch);
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
            },
        ))
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
        // Trampolines the agent no longer has were freed (or never installed).
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
        agent.site_owner.clear();
        let mut authorize = Vec::new();
        for (tid, st) in reported {
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
            if state == TState::Retired {
                let holdouts = st.retired_tids.iter().copied().filter(|t| live.contains(t));
                if let Some(gp) =
                    agent
                        .grace
                        .start(Purpose::Trampoline(tid), st.retired_epoch, holdouts, now)
                {
                    authorize.push(gp);
                }
            }
        }
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
    fn reconcile(&mut self, id: AgentId, now: Instant) {
        let agent = &self.agents[&id];
        let mut present: BTreeSet<TracerId> = BTreeSet::new();
        let mut stale: BTreeSet<TracerId> = BTreeSet::new();
        for t in agent.trampolines.values().filter(|t| t.state.active()) {
            for tr in t.group_ids() {
                // A tracer that is gone, detaching, or not meant for this process (a
                // forked child inherits its parent's patched code) is removed here.
                match self.tracers.get(&tr) {
                    Some(x) if x.state == TracerState::Active && x.targets(agent) => {
                        present.insert(tr);
                    }
                    _ => {
                        stale.insert(tr);
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
        let wanted: Vec<TracerId> = self
            .tracers
            .values()
            .filter(|t| t.state == TracerState::Active && !present.contains(&t.id))
            .filter(|t| t.targets(&self.agents[&id]))
            .map(|t| t.id)
            .collect();
        for tr in wanted {
            self.request_functions(
                id,
                Request::Attach {
                    tracer: tr,
                    op: None,
                },
            );
        }
    }

    /// The agent's stream ended. Its process may still live; it keeps its state.
    pub fn agent_disconnected(&mut self, id: AgentId) {
        let Some(agent) = self.agents.get_mut(&id) else {
            return;
        };
        agent.connected = false;
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
        let ops: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Attach { steps, .. } if matches!(steps.get(&id), Some(AttachStep::Installing(_)))))
            .map(|(o, _)| *o)
            .collect();
        for op in ops {
            self.attach_agent_result(op, id, Err(CoreError::AgentLost { pid }));
        }
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
            }
        }
        for (tracer, dropped) in &agent.dropped {
            if let Some(t) = self.tracers.get_mut(tracer) {
                t.archived_dropped += dropped;
            }
        }
        self.sync_progress(id, None);
        self.check_detach_ops();
        self.gc_tracers();
    }

    pub fn threads_born(&mut self, id: AgentId, tids: &[Tid]) {
        if let Some(a) = self.agents.get_mut(&id) {
            for t in tids {
                a.grace.thread_born(*t);
            }
        }
    }

    pub fn threads_exited(&mut self, id: AgentId, tids: &[Tid], now: Instant) {
        let mut done = Vec::new();
        if let Some(a) = self.agents.get_mut(&id) {
            for t in tids {
                a.stalls.remove(t);
                done.extend(a.grace.thread_exited(*t));
            }
        }
        for gp in done {
            self.grace_done(id, gp, now);
        }
    }

    pub fn quiescent(&mut self, id: AgentId, reports: &[pb::Quiescent], now: Instant) {
        let mut done = Vec::new();
        if let Some(a) = self.agents.get_mut(&id) {
            for q in reports {
                a.stalls.remove(&q.tid);
                done.extend(a.grace.quiescent(q.tid, q.epoch));
            }
        }
        for gp in done {
            self.grace_done(id, gp, now);
        }
    }

    pub fn stalls(&mut self, id: AgentId, stalls: Vec<pb::Stall>, now: Instant) {
        if let Some(a) = self.agents.get_mut(&id) {
            for s in stalls {
                a.stalls.insert(s.tid, (s, now));
            }
        }
    }

    pub fn count_report(&mut self, id: AgentId, report: pb::CountReport) {
        if !self.tracer_applies(report.tracer_id, id) {
            // E.g. a forked child still running its parent's inherited trampoline
            // until reconcile removes it: its calls are not the tracer's.
            return;
        }
        if let Some(a) = self.agents.get_mut(&id) {
            for c in &report.counts {
                if let Some(site) = &c.site
                    && !site.name.is_empty()
                {
                    a.site_names.insert(site.address, site.name.clone());
                }
            }
            a.counts.insert(report.tracer_id, report.counts);
        }
    }

    /// Decodes an event batch. A malformed batch is rejected whole.
    /// Whether tracer `tracer` exists and is meant for agent `id`.
    fn tracer_applies(&self, tracer: TracerId, id: AgentId) -> bool {
        match (self.tracers.get(&tracer), self.agents.get(&id)) {
            (Some(t), Some(a)) => t.targets(a),
            _ => false,
        }
    }

    pub fn events(&mut self, id: AgentId, batch: pb::EventBatch) -> Result<(), CoreError> {
        if !self.tracer_applies(batch.tracer_id, id) {
            return Ok(());
        }
        let Some(a) = self.agents.get_mut(&id) else {
            return Ok(());
        };
        let events = decode_events(&batch.data, batch.record_count)?;
        let prev = a.dropped.entry(batch.tracer_id).or_insert(0);
        *prev = (*prev).max(batch.dropped);
        let view = pb::EventBatchView {
            agent_id: id,
            pid: a.hello.pid,
            tracer_id: batch.tracer_id,
            events: events
                .into_iter()
                .map(|mut e| {
                    e.function = a.name_of(e.address);
                    e
                })
                .collect(),
            dropped: batch.dropped,
        };
        self.effects.push(Effect::Events(batch.tracer_id, view));
        Ok(())
    }

    /// The program registered callbacks after its hello.
    pub fn callbacks_changed(&mut self, id: AgentId, names: Vec<String>) {
        if let Some(a) = self.agents.get_mut(&id) {
            a.hello.callbacks = names;
        }
    }

    pub fn agent_error(&mut self, id: AgentId, message: &str) {
        tracing::warn!(agent = id, "agent reported: {message}");
    }

    // ------------------------------------------------------ functions & attach

    fn request_functions(&mut self, agent: AgentId, req: Request) {
        let rid = self.next_request;
        self.next_request += 1;
        self.requests.insert(rid, (agent, req));
        let pattern = match req {
            Request::Attach { tracer, .. } => self.tracers[&tracer].spec.pattern.clone(),
            Request::Functions { .. } => unreachable!("list_functions sends its own"),
        };
        self.send(
            agent,
            ToAgent::ListFunctions(pb::ListFunctions {
                request_id: rid,
                pattern,
                patchable_only: true,
            }),
        );
    }

    /// Control.ListFunctions: asks the agent; the answer comes as a [`Reply`].
    pub fn list_functions(
        &mut self,
        caller: Caller,
        req: pb::ListFunctionsRequest,
    ) -> Result<OpId, CoreError> {
        let pattern = if req.pattern.is_empty() {
            "*".to_string()
        } else {
            req.pattern
        };
        validate_pattern(&pattern)?;
        let agent = self.agent_by_pid(caller, req.pid)?;
        let op = self.new_op(Op::Functions);
        let rid = self.next_request;
        self.next_request += 1;
        self.requests.insert(
            rid,
            (
                agent,
                Request::Functions {
                    op,
                    limit: req.limit,
                },
            ),
        );
        self.send(
            agent,
            ToAgent::ListFunctions(pb::ListFunctions {
                request_id: rid,
                pattern,
                patchable_only: false,
            }),
        );
        Ok(op)
    }

    pub fn function_list(&mut self, id: AgentId, list: pb::FunctionList, now: Instant) {
        let Some((agent, req)) = self.requests.remove(&list.request_id) else {
            tracing::warn!(
                agent = id,
                request = list.request_id,
                "answer to an unknown request"
            );
            return;
        };
        if agent != id {
            tracing::warn!(agent = id, "agent answered another agent's request");
            self.requests.insert(list.request_id, (agent, req));
            return;
        }
        let pid = self.agents.get(&id).map(|a| a.hello.pid).unwrap_or(0);
        if let Some(a) = self.agents.get_mut(&id) {
            for f in &list.functions {
                a.site_names.insert(f.address, f.name.clone());
            }
        }
        match req {
            Request::Functions { op, limit } => {
                let r = if !list.error.is_empty() {
                    Err(CoreError::AgentFailed {
                        pid,
                        message: list.error,
                    })
                } else {
                    let total = list.functions.len() as u32;
                    let mut functions = list.functions;
                    functions.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
                    if limit > 0 {
                        functions.truncate(limit as usize);
                    }
                    Ok(pb::ListFunctionsResponse { functions, total })
                };
                self.reply(op, Reply::Functions(r));
            }
            Request::Attach { tracer, op } => {
                let active =
                    matches!(self.tracers.get(&tracer), Some(t) if t.state == TracerState::Active);
                if !list.error.is_empty() {
                    if let Some(op) = op {
                        self.attach_agent_result(
                            op,
                            id,
                            Err(CoreError::AgentFailed {
                                pid,
                                message: list.error,
                            }),
                        );
                    }
                    return;
                }
                if !active {
                    return;
                }
                let sites: Vec<u64> = list
                    .functions
                    .iter()
                    .filter(|f| f.patchable)
                    .map(|f| f.address)
                    .collect();
                let unpatchable =
                    (list.functions.len() - sites.len()) as u32 + list.unpatchable_matches;
                let skipped = unpatchable;
                if sites.is_empty() {
                    if let Some(op) = op {
                        let pattern = self.tracers[&tracer].spec.pattern.clone();
                        let hint = if unpatchable == 0 {
                            ": list functions with `patchbay functions --pid PID`".to_string()
                        } else {
                            // The agent sends a few unpatchable matches with their reason.
                            let why = list
                                .functions
                                .iter()
                                .find(|f| !f.reason.is_empty())
                                .map(|f| format!("{}: {}", f.name, f.reason))
                                .unwrap_or_else(|| {
                                    "not instrumented: build with -pg -mfentry -mrecord-mcount or -fpatchable-function-entry=5".into()
                                });
                            format!(
                                " ({unpatchable} match but none is patchable; {why}; all reasons: `patchbay functions --pid {pid} '{pattern}'`)",
                                pattern = self.tracers[&tracer].spec.pattern
                            )
                        };
                        self.attach_agent_result(
                            op,
                            id,
                            Err(CoreError::NoMatch { pattern, pid, hint }),
                        );
                    }
                    return;
                }
                let installed = self.add_tracer_to_sites(id, tracer, &sites, now);
                if let Some(op) = op {
                    if let Some(Op::Attach { steps, results, .. }) = self.ops.get_mut(&op) {
                        steps.insert(id, AttachStep::Installing(installed));
                        let r = results.entry(id).or_default();
                        r.agent_id = id;
                        r.pid = pid;
                        r.sites_skipped += skipped;
                    }
                    self.check_attach(op);
                }
            }
        }
    }

    /// Control.Attach. The reply comes once connected target agents are live.
    pub fn attach(&mut self, caller: Caller, req: pb::AttachRequest) -> Result<OpId, CoreError> {
        let spec = req
            .spec
            .ok_or_else(|| CoreError::Invalid("missing tracer spec".into()))?;
        validate_pattern(&spec.pattern)?;
        validate_callback(spec.callback.as_ref())?;
        let target = spec
            .target
            .as_ref()
            .and_then(|t| t.target.clone())
            .ok_or_else(|| {
                CoreError::Invalid("missing target: give a pid, an exe path or all".into())
            })?;
        let pid_target = match &target {
            pb::target::Target::Pid(p) => {
                self.agent_by_pid(caller, *p)?;
                true
            }
            pb::target::Target::Exe(e) if e.is_empty() => {
                return Err(CoreError::Invalid("empty exe path".into()));
            }
            pb::target::Target::All(false) => {
                return Err(CoreError::Invalid(
                    "target all=false targets nothing".into(),
                ));
            }
            _ => false,
        };
        let cb = spec.callback.as_ref().expect("validated");
        if cb.kind == pb::CallbackKind::Custom as i32
            && let pb::target::Target::Pid(p) = &target
        {
            let a = &self.agents[&self.agent_by_pid(caller, *p)?];
            if !a.hello.callbacks.contains(&cb.custom_name) {
                return Err(CoreError::Invalid(format!(
                    "pid {p} registered no callback named '{}' (it has: {})",
                    cb.custom_name,
                    if a.hello.callbacks.is_empty() {
                        "none".to_string()
                    } else {
                        a.hello.callbacks.join(", ")
                    }
                )));
            }
        }
        let id = self.next_tracer;
        self.next_tracer += 1;
        let tracer = Tracer {
            id,
            spec,
            owner_uid: caller.uid,
            state: TracerState::Active,
            archived: CountTable::new(),
            archived_dropped: 0,
        };
        let targets: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.connected && tracer.targets(a))
            .map(|a| a.id)
            .collect();
        self.tracers.insert(id, tracer);
        let op = self.new_op(Op::Attach {
            tracer: id,
            pid_target,
            steps: targets.iter().map(|a| (*a, AttachStep::Listing)).collect(),
            results: BTreeMap::new(),
            errors: BTreeMap::new(),
        });
        for a in targets {
            self.request_functions(
                a,
                Request::Attach {
                    tracer: id,
                    op: Some(op),
                },
            );
        }
        self.check_attach(op);
        Ok(op)
    }

    /// Moves `sites` of agent `id` to groups that include `tracer`.
    fn add_tracer_to_sites(
        &mut self,
        id: AgentId,
        tracer: TracerId,
        sites: &[u64],
        now: Instant,
    ) -> BTreeSet<TrampolineId> {
        let tref = self.tracers[&tracer].reference();
        let agent = &self.agents[&id];
        let mut moves: BTreeMap<Vec<TracerId>, (Vec<pb::TracerRef>, Vec<u64>)> = BTreeMap::new();
        for &s in sites {
            let mut group: Vec<pb::TracerRef> = match agent.site_owner.get(&s) {
                Some(o) => agent.trampolines[o].group.clone(),
                None => Vec::new(),
            };
            if group.iter().any(|r| r.tracer_id == tracer) {
                continue;
            }
            group.push(tref.clone());
            group.sort_by_key(|r| r.tracer_id);
            let key: Vec<TracerId> = group.iter().map(|r| r.tracer_id).collect();
            moves.entry(key).or_insert((group, Vec::new())).1.push(s);
        }
        self.move_sites(id, moves.into_values().collect(), now)
    }

    /// Removes `tracer` from every group of agent `id`.
    fn remove_tracer_from_agent(
        &mut self,
        id: AgentId,
        tracer: TracerId,
        now: Instant,
    ) -> Vec<TrampolineId> {
        let agent = &self.agents[&id];
        let mut moves = Vec::new();
        let mut emptied = Vec::new();
        for t in agent
            .trampolines
            .values()
            .filter(|t| t.state.active() && t.has_tracer(tracer))
        {
            let group: Vec<pb::TracerRef> = t
                .group
                .iter()
                .filter(|r| r.tracer_id != tracer)
                .cloned()
                .collect();
            if group.is_empty() || t.sites.is_empty() {
                emptied.push(t.id);
            } else {
                moves.push((group, t.sites.iter().copied().collect()));
            }
        }
        self.move_sites(id, moves, now);
        // Trampolines whose group becomes empty: their sites go back to untraced.
        for t in &emptied {
            self.retire(id, *t, now);
        }
        let agent = &self.agents[&id];
        agent
            .trampolines
            .values()
            .filter(|t| t.has_tracer(tracer) && t.state == TState::Retiring)
            .map(|t| t.id)
            .collect()
    }

    /// Creates one trampoline per (group, sites) and retires trampolines left empty.
    fn move_sites(
        &mut self,
        id: AgentId,
        moves: Vec<(Vec<pb::TracerRef>, Vec<u64>)>,
        now: Instant,
    ) -> BTreeSet<TrampolineId> {
        let mut created = BTreeSet::new();
        let mut touched = BTreeSet::new();
        for (group, sites) in moves {
            if sites.is_empty() {
                continue;
            }
            let agent = self.agents.get_mut(&id).expect("caller checked");
            let tid = agent.next_trampoline;
            agent.next_trampoline += 1;
            let mut msg_sites = Vec::with_capacity(sites.len());
            for &s in &sites {
                if let Some(old) = agent.site_owner.insert(s, tid)
                    && let Some(o) = agent.trampolines.get_mut(&old)
                {
                    o.sites.remove(&s);
                    touched.insert(old);
                }
                msg_sites.push(pb::Site {
                    address: s,
                    name: agent.name_of(s),
                });
            }
            agent.trampolines.insert(
                tid,
                Trampoline {
                    id: tid,
                    group: group.clone(),
                    sites: sites.iter().copied().collect(),
                    state: TState::Requested,
                    retired_epoch: 0,
                    since: now,
                },
            );
            created.insert(tid);
            self.send(
                id,
                ToAgent::Install(pb::Install {
                    trampoline_id: tid,
                    tracers: group,
                    sites: msg_sites,
                }),
            );
        }
        for old in touched {
            let empty = self.agents[&id]
                .trampolines
                .get(&old)
                .is_some_and(|t| t.sites.is_empty() && t.state.active());
            if empty {
                self.retire(id, old, now);
            }
        }
        created
    }

    fn retire(&mut self, id: AgentId, tramp: TrampolineId, now: Instant) {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let Some(t) = agent.trampolines.get_mut(&tramp) else {
            return;
        };
        if !t.state.active() {
            return;
        }
        t.state = TState::Retiring;
        t.since = now;
        for s in std::mem::take(&mut t.sites) {
            if agent.site_owner.get(&s) == Some(&tramp) {
                agent.site_owner.remove(&s);
            }
        }
        self.send(
            id,
            ToAgent::Remove(pb::Remove {
                trampoline_id: tramp,
            }),
        );
    }

    fn attach_agent_result(&mut self, op: OpId, agent: AgentId, r: Result<(), CoreError>) {
        if let Some(Op::Attach {
            steps,
            results,
            errors,
            ..
        }) = self.ops.get_mut(&op)
        {
            steps.insert(agent, AttachStep::Done);
            if let Err(e) = r {
                let pid = self.agents.get(&agent).map(|a| a.hello.pid).unwrap_or(0);
                let res = results.entry(agent).or_default();
                res.agent_id = agent;
                res.pid = pid;
                res.error = e.to_string();
                errors.insert(agent, e);
            }
        }
        self.check_attach(op);
    }

    fn check_attach(&mut self, op: OpId) {
        let Some(Op::Attach {
            tracer,
            pid_target,
            steps,
            results,
            errors,
        }) = self.ops.get(&op)
        else {
            return;
        };
        let all_done = steps.values().all(|s| match s {
            AttachStep::Done => true,
            AttachStep::Listing => false,
            AttachStep::Installing(set) => set.is_empty(),
        });
        if !all_done {
            return;
        }
        let tracer = *tracer;
        let results: Vec<pb::AgentAttachResult> = results.values().cloned().collect();
        if *pid_target
            && results.iter().all(|r| r.sites_patched == 0)
            && let Some(err) = errors.values().next().cloned()
        {
            // Nothing was installed for a pid target that failed: undo the tracer.
            self.drop_tracer_everywhere(tracer);
            self.reply(op, Reply::Attach(Err(err)));
            return;
        }
        let t = self.tracer_view(tracer);
        self.reply(
            op,
            Reply::Attach(Ok(pb::AttachResponse { tracer: t, results })),
        );
    }

    fn drop_tracer_everywhere(&mut self, tracer: TracerId) {
        if let Some(t) = self.tracers.get_mut(&tracer) {
            t.state = TracerState::Detaching;
        }
        let now = Instant::now();
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        for a in agents {
            self.remove_tracer_from_agent(a, tracer, now);
        }
        self.gc_tracers();
    }

    /// Live reports, retirements and frees.
    pub fn trampoline_report(&mut self, id: AgentId, r: pb::TrampolineReport, now: Instant) {
        use pb::trampoline_report::Report;
        let tramp = r.trampoline_id;
        let Some(agent) = self.agents.get_mut(&id) else {
            return;
        };
        let Some(t) = agent.trampolines.get_mut(&tramp) else {
            tracing::warn!(
                agent = id,
                trampoline = tramp,
                "report about an unknown trampoline ignored"
            );
            return;
        };
        match r.report {
            Some(Report::Live(live)) => {
                if t.state == TState::Requested {
                    t.state = TState::Live;
                    t.since = now;
                } else if t.state != TState::Retiring {
                    tracing::warn!(agent = id, trampoline = tramp, state = ?t.state, "unexpected live report ignored");
                    return;
                }
                let patched = live.sites.len() as u32;
                let skipped_n = live.skipped.len() as u32;
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
            }
            Some(Report::Failed(f)) => {
                if t.state != TState::Requested && t.state != TState::Retiring {
                    tracing::warn!(
                        agent = id,
                        trampoline = tramp,
                        "unexpected install failure ignored"
                    );
                    return;
                }
                // Nothing was allocated: the trampoline never existed in the agent.
                t.state = TState::Freed;
                t.since = now;
                for s in std::mem::take(&mut t.sites) {
                    if agent.site_owner.get(&s) == Some(&tramp) {
                        agent.site_owner.remove(&s);
                    }
                }
                let pid = agent.hello.pid;
                let ops: Vec<OpId> = self.attach_ops_waiting(id, tramp);
                for op in ops {
                    self.attach_agent_result(
                        op,
                        id,
                        Err(CoreError::AgentFailed {
                            pid,
                            message: f.reason.clone(),
                        }),
                    );
                }
                self.gc_tracers();
            }
            Some(Report::Retired(ret)) => {
                if t.state != TState::Retiring {
                    tracing::warn!(agent = id, trampoline = tramp, state = ?t.state, "retired report for a trampoline not being retired: ignored");
                    return;
                }
                if ret.epoch < agent.epoch {
                    tracing::warn!(
                        agent = id,
                        trampoline = tramp,
                        epoch = ret.epoch,
                        known = agent.epoch,
                        "retired report with an epoch older than one already seen: ignored, the trampoline stays allocated"
                    );
                    return;
                }
                agent.epoch = ret.epoch;
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
                        self.send(id, ToAgent::Expedite(pb::Expedite {}))
                    }
                    None => {}
                }
            }
            Some(Report::Freed(_)) => {
                if t.state != TState::FreeAuthorized {
                    tracing::error!(agent = id, trampoline = tramp, state = ?t.state,
                        "agent freed a trampoline without authorization");
                }
                t.state = TState::Freed;
                t.since = now;
                self.prune_freed(id);
                self.check_detach_ops();
                self.gc_tracers();
            }
            None => tracing::warn!(agent = id, "empty trampoline report ignored"),
        }
    }

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

    fn attach_ops_waiting(&self, id: AgentId, tramp: TrampolineId) -> Vec<OpId> {
        self.ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Attach { steps, .. } if matches!(steps.get(&id), Some(AttachStep::Installing(s)) if s.contains(&tramp))))
            .map(|(o, _)| *o)
            .collect()
    }

    fn attach_progress(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        group: &[TracerId],
        patched: u32,
        skipped: u32,
    ) {
        for op in self.attach_ops_waiting(id, tramp) {
            if let Some(Op::Attach {
                tracer,
                steps,
                results,
                ..
            }) = self.ops.get_mut(&op)
            {
                if let Some(AttachStep::Installing(set)) = steps.get_mut(&id) {
                    set.remove(&tramp);
                }
                if group.contains(tracer) {
                    let r = results.entry(id).or_default();
                    r.agent_id = id;
                    r.sites_patched += patched;
                    r.sites_skipped += skipped;
                }
            }
            self.check_attach(op);
        }
    }

    fn grace_done(&mut self, id: AgentId, gp: GracePeriod, now: Instant) {
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

    // ------------------------------------------------------------- detach

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
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        let mut waiting = BTreeSet::new();
        for a in agents {
            for tr in self.remove_tracer_from_agent(a, tracer, now) {
                waiting.insert((a, tr));
            }
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
        // Pending attach ops of this tracer end now.
        let attach_ops: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o, Op::Attach { tracer: t, .. } if *t == tracer))
            .map(|(o, _)| *o)
            .collect();
        for op in attach_ops {
            self.reply(
                op,
                Reply::Attach(Err(CoreError::Invalid(format!(
                    "tracer {tracer} was detached while attaching"
                )))),
            );
        }
        let op = self.new_op(Op::Detach { waiting, retired });
        if !req.wait {
            self.finish_detach(op, false);
        } else {
            self.check_detach_ops();
        }
        self.gc_tracers();
        Ok(op)
    }

    fn trampoline_settled(&self, a: AgentId, t: TrampolineId) -> bool {
        match self.agents.get(&a).and_then(|x| x.trampolines.get(&t)) {
            None => true,
            Some(t) => matches!(t.state, TState::FreeAuthorized | TState::Freed),
        }
    }

    fn check_detach_ops(&mut self) {
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
    fn gc_tracers(&mut self) {
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

    // --------------------------------------------------------------- sync

    /// Control.Synchronize: a barrier over every visible connected agent.
    pub fn synchronize(&mut self, caller: Caller, now: Instant) -> OpId {
        let sync_id = self.next_sync;
        self.next_sync += 1;
        let agents: BTreeSet<AgentId> = self
            .agents
            .values()
            .filter(|a| a.connected && caller.may_see(a.hello.uid))
            .map(|a| a.id)
            .collect();
        let threads = agents
            .iter()
            .map(|a| self.agents[a].grace.thread_count() as u32)
            .sum();
        let op = self.new_op(Op::Sync {
            sync_id,
            waiting: agents.clone(),
            agents: agents.len() as u32,
            threads,
            started: now,
        });
        for a in agents {
            self.send(
                a,
                ToAgent::Barrier(pb::Barrier {
                    barrier_id: sync_id,
                }),
            );
        }
        self.sync_progress(0, None);
        op
    }

    pub fn barrier_report(&mut self, id: AgentId, b: pb::BarrierReport, now: Instant) {
        let waiting = self.ops.values().any(|o| matches!(o, Op::Sync { sync_id, waiting, .. } if *sync_id == b.barrier_id && waiting.contains(&id)));
        if !waiting {
            tracing::warn!(
                agent = id,
                barrier = b.barrier_id,
                "answer to an unknown barrier ignored"
            );
            return;
        }
        let Some(a) = self.agents.get_mut(&id) else {
            return;
        };
        if b.epoch < a.epoch {
            tracing::warn!(agent = id, "barrier report with an older epoch ignored");
            return;
        }
        a.epoch = b.epoch;
        let done = a
            .grace
            .start(Purpose::Sync(b.barrier_id), b.epoch, b.tids, now);
        if let Some(gp) = done {
            self.grace_done(id, gp, now);
        } else if self.settings.expedite {
            self.send(id, ToAgent::Expedite(pb::Expedite {}));
        }
    }

    /// Marks `agent` done for sync `sync` (or for every sync when `None`) and replies
    /// to syncs that are complete.
    fn sync_progress(&mut self, agent: AgentId, sync: Option<u64>) {
        let mut finished = Vec::new();
        for (op, o) in self.ops.iter_mut() {
            if let Op::Sync {
                sync_id,
                waiting,
                agents,
                threads,
                started,
            } = o
            {
                if sync.is_none_or(|s| s == *sync_id) {
                    waiting.remove(&agent);
                }
                if waiting.is_empty() {
                    finished.push((
                        *op,
                        pb::SynchronizeResponse {
                            agents: *agents,
                            threads: *threads,
                            elapsed_us: started.elapsed().as_micros() as u64,
                        },
                    ));
                }
            }
        }
        for (op, r) in finished {
            self.reply(op, Reply::Sync(Ok(r)));
        }
    }

    /// The shell gave up waiting on an operation (deadline). Grace periods of a
    /// cancelled sync are abandoned; a detach's grace periods go on.
    pub fn cancel(&mut self, op: OpId) -> Option<String> {
        let o = self.ops.remove(&op)?;
        match o {
            Op::Sync {
                sync_id, waiting, ..
            } => {
                let mut holdouts = Vec::new();
                for a in waiting {
                    if let Some(ag) = self.agents.get_mut(&a) {
                        if let Some(gp) = ag.grace.cancel(Purpose::Sync(sync_id)) {
                            holdouts.push(format!(
                                "pid {}: threads {:?}",
                                ag.hello.pid,
                                gp.holdouts.iter().collect::<Vec<_>>()
                            ));
                        } else {
                            holdouts.push(format!("pid {}: no barrier answer", ag.hello.pid));
                        }
                    }
                }
                Some(format!(
                    "grace period not complete; holdouts: {}; see `patchbay gp`",
                    holdouts.join("; ")
                ))
            }
            Op::Detach { waiting, .. } => {
                let pending: Vec<String> = waiting
                    .iter()
                    .filter(|(a, t)| !self.trampoline_settled(*a, *t))
                    .map(|(a, t)| format!("agent {a} trampoline {t}"))
                    .collect();
                Some(format!(
                    "detached, but grace periods are still running for {}: see `patchbay gp` for the threads holding them up",
                    pending.join(", ")
                ))
            }
            Op::Attach { steps, .. } => {
                let slow: Vec<String> = steps
                    .iter()
                    .filter(|(_, s)| !matches!(s, AttachStep::Done))
                    .map(|(a, _)| {
                        self.agents
                            .get(a)
                            .map(|x| format!("pid {}", x.hello.pid))
                            .unwrap_or_default()
                    })
                    .collect();
                Some(format!(
                    "agents did not confirm the attach in time: {}; the tracer stays attached where it went live",
                    slow.join(", ")
                ))
            }
            Op::Functions => Some("the agent did not answer in time".into()),
        }
    }

    // ------------------------------------------------------------ queries

    pub fn list_agents(&self, caller: Caller) -> Vec<pb::AgentInfo> {
        self.agents
            .values()
            .filter(|a| caller.may_see(a.hello.uid))
            .map(|a| pb::AgentInfo {
                agent_id: a.id,
                pid: a.hello.pid,
                start_time: a.hello.start_time,
                uid: a.hello.uid,
                exe: a.hello.exe.clone(),
                build_id: a.hello.build_id.clone(),
                agent_version: a.hello.agent_version.clone(),
                connected: a.connected,
                threads: a.grace.thread_count() as u32,
                epoch: a.epoch,
                callbacks: a.hello.callbacks.clone(),
                trampolines: a.live_trampolines() as u32,
            })
            .collect()
    }

    fn tracer_view(&self, id: TracerId) -> Option<pb::Tracer> {
        let t = self.tracers.get(&id)?;
        let mut agents = 0;
        let mut sites = 0;
        let mut dropped = t.archived_dropped;
        for a in self.agents.values() {
            let n: usize = a
                .trampolines
                .values()
                .filter(|x| x.state.active() && x.has_tracer(id))
                .map(|x| x.sites.len())
                .sum();
            if n > 0 {
                agents += 1;
                sites += n as u32;
            }
            dropped += a.dropped.get(&id).copied().unwrap_or(0);
        }
        Some(pb::Tracer {
            tracer_id: id,
            spec: Some(t.spec.clone()),
            owner_uid: t.owner_uid,
            state: match t.state {
                TracerState::Active => pb::TracerState::Active,
                TracerState::Detaching => pb::TracerState::Detaching,
            } as i32,
            agents,
            sites,
            dropped,
        })
    }

    pub fn list_tracers(&self, caller: Caller) -> Vec<pb::Tracer> {
        self.tracers
            .values()
            .filter(|t| caller.may_see(t.owner_uid))
            .filter_map(|t| self.tracer_view(t.id))
            .collect()
    }

    /// Checks that `caller` may watch tracer `id`.
    pub fn check_tracer(&self, caller: Caller, id: TracerId) -> Result<(), CoreError> {
        self.visible_tracer(caller, id).map(|_| ())
    }

    pub fn list_trampolines(
        &self,
        caller: Caller,
        req: &pb::ListTrampolinesRequest,
        now: Instant,
    ) -> Vec<pb::TrampolineInfo> {
        let mut out = Vec::new();
        for a in self
            .agents
            .values()
            .filter(|a| caller.may_see(a.hello.uid))
            .filter(|a| req.pid == 0 || a.hello.pid == req.pid)
        {
            for t in a.trampolines.values() {
                if t.state == TState::Freed && !req.include_freed {
                    continue;
                }
                let holdouts = a
                    .grace
                    .get(Purpose::Trampoline(t.id))
                    .map(|gp| gp.holdouts.iter().copied().collect())
                    .unwrap_or_default();
                out.push(pb::TrampolineInfo {
                    agent_id: a.id,
                    pid: a.hello.pid,
                    trampoline_id: t.id,
                    tracer_ids: t.group_ids(),
                    sites: t.sites.len() as u32,
                    state: t.state.to_proto() as i32,
                    retired_epoch: t.retired_epoch,
                    holdouts,
                    state_age_ms: now.saturating_duration_since(t.since).as_millis() as u64,
                });
            }
        }
        out
    }

    pub fn grace_periods(&self, caller: Caller, now: Instant) -> Vec<pb::GracePeriodInfo> {
        let mut out = Vec::new();
        for a in self.agents.values().filter(|a| caller.may_see(a.hello.uid)) {
            for gp in a.grace.pending() {
                let waited = now.saturating_duration_since(gp.started);
                let holdouts = gp
                    .holdouts
                    .iter()
                    .map(|&tid| {
                        let stall = match a.stalls.get(&tid) {
                            Some((s, _)) => Some(s.clone()),
                            None if waited >= self.settings.stall_threshold => Some(pb::Stall {
                                tid,
                                pc: 0,
                                symbol: String::new(),
                                duration_ms: waited.as_millis() as u64,
                                reason: if a.connected {
                                    format!("no quiescent report for {} ms", waited.as_millis())
                                } else {
                                    "agent disconnected".into()
                                },
                            }),
                            None => None,
                        };
                        pb::Holdout { tid, stall }
                    })
                    .collect();
                out.push(pb::GracePeriodInfo {
                    agent_id: a.id,
                    pid: a.hello.pid,
                    purpose: Some(match gp.purpose {
                        Purpose::Trampoline(t) => pb::grace_period_info::Purpose::TrampolineId(t),
                        Purpose::Sync(s) => pb::grace_period_info::Purpose::SynchronizeId(s),
                    }),
                    epoch: gp.epoch,
                    waited_ms: waited.as_millis() as u64,
                    holdouts,
                });
            }
        }
        out
    }

    pub fn counts(
        &self,
        caller: Caller,
        tracer: TracerId,
    ) -> Result<pb::CountsResponse, CoreError> {
        let t = self.visible_tracer(caller, tracer)?;
        let mut by_name = t.archived.clone();
        for a in self.agents.values() {
            if let Some(counts) = a.counts.get(&tracer) {
                fold_counts(a, counts, &mut by_name);
            }
        }
        let mut counts: Vec<pb::FunctionCount> = by_name
            .into_iter()
            .map(|(function, (count, agents))| pb::FunctionCount {
                function,
                count,
                agents: agents.len() as u32,
            })
            .collect();
        counts.sort_by(|a, b| b.count.cmp(&a.count).then(a.function.cmp(&b.function)));
        let total = counts.iter().map(|c| c.count).sum();
        Ok(pb::CountsResponse { counts, total })
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

/// Decodes the packed records of an `EventBatch` (format documented in agent.proto).
pub fn decode_events(data: &[u8], count: u32) -> Result<Vec<pb::Event>, CoreError> {
    let mut out = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut rest = data;
    let take = |rest: &mut &[u8], n: usize| -> Result<u64, CoreError> {
        if rest.len() < n {
            return Err(CoreError::Invalid("event batch truncated".into()));
        }
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&rest[..n]);
        *rest = &rest[n..];
        Ok(u64::from_le_bytes(b))
    };
    for _ in 0..count {
        let timestamp_ns = take(&mut rest, 8)?;
        let address = take(&mut rest, 8)?;
        let tid = take(&mut rest, 4)? as u32;
        let n = take(&mut rest, 4)?;
        if n > 6 {
            return Err(CoreError::Invalid(format!(
                "event with {n} arguments (at most 6)"
            )));
        }
        let mut args = Vec::with_capacity(n as usize);
        for _ in 0..n {
            args.push(take(&mut rest, 8)?);
        }
        out.push(pb::Event {
            timestamp_ns,
            tid,
            address,
            function: String::new(),
            args,
        });
    }
    if !rest.is_empty() {
        return Err(CoreError::Invalid(format!(
            "event batch has {} bytes after its {count} records",
            rest.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
