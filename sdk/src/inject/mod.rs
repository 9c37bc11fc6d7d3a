//! Injecting the agent into a running process with ptrace (issue 13), in the caller's
//! own process and with the caller's credentials, so the kernel enforces exactly "never
//! more than the caller could do with gdb".
//!
//! [`inject`] checks what can be told in advance (uid, Yama, a tracer already attached,
//! seccomp, a static program, another mount namespace, an agent already loaded), then
//! seizes **one** thread of the target (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`; the
//! others keep running), saves its registers and extended state, makes it call
//! `dlopen(agent, RTLD_NOW)` and then the agent's `patchbay_agent_injected(socket)`
//! (which hands the start to a new thread and returns), each call returning to address
//! 0 whose fault stops it again, restores the stack bytes, registers and extended state
//! and detaches. A system call the stop interrupted is restarted by the kernel from the
//! restored `orig_rax`/`rax` (`-ERESTART*`), or by the injector for the calls that
//! return a plain `EINTR` on a stop (`epoll_wait` & co., see
//! [`checks::eintr_on_stop`]).

mod checks;
mod ptrace;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object::{Object, ObjectSegment, ObjectSymbol};

pub use checks::check_yama;

/// Why the agent was not injected. Each message says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// No such process.
    #[error("no process {0}")]
    NoProcess(u32),
    /// The kernel's rules (uid, Yama, capabilities) forbid the caller to ptrace it.
    #[error("cannot inject the agent into pid {pid}: {why}")]
    NotPermitted {
        /// The target.
        pid: u32,
        /// The rule that forbids it.
        why: String,
    },
    /// A debugger (or another tracer) is attached.
    #[error(
        "cannot inject the agent into pid {pid}: it is already traced by pid {tracer} \
         ({tracer_name}); detach the debugger first"
    )]
    AlreadyTraced {
        /// The target.
        pid: u32,
        /// `TracerPid`.
        tracer: u32,
        /// Its name.
        tracer_name: String,
    },
    /// A seccomp mode is active.
    #[error(
        "cannot inject the agent into pid {pid}: it runs under seccomp (mode {mode}), which may \
         forbid what the agent needs (threads, sockets, code mappings) and kill the program; \
         start it with `patchbay run` or LD_PRELOAD and allow those calls"
    )]
    Seccomp {
        /// The target.
        pid: u32,
        /// 1 strict, 2 filter.
        mode: u32,
    },
    /// No dynamic loader in the process.
    #[error(
        "cannot inject the agent into pid {pid}: {why}; the agent can only be loaded into \
         dynamically linked programs (link the patchbay-agent crate into a static one)"
    )]
    NoLoader {
        /// The target.
        pid: u32,
        /// What is missing.
        why: String,
    },
    /// The agent library is not at the same path in the target's mount namespace.
    #[error(
        "cannot inject the agent into pid {pid}: it runs in another mount namespace where \
         {agent} is not this agent library; copy libpatchbay_agent.so into its filesystem and \
         pass its path as seen from inside with --agent PATH"
    )]
    OtherNamespace {
        /// The target.
        pid: u32,
        /// The path given.
        agent: String,
    },
    /// The agent library to inject is not usable.
    #[error("cannot inject {agent}: {why}")]
    BadAgent {
        /// The path given.
        agent: String,
        /// What is wrong.
        why: String,
    },
    /// The process exited during the injection (nothing is left behind).
    #[error("pid {0} exited during the injection")]
    Exited(u32),
    /// The dynamic loader refused the agent.
    #[error("the dynamic loader of pid {pid} refused the agent: {why}")]
    LoadFailed {
        /// The target.
        pid: u32,
        /// `dlerror()` in the target.
        why: String,
    },
    /// The agent was loaded but did not connect to the server in time.
    #[error(
        "the agent was injected into pid {pid} but did not connect to patchbayd at {socket} \
         within {waited_ms} ms: can the process reach that socket (another mount namespace, \
         a sandbox)? run `patchbay agents` to see whether it arrives later"
    )]
    NotConnected {
        /// The target.
        pid: u32,
        /// The socket given to the agent.
        socket: String,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// The server is reached over TCP: an injected agent connects to a Unix socket.
    #[error(
        "cannot inject the agent into pid {0}: agents connect to patchbayd's Unix socket, and \
         this client reaches it over TCP; run `patchbay attach` on the server's machine with \
         its socket"
    )]
    NeedsUnixSocket(u32),
    /// A ptrace step failed.
    #[error("cannot inject the agent into pid {pid}: {what}")]
    Ptrace {
        /// The target.
        pid: u32,
        /// What failed.
        what: String,
    },
}

/// What [`inject`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injected {
    /// The agent was loaded and its start began.
    Loaded {
        /// The thread that made the calls.
        tid: i32,
        /// How long that thread was stopped (seen from the injector).
        stopped: Duration,
    },
    /// An agent was already mapped in the process: nothing was loaded.
    AlreadyThere,
}

/// Options of [`inject`].
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The agent library (an absolute path valid in the target's mount namespace).
    pub agent: PathBuf,
    /// The server socket the agent connects to.
    pub socket: PathBuf,
    /// Bound of the whole injection.
    pub timeout: Duration,
}

/// Injects the agent into `pid` (blocking: run it on a blocking thread). See the module.
pub fn inject(pid: u32, opts: &InjectOptions) -> Result<Injected, InjectError> {
    let deadline = Instant::now() + opts.timeout;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status"))
        .map_err(|_| InjectError::NoProcess(pid))?;
    let status = checks::parse_status(&status);
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    checks::check_uid(pid, euid, &status)?;
    let tracer_name = std::fs::read_to_string(format!("/proc/{}/comm", status.tracer_pid)).ok();
    checks::check_tracer(pid, &status, tracer_name.as_deref().map(str::trim))?;
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    checks::check_yama(pid, scope, euid == 0, is_descendant(pid))?;
    checks::check_seccomp(pid, &status)?;

    let agent = &opts.agent;
    if !agent.is_absolute() {
        return Err(bad_agent(agent, "the path must be absolute"));
    }
    check_namespace(pid, agent)?;

    let maps =
        std::fs::read_to_string(proc_dir.join("maps")).map_err(|_| InjectError::Exited(pid))?;
    let maps = checks::parse_maps(&maps);
    if checks::agent_mapped(&maps, agent) {
        return Ok(Injected::AlreadyThere);
    }
    let (libc_path, libc_base) = checks::find_libc(&maps).ok_or_else(|| InjectError::NoLoader {
        pid,
        why: "no C library (libc.so.6) is mapped: the program is statically linked".into(),
    })?;
    let libc_file = std::fs::read(
        proc_dir
            .join("root")
            .join(libc_path.trim_start_matches('/')),
    )
    .map_err(|e| InjectError::NoLoader {
        pid,
        why: format!("cannot read its C library {libc_path}: {e}"),
    })?;
    let loader = |names: &[&str]| symbol(&libc_file, names).map(|a| a + libc_base);
    let dlopen =
        loader(&["dlopen", "__libc_dlopen_mode"]).ok_or_else(|| InjectError::NoLoader {
            pid,
            why: format!("its C library {libc_path} exports neither dlopen nor __libc_dlopen_mode"),
        })?;
    let dlerror = loader(&["dlerror"]);
    let agent_file = std::fs::read(agent).map_err(|e| bad_agent(agent, &e.to_string()))?;
    let entry_offset = symbol(&agent_file, &["patchbay_agent_injected"]).ok_or_else(|| {
        bad_agent(
            agent,
            "it does not export patchbay_agent_injected (an older agent?)",
        )
    })?;

    let tid = pick_thread(pid);
    let gone = |f: ptrace::Fail| match f {
        ptrace::Fail::Gone => InjectError::Exited(pid),
        ptrace::Fail::Os(what, e) if e.raw_os_error() == Some(libc::EPERM) => {
            InjectError::NotPermitted {
                pid,
                why: format!(
                    "{what}: {e} (the kernel refused: another uid, a setuid or undumpable \
                     program, or Yama; run as root or start it with `patchbay run`)"
                ),
            }
        }
        ptrace::Fail::Os(what, e) => InjectError::Ptrace {
            pid,
            what: format!("{what}: {e}"),
        },
        ptrace::Fail::Call(what) => InjectError::Ptrace { pid, what },
    };
    let started = Instant::now();
    let mut stopped = ptrace::seize(pid, tid, deadline).map_err(gone)?;
    let result = (|| {
        let mut path = agent.as_os_str().as_bytes().to_vec();
        path.push(0);
        let handle = stopped
            .call(
                dlopen,
                &[ptrace::DATA, libc::RTLD_NOW as u64],
                &path,
                deadline,
            )
            .map_err(gone)?;
        if handle == 0 {
            let why = dlerror
                .and_then(|f| stopped.call(f, &[], &[], deadline).ok())
                .filter(|p| *p != 0)
                .and_then(|p| read_cstr(&stopped, p))
                .unwrap_or_else(|| "dlopen returned NULL".to_owned());
            return Err(InjectError::LoadFailed { pid, why });
        }
        // `dlopen`'s handle is the object's `struct link_map`; `l_addr` comes first.
        let mut l_addr = [0u8; 8];
        stopped.read(handle, &mut l_addr).map_err(gone)?;
        let entry = u64::from_ne_bytes(l_addr) + entry_offset;
        let socket = CString::new(opts.socket.as_os_str().as_bytes())
            .map_err(|_| bad_agent(agent, "the socket path contains a NUL byte"))?;
        stopped
            .call(entry, &[ptrace::DATA], socket.as_bytes_with_nul(), deadline)
            .map_err(gone)?;
        Ok(())
    })();
    let tid = stopped.tid();
    match result {
        Ok(()) => {
            stopped.release().map_err(gone)?;
            Ok(Injected::Loaded {
                tid,
                stopped: started.elapsed(),
            })
        }
        Err(e) => {
            stopped.detach_quietly();
            Err(e)
        }
    }
}

fn bad_agent(agent: &Path, why: &str) -> InjectError {
    InjectError::BadAgent {
        agent: agent.display().to_string(),
        why: why.to_owned(),
    }
}

/// The target must see the same agent file at `agent` (same device and inode): always
/// true in our own mount namespace.
fn check_namespace(pid: u32, agent: &Path) -> Result<(), InjectError> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let here = std::fs::metadata(agent).map_err(|e| bad_agent(agent, &e.to_string()))?;
    if ours.is_some() && ours == theirs {
        return Ok(());
    }
    let inside =
        PathBuf::from(format!("/proc/{pid}/root")).join(agent.strip_prefix("/").unwrap_or(agent));
    match std::fs::metadata(inside) {
        Ok(m) if m.dev() == here.dev() && m.ino() == here.ino() => Ok(()),
        _ => Err(InjectError::OtherNamespace {
            pid,
            agent: agent.display().to_string(),
        }),
    }
}

/// True when `pid` descends from this process (Yama scope 1 allows those).
fn is_descendant(pid: u32) -> bool {
    let me = std::process::id();
    let mut p = pid;
    for _ in 0..64 {
        let Some(parent) = std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            })
        else {
            return false;
        };
        if parent == me {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

/// The thread to make the calls: the best [`checks::thread_rank`], the main thread on ties.
fn pick_thread(pid: u32) -> i32 {
    let mut best = (u8::MAX, pid as i32);
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut tids: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable_by_key(|t| (*t != pid as i32, *t));
        for tid in tids {
            let sc = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
                .ok()
                .and_then(|s| checks::parse_syscall(&s));
            let rank = checks::thread_rank(sc);
            if rank < best.0 {
                best = (rank, tid);
            }
        }
    }
    best.1
}

/// The address (relative to the load base) of the first of `names` an ELF file exports.
fn symbol(file: &[u8], names: &[&str]) -> Option<u64> {
    let elf = object::File::parse(file).ok()?;
    let first_load = elf.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    names.iter().find_map(|name| {
        elf.dynamic_symbols()
            .find(|s| s.name() == Ok(name) && s.is_definition())
            .map(|s| s.address() - first_load)
    })
}

fn read_cstr(stopped: &ptrace::Stopped, addr: u64) -> Option<String> {
    let mut buf = vec![0u8; 512];
    stopped.read(addr, &mut buf).ok()?;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}
