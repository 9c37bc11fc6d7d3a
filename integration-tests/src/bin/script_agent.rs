//! `script-agent`: a protocol-level scripted patchbay agent for integration tests.
//!
//! It connects to `--socket`, says Hello with its real pid, start time, uid and exe, a
//! fake function table (`--functions a,b,c` at 0x1000, 0x2000, ...; `--unpatchable`
//! names are listed with `patchable = false`) and fake threads (`--threads N`, tids
//! `--tid-base`..), then answers the server automatically:
//! ListFunctions -> FunctionList, Install -> Live, Remove -> Retired (epoch bumped, live
//! threads), AuthorizeFree -> Freed, Barrier -> BarrierReport.
//!
//! Stdout: one line per server message (`welcome agent=1 resumed=false`,
//! `install tramp=1 tracers=1 sites=foo,bar`, `remove tramp=1`,
//! `retired tramp=1 epoch=1 tids=100001,100002`, `authorize tramp=1`,
//! `barrier id=1 epoch=2 tids=...`, `expedite`, `list req=1 pattern=* n=3`,
//! `shutdown reason=...`, `error <Code> <message>`, `closed`), and `bad-...` lines for
//! protocol violations by the server (e.g. an AuthorizeFree of a trampoline that is not
//! retired).
//!
//! Options (see `--help`) also make it misbehave on purpose: `--protocol-version N`,
//! `--pid-override PID`, `--uid-override UID`, `--no-hello`.
//!
//! Stdin commands, one per line; each answers `ok CMD` (or `err CMD: why`):
//! `qs TID [EPOCH]`, `qs-all [EPOCH]`, `born TID`, `exit TID`, `stall TID PC SYMBOL MS`,
//! `counts TRACER FN N` (sets FN's cumulative count and reports every counted site of the
//! tracer), `events TRACER N DROPPED`, `epoch` (prints `epoch N`), `omit TID` (leave
//! a live thread out of later Retired/BarrierReport lists, as a racy agent might),
//! `reconnect` (new connection; Hello re-reports every trampoline not yet freed),
//! `disconnect` (drop the stream, keep running), `quit`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use integration_tests::uds_channel;
use patchbay_proto::agent_client::AgentClient;
use patchbay_proto::agent_message::Body as A;
use patchbay_proto::server_message::Body as S;
use patchbay_proto::trampoline_report::Report;
use patchbay_proto::*;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

#[derive(Parser, Debug)]
#[command(about = "Scripted patchbay agent for integration tests")]
struct Args {
    /// Server socket.
    #[arg(long)]
    socket: PathBuf,
    /// Hello.protocol_version.
    #[arg(long, default_value_t = PROTOCOL_VERSION)]
    protocol_version: u32,
    /// Fake patchable functions, at addresses 0x1000, 0x2000, ...
    #[arg(long, value_delimiter = ',')]
    functions: Vec<String>,
    /// Fake unpatchable functions (listed after `--functions`).
    #[arg(long, value_delimiter = ',')]
    unpatchable: Vec<String>,
    /// Number of fake threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// First fake thread id.
    #[arg(long, default_value_t = 100001)]
    tid_base: u32,
    /// Claim this pid in Hello instead of the real one.
    #[arg(long)]
    pid_override: Option<u32>,
    /// Claim this uid in Hello instead of the real one.
    #[arg(long)]
    uid_override: Option<u32>,
    /// Claim this parent `PID:START_TIME` in Hello (default: the real parent).
    #[arg(long, value_name = "PID:START")]
    parent: Option<String>,
    /// Claim this executable path instead of /proc/self/exe.
    #[arg(long)]
    exe: Option<String>,
    /// Send a ThreadsBorn instead of Hello as the first message (a protocol violation).
    #[arg(long)]
    no_hello: bool,
    /// Custom callbacks the "program" registered.
    #[arg(long, value_delimiter = ',')]
    callbacks: Vec<String>,
}

fn out(line: impl AsRef<str>) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", line.as_ref());
    let _ = stdout.flush();
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn start_time() -> u64 {
    start_time_of_path("/proc/self/stat").expect("read /proc/self/stat")
}

/// The start time of process `pid` (0 when it is gone).
fn start_time_of(pid: u32) -> u64 {
    start_time_of_path(&format!("/proc/{pid}/stat")).unwrap_or(0)
}

fn start_time_of_path(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TState {
    Live,
    Retired,
}

struct Tramp {
    state: TState,
    tracers: Vec<TracerRef>,
    sites: Vec<Site>,
    retired_epoch: u64,
    retired_tids: Vec<u32>,
}

struct Agent {
    args: Args,
    epoch: u64,
    threads: BTreeSet<u32>,
    tramps: BTreeMap<u64, Tramp>,
    functions: Vec<Function>,
    exe: String,
    /// Threads left out of Retired and BarrierReport thread lists (`omit TID`).
    omit: BTreeSet<u32>,
    /// Cumulative counts by (tracer, site address).
    counts: BTreeMap<(u64, u64), u64>,
    tx: Option<mpsc::Sender<AgentMessage>>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|e| format!("bad number {s:?}: {e}"))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    parse_u64(s).and_then(|v| u32::try_from(v).map_err(|e| format!("{s}: {e}")))
}

fn status_line(status: &tonic::Status) -> String {
    format!("error {:?} {}", status.code(), status.message())
}

impl Agent {
    fn new(args: Args) -> Agent {
        let exe = args.exe.clone().unwrap_or_else(|| {
            std::fs::read_link("/proc/self/exe")
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        });
        let mut functions = Vec::new();
        for (name, patchable) in args
            .functions
            .iter()
            .map(|n| (n, true))
            .chain(args.unpatchable.iter().map(|n| (n, false)))
        {
            if name.is_empty() {
                continue;
            }
            let address = 0x1000 * (functions.len() as u64 + 1);
            functions.push(Function {
                name: name.clone(),
                mangled: name.clone(),
                address,
                object: exe.clone(),
                patchable,
                site_kind: if patchable {
                    SiteKind::Nop5 as i32
                } else {
                    SiteKind::Unspecified as i32
                },
                reason: if patchable {
                    String::new()
                } else {
                    "scripted: no patchable entry".into()
                },
            });
        }
        let threads = (0..args.threads).map(|i| args.tid_base + i).collect();
        Agent {
            args,
            epoch: 0,
            threads,
            tramps: BTreeMap::new(),
            functions,
            exe,
            counts: BTreeMap::new(),
            omit: BTreeSet::new(),
            tx: None,
        }
    }

    fn hello(&self) -> Hello {
        let trampolines = self
            .tramps
            .iter()
            .map(|(id, t)| TrampolineStatus {
                trampoline_id: *id,
                state: match t.state {
                    TState::Live => TrampolineState::Live,
                    TState::Retired => TrampolineState::Retired,
                } as i32,
                tracers: t.tracers.clone(),
                sites: if t.state == TState::Live {
                    t.sites.clone()
                } else {
                    Vec::new()
                },
                retired_epoch: t.retired_epoch,
                retired_tids: t.retired_tids.clone(),
            })
            .collect();
        Hello {
            protocol_version: self.args.protocol_version,
            agent_version: "script-agent".into(),
            pid: self.args.pid_override.unwrap_or_else(std::process::id),
            start_time: start_time(),
            uid: self
                .args
                .uid_override
                .unwrap_or_else(|| nix::unistd::getuid().as_raw()),
            exe: self.exe.clone(),
            build_id: String::new(),
            tids: self.threads.iter().copied().collect(),
            epoch: self.epoch,
            trampolines,
            callbacks: self.args.callbacks.clone(),
            arrival: 0,
            parent_pid: self.parent().0,
            parent_start_time: self.parent().1,
            cmdline: "script-agent".into(),
        }
    }

    /// The parent the hello names: `--parent`, else the real one.
    fn parent(&self) -> (u32, u64) {
        if let Some(p) = &self.args.parent {
            let (pid, start) = p.split_once(':').expect("--parent PID:START");
            return (pid.parse().unwrap(), start.parse().unwrap());
        }
        let ppid = nix::unistd::getppid().as_raw() as u32;
        (ppid, start_time_of(ppid))
    }

    async fn connect(&mut self) -> Option<Streaming<ServerMessage>> {
        self.tx = None;
        let channel = match uds_channel(&self.args.socket).await {
            Ok(c) => c,
            Err(e) => {
                out(format!("error connect {e:#}"));
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(4096);
        let first = if self.args.no_hello {
            A::ThreadsBorn(ThreadsBorn {
                tids: self.live_tids(),
            })
        } else {
            A::Hello(self.hello())
        };
        tx.send(AgentMessage { body: Some(first) })
            .await
            .expect("queue hello");
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert(
            PROTOCOL_METADATA_KEY,
            PROTOCOL_VERSION.to_string().parse().expect("ascii"),
        );
        match AgentClient::new(channel).session(req).await {
            Ok(resp) => {
                self.tx = Some(tx);
                Some(resp.into_inner())
            }
            Err(status) => {
                out(status_line(&status));
                None
            }
        }
    }

    async fn send(&mut self, body: A) -> Result<(), String> {
        let tx = self.tx.as_ref().ok_or("not connected")?;
        tx.send(AgentMessage { body: Some(body) })
            .await
            .map_err(|_| "stream closed".to_string())
    }

    fn live_tids(&self) -> Vec<u32> {
        self.threads.iter().copied().collect()
    }

    /// Threads listed in Retired and BarrierReport: the live ones, less `omit`ted ones.
    fn reported_tids(&self) -> Vec<u32> {
        self.threads
            .iter()
            .copied()
            .filter(|t| !self.omit.contains(t))
            .collect()
    }

    async fn on_server(&mut self, msg: ServerMessage) {
        let Some(body) = msg.body else {
            out("bad-message empty body");
            return;
        };
        let r = match body {
            S::Welcome(w) => {
                out(format!(
                    "welcome agent={} resumed={} stall_threshold_ms={}",
                    w.agent_id,
                    w.resumed,
                    w.settings.map(|s| s.stall_threshold_ms).unwrap_or(0)
                ));
                Ok(())
            }
            S::ListFunctions(lf) => {
                let pattern = if lf.pattern.is_empty() {
                    "*".to_string()
                } else {
                    lf.pattern.clone()
                };
                let reply = match glob::Pattern::new(&pattern) {
                    Ok(p) => {
                        let functions: Vec<Function> = self
                            .functions
                            .iter()
                            .filter(|f| p.matches(&f.name))
                            .cloned()
                            .collect();
                        out(format!(
                            "list req={} pattern={} n={}",
                            lf.request_id,
                            lf.pattern,
                            functions.len()
                        ));
                        let unpatchable = if lf.patchable_only {
                            functions.iter().filter(|f| !f.patchable).count() as u32
                        } else {
                            0
                        };
                        FunctionList {
                            request_id: lf.request_id,
                            functions: functions
                                .into_iter()
                                .filter(|f| f.patchable || !lf.patchable_only)
                                .collect(),
                            error: String::new(),
                            unpatchable_matches: unpatchable,
                        }
                    }
                    Err(e) => {
                        out(format!(
                            "list req={} pattern={} error={e}",
                            lf.request_id, lf.pattern
                        ));
                        FunctionList {
                            request_id: lf.request_id,
                            functions: Vec::new(),
                            error: format!("malformed pattern {pattern:?}: {e}"),
                            unpatchable_matches: 0,
                        }
                    }
                };
                self.send(A::FunctionList(reply)).await
            }
            S::Install(ins) => {
                out(format!(
                    "install tramp={} tracers={} sites={}",
                    ins.trampoline_id,
                    join(ins.tracers.iter().map(|t| t.tracer_id)),
                    join(ins.sites.iter().map(|s| s.name.clone()))
                ));
                if self.tramps.contains_key(&ins.trampoline_id) {
                    out(format!("bad-install tramp={} reused id", ins.trampoline_id));
                }
                for s in &ins.sites {
                    if !self
                        .functions
                        .iter()
                        .any(|f| f.address == s.address && f.patchable)
                    {
                        out(format!(
                            "bad-install tramp={} site {}@{:#x} is not a patchable function",
                            ins.trampoline_id, s.name, s.address
                        ));
                    }
                }
                // A site moves from any other trampoline to this one.
                let addrs: BTreeSet<u64> = ins.sites.iter().map(|s| s.address).collect();
                for t in self.tramps.values_mut() {
                    if t.state == TState::Live {
                        t.sites.retain(|s| !addrs.contains(&s.address));
                    }
                }
                self.tramps.insert(
                    ins.trampoline_id,
                    Tramp {
                        state: TState::Live,
                        tracers: ins.tracers.clone(),
                        sites: ins.sites.clone(),
                        retired_epoch: 0,
                        retired_tids: Vec::new(),
                    },
                );
                self.send(A::Trampoline(TrampolineReport {
                    trampoline_id: ins.trampoline_id,
                    report: Some(Report::Live(Live {
                        sites: ins.sites,
                        skipped: Vec::new(),
                    })),
                }))
                .await
            }
            S::Remove(rm) => {
                out(format!("remove tramp={}", rm.trampoline_id));
                let tids = self.reported_tids();
                match self.tramps.get_mut(&rm.trampoline_id) {
                    Some(t) if t.state == TState::Live => {
                        self.epoch += 1;
                        t.state = TState::Retired;
                        t.sites.clear();
                        t.retired_epoch = self.epoch;
                        t.retired_tids = tids.clone();
                        out(format!(
                            "retired tramp={} epoch={} tids={}",
                            rm.trampoline_id,
                            self.epoch,
                            join(&tids)
                        ));
                        let epoch = self.epoch;
                        self.send(A::Trampoline(TrampolineReport {
                            trampoline_id: rm.trampoline_id,
                            report: Some(Report::Retired(Retired { epoch, tids })),
                        }))
                        .await
                    }
                    other => {
                        out(format!(
                            "bad-remove tramp={} state={:?}",
                            rm.trampoline_id,
                            other.map(|t| t.state)
                        ));
                        self.send(A::Error(AgentError {
                            message: format!(
                                "Remove of trampoline {} that is not live",
                                rm.trampoline_id
                            ),
                        }))
                        .await
                    }
                }
            }
            S::Expedite(_) => {
                out("expedite");
                Ok(())
            }
            S::Covered(c) => {
                out(format!("covered seq={}", c.sequence));
                Ok(())
            }
            S::AuthorizeFree(af) => {
                let mut r = Ok(());
                for id in af.trampoline_ids {
                    match self.tramps.get(&id).map(|t| t.state) {
                        Some(TState::Retired) => {
                            out(format!("authorize tramp={id}"));
                            self.tramps.remove(&id);
                            r = r.and(
                                self.send(A::Trampoline(TrampolineReport {
                                    trampoline_id: id,
                                    report: Some(Report::Freed(Freed {})),
                                }))
                                .await,
                            );
                        }
                        state => out(format!("bad-authorize tramp={id} state={state:?}")),
                    }
                }
                r
            }
            S::Barrier(b) => {
                self.epoch += 1;
                let tids = self.reported_tids();
                out(format!(
                    "barrier id={} epoch={} tids={}",
                    b.barrier_id,
                    self.epoch,
                    join(&tids)
                ));
                let epoch = self.epoch;
                self.send(A::Barrier(BarrierReport {
                    barrier_id: b.barrier_id,
                    epoch,
                    tids,
                }))
                .await
            }
            S::Shutdown(s) => {
                out(format!("shutdown reason={}", s.reason));
                Ok(())
            }
        };
        if let Err(e) = r {
            out(format!("warn cannot answer: {e}"));
        }
    }

    /// Runs one stdin command. Returns Ok(false) on `quit`.
    async fn command(
        &mut self,
        line: &str,
        inbound: &mut Option<Streaming<ServerMessage>>,
    ) -> Result<bool, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["qs", tid, rest @ ..] => {
                let tid = parse_u32(tid)?;
                let epoch = match rest {
                    [] => self.epoch,
                    [e] => parse_u64(e)?,
                    _ => return Err("usage: qs TID [EPOCH]".into()),
                };
                self.send(A::Quiescent(QuiescentBatch {
                    reports: vec![Quiescent { tid, epoch }],
                }))
                .await?;
            }
            ["qs-all", rest @ ..] => {
                let epoch = match rest {
                    [] => self.epoch,
                    [e] => parse_u64(e)?,
                    _ => return Err("usage: qs-all [EPOCH]".into()),
                };
                let reports = self
                    .threads
                    .iter()
                    .map(|&tid| Quiescent { tid, epoch })
                    .collect();
                self.send(A::Quiescent(QuiescentBatch { reports })).await?;
            }
            ["born", tid] => {
                let tid = parse_u32(tid)?;
                self.threads.insert(tid);
                self.send(A::ThreadsBorn(ThreadsBorn { tids: vec![tid] }))
                    .await?;
            }
            ["exit", tid] => {
                let tid = parse_u32(tid)?;
                self.threads.remove(&tid);
                self.send(A::ThreadsExited(ThreadsExited { tids: vec![tid] }))
                    .await?;
            }
            ["stall", tid, pc, symbol, ms] => {
                let stall = Stall {
                    tid: parse_u32(tid)?,
                    pc: parse_u64(pc)?,
                    symbol: symbol.to_string(),
                    duration_ms: parse_u64(ms)?,
                    reason: String::new(),
                };
                self.send(A::Stalls(StallReport {
                    stalls: vec![stall],
                }))
                .await?;
            }
            ["counts", tracer, func, n] => {
                // Like a real agent: the report holds the cumulative counts of every site
                // of the tracer counted so far.
                let tracer = parse_u64(tracer)?;
                let f = self
                    .functions
                    .iter()
                    .find(|f| f.name == *func)
                    .ok_or_else(|| format!("no function {func}"))?;
                let address = f.address;
                self.counts.insert((tracer, address), parse_u64(n)?);
                let counts = self
                    .counts
                    .range((tracer, 0)..=(tracer, u64::MAX))
                    .map(|(&(_, address), &count)| SiteCount {
                        site: Some(Site {
                            address,
                            name: self
                                .functions
                                .iter()
                                .find(|f| f.address == address)
                                .map(|f| f.name.clone())
                                .unwrap_or_default(),
                        }),
                        count,
                    })
                    .collect();
                self.send(A::Counts(CountReport {
                    tracer_id: tracer,
                    counts,
                }))
                .await?;
            }
            ["events", tracer, n, dropped] => {
                let n = parse_u32(n)?;
                let address = self.functions.first().map(|f| f.address).unwrap_or(0);
                let tid = self.threads.first().copied().unwrap_or(self.args.tid_base);
                let mut data = Vec::new();
                for i in 0..n as u64 {
                    data.extend_from_slice(&(1_000_000 + i).to_le_bytes());
                    data.extend_from_slice(&address.to_le_bytes());
                    data.extend_from_slice(&tid.to_le_bytes());
                    let argc = (i % 3) as u32;
                    data.extend_from_slice(&argc.to_le_bytes());
                    for k in 0..argc as u64 {
                        data.extend_from_slice(&(i * 16 + k).to_le_bytes());
                    }
                }
                self.send(A::Events(EventBatch {
                    tracer_id: parse_u64(tracer)?,
                    data,
                    record_count: n,
                    dropped: parse_u64(dropped)?,
                }))
                .await?;
            }
            ["epoch"] => out(format!("epoch {}", self.epoch)),
            ["omit", tid] => {
                self.omit.insert(parse_u32(tid)?);
            }
            ["reconnect"] => {
                *inbound = None;
                self.tx = None;
                *inbound = self.connect().await;
                if inbound.is_none() {
                    return Err("reconnect failed".into());
                }
            }
            ["disconnect"] => {
                *inbound = None;
                self.tx = None;
            }
            ["quit"] => return Ok(false),
            _ => return Err("unknown command".into()),
        }
        Ok(true)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let mut agent = Agent::new(args);
    let mut inbound = agent.connect().await;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            msg = async {
                match inbound.as_mut() {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Ok(Some(m)) => agent.on_server(m).await,
                Ok(None) => {
                    out("closed");
                    inbound = None;
                    agent.tx = None;
                }
                Err(status) => {
                    out(status_line(&status));
                    inbound = None;
                    agent.tx = None;
                }
            },
            line = stdin.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    _ => break,
                };
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match agent.command(line, &mut inbound).await {
                    Ok(true) => out(format!("ok {line}")),
                    Ok(false) => {
                        out(format!("ok {line}"));
                        break;
                    }
                    Err(e) => out(format!("err {line}: {e}")),
                }
            }
        }
    }
}
