//! The checked windows: attach, run, pause and check counts, events and callback calls exactly.

use super::*;

/// Events of one trace tracer, accumulated by a watcher task.
#[derive(Default, Debug)]
pub(super) struct TraceAcc {
    /// (worker, function) -> events.
    per: HashMap<(usize, usize), u64>,
    total: u64,
    dropped: u64,
    bad: Vec<String>,
}

pub(super) fn spawn_watcher(
    sh: Arc<Shared>,
    mut stream: tonic::Streaming<EventBatchView>,
    arg_count: u32,
    acc: Arc<Mutex<TraceAcc>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(batch) = stream.next().await {
            let Ok(batch) = batch else { break };
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.dropped = a.dropped.max(batch.dropped);
            for e in batch.events {
                a.total += 1;
                let f = sh.by_name.get(&e.function).copied();
                let w = sh.worker_of.get(&e.tid).copied();
                match (w, f) {
                    (Some(w), Some(f)) => {
                        *a.per.entry((w, f)).or_insert(0) += 1;
                        let args_ok = e.args.len() == arg_count as usize
                            && (arg_count == 0 || e.args[0] == f as u64);
                        if !args_ok && a.bad.len() < 5 {
                            let msg = format!(
                                "event of {} has args {:?}, expected {arg_count} starting with {f}",
                                e.function, e.args
                            );
                            a.bad.push(msg);
                        }
                    }
                    _ => {
                        if a.bad.len() < 5 {
                            let msg = format!(
                                "event from tid {} of {:?} (not a worker / traced function)",
                                e.tid, e.function
                            );
                            a.bad.push(msg);
                        }
                    }
                }
            }
        }
    })
}

pub(super) fn cb(kind: CallbackKind, custom: &str, args: u32) -> CallbackSpec {
    CallbackSpec {
        kind: kind as i32,
        custom_name: custom.into(),
        arg_count: args,
    }
}

/// One checked window. Errors are fatal for the run (protocol or RPC failures);
/// mismatches are counted in the report and the run goes on.
pub(super) async fn window(sh: &Arc<Shared>, c: &mut Control, rng: &mut Rng) -> anyhow::Result<()> {
    let n = sh.cfg.functions;
    let threads = sh.cfg.threads;
    sh.cmd("pause").await?;
    let (calls0, tally0) = sh.snapshot().await?;
    let pc = sh.pattern(rng);
    let pt = sh.cold_pattern(rng);
    let px = sh.pattern(rng);
    let nargs = rng.below(7) as u32;
    let count_id = sh.attach(c, &pc, cb(CallbackKind::Count, "", 0)).await?;
    let trace_id = sh
        .attach(c, &pt, cb(CallbackKind::Trace, "", nargs))
        .await?;
    let tally_id = sh
        .attach(c, &px, cb(CallbackKind::Custom, "torture.tally", 0))
        .await?;
    // Subscribed while the target is paused: no event of this tracer exists yet.
    let stream = c
        .watch_events(WatchEventsRequest {
            tracer_id: trace_id,
        })
        .await
        .map_err(|s| anyhow!("watch {trace_id}: {s:?}"))?
        .into_inner();
    let acc = Arc::new(Mutex::new(TraceAcc::default()));
    let watcher = spawn_watcher(sh.clone(), stream, nargs, acc.clone());
    sh.cmd("resume").await?;
    tokio::time::sleep(Duration::from_millis(200 + rng.below(1300))).await;
    sh.cmd("pause").await?;
    let (calls1, tally1) = sh.snapshot().await?;
    let per_fn = sh.per_function(&calls0, &calls1);

    // Count: exact per function, nothing elsewhere.
    let expect: Vec<u64> = (0..n)
        .map(|f| if pc.set.contains(&f) { per_fn[f] } else { 0 })
        .collect();
    let want: u64 = expect.iter().sum();
    let t0 = Instant::now();
    let got = loop {
        let got = sh.counts(c, count_id).await?;
        let total: u64 = got.iter().sum();
        if got == expect || total > want || t0.elapsed() > SETTLE_TIMEOUT {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    {
        let mut r = sh.report();
        r.count_checks += 1;
        if got == expect {
            r.count_calls_checked += want;
        } else {
            r.count_mismatches += 1;
            let diff: Vec<String> = (0..n)
                .filter(|&f| got[f] != expect[f])
                .take(5)
                .map(|f| format!("{}: counted {} made {}", sh.names[f], got[f], expect[f]))
                .collect();
            r.error(format!(
                "count tracer {count_id} on {:?}: total {} != {want} calls: {}",
                pc.glob,
                got.iter().sum::<u64>(),
                diff.join("; ")
            ));
        }
    }

    // Trace: events + dropped == calls; per (worker, function) bounded, exact if no drop.
    let twant: u64 = pt.set.iter().map(|&f| per_fn[f]).sum();
    let t0 = Instant::now();
    loop {
        let (total, dropped) = {
            let a = acc.lock().unwrap_or_else(|e| e.into_inner());
            (a.total, a.dropped)
        };
        if total + dropped >= twant || t0.elapsed() > SETTLE_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems: Vec<String> = a.bad.clone();
        if a.total + a.dropped != twant {
            problems.push(format!(
                "{} events + {} dropped != {twant} calls",
                a.total, a.dropped
            ));
        }
        for w in 0..threads {
            for f in 0..n {
                let made = calls1[w * n + f] - calls0[w * n + f];
                let made = if pt.set.contains(&f) { made } else { 0 };
                let seen = a.per.get(&(w, f)).copied().unwrap_or(0);
                if (seen > made || (a.dropped == 0 && seen != made)) && problems.len() < 8 {
                    problems.push(format!(
                        "worker {w} {}: {seen} events for {made} calls",
                        sh.names[f]
                    ));
                }
            }
        }
        let mut r = sh.report();
        r.trace_checks += 1;
        if problems.is_empty() {
            r.events_checked += a.total;
            r.events_dropped += a.dropped;
        } else {
            r.trace_mismatches += 1;
            r.error(format!(
                "trace tracer {trace_id} on {:?} ({nargs} args): {}",
                pt.glob,
                problems.join("; ")
            ));
        }
    }
    watcher.abort();

    // Tally: exactly once per call where attached, never elsewhere.
    {
        let mut problems = Vec::new();
        let mut checked = 0;
        for w in 0..threads {
            for f in 0..n {
                let k = w * n + f;
                let made = calls1[k] - calls0[k];
                let ran = tally1[k] - tally0[k];
                let want = if px.set.contains(&f) { made } else { 0 };
                checked += want;
                if ran != want && problems.len() < 5 {
                    problems.push(format!(
                        "worker {w} {}: callback ran {ran} times for {want} calls",
                        sh.names[f]
                    ));
                }
            }
        }
        let mut r = sh.report();
        r.tally_checks += 1;
        if problems.is_empty() {
            r.tally_calls_checked += checked;
        } else {
            r.tally_mismatches += 1;
            r.error(format!(
                "tally tracer {tally_id} on {:?}: {}",
                px.glob,
                problems.join("; ")
            ));
        }
    }

    // Detach under load, in a random order, with or without waiting.
    sh.cmd("resume").await?;
    let mut ids = vec![count_id, trace_id, tally_id];
    let first = rng.below(3) as usize;
    ids.swap(0, first);
    for id in ids {
        let wait = rng.chance(2);
        sh.detach(c, id, wait).await?;
    }
    if rng.chance(3) {
        sh.synchronize(c).await?;
    }
    sh.report().cycles += 1;
    Ok(())
}
