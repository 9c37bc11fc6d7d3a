//! The queries of the Control API: agents, tracers, trampolines, grace periods and
//! counts. A caller sees only what its uid owns (root sees everything).

use std::time::{Duration, Instant};

use patchbay_proto as pb;

use super::Registry;
use super::model::{Agent, Caller, CountTable, TState, TracerId, TracerState, fold_counts};
use crate::error::CoreError;
use crate::grace::{Purpose, Tid};

impl Registry {
    /// Control.ListAgents: the agents the caller may see, connected or not.
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
                arrival: a.hello.arrival,
                parent_pid: a.hello.parent_pid,
                parent_start_time: a.hello.parent_start_time,
                cmdline: a.hello.cmdline.clone(),
            })
            .collect()
    }

    /// The Control view of tracer `id`: the agents and sites it is active on.
    pub(super) fn tracer_view(&self, id: TracerId) -> Option<pb::Tracer> {
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
            processes_matched: u32::try_from(t.matched.len()).unwrap_or(u32::MAX),
        })
    }

    /// Control.ListTracers: the tracers the caller owns (root: all).
    pub fn list_tracers(&self, caller: Caller) -> Vec<pb::Tracer> {
        self.tracers
            .values()
            .filter(|t| caller.may_see(t.owner_uid))
            .filter_map(|t| self.tracer_view(t.id))
            .collect()
    }

    /// Checks that `caller` may watch tracer `id` (Control.WatchEvents).
    pub fn check_tracer(&self, caller: Caller, id: TracerId) -> Result<(), CoreError> {
        self.visible_tracer(caller, id).map(|_| ())
    }

    /// Control.ListTrampolines: the trampolines of the visible agents (of one pid
    /// when given), freed ones only on request.
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

    /// Control.GracePeriods: the pending grace periods of the visible agents with
    /// their holdout threads and stalls.
    pub fn grace_periods(&self, caller: Caller, now: Instant) -> Vec<pb::GracePeriodInfo> {
        let mut out = Vec::new();
        for a in self.agents.values().filter(|a| caller.may_see(a.hello.uid)) {
            for gp in a.grace.pending() {
                let waited = now.saturating_duration_since(gp.started);
                let holdouts = gp
                    .holdouts
                    .iter()
                    .map(|&tid| holdout(a, tid, waited, self.settings.stall_threshold))
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

    /// Control.GracePeriods timelines: the `n` newest trampoline grace periods of the
    /// processes the caller may see, step by step, newest first.
    pub fn grace_timelines(&self, caller: Caller, n: usize) -> Vec<pb::GraceTimeline> {
        self.timelines.recent(n, |uid| caller.may_see(uid))
    }

    /// Control.Counts: a tracer's counts by function, from live agents and the
    /// archive of exited ones, largest first.
    pub fn counts(
        &self,
        caller: Caller,
        tracer: TracerId,
    ) -> Result<pb::CountsResponse, CoreError> {
        let t = self.visible_tracer(caller, tracer)?;
        let mut by_name = t.archived.clone();
        let mut processes: Vec<pb::ProcessCounts> = t
            .archived_procs
            .iter()
            .map(|p| {
                let mut c = process_counts(p.pid, p.start_time, &p.exe, &p.cmdline, &p.counts);
                c.exited = true;
                c
            })
            .collect();
        for a in self.agents.values() {
            let counts = a.counts.get(&tracer);
            if counts.is_none() && !t.targets(a, &self.parents) {
                continue;
            }
            let mut mine = CountTable::new();
            if let Some(counts) = counts {
                fold_counts(a, counts, &mut by_name);
                fold_counts(a, counts, &mut mine);
            }
            let h = &a.hello;
            let mut c = process_counts(h.pid, h.start_time, &h.exe, &h.cmdline, &mine);
            c.connected = a.connected;
            processes.push(c);
        }
        let (counts, total) = count_list(&by_name);
        processes.sort_by_key(|p| (p.start_time, p.pid));
        Ok(pb::CountsResponse {
            counts,
            total,
            processes,
        })
    }
}

/// A count table as a list, largest first (ties by name), and its sum.
fn count_list(table: &CountTable) -> (Vec<pb::FunctionCount>, u64) {
    let mut counts: Vec<pb::FunctionCount> = table
        .iter()
        .map(|(function, (count, agents))| pb::FunctionCount {
            function: function.clone(),
            count: *count,
            agents: agents.len() as u32,
        })
        .collect();
    counts.sort_by(|a, b| b.count.cmp(&a.count).then(a.function.cmp(&b.function)));
    let total = counts.iter().fold(0u64, |t, c| t.saturating_add(c.count));
    (counts, total)
}

/// One process's share of a tracer's counts.
fn process_counts(
    pid: u32,
    start_time: u64,
    exe: &str,
    cmdline: &str,
    table: &CountTable,
) -> pb::ProcessCounts {
    let (counts, total) = count_list(table);
    pb::ProcessCounts {
        pid,
        start_time,
        exe: exe.to_string(),
        cmdline: cmdline.to_string(),
        exited: false,
        counts,
        total,
        connected: false,
    }
}

/// A holdout thread of a pending grace period, with its stall: the one the agent
/// reported, or one made up when the grace period waited `threshold` or more.
fn holdout(a: &Agent, tid: Tid, waited: Duration, threshold: Duration) -> pb::Holdout {
    let stall = match a.stalls.get(&tid) {
        Some((s, _)) => Some(s.clone()),
        None if waited >= threshold => Some(pb::Stall {
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
}
