//! Objects `dlopen`ed after the agent started: their functions are discovered on the
//! next listing or attach, patched like the executable's, counted exactly, and
//! detached again (a `call *__fentry__@GOTPCREL` site in a shared object).

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
    assert_eq!(f.site_kind(), SiteKind::Fentry, "{f:?}");
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
