//! The agent's brain on its own thread: answers the server ([`link::Handler`]) and runs
//! the periodic work. [`Runtime`] only routes: each concern is a module whose type owns
//! its state:
//! - [`catalogue`]: the functions of this process (discovery, `ListFunctions`, names);
//! - [`installer`]: trampolines from install to free (group resolution, slot planning,
//!   code, patching, retire, free on the server's word);
//! - [`reporter`]: count snapshots and event batches (ring drain, bounded buffers);
//! - [`grace`]: threads, quiescent states, barriers, stalls, the block pool, and local
//!   grace periods;
//! - [`session`]: the server's settings, the hello, callback announcements;
//! - [`fork`]: what a forked child does with the inherited blocks.
//!
//! Invariants (details in the modules):
//! - a trampoline's memory and descriptor are released only when the server authorizes
//!   it, i.e. after it saw every thread quiescent since the trampoline's retirement;
//! - the epoch is bumped only after an unpatch batch completed (the patcher serializes
//!   every core after its last write), so stamps `>= e` prove a thread is outside;
//! - the program never waits on this thread: program threads only touch their own
//!   blocks, rings and TLS.

mod catalogue;
mod fork;
mod grace;
mod installer;
mod reporter;
mod session;

use std::time::Duration;

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
use pb::server_message::Body as ToAgent;

use crate::control::{link, loads, log, timeline};
use catalogue::Catalogue;
use grace::Grace;
use installer::Installer;
use reporter::Reporter;
use session::Session;

/// The agent thread's state, one part per concern.
pub(crate) struct Runtime {
    catalogue: Catalogue,
    installer: Installer,
    reporter: Reporter,
    grace: Grace,
    session: Session,
    /// The last `FunctionsAdded` sequence sent (`control::loads`).
    sequence_sent: u64,
}

impl Runtime {
    /// `tls_offset`: the `fs`-relative offset of the thread-block pointer (static TLS),
    /// which the count and trace stubs read.
    pub(crate) fn new(tls_offset: Option<i32>) -> Runtime {
        Runtime {
            catalogue: Catalogue::new(),
            installer: Installer::new(tls_offset),
            reporter: Reporter::new(),
            grace: Grace::new(),
            session: Session::new(),
            sequence_sent: 0,
        }
    }

    /// The epoch threads must reach for pending grace periods (0: none).
    fn need(&self) -> u64 {
        self.installer.retired_need().max(self.grace.barrier_need())
    }

    /// One observation round of every thread (the expedited path after a remove or a
    /// barrier, and every tick).
    fn observe(&mut self, out: &mut Vec<FromAgent>) {
        let need = self.need();
        let catalogue = &self.catalogue;
        self.grace.observe(
            need,
            self.session.stall_threshold(),
            |pc| catalogue.symbol(pc),
            out,
        );
    }

    fn flush(&mut self, out: &mut Vec<FromAgent>) {
        let live = self.grace.known();
        self.reporter
            .flush(&self.installer, &self.catalogue, Some(live), out);
    }

    /// Rescans threads, then returns the blocks of exited ones (rings drained and
    /// counts kept first).
    fn scan_threads(&mut self, out: &mut Vec<FromAgent>) {
        self.grace.scan_and_report(out);
        self.reporter.drain_rings(Some(self.grace.known()));
        self.grace.recycle_blocks(self.installer.counters_mut());
    }

    fn authorize_free(&mut self, ids: Vec<u64>, out: &mut Vec<FromAgent>) {
        for id in ids {
            let reporter = &mut self.reporter;
            let live = self.grace.known();
            // Events still in rings reference no trampoline memory; drain anyway so
            // that they are attributed before the counters go.
            if let Some(freed) = self
                .installer
                .free(id, || reporter.drain_rings(Some(live)), out)
            {
                self.reporter.fold(freed);
                timeline::mark(id, pb::GraceStep::AgentFreed);
                out.extend(timeline::report(id));
            }
        }
    }

    fn hello(&mut self) -> pb::Hello {
        self.grace.new_session();
        // A new session: report every tracer's counts again.
        self.reporter.new_session();
        let trampolines = self.installer.statuses(&self.catalogue);
        let tids = self.grace.known().iter().copied().collect();
        self.session.hello(tids, trampolines)
    }

    /// Discovers the objects loaded since the last discovery and tells the server:
    /// `FunctionsAdded` when there are new functions or a program thread waits in
    /// `dlopen` (its sequence, taken before the discovery, so the objects of every
    /// waiter up to it are included or were announced before).
    fn announce_loaded(&mut self, out: &mut Vec<FromAgent>) {
        let asked = loads::asked();
        self.catalogue.discover_loaded_since();
        self.removed(out);
        let count = self.catalogue.take_unannounced();
        let sequence = if asked > self.sequence_sent { asked } else { 0 };
        if count > 0 || sequence > 0 {
            self.sequence_sent = self.sequence_sent.max(sequence);
            out.push(FromAgent::FunctionsAdded(pb::FunctionsAdded {
                count,
                sequence,
            }));
        }
    }

    /// The sites of objects unloaded since (`dlclose`): the installer forgets them and
    /// the server is told (`FunctionsRemoved`).
    fn removed(&mut self, out: &mut Vec<FromAgent>) {
        let sites = self.catalogue.take_removed();
        if sites.is_empty() {
            return;
        }
        self.installer.forget_sites(&sites);
        out.push(FromAgent::FunctionsRemoved(pb::FunctionsRemoved { sites }));
    }

    /// Final flush at exit: counts and events still in rings (every ring emptied,
    /// what the buffers cannot take counted as dropped).
    pub(crate) fn final_flush(&mut self) -> Vec<FromAgent> {
        let mut out = Vec::new();
        self.reporter
            .flush(&self.installer, &self.catalogue, None, &mut out);
        out
    }

    /// In a forked child: a new process with one thread, the inherited trampolines and
    /// patched code. Counts start from zero; the blocks of threads that do not exist
    /// here are returned.
    pub(crate) fn forked_child(&mut self) {
        fork::adopt_blocks();
        fork::zero_counters(self.installer.counts().map(|(_, _, idx)| idx));
        self.installer.forked_child();
        self.reporter.forked_child();
        self.grace.forked_child();
        timeline::forked_child();
        self.session.forked_child();
    }
}

impl link::Handler for Runtime {
    fn hello(&mut self) -> pb::Hello {
        Runtime::hello(self)
    }

    fn welcome(&mut self, w: &pb::Welcome) {
        self.session.welcome(w);
        log::debug(&format!("welcomed as agent {}", w.agent_id));
    }

    fn message(&mut self, msg: ToAgent, out: &mut Vec<FromAgent>) {
        match msg {
            ToAgent::ListFunctions(l) => {
                let list = self.catalogue.list(l);
                // Sites of unloaded objects go first: the list may name an object
                // mapped at their addresses since.
                self.removed(out);
                out.push(FromAgent::FunctionList(list));
            }
            ToAgent::Install(i) => {
                self.catalogue.discover_if_needed();
                let r = self
                    .installer
                    .install(i, &self.catalogue, &mut self.grace, out);
                out.push(r);
            }
            ToAgent::Remove(r) => {
                timeline::mark(r.trampoline_id, pb::GraceStep::AgentRemoveReceived);
                self.installer.remove(r, &mut self.grace, out);
                // Look at every thread at once: the expedited path.
                self.observe(out);
            }
            ToAgent::AuthorizeFree(a) => {
                for id in &a.trampoline_ids {
                    timeline::mark(*id, pb::GraceStep::AgentAuthorizeReceived);
                }
                // Counts of what is freed go out first, so totals never step back.
                self.flush(out);
                self.authorize_free(a.trampoline_ids, out);
            }
            ToAgent::Barrier(b) => {
                self.grace.barrier(b.barrier_id, out);
                self.observe(out);
            }
            ToAgent::Expedite(_) => self.observe(out),
            // Every install before it was applied (stream order): wake the waiters.
            ToAgent::Covered(c) => loads::covered(c.sequence),
            ToAgent::Welcome(_) | ToAgent::Shutdown(_) => {}
        }
    }

    fn woken(&mut self, out: &mut Vec<FromAgent>) {
        if self.need() > 0 {
            timeline::note(pb::GraceStep::AgentWoken, 0);
            self.observe(out);
        }
    }

    fn loaded(&mut self, out: &mut Vec<FromAgent>) {
        self.announce_loaded(out);
    }

    fn tick(&mut self, connected: bool, out: &mut Vec<FromAgent>) {
        self.reporter.start_tick();
        if let Some(names) = self.session.callbacks_changed() {
            out.push(FromAgent::Callbacks(pb::Callbacks { names }));
        }
        self.grace.tick_reclaim();
        self.scan_threads(out);
        self.installer.retry_removes(&mut self.grace, out);
        self.observe(out);
        // Objects loaded (dlopen) since the last discovery: discover them, and have the
        // server extend the tracers meant for this process to their functions (the
        // fallback when `dlopen` is not interposed, or was called by the agent).
        if connected {
            self.announce_loaded(out);
        } else {
            self.catalogue.discover_loaded_since();
            self.removed(out);
        }
        let every = self.session.flush_interval();
        self.reporter.tick(
            connected,
            every,
            &self.installer,
            &self.catalogue,
            self.grace.known(),
            out,
        );
        if !connected {
            out.clear();
        }
    }

    fn tick_interval(&self) -> Duration {
        if self.need() > 0 {
            Duration::from_micros(500)
        } else if self.reporter.events_fast() {
            // Events are coming in fast: drain the rings before they fill.
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        }
    }

    fn disconnected(&mut self, why: &str) {
        log::debug(&format!("disconnected: {why}"));
    }
}
