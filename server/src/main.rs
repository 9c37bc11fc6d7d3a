//! `patchbayd`: the patchbay server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use patchbay_proto as pb;
use patchbay_server::engine::Engine;
use patchbay_server::listen;
use patchbay_server::registry::{Registry, Settings};
use patchbay_server::service::{AgentService, ControlService};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

#[derive(Parser, Debug)]
#[command(
    name = "patchbayd",
    version,
    about = "The patchbay server: agents, tracers, trampolines and grace periods"
)]
struct Args {
    /// Unix socket to listen on [default: $PATCHBAY_SOCKET, else
    /// $XDG_RUNTIME_DIR/patchbay/patchbayd.sock, else /tmp/patchbay-$UID/patchbayd.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Mode of the socket file, octal (666 lets other users' agents and clients in;
    /// SO_PEERCRED still limits each to its own uid).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Also listen on TCP, e.g. tcp://127.0.0.1:7420 (Control only; needs --token-file).
    #[arg(long)]
    listen: Option<String>,
    /// File holding the token TCP clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A thread holding up a grace period this long is reported as a stall.
    #[arg(long, default_value_t = 1000)]
    stall_threshold_ms: u32,
    /// Real-time signal agents use to observe running threads (0: agent default).
    #[arg(long, default_value_t = 0)]
    qs_signal: u32,
    /// Do not ask agents to expedite grace periods (they then rely on explicit and
    /// periodic quiescent states).
    #[arg(long)]
    no_expedite: bool,
    /// Log filter (tracing EnvFilter syntax), also from RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not an octal file mode such as 600"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let socket = match &args.socket {
        Some(s) => s.clone(),
        None => {
            let p = listen::default_socket_path();
            if std::env::var_os("PATCHBAY_SOCKET").is_none()
                && let Some(dir) = p.parent()
            {
                listen::ensure_private_dir(dir)
                    .with_context(|| format!("preparing {}", dir.display()))?;
            }
            p
        }
    };
    let token = match (&args.listen, &args.token_file) {
        (Some(_), None) => bail!("--listen needs --token-file: TCP clients must present a token"),
        (_, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    if token.as_deref() == Some("") {
        bail!("the token file is empty");
    }
    let settings = Settings {
        stall_threshold: Duration::from_millis(args.stall_threshold_ms as u64),
        expedite: !args.no_expedite,
        agent: pb::AgentSettings {
            qs_signal: args.qs_signal,
            stall_threshold_ms: args.stall_threshold_ms,
            flush_interval_ms: 100,
        },
    };
    let engine = Engine::new(Registry::new(settings));
    let unix = listen::bind_unix(&socket, args.socket_mode)
        .with_context(|| format!("listening on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "patchbayd listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let router = |engine: &Engine, token: Option<String>| {
        tonic::transport::Server::builder()
            .add_service(pb::agent_server::AgentServer::new(AgentService::new(
                engine.clone(),
            )))
            .add_service(pb::control_server::ControlServer::new(ControlService::new(
                engine.clone(),
                token,
            )))
    };
    let mut tasks = tokio::task::JoinSet::new();
    let unix_server = router(&engine, token.clone())
        .serve_with_incoming_shutdown(UnixListenerStream::new(unix), shutdown(stop_rx.clone()));
    tasks.spawn(async move { unix_server.await.context("unix socket server") });
    if let Some(addr) = &args.listen {
        let addr = addr
            .strip_prefix("tcp://")
            .with_context(|| format!("--listen {addr}: expected tcp://HOST:PORT"))?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on tcp://{addr}"))?;
        tracing::info!(addr, "patchbayd listening on TCP (token required)");
        let tcp_server = router(&engine, token.clone())
            .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), shutdown(stop_rx.clone()));
        tasks.spawn(async move { tcp_server.await.context("tcp server") });
    }
    let reaper = engine.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            reaper.reap();
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        r = tasks.join_next() => {
            let _ = std::fs::remove_file(&socket);
            match r {
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(e.into()),
                _ => bail!("server stopped unexpectedly"),
            }
        }
    }
    let _ = stop_tx.send(true);
    // Agent sessions are long-lived streams: do not wait for them for long.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("patchbayd stopped");
    Ok(())
}
