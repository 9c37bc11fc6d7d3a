//! `patchbay run` without a real agent: how the agent library is found, what the program
//! gets in its environment, the precise errors when no agent connects, signal forwarding,
//! the embedded server's private directory, and a whole run against a scripted server
//! whose "agent" is the program writing its pid to a file.

// The scripted Control server shared with the SDK's own tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Fake, serve_unix};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// A temporary directory with `xdg/` (0700, the runtime directory) and a file named
/// `libpatchbay_agent.so` that is not a library: ld.so reports it and ignores it, so the
/// program runs without an agent.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("xdg"))
            .unwrap();
        std::fs::write(dir.path().join("libpatchbay_agent.so"), "not a library").unwrap();
        Env { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn agent(&self) -> String {
        self.path("libpatchbay_agent.so").display().to_string()
    }

    /// `patchbay` (or `exe`) with no server at the default socket, so that `run` starts an
    /// embedded one under `xdg/`.
    fn command(&self, exe: &Path, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .env("XDG_RUNTIME_DIR", self.path("xdg"))
            .env("PATCHBAY_SOCKET", self.path("no-server.sock"))
            .env("HOME", self.path("home"))
            .env_remove("PATCHBAY_AGENT")
            .env_remove("PATCHBAY_TOKEN_FILE")
            .env_remove("LD_PRELOAD")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.command(Path::new(env!("CARGO_BIN_EXE_patchbay")), args)
            .output()
            .await
            .unwrap()
    }

    /// What is left in the runtime directory's `patchbay/` (the embedded servers' dirs).
    fn leftovers(&self) -> Vec<String> {
        match std::fs::read_dir(self.path("xdg/patchbay")) {
            Ok(dir) => dir
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[tokio::test]
async fn a_missing_agent_library_is_a_precise_error() {
    let env = Env::new();
    let o = env
        .run(&[
            "run",
            "--count",
            "*",
            "--agent",
            "/nonexistent/libpatchbay_agent.so",
            "--",
            "true",
        ])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: the agent library /nonexistent/libpatchbay_agent.so (from --agent or \
         PATCHBAY_AGENT) does not exist: build it with `cargo build -p patchbay-agent` or fix \
         the path\n"
    );
    // PATCHBAY_AGENT is the same as --agent.
    let o = env
        .command(
            Path::new(env!("CARGO_BIN_EXE_patchbay")),
            &["run", "--count", "*", "--", "true"],
        )
        .env("PATCHBAY_AGENT", "/nonexistent/a.so")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: the agent library /nonexistent/a.so "),
        "{}",
        stderr(&o)
    );
    assert!(env.leftovers().is_empty(), "no server was started");
}

/// A copy of `patchbay` in its own `bin/` directory (a hard link when possible), to
/// check where it looks for the agent.
fn installed_patchbay(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("patchbay");
    let original = Path::new(env!("CARGO_BIN_EXE_patchbay"));
    if std::fs::hard_link(original, &exe).is_err() {
        std::fs::copy(original, &exe).unwrap();
    }
    exe
}

#[tokio::test]
async fn the_agent_is_found_next_to_patchbay_then_in_lib_then_home() {
    let env = Env::new();
    // Under the target directory: same file system as the binary, so a hard link works.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = installed_patchbay(root.path());
    let bin = root.path().join("bin");
    let lib = root.path().join("lib/patchbay");
    let user = env.path("home/.local/lib/patchbay");
    let system = "/usr/lib/patchbay/libpatchbay_agent.so";
    let show = &[
        "run",
        "--count",
        "*",
        "--",
        "sh",
        "-c",
        "echo \"$LD_PRELOAD\"; exit 3",
    ];

    let o = env.command(&exe, show).output().await.unwrap();
    if Path::new(system).exists() {
        // An installed package: its agent is the last resort (purge it to test the error).
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert_eq!(stdout(&o), format!("{system}\n"));
    } else {
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            format!(
                "error: cannot find libpatchbay_agent.so: install the patchbay package, or \
                 build it with `cargo build --release -p patchbay-agent` and copy it to \
                 ~/.local/lib/patchbay/, or pass --agent PATH (looked for \
                 {0}/libpatchbay_agent.so, {1}/lib/patchbay/libpatchbay_agent.so, \
                 {2}/libpatchbay_agent.so, {system})\n",
                bin.display(),
                root.path().display(),
                user.display(),
            )
        );
    }

    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("libpatchbay_agent.so"), "x").unwrap();
    let o = env.command(&exe, show).output().await.unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{}/libpatchbay_agent.so\n", user.display())
    );

    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("libpatchbay_agent.so"), "x").unwrap();
    let o = env.command(&exe, show).output().await.unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "{}/lib/patchbay/libpatchbay_agent.so\n",
            root.path().display()
        )
    );

    std::fs::write(bin.join("libpatchbay_agent.so"), "x").unwrap();
    let o = env.command(&exe, show).output().await.unwrap();
    assert_eq!(
        stdout(&o),
        format!("{}/libpatchbay_agent.so\n", bin.display())
    );
}

#[tokio::test]
async fn a_program_that_exits_before_its_agent_connects() {
    let env = Env::new();
    let agent = env.agent();
    let o = env
        .command(
            Path::new(env!("CARGO_BIN_EXE_patchbay")),
            &[
                "run",
                "--count",
                "*",
                "--agent",
                &agent,
                "--",
                "sh",
                "-c",
                "echo \"$LD_PRELOAD|$PATCHBAY_SOCKET\"; exit 3",
            ],
        )
        .env("LD_PRELOAD", "libc.so.6")
        .output()
        .await
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    // The embedded server's socket is in a fresh private directory of the runtime dir.
    let (preload, socket) = stdout(&o)
        .trim_end()
        .split_once('|')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap();
    assert_eq!(preload, format!("{agent}:libc.so.6"));
    let run_dir = env.path("xdg/patchbay/run-");
    assert!(socket.starts_with(run_dir.to_str().unwrap()), "{socket}");
    assert!(socket.ends_with("/patchbayd.sock"), "{socket}");
    assert!(
        err.starts_with(&format!(
            "patchbay: no server answers at {}; started an embedded server at {socket}\n",
            env.path("no-server.sock").display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with(
            "patchbay: the program exited with status 3 before its agent connected: is \
             libpatchbay_agent.so loadable? try LD_DEBUG=libs\n"
        ),
        "{err}"
    );
    // The embedded server's directory is gone.
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());

    // A program that exits with 0 still makes `patchbay run` fail.
    let o = env
        .run(&["run", "--count", "*", "--agent", &agent, "--", "true"])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[tokio::test]
async fn no_agent_within_the_timeout_waits_for_the_program_and_fails() {
    let env = Env::new();
    let agent = env.agent();
    let start = Instant::now();
    let o = env
        .run(&[
            "run",
            "--count",
            "*",
            "--agent",
            &agent,
            "--timeout-ms",
            "200",
            "--",
            "sleep",
            "1",
        ])
        .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "the program ran to its end"
    );
    let pid: u32 = err
        .split("no agent connected from pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        err.contains(&format!(
            "no agent connected from pid {pid} within 0.2 s: is libpatchbay_agent.so loadable"
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "patchbay: the program keeps running untraced; patchbay exits when it does\n\
             patchbay: pid {pid} exited with status 0\n"
        )),
        "{err}"
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[tokio::test]
async fn sigterm_is_passed_on_to_the_program() {
    let env = Env::new();
    let agent = env.agent();
    let mut child = env
        .command(
            Path::new(env!("CARGO_BIN_EXE_patchbay")),
            &[
                "run", "--count", "*", "--agent", &agent, "--", "sleep", "30",
            ],
        )
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut err = String::new();
    // It starts the program once the server is up (its stderr says so), then holds it
    // until an agent connects, which never happens here: wait until the program runs, so
    // that the signal is the program's and not an interruption of the start.
    let deadline = Instant::now() + Duration::from_secs(10);
    read_stderr_until(
        &mut stderr,
        &mut err,
        "started an embedded server at",
        deadline,
    )
    .await;
    let program = wait_for_child(pid, "sleep", deadline).await;
    let start = Instant::now();
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        stderr.read_to_string(&mut err).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("patchbay run exits after the program");
    assert!(start.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(status.code(), Some(128 + 15), "{err}");
    assert!(
        err.contains(
            "patchbay: the program was killed by signal 15 (SIGTERM) before its agent connected"
        ),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{program}")).exists(),
        "the program {program} is gone"
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// Appends `stderr`'s lines to `seen` until one contains `needle`; fails at `deadline` or
/// at the end of the stream.
async fn read_stderr_until(
    stderr: &mut BufReader<tokio::process::ChildStderr>,
    seen: &mut String,
    needle: &str,
    deadline: Instant,
) {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut line = String::new();
        let read = tokio::time::timeout(left, stderr.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no stderr line with `{needle}` in time: {seen}"))
            .unwrap();
        assert!(read > 0, "stderr ended without `{needle}`: {seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return;
        }
    }
}

/// The pid of a child of `parent` running `comm`, polled until `deadline`.
async fn wait_for_child(parent: u32, comm: &str, deadline: Instant) -> u32 {
    loop {
        let found = std::fs::read_dir("/proc").unwrap().find_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let (head, tail) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1;
            let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && name == comm).then_some(pid)
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no child `{comm}` of pid {parent} in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_tcp_server_cannot_serve_the_agent() {
    let env = Env::new();
    let agent = env.agent();
    let o = env
        .run(&[
            "--socket",
            "http://127.0.0.1:9",
            "run",
            "--count",
            "*",
            "--agent",
            &agent,
            "--",
            "true",
        ])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with(
            "error: patchbay run needs the server's Unix socket, not http://127.0.0.1:9"
        ),
        "{}",
        stderr(&o)
    );
}

/// A whole run against the scripted server: the program "connects" by writing its pid.
async fn scripted_run(json: bool, script: &str) -> (Output, u32, Fake) {
    let env = Env::new();
    let pid_file = env.path("pid");
    let fake = Fake {
        agent_pid_file: Some(pid_file.clone()),
        ..Fake::default()
    };
    let server = serve_unix(fake.clone()).await;
    let agent = env.agent();
    let socket = server.socket.display().to_string();
    let script = format!("echo $$ > {}; {script}", pid_file.display());
    let mut args = vec!["--socket", &socket];
    if json {
        args.push("--json");
    }
    args.extend([
        "run",
        "--count",
        "w*",
        "--top",
        "2",
        "--interval-ms",
        "50",
        "--agent",
        &agent,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let o = env.run(&args).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(env.leftovers().is_empty(), "no embedded server");
    (o, pid, fake)
}

#[tokio::test]
async fn a_whole_run_prints_the_final_table_and_exits_with_the_program() {
    let (o, pid, fake) = scripted_run(false, "sleep 0.3; exit 7").await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.starts_with("patchbay: using server at "), "{err}");
    // The scripted server reports the attach timeout as the number of sites patched.
    assert!(
        err.contains(&format!(
            "patchbay: counting 10000 functions matching 'w*' in pid {pid}, and in its \
             descendants as they start (tracer 1)\n"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("patchbay: pid {pid} exited with status 7 after ")),
        "{err}"
    );
    assert!(
        err.ends_with(
            "FUNCTION  CALLS  SHARE\n\
             hot         100  90.1%\n\
             warm         10   9.0%\n\
             ... 1 more function: 1 call\n\
             total: 111 calls in 3 functions\n"
        ),
        "{err}"
    );
    assert_eq!(
        *fake.detached.lock().unwrap(),
        [1],
        "the tracer is detached"
    );
}

#[tokio::test]
async fn a_whole_run_with_json() {
    let (o, pid, _) = scripted_run(true, "sleep 0.3; kill -KILL $$").await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(128 + 9), "{err}");
    assert!(!err.contains("FUNCTION"), "no table with --json: {err}");
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(v["pid"], pid);
    assert_eq!(v["status"], 137);
    assert_eq!(v["signal"], 9);
    assert_eq!(v["tracer"], 1);
    assert_eq!(v["total"], 111);
    // Every function, hottest first, not only the top 2.
    let functions: Vec<&str> = v["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["function"].as_str().unwrap())
        .collect();
    assert_eq!(functions, ["hot", "warm", "rare"]);
    assert_eq!(v["counts"][0]["count"], 100);
}
