//! Hostile-input property test: the registry driven by two agents that mix correct
//! answers with malformed, duplicated, stale and made-up messages, and by clients of
//! several uids sending good and bad Control requests. After every step:
//! - nothing panicked;
//! - a rejected input returned an error and changed nothing (structural digest);
//! - an accepted input left every invariant of [`Registry::check_invariants`] true;
//! - every `AuthorizeFree` is justified by the messages the agent's current connection
//!   delivered, judged by an independent, naive model of grace periods;
//! - queries show a client only what its uid owns (root sees everything).

use super::*;
use pb::agent_message::Body as FromAgent;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::grace::Tid;
use std::fmt::Write as _;

const FUNCS: [&str; 5] = ["alpha", "beta", "gamma", "alpine", "bet"];
const PATTERNS: [&str; 9] = ["al*", "b*", "*", "gamma", "", "[", "foo[", "zz*", "**"];
/// (pid, uid) of the two agents.
const AGENTS: [(u32, u32); 2] = [(100, 1000), (200, 2000)];
const CALLERS: [Caller; 4] = [
    Caller::ROOT,
    Caller { uid: 1000 },
    Caller { uid: 2000 },
    Caller { uid: 3000 },
];

fn addr(i: usize) -> u64 {
    0x1000 * (i as u64 + 1)
}

/// One accepted agent input, as the naive grace model needs it.
#[derive(Clone, Debug)]
enum Ev {
    /// Threads the server now knows alive (hello, birth, listed in a report).
    Alive(Vec<Tid>),
    Exit(Vec<Tid>),
    Stamp(Tid, u64),
    /// A retirement (report or hello re-report): trampoline, epoch, listed threads.
    Retire(u64, u64, Vec<Tid>),
}

/// An agent's trampoline: group, sites, retirement (epoch, threads).
type ViewTramp = (Vec<pb::TracerRef>, Vec<u64>, Option<(u64, Vec<Tid>)>);

/// The correct part of an agent: what it would answer.
#[derive(Default)]
struct View {
    epoch: u64,
    threads: BTreeSet<Tid>,
    next_tid: Tid,
    /// trampoline -> (group, sites, retirement)
    tramps: BTreeMap<u64, ViewTramp>,
}

struct Slot {
    pid: u32,
    uid: u32,
    start_time: u64,
    id: Option<AgentId>,
    connected: bool,
    inbox: VecDeque<ToAgent>,
    view: View,
    /// Accepted inputs of the current connection.
    log: Vec<Ev>,
}

impl Slot {
    fn new(pid: u32, uid: u32) -> Slot {
        Slot {
            pid,
            uid,
            start_time: 1,
            id: None,
            connected: false,
            inbox: VecDeque::new(),
            view: View {
                threads: [1, 2].into(),
                next_tid: 3,
                ..Default::default()
            },
            log: Vec::new(),
        }
    }

    fn hello(&self) -> pb::Hello {
        pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            agent_version: "hostile".into(),
            pid: self.pid,
            start_time: self.start_time,
            uid: self.uid,
            exe: format!("/bin/p{}", self.pid),
            build_id: String::new(),
            parent_pid: 0,
            parent_start_time: 0,
            cmdline: String::new(),
            tids: self.view.threads.iter().copied().collect(),
            epoch: self.view.epoch,
            trampolines: self
                .view
                .tramps
                .iter()
                .map(|(id, (group, sites, ret))| pb::TrampolineStatus {
                    trampoline_id: *id,
                    state: if ret.is_some() {
                        pb::TrampolineState::Retired
                    } else {
                        pb::TrampolineState::Live
                    } as i32,
                    tracers: group.clone(),
                    sites: sites
                        .iter()
                        .map(|a| pb::Site {
                            address: *a,
                            name: String::new(),
                        })
                        .collect(),
                    retired_epoch: ret.as_ref().map_or(0, |r| r.0),
                    retired_tids: ret.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
                })
                .collect(),
            callbacks: vec!["mine".into()],
            arrival: 0,
        }
    }

    /// Whether the naive model justifies freeing `tramp` now.
    fn justified(&self, tramp: u64) -> Result<(), String> {
        let mut alive: BTreeSet<Tid> = BTreeSet::new();
        // Per event index, the alive set before it.
        let mut before: Vec<BTreeSet<Tid>> = Vec::new();
        let mut retire = None;
        for (i, e) in self.log.iter().enumerate() {
            before.push(alive.clone());
            match e {
                Ev::Alive(t) => alive.extend(t),
                Ev::Exit(t) => t.iter().for_each(|t| {
                    alive.remove(t);
                }),
                Ev::Stamp(..) => {}
                Ev::Retire(id, epoch, tids) => {
                    alive.extend(tids);
                    if *id == tramp {
                        let mut need = before[i].clone();
                        need.extend(tids);
                        retire = Some((i, *epoch, need));
                    }
                }
            }
        }
        let Some((i, epoch, need)) = retire else {
            return Err(format!(
                "trampoline {tramp} authorized without a retirement on this connection"
            ));
        };
        for &t in &need {
            let exited_after = self.log[i + 1..]
                .iter()
                .any(|e| matches!(e, Ev::Exit(x) if x.contains(&t)));
            let stamped = self.log.iter().enumerate().any(|(j, e)| match e {
                Ev::Stamp(x, s) if *x == t && *s >= epoch => {
                    if j > i {
                        true
                    } else {
                        // Before the retirement: the thread was alive then and did
                        // not exit in between (an exit ends the thread's evidence).
                        before[j].contains(&t)
                            && !self.log[j + 1..i]
                                .iter()
                                .any(|e| matches!(e, Ev::Exit(x) if x.contains(&t)))
                    }
                }
                _ => false,
            });
            if !exited_after && !stamped {
                return Err(format!(
                    "PREMATURE AuthorizeFree of trampoline {tramp} (epoch {epoch}): thread {t} never seen quiescent since; log {:?}",
                    self.log
                ));
            }
        }
        Ok(())
    }
}

/// A structural digest of everything the registry holds.
fn digest(reg: &Registry) -> String {
    let mut out = String::new();
    for (id, a) in &reg.agents {
        let names: BTreeMap<_, _> = a.site_names.iter().collect();
        let _ = writeln!(
            out,
            "agent {id} {:?} conn={} epoch={} {:?} {:?} next={} {:?} {:?} {:?} {:?} {:?}",
            a.hello,
            a.connected,
            a.epoch,
            a.grace,
            a.trampolines,
            a.next_trampoline,
            a.site_owner,
            names,
            a.stalls,
            a.counts,
            a.dropped
        );
    }
    let ids: BTreeMap<_, _> = reg.by_identity.iter().collect();
    let reqs: BTreeMap<_, _> = reg.requests.iter().collect();
    let _ = writeln!(
        out,
        "{ids:?}\n{:?}\n{reqs:?}\n{:?}\n{} {} {} {} {} effects={}",
        reg.tracers,
        reg.ops,
        reg.next_agent,
        reg.next_tracer,
        reg.next_request,
        reg.next_op,
        reg.next_sync,
        reg.effects.len()
    );
    out
}

#[derive(Clone, Debug)]
enum BadHello {
    Version,
    PeerPid,
    PeerUid,
    PidZero,
    State(i32),
    DupTramp,
    MaxTramp,
    DupSite,
    LiveNoTracer,
    DupTracer,
}

#[derive(Clone, Debug)]
enum Lie {
    None,
    StaleEpoch,
    NoThreads,
    Twice,
    WrongId,
    Drop,
}

#[derive(Clone, Debug)]
enum Raw {
    Tramp(u64, u8, u64, Vec<Tid>),
    Quiescent(Vec<(Tid, u64)>),
    Born(Vec<Tid>),
    Exited(Vec<Tid>),
    Functions(u64, Vec<(u8, bool)>, bool, u32),
    Barrier(u64, u64, Vec<Tid>),
    Events(u64, Vec<u8>, u32, u64),
    Counts(u64, Vec<(u64, u64)>),
    Stalls(Vec<Tid>),
    Callbacks(Vec<String>),
    Hello,
    Empty,
    Error,
    /// A huge list: births, stamps, a function list or a retirement's threads.
    Huge(u8),
}

#[derive(Clone, Debug)]
enum Step {
    Hello(usize, bool),
    BadHello(usize, BadHello),
    Disconnect(usize),
    Gone(usize),
    Answer(usize, usize, Lie),
    Born(usize),
    Exit(usize, usize),
    Observe(usize, usize, u8),
    Raw(usize, Raw),
    Attach(usize, u8, usize, u8, u8),
    Detach(usize, u64, bool),
    Functions(usize, u8, usize),
    Sync(usize),
    Cancel(u64),
    Query(usize, u64),
    /// Every thread of the agent reports quiescent at the agent's epoch.
    Flush(usize),
}

fn tid() -> impl Strategy<Value = Tid> {
    prop_oneof![4 => 0u32..8, 1 => Just(u32::MAX)]
}

fn id64() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..12, 1 => Just(u64::MAX)]
}

fn epoch() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..12, 1 => Just(u64::MAX)]
}

fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        4 => (id64(), 0u8..5, epoch(), prop::collection::vec(tid(), 0..4))
            .prop_map(|(t, k, e, tids)| Raw::Tramp(t, k, e, tids)),
        2 => prop::collection::vec((tid(), epoch()), 0..5).prop_map(Raw::Quiescent),
        1 => prop::collection::vec(tid(), 0..4).prop_map(Raw::Born),
        1 => prop::collection::vec(tid(), 0..4).prop_map(Raw::Exited),
        2 => (id64(), prop::collection::vec((0u8..6, any::<bool>()), 0..8), any::<bool>(), prop_oneof![Just(0u32), Just(u32::MAX)])
            .prop_map(|(r, f, e, u)| Raw::Functions(r, f, e, u)),
        1 => (id64(), epoch(), prop::collection::vec(tid(), 0..3))
            .prop_map(|(b, e, t)| Raw::Barrier(b, e, t)),
        1 => (0u64..6, prop::collection::vec(any::<u8>(), 0..64), prop_oneof![0u32..4, Just(u32::MAX)], any::<u64>())
            .prop_map(|(t, d, n, dr)| Raw::Events(t, d, n, dr)),
        1 => (0u64..6, prop::collection::vec((0u64..8, prop_oneof![0u64..10, Just(u64::MAX)]), 0..4))
            .prop_map(|(t, c)| Raw::Counts(t, c)),
        1 => prop::collection::vec(tid(), 0..3).prop_map(Raw::Stalls),
        1 => prop::collection::vec("[a-z]{0,3}", 0..3).prop_map(Raw::Callbacks),
        1 => Just(Raw::Hello),
        1 => (0u8..4).prop_map(Raw::Huge),
        1 => Just(Raw::Empty),
        1 => Just(Raw::Error),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let a = 0usize..2;
    prop_oneof![
        3 => (a.clone(), prop::bool::weighted(0.2)).prop_map(|(a, restart)| Step::Hello(a, restart)),
        1 => (a.clone(), prop_oneof![
            Just(BadHello::Version), Just(BadHello::PeerPid), Just(BadHello::PeerUid),
            Just(BadHello::PidZero), (0i32..8).prop_map(BadHello::State), Just(BadHello::DupTramp),
            Just(BadHello::MaxTramp), Just(BadHello::DupSite), Just(BadHello::LiveNoTracer),
            Just(BadHello::DupTracer),
        ]).prop_map(|(a, b)| Step::BadHello(a, b)),
        1 => a.clone().prop_map(Step::Disconnect),
        1 => a.clone().prop_map(Step::Gone),
        16 => (a.clone(), prop_oneof![6 => Just(0usize), 1 => any::<usize>()], prop_oneof![
            12 => Just(Lie::None), 1 => Just(Lie::StaleEpoch), 1 => Just(Lie::NoThreads),
            1 => Just(Lie::Twice), 1 => Just(Lie::WrongId), 1 => Just(Lie::Drop),
        ]).prop_map(|(a, i, l)| Step::Answer(a, i, l)),
        1 => a.clone().prop_map(Step::Born),
        1 => (a.clone(), any::<usize>()).prop_map(|(a, i)| Step::Exit(a, i)),
        6 => (a.clone(), any::<usize>(), 0u8..8).prop_map(|(a, i, l)| Step::Observe(a, i, l)),
        8 => (a.clone(), raw()).prop_map(|(a, r)| Step::Raw(a, r)),
        // Mostly well-formed attaches by root or the owner, so that trampolines live,
        // move and retire; sometimes every kind of malformed one.
        6 => (
            prop_oneof![3 => Just(0usize), 1 => 0usize..4],
            prop_oneof![3 => 0u8..2, 1 => Just(3u8), 1 => 0u8..8],
            prop_oneof![4 => 0usize..4, 1 => 0usize..PATTERNS.len()],
            prop_oneof![4 => 0u8..4, 1 => 0u8..7],
            prop_oneof![4 => Just(0u8), 1 => 0u8..3],
        )
            .prop_map(|(c, t, p, k, n)| Step::Attach(c, t, p, k, n)),
        3 => (prop_oneof![3 => Just(0usize), 1 => 0usize..4], 0u64..10, any::<bool>())
            .prop_map(|(c, t, w)| Step::Detach(c, t, w)),
        3 => (0usize..2).prop_map(Step::Flush),
        1 => (0usize..4, 0u8..3, 0usize..PATTERNS.len()).prop_map(|(c, p, pat)| Step::Functions(c, p, pat)),
        1 => (0usize..4).prop_map(Step::Sync),
        1 => (0u64..30).prop_map(Step::Cancel),
        2 => (0usize..4, 0u64..10).prop_map(|(c, t)| Step::Query(c, t)),
    ]
}

struct World {
    reg: Registry,
    slots: [Slot; 2],
}

impl World {
    fn new() -> World {
        World {
            reg: Registry::new(Settings::default()),
            slots: [
                Slot::new(AGENTS[0].0, AGENTS[0].1),
                Slot::new(AGENTS[1].0, AGENTS[1].1),
            ],
        }
    }

    /// Routes effects to connected slots, checking every AuthorizeFree.
    fn route(&mut self) -> Result<(), String> {
        for e in self.reg.take_effects() {
            if let Effect::Send(agent, msg) = e {
                let Some(slot) = self
                    .slots
                    .iter_mut()
                    .find(|s| s.connected && s.id == Some(agent))
                else {
                    continue;
                };
                if let ToAgent::AuthorizeFree(a) = &msg {
                    for t in &a.trampoline_ids {
                        slot.justified(*t)?;
                    }
                }
                slot.inbox.push_back(msg);
            }
        }
        Ok(())
    }

    /// Runs a registry call that may fail: on failure nothing may have changed.
    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Registry) -> Result<T, CoreError>,
    ) -> Result<Option<T>, String> {
        let before = digest(&self.reg);
        match f(&mut self.reg) {
            Ok(v) => {
                self.reg
                    .check_invariants()
                    .map_err(|e| format!("invariant broken after {what}: {e}"))?;
                Ok(Some(v))
            }
            Err(e) => {
                if e.to_string().trim().is_empty() {
                    return Err(format!("{what}: empty error message"));
                }
                let after = digest(&self.reg);
                if before != after {
                    return Err(format!(
                        "{what} was rejected ({e}) but changed the registry:\nbefore {before}\nafter  {after}"
                    ));
                }
                Ok(None)
            }
        }
    }

    /// Sends one agent message; logs it for the grace model when accepted.
    fn send(&mut self, a: usize, msg: FromAgent) -> Result<bool, String> {
        let Some(id) = self.slots[a].id.filter(|_| self.slots[a].connected) else {
            // A message on a dead session: refused as coming from an unknown agent.
            let gone = self.slots[a].id.unwrap_or(9999);
            let r = self.call("message from a disconnected agent", |reg| {
                reg.agent_message(gone, Some(msg), Instant::now())
            })?;
            return if r.is_some() {
                Err("a disconnected agent's message was accepted".into())
            } else {
                Ok(false)
            };
        };
        let ev: Vec<Ev> = match &msg {
            FromAgent::ThreadsBorn(t) => vec![Ev::Alive(t.tids.clone())],
            FromAgent::ThreadsExited(t) => vec![Ev::Exit(t.tids.clone())],
            FromAgent::Quiescent(q) => q
                .reports
                .iter()
                .map(|q| Ev::Stamp(q.tid, q.epoch))
                .collect(),
            FromAgent::Barrier(b) => vec![Ev::Alive(b.tids.clone())],
            FromAgent::Trampoline(pb::TrampolineReport {
                trampoline_id,
                report: Some(pb::trampoline_report::Report::Retired(r)),
            }) => vec![Ev::Retire(*trampoline_id, r.epoch, r.tids.clone())],
            _ => vec![],
        };
        let what = format!("{msg:?}");
        let r = self.call(&what, |reg| {
            reg.agent_message(id, Some(msg), Instant::now())
        })?;
        if r.is_some() {
            self.slots[a].log.extend(ev);
        }
        self.route()?;
        Ok(r.is_some())
    }

    fn hello(&mut self, a: usize, restart: bool) -> Result<(), String> {
        if restart {
            let s = &mut self.slots[a];
            s.start_time += 1;
            s.view = View {
                threads: [1].into(),
                next_tid: 2,
                ..Default::default()
            };
        }
        let s = &self.slots[a];
        let hello = s.hello();
        let peer = (s.pid, s.uid);
        let was_connected = s.connected;
        let r = self.call("hello", |reg| {
            reg.agent_hello(Some(peer), hello.clone(), Instant::now())
        })?;
        match r {
            Some((id, _)) => {
                if was_connected && !restart {
                    return Err("a second session of a connected agent was admitted".into());
                }
                let s = &mut self.slots[a];
                s.id = Some(id);
                s.connected = true;
                s.inbox.clear();
                let live: BTreeSet<Tid> = hello.tids.iter().copied().collect();
                s.log = vec![Ev::Alive(hello.tids.clone())];
                for t in &hello.trampolines {
                    if t.state != pb::TrampolineState::Live as i32 {
                        let tids = t.retired_tids.iter().copied().filter(|x| live.contains(x));
                        s.log
                            .push(Ev::Retire(t.trampoline_id, t.retired_epoch, tids.collect()));
                    }
                }
            }
            None if !was_connected => {
                return Err(format!("a correct hello was refused: {hello:?}"));
            }
            None => {}
        }
        self.route()
    }

    fn bad_hello(&mut self, a: usize, bad: &BadHello) -> Result<(), String> {
        let s = &self.slots[a];
        let mut h = s.hello();
        h.start_time += 1000; // never a resume
        let mut peer = (s.pid, s.uid);
        let status = |state: pb::TrampolineState, id: u64, tracers: &[u64], sites: &[u64]| {
            pb::TrampolineStatus {
                trampoline_id: id,
                state: state as i32,
                tracers: tracers
                    .iter()
                    .map(|t| pb::TracerRef {
                        tracer_id: *t,
                        callback: None,
                    })
                    .collect(),
                sites: sites
                    .iter()
                    .map(|a| pb::Site {
                        address: *a,
                        name: String::new(),
                    })
                    .collect(),
                retired_epoch: 0,
                retired_tids: vec![],
            }
        };
        use pb::TrampolineState as S;
        match bad {
            BadHello::Version => h.protocol_version += 1,
            BadHello::PeerPid => peer.0 += 1,
            BadHello::PeerUid => peer.1 += 1,
            BadHello::PidZero => {
                h.pid = 0;
                peer.0 = 0;
            }
            BadHello::State(st) => {
                if matches!(
                    S::try_from(*st),
                    Ok(S::Live | S::Retired | S::FreeAuthorized)
                ) {
                    return Ok(());
                }
                h.trampolines.push(pb::TrampolineStatus {
                    state: *st,
                    ..status(S::Live, 50, &[1], &[])
                });
            }
            BadHello::DupTramp => {
                h.trampolines.push(status(S::Retired, 50, &[1], &[]));
                h.trampolines.push(status(S::Retired, 50, &[1], &[]));
            }
            BadHello::MaxTramp => h.trampolines.push(status(S::Live, u64::MAX, &[1], &[7])),
            BadHello::DupSite => {
                h.trampolines.push(status(S::Live, 50, &[1], &[7]));
                h.trampolines.push(status(S::Live, 51, &[2], &[7]));
            }
            BadHello::LiveNoTracer => h.trampolines.push(status(S::Live, 50, &[], &[7])),
            BadHello::DupTracer => h.trampolines.push(status(S::Live, 50, &[1, 1], &[7])),
        }
        let r = self.call(&format!("bad hello {bad:?}"), |reg| {
            reg.agent_hello(Some(peer), h, Instant::now())
        })?;
        if r.is_some() {
            return Err(format!("bad hello {bad:?} was accepted"));
        }
        Ok(())
    }

    /// Answers one server message like a correct agent, or with a lie.
    fn answer(&mut self, a: usize, i: usize, lie: &Lie) -> Result<(), String> {
        let s = &mut self.slots[a];
        if !s.connected || s.inbox.is_empty() {
            return Ok(());
        }
        let msg = s.inbox.remove(i % s.inbox.len()).expect("in range");
        if matches!(lie, Lie::Drop) {
            return Ok(());
        }
        let v = &mut s.view;
        let mut out: Vec<FromAgent> = Vec::new();
        match msg {
            ToAgent::ListFunctions(l) => {
                let functions = match glob::Pattern::new(&l.pattern) {
                    Ok(p) => FUNCS
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| p.matches(f))
                        .map(|(i, f)| pb::Function {
                            name: f.to_string(),
                            address: addr(i),
                            patchable: true,
                            ..Default::default()
                        })
                        .collect(),
                    Err(_) => vec![],
                };
                out.push(FromAgent::FunctionList(pb::FunctionList {
                    request_id: l.request_id,
                    functions,
                    error: String::new(),
                    unpatchable_matches: 0,
                }));
            }
            ToAgent::Install(i) => {
                let sites: Vec<u64> = i.sites.iter().map(|s| s.address).collect();
                for (_, s, ret) in v.tramps.values_mut() {
                    if ret.is_none() {
                        s.retain(|x| !sites.contains(x));
                    }
                }
                v.tramps.insert(i.trampoline_id, (i.tracers, sites, None));
                out.push(FromAgent::Trampoline(pb::TrampolineReport {
                    trampoline_id: i.trampoline_id,
                    report: Some(pb::trampoline_report::Report::Live(pb::Live {
                        sites: i.sites,
                        skipped: vec![],
                    })),
                }));
            }
            ToAgent::Remove(r) => {
                if let Some((_, sites, ret @ None)) = v.tramps.get_mut(&r.trampoline_id) {
                    v.epoch += 1;
                    sites.clear();
                    let tids: Vec<Tid> = v.threads.iter().copied().collect();
                    *ret = Some((v.epoch, tids.clone()));
                    out.push(FromAgent::Trampoline(pb::TrampolineReport {
                        trampoline_id: r.trampoline_id,
                        report: Some(pb::trampoline_report::Report::Retired(pb::Retired {
                            epoch: v.epoch,
                            tids,
                        })),
                    }));
                }
            }
            ToAgent::AuthorizeFree(f) => {
                for id in f.trampoline_ids {
                    if matches!(v.tramps.get(&id), Some((_, _, Some(_)))) {
                        v.tramps.remove(&id);
                        out.push(FromAgent::Trampoline(pb::TrampolineReport {
                            trampoline_id: id,
                            report: Some(pb::trampoline_report::Report::Freed(pb::Freed {})),
                        }));
                    }
                }
            }
            ToAgent::Barrier(b) => {
                v.epoch += 1;
                out.push(FromAgent::Barrier(pb::BarrierReport {
                    barrier_id: b.barrier_id,
                    epoch: v.epoch,
                    tids: v.threads.iter().copied().collect(),
                }));
            }
            ToAgent::Welcome(_)
            | ToAgent::Expedite(_)
            | ToAgent::Shutdown(_)
            | ToAgent::Covered(_) => {}
        }
        for mut m in out {
            match (lie, &mut m) {
                (Lie::StaleEpoch, FromAgent::Barrier(b)) => b.epoch = b.epoch.saturating_sub(2),
                (Lie::StaleEpoch, FromAgent::Trampoline(t)) => {
                    if let Some(pb::trampoline_report::Report::Retired(r)) = &mut t.report {
                        r.epoch = r.epoch.saturating_sub(2);
                    }
                }
                (Lie::NoThreads, FromAgent::Barrier(b)) => b.tids.clear(),
                (Lie::NoThreads, FromAgent::Trampoline(t)) => {
                    if let Some(pb::trampoline_report::Report::Retired(r)) = &mut t.report {
                        r.tids.clear();
                    }
                }
                (Lie::WrongId, FromAgent::Trampoline(t)) => t.trampoline_id += 1000,
                (Lie::WrongId, FromAgent::FunctionList(l)) => l.request_id += 1000,
                (Lie::WrongId, FromAgent::Barrier(b)) => b.barrier_id += 1000,
                _ => {}
            }
            if matches!(lie, Lie::Twice) {
                self.send(a, m.clone())?;
            }
            self.send(a, m)?;
        }
        Ok(())
    }

    fn raw(&mut self, a: usize, r: &Raw) -> Result<(), String> {
        use pb::trampoline_report::Report;
        let site = |i: u64| pb::Site {
            address: addr(i as usize % 8),
            name: format!("f{i}"),
        };
        let msg = match r.clone() {
            Raw::Tramp(t, kind, epoch, tids) => FromAgent::Trampoline(pb::TrampolineReport {
                trampoline_id: t,
                report: match kind {
                    0 => Some(Report::Live(pb::Live {
                        sites: vec![site(t)],
                        skipped: vec![pb::SiteError {
                            site: Some(site(t.wrapping_add(1))),
                            reason: "hostile".into(),
                        }],
                    })),
                    1 => Some(Report::Retired(pb::Retired { epoch, tids })),
                    2 => Some(Report::Freed(pb::Freed {})),
                    3 => Some(Report::Failed(pb::InstallFailed {
                        reason: "hostile".into(),
                    })),
                    _ => None,
                },
            }),
            Raw::Quiescent(q) => FromAgent::Quiescent(pb::QuiescentBatch {
                reports: q
                    .into_iter()
                    .map(|(tid, epoch)| pb::Quiescent { tid, epoch })
                    .collect(),
            }),
            Raw::Born(tids) => FromAgent::ThreadsBorn(pb::ThreadsBorn { tids }),
            Raw::Exited(tids) => FromAgent::ThreadsExited(pb::ThreadsExited { tids }),
            Raw::Functions(request_id, f, error, unpatchable_matches) => {
                FromAgent::FunctionList(pb::FunctionList {
                    request_id,
                    functions: f
                        .into_iter()
                        .map(|(i, patchable)| pb::Function {
                            name: format!("f{i}"),
                            address: addr(i as usize),
                            patchable,
                            ..Default::default()
                        })
                        .collect(),
                    error: if error {
                        "hostile".into()
                    } else {
                        String::new()
                    },
                    unpatchable_matches,
                })
            }
            Raw::Barrier(barrier_id, epoch, tids) => FromAgent::Barrier(pb::BarrierReport {
                barrier_id,
                epoch,
                tids,
            }),
            Raw::Events(tracer_id, data, record_count, dropped) => {
                FromAgent::Events(pb::EventBatch {
                    tracer_id,
                    data,
                    record_count,
                    dropped,
                })
            }
            Raw::Counts(tracer_id, c) => FromAgent::Counts(pb::CountReport {
                tracer_id,
                counts: c
                    .into_iter()
                    .map(|(s, count)| pb::SiteCount {
                        site: Some(site(s)),
                        count,
                    })
                    .collect(),
            }),
            Raw::Stalls(tids) => FromAgent::Stalls(pb::StallReport {
                stalls: tids
                    .into_iter()
                    .map(|tid| pb::Stall {
                        tid,
                        ..Default::default()
                    })
                    .collect(),
            }),
            Raw::Callbacks(names) => FromAgent::Callbacks(pb::Callbacks { names }),
            Raw::Hello => FromAgent::Hello(self.slots[a].hello()),
            Raw::Huge(kind) => {
                const N: u32 = 3000;
                match kind {
                    0 => FromAgent::ThreadsBorn(pb::ThreadsBorn {
                        tids: (1000..1000 + N).collect(),
                    }),
                    1 => FromAgent::Quiescent(pb::QuiescentBatch {
                        reports: (0..N)
                            .map(|t| pb::Quiescent {
                                tid: t % 9,
                                epoch: u64::from(t),
                            })
                            .collect(),
                    }),
                    2 => FromAgent::FunctionList(pb::FunctionList {
                        request_id: 1,
                        functions: (0..N)
                            .map(|i| pb::Function {
                                name: format!("f{i}"),
                                address: addr(i as usize % 50),
                                patchable: i % 3 != 0,
                                ..Default::default()
                            })
                            .collect(),
                        error: String::new(),
                        unpatchable_matches: u32::MAX,
                    }),
                    _ => FromAgent::Trampoline(pb::TrampolineReport {
                        trampoline_id: 1,
                        report: Some(pb::trampoline_report::Report::Retired(pb::Retired {
                            epoch: 1,
                            tids: (0..N).collect(),
                        })),
                    }),
                }
            }
            Raw::Error => FromAgent::Error(pb::AgentError {
                message: "hostile".into(),
            }),
            Raw::Empty => {
                if let Some(id) = self.slots[a].id.filter(|_| self.slots[a].connected) {
                    let r = self.call("empty message", |reg| {
                        reg.agent_message(id, None, Instant::now())
                    })?;
                    if r.is_some() {
                        return Err("an empty message was accepted".into());
                    }
                }
                return Ok(());
            }
        };
        let second_hello = matches!(msg, FromAgent::Hello(_));
        if self.send(a, msg)? && second_hello {
            return Err("a second hello on a session was accepted".into());
        }
        Ok(())
    }

    fn control(&mut self, step: &Step) -> Result<(), String> {
        let now = Instant::now();
        match step {
            Step::Attach(c, t, p, k, n) => {
                let target = match t {
                    0 => Some(pb::target::Target::Pid(AGENTS[0].0)),
                    1 => Some(pb::target::Target::Pid(AGENTS[1].0)),
                    2 => Some(pb::target::Target::Pid(999)),
                    3 => Some(pb::target::Target::All(true)),
                    4 => Some(pb::target::Target::All(false)),
                    5 => Some(pb::target::Target::Exe(format!("/bin/p{}", AGENTS[0].0))),
                    6 => Some(pb::target::Target::Exe(String::new())),
                    _ => None,
                };
                let (kind, custom_name) = match k {
                    0 | 1 => (pb::CallbackKind::Count as i32, ""),
                    2 => (pb::CallbackKind::Trace as i32, ""),
                    3 => (pb::CallbackKind::Custom as i32, "mine"),
                    4 => (pb::CallbackKind::Custom as i32, ""),
                    5 => (0, ""),
                    _ => (99, ""),
                };
                let req = pb::AttachRequest {
                    spec: Some(pb::TracerSpec {
                        target: Some(pb::Target { target }),
                        pattern: PATTERNS[*p].into(),
                        callback: Some(pb::CallbackSpec {
                            kind,
                            custom_name: custom_name.into(),
                            arg_count: [0, 6, 7][*n as usize],
                        }),
                        name: String::new(),
                    }),
                    timeout_ms: 0,
                };
                let caller = CALLERS[*c];
                let bad_input = PATTERNS[*p].is_empty()
                    || glob::Pattern::new(PATTERNS[*p]).is_err()
                    || *k >= 4
                    || *n == 2
                    || *t == 4
                    || *t >= 6;
                let r = self.call(&format!("{step:?}"), |reg| reg.attach(caller, req))?;
                if bad_input && r.is_some() {
                    return Err(format!("{step:?}: a malformed attach was accepted"));
                }
            }
            Step::Detach(c, t, wait) => {
                let caller = CALLERS[*c];
                let req = pb::DetachRequest {
                    tracer_id: *t,
                    wait: *wait,
                    timeout_ms: 0,
                };
                let owner = self.reg.tracer(*t).map(|x| x.owner_uid);
                let r = self.call(&format!("{step:?}"), |reg| reg.detach(caller, req, now))?;
                if r.is_some() && !owner.is_some_and(|o| caller.may_see(o)) {
                    return Err(format!("{step:?}: detached a tracer of uid {owner:?}"));
                }
            }
            Step::Functions(c, p, pat) => {
                let caller = CALLERS[*c];
                let pid = [AGENTS[0].0, AGENTS[1].0, 999][*p as usize];
                let req = pb::ListFunctionsRequest {
                    pid,
                    pattern: PATTERNS[*pat].into(),
                    limit: 2,
                };
                let r = self.call(&format!("{step:?}"), |reg| reg.list_functions(caller, req))?;
                let uid = AGENTS.iter().find(|a| a.0 == pid).map(|a| a.1);
                if r.is_some() && !uid.is_some_and(|u| caller.may_see(u)) {
                    return Err(format!("{step:?}: listed functions of uid {uid:?}"));
                }
            }
            Step::Sync(c) => {
                let caller = CALLERS[*c];
                self.call("sync", |reg| Ok(reg.synchronize(caller, now)))?;
            }
            Step::Cancel(op) => {
                self.call("cancel", |reg| {
                    reg.cancel(*op);
                    Ok(())
                })?;
            }
            Step::Query(c, t) => {
                let caller = CALLERS[*c];
                let before = digest(&self.reg);
                let reg = &self.reg;
                for a in reg.list_agents(caller) {
                    if !caller.may_see(a.uid) {
                        return Err(format!("{caller:?} sees agent {a:?}"));
                    }
                }
                for t in reg.list_tracers(caller) {
                    if !caller.may_see(t.owner_uid) {
                        return Err(format!("{caller:?} sees tracer {t:?}"));
                    }
                }
                let uid_of = |pid: u32| AGENTS.iter().find(|a| a.0 == pid).map(|a| a.1);
                for pid in [0, AGENTS[0].0, AGENTS[1].0] {
                    let req = pb::ListTrampolinesRequest {
                        pid,
                        include_freed: true,
                    };
                    for t in reg.list_trampolines(caller, &req, now) {
                        if !uid_of(t.pid).is_some_and(|u| caller.may_see(u)) {
                            return Err(format!("{caller:?} sees trampoline {t:?}"));
                        }
                    }
                }
                for g in reg.grace_periods(caller, now) {
                    if !uid_of(g.pid).is_some_and(|u| caller.may_see(u)) {
                        return Err(format!("{caller:?} sees grace period {g:?}"));
                    }
                }
                let owner = reg.tracer(*t).map(|x| x.owner_uid);
                match (reg.counts(caller, *t), owner) {
                    (Ok(_), Some(o)) if caller.may_see(o) => {}
                    (Err(CoreError::UnknownTracer(_)), None) => {}
                    (Err(CoreError::PermissionDenied(_)), Some(o)) if !caller.may_see(o) => {}
                    (r, o) => {
                        return Err(format!("counts({t}) by {caller:?} of owner {o:?}: {r:?}"));
                    }
                }
                match (reg.check_tracer(caller, *t), owner) {
                    (Ok(()), Some(o)) if caller.may_see(o) => {}
                    (Err(CoreError::UnknownTracer(_)), None) => {}
                    (Err(CoreError::PermissionDenied(_)), Some(o)) if !caller.may_see(o) => {}
                    (r, o) => {
                        return Err(format!("watch({t}) by {caller:?} of owner {o:?}: {r:?}"));
                    }
                }
                if digest(&self.reg) != before {
                    return Err("a query changed the registry".into());
                }
            }
            _ => unreachable!("not a control step"),
        }
        self.route()
    }

    /// Correct answers to everything in flight.
    fn drain(&mut self) -> Result<(), String> {
        for _ in 0..2000 {
            let busy = (0..2).find(|a| !self.slots[*a].inbox.is_empty());
            match busy {
                Some(a) => self.answer(a, 0, &Lie::None)?,
                None => return Ok(()),
            }
        }
        Err("did not settle".into())
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::Hello(a, restart) => self.hello(*a, *restart)?,
            Step::BadHello(a, b) => self.bad_hello(*a, b)?,
            Step::Disconnect(a) => {
                if let Some(id) = self.slots[*a].id {
                    self.call("disconnect", |reg| {
                        reg.agent_disconnected(id);
                        Ok(())
                    })?;
                    let s = &mut self.slots[*a];
                    s.connected = false;
                    s.inbox.clear();
                    self.route()?;
                }
            }
            Step::Gone(a) => {
                if let Some(id) = self.slots[*a].id {
                    self.call("gone", |reg| {
                        reg.agent_disconnected(id);
                        reg.agent_gone(id);
                        Ok(())
                    })?;
                    let s = &mut self.slots[*a];
                    *s = Slot {
                        start_time: s.start_time + 1,
                        ..Slot::new(s.pid, s.uid)
                    };
                    self.route()?;
                }
            }
            Step::Answer(a, i, lie) => self.answer(*a, *i, lie)?,
            Step::Born(a) => {
                let v = &mut self.slots[*a].view;
                let t = v.next_tid;
                v.next_tid += 1;
                v.threads.insert(t);
                self.send(
                    *a,
                    FromAgent::ThreadsBorn(pb::ThreadsBorn { tids: vec![t] }),
                )?;
            }
            Step::Exit(a, i) => {
                let v = &mut self.slots[*a].view;
                if let Some(&t) = v.threads.iter().nth(i % v.threads.len().max(1)) {
                    v.threads.remove(&t);
                    self.send(
                        *a,
                        FromAgent::ThreadsExited(pb::ThreadsExited { tids: vec![t] }),
                    )?;
                }
            }
            Step::Observe(a, i, l) => {
                let v = &self.slots[*a].view;
                if let Some(&tid) = v.threads.iter().nth(i % v.threads.len().max(1)) {
                    let epoch = match l {
                        0 => 0,
                        1 => v.epoch.saturating_sub(1),
                        2 => v.epoch + 1,
                        _ => v.epoch,
                    };
                    self.send(
                        *a,
                        FromAgent::Quiescent(pb::QuiescentBatch {
                            reports: vec![pb::Quiescent { tid, epoch }],
                        }),
                    )?;
                }
            }
            Step::Raw(a, r) => self.raw(*a, r)?,
            Step::Flush(a) => {
                let v = &self.slots[*a].view;
                let reports = v
                    .threads
                    .iter()
                    .map(|&tid| pb::Quiescent {
                        tid,
                        epoch: v.epoch,
                    })
                    .collect();
                self.send(*a, FromAgent::Quiescent(pb::QuiescentBatch { reports }))?;
            }
            other => self.control(other)?,
        }
        Ok(())
    }
}

fn run(steps: &[Step]) -> Result<(), String> {
    let mut w = World::new();
    w.hello(0, false)?;
    w.hello(1, false)?;
    for (n, s) in steps.iter().enumerate() {
        w.step(s).map_err(|e| format!("step {n} {s:?}: {e}"))?;
    }
    // Still a working server: every agent reconnects and answers everything.
    for a in 0..2 {
        if !w.slots[a].connected {
            w.hello(a, false)?;
        }
    }
    w.drain()?;
    let active: Vec<TracerId> = w
        .reg
        .tracers
        .values()
        .filter(|t| t.state == TracerState::Active)
        .map(|t| t.id)
        .collect();
    for t in active {
        w.step(&Step::Detach(0, t, false))?;
    }
    for _ in 0..3 {
        w.drain()?;
        w.step(&Step::Flush(0))?;
        w.step(&Step::Flush(1))?;
    }
    w.drain()?;
    w.reg.check_invariants()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Random hostile agent messages and client requests: no panic, rejected inputs
    /// change nothing, invariants hold, no premature AuthorizeFree, no leak across uids.
    #[test]
    fn hostile_inputs_are_rejected_cleanly(steps in prop::collection::vec(step(), 1..80)) {
        if let Err(e) = run(&steps) {
            prop_assert!(false, "{e}");
        }
    }
}

/// Each kind of bad agent message gets its own precise error (and changes nothing,
/// which the property test checks on random ones).
#[test]
fn agent_messages_are_rejected_precisely() {
    use pb::trampoline_report::Report;
    let mut w = World::new();
    w.hello(0, false).unwrap();
    w.step(&Step::Attach(0, 0, 3, 0, 0)).unwrap(); // root, pid 100, "gamma", count
    w.drain().unwrap();
    let id = w.slots[0].id.unwrap();
    let live: Vec<u64> = w.reg.agents[&id]
        .trampolines
        .values()
        .filter(|t| t.state == TState::Live)
        .map(|t| t.id)
        .collect();
    assert_eq!(live.len(), 1, "one live trampoline");
    let tramp = live[0];
    let report = |t: u64, r: Report| {
        Some(FromAgent::Trampoline(pb::TrampolineReport {
            trampoline_id: t,
            report: Some(r),
        }))
    };
    let cases: Vec<(Option<FromAgent>, &str)> = vec![
        (
            report(tramp, Report::Freed(pb::Freed {})),
            "free report without authorization for trampoline",
        ),
        (
            report(
                tramp,
                Report::Retired(pb::Retired {
                    epoch: 9,
                    tids: vec![],
                }),
            ),
            "retired report for trampoline",
        ),
        (
            report(
                tramp,
                Report::Live(pb::Live {
                    sites: vec![],
                    skipped: vec![],
                }),
            ),
            "live report for trampoline",
        ),
        (
            report(
                tramp,
                Report::Failed(pb::InstallFailed { reason: "x".into() }),
            ),
            "install failure for trampoline",
        ),
        (
            report(99, Report::Freed(pb::Freed {})),
            "unknown trampoline 99",
        ),
        (
            Some(FromAgent::Trampoline(pb::TrampolineReport {
                trampoline_id: tramp,
                report: None,
            })),
            "empty report",
        ),
        (
            Some(FromAgent::FunctionList(pb::FunctionList {
                request_id: 777,
                ..Default::default()
            })),
            "unknown request 777",
        ),
        (
            Some(FromAgent::Barrier(pb::BarrierReport {
                barrier_id: 5,
                epoch: 1,
                tids: vec![],
            })),
            "barrier 5",
        ),
        (Some(FromAgent::Hello(w.slots[0].hello())), "second hello"),
        (
            Some(FromAgent::ThreadsBorn(pb::ThreadsBorn { tids: vec![3, 0] })),
            "tid 0",
        ),
        (None, "empty agent message"),
    ];
    for (msg, needle) in cases {
        let what = format!("{msg:?}");
        let before = digest(&w.reg);
        match w.reg.agent_message(id, msg, Instant::now()) {
            Err(CoreError::Protocol(m)) => assert!(
                m.to_lowercase().contains(&needle.to_lowercase()),
                "{what}: {m:?} does not say {needle:?}"
            ),
            other => panic!("{what}: expected a protocol violation, got {other:?}"),
        }
        assert_eq!(before, digest(&w.reg), "{what} changed the registry");
    }
    // A malformed event batch of a tracer that targets the agent.
    let tracer = *w.reg.tracers.keys().next().unwrap();
    let bad = FromAgent::Events(pb::EventBatch {
        tracer_id: tracer,
        data: vec![1, 2, 3],
        record_count: 1,
        dropped: 0,
    });
    assert!(matches!(
        w.reg.agent_message(id, Some(bad), Instant::now()),
        Err(CoreError::Invalid(m)) if m.contains("truncated")
    ));
    // Messages on a session the server does not know.
    assert_eq!(
        w.reg.agent_message(4242, None, Instant::now()),
        Err(CoreError::UnknownAgent(4242))
    );
    // A retirement at an epoch older than one already seen is refused: the
    // trampoline stays allocated and no grace period starts on it.
    w.step(&Step::Detach(0, tracer, false)).unwrap();
    let remove = w.slots[0].inbox.pop_front();
    assert!(matches!(remove, Some(ToAgent::Remove(_))), "{remove:?}");
    // The agent already reported epoch 7 (set directly: the scenario only needs it).
    w.reg.agents.get_mut(&id).unwrap().epoch = 7;
    let stale = report(
        tramp,
        Report::Retired(pb::Retired {
            epoch: 3,
            tids: vec![1, 2],
        }),
    );
    let before = digest(&w.reg);
    match w.reg.agent_message(id, stale, Instant::now()) {
        Err(CoreError::Protocol(m)) => assert!(m.contains("older than epoch 7"), "{m}"),
        other => panic!("stale retirement: {other:?}"),
    }
    assert_eq!(before, digest(&w.reg));
    assert_eq!(
        w.reg.agents[&id].trampolines[&tramp].state,
        TState::Retiring
    );

    // Hellos that re-report impossible states are refused with the reason.
    for (bad, needle) in [
        (BadHello::DupSite, "a site calls one trampoline"),
        (BadHello::DupTramp, "re-reported twice"),
        (BadHello::MaxTramp, "never assigned"),
        (BadHello::LiveNoTracer, "has no tracer"),
        (BadHello::DupTracer, "twice"),
        (BadHello::State(0), "only live, retired and free-authorized"),
        (BadHello::PeerPid, "may only register its own process"),
        (BadHello::PeerUid, "runs as uid"),
        (BadHello::Version, "protocol version mismatch"),
        (BadHello::PidZero, "pid 0"),
    ] {
        let s = &w.slots[1];
        let mut h = s.hello();
        let mut peer = (s.pid, s.uid);
        let t = |id: u64, state: pb::TrampolineState, tracers: &[u64], site: Option<u64>| {
            pb::TrampolineStatus {
                trampoline_id: id,
                state: state as i32,
                tracers: tracers
                    .iter()
                    .map(|t| pb::TracerRef {
                        tracer_id: *t,
                        callback: None,
                    })
                    .collect(),
                sites: site
                    .map(|a| pb::Site {
                        address: a,
                        name: String::new(),
                    })
                    .into_iter()
                    .collect(),
                retired_epoch: 0,
                retired_tids: vec![],
            }
        };
        use pb::TrampolineState as S;
        match bad {
            BadHello::DupSite => {
                h.trampolines = vec![t(5, S::Live, &[1], Some(9)), t(6, S::Live, &[2], Some(9))]
            }
            BadHello::DupTramp => {
                h.trampolines = vec![t(5, S::Retired, &[1], None), t(5, S::Retired, &[1], None)]
            }
            BadHello::MaxTramp => h.trampolines = vec![t(u64::MAX, S::Retired, &[1], None)],
            BadHello::LiveNoTracer => h.trampolines = vec![t(5, S::Live, &[], Some(9))],
            BadHello::DupTracer => h.trampolines = vec![t(5, S::Live, &[1, 1], Some(9))],
            BadHello::State(_) => h.trampolines = vec![t(5, S::Requested, &[1], None)],
            BadHello::PeerPid => peer.0 = 1,
            BadHello::PeerUid => peer.1 = 0,
            BadHello::Version => h.protocol_version = 99,
            BadHello::PidZero => {
                h.pid = 0;
                peer.0 = 0;
            }
        }
        let before = digest(&w.reg);
        let e = w
            .reg
            .agent_hello(Some(peer), h, Instant::now())
            .expect_err("a bad hello");
        assert!(
            e.to_string()
                .to_lowercase()
                .contains(&needle.to_lowercase()),
            "{bad:?}: {e}"
        );
        assert_eq!(before, digest(&w.reg), "{bad:?} changed the registry");
    }
}
