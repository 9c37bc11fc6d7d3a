//! Grace-period timelines: every trampoline's way from its retirement to its free,
//! step by step, with CLOCK_MONOTONIC timestamps — the server's steps (recorded by the
//! registry) merged with the agent's (`AgentGraceTimeline`, sent once it freed the
//! trampoline). Pure and bounded: the [`RECENT`] newest records, at most [`STEP_CAP`]
//! server steps and `AGENT_CAP` agent steps each. Diagnostic only: nothing is decided
//! from it.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Instant;

use patchbay_proto as pb;
use pb::GraceStep as Step;

/// Records kept (the newest).
pub const RECENT: usize = 64;
/// Server steps kept per record.
pub const STEP_CAP: usize = 512;
/// Agent steps accepted per record (the agent sends at most this many).
pub const AGENT_CAP: usize = 1024;

/// `now` on the CLOCK_MONOTONIC scale, in nanoseconds (the agents' clock: one
/// machine). `Instant` is CLOCK_MONOTONIC on Linux; the offset is taken once.
pub fn mono_ns(now: Instant) -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (i0, ns0) = *BASE.get_or_init(|| {
        let i = Instant::now();
        (i, clock_ns())
    });
    if now >= i0 {
        ns0 + now.duration_since(i0).as_nanos() as u64
    } else {
        ns0.saturating_sub(i0.duration_since(now).as_nanos() as u64)
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (0 if the clock cannot be read).
fn clock_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

#[derive(Clone, Debug)]
struct Record {
    agent: u64,
    pid: u32,
    uid: u32,
    trampoline: u64,
    epoch: u64,
    authorized: bool,
    server_steps: usize,
    agent_reported: bool,
    steps: Vec<pb::GraceTimelineStep>,
    dropped: u32,
}

/// The newest grace-period timelines.
#[derive(Clone, Debug, Default)]
pub struct Timelines {
    recs: VecDeque<Record>,
}

impl Timelines {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&mut self, agent: u64, trampoline: u64) -> Option<&mut Record> {
        self.recs
            .iter_mut()
            .rev()
            .find(|r| r.agent == agent && r.trampoline == trampoline)
    }

    /// Trampoline `trampoline` of `agent` (process `pid` of user `uid`) starts
    /// retiring: a new record.
    pub fn start(&mut self, agent: u64, pid: u32, uid: u32, trampoline: u64) {
        if self.recs.len() >= RECENT {
            self.recs.pop_front();
        }
        self.recs.push_back(Record {
            agent,
            pid,
            uid,
            trampoline,
            epoch: 0,
            authorized: false,
            server_steps: 0,
            agent_reported: false,
            steps: Vec::new(),
            dropped: 0,
        });
    }

    /// A server step of the record of (`agent`, `trampoline`), if there is one.
    pub fn step(&mut self, agent: u64, trampoline: u64, step: Step, tid: u32, now: Instant) {
        let Some(r) = self.find(agent, trampoline) else {
            return;
        };
        match step {
            Step::ServerAuthorizeSent => r.authorized = true,
            _ if r.server_steps >= STEP_CAP => {
                r.dropped += 1;
                return;
            }
            _ => {}
        }
        r.server_steps += 1;
        r.steps.push(pb::GraceTimelineStep {
            at_ns: mono_ns(now),
            step: step as i32,
            tid,
        });
    }

    /// The grace period of (`agent`, `trampoline`) started at `epoch`.
    pub fn epoch(&mut self, agent: u64, trampoline: u64, epoch: u64) {
        if let Some(r) = self.find(agent, trampoline) {
            r.epoch = epoch;
        }
    }

    /// The agent's steps (once per record; only `AGENT_*` steps, at most [`AGENT_CAP`]).
    /// Ignored for a trampoline with no record (pruned, or never retired here).
    pub fn agent_steps(&mut self, agent: u64, t: pb::AgentGraceTimeline) {
        let Some(r) = self.find(agent, t.trampoline_id) else {
            return;
        };
        if r.agent_reported {
            return;
        }
        r.agent_reported = true;
        let n = t.steps.len();
        r.steps.extend(
            t.steps
                .into_iter()
                .filter(|s| is_agent_step(s.step))
                .take(AGENT_CAP),
        );
        r.dropped = r
            .dropped
            .saturating_add(t.steps_dropped)
            .saturating_add(n.saturating_sub(AGENT_CAP) as u32);
    }

    /// Up to `n` newest records of processes whose uid `visible` lets through, newest
    /// first, their steps in time order.
    pub fn recent(&self, n: usize, visible: impl Fn(u32) -> bool) -> Vec<pb::GraceTimeline> {
        self.recs
            .iter()
            .rev()
            .filter(|r| visible(r.uid))
            .take(n)
            .map(|r| {
                let mut steps = r.steps.clone();
                steps.sort_by_key(|s| s.at_ns);
                pb::GraceTimeline {
                    agent_id: r.agent,
                    pid: r.pid,
                    trampoline_id: r.trampoline,
                    epoch: r.epoch,
                    authorized: r.authorized,
                    steps,
                    steps_dropped: r.dropped,
                }
            })
            .collect()
    }
}

/// Whether `step` is one the agent records.
pub fn is_agent_step(step: i32) -> bool {
    Step::try_from(step).is_ok_and(|s| s.as_str_name().starts_with("AGENT_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mono_ns_is_the_monotonic_clock() {
        let a = mono_ns(Instant::now());
        let c = clock_ns();
        let b = mono_ns(Instant::now());
        assert!(a <= b);
        // Within a millisecond of the clock read between them (a loaded machine).
        assert!(c + 1_000_000 >= a && c <= b + 1_000_000, "{a} {c} {b}");
    }

    #[test]
    fn steps_of_both_sides_merge_in_time_order_and_stay_bounded() {
        let mut t = Timelines::new();
        let t0 = Instant::now();
        t.start(1, 100, 1000, 7);
        t.step(1, 7, Step::ServerRemoveSent, 0, t0);
        t.step(
            1,
            7,
            Step::ServerRetiredReceived,
            0,
            t0 + Duration::from_micros(50),
        );
        t.epoch(1, 7, 9);
        t.step(1, 8, Step::ServerRemoveSent, 0, t0); // no record: ignored
        let agent_step = |us: u64, s: Step, tid: u32| pb::GraceTimelineStep {
            at_ns: mono_ns(t0 + Duration::from_micros(us)),
            step: s as i32,
            tid,
        };
        t.agent_steps(
            1,
            pb::AgentGraceTimeline {
                trampoline_id: 7,
                steps: vec![
                    agent_step(10, Step::AgentRemoveReceived, 0),
                    agent_step(60, Step::AgentHandlerStamped, 5),
                    // A server step claimed by the agent is dropped.
                    agent_step(61, Step::ServerAuthorizeSent, 0),
                ],
                steps_dropped: 2,
            },
        );
        t.step(
            1,
            7,
            Step::ServerAuthorizeSent,
            0,
            t0 + Duration::from_micros(70),
        );
        let r = t.recent(10, |_| true);
        assert_eq!(r.len(), 1);
        let kinds: Vec<i32> = r[0].steps.iter().map(|s| s.step).collect();
        assert_eq!(
            kinds,
            [
                Step::ServerRemoveSent,
                Step::AgentRemoveReceived,
                Step::ServerRetiredReceived,
                Step::AgentHandlerStamped,
                Step::ServerAuthorizeSent
            ]
            .map(|s| s as i32)
        );
        assert!(r[0].authorized);
        assert_eq!((r[0].epoch, r[0].steps_dropped, r[0].pid), (9, 2, 100));
        assert!(t.recent(10, |uid| uid != 1000).is_empty(), "not visible");
        for i in 0..(RECENT as u64 + 5) {
            t.start(2, 200, 1000, 100 + i);
            for _ in 0..STEP_CAP + 3 {
                t.step(2, 100 + i, Step::ServerStampReceived, 1, t0);
            }
        }
        let all = t.recent(usize::MAX, |_| true);
        assert_eq!(all.len(), RECENT);
        assert_eq!(
            all[0].trampoline_id,
            100 + RECENT as u64 + 4,
            "newest first"
        );
        assert_eq!(all[0].steps.len(), STEP_CAP);
        assert_eq!(all[0].steps_dropped, 3);
    }
}
