//! `patchbay`: the command-line client of `patchbayd` (argument parsing, connection,
//! dispatch and error reporting), built on `patchbay-sdk`.

mod commands;
mod format;
mod json;
mod output;
mod progress;
mod table;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use patchbay_sdk::{Client, ServerTarget};

use output::Output;

/// Trace functions of running programs through patchbayd.
#[derive(Debug, Parser)]
#[command(name = "patchbay", version, propagate_version = true)]
struct Cli {
    /// Address of patchbayd: a Unix socket path, unix:PATH, or http://HOST:PORT
    /// [default: $XDG_RUNTIME_DIR/patchbay/patchbayd.sock, else /tmp/patchbay-$UID/patchbayd.sock]
    #[arg(
        long,
        global = true,
        env = "PATCHBAY_SOCKET",
        value_name = "PATH",
        help_heading = "Global options"
    )]
    socket: Option<String>,

    /// File holding the token a TCP listener requires (sent as `authorization: Bearer`)
    #[arg(
        long,
        global = true,
        env = "PATCHBAY_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    token_file: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables (errors: one JSON line on stderr,
    /// with the server's reason such as NO_AGENT)
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the agents (traced processes) you can see
    Agents,
    /// List the functions of a process that match a pattern
    Functions(commands::functions::Args),
    /// Attach a tracer and wait until it is live
    Attach(commands::attach::Args),
    /// Detach a tracer, optionally waiting until its trampolines may be freed
    Detach(commands::detach::Args),
    /// List tracers
    Tracers,
    /// List trampolines and their life-cycle state
    Trampolines(commands::trampolines::Args),
    /// Show pending grace periods, the threads they wait for, and stalls
    Gp(commands::gp::Args),
    /// Wait for a grace period over every thread of every agent
    Sync(commands::sync::Args),
    /// Print the events of a tracer as they arrive, until Ctrl-C
    Watch(commands::watch::Args),
    /// Show the call counts of a `count` tracer, highest first
    Counts(commands::counts::Args),
    /// Show the latency figures of a `latency` tracer (one function: its histogram)
    Latency(commands::latency::Args),
    /// Run a program with the agent preloaded and show its hottest functions live
    ///
    /// Uses the server at --socket (or the default socket) if one answers, else starts an
    /// embedded one for the duration of the run. Prints a live table on stderr while the
    /// program runs (when stderr is a terminal) and the final counts when it exits (with
    /// --json: one line of JSON on stdout, after the program's own output). Exits with the
    /// program's status (128 + the signal if a signal killed it); SIGINT and SIGTERM are
    /// passed on to the program.
    Run(commands::run::Args),
    /// Print shell completions for bash, zsh or fish
    ///
    /// bash: `patchbay completions bash > ~/.local/share/bash-completion/completions/patchbay`;
    /// zsh: into a directory of $fpath as `_patchbay`; fish: into
    /// ~/.config/fish/completions/patchbay.fish. The Debian package installs all three.
    Completions(commands::docs::CompletionsArgs),
    /// Write the man pages of patchbay and patchbayd into a directory
    #[command(hide = true)]
    Man(commands::docs::ManArgs),
}

/// Runs the CLI and returns the process exit status: 0 on success, 1 on any error (clap
/// exits with 2 on usage errors before this runs); `run` exits with the program's status.
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // `run` may serve an embedded server while it drives the program: give it workers.
    let runtime = if matches!(cli.command, Command::Run(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(status) => ExitCode::from(status),
        // `patchbay watch 1 | head`: the reader went away, which is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            if json {
                eprintln!("{}", error_json(&err));
            } else {
                eprintln!("{}", render_error(&err));
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .without_time()
        .init();
}

/// Runs one command; the result is the exit status.
async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Run(args) = cli.command {
        let token = cli.token_file.as_deref().map(read_token).transpose()?;
        let globals = commands::run::Globals {
            socket: cli.socket.as_deref(),
            token: token.as_deref(),
            json: cli.json,
        };
        return commands::run::main(args, globals).await;
    }
    match &cli.command {
        Command::Completions(args) => {
            use clap::CommandFactory;
            let mut out = io::stdout().lock();
            commands::docs::completions(args.shell, &mut Cli::command(), &mut out);
            return Ok(0);
        }
        Command::Man(args) => {
            use clap::CommandFactory;
            let written = commands::docs::man(
                Cli::command(),
                patchbay_server::config::Args::command(),
                &args.dir,
            )?;
            eprintln!(
                "patchbay: wrote {} man pages into {}",
                written.len(),
                args.dir.display()
            );
            return Ok(0);
        }
        _ => {}
    }
    let client = connect(cli.socket.as_deref(), cli.token_file.as_deref()).await?;
    let mut out = Output::new(cli.json, Box::new(io::stdout()));
    let result = match cli.command {
        Command::Agents => commands::agents::run(&client, &mut out).await,
        Command::Functions(args) => commands::functions::run(&client, args, &mut out).await,
        Command::Attach(args) => commands::attach::run(&client, args, &mut out).await,
        Command::Detach(args) => commands::detach::run(&client, args, &mut out).await,
        Command::Tracers => commands::tracers::run(&client, &mut out).await,
        Command::Trampolines(args) => commands::trampolines::run(&client, args, &mut out).await,
        Command::Gp(args) => commands::gp::run(&client, args, &mut out).await,
        Command::Sync(args) => commands::sync::run(&client, args, &mut out).await,
        Command::Watch(args) => commands::watch::run(&client, args, &mut out).await,
        Command::Counts(args) => commands::counts::run(&client, args, &mut out).await,
        Command::Latency(args) => commands::latency::run(&client, args, &mut out).await,
        Command::Run(_) | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled above")
        }
    };
    result.map(|()| 0)
}

async fn connect(socket: Option<&str>, token_file: Option<&Path>) -> anyhow::Result<Client> {
    let target = match socket {
        Some(socket) => ServerTarget::parse(socket)?,
        None => ServerTarget::default(),
    };
    let mut builder = Client::builder(target);
    if let Some(file) = token_file {
        builder = builder.token(read_token(file)?);
    }
    Ok(builder.connect().await?)
}

/// The token in `path`, without surrounding whitespace.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token.to_owned())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// `error: <message>`, plus the underlying cause when it adds information and a hint for
/// errors with an obvious next step.
fn render_error(err: &anyhow::Error) -> String {
    let mut text = format!("error: {err}");
    let root = err.root_cause().to_string();
    if err.chain().count() > 1 && !text.contains(&root) {
        text.push_str(&format!("\n  cause: {root}"));
    }
    if let Some(sdk) = err.downcast_ref::<patchbay_sdk::Error>() {
        match sdk {
            patchbay_sdk::Error::Unauthenticated(_) => {
                text.push_str("\n  hint: pass the server's token with --token-file FILE");
            }
            patchbay_sdk::Error::FailedPrecondition(msg) if msg.contains("protocol") => {
                text.push_str("\n  hint: use a patchbay CLI of the same version as patchbayd");
            }
            _ => {}
        }
    }
    text
}

/// The `--json` form of an error: `{"error": {"message", "code", "reason", "metadata"}}`
/// where `code` is the gRPC status name (`NOT_FOUND`) and `reason` the server's
/// `ErrorInfo.reason` (`NO_AGENT`), both null when the error is not a status or has none.
fn error_json(err: &anyhow::Error) -> serde_json::Value {
    let sdk = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<patchbay_sdk::Error>());
    let code = sdk.and_then(patchbay_sdk::Error::code).map(code_name);
    let detail = sdk.and_then(patchbay_sdk::Error::detail);
    serde_json::json!({
        "error": {
            "message": format!("{err:#}"),
            "code": code,
            "reason": detail.and_then(|d| d.reason()),
            "metadata": detail.map(|d| d.metadata().clone()).unwrap_or_default(),
        }
    })
}

/// The canonical gRPC name of a status code: `NotFound` → `NOT_FOUND`.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("patchbay").chain(args.iter().copied()))
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["agents", "--json", "--socket", "/s"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket.as_deref(), Some("/s"));
        let cli = parse(&["--token-file", "/t", "tracers"]).unwrap();
        assert_eq!(cli.token_file.as_deref(), Some(Path::new("/t")));
    }

    #[test]
    fn usage_errors_are_reported_by_clap() {
        for bad in [
            &["attach", "f*"][..],
            &["attach", "--pid", "1", "f*"],
            &["attach", "--pid", "1", "--all", "--count", "f*"],
            &["attach", "--pid", "1", "--count", "--trace", "f*"],
            &["attach", "--pid", "1", "--count", "--args", "2", "f*"],
            &["attach", "--pid", "1", "--trace", "--args", "7", "f*"],
            &["attach", "--pid", "1", "--custom", "cb"],
            &["functions", "x"],
            &["detach", "1", "--timeout-ms", "5"],
            &["detach", "one"],
            &["watch"],
            &["bogus"],
        ] {
            let err = parse(bad).expect_err(&bad.join(" "));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn reads_tokens_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc123\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(
            read_token(&path)
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
        let missing = dir.path().join("missing");
        let err = read_token(&missing).unwrap_err();
        assert!(err.to_string().starts_with("cannot read the token file"));
        assert!(
            render_error(&err).contains("cause: No such file"),
            "{}",
            render_error(&err)
        );
    }

    #[test]
    fn errors_render_with_hints() {
        let err = anyhow::Error::from(patchbay_sdk::Error::Unauthenticated("missing token".into()));
        assert_eq!(
            render_error(&err),
            "error: missing token\n  hint: pass the server's token with --token-file FILE"
        );
        let err = anyhow::Error::from(patchbay_sdk::Error::NotFound("no tracer 9".into()));
        assert_eq!(render_error(&err), "error: no tracer 9");
    }

    #[test]
    fn json_errors_name_the_code_and_reason() {
        let err = anyhow::Error::from(patchbay_sdk::Error::NotFound("no tracer 9".into()));
        let v = error_json(&err);
        assert_eq!(v["error"]["message"], "no tracer 9");
        assert_eq!(v["error"]["code"], "NOT_FOUND");
        assert_eq!(v["error"]["reason"], serde_json::Value::Null);
        let err = anyhow::anyhow!("cannot read the token file /x");
        assert_eq!(error_json(&err)["error"]["code"], serde_json::Value::Null);
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn broken_pipe_is_recognized() {
        let err = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("x")));
    }
}
