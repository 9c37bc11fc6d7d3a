//! Objects `dlopen`ed after the agent started: their functions are discovered (on the
//! next listing or attach, or by the agent's own tick), patched like the executable's,
//! counted exactly, and detached again (a `call *__fentry__@GOTPCREL` site in a shared
//! object); a tracer attached before the `dlopen` covers the new object.

use std::time::Duration;

use integration_tests::fixtures::{Build, fixture, runpath_program, shared_object};
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::target::*;
use integration_tests::{Target, TestServer};

/// Tests of this file run one at a time: each starts a process whose first discovery
/// reads every loaded object, and three load hundreds of objects; run together on a
/// small machine they miss the attach deadline.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Matches the fixture's `work` and the shared object's `dl_work` (and, by its first
/// letters, none of libc's functions, which are patchable too: `*work` would also take
/// `inet_network`, `[dw]*rk` `wcspbrk`).
const WORK: &str = "[dw][lo]*rk";

#[tokio::test]
async fn functions_of_a_dlopened_object_are_found_and_traced_exactly() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start();
    let mut c = server.control().await;
    let lib = shared_object();
    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;

    // Not loaded yet: nothing to list, and attaching finds nothing.
    let before = functions(&mut c, pid, "dl_work").await;
    assert!(
        before.is_empty(),
        "dl_work listed before dlopen: {before:?}"
    );
    let r = try_attach(&mut c, spec_pid(pid, "dl_work", CallbackKind::Count)).await;
    assert!(r.is_err(), "attach before dlopen should fail: {r:?}");

    t.expect(&format!("dlopen {}", lib.display()), "dlopened")
        .await;
    let f = function(&mut c, pid, "dl_work").await;
    assert!(f.patchable, "{f:?}");
    // A shared object built with -pg -mfentry calls __fentry__ through the GOT.
    assert_eq!(f.site_kind(), SiteKind::FentryGot, "{f:?}");
    assert_eq!(
        std::fs::canonicalize(&f.object).ok(),
        std::fs::canonicalize(&lib).ok(),
        "{f:?}"
    );
    // Untraced, the neutralized site runs as before.
    t.expect("dlrun 1000", "dlran calls=1000").await;

    let (id, resp) = attach(&mut c, spec_pid(pid, "dl_work", CallbackKind::Count)).await;
    assert_eq!(resp.results.len(), 1, "{resp:?}");
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    t.expect("dlrun 25000", "dlran calls=25000").await;
    let r = wait_total(&c, id, 25_000).await;
    assert_eq!(
        r.counts
            .iter()
            .filter(|x| x.function == "dl_work")
            .map(|x| x.count)
            .sum::<u64>(),
        25_000,
        "{r:?}"
    );

    let d = try_detach(&mut c, id, true, Duration::from_secs(10).as_millis() as u32)
        .await
        .expect("detach(wait)");
    assert!(d.complete, "{d:?}");
    // Detached: nothing of the tracer is left and the site runs untraced.
    let left = trampolines_of(&mut c, pid, true).await;
    assert!(
        left.iter().all(|x| matches!(
            state(x),
            TrampolineState::FreeAuthorized | TrampolineState::Freed
        )),
        "trampolines still in use after detach: {left:?}"
    );
    t.expect("dlrun 1000", "dlran calls=1000").await;
    assert!(t.alive(), "the target died");
    assert!(t.quit().await.success());
}

/// A tracer attached before the object is loaded covers it once it is: the agent sees
/// the new object (its load counter changed), discovers it, says `FunctionsAdded`, and
/// the server attaches the tracers meant for the process again, which patches the new
/// sites the pattern matches. Counts of the new function are then exact.
#[tokio::test]
async fn a_tracer_attached_before_dlopen_covers_the_loaded_object() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start();
    let mut c = server.control().await;
    let lib = shared_object();
    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;

    // `[dw][lo]*rk` matches `work` now and `dl_work` once the object is loaded.
    let (id, resp) = attach(&mut c, spec_pid(pid, WORK, CallbackKind::Count)).await;
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    t.expect(&format!("dlopen {}", lib.display()), "dlopened")
        .await;
    let sites = integration_tests::wait_for(
        Duration::from_secs(10),
        "the tracer to reach dl_work",
        || {
            let mut c = c.clone();
            async move {
                let live: u32 = trampolines_of(&mut c, pid, false)
                    .await
                    .iter()
                    .filter(|x| x.tracer_ids.contains(&id))
                    .filter(|x| state(x) == TrampolineState::Live)
                    .map(|x| x.sites)
                    .sum();
                if live == 2 { Ok(live) } else { Err(live) }
            }
        },
    )
    .await;
    assert_eq!(sites, 2);
    t.expect("dlrun 5000", "dlran calls=5000").await;
    t.run(1, 300).await;
    let r = wait_total(&c, id, 5_300).await;
    let of = |f: &str| -> u64 {
        r.counts
            .iter()
            .filter(|x| x.function == f)
            .map(|x| x.count)
            .sum()
    };
    assert_eq!(of("dl_work"), 5_000, "{r:?}");
    assert_eq!(of("work"), 300, "{r:?}");
    let d = try_detach(&mut c, id, true, Duration::from_secs(10).as_millis() as u32)
        .await
        .expect("detach(wait)");
    assert!(d.complete, "{d:?}");
    assert!(t.quit().await.success());
}

/// `dlopen` is interposed: a tracer attached before covers a newly loaded object
/// *before* `dlopen` returns, so a program calling into it right away is counted from
/// the first call. The target loads `K` distinct copies of the object one after the
/// other (each a new load) and calls `dl_work` `N` times right after each `dlopen`;
/// the tracer's count equals the program's own. Prints the median `dlopen` time
/// without the agent, with the agent and a tracer that matches nothing in the new
/// objects, and with a count tracer that matches their `dl_work`.
#[tokio::test]
async fn a_dlopened_object_is_covered_before_dlopen_returns() {
    let _serial = SERIAL.lock().await;
    const K: usize = 300;
    const N: u64 = 20;
    let server = TestServer::start();
    let mut c = server.control().await;
    let lib = shared_object();
    let dir = tempfile::tempdir().expect("tempdir");
    let copies = |tag: &str| {
        for k in 0..K {
            std::fs::copy(&lib, dir.path().join(format!("{tag}{k}.so"))).expect("copy");
        }
        dir.path().join(tag).display().to_string()
    };
    let bare = copies("b");
    let untraced = copies("u");
    let traced = copies("t");
    let dlmany = |prefix: &str| format!("dlmany {prefix} {K} {N}");
    let median = |line: &str| -> f64 {
        let ns: f64 = field(line, "median_ns")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no median in {line}"));
        ns / 1e6
    };

    let mut plain = Target::start_program(&fixture(Build::Nop5), None, &[]).await;
    let without = plain.expect(&dlmany(&bare), "dlmany").await;
    assert!(plain.quit().await.success());

    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    // A tracer that matches nothing in the new objects: each dlopen is discovered,
    // announced and answered, nothing to install.
    let (other, _) = attach(&mut c, spec_pid(pid, "work", CallbackKind::Count)).await;
    let a = t
        .cmd_within(&dlmany(&untraced), Duration::from_secs(120))
        .await;
    // `[dw][lo]*rk` matches `work` now and every copy's `dl_work` once loaded.
    let (id, resp) = attach(&mut c, spec_pid(pid, WORK, CallbackKind::Count)).await;
    assert_eq!(resp.results[0].sites_patched, 1 + K as u32, "{resp:?}");
    let b = t
        .cmd_within(&dlmany(&traced), Duration::from_secs(120))
        .await;
    let expected = format!("dlmany loaded={K} calls={}", K as u64 * N);
    assert!(b.starts_with(&expected), "{b}");
    eprintln!(
        "dlopen median over {K} new objects: without the agent {:.3} ms; agent connected, \
         no matching tracer {:.3} ms; a count tracer matching the new object {:.3} ms",
        median(&without),
        median(&a),
        median(&b)
    );

    // Counted from the first call after each dlopen: exactly what the program made in
    // the copies loaded after the attach (the earlier ones were covered by the attach
    // and were not called since).
    let r = wait_total(&c, id, K as u64 * N).await;
    let dl: u64 = r
        .counts
        .iter()
        .filter(|x| x.function == "dl_work")
        .map(|x| x.count)
        .sum();
    assert_eq!(dl, K as u64 * N, "{r:?}");
    for tracer in [id, other] {
        let d = try_detach(
            &mut c,
            tracer,
            true,
            Duration::from_secs(20).as_millis() as u32,
        )
        .await
        .expect("detach(wait)");
        assert!(d.complete, "{d:?}");
    }
    assert!(t.quit().await.success());
}

/// What `fixtures/runpath/main.c`'s `load` prints when the loader sees the program (and
/// the plugin, for its own dlopens) as the caller.
const RUNPATH_LOAD: &str = "missing=null|libpb-nonexistent.so: cannot open shared object \
     file: No such file or directory;plugin=7 sibling=11 ctor=11 ns=0;newlm=7 \
     new_namespace=yes";

/// The interposed `dlopen`/`dlmopen` keep the program as the loader's caller: a program
/// that finds its plugin by bare name only through its own `DT_RUNPATH` (and a plugin
/// that finds its sibling through *its* `DT_RUNPATH`, from its constructor, a nested
/// dlopen, and later) loads exactly as without the agent, in the base namespace and
/// in a new one (`dlmopen(LM_ID_NEWLM)`); a failed `dlopen` leaves the same `dlerror()`
/// text.
#[tokio::test]
async fn dlopen_keeps_the_program_as_the_loaders_caller() {
    let _serial = SERIAL.lock().await;
    let exe = runpath_program();
    let mut plain = Target::start_program(&exe, None, &[]).await;
    let without = plain.cmd("load").await;
    assert!(plain.quit().await.success());
    assert_eq!(without, RUNPATH_LOAD, "without the agent");

    let server = TestServer::start();
    let c = server.control().await;
    let mut t = Target::start_program(&exe, Some(server.socket_path()), &[]).await;
    wait_agent(&c, t.pid()).await;
    let with = t.cmd("load").await;
    assert_eq!(with, without, "under the agent\n{}", t.stderr());
    assert!(t.quit().await.success());
}

/// `dlclose` is interposed: an object unloaded while a tracer covers it is never
/// written again (its sites leave the agent's trampolines and the server's plan,
/// `FunctionsRemoved`), and loaded again, at the same address or elsewhere, it is
/// covered again before `dlopen` returns. `K` cycles of dlopen → `N` calls → dlclose
/// with a count tracer attached before: no crash, the count equals the program's own,
/// and `detach --wait` completes.
#[tokio::test]
async fn dlclose_and_reopen_in_a_loop_under_a_tracer() {
    let _serial = SERIAL.lock().await;
    const K: u64 = 40;
    const N: u64 = 100;
    let server = TestServer::start();
    let mut c = server.control().await;
    let lib = shared_object();
    let dir = tempfile::tempdir().expect("tempdir");
    let spacer = dir.path().join("spacer.so");
    std::fs::copy(&lib, &spacer).expect("copy");
    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;

    let (id, resp) = attach(&mut c, spec_pid(pid, WORK, CallbackKind::Count)).await;
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    let b = t
        .cmd_within(
            &format!("dlcycle {} {} {K} {N}", lib.display(), spacer.display()),
            Duration::from_secs(120),
        )
        .await;
    let expected = format!("dlcycled loaded={K} calls={}", K * N);
    assert!(b.starts_with(&expected), "{b}");
    assert_eq!(field(&b, "unloaded"), Some(K.to_string().as_str()), "{b}");
    assert_ne!(field(&b, "moved"), Some("0"), "never mapped elsewhere: {b}");
    // The spacer's `dl_work` is matched too, but never called.
    let r = wait_total(&c, id, K * N).await;
    let dl: u64 = r
        .counts
        .iter()
        .filter(|x| x.function == "dl_work")
        .map(|x| x.count)
        .sum();
    assert_eq!(dl, K * N, "{r:?}");
    t.run(1, 300).await;
    wait_total(&c, id, K * N + 300).await;
    let d = try_detach(&mut c, id, true, Duration::from_secs(20).as_millis() as u32)
        .await
        .expect("detach(wait)");
    assert!(d.complete, "{d:?}");
    let left = trampolines_of(&mut c, pid, true).await;
    assert!(
        left.iter().all(|x| matches!(
            state(x),
            TrampolineState::FreeAuthorized | TrampolineState::Freed
        )),
        "trampolines still in use after detach: {left:?}"
    );
    assert!(t.alive(), "the target died");
    assert!(t.quit().await.success());
}
