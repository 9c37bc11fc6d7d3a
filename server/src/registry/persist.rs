//! What survives a server restart: the active tracers ([`SavedTracer`], written by
//! `store.rs`), restored with their ids into a fresh registry; the generation that
//! tells the shell when to save again; the withdrawal of tracers it could not save.

use std::collections::BTreeSet;

use patchbay_proto as pb;

use super::Registry;
use super::model::{Tracer, TracerId, TracerState};
use super::validate::{validate_callback, validate_pattern};
use crate::error::CoreError;

/// What survives a server restart of one active tracer (see `store.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTracer {
    pub id: TracerId,
    pub spec: pb::TracerSpec,
    pub owner_uid: u32,
    /// See [`Tracer::pid_start_time`].
    pub pid_start_time: u64,
}

impl Registry {
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
            check_spec(&t.spec).map_err(bad)?;
        }
        let max = ids.last().copied().unwrap_or(0);
        self.next_tracer = self.next_tracer.max(next_id).max(max + 1);
        for t in saved {
            self.tracers.insert(
                t.id,
                Tracer::new(t.id, t.spec, t.owner_uid, t.pid_start_time),
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
}

/// Checks a saved tracer's spec like an attach does (the target needs no agent).
fn check_spec(spec: &pb::TracerSpec) -> Result<(), String> {
    validate_pattern(&spec.pattern).map_err(|e| e.to_string())?;
    validate_callback(spec.callback.as_ref()).map_err(|e| e.to_string())?;
    match spec.target.as_ref().and_then(|x| x.target.as_ref()) {
        None => Err("no target".into()),
        Some(pb::target::Target::Exe(e)) if e.is_empty() => Err("empty exe path".into()),
        Some(pb::target::Target::All(false)) => Err("target all=false".into()),
        Some(_) => Ok(()),
    }
}
