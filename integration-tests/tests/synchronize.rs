//! `Synchronize`: a grace period over every thread of every agent.

use std::time::Duration;

use integration_tests::agent::{LINE_TIMEOUT as T, field};
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::{ScriptAgent, TestServer, wait_for};
use tonic::Code;

async fn sync(c: &mut Control, timeout_ms: u32) -> Result<SynchronizeResponse, tonic::Status> {
    c.synchronize(SynchronizeRequest { timeout_ms })
        .await
        .map(|r| r.into_inner())
}

/// Waits until a Synchronize grace period of agent `agent_id` has exactly `expected`
/// holdouts.
async fn wait_sync_holdouts(c: &mut Control, agent_id: u64, expected: &[u32]) {
    let expected = expected.to_vec();
    wait_for(
        STATE_TIMEOUT,
        &format!("synchronize holdouts {expected:?} in agent {agent_id}"),
        || {
            let mut c = c.clone();
            let expected = expected.clone();
            async move {
                let gp = grace_periods(&mut c).await;
                let ok = gp.iter().any(|g| {
                    let mut h: Vec<u32> = g.holdouts.iter().map(|h| h.tid).collect();
                    h.sort_unstable();
                    g.agent_id == agent_id
                        && matches!(
                            g.purpose,
                            Some(grace_period_info::Purpose::SynchronizeId(_))
                        )
                        && h == expected
                });
                if ok { Ok(()) } else { Err(gp) }
            }
        },
    )
    .await
}

async fn two_agents(server: &TestServer) -> (ScriptAgent, u64, ScriptAgent, u64) {
    let (a, a_id) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "2"],
    )
    .await;
    let (b, b_id) = ScriptAgent::connect(
        server.socket_path(),
        &[
            "--functions",
            "foo",
            "--threads",
            "2",
            "--tid-base",
            "200001",
        ],
    )
    .await;
    (a, a_id, b, b_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_waits_for_every_thread_of_every_agent() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut a, a_id, mut b, b_id) = two_agents(&server).await;

    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { sync(&mut c2, 20_000).await });
    let la = a.expect_line("barrier ", T).await;
    let lb = b.expect_line("barrier ", T).await;
    assert_eq!(field(&la, "epoch"), Some("1"), "{la}");
    assert_eq!(field(&la, "tids"), Some("100001,100002"), "{la}");
    assert_eq!(field(&lb, "tids"), Some("200001,200002"), "{lb}");

    a.cmd("qs-all").await;
    wait_sync_holdouts(&mut c, b_id, &[200001, 200002]).await;
    // A stale report (epoch before the barrier) does not count.
    b.cmd("qs 200001 0").await;
    b.cmd("qs 200002").await;
    sync_point(&mut c, &mut b).await;
    wait_sync_holdouts(&mut c, b_id, &[200001]).await;
    assert!(
        !waiting.is_finished(),
        "Synchronize answered with holdouts left"
    );
    let _ = a_id;

    b.cmd("qs 200001").await;
    let r = tokio::time::timeout(T, waiting)
        .await
        .expect("Synchronize did not answer after every thread reported")
        .unwrap()
        .expect("Synchronize");
    assert_eq!((r.agents, r.threads), (2, 4), "{r:?}");
    wait_for(STATE_TIMEOUT, "no pending grace period", || {
        let mut c = c.clone();
        async move {
            let gp = grace_periods(&mut c).await;
            if gp.is_empty() { Ok(()) } else { Err(gp) }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_counts_exited_threads_as_quiescent() {
    let server = TestServer::start();
    let c = server.control().await;
    let (mut a, _, mut b, _) = two_agents(&server).await;
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { sync(&mut c2, 20_000).await });
    a.expect_line("barrier ", T).await;
    b.expect_line("barrier ", T).await;
    a.cmd("qs-all").await;
    b.cmd("qs 200001").await;
    b.cmd("exit 200002").await;
    let r = tokio::time::timeout(T, waiting)
        .await
        .expect("Synchronize did not answer")
        .unwrap()
        .expect("Synchronize");
    assert_eq!(r.agents, 2, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_deadline_names_the_holdouts() {
    let server = TestServer::start();
    let c = server.control().await;
    let (mut a, _, mut b, _) = two_agents(&server).await;
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { sync(&mut c2, 500).await });
    a.expect_line("barrier ", T).await;
    b.expect_line("barrier ", T).await;
    a.cmd("qs-all").await;
    b.cmd("qs 200001").await;
    let r = tokio::time::timeout(T, waiting)
        .await
        .expect("Synchronize did not time out")
        .unwrap();
    assert_status(r, Code::DeadlineExceeded, &["200002"]);
    // The abandoned grace period is dropped.
    wait_for(STATE_TIMEOUT, "no pending synchronize", || {
        let mut c = c.clone();
        async move {
            let gp = grace_periods(&mut c).await;
            if gp.is_empty() { Ok(()) } else { Err(gp) }
        }
    })
    .await;
    // Later reports for it are harmless and the next Synchronize works.
    b.cmd("qs 200002").await;
    let mut c3 = c.clone();
    let waiting = tokio::spawn(async move { sync(&mut c3, 20_000).await });
    a.expect_line("barrier ", T).await;
    b.expect_line("barrier ", T).await;
    a.cmd("qs-all").await;
    b.cmd("qs-all").await;
    let r = tokio::time::timeout(T, waiting)
        .await
        .expect("second Synchronize did not answer")
        .unwrap()
        .expect("second Synchronize");
    assert_eq!((r.agents, r.threads), (2, 4), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_without_agents_is_immediate() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let r = tokio::time::timeout(Duration::from_secs(5), sync(&mut c, 20_000))
        .await
        .expect("Synchronize with no agent must not wait")
        .expect("Synchronize");
    assert_eq!((r.agents, r.threads), (0, 0), "{r:?}");
}
