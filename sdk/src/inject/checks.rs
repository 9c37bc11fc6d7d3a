//! Pure decisions of the injector: what `/proc/PID/status`, `/proc/PID/maps` and the
//! Yama setting say about whether (and how) the agent can be injected. No I/O here.

use std::path::{Path, PathBuf};

use super::InjectError;

/// What the injector needs from `/proc/PID/status`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    /// `Name:`.
    pub name: String,
    /// `Uid:` real, effective, saved, filesystem.
    pub uids: Vec<u32>,
    /// `TracerPid:` (0: not traced).
    pub tracer_pid: u32,
    /// `Seccomp:` (0 none, 1 strict, 2 filter).
    pub seccomp: u32,
}

/// Parses the fields of `/proc/PID/status` the injector reads.
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => s.name = value.to_owned(),
            "Uid" => {
                s.uids = value
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            }
            "TracerPid" => s.tracer_pid = value.parse().unwrap_or(0),
            "Seccomp" => s.seccomp = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    s
}

/// The kernel's rule for another uid (without CAP_SYS_PTRACE): every uid of the target
/// (real, effective, saved) must be the caller's real uid. Root may trace anyone.
pub fn check_uid(pid: u32, caller_uid: u32, target: &Status) -> Result<(), InjectError> {
    if caller_uid == 0 || target.uids.iter().all(|u| *u == caller_uid) {
        return Ok(());
    }
    Err(InjectError::NotPermitted {
        pid,
        why: format!(
            "it runs as uid {} and you are uid {caller_uid}; ptrace (and so injection) needs the \
             same uid or root",
            target.uids.first().copied().unwrap_or(u32::MAX)
        ),
    })
}

/// Refuses a process a debugger (or another tracer) is attached to.
pub fn check_tracer(
    pid: u32,
    target: &Status,
    tracer_name: Option<&str>,
) -> Result<(), InjectError> {
    if target.tracer_pid == 0 {
        return Ok(());
    }
    Err(InjectError::AlreadyTraced {
        pid,
        tracer: target.tracer_pid,
        tracer_name: tracer_name.unwrap_or("?").to_owned(),
    })
}

/// Refuses a process under seccomp: strict mode allows nothing the agent needs, and a
/// filter may forbid what it needs (threads, sockets, `mmap` of code, signals) in ways
/// that would kill the program, not just fail the agent.
pub fn check_seccomp(pid: u32, target: &Status) -> Result<(), InjectError> {
    match target.seccomp {
        0 => Ok(()),
        mode => Err(InjectError::Seccomp { pid, mode }),
    }
}

/// `kernel.yama.ptrace_scope`: 0 classic (same uid), 1 restricted (only descendants,
/// unless CAP_SYS_PTRACE), 2 admin-only, 3 no attach at all. `None`: no Yama (the file
/// is absent), the classic rule. `caller_is_root` stands for CAP_SYS_PTRACE.
pub fn check_yama(
    pid: u32,
    scope: Option<u32>,
    caller_is_root: bool,
    target_is_descendant: bool,
) -> Result<(), InjectError> {
    let why = match scope {
        None | Some(0) => return Ok(()),
        Some(1) if caller_is_root || target_is_descendant => return Ok(()),
        Some(2) if caller_is_root => return Ok(()),
        Some(1) => {
            "kernel.yama.ptrace_scope is 1: only a parent may ptrace its descendants; run \
             `patchbay attach` as root, or start the program with `patchbay run`, or set \
             `sysctl kernel.yama.ptrace_scope=0`"
        }
        Some(2) => {
            "kernel.yama.ptrace_scope is 2: only root (CAP_SYS_PTRACE) may ptrace; run \
             `patchbay attach` as root or start the program with `patchbay run`"
        }
        Some(_) => {
            "kernel.yama.ptrace_scope is 3: ptrace is disabled until reboot; start the \
             program with `patchbay run` (or LD_PRELOAD)"
        }
    };
    Err(InjectError::NotPermitted {
        pid,
        why: why.to_owned(),
    })
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions, e.g. `r-xp`.
    pub perms: String,
    /// File offset.
    pub offset: u64,
    /// Path (empty for anonymous mappings).
    pub path: String,
}

/// Parses `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ' ');
            let (range, perms, offset) = (f.next()?, f.next()?, f.next()?);
            let _dev = f.next()?;
            let _inode = f.next()?;
            let path = f.next().unwrap_or("").trim().to_owned();
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms: perms.to_owned(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

/// The C library mapped in the process: its path and the address of its first mapping
/// (file offset 0). `libc.so.6` (glibc) by name.
pub fn find_libc(maps: &[Mapping]) -> Option<(String, u64)> {
    maps.iter()
        .filter(|m| m.offset == 0)
        .find(|m| {
            let name = Path::new(&m.path)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
        })
        .map(|m| (m.path.clone(), m.start))
}

/// True when an object of that path (or file name `libpatchbay_agent*.so`) is mapped:
/// an agent is already there.
pub fn agent_mapped(maps: &[Mapping], agent: &Path) -> bool {
    maps.iter().any(|m| {
        let p = PathBuf::from(&m.path);
        p == agent
            || p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libpatchbay_agent") && n.contains(".so"))
    })
}

/// The syscall a thread is in, from `/proc/PID/task/TID/syscall`: `Some(nr)` when
/// blocked in one, `None` when running (or unknown).
pub fn parse_syscall(text: &str) -> Option<i64> {
    let first = text.split_whitespace().next()?;
    if first == "running" {
        return None;
    }
    first.parse().ok().filter(|nr: &i64| *nr >= 0)
}

/// Preference of a thread for the injected call (lower is better): one blocked in a
/// system call other than `futex` (it holds no lock of libc's allocator or loader, most
/// likely); then one running; last one waiting on a futex (perhaps for a lock the call
/// would need).
pub fn thread_rank(syscall: Option<i64>) -> u8 {
    match syscall {
        Some(nr) if nr == libc::SYS_futex => 2,
        Some(_) => 0,
        None => 1,
    }
}

/// System calls that return `-EINTR` (not a restart code) when a ptrace stop interrupts
/// them even with no signal delivered (signal(7), "Interruption of system calls ... by
/// stop signals"): the injector restarts them itself, with the same arguments.
pub fn eintr_on_stop(nr: i64) -> bool {
    [
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_io_getevents,
    ]
    .contains(&nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsleeper\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nPid:\t42\nPPid:\t1\nTracerPid:\t77\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn reads_status() {
        let s = parse_status(STATUS);
        assert_eq!(s.name, "sleeper");
        assert_eq!(s.uids, vec![1000; 4]);
        assert_eq!((s.tracer_pid, s.seccomp), (77, 2));
    }

    #[test]
    fn uid_rule_is_the_kernels() {
        let s = parse_status(STATUS);
        assert!(check_uid(42, 1000, &s).is_ok());
        assert!(check_uid(42, 0, &s).is_ok());
        let e = check_uid(42, 1001, &s).unwrap_err().to_string();
        assert!(e.contains("runs as uid 1000 and you are uid 1001"), "{e}");
        // A setuid program that kept a saved uid of root is not the caller's.
        let mut mixed = s.clone();
        mixed.uids = vec![1000, 1000, 0, 1000];
        assert!(check_uid(42, 1000, &mixed).is_err());
    }

    #[test]
    fn refuses_traced_and_seccomp() {
        let s = parse_status(STATUS);
        let e = check_tracer(42, &s, Some("gdb")).unwrap_err().to_string();
        assert!(e.contains("already traced by pid 77 (gdb)"), "{e}");
        let e = check_seccomp(42, &s).unwrap_err().to_string();
        assert!(e.contains("seccomp"), "{e}");
        let free = parse_status("Name:\tx\nTracerPid:\t0\nSeccomp:\t0\n");
        assert!(check_tracer(42, &free, None).is_ok());
        assert!(check_seccomp(42, &free).is_ok());
    }

    #[test]
    fn yama_scopes() {
        for (scope, root, desc, ok) in [
            (None, false, false, true),
            (Some(0), false, false, true),
            (Some(1), false, false, false),
            (Some(1), false, true, true),
            (Some(1), true, false, true),
            (Some(2), false, true, false),
            (Some(2), true, false, true),
            (Some(3), true, true, false),
        ] {
            let r = check_yama(9, scope, root, desc);
            assert_eq!(r.is_ok(), ok, "{scope:?} root={root} desc={desc}: {r:?}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(e.starts_with("cannot inject the agent into pid 9"), "{e}");
                assert!(
                    e.contains(&format!("ptrace_scope is {}", scope.unwrap())),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn reads_maps() {
        let maps = parse_maps(
            "55d0-55e0 r--p 00000000 08:01 12 /usr/bin/cat\n\
             7f00-7f10 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f10-7f20 r-xp 00028000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7ffe-7fff rw-p 00000000 00:00 0 [stack]\n\
             7a00-7a10 rw-p 00000000 00:00 0 \n",
        );
        assert_eq!(maps.len(), 5);
        assert_eq!(
            find_libc(&maps),
            Some(("/usr/lib/x86_64-linux-gnu/libc.so.6".into(), 0x7f00))
        );
        assert_eq!(maps[4].path, "");
        assert!(!agent_mapped(&maps, Path::new("/x/libpatchbay_agent.so")));
        let mut with = maps.clone();
        with[4].path = "/opt/y/libpatchbay_agent.so".into();
        assert!(agent_mapped(&with, Path::new("/x/libpatchbay_agent.so")));
        assert_eq!(find_libc(&maps[..1]), None);
    }

    #[test]
    fn ranks_threads() {
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(
            parse_syscall("0 0x3 0x7ffc 0x1 0 0 0 0x7ffd 0x7f01"),
            Some(0)
        );
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f01"), None);
        assert!(thread_rank(Some(0)) < thread_rank(None));
        assert!(thread_rank(None) < thread_rank(Some(libc::SYS_futex)));
        assert!(eintr_on_stop(libc::SYS_epoll_wait));
        assert!(!eintr_on_stop(libc::SYS_read));
    }
}
