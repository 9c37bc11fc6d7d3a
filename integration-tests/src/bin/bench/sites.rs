//! Attach and detach of many sites: a generated C program with `functions` small
//! functions `f00000 …` (nop5 build, like the agent's tests), a `count` tracer over 10,
//! 1,000 and 10,000 of them (patterns `f0000?`, `f00???`, `f0????`):
//! - attach: the Attach call until it answers, i.e. every trampoline is Live;
//! - detach: Detach(wait) until it answers, i.e. free authorized (grace period
//!   included), and until the server shows every retired trampoline Freed.
//!
//! The first attach in the process also discovers the functions (ELF parsing); it is
//! reported on its own ("cold") and left out of the medians.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sdk::proto::TrampolineState;
use patchbay_sdk::{Target, Tracer};
use serde_json::json;

use crate::percall::wait_count;
use crate::report::{Figure, Report, median, ms};
use crate::{Plan, Programs, field, server, traced};

/// 10,000 sites must be attached within this (DESIGN.md).
pub const ATTACH_GOAL_MS: f64 = 50.0;
/// 10,000 uninstrumented functions must be attached within this, end to end, decoding
/// and analysis included (DESIGN.md).
pub const PLAIN_ATTACH_GOAL_MS: f64 = 100.0;

/// C source of a program with `n` functions `f00000 …` (each returns its argument plus
/// its index) that speaks the fixtures' line protocol: `call` calls each function once
/// and prints `called n=<n> sum=<sum>`; `quit` exits.
pub fn generate(n: u32) -> String {
    let mut s = String::from(
        "#include <stdio.h>\n#include <string.h>\n#include <unistd.h>\n\
         #define NOIPA __attribute__((noinline, noipa))\n",
    );
    for i in 0..n {
        let _ = writeln!(
            s,
            "NOIPA unsigned long f{i:05}(unsigned long x) {{ __asm__ volatile(\"\" : : \"r\"(x)); return x + {i}; }}"
        );
    }
    s.push_str("static unsigned long (*const table[])(unsigned long) = {\n");
    for i in 0..n {
        let _ = writeln!(s, "  f{i:05},");
    }
    let _ = write!(
        s,
        r#"}};
int main(void) {{
  char line[64];
  printf("ready pid=%d\n", (int)getpid());
  fflush(stdout);
  while (fgets(line, sizeof line, stdin)) {{
    if (!strncmp(line, "call", 4)) {{
      unsigned long sum = 0;
      for (unsigned i = 0; i < {n}u; i++) sum += table[i](0);
      printf("called n=%u sum=%lu\n", {n}u, sum);
    }} else if (!strncmp(line, "quit", 4)) {{
      return 0;
    }} else {{
      printf("error unknown command\n");
    }}
    fflush(stdout);
  }}
  return 0;
}}
"#
    );
    s
}

fn pattern(size: u32) -> anyhow::Result<&'static str> {
    Ok(match size {
        10 => "f0000?",
        100 => "f000??",
        1000 => "f00???",
        10_000 => "f0????",
        _ => bail!("no pattern for {size} sites"),
    })
}

pub async fn run(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    let server = server(&[]);
    let client = server.client().await;
    let mut t = traced(&progs.sites, &server, &client).await?;
    let pid = t.pid();
    let mut cold = None;
    for &size in &plan.site_sizes {
        if size > plan.functions {
            bail!("{size} sites but only {} functions", plan.functions);
        }
        let pat = pattern(size)?;
        let (mut attach, mut authorized, mut freed) = (Vec::new(), Vec::new(), Vec::new());
        let mut counted = None;
        let mut patched = 0;
        // One more round than reps when this is the process's first attach.
        let rounds = plan.site_reps + usize::from(cold.is_none());
        for round in 0..rounds {
            let t0 = Instant::now();
            let tracer = client
                .attach(Tracer::count(Target::pid(pid), pat))
                .timeout(Duration::from_secs(60))
                .await?;
            let attached = t0.elapsed();
            let r = tracer.attach_response().context("no attach answer")?;
            patched = r.results.iter().map(|x| x.sites_patched).sum::<u32>();
            if patched != size || r.results.iter().any(|x| !x.error.is_empty()) {
                bail!("attach {pat}: {patched} of {size} sites patched: {r:?}");
            }
            if counted.is_none() {
                // Every site calls a live trampoline: one call each is counted.
                let a = t.cmd("call").await;
                let n: u64 = field(&a, "n")?;
                let c = wait_count(&tracer, size as u64).await;
                counted = Some(c);
                if n != plan.functions as u64 || c != size as u64 {
                    bail!("after `call` ({a}) tracer counted {c} calls of {size} traced functions");
                }
            }
            let t1 = Instant::now();
            let d = tracer
                .detach()
                .wait()
                .timeout(Duration::from_secs(60))
                .await?;
            let auth = t1.elapsed();
            if !d.complete {
                bail!("detach of {size} sites not complete: {d:?}");
            }
            let ids: Vec<u64> = d.retired.iter().map(|x| x.trampoline_id).collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ts = client.trampolines().pid(pid).include_freed().await?;
                let all_freed = ids.iter().all(|i| {
                    ts.iter()
                        .find(|x| x.trampoline_id == *i)
                        .is_none_or(|x| x.state() == TrampolineState::Freed)
                });
                if all_freed {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("trampolines {ids:?} not freed within 30 s: {ts:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let fr = t1.elapsed();
            if round == 0 && cold.is_none() {
                cold = Some((size, ms(attached), ms(auth), ms(fr)));
                continue;
            }
            attach.push(ms(attached));
            authorized.push(ms(auth));
            freed.push(ms(fr));
        }
        let detail = json!({
            "sites": size, "pattern": pat, "sites_patched": patched,
            "counted_after_one_call_each": counted,
        });
        let am = median(&attach).unwrap_or(f64::NAN);
        let mut f = Figure::new(
            format!("sites.attach.{size}"),
            "sites",
            format!("attach {size} sites (call -> all Live)"),
            "ms",
            attach,
        )
        .threads(size)
        .note(format!("{:.2} us/site", am * 1e3 / size as f64))
        .detail(detail.clone());
        if size == 10_000 {
            f = f.goal(format!("< {ATTACH_GOAL_MS} ms"), am < ATTACH_GOAL_MS);
        }
        report.push(f);
        report.push(
            Figure::new(
                format!("sites.detach_authorized.{size}"),
                "sites",
                format!("detach(wait) {size} sites -> free authorized"),
                "ms",
                authorized,
            )
            .threads(size)
            .detail(detail.clone()),
        );
        report.push(
            Figure::new(
                format!("sites.detach_freed.{size}"),
                "sites",
                format!("detach {size} sites -> Freed"),
                "ms",
                freed,
            )
            .threads(size)
            .detail(detail),
        );
    }
    if let Some((size, a, auth, fr)) = cold {
        report.push(
            Figure::new(
                "sites.cold_attach",
                "sites",
                format!("first attach in the process ({size} sites)"),
                "ms",
                vec![a],
            )
            .threads(size)
            .note(format!("incl. discovery of {} functions", plan.functions))
            .detail(json!({"detach_authorized_ms": auth, "detach_freed_ms": fr})),
        );
    }
    t.quit().await;
    Ok(())
}

/// One attach of a `count` tracer on `pat` in `pid` (checked: the `size` functions
/// patched or refused, no error) and its detach (wait): the attach time and the number
/// of sites patched (the plain build's `f00000`, `return x + 0`, is shorter than the
/// jump and refused).
async fn attach_detach(
    client: &patchbay_sdk::Client,
    pid: u32,
    pat: &str,
    size: u32,
) -> anyhow::Result<(f64, u32)> {
    let t0 = Instant::now();
    let tracer = client
        .attach(Tracer::count(Target::pid(pid), pat))
        .timeout(Duration::from_secs(60))
        .await?;
    let attached = t0.elapsed();
    let r = tracer.attach_response().context("no attach answer")?;
    let patched = r.results.iter().map(|x| x.sites_patched).sum::<u32>();
    let skipped = r.results.iter().map(|x| x.sites_skipped).sum::<u32>();
    if patched + skipped != size
        || patched * 100 < size * 99
        || r.results.iter().any(|x| !x.error.is_empty())
    {
        bail!("attach {pat}: {patched} of {size} sites patched: {r:?}");
    }
    let d = tracer
        .detach()
        .wait()
        .timeout(Duration::from_secs(60))
        .await?;
    if !d.complete {
        bail!("detach of {size} sites not complete: {d:?}");
    }
    Ok((ms(attached), patched))
}

/// The plain build of the generated program (every function a relocated prologue):
/// the first attach of the largest size in a fresh process (end to end: discovery of
/// every loaded object, decoding and analysis of its code, trampolines, the install's
/// grace period), each in a new process; then later attaches in one process (install
/// only). The difference is what discovery and analysis cost.
pub async fn run_plain(plan: &Plan, progs: &Programs, report: &mut Report) -> anyhow::Result<()> {
    let size = *plan.site_sizes.iter().max().context("no site sizes")?;
    let pat = pattern(size)?;
    let server = server(&[]);
    let client = server.client().await;
    let mut cold = Vec::new();
    for _ in 0..plan.site_reps {
        let mut t = traced(&progs.sites_plain, &server, &client).await?;
        cold.push(attach_detach(&client, t.pid(), pat, size).await?.0);
        t.quit().await;
    }
    let mut t = traced(&progs.sites_plain, &server, &client).await?;
    let pid = t.pid();
    let (_, patched) = attach_detach(&client, pid, pat, size).await?;
    let mut warm = Vec::new();
    for _ in 0..plan.site_reps {
        warm.push(attach_detach(&client, pid, pat, size).await?.0);
    }
    // Every site calls a live trampoline: one call each is counted exactly.
    let tracer = client
        .attach(Tracer::count(Target::pid(pid), pat))
        .timeout(Duration::from_secs(60))
        .await?;
    let a = t.cmd("call").await;
    let c = wait_count(&tracer, patched as u64).await;
    if c != patched as u64 {
        bail!(
            "plain build: after `call` ({a}) tracer counted {c} calls of {patched} traced functions"
        );
    }
    tracer
        .detach()
        .wait()
        .timeout(Duration::from_secs(60))
        .await?;
    t.quit().await;
    let cm = median(&cold).unwrap_or(f64::NAN);
    let wm = median(&warm).unwrap_or(f64::NAN);
    let detail = json!({
        "functions": size, "sites_patched": patched, "pattern": pat,
        "counted_after_one_call_each": c,
    });
    report.push(
        Figure::new(
            format!("sites.plain.cold_attach.{size}"),
            "sites",
            format!("plain -O2: first attach of {patched} relocated sites (fresh process)"),
            "ms",
            cold,
        )
        .threads(size)
        .note(format!(
            "end to end, discovery+analysis of every object included (~{:.1} ms of it)",
            cm - wm
        ))
        .goal(
            format!("< {PLAIN_ATTACH_GOAL_MS} ms"),
            cm < PLAIN_ATTACH_GOAL_MS,
        )
        .detail(detail.clone()),
    );
    report.push(
        Figure::new(
            format!("sites.plain.attach.{size}"),
            "sites",
            format!("plain -O2: attach {patched} relocated sites (discovered)"),
            "ms",
            warm,
        )
        .threads(size)
        .note(format!("{:.2} us/site", wm * 1e3 / size as f64))
        .detail(detail),
    );
    Ok(())
}
