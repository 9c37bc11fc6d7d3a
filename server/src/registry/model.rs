//! The registry's data model: ids, the caller, settings, effects and replies, and
//! the records of agents, trampolines, tracers and waiting client operations.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use crate::error::CoreError;
use crate::grace::{Grace, Tid};

pub type AgentId = u64;
pub type TracerId = u64;
pub type TrampolineId = u64;
/// A client operation waiting for agents (attach, detach, sync, function listing).
pub type OpId = u64;

/// Who is asking. Clients over TCP hold the token and act as root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0 };
    pub(super) fn may_see(self, uid: u32) -> bool {
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
    pub(super) fn active(self) -> bool {
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
    pub(super) fn has_tracer(&self, t: TracerId) -> bool {
        self.group.iter().any(|r| r.tracer_id == t)
    }
    pub(super) fn group_ids(&self) -> Vec<TracerId> {
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
    pub(super) next_trampoline: TrampolineId,
    /// Planned owner trampoline of each patched site.
    pub(super) site_owner: BTreeMap<u64, TrampolineId>,
    pub(super) site_names: HashMap<u64, String>,
    pub(super) stalls: BTreeMap<Tid, (pb::Stall, Instant)>,
    pub(super) counts: BTreeMap<TracerId, Vec<pb::SiteCount>>,
    pub(super) dropped: BTreeMap<TracerId, u64>,
    /// The last latency snapshot of each `latency` tracer.
    pub(super) latency: BTreeMap<TracerId, pb::LatencyReport>,
    /// The last failure the agent reported (`AgentError`), for messages to people.
    pub(super) last_error: Option<String>,
    /// `Covered` markers owed to the agent, in order: each with the function listings
    /// (request ids) whose installs must be sent first (`FunctionsAdded{sequence}`).
    pub(super) covering: VecDeque<(u64, BTreeSet<u64>)>,
    /// The last `FunctionsAdded` sequence of this session (they increase).
    pub(super) last_cover: u64,
}

impl Agent {
    /// A newly connected agent, as its hello describes it (trampolines are adopted
    /// from the hello afterwards).
    pub(super) fn new(id: AgentId, hello: pb::Hello) -> Self {
        Agent {
            id,
            epoch: hello.epoch,
            hello,
            connected: true,
            grace: Grace::new(),
            trampolines: BTreeMap::new(),
            next_trampoline: 1,
            site_owner: BTreeMap::new(),
            site_names: HashMap::new(),
            stalls: BTreeMap::new(),
            counts: BTreeMap::new(),
            dropped: BTreeMap::new(),
            latency: BTreeMap::new(),
            last_error: None,
            covering: VecDeque::new(),
            last_cover: 0,
        }
    }
    pub(super) fn live_trampolines(&self) -> usize {
        self.trampolines
            .values()
            .filter(|t| t.state != TState::Freed)
            .count()
    }
    /// An agent with an empty hello (unit tests).
    #[cfg(test)]
    pub(super) fn for_tests(id: AgentId) -> Self {
        Agent::new(id, pb::Hello::default())
    }
    pub(super) fn name_of(&self, addr: u64) -> String {
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
    /// For a pid or tree target: the start time of the process it was attached to (the
    /// tree's root), so that the
    /// tracer never applies to a later process that reuses the pid (0: any).
    pub pid_start_time: u64,
    /// Counts and drops of agents whose process exited, kept for the tracer's life.
    pub(super) archived: CountTable,
    pub(super) archived_dropped: u64,
    /// Latency figures of agents whose process exited, kept for the tracer's life.
    pub(super) archived_latency: super::latency::LatencyTable,
    /// The same counts per exited process (for `Counts.processes`), at most
    /// [`MAX_ARCHIVED_PROCESSES`] of them; beyond, only the sums above grow.
    pub(super) archived_procs: Vec<ArchivedProcess>,
    /// Agents in which the pattern matched a patchable function, ever.
    pub(super) matched: BTreeSet<AgentId>,
}

/// How many exited processes a tracer keeps a breakdown of.
pub(super) const MAX_ARCHIVED_PROCESSES: usize = 4096;

/// The final counts of a tracer in a process that exited.
#[derive(Clone, Debug)]
pub(super) struct ArchivedProcess {
    pub pid: u32,
    pub start_time: u64,
    pub exe: String,
    pub cmdline: String,
    pub counts: CountTable,
}

/// A process identity: (pid, start time).
pub type Identity = (u32, u64);

/// Parentage the agents reported: each process identity's parent identity. Entries
/// outlive their agents, so that a grandchild whose parent already exited is still
/// known to descend from the root.
pub type Parents = HashMap<Identity, Identity>;

/// Whether `who` is `root` or descends from it in `parents` (cycle-safe, bounded).
pub fn descends(parents: &Parents, who: Identity, root: Identity) -> bool {
    let mut at = who;
    // A chain longer than this is a loop in made-up parentage, not a process tree.
    for _ in 0..=4096 {
        if at == root {
            return true;
        }
        match parents.get(&at) {
            Some(&up) => at = up,
            None => return false,
        }
    }
    false
}

/// Counts by function name, with the agents that contributed.
pub(super) type CountTable = BTreeMap<String, (u64, BTreeSet<AgentId>)>;

pub(super) fn fold_counts(agent: &Agent, counts: &[pb::SiteCount], into: &mut CountTable) {
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
    /// An active tracer with no archived counts.
    pub(super) fn new(
        id: TracerId,
        spec: pb::TracerSpec,
        owner_uid: u32,
        pid_start_time: u64,
    ) -> Self {
        Tracer {
            id,
            spec,
            owner_uid,
            state: TracerState::Active,
            pid_start_time,
            archived: CountTable::new(),
            archived_dropped: 0,
            archived_latency: Default::default(),
            archived_procs: Vec::new(),
            matched: BTreeSet::new(),
        }
    }
    pub(super) fn reference(&self) -> pb::TracerRef {
        pb::TracerRef {
            tracer_id: self.id,
            callback: self.spec.callback.clone(),
        }
    }
    /// Whether the tracer is meant for `agent` (`parents`: for tree targets).
    pub(super) fn targets(&self, agent: &Agent, parents: &Parents) -> bool {
        let uid_ok = self.owner_uid == 0 || self.owner_uid == agent.hello.uid;
        uid_ok
            && match self.spec.target.as_ref().and_then(|t| t.target.as_ref()) {
                Some(pb::target::Target::Tree(root)) => descends(
                    parents,
                    (agent.hello.pid, agent.hello.start_time),
                    (*root, self.pid_start_time),
                ),
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
pub(super) enum Request {
    Functions { op: OpId, limit: u32 },
    Attach { tracer: TracerId, op: Option<OpId> },
}

#[derive(Debug)]
pub(super) enum AttachStep {
    Listing,
    Installing(BTreeSet<TrampolineId>),
    Done,
}

#[derive(Debug)]
pub(super) enum Op {
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
