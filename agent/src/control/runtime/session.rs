//! The session with the server as the runtime sees it: the settings the server sent,
//! the hello of each connection, and announcing the program's registered callbacks.

use std::sync::atomic::Ordering;
use std::time::Duration;

use patchbay_proto as pb;

use crate::control::callbacks;
use crate::hot::qs::EPOCH;
use crate::sys::procfs;

/// Settings and announcements of the current session.
pub(crate) struct Session {
    settings: pb::AgentSettings,
    /// Callback registry generation last announced to the server.
    callbacks_announced: u64,
    /// This process (pid, start time), so that a forked child can name its parent.
    me: (u32, u64),
    /// The parent named in every hello (`(0, 0)`: unknown). Read when the agent starts,
    /// before `main` (the parent that started the program is most likely still alive);
    /// in a forked child, the forking process itself, known without looking.
    parent: (u32, u64),
    /// The command line, for people.
    cmdline: String,
}

/// At most this much of the command line goes into the hello.
const CMDLINE_MAX: usize = 4096;

impl Session {
    pub(crate) fn new() -> Session {
        Session {
            settings: pb::AgentSettings {
                qs_signal: 0,
                stall_threshold_ms: 1000,
                flush_interval_ms: 100,
            },
            callbacks_announced: 0,
            me: (std::process::id(), procfs::start_time()),
            parent: procfs::parent().unwrap_or((0, 0)),
            cmdline: procfs::cmdline(CMDLINE_MAX),
        }
    }

    /// In a forked child: the process that forked is the parent.
    pub(crate) fn forked_child(&mut self) {
        self.parent = self.me;
        self.me = (std::process::id(), procfs::start_time());
    }

    /// The server's settings (kept across reconnections until replaced).
    pub(crate) fn welcome(&mut self, w: &pb::Welcome) {
        if let Some(s) = w.settings {
            self.settings = s;
        }
    }

    /// How long a thread may hold up a grace period before it is reported as a stall.
    pub(crate) fn stall_threshold(&self) -> Duration {
        Duration::from_millis(self.settings.stall_threshold_ms.max(1) as u64)
    }

    /// How often counts and events are flushed.
    pub(crate) fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.settings.flush_interval_ms.max(1) as u64)
    }

    /// The names of the registered callbacks, when they changed since last announced.
    pub(crate) fn callbacks_changed(&mut self) -> Option<Vec<String>> {
        let generation = callbacks::generation();
        if generation == self.callbacks_announced {
            return None;
        }
        self.callbacks_announced = generation;
        Some(callbacks::names())
    }

    /// The hello of a new connection: this process, its threads, the epoch, the
    /// trampolines it holds and its callbacks.
    pub(crate) fn hello(
        &mut self,
        tids: Vec<u32>,
        trampolines: Vec<pb::TrampolineStatus>,
    ) -> pb::Hello {
        pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            start_time: procfs::start_time(),
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
            exe: procfs::exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            build_id: String::new(),
            tids,
            epoch: EPOCH.load(Ordering::Acquire),
            trampolines,
            callbacks: {
                self.callbacks_announced = callbacks::generation();
                callbacks::names()
            },
            arrival: crate::control::init::arrival(),
            parent_pid: self.parent.0,
            parent_start_time: self.parent.1,
            cmdline: self.cmdline.clone(),
        }
    }
}
