//! Registry tests: scenarios, and a property test that drives the registry with a
//! simulated agent that follows the protocol, under random interleavings of attaches,
//! detaches, quiescent observations, thread births and deaths, delayed delivery and
//! reconnects. The simulated agent checks, at every `AuthorizeFree`, that every thread
//! alive at the retirement has really been observed outside since (or exited).

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::grace::Tid;

use pb::agent_message::Body as FromAgent;

const FUNCS: [&str; 6] = ["alpha", "beta", "gamma", "delta", "alpine", "bet"];
const PATTERNS: [&str; 5] = ["al*", "b*", "*a", "gamma", "*"];

fn addr(i: usize) -> u64 {
    0x1000 * (i as u64 + 1)
}

struct SimTramp {
    group: Vec<pb::TracerRef>,
    retired: Option<(u64, BTreeSet<Tid>)>,
    observed: BTreeSet<Tid>,
    authorized: bool,
}

/// A protocol-abiding agent with fake threads.
struct Sim {
    id: AgentId,
    pid: u32,
    epoch: u64,
    threads: BTreeSet<Tid>,
    next_tid: Tid,
    tramps: BTreeMap<u64, SimTramp>,
    owner: BTreeMap<u64, u64>,
    /// server -> agent, in flight
    inq: VecDeque<ToAgent>,
    /// agent -> server, in flight
    outq: VecDeque<FromAgent>,
    /// Observations stamped but not yet queued (the observing code read the epoch,
    /// then was slow to report).
    stamped: Vec<pb::Quiescent>,
}

impl Sim {
    fn hello(&self) -> pb::Hello {
        pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            agent_version: "sim".into(),
            pid: self.pid,
            start_time: 42,
            uid: 0,
            exe: "/sim".into(),
            build_id: String::new(),
            parent_pid: 0,
            parent_start_time: 0,
            cmdline: String::new(),
            tids: self.threads.iter().copied().collect(),
            epoch: self.epoch,
            trampolines: self
                .tramps
                .iter()
                .map(|(id, t)| pb::TrampolineStatus {
                    trampoline_id: *id,
                    state: match (&t.retired, t.authorized) {
                        (None, _) => pb::TrampolineState::Live,
                        (Some(_), false) => pb::TrampolineState::Retired,
                        (Some(_), true) => pb::TrampolineState::FreeAuthorized,
                    } as i32,
                    tracers: t.group.clone(),
                    sites: self
                        .owner
                        .iter()
                        .filter(|(_, o)| **o == *id)
                        .map(|(a, _)| pb::Site {
                            address: *a,
                            name: String::new(),
                        })
                        .collect(),
                    retired_epoch: t.retired.as_ref().map_or(0, |r| r.0),
                    retired_tids: t
                        .retired
                        .as_ref()
                        .map(|r| r.1.iter().copied().collect())
                        .unwrap_or_default(),
                })
                .collect(),
            callbacks: vec![],
            arrival: 0,
        }
    }

    /// Handles one server message like a real agent would.
    fn process(&mut self, msg: ToAgent) -> Result<(), String> {
        match msg {
            ToAgent::Welcome(_)
            | ToAgent::Expedite(_)
            | ToAgent::Shutdown(_)
            | ToAgent::Covered(_) => {}
            ToAgent::ListFunctions(l) => {
                let pat = glob::Pattern::new(&l.pattern).unwrap();
                let functions = FUNCS
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| pat.matches(f))
                    .map(|(i, f)| pb::Function {
                        name: f.to_string(),
                        address: addr(i),
                        patchable: true,
                        ..Default::default()
                    })
                    .collect();
                self.outq
                    .push_back(FromAgent::FunctionList(pb::FunctionList {
                        request_id: l.request_id,
                        functions,
                        error: String::new(),
                        unpatchable_matches: 0,
                    }));
            }
            ToAgent::Install(i) => {
                for s in &i.sites {
                    self.owner.insert(s.address, i.trampoline_id);
                }
                self.tramps.insert(
                    i.trampoline_id,
                    SimTramp {
                        group: i.tracers,
                        retired: None,
                        observed: BTreeSet::new(),
                        authorized: false,
                    },
                );
                self.outq
                    .push_back(FromAgent::Trampoline(pb::TrampolineReport {
                        trampoline_id: i.trampoline_id,
                        report: Some(pb::trampoline_report::Report::Live(pb::Live {
                            sites: i.sites,
                            skipped: vec![],
                        })),
                    }));
            }
            ToAgent::Remove(r) => {
                let Some(t) = self.tramps.get_mut(&r.trampoline_id) else {
                    return Err(format!("remove of unknown trampoline {}", r.trampoline_id));
                };
                self.owner.retain(|_, o| *o != r.trampoline_id);
                self.epoch += 1;
                t.retired = Some((self.epoch, self.threads.clone()));
                self.outq
                    .push_back(FromAgent::Trampoline(pb::TrampolineReport {
                        trampoline_id: r.trampoline_id,
                        report: Some(pb::trampoline_report::Report::Retired(pb::Retired {
                            epoch: self.epoch,
                            tids: self.threads.iter().copied().collect(),
                        })),
                    }));
            }
            ToAgent::AuthorizeFree(a) => {
                for id in a.trampoline_ids {
                    let Some(t) = self.tramps.get_mut(&id) else {
                        return Err(format!("authorize of unknown trampoline {id}"));
                    };
                    let Some((_, must)) = &t.retired else {
                        return Err(format!("trampoline {id} authorized while live"));
                    };
                    let unseen: Vec<_> = must.difference(&t.observed).collect();
                    if !unseen.is_empty() {
                        return Err(format!(
                            "PREMATURE FREE of trampoline {id}: threads {unseen:?} never seen outside"
                        ));
                    }
                    t.authorized = true;
                    self.tramps.remove(&id);
                    self.outq
                        .push_back(FromAgent::Trampoline(pb::TrampolineReport {
                            trampoline_id: id,
                            report: Some(pb::trampoline_report::Report::Freed(pb::Freed {})),
                        }));
                }
            }
            ToAgent::Barrier(b) => {
                self.epoch += 1;
                self.outq.push_back(FromAgent::Barrier(pb::BarrierReport {
                    barrier_id: b.barrier_id,
                    epoch: self.epoch,
                    tids: self.threads.iter().copied().collect(),
                }));
            }
        }
        Ok(())
    }

    fn stamp(&mut self, tid: Tid) -> pb::Quiescent {
        for t in self.tramps.values_mut() {
            if matches!(&t.retired, Some((e, _)) if *e <= self.epoch) {
                t.observed.insert(tid);
            }
        }
        pb::Quiescent {
            tid,
            epoch: self.epoch,
        }
    }

    fn observe(&mut self, tid: Tid) {
        let q = self.stamp(tid);
        self.outq
            .push_back(FromAgent::Quiescent(pb::QuiescentBatch {
                reports: vec![q],
            }));
    }
}

/// Delivers a message of the protocol-abiding simulated agent: it is never rejected.
fn deliver(reg: &mut Registry, id: AgentId, msg: FromAgent) -> Result<(), String> {
    let what = format!("{msg:?}");
    reg.agent_message(id, Some(msg), Instant::now())
        .map_err(|e| format!("a message of a correct agent was rejected: {e}: {what}"))
}

/// Moves effects for the agent into its inbox; returns the replies.
fn route(reg: &mut Registry, sim: &mut Sim, connected: bool) -> Vec<(OpId, Reply)> {
    let mut replies = Vec::new();
    for e in reg.take_effects() {
        match e {
            Effect::Send(a, m) if a == sim.id && connected => sim.inq.push_back(m),
            Effect::Send(..) => {}
            Effect::Reply(op, r) => replies.push((op, r)),
            Effect::Events(..) => {}
        }
    }
    replies
}

fn connect(reg: &mut Registry, sim: &mut Sim) {
    let (id, _) = reg
        .agent_hello(Some((sim.pid, 0)), sim.hello(), Instant::now())
        .expect("hello accepted");
    sim.id = id;
}

fn new_sim(threads: u32) -> Sim {
    Sim {
        id: 0,
        pid: 4242,
        epoch: 0,
        threads: (1..=threads).collect(),
        next_tid: threads + 1,
        tramps: BTreeMap::new(),
        owner: BTreeMap::new(),
        inq: VecDeque::new(),
        outq: VecDeque::new(),
        stamped: Vec::new(),
    }
}

fn spec(pattern: &str) -> pb::AttachRequest {
    pb::AttachRequest {
        spec: Some(pb::TracerSpec {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Pid(4242)),
            }),
            pattern: pattern.into(),
            callback: Some(pb::CallbackSpec {
                kind: pb::CallbackKind::Count as i32,
                ..Default::default()
            }),
            name: String::new(),
        }),
        timeout_ms: 0,
    }
}

/// Runs the simulation until nothing is in flight.
fn settle(reg: &mut Registry, sim: &mut Sim) -> Result<Vec<(OpId, Reply)>, String> {
    let mut replies = route(reg, sim, true);
    for _ in 0..10_000 {
        if let Some(m) = sim.inq.pop_front() {
            sim.process(m)?;
        } else if let Some(m) = sim.outq.pop_front() {
            deliver(reg, sim.id, m)?;
        } else {
            return Ok(replies);
        }
        replies.extend(route(reg, sim, true));
    }
    Err("did not settle".into())
}

#[test]
fn attach_detach_life_cycle() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(2);
    connect(&mut reg, &mut sim);
    let op = reg.attach(Caller::ROOT, spec("al*")).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    let (rop, Reply::Attach(Ok(r))) = &replies[0] else {
        panic!("{replies:?}")
    };
    assert_eq!(*rop, op);
    assert_eq!(r.results[0].sites_patched, 2);
    let tracer = r.tracer.as_ref().unwrap().tracer_id;
    assert_eq!(sim.owner.len(), 2);

    let det = pb::DetachRequest {
        tracer_id: tracer,
        wait: true,
        timeout_ms: 0,
    };
    let op = reg.detach(Caller::ROOT, det, Instant::now()).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    assert!(replies.is_empty(), "no reply before the grace period");
    let t = reg.list_trampolines(Caller::ROOT, &Default::default(), Instant::now());
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state, pb::TrampolineState::Retired as i32);
    assert_eq!(t[0].holdouts, vec![1, 2]);
    sim.observe(1);
    assert!(settle(&mut reg, &mut sim).unwrap().is_empty());
    sim.observe(2);
    let replies = settle(&mut reg, &mut sim).unwrap();
    assert!(matches!(&replies[..], [(o, Reply::Detach(Ok(d)))] if *o == op && d.complete));
    assert!(sim.tramps.is_empty(), "freed in the agent");
    assert!(reg.list_tracers(Caller::ROOT).is_empty());
}

#[test]
fn overlapping_tracers_move_sites_between_groups() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    // alpha is now in a group of two tracers, alpine alone in the first.
    let alpha_owner = sim.owner[&addr(0)];
    let alpine_owner = sim.owner[&addr(4)];
    assert_ne!(alpha_owner, alpine_owner);
    assert_eq!(sim.tramps[&alpha_owner].group.len(), 2);
    assert_eq!(sim.tramps[&alpine_owner].group.len(), 1);
}

#[test]
fn errors_change_nothing() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    let before = format!("{:?}", reg.list_agents(Caller::ROOT));
    assert!(matches!(
        reg.attach(Caller::ROOT, spec("foo[")),
        Err(CoreError::BadPattern { .. })
    ));
    let mut other = spec("*");
    other.spec.as_mut().unwrap().target = Some(pb::Target {
        target: Some(pb::target::Target::Pid(1)),
    });
    assert_eq!(reg.attach(Caller::ROOT, other), Err(CoreError::NoAgent(1)));
    assert!(matches!(
        reg.attach(Caller { uid: 1000 }, spec("*")),
        Err(CoreError::PermissionDenied(_))
    ));
    assert_eq!(
        reg.detach(
            Caller::ROOT,
            pb::DetachRequest {
                tracer_id: 9,
                ..Default::default()
            },
            Instant::now()
        ),
        Err(CoreError::UnknownTracer(9))
    );
    // A pattern that matches nothing in a pid target fails with NOT_FOUND and leaves no tracer.
    reg.attach(Caller::ROOT, spec("zzz*")).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    assert!(
        matches!(
            &replies[..],
            [(_, Reply::Attach(Err(CoreError::NoMatch { .. })))]
        ),
        "{replies:?}"
    );
    assert!(reg.list_tracers(Caller::ROOT).is_empty());
    assert!(reg.take_effects().is_empty());
    assert_eq!(before, format!("{:?}", reg.list_agents(Caller::ROOT)));
    let mut bad = sim.hello();
    bad.protocol_version = 99;
    bad.start_time = 7;
    assert!(matches!(
        reg.agent_hello(Some((4242, 0)), bad.clone(), Instant::now()),
        Err(CoreError::VersionMismatch(_))
    ));
    bad.protocol_version = pb::PROTOCOL_VERSION;
    assert!(matches!(
        reg.agent_hello(Some((1, 0)), bad, Instant::now()),
        Err(CoreError::PermissionDenied(_))
    ));
    assert_eq!(reg.list_agents(Caller::ROOT).len(), 1);
}

#[test]
fn counts_survive_the_exit_of_their_process() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    let (_, Reply::Attach(Ok(r))) = &replies[0] else {
        panic!("{replies:?}")
    };
    let tracer = r.tracer.as_ref().unwrap().tracer_id;
    let report = |n| pb::CountReport {
        tracer_id: tracer,
        counts: vec![pb::SiteCount {
            site: Some(pb::Site {
                address: addr(0),
                name: "alpha".into(),
            }),
            count: n,
        }],
    };
    reg.count_report(sim.id, report(5)).unwrap();
    reg.count_report(sim.id, report(7)).unwrap(); // cumulative: replaces
    assert_eq!(reg.counts(Caller::ROOT, tracer).unwrap().total, 7);
    assert!(matches!(
        reg.counts(Caller { uid: 7 }, tracer),
        Err(CoreError::PermissionDenied(_))
    ));
    reg.agent_disconnected(sim.id);
    reg.agent_gone(sim.id);
    let c = reg.counts(Caller::ROOT, tracer).unwrap();
    assert_eq!((c.total, c.counts[0].function.as_str()), (7, "alpha"));
}

/// A server restart: whatever is in flight is lost, a fresh registry is seeded with
/// what the old one would have saved, and the agent connects to it.
fn restart(reg: &mut Registry, sim: &mut Sim) -> Result<(), String> {
    sim.inq.clear();
    sim.outq.clear();
    sim.stamped.clear();
    let (saved, next) = reg.saved_tracers();
    let mut fresh = Registry::new(Settings::default());
    fresh
        .restore_tracers(saved, next)
        .map_err(|e| format!("restore: {e}"))?;
    *reg = fresh;
    connect(reg, sim);
    Ok(())
}

/// A failed attach (a pattern that matches nothing) consumes no tracer id: the next
/// attach gets the id it would have had; an attach overlapping the failed one keeps
/// the failed id spent (it was handed out before it).
#[test]
fn a_failed_attach_consumes_no_tracer_id() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    let first = attached_id(&settle(&mut reg, &mut sim).unwrap());
    reg.attach(Caller::ROOT, spec("zzz*")).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    assert!(
        matches!(
            &replies[..],
            [(_, Reply::Attach(Err(CoreError::NoMatch { .. })))]
        ),
        "{replies:?}"
    );
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    let second = attached_id(&settle(&mut reg, &mut sim).unwrap());
    assert_eq!(second, first + 1, "the failed attach consumed an id");

    // Overlapping: the failed attach's id was handed out before the good one's, so it
    // stays spent (never reused while it could have been seen).
    reg.attach(Caller::ROOT, spec("zzz*")).unwrap();
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    let replies = settle(&mut reg, &mut sim).unwrap();
    let ok: Vec<TracerId> = replies
        .iter()
        .filter_map(|(_, r)| match r {
            Reply::Attach(Ok(r)) => Some(r.tracer.as_ref().unwrap().tracer_id),
            _ => None,
        })
        .collect();
    assert_eq!(ok, vec![second + 2], "{replies:?}");
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    let next = attached_id(&settle(&mut reg, &mut sim).unwrap());
    assert_eq!(next, second + 3);
    assert!(reg.check_invariants().is_ok());
}

fn attached_id(replies: &[(OpId, Reply)]) -> TracerId {
    match replies {
        [(_, Reply::Attach(Ok(r)))] => r.tracer.as_ref().unwrap().tracer_id,
        _ => panic!("{replies:?}"),
    }
}

fn holdouts_of(reg: &Registry, tramp: TrampolineId) -> Vec<Tid> {
    reg.list_trampolines(Caller::ROOT, &Default::default(), Instant::now())
        .into_iter()
        .find(|t| t.trampoline_id == tramp)
        .map(|t| t.holdouts)
        .unwrap_or_else(|| panic!("trampoline {tramp} not listed"))
}

#[test]
fn restored_tracers_keep_their_trampolines_and_nothing_is_authorized_on_old_evidence() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(2);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    let kept = attached_id(&settle(&mut reg, &mut sim).unwrap());
    reg.attach(Caller::ROOT, spec("b*")).unwrap();
    let gone = attached_id(&settle(&mut reg, &mut sim).unwrap());
    let live_tramp = sim.owner[&addr(0)];
    let retired_tramp = sim.owner[&addr(1)];
    let req = pb::DetachRequest {
        tracer_id: gone,
        wait: false,
        timeout_ms: 0,
    };
    reg.detach(Caller::ROOT, req, Instant::now()).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    // Thread 1 is seen outside before the restart; thread 2 is not.
    sim.observe(1);
    settle(&mut reg, &mut sim).unwrap();
    assert_eq!(holdouts_of(&reg, retired_tramp), vec![2]);
    let counts = |n| pb::CountReport {
        tracer_id: kept,
        counts: vec![pb::SiteCount {
            site: Some(pb::Site {
                address: addr(0),
                name: "alpha".into(),
            }),
            count: n,
        }],
    };
    reg.count_report(sim.id, counts(40)).unwrap();
    let owner_before = sim.owner.clone();
    let group_before = sim.tramps[&live_tramp].group.clone();

    restart(&mut reg, &mut sim).unwrap();
    let listed: Vec<TracerId> = reg
        .list_tracers(Caller::ROOT)
        .iter()
        .map(|t| t.tracer_id)
        .collect();
    assert_eq!(listed, vec![kept], "only the active tracer is restored");
    // The agent asks nothing to be reinstalled or removed: its live trampoline is the
    // restored tracer's, as it is.
    let sent = route(&mut reg, &mut sim, true);
    assert!(sent.is_empty());
    assert!(
        sim.inq
            .iter()
            .all(|m| matches!(m, ToAgent::ListFunctions(_) | ToAgent::Expedite(_))),
        "{:?}",
        sim.inq
    );
    settle(&mut reg, &mut sim).unwrap();
    assert_eq!(sim.owner, owner_before, "no site moved");
    assert_eq!(sim.tramps[&live_tramp].group, group_before);
    let t = reg.list_trampolines(Caller::ROOT, &Default::default(), Instant::now());
    assert!(
        t.iter().any(|x| x.trampoline_id == live_tramp
            && x.state == pb::TrampolineState::Live as i32
            && x.sites == 2),
        "{t:?}"
    );
    let view = &reg.list_tracers(Caller::ROOT)[0];
    assert_eq!((view.agents, view.sites), (1, 2), "{view:?}");
    // The evidence about thread 1 from before the restart is not trusted.
    assert_eq!(holdouts_of(&reg, retired_tramp), vec![1, 2]);
    sim.observe(2);
    settle(&mut reg, &mut sim).unwrap();
    assert!(sim.tramps.contains_key(&retired_tramp), "freed too early");
    sim.observe(1);
    settle(&mut reg, &mut sim).unwrap();
    assert!(
        !sim.tramps.contains_key(&retired_tramp),
        "freed after the new grace period"
    );
    // Counts continue (agents report cumulative counts).
    reg.count_report(sim.id, counts(55)).unwrap();
    assert_eq!(reg.counts(Caller::ROOT, kept).unwrap().total, 55);
    // New ids continue after the restored ones (the detached id is not reused).
    reg.attach(Caller::ROOT, spec("gamma")).unwrap();
    let next = attached_id(&settle(&mut reg, &mut sim).unwrap());
    assert!(next > gone, "{next} <= {gone}");
}

#[test]
fn a_restored_tracer_gets_the_sites_its_cut_short_attach_missed() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    let id = attached_id(&settle(&mut reg, &mut sim).unwrap());
    let tramp = sim.owner[&addr(0)];
    // As if the server died before the agent patched alpine.
    sim.owner.remove(&addr(4));
    restart(&mut reg, &mut sim).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    assert_eq!(sim.owner[&addr(0)], tramp, "alpha keeps its trampoline");
    let new = sim.owner[&addr(4)];
    assert_ne!(new, tramp);
    assert_eq!(sim.tramps[&new].group[0].tracer_id, id);
    assert!(sim.tramps[&tramp].retired.is_none());
}

#[test]
fn a_re_reported_group_with_another_callback_than_the_restored_tracer_is_replaced() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    let id = attached_id(&settle(&mut reg, &mut sim).unwrap());
    let old = sim.owner[&addr(0)];
    let (mut saved, next) = reg.saved_tracers();
    saved[0].spec.callback.as_mut().unwrap().kind = pb::CallbackKind::Trace as i32;
    sim.inq.clear();
    let mut fresh = Registry::new(Settings::default());
    fresh.restore_tracers(saved, next).unwrap();
    reg = fresh;
    connect(&mut reg, &mut sim);
    settle(&mut reg, &mut sim).unwrap();
    let new = sim.owner[&addr(0)];
    assert_ne!(
        new, old,
        "the site moved to a trampoline of the restored callback"
    );
    assert_eq!(
        sim.tramps[&new].group[0].callback.as_ref().unwrap().kind,
        pb::CallbackKind::Trace as i32
    );
    assert_eq!(sim.tramps[&new].group[0].tracer_id, id);
    // The old one is retired and freed only after its grace period.
    assert!(sim.tramps[&old].retired.is_some() && !sim.tramps[&old].authorized);
    sim.observe(1);
    settle(&mut reg, &mut sim).unwrap();
    assert!(!sim.tramps.contains_key(&old));
}

#[test]
fn restore_validates_saved_tracers_and_changes_nothing_on_error() {
    let good = SavedTracer {
        id: 4,
        spec: spec("al*").spec.unwrap(),
        owner_uid: 0,
        pid_start_time: 42,
    };
    let mut bad_pattern = good.clone();
    bad_pattern.id = 5;
    bad_pattern.spec.pattern = "al[".into();
    let mut no_target = good.clone();
    no_target.id = 6;
    no_target.spec.target = None;
    let mut zero = good.clone();
    zero.id = 0;
    for (set, want) in [
        (vec![good.clone(), bad_pattern], "saved tracer 5"),
        (vec![good.clone(), no_target], "no target"),
        (vec![good.clone(), good.clone()], "duplicate"),
        (vec![zero], "id 0"),
    ] {
        let mut reg = Registry::new(Settings::default());
        let e = reg.restore_tracers(set, 1).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(reg.list_tracers(Caller::ROOT).is_empty());
        assert_eq!(reg.tracer_generation(), 0);
    }
    let mut reg = Registry::new(Settings::default());
    reg.restore_tracers(vec![good.clone()], 2).unwrap();
    // next id: after the largest restored id even if the saved next id is smaller.
    assert_eq!(reg.saved_tracers(), (vec![good], 5));
}

#[test]
fn a_pid_tracer_does_not_follow_its_pid_to_another_process() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("alpha")).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    let (saved, next) = reg.saved_tracers();
    assert_eq!(saved[0].pid_start_time, 42);
    // After a restart (e.g. a reboot) another process has the pid.
    let mut reg = Registry::new(Settings::default());
    reg.restore_tracers(saved, next).unwrap();
    let mut other = new_sim(1);
    let mut hello = other.hello();
    hello.start_time = 43;
    let (id, _) = reg
        .agent_hello(Some((other.pid, 0)), hello, Instant::now())
        .unwrap();
    other.id = id;
    assert!(
        !reg.take_effects()
            .iter()
            .any(|e| matches!(e, Effect::Send(_, ToAgent::ListFunctions(_)))),
        "the tracer must not apply to a new process with the same pid"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Attach(usize),
    Detach(usize),
    Observe(usize),
    Stamp(usize),
    Flush,
    Born,
    Exit(usize),
    Process,
    Deliver,
    Reconnect,
    Restart,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PATTERNS.len()).prop_map(Op::Attach),
        3 => any::<usize>().prop_map(Op::Detach),
        6 => any::<usize>().prop_map(Op::Observe),
        2 => any::<usize>().prop_map(Op::Stamp),
        2 => Just(Op::Flush),
        1 => Just(Op::Born),
        1 => any::<usize>().prop_map(Op::Exit),
        8 => Just(Op::Process),
        8 => Just(Op::Deliver),
        1 => Just(Op::Reconnect),
        1 => Just(Op::Restart),
        1 => Just(Op::Sync),
    ]
}

fn run(ops: &[Op]) -> Result<(), String> {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(3);
    connect(&mut reg, &mut sim);
    let mut tracers: Vec<TracerId> = Vec::new();
    for op in ops {
        match op {
            Op::Attach(p) => {
                let _ = reg.attach(Caller::ROOT, spec(PATTERNS[*p]));
            }
            Op::Detach(i) => {
                let live: Vec<TracerId> = reg
                    .list_tracers(Caller::ROOT)
                    .iter()
                    .filter(|t| t.state == pb::TracerState::Active as i32)
                    .map(|t| t.tracer_id)
                    .collect();
                if !live.is_empty() {
                    let t = live[i % live.len()];
                    let req = pb::DetachRequest {
                        tracer_id: t,
                        wait: false,
                        timeout_ms: 0,
                    };
                    reg.detach(Caller::ROOT, req, Instant::now())
                        .map_err(|e| e.to_string())?;
                    tracers.push(t);
                }
            }
            Op::Observe(i) => {
                let ts: Vec<Tid> = sim.threads.iter().copied().collect();
                if !ts.is_empty() {
                    sim.observe(ts[i % ts.len()]);
                }
            }
            Op::Stamp(i) => {
                let ts: Vec<Tid> = sim.threads.iter().copied().collect();
                if !ts.is_empty() {
                    let q = sim.stamp(ts[i % ts.len()]);
                    sim.stamped.push(q);
                }
            }
            Op::Flush => {
                let reports = std::mem::take(&mut sim.stamped);
                sim.outq
                    .push_back(FromAgent::Quiescent(pb::QuiescentBatch { reports }));
            }
            Op::Born => {
                sim.threads.insert(sim.next_tid);
                sim.outq.push_back(FromAgent::ThreadsBorn(pb::ThreadsBorn {
                    tids: vec![sim.next_tid],
                }));
                sim.next_tid += 1;
            }
            Op::Exit(i) => {
                let ts: Vec<Tid> = sim.threads.iter().copied().collect();
                if !ts.is_empty() {
                    let tid = ts[i % ts.len()];
                    sim.threads.remove(&tid);
                    for t in sim.tramps.values_mut() {
                        t.observed.insert(tid);
                    }
                    sim.outq
                        .push_back(FromAgent::ThreadsExited(pb::ThreadsExited {
                            tids: vec![tid],
                        }));
                }
            }
            Op::Process => {
                if let Some(m) = sim.inq.pop_front() {
                    sim.process(m)?;
                }
            }
            Op::Deliver => {
                if let Some(m) = sim.outq.pop_front() {
                    deliver(&mut reg, sim.id, m)?;
                }
            }
            Op::Reconnect => {
                // The stream breaks: whatever is in flight is lost.
                sim.inq.clear();
                sim.outq.clear();
                sim.stamped.clear();
                reg.agent_disconnected(sim.id);
                route(&mut reg, &mut sim, false);
                connect(&mut reg, &mut sim);
            }
            Op::Restart => restart(&mut reg, &mut sim)?,
            Op::Sync => {
                reg.synchronize(Caller::ROOT, Instant::now());
            }
        }
        route(&mut reg, &mut sim, true);
        reg.check_invariants()
            .map_err(|e| format!("invariant broken after {op:?}: {e}"))?;
    }
    // Drain: settle, detach everything, every thread reports; nothing may remain.
    settle(&mut reg, &mut sim)?;
    for t in reg.list_tracers(Caller::ROOT) {
        if t.state == pb::TracerState::Active as i32 {
            let req = pb::DetachRequest {
                tracer_id: t.tracer_id,
                wait: false,
                timeout_ms: 0,
            };
            reg.detach(Caller::ROOT, req, Instant::now())
                .map_err(|e| e.to_string())?;
        }
    }
    settle(&mut reg, &mut sim)?;
    for tid in sim.threads.clone() {
        sim.observe(tid);
    }
    settle(&mut reg, &mut sim)?;
    if !sim.tramps.is_empty() {
        return Err(format!(
            "trampolines still allocated in the agent: {:?}",
            sim.tramps.keys().collect::<Vec<_>>()
        ));
    }
    let left = reg.list_trampolines(Caller::ROOT, &Default::default(), Instant::now());
    if !left.is_empty() {
        return Err(format!("server still tracks {left:?}"));
    }
    if !sim.owner.is_empty() {
        return Err("sites still patched".into());
    }
    if !reg.list_tracers(Caller::ROOT).is_empty() {
        return Err("tracers left".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn protocol_interleavings_never_free_early(ops in proptest::collection::vec(op(), 1..150)) {
        if let Err(e) = run(&ops) {
            prop_assert!(false, "{e}");
        }
    }
}

/// `FunctionsAdded{sequence}` is answered with `Covered{sequence}` only after the
/// function listings it caused (and earlier ones) were answered and their installs
/// sent; without such listings at once; a sequence that does not increase is refused.
#[test]
fn covered_follows_the_installs_of_functions_added() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    reg.agent_message(
        sim.id,
        Some(FromAgent::FunctionsAdded(pb::FunctionsAdded {
            count: 1,
            sequence: 1,
        })),
        Instant::now(),
    )
    .unwrap();
    route(&mut reg, &mut sim, true);
    let kinds = |q: &VecDeque<ToAgent>| -> Vec<&'static str> {
        q.iter()
            .map(|m| match m {
                ToAgent::ListFunctions(_) => "list",
                ToAgent::Install(_) => "install",
                ToAgent::Covered(_) => "covered",
                _ => "other",
            })
            .collect()
    };
    assert_eq!(
        kinds(&sim.inq),
        ["list"],
        "no marker before the listing is answered"
    );
    // Answer the listing; what the server sends next ends with the marker.
    let list = sim.inq.pop_front().unwrap();
    sim.process(list).unwrap();
    while let Some(m) = sim.outq.pop_front() {
        deliver(&mut reg, sim.id, m).unwrap();
    }
    route(&mut reg, &mut sim, true);
    assert_eq!(kinds(&sim.inq).last(), Some(&"covered"), "{:?}", sim.inq);
    assert!(
        matches!(sim.inq.back(), Some(ToAgent::Covered(c)) if c.sequence == 1),
        "{:?}",
        sim.inq
    );
    settle(&mut reg, &mut sim).unwrap();

    // Nothing new and no listing outstanding: the marker comes at once.
    reg.agent_message(
        sim.id,
        Some(FromAgent::FunctionsAdded(pb::FunctionsAdded {
            count: 0,
            sequence: 2,
        })),
        Instant::now(),
    )
    .unwrap();
    route(&mut reg, &mut sim, true);
    assert!(
        matches!(&sim.inq.iter().collect::<Vec<_>>()[..], [ToAgent::Covered(c)] if c.sequence == 2),
        "{:?}",
        sim.inq
    );
    sim.inq.clear();
    // Sequences increase within a session.
    let r = reg.agent_message(
        sim.id,
        Some(FromAgent::FunctionsAdded(pb::FunctionsAdded {
            count: 1,
            sequence: 2,
        })),
        Instant::now(),
    );
    assert!(matches!(r, Err(CoreError::Protocol(_))), "{r:?}");
    assert!(route(&mut reg, &mut sim, true).is_empty() && sim.inq.is_empty());
}

#[test]
fn sites_of_an_unloaded_object_leave_the_plan_and_come_back_when_it_is_loaded_again() {
    let mut reg = Registry::new(Settings::default());
    let mut sim = new_sim(1);
    connect(&mut reg, &mut sim);
    reg.attach(Caller::ROOT, spec("al*")).unwrap();
    settle(&mut reg, &mut sim).unwrap();
    // "alpha" and "alpine", on one trampoline.
    let (alpha, alpine) = (addr(0), addr(4));
    let tramp = sim.owner[&alpha];
    assert_eq!(sim.owner.get(&alpine), Some(&tramp));
    let removed = |reg: &mut Registry, sim: &mut Sim, sites: Vec<u64>| {
        deliver(
            reg,
            sim.id,
            FromAgent::FunctionsRemoved(pb::FunctionsRemoved { sites }),
        )
        .unwrap();
        route(reg, sim, true);
    };
    // One site gone (and one the plan never held): the trampoline keeps the other.
    removed(&mut reg, &mut sim, vec![alpine, 0xdead]);
    assert!(sim.inq.is_empty(), "{:?}", sim.inq);
    reg.check_invariants().unwrap();
    // The last one gone: the trampoline is retired, then freed as usual.
    sim.owner.remove(&alpine);
    removed(&mut reg, &mut sim, vec![alpha]);
    assert!(
        matches!(&sim.inq.iter().collect::<Vec<_>>()[..], [ToAgent::Remove(r)] if r.trampoline_id == tramp),
        "{:?}",
        sim.inq
    );
    sim.owner.remove(&alpha);
    settle(&mut reg, &mut sim).unwrap();
    sim.observe(1);
    settle(&mut reg, &mut sim).unwrap();
    reg.check_invariants().unwrap();
    assert!(sim.tramps.is_empty(), "freed in the agent");
    // Loaded again at the same addresses: the tracer covers them again.
    deliver(
        &mut reg,
        sim.id,
        FromAgent::FunctionsAdded(pb::FunctionsAdded {
            count: 2,
            sequence: 1,
        }),
    )
    .unwrap();
    settle(&mut reg, &mut sim).unwrap();
    assert!(
        sim.owner.contains_key(&alpha) && sim.owner.contains_key(&alpine),
        "{:?}",
        sim.owner
    );
    reg.check_invariants().unwrap();
}

/// A sim for process `pid` whose hello names `parent` (pid, start time).
fn child_sim(pid: u32) -> Sim {
    let mut s = new_sim(1);
    s.pid = pid;
    s
}

fn connect_child(reg: &mut Registry, sim: &mut Sim, parent: (u32, u64)) {
    let mut h = sim.hello();
    h.parent_pid = parent.0;
    h.parent_start_time = parent.1;
    let (id, _) = reg
        .agent_hello(Some((sim.pid, 0)), h, Instant::now())
        .expect("hello accepted");
    sim.id = id;
}

fn tree_spec(root: u32, pattern: &str) -> pb::AttachRequest {
    let mut s = spec(pattern);
    s.spec.as_mut().unwrap().target = Some(pb::Target {
        target: Some(pb::target::Target::Tree(root)),
    });
    s
}

/// A tree tracer reaches descendants at any depth as they say hello, also after their
/// parent is gone; a process whose parent identity names another process (a recycled
/// pid: same pid, another start time) or no tree member is not traced.
#[test]
fn tree_tracers_follow_descendants_and_never_recycled_pids() {
    let mut reg = Registry::new(Settings::default());
    // Every sim says start time 42: identities differ by pid.
    let mut root = child_sim(100);
    connect(&mut reg, &mut root);
    // Nothing matches in the root: no error, the tracer stays for descendants.
    reg.attach(Caller::ROOT, tree_spec(100, "zzz*")).unwrap();
    let replies = settle(&mut reg, &mut root).unwrap();
    assert!(
        matches!(&replies[..], [(_, Reply::Attach(Ok(_)))]),
        "{replies:?}"
    );
    reg.attach(Caller::ROOT, tree_spec(100, "alpha")).unwrap();
    settle(&mut reg, &mut root).unwrap();
    let tracer = reg.list_tracers(Caller::ROOT)[1].tracer_id;

    let mut child = child_sim(101);
    connect_child(&mut reg, &mut child, (100, 42));
    settle(&mut reg, &mut child).unwrap();
    assert_eq!(child.owner.len(), 1, "the child got the tracer");
    // The child exits; its child (the root's grandchild) still descends from the root.
    let child_id = child.id;
    reg.agent_disconnected(child_id);
    reg.agent_gone(child_id);
    let mut grandchild = child_sim(102);
    connect_child(&mut reg, &mut grandchild, (101, 42));
    settle(&mut reg, &mut grandchild).unwrap();
    assert_eq!(grandchild.owner.len(), 1, "the grandchild got the tracer");

    // Parent pid 101 with another start time: a recycled pid, not the root's child.
    let mut stranger = child_sim(103);
    connect_child(&mut reg, &mut stranger, (101, 77));
    settle(&mut reg, &mut stranger).unwrap();
    assert!(
        stranger.owner.is_empty(),
        "a recycled parent pid is not followed"
    );
    // No parent named, or an unrelated one: not traced.
    let mut orphan = child_sim(104);
    connect_child(&mut reg, &mut orphan, (1, 1));
    settle(&mut reg, &mut orphan).unwrap();
    assert!(orphan.owner.is_empty());
    // A process that claims to be its own parent is nobody's descendant.
    let mut own = child_sim(105);
    connect_child(&mut reg, &mut own, (105, 42));
    settle(&mut reg, &mut own).unwrap();
    assert!(own.owner.is_empty());

    // Counts of the grandchild, then it exits: kept in the totals and per process.
    let report = |n| {
        FromAgent::Counts(pb::CountReport {
            tracer_id: tracer,
            counts: vec![pb::SiteCount {
                site: Some(pb::Site {
                    address: addr(0),
                    name: "alpha".into(),
                }),
                count: n,
            }],
        })
    };
    reg.agent_message(grandchild.id, Some(report(5)), Instant::now())
        .unwrap();
    reg.agent_message(root.id, Some(report(7)), Instant::now())
        .unwrap();
    reg.agent_disconnected(grandchild.id);
    reg.agent_gone(grandchild.id);
    let c = reg.counts(Caller::ROOT, tracer).unwrap();
    assert_eq!(c.total, 12);
    let by_pid: Vec<(u32, u64, bool)> = c
        .processes
        .iter()
        .map(|p| (p.pid, p.total, p.exited))
        .collect();
    // The root (live), the child (exited with no calls is not kept: it never counted),
    // the grandchild (exited, kept).
    assert!(by_pid.contains(&(100, 7, false)), "{by_pid:?}");
    assert!(by_pid.contains(&(102, 5, true)), "{by_pid:?}");
    assert!(!by_pid.iter().any(|p| p.0 >= 103), "{by_pid:?}");
    let info = reg
        .list_tracers(Caller::ROOT)
        .into_iter()
        .find(|t| t.tracer_id == tracer)
        .unwrap();
    assert_eq!(
        info.processes_matched, 3,
        "root, child and grandchild matched"
    );
    reg.check_invariants().unwrap();
}
