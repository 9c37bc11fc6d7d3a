//! The link to the server: one background thread running a single-threaded tokio
//! runtime that keeps two streams open, each on its own connection to the server's
//! socket, and reconnects both with backoff when the server is absent or goes away:
//! - `Agent.Session`: the hello, the server's requests, and every report but events;
//! - `Agent.Events`: event batches and `Freed` reports, opened after each `Welcome`
//!   with the session id it gave.
//!
//! Two connections, so that an event flood never delays a life-cycle report
//! (`Retired`, quiescent stamps, barrier answers): each stream has its own HTTP/2
//! flow-control windows, socket buffers and queue here. A `Freed` report follows the
//! events drained before it (they name the trampoline's tracers, which the server
//! forgets once a detached tracer's last trampoline is freed); it is not on any grace
//! period's path (the free was authorized already).
//!
//! The link never blocks or signals program threads: all it does with the program is
//! through the [`Handler`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
use pb::events_message::Body as ToEvents;
use pb::server_message::Body as ToAgent;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The outbound channels of the current session, for messages produced outside the
/// link thread (the final flush at exit).
static OUTBOX: std::sync::Mutex<Option<Outbound>> = std::sync::Mutex::new(None);

/// What one stream's queue holds: messages and encoded bytes queued on the channel,
/// and taken from it by the transport. Their difference is what waits for a server
/// that does not read (hung, stopped, or slower than the program).
struct Queue {
    queued: AtomicU64,
    taken: AtomicU64,
    queued_bytes: AtomicU64,
    taken_bytes: AtomicU64,
}

impl Queue {
    const fn new() -> Queue {
        Queue {
            queued: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            taken_bytes: AtomicU64::new(0),
        }
    }

    fn queued(&self, bytes: usize) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.queued_bytes.fetch_add(bytes as u64, Ordering::AcqRel);
    }

    fn taken(&self, bytes: usize) {
        self.taken.fetch_add(1, Ordering::AcqRel);
        self.taken_bytes.fetch_add(bytes as u64, Ordering::AcqRel);
    }

    fn backlog_bytes(&self) -> u64 {
        self.queued_bytes
            .load(Ordering::Acquire)
            .saturating_sub(self.taken_bytes.load(Ordering::Acquire))
    }

    fn all_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire) >= self.queued.load(Ordering::Acquire)
    }

    /// What an ended session did not take is gone with its channel: no backlog.
    fn forget(&self) {
        self.taken
            .store(self.queued.load(Ordering::Acquire), Ordering::Release);
        self.taken_bytes
            .store(self.queued_bytes.load(Ordering::Acquire), Ordering::Release);
    }
}

/// The `Session` stream's queue and the `Events` stream's.
static SESSION: Queue = Queue::new();
static EVENTS: Queue = Queue::new();

/// Bytes queued for the server on the `Session` stream that the transport has not
/// taken yet.
pub fn session_backlog_bytes() -> u64 {
    SESSION.backlog_bytes()
}

/// Bytes queued for the server on the `Events` stream that the transport has not
/// taken yet.
pub fn events_backlog_bytes() -> u64 {
    EVENTS.backlog_bytes()
}

/// The two outbound channels of a session.
#[derive(Clone)]
struct Outbound {
    session: mpsc::UnboundedSender<pb::AgentMessage>,
    events: mpsc::UnboundedSender<pb::EventsMessage>,
}

impl Outbound {
    /// Queues `body` on its stream: event batches and `Freed` reports on `Events`,
    /// the rest on `Session`. False when the session is gone.
    fn send(&self, body: FromAgent) -> bool {
        use prost::Message;
        let events = match body {
            FromAgent::Events(e) => ToEvents::Events(e),
            FromAgent::Trampoline(pb::TrampolineReport {
                trampoline_id,
                report: Some(pb::trampoline_report::Report::Freed(_)),
            }) => ToEvents::FreedTrampolineId(trampoline_id),
            body => {
                let m = pb::AgentMessage { body: Some(body) };
                SESSION.queued(m.encoded_len());
                return self.session.send(m).is_ok();
            }
        };
        let m = pb::EventsMessage { body: Some(events) };
        EVENTS.queued(m.encoded_len());
        self.events.send(m).is_ok()
    }
}

/// Queues messages on the current session from any thread; false when there is none.
pub fn send_from_any_thread(msgs: Vec<FromAgent>) -> bool {
    let outbox = OUTBOX.lock().unwrap_or_else(|e| e.into_inner());
    let Some(out) = outbox.as_ref() else {
        return false;
    };
    msgs.into_iter().all(|body| out.send(body))
}

/// Whether a session is open: a lock-free flag, since program threads read it (in
/// `dlopen`) and a forked child must not find it locked.
static CONNECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a session is open (a program thread may wait for the server's answers).
pub fn connected() -> bool {
    CONNECTED.load(std::sync::atomic::Ordering::Acquire)
}

/// Whether a session attempt of this process failed or ended (the server may be gone):
/// waits that expect a session give up then.
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a session attempt of this process failed or a session ended.
pub fn failed_once() -> bool {
    FAILED.load(std::sync::atomic::Ordering::Acquire)
}

/// In a forked child: the parent's session is not the child's.
pub fn forked_child() {
    CONNECTED.store(false, std::sync::atomic::Ordering::Release);
    FAILED.store(false, std::sync::atomic::Ordering::Release);
}

/// Waits (bounded) until the transport took every queued message of both streams.
pub fn wait_taken(deadline: std::time::Instant) -> bool {
    while !(SESSION.all_taken() && EVENTS.all_taken()) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Backoff between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What the link drives. Runs on the link thread only.
pub trait Handler {
    /// Builds the hello of a new connection (threads, epoch, re-reported trampolines).
    fn hello(&mut self) -> pb::Hello;
    /// The server accepted us.
    fn welcome(&mut self, w: &pb::Welcome);
    /// A message from the server; answers go to `out`.
    fn message(&mut self, msg: ToAgent, out: &mut Vec<FromAgent>);
    /// A program thread's stamp completed what the last observation round waited for
    /// (`hot::qswake`): observe now.
    fn woken(&mut self, out: &mut Vec<FromAgent>);
    /// A program thread waits in `dlopen` for what it loaded to be covered
    /// (`control::loads`): discover now and tell the server.
    fn loaded(&mut self, out: &mut Vec<FromAgent>);
    /// Periodic work (thread scan, quiescent detection, flushing counts and events).
    /// `connected` is false while there is no server: the handler keeps the program
    /// safe and buffers within its bounds.
    fn tick(&mut self, connected: bool, out: &mut Vec<FromAgent>);
    /// How often to tick.
    fn tick_interval(&self) -> Duration;
    /// The session ended (the server went away or refused us).
    fn disconnected(&mut self, why: &str);
}

/// Runs forever on the calling thread.
pub fn run(socket: PathBuf, mut handler: impl Handler) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::control::log::warn(&format!("patchbay agent: no runtime ({e}); agent disabled"));
            return;
        }
    };
    rt.block_on(async move {
        let mut backoff = BACKOFF_MIN;
        loop {
            match session(&socket, &mut handler).await {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(why) => {
                    FAILED.store(true, std::sync::atomic::Ordering::Release);
                    handler.disconnected(&why);
                    crate::control::log::debug(&format!("patchbay agent: {why}"));
                }
            }
            // Keep ticking while waiting for a server.
            let until = tokio::time::Instant::now() + backoff;
            while tokio::time::Instant::now() < until {
                let mut out = Vec::new();
                handler.tick(false, &mut out);
                tokio::time::sleep(handler.tick_interval().min(backoff)).await;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
}

async fn connect(
    socket: &Path,
) -> Result<pb::agent_client::AgentClient<tonic::transport::Channel>, String> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("cannot reach patchbayd at {}: {e}", socket.display()))?;
    Ok(pb::agent_client::AgentClient::new(channel).max_decoding_message_size(64 << 20))
}

/// One session: hello, welcome, the events stream, then messages both ways until
/// either stream ends.
async fn session(socket: &Path, handler: &mut impl Handler) -> Result<(), String> {
    let result = run_session(socket, handler).await;
    *OUTBOX.lock().unwrap_or_else(|e| e.into_inner()) = None;
    SESSION.forget();
    EVENTS.forget();
    CONNECTED.store(false, std::sync::atomic::Ordering::Release);
    // Nobody waits for markers of a session that ended.
    crate::control::loads::session_ended();
    result
}

async fn run_session(socket: &Path, handler: &mut impl Handler) -> Result<(), String> {
    use prost::Message;
    let mut client = connect(socket).await?;
    let (tx, rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
    let hello = pb::AgentMessage {
        body: Some(FromAgent::Hello(handler.hello())),
    };
    SESSION.queued(hello.encoded_len());
    let _ = tx.send(hello);
    let outbound = UnboundedReceiverStream::new(rx).map(|m| {
        SESSION.taken(m.encoded_len());
        m
    });
    let mut inbound = client
        .session(outbound)
        .await
        .map_err(|s| format!("server refused the session: {}", s.message()))?
        .into_inner();
    let welcome = match inbound.next().await {
        Some(Ok(pb::ServerMessage {
            body: Some(ToAgent::Welcome(w)),
        })) => w,
        Some(Ok(_)) => return Err("server did not welcome us".into()),
        Some(Err(s)) => return Err(format!("server refused us: {}", s.message())),
        None => return Err("server closed the session".into()),
    };
    if welcome.session_id == 0 {
        return Err("the server's welcome names no session (session_id 0)".into());
    }
    // The events stream, on its own connection.
    let mut events_client = connect(socket).await?;
    let (etx, erx) = mpsc::unbounded_channel::<pb::EventsMessage>();
    let open = pb::EventsMessage {
        body: Some(ToEvents::Open(pb::EventsOpen {
            agent_id: welcome.agent_id,
            session_id: welcome.session_id,
        })),
    };
    EVENTS.queued(open.encoded_len());
    let _ = etx.send(open);
    let events_out = UnboundedReceiverStream::new(erx).map(|m| {
        EVENTS.taken(m.encoded_len());
        m
    });
    let events_call = events_client.events(events_out);
    tokio::pin!(events_call);
    handler.welcome(&welcome);
    let out_tx = Outbound {
        session: tx,
        events: etx,
    };
    *OUTBOX.lock().unwrap_or_else(|e| e.into_inner()) = Some(out_tx.clone());
    CONNECTED.store(true, std::sync::atomic::Ordering::Release);

    let mut out = Vec::new();
    let wake = WakeFd::new();
    let mut next_tick = tokio::time::Instant::now() + handler.tick_interval();
    loop {
        let tick = tokio::time::sleep_until(next_tick);
        tokio::select! {
            msg = inbound.next() => match msg {
                Some(Ok(pb::ServerMessage { body: Some(ToAgent::Shutdown(s)) })) => {
                    return Err(format!("server shut the session down: {}", s.reason));
                }
                Some(Ok(pb::ServerMessage { body: Some(body) })) => handler.message(body, &mut out),
                Some(Ok(_)) => {}
                Some(Err(s)) => return Err(format!("session failed: {}", s.message())),
                None => return Err("server closed the session".into()),
            },
            _ = crate::control::loads::WAKE.notified() => handler.loaded(&mut out),
            // The last stamp an observation round waited for: look at once.
            _ = wake.woken() => handler.woken(&mut out),
            // The server answers the events stream only when it ends it.
            end = &mut events_call => return Err(match end {
                Ok(_) => "server closed the events stream".into(),
                Err(s) => format!("events stream failed: {}", s.message()),
            }),
            _ = tick => {
                handler.tick(true, &mut out);
                next_tick = tokio::time::Instant::now() + handler.tick_interval();
            }
        }
        next_tick = next_tick.min(tokio::time::Instant::now() + handler.tick_interval());
        for body in out.drain(..) {
            out_tx.send(body);
        }
    }
}

/// The agent thread's `eventfd`, registered with `hot::qswake` (which program threads
/// write when the stamp the agent waits for is taken). One per process, never closed: a
/// signal handler may have loaded its number just before, and a write to a number the
/// program reused would corrupt the program's file. A forked child makes its own (the
/// inherited one is the parent's; it stays open, close-on-exec, unused).
struct WakeFd {
    fd: Option<tokio::io::unix::AsyncFd<RawEventFd>>,
}

/// An eventfd number polled by tokio, not owned (never closed).
struct RawEventFd(i32);

impl std::os::fd::AsRawFd for RawEventFd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

/// The process's eventfd and the pid it was made in.
static WAKE_FD: std::sync::Mutex<Option<(u32, i32)>> = std::sync::Mutex::new(None);

impl WakeFd {
    fn new() -> WakeFd {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        let mut made = WAKE_FD.lock().unwrap_or_else(|e| e.into_inner());
        let raw = match *made {
            Some((p, fd)) if p == pid => fd,
            _ => {
                // SAFETY: eventfd has no preconditions; a non-negative result is a new fd.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                if fd < 0 {
                    crate::control::log::warn(
                        "no eventfd: grace periods wait for the agent's tick",
                    );
                    return WakeFd { fd: None };
                }
                *made = Some((pid, fd));
                fd
            }
        };
        crate::hot::qswake::set_wake_fd(raw);
        // SAFETY: `raw` is an open eventfd that is never closed (see above), so it stays
        // valid and the same file description for the AsyncFd's whole life.
        match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                RawEventFd(raw),
                tokio::io::Interest::READABLE,
            )
        } {
            Ok(fd) => WakeFd { fd: Some(fd) },
            Err(e) => {
                crate::control::log::warn(&format!(
                    "eventfd not pollable ({e}): grace periods wait for the agent's tick"
                ));
                WakeFd { fd: None }
            }
        }
    }

    /// Resolves when a program thread wrote the eventfd (never without one).
    async fn woken(&self) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            let mut v: u64 = 0;
            // SAFETY: an 8-byte read into a local from our non-blocking eventfd.
            let n = unsafe { libc::read(fd.get_ref().as_raw_fd(), (&raw mut v).cast(), 8) };
            if n == 8 {
                return;
            }
            // EAGAIN: the readiness was stale.
            guard.clear_ready();
        }
    }
}
