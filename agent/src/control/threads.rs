//! Which threads the program has: scanned from `/proc/self/task`, minus the agent's own
//! threads (which are never traced and never hold up a grace period). The difference
//! between two scans gives the births and deaths reported to the server.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::{self, procfs};

/// Tids of the agent's own threads (the link thread). Fixed capacity, lock-free.
static AGENT_TIDS: [AtomicU32; 4] = [const { AtomicU32::new(0) }; 4];

/// Marks the calling thread as the agent's own: never traced (its calls skip every
/// callback, see `block::mark_agent_thread`), never waited for by a grace period.
pub fn register_agent_thread() {
    crate::hot::block::mark_agent_thread();
    let me = sys::tid();
    for slot in &AGENT_TIDS {
        if slot
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
    }
}

/// Forgets the agent's threads (in a forked child, where they do not exist).
pub fn clear_agent_threads() {
    for slot in &AGENT_TIDS {
        slot.store(0, Ordering::Release);
    }
}

/// Whether `tid` is one of the agent's own threads.
pub fn is_agent_thread(tid: u32) -> bool {
    AGENT_TIDS.iter().any(|s| s.load(Ordering::Acquire) == tid)
}

/// The program's threads as of the last scan.
#[derive(Debug, Default)]
pub struct Threads {
    known: BTreeSet<u32>,
}

/// What changed since the previous scan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub born: Vec<u32>,
    pub exited: Vec<u32>,
}

impl Threads {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn known(&self) -> &BTreeSet<u32> {
        &self.known
    }

    /// Rescans `/proc/self/task`.
    pub fn scan(&mut self) -> Changes {
        let now: BTreeSet<u32> = procfs::thread_ids()
            .into_iter()
            .filter(|t| !is_agent_thread(*t))
            .collect();
        self.update(now)
    }

    /// Replaces the thread set; returns the difference (pure, for tests).
    pub fn update(&mut self, now: BTreeSet<u32>) -> Changes {
        let born = now.difference(&self.known).copied().collect();
        let exited = self.known.difference(&now).copied().collect();
        self.known = now;
        Changes { born, exited }
    }

    /// Whether `tid` is still a thread of this process (it may have exited since the
    /// last scan).
    pub fn alive(tid: u32) -> bool {
        procfs::thread_alive(tid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_scans() {
        let mut t = Threads::new();
        assert_eq!(
            t.update([1, 2].into()),
            Changes {
                born: vec![1, 2],
                exited: vec![]
            }
        );
        assert_eq!(
            t.update([2, 3].into()),
            Changes {
                born: vec![3],
                exited: vec![1]
            }
        );
    }

    #[test]
    fn scan_sees_this_thread_but_not_agent_threads() {
        let mut t = Threads::new();
        t.scan();
        assert!(t.known().contains(&sys::tid()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            register_agent_thread();
            tx.send(sys::tid()).unwrap();
        })
        .join()
        .unwrap();
        let agent = rx.recv().unwrap();
        assert!(is_agent_thread(agent));
        assert!(!t.known().contains(&agent));
    }
}
