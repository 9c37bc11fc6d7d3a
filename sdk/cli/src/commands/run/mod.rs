//! `patchbay run (--count | --latency) PATTERN [--no-follow] [--per-process]
//! [--interval-ms MS] [--top N] [--agent PATH] [--timeout-ms MS] -- PROGRAM ARGS...`: the
//! one command that does the main job.
//!
//! 1. use the server at `--socket` (or the default socket) if one answers, else start an
//!    embedded one on a private socket ([`server`]);
//! 2. find the agent library and launch the program with it preloaded ([`launch`]),
//!    held before `main` by a start gate (`patchbay_agent::hold`);
//! 3. wait until the program's agent connects, attach a `count` tracer to it, release
//!    the gate: the tracer is live before the program's first call. By default the
//!    tracer follows the process tree (`Target::tree`): every descendant (children,
//!    shells' commands, `exec` chains) gets it as its agent connects, and is held
//!    before its own `main` until then (`PATCHBAY_FOLLOW_MS`, see
//!    `patchbay_agent::hold`); `patchbay` becomes the children's subreaper, so that it
//!    also waits for descendants that outlive the program;
//! 4. while the program runs, redraw the hottest functions on stderr ([`view`]);
//! 5. when it exits (and, following, every descendant), wait for the agents' last
//!    counts, print the final table summed over the tree (or JSON; `--per-process`
//!    breaks it down), detach, and exit with the program's status.
//!
//! SIGINT and SIGTERM are caught and passed on to the program ([`signals`]), so that
//! `patchbay` outlives it and prints the final counts.

pub(crate) mod launch;
mod server;
mod signals;
mod view;

use std::ffi::OsString;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use patchbay_sdk::proto::{CountsResponse, TracerState, target};
use patchbay_sdk::{Client, Error, Target, Tracer, TracerId};
use serde_json::json;

use crate::output::Output;
use launch::{Exit, seconds};
use server::Connection;
use signals::{Received, Signals};
use view::{Live, Spinner};

/// The label of the tracers `patchbay run` attaches.
const RUN_TRACER_NAME: &str = "patchbay run";

/// The variable that makes descendants wait before `main` until covered (the agent's
/// `hold::FOLLOW_VAR`; the CLI does not link the agent).
const FOLLOW_VAR: &str = "PATCHBAY_FOLLOW_MS";

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("tracer").required(true).args(["pattern", "latency"])))]
pub struct Args {
    /// Count the calls of the functions whose demangled name matches this glob
    #[arg(long = "count", value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Measure how long each call of the functions matching this glob takes (tables of
    /// calls, total, min, p50/p90/p99, max and abandoned frames)
    #[arg(long = "latency", value_name = "PATTERN")]
    pub latency: Option<String>,
    /// How often the live table is refreshed, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
    /// How many of the hottest functions the tables show
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub top: u64,
    /// The agent library to preload [default: libpatchbay_agent.so next to the patchbay
    /// executable, else in its ../lib/patchbay/, ~/.local/lib/patchbay/, /usr/lib/patchbay/]
    #[arg(long, env = "PATCHBAY_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Trace the launched process alone, not the processes it starts (by default every
    /// descendant is traced: shells, wrapper scripts, `exec` chains, forked workers)
    #[arg(long)]
    pub no_follow: bool,
    /// Break the final table down by process (pid and command line)
    #[arg(long)]
    pub per_process: bool,
    /// How long to wait for the program's agent to connect, and then for the tracer to go
    /// live, in milliseconds (the program waits before `main` meanwhile)
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// The program to run, and its arguments (after `--`)
    #[arg(value_name = "PROGRAM", required = true, num_args = 1..,
          trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// Options of the whole CLI that `run` uses.
pub struct Globals<'a> {
    pub socket: Option<&'a str>,
    pub token: Option<&'a str>,
    pub json: bool,
}

/// Runs the command; the result is the exit status of `patchbay`.
pub async fn main(args: Args, globals: Globals<'_>) -> anyhow::Result<u8> {
    let exe = std::env::current_exe().ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let agent = launch::find_agent(
        args.agent.as_deref(),
        exe.as_deref(),
        home.as_deref(),
        Path::is_file,
    )?;
    let agent = std::path::absolute(&agent).unwrap_or(agent);
    let mut signals = Signals::install(&[Signal::SIGINT, Signal::SIGTERM])
        .context("cannot catch SIGINT and SIGTERM")?;
    let connection = Connection::open(globals.socket, globals.token).await?;
    // Interrupted while starting: do not start the program.
    if let Some(received) = signals.try_recv() {
        connection.shutdown().await;
        eprintln!("patchbay: interrupted ({})", received.signal.as_str());
        return Ok(Exit::Signal(received.signal as i32).code());
    }
    let result = async {
        let program = Program::launch(
            &args.command,
            &agent,
            &connection.socket,
            signals,
            Duration::from_millis(args.timeout_ms),
            !args.no_follow,
        )?;
        let session = Session {
            client: &connection.client,
            socket: &connection.socket,
            args: &args,
            json: globals.json,
            terminal: std::io::stderr().is_terminal(),
            program,
        };
        Ok(session.run().await)
    }
    .await;
    connection.shutdown().await;
    result
}

/// The running program: its exit once known, and the signals to pass on to it.
struct Program {
    child: tokio::process::Child,
    pid: u32,
    /// The write end of the program's start gate (see `patchbay_agent::hold`): the
    /// program waits before `main` until it is closed ([`Program::release`]).
    gate: Option<std::os::fd::OwnedFd>,
    started: Instant,
    exit: Option<Exit>,
    signals: Signals,
}

impl Program {
    /// Starts the program with the agent preloaded and held before `main` (for at most
    /// `hold`) until [`Program::release`].
    fn launch(
        command: &[OsString],
        agent: &Path,
        socket: &Path,
        signals: Signals,
        hold: Duration,
        follow: bool,
    ) -> anyhow::Result<Program> {
        use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
        use std::os::fd::AsRawFd;
        let (program, args) = command.split_first().context("no program to run")?;
        let preload = launch::ld_preload(agent, std::env::var_os("LD_PRELOAD").as_deref());
        // The gate: the program inherits the read end (close-on-exec cleared); the write
        // end stays here, close-on-exec.
        let (gate_r, gate_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).context("cannot create the start gate")?;
        fcntl(&gate_r, FcntlArg::F_SETFD(FdFlag::empty()))
            .context("cannot pass the start gate on")?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env("LD_PRELOAD", preload)
            .env("PATCHBAY_SOCKET", socket)
            .env("PATCHBAY_HOLD_FD", gate_r.as_raw_fd().to_string())
            .env("PATCHBAY_HOLD_MS", hold.as_millis().to_string());
        if follow {
            // Descendants inherit it: each waits before `main` until it is covered.
            command.env(FOLLOW_VAR, hold.as_millis().to_string());
            // Orphaned descendants become our children: we wait for them too.
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            if rc != 0 {
                tracing::debug!(
                    "cannot become the children's subreaper: descendants that \
                                 outlive the program are not waited for"
                );
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", Path::new(program).display()))?;
        drop(gate_r);
        let pid = child.id().context("the program exited at once")?;
        Ok(Program {
            child,
            pid,
            gate: Some(gate_w),
            started: Instant::now(),
            exit: None,
            signals,
        })
    }

    fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// Lets the program run `main` (closes the gate; idempotent).
    fn release(&mut self) {
        self.gate = None;
    }

    /// Runs `fut`, passing signals on meanwhile. With `stop_on_exit`, gives up on `fut`
    /// and returns `None` as soon as the program exits (at once if it has already).
    async fn drive<F: Future>(&mut self, fut: F, stop_on_exit: bool) -> Option<F::Output> {
        if stop_on_exit && !self.running() {
            return None;
        }
        tokio::pin!(fut);
        loop {
            tokio::select! {
                output = &mut fut => return Some(output),
                status = self.child.wait(), if self.exit.is_none() => {
                    self.exit = Some(match status {
                        Ok(status) => Exit::from_status(status),
                        Err(err) => {
                            eprintln!("patchbay: cannot wait for pid {}: {err}", self.pid);
                            Exit::Unknown
                        }
                    });
                    if stop_on_exit {
                        return None;
                    }
                }
                received = self.signals.recv() => self.forward(received),
            }
        }
    }

    /// Runs `fut` until it completes or the program exits (`None`).
    async fn during<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        self.drive(fut, true).await
    }

    /// Runs `fut` to completion even if the program exits meanwhile.
    async fn complete<F: Future>(&mut self, fut: F) -> F::Output {
        self.drive(fut, false).await.expect("not stopped on exit")
    }

    /// Waits for the program to exit.
    async fn wait(&mut self) -> Exit {
        self.during(std::future::pending::<()>()).await;
        self.exit.unwrap_or(Exit::Unknown)
    }

    /// Passes a signal on to the program, unless the terminal sent it to the program too.
    fn forward(&self, received: Received) {
        if self.running() && !received.from_terminal {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            // The program is not reaped yet (we reap it), so the pid is still its own.
            let _ = nix::sys::signal::kill(pid, received.signal);
        }
    }
}

/// How waiting for the program's agent ended.
enum AgentWait {
    Connected,
    /// The program exited first; `seen`: its agent had connected meanwhile.
    Exited {
        seen: bool,
    },
    TimedOut,
    Failed(anyhow::Error),
}

struct Session<'a> {
    client: &'a Client,
    socket: &'a Path,
    args: &'a Args,
    json: bool,
    /// stderr is a terminal: show the spinner and the live table.
    terminal: bool,
    program: Program,
}

impl Session<'_> {
    const POLL: Duration = Duration::from_millis(20);
    /// How long the agent of an exited program may take to flush its counts and leave.
    const FLUSH_WAIT: Duration = Duration::from_secs(2);

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.args.timeout_ms)
    }

    fn top(&self) -> usize {
        usize::try_from(self.args.top).unwrap_or(usize::MAX)
    }

    async fn run(mut self) -> u8 {
        let pid = self.program.pid;
        match self.wait_for_agent().await {
            AgentWait::Connected => {}
            AgentWait::Exited { seen } => {
                let exit = self.program.exit.unwrap_or(Exit::Unknown);
                if seen {
                    eprintln!(
                        "patchbay: the program {} before patchbay could attach to it (its agent \
                         connected, but the program ended first)",
                        exit.sentence()
                    );
                } else {
                    eprintln!(
                        "patchbay: the program {} before its agent connected: is {} loadable? \
                         try LD_DEBUG=libs",
                        exit.sentence(),
                        launch::AGENT_FILE
                    );
                }
                return exit.failure_code();
            }
            AgentWait::TimedOut => {
                eprintln!(
                    "patchbay: no agent connected from pid {pid} within {}: is {} loadable \
                     (try LD_DEBUG=libs), and does the program keep LD_PRELOAD and \
                     PATCHBAY_SOCKET in its environment?",
                    seconds(self.args.timeout_ms),
                    launch::AGENT_FILE
                );
                return self.untraced().await;
            }
            AgentWait::Failed(err) => {
                eprintln!("{}", crate::render_error(&err));
                return self.untraced().await;
            }
        }

        let target = if self.follow() {
            Target::tree(pid)
        } else {
            Target::pid(pid)
        };
        let spec = match &self.args.latency {
            Some(p) => Tracer::latency(target, p.clone()),
            None => Tracer::count(target, self.args.pattern()),
        }
        .name(RUN_TRACER_NAME);
        let attach = self.client.attach(spec).timeout(self.timeout());
        let answer = self.program.complete(attach.into_future()).await;
        // Attached (or not): the program may run `main` now.
        self.program.release();
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                eprintln!("{}", crate::render_error(&err.into()));
                self.remove_leftover_tracers().await;
                if self.program.running() {
                    eprintln!(
                        "  hint: see what can be traced with `patchbay --socket {} functions \
                         --pid {pid}` while the program runs",
                        self.socket.display()
                    );
                }
                return self.untraced().await;
            }
        };
        let attached_at = Instant::now();
        let tracer = answer;
        let results = tracer.attach_response().map_or(&[][..], |a| &a.results[..]);
        let mine = results.iter().filter(|r| r.pid == pid);
        let (patched, skipped) = mine.fold((0u64, 0u64), |(p, s), r| {
            (
                p + u64::from(r.sites_patched),
                s + u64::from(r.sites_skipped),
            )
        });
        let skipped = if skipped > 0 {
            format!("; {skipped} more match but are not patchable")
        } else {
            String::new()
        };
        let functions = if patched == 1 {
            "function"
        } else {
            "functions"
        };
        // One write: the program's own output runs concurrently.
        let verb = if self.args.latency.is_some() {
            "timing"
        } else {
            "counting"
        };
        let line = match (self.follow(), patched) {
            (false, _) => format!(
                "patchbay: {verb} {patched} {functions} matching '{}' in pid {pid} (tracer {}){skipped}",
                self.args.pattern(),
                tracer.id(),
            ),
            (true, 0) => format!(
                "patchbay: nothing matches '{}' in pid {pid} yet: following its descendants \
                 (tracer {}){skipped}",
                self.args.pattern(),
                tracer.id(),
            ),
            (true, _) => format!(
                "patchbay: {verb} {patched} {functions} matching '{}' in pid {pid}, and in \
                 its descendants as they start (tracer {}){skipped}",
                self.args.pattern(),
                tracer.id(),
            ),
        };
        eprintln!("{line}");
        for r in results.iter().filter(|r| !r.error.is_empty()) {
            // Following, a root that matches nothing is no failure (said above).
            if self.follow() && r.pid == pid && patched == 0 && r.sites_patched == 0 {
                continue;
            }
            eprintln!("patchbay: warning: pid {}: {}", r.pid, r.error);
        }

        let mut live = Live::new(self.top(), attached_at);
        if self.terminal {
            self.show_live(&tracer, &mut live).await;
        }
        let exit = self.program.wait().await;
        if self.follow() {
            self.wait_for_descendants(&tracer, &mut live).await;
        }
        live.clear();
        self.finish(tracer, exit).await
    }

    /// Whether the tracer follows the program's descendants.
    fn follow(&self) -> bool {
        !self.args.no_follow
    }

    /// After the program exited: waits for its descendants that still run (we are their
    /// subreaper: orphans are our children), reaping them, until none is left or
    /// SIGINT/SIGTERM. The live table keeps refreshing meanwhile.
    async fn wait_for_descendants(&mut self, tracer: &Tracer, live: &mut Live) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let interval = Duration::from_millis(self.args.interval_ms);
        let mut next_draw = Instant::now() + interval;
        let mut said = false;
        loop {
            // Reap every child that ended; stop when none is left.
            let left = loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break true,
                    Ok(_) => continue,
                    Err(_) => break false,
                }
            };
            if !left {
                return;
            }
            if !said {
                said = true;
                live.clear();
                eprintln!(
                    "patchbay: pid {} exited; waiting for its descendants that still run \
                     (Ctrl-C stops waiting)",
                    self.program.pid
                );
            }
            if self.terminal && Instant::now() >= next_draw {
                next_draw = Instant::now() + interval;
                if let Ok(mut counts) = tracer.counts().await {
                    crate::commands::counts::sort(&mut counts.counts);
                    let header = self.live_header(tracer, &counts);
                    live.draw(&header, &counts, &self.waiting_line());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Self::POLL) => {}
                received = self.program.signals.recv() => {
                    live.clear();
                    eprintln!(
                        "patchbay: stopped waiting for the descendants ({}); they keep running",
                        received.signal.as_str()
                    );
                    return;
                }
            }
        }
    }

    /// The live table's header.
    fn live_header(&self, tracer: &Tracer, counts: &CountsResponse) -> String {
        let secs = self.program.started.elapsed().as_secs_f64();
        if self.follow() {
            let alive = counts.processes.iter().filter(|p| p.connected).count();
            format!(
                "patchbay: tree of pid {} ({} running, {} seen), tracer {}: {} calls in {secs:.1} s",
                self.program.pid,
                alive,
                counts.processes.len(),
                tracer.id(),
                counts.total,
            )
        } else {
            format!(
                "patchbay: pid {}, tracer {}: {} calls in {secs:.1} s",
                self.program.pid,
                tracer.id(),
                counts.total,
            )
        }
    }

    /// What the live table says while nothing was counted.
    fn waiting_line(&self) -> String {
        if self.follow() {
            format!(
                "no calls counted yet: waiting for a process of the tree to call a function \
                 matching '{}'",
                self.args.pattern()
            )
        } else {
            "no calls counted yet".to_owned()
        }
    }

    /// Polls the server until an agent of the program is connected, the program exits,
    /// or the deadline passes.
    async fn wait_for_agent(&mut self) -> AgentWait {
        let pid = self.program.pid;
        let deadline = Instant::now() + self.timeout();
        let mut spinner = self
            .terminal
            .then(|| Spinner::new(format!("waiting for the agent of pid {pid}")));
        let outcome = loop {
            let agents = match self.program.during(self.client.agents()).await {
                None => break None,
                Some(Ok(agents)) => agents,
                Some(Err(err)) => {
                    break Some(AgentWait::Failed(
                        anyhow::Error::from(err).context("cannot list the agents"),
                    ));
                }
            };
            if agents.iter().any(|a| a.pid == pid && a.connected) {
                break Some(AgentWait::Connected);
            }
            if Instant::now() >= deadline {
                break Some(AgentWait::TimedOut);
            }
            if let Some(s) = spinner.as_mut() {
                s.tick();
            }
            if self
                .program
                .during(tokio::time::sleep(Self::POLL))
                .await
                .is_none()
            {
                break None;
            }
        };
        if let Some(s) = spinner.as_mut() {
            s.clear();
        }
        match outcome {
            Some(outcome) => outcome,
            None => {
                // An agent that connected between two polls is still listed (disconnected)
                // for a while after its process ended.
                let seen = self
                    .client
                    .agents()
                    .await
                    .is_ok_and(|agents| agents.iter().any(|a| a.pid == pid));
                AgentWait::Exited { seen }
            }
        }
    }

    /// After a failed attach: a tracer may have been left where it went live (an attach that
    /// timed out): detach this run's tracers of the program.
    async fn remove_leftover_tracers(&self) {
        let pid = self.program.pid;
        let Ok(tracers) = self.client.tracers().await else {
            return;
        };
        for tracer in tracers {
            let spec = tracer.spec.as_ref();
            let ours = spec.is_some_and(|s| {
                s.name == RUN_TRACER_NAME
                    && s.target.as_ref().is_some_and(|t| {
                        t.target == Some(target::Target::Pid(pid))
                            || t.target == Some(target::Target::Tree(pid))
                    })
            });
            if ours && tracer.state() == TracerState::Active {
                let id = TracerId::new(tracer.tracer_id);
                let _ = self.client.tracer(id).detach().await;
            }
        }
    }

    /// Tracing failed: the program keeps running as it is; wait for it and fail.
    async fn untraced(&mut self) -> u8 {
        self.program.release();
        if self.program.running() {
            eprintln!("patchbay: the program keeps running untraced; patchbay exits when it does");
        }
        let exit = self.program.wait().await;
        eprintln!("patchbay: pid {} {}", self.program.pid, exit.sentence());
        1
    }

    /// Redraws the live table every interval until the program exits.
    async fn show_live(&mut self, tracer: &Tracer, live: &mut Live) {
        let interval = Duration::from_millis(self.args.interval_ms);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        while self.program.running() {
            if self.program.during(ticker.tick()).await.is_none() {
                break;
            }
            if self.args.latency.is_some() {
                match self.program.during(tracer.latency_figures()).await {
                    None => break,
                    Some(Ok(l)) => {
                        let header = format!(
                            "patchbay: pid {}, tracer {}: latency after {:.1} s",
                            self.program.pid,
                            tracer.id(),
                            self.program.started.elapsed().as_secs_f64()
                        );
                        live.draw_lines(&latency_lines(&header, &l, self.top()));
                    }
                    Some(Err(err)) if !warned => {
                        warned = true;
                        live.clear();
                        eprintln!("patchbay: warning: cannot fetch the latency figures: {err}");
                    }
                    Some(Err(_)) => {}
                }
                continue;
            }
            match self.program.during(tracer.counts()).await {
                None => break,
                Some(Ok(mut counts)) => {
                    crate::commands::counts::sort(&mut counts.counts);
                    let header = self.live_header(tracer, &counts);
                    live.draw(&header, &counts, &self.waiting_line());
                }
                Some(Err(err)) if !warned => {
                    warned = true;
                    live.clear();
                    eprintln!("patchbay: warning: cannot fetch the counts: {err}");
                }
                Some(Err(_)) => {}
            }
        }
    }

    /// After the program exited: its last counts, the final table or JSON, detach.
    async fn finish(&mut self, tracer: Tracer, exit: Exit) -> u8 {
        let pid = self.program.pid;
        let ran = self.program.started.elapsed();
        let still = self.wait_for_disconnect(&tracer).await;
        if !still.is_empty() {
            let pids: Vec<String> = still.iter().map(u32::to_string).collect();
            eprintln!(
                "patchbay: warning: the agent of pid {} still looks connected {} after the \
                 program exited; its last counts may be missing",
                pids.join(", "),
                seconds(Self::FLUSH_WAIT.as_millis() as u64)
            );
        }
        if self.args.latency.is_some() {
            return self.finish_latency(tracer, exit, ran).await;
        }
        let counts = tracer.counts().await;
        let matched = match tracer.info().await {
            Ok(info) => info.processes_matched,
            // The final fetch below reports a server that went away.
            Err(_) => 1,
        };
        let id = tracer.id();
        match tracer.detach().await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(err) => eprintln!("patchbay: warning: cannot detach tracer {id}: {err}"),
        }
        let mut counts = match counts {
            Ok(counts) => counts,
            Err(err) => {
                let err = anyhow::Error::from(err).context("cannot fetch the final counts");
                eprintln!("{}", crate::render_error(&err));
                eprintln!("patchbay: pid {pid} {}", exit.sentence());
                return 1;
            }
        };
        crate::commands::counts::sort(&mut counts.counts);
        for p in counts.processes.iter_mut() {
            crate::commands::counts::sort(&mut p.counts);
        }
        eprintln!(
            "patchbay: pid {pid} {} after {:.2} s",
            exit.sentence(),
            ran.as_secs_f64()
        );
        if self.json {
            let mut out = Output::new(true, Box::new(std::io::stdout()));
            // One line, after the program's own output (which shares stdout): the last line.
            if let Err(err) = out.json_line(&document(pid, exit, id, &counts)) {
                eprintln!("error: cannot write the JSON document: {err}");
                return 1;
            }
        } else if self.args.per_process {
            eprint!("{}", view::per_process_table(&counts, self.top()));
        } else {
            eprint!("{}", view::final_table(&counts, self.top()));
        }
        if self.follow() && matched == 0 {
            eprintln!(
                "patchbay: pattern '{}' matched no patchable function in any of the {} \
                 traced by tracer {id} in the tree of pid {pid}",
                self.args.pattern(),
                processes(counts.processes.len()),
            );
            eprintln!(
                "  hint: list what can be traced with `patchbay functions --pid PID` while \
                 a process runs, or widen the pattern"
            );
            return exit.failure_code();
        }
        exit.code()
    }

    /// [`Session::finish`] of a `--latency` run: the final table, or the JSON line whose
    /// rows carry function, calls, total_ns, min_ns, max_ns, p50/p90/p99_ns, abandoned.
    async fn finish_latency(&mut self, tracer: Tracer, exit: Exit, ran: Duration) -> u8 {
        let pid = self.program.pid;
        let figures = tracer.latency_figures().await;
        let id = tracer.id();
        match tracer.detach().await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(err) => eprintln!("patchbay: warning: cannot detach tracer {id}: {err}"),
        }
        let figures = match figures {
            Ok(f) => f,
            Err(err) => {
                let err =
                    anyhow::Error::from(err).context("cannot fetch the final latency figures");
                eprintln!("{}", crate::render_error(&err));
                eprintln!("patchbay: pid {pid} {}", exit.sentence());
                return 1;
            }
        };
        eprintln!(
            "patchbay: pid {pid} {} after {:.2} s",
            exit.sentence(),
            ran.as_secs_f64()
        );
        if self.json {
            let mut out = Output::new(true, Box::new(std::io::stdout()));
            let doc = json!({
                "pid": pid,
                "status": exit.code(),
                "signal": exit.signal(),
                "tracer": id.get(),
                "latency": figures.functions.iter().map(crate::commands::latency::row).collect::<Vec<_>>(),
            });
            if let Err(err) = out.json_line(&doc) {
                eprintln!("error: cannot write the JSON document: {err}");
                return 1;
            }
        } else {
            let mut top = figures.clone();
            top.functions.truncate(self.top());
            eprint!("{}", crate::commands::latency::render(&top));
            if figures.functions.len() > top.functions.len() {
                eprintln!(
                    "({} more functions: --json shows all)",
                    figures.functions.len() - top.functions.len()
                );
            }
        }
        exit.code()
    }

    /// Waits until no agent of the program (following: of the tree) is connected (they
    /// flushed their last counts and left), at most [`Self::FLUSH_WAIT`]. Returns the
    /// pids still connected then.
    async fn wait_for_disconnect(&self, tracer: &Tracer) -> Vec<u32> {
        let pid = self.program.pid;
        let deadline = Instant::now() + Self::FLUSH_WAIT;
        loop {
            let connected: Vec<u32> = if self.follow() {
                match tracer.counts().await {
                    Ok(counts) => counts
                        .processes
                        .iter()
                        .filter(|p| p.connected)
                        .map(|p| p.pid)
                        .collect(),
                    // The final fetch will report a server that went away.
                    Err(_) => return Vec::new(),
                }
            } else {
                match self.client.agents().await {
                    Ok(agents) => agents
                        .iter()
                        .filter(|a| a.pid == pid && a.connected)
                        .map(|a| a.pid)
                        .collect(),
                    Err(_) => return Vec::new(),
                }
            };
            if connected.is_empty() || Instant::now() >= deadline {
                return connected;
            }
            tokio::time::sleep(Self::POLL).await;
        }
    }
}

impl Args {
    /// The pattern of the tracer to attach.
    pub fn pattern(&self) -> String {
        self.latency
            .clone()
            .or_else(|| self.pattern.clone())
            .unwrap_or_default()
    }
}

/// The live latency table: `header`, then the `top` functions of most total time.
fn latency_lines(
    header: &str,
    l: &patchbay_sdk::proto::LatencyResponse,
    top: usize,
) -> Vec<String> {
    let mut shown = l.clone();
    shown.functions.truncate(top);
    std::iter::once(header.to_owned())
        .chain(
            crate::commands::latency::render(&shown)
                .lines()
                .map(str::to_owned),
        )
        .collect()
}

/// `1 process`, `3 processes`.
fn processes(n: usize) -> String {
    if n == 1 {
        "1 process".to_owned()
    } else {
        format!("{n} processes")
    }
}

/// The `--json` document of a finished run. `counts` holds every function, not only the
/// top ones.
fn document(pid: u32, exit: Exit, tracer: TracerId, counts: &CountsResponse) -> serde_json::Value {
    json!({
        "pid": pid,
        "status": exit.code(),
        "signal": exit.signal(),
        "tracer": tracer.get(),
        "counts": counts
            .counts
            .iter()
            .map(|c| json!({ "function": c.function, "count": c.count }))
            .collect::<Vec<_>>(),
        "total": counts.total,
        "processes": counts
            .processes
            .iter()
            .map(|p| json!({
                "pid": p.pid,
                "start_time": p.start_time,
                "exe": p.exe,
                "cmdline": p.cmdline,
                "counts": p
                    .counts
                    .iter()
                    .map(|c| json!({ "function": c.function, "count": c.count }))
                    .collect::<Vec<_>>(),
                "total": p.total,
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use patchbay_sdk::proto::FunctionCount;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn parses_the_program_and_its_own_flags() {
        let a = parse(&[
            "--count", "parse_*", "--top", "5", "--", "prog", "-x", "--count", "y",
        ])
        .unwrap();
        assert_eq!(a.pattern(), "parse_*");
        assert!(a.latency.is_none());
        assert_eq!(a.top, 5);
        assert_eq!((a.interval_ms, a.timeout_ms), (1000, 10_000));
        assert_eq!(a.command, ["prog", "-x", "--count", "y"]);
        // Without `--`, everything from the program on is its own.
        let a = parse(&["--count", "*", "prog", "--top", "3"]).unwrap();
        assert_eq!(a.command, ["prog", "--top", "3"]);
        assert_eq!(a.top, 20);
        let a = parse(&["--latency", "work*", "--", "prog"]).unwrap();
        assert_eq!((a.pattern(), a.latency.is_some()), ("work*".into(), true));
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            &["--", "prog"][..],
            &["--count", "*"],
            &["--count", "*", "--interval-ms", "0", "--", "p"],
            &["--count", "*", "--top", "0", "--", "p"],
            &["--count", "*", "--latency", "*", "--", "p"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_document() {
        let counts = CountsResponse {
            counts: vec![FunctionCount {
                function: "hot".into(),
                count: 7,
                agents: 1,
            }],
            total: 7,
            processes: Vec::new(),
        };
        assert_eq!(
            document(42, Exit::Signal(15), TracerId::new(3), &counts),
            json!({
                "pid": 42, "status": 143, "signal": 15, "tracer": 3,
                "counts": [{ "function": "hot", "count": 7 }], "total": 7, "processes": [],
            })
        );
        assert_eq!(
            document(1, Exit::Code(3), TracerId::new(1), &counts)["signal"],
            json!(null)
        );
    }
}
