//! Grace-period latency: Detach(wait) of a `count` tracer on `add1` — the time from
//! the call to its answer, i.e. unpatch + grace period + free authorized — while the
//! hot loop program runs a mix of threads: a third busy calling `add1` (so they run
//! through the trampoline all the time), a third blocked in `poll()`, a third idle on
//! a condition variable (1 thread: one busy thread).
//!
//! "Expedited" is the server's default: when a grace period starts it sends agents
//! an `Expedite` message so they look at every thread at once (signal the running
//! ones). `patchbayd --no-expedite` does not send it; the agent still observes on its
//! own (at the Remove itself and on every 0.5 ms tick while a grace period is pending),
//! so the two differ only by that message. The Control API has no per-call choice.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sdk::{Target, Tracer};
use serde_json::json;

use crate::report::{Figure, Report, median, ms};
use crate::{Plan, Programs, field, server, traced};

/// An expedited grace period with 64 threads must complete within this (DESIGN.md).
pub const GP_GOAL_MS: f64 = 1.0;

/// (busy, blocked, idle) threads of a mix of `n`.
pub fn mix(n: u32) -> (u32, u32, u32) {
    if n == 1 {
        return (1, 0, 0);
    }
    let busy = n.div_ceil(3);
    let blocked = (n - busy) / 2;
    (busy, blocked, n - busy - blocked)
}

pub async fn run(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    for expedite in [true, false] {
        let server = server(if expedite { &[] } else { &["--no-expedite"] });
        let client = server.client().await;
        let mut t = traced(&progs.nop5, &server, &client).await?;
        let pid = t.pid();
        // Each size with a third of the threads busy, and (when there are more threads
        // than cores) with only as many busy threads as cores: a busy thread answers
        // the quiescent-state signal only once the scheduler runs it again.
        let mut mixes = Vec::new();
        for &n in &plan.gp_threads {
            mixes.push((n, mix(n), String::new()));
            if !plan.quick && n > 2 * plan.cores {
                let b = plan.cores;
                let k = (n - b) / 2;
                mixes.push((n, (b, k, n - b - k), format!(".busy{b}")));
            }
        }
        for (n, (b, k, i), suffix) in mixes {
            let a = t
                .cmd_within(&format!("mix {b} {k} {i}"), Duration::from_secs(60))
                .await;
            if field::<u32>(&a, "threads")? != n {
                bail!("mix {b} {k} {i}: {a}");
            }
            let (mut detach, mut attach, mut phases) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..plan.gp_reps {
                let t0 = Instant::now();
                let tracer = client
                    .attach(Tracer::count(Target::pid(pid), "add1"))
                    .timeout(Duration::from_secs(30))
                    .await?;
                attach.push(ms(t0.elapsed()));
                let r = tracer.attach_response().context("no attach answer")?;
                let patched: u32 = r.results.iter().map(|x| x.sites_patched).sum();
                if patched != 1 {
                    bail!("attach add1: {patched} sites patched: {r:?}");
                }
                // Let the busy threads run through the trampoline.
                let c = crate::percall::wait_count(&tracer, 1).await;
                if b > 0 && c == 0 {
                    bail!("no call of add1 counted with {b} busy threads");
                }
                let t1 = Instant::now();
                let d = tracer
                    .detach()
                    .wait()
                    .timeout(Duration::from_secs(30))
                    .await?;
                detach.push(ms(t1.elapsed()));
                if !d.complete || d.retired.len() != 1 {
                    bail!("detach not complete: {d:?}");
                }
                phases.push(timeline_phases(&client, d.retired[0].trampoline_id).await?);
            }
            let stopped = t.cmd_within("stop", Duration::from_secs(60)).await;
            let calls: u64 = field(&stopped, "calls")?;
            let m = median(&detach).unwrap_or(f64::NAN);
            // Where the median grace period's time went (its own timeline).
            let mid = median_index(&detach);
            let where_ = mid.map_or(String::new(), |i| where_text(&phases[i]));
            let kind = if expedite { "expedited" } else { "no-expedite" };
            let mut f = Figure::new(
                format!("grace.{kind}.t{n}{suffix}"),
                "grace",
                format!("GP {kind}, busy/blocked/idle {b}/{k}/{i}"),
                "ms",
                detach.clone(),
            )
            .threads(n)
            .note(format!(
                "p90 {:.2} ms; median: {where_}",
                crate::report::quantile(&detach, 0.9).unwrap_or(f64::NAN)
            ))
            .detail(json!({
                "busy": b, "blocked": k, "idle": i, "expedited": expedite,
                "busy_calls": calls, "attach_ms": attach,
                "phases_us": phases,
            }));
            if expedite && n == 64 {
                f = f.goal(format!("< {GP_GOAL_MS} ms"), m < GP_GOAL_MS);
            }
            report.push(f);
        }
        t.quit().await;
    }
    Ok(())
}

/// The index of the median of `xs` (the lower one of an even count).
pub fn median_index(xs: &[f64]) -> Option<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    idx.get((idx.len().saturating_sub(1)) / 2).copied()
}

/// The phases of trampoline `tramp`'s grace period in microseconds (`PHASES` order,
/// NaN when unknown), once the agent's steps arrived (they follow the free; bounded).
pub async fn timeline_phases(
    client: &patchbay_sdk::Client,
    tramp: u64,
) -> anyhow::Result<Vec<f64>> {
    use patchbay_sdk::timeline;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ts = client.grace_timelines(8).await?;
        if let Some(t) = ts.iter().find(|t| t.trampoline_id == tramp)
            && timeline::has_agent_steps(t)
        {
            return Ok(timeline::phases(t)
                .iter()
                .map(|p| p.ns.map_or(f64::NAN, |ns| ns as f64 / 1000.0))
                .collect());
        }
        if Instant::now() > deadline {
            bail!("no timeline with the agent's steps for trampoline {tramp} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `request to agent 12us, unpatch 80us, ...` for a table note.
pub fn where_text(phases_us: &[f64]) -> String {
    patchbay_sdk::timeline::PHASES
        .iter()
        .zip(phases_us)
        .map(|(n, us)| format!("{n} {us:.0}us"))
        .collect::<Vec<_>>()
        .join(", ")
}
