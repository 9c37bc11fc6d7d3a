//! `patchbay watch TRACER`: one line per event until Ctrl-C or the end of the stream.

use std::collections::HashMap;
use std::io::IsTerminal;

use patchbay_sdk::proto::{Event, EventBatchView};
use patchbay_sdk::{Client, TracerId};

use crate::format::{hex, plural, timestamp};
use crate::json;
use crate::output::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Id of a `trace` tracer (see `patchbay tracers`)
    #[arg(value_name = "TRACER")]
    pub tracer: u64,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut stream = client.tracer(TracerId::new(args.tracer)).events().await?;
    if std::io::stderr().is_terminal() {
        eprintln!("watching tracer {} (Ctrl-C to stop)", args.tracer);
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut drops = DropTracker::default();
    loop {
        let batch = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            batch = stream.next_batch() => batch?,
        };
        let Some(batch) = batch else {
            eprintln!("the event stream of tracer {} ended", args.tracer);
            return Ok(());
        };
        for event in &batch.events {
            if out.json() {
                out.json_line(&json::event(&batch, event))?;
            } else {
                out.line(&line(&batch, event))?;
            }
        }
        if let Some(warning) = drops.update(&batch) {
            eprintln!("{warning}");
        }
    }
}

/// `12345.000000042  pid=42  tid=43  sqlite3_step(0x1, 0x7f00)`.
pub fn line(batch: &EventBatchView, e: &Event) -> String {
    let function = if e.function.is_empty() {
        hex(e.address)
    } else {
        e.function.clone()
    };
    let mut text = format!(
        "{}  pid={}  tid={}  {function}",
        timestamp(e.timestamp_ns),
        batch.pid,
        e.tid
    );
    if !e.args.is_empty() {
        let args: Vec<String> = e.args.iter().map(|a| hex(*a)).collect();
        text.push_str(&format!("({})", args.join(", ")));
    }
    text
}

/// Turns the cumulative per-agent drop counters of batches into warnings when they grow.
#[derive(Default)]
pub struct DropTracker {
    seen: HashMap<u64, u64>,
}

impl DropTracker {
    pub fn update(&mut self, batch: &EventBatchView) -> Option<String> {
        let last = self.seen.entry(batch.agent_id).or_insert(0);
        if batch.dropped <= *last {
            return None;
        }
        let new = batch.dropped - *last;
        *last = batch.dropped;
        Some(format!(
            "warning: pid {} dropped {} of tracer {} ({} in total)",
            batch.pid,
            plural(new as usize, "event"),
            batch.tracer_id,
            batch.dropped
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(agent_id: u64, dropped: u64) -> EventBatchView {
        EventBatchView {
            agent_id,
            pid: 42,
            tracer_id: 3,
            events: vec![],
            dropped,
        }
    }

    #[test]
    fn formats_events() {
        let b = batch(1, 0);
        let e = Event {
            timestamp_ns: 5_000_000_123,
            tid: 43,
            address: 0x401000,
            function: "sqlite3_step".into(),
            args: vec![1, 0x7f00],
        };
        assert_eq!(
            line(&b, &e),
            "5.000000123  pid=42  tid=43  sqlite3_step(0x1, 0x7f00)"
        );
        let unknown = Event {
            function: String::new(),
            args: vec![],
            ..e
        };
        assert_eq!(line(&b, &unknown), "5.000000123  pid=42  tid=43  0x401000");
    }

    #[test]
    fn warns_only_when_drops_grow() {
        let mut t = DropTracker::default();
        assert_eq!(t.update(&batch(1, 0)), None);
        assert_eq!(
            t.update(&batch(1, 5)).unwrap(),
            "warning: pid 42 dropped 5 events of tracer 3 (5 in total)"
        );
        assert_eq!(t.update(&batch(1, 5)), None);
        assert!(t.update(&batch(1, 7)).unwrap().contains("dropped 2 events"));
        assert!(
            t.update(&batch(2, 1))
                .unwrap()
                .contains("dropped 1 event of")
        );
    }
}
