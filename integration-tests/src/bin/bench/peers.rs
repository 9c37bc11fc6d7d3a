//! Peers on the same hot loop, in the same run: a bpftrace uprobe counting `add1`
//! (`@c = count()`, the closest thing to patchbay's `count`) and `uftrace record -P
//! add1` (only `add1` patched, library calls not traced; uftrace has no count-only mode,
//! so it records an entry and an exit event with timestamps per call), once on the same
//! nop5 build patchbay's instrumented figures use and once on the plain build (uftrace's
//! dynamic patcher relocating the prologue, the peer of patchbay's relocated sites).
//!
//! Missing tools are installed with apt-get when running as root (unless
//! `--no-install`); tracefs is mounted when needed. A peer that cannot run yields a
//! `skipped: <why>` figure. Peers are slow, so each run's call count is scaled from a
//! short calibration run to last about `plan.peer_run`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::target::Target;
use serde_json::json;

use crate::report::{Figure, Report, median};
use crate::{Args, Plan, Programs, run_loop};

/// (figure id, tool, label).
const PEERS: [(&str, &str, &str); 3] = [
    (
        "bpftrace",
        "bpftrace",
        "bpftrace uprobe count (plain build)",
    ),
    ("uftrace", "uftrace", "uftrace record -P add1 (nop5 build)"),
    (
        "uftrace_plain",
        "uftrace",
        "uftrace record -P add1 (plain build)",
    ),
];

/// The tools the peers need.
const TOOLS: [&str; 2] = ["bpftrace", "uftrace"];

fn id(peer: &str, threads: u32) -> String {
    format!("peers.{peer}.t{threads}")
}

/// Skipped figures for every peer.
pub fn skip(plan: &Plan, report: &mut Report, why: &str) {
    for threads in plan.thread_counts() {
        for (peer, _, label) in PEERS {
            report.push(
                Figure::skipped(id(peer, threads), "peers", label, "ns/call", why).threads(threads),
            );
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Finds bpftrace and uftrace, installing the missing ones when allowed. Returns,
/// per tool, its path or why it is unavailable.
fn ensure_tools(args: &Args) -> [Result<PathBuf, String>; 2] {
    let missing: Vec<&str> = TOOLS.into_iter().filter(|p| which(p).is_none()).collect();
    let mut install_error = None;
    if !missing.is_empty() {
        if args.no_install {
            install_error = Some("not installed (--no-install)".to_string());
        } else if !is_root() {
            install_error = Some(format!(
                "not installed, and not root to install it: apt-get install {}",
                missing.join(" ")
            ));
        } else {
            eprintln!("bench: apt-get install -y {}", missing.join(" "));
            let update = Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
            let install = Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
            match (update, install) {
                (_, Ok(o)) if o.status.success() => {}
                (_, Ok(o)) => {
                    install_error = Some(format!(
                        "apt-get install {} failed: {}",
                        missing.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                (_, Err(e)) => install_error = Some(format!("cannot run apt-get: {e}")),
            }
        }
    }
    TOOLS.map(|p| {
        which(p).ok_or_else(|| {
            install_error
                .clone()
                .unwrap_or_else(|| format!("{p} not found after installing it"))
        })
    })
}

/// Mounts tracefs on /sys/kernel/tracing when it is not there (uprobes need it).
fn ensure_tracefs() -> Result<(), String> {
    let t = Path::new("/sys/kernel/tracing");
    if t.join("uprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/uprobe_events").exists()
    {
        return Ok(());
    }
    if !is_root() {
        return Err("tracefs is not mounted and we are not root: mount -t tracefs nodev /sys/kernel/tracing".into());
    }
    let o = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !o.status.success() || !t.join("uprobe_events").exists() {
        return Err(format!(
            "mount -t tracefs nodev /sys/kernel/tracing failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

/// One peer session: `cmd` launches the hot loop under the peer. Returns the samples
/// (ns per call), the calls made, and the lines the launcher printed after the end.
async fn session(
    cmd: Command,
    plan: &Plan,
    threads: u32,
) -> anyhow::Result<(Vec<f64>, u64, u64, Vec<String>)> {
    let mut t = Target::spawn(cmd).await;
    // Calibrate: how many calls make one run of about plan.peer_run?
    let (ns, mut calls) = run_loop(&mut t, threads, 1000).await?;
    let n = ((plan.peer_run.as_nanos() as f64 / ns.max(1.0)) as u64).clamp(1000, 50_000_000);
    let mut v = Vec::new();
    for _ in 0..plan.peer_reps {
        let (ns, c) = run_loop(&mut t, threads, n).await?;
        v.push(ns);
        calls += c;
    }
    let status = t.quit().await;
    if !status.success() {
        anyhow::bail!("the launcher exited with {status}:\n{}", t.stderr());
    }
    let rest = t.remaining_lines(Duration::from_secs(10)).await;
    Ok((v, calls, n, rest))
}

pub async fn run(
    plan: &Plan,
    progs: &Programs,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let tools = ensure_tools(args);
    let tracefs = ensure_tracefs();
    for threads in plan.thread_counts() {
        let count = report.value(&format!("percall.count.t{threads}"));
        let untraced = report.value(&format!("percall.untraced.t{threads}"));
        for (peer, tool_name, label) in PEERS.iter() {
            let i = TOOLS
                .iter()
                .position(|t| t == tool_name)
                .expect("a known tool");
            let tool = match (&tools[i], &tracefs) {
                (Err(why), _) => {
                    report.push(
                        Figure::skipped(id(peer, threads), "peers", *label, "ns/call", why.clone())
                            .threads(threads),
                    );
                    continue;
                }
                (Ok(_), Err(why)) if *peer == "bpftrace" => {
                    report.push(
                        Figure::skipped(id(peer, threads), "peers", *label, "ns/call", why.clone())
                            .threads(threads),
                    );
                    continue;
                }
                (Ok(p), _) => p.clone(),
            };
            let data = progs.dir.join(format!("uftrace.data.{threads}"));
            let mut cmd = Command::new(&tool);
            if *peer == "bpftrace" {
                let exe = progs.plain.display().to_string();
                cmd.arg("-e")
                    .arg(format!("uprobe:{exe}:add1 {{ @c = count(); }}"))
                    .arg("-c")
                    .arg(&exe);
            } else {
                let exe = if *peer == "uftrace_plain" {
                    &progs.plain
                } else {
                    &progs.nop5
                };
                cmd.arg("record")
                    .arg("-d")
                    .arg(&data)
                    .args(["--no-libcall", "-P", "add1"])
                    .arg(exe);
            }
            let (samples, calls, n, rest) = match session(cmd, plan, threads).await {
                Ok(x) => x,
                Err(e) => {
                    report.push(
                        Figure::skipped(
                            id(peer, threads),
                            "peers",
                            *label,
                            "ns/call",
                            format!("{peer} failed: {e:#}"),
                        )
                        .threads(threads),
                    );
                    continue;
                }
            };
            // What the peer saw, to check it really traced every call.
            let seen: Option<u64> = if *peer == "bpftrace" {
                rest.iter()
                    .find_map(|l| l.strip_prefix("@c: "))
                    .and_then(|v| v.trim().parse().ok())
            } else {
                uftrace_calls(&tool, &data)
            };
            let _ = std::fs::remove_dir_all(&data);
            let m = median(&samples).unwrap_or(f64::NAN);
            let mut note = String::new();
            if let (Some(c), Some(u)) = (count, untraced) {
                note = format!("count/peer {:.5}", c / m);
                report.headlines.push(format!(
                    "headline ({threads} thread{}): patchbay count / {peer} = {:.2e} per call ({c:.2} vs {m:.1} ns/call: {peer} costs {:.0}x a counted call, {:.0}x the added cost)",
                    if threads == 1 { "" } else { "s" },
                    c / m,
                    m / c,
                    (m - u) / (c - u).max(0.01),
                ));
            }
            report.push(
                Figure::new(id(peer, threads), "peers", *label, "ns/call", samples)
                    .threads(threads)
                    .note(note)
                    .detail(json!({
                        "calls": calls,
                        "calls_per_run": n,
                        "peer_counted": seen,
                        "ratio_count_over_peer": count.map(|c| c / m),
                    })),
            );
        }
    }
    Ok(())
}

/// Calls of `add1` in a uftrace data directory, from `uftrace report`.
fn uftrace_calls(uftrace: &Path, data: &Path) -> Option<u64> {
    let o = Command::new(uftrace)
        .arg("report")
        .arg("-d")
        .arg(data)
        .args(["-s", "call", "--no-pager"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.last() == Some(&"add1") {
            w.get(w.len() - 2).and_then(|c| c.parse().ok())
        } else {
            None
        }
    })
}
