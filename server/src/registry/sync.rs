//! Control.Synchronize: a barrier over every visible connected agent. Each agent
//! answers with its epoch and live threads; the sync completes when the grace period
//! each answer starts completes (or the agent disconnects or exits).

use std::collections::BTreeSet;
use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use super::Registry;
use super::model::{AgentId, Caller, Op, OpId, Reply};
use crate::error::CoreError;
use crate::grace::Purpose;

impl Registry {
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

    /// An agent answered barrier `b.barrier_id`: the sync's grace period over its
    /// threads starts.
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
    pub(super) fn sync_progress(&mut self, agent: AgentId, sync: Option<u64>) {
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

    /// What a timed-out sync still waited for. Its grace periods are abandoned.
    pub(super) fn sync_timed_out(&mut self, sync_id: u64, waiting: BTreeSet<AgentId>) -> String {
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
        format!(
            "grace period not complete; holdouts: {}; see `patchbay gp`",
            holdouts.join("; ")
        )
    }
}
