//! The torture workload and its checks.
//!
//! One *window* task loops over checked windows: pause the target (every call a worker
//! counted has returned), snapshot its per-worker per-function counters, attach a
//! `count`, a `trace` and a `torture.tally` tracer on random patterns, subscribe to the
//! trace's events, resume, let it run a random while, pause, snapshot again, and check
//! while paused that
//! * the count tracer counted exactly the calls each function received in between,
//! * trace events received + events reported dropped = those calls, and per (thread,
//!   function) no more events than calls (exactly as many when nothing was dropped),
//!   with the function's index in the first argument register,
//! * the tally callback ran exactly once per call per (thread, function) it covers and
//!   never anywhere else;
//!
//! then resume and detach the three (with or without waiting, at random), under load.
//! Meanwhile *noise* tasks attach and detach `count`, `trace`, `torture.spin` and
//! `torture.sleep` tracers on random overlapping patterns (so sites keep moving between
//! specialized count trampolines and list trampolines), detach with and without wait,
//! call Synchronize, and poll pending grace periods. A noise `count` tracer must never
//! count more calls than the workers made between just before its attach and just after
//! its last read (plus one call in flight per worker).
//!
//! A target that dies is a crash; the agent's poison marker on its stderr is a
//! premature free. At the end every tracer is detached with wait, a Synchronize runs,
//! and no trampoline may remain allocated, in the server's view or the agent's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use integration_tests::ops::{spec_pid, try_detach};
use integration_tests::proto::*;
use integration_tests::server::Control;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::build::function_name;
use crate::proc::TargetProc;

/// Deadline of an Attach, a Detach(wait) or a Synchronize (generous: the 2-core VM is
/// shared; a grace period that takes this long is a stall).
const GP_TIMEOUT: Duration = Duration::from_secs(60);
/// An operation slower than this gets the server's view printed.
const SLOW: Duration = Duration::from_secs(5);
/// Deadline for counts and events of a paused target to reach their exact values.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// What the agent writes to stderr when a thread executes freed trampoline memory
/// (`patchbay_agent::trap::POISON_MARKER`; this crate does not link the agent).
const POISON_MARKER: &str = "patchbay-agent: FATAL: premature free:";
/// At most this many error messages are kept (all are counted).
const KEEP_ERRORS: usize = 20;

/// What one run does.
#[derive(Clone, Debug)]
pub struct Config {
    pub threads: usize,
    pub functions: usize,
    pub duration: Duration,
    pub seed: u64,
    pub noise_tasks: usize,
    /// Also passed to patchbayd (`--fault-skip-grace-period`, test only).
    pub fault_skip_grace_period: bool,
}

mod noise;
mod report;
mod window;

use noise::noise_task;
pub use report::Report;
use window::{cb, window};

/// How many of the last functions are cold (called 64 times less often): the only
/// ones `trace` tracers cover. Events share the agent's stream with its trampoline
/// reports, so an event flood (millions per second from hot functions) would delay
/// every report and measure the server's event throughput instead of grace periods.
fn cold_count(functions: usize) -> usize {
    if functions < 2 {
        0
    } else {
        (functions / 10).clamp(1, functions - 1)
    }
}

/// xorshift64: the driver's own random numbers (seeded: a run's choices are repeatable
/// up to timing).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// A function pattern and the indexes of the functions it matches.
#[derive(Clone, Debug)]
struct Pattern {
    glob: String,
    set: Vec<usize>,
}

struct Shared {
    cfg: Config,
    names: Vec<String>,
    by_name: HashMap<String, usize>,
    pid: u32,
    /// Worker index of each kernel tid.
    worker_of: HashMap<u32, usize>,
    target: tokio::sync::Mutex<TargetProc>,
    target_closed: Arc<AtomicBool>,
    stop: AtomicBool,
    report: Mutex<Report>,
}

impl Shared {
    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, msg: String) {
        self.report().error(msg);
    }

    /// Whether tasks must stop (deadline, target gone, or a fatal error).
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.target_closed.load(Ordering::Acquire)
    }

    /// A random pattern over the cold functions only (for `trace` tracers).
    fn cold_pattern(&self, rng: &mut Rng) -> Pattern {
        let n = self.names.len();
        let first_cold = n - cold_count(n).max(1);
        for _ in 0..100 {
            let at = first_cold + rng.below((n - first_cold) as u64) as usize;
            let p = self.pattern_at(rng, at, true);
            if p.set.iter().all(|&f| f >= first_cold) {
                return p;
            }
        }
        Pattern {
            glob: self.names[n - 1].clone(),
            set: vec![n - 1],
        }
    }

    fn pattern(&self, rng: &mut Rng) -> Pattern {
        let i = rng.below(self.names.len() as u64) as usize;
        self.pattern_at(rng, i, false)
    }

    /// A random pattern matching function `i` (`small`: at most 10 functions).
    fn pattern_at(&self, rng: &mut Rng, i: usize, small: bool) -> Pattern {
        let n = self.names.len();
        let name = &self.names[i];
        let (stem, digits) = name.split_at(name.len() - 4);
        let kinds = if small { 2 } else { 6 };
        let glob = match rng.below(kinds) {
            0 => name.clone(),
            1 => format!("{stem}{}?", &digits[..3]),
            2 => format!("{stem}{}??", &digits[..2]),
            3 => format!("{stem}{}??{}", &digits[..1], &digits[3..]),
            4 => format!("{}*", &stem[..stem.len() - 1]),
            _ => format!("{stem}0[0-{}]*", rng.below(10)),
        };
        let p = glob::Pattern::new(&glob).expect("generated globs are valid");
        let set = (0..n).filter(|&k| p.matches(&self.names[k])).collect();
        Pattern { glob, set }
    }

    async fn cmd(&self, line: &str) -> anyhow::Result<String> {
        self.target.lock().await.cmd(line).await
    }

    /// `snapshot` -> (calls, tally), worker-major.
    async fn snapshot(&self) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        let s = self.cmd("snapshot").await?;
        let parse = |key: &str| -> anyhow::Result<Vec<u64>> {
            let v = integration_tests::target::field(&s, key)
                .ok_or_else(|| anyhow!("snapshot without {key}="))?;
            let v: Vec<u64> = v
                .split(',')
                .map(|x| x.parse::<u64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad {key}= in snapshot"))?;
            let want = self.cfg.threads * self.cfg.functions;
            if v.len() != want {
                bail!("snapshot {key}= has {} values, not {want}", v.len());
            }
            Ok(v)
        };
        Ok((parse("calls")?, parse("tally")?))
    }

    /// Calls per function (summed over workers) between two snapshots.
    fn per_function(&self, before: &[u64], after: &[u64]) -> Vec<u64> {
        let n = self.cfg.functions;
        let mut out = vec![0; n];
        for w in 0..self.cfg.threads {
            for f in 0..n {
                out[f] += after[w * n + f] - before[w * n + f];
            }
        }
        out
    }

    async fn attach(
        &self,
        c: &mut Control,
        pattern: &Pattern,
        cb: CallbackSpec,
    ) -> anyhow::Result<u64> {
        let mut spec = spec_pid(self.pid, &pattern.glob, CallbackKind::Count);
        spec.callback = Some(cb.clone());
        let mut probe = c.clone();
        let what = format!("attach {:?} {cb:?}", pattern.glob);
        let resp = self
            .watch_slow(&mut probe, &what, async {
                c.attach(AttachRequest {
                    spec: Some(spec),
                    timeout_ms: GP_TIMEOUT.as_millis() as u32,
                })
                .await
                .map(|r| r.into_inner())
            })
            .await
            .map_err(|s| anyhow!("{what}: {s:?}"))?;
        let id = resp.tracer.as_ref().map(|t| t.tracer_id).unwrap_or(0);
        let ok = match resp.results.as_slice() {
            [r] => {
                r.pid == self.pid
                    && r.error.is_empty()
                    && r.sites_patched as usize == pattern.set.len()
                    && r.sites_skipped == 0
            }
            _ => false,
        };
        self.report().attaches += 1;
        if id == 0 || !ok {
            bail!(
                "attach {:?} {cb:?} patched other sites than the {} expected: {resp:?}",
                pattern.glob,
                pattern.set.len()
            );
        }
        Ok(id)
    }

    async fn detach(&self, c: &mut Control, id: u64, wait: bool) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let mut probe = c.clone();
        let d = match self
            .watch_slow(&mut probe, &format!("detach {id} (wait {wait})"), async {
                try_detach(c, id, wait, GP_TIMEOUT.as_millis() as u32).await
            })
            .await
        {
            Ok(d) => d,
            Err(s) => {
                let gps = self.pending_gps(c).await;
                bail!("detach {id} (wait {wait}): {s:?}; pending grace periods: {gps}");
            }
        };
        let took = t0.elapsed();
        let mut r = self.report();
        if wait {
            r.detaches_wait += 1;
            r.worst_detach_wait = r.worst_detach_wait.max(took);
            if !d.complete {
                bail!("detach {id} with wait did not complete within {GP_TIMEOUT:?}: {d:?}");
            }
        } else {
            r.detaches_nowait += 1;
        }
        Ok(())
    }

    /// Awaits `fut`; when it takes longer than [`SLOW`], prints what the server shows
    /// of the target's trampolines and grace periods (once), then keeps waiting.
    async fn watch_slow<T>(
        &self,
        probe: &mut Control,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(fut);
        tokio::select! {
            v = &mut fut => return v,
            _ = tokio::time::sleep(SLOW) => {}
        }
        let tramps: Vec<String> = integration_tests::ops::trampolines(probe, false)
            .await
            .iter()
            .filter(|t| integration_tests::ops::state(t) != TrampolineState::Live)
            .map(|t| {
                format!(
                    "#{} {:?} {} ms holdouts {:?}",
                    t.trampoline_id,
                    integration_tests::ops::state(t),
                    t.state_age_ms,
                    t.holdouts
                )
            })
            .collect();
        let gps = self.pending_gps(probe).await;
        eprintln!(
            "torture: slow: {what} is taking more than {SLOW:?}; trampolines not live: {tramps:?}; pending grace periods: {gps}"
        );
        fut.await
    }

    /// Pending grace periods, described (for error messages).
    async fn pending_gps(&self, c: &mut Control) -> String {
        match c.grace_periods(GracePeriodsRequest::default()).await {
            Ok(r) => format!("{:?}", r.into_inner().pending),
            Err(s) => format!("<{s:?}>"),
        }
    }

    async fn synchronize(&self, c: &mut Control) -> anyhow::Result<()> {
        let t0 = Instant::now();
        if let Err(s) = c
            .synchronize(SynchronizeRequest {
                timeout_ms: GP_TIMEOUT.as_millis() as u32,
            })
            .await
        {
            let gps = self.pending_gps(c).await;
            bail!("synchronize: {s:?}; pending grace periods: {gps}");
        }
        let took = t0.elapsed();
        let mut r = self.report();
        r.synchronizes += 1;
        r.worst_synchronize = r.worst_synchronize.max(took);
        Ok(())
    }

    /// Counts of tracer `id` per function index.
    async fn counts(&self, c: &mut Control, id: u64) -> anyhow::Result<Vec<u64>> {
        let r = c
            .counts(CountsRequest { tracer_id: id })
            .await
            .map_err(|s| anyhow!("counts {id}: {s:?}"))?
            .into_inner();
        let mut out = vec![0; self.cfg.functions];
        for fc in r.counts {
            match self.by_name.get(&fc.function) {
                Some(&i) => out[i] += fc.count,
                None if fc.count == 0 => {}
                None => bail!(
                    "tracer {id} counted {} calls of {:?}, not a traced function",
                    fc.count,
                    fc.function
                ),
            }
        }
        Ok(out)
    }
}

/// Runs the torture against a server listening on `socket`, with the target `exe`.
pub async fn run(
    cfg: Config,
    exe: &std::path::Path,
    socket: &std::path::Path,
    workdir: &std::path::Path,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut c = integration_tests::control_client(socket).await?;
    let stderr_path = workdir.join("target.stderr");
    let cold = cold_count(cfg.functions);
    let target = TargetProc::start(exe, socket, cfg.threads, cfg.seed, cold, &stderr_path).await?;
    let pid = target.pid;
    println!(
        "torture: target pid {pid}, {} workers, {} functions, {:?}, seed {}{}",
        cfg.threads,
        cfg.functions,
        cfg.duration,
        cfg.seed,
        if cfg.fault_skip_grace_period {
            ", FAULT: no grace periods"
        } else {
            ""
        }
    );
    // Wait (bounded) for the agent to connect and announce its callbacks.
    let t0 = Instant::now();
    loop {
        let agents = integration_tests::ops::agents(&mut c).await;
        if agents.iter().any(|a| {
            a.pid == pid && a.connected && a.callbacks.iter().any(|n| n == "torture.tally")
        }) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the target's agent did not connect within 20 s: {agents:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let names: Vec<String> = (0..cfg.functions).map(function_name).collect();
    let by_name = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    let worker_of = target
        .tids
        .iter()
        .enumerate()
        .map(|(w, &t)| (t, w))
        .collect();
    let sh = Arc::new(Shared {
        names,
        by_name,
        pid,
        worker_of,
        target_closed: target.closed.clone(),
        target: tokio::sync::Mutex::new(target),
        stop: AtomicBool::new(false),
        report: Mutex::new(Report::default()),
        cfg: cfg.clone(),
    });

    let mut noise = Vec::new();
    for k in 0..cfg.noise_tasks {
        let c = c.clone();
        noise.push(tokio::spawn(noise_task(
            sh.clone(),
            c,
            cfg.seed.wrapping_add(1000 + k as u64),
        )));
    }
    let mut rng = Rng::new(cfg.seed);
    let deadline = started + cfg.duration;
    let mut last_progress = Instant::now();
    let mut fatal: Option<anyhow::Error> = None;
    while Instant::now() < deadline && !sh.stopping() {
        if let Err(e) = window(&sh, &mut c, &mut rng).await {
            fatal = Some(e);
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            if let Ok(s) = sh.cmd("stats").await {
                let r = sh.report();
                println!(
                    "torture: t={:.0}s cycles={} attaches={} detaches={} syncs={} errors={} | {s}",
                    started.elapsed().as_secs_f64(),
                    r.cycles,
                    r.attaches,
                    r.detaches_wait + r.detaches_nowait,
                    r.synchronizes,
                    r.errors
                );
            }
        }
    }
    sh.stop.store(true, Ordering::Release);
    for h in noise {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if fatal.is_none() {
                    fatal = Some(e);
                } else {
                    sh.error(format!("{e:#}"));
                }
            }
            Err(e) => sh.error(format!("noise task: {e}")),
        }
    }
    let closed = sh.target_closed.load(Ordering::Acquire);
    if let Some(e) = fatal
        && !closed
    {
        sh.error(format!("{e:#}"));
    }
    if !closed && let Err(e) = finish(&sh, &mut c).await {
        sh.error(format!("final checks: {e:#}"));
    }
    // The target's fate.
    let mut target = sh.target.lock().await;
    let status = if target.is_closed() {
        Some(target.wait_exit(Duration::from_secs(10)).await)
    } else {
        match target.quit().await {
            Ok(s) => Some(s),
            Err(e) => {
                sh.error(format!("quitting the target: {e:#}"));
                target.try_status()
            }
        }
    };
    let stderr = target.stderr();
    drop(target);
    let mut r = sh.report().clone();
    r.seconds = started.elapsed().as_secs_f64();
    let marked = stderr.lines().filter(|l| l.contains(POISON_MARKER)).count() as u64;
    r.premature_frees = r.premature_frees.max(marked);
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            r.crashes += 1;
            r.target_exit = s.to_string();
        }
        None => {
            r.crashes += 1;
            r.target_exit = "did not exit".into();
        }
    }
    if r.crashes > 0 || r.premature_frees > 0 {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        eprintln!("torture: target stderr (last lines):");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    Ok(r)
}

/// Detach everything, Synchronize, and check that nothing stays allocated.
async fn finish(sh: &Shared, c: &mut Control) -> anyhow::Result<()> {
    let tracers = integration_tests::ops::tracers(c).await;
    for t in &tracers {
        if t.state() == TracerState::Active {
            sh.error(format!(
                "tracer {} still attached after the run: {t:?}",
                t.tracer_id
            ));
            sh.detach(c, t.tracer_id, true).await?;
        }
    }
    // Tracers detached without waiting go away once their trampolines are freed.
    let t0 = Instant::now();
    loop {
        let left = integration_tests::ops::tracers(c).await;
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > GP_TIMEOUT {
            let gps = sh.pending_gps(c).await;
            bail!(
                "tracers still detaching {GP_TIMEOUT:?} after the run: {left:?}; pending grace periods: {gps}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sh.synchronize(c).await?;
    let left = integration_tests::ops::trampolines(c, false).await;
    let left_server = left
        .iter()
        .filter(|t| t.pid == sh.pid && integration_tests::ops::state(t) != TrampolineState::Freed)
        .count() as u64;
    let quiet = sh.cmd("qsquiet").await?;
    let stats = sh.cmd("stats").await?;
    let qs_field = |k: &str| -> anyhow::Result<u64> {
        integration_tests::target::field(&quiet, k)
            .ok_or_else(|| anyhow!("qsquiet without {k}="))?
            .parse()
            .with_context(|| format!("bad {k}= in {quiet:?}"))
    };
    let field = |k: &str| -> anyhow::Result<u64> {
        integration_tests::target::field(&stats, k)
            .ok_or_else(|| anyhow!("stats without {k}="))?
            .parse()
            .with_context(|| format!("bad {k}= in {stats:?}"))
    };
    let mut r = sh.report();
    r.leftover_trampolines_server = left_server;
    if left_server > 0 {
        r.error(format!("trampolines left in the server: {left:?}"));
    }
    r.trampolines_installed = field("installed")?;
    r.trampolines_freed = field("freed")?;
    r.slots_freed = field("slots_freed")?;
    r.leftover_trampolines_agent = r.trampolines_installed - r.trampolines_freed;
    r.leftover_slots_agent = field("slots_allocated")? - r.slots_freed;
    r.calls = field("calls")?;
    r.bad_args = field("bad_args")?;
    r.premature_frees += field("poison")?;
    r.program_signals = field("signals")?;
    r.signals_over_trampolines = field("signals_inside")?;
    if r.program_signals == 0 {
        r.error("the target's SIGUSR1 handler never ran".to_string());
    }
    r.program_qs_sent = qs_field("sent")?;
    r.program_qs_received = qs_field("received")?;
    if r.program_qs_sent == 0 {
        r.error("the target never raised SIGRTMIN+3".to_string());
    }
    let (qs_sent, qs_received) = (r.program_qs_sent, r.program_qs_received);
    if qs_received != qs_sent {
        r.error(format!(
            "the target's own SIGRTMIN+3 handler ran {qs_received} times for {qs_sent} raised (the agent's signals must never reach it, nor the program's get lost)"
        ));
    }
    r.finished = true;
    Ok(())
}
