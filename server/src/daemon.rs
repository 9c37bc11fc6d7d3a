//! Running a server: bind the sockets, serve both services, reap dead agents, stop on
//! request. Used by `patchbayd` and by `patchbay run`'s embedded server.

use std::path::PathBuf;
use std::time::Duration;

use patchbay_proto as pb;
use thiserror::Error;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::engine::Engine;
use crate::listen;
use crate::registry::{Registry, Settings};
use crate::service::{AgentService, ControlService, check_token};
use crate::store::{Store, StoreError};

/// Largest message accepted from an agent or sent to a client (function lists of
/// big processes).
pub const MAX_MESSAGE: usize = 256 << 20;

#[derive(Debug)]
pub struct Config {
    /// Unix socket path (its directory must exist, or be the default one). With
    /// `inherited`, only names the socket in logs.
    pub socket: PathBuf,
    /// A listening Unix socket passed by systemd (socket activation): served instead of
    /// binding `socket`, and left in place on exit (it belongs to the socket unit).
    pub inherited: Option<std::os::unix::net::UnixListener>,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Optional TCP address (HOST:PORT) for the Control service, with its token.
    pub tcp: Option<(String, String)>,
    pub settings: Settings,
    /// Where the tracer store lives (see `store.rs`); `None` keeps tracers in memory
    /// only (the embedded server of `patchbay run`).
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("listening on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

const CONTROL: &str = "patchbay.v1.Control";

/// The services reflection lists: Control, health and reflection itself. The Agent
/// service is left out: it is the in-process agent's protocol (Unix socket only, the
/// peer's pid checked), not an API for tools; its messages stay resolvable by name
/// because `agent.proto` shares the descriptor set.
pub const LISTED_SERVICES: [&str; 4] = [
    CONTROL,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection() -> tonic_reflection::server::Builder<'static> {
    let b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    LISTED_SERVICES
        .iter()
        .fold(b, |b, name| b.with_service_name(*name))
}

/// A bound server, ready to serve.
pub struct Server {
    engine: Engine,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, String)>,
    /// The socket file to remove on exit (`None`: systemd's, left in place).
    owned_socket: Option<PathBuf>,
}

impl Server {
    /// Binds the sockets (so that clients can connect as soon as this returns).
    pub async fn bind(config: Config) -> Result<Server, DaemonError> {
        // The store first: a corrupt or busy store stops the server before it listens.
        let mut reg = Registry::new(config.settings);
        let store = match &config.state_dir {
            Some(dir) => {
                let (store, loaded) = Store::open(dir)?;
                let n = loaded.tracers.len();
                reg.restore_tracers(loaded.tracers, loaded.next_tracer_id)
                    .map_err(|e| StoreError::Corrupt {
                        path: store.path(),
                        reason: e.to_string(),
                    })?;
                tracing::info!(store = %store.path().display(), tracers = n, "tracers restored");
                Some(store)
            }
            None => None,
        };
        let bind_error = |source| DaemonError::Bind {
            path: config.socket.display().to_string(),
            source,
        };
        let (unix, owned_socket) = match config.inherited {
            Some(listener) => (
                tokio::net::UnixListener::from_std(listener).map_err(bind_error)?,
                None,
            ),
            None => (
                listen::bind_unix(&config.socket, config.socket_mode).map_err(bind_error)?,
                Some(config.socket),
            ),
        };
        let tcp = match config.tcp {
            Some((addr, token)) => Some((
                tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|source| DaemonError::Bind {
                        path: format!("tcp://{addr}"),
                        source,
                    })?,
                token,
            )),
            None => None,
        };
        Ok(Server {
            engine: Engine::with_store(reg, store),
            unix,
            tcp,
            owned_socket,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves until `stop` resolves; removes the socket file on the way out (unless
    /// systemd passed it).
    pub async fn serve(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let token = self.tcp.as_ref().map(|(_, t)| t.clone());
        // The store is loaded (`bind`): SERVING until shutdown starts.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<pb::control_server::ControlServer<ControlService>>()
            .await;
        let router = |engine: &Engine| {
            tonic::transport::Server::builder()
                .add_service(
                    pb::agent_server::AgentServer::new(AgentService::new(engine.clone()))
                        .max_decoding_message_size(MAX_MESSAGE),
                )
                .add_service(
                    pb::control_server::ControlServer::new(ControlService::new(
                        engine.clone(),
                        token.clone(),
                    ))
                    .max_encoding_message_size(MAX_MESSAGE),
                )
                // Health answers without a token, over TCP too (supervisors, probes).
                .add_service(health_service.clone())
        };
        let mut tasks = tokio::task::JoinSet::new();
        let unix = router(&self.engine)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(self.unix),
                shutdown(stop_rx.clone()),
            );
        tasks.spawn(unix);
        if let Some((tcp, token)) = self.tcp {
            // Over TCP, reflection needs the token like Control does.
            let check = move |req: tonic::Request<()>| {
                check_token(req.metadata(), Some(&token))?;
                Ok(req)
            };
            let tcp = router(&self.engine)
                .add_service(InterceptedService::new(
                    reflection().build_v1()?,
                    check.clone(),
                ))
                .add_service(InterceptedService::new(
                    reflection().build_v1alpha()?,
                    check,
                ))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(tcp),
                    shutdown(stop_rx.clone()),
                );
            tasks.spawn(tcp);
        }
        let reaper = self.engine.clone();
        let reap = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                reaper.reap();
            }
        });
        let result = tokio::select! {
            _ = stop => Ok(()),
            r = tasks.join_next() => match r {
                Some(Ok(Err(e))) => Err(DaemonError::Serve(e)),
                _ => Ok(()),
            },
        };
        // Health watchers and pollers still connected see NOT_SERVING before the
        // listeners close.
        for service in ["", CONTROL] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let _ = stop_tx.send(true);
        reap.abort();
        // Agent sessions are long-lived streams: do not wait for them for long.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if let Some(socket) = &self.owned_socket {
            let _ = std::fs::remove_file(socket);
        }
        result
    }
}
