//! Noise tasks: overlapping attaches and detaches, syncs, and the bound a noise count must keep.

use super::*;

/// A noise tracer.
pub(super) struct Noise {
    id: u64,
    pattern: Pattern,
    /// For `count` tracers: calls snapshot just before the attach.
    before: Option<Vec<u64>>,
}

pub(super) async fn noise_task(sh: Arc<Shared>, mut c: Control, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let mut live: Vec<Noise> = Vec::new();
    const MAX: usize = 4;
    let mut step = 0u64;
    let result = async {
        while !sh.stopping() {
            step += 1;
            match rng.below(10) {
                0..=4 if live.len() < MAX => {
                    let kind = rng.below(4);
                    // Trace tracers on cold functions only (see `cold_count`).
                    let pattern = if kind == 1 {
                        sh.cold_pattern(&mut rng)
                    } else {
                        sh.pattern(&mut rng)
                    };
                    let (spec, before) = match kind {
                        0 => {
                            let (calls, _) = sh.snapshot().await?;
                            (cb(CallbackKind::Count, "", 0), Some(calls))
                        }
                        1 => (cb(CallbackKind::Trace, "", rng.below(7) as u32), None),
                        2 => (cb(CallbackKind::Custom, "torture.spin", 0), None),
                        _ => (cb(CallbackKind::Custom, "torture.sleep", 0), None),
                    };
                    let id = sh.attach(&mut c, &pattern, spec).await?;
                    live.push(Noise {
                        id,
                        pattern,
                        before,
                    });
                }
                0..=6 if !live.is_empty() => {
                    let k = rng.below(live.len() as u64) as usize;
                    let t = live.swap_remove(k);
                    check_bound(&sh, &mut c, &t).await?;
                    sh.detach(&mut c, t.id, rng.chance(2)).await?;
                }
                7 => sh.synchronize(&mut c).await?,
                8 => {
                    let gps = c
                        .grace_periods(GracePeriodsRequest::default())
                        .await
                        .map_err(|s| anyhow!("grace periods: {s:?}"))?
                        .into_inner();
                    let worst = gps.pending.iter().map(|g| g.waited_ms).max().unwrap_or(0);
                    let mut r = sh.report();
                    r.worst_pending_gp = r.worst_pending_gp.max(Duration::from_millis(worst));
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(rng.below(25))).await;
        }
        anyhow::Ok(())
    }
    .await;
    // Leave nothing attached (the final phase checks it), unless the target is gone.
    if !sh.target_closed.load(Ordering::Acquire) {
        for t in live.drain(..) {
            check_bound(&sh, &mut c, &t).await?;
            sh.detach(&mut c, t.id, true).await?;
        }
    }
    result.map(|_| {
        let _ = step;
    })
}

/// A noise `count` tracer never counts more calls than were made since just before its
/// attach (plus one call in flight per worker: a worker bumps its counter just before
/// calling).
pub(super) async fn check_bound(sh: &Shared, c: &mut Control, t: &Noise) -> anyhow::Result<()> {
    let Some(before) = &t.before else {
        return Ok(());
    };
    let counted = sh.counts(c, t.id).await?;
    let (after, _) = sh.snapshot().await?;
    let made = sh.per_function(before, &after);
    let counted_total: u64 = t.pattern.set.iter().map(|&f| counted[f]).sum();
    let outside: u64 = counted.iter().sum::<u64>() - counted_total;
    let made_total: u64 = t.pattern.set.iter().map(|&f| made[f]).sum();
    let mut r = sh.report();
    r.bound_checks += 1;
    if outside > 0 || counted_total > made_total + sh.cfg.threads as u64 {
        r.bound_violations += 1;
        r.error(format!(
            "noise count tracer {} on {:?} counted {counted_total} (+{outside} outside its functions), only {made_total} calls were made",
            t.id, t.pattern.glob
        ));
    }
    Ok(())
}
