//! `patchbay gp`: pending grace periods, their holdout threads, and stalls.

use patchbay_sdk::Client;
use patchbay_sdk::proto::{GracePeriodInfo, grace_period_info};
use serde_json::json;

use crate::format::{hex, list, millis, or_dash};
use crate::json;
use crate::output::Output;
use crate::table::Table;

pub async fn run(client: &Client, out: &mut Output) -> anyhow::Result<()> {
    let mut pending = client.grace_periods().await?;
    pending.sort_by_key(|g| (g.agent_id, std::cmp::Reverse(g.waited_ms)));
    if out.json() {
        out.document(&json!({
            "pending": pending.iter().map(json::grace_period).collect::<Vec<_>>(),
        }))?;
    } else {
        out.text(&render(&pending))?;
    }
    Ok(())
}

fn purpose(g: &GracePeriodInfo) -> String {
    match g.purpose {
        Some(grace_period_info::Purpose::TrampolineId(id)) => format!("free trampoline {id}"),
        Some(grace_period_info::Purpose::SynchronizeId(id)) => format!("synchronize {id}"),
        None => "-".to_owned(),
    }
}

pub fn render(pending: &[GracePeriodInfo]) -> String {
    if pending.is_empty() {
        return "no grace period in progress\n".to_owned();
    }
    let mut t = Table::new(&["AGENT", "PID", "WAITING TO", "EPOCH", "WAITED", "HOLDOUTS"])
        .right(&[0, 1, 3, 4]);
    // A thread may hold up several grace periods: list each stall once.
    let mut stalls = Vec::new();
    for g in pending {
        let tids: Vec<u32> = g.holdouts.iter().map(|h| h.tid).collect();
        t.row([
            g.agent_id.to_string(),
            g.pid.to_string(),
            purpose(g),
            g.epoch.to_string(),
            millis(g.waited_ms),
            list(&tids, 10),
        ]);
        for h in &g.holdouts {
            if let Some(stall) = &h.stall
                && !stalls
                    .iter()
                    .any(|(a, s): &(u64, &patchbay_sdk::proto::Stall)| {
                        *a == g.agent_id && s.tid == stall.tid
                    })
            {
                stalls.push((g.agent_id, stall));
            }
        }
    }
    let mut text = t.render();
    if !stalls.is_empty() {
        stalls.sort_by_key(|(_, s)| std::cmp::Reverse(s.duration_ms));
        let pid_of = |agent: u64| {
            pending
                .iter()
                .find(|g| g.agent_id == agent)
                .map_or(0, |g| g.pid)
        };
        let mut s =
            Table::new(&["PID", "TID", "PC", "SYMBOL", "STALLED", "REASON"]).right(&[0, 1, 4]);
        for (agent, stall) in &stalls {
            s.row([
                pid_of(*agent).to_string(),
                stall.tid.to_string(),
                hex(stall.pc),
                or_dash(&stall.symbol),
                millis(stall.duration_ms),
                or_dash(&stall.reason),
            ]);
        }
        text.push_str(&format!("\nstalls ({}):\n", stalls.len()));
        text.push_str(&s.render());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::{Holdout, Stall};

    #[test]
    fn renders_pending_and_stalls_once() {
        let stall = Stall {
            tid: 44,
            pc: 0x7f00_0010,
            symbol: "trampoline #7".into(),
            duration_ms: 1500,
            reason: String::new(),
        };
        let holdouts = vec![
            Holdout {
                tid: 43,
                stall: None,
            },
            Holdout {
                tid: 44,
                stall: Some(stall),
            },
        ];
        let pending = [
            GracePeriodInfo {
                agent_id: 1,
                pid: 42,
                purpose: Some(grace_period_info::Purpose::TrampolineId(7)),
                epoch: 5,
                waited_ms: 1600,
                holdouts: holdouts.clone(),
            },
            GracePeriodInfo {
                agent_id: 1,
                pid: 42,
                purpose: Some(grace_period_info::Purpose::SynchronizeId(2)),
                epoch: 6,
                waited_ms: 300,
                holdouts,
            },
        ];
        let text = render(&pending);
        let expected = "\
AGENT  PID  WAITING TO         EPOCH  WAITED  HOLDOUTS
    1   42  free trampoline 7      5    1.6s  43,44
    1   42  synchronize 2          6   300ms  43,44

stalls (1):
PID  TID  PC          SYMBOL         STALLED  REASON
 42   44  0x7f000010  trampoline #7     1.5s  -
";
        assert_eq!(text, expected);
    }

    #[test]
    fn says_when_nothing_is_pending() {
        assert_eq!(render(&[]), "no grace period in progress\n");
    }
}
