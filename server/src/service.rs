//! The tonic services: thin shells over the [`Engine`]. They authenticate the peer,
//! decode requests, call the registry, and map [`CoreError`](crate::error::CoreError)s to statuses.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use patchbay_proto as pb;
use patchbay_proto::errors::Reason;
use pb::agent_message::Body as FromAgent;
use pb::events_message::Body as ToEvents;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::error;
use crate::listen::{Peer, peer_of};
use crate::registry::{Caller, Reply};

/// How long a new agent connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const FUNCTIONS_TIMEOUT: Duration = Duration::from_secs(10);

fn timeout_or(ms: u32, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms as u64)
    }
}

// ---------------------------------------------------------------------- agent

pub struct AgentService {
    engine: Engine,
}

impl AgentService {
    pub fn new(engine: Engine) -> Self {
        AgentService { engine }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = agent_peer(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))?;
        let hello = match first {
            Some(Ok(pb::AgentMessage {
                body: Some(FromAgent::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of an agent session must be Hello",
                ));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("stream ended before Hello")),
        };
        let pid = hello.pid;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // To end the session with the reason when the agent's stream breaks.
        let end_tx = tx.clone();
        let (agent, conn, resumed) = self.engine.admit_agent(peer, hello, tx)?;
        tracing::info!(agent, pid, resumed, "agent connected");
        let engine = self.engine.clone();
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(msg)) => handle_agent_message(&engine, agent, msg),
                    Some(Err(e)) => {
                        // E.g. an undecodable message: the session ends with the
                        // reason; the agent's state stays for a reconnect.
                        tracing::info!(agent, pid, "agent stream failed: {e}");
                        let _ = end_tx.send(Err(Status::new(
                            e.code(),
                            format!("agent stream failed: {}", e.message()),
                        )));
                        break;
                    }
                    None => break,
                }
            }
            tracing::info!(agent, pid, "agent disconnected");
            engine.disconnect_agent(agent, conn);
            engine.reap();
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn events(
        &self,
        req: Request<Streaming<pb::EventsMessage>>,
    ) -> Result<Response<pb::EventsEnd>, Status> {
        let peer = agent_peer(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no EventsOpen within 10 s"))?;
        let open = match first {
            Some(Ok(pb::EventsMessage {
                body: Some(ToEvents::Open(o)),
            })) => o,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of an Events stream must be EventsOpen",
                ));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("stream ended before EventsOpen")),
        };
        let (agent, conn) = (open.agent_id, open.session_id);
        let mut ended = self.engine.open_events(agent, conn, peer)?;
        loop {
            let msg = tokio::select! {
                msg = inbound.next() => msg,
                // The sender goes with the session.
                _ = ended.changed() => {
                    return Err(Status::aborted(format!(
                        "session {conn} of agent {agent} ended: its Events stream ends with it"
                    )));
                }
            };
            let body = match msg {
                None => return Ok(Response::new(pb::EventsEnd {})),
                Some(Err(e)) => {
                    tracing::info!(agent, "agent events stream failed: {e}");
                    return Err(Status::new(
                        e.code(),
                        format!("agent events stream failed: {}", e.message()),
                    ));
                }
                Some(Ok(pb::EventsMessage { body })) => body,
            };
            let body = match body {
                Some(ToEvents::Events(e)) => FromAgent::Events(e),
                Some(ToEvents::FreedTrampolineId(id)) => {
                    FromAgent::Trampoline(pb::TrampolineReport {
                        trampoline_id: id,
                        report: Some(pb::trampoline_report::Report::Freed(pb::Freed {})),
                    })
                }
                Some(ToEvents::Open(_)) => {
                    return Err(Status::invalid_argument(
                        "EventsOpen is the first message of an Events stream, and only there",
                    ));
                }
                None => return Err(Status::invalid_argument("empty Events stream message")),
            };
            // As on the Session stream, a rejected message is logged and changes
            // nothing; the stream goes on.
            if let Err(e) = self.engine.events_message(agent, conn, body)? {
                tracing::warn!(agent, "agent message rejected (Events stream): {e}");
            }
            // A flood must not keep this worker from the session and client tasks.
            tokio::task::yield_now().await;
        }
    }
}

/// The (pid, uid) of an agent's connection: agents connect over the Unix socket only.
fn agent_peer<T>(req: &Request<T>) -> Result<(u32, u32), Status> {
    match peer_of(req) {
        Some(Peer::Unix {
            pid: Some(pid),
            uid,
        }) => Ok((pid, uid)),
        Some(Peer::Unix { pid: None, .. }) => Err(Status::permission_denied(
            "cannot read the peer's pid (SO_PEERCRED): agents must connect over the Unix socket",
        )),
        _ => Err(Status::permission_denied(
            "agents must connect over the Unix socket, where the server can check their pid and uid",
        )),
    }
}

fn handle_agent_message(engine: &Engine, agent: u64, msg: pb::AgentMessage) {
    let now = Engine::now();
    let mut reg = engine.lock();
    if let Err(e) = reg.agent_message(agent, msg.body, now) {
        tracing::warn!(agent, "agent message rejected: {e}");
    }
}

// -------------------------------------------------------------------- control

pub struct ControlService {
    engine: Engine,
    /// Token TCP clients must present (`authorization: Bearer TOKEN`).
    token: Option<Arc<str>>,
}

impl ControlService {
    pub fn new(engine: Engine, token: Option<String>) -> Self {
        ControlService {
            engine,
            token: token.map(Into::into),
        }
    }

    /// Authenticates the request and checks the client's protocol version.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        if let Some(v) = req.metadata().get(pb::PROTOCOL_METADATA_KEY) {
            let v = v.to_str().unwrap_or("");
            if v != pb::PROTOCOL_VERSION.to_string() {
                return Err(error::status(
                    Reason::ProtocolVersion,
                    format!(
                        "protocol version mismatch: the client speaks {v:?}, this server speaks {}: use a client and a server from the same release",
                        pb::PROTOCOL_VERSION
                    ),
                    [("server_version", pb::PROTOCOL_VERSION.to_string())],
                ));
            }
        }
        match peer_of(req) {
            Some(Peer::Unix { uid, .. }) => Ok(Caller { uid }),
            Some(Peer::Tcp) => {
                check_token(req.metadata(), self.token.as_deref())?;
                Ok(Caller::ROOT)
            }
            None => Err(error::status(Reason::Permission, "unknown peer", [])),
        }
    }
}

/// Checks the `authorization: Bearer TOKEN` of a TCP request against the server's
/// token (`None`: the server accepts no TCP clients).
pub fn check_token(
    metadata: &tonic::metadata::MetadataMap,
    token: Option<&str>,
) -> Result<(), Status> {
    let Some(token) = token else {
        return Err(error::status(
            Reason::Unauthenticated,
            "TCP clients are not accepted",
            [],
        ));
    };
    let given = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        Ok(())
    } else {
        Err(error::status(
            Reason::Unauthenticated,
            "missing or wrong token: pass the server's token (`patchbay --token-file FILE`)",
            [],
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unexpected(r: Reply) -> Status {
    Status::internal(format!("unexpected reply {r:?}"))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::EventBatchView, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = self.caller(&req)?;
        let agents = self.engine.lock().list_agents(caller);
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn list_functions(
        &self,
        req: Request<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        match self
            .engine
            .run_op(FUNCTIONS_TIMEOUT, |reg| reg.list_functions(caller, r))
            .await?
        {
            Reply::Functions(r) => Ok(Response::new(r?)),
            other => Err(unexpected(other)),
        }
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let timeout = timeout_or(r.timeout_ms, Duration::from_secs(10));
        match self
            .engine
            .run_op(timeout, |reg| reg.attach(caller, r))
            .await?
        {
            Reply::Attach(r) => Ok(Response::new(r?)),
            other => Err(unexpected(other)),
        }
    }

    async fn detach(
        &self,
        req: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let timeout = timeout_or(r.timeout_ms, Duration::from_secs(30));
        match self
            .engine
            .run_op(timeout, |reg| reg.detach(caller, r, Engine::now()))
            .await?
        {
            Reply::Detach(r) => Ok(Response::new(r?)),
            other => Err(unexpected(other)),
        }
    }

    async fn list_tracers(
        &self,
        req: Request<pb::ListTracersRequest>,
    ) -> Result<Response<pb::ListTracersResponse>, Status> {
        let caller = self.caller(&req)?;
        let tracers = self.engine.lock().list_tracers(caller);
        Ok(Response::new(pb::ListTracersResponse { tracers }))
    }

    async fn list_trampolines(
        &self,
        req: Request<pb::ListTrampolinesRequest>,
    ) -> Result<Response<pb::ListTrampolinesResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let trampolines = self
            .engine
            .lock()
            .list_trampolines(caller, &r, Engine::now());
        Ok(Response::new(pb::ListTrampolinesResponse { trampolines }))
    }

    async fn grace_periods(
        &self,
        req: Request<pb::GracePeriodsRequest>,
    ) -> Result<Response<pb::GracePeriodsResponse>, Status> {
        let caller = self.caller(&req)?;
        let n = req.get_ref().timelines as usize;
        let reg = self.engine.lock();
        let pending = reg.grace_periods(caller, Engine::now());
        let timelines = if n > 0 {
            reg.grace_timelines(caller, n)
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::GracePeriodsResponse {
            pending,
            timelines,
        }))
    }

    async fn synchronize(
        &self,
        req: Request<pb::SynchronizeRequest>,
    ) -> Result<Response<pb::SynchronizeResponse>, Status> {
        let caller = self.caller(&req)?;
        let timeout = timeout_or(req.get_ref().timeout_ms, Duration::from_secs(30));
        match self
            .engine
            .run_op(timeout, |reg| Ok(reg.synchronize(caller, Engine::now())))
            .await?
        {
            Reply::Sync(r) => Ok(Response::new(r?)),
            other => Err(unexpected(other)),
        }
    }

    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = self.caller(&req)?;
        let tracer = req.get_ref().tracer_id;
        self.engine.lock().check_tracer(caller, tracer)?;
        let rx = self.engine.watch(tracer);
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| match r {
            Ok(v) => Some(Ok(v)),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!("a watcher fell behind: {n} event batches skipped");
                None
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn counts(
        &self,
        req: Request<pb::CountsRequest>,
    ) -> Result<Response<pb::CountsResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = self.engine.lock().counts(caller, req.get_ref().tracer_id)?;
        Ok(Response::new(r))
    }

    async fn latency(
        &self,
        req: Request<pb::LatencyRequest>,
    ) -> Result<Response<pb::LatencyResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = self
            .engine
            .lock()
            .latency(caller, req.get_ref().tracer_id)?;
        Ok(Response::new(r))
    }
}
