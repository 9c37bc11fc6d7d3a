//! Control.Attach and the (re)attach of the active tracers to an agent: the agent
//! lists the functions a tracer's pattern matches, the matching sites move to
//! trampolines of groups that include the tracer (`plan`), and the op replies when
//! every target agent confirmed its installs or failed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use super::Registry;
use super::model::{
    AgentId, AttachStep, Caller, Op, OpId, Reply, Request, Tracer, TracerId, TracerState,
    TrampolineId,
};
use super::validate::{validate_callback, validate_pattern};
use crate::error::CoreError;

impl Registry {
    /// Control.Attach. The reply comes once connected target agents are live.
    pub fn attach(&mut self, caller: Caller, req: pb::AttachRequest) -> Result<OpId, CoreError> {
        let spec = req
            .spec
            .ok_or_else(|| CoreError::Invalid("missing tracer spec".into()))?;
        let (pid_target, pid_start_time) = self.check_attach_spec(caller, &spec)?;
        let id = self.next_tracer;
        self.next_tracer += 1;
        let tracer = Tracer::new(id, spec, caller.uid, pid_start_time);
        self.tracer_generation += 1;
        let targets: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.connected && tracer.targets(a, &self.parents))
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
            self.request_functions(a, id, Some(op));
        }
        self.check_attach(op);
        Ok(op)
    }

    /// Checks an attach's spec against the registry: pattern, callback, target (a pid
    /// target must be a connected agent the caller may trace, and a custom callback
    /// one that process registered). Returns whether the target is a pid, and that
    /// process's (or a tree root's) start time (0 for other targets).
    fn check_attach_spec(
        &self,
        caller: Caller,
        spec: &pb::TracerSpec,
    ) -> Result<(bool, u64), CoreError> {
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
            // The root of a tree must be a connected agent too; the tracer is bound to
            // its start time. A pattern matching nothing in it is no error: its
            // descendants may match.
            pb::target::Target::Tree(p) => {
                let a = self.agent_by_pid(caller, *p)?;
                pid_start_time = self.agents[&a].hello.start_time;
                false
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
        Ok((pid_target, pid_start_time))
    }

    /// New objects were loaded (`count` > 0): the tracers meant for the agent cover them
    /// too. With a `sequence`, a program thread waits in `dlopen`: `Covered{sequence}`
    /// goes out once the installs of every listing asked for so far were sent.
    pub(super) fn functions_added(
        &mut self,
        id: AgentId,
        f: pb::FunctionsAdded,
    ) -> Result<(), CoreError> {
        let last = self.agents[&id].last_cover;
        if f.sequence != 0 && f.sequence <= last {
            return Err(CoreError::Protocol(format!(
                "FunctionsAdded sequence {} after {last}: sequences increase within a session",
                f.sequence
            )));
        }
        if f.count > 0 {
            self.attach_targeting_tracers(id);
        }
        if f.sequence != 0 {
            let listings: BTreeSet<u64> = self
                .requests
                .iter()
                .filter(|(_, (a, r))| *a == id && matches!(r, Request::Attach { .. }))
                .map(|(rid, _)| *rid)
                .collect();
            let a = self.agents.get_mut(&id).expect("checked above");
            a.last_cover = f.sequence;
            a.covering.push_back((f.sequence, listings));
            self.send_covered(id);
        }
        Ok(())
    }

    /// Function listing `rid` of agent `id` was answered (its installs sent, if any):
    /// `Covered` markers waiting only for it go out.
    pub(super) fn listing_answered(&mut self, id: AgentId, rid: u64) {
        if let Some(a) = self.agents.get_mut(&id) {
            for (_, waiting) in a.covering.iter_mut() {
                waiting.remove(&rid);
            }
        }
        self.send_covered(id);
    }

    /// Sends the `Covered` markers at the front of agent `id`'s queue whose listings
    /// were all answered, in order.
    fn send_covered(&mut self, id: AgentId) {
        while let Some(a) = self.agents.get_mut(&id)
            && a.covering.front().is_some_and(|(_, w)| w.is_empty())
        {
            let (sequence, _) = a.covering.pop_front().expect("checked above");
            self.send(id, ToAgent::Covered(pb::Covered { sequence }));
        }
    }

    /// Attaches every active tracer meant for the agent again: the agent lists the
    /// functions each pattern matches, and only sites whose group lacks the tracer are
    /// patched (after a reconnect, or when the agent discovered new functions).
    pub(super) fn attach_targeting_tracers(&mut self, id: AgentId) {
        let wanted: Vec<TracerId> = self
            .tracers
            .values()
            .filter(|t| t.state == TracerState::Active)
            .filter(|t| t.targets(&self.agents[&id], &self.parents))
            .map(|t| t.id)
            .collect();
        for tr in wanted {
            self.request_functions(id, tr, None);
        }
    }

    /// Asks agent `agent` for the patchable functions of `tracer`'s pattern, for
    /// attach op `op` (`None`: a re-attach no client waits for).
    fn request_functions(&mut self, agent: AgentId, tracer: TracerId, op: Option<OpId>) {
        let rid = self.next_request;
        self.next_request += 1;
        self.requests
            .insert(rid, (agent, Request::Attach { tracer, op }));
        let pattern = self.tracers[&tracer].spec.pattern.clone();
        self.send(
            agent,
            ToAgent::ListFunctions(pb::ListFunctions {
                request_id: rid,
                pattern,
                patchable_only: true,
            }),
        );
    }

    /// The agent listed the functions of an attach's pattern (`function_list`): the
    /// patchable ones get the tracer; an attach op learns the agent's result.
    pub(super) fn attach_listed(
        &mut self,
        id: AgentId,
        pid: u32,
        tracer: TracerId,
        op: Option<OpId>,
        list: pb::FunctionList,
        now: Instant,
    ) {
        let active = matches!(self.tracers.get(&tracer), Some(t) if t.state == TracerState::Active);
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
        // A site listed twice is patched once.
        let patchable: BTreeSet<u64> = list
            .functions
            .iter()
            .filter(|f| f.patchable)
            .map(|f| f.address)
            .collect();
        let sites: Vec<u64> = patchable.into_iter().collect();
        let unpatchable = u32::try_from(list.functions.iter().filter(|f| !f.patchable).count())
            .unwrap_or(u32::MAX)
            .saturating_add(list.unpatchable_matches);
        let skipped = unpatchable;
        if sites.is_empty() {
            if let Some(op) = op {
                let pattern = self.tracers[&tracer].spec.pattern.clone();
                let hint = no_match_hint(&list, unpatchable, pid, &pattern);
                self.attach_agent_result(op, id, Err(CoreError::NoMatch { pattern, pid, hint }));
            }
            return;
        }
        if let Some(t) = self.tracers.get_mut(&tracer) {
            t.matched.insert(id);
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

    /// Agent `agent` is done with attach op `op`, with success or an error.
    pub(super) fn attach_agent_result(
        &mut self,
        op: OpId,
        agent: AgentId,
        r: Result<(), CoreError>,
    ) {
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

    /// Replies to attach op `op` once every target agent is done.
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
            self.release_tracer_id(tracer);
            self.reply(op, Reply::Attach(Err(err)));
            return;
        }
        let t = self.tracer_view(tracer);
        self.reply(
            op,
            Reply::Attach(Ok(pb::AttachResponse { tracer: t, results })),
        );
    }

    /// A failed attach gives its tracer's id back, so that a failed attach consumes
    /// no id: only when it is the last id handed out (no attach started since), the
    /// tracer is gone and no trampoline names it (no agent was ever asked to install
    /// it: its id never reached an agent's counters). Its watchers, if any, end with it.
    fn release_tracer_id(&mut self, tracer: TracerId) {
        let named = self.agents.values().any(|a| {
            a.trampolines
                .values()
                .any(|t| t.group_ids().contains(&tracer))
        });
        if tracer + 1 == self.next_tracer && !self.tracers.contains_key(&tracer) && !named {
            self.next_tracer = tracer;
        }
    }

    /// The attach ops waiting for trampoline `tramp` of agent `id` to go live.
    fn attach_ops_waiting(&self, id: AgentId, tramp: TrampolineId) -> Vec<OpId> {
        self.ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Attach { steps, .. } if matches!(steps.get(&id), Some(AttachStep::Installing(s)) if s.contains(&tramp))))
            .map(|(o, _)| *o)
            .collect()
    }

    /// Trampoline `tramp` (calling tracers `group`) of agent `id` went live or was
    /// retired: attach ops waiting on it count its sites and may reply.
    pub(super) fn attach_progress(
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

    /// Trampoline `tramp` of agent `id` failed to install: the attach ops waiting on
    /// it fail for that agent.
    pub(super) fn attach_install_failed(
        &mut self,
        id: AgentId,
        tramp: TrampolineId,
        pid: u32,
        reason: &str,
    ) {
        let ops: Vec<OpId> = self.attach_ops_waiting(id, tramp);
        for op in ops {
            self.attach_agent_result(
                op,
                id,
                Err(CoreError::AgentFailed {
                    pid,
                    message: reason.to_string(),
                }),
            );
        }
    }

    /// Agent `id` (pid `pid`) was lost: attach ops waiting for its installs fail for it.
    pub(super) fn attach_agent_lost(&mut self, id: AgentId, pid: u32) {
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

    /// `tracer` was detached: its pending attach ops end now, with an error.
    pub(super) fn attach_detached(&mut self, tracer: TracerId) {
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
    }

    /// What a timed-out attach op still waited for.
    pub(super) fn attach_timed_out(&self, steps: &BTreeMap<AgentId, AttachStep>) -> String {
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
        format!(
            "agents did not confirm the attach in time: {}; the tracer stays attached where it went live",
            slow.join(", ")
        )
    }
}

/// Why an attach found nothing to patch in an agent, for the person who asked.
fn no_match_hint(list: &pb::FunctionList, unpatchable: u32, pid: u32, pattern: &str) -> String {
    if unpatchable == 0 {
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
            " ({unpatchable} match but none is patchable; {why}; all reasons: `patchbay functions --pid {pid} '{pattern}'`)"
        )
    }
}
