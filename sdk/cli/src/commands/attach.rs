//! `patchbay attach (--pid N [--follow] | --exe PATH | --all) (--count | --trace [--args N] |
//! --latency | --custom NAME) PATTERN [--name LABEL] [--timeout-ms MS]`.
//!
//! `graph` tracers are not offered yet: the agent does not emit exit events (the SDK does
//! not build them either).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::ArgGroup;
use patchbay_sdk::proto::AttachResponse;
use patchbay_sdk::{Client, Target, Tracer, TracerSpec, names, proto};
use serde_json::json;

use crate::format::or_dash;
use crate::json;
use crate::output::Output;
use crate::progress;
use crate::table::Table;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["pid", "exe", "all"])))]
#[command(group(
    ArgGroup::new("callback")
        .required(true)
        .args(["count", "trace", "latency", "custom"])
))]
pub struct Args {
    /// Trace one running process
    #[arg(long)]
    pub pid: Option<u32>,
    /// With --pid: trace its descendants too, at any depth, now and in future (children
    /// forked or spawned, images they exec), as their agents connect
    #[arg(long, requires = "pid", conflicts_with_all = ["exe", "all"])]
    pub follow: bool,
    /// Trace every process running this executable, now and in future
    #[arg(long, value_name = "PATH")]
    pub exe: Option<String>,
    /// Trace every agent, now and in future
    #[arg(long)]
    pub all: bool,

    /// Count calls per function
    #[arg(long)]
    pub count: bool,
    /// Record one event per call (see `patchbay watch`)
    #[arg(long)]
    pub trace: bool,
    /// Measure how long each call takes (see `patchbay latency`)
    #[arg(long)]
    pub latency: bool,
    /// With --trace: record this many argument registers (0 to 6)
    #[arg(long = "args", value_name = "N", requires = "trace",
          conflicts_with_all = ["count", "custom", "latency"],
          value_parser = clap::value_parser!(u32).range(0..=6))]
    pub arg_count: Option<u32>,
    /// Use a callback the program registered under NAME
    #[arg(long, value_name = "NAME")]
    pub custom: Option<String>,

    /// Glob over demangled function names (`*`, `?`, `[...]`)
    pub pattern: String,
    /// A label for people
    #[arg(long, value_name = "LABEL")]
    pub name: Option<String>,
    /// How long to wait for the connected agents to go live [default: 10000]
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,

    /// With --pid, the agent library to inject when the process has none, as the process
    /// sees it [default: libpatchbay_agent.so next to the patchbay executable, else in
    /// ../lib/patchbay/]
    #[arg(long, env = "PATCHBAY_AGENT", value_name = "PATH", requires = "pid")]
    pub agent: Option<PathBuf>,
    /// With --pid: never inject the agent (fail when the process has none)
    #[arg(long, requires = "pid", conflicts_with = "agent")]
    pub no_inject: bool,
}

impl Args {
    fn target(&self) -> anyhow::Result<Target> {
        Ok(match (&self.pid, &self.exe) {
            (Some(pid), _) if self.follow => Target::tree(*pid),
            (Some(pid), _) => Target::pid(*pid),
            (None, Some(exe)) => Target::exe(resolve_exe(exe)?),
            (None, None) => Target::all(),
        })
    }

    pub fn spec(&self) -> anyhow::Result<TracerSpec> {
        let target = self.target()?;
        let pattern = self.pattern.clone();
        let spec = if let Some(name) = &self.custom {
            Tracer::custom(target, pattern, name.clone())
        } else if self.trace {
            Tracer::trace(target, pattern).args(self.arg_count.unwrap_or(0))
        } else if self.latency {
            Tracer::latency(target, pattern)
        } else {
            Tracer::count(target, pattern)
        };
        Ok(match &self.name {
            Some(label) => spec.name(label.clone()),
            None => spec,
        })
    }
}

/// Agents report `/proc/self/exe`, a canonical path: resolve what the user typed the same
/// way when the file exists. A path to a program not installed yet must be absolute.
fn resolve_exe(exe: &str) -> anyhow::Result<String> {
    match std::fs::canonicalize(exe) {
        Ok(path) => Ok(path.to_string_lossy().into_owned()),
        Err(_) if Path::new(exe).is_absolute() => Ok(exe.to_owned()),
        Err(err) => {
            bail!("--exe {exe}: {err}; give an absolute path for a program that is not there yet")
        }
    }
}

pub async fn run(client: &Client, args: Args, out: &mut Output) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let mut attach = client.attach(spec.clone());
    if args.pid.is_some() && !args.no_inject {
        // A process without an agent gets one injected (with ptrace, by this process).
        let exe = std::env::current_exe().ok();
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
        match crate::commands::run::launch::find_agent(
            args.agent.as_deref(),
            exe.as_deref(),
            home.as_deref(),
            Path::is_file,
        ) {
            Ok(agent) => attach = attach.inject(agent),
            Err(e) if args.agent.is_some() => return Err(e),
            Err(e) => tracing::debug!("no agent library to inject: {e}"),
        }
    }
    if let Some(ms) = args.timeout_ms {
        attach = attach.timeout(Duration::from_millis(ms.into()));
    }
    let tracer = progress::wait("attaching", attach.into_future()).await?;
    let answer = tracer
        .attach_response()
        .expect("the handle of an attach keeps its answer");
    if out.json() {
        out.document(&json!({
            "tracer": answer.tracer.as_ref().map(json::tracer),
            "results": answer.results.iter().map(json::attach_result).collect::<Vec<_>>(),
        }))?;
    } else {
        out.text(&render(answer, spec.as_proto()))?;
    }
    let tracer_id = tracer.id();
    let failed: Vec<_> = answer
        .results
        .iter()
        .filter(|r| !r.error.is_empty())
        .collect();
    if args.follow {
        // A tree tracer stays for the descendants to come: no agent matching yet is
        // no failure.
        for r in failed {
            eprintln!(
                "note: pid {}: {}; tracer {tracer_id} stays for its descendants                  (`patchbay detach {tracer_id}` removes it)",
                r.pid, r.error
            );
        }
        return Ok(());
    }
    if !failed.is_empty() && failed.len() == answer.results.len() {
        bail!(
            "tracer {tracer_id} could not be attached to any agent (pid {}: {}); \
             remove it with `patchbay detach {tracer_id}`",
            failed[0].pid,
            failed[0].error
        );
    }
    for r in failed {
        eprintln!("warning: pid {}: {}", r.pid, r.error);
    }
    Ok(())
}

pub fn render(answer: &AttachResponse, spec: &proto::TracerSpec) -> String {
    let tracer = answer.tracer.as_ref();
    let id = tracer.map_or(0, |t| t.tracer_id);
    let label = tracer
        .map(|t| &t.spec)
        .and_then(|s| s.as_ref())
        .map_or(spec.name.as_str(), |s| s.name.as_str());
    let mut text = format!(
        "tracer {id}{} attached: {} of `{}` in {}\n",
        if label.is_empty() {
            String::new()
        } else {
            format!(" ({label})")
        },
        names::callback_label(spec.callback.as_ref()),
        spec.pattern,
        names::target_label(spec.target.as_ref()),
    );
    if answer.results.is_empty() {
        text.push_str(
            "no matching agent is connected now: agents that connect later get the tracer\n",
        );
        return text;
    }
    let mut t = Table::new(&["AGENT", "PID", "PATCHED", "SKIPPED", "ERROR"]).right(&[0, 1, 2, 3]);
    for r in &answer.results {
        t.row([
            r.agent_id.to_string(),
            r.pid.to_string(),
            r.sites_patched.to_string(),
            r.sites_skipped.to_string(),
            or_dash(&r.error),
        ]);
    }
    text.push_str(&t.render());
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use patchbay_sdk::proto::{AgentAttachResult, CallbackKind, target};

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Args {
        Wrapper::try_parse_from(std::iter::once("attach").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn follow_makes_a_tree_target() {
        let s = parse(&["--pid", "42", "--follow", "--count", "f*"])
            .spec()
            .unwrap()
            .into_proto();
        assert_eq!(s.target.unwrap().target, Some(target::Target::Tree(42)));
        // --follow follows a pid.
        let bad = ["attach", "--all", "--follow", "--count", "f*"];
        assert!(Wrapper::try_parse_from(bad).is_err());
    }

    #[test]
    fn builds_specs_from_flags() {
        let s = parse(&[
            "--pid", "42", "--trace", "--args", "3", "sqlite3*", "--name", "q",
        ])
        .spec()
        .unwrap()
        .into_proto();
        assert_eq!(s.target.unwrap().target, Some(target::Target::Pid(42)));
        let cb = s.callback.unwrap();
        assert_eq!((cb.kind(), cb.arg_count), (CallbackKind::Trace, 3));
        assert_eq!((s.pattern.as_str(), s.name.as_str()), ("sqlite3*", "q"));

        let s = parse(&["--all", "--custom", "mine", "f"])
            .spec()
            .unwrap()
            .into_proto();
        assert_eq!(s.target.unwrap().target, Some(target::Target::All(true)));
        assert_eq!(s.callback.unwrap().custom_name, "mine");

        for (flag, kind) in [
            ("--count", CallbackKind::Count),
            ("--trace", CallbackKind::Trace),
            ("--latency", CallbackKind::Latency),
        ] {
            let s = parse(&["--exe", "/no/such/prog", flag, "f"])
                .spec()
                .unwrap()
                .into_proto();
            assert_eq!(s.callback.unwrap().kind(), kind);
            assert_eq!(
                s.target.unwrap().target,
                Some(target::Target::Exe("/no/such/prog".into()))
            );
        }
    }

    #[test]
    fn graph_is_not_offered() {
        let args = ["attach", "--pid", "1", "--graph", "f"];
        assert!(Wrapper::try_parse_from(args).is_err());
    }

    #[test]
    fn exe_paths_are_canonical_or_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("prog");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve_exe(link.to_str().unwrap()).unwrap(),
            canonical.to_str().unwrap()
        );
        assert_eq!(resolve_exe("/not/there").unwrap(), "/not/there");
        let err = resolve_exe("not-there-relative").unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn renders_results() {
        let spec = parse(&["--pid", "42", "--count", "sqlite3*"])
            .spec()
            .unwrap()
            .into_proto();
        let answer = AttachResponse {
            tracer: Some(proto::Tracer {
                tracer_id: 3,
                spec: Some(spec.clone()),
                ..proto::Tracer::default()
            }),
            results: vec![AgentAttachResult {
                agent_id: 1,
                pid: 42,
                sites_patched: 12,
                sites_skipped: 1,
                error: String::new(),
            }],
        };
        let text = render(&answer, &spec);
        assert!(
            text.starts_with("tracer 3 attached: count of `sqlite3*` in pid 42\n"),
            "{text}"
        );
        assert!(
            text.contains("AGENT  PID  PATCHED  SKIPPED  ERROR\n"),
            "{text}"
        );
        assert!(text.contains("    1   42       12        1  -\n"), "{text}");

        let answer = AttachResponse {
            tracer: answer.tracer,
            results: vec![],
        };
        assert!(render(&answer, &spec).contains("agents that connect later get the tracer"));
    }
}
