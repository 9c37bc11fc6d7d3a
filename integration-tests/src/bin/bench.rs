//! Per-call cost of patchbay, measured side by side in one run:
//! `cargo run --release -p integration-tests --bin bench [-- --quick] [--json FILE]`.
//!
//! Builds its own C target (`bench/hotloop.c`: a hot loop calling a small function,
//! timing itself), runs it uninstrumented, instrumented with the agent loaded but no
//! tracer attached, with a `count` tracer, and with a `trace` tracer recording two
//! argument registers, on 1 thread and on as many threads as cores. Each figure is
//! the median of several runs. Prints a table and writes JSON.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::bins;
use integration_tests::server::TestServer;
use patchbay_proto as pb;

struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    fn start(exe: &Path, agent: Option<(&Path, &Path)>) -> anyhow::Result<Target> {
        let mut cmd = Command::new(exe);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some((lib, socket)) = agent {
            cmd.env("LD_PRELOAD", lib).env("PATCHBAY_SOCKET", socket);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut t = Target {
            child,
            stdin,
            stdout,
        };
        let ready = t.line()?;
        if ready != "ready" {
            bail!("target said {ready:?}");
        }
        Ok(t)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            bail!("target exited");
        }
        Ok(s.trim().to_string())
    }

    fn ns_per_call(&mut self, threads: u32, n: u64) -> anyhow::Result<f64> {
        writeln!(self.stdin, "loop {threads} {n}")?;
        let l = self.line()?;
        l.strip_prefix("ns_per_call=")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad answer {l:?}"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn gcc(out: &Path, src: &Path, flags: &[&str], link: &[&str]) -> anyhow::Result<()> {
    let obj = out.with_extension("o");
    let st = Command::new("gcc")
        .args(flags)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .status()
        .context("running gcc (install it: apt-get install gcc)")?;
    if !st.success() {
        bail!("gcc failed on {}", src.display());
    }
    let st = Command::new("gcc")
        .args(link)
        .arg(&obj)
        .arg("-o")
        .arg(out)
        .arg("-lpthread")
        .status()?;
    if !st.success() {
        bail!("linking {} failed", out.display());
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

async fn wait_agent(client: &patchbay_sdk::Client, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let agents = client.list_agents().await?;
        if agents.iter().any(|a| a.pid == pid && a.connected) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no agent from pid {pid} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spec(pid: u32, kind: pb::CallbackKind, args: u32) -> pb::TracerSpec {
    pb::TracerSpec {
        target: Some(pb::Target {
            target: Some(pb::target::Target::Pid(pid)),
        }),
        pattern: "add1".into(),
        callback: Some(pb::CallbackSpec {
            kind: kind as i32,
            custom_name: String::new(),
            arg_count: args,
        }),
        name: String::new(),
    }
}

#[derive(Clone, Debug)]
struct Row {
    config: &'static str,
    threads: u32,
    ns: f64,
    dropped: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| bins::profile_dir().join("bench.json"));
    let (n, reps) = if quick {
        (2_000_000, 3)
    } else {
        (50_000_000, 7)
    };
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get()) as u32;

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hotloop.c");
    let dir = tempfile::tempdir()?;
    let plain = dir.path().join("hotloop-plain");
    let nop5 = dir.path().join("hotloop-nop5");
    gcc(&plain, &src, &["-O2"], &[])?;
    gcc(
        &nop5,
        &src,
        &[
            "-O2",
            "-pg",
            "-mfentry",
            "-mrecord-mcount",
            "-mnop-mcount",
            "-fno-pie",
        ],
        &["-no-pie"],
    )?;
    let lib = bins::agent_lib();
    let server = TestServer::start();
    let client = server.client().await;
    let socket = server.socket_path().to_path_buf();

    let mut rows = Vec::new();
    for threads in [1, cores] {
        // Uninstrumented binary, no agent.
        let mut t = Target::start(&plain, None)?;
        let v = (0..reps)
            .map(|_| t.ns_per_call(threads, n))
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(Row {
            config: "untraced (plain build)",
            threads,
            ns: median(v),
            dropped: 0,
        });
        drop(t);

        let mut t = Target::start(&nop5, Some((&lib, &socket)))?;
        wait_agent(&client, t.pid()).await?;
        let v = (0..reps)
            .map(|_| t.ns_per_call(threads, n))
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(Row {
            config: "instrumented, not attached",
            threads,
            ns: median(v),
            dropped: 0,
        });

        for (config, kind, nargs) in [
            ("count", pb::CallbackKind::Count, 0),
            ("trace (2 args)", pb::CallbackKind::Trace, 2),
        ] {
            let r = client.attach(spec(t.pid(), kind, nargs), None).await?;
            let tracer = r.tracer.map(|t| t.tracer_id).context("no tracer")?;
            let v = (0..reps)
                .map(|_| t.ns_per_call(threads, n))
                .collect::<Result<Vec<_>, _>>()?;
            // Let the agent flush its drop counters.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let dropped = client
                .list_tracers()
                .await?
                .iter()
                .find(|x| x.tracer_id == tracer)
                .map_or(0, |x| x.dropped);
            client.detach(tracer, true, None).await?;
            rows.push(Row {
                config,
                threads,
                ns: median(v),
                dropped,
            });
        }
    }

    println!(
        "patchbay per-call cost: hot loop calling `add1`, median of {reps} runs of {n} calls per thread ({cores} cores)\n"
    );
    println!(
        "{:<28} {:>7} {:>10} {:>10} {:>10} {:>14}",
        "CONFIG", "THREADS", "NS/CALL", "ADDED NS", "RATIO", "EVENTS DROPPED"
    );
    let mut json = Vec::new();
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.threads == r.threads && b.config.starts_with("untraced"))
            .map_or(r.ns, |b| b.ns);
        println!(
            "{:<28} {:>7} {:>10.2} {:>10.2} {:>9.2}x {:>14}",
            r.config,
            r.threads,
            r.ns,
            r.ns - base,
            r.ns / base,
            r.dropped
        );
        json.push(serde_json::json!({
            "config": r.config, "threads": r.threads, "ns_per_call": r.ns,
            "added_ns": r.ns - base, "ratio": r.ns / base, "dropped": r.dropped,
        }));
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    println!("\njson: {}", json_path.display());
    Ok(())
}
