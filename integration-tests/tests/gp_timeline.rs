//! Grace-period timelines (issue 14) end to end: a real program with two threads
//! hammering a traced function, a count tracer detached with `wait`; the timeline the
//! server returns holds the server's and the agent's steps on one clock, in the order
//! the protocol imposes, with the observation of the busy threads (signal sent, the
//! handler's stamp, the stamp seen); `patchbay gp --timeline --json` shows the same.

use std::time::Duration;

use integration_tests::fixtures::Build;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::target::*;
use integration_tests::wait_for;

/// The timeline of trampoline `tramp` once the agent's steps arrived (after the free).
async fn timeline(c: &Control, tramp: u64) -> GraceTimeline {
    wait_for(
        Duration::from_secs(10),
        "the agent's timeline steps",
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .grace_periods(GracePeriodsRequest { timelines: 8 })
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner();
                r.timelines
                    .into_iter()
                    .find(|t| {
                        t.trampoline_id == tramp
                            && t.steps
                                .iter()
                                .any(|s| s.step == GraceStep::AgentFreed as i32)
                    })
                    .ok_or_else(|| format!("no complete timeline of {tramp} yet"))
            }
        },
    )
    .await
}

fn at(t: &GraceTimeline, step: GraceStep) -> u64 {
    t.steps
        .iter()
        .find(|s| s.step == step as i32)
        .unwrap_or_else(|| panic!("no {step:?} step in {t:#?}"))
        .at_ns
}

#[tokio::test]
async fn a_detach_shows_every_step_of_its_grace_period_on_one_clock() {
    let (server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    t.expect("hammer 2", "hammering").await;
    let id = attach_count(&mut c, pid, "work", 1).await;
    let d = detach_wait(&mut c, id, "detach").await;
    assert_eq!(d.retired.len(), 1, "{d:?}");
    let tramp = d.retired[0].trampoline_id;
    let tl = timeline(&c, tramp).await;
    assert_eq!((tl.pid, tl.trampoline_id), (pid, tramp));
    assert!(tl.authorized && tl.epoch > 0, "{tl:?}");
    assert!(tl.steps.windows(2).all(|w| w[0].at_ns <= w[1].at_ns));
    // The protocol's order, across the two processes (one clock).
    use GraceStep::*;
    let order = [
        ServerDetachReceived,
        AgentRemoveReceived,
        AgentUnpatched,
        AgentEpochBumped,
        AgentRetiredSent,
        ServerRetiredReceived,
        ServerAuthorizeSent,
        AgentAuthorizeReceived,
        AgentFreed,
        ServerFreedReceived,
    ];
    for w in order.windows(2) {
        assert!(
            at(&tl, w[0]) <= at(&tl, w[1]),
            "{:?} after {:?}: {tl:#?}",
            w[0],
            w[1]
        );
    }
    assert!(at(&tl, ServerRemoveSent) <= at(&tl, AgentRemoveReceived));
    // The busy threads were signalled and stamped by the handler (or, inside a
    // dispatch, on its way out), the agent saw it, the server received it.
    let tids = |step: GraceStep| -> Vec<u32> {
        tl.steps
            .iter()
            .filter(|s| s.step == step as i32)
            .map(|s| s.tid)
            .collect()
    };
    let signalled = tids(AgentSignalSent);
    assert!(!signalled.is_empty(), "no signal sent: {tl:#?}");
    let stamped: Vec<u32> = [tids(AgentHandlerStamped), tids(AgentDeferredStamped)].concat();
    assert!(
        signalled.iter().any(|t| stamped.contains(t)),
        "no signalled thread stamped: {tl:#?}"
    );
    let seen = tids(AgentStampSeen);
    let received = tids(ServerStampReceived);
    assert!(stamped.iter().any(|t| seen.contains(t)), "{tl:#?}");
    assert!(seen.iter().any(|t| received.contains(t)), "{tl:#?}");
    // Every step is after the grace period began and before the free's report.
    let (first, last) = (at(&tl, ServerDetachReceived), at(&tl, ServerFreedReceived));
    assert!(tl.steps.iter().all(|s| s.at_ns >= first && s.at_ns <= last));

    // The CLI shows it.
    let out = tokio::process::Command::new(integration_tests::bins::patchbay())
        .arg("--socket")
        .arg(server.socket_path())
        .args(["--json", "gp", "--timeline", "3"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = v["timelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["trampoline_id"] == tramp)
        .unwrap_or_else(|| panic!("trampoline {tramp} not in {v}"));
    assert_eq!(shown["steps"].as_array().unwrap().len(), tl.steps.len());
    assert!(shown["total_ns"].as_u64().unwrap() > 0);
    assert_eq!(shown["phases"].as_array().unwrap().len(), 6);
    let text = tokio::process::Command::new(integration_tests::bins::patchbay())
        .arg("--socket")
        .arg(server.socket_path())
        .args(["gp", "--timeline"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("trampoline {tramp} of pid {pid}"))
            && text.contains("signal sent")
            && text.contains("where the time went"),
        "{text}"
    );
    t.expect("stop", "stopped work=").await;
    quit_ok(&mut t).await;
}
