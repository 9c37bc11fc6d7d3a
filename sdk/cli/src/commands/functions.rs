//! `patchbay functions --pid N [PATTERN] [--limit N]`.

use patchbay_sdk::Client;
use patchbay_sdk::proto::ListFunctionsResponse;
use serde_json::json;

use crate::format::{hex, or_dash, yes_no};
use crate::json;
use crate::output::Output;
use crate::table::Table;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Process whose functions to list
    #[arg(long)]
    pub pid: u32,
    /// Glob over demangled names (`*`, `?`, `[...]`) [default: all functions]
    pub pattern: Option<String>,
    /// Show at most N functions
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let pattern = args.pattern.as_deref().unwrap_or("");
    let mut request = client.functions(args.pid).pattern(pattern);
    if let Some(limit) = args.limit {
        request = request.limit(limit);
    }
    let answer = request.await?;
    if out.json() {
        out.document(&json!({
            "functions": answer.functions.iter().map(json::function).collect::<Vec<_>>(),
            "total": answer.total,
        }))?;
    } else {
        out.text(&render(&answer, args.pid, pattern))?;
    }
    Ok(())
}

pub fn render(answer: &ListFunctionsResponse, pid: u32, pattern: &str) -> String {
    if answer.functions.is_empty() {
        let pattern = if pattern.is_empty() { "*" } else { pattern };
        return format!("no function of pid {pid} matches `{pattern}`\n");
    }
    let mut t = Table::new(&["ADDRESS", "SITE", "PATCHABLE", "OBJECT", "NAME", "REASON"]);
    for f in &answer.functions {
        t.row([
            hex(f.address),
            patchbay_sdk::names::site_kind(f.site_kind).to_owned(),
            yes_no(f.patchable).to_owned(),
            or_dash(&f.object),
            f.name.clone(),
            if f.patchable {
                String::new()
            } else {
                or_dash(&f.reason)
            },
        ]);
    }
    let mut text = t.render();
    let shown = answer.functions.len();
    if (answer.total as usize) > shown {
        text.push_str(&format!(
            "showing {shown} of {} matching functions (raise --limit to see more)\n",
            answer.total
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_sdk::proto::{Function, SiteKind};

    fn f(name: &str, patchable: bool) -> Function {
        Function {
            name: name.into(),
            address: 0x1000,
            object: "/bin/x".into(),
            patchable,
            site_kind: if patchable { SiteKind::Nop5 as i32 } else { 0 },
            reason: if patchable {
                String::new()
            } else {
                "too short".into()
            },
            ..Function::default()
        }
    }

    #[test]
    fn renders_functions_and_limit_footer() {
        let relocated = Function {
            site_kind: SiteKind::Relocated as i32,
            ..f("read", true)
        };
        let answer = ListFunctionsResponse {
            functions: vec![f("main", true), relocated, f("tiny", false)],
            total: 5,
        };
        let text = render(&answer, 7, "*");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ADDRESS  SITE       PATCHABLE  OBJECT  NAME  REASON"
        );
        assert_eq!(lines[1], "0x1000   nop5       yes        /bin/x  main");
        assert_eq!(lines[2], "0x1000   relocated  yes        /bin/x  read");
        assert_eq!(
            lines[3],
            "0x1000   none       no         /bin/x  tiny  too short"
        );
        assert!(text.ends_with("showing 3 of 5 matching functions (raise --limit to see more)\n"));
    }

    #[test]
    fn says_when_nothing_matches() {
        let answer = ListFunctionsResponse::default();
        assert_eq!(render(&answer, 7, ""), "no function of pid 7 matches `*`\n");
    }
}
