//! Shared server state: the [`Registry`] behind a mutex, plus the channels that carry
//! out its effects (messages to agents, replies to waiting clients, event fan-out).
//! Effects are applied while the lock is held and never block (unbounded channels).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tonic::Status;

use crate::error::CoreError;
use crate::registry::{AgentId, Effect, OpId, Registry, Reply, TracerId};
use crate::store::Store;

pub type AgentTx = mpsc::UnboundedSender<Result<pb::ServerMessage, Status>>;

/// Logged (debug builds) when [`Registry::check_invariants`] fails; tests look for it.
pub const INVARIANT_BROKEN: &str = "registry invariant broken";

/// How often (at most) a debug build checks the registry's invariants.
#[cfg(debug_assertions)]
const INVARIANT_PERIOD: Duration = Duration::from_millis(20);

/// Capacity of each tracer's event fan-out; slower watchers lose batches (counted).
const WATCH_CAPACITY: usize = 4096;

/// The current connection of an agent: its number (`Welcome.session_id`), the
/// outbound channel of its `Session` stream, and what its `Events` stream needs.
struct Conn {
    conn: u64,
    tx: AgentTx,
    /// The agent's (pid, uid): an `Events` stream must come from the same peer.
    peer: (u32, u32),
    /// Whether an `Events` stream is attached to this session already.
    events_open: bool,
    /// Dropped with the connection: ends the session's `Events` stream.
    ended: watch::Sender<()>,
}

pub struct State {
    pub reg: Registry,
    agents: HashMap<AgentId, Conn>,
    waiters: HashMap<OpId, oneshot::Sender<Reply>>,
    watchers: HashMap<TracerId, broadcast::Sender<pb::EventBatchView>>,
    next_conn: u64,
    #[cfg(debug_assertions)]
    last_check: Instant,
    /// The tracer store, when the server persists tracers.
    store: Option<Saver>,
}

/// The store and what was saved (or failed to be) last.
struct Saver {
    store: Store,
    /// The registry's tracer generation saved last.
    saved: u64,
    /// A generation whose save failed: not retried at every lock, only on the next
    /// change (an attach or detach tries again and reports the failure to its client).
    failed: Option<u64>,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Mutex<State>>,
}

/// Runs a closure on the registry and applies the effects it produced.
pub struct Guard<'a> {
    state: MutexGuard<'a, State>,
}

impl std::ops::Deref for Guard<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.state.reg
    }
}
impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.state.reg
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.state.apply();
    }
}

impl State {
    /// Saves the active tracers when they changed since the last save. Called before
    /// any effect goes out, so that a reply to an attach or a detach leaves only once
    /// the change is durable.
    fn persist(&mut self) -> Result<(), String> {
        let Some(saver) = &mut self.store else {
            return Ok(());
        };
        let generation = self.reg.tracer_generation();
        if generation == saver.saved {
            return Ok(());
        }
        let (tracers, next) = self.reg.saved_tracers();
        if let Err(e) = saver.store.save(&tracers, next) {
            saver.failed = Some(generation);
            return Err(e.to_string());
        }
        saver.saved = generation;
        saver.failed = None;
        Ok(())
    }

    fn apply(&mut self) {
        let retry = self
            .store
            .as_ref()
            .is_some_and(|s| s.failed != Some(self.reg.tracer_generation()));
        if retry && let Err(e) = self.persist() {
            // A restarted server would see the previous set until a save succeeds.
            tracing::error!("{e}");
        }
        for effect in self.reg.take_effects() {
            match effect {
                Effect::Send(agent, body) => {
                    if let Some(c) = self.agents.get(&agent) {
                        let _ = c.tx.send(Ok(pb::ServerMessage { body: Some(body) }));
                    }
                }
                Effect::Reply(op, reply) => {
                    if let Some(tx) = self.waiters.remove(&op) {
                        let _ = tx.send(reply);
                    }
                }
                Effect::Events(tracer, view) => {
                    if let Some(tx) = self.watchers.get(&tracer) {
                        let _ = tx.send(view);
                    }
                }
            }
        }
        let reg = &self.reg;
        self.watchers.retain(|t, _| reg.tracer(*t).is_some());
        // Debug builds (the test suites) check the registry's invariants, at most
        // every INVARIANT_PERIOD so that busy agents do not slow the server down.
        #[cfg(debug_assertions)]
        if self.last_check.elapsed() >= INVARIANT_PERIOD {
            self.last_check = Instant::now();
            if let Err(e) = self.reg.check_invariants() {
                tracing::error!("{INVARIANT_BROKEN}: {e}");
            }
        }
    }
}

impl Engine {
    pub fn new(reg: Registry) -> Self {
        Engine::with_store(reg, None)
    }

    /// An engine whose registry's active tracers are kept in `store` (the registry
    /// already holds what the store loaded).
    pub fn with_store(reg: Registry, store: Option<Store>) -> Self {
        let generation = reg.tracer_generation();
        Engine {
            inner: Arc::new(Mutex::new(State {
                reg,
                agents: HashMap::new(),
                waiters: HashMap::new(),
                watchers: HashMap::new(),
                next_conn: 1,
                #[cfg(debug_assertions)]
                last_check: Instant::now(),
                store: store.map(|store| Saver {
                    store,
                    saved: generation,
                    failed: None,
                }),
            })),
        }
    }

    /// Locks the registry; effects are applied when the guard drops.
    pub fn lock(&self) -> Guard<'_> {
        Guard {
            state: self.inner.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Admits an agent: runs its hello through the registry and, in the same critical
    /// section, sends the welcome and registers the outbound channel, so that messages
    /// the hello produced (re-attaches, removals) reach this connection. Returns the
    /// agent id and the connection number (`Welcome.session_id`), which the
    /// disconnect and the agent's `Events` stream must present.
    pub fn admit_agent(
        &self,
        peer: (u32, u32),
        mut hello: pb::Hello,
        tx: AgentTx,
    ) -> Result<(AgentId, u64, bool), CoreError> {
        check_parent(&mut hello);
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (agent, mut welcome) = match s.reg.agent_hello(Some(peer), hello, Instant::now()) {
            Ok(r) => r,
            Err(e) => {
                s.apply();
                return Err(e);
            }
        };
        let resumed = welcome.resumed;
        let conn = s.next_conn;
        s.next_conn += 1;
        welcome.session_id = conn;
        let _ = tx.send(Ok(pb::ServerMessage {
            body: Some(pb::server_message::Body::Welcome(welcome)),
        }));
        s.agents.insert(
            agent,
            Conn {
                conn,
                tx,
                peer,
                events_open: false,
                ended: watch::channel(()).0,
            },
        );
        s.apply();
        Ok((agent, conn, resumed))
    }

    /// The connection `conn` of `agent` ended. Ignored if a newer one replaced it.
    pub fn disconnect_agent(&self, agent: AgentId, conn: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if s.agents.get(&agent).map(|c| c.conn) == Some(conn) {
            s.agents.remove(&agent);
            s.reg.agent_disconnected(agent);
        }
        s.apply();
    }

    /// Attaches an `Events` stream from `peer` to session `conn` of `agent`: returns
    /// what ends with the session (its sender is dropped then). Changes nothing on error.
    pub fn open_events(
        &self,
        agent: AgentId,
        conn: u64,
        peer: (u32, u32),
    ) -> Result<watch::Receiver<()>, Status> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = s.agents.get_mut(&agent).filter(|c| c.conn == conn) else {
            return Err(Status::failed_precondition(format!(
                "session {conn} of agent {agent} is not open (it ended, a reconnect replaced it, or it never was): open the Events stream after a Welcome, with its agent_id and session_id"
            )));
        };
        if c.peer != peer {
            return Err(Status::permission_denied(format!(
                "session {conn} of agent {agent} belongs to pid {} uid {}, not to this peer (pid {} uid {})",
                c.peer.0, c.peer.1, peer.0, peer.1
            )));
        }
        if c.events_open {
            return Err(Status::already_exists(format!(
                "session {conn} of agent {agent} has an Events stream already"
            )));
        }
        c.events_open = true;
        Ok(c.ended.subscribe())
    }

    /// One message of the `Events` stream of session `conn` of `agent`: an event
    /// batch is decoded before the registry is locked (a flood must not hold the lock
    /// that life-cycle reports and clients need), then goes to
    /// `Registry::decoded_events`; anything else through `Registry::agent_message`.
    /// The outer `Err` when the session is no longer the agent's current one (nothing
    /// changed then): the stream must end. The inner one is the registry's rejection.
    pub fn events_message(
        &self,
        agent: AgentId,
        conn: u64,
        body: FromAgent,
    ) -> Result<Result<(), CoreError>, Status> {
        let decoded = match &body {
            FromAgent::Events(b) => match pb::events::decode(&b.data, b.record_count) {
                Ok(events) => Some((b.tracer_id, b.dropped, events)),
                Err(e) => return Ok(Err(CoreError::Invalid(e.to_string()))),
            },
            _ => None,
        };
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if s.agents.get(&agent).map(|c| c.conn) != Some(conn) {
            return Err(Status::aborted(format!(
                "session {conn} of agent {agent} ended: its Events stream ends with it"
            )));
        }
        let r = match decoded {
            Some((tracer, dropped, events)) => s.reg.decoded_events(agent, tracer, dropped, events),
            None => s.reg.agent_message(agent, Some(body), Instant::now()),
        };
        s.apply();
        Ok(r)
    }

    /// Starts an operation in the registry and waits for its reply, up to `timeout`.
    /// On timeout the operation is cancelled and the error says what was pending.
    pub async fn run_op(
        &self,
        timeout: Duration,
        start: impl FnOnce(&mut Registry) -> Result<OpId, CoreError>,
    ) -> Result<Reply, Status> {
        let rx = {
            let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let op = start(&mut s.reg)?;
            if let Err(e) = s.persist() {
                // No tracer may run that the store does not hold: withdraw new ones.
                let keep = s
                    .store
                    .as_ref()
                    .map(|st| st.store.saved_ids())
                    .unwrap_or_default();
                let abandoned = s.reg.abandon_tracers(&keep);
                s.reg.cancel(op);
                s.apply();
                let message = if abandoned.is_empty() {
                    format!(
                        "done, but not saved ({e}): a restarted server would not know of this change"
                    )
                } else {
                    format!("tracer {abandoned:?} not attached: {e}")
                };
                return Err(crate::error::status(
                    pb::errors::Reason::NotSaved,
                    message,
                    [],
                ));
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.insert(op, tx);
            s.apply();
            (op, rx)
        };
        let (op, rx) = rx;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Status::internal("operation dropped by the server")),
            Err(_) => {
                let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                s.waiters.remove(&op);
                let msg = s.reg.cancel(op);
                s.apply();
                Err(crate::error::status(
                    pb::errors::Reason::Timeout,
                    msg.unwrap_or_else(|| format!("timed out after {} ms", timeout.as_millis())),
                    [],
                ))
            }
        }
    }

    pub fn watch(&self, tracer: TracerId) -> broadcast::Receiver<pb::EventBatchView> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.watchers
            .entry(tracer)
            .or_insert_with(|| broadcast::channel(WATCH_CAPACITY).0)
            .subscribe()
    }

    /// Periodic housekeeping: drop disconnected agents whose process is gone.
    pub fn reap(&self) {
        let candidates = self.lock().disconnected();
        for (agent, pid, start) in candidates {
            if !process_alive(pid, start) {
                tracing::info!(agent, pid, "agent's process is gone: dropping its state");
                self.lock().agent_gone(agent);
            }
        }
    }

    pub fn now() -> Instant {
        Instant::now()
    }
}

/// Checks a hello's parent claim against /proc (`registry::parent_claim_ok`); a claim
/// that does not hold is dropped (the agent is then nobody's descendant).
fn check_parent(hello: &mut pb::Hello) {
    if hello.parent_pid == 0 && hello.parent_start_time == 0 {
        return;
    }
    let facts = crate::registry::ParentFacts {
        own_ppid: stat_fields(hello.pid).map(|f| f.1),
        claimed_parent_start: stat_fields(hello.parent_pid).map(|f| f.2),
    };
    if !crate::registry::parent_claim_ok(hello.parent_pid, hello.parent_start_time, facts) {
        tracing::info!(
            pid = hello.pid,
            parent_pid = hello.parent_pid,
            parent_start_time = hello.parent_start_time,
            ?facts,
            "agent's parent claim does not match /proc: ignored"
        );
        hello.parent_pid = 0;
        hello.parent_start_time = 0;
    }
}

/// (state, ppid, start time) from `/proc/PID/stat` (fields 3, 4 and 22).
fn stat_fields(pid: u32) -> Option<(char, u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some((
        state,
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Whether process `pid` still runs with start time `start` (field 22 of its stat).
pub fn process_alive(pid: u32, start: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The command name may contain spaces: fields start after the last ')'.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // rest starts at field 3 (state): field 22 is index 19; field 3 state 'Z' = zombie.
            let zombie = fields.first() == Some(&"Z");
            let st = fields.get(19).and_then(|f| f.parse::<u64>().ok());
            !zombie && st == Some(start)
        }
        Err(_) => false,
    }
}
