//! Attaches a counting tracer to a running process, prints its hottest functions every
//! second, and detaches on Ctrl-C or after a number of seconds.
//!
//! ```text
//! cargo run --example live_counts -p patchbay-sdk -- PID PATTERN [SECONDS]
//! ```
//!
//! The process must run an agent (started with `patchbay run`, `LD_PRELOAD` of
//! `libpatchbay_agent.so`, or linked) and `patchbayd` must listen on the default socket
//! (or on `$PATCHBAY_SOCKET`).

use std::process::ExitCode;
use std::time::Duration;

use patchbay_sdk::{Client, Target, Tracer};

/// How many functions each refresh shows.
const TOP: usize = 10;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (pid, pattern, seconds) = match args.as_slice() {
        [pid, pattern] => (pid, pattern, None),
        [pid, pattern, seconds] => (pid, pattern, Some(seconds)),
        _ => return usage(),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return usage();
    };
    let seconds = match seconds.map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => return usage(),
    };
    match run(pid, pattern, seconds).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: live_counts PID PATTERN [SECONDS]");
    ExitCode::from(2)
}

async fn run(pid: u32, pattern: &str, seconds: Option<u64>) -> patchbay_sdk::Result<()> {
    let client = Client::connect_default().await?;
    let tracer = client
        .attach(Tracer::count(Target::pid(pid), pattern))
        .await?;
    if let Some(attached) = tracer.attach_response() {
        for result in &attached.results {
            if result.error.is_empty() {
                eprintln!(
                    "tracer {}: {} sites patched in pid {}",
                    tracer.id(),
                    result.sites_patched,
                    result.pid
                );
            } else {
                eprintln!(
                    "tracer {}: pid {}: {}",
                    tracer.id(),
                    result.pid,
                    result.error
                );
            }
        }
    }

    let stop = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    // The tracer persists until detached: print, and detach whatever happens below.
    let printed = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = refresh.tick() => {
                if let Err(err) = print_counts(&tracer).await {
                    break Err(err);
                }
            }
        }
    };
    let detached = tracer.detach().wait().await?;
    eprintln!(
        "detached: {} trampolines retired, all freed: {}",
        detached.retired.len(),
        detached.complete
    );
    printed
}

async fn print_counts(tracer: &Tracer) -> patchbay_sdk::Result<()> {
    let mut counts = tracer.counts().await?;
    counts
        .counts
        .sort_by(|a, b| b.count.cmp(&a.count).then(a.function.cmp(&b.function)));
    println!("--- {} calls", counts.total);
    for row in counts.counts.iter().take(TOP) {
        println!("{:>12} {}", row.count, row.function);
    }
    Ok(())
}
