//! The agent's `Events` stream (issue 16) at the protocol level: this test process is
//! the agent (its own pid and uid, over the Unix socket). The stream belongs to the
//! session a `Welcome` named: opened without `EventsOpen`, for another or an ended
//! session, or twice, it ends with a precise status and changes nothing; it ends
//! (ABORTED) when its session ends.

use std::time::Duration;

use integration_tests::ops::agents;
use integration_tests::proto::agent_client::AgentClient;
use integration_tests::proto::*;
use integration_tests::{TestServer, uds_channel};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const T: Duration = Duration::from_secs(10);

fn start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let rest = &stat[stat.rfind(')').expect("stat has ')'") + 2..];
    rest.split_whitespace()
        .nth(22 - 3)
        .expect("field 22")
        .parse()
        .expect("start time is a number")
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "events_stream test".into(),
        pid: std::process::id(),
        start_time: start_time(),
        uid: nix::unistd::getuid().as_raw(),
        exe: std::env::current_exe()
            .expect("current exe")
            .display()
            .to_string(),
        tids: vec![nix::unistd::gettid().as_raw() as u32],
        epoch: 1,
        ..Default::default()
    }
}

/// An open `Session`: its sender (dropping it ends the session) and the welcome.
async fn session(server: &TestServer) -> (mpsc::Sender<AgentMessage>, Welcome) {
    let channel = uds_channel(server.socket_path()).await.expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(hello())),
    })
    .await
    .expect("queue hello");
    let mut inbound = AgentClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let first = tokio::time::timeout(T, inbound.next())
        .await
        .expect("a welcome in time");
    let Some(Ok(ServerMessage {
        body: Some(server_message::Body::Welcome(w)),
    })) = first
    else {
        panic!("no welcome: {first:?}");
    };
    // Keep reading so that the server's messages never back up.
    tokio::spawn(async move { while let Some(Ok(_)) = inbound.next().await {} });
    (tx, w)
}

/// Starts an `Events` stream whose first message is `first`: its sender and the call.
async fn events(
    server: &TestServer,
    first: events_message::Body,
) -> (
    mpsc::Sender<EventsMessage>,
    tokio::task::JoinHandle<Result<EventsEnd, tonic::Status>>,
) {
    let channel = uds_channel(server.socket_path()).await.expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(EventsMessage { body: Some(first) })
        .await
        .expect("queue the first message");
    let call = tokio::spawn(async move {
        AgentClient::new(channel)
            .events(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    (tx, call)
}

/// The status an `Events` stream ended with.
async fn ended(
    what: &str,
    call: tokio::task::JoinHandle<Result<EventsEnd, tonic::Status>>,
) -> tonic::Status {
    let r = tokio::time::timeout(T, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: the Events stream did not end within {T:?}"))
        .expect("the call task");
    r.expect_err("the Events stream must end with an error status")
}

fn assert_ended(s: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert!(s.message().contains(needle), "{needle:?} not in {s:?}");
}

fn open(w: &Welcome) -> events_message::Body {
    events_message::Body::Open(EventsOpen {
        agent_id: w.agent_id,
        session_id: w.session_id,
    })
}

/// An `Events` stream known to be attached to session `w`: two are opened for it, and
/// whichever the server takes second must end (ALREADY_EXISTS) while the other stays
/// open. Returns the open one.
async fn attached(
    server: &TestServer,
    w: &Welcome,
) -> (
    mpsc::Sender<EventsMessage>,
    tokio::task::JoinHandle<Result<EventsEnd, tonic::Status>>,
) {
    let (tx_a, mut call_a) = events(server, open(w)).await;
    let (tx_b, mut call_b) = events(server, open(w)).await;
    let (first_end, tx, call) = tokio::time::timeout(T, async {
        tokio::select! {
            r = &mut call_a => (r, tx_b, call_b),
            r = &mut call_b => (r, tx_a, call_a),
        }
    })
    .await
    .expect("one of two Events streams of one session ends");
    let status = first_end
        .expect("the call task")
        .expect_err("an error status");
    assert_ended(&status, Code::AlreadyExists, "has an Events stream already");
    assert!(!call.is_finished(), "the other stream stays open");
    (tx, call)
}

#[tokio::test]
async fn events_stream_belongs_to_its_session() {
    let server = TestServer::start();
    let (session_tx, w) = session(&server).await;
    assert_ne!(w.session_id, 0, "{w:?}");

    // Not opened with EventsOpen.
    let (_tx, call) = events(
        &server,
        events_message::Body::Events(EventBatch {
            tracer_id: 1,
            ..Default::default()
        }),
    )
    .await;
    assert_ended(
        &ended("no EventsOpen", call).await,
        Code::InvalidArgument,
        "EventsOpen",
    );

    // Another session of this agent, and an agent that does not exist.
    for (agent_id, session_id) in [
        (w.agent_id, w.session_id + 1),
        (w.agent_id + 7, w.session_id),
    ] {
        let (_tx, call) = events(
            &server,
            events_message::Body::Open(EventsOpen {
                agent_id,
                session_id,
            }),
        )
        .await;
        assert_ended(
            &ended("another session", call).await,
            Code::FailedPrecondition,
            &format!("session {session_id} of agent {agent_id} is not open"),
        );
    }

    let (events_tx, events_call) = attached(&server, &w).await;
    // EventsOpen again on the open stream is refused, and ends that stream.
    events_tx
        .send(EventsMessage {
            body: Some(open(&w)),
        })
        .await
        .expect("queue a second EventsOpen");
    assert_ended(
        &ended("EventsOpen twice", events_call).await,
        Code::InvalidArgument,
        "only there",
    );

    // A stream open when its session ends is ended with it (ABORTED).
    let (session_tx2, w2) = {
        drop(session_tx);
        let control = server.control().await;
        // The server saw the first session end once the agent shows disconnected.
        integration_tests::wait_until(T, "the first session ended", || {
            let mut c = control.clone();
            async move { agents(&mut c).await.iter().all(|a| !a.connected) }
        })
        .await;
        session(&server).await
    };
    assert_eq!(w2.agent_id, w.agent_id, "the same process resumes");
    assert_ne!(w2.session_id, w.session_id, "a new session id");
    // The ended session's id is refused now.
    let (_tx, call) = events(&server, open(&w)).await;
    assert_ended(
        &ended("ended session id", call).await,
        Code::FailedPrecondition,
        "is not open",
    );
    let (_events_tx2, call2) = attached(&server, &w2).await;
    drop(session_tx2);
    assert_ended(&ended("session ended", call2).await, Code::Aborted, "ended");
}
