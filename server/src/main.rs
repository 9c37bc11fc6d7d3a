//! `patchbayd`: the patchbay server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use patchbay_proto as pb;
use patchbay_server::daemon::{Config, Server};
use patchbay_server::listen;
use patchbay_server::registry::Settings;

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
    /// Directory of the tracer store (tracer specs survive restarts there), created
    /// 0700 [default: /var/lib/patchbay for root, else $XDG_STATE_HOME/patchbay, else
    /// ~/.local/state/patchbay].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TEST-ONLY FAULT INJECTION: authorize freeing retired trampolines without waiting
    /// for their grace period (frees memory threads may still execute). Exists so the
    /// torture test can prove it catches that bug; never use it otherwise.
    #[arg(long, hide = true)]
    fault_skip_grace_period: bool,
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
    let tcp = match (&args.listen, &args.token_file) {
        (Some(_), None) => {
            bail!("--listen needs --token-file: TCP clients must present a token")
        }
        (Some(addr), Some(f)) => {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?
                .trim()
                .to_string();
            if token.is_empty() {
                bail!("the token file {} is empty", f.display());
            }
            let addr = addr
                .strip_prefix("tcp://")
                .with_context(|| format!("--listen {addr}: expected tcp://HOST:PORT"))?;
            Some((addr.to_string(), token))
        }
        (None, _) => None,
    };
    let settings = Settings {
        stall_threshold: Duration::from_millis(args.stall_threshold_ms as u64),
        expedite: !args.no_expedite,
        agent: pb::AgentSettings {
            qs_signal: args.qs_signal,
            stall_threshold_ms: args.stall_threshold_ms,
            flush_interval_ms: 100,
        },
        fault_skip_grace_period: args.fault_skip_grace_period,
    };
    let state_dir = match args.state_dir.clone() {
        Some(d) => d,
        None => patchbay_server::store::default_state_dir()?,
    };
    if args.fault_skip_grace_period {
        tracing::warn!(
            "TEST-ONLY FAULT INJECTION --fault-skip-grace-period: retired trampolines are freed without a grace period; threads WILL crash"
        );
    }
    let server = Server::bind(Config {
        socket: socket.clone(),
        socket_mode: args.socket_mode,
        tcp: tcp.clone(),
        settings,
        state_dir: Some(state_dir),
    })
    .await?;
    tracing::info!(socket = %socket.display(), "patchbayd listening");
    if let Some((addr, _)) = &tcp {
        tracing::info!(addr, "patchbayd listening on TCP (token required)");
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    };
    server.serve(stop).await?;
    tracing::info!("patchbayd stopped");
    Ok(())
}
