//! `patchbay trampolines [--pid N] [--all]`.

use patchbay_sdk::proto::{TrampolineInfo, TrampolineState};
use patchbay_sdk::{Client, names};
use serde_json::json;

use crate::format::{list, millis};
use crate::json;
use crate::output::Output;
use crate::table::Table;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the trampolines of this process
    #[arg(long)]
    pub pid: Option<u32>,
    /// Include freed trampolines the server still remembers
    #[arg(long)]
    pub all: bool,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut request = client.trampolines();
    if let Some(pid) = args.pid {
        request = request.pid(pid);
    }
    if args.all {
        request = request.include_freed();
    }
    let mut trampolines = request.await?;
    trampolines.sort_by_key(|t| (t.agent_id, t.trampoline_id));
    if out.json() {
        out.document(&json!({
            "trampolines": trampolines.iter().map(json::trampoline).collect::<Vec<_>>(),
        }))?;
    } else if trampolines.is_empty() {
        out.line("no trampolines")?;
    } else {
        out.text(&table(&trampolines))?;
    }
    Ok(())
}

pub fn table(trampolines: &[TrampolineInfo]) -> String {
    let mut t = Table::new(&[
        "AGENT", "PID", "ID", "STATE", "TRACERS", "SITES", "EPOCH", "HOLDOUTS", "AGE",
    ])
    .right(&[0, 1, 2, 5, 6, 8]);
    for tr in trampolines {
        let retired = tr.state >= TrampolineState::Retired as i32;
        t.row([
            tr.agent_id.to_string(),
            tr.pid.to_string(),
            tr.trampoline_id.to_string(),
            names::trampoline_state(tr.state).to_owned(),
            list(&tr.tracer_ids, 8),
            tr.sites.to_string(),
            if retired {
                tr.retired_epoch.to_string()
            } else {
                "-".to_owned()
            },
            list(&tr.holdouts, 8),
            millis(tr.state_age_ms),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_trampolines() {
        let live = TrampolineInfo {
            agent_id: 1,
            pid: 42,
            trampoline_id: 7,
            tracer_ids: vec![1, 2],
            sites: 10,
            state: TrampolineState::Live as i32,
            state_age_ms: 2500,
            ..TrampolineInfo::default()
        };
        let retired = TrampolineInfo {
            trampoline_id: 8,
            state: TrampolineState::Retired as i32,
            retired_epoch: 5,
            holdouts: vec![43, 44],
            state_age_ms: 12,
            ..live.clone()
        };
        let text = table(&[live, retired]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "AGENT  PID  ID  STATE    TRACERS  SITES  EPOCH  HOLDOUTS   AGE"
        );
        assert_eq!(
            lines[1],
            "    1   42   7  live     1,2         10      -  -         2.5s"
        );
        assert_eq!(
            lines[2],
            "    1   42   8  retired  1,2         10      5  43,44     12ms"
        );
    }
}
