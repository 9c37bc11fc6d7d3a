//! The link to the server: one background thread running a single-threaded tokio
//! runtime that keeps an `Agent.Session` stream open, reconnecting with backoff when the
//! server is absent or goes away. It never blocks or signals program threads: all it
//! does with the program is through the [`Handler`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
use pb::server_message::Body as ToAgent;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The outbound channel of the current session, for messages produced outside the
/// link thread (the final flush at exit).
static OUTBOX: std::sync::Mutex<Option<mpsc::UnboundedSender<pb::AgentMessage>>> =
    std::sync::Mutex::new(None);
/// Messages queued on, and taken from, the session's channel.
static QUEUED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Encoded bytes of the messages queued on, and taken from, the current session's
/// channel: their difference is what waits for a server that does not read (hung,
/// stopped, or slower than the program).
static QUEUED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static TAKEN_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes queued for the server that the transport has not taken yet.
pub fn backlog_bytes() -> u64 {
    use std::sync::atomic::Ordering;
    QUEUED_BYTES
        .load(Ordering::Acquire)
        .saturating_sub(TAKEN_BYTES.load(Ordering::Acquire))
}

fn queued(m: &pb::AgentMessage) {
    use prost::Message;
    use std::sync::atomic::Ordering;
    QUEUED.fetch_add(1, Ordering::AcqRel);
    QUEUED_BYTES.fetch_add(m.encoded_len() as u64, Ordering::AcqRel);
}

fn taken(m: &pb::AgentMessage) {
    use prost::Message;
    use std::sync::atomic::Ordering;
    TAKEN.fetch_add(1, Ordering::AcqRel);
    TAKEN_BYTES.fetch_add(m.encoded_len() as u64, Ordering::AcqRel);
}

/// Queues messages on the current session from any thread; false when there is none.
pub fn send_from_any_thread(msgs: Vec<FromAgent>) -> bool {
    let outbox = OUTBOX.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tx) = outbox.as_ref() else {
        return false;
    };
    for body in msgs {
        let m = pb::AgentMessage { body: Some(body) };
        queued(&m);
        if tx.send(m).is_err() {
            return false;
        }
    }
    true
}

/// Whether a session is open: a lock-free flag, since program threads read it (in
/// `dlopen`) and a forked child must not find it locked.
static CONNECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a session is open (a program thread may wait for the server's answers).
pub fn connected() -> bool {
    CONNECTED.load(std::sync::atomic::Ordering::Acquire)
}

/// In a forked child: the parent's session is not the child's.
pub fn forked_child() {
    CONNECTED.store(false, std::sync::atomic::Ordering::Release);
}

/// Waits (bounded) until the transport took every queued message.
pub fn wait_taken(deadline: std::time::Instant) -> bool {
    use std::sync::atomic::Ordering;
    while TAKEN.load(Ordering::Acquire) < QUEUED.load(Ordering::Acquire) {
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

/// One session: hello, welcome, then messages both ways until the stream ends.
async fn session(socket: &Path, handler: &mut impl Handler) -> Result<(), String> {
    let mut client = connect(socket).await?;
    let (tx, rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
    let send = |body: FromAgent| {
        let m = pb::AgentMessage { body: Some(body) };
        queued(&m);
        let _ = tx.send(m);
    };
    send(FromAgent::Hello(handler.hello()));
    *OUTBOX.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
    CONNECTED.store(true, std::sync::atomic::Ordering::Release);
    let outbound = UnboundedReceiverStream::new(rx).map(|m| {
        taken(&m);
        m
    });
    let result = run_session(&mut client, outbound, handler, &send).await;
    *OUTBOX.lock().unwrap_or_else(|e| e.into_inner()) = None;
    CONNECTED.store(false, std::sync::atomic::Ordering::Release);
    // Nobody waits for markers of a session that ended.
    crate::control::loads::session_ended();
    // What the ended session did not take is gone with its channel: no backlog.
    use std::sync::atomic::Ordering;
    TAKEN.store(QUEUED.load(Ordering::Acquire), Ordering::Release);
    TAKEN_BYTES.store(QUEUED_BYTES.load(Ordering::Acquire), Ordering::Release);
    result
}

async fn run_session(
    client: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    outbound: impl tokio_stream::Stream<Item = pb::AgentMessage> + Send + 'static,
    handler: &mut impl Handler,
    send: &impl Fn(FromAgent),
) -> Result<(), String> {
    let mut inbound = client
        .session(outbound)
        .await
        .map_err(|s| format!("server refused the session: {}", s.message()))?
        .into_inner();
    match inbound.next().await {
        Some(Ok(pb::ServerMessage {
            body: Some(ToAgent::Welcome(w)),
        })) => handler.welcome(&w),
        Some(Ok(_)) => return Err("server did not welcome us".into()),
        Some(Err(s)) => return Err(format!("server refused us: {}", s.message())),
        None => return Err("server closed the session".into()),
    }
    let mut out = Vec::new();
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
            _ = tick => {
                handler.tick(true, &mut out);
                next_tick = tokio::time::Instant::now() + handler.tick_interval();
            }
        }
        next_tick = next_tick.min(tokio::time::Instant::now() + handler.tick_interval());
        for body in out.drain(..) {
            send(body);
        }
    }
}
