//! Reading `/proc/self`: threads, what each is doing (`task/TID/syscall`), the process
//! start time. Parsing is pure and tested; reading is a thin layer over it.

use std::io::Read;

/// What `/proc/self/task/TID/syscall` says about a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallState {
    /// Running in user space (or runnable): must be observed another way.
    Running,
    /// Blocked in system call `nr`, with its user stack pointer and program counter.
    Blocked { nr: i64, sp: u64, pc: u64 },
    /// The thread is gone.
    Gone,
}

/// Parses the contents of a `syscall` file: `running`, `-1 SP PC` (blocked, not in a
/// syscall: e.g. stopped), or `NR a0 .. a5 SP PC`.
pub fn parse_syscall(s: &str) -> Option<SyscallState> {
    let s = s.trim();
    if s == "running" {
        return Some(SyscallState::Running);
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    let nr: i64 = fields.first()?.parse().ok()?;
    let hex = |f: &str| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok();
    match fields.len() {
        // "-1 SP PC": in the kernel but not in a system call (e.g. stopped, page fault).
        3 => Some(SyscallState::Blocked {
            nr,
            sp: hex(fields[1])?,
            pc: hex(fields[2])?,
        }),
        9 => Some(SyscallState::Blocked {
            nr,
            sp: hex(fields[7])?,
            pc: hex(fields[8])?,
        }),
        _ => None,
    }
}

/// Reads `/proc/self/task/TID/syscall` without allocating more than a small buffer.
pub fn syscall_state(tid: u32) -> SyscallState {
    let mut buf = [0u8; 256];
    let path = format!("/proc/self/task/{tid}/syscall");
    let Ok(mut f) = std::fs::File::open(path) else {
        return SyscallState::Gone;
    };
    let n = match f.read(&mut buf) {
        Ok(n) => n,
        Err(_) => return SyscallState::Gone,
    };
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(parse_syscall)
        .unwrap_or(SyscallState::Running)
}

/// Thread ids of this process, from `/proc/self/task`.
pub fn thread_ids() -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(tid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Field 22 (start time, clock ticks since boot) of a `stat` line.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's start time (field 22 of `/proc/self/stat`).
pub fn start_time() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_start_time(&s))
        .unwrap_or(0)
}

/// The calling thread's kernel id.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_syscall_lines() {
        assert_eq!(parse_syscall("running\n"), Some(SyscallState::Running));
        assert_eq!(
            parse_syscall("230 0x0 0x0 0x7ffd 0x0 0x0 0x0 0x7ffc1000 0x7f00aa\n"),
            Some(SyscallState::Blocked {
                nr: 230,
                sp: 0x7ffc1000,
                pc: 0x7f00aa
            })
        );
        assert_eq!(
            parse_syscall("-1 0x7ffc 0x401000"),
            Some(SyscallState::Blocked {
                nr: -1,
                sp: 0x7ffc,
                pc: 0x401000
            })
        );
        assert_eq!(parse_syscall("garbage"), None);
    }

    #[test]
    fn parses_start_time_with_spaces_in_comm() {
        let stat = "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
    }

    #[test]
    fn sees_a_blocked_thread_and_itself_running() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        assert!(thread_ids().contains(&tid));
        // Wait (with a deadline) until the thread is blocked in its futex wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let SyscallState::Blocked { nr, pc, .. } = syscall_state(tid) {
                assert_eq!(nr, libc::SYS_futex);
                assert_ne!(pc, 0);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "thread never blocked");
            std::thread::yield_now();
        }
        tx.send(()).unwrap();
        h.join().unwrap();
        // A thread spinning in user space reads as running.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let h = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let tid = tid_rx.recv().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while syscall_state(tid) != SyscallState::Running {
            assert!(
                std::time::Instant::now() < deadline,
                "spinning thread never running"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap();
        assert!(start_time() > 0);
    }
}
