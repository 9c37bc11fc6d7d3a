//! `patchbay detach TRACER [--wait [--timeout-ms MS]]`.

use std::time::Duration;

use patchbay_sdk::proto::DetachResponse;
use patchbay_sdk::{Client, Error, TracerId};
use serde_json::json;

use crate::format::plural;
use crate::json;
use crate::output::Output;
use crate::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Id of the tracer (see `patchbay tracers`)
    #[arg(value_name = "TRACER")]
    pub tracer: u64,
    /// Wait until every trampoline it retired may be freed (the grace period is over)
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long [default: 30000]
    #[arg(long, value_name = "MS", requires = "wait")]
    pub timeout_ms: Option<u32>,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut request = client.tracer(TracerId::new(args.tracer)).detach();
    if args.wait {
        request = request.wait();
    }
    if let Some(ms) = args.timeout_ms {
        request = request.timeout(Duration::from_millis(ms.into()));
    }
    let answer = if args.wait {
        progress::wait("waiting for the grace period", request.into_future()).await
    } else {
        request.await
    };
    let answer = answer.map_err(|err| match err {
        Error::DeadlineExceeded(msg) => anyhow::anyhow!(
            "{msg}\n  note: tracer {} is detached and its grace period continues; \
             `patchbay gp` shows the threads it waits for",
            args.tracer
        ),
        err => err.into(),
    })?;
    if out.json() {
        out.document(&json!({
            "tracer_id": args.tracer,
            "retired": answer.retired.iter().map(json::trampoline_ref).collect::<Vec<_>>(),
            "complete": answer.complete,
        }))?;
    } else {
        out.line(&render(&answer, args.tracer, args.wait))?;
    }
    Ok(())
}

pub fn render(answer: &DetachResponse, tracer: u64, waited: bool) -> String {
    let retired = answer.retired.len();
    if retired == 0 {
        return format!("tracer {tracer} detached: no trampoline to retire");
    }
    let count = plural(retired, "trampoline");
    if answer.complete {
        format!("tracer {tracer} detached: {count} retired, grace period over (may be freed)")
    } else if waited {
        format!("tracer {tracer} detached: {count} retired, grace period not over yet")
    } else {
        format!(
            "tracer {tracer} detached: {count} retired, grace period running \
             (`patchbay gp` shows it)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::TrampolineRef;

    #[test]
    fn renders_each_outcome() {
        let none = DetachResponse {
            retired: vec![],
            complete: true,
        };
        assert_eq!(
            render(&none, 3, false),
            "tracer 3 detached: no trampoline to retire"
        );
        let one = TrampolineRef {
            agent_id: 1,
            trampoline_id: 7,
        };
        let done = DetachResponse {
            retired: vec![one],
            complete: true,
        };
        assert_eq!(
            render(&done, 3, true),
            "tracer 3 detached: 1 trampoline retired, grace period over (may be freed)"
        );
        let running = DetachResponse {
            retired: vec![one, one],
            complete: false,
        };
        assert!(render(&running, 3, false).contains("2 trampolines retired, grace period running"));
        assert!(render(&running, 3, true).contains("not over yet"));
    }
}
