//! `patchbayd`: the patchbay server.
//!
//! Options come from flags > environment > configuration file > defaults
//! (`patchbay_server::config`). Under systemd: takes the socket the socket unit passes
//! (`LISTEN_FDS`), tells readiness (`READY=1`, `STOPPING=1`, `RELOADING=1`), logs to the
//! journal with structured fields when stderr is the journal, and reloads its
//! configuration on SIGHUP.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use patchbay_server::config::{self, Args, FileChoice, Layer, Resolved};
use patchbay_server::daemon::{Config, Server};
use patchbay_server::engine::Engine;
use patchbay_server::{listen, systemd};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

trait ArgsExt {
    fn file_choice(&self) -> FileChoice;
    fn resolve(&self) -> anyhow::Result<(Option<PathBuf>, Resolved)>;
}

impl ArgsExt for Args {
    fn file_choice(&self) -> FileChoice {
        FileChoice::pick(
            self.config.clone(),
            self.no_config,
            std::env::var_os(config::CONFIG_ENV),
            config::default_file(),
        )
    }

    /// Reads the environment and the configuration file and merges them under the flags.
    fn resolve(&self) -> anyhow::Result<(Option<PathBuf>, Resolved)> {
        let env = Layer::from_process_env()?;
        let (file, layer) = self.file_choice().load()?;
        Ok((file, config::resolve(self.layer(), env, layer)?))
    }
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (file, resolved) = args.resolve()?;
    // Before any thread starts: take over the socket systemd passed, if any.
    let inherited = systemd::activated_listener()?;
    let filter = init_logging(&resolved.log)?;
    if let Some(file) = &file {
        tracing::info!(config = %file.display(), "configuration file read");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args, resolved, inherited, filter))
}

/// Logs to the journal, with the fields of each event as journal fields (`F_<NAME>`,
/// plus `TARGET`), when stderr is the journal (a systemd service); else to stderr.
fn init_logging(filter: &str) -> anyhow::Result<FilterHandle> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("bad log filter {filter:?}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if systemd::stderr_is_journal() {
        tracing_journald::layer()
            .ok()
            .map(|l| l.with_syslog_identifier("patchbayd".to_owned()))
    } else {
        None
    };
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(fmt)
        .init();
    Ok(handle)
}

async fn run(
    args: Args,
    resolved: Resolved,
    inherited: Option<std::os::unix::net::UnixListener>,
    filter: FilterHandle,
) -> anyhow::Result<()> {
    let socket = match (&inherited, &resolved.socket) {
        (Some(listener), configured) => {
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("<socket passed by systemd>"));
            if let Some(configured) = configured
                && *configured != path
            {
                tracing::warn!(
                    configured = %configured.display(),
                    socket = %path.display(),
                    "systemd passed a socket: the configured socket is not used"
                );
            }
            path
        }
        (None, Some(s)) => s.clone(),
        (None, None) => {
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
    let tcp = match &resolved.tcp {
        Some((addr, file)) => Some((addr.clone(), read_token(file)?)),
        None => None,
    };
    let state_dir = match resolved.state_dir.clone() {
        Some(d) => d,
        None => patchbay_server::store::default_state_dir()?,
    };
    if args.fault_skip_grace_period {
        tracing::warn!(
            "TEST-ONLY FAULT INJECTION --fault-skip-grace-period: retired trampolines are freed without a grace period; threads WILL crash"
        );
    }
    let activated = inherited.is_some();
    let server = Server::bind(Config {
        socket: socket.clone(),
        inherited,
        socket_mode: resolved.socket_mode,
        tcp: tcp.clone(),
        settings: resolved.settings(args.fault_skip_grace_period),
        state_dir: Some(state_dir),
    })
    .await?;
    tracing::info!(socket = %socket.display(), activated, "patchbayd listening");
    if let Some((addr, _)) = &tcp {
        tracing::info!(addr, "patchbayd listening on TCP (token required)");
    }
    let engine = server.engine().clone();
    let reloader = tokio::spawn(reload_on_sighup(args, resolved, engine, filter));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        notify("STOPPING=1");
    };
    // The listeners are bound and the store loaded: clients may connect from now on.
    notify(&format!(
        "READY=1\nSTATUS=listening on {}",
        socket.display()
    ));
    let served = server.serve(stop).await;
    reloader.abort();
    served?;
    tracing::info!("patchbayd stopped");
    Ok(())
}

fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("reading token file {}", file.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", file.display());
    }
    Ok(token)
}

/// Tells the service manager, if any, about a state change; a failure is logged only
/// (the server runs the same without one).
fn notify(state: &str) {
    if let Err(err) = systemd::notify(state) {
        tracing::warn!(%err, state, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// On each SIGHUP: re-reads the environment and the configuration file; applies the log
/// filter and the registry's settings; keeps everything else (and says what needs a
/// restart). A bad file changes nothing.
async fn reload_on_sighup(args: Args, mut current: Resolved, engine: Engine, filter: FilterHandle) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%err, "cannot catch SIGHUP: configuration reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        notify("RELOADING=1");
        match reload(&args, &current, &engine, &filter) {
            Ok(new) => current = new,
            Err(err) => {
                tracing::error!("SIGHUP: configuration not reloaded, nothing changed: {err:#}")
            }
        }
        notify("READY=1");
    }
}

fn reload(
    args: &Args,
    current: &Resolved,
    engine: &Engine,
    filter: &FilterHandle,
) -> anyhow::Result<Resolved> {
    let (file, mut new) = args.resolve()?;
    let log =
        EnvFilter::try_new(&new.log).with_context(|| format!("bad log filter {:?}", new.log))?;
    let ignored = current.needs_restart(&new);
    filter.reload(log).context("cannot change the log filter")?;
    {
        let mut reg = engine.lock();
        let fault = reg.settings.fault_skip_grace_period;
        reg.settings = new.settings(fault);
    }
    for name in &ignored {
        tracing::warn!(option = name, "SIGHUP: changed, applies after a restart");
    }
    // Kept as they are: what the listeners and the store were opened with.
    new.socket.clone_from(&current.socket);
    new.socket_mode = current.socket_mode;
    new.tcp.clone_from(&current.tcp);
    new.state_dir.clone_from(&current.state_dir);
    tracing::info!(
        config = file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        log = new.log,
        stall_threshold_ms = new.stall_threshold_ms,
        expedite = new.expedite,
        qs_signal = new.qs_signal,
        "SIGHUP: configuration reloaded"
    );
    Ok(new)
}
