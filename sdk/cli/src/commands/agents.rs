//! `patchbay agents`.

use patchbay_sdk::Client;
use patchbay_sdk::proto::AgentInfo;
use serde_json::json;

use crate::format::{list, or_dash};
use crate::json;
use crate::output::Output;
use crate::table::Table;

const NO_AGENTS: &str =
    "no agents: start a program with LD_PRELOAD=libpatchbay_agent.so (or link patchbay-agent)";

pub async fn run(client: &Client, out: &mut Output) -> anyhow::Result<()> {
    let mut agents = client.agents().await?;
    agents.sort_by_key(|a| a.agent_id);
    if out.json() {
        out.document(&json!({ "agents": agents.iter().map(json::agent).collect::<Vec<_>>() }))?;
    } else if agents.is_empty() {
        out.line(NO_AGENTS)?;
    } else {
        out.text(&table(&agents))?;
    }
    Ok(())
}

pub fn table(agents: &[AgentInfo]) -> String {
    let mut t = Table::new(&[
        "AGENT",
        "PID",
        "UID",
        "STATE",
        "ARRIVED",
        "THREADS",
        "EPOCH",
        "TRAMPOLINES",
        "VERSION",
        "EXE",
        "CALLBACKS",
    ])
    .right(&[0, 1, 2, 5, 6, 7]);
    for a in agents {
        t.row([
            a.agent_id.to_string(),
            a.pid.to_string(),
            a.uid.to_string(),
            if a.connected {
                "connected"
            } else {
                "disconnected"
            }
            .to_owned(),
            json::arrival(a.arrival).to_owned(),
            a.threads.to_string(),
            a.epoch.to_string(),
            a.trampolines.to_string(),
            or_dash(&a.agent_version),
            or_dash(&a.exe),
            list(&a.callbacks, 8),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_agents() {
        let agents = [AgentInfo {
            agent_id: 1,
            pid: 4242,
            uid: 1000,
            exe: "/usr/bin/foo".into(),
            agent_version: "0.1.0".into(),
            connected: true,
            threads: 3,
            epoch: 9,
            callbacks: vec!["mine".into()],
            trampolines: 2,
            arrival: patchbay_sdk::proto::Arrival::Injected as i32,
            ..AgentInfo::default()
        }];
        let text = table(&agents);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("AGENT   PID   UID  STATE"), "{text}");
        assert!(lines[1].contains("4242"));
        assert!(lines[1].contains("connected  injected"), "{text}");
        assert!(lines[1].contains("/usr/bin/foo"));
        assert!(lines[1].ends_with("mine"));
    }
}
