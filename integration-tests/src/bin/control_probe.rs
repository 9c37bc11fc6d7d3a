//! `control-probe`: one raw Control call, for tests that must run it as another user
//! (`Command::uid`) and check the exact status code.
//!
//! `control-probe --socket S CALL ARGS...` prints `ok <debug of the answer>` or
//! `error <Code> <message>` and exits 0 either way (1 when it cannot connect).
//! Calls: `agents`, `tracers`, `trampolines`, `gp`, `detach ID`, `counts ID`,
//! `watch ID`, `functions PID PATTERN`, `attach-pid PID PATTERN`, `attach-all PATTERN`,
//! `attach-exe EXE PATTERN`, `trampolines-pid PID`, `sync TIMEOUT_MS`.

use std::path::PathBuf;

use integration_tests::ops::{spec, spec_all, spec_pid};
use integration_tests::uds::control_client;
use patchbay_proto::*;

fn usage() -> ! {
    eprintln!("usage: control-probe --socket PATH CALL ARGS...");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, call) = match args.as_slice() {
        [flag, socket, call @ ..] if flag == "--socket" && !call.is_empty() => {
            (PathBuf::from(socket), call.to_vec())
        }
        _ => usage(),
    };
    let mut c = match control_client(&socket).await {
        Ok(c) => c,
        Err(e) => {
            println!("connect-error {e:#}");
            std::process::exit(1);
        }
    };
    let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage());
    let call: Vec<&str> = call.iter().map(String::as_str).collect();
    let r: Result<String, tonic::Status> = match call.as_slice() {
        ["agents"] => c
            .list_agents(ListAgentsRequest {})
            .await
            .map(|r| format!("{:?}", r.into_inner().agents)),
        ["tracers"] => c
            .list_tracers(ListTracersRequest {})
            .await
            .map(|r| format!("{:?}", r.into_inner().tracers)),
        ["trampolines"] => c
            .list_trampolines(ListTrampolinesRequest {
                pid: 0,
                include_freed: true,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner().trampolines)),
        ["gp"] => c
            .grace_periods(GracePeriodsRequest::default())
            .await
            .map(|r| format!("{:?}", r.into_inner().pending)),
        ["detach", id] => c
            .detach(DetachRequest {
                tracer_id: num(id),
                wait: false,
                timeout_ms: 0,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["counts", id] => c
            .counts(CountsRequest { tracer_id: num(id) })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["watch", id] => c
            .watch_events(WatchEventsRequest { tracer_id: num(id) })
            .await
            .map(|_| "stream".to_string()),
        ["functions", pid, pattern] => c
            .list_functions(ListFunctionsRequest {
                pid: num(pid) as u32,
                pattern: pattern.to_string(),
                limit: 0,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["attach-pid", pid, pattern] => c
            .attach(AttachRequest {
                spec: Some(spec_pid(num(pid) as u32, pattern, CallbackKind::Count)),
                timeout_ms: 0,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["attach-all", pattern] => c
            .attach(AttachRequest {
                spec: Some(spec_all(pattern, CallbackKind::Count)),
                timeout_ms: 0,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["attach-exe", exe, pattern] => c
            .attach(AttachRequest {
                spec: Some(spec(
                    target::Target::Exe(exe.to_string()),
                    pattern,
                    CallbackKind::Count,
                )),
                timeout_ms: 0,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        ["trampolines-pid", pid] => c
            .list_trampolines(ListTrampolinesRequest {
                pid: num(pid) as u32,
                include_freed: true,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner().trampolines)),
        ["sync", ms] => c
            .synchronize(SynchronizeRequest {
                timeout_ms: num(ms) as u32,
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        _ => usage(),
    };
    match r {
        Ok(s) => println!("ok {s}"),
        Err(s) => println!("error {:?} {}", s.code(), s.message()),
    }
}
