//! `patchbay tracers`.

use patchbay_sdk::proto::Tracer;
use patchbay_sdk::{Client, names};
use serde_json::json;

use crate::format::or_dash;
use crate::json;
use crate::output::Output;
use crate::table::Table;

pub async fn run(client: &Client, out: &mut Output) -> anyhow::Result<()> {
    let mut tracers = client.tracers().await?;
    tracers.sort_by_key(|t| t.tracer_id);
    if out.json() {
        out.document(&json!({ "tracers": tracers.iter().map(json::tracer).collect::<Vec<_>>() }))?;
    } else if tracers.is_empty() {
        out.line("no tracers: attach one with `patchbay attach`")?;
    } else {
        out.text(&table(&tracers))?;
    }
    Ok(())
}

pub fn table(tracers: &[Tracer]) -> String {
    let mut t = Table::new(&[
        "ID", "NAME", "STATE", "CALLBACK", "TARGET", "PATTERN", "AGENTS", "SITES", "DROPPED",
        "OWNER",
    ])
    .right(&[0, 6, 7, 8, 9]);
    for tr in tracers {
        let spec = tr.spec.clone().unwrap_or_default();
        t.row([
            tr.tracer_id.to_string(),
            or_dash(&spec.name),
            names::tracer_state(tr.state).to_owned(),
            names::callback_label(spec.callback.as_ref()),
            names::target_label(spec.target.as_ref()),
            spec.pattern,
            tr.agents.to_string(),
            tr.sites.to_string(),
            tr.dropped.to_string(),
            tr.owner_uid.to_string(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::{CallbackKind, CallbackSpec, TracerSpec, TracerState};
    use patchbay_sdk::{Target, Tracer as Spec};

    #[test]
    fn renders_tracers() {
        let tracers = [Tracer {
            tracer_id: 2,
            // The server accepts `latency` tracers from any Control client: they are shown.
            spec: Some(TracerSpec {
                callback: Some(CallbackSpec {
                    kind: CallbackKind::Latency as i32,
                    ..CallbackSpec::default()
                }),
                ..Spec::count(Target::exe("/bin/x"), "f*").into_proto()
            }),
            owner_uid: 1000,
            state: TracerState::Detaching as i32,
            agents: 1,
            sites: 4,
            dropped: 0,
            processes_matched: 1,
        }];
        let text = table(&tracers);
        let row = text.lines().nth(1).unwrap();
        assert_eq!(
            row,
            " 2  -     detaching  latency   exe /bin/x  f*            1      4        0   1000"
        );
    }
}
