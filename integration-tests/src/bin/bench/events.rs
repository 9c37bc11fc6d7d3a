//! Event throughput: a `trace` tracer (entry events, two argument registers) on
//! `add1`, a WatchEvents subscriber (the SDK's event stream) counting what arrives,
//! and the hot loop calling `add1` on one thread at its full rate (`loop 1 N`) or at a
//! paced rate (`pace N R`). Delivered rate = events received / (last arrival − start
//! of the loop); drops are what the agent reported for the tracer (cumulative, in the
//! batches).
//!
//! Grace periods under a flood (`events.gp.*`): Detach(wait) of a `count` tracer on
//! `add2` (patched, never called) while two threads call `add1` in a loop, without
//! and with a `trace` tracer on `add1` flooding events to a subscriber (issue 16: the
//! agent's events travel on their own stream, `Agent.Events`, so life-cycle reports
//! never wait behind them; target within 2x of idle).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sdk::{Target, Tracer};
use serde_json::json;

use crate::report::{Figure, Report, median};
use crate::{Plan, Programs, field, run_loop, server, traced};

#[derive(Default, Debug)]
struct Seen {
    events: u64,
    dropped: u64,
    last: Option<Instant>,
    bad: u64,
}

struct Run {
    offered_per_s: f64,
    delivered_per_s: f64,
    calls: u64,
    received: u64,
    dropped: u64,
}

async fn one(
    client: &patchbay_sdk::Client,
    t: &mut integration_tests::Target,
    pace: Option<(u64, u64)>,
    calls: u64,
) -> anyhow::Result<Run> {
    let pid = t.pid();
    let tracer = client
        .attach(Tracer::trace(Target::pid(pid), "add1").args(2))
        .await?;
    let r = tracer.attach_response().context("no attach answer")?;
    let patched: u32 = r.results.iter().map(|x| x.sites_patched).sum();
    if patched != 1 {
        bail!("trace add1: {patched} sites patched: {r:?}");
    }
    let mut stream = tracer.events().await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(b)) = stream.next_batch().await {
            let mut s = s2.lock().expect("not poisoned");
            s.events += b.events.len() as u64;
            s.bad += b
                .events
                .iter()
                .filter(|e| e.function != "add1" || e.args.len() != 2)
                .count() as u64;
            s.dropped = s.dropped.max(b.dropped);
            s.last = Some(Instant::now());
        }
    });
    let t0 = Instant::now();
    let (calls, loop_ns) = match pace {
        None => {
            let (ns, c) = run_loop(t, 1, calls).await?;
            (c, ns * c as f64)
        }
        Some((n, rate)) => {
            let a = t
                .cmd_within(&format!("pace {n} {rate}"), Duration::from_secs(120))
                .await;
            (field::<u64>(&a, "calls")?, field::<f64>(&a, "ns")?)
        }
    };
    // Wait until every call is accounted for (received or dropped), or nothing moved
    // for a second.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_total = (0, Instant::now());
    loop {
        let (total, last) = {
            let s = seen.lock().expect("not poisoned");
            (s.events + s.dropped, s.last)
        };
        if total >= calls || Instant::now() > deadline {
            break;
        }
        if total != last_total.0 {
            last_total = (total, Instant::now());
        } else if last_total.1.elapsed() > Duration::from_secs(1) && last.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracer.detach().wait().await?;
    reader.abort();
    let s = seen.lock().expect("not poisoned");
    if s.bad > 0 {
        bail!("{} events were not add1 with 2 arguments", s.bad);
    }
    let span = s.last.map_or(f64::NAN, |l| (l - t0).as_secs_f64());
    Ok(Run {
        offered_per_s: calls as f64 / (loop_ns / 1e9),
        delivered_per_s: s.events as f64 / span,
        calls,
        received: s.events,
        dropped: s.dropped,
    })
}

/// Detach(wait) times of `reps` attach/detach cycles of a count tracer on `add2`.
async fn detach_times(
    client: &patchbay_sdk::Client,
    pid: u32,
    reps: usize,
) -> anyhow::Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let mut times = Vec::with_capacity(reps);
    let mut phases = Vec::with_capacity(reps);
    for _ in 0..reps {
        let tracer = client
            .attach(Tracer::count(Target::pid(pid), "add2"))
            .timeout(Duration::from_secs(30))
            .await?;
        let t0 = Instant::now();
        let d = tracer
            .detach()
            .wait()
            .timeout(Duration::from_secs(30))
            .await?;
        times.push(crate::report::ms(t0.elapsed()));
        if !d.complete || d.retired.len() != 1 {
            bail!("detach not complete: {d:?}");
        }
        phases.push(crate::grace::timeline_phases(client, d.retired[0].trampoline_id).await?);
    }
    Ok((times, phases))
}

/// Grace-period latency with and without an event flood (`events.gp.idle`,
/// `events.gp.flood`).
async fn flood(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    let server = server(&[]);
    let client = server.client().await;
    let mut t = traced(&progs.nop5, &server, &client).await?;
    let pid = t.pid();
    let a = t.cmd_within("mix 2 0 0", Duration::from_secs(60)).await;
    if field::<u32>(&a, "threads")? != 2 {
        bail!("mix 2 0 0: {a}");
    }
    let reps = plan.gp_reps.max(5);
    let (idle, idle_phases) = detach_times(&client, pid, reps).await?;
    let tracer = client
        .attach(Tracer::trace(Target::pid(pid), "add1").args(2))
        .await?;
    let mut stream = tracer.events().await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(b)) = stream.next_batch().await {
            let mut s = s2.lock().expect("not poisoned");
            s.events += b.events.len() as u64;
            s.dropped = s.dropped.max(b.dropped);
        }
    });
    // Flooding once events arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("not poisoned").events == 0 {
        if Instant::now() > deadline {
            bail!("no event from the flood within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (flooded, flood_phases) = detach_times(&client, pid, reps).await?;
    tracer.detach().wait().await?;
    reader.abort();
    t.cmd_within("stop", Duration::from_secs(60)).await;
    t.quit().await;
    let (events, dropped) = {
        let s = seen.lock().expect("not poisoned");
        (s.events, s.dropped)
    };
    let mi = median(&idle).unwrap_or(f64::NAN);
    let mf = median(&flooded).unwrap_or(f64::NAN);
    report.push(
        Figure::new(
            "events.gp.idle",
            "events",
            "GP (detach wait), 2 busy threads, no events",
            "ms",
            idle.clone(),
        )
        .threads(2)
        .note(format!(
            "median: {}",
            crate::grace::median_index(&idle)
                .map_or(String::new(), |i| crate::grace::where_text(&idle_phases[i]))
        ))
        .detail(json!({ "phases_us": idle_phases })),
    );
    report.push(
        Figure::new(
            "events.gp.flood",
            "events",
            "GP (detach wait), 2 busy threads, trace flood",
            "ms",
            flooded.clone(),
        )
        .threads(2)
        .note(format!(
            "{events} events received, {dropped} dropped (counted); median: {}",
            crate::grace::median_index(&flooded)
                .map_or(String::new(), |i| crate::grace::where_text(&flood_phases[i]))
        ))
        .goal("< 2x idle", mf <= 2.0 * mi)
        .detail(json!({ "received": events, "dropped": dropped, "idle_median_ms": mi, "phases_us": flood_phases })),
    );
    Ok(())
}

pub async fn run(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    flood(plan, progs, report).await?;
    let server = server(&[]);
    let client = server.client().await;
    let mut t = traced(&progs.nop5, &server, &client).await?;
    let mut modes: Vec<Option<u64>> = vec![None];
    modes.extend(plan.event_rates.iter().map(|r| Some(*r)));
    for rate in modes {
        let mut runs = Vec::new();
        for _ in 0..plan.event_reps {
            let pace = rate.map(|r| ((r as f64 * plan.event_run.as_secs_f64()) as u64, r));
            runs.push(one(&client, &mut t, pace, plan.event_calls).await?);
        }
        let delivered: Vec<f64> = runs.iter().map(|r| r.delivered_per_s).collect();
        let offered =
            median(&runs.iter().map(|r| r.offered_per_s).collect::<Vec<_>>()).unwrap_or(f64::NAN);
        let drop_pct: Vec<f64> = runs
            .iter()
            .map(|r| 100.0 * r.dropped as f64 / r.calls as f64)
            .collect();
        let (id, label) = match rate {
            None => (
                "events.full".to_string(),
                "events delivered, hot loop at full rate".to_string(),
            ),
            Some(r) => (
                format!("events.paced.{r}"),
                format!("events delivered, paced at {r}/s"),
            ),
        };
        report.push(
            Figure::new(id, "events", label, "events/s", delivered)
                .threads(1)
                .note(format!(
                    "offered {offered:.3e}/s, {:.1}% dropped",
                    median(&drop_pct).unwrap_or(f64::NAN)
                ))
                .detail(json!({
                    "offered_per_s": offered,
                    "calls": runs.iter().map(|r| r.calls).collect::<Vec<_>>(),
                    "received": runs.iter().map(|r| r.received).collect::<Vec<_>>(),
                    "dropped": runs.iter().map(|r| r.dropped).collect::<Vec<_>>(),
                })),
        );
    }
    t.quit().await;
    Ok(())
}
