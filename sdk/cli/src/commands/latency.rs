//! `patchbay latency TRACER [--function NAME]`: a table per function (calls, total,
//! min, percentiles, max, abandoned frames), or for one function an ASCII histogram in
//! the shape of bpftrace's `hist()`.

use patchbay_sdk::proto::{FunctionLatency, LatencyResponse};
use patchbay_sdk::{Client, TracerId};
use serde_json::{Value, json};

use crate::output::Output;
use crate::table::Table;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Id of a `latency` tracer (see `patchbay tracers`)
    #[arg(value_name = "TRACER")]
    pub tracer: u64,
    /// Show this function's histogram (exact demangled name)
    #[arg(long, value_name = "NAME")]
    pub function: Option<String>,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let answer = client
        .tracer(TracerId::new(args.tracer))
        .latency_figures()
        .await?;
    if let Some(name) = &args.function {
        let Some(f) = answer.functions.iter().find(|f| &f.function == name) else {
            anyhow::bail!(
                "tracer {} has no latency figures for function '{name}' (see `patchbay latency {}` for the functions it measured)",
                args.tracer,
                args.tracer
            );
        };
        if out.json() {
            out.document(&row(f))?;
        } else {
            out.text(
                &(render(&LatencyResponse {
                    functions: vec![f.clone()],
                }) + "\n"
                    + &histogram(f)),
            )?;
        }
        return Ok(());
    }
    if out.json() {
        let rows: Vec<Value> = answer.functions.iter().map(row).collect();
        out.document(&json!({ "functions": rows }))?;
    } else {
        out.text(&render(&answer))?;
    }
    Ok(())
}

/// The JSON row of one function (the field names `patchbay run --latency --json` uses).
pub fn row(f: &FunctionLatency) -> Value {
    json!({
        "function": f.function,
        "calls": f.calls,
        "total_ns": f.total_ns,
        "min_ns": f.min_ns,
        "max_ns": f.max_ns,
        "p50_ns": f.p50_ns,
        "p90_ns": f.p90_ns,
        "p99_ns": f.p99_ns,
        "abandoned": f.abandoned,
        "overflow": f.overflow,
        "entries": f.entries,
        "buckets": f.buckets.iter().map(|b| json!([b.low_ns, b.high_ns, b.count])).collect::<Vec<_>>(),
    })
}

/// A duration for people: ns, us, ms or s with three significant digits at most.
pub fn dur(ns: u64) -> String {
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        trim(format!("{:.3}", f / 1e3)) + "us"
    } else if ns < 1_000_000_000 {
        trim(format!("{:.3}", f / 1e6)) + "ms"
    } else {
        trim(format!("{:.3}", f / 1e9)) + "s"
    }
}

fn trim(s: String) -> String {
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

pub fn render(answer: &LatencyResponse) -> String {
    if answer.functions.is_empty() {
        return "no calls measured yet\n".to_owned();
    }
    let mut t = Table::new(&[
        "FUNCTION",
        "CALLS",
        "TOTAL",
        "MIN",
        "P50",
        "P90",
        "P99",
        "MAX",
        "ABANDONED",
    ])
    .right(&[1, 2, 3, 4, 5, 6, 7, 8]);
    for f in &answer.functions {
        t.row([
            f.function.clone(),
            f.calls.to_string(),
            dur(f.total_ns),
            dur(f.min_ns),
            dur(f.p50_ns),
            dur(f.p90_ns),
            dur(f.p99_ns),
            dur(f.max_ns),
            f.abandoned.to_string(),
        ]);
    }
    t.render()
}

/// The histogram of one function, like bpftrace's `hist()`: one line per non-empty
/// bucket, `[low, high)  count |@@@@...|`, bars scaled to the fullest bucket.
pub fn histogram(f: &FunctionLatency) -> String {
    const WIDTH: u64 = 52;
    let peak = f.buckets.iter().map(|b| b.count).max().unwrap_or(0);
    if peak == 0 {
        return "no calls measured yet\n".to_owned();
    }
    let labels: Vec<String> = f
        .buckets
        .iter()
        .map(|b| format!("[{}, {})", dur(b.low_ns), dur(b.high_ns)))
        .collect();
    let w = labels.iter().map(String::len).max().unwrap_or(0);
    let mut s = format!("{}\n", f.function);
    for (b, label) in f.buckets.iter().zip(&labels) {
        let bar = (b.count * WIDTH).div_ceil(peak) as usize;
        s.push_str(&format!(
            "{label:<w$} {:>10} |{:<width$}|\n",
            b.count,
            "@".repeat(bar),
            width = WIDTH as usize
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::LatencyBucket;

    fn f() -> FunctionLatency {
        FunctionLatency {
            function: "work".into(),
            calls: 30,
            total_ns: 61_000,
            min_ns: 100,
            max_ns: 40_000,
            p50_ns: 120,
            p90_ns: 2_500,
            p99_ns: 40_000,
            abandoned: 2,
            overflow: 0,
            entries: 32,
            buckets: vec![
                LatencyBucket {
                    low_ns: 96,
                    high_ns: 128,
                    count: 26,
                },
                LatencyBucket {
                    low_ns: 2048,
                    high_ns: 3072,
                    count: 3,
                },
                LatencyBucket {
                    low_ns: 32768,
                    high_ns: 40_000,
                    count: 1,
                },
            ],
            agents: 1,
        }
    }

    #[test]
    fn table_shows_durations_for_people() {
        let text = render(&LatencyResponse {
            functions: vec![f()],
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("FUNCTION"));
        for want in ["work", "30", "61us", "100ns", "120ns", "2.5us", "40us", "2"] {
            assert!(
                lines[1].split_whitespace().any(|c| c == want),
                "{want} in {}",
                lines[1]
            );
        }
        assert_eq!(
            render(&LatencyResponse::default()),
            "no calls measured yet\n"
        );
    }

    #[test]
    fn histogram_bars_scale_to_the_fullest_bucket() {
        let h = histogram(&f());
        let lines: Vec<&str> = h.lines().collect();
        assert_eq!(lines[0], "work");
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("[96ns, 128ns)"));
        assert_eq!(lines[1].matches('@').count(), 52);
        assert_eq!(lines[2].matches('@').count(), 6);
        assert_eq!(lines[3].matches('@').count(), 2);
    }

    #[test]
    fn json_rows_carry_the_documented_fields() {
        let r = row(&f());
        for k in [
            "function",
            "calls",
            "total_ns",
            "min_ns",
            "max_ns",
            "p50_ns",
            "p90_ns",
            "p99_ns",
            "abandoned",
        ] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert_eq!(r["buckets"][0], json!([96, 128, 26]));
    }
}
