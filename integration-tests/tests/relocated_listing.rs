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

/// The raw test client accepts answers as large as the SDK does: `ListFunctions '*'`
/// on a process with 24,000 functions of its own is more than tonic's 4 MiB default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_larger_than_4_mib_reaches_the_raw_client() {
    use integration_tests::fixtures;
    use prost::Message as _;
    const N: u32 = 24_000;
    let exe = fixtures::many_functions_program(N);
    let server = integration_tests::TestServer::start();
    let mut c = server.control().await;
    let mut t =
        integration_tests::target::Target::start_program(&exe, Some(server.socket_path()), &[])
            .await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    let r = c
        .list_functions(ListFunctionsRequest {
            pid,
            pattern: "*".into(),
            limit: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("ListFunctions '*' failed: {s:?}"))
        .into_inner();
    let size = r.encoded_len();
    assert!(
        size > 4 << 20,
        "{size} bytes: the test would not exceed 4 MiB"
    );
    assert_eq!(r.total as usize, r.functions.len());
    let own: Vec<&Function> = r
        .functions
        .iter()
        .filter(|f| {
            f.name
                .starts_with("patchbay_generated_function_with_a_long_name_")
        })
        .collect();
    assert_eq!(own.len(), N as usize);
    assert!(
        own.iter()
            .any(|f| f.name == fixtures::many_functions_name(N - 1))
    );
    for f in &own {
        assert_eq!(f.site_kind(), SiteKind::Relocated, "{f:?}");
    }
    quit_ok(&mut t).await;
}
