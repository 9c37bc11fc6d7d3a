//! The client against a scripted Control server: transports, metadata, every rpc, and the
//! mapping of statuses to `Error` variants.

mod common;

use std::time::Duration;

use common::{Fake, serve_tcp, serve_unix};
use patchbay_sdk::proto::{CallbackKind, TrampolineState, target};
use patchbay_sdk::{Client, Error, ServerTarget, Target, Tracer, TracerId};
use tokio_stream::StreamExt;

#[tokio::test]
async fn unix_socket_every_rpc() {
    let server = serve_unix(Fake::default()).await;
    let path = server.socket.to_str().unwrap();
    let client = Client::connect(path).await.unwrap();
    assert_eq!(client.target().to_string(), path);

    let agents = client.agents().await.unwrap();
    assert_eq!(agents[0].pid, 4242);
    let seen = server.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.protocol.as_deref(), Some("1"));
    assert_eq!(seen.authorization, None);

    let functions = client
        .functions(4242)
        .pattern("work*")
        .limit(5)
        .await
        .unwrap();
    assert_eq!(functions.functions[0].name, "match:work*");
    assert_eq!(functions.total, 15);

    let spec = Tracer::trace(Target::pid(4242), "work*").args(2).name("t");
    let tracer = client
        .attach(spec.clone())
        .timeout(Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(tracer.id(), TracerId::new(1));
    let attached = tracer.attach_response().unwrap();
    assert_eq!(
        attached.tracer.as_ref().unwrap().spec.as_ref().unwrap(),
        spec.as_proto()
    );
    assert_eq!(
        attached.results[0].sites_patched, 1500,
        "timeout_ms reaches the server"
    );
    // The client deadline leaves the server room to answer first (1.5 s + 5 s).
    assert_eq!(
        server.fake.seen.lock().unwrap().grpc_timeout.as_deref(),
        Some("6500000u")
    );
    let again = client.attach(spec).await.unwrap();
    assert_eq!(
        again.attach_response().unwrap().results[0].sites_patched,
        0,
        "no timeout: server default"
    );

    let counts = tracer.counts().await.unwrap();
    assert_eq!(counts.total, 111);
    assert_eq!(tracer.info().await.unwrap().tracer_id, 1);

    let mut events = tracer.events().await.unwrap();
    let first = events.next_batch().await.unwrap().unwrap();
    assert_eq!(first.events[0].function, "work");
    let second = events.next().await.unwrap().unwrap();
    assert_eq!(second.dropped, 3);
    assert!(events.next().await.is_none());

    let detached = tracer.detach().wait().await.unwrap();
    assert!(detached.complete);
    assert_eq!(detached.retired[0].trampoline_id, 7);
    let detached = again.detach().await.unwrap();
    assert!(!detached.complete, "no wait by default");

    let tracers = client.tracers().await.unwrap();
    let tspec = tracers[0].spec.as_ref().unwrap();
    assert_eq!(tspec.callback.as_ref().unwrap().kind(), CallbackKind::Count);
    assert_eq!(
        tspec.target.as_ref().unwrap().target,
        Some(target::Target::Pid(4242))
    );

    let trampolines = client.trampolines().pid(4242).await.unwrap();
    assert_eq!(trampolines.len(), 1);
    assert_eq!(trampolines[0].pid, 4242);
    assert_eq!(trampolines[0].state(), TrampolineState::Live);
    let all = client.trampolines().include_freed().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].pid, 0);

    let pending = client.grace_periods().await.unwrap();
    assert_eq!(
        pending[0].holdouts[0].stall.as_ref().unwrap().symbol,
        "trampoline #7"
    );

    let sync = client
        .synchronize()
        .timeout(Duration::from_millis(250))
        .await
        .unwrap();
    assert_eq!(sync.elapsed_us, 250);
}

#[tokio::test]
async fn unix_prefix_and_clones_share_the_connection() {
    let server = serve_unix(Fake::default()).await;
    let target = format!("unix:{}", server.socket.display());
    let client = Client::connect(&target).await.unwrap();
    let clone = client.clone();
    let (a, b) = tokio::join!(client.agents(), clone.tracers());
    assert_eq!(a.unwrap().len(), 1);
    assert_eq!(b.unwrap().len(), 1);
}

#[tokio::test]
async fn statuses_become_typed_errors() {
    let server = serve_unix(Fake::default()).await;
    let client = Client::connect(server.socket.to_str().unwrap())
        .await
        .unwrap();

    let err = client.functions(1).pattern("*").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.starts_with("no agent in pid 1:")),
        "{err:?}"
    );
    let err = client.functions(4242).pattern("foo[").await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let missing = client.tracer(TracerId::new(99));
    let err = missing.info().await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m == "no tracer 99"),
        "{err:?}"
    );
    let err = missing.events().await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = missing.detach().await.unwrap_err();
    assert_eq!(err.to_string(), "no tracer 99");
    let err = client
        .tracer(TracerId::new(1))
        .detach()
        .wait()
        .timeout(Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err:?}");
    let err = client
        .synchronize()
        .timeout(Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tid 43"), "{err}");
}

#[tokio::test]
async fn tcp_with_token() {
    let fake = Fake {
        token: Some("s3cret".into()),
        ..Fake::default()
    };
    let seen = fake.seen.clone();
    let addr = serve_tcp(fake).await;

    let client = Client::connect_with_token(&addr, "s3cret").await.unwrap();
    assert!(client.target().is_tcp());
    client.agents().await.unwrap();
    assert_eq!(
        seen.lock().unwrap().authorization.as_deref(),
        Some("Bearer s3cret")
    );

    let anonymous = Client::connect(&addr).await.unwrap();
    let err = anonymous.agents().await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    let wrong = Client::connect_with_token(&addr, "nope").await.unwrap();
    assert!(matches!(
        wrong.tracer(TracerId::new(1)).counts().await,
        Err(Error::Unauthenticated(_))
    ));
}

#[tokio::test]
async fn missing_server_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let err = Client::connect(socket.to_str().unwrap()).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach patchbayd at {}: is it running? start it with `patchbayd`",
            socket.display()
        )
    );
    assert!(std::error::Error::source(&err).is_some());

    // A closed TCP port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = Client::connect(&addr).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach patchbayd at {addr}:")),
        "{err}"
    );
}

#[tokio::test]
async fn builder_connects_to_a_parsed_target_with_a_token() {
    let fake = Fake {
        token: Some("s3cret".into()),
        ..Fake::default()
    };
    let seen = fake.seen.clone();
    let addr = serve_tcp(fake).await;
    let client = Client::builder(addr.parse::<ServerTarget>().unwrap())
        .token(" s3cret\n")
        .connect()
        .await
        .unwrap();
    client.agents().await.unwrap();
    assert_eq!(
        seen.lock().unwrap().authorization.as_deref(),
        Some("Bearer s3cret")
    );
}

#[tokio::test]
async fn bad_targets_fail_before_connecting() {
    let err = Client::connect("https://host:1").await.unwrap_err();
    assert!(matches!(err, Error::InvalidTarget { .. }), "{err:?}");
    let err = Client::connect_with_token("/x.sock", "line\nbreak")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}
