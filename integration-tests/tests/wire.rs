//! Wire-level hostile input: raw HTTP/2 (h2) to patchbayd's socket with malformed
//! protobuf, truncated and oversized gRPC frames, bad compression flags, unknown
//! methods, on both services, and random payloads on every Control method. Each gets a
//! gRPC status with a precise message, and the server keeps serving (the agent that
//! was connected stays connected, nothing changes).
//!
//! Codes follow the gRPC spec (doc/statuscodes.md) as tonic implements it: a request
//! that cannot be parsed (bad protobuf, truncated frame, bad compression flag, no
//! message) is INTERNAL with a message saying what failed; a frame over the size limit
//! is OUT_OF_RANGE; an unknown method is UNIMPLEMENTED. Requests that parse but say
//! something wrong are INVALID_ARGUMENT (see `bad_input.rs`).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use integration_tests::agent::LINE_TIMEOUT as T;
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::{ScriptAgent, TestServer, wait_for};
use prost::Message;
use tonic::Code;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw HTTP/2 connection to the server's Unix socket.
async fn h2_connect(server: &TestServer) -> h2::client::SendRequest<Bytes> {
    let io = tokio::net::UnixStream::connect(server.socket_path())
        .await
        .expect("connect to the socket");
    h2_over(io).await
}

async fn h2_over<IO>(io: IO) -> h2::client::SendRequest<Bytes>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A gRPC frame: compression flag, declared length, payload (which may be shorter or
/// longer than declared).
fn frame(flag: u8, declared: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(flag);
    b.put_u32(declared);
    b.put_slice(payload);
    b.freeze()
}

/// A well-formed frame around `payload`.
fn msg(payload: &[u8]) -> Bytes {
    frame(0, payload.len() as u32, payload)
}

/// What came back: the gRPC status (from headers or trailers), its message, and the
/// data frames' payloads.
#[derive(Debug)]
struct Reply {
    code: Code,
    message: String,
    data: Vec<u8>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(h: &http::HeaderMap) -> Option<(Code, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((Code::from_i32(code), message))
}

/// Sends `frames` on a new stream to `path` and ends the stream; returns the status.
async fn call(client: &h2::client::SendRequest<Bytes>, path: &str, frames: &[Bytes]) -> Reply {
    call_with(client, path, frames, &[]).await
}

/// [`call`] with extra request headers.
async fn call_with(
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
    frames: &[Bytes],
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(PROTOCOL_METADATA_KEY, PROTOCOL_VERSION.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).expect("request");
    let mut client = client.clone().ready().await.expect("h2 connection usable");
    let (resp, mut send) = client.send_request(req, false).expect("send request");
    // The server may answer (and close the stream) before it has read every frame,
    // e.g. `Unimplemented` for an unknown method: a send that then finds the stream
    // closed is not a failure; the reply below says what the server did.
    for f in frames {
        send.reserve_capacity(f.len());
        if send.send_data(f.clone(), false).is_err() {
            break;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
    tokio::time::timeout(CALL_TIMEOUT, read_reply(resp))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within {CALL_TIMEOUT:?}"))
}

async fn read_reply(resp: h2::client::ResponseFuture) -> Reply {
    let resp = resp
        .await
        .expect("response headers (the connection must survive)");
    let (parts, mut body) = resp.into_parts();
    assert_eq!(parts.status, http::StatusCode::OK, "{parts:?}");
    if let Some((code, message)) = status_of(&parts.headers) {
        return Reply {
            code,
            message,
            data: vec![],
        };
    }
    let mut data = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.expect("response data");
        let _ = body.flow_control().release_capacity(d.len());
        data.extend_from_slice(&d);
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("a gRPC status in the trailers");
    let (code, message) = status_of(&trailers).expect("grpc-status trailer");
    Reply {
        code,
        message,
        data,
    }
}

#[track_caller]
fn expect(r: &Reply, code: Code, needle: &str, what: &str) {
    assert_eq!(r.code, code, "{what}: {r:?}");
    assert!(
        r.message.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: message {:?} does not say {needle:?}",
        r.message
    );
}

fn assert_no_panic(server: &TestServer) {
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

const CONTROL: &str = "/patchbay.v1.Control";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rejects_malformed_frames_and_keeps_serving() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let (tracer, _) = attach(&mut c, spec_pid(agent.pid(), "foo", CallbackKind::Count)).await;
    agent.expect_line("install ", T).await;
    let before = snapshot(&mut c).await;
    let h2 = h2_connect(&server).await;

    let attach_ok = AttachRequest {
        spec: Some(spec_pid(agent.pid(), "bar", CallbackKind::Count)),
        timeout_ms: 0,
    }
    .encode_to_vec();
    let detach_ok = DetachRequest {
        tracer_id: tracer,
        wait: false,
        timeout_ms: 0,
    }
    .encode_to_vec();
    let cases: Vec<(&str, String, Vec<Bytes>, Code, &str)> = vec![
        (
            "a length prefix running past the message",
            format!("{CONTROL}/Attach"),
            vec![msg(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f])],
            Code::Internal,
            "decode",
        ),
        (
            "a message field sent as a varint",
            format!("{CONTROL}/Attach"),
            vec![msg(&[0x08, 0x01])],
            Code::Internal,
            "decode",
        ),
        (
            "a valid attach cut in half",
            format!("{CONTROL}/Attach"),
            vec![msg(&attach_ok[..attach_ok.len() / 2])],
            Code::Internal,
            "decode",
        ),
        (
            "a frame shorter than its declared length",
            format!("{CONTROL}/Detach"),
            vec![frame(0, 100, &detach_ok)],
            Code::Internal,
            "eof",
        ),
        (
            "a frame header cut short",
            format!("{CONTROL}/Detach"),
            vec![Bytes::from_static(&[0, 0, 0])],
            Code::Internal,
            "eof",
        ),
        (
            "a frame over the 4 MiB request limit",
            format!("{CONTROL}/ListAgents"),
            vec![frame(0, 5 << 20, &[])],
            Code::OutOfRange,
            "too large",
        ),
        (
            "an invalid compression flag",
            format!("{CONTROL}/ListAgents"),
            vec![frame(7, 0, &[])],
            Code::Internal,
            "compression flag",
        ),
        (
            "a compressed message without an encoding",
            format!("{CONTROL}/ListAgents"),
            vec![frame(1, 1, &[0])],
            Code::Internal,
            "compress",
        ),
        (
            "no message at all",
            format!("{CONTROL}/Detach"),
            vec![],
            Code::Internal,
            "missing request message",
        ),
        (
            "an unknown method",
            format!("{CONTROL}/Explode"),
            vec![msg(&[])],
            Code::Unimplemented,
            "",
        ),
        (
            "an unknown service",
            "/patchbay.v1.Nope/ListAgents".into(),
            vec![msg(&[])],
            Code::Unimplemented,
            "",
        ),
    ];
    for (what, path, frames, code, needle) in &cases {
        let r = call(&h2, path, frames).await;
        expect(&r, *code, needle, what);
        assert_no_panic(&server);
    }
    // Unknown fields are skipped, as protobuf requires: the call works.
    let mut extra = ListTracersRequest {}.encode_to_vec();
    extra.extend_from_slice(&[0xb8, 0x3e, 0x01]); // field 999, varint 1
    let r = call(&h2, &format!("{CONTROL}/ListTracers"), &[msg(&extra)]).await;
    assert_eq!(r.code, Code::Ok, "{r:?}");
    let listed = ListTracersResponse::decode(&r.data[5..]).expect("a ListTracersResponse");
    assert_eq!(listed.tracers, before.tracers);
    // A bad enum value is a well-formed message with a bad request in it.
    let mut bad_kind = spec_pid(agent.pid(), "bar", CallbackKind::Count);
    bad_kind.callback.as_mut().unwrap().kind = 1 << 20;
    let bad_kind = AttachRequest {
        spec: Some(bad_kind),
        timeout_ms: 0,
    }
    .encode_to_vec();
    let r = call(&h2, &format!("{CONTROL}/Attach"), &[msg(&bad_kind)]).await;
    expect(&r, Code::InvalidArgument, "callback kind", "kind 2^20");

    // Still serving, on this connection and on new ones; nothing changed.
    let r = call(&h2, &format!("{CONTROL}/ListAgents"), &[msg(&[])]).await;
    assert_eq!(r.code, Code::Ok, "{r:?}");
    assert_unchanged(&mut c, &mut agent, &before).await;
    let mut fresh = server.control().await;
    assert_eq!(snapshot(&mut fresh).await, before);
    assert_no_panic(&server);
}

/// Checks that nothing changed, and that the agent was asked to install nothing.
async fn assert_unchanged(
    c: &mut integration_tests::Control,
    agent: &mut ScriptAgent,
    before: &Snapshot,
) {
    agent.assert_no_lines(c, &["install ", "remove "]).await;
    assert_eq!(
        &snapshot(c).await,
        before,
        "a rejected request changed state"
    );
}

/// This process's start time (field 22 of /proc/self/stat), as an agent reports it.
fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .expect("start time")
}

fn hello() -> AgentMessage {
    AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "wire-test".into(),
            pid: std::process::id(),
            start_time: own_start_time(),
            uid: nix::unistd::getuid().as_raw(),
            exe: "/wire-test".into(),
            build_id: String::new(),
            tids: vec![std::process::id()],
            epoch: 0,
            trampolines: vec![],
            callbacks: vec![],
            arrival: 0,
            ..Hello::default()
        })),
    }
}

const SESSION: &str = "/patchbay.v1.Agent/Session";

/// Opens an agent session, sends `first` and returns the stream parts to go on.
async fn open_session(
    h2: &h2::client::SendRequest<Bytes>,
    first: Bytes,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{SESSION}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut client = h2.clone().ready().await.expect("h2 connection usable");
    let (resp, mut send) = client.send_request(req, false).expect("send request");
    send.send_data(first, false).expect("send hello");
    let resp = tokio::time::timeout(CALL_TIMEOUT, resp)
        .await
        .expect("session headers in time")
        .expect("session headers");
    assert_eq!(resp.status(), http::StatusCode::OK);
    (send, resp.into_body())
}

/// Reads one whole gRPC message from the session's response stream.
async fn next_message(body: &mut h2::RecvStream, buf: &mut Vec<u8>) -> Option<ServerMessage> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() >= 5 + len {
                let m = ServerMessage::decode(&buf[5..5 + len]).expect("a ServerMessage");
                buf.drain(..5 + len);
                return Some(m);
            }
        }
        let d = tokio::time::timeout(CALL_TIMEOUT, body.data())
            .await
            .expect("server message in time")?
            .expect("data");
        let _ = body.flow_control().release_capacity(d.len());
        buf.extend_from_slice(&d);
    }
}

/// Reads the rest of a session until its status trailer.
async fn session_status(body: &mut h2::RecvStream) -> (Code, String) {
    while let Some(d) = tokio::time::timeout(CALL_TIMEOUT, body.data())
        .await
        .expect("session end in time")
    {
        let d = d.expect("data");
        let _ = body.flow_control().release_capacity(d.len());
    }
    let t = body
        .trailers()
        .await
        .expect("trailers")
        .expect("status trailers");
    status_of(&t).expect("grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_session_rejects_malformed_streams_and_keeps_serving() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), &["--functions", "foo"]).await;
    let before = snapshot(&mut c).await;
    let h2 = h2_connect(&server).await;
    let hello_bytes = hello().encode_to_vec();

    // Before any hello: each bad opening is refused with a precise status.
    let not_hello = AgentMessage {
        body: Some(agent_message::Body::ThreadsBorn(ThreadsBorn {
            tids: vec![1],
        })),
    }
    .encode_to_vec();
    let cases: Vec<(&str, Vec<Bytes>, Code, &str)> = vec![
        (
            "garbage instead of a hello",
            vec![msg(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f])],
            Code::Internal,
            "decode",
        ),
        (
            "a hello cut short",
            vec![msg(&hello_bytes[..hello_bytes.len() - 3])],
            Code::Internal,
            "decode",
        ),
        (
            "a frame over the 256 MiB agent limit",
            vec![frame(0, 300 << 20, &[])],
            Code::OutOfRange,
            "too large",
        ),
        (
            "a truncated frame",
            vec![frame(0, 1000, &hello_bytes)],
            Code::Internal,
            "eof",
        ),
        (
            "a first message that is not a hello",
            vec![msg(&not_hello)],
            Code::InvalidArgument,
            "must be hello",
        ),
        (
            "an empty first message",
            vec![msg(&[])],
            Code::InvalidArgument,
            "must be hello",
        ),
        (
            "no message at all",
            vec![],
            Code::InvalidArgument,
            "ended before hello",
        ),
    ];
    for (what, frames, code, needle) in &cases {
        let r = call(&h2, SESSION, frames).await;
        expect(&r, *code, needle, what);
        assert_no_panic(&server);
    }
    assert_eq!(
        snapshot(&mut c).await,
        before,
        "refused sessions changed state"
    );

    // A correct hello, then garbage: the session ends with a status, the agent's
    // state stays (disconnected), and the same process can resume.
    let (mut send, mut body) = open_session(&h2, msg(&hello_bytes)).await;
    let mut buf = Vec::new();
    let welcome = match next_message(&mut body, &mut buf).await {
        Some(ServerMessage {
            body: Some(server_message::Body::Welcome(w)),
        }) => w,
        other => panic!("expected a welcome, got {other:?}"),
    };
    assert!(!welcome.resumed);
    send.send_data(msg(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), false)
        .expect("send garbage");
    let (code, message) = session_status(&mut body).await;
    assert_eq!(code, Code::Internal, "{message}");
    assert!(message.to_lowercase().contains("decode"), "{message}");
    let me = std::process::id();
    wait_for(
        STATE_TIMEOUT,
        "the broken session to be disconnected",
        || {
            let mut c = c.clone();
            async move {
                let a = agents(&mut c).await;
                match a.iter().find(|a| a.pid == me) {
                    Some(x) if !x.connected => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    let (mut send, mut body) = open_session(&h2, msg(&hello_bytes)).await;
    let mut buf = Vec::new();
    match next_message(&mut body, &mut buf).await {
        Some(ServerMessage {
            body: Some(server_message::Body::Welcome(w)),
        }) => assert!(w.resumed && w.agent_id == welcome.agent_id, "{w:?}"),
        other => panic!("expected a welcome, got {other:?}"),
    }
    // A second hello on this session is rejected without ending it or changing state.
    send.send_data(msg(&hello_bytes), false)
        .expect("second hello");
    // Messages about things that do not exist are rejected one by one.
    let bogus = AgentMessage {
        body: Some(agent_message::Body::Trampoline(TrampolineReport {
            trampoline_id: 77,
            report: Some(trampoline_report::Report::Freed(Freed {})),
        })),
    }
    .encode_to_vec();
    send.send_data(msg(&bogus), false).expect("bogus report");
    // The session is still served: the server answers a function listing over it.
    let list = tokio::spawn({
        let mut c = c.clone();
        async move {
            c.list_functions(ListFunctionsRequest {
                pid: me,
                pattern: "x*".into(),
                limit: 0,
            })
            .await
        }
    });
    let request_id = loop {
        match next_message(&mut body, &mut buf).await {
            Some(ServerMessage {
                body: Some(server_message::Body::ListFunctions(l)),
            }) => break l.request_id,
            Some(_) => continue,
            None => panic!("session ended: {:?}", session_status(&mut body).await),
        }
    };
    let answer = AgentMessage {
        body: Some(agent_message::Body::FunctionList(FunctionList {
            request_id,
            functions: vec![],
            error: String::new(),
            unpatchable_matches: 0,
        })),
    }
    .encode_to_vec();
    send.send_data(msg(&answer), false).expect("answer");
    let listed = list
        .await
        .expect("join")
        .expect("ListFunctions over the session");
    assert_eq!(listed.into_inner().total, 0);
    let log = server.log();
    assert!(
        log.contains("second Hello on one session"),
        "the second hello is logged precisely:\n{log}"
    );
    assert!(
        log.contains("report about unknown trampoline 77"),
        "the bogus report is logged precisely:\n{log}"
    );
    // The scripted agent was never disturbed.
    sync_point(&mut c, &mut agent).await;
    assert_no_panic(&server);
    drop(send);
}

/// A small deterministic generator (xorshift) for the payload fuzz loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_payloads_on_every_control_method() {
    // No agent: every call is answered at once, whatever the payload says.
    let server = TestServer::start();
    let h2 = h2_connect(&server).await;
    let valid: Vec<(&str, Vec<u8>)> = vec![
        ("ListAgents", ListAgentsRequest {}.encode_to_vec()),
        (
            "ListFunctions",
            ListFunctionsRequest {
                pid: 1,
                pattern: "a*".into(),
                limit: 3,
            }
            .encode_to_vec(),
        ),
        (
            "Attach",
            AttachRequest {
                spec: Some(spec_all("foo*", CallbackKind::Trace)),
                timeout_ms: 100,
            }
            .encode_to_vec(),
        ),
        (
            "Detach",
            DetachRequest {
                tracer_id: 1,
                wait: true,
                timeout_ms: 100,
            }
            .encode_to_vec(),
        ),
        ("ListTracers", ListTracersRequest {}.encode_to_vec()),
        (
            "ListTrampolines",
            ListTrampolinesRequest {
                pid: 0,
                include_freed: true,
            }
            .encode_to_vec(),
        ),
        (
            "GracePeriods",
            GracePeriodsRequest::default().encode_to_vec(),
        ),
        (
            "Synchronize",
            SynchronizeRequest { timeout_ms: 100 }.encode_to_vec(),
        ),
        ("Counts", CountsRequest { tracer_id: 1 }.encode_to_vec()),
    ];
    let seed = std::env::var("WIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..400 {
        let (method, base) = &valid[rng.below(valid.len())];
        let mut payload = base.clone();
        match rng.below(4) {
            // Flip bytes of a valid message.
            0 | 1 => {
                for _ in 0..=rng.below(3) {
                    if !payload.is_empty() {
                        let at = rng.below(payload.len());
                        payload[at] ^= rng.next() as u8;
                    }
                }
            }
            // Cut it.
            2 => payload.truncate(rng.below(payload.len() + 1)),
            // Random bytes.
            _ => {
                payload = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
            }
        }
        let r = call(&h2, &format!("{CONTROL}/{method}"), &[msg(&payload)]).await;
        assert!(
            matches!(
                r.code,
                Code::Ok
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::Internal
                    | Code::DeadlineExceeded
                    | Code::FailedPrecondition
            ),
            "case {i} (seed {seed}): {method} {payload:02x?}: {r:?}"
        );
        if r.code != Code::Ok {
            assert!(
                !r.message.trim().is_empty(),
                "case {i}: {method} {payload:02x?}: a status without a message"
            );
        }
        if r.code == Code::Internal {
            assert!(
                r.message.contains("decode"),
                "case {i}: {method} {payload:02x?}: INTERNAL only for undecodable input: {r:?}"
            );
        }
        *seen.entry(format!("{:?}", r.code)).or_default() += 1;
    }
    eprintln!("status counts over 400 random payloads: {seen:?}");
    assert!(
        seen.len() >= 3,
        "the payloads hit too few outcomes: {seen:?}"
    );
    assert_no_panic(&server);
    // Still serving, on a fresh connection too.
    let mut c = server.control().await;
    let _ = tracers(&mut c).await;
    let r = call(&h2, &format!("{CONTROL}/ListAgents"), &[msg(&[])]).await;
    assert_eq!(r.code, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_token_and_refuses_agents() {
    // A free port: bound, read, released, then given to the server.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token file");
    let listen = format!("tcp://127.0.0.1:{port}");
    let server = TestServer::start_with(&[
        "--listen",
        &listen,
        "--token-file",
        token_file.to_str().expect("utf-8 path"),
    ]);
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), &["--functions", "foo"]).await;
    let before = snapshot(&mut c).await;
    let tcp = wait_for(STATE_TIMEOUT, "the TCP listener", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
    })
    .await;
    let h2 = h2_over(tcp).await;
    let list = format!("{CONTROL}/ListAgents");
    for (what, headers) in [
        ("no token", vec![]),
        ("a wrong token", vec![("authorization", "Bearer nope")]),
        (
            "a token without Bearer",
            vec![("authorization", "s3cret-token")],
        ),
        (
            "a longer token",
            vec![("authorization", "Bearer s3cret-token2")],
        ),
    ] {
        let r = call_with(&h2, &list, &[msg(&[])], &headers).await;
        assert_eq!(r.code, Code::Unauthenticated, "{what}: {r:?}");
        assert!(!r.message.is_empty(), "{what}: {r:?}");
    }
    // With the token, a TCP client acts as root and sees our agent.
    let auth = [("authorization", "Bearer s3cret-token")];
    let r = call_with(&h2, &list, &[msg(&[])], &auth).await;
    assert_eq!(r.code, Code::Ok, "{r:?}");
    let listed = ListAgentsResponse::decode(&r.data[5..]).expect("a ListAgentsResponse");
    assert_eq!(listed.agents.len(), 1, "{listed:?}");
    // Malformed input over TCP is refused like over the Unix socket.
    let r = call_with(
        &h2,
        &format!("{CONTROL}/Attach"),
        &[msg(&[0x08, 0x01])],
        &auth,
    )
    .await;
    expect(&r, Code::Internal, "decode", "garbage attach over TCP");
    // Agents must use the Unix socket (SO_PEERCRED), token or not.
    for headers in [&[][..], &auth[..]] {
        let r = call_with(&h2, SESSION, &[msg(&hello().encode_to_vec())], headers).await;
        expect(
            &r,
            Code::PermissionDenied,
            "unix socket",
            "an agent over TCP",
        );
    }
    sync_point(&mut c, &mut agent).await;
    assert_eq!(snapshot(&mut c).await, before, "TCP clients changed state");
    assert_no_panic(&server);
}
