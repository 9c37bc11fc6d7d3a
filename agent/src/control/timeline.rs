//! The agent's side of grace-period timelines (agent thread only): every step of a
//! trampoline's way from `Remove` to its free, and every observation of a thread made
//! meanwhile (blocked probes, signals, what the handler saw — pulled from
//! `hot::qswake`'s lock-free log —, stamps seen, exits), with CLOCK_MONOTONIC
//! timestamps. When a trampoline is freed its steps go to the server
//! (`AgentGraceTimeline`), which merges them with its own (`GracePeriods` timelines,
//! `patchbay gp --timeline`).
//!
//! Diagnostic only: nothing here decides anything, and everything is bounded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use patchbay_proto as pb;
use pb::GraceStep as Step;
use pb::agent_message::Body as FromAgent;

use crate::hot::qswake::{self, Seen};

/// Observation steps kept (the newest).
const LOG_CAP: usize = 8192;
/// Trampolines whose own steps are kept until their free.
const MARKS_CAP: usize = 256;
/// Steps sent per grace period at most.
pub(crate) const REPORT_CAP: usize = 1024;

struct Timeline {
    /// Observation steps of every thread, in time order.
    log: VecDeque<pb::GraceTimelineStep>,
    /// Each retiring trampoline's own steps (Remove received, unpatched, ...).
    marks: BTreeMap<u64, Vec<pb::GraceTimelineStep>>,
    /// Position in `qswake`'s handler log.
    handler_pos: u64,
}

static TIMELINE: Mutex<Timeline> = Mutex::new(Timeline {
    log: VecDeque::new(),
    marks: BTreeMap::new(),
    handler_pos: 0,
});

fn with<R>(f: impl FnOnce(&mut Timeline) -> R) -> R {
    f(&mut TIMELINE.lock().unwrap_or_else(|e| e.into_inner()))
}

fn step(at_ns: u64, step: Step, tid: u32) -> pb::GraceTimelineStep {
    pb::GraceTimelineStep {
        at_ns,
        step: step as i32,
        tid,
    }
}

impl Timeline {
    fn push(&mut self, s: pb::GraceTimelineStep) {
        if self.log.len() >= LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    /// Moves what the quiescent-state handler logged since the last pull into the log.
    fn pull(&mut self) {
        let (seen, next) = qswake::drain_log(self.handler_pos);
        self.handler_pos = next;
        for (ns, tid, what) in seen {
            let kind = match what {
                Seen::Stamped => Step::AgentHandlerStamped,
                Seen::Deferred => Step::AgentHandlerDeferred,
                Seen::Inside => Step::AgentHandlerInside,
                Seen::DeferredStamped => Step::AgentDeferredStamped,
            };
            self.push(step(ns, kind, tid));
        }
    }
}

/// An observation step of thread `tid` (0: none), now.
pub(crate) fn note(kind: Step, tid: u32) {
    let ns = qswake::now_ns();
    with(|t| {
        if !t.marks.is_empty() {
            t.push(step(ns, kind, tid));
        }
    });
}

/// Pulls the handler's log (agent thread; before reading stamps).
pub(crate) fn pull() {
    with(|t| {
        if t.marks.is_empty() {
            // Nothing recorded: skip what the handler logged meanwhile.
            t.handler_pos = qswake::drain_log(t.handler_pos).1;
        } else {
            t.pull();
        }
    });
}

/// A step of trampoline `id`'s own way, now (`Remove` received starts its record).
pub(crate) fn mark(id: u64, kind: Step) {
    let ns = qswake::now_ns();
    with(|t| {
        if kind == Step::AgentRemoveReceived {
            // What the handler logged before this grace period began is not its.
            t.handler_pos = qswake::drain_log(t.handler_pos).1;
            if t.marks.len() >= MARKS_CAP
                && let Some(&oldest) = t.marks.keys().next()
            {
                t.marks.remove(&oldest);
            }
            t.marks.insert(id, Vec::new());
        }
        if let Some(m) = t.marks.get_mut(&id) {
            m.push(step(ns, kind, 0));
        }
    });
}

/// Trampoline `id` was freed: its timeline (its own steps and every observation step
/// since its `Remove` arrived, at most [`REPORT_CAP`]) for the server.
pub(crate) fn report(id: u64) -> Option<FromAgent> {
    with(|t| {
        t.pull();
        let mut steps = t.marks.remove(&id)?;
        let from = steps.first().map_or(0, |s| s.at_ns);
        let mut dropped = 0u32;
        for s in t.log.iter().filter(|s| s.at_ns >= from) {
            if steps.len() < REPORT_CAP {
                steps.push(*s);
            } else {
                dropped += 1;
            }
        }
        steps.sort_by_key(|s| s.at_ns);
        // Steps older than every grace period still recorded are no one's any more.
        let oldest = t
            .marks
            .values()
            .filter_map(|m| m.first())
            .map(|s| s.at_ns)
            .min()
            .unwrap_or(u64::MAX);
        while t.log.front().is_some_and(|s| s.at_ns < oldest) {
            t.log.pop_front();
        }
        Some(FromAgent::GraceTimeline(pb::AgentGraceTimeline {
            trampoline_id: id,
            steps,
            steps_dropped: dropped,
        }))
    })
}

/// In a forked child: nothing of the parent's grace periods is the child's.
pub(crate) fn forked_child() {
    with(|t| {
        t.log.clear();
        t.marks.clear();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_trampoline_reports_its_steps_and_the_observations_since_its_remove() {
        let id = 0xfeed_0001;
        note(Step::AgentSignalSent, 1); // recorded only if another test records
        mark(id, Step::AgentRemoveReceived);
        mark(id, Step::AgentUnpatched);
        note(Step::AgentSignalSent, 4242);
        qswake::log(4242, Seen::Stamped);
        pull();
        note(Step::AgentStampSeen, 4242);
        let Some(FromAgent::GraceTimeline(r)) = report(id) else {
            panic!("no timeline");
        };
        assert_eq!(r.trampoline_id, id);
        let mine: Vec<(i32, u32)> = r
            .steps
            .iter()
            .filter(|s| s.tid == 0 || s.tid == 4242)
            .map(|s| (s.step, s.tid))
            .collect();
        assert_eq!(
            &mine[..2],
            &[
                (Step::AgentRemoveReceived as i32, 0),
                (Step::AgentUnpatched as i32, 0)
            ]
        );
        for k in [
            Step::AgentSignalSent,
            Step::AgentHandlerStamped,
            Step::AgentStampSeen,
        ] {
            assert!(mine.contains(&(k as i32, 4242)), "{k:?} missing: {mine:?}");
        }
        assert!(r.steps.windows(2).all(|w| w[0].at_ns <= w[1].at_ns));
        assert!(report(id).is_none(), "reported once");
    }
}
