//! `torture`: patchbay's torture test, in the way rcutorture tests RCU.
//!
//! It builds its own traced Rust program (N generated functions, more worker threads
//! than cores, its own exact per-thread per-function call counters, callbacks
//! registered by name that sometimes spin or sleep; see
//! `integration-tests/fixtures/torture_target.rs`), starts its own `patchbayd`, and for
//! the given duration attaches, detaches and overlaps tracers at random while checking
//! counts, events and callback invocations exactly against the target's counters (see
//! `driver.rs`). It prints the figures and, with `--assert`, exits 1 when any check
//! failed: a premature free detected (a thread executed poisoned trampoline memory), a
//! crash, an inexact count, trampolines left allocated, an error.
//!
//! `--plain` builds the target without instrumentation (`rustc -O`): every traced
//! function is then a relocated-prologue site (issue 11), with the same checks.
//!
//! `--fault-skip-grace-period` starts patchbayd with its test-only fault switch (no grace
//! periods): the run must then fail, which shows the torture catches that bug.
//!
//! The last line of output is `TORTURE-REPORT {json}` for tests.
//!
//! ```text
//! cargo run --release -p integration-tests --bin torture -- --threads 16 --functions 200 --seconds 60
//! ```

mod build;
mod driver;
mod proc;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use integration_tests::TestServer;

#[derive(Parser, Debug)]
#[command(name = "torture", about = "patchbay torture test (rcutorture-style)")]
struct Args {
    /// Worker threads of the target (use more than the machine has cores).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Traced functions generated in the target.
    #[arg(long, default_value_t = 200)]
    functions: usize,
    /// How long to torture.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seed of the random choices (driver and target).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent noise tasks attaching and detaching tracers.
    #[arg(long, default_value_t = 2)]
    noise: usize,
    /// Exit 1 unless every check passed (premature frees 0, crashes 0, exact counts,
    /// nothing left allocated, no errors).
    #[arg(long)]
    assert: bool,
    /// patchbayd's log filter.
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Build the target without instrumentation: the agent relocates the traced
    /// functions' prologues instead of patching a patchable entry.
    #[arg(long)]
    plain: bool,
    /// TEST ONLY: start patchbayd with --fault-skip-grace-period (trampolines freed
    /// without a grace period). The torture must then fail.
    #[arg(long)]
    fault_skip_grace_period: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads == 0 || args.functions == 0 || args.functions > 10_000 {
        anyhow::bail!("--threads must be > 0 and --functions between 1 and 10000");
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        anyhow::bail!("--seconds must be a positive number");
    }
    let exe = build::target(args.functions, args.plain).context("building the torture target")?;
    let mut server_args = vec!["--log", args.server_log.as_str()];
    if args.fault_skip_grace_period {
        eprintln!(
            "torture: patchbayd runs with the TEST-ONLY fault switch --fault-skip-grace-period"
        );
        server_args.push("--fault-skip-grace-period");
    }
    let server = TestServer::start_with(&server_args);
    let cfg = driver::Config {
        threads: args.threads,
        functions: args.functions,
        duration: Duration::from_secs_f64(args.seconds),
        seed: args.seed,
        noise_tasks: args.noise,
        fault_skip_grace_period: args.fault_skip_grace_period,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(driver::run(cfg, &exe, server.socket_path(), server.dir()))?;
    let log = server.log();
    let server_errors = log.lines().filter(|l| l.contains(" ERROR ")).count();
    // Keep the logs of the last run next to the target.
    if let Some(dir) = exe.parent() {
        let _ = std::fs::write(dir.join("last-patchbayd.log"), &log);
        let _ = std::fs::copy(
            server.dir().join("target.stderr"),
            dir.join("last-target.stderr"),
        );
        println!("torture: logs of this run in {}/last-*", dir.display());
    }
    report.print();
    println!("  patchbayd ERROR log lines       {server_errors}");
    let failures = report.failures();
    println!("TORTURE-REPORT {}", report.json());
    if failures.is_empty() {
        println!("torture: PASS");
    } else {
        println!("torture: FAIL");
        for f in &failures {
            println!("  - {f}");
        }
        if args.assert {
            // process::exit runs no destructor: stop the server first.
            drop(server);
            std::process::exit(1);
        }
    }
    Ok(())
}
