//! `patchbay counts TRACER`.

use patchbay_sdk::proto::{CountsResponse, FunctionCount};
use patchbay_sdk::{Client, TracerId};
use serde_json::json;

use crate::output::Output;
use crate::table::Table;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Id of a `count` tracer (see `patchbay tracers`)
    #[arg(value_name = "TRACER")]
    pub tracer: u64,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let mut answer = client.tracer(TracerId::new(args.tracer)).counts().await?;
    sort(&mut answer.counts);
    if out.json() {
        let counts: Vec<_> = answer
            .counts
            .iter()
            .map(|c| json!({ "function": c.function, "count": c.count, "agents": c.agents }))
            .collect();
        out.document(&json!({ "counts": counts, "total": answer.total }))?;
    } else {
        out.text(&render(&answer))?;
    }
    Ok(())
}

/// Highest count first; ties by name.
pub fn sort(counts: &mut [FunctionCount]) {
    counts.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.function.cmp(&b.function))
    });
}

pub fn render(answer: &CountsResponse) -> String {
    if answer.counts.is_empty() {
        return "no calls counted yet\n".to_owned();
    }
    let mut t = Table::new(&["FUNCTION", "COUNT", "AGENTS"]).right(&[1, 2]);
    for c in &answer.counts {
        t.row([
            c.function.clone(),
            c.count.to_string(),
            c.agents.to_string(),
        ]);
    }
    let mut text = t.render();
    text.push_str(&format!("total: {} calls\n", answer.total));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(function: &str, count: u64) -> FunctionCount {
        FunctionCount {
            function: function.into(),
            count,
            agents: 1,
        }
    }

    #[test]
    fn sorts_by_count_then_name() {
        let mut counts = vec![c("b", 5), c("a", 1), c("c", 9), c("a2", 5)];
        sort(&mut counts);
        let order: Vec<&str> = counts.iter().map(|c| c.function.as_str()).collect();
        assert_eq!(order, ["c", "a2", "b", "a"]);
    }

    #[test]
    fn renders_table_and_total() {
        let answer = CountsResponse {
            counts: vec![c("sqlite3_step", 1200), c("main", 1)],
            total: 1201,
            processes: Vec::new(),
        };
        assert_eq!(
            render(&answer),
            "FUNCTION      COUNT  AGENTS\nsqlite3_step   1200       1\nmain              1       1\ntotal: 1201 calls\n"
        );
        assert_eq!(render(&CountsResponse::default()), "no calls counted yet\n");
    }
}
