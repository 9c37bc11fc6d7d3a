//! What tools in any language rely on: gRPC health, server reflection, and the
//! `google.rpc.ErrorInfo` in error statuses.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::{ScriptAgent, TestServer, uds_channel, wait_for};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_types::StatusExt;

const T: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cret-token";

/// A server on its Unix socket and on TCP (token `TOKEN`), and the TCP port.
fn server_with_tcp() -> (TestServer, u16, tempfile::TempDir) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let listen = format!("tcp://127.0.0.1:{port}");
    let server = TestServer::start_with(&[
        "--listen",
        &listen,
        "--token-file",
        token_file.to_str().expect("utf-8 path"),
    ]);
    (server, port, dir)
}

async fn tcp_channel(port: u16) -> Channel {
    wait_for(T, "the TCP listener", || async move {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint")
            .connect()
            .await
    })
    .await
}

async fn health(ch: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status())
}

/// `grpcurl list`: the service names reflection lists.
async fn list_services(
    ch: Channel,
    token: Option<&str>,
) -> Result<BTreeSet<String>, tonic::Status> {
    let mut req = Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    let mut answers = ServerReflectionClient::new(ch)
        .server_reflection_info(req)
        .await?
        .into_inner();
    let answer = answers
        .next()
        .await
        .expect("one answer")?
        .message_response
        .expect("a message response");
    match answer {
        MessageResponse::ListServicesResponse(l) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("ListServices answered {other:?}"),
    }
}

fn listed() -> BTreeSet<String> {
    [
        "patchbay.v1.Control",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .map(String::from)
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_over_unix_and_tcp() {
    let (server, port, _dir) = server_with_tcp();
    let unix = uds_channel(server.socket_path())
        .await
        .expect("unix channel");
    let tcp = tcp_channel(port).await;
    for (how, ch) in [("unix", &unix), ("tcp without a token", &tcp)] {
        for service in ["", "patchbay.v1.Control"] {
            assert_eq!(
                health(ch.clone(), service).await.expect("health check"),
                ServingStatus::Serving,
                "{how}: health of {service:?}"
            );
        }
        let e = health(ch.clone(), "patchbay.v1.Nope").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{how}: {e:?}");
    }
    // The Agent service is not listed: it is not an API for tools.
    assert_eq!(
        list_services(unix.clone(), None).await.expect("list"),
        listed()
    );
    for bad in [None, Some("nope")] {
        let e = list_services(tcp.clone(), bad).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "token {bad:?}: {e:?}");
        let info = e
            .get_error_details()
            .error_info()
            .cloned()
            .expect("ErrorInfo");
        assert_eq!(info.reason, "UNAUTHENTICATED");
    }
    assert_eq!(
        list_services(tcp.clone(), Some(TOKEN)).await.expect("list"),
        listed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_on_shutdown() {
    let mut server = TestServer::start();
    let ch = uds_channel(server.socket_path())
        .await
        .expect("unix channel");
    let mut watch = HealthClient::new(ch)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("a status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    let stop = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (server, status)
    });
    let next = tokio::time::timeout(T, watch.next())
        .await
        .expect("a status within 10 s of SIGTERM")
        .expect("a status before the stream ends")
        .expect("ok");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let (_server, status) = stop.await.expect("join");
    assert!(status.success(), "patchbayd exited with {status}");
}

fn reason(s: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let info = s
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {s:?}"));
    assert_eq!(info.domain, patchbay_proto::errors::DOMAIN);
    (info.reason, info.metadata)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_a_reason() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (_agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--unpatchable", "qux"],
    )
    .await;
    let pid = _agent.pid();
    let no_pid = 0x7fff_fff0u32;
    let e = try_attach(&mut c, spec_pid(no_pid, "foo", CallbackKind::Count))
        .await
        .unwrap_err();
    let (r, md) = reason(&e);
    assert_eq!((e.code(), r.as_str()), (Code::NotFound, "NO_AGENT"));
    assert_eq!(md.get("pid"), Some(&no_pid.to_string()));

    let e = try_attach(&mut c, spec_pid(pid, "qux", CallbackKind::Count))
        .await
        .unwrap_err();
    let (r, md) = reason(&e);
    assert_eq!(
        (e.code(), r.as_str()),
        (Code::NotFound, "NOT_PATCHABLE"),
        "{e:?}"
    );
    assert_eq!(md.get("pattern").map(String::as_str), Some("qux"));

    let e = try_attach(&mut c, spec_pid(pid, "[foo", CallbackKind::Count))
        .await
        .unwrap_err();
    assert_eq!(reason(&e).0, "BAD_PATTERN", "{e:?}");

    let e = c.counts(CountsRequest { tracer_id: 99 }).await.unwrap_err();
    let (r, md) = reason(&e);
    assert_eq!((e.code(), r.as_str()), (Code::NotFound, "UNKNOWN_TRACER"));
    assert_eq!(md.get("tracer_id").map(String::as_str), Some("99"));

    let ch = uds_channel(server.socket_path()).await.expect("channel");
    let mut req = Request::new(ListAgentsRequest {});
    req.metadata_mut().insert(
        patchbay_proto::PROTOCOL_METADATA_KEY,
        "99".parse().expect("ascii"),
    );
    let e = control_client::ControlClient::new(ch)
        .list_agents(req)
        .await
        .unwrap_err();
    let (r, md) = reason(&e);
    assert_eq!(
        (e.code(), r.as_str()),
        (Code::FailedPrecondition, "PROTOCOL_VERSION")
    );
    assert_eq!(md.get("server_version").map(String::as_str), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_json_errors_carry_the_reason() {
    let server = TestServer::start();
    for (args, code, reason, key, value) in [
        (
            &["--json", "attach", "--pid", "2147483632", "--count", "foo"][..],
            "NOT_FOUND",
            "NO_AGENT",
            "pid",
            "2147483632",
        ),
        (
            &["--json", "counts", "4242"][..],
            "NOT_FOUND",
            "UNKNOWN_TRACER",
            "tracer_id",
            "4242",
        ),
    ] {
        let out = server.cli(args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: serde_json::Value = serde_json::from_str(stderr.trim())
            .unwrap_or_else(|e| panic!("{args:?}: stderr is not one JSON value ({e}): {stderr}"));
        let e = &v["error"];
        assert_eq!(e["code"], code, "{args:?}: {v}");
        assert_eq!(e["reason"], reason, "{args:?}: {v}");
        assert_eq!(e["metadata"][key], value, "{args:?}: {v}");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(value)),
            "{args:?}: {v}"
        );
    }
}
