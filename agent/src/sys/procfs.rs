//! Reading `/proc/self`: threads, what each is doing (`task/TID/syscall`), their
//! `status` (signal masks), the process start time, the memory mappings. Parsing is
//! pure and tested; reading is a thin layer over it (agent thread only: it allocates).

use std::io::Read;

/// What `/proc/self/task/TID/syscall` says about a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyscallState {
    /// Running in user space (or runnable): must be observed another way.
    Running,
    /// Blocked in system call `nr`, with its user stack pointer and program counter.
    Blocked { nr: i64, sp: u64, pc: u64 },
    /// The thread is gone.
    Gone,
}

/// Parses the contents of a `syscall` file: `running`, `-1 SP PC` (blocked, not in a
/// syscall: e.g. stopped), or `NR a0 .. a5 SP PC`.
pub(crate) fn parse_syscall(s: &str) -> Option<SyscallState> {
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
pub(crate) fn syscall_state(tid: u32) -> SyscallState {
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
pub(crate) fn thread_ids() -> Vec<u32> {
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
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's start time (field 22 of `/proc/self/stat`).
pub(crate) fn start_time() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_start_time(&s))
        .unwrap_or(0)
}

/// The parent process as it is now: (pid, start time), or `None` when it cannot be
/// told (no parent, or it exited while we looked: `getppid` changed).
pub(crate) fn parent() -> Option<(u32, u64)> {
    // SAFETY: getppid cannot fail.
    let ppid = unsafe { libc::getppid() };
    if ppid <= 0 {
        return None;
    }
    let start = std::fs::read_to_string(format!("/proc/{ppid}/stat"))
        .ok()
        .and_then(|s| parse_start_time(&s))?;
    // SAFETY: as above. The parent did not exit meanwhile (we would have been
    // reparented), so the start time read is the parent's, not a recycled pid's.
    (unsafe { libc::getppid() } == ppid).then_some((ppid as u32, start))
}

/// `/proc/self/cmdline` as one line: arguments joined by spaces, at most `max` bytes
/// (cut on a character boundary).
pub(crate) fn cmdline(max: usize) -> String {
    let raw = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    join_cmdline(&raw, max)
}

/// The NUL-separated arguments of a `cmdline` file as one line (pure).
pub(crate) fn join_cmdline(raw: &[u8], max: usize) -> String {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut line = args.join(" ");
    if line.len() > max {
        let mut cut = max;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

/// Whether `tid` is still a thread of this process.
pub(crate) fn thread_alive(tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The `status` file of thread `tid` of this process.
pub(crate) fn thread_status(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()
}

/// The signal mask of field `field` (`SigBlk:`, `SigPnd:`, `SigIgn:`, …) of a `status`
/// text: bit `s - 1` for signal `s`.
pub(crate) fn status_mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
}

/// Whether signal `sig` is in the mask `field` of a `status` text.
pub(crate) fn status_has_signal(status: &str, field: &str, sig: i32) -> bool {
    (1..=64).contains(&sig)
        && status_mask(status, field).is_some_and(|m| m & (1u64 << (sig - 1)) != 0)
}

/// Whether thread `tid` blocks signal `sig` (`SigBlk`).
pub(crate) fn blocks_signal(tid: u32, sig: i32) -> bool {
    thread_status(tid).is_some_and(|s| status_has_signal(&s, "SigBlk:", sig))
}

/// This process's executable (`/proc/self/exe`).
pub(crate) fn exe() -> std::io::Result<std::path::PathBuf> {
    std::fs::read_link("/proc/self/exe")
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `rwxp`-style permissions.
    pub perms: [u8; 4],
    pub path: Option<String>,
}

impl Mapping {
    /// Readable and not writable.
    pub(crate) fn read_only(&self) -> bool {
        self.perms[0] == b'r' && self.perms[1] == b'-'
    }
}

/// Parses `/proc/PID/maps`: `start-end perms offset dev inode   path`.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut rest = line;
            let mut fields = [""; 5];
            for f in &mut fields {
                rest = rest.trim_start();
                let end = rest.find(' ').unwrap_or(rest.len());
                *f = &rest[..end];
                rest = &rest[end..];
            }
            let (start, end) = fields[0].split_once('-')?;
            let mut perms = [b'-'; 4];
            for (p, b) in perms.iter_mut().zip(fields[1].bytes()) {
                *p = b;
            }
            let path = rest.trim_start();
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                path: (!path.is_empty()).then(|| path.to_owned()),
            })
        })
        .collect()
}

/// This process's mappings (`/proc/self/maps`).
pub(crate) fn read_maps() -> std::io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string("/proc/self/maps")?))
}

/// The mappings of `text` (as `/proc/self/maps`) that contain one of `addrs` (sorted
/// here); only their lines are parsed in full (a process with hundreds of objects has
/// thousands of lines, and a `dlopen` needs one or two).
pub(crate) fn maps_containing(text: &str, addrs: &mut [u64]) -> Vec<Mapping> {
    addrs.sort_unstable();
    text.lines()
        .filter(|line| {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            let Some((start, end)) = range else {
                return false;
            };
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                return false;
            };
            let i = addrs.partition_point(|&a| a < start);
            addrs.get(i).is_some_and(|&a| a < end)
        })
        .flat_map(parse_maps)
        .collect()
}

/// [`maps_containing`] of this process's `/proc/self/maps`.
pub(crate) fn read_maps_containing(addrs: &mut [u64]) -> std::io::Result<Vec<Mapping>> {
    Ok(maps_containing(
        &std::fs::read_to_string("/proc/self/maps")?,
        addrs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_joined_and_cut() {
        assert_eq!(
            join_cmdline(b"sh\0-c\0./prog 2 1\0", 100),
            "sh -c ./prog 2 1"
        );
        assert_eq!(join_cmdline(b"", 100), "");
        assert_eq!(join_cmdline(b"abc\0def\0", 5), "abc d");
        // Never cut inside a character.
        assert_eq!(join_cmdline("é\0".as_bytes(), 1), "");
    }

    #[test]
    fn the_parent_is_this_process_s_parent() {
        let (ppid, start) = parent().expect("a test process has a live parent");
        // SAFETY: getppid cannot fail.
        assert_eq!(ppid as i32, unsafe { libc::getppid() });
        assert!(start > 0);
    }

    #[test]
    fn only_the_mappings_containing_the_addresses_are_parsed() {
        let text = "00400000-00401000 r--p 00000000 08:01 42 /bin/a\n\
                    00401000-00402000 r-xp 00001000 08:01 42 /bin/a\n\
                    7f0000000000-7f0000001000 r--p 00000000 08:01 7 /lib/b.so (deleted)\n\
                    7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n";
        let found = maps_containing(text, &mut [0x7f00_0000_0fff, 0x400000, 0x1234]);
        let got: Vec<(u64, Option<&str>)> =
            found.iter().map(|m| (m.start, m.path.as_deref())).collect();
        assert_eq!(
            got,
            [
                (0x400000, Some("/bin/a")),
                (0x7f00_0000_0000, Some("/lib/b.so (deleted)"))
            ]
        );
        assert_eq!(
            found,
            parse_maps(text)
                .into_iter()
                .filter(|m| m.start != 0x401000 && m.start != 0x7ffd00000000)
                .collect::<Vec<_>>()
        );
        assert!(maps_containing(text, &mut []).is_empty());
    }

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
    fn status_masks() {
        let st = "Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t0000000000010010\n";
        assert!(status_has_signal(st, "SigBlk:", libc::SIGTRAP));
        assert!(status_has_signal(st, "SigBlk:", 17));
        assert!(!status_has_signal(st, "SigBlk:", libc::SIGINT));
        assert!(!status_has_signal(st, "SigPnd:", libc::SIGTRAP));
        assert!(!status_has_signal("Name: x\n", "SigBlk:", libc::SIGTRAP));
        assert!(!blocks_signal(crate::sys::tid(), libc::SIGTRAP));
    }

    #[test]
    fn maps_lines() {
        let m = parse_maps(
            "55d0c6a00000-55d0c6a02000 r--p 00000000 fe:00 1234   /usr/bin/my prog\n\
             7ffd1c9f0000-7ffd1c9f2000 r-xp 00000000 00:00 0                          [vdso]\n\
             7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
             7f0000002000-7f0000003000 r-xp 00001000 fe:00 99 /tmp/libx.so (deleted)\n",
        );
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].start, 0x55d0c6a00000);
        assert_eq!(m[0].end, 0x55d0c6a02000);
        assert_eq!(m[0].path.as_deref(), Some("/usr/bin/my prog"));
        assert!(m[0].read_only() && m[1].read_only() && !m[2].read_only());
        assert_eq!(&m[2].perms, b"rw-p");
        assert_eq!(m[1].path.as_deref(), Some("[vdso]"));
        assert_eq!(m[2].path, None);
        assert_eq!(m[3].path.as_deref(), Some("/tmp/libx.so (deleted)"));
        assert!(!read_maps().unwrap().is_empty());
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
            tid_tx.send(crate::sys::tid()).unwrap();
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
            tid_tx.send(crate::sys::tid()).unwrap();
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
