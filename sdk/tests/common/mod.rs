//! A scripted Control server over a Unix socket (or TCP) in a temporary directory, for
//! testing the client and the CLI without `patchbayd`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use patchbay_sdk::proto::control_server::{Control, ControlServer};
use patchbay_sdk::proto::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Metadata the server saw on the last request.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub protocol: Option<String>,
    pub authorization: Option<String>,
    pub grpc_timeout: Option<String>,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub seen: Arc<Mutex<Seen>>,
    /// When set, requests must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// When set, ListAgents lists only the agent of the pid written in this file (once it
    /// exists), connected while `/proc/PID` exists: a program started by `patchbay run`
    /// "connects" by writing its pid there.
    pub agent_pid_file: Option<PathBuf>,
    /// Detach requests seen.
    pub detached: Arc<Mutex<Vec<u64>>>,
}

impl Fake {
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let get = |key: &str| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        *self.seen.lock().unwrap() = Seen {
            protocol: get(PROTOCOL_METADATA_KEY),
            authorization: get("authorization"),
            grpc_timeout: get("grpc-timeout"),
        };
        match get(PROTOCOL_METADATA_KEY) {
            Some(v) if v == PROTOCOL_VERSION.to_string() => {}
            other => {
                return Err(Status::failed_precondition(format!(
                    "protocol version {other:?} is not supported"
                )));
            }
        }
        if let Some(token) = &self.token
            && get("authorization") != Some(format!("Bearer {token}"))
        {
            return Err(Status::unauthenticated("a valid bearer token is required"));
        }
        Ok(())
    }
}

pub fn tracer(id: u64, spec: Option<TracerSpec>) -> Tracer {
    Tracer {
        tracer_id: id,
        spec,
        owner_uid: 1000,
        state: TracerState::Active as i32,
        agents: 1,
        sites: 3,
        dropped: 0,
        processes_matched: 1,
    }
}

type EventStreamOf = Pin<Box<dyn Stream<Item = Result<EventBatchView, Status>> + Send>>;

#[tonic::async_trait]
impl Control for Fake {
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.check(&request)?;
        if let Some(file) = &self.agent_pid_file {
            let pid = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            let agents = pid
                .map(|pid| AgentInfo {
                    agent_id: 1,
                    pid,
                    uid: 1000,
                    connected: std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    ..AgentInfo::default()
                })
                .into_iter()
                .collect();
            return Ok(Response::new(ListAgentsResponse { agents }));
        }
        Ok(Response::new(ListAgentsResponse {
            agents: vec![AgentInfo {
                agent_id: 1,
                pid: 4242,
                start_time: 99,
                uid: 1000,
                exe: "/usr/bin/demo".into(),
                agent_version: "0.1.0".into(),
                connected: true,
                threads: 2,
                epoch: 5,
                callbacks: vec!["mine".into()],
                trampolines: 1,
                ..AgentInfo::default()
            }],
        }))
    }

    async fn list_functions(
        &self,
        request: Request<ListFunctionsRequest>,
    ) -> Result<Response<ListFunctionsResponse>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        if r.pid != 4242 {
            return Err(Status::not_found(format!(
                "no agent in pid {}: start the program with `patchbay run` or LD_PRELOAD=libpatchbay_agent.so",
                r.pid
            )));
        }
        if r.pattern.contains('[') {
            return Err(Status::invalid_argument(format!(
                "malformed glob `{}`",
                r.pattern
            )));
        }
        let function = Function {
            name: format!("match:{}", r.pattern),
            address: 0x401000,
            object: "/usr/bin/demo".into(),
            patchable: true,
            site_kind: SiteKind::Nop5 as i32,
            ..Function::default()
        };
        Ok(Response::new(ListFunctionsResponse {
            functions: vec![function],
            total: r.limit + 10,
        }))
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        let pid = match r
            .spec
            .as_ref()
            .and_then(|s| s.target.as_ref())
            .and_then(|t| t.target.as_ref())
        {
            Some(target::Target::Pid(pid) | target::Target::Tree(pid)) => *pid,
            _ => 4242,
        };
        Ok(Response::new(AttachResponse {
            tracer: Some(tracer(1, r.spec)),
            results: vec![AgentAttachResult {
                agent_id: 1,
                pid,
                sites_patched: r.timeout_ms,
                sites_skipped: 0,
                error: String::new(),
            }],
        }))
    }

    async fn detach(
        &self,
        request: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        self.detached.lock().unwrap().push(r.tracer_id);
        if r.tracer_id != 1 {
            return Err(Status::not_found(format!("no tracer {}", r.tracer_id)));
        }
        if r.wait && r.timeout_ms == 1 {
            return Err(Status::deadline_exceeded(
                "grace period still waits for tid 43 of pid 4242",
            ));
        }
        Ok(Response::new(DetachResponse {
            retired: vec![TrampolineRef {
                agent_id: 1,
                trampoline_id: 7,
            }],
            complete: r.wait,
        }))
    }

    async fn list_tracers(
        &self,
        request: Request<ListTracersRequest>,
    ) -> Result<Response<ListTracersResponse>, Status> {
        self.check(&request)?;
        let spec = TracerSpec {
            target: Some(Target {
                target: Some(target::Target::Pid(4242)),
            }),
            pattern: "work*".into(),
            callback: Some(CallbackSpec {
                kind: CallbackKind::Count as i32,
                ..Default::default()
            }),
            name: "demo".into(),
        };
        Ok(Response::new(ListTracersResponse {
            tracers: vec![tracer(1, Some(spec))],
        }))
    }

    async fn list_trampolines(
        &self,
        request: Request<ListTrampolinesRequest>,
    ) -> Result<Response<ListTrampolinesResponse>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        let mut trampolines = vec![TrampolineInfo {
            agent_id: 1,
            pid: r.pid,
            trampoline_id: 7,
            tracer_ids: vec![1],
            sites: 3,
            state: TrampolineState::Live as i32,
            ..TrampolineInfo::default()
        }];
        if r.include_freed {
            trampolines.push(TrampolineInfo {
                trampoline_id: 6,
                state: TrampolineState::Freed as i32,
                ..trampolines[0].clone()
            });
        }
        Ok(Response::new(ListTrampolinesResponse { trampolines }))
    }

    async fn grace_periods(
        &self,
        request: Request<GracePeriodsRequest>,
    ) -> Result<Response<GracePeriodsResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(GracePeriodsResponse {
            pending: vec![GracePeriodInfo {
                agent_id: 1,
                pid: 4242,
                purpose: Some(grace_period_info::Purpose::TrampolineId(7)),
                epoch: 6,
                waited_ms: 2000,
                holdouts: vec![Holdout {
                    tid: 43,
                    stall: Some(Stall {
                        tid: 43,
                        pc: 0x7f00_0000_1000,
                        symbol: "trampoline #7".into(),
                        duration_ms: 1500,
                        reason: String::new(),
                    }),
                }],
            }],
            timelines: Vec::new(),
        }))
    }

    async fn synchronize(
        &self,
        request: Request<SynchronizeRequest>,
    ) -> Result<Response<SynchronizeResponse>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        if r.timeout_ms == 1 {
            return Err(Status::deadline_exceeded(
                "synchronize: tid 43 of pid 4242 not quiescent",
            ));
        }
        Ok(Response::new(SynchronizeResponse {
            agents: 1,
            threads: 2,
            elapsed_us: r.timeout_ms.into(),
        }))
    }

    type WatchEventsStream = EventStreamOf;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check(&request)?;
        let r = request.into_inner();
        self.detached.lock().unwrap().push(r.tracer_id);
        if r.tracer_id != 1 {
            return Err(Status::not_found(format!("no tracer {}", r.tracer_id)));
        }
        let batch = |n: u64, dropped| EventBatchView {
            agent_id: 1,
            pid: 4242,
            tracer_id: 1,
            events: vec![Event {
                timestamp_ns: 1_000_000_000 + n,
                tid: 4243,
                address: 0x401000,
                function: "work".into(),
                args: vec![n],
            }],
            dropped,
        };
        let batches = vec![Ok(batch(1, 0)), Ok(batch(2, 3))];
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn counts(
        &self,
        request: Request<CountsRequest>,
    ) -> Result<Response<CountsResponse>, Status> {
        self.check(&request)?;
        let c = |f: &str, count| FunctionCount {
            function: f.into(),
            count,
            agents: 1,
        };
        Ok(Response::new(CountsResponse {
            counts: vec![c("rare", 1), c("hot", 100), c("warm", 10)],
            total: 111,
            processes: Vec::new(),
        }))
    }

    async fn latency(
        &self,
        request: Request<patchbay_sdk::proto::LatencyRequest>,
    ) -> Result<Response<patchbay_sdk::proto::LatencyResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(patchbay_sdk::proto::LatencyResponse {
            functions: vec![patchbay_sdk::proto::FunctionLatency {
                function: "slow".into(),
                calls: 3,
                total_ns: 3_000,
                min_ns: 900,
                max_ns: 1_100,
                p50_ns: 1_000,
                p90_ns: 1_100,
                p99_ns: 1_100,
                entries: 4,
                abandoned: 1,
                buckets: vec![patchbay_sdk::proto::LatencyBucket {
                    low_ns: 768,
                    high_ns: 1_024,
                    count: 3,
                }],
                agents: 1,
                ..Default::default()
            }],
        }))
    }
}

/// A fake server on a Unix socket; dropped with the temporary directory.
pub struct UnixServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub fake: Fake,
}

pub async fn serve_unix(fake: Fake) -> UnixServer {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("patchbayd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let service = ControlServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    UnixServer { dir, socket, fake }
}

/// A fake server on 127.0.0.1; returns its `http://` address.
pub async fn serve_tcp(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let service = ControlServer::new(fake);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    format!("http://{addr}")
}
