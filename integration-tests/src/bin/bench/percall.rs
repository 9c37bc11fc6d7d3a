//! Per-call cost: the hot loop of `bench/hotloop.c` untraced (plain build), with the
//! agent loaded but nothing attached (nop5 build), with `count`, and with `trace`
//! recording two argument registers; 1 thread and one per core. Loops are timed in
//! the thread's CPU time. `trace` is measured twice: in bursts of [`BURST`] calls with
//! pauses the agent uses to drain the rings (every event kept: the real cost of an
//! entry event; compared with untraced calls in the same bursts), and in the hot loop
//! where the ring is full nearly all the time (mostly the cost of a counted drop).
//! Then the same `count` and `trace` on the plain build, whose `add1` has no
//! instrumentation: its prologue is relocated into the trampoline (issue 11); and the
//! cost of one `rdtsc` on this machine (the trace stub executes one per event).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::target::Target;
use patchbay_sdk::Tracer;
use serde_json::json;

use crate::report::{Figure, Report};
use crate::{BURST, BURST_GAP_US, Plan, Programs, run_burst, run_loop, server, traced};

/// Added ns per call allowed for `count` and for an entry event (DESIGN.md).
pub const COUNT_GOAL_NS: f64 = 2.0;
pub const TRACE_GOAL_NS: f64 = 15.0;
/// Added ns per call allowed for `count` on a relocated prologue (issue 11).
pub const RELOC_COUNT_GOAL_NS: f64 = 3.0;

async fn samples(t: &mut Target, threads: u32, n: u64, reps: usize) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        v.push(run_loop(t, threads, n).await?.0);
    }
    Ok(v)
}

async fn burst_samples(t: &mut Target, threads: u32, plan: &Plan) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::with_capacity(plan.burst_reps);
    for _ in 0..plan.burst_reps {
        v.push(run_burst(t, threads, plan.burst_calls).await?.0);
    }
    Ok(v)
}

/// Events dropped so far for `tracer`, once the agent flushed (every 100 ms).
async fn dropped(tracer: &Tracer) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    match tracer.info().await {
        Ok(info) => Ok(info.dropped),
        Err(patchbay_sdk::Error::NotFound(_)) => Ok(0),
        Err(err) => Err(err.into()),
    }
}

fn ratio_note(ns: f64, base: f64) -> String {
    format!("{:.2}x, {:+.2} ns", ns / base, ns - base)
}

/// Waits until the `count` tracer reached `expected` (10 s at most); returns the last
/// total seen.
pub async fn wait_count(tracer: &Tracer, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total = tracer.counts().await.map_or(0, |c| c.total);
        if total >= expected || Instant::now() > deadline {
            return total;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    let server = server(&[]);
    let client = server.client().await;
    let (n, reps) = (plan.calls, plan.reps);
    for threads in plan.thread_counts() {
        let mut t = Target::start_program(&progs.plain, None, &[]).await;
        let plain = samples(&mut t, threads, n, reps).await?;
        let plain_burst = burst_samples(&mut t, threads, plan).await?;
        t.quit().await;
        let burst_base = crate::report::median(&plain_burst).context("no sample")?;
        let base = crate::report::median(&plain).context("no sample")?;
        report.push(
            Figure::new(
                format!("percall.untraced.t{threads}"),
                "percall",
                "untraced call (plain -O2 build)",
                "ns/call",
                plain,
            )
            .threads(threads)
            .note("1.00x"),
        );
        report.push(
            Figure::new(
                format!("percall.untraced_bursts.t{threads}"),
                "percall",
                format!("untraced call, bursts of {BURST}"),
                "ns/call",
                plain_burst,
            )
            .threads(threads)
            .note("1.00x (baseline of bursts)"),
        );

        let mut t = traced(&progs.nop5, &server, &client).await?;
        let pid = t.pid();
        let v = samples(&mut t, threads, n, reps).await?;
        let m = crate::report::median(&v).context("no sample")?;
        report.push(
            Figure::new(
                format!("percall.not_attached.t{threads}"),
                "percall",
                "instrumented (nop5 + agent), not attached",
                "ns/call",
                v,
            )
            .threads(threads)
            .note(ratio_note(m, base))
            .goal("~0 ns added", m - base <= 0.5),
        );

        // count
        let tracer = client
            .attach(Tracer::count(patchbay_sdk::Target::pid(pid), "add1"))
            .await?;
        let r = tracer.attach_response().context("no attach answer")?;
        let patched: u32 = r.results.iter().map(|x| x.sites_patched).sum();
        if patched != 1 {
            bail!("count on add1 patched {patched} sites: {r:?}");
        }
        let v = samples(&mut t, threads, n, reps).await?;
        let expected = n * threads as u64 * reps as u64;
        let counted = wait_count(&tracer, expected).await;
        tracer.detach().wait().await?;
        let m = crate::report::median(&v).context("no sample")?;
        report.push(
            Figure::new(
                format!("percall.count.t{threads}"),
                "percall",
                "count",
                "ns/call",
                v,
            )
            .threads(threads)
            .note(ratio_note(m, base))
            .goal(
                format!("<= {COUNT_GOAL_NS} ns added"),
                m - base <= COUNT_GOAL_NS,
            )
            .detail(json!({"calls": expected, "counted": counted, "sites_patched": patched})),
        );

        // trace, two argument registers: first in bursts that fit the event ring (every
        // event kept: the real cost of an entry event), then the hot loop at full rate
        // (the ring is full almost all the time: mostly the cost of a counted drop).
        let tracer = client
            .attach(Tracer::trace(patchbay_sdk::Target::pid(pid), "add1").args(2))
            .await?;
        let r = tracer.attach_response().context("no attach answer")?;
        let patched: u32 = r.results.iter().map(|x| x.sites_patched).sum();
        if patched != 1 {
            bail!("trace on add1 patched {patched} sites: {r:?}");
        }
        let v = burst_samples(&mut t, threads, plan).await?;
        let burst_calls = plan.burst_calls * threads as u64 * plan.burst_reps as u64;
        let burst_dropped = dropped(&tracer).await?;
        let m = crate::report::median(&v).context("no sample")?;
        report.push(
            Figure::new(
                format!("percall.trace2.t{threads}"),
                "percall",
                format!("trace (entry event, 2 args), bursts of {BURST}"),
                "ns/call",
                v,
            )
            .threads(threads)
            .note(format!(
                "{}, {burst_dropped} dropped",
                ratio_note(m, burst_base)
            ))
            .goal(
                format!("<= {TRACE_GOAL_NS} ns added"),
                m - burst_base <= TRACE_GOAL_NS,
            )
            .detail(json!({
                "calls": burst_calls, "dropped": burst_dropped, "sites_patched": patched,
                "burst": BURST, "gap_us": BURST_GAP_US,
            })),
        );
        let v = samples(&mut t, threads, n, reps).await?;
        let expected = n * threads as u64 * reps as u64;
        let full_dropped = dropped(&tracer).await?.saturating_sub(burst_dropped);
        tracer.detach().wait().await?;
        let m = crate::report::median(&v).context("no sample")?;
        report.push(
            Figure::new(
                format!("percall.trace2_full.t{threads}"),
                "percall",
                "trace (2 args), hot loop: ring full",
                "ns/call",
                v,
            )
            .threads(threads)
            .note(format!(
                "{}, {:.1}% dropped",
                ratio_note(m, base),
                100.0 * full_dropped as f64 / expected as f64
            ))
            .detail(json!({"calls": expected, "dropped": full_dropped, "sites_patched": patched})),
        );
        t.quit().await;
        relocated(
            plan,
            progs,
            &server,
            &client,
            threads,
            (base, burst_base),
            report,
        )
        .await?;
    }
    let mut t = Target::start_program(&progs.plain, None, &[]).await;
    let answer = t
        .cmd_within(&format!("rdtsc {n}"), Duration::from_secs(300))
        .await;
    t.quit().await;
    report.push(Figure::new(
        "percall.rdtsc",
        "percall",
        "one rdtsc (the trace stub's timestamp)",
        "ns",
        vec![crate::field(&answer, "ns_per_call")?],
    ));
    Ok(())
}

/// `count` and `trace` (2 args, bursts) on the plain build's `add1`, whose prologue the
/// agent relocates into the trampoline; `bases` are the plain build's untraced figures
/// (hot loop, bursts) of this run. Skipped, with the agent's reason, where `add1` is
/// not patchable.
async fn relocated(
    plan: &Plan,
    progs: &Programs,
    server: &integration_tests::server::TestServer,
    client: &patchbay_sdk::Client,
    threads: u32,
    (base, burst_base): (f64, f64),
    report: &mut Report,
) -> anyhow::Result<()> {
    const COUNT: (&str, &str) = ("reloc_count", "relocated prologue (plain build): count");
    const TRACE: (&str, &str) = (
        "reloc_trace2",
        "relocated prologue (plain build): trace, 2 args, bursts",
    );
    let (n, reps) = (plan.calls, plan.reps);
    let mut t = traced(&progs.plain, server, client).await?;
    let pid = t.pid();
    let skip = |report: &mut Report, why: &str| {
        for (id, label) in [COUNT, TRACE] {
            report.push(
                Figure::skipped(
                    format!("percall.{id}.t{threads}"),
                    "percall",
                    label,
                    "ns/call",
                    why,
                )
                .threads(threads),
            );
        }
    };
    let tracer = match client
        .attach(Tracer::count(patchbay_sdk::Target::pid(pid), "add1"))
        .await
    {
        Ok(tracer) => tracer,
        Err(e) => {
            skip(
                report,
                &format!("add1 of the plain build is not patchable: {e}"),
            );
            t.quit().await;
            return Ok(());
        }
    };
    let r = tracer.attach_response().context("no attach answer")?;
    let patched: u32 = r.results.iter().map(|x| x.sites_patched).sum();
    if patched != 1 {
        let why = format!("count on add1 patched {patched} sites: {r:?}");
        tracer.detach().wait().await?;
        skip(report, &why);
        t.quit().await;
        return Ok(());
    }
    let v = samples(&mut t, threads, n, reps).await?;
    let expected = n * threads as u64 * reps as u64;
    let counted = wait_count(&tracer, expected).await;
    tracer.detach().wait().await?;
    let m = crate::report::median(&v).context("no sample")?;
    report.push(
        Figure::new(
            format!("percall.{}.t{threads}", COUNT.0),
            "percall",
            COUNT.1,
            "ns/call",
            v,
        )
        .threads(threads)
        .note(ratio_note(m, base))
        .goal(
            format!("<= {RELOC_COUNT_GOAL_NS} ns added"),
            m - base <= RELOC_COUNT_GOAL_NS,
        )
        .detail(json!({"calls": expected, "counted": counted, "sites_patched": patched})),
    );
    let tracer = client
        .attach(Tracer::trace(patchbay_sdk::Target::pid(pid), "add1").args(2))
        .await?;
    let v = burst_samples(&mut t, threads, plan).await?;
    let burst_calls = plan.burst_calls * threads as u64 * plan.burst_reps as u64;
    let burst_dropped = dropped(&tracer).await?;
    tracer.detach().wait().await?;
    let m = crate::report::median(&v).context("no sample")?;
    report.push(
        Figure::new(
            format!("percall.{}.t{threads}", TRACE.0),
            "percall",
            TRACE.1,
            "ns/call",
            v,
        )
        .threads(threads)
        .note(format!(
            "{}, {burst_dropped} dropped",
            ratio_note(m, burst_base)
        ))
        .goal(
            format!("<= {TRACE_GOAL_NS} ns added"),
            m - burst_base <= TRACE_GOAL_NS,
        )
        .detail(json!({"calls": burst_calls, "dropped": burst_dropped})),
    );
    t.quit().await;
    Ok(())
}
