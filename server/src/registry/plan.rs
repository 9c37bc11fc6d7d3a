//! Site planning: which trampoline each patched site of an agent calls. A trampoline
//! is one callback group (an ordered tracer list) plus the sites that call it; adding
//! or removing a tracer moves sites to new trampolines of the enlarged or reduced group
//! (`Install`), and a trampoline left with no site or no tracer is retired (`Remove`).
//! The plan (`Agent::site_owner`) changes when those messages are sent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use super::Registry;
use super::model::{AgentId, TState, TracerId, Trampoline, TrampolineId};

impl Registry {
    /// Moves `sites` of agent `id` to groups that include `tracer`.
    pub(super) fn add_tracer_to_sites(
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

    /// Removes `tracer` from every group of agent `id`. Returns the trampolines
    /// calling `tracer` that are retiring.
    pub(super) fn remove_tracer_from_agent(
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

    /// Sites of objects the agent unloaded (`FunctionsRemoved`): they leave the plan
    /// (an object mapped at their addresses later is new), and the active trampolines
    /// left with no site are retired. Sites the plan does not hold are ignored (never
    /// patched, or already moved away).
    pub(super) fn sites_removed(&mut self, id: AgentId, sites: &[u64], now: Instant) {
        let agent = self.agents.get_mut(&id).expect("caller checked");
        let mut touched = BTreeSet::new();
        for s in sites {
            if let Some(t) = agent.site_owner.remove(s) {
                if let Some(tr) = agent.trampolines.get_mut(&t) {
                    tr.sites.remove(s);
                }
                touched.insert(t);
            }
        }
        for t in touched {
            let empty = self.agents[&id]
                .trampolines
                .get(&t)
                .is_some_and(|t| t.sites.is_empty() && t.state.active());
            if empty {
                self.retire(id, t, now);
            }
        }
    }

    /// Retires an active trampoline: its sites go back to untraced and the agent is
    /// told to remove it (it answers `Retired`).
    pub(super) fn retire(&mut self, id: AgentId, tramp: TrampolineId, now: Instant) {
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
        let (pid, uid) = (agent.hello.pid, agent.hello.uid);
        self.timelines.start(id, pid, uid, tramp);
        self.timelines
            .step(id, tramp, pb::GraceStep::ServerRemoveSent, 0, now);
        self.send(
            id,
            ToAgent::Remove(pb::Remove {
                trampoline_id: tramp,
            }),
        );
    }
}
