//! Starting the agent: the global runtime, the link thread, the constructor of the
//! preloaded library, the final flush at exit, and fork.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use std::time::{Duration, Instant};

use crate::control::runtime::Runtime;
use crate::control::{link, loads, log, threads};
use crate::hot::{block, dispatch, qs, sigwrap};

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
static STARTED: AtomicBool = AtomicBool::new(false);
/// How the agent arrived (`patchbay_proto::Arrival`), reported in every hello; set once,
/// by the entry that started it.
static ARRIVAL: AtomicI32 = AtomicI32::new(patchbay_proto::Arrival::Linked as i32);
/// The server socket given by the injector; `None`: the default socket.
static SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// True once the agent was started (or is starting) in this process.
pub fn started() -> bool {
    STARTED.load(Ordering::Acquire)
}

/// How the agent arrived in this process (`patchbay_proto::Arrival` as sent).
pub fn arrival() -> i32 {
    ARRIVAL.load(Ordering::Acquire)
}

/// Errors of starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the agent's thread-local state is not static TLS (was the agent dlopen()ed?); preload it or link it"
    )]
    DynamicTls,
    #[error("cannot install the quiescent-state signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot map thread blocks: {0}")]
    Blocks(std::io::Error),
    #[error("cannot start the agent thread: {0}")]
    Thread(std::io::Error),
}

fn runtime() -> MutexGuard<'static, Option<Runtime>> {
    RUNTIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the agent (idempotent): prepares the per-thread machinery and starts the
/// agent thread, which connects to the server and retries in the background.
pub fn start() -> Result<(), StartError> {
    start_as(patchbay_proto::Arrival::Linked, None)
}

/// [`start`] by one of the library's entries: the preload constructor or the entry the
/// injector calls (`inject.rs`), with the server socket the injector named.
pub(crate) fn start_as(
    arrival: patchbay_proto::Arrival,
    socket: Option<PathBuf>,
) -> Result<(), StartError> {
    if STARTED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    ARRIVAL.store(arrival as i32, Ordering::Release);
    if let Some(socket) = socket {
        let _ = SOCKET.set(socket);
    }
    let r = start_inner();
    if r.is_err() {
        STARTED.store(false, Ordering::Release);
    }
    r
}

fn start_inner() -> Result<(), StartError> {
    let offsets = block::tls_offsets();
    let (tls, nest) = offsets.ok_or(StartError::DynamicTls)?;
    dispatch::PATCHBAY_NEST_OFFSET.store(nest as i64, Ordering::Release);
    if !block::init_fast_tls() {
        log::warn("dispatcher thread-locals are not static: using the slow accessors");
    }
    block::refill(64).map_err(StartError::Blocks)?;
    block::init_overflow().map_err(StartError::Blocks)?;
    let signal = std::env::var("PATCHBAY_QS_SIGNAL")
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map(|o| libc::SIGRTMIN() + o)
        .unwrap_or_else(qs::default_signal);
    sigwrap::install_qs_signal(signal).map_err(StartError::Signal)?;
    // Program handlers installed so far go behind the wrapper, with the signal masked.
    sigwrap::reclaim();
    // libc's dlopen/dlmopen/dlclose, for the interposed ones (never a `dlsym` later,
    // which would clear a program's `dlerror()` state).
    crate::sys::dl::resolve();
    // libc's mask and window functions, for the interposed ones (`hot::sigmask`,
    // `interpose::windows`); and this thread keeps SIGTRAP deliverable even if the
    // process was started with it blocked (the program's view says blocked).
    crate::hot::sigmask::resolve();
    crate::interpose::windows::resolve();
    crate::hot::sigmask::adopt();
    crate::interpose::unwind::resolve();
    *runtime() = Some(Runtime::new(Some(tls)));
    spawn_link()?;
    // SAFETY: registering plain extern "C" functions with no preconditions.
    unsafe {
        libc::atexit(at_exit);
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        );
    }
    Ok(())
}

fn spawn_link() -> Result<(), StartError> {
    let socket = SOCKET
        .get()
        .cloned()
        .unwrap_or_else(patchbay_proto::socket::connect_socket_path);
    std::thread::Builder::new()
        .name("patchbay-agent".into())
        .spawn(move || {
            threads::register_agent_thread();
            link::run(socket, Shared);
        })
        .map(|_| ())
        .map_err(StartError::Thread)
}

/// The link's handler: the global runtime, locked for each step.
struct Shared;

/// Runs one step on the runtime, excluding fork.
fn step<R>(f: impl FnOnce(&mut Runtime) -> R) -> R {
    fork_lock();
    let r = f(runtime().as_mut().expect("the runtime exists once started"));
    fork_unlock();
    r
}

impl link::Handler for Shared {
    fn hello(&mut self) -> patchbay_proto::Hello {
        step(|r| r.hello())
    }
    fn welcome(&mut self, w: &patchbay_proto::Welcome) {
        step(|r| link::Handler::welcome(r, w))
    }
    fn message(
        &mut self,
        msg: patchbay_proto::server_message::Body,
        out: &mut Vec<patchbay_proto::agent_message::Body>,
    ) {
        step(|r| link::Handler::message(r, msg, out))
    }
    fn woken(&mut self, out: &mut Vec<patchbay_proto::agent_message::Body>) {
        step(|r| link::Handler::woken(r, out))
    }
    fn loaded(&mut self, out: &mut Vec<patchbay_proto::agent_message::Body>) {
        step(|r| link::Handler::loaded(r, out))
    }
    fn tick(&mut self, connected: bool, out: &mut Vec<patchbay_proto::agent_message::Body>) {
        step(|r| link::Handler::tick(r, connected, out))
    }
    fn tick_interval(&self) -> Duration {
        step(|r| link::Handler::tick_interval(r))
    }
    fn disconnected(&mut self, why: &str) {
        step(|r| link::Handler::disconnected(r, why))
    }
}

/// At exit: send the final counts and events, waiting a bounded time.
extern "C" fn at_exit() {
    crate::control::hold::exit_wait_for_session();
    fork_lock();
    let msgs = runtime()
        .as_mut()
        .map(|r| r.final_flush())
        .unwrap_or_default();
    fork_unlock();
    if link::send_from_any_thread(msgs) {
        link::wait_taken(Instant::now() + Duration::from_millis(300));
        // Let the transport write what it took.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Excludes fork from the middle of a runtime step, so a child never inherits the
/// runtime half-updated (or its lock held by a thread that does not exist there).
struct ForkLock(std::cell::UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is made to be shared between threads.
unsafe impl Sync for ForkLock {}
static FORK_LOCK: ForkLock = ForkLock(std::cell::UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

fn fork_lock() {
    // SAFETY: a statically initialized default mutex, locked and unlocked in pairs.
    unsafe { libc::pthread_mutex_lock(FORK_LOCK.0.get()) };
}

fn fork_unlock() {
    // SAFETY: paired with `fork_lock` on the same thread (or in the fork child, where
    // the forking thread's lock is inherited by its only thread).
    unsafe { libc::pthread_mutex_unlock(FORK_LOCK.0.get()) };
}

extern "C" fn before_fork() {
    fork_lock();
    loads::before_fork();
    crate::control::unmapped::before_fork();
}

extern "C" fn after_fork_parent() {
    crate::control::unmapped::after_fork();
    loads::after_fork();
    fork_unlock();
}

extern "C" fn after_fork_child() {
    crate::control::trapwindow::forked_child();
    crate::control::unmapped::after_fork();
    loads::after_fork();
    link::forked_child();
    fork_unlock();
    // The child is a new process: a new agent, with the inherited trampolines.
    crate::sys::reset_tid();
    threads::clear_agent_threads();
    if let Some(r) = runtime().as_mut() {
        r.forked_child();
    }
    if let Err(e) = spawn_link() {
        log::warn(&format!("agent not restarted in the forked child: {e}"));
    }
}
