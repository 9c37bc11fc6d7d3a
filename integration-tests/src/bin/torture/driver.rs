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

/// Figures of one run.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seconds: f64,
    pub cycles: u64,
    pub attaches: u64,
    pub detaches_wait: u64,
    pub detaches_nowait: u64,
    pub synchronizes: u64,
    pub trampolines_installed: u64,
    pub trampolines_freed: u64,
    pub slots_freed: u64,
    pub premature_frees: u64,
    pub crashes: u64,
    pub target_exit: String,
    pub leftover_trampolines_server: u64,
    pub leftover_trampolines_agent: u64,
    pub leftover_slots_agent: u64,
    pub count_checks: u64,
    pub count_calls_checked: u64,
    pub count_mismatches: u64,
    pub trace_checks: u64,
    pub events_checked: u64,
    pub events_dropped: u64,
    pub trace_mismatches: u64,
    pub tally_checks: u64,
    pub tally_calls_checked: u64,
    pub tally_mismatches: u64,
    pub bound_checks: u64,
    pub bound_violations: u64,
    pub worst_detach_wait: Duration,
    pub worst_synchronize: Duration,
    pub worst_pending_gp: Duration,
    pub calls: u64,
    pub bad_args: u64,
    /// Program signal handler runs in the target, and those that interrupted
    /// trampoline code or a dispatch (the agent's `sigwrap` counter).
    pub program_signals: u64,
    pub signals_over_trampolines: u64,
    pub errors: u64,
    pub error_messages: Vec<String>,
    /// The final checks ran (the target survived to the end).
    pub finished: bool,
}

impl Report {
    fn error(&mut self, msg: String) {
        eprintln!("torture: ERROR: {msg}");
        self.errors += 1;
        if self.error_messages.len() < KEEP_ERRORS {
            self.error_messages.push(msg);
        }
    }

    /// Grace periods completed: one per freed trampoline, one per Synchronize.
    pub fn grace_periods(&self) -> u64 {
        self.trampolines_freed + self.synchronizes
    }

    /// The failed assertions of a clean run (empty: it passed).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut zero = |what: &str, v: u64| {
            if v != 0 {
                f.push(format!("{what} = {v}, expected 0"));
            }
        };
        zero("premature frees detected", self.premature_frees);
        zero("crashes", self.crashes);
        zero("count mismatches", self.count_mismatches);
        zero("trace mismatches", self.trace_mismatches);
        zero("tally mismatches", self.tally_mismatches);
        zero("count bound violations", self.bound_violations);
        zero("bad callback arguments", self.bad_args);
        zero("errors", self.errors);
        zero(
            "trampolines allocated at the end (server)",
            self.leftover_trampolines_server,
        );
        zero(
            "trampolines allocated at the end (agent)",
            self.leftover_trampolines_agent,
        );
        zero(
            "trampoline slots allocated at the end (agent)",
            self.leftover_slots_agent,
        );
        if !self.finished {
            f.push("the final checks did not run".into());
        }
        let mut min = |what: &str, v: u64| {
            if v == 0 {
                f.push(format!("{what} = 0: the run checked nothing"));
            }
        };
        min("cycles", self.cycles);
        min("trampolines freed", self.trampolines_freed);
        min("count checks", self.count_checks);
        min("trace checks", self.trace_checks);
        min("tally checks", self.tally_checks);
        f
    }

    pub fn print(&self) {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!("torture results ({:.1} s):", self.seconds);
        println!("  cycles (checked windows)        {}", self.cycles);
        println!(
            "  attaches / detaches (wait, nowait) / synchronizes  {} / {} ({} + {}) / {}",
            self.attaches,
            self.detaches_wait + self.detaches_nowait,
            self.detaches_wait,
            self.detaches_nowait,
            self.synchronizes
        );
        println!(
            "  grace periods                   {} ({} trampolines freed + {} synchronizes)",
            self.grace_periods(),
            self.trampolines_freed,
            self.synchronizes
        );
        println!(
            "  trampolines installed / freed   {} / {} ({} arena slots freed)",
            self.trampolines_installed, self.trampolines_freed, self.slots_freed
        );
        println!("  premature frees detected        {}", self.premature_frees);
        println!(
            "  crashes                         {}{}",
            self.crashes,
            if self.target_exit.is_empty() {
                String::new()
            } else {
                format!(" (target {})", self.target_exit)
            }
        );
        println!(
            "  allocated after the end         {} trampolines (server), {} trampolines / {} slots (agent)",
            self.leftover_trampolines_server,
            self.leftover_trampolines_agent,
            self.leftover_slots_agent
        );
        println!(
            "  count checks                    {} exact ({} calls), {} mismatches",
            self.count_checks, self.count_calls_checked, self.count_mismatches
        );
        println!(
            "  trace checks                    {} exact ({} events, {} dropped), {} mismatches",
            self.trace_checks, self.events_checked, self.events_dropped, self.trace_mismatches
        );
        println!(
            "  tally callback checks           {} exact ({} calls), {} mismatches",
            self.tally_checks, self.tally_calls_checked, self.tally_mismatches
        );
        println!(
            "  noise count bound checks        {}, {} violations",
            self.bound_checks, self.bound_violations
        );
        println!(
            "  worst grace-period latency      detach(wait) {}, synchronize {}, pending seen {}",
            ms(self.worst_detach_wait),
            ms(self.worst_synchronize),
            ms(self.worst_pending_gp)
        );
        println!("  traced-function calls made      {}", self.calls);
        println!(
            "  program signal handlers run     {} ({} over trampoline code or a dispatch)",
            self.program_signals, self.signals_over_trampolines
        );
        println!("  errors                          {}", self.errors);
        for m in &self.error_messages {
            println!("    - {m}");
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "seconds": self.seconds,
            "cycles": self.cycles,
            "attaches": self.attaches,
            "detaches_wait": self.detaches_wait,
            "detaches_nowait": self.detaches_nowait,
            "synchronizes": self.synchronizes,
            "grace_periods": self.grace_periods(),
            "trampolines_installed": self.trampolines_installed,
            "trampolines_freed": self.trampolines_freed,
            "slots_freed": self.slots_freed,
            "premature_frees": self.premature_frees,
            "crashes": self.crashes,
            "target_exit": self.target_exit,
            "leftover_trampolines_server": self.leftover_trampolines_server,
            "leftover_trampolines_agent": self.leftover_trampolines_agent,
            "leftover_slots_agent": self.leftover_slots_agent,
            "count_checks": self.count_checks,
            "count_calls_checked": self.count_calls_checked,
            "count_mismatches": self.count_mismatches,
            "trace_checks": self.trace_checks,
            "events_checked": self.events_checked,
            "events_dropped": self.events_dropped,
            "trace_mismatches": self.trace_mismatches,
            "tally_checks": self.tally_checks,
            "tally_calls_checked": self.tally_calls_checked,
            "tally_mismatches": self.tally_mismatches,
            "bound_checks": self.bound_checks,
            "bound_violations": self.bound_violations,
            "worst_detach_wait_us": self.worst_detach_wait.as_micros() as u64,
            "worst_synchronize_us": self.worst_synchronize.as_micros() as u64,
            "worst_pending_gp_ms": self.worst_pending_gp.as_millis() as u64,
            "calls": self.calls,
            "bad_args": self.bad_args,
            "program_signals": self.program_signals,
            "signals_over_trampolines": self.signals_over_trampolines,
            "errors": self.errors,
            "error_messages": self.error_messages,
            "finished": self.finished,
            "failures": self.failures(),
        })
    }
}

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
        match c.grace_periods(GracePeriodsRequest {}).await {
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

/// Events of one trace tracer, accumulated by a watcher task.
#[derive(Default, Debug)]
struct TraceAcc {
    /// (worker, function) -> events.
    per: HashMap<(usize, usize), u64>,
    total: u64,
    dropped: u64,
    bad: Vec<String>,
}

fn spawn_watcher(
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

fn cb(kind: CallbackKind, custom: &str, args: u32) -> CallbackSpec {
    CallbackSpec {
        kind: kind as i32,
        custom_name: custom.into(),
        arg_count: args,
    }
}

/// One checked window. Errors are fatal for the run (protocol or RPC failures);
/// mismatches are counted in the report and the run goes on.
async fn window(sh: &Arc<Shared>, c: &mut Control, rng: &mut Rng) -> anyhow::Result<()> {
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

/// A noise tracer.
struct Noise {
    id: u64,
    pattern: Pattern,
    /// For `count` tracers: calls snapshot just before the attach.
    before: Option<Vec<u64>>,
}

async fn noise_task(sh: Arc<Shared>, mut c: Control, seed: u64) -> anyhow::Result<()> {
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
                        .grace_periods(GracePeriodsRequest {})
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
async fn check_bound(sh: &Shared, c: &mut Control, t: &Noise) -> anyhow::Result<()> {
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
    let stats = sh.cmd("stats").await?;
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
    r.finished = true;
    Ok(())
}
