//! Bad input gets a precise error and changes nothing.

use integration_tests::agent::LINE_TIMEOUT as T;
use integration_tests::ops::*;
use integration_tests::proto::control_client::ControlClient;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::{ScriptAgent, TestServer, uds_channel, wait_for};
use tonic::Code;

/// A pid that cannot exist (above the kernel's largest pid_max).
const NO_SUCH_PID: u32 = 0x7fff_fff0;

/// A server with one agent (functions foo, bar; unpatchable qux) and one live tracer.
async fn setup() -> (TestServer, Control, ScriptAgent, u64) {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &[
            "--functions",
            "foo,bar",
            "--unpatchable",
            "qux",
            "--threads",
            "2",
        ],
    )
    .await;
    let (tracer, _) = attach(&mut c, spec_pid(agent.pid(), "foo", CallbackKind::Count)).await;
    agent.expect_line("install ", T).await;
    (server, c, agent, tracer)
}

async fn list_functions(
    c: &mut Control,
    pid: u32,
    pattern: &str,
) -> Result<ListFunctionsResponse, tonic::Status> {
    c.list_functions(ListFunctionsRequest {
        pid,
        pattern: pattern.into(),
        limit: 0,
    })
    .await
    .map(|r| r.into_inner())
}

/// Checks that nothing changed, and that the agent was asked to install nothing.
async fn assert_unchanged(c: &mut Control, agent: &mut ScriptAgent, before: &Snapshot) {
    agent.assert_no_lines(c, &["install ", "remove "]).await;
    let after = snapshot(c).await;
    assert_eq!(
        &after, before,
        "a rejected request changed the server state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pid_is_not_found() {
    let (_server, mut c, mut agent, _) = setup().await;
    let before = snapshot(&mut c).await;
    let msg = format!("no agent in pid {NO_SUCH_PID}");
    assert_status(
        list_functions(&mut c, NO_SUCH_PID, "*").await,
        Code::NotFound,
        &[&msg, "patchbay run"],
    );
    assert_status(
        try_attach(&mut c, spec_pid(NO_SUCH_PID, "foo", CallbackKind::Count)).await,
        Code::NotFound,
        &[&msg],
    );
    assert_unchanged(&mut c, &mut agent, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_process_without_agent_is_not_found() {
    let (server, mut c, mut agent, _) = setup().await;
    let before = snapshot(&mut c).await;
    // The server process exists but has no agent.
    let pid = server.pid();
    let msg = format!("no agent in pid {pid}");
    assert_status(
        list_functions(&mut c, pid, "*").await,
        Code::NotFound,
        &[&msg],
    );
    assert_status(
        try_attach(&mut c, spec_pid(pid, "foo", CallbackKind::Count)).await,
        Code::NotFound,
        &[&msg],
    );
    assert_unchanged(&mut c, &mut agent, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_died_is_unknown() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut gone, _) = ScriptAgent::connect(server.socket_path(), &["--functions", "foo"]).await;
    let pid = gone.pid();
    gone.kill();
    wait_for(STATE_TIMEOUT, "the dead agent to be removed", || {
        let mut c = c.clone();
        async move {
            let a = agents(&mut c).await;
            if a.is_empty() { Ok(()) } else { Err(a) }
        }
    })
    .await;
    let before = snapshot(&mut c).await;
    let msg = format!("no agent in pid {pid}");
    assert_status(
        list_functions(&mut c, pid, "*").await,
        Code::NotFound,
        &[&msg],
    );
    assert_status(
        try_attach(&mut c, spec_pid(pid, "foo", CallbackKind::Count)).await,
        Code::NotFound,
        &[&msg],
    );
    assert_eq!(snapshot(&mut c).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tracer_is_not_found() {
    let (_server, mut c, mut agent, tracer) = setup().await;
    let before = snapshot(&mut c).await;
    let unknown = tracer + 4242;
    for wait in [false, true] {
        assert_status(
            try_detach(&mut c, unknown, wait, 1000).await,
            Code::NotFound,
            &[&unknown.to_string()],
        );
    }
    assert_status(
        c.counts(CountsRequest { tracer_id: unknown }).await,
        Code::NotFound,
        &[&unknown.to_string()],
    );
    assert_unchanged(&mut c, &mut agent, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pattern_is_invalid_argument() {
    let (_server, mut c, mut agent, _) = setup().await;
    let before = snapshot(&mut c).await;
    assert_status(
        list_functions(&mut c, agent.pid(), "foo[").await,
        Code::InvalidArgument,
        &["foo["],
    );
    assert_status(
        try_attach(&mut c, spec_pid(agent.pid(), "foo[", CallbackKind::Count)).await,
        Code::InvalidArgument,
        &["foo["],
    );
    // Also for a target that matches no agent now (no agent to ask).
    assert_status(
        try_attach(&mut c, spec_all("foo[", CallbackKind::Count)).await,
        Code::InvalidArgument,
        &["foo["],
    );
    assert_unchanged(&mut c, &mut agent, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_specs_are_invalid_argument() {
    let (_server, mut c, mut agent, _) = setup().await;
    let before = snapshot(&mut c).await;
    let pid = agent.pid();
    let good = || spec_pid(pid, "bar", CallbackKind::Count);

    let mut no_target = good();
    no_target.target = None;
    let mut empty_target = good();
    empty_target.target = Some(Target { target: None });
    let mut empty_pattern = good();
    empty_pattern.pattern.clear();
    let unspecified = spec_pid(pid, "bar", CallbackKind::Unspecified);
    let mut no_callback = good();
    no_callback.callback = None;
    let mut too_many_args = spec_pid(pid, "bar", CallbackKind::Trace);
    too_many_args.callback.as_mut().unwrap().arg_count = 7;
    let nameless_custom = spec_pid(pid, "bar", CallbackKind::Custom);
    let mut bad_kind = good();
    bad_kind.callback.as_mut().unwrap().kind = 99;

    for (what, spec) in [
        ("no target", no_target),
        ("empty target", empty_target),
        ("empty pattern", empty_pattern),
        ("unspecified callback kind", unspecified),
        ("no callback", no_callback),
        ("arg_count 7", too_many_args),
        ("custom without a name", nameless_custom),
        ("unknown callback kind", bad_kind),
    ] {
        let r = try_attach(&mut c, spec).await;
        assert!(
            matches!(&r, Err(s) if s.code() == Code::InvalidArgument),
            "{what}: expected INVALID_ARGUMENT, got {r:?}"
        );
        assert!(
            !r.unwrap_err().message().trim().is_empty(),
            "{what}: the error must say what is wrong"
        );
    }
    assert_unchanged(&mut c, &mut agent, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_without_patchable_function_is_not_found() {
    let (_server, mut c, mut agent, _) = setup().await;
    let before = snapshot(&mut c).await;
    // `qux` exists but is not patchable; `nothing*` matches nothing.
    for pattern in ["qux", "nothing*"] {
        let r = try_attach(&mut c, spec_pid(agent.pid(), pattern, CallbackKind::Count)).await;
        assert_status(r, Code::NotFound, &[]);
    }
    assert_unchanged(&mut c, &mut agent, &before).await;
    // Listing shows the unpatchable function with its reason.
    let l = list_functions(&mut c, agent.pid(), "qux").await.unwrap();
    assert_eq!(l.functions.len(), 1, "{l:?}");
    assert!(!l.functions[0].patchable, "{l:?}");
}

/// A failed attach consumes no tracer id (issue 16): attaches with bad patterns (one
/// refused at once, one that matches nothing in the process), then a good one: its id
/// follows the last good attach's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_consumes_no_tracer_id() {
    let (_server, mut c, agent, first) = setup().await;
    let r = try_attach(&mut c, spec_pid(agent.pid(), "foo[", CallbackKind::Count)).await;
    assert_status(r, Code::InvalidArgument, &[]);
    let r = try_attach(
        &mut c,
        spec_pid(agent.pid(), "nothing*", CallbackKind::Count),
    )
    .await;
    assert_status(r, Code::NotFound, &[]);
    let (second, _) = attach(&mut c, spec_pid(agent.pid(), "bar", CallbackKind::Count)).await;
    assert_eq!(
        second,
        first + 1,
        "tracer ids not consecutive across failed attaches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_functions_filters_and_limits() {
    let (_server, mut c, agent, _) = setup().await;
    let l = list_functions(&mut c, agent.pid(), "*").await.unwrap();
    let mut names: Vec<_> = l.functions.iter().map(|f| f.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["bar", "foo", "qux"]);
    assert_eq!(l.total, 3);
    let l = c
        .list_functions(ListFunctionsRequest {
            pid: agent.pid(),
            pattern: String::new(),
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((l.functions.len(), l.total), (2, 3), "{l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_wrong_protocol_version_is_rejected() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let mut agent = ScriptAgent::spawn(
        server.socket_path(),
        &["--functions", "foo", "--protocol-version", "99"],
    );
    let line = agent.expect_line("error ", T).await;
    assert!(line.starts_with("error FailedPrecondition "), "{line}");
    agent.assert_no_line_without_session("welcome ").await;
    assert!(agents(&mut c).await.is_empty());
    assert!(snapshot(&mut c).await.tracers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_claiming_another_pid_or_uid_is_rejected() {
    let server = TestServer::start();
    let mut c = server.control().await;
    for args in [
        ["--functions", "foo", "--pid-override", "1"],
        ["--functions", "foo", "--uid-override", "4242"],
    ] {
        let mut agent = ScriptAgent::spawn(server.socket_path(), &args);
        let line = agent.expect_line("error ", T).await;
        assert!(
            line.starts_with("error PermissionDenied "),
            "{args:?}: {line}"
        );
        agent.assert_no_line_without_session("welcome ").await;
        assert!(agents(&mut c).await.is_empty(), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_hello_is_rejected() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let mut agent = ScriptAgent::spawn(server.socket_path(), &["--no-hello"]);
    let line = agent.expect_line("error ", T).await;
    assert!(line.starts_with("error InvalidArgument "), "{line}");
    assert!(agents(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_wrong_protocol_version_is_rejected() {
    let server = TestServer::start();
    let channel = uds_channel(server.socket_path()).await.unwrap();
    let mut old = ControlClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert(PROTOCOL_METADATA_KEY, "99".parse().unwrap());
        Ok(req)
    });
    let r = old.list_agents(ListAgentsRequest {}).await;
    assert_status(r, Code::FailedPrecondition, &[]);
    let r = old
        .attach(AttachRequest {
            spec: Some(spec_all("foo", CallbackKind::Count)),
            timeout_ms: 0,
        })
        .await;
    assert_status(r, Code::FailedPrecondition, &[]);
    let mut c = server.control().await;
    assert!(tracers(&mut c).await.is_empty());
}
