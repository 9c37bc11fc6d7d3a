//! Counts and trace events flow from agents to clients.

use integration_tests::agent::LINE_TIMEOUT as T;
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::{ScriptAgent, TestServer, wait_for};
use tonic::Code;

async fn counts(c: &mut Control, tracer_id: u64) -> Result<CountsResponse, tonic::Status> {
    c.counts(CountsRequest { tracer_id })
        .await
        .map(|r| r.into_inner())
}

fn by_fn(r: &CountsResponse) -> Vec<(String, u64, u32)> {
    let mut v: Vec<_> = r
        .counts
        .iter()
        .filter(|c| c.count > 0)
        .map(|c| (c.function.clone(), c.count, c.agents))
        .collect();
    v.sort();
    v
}

async fn wait_counts(c: &mut Control, tracer: u64, want: Vec<(&str, u64, u32)>, total: u64) {
    let want: Vec<(String, u64, u32)> = want
        .into_iter()
        .map(|(f, n, a)| (f.to_string(), n, a))
        .collect();
    wait_for(STATE_TIMEOUT, &format!("counts {want:?}"), || {
        let mut c = c.clone();
        let want = want.clone();
        async move {
            let r = counts(&mut c, tracer).await.expect("Counts");
            if by_fn(&r) == want && r.total == total {
                Ok(())
            } else {
                Err(r)
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_cumulative_per_agent_and_summed_over_agents() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut a, _) = ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let (mut b, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo,bar", "--tid-base", "200001"],
    )
    .await;
    let (tracer, _) = attach(&mut c, spec_all("*", CallbackKind::Count)).await;
    a.expect_line("install ", T).await;
    b.expect_line("install ", T).await;

    a.cmd(&format!("counts {tracer} foo 5")).await;
    a.cmd(&format!("counts {tracer} bar 7")).await;
    wait_counts(&mut c, tracer, vec![("bar", 7, 1), ("foo", 5, 1)], 12).await;
    // Reports are cumulative: a new report replaces the agent's previous one.
    a.cmd(&format!("counts {tracer} foo 9")).await;
    wait_counts(&mut c, tracer, vec![("bar", 7, 1), ("foo", 9, 1)], 16).await;
    b.cmd(&format!("counts {tracer} foo 1")).await;
    wait_counts(&mut c, tracer, vec![("bar", 7, 1), ("foo", 10, 2)], 17).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_decoded_and_streamed() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut a, a_id) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let mut tspec = spec_pid(a.pid(), "foo", CallbackKind::Trace);
    tspec.callback.as_mut().unwrap().arg_count = 2;
    let (tracer, _) = attach(&mut c, tspec).await;
    a.expect_line("install ", T).await;

    let mut stream = c
        .watch_events(WatchEventsRequest { tracer_id: tracer })
        .await
        .expect("WatchEvents")
        .into_inner();
    // The server subscribed before answering WatchEvents: the first batch is seen.
    a.cmd(&format!("events {tracer} 3 0")).await;
    let batch = tokio::time::timeout(T, stream.message())
        .await
        .expect("first batch")
        .expect("event stream")
        .expect("stream ended");
    assert_eq!(
        (batch.agent_id, batch.pid, batch.tracer_id, batch.dropped),
        (a_id, a.pid(), tracer, 0),
        "{batch:?}"
    );
    assert_eq!(batch.events.len(), 3, "{batch:?}");
    for (i, e) in batch.events.iter().enumerate() {
        let i = i as u64;
        assert_eq!(e.timestamp_ns, 1_000_000 + i, "{batch:?}");
        assert_eq!(
            (e.tid, e.address, e.function.as_str()),
            (100001, 0x1000, "foo")
        );
        let want: Vec<u64> = (0..i % 3).map(|k| i * 16 + k).collect();
        assert_eq!(e.args, want, "{batch:?}");
    }

    a.cmd(&format!("events {tracer} 2 5")).await;
    let batch = tokio::time::timeout(T, stream.message())
        .await
        .expect("second batch")
        .expect("event stream")
        .expect("stream ended");
    assert_eq!((batch.events.len(), batch.dropped), (2, 5), "{batch:?}");
    wait_for(STATE_TIMEOUT, "tracer shows 5 dropped events", || {
        let mut c = c.clone();
        async move {
            let t = tracers(&mut c).await;
            if t.iter().any(|t| t.tracer_id == tracer && t.dropped == 5) {
                Ok(())
            } else {
                Err(t)
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_counts_of_unknown_tracer_are_not_found() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let r = c
        .watch_events(WatchEventsRequest { tracer_id: 4242 })
        .await
        .map(|_| ());
    assert_status(r, Code::NotFound, &["4242"]);
    assert_status(counts(&mut c, 4242).await, Code::NotFound, &["4242"]);
}
