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
//! - a failed request (bad input, unknown pid/tracer, no permission) changes nothing;
//! - tracers restored after a server restart ([`Registry::restore_tracers`]) keep their
//!   ids, and ids are never reused; a re-reported trampoline whose group names active
//!   tracers with their callbacks stays live untouched (`reconcile`), and a retired one
//!   is freed only after a grace period started by this registry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
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
    /// The last failure the agent reported (`AgentError`), for messages to people.
    last_error: Option<String>,
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
    /// For a pid target: the start time of the process it was attached to, so that the
    /// tracer never applies to a later process that reuses the pid (0: any).
    pub pid_start_time: u64,
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
        // Counts come from agents: saturate rather than overflow on absurd values.
        e.0 = e.0.saturating_add(c.count);
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
                Some(pb::target::Target::Pid(p)) => {
                    *p == agent.hello.pid
                        && (self.pid_start_time == 0
                            || self.pid_start_time == agent.hello.start_time)
                }
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
    /// Bumped whenever the set of active tracers (or the next tracer id) changes:
    /// the shell persists [`Registry::saved_tracers`] when it moves.
    tracer_generation: u64,
}

/// What survives a server restart of one active tracer (see `store.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTracer {
    pub id: TracerId,
    pub spec: pb::TracerSpec,
    pub owner_uid: u32,
    /// See [`Tracer::pid_start_time`].
    pub pid_start_time: u64,
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
        validate_rereport(&hello.trampolines)?;
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
                    last_error: None,
                },
            );
            self.by_identity.insert(key, id);
        }
        let agent = self.agents.get_mut(&id).expect("inserted above");
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
                            && x.targets(agent)
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
                t.archived_dropped = t.archived_dropped.saturating_add(*dropped);
            }
        }
        self.sync_progress(id, None);
        self.check_detach_ops();
        self.gc_tracers();
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
            FromAgent::Error(e) => {
                self.agent_error(id, &e.message);
                Ok(())
            }
            FromAgent::Barrier(b) => self.barrier_report(id, b, now),
            FromAgent::Callbacks(c) => self.callbacks_changed(id, c.names),
            // New objects were loaded: the tracers meant for the agent cover them too.
            FromAgent::FunctionsAdded(_) => {
                self.attach_targeting_tracers(id);
                Ok(())
            }
        }
    }

    /// Attaches every active tracer meant for the agent again: the agent lists the
    /// functions each pattern matches, and only sites whose group lacks the tracer are
    /// patched (after a reconnect, or when the agent discovered new functions).
    fn attach_targeting_tracers(&mut self, id: AgentId) {
        let wanted: Vec<TracerId> = self
            .tracers
            .values()
            .filter(|t| t.state == TracerState::Active)
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

    fn agent_mut(&mut self, id: AgentId) -> Result<&mut Agent, CoreError> {
        self.agents.get_mut(&id).ok_or(CoreError::UnknownAgent(id))
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
        for t in tids {
            a.stalls.remove(t);
            done.extend(a.grace.thread_exited(*t));
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
        for q in reports {
            a.stalls.remove(&q.tid);
            done.extend(a.grace.quiescent(q.tid, q.epoch));
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

    /// Decodes an event batch. A malformed batch is rejected whole.
    /// Whether tracer `tracer` exists and is meant for agent `id`.
    fn tracer_applies(&self, tracer: TracerId, id: AgentId) -> bool {
        match (self.tracers.get(&tracer), self.agents.get(&id)) {
            (Some(t), Some(a)) => t.targets(a),
            _ => false,
        }
    }

    pub fn events(&mut self, id: AgentId, batch: pb::EventBatch) -> Result<(), CoreError> {
        if !self.agents.contains_key(&id) {
            return Err(CoreError::UnknownAgent(id));
        }
        if !self.tracer_applies(batch.tracer_id, id) {
            return Ok(());
        }
        let a = self.agent_mut(id)?;
        let events = pb::events::decode(&batch.data, batch.record_count)
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
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

    pub fn function_list(
        &mut self,
        id: AgentId,
        list: pb::FunctionList,
        now: Instant,
    ) -> Result<(), CoreError> {
        match self.requests.get(&list.request_id) {
            None => {
                return Err(CoreError::Protocol(format!(
                    "function list answers unknown request {}",
                    list.request_id
                )));
            }
            Some((agent, _)) if *agent != id => {
                return Err(CoreError::Protocol(format!(
                    "function list answers request {} of another agent",
                    list.request_id
                )));
            }
            Some(_) => {}
        }
        let (_, req) = self
            .requests
            .remove(&list.request_id)
            .expect("checked above");
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
                    return Ok(());
                }
                if !active {
                    return Ok(());
                }
                // A site listed twice is patched once.
                let patchable: BTreeSet<u64> = list
                    .functions
                    .iter()
                    .filter(|f| f.patchable)
                    .map(|f| f.address)
                    .collect();
                let sites: Vec<u64> = patchable.into_iter().collect();
                let unpatchable =
                    u32::try_from(list.functions.iter().filter(|f| !f.patchable).count())
                        .unwrap_or(u32::MAX)
                        .saturating_add(list.unpatchable_matches);
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
                    return Ok(());
                }
                let installed = self.add_tracer_to_sites(id, tracer, &sites, now);
                if let Some(op) = op {
                    if let Some(Op::Attach { steps, results, .. }) = self.ops.get_mut(&op) {
                        steps.insert(id, AttachStep::Installing(installed));
                        let r = results.entry(id).or_default();
                        r.agent_id = id;
                        r.pid = pid;
                        r.sites_skipped = r.sites_skipped.saturating_add(skipped);
                    }
                    self.check_attach(op);
                }
            }
        }
        Ok(())
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
        let mut pid_start_time = 0;
        let pid_target = match &target {
            pb::target::Target::Pid(p) => {
                let a = self.agent_by_pid(caller, *p)?;
                pid_start_time = self.agents[&a].hello.start_time;
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
            pid_start_time,
            archived: CountTable::new(),
            archived_dropped: 0,
        };
        self.tracer_generation += 1;
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
            self.tracer_generation += 1;
        }
        let now = Instant::now();
        let agents: Vec<AgentId> = self.agents.keys().copied().collect();
        for a in agents {
            self.remove_tracer_from_agent(a, tracer, now);
        }
        self.gc_tracers();
    }

    /// Live reports, retirements and frees. A report that does not fit the
    /// trampoline's state is rejected and changes nothing.
    pub fn trampoline_report(
        &mut self,
        id: AgentId,
        r: pb::TrampolineReport,
        now: Instant,
    ) -> Result<(), CoreError> {
        use pb::trampoline_report::Report;
        let tramp = r.trampoline_id;
        let agent = self
            .agents
            .get_mut(&id)
            .ok_or(CoreError::UnknownAgent(id))?;
        let Some(t) = agent.trampolines.get_mut(&tramp) else {
            return Err(CoreError::Protocol(format!(
                "report about unknown trampoline {tramp}"
            )));
        };
        let unexpected = |what: &str, st: TState| {
            Err(CoreError::Protocol(format!(
                "{what} for trampoline {tramp} which is {st:?}"
            )))
        };
        match r.report {
            Some(Report::Live(live)) => {
                if t.state == TState::Requested {
                    t.state = TState::Live;
                    t.since = now;
                } else if t.state != TState::Retiring {
                    return unexpected("live report", t.state);
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
            }
            Some(Report::Failed(f)) => {
                if t.state != TState::Requested && t.state != TState::Retiring {
                    return unexpected("install failure", t.state);
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
                self.prune_freed(id);
                self.check_detach_ops();
                self.gc_tracers();
            }
            Some(Report::Retired(ret)) => {
                if t.state != TState::Retiring {
                    return unexpected("retired report", t.state);
                }
                if ret.epoch < agent.epoch {
                    // Ignored: the trampoline stays allocated.
                    return Err(CoreError::Protocol(format!(
                        "retired report of trampoline {tramp} at epoch {} older than epoch {} already seen",
                        ret.epoch, agent.epoch
                    )));
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
                // Only an authorized free is recorded: the agent frees a trampoline
                // when (and only when) it receives AuthorizeFree.
                if t.state != TState::FreeAuthorized {
                    tracing::error!(agent = id, trampoline = tramp, state = ?t.state,
                        "agent claims it freed a trampoline without authorization");
                    return unexpected("free report without authorization", t.state);
                }
                t.state = TState::Freed;
                t.since = now;
                self.prune_freed(id);
                self.check_detach_ops();
                self.gc_tracers();
            }
            None => {
                return Err(CoreError::Protocol(format!(
                    "empty report for trampoline {tramp}"
                )));
            }
        }
        Ok(())
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
                    r.sites_patched = r.sites_patched.saturating_add(patched);
                    r.sites_skipped = r.sites_skipped.saturating_add(skipped);
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
        self.tracer_generation += 1;
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

    pub fn barrier_report(
        &mut self,
        id: AgentId,
        b: pb::BarrierReport,
        now: Instant,
    ) -> Result<(), CoreError> {
        let waiting = self.ops.values().any(|o| matches!(o, Op::Sync { sync_id, waiting, .. } if *sync_id == b.barrier_id && waiting.contains(&id)));
        let a = self
            .agents
            .get_mut(&id)
            .ok_or(CoreError::UnknownAgent(id))?;
        if !waiting {
            // Also the answer to a barrier whose Synchronize timed out: harmless.
            return Err(CoreError::Protocol(format!(
                "answer to barrier {} which this agent is not asked for",
                b.barrier_id
            )));
        }
        if a.grace.get(Purpose::Sync(b.barrier_id)).is_some() {
            return Err(CoreError::Protocol(format!(
                "barrier {} answered twice",
                b.barrier_id
            )));
        }
        if b.epoch < a.epoch {
            return Err(CoreError::Protocol(format!(
                "barrier {} answered at epoch {} older than epoch {} already seen",
                b.barrier_id, b.epoch, a.epoch
            )));
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
        Ok(())
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
                Some(format!("detached, but {}", parts.join("; ")))
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

    // -------------------------------------------------------- persistence

    /// Changes whenever [`Registry::saved_tracers`] would return something else.
    pub fn tracer_generation(&self) -> u64 {
        self.tracer_generation
    }

    /// The active tracers (what a restarted server must know again) and the next
    /// tracer id (ids are never reused, even across restarts: a re-reported
    /// trampoline's group names tracers by id).
    pub fn saved_tracers(&self) -> (Vec<SavedTracer>, TracerId) {
        let saved = self
            .tracers
            .values()
            .filter(|t| t.state == TracerState::Active)
            .map(|t| SavedTracer {
                id: t.id,
                spec: t.spec.clone(),
                owner_uid: t.owner_uid,
                pid_start_time: t.pid_start_time,
            })
            .collect();
        (saved, self.next_tracer)
    }

    /// Seeds a fresh registry with the tracers of a previous run, keeping their ids;
    /// new ids continue after `next_id` and after the largest restored id. Agents that
    /// connect later re-report their trampolines: those of restored tracers stay live
    /// (see `reconcile`). Every saved tracer is validated like an attach; on error
    /// nothing changes.
    pub fn restore_tracers(
        &mut self,
        saved: Vec<SavedTracer>,
        next_id: TracerId,
    ) -> Result<(), CoreError> {
        if !self.agents.is_empty() || !self.tracers.is_empty() {
            return Err(CoreError::Invalid(
                "tracers can only be restored into an empty registry".into(),
            ));
        }
        let mut ids = BTreeSet::new();
        for t in &saved {
            let bad = |why: String| CoreError::Invalid(format!("saved tracer {}: {why}", t.id));
            if t.id == 0 {
                return Err(bad("tracer id 0".into()));
            }
            if !ids.insert(t.id) {
                return Err(bad("duplicate tracer id".into()));
            }
            validate_pattern(&t.spec.pattern).map_err(|e| bad(e.to_string()))?;
            validate_callback(t.spec.callback.as_ref()).map_err(|e| bad(e.to_string()))?;
            match t.spec.target.as_ref().and_then(|x| x.target.as_ref()) {
                None => return Err(bad("no target".into())),
                Some(pb::target::Target::Exe(e)) if e.is_empty() => {
                    return Err(bad("empty exe path".into()));
                }
                Some(pb::target::Target::All(false)) => {
                    return Err(bad("target all=false".into()));
                }
                Some(_) => {}
            }
        }
        let max = ids.last().copied().unwrap_or(0);
        self.next_tracer = self.next_tracer.max(next_id).max(max + 1);
        for t in saved {
            self.tracers.insert(
                t.id,
                Tracer {
                    id: t.id,
                    spec: t.spec,
                    owner_uid: t.owner_uid,
                    state: TracerState::Active,
                    pid_start_time: t.pid_start_time,
                    archived: CountTable::new(),
                    archived_dropped: 0,
                },
            );
        }
        self.tracer_generation += 1;
        Ok(())
    }

    /// Withdraws active tracers the shell could not persist (as if detached at once),
    /// so that no tracer runs that a restarted server would not know. Returns them.
    pub fn abandon_tracers(&mut self, keep: &BTreeSet<TracerId>) -> Vec<TracerId> {
        let gone: Vec<TracerId> = self
            .tracers
            .values()
            .filter(|t| t.state == TracerState::Active && !keep.contains(&t.id))
            .map(|t| t.id)
            .collect();
        for &t in &gone {
            self.drop_tracer_everywhere(t);
        }
        gone
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
            dropped = dropped.saturating_add(a.dropped.get(&id).copied().unwrap_or(0));
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
        let total = counts.iter().fold(0u64, |t, c| t.saturating_add(c.count));
        Ok(pb::CountsResponse { counts, total })
    }

    /// Checks the registry's structural invariants; `Err` names the first one broken.
    /// Used by the tests after every step; cheap enough for debugging a live server.
    pub fn check_invariants(&self) -> Result<(), String> {
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
            let alive: BTreeSet<Tid> = a.grace.threads().collect();
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
                            Some(x) if x.state == TracerState::Active && x.targets(a) => {}
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
            for gp in a.grace.pending() {
                match gp.purpose {
                    Purpose::Trampoline(t) if !a.trampolines.contains_key(&t) => {
                        return Err(format!(
                            "agent {id}: grace period of missing trampoline {t}"
                        ));
                    }
                    Purpose::Sync(s) => {
                        let waited = self.ops.values().any(|o| {
                            matches!(o, Op::Sync { sync_id, waiting, .. } if *sync_id == s && waiting.contains(id))
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
            if let Some(t) = a.stalls.keys().find(|t| !alive.contains(t)) {
                return Err(format!("agent {id}: stall of thread {t} not known alive"));
            }
        }
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

    /// Disconnected agents to check for liveness (pid, start time).
    pub fn disconnected(&self) -> Vec<(AgentId, u32, u64)> {
        self.agents
            .values()
            .filter(|a| !a.connected)
            .map(|a| (a.id, a.hello.pid, a.hello.start_time))
            .collect()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile_tests;
