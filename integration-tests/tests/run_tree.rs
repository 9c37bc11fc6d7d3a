//! `patchbay run` follows the whole process tree (issue 15): through `sh -c`, a bash
//! script that starts two instances in parallel, an `exec` chain, a program that forks
//! workers, and a child that exits before the agent's first flush. The summed counts
//! equal the sum of what each process says it called, exactly, per process too, and
//! the programs' output is what they print without patchbay.

use std::collections::BTreeMap;
use std::path::Path;

use integration_tests::fixtures;
use integration_tests::run::{RunOutput, run_counting, run_with};

const PATTERN: &str = "tree_f*";

/// `pid -> (tree_f1, tree_f2)` from the `tree_prog <pid> tree_f1=N tree_f2=M` lines.
fn own_counts(lines: &[String]) -> BTreeMap<u32, (u64, u64)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("tree_prog "))
        .map(|l| {
            let mut it = l.split_whitespace();
            let pid = it.next().unwrap().parse().unwrap();
            let mut num = |prefix: &str| {
                it.next()
                    .and_then(|kv| kv.strip_prefix(prefix))
                    .unwrap_or_else(|| panic!("bad line {l}"))
                    .parse()
                    .unwrap()
            };
            let f1 = num("tree_f1=");
            let f2 = num("tree_f2=");
            (pid, (f1, f2))
        })
        .collect()
}

/// Checks that the run's totals and per-process counts equal the programs' own.
fn check_exact(run: &RunOutput, expect_processes: usize) {
    let own = own_counts(&run.program);
    assert_eq!(
        own.len(),
        expect_processes,
        "program lines: {:?}\n{}",
        run.program,
        run.stderr
    );
    let (f1, f2) = own.values().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    let counted = run.counted();
    let get = |f: &str| counted.get(f).copied().unwrap_or(0);
    assert_eq!(
        (get("tree_f1"), get("tree_f2")),
        (f1, f2),
        "summed counts differ from the programs' own {own:?}: {}\n{}",
        run.json,
        run.stderr
    );
    let procs = run.json["processes"].as_array().expect("processes");
    for (pid, (f1, f2)) in &own {
        let p = procs
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(*pid)))
            .unwrap_or_else(|| panic!("pid {pid} not in {procs:?}"));
        let count = |f: &str| {
            p["counts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["function"] == f)
                .map_or(0, |c| c["count"].as_u64().unwrap())
        };
        assert_eq!(
            (count("tree_f1"), count("tree_f2")),
            (*f1, *f2),
            "pid {pid}: {p}"
        );
        assert!(p["cmdline"].as_str().unwrap().contains("tree_prog"), "{p}");
    }
    assert_eq!(run.json["status"], 0);
}

/// The program lines of a run without patchbay, pids removed, sorted.
fn plain_output(program: &str, args: &[&str]) -> Vec<String> {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success());
    normalized(
        &String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    )
}

fn normalized(lines: &[String]) -> Vec<String> {
    let mut out: Vec<String> = lines
        .iter()
        .map(|l| {
            let mut w: Vec<&str> = l.split(' ').collect();
            if w.first() == Some(&"tree_prog") && w.len() > 1 {
                w[1] = "PID";
            }
            w.join(" ")
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn through_sh_c() {
    let prog = fixtures::tree_prog();
    let p = prog.display();
    let script = format!("{p} 2000; {p} 301");
    let run = run_counting(PATTERN, Path::new("sh"), &["-c", &script], &[]).await;
    check_exact(&run, 2);
    assert_eq!(
        normalized(&run.program),
        plain_output("sh", &["-c", &script])
    );
}

#[tokio::test]
async fn a_bash_script_starting_two_instances_in_parallel() {
    let prog = fixtures::tree_prog();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("two.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\nP=\"$1\"\n\"$P\" 30000 &\n\"$P\" 50001 &\nwait\n",
    )
    .unwrap();
    let args = [script.to_str().unwrap(), prog.to_str().unwrap()];
    let run = run_counting(PATTERN, Path::new("bash"), &args, &[]).await;
    check_exact(&run, 2);
    assert_eq!(normalized(&run.program), plain_output("bash", &args));
}

#[tokio::test]
async fn a_two_level_exec_chain() {
    let prog = fixtures::tree_prog();
    let inner = format!("exec {} 777", prog.display());
    let outer = format!("exec sh -c '{inner}'");
    let run = run_counting(PATTERN, Path::new("sh"), &["-c", &outer], &[]).await;
    check_exact(&run, 1);
    assert_eq!(
        normalized(&run.program),
        plain_output("sh", &["-c", &outer])
    );
}

#[tokio::test]
async fn a_program_that_forks_workers() {
    let prog = fixtures::tree_prog();
    let run = run_counting(PATTERN, &prog, &["fork", "3", "4000"], &[]).await;
    // Three workers and the parent.
    check_exact(&run, 4);
    assert_eq!(
        normalized(&run.program),
        plain_output(prog.to_str().unwrap(), &["fork", "3", "4000"])
    );
}

#[tokio::test]
async fn a_child_that_exits_before_the_first_flush() {
    let prog = fixtures::tree_prog();
    // The server's flush interval is 100 ms: the child lives far less.
    let run = run_counting(PATTERN, &prog, &["quick"], &[]).await;
    check_exact(&run, 2);
    // And a program started by a shell that exits at once.
    let script = format!("{} 1", prog.display());
    let run = run_counting(PATTERN, Path::new("sh"), &["-c", &script], &[]).await;
    check_exact(&run, 1);
}

#[tokio::test]
async fn nothing_matching_in_the_whole_tree_is_said_at_the_end() {
    let prog = fixtures::tree_prog();
    let script = format!("{p} 5; {p} 6", p = prog.display());
    let run = run_with(
        &[],
        "tree_no_such_fn*",
        Path::new("sh"),
        &["-c", &script],
        &[],
    )
    .await;
    assert!(!run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("matched no patchable function in any of the"),
        "{}",
        run.stderr
    );
    // The programs ran, unchanged.
    assert_eq!(own_counts(&run.program).len(), 2, "{:?}", run.program);

    // Without following, the shell alone is traced: nothing of it matches.
    let run = run_with(
        &["--no-follow"],
        PATTERN,
        Path::new("sh"),
        &["-c", &script],
        &[],
    )
    .await;
    assert!(!run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("matches no patchable function in pid"),
        "{}",
        run.stderr
    );
    assert_eq!(own_counts(&run.program).len(), 2, "{:?}", run.program);
}

/// Against a real server, with scripted agents that name a parent of their choice: a
/// parent pid that now belongs to a process with another start time (what a recycled
/// pid looks like) is not followed, nor is a live process that is not the agent's
/// parent; a parent that is gone cannot be checked and names the tree's member it was.
#[tokio::test]
async fn a_recycled_or_false_parent_pid_is_not_followed() {
    use integration_tests::{ScriptAgent, TestServer};
    use patchbay_sdk::{Target, Tracer};
    let server = TestServer::start();
    let socket = server.socket_path().to_path_buf();
    let client = server.client().await;
    let fns = ["--functions", "tree_f1", "--threads", "1"];
    let (mut root, _) = ScriptAgent::connect(&socket, &fns).await;
    let root_pid = root.pid();
    let agents = client.agents().await.unwrap();
    let root_start = agents
        .iter()
        .find(|a| a.pid == root_pid)
        .unwrap()
        .start_time;
    let tracer = client
        .attach(Tracer::count(Target::tree(root_pid), "tree_f1"))
        .await
        .unwrap();
    let members = || async {
        let mut pids: Vec<u32> = tracer
            .counts()
            .await
            .unwrap()
            .processes
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        pids
    };
    assert_eq!(members().await, [root_pid]);

    // The root's pid with another start time: the process that had it is not the root.
    let recycled = format!("{root_pid}:{}", root_start + 1);
    let mut args = fns.to_vec();
    args.extend(["--parent", &recycled]);
    let (mut stranger, _) = ScriptAgent::connect(&socket, &args).await;
    // The root itself, alive, but not the agent's parent (the test is).
    let false_claim = format!("{root_pid}:{root_start}");
    let mut args = fns.to_vec();
    args.extend(["--parent", &false_claim]);
    let (mut liar, _) = ScriptAgent::connect(&socket, &args).await;
    // Hellos are handled whole before the welcome: membership is decided.
    assert_eq!(members().await, [root_pid]);
    let agents = client.agents().await.unwrap();
    for pid in [stranger.pid(), liar.pid()] {
        let a = agents.iter().find(|a| a.pid == pid).unwrap();
        assert_eq!(
            (a.parent_pid, a.parent_start_time),
            (0, 0),
            "the server dropped the claim of pid {pid}"
        );
    }
    stranger.quit().await;
    liar.quit().await;

    // Once the root is gone its identity cannot be checked: an orphan that names it
    // exactly is still its descendant (a grandchild whose parent exited first).
    root.quit().await;
    integration_tests::wait_for(
        std::time::Duration::from_secs(10),
        "the root's agent gone",
        || {
            let client = client.clone();
            async move {
                let agents = client.agents().await.map_err(|e| e.to_string())?;
                if agents.iter().any(|a| a.pid == root_pid && a.connected) {
                    return Err("still connected".to_owned());
                }
                Ok(())
            }
        },
    )
    .await;
    let mut args = fns.to_vec();
    args.extend(["--parent", &false_claim]);
    let (mut orphan, _) = ScriptAgent::connect(&socket, &args).await;
    assert!(members().await.contains(&orphan.pid()));
    orphan.quit().await;
}

/// `patchbay attach --pid PID --follow` makes a tree tracer; a root that matches
/// nothing yet is no failure (a note says the tracer stays for its descendants), and
/// a descendant that says hello gets it.
#[tokio::test]
async fn attach_follow_through_the_cli() {
    use integration_tests::{ScriptAgent, TestServer};
    let server = TestServer::start();
    let socket = server.socket_path().to_path_buf();
    let (mut root, _) = ScriptAgent::connect(&socket, &["--functions", "other_fn"]).await;
    let pid = root.pid().to_string();
    let o = server
        .cli(&[
            "--json", "attach", "--pid", &pid, "--follow", "--count", "tree_f1",
        ])
        .await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stays for its descendants"), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        doc["tracer"]["spec"]["target"]["tree"],
        serde_json::json!(root.pid()),
        "{doc}"
    );
    // Without --pid, --follow is refused.
    let o = server
        .cli(&["attach", "--all", "--follow", "--count", "tree_f1"])
        .await;
    assert!(!o.status.success());
    // An agent that names the live root as its parent but is not its child (its parent
    // is this test) does not get the tracer: no agent has it live.
    let client = server.client().await;
    let agents = client.agents().await.unwrap();
    let start = agents
        .iter()
        .find(|a| a.pid == root.pid())
        .unwrap()
        .start_time;
    let claim = format!("{}:{start}", root.pid());
    let (mut liar, _) =
        ScriptAgent::connect(&socket, &["--functions", "tree_f1", "--parent", &claim]).await;
    let tracers = client.tracers().await.unwrap();
    assert_eq!(tracers.len(), 1);
    assert_eq!(tracers[0].agents, 0, "{tracers:?}");
    liar.quit().await;
    root.quit().await;
}
