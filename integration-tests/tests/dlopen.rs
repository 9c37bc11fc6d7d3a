//! Objects `dlopen`ed after the agent started: their functions are discovered (on the
//! next listing or attach, or by the agent's own tick), patched like the executable's,
//! counted exactly, and detached again (a `call *__fentry__@GOTPCREL` site in a shared
//! object); a tracer attached before the `dlopen` covers the new object.

use std::time::Duration;

use integration_tests::fixtures::{Build, shared_object};
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::target::*;
use integration_tests::{Target, TestServer};

#[tokio::test]
async fn functions_of_a_dlopened_object_are_found_and_traced_exactly() {
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
    let server = TestServer::start();
    let mut c = server.control().await;
    let lib = shared_object();
    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;

    // `*work` matches `work` now and `dl_work` once the object is loaded.
    let (id, resp) = attach(&mut c, spec_pid(pid, "*work", CallbackKind::Count)).await;
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
