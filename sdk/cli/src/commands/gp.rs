//! `patchbay gp`: pending grace periods, their holdout threads, and stalls; with
//! `--timeline`, the last grace periods step by step.

use patchbay_sdk::Client;
use patchbay_sdk::proto::{GracePeriodInfo, GraceTimeline, grace_period_info};
use patchbay_sdk::timeline;
use serde_json::json;

use crate::format::{hex, list, millis, or_dash};
use crate::json;
use crate::output::Output;
use crate::table::Table;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also show the last N trampoline grace periods step by step (default 1; the
    /// server keeps 64): every step of the server and the agent, with the time since
    /// the first and since the previous step, and where the time went
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "1")]
    pub timeline: Option<u32>,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut pending = client.grace_periods().await?;
    pending.sort_by_key(|g| (g.agent_id, std::cmp::Reverse(g.waited_ms)));
    let timelines = match args.timeline {
        Some(n) if n > 0 => Some(client.grace_timelines(n).await?),
        _ => None,
    };
    if out.json() {
        let mut doc = json!({
            "pending": pending.iter().map(json::grace_period).collect::<Vec<_>>(),
        });
        if let Some(t) = &timelines {
            doc["timelines"] = t.iter().map(timeline_json).collect();
        }
        out.document(&doc)?;
    } else {
        let mut text = render(&pending);
        if let Some(t) = &timelines {
            text.push_str(&render_timelines(t));
        }
        out.text(&text)?;
    }
    Ok(())
}

/// Microseconds with one decimal: `12.3us`.
fn us(ns: u64) -> String {
    format!("{:.1}us", ns as f64 / 1000.0)
}

/// The timelines for people: per grace period a header, its steps (time since the
/// first step, since the previous one) and its phases.
pub fn render_timelines(ts: &[GraceTimeline]) -> String {
    if ts.is_empty() {
        return "\nno grace period recorded\n".to_owned();
    }
    let mut text = String::new();
    for t in ts {
        let total = timeline::total_ns(t).map_or("not authorized yet".to_owned(), |ns| {
            format!("{} to free authorized", us(ns))
        });
        text.push_str(&format!(
            "\ntrampoline {} of pid {} (agent {}), epoch {}: {}{}\n",
            t.trampoline_id,
            t.pid,
            t.agent_id,
            t.epoch,
            total,
            if t.steps_dropped > 0 {
                format!(" ({} steps left out)", t.steps_dropped)
            } else {
                String::new()
            }
        ));
        let mut table = Table::new(&["AT", "+PREV", "SIDE", "STEP", "TID"]).right(&[0, 1, 4]);
        let start = t.steps.first().map_or(0, |s| s.at_ns);
        let mut prev = start;
        for s in &t.steps {
            let (side, name) = timeline::step_name(s.step);
            table.row([
                us(s.at_ns.saturating_sub(start)),
                us(s.at_ns.saturating_sub(prev)),
                side.to_owned(),
                name,
                if s.tid == 0 {
                    "-".to_owned()
                } else {
                    s.tid.to_string()
                },
            ]);
            prev = s.at_ns;
        }
        text.push_str(&table.render());
        if !timeline::has_agent_steps(t) {
            text.push_str("(the agent's steps arrive once it freed the trampoline)\n");
        }
        let phases = timeline::phases(t)
            .iter()
            .map(|p| format!("{} {}", p.name, p.ns.map_or("?".to_owned(), us)))
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!("where the time went: {phases}\n"));
    }
    text
}

/// One timeline as JSON: its fields, its steps and its phases (nanoseconds).
pub fn timeline_json(t: &GraceTimeline) -> serde_json::Value {
    json!({
        "agent_id": t.agent_id,
        "pid": t.pid,
        "trampoline_id": t.trampoline_id,
        "epoch": t.epoch,
        "authorized": t.authorized,
        "steps_dropped": t.steps_dropped,
        "total_ns": timeline::total_ns(t),
        "steps": t.steps.iter().map(|s| {
            let (side, name) = timeline::step_name(s.step);
            json!({ "at_ns": s.at_ns, "side": side, "step": name, "tid": s.tid })
        }).collect::<Vec<_>>(),
        "phases": timeline::phases(t).iter().map(|p| json!({ "phase": p.name, "ns": p.ns }))
            .collect::<Vec<_>>(),
    })
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

    #[test]
    fn renders_a_timeline_with_its_phases() {
        use patchbay_sdk::proto::{GraceStep, GraceTimelineStep};
        let step = |at_ns, s: GraceStep, tid| GraceTimelineStep {
            at_ns,
            step: s as i32,
            tid,
        };
        let t = GraceTimeline {
            agent_id: 1,
            pid: 42,
            trampoline_id: 7,
            epoch: 5,
            authorized: true,
            steps: vec![
                step(1_000, GraceStep::ServerRemoveSent, 0),
                step(2_000, GraceStep::AgentRemoveReceived, 0),
                step(3_500, GraceStep::AgentSignalSent, 43),
                step(9_000, GraceStep::ServerAuthorizeSent, 0),
            ],
            steps_dropped: 0,
        };
        let text = render_timelines(std::slice::from_ref(&t));
        let expected = "
trampoline 7 of pid 42 (agent 1), epoch 5: 8.0us to free authorized
   AT  +PREV  SIDE    STEP             TID
0.0us  0.0us  server  remove sent        -
1.0us  1.0us  agent   remove received    -
2.5us  1.5us  agent   signal sent       43
8.0us  5.5us  server  authorize sent     -
where the time went: request to agent 1.0us, unpatch ?, epoch bump, thread scan, Retired ?, until the last holdout's evidence ?, agent thread sees it ?, report to authorization ?
";
        assert_eq!(text, expected);
        let v = timeline_json(&t);
        assert_eq!(v["total_ns"], 8000);
        assert_eq!(v["steps"][2]["step"], "signal sent");
        assert_eq!(v["steps"][2]["side"], "agent");
        assert_eq!(v["phases"][0]["ns"], 1000);
        assert!(v["phases"][1]["ns"].is_null());
        assert_eq!(render_timelines(&[]), "\nno grace period recorded\n");
    }
}
