//! `patchbay sync [--timeout-ms MS]`.

use std::time::Duration;

use patchbay_sdk::proto::SynchronizeResponse;
use patchbay_sdk::{Client, Error};
use serde_json::json;

use crate::format::{micros, plural};
use crate::output::Output;
use crate::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Give up after this long [default: 30000]
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut request = client.synchronize();
    if let Some(ms) = args.timeout_ms {
        request = request.timeout(Duration::from_millis(ms.into()));
    }
    let answer = progress::wait("waiting for a grace period", request.into_future())
        .await
        .map_err(|err| match err {
            Error::DeadlineExceeded(msg) => anyhow::anyhow!(
                "{msg}\n  hint: `patchbay gp` shows the threads it waits for and any stalls"
            ),
            err => err.into(),
        })?;
    if out.json() {
        out.document(&json!({
            "agents": answer.agents,
            "threads": answer.threads,
            "elapsed_us": answer.elapsed_us,
        }))?;
    } else {
        out.line(&render(&answer))?;
    }
    Ok(())
}

pub fn render(answer: &SynchronizeResponse) -> String {
    format!(
        "grace period complete: {}, {} in {}",
        plural(answer.agents as usize, "agent"),
        plural(answer.threads as usize, "thread"),
        micros(answer.elapsed_us)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_summary() {
        let answer = SynchronizeResponse {
            agents: 2,
            threads: 1,
            elapsed_us: 1234,
        };
        assert_eq!(
            render(&answer),
            "grace period complete: 2 agents, 1 thread in 1.234ms"
        );
    }
}
