//! `bench`: patchbay's benchmark, every figure measured side by side in one run.
//!
//! ```text
//! cargo run --release -p integration-tests --bin bench [-- --quick] [--peers] [--json FILE]
//! ```
//!
//! Sections (each figure is the median of repeated runs):
//! - `percall` — ns per call of a small function in a hot loop (`bench/hotloop.c`,
//!   CPU time of the calling thread, so that preemption on a busy machine does not
//!   count): untraced plain build, instrumented build with the agent but nothing
//!   attached, `count`, and `trace` with two argument registers — in bursts that fit
//!   the agent's event ring (every event kept) and in the hot loop (ring full, events
//!   dropped); 1 thread and one per core.
//! - `peers` — the same loop under a bpftrace uprobe counting the function and under
//!   `uftrace record -P add1` on the nop5 and on the plain build (installed with apt-get
//!   when missing and allowed).
//! - `sites` — attach (call → every trampoline Live) and detach (call → free
//!   authorized, and → freed) of a `count` tracer over 10, 1,000 and 10,000 functions
//!   of a generated C program; and on its plain `-O2` build (relocated prologues), the
//!   first attach of the largest size in a fresh process (discovery and analysis of
//!   every loaded object included) and later ones.
//! - `grace` — detach to free authorized of a trampoline busy threads run through,
//!   with 1, 16 and 64 threads (busy, blocked in poll, idle on a condition variable),
//!   against a server that expedites grace periods and one started `--no-expedite`.
//! - `events` — `trace` events per second from the target through the agent and the
//!   server to a WatchEvents subscriber, with the drop count, at the hot loop's full
//!   rate and at paced rates.
//!
//! Prints one table and writes JSON (default `target/<profile>/bench.json`).

mod events;
mod grace;
mod peers;
mod percall;
mod report;
mod sites;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use integration_tests::bins;
use integration_tests::server::TestServer;
use integration_tests::target::Target;

use crate::report::Report;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench",
    about = "patchbay's benchmark: one table, one JSON file"
)]
pub struct Args {
    /// Smoke mode: a few seconds of work, smaller sizes, peers skipped unless --peers.
    #[arg(long)]
    pub quick: bool,
    /// Run the peers (bpftrace, uftrace) in --quick mode too.
    #[arg(long)]
    pub peers: bool,
    /// Never run the peers.
    #[arg(long, conflicts_with = "peers")]
    pub no_peers: bool,
    /// Never install missing peers with apt-get (by default: only when running as root).
    #[arg(long)]
    pub no_install: bool,
    /// Run only these sections (percall, peers, sites, grace, events), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where to write the JSON [default: target/<profile>/bench.json].
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Sizes and repetition counts of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub cores: u32,
    /// Calls per thread per per-call run, and runs per figure.
    pub calls: u64,
    pub reps: usize,
    /// Calls per thread per burst run (bursts of [`BURST`] calls), and runs per figure.
    pub burst_calls: u64,
    pub burst_reps: usize,
    /// Peers: wall time each run aims at, and runs per figure.
    pub peer_run: Duration,
    pub peer_reps: usize,
    /// Functions in the generated sites program, and the attach sizes.
    pub functions: u32,
    pub site_sizes: Vec<u32>,
    pub site_reps: usize,
    /// Thread counts of the grace-period figures, and runs per figure.
    pub gp_threads: Vec<u32>,
    pub gp_reps: usize,
    /// Events: calls of the full-rate run, paced rates (events/s) and their duration.
    pub event_calls: u64,
    pub event_rates: Vec<u64>,
    pub event_run: Duration,
    pub event_reps: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let cores = std::thread::available_parallelism().map_or(2, |c| c.get()) as u32;
        if quick {
            Plan {
                quick,
                cores,
                calls: 1_000_000,
                reps: 3,
                burst_calls: 10 * BURST,
                burst_reps: 2,
                peer_run: Duration::from_millis(300),
                peer_reps: 1,
                functions: 1000,
                site_sizes: vec![10, 1000],
                site_reps: 2,
                gp_threads: vec![1, 16],
                gp_reps: 3,
                event_calls: 100_000,
                event_rates: vec![100_000],
                event_run: Duration::from_millis(200),
                event_reps: 1,
            }
        } else {
            Plan {
                quick,
                cores,
                calls: 50_000_000,
                reps: 7,
                burst_calls: 100 * BURST,
                burst_reps: 5,
                peer_run: Duration::from_secs(2),
                peer_reps: 5,
                functions: 10_000,
                site_sizes: vec![10, 1000, 10_000],
                site_reps: 7,
                gp_threads: vec![1, 16, 64],
                gp_reps: 15,
                event_calls: 20_000_000,
                event_rates: vec![100_000, 1_000_000],
                event_run: Duration::from_secs(1),
                event_reps: 3,
            }
        }
    }

    /// The thread counts of the per-call figures: 1 and one per core.
    pub fn thread_counts(&self) -> Vec<u32> {
        if self.cores > 1 {
            vec![1, self.cores]
        } else {
            vec![1]
        }
    }
}

/// The C programs a run uses, built into a temporary directory.
pub struct Programs {
    _dir: tempfile::TempDir,
    /// `hotloop.c` built with plain `-O2` (no instrumentation at all).
    pub plain: PathBuf,
    /// `hotloop.c` built with 5-byte nops at function entries (`__mcount_loc`).
    pub nop5: PathBuf,
    /// The generated program with `functions` small functions, nop5 build.
    pub sites: PathBuf,
    /// The same program built with plain `-O2` (relocated prologues).
    pub sites_plain: PathBuf,
    pub dir: PathBuf,
}

/// gcc flags of the instrumented builds: the fixtures' `Build::Nop5` mode.
pub const NOP5_CFLAGS: &[&str] = &[
    "-O2",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-mnop-mcount",
    "-fno-pie",
];
pub const NOP5_LDFLAGS: &[&str] = &["-no-pie"];

fn gcc(out: &Path, src: &Path, cflags: &[&str], ldflags: &[&str]) -> anyhow::Result<()> {
    let obj = out.with_extension("o");
    let o = Command::new("gcc")
        .args(cflags)
        .args(["-Wall", "-Wextra", "-Werror", "-c"])
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .output()
        .context("running gcc (install it: apt-get install gcc)")?;
    if !o.status.success() {
        bail!(
            "gcc failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = Command::new("gcc")
        .args(ldflags)
        .arg(&obj)
        .arg("-o")
        .arg(out)
        .arg("-lpthread")
        .output()?;
    if !o.status.success() {
        bail!(
            "linking {} failed:\n{}",
            out.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

impl Programs {
    fn build(plan: &Plan) -> anyhow::Result<Programs> {
        let dir = tempfile::Builder::new()
            .prefix("patchbay-bench-")
            .tempdir()?;
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hotloop.c");
        let plain = dir.path().join("hotloop-plain");
        let nop5 = dir.path().join("hotloop-nop5");
        gcc(&plain, &src, &["-O2"], &[])?;
        gcc(&nop5, &src, NOP5_CFLAGS, NOP5_LDFLAGS)?;
        let sites_src = dir.path().join("sites.c");
        std::fs::write(&sites_src, sites::generate(plan.functions))?;
        let sites = dir.path().join("sites-nop5");
        gcc(&sites, &sites_src, NOP5_CFLAGS, NOP5_LDFLAGS)?;
        let sites_plain = dir.path().join("sites-plain");
        gcc(&sites_plain, &sites_src, &["-O2"], &[])?;
        Ok(Programs {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            plain,
            nop5,
            sites,
            sites_plain,
        })
    }
}

/// Environment of every agent the bench starts: quiet logs.
pub const AGENT_ENV: &[(&str, &str)] = &[("PATCHBAY_AGENT_LOG", "warn")];

/// A server with quiet logs (debug logging would be measured too).
pub fn server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--log", "warn"];
    args.extend_from_slice(extra);
    TestServer::start_with(&args)
}

/// Starts `exe` with the agent preloaded against `server` and waits for its agent.
pub async fn traced(
    exe: &Path,
    server: &TestServer,
    client: &patchbay_sdk::Client,
) -> anyhow::Result<Target> {
    let t = Target::start_program(exe, Some(server.socket_path()), AGENT_ENV).await;
    wait_agent(client, t.pid()).await?;
    Ok(t)
}

/// Waits (15 s at most) until the server lists the agent of `pid` as connected.
pub async fn wait_agent(client: &patchbay_sdk::Client, pid: u32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let agents = client.agents().await?;
        if agents.iter().any(|a| a.pid == pid && a.connected) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("no agent from pid {pid} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Calls per burst: half an agent event ring (4096 slots per thread), so a burst
/// never fills it.
pub const BURST: u64 = 2048;
/// Sleep between bursts: longer than the agent's idle tick (20 ms), which drains rings.
pub const BURST_GAP_US: u64 = 21_000;

/// Runs `burst T N BURST BURST_GAP_US` on a target and returns (ns per call inside the
/// bursts, calls made).
pub async fn run_burst(t: &mut Target, threads: u32, n: u64) -> anyhow::Result<(f64, u64)> {
    let answer = t
        .cmd_within(
            &format!("burst {threads} {n} {BURST} {BURST_GAP_US}"),
            Duration::from_secs(300),
        )
        .await;
    Ok((field(&answer, "ns_per_call")?, field(&answer, "calls")?))
}

/// The value of `key=` in a space-separated answer line, parsed.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> anyhow::Result<T> {
    integration_tests::target::field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}= in {line:?}"))
}

/// Runs `loop T N` on a target and returns (ns per call, calls made).
pub async fn run_loop(t: &mut Target, threads: u32, n: u64) -> anyhow::Result<(f64, u64)> {
    let answer = t
        .cmd_within(&format!("loop {threads} {n}"), Duration::from_secs(300))
        .await;
    Ok((field(&answer, "ns_per_call")?, field(&answer, "calls")?))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::new(args.quick);
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| bins::profile_dir().join("bench.json"));
    let started = std::time::Instant::now();
    eprintln!("bench: building the C targets and the workspace binaries…");
    let progs = Programs::build(&plan)?;
    bins::agent_lib();
    bins::patchbayd();

    let mut report = Report::new(&plan);
    let on = |section: &str| args.only.is_empty() || args.only.iter().any(|s| s == section);
    if on("percall") {
        eprintln!(
            "bench: per-call cost… ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        percall::run(&plan, &progs, &mut report).await?;
    }
    if on("peers") {
        let peers_on = !args.no_peers && (!plan.quick || args.peers);
        if peers_on {
            eprintln!("bench: peers… ({:.1} s)", started.elapsed().as_secs_f64());
            peers::run(&plan, &progs, &args, &mut report).await?;
        } else {
            peers::skip(
                &plan,
                &mut report,
                if args.no_peers {
                    "--no-peers"
                } else {
                    "--quick (add --peers to run them)"
                },
            );
        }
    }
    if on("sites") {
        eprintln!(
            "bench: attach/detach of many sites… ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        sites::run(&plan, &progs, &mut report).await?;
        sites::run_plain(&plan, &progs, &mut report).await?;
    }
    if on("grace") {
        eprintln!(
            "bench: grace periods… ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        grace::run(&plan, &progs, &mut report).await?;
    }
    if on("events") {
        eprintln!(
            "bench: event throughput… ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        events::run(&plan, &progs, &mut report).await?;
    }

    report.print();
    report.write_json(&json_path, started.elapsed())?;
    println!("\njson: {}", json_path.display());
    Ok(())
}
