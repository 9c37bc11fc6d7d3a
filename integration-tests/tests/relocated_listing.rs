//! The functions listing of a traced process for uninstrumented code (issue 11): the
//! libraries' functions come with how they would be patched — relocated — or the
//! precise refusal, and the agent's own shared object is listed as never traced (and
//! not analyzed).

use integration_tests::fixtures::Build;
use integration_tests::proto::*;
use integration_tests::target::*;

#[tokio::test]
async fn libraries_are_listed_relocated_or_refused_precisely() {
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    // (The whole listing of a process with the agent exceeds a gRPC message: patterns.)
    let all = functions(&mut c, pid, "[a-m]*").await;
    let of = |needle: &str| -> Vec<&Function> {
        all.iter().filter(|f| f.object.contains(needle)).collect()
    };

    // libc: built without instrumentation; most of it is relocated, the rest refused
    // with a reason that says why.
    let libc = of("libc.so");
    assert!(libc.len() > 500, "{}", libc.len());
    let relocated = libc
        .iter()
        .filter(|f| f.site_kind() == SiteKind::Relocated)
        .count();
    assert!(
        relocated * 10 > libc.len() * 8,
        "{relocated} of {}",
        libc.len()
    );
    for f in &libc {
        if f.site_kind() == SiteKind::Relocated {
            assert!(f.patchable && f.reason.is_empty(), "{f:?}");
        } else {
            assert!(!f.patchable, "{f:?}");
            assert!(
                f.reason.starts_with("cannot relocate the prologue: ")
                    || f.reason.contains("GNU indirect function")
                    || f.reason.contains("does not start like a function entry"),
                "{f:?}"
            );
        }
    }
    // (named `_IO_fflush`, its alias `fflush` matches)
    let fflush = functions(&mut c, pid, "fflush").await;
    assert_eq!(fflush.len(), 1, "{fflush:?}");
    assert_eq!(fflush[0].site_kind(), SiteKind::Relocated, "{fflush:?}");

    // The fixture's own functions keep their instrumented sites.
    let work = function(&mut c, pid, Build::Nop5.work()).await;
    assert_eq!(work.site_kind(), SiteKind::Nop5, "{work:?}");

    // The agent's shared object: listed, never traced, not analyzed.
    let agent = of("libpatchbay_agent.so");
    assert!(agent.len() > 100, "{}", agent.len());
    for f in &agent {
        assert_eq!(f.site_kind(), SiteKind::Unspecified, "{f:?}");
        assert_eq!(f.reason, "the agent's own code is never traced", "{f:?}");
    }
    quit_ok(&mut t).await;
}
