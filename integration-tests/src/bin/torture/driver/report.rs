//! The figures of one run and their rendering.

use super::*;

/// Figures of one run.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seconds: f64,
    pub cycles: u64,
    pub attaches: u64,
    pub detaches_wait: u64,
    pub detaches_nowait: u64,
    pub synchronizes: u64,
    pub trampolines_installed: u64,
    pub trampolines_freed: u64,
    pub slots_freed: u64,
    pub premature_frees: u64,
    pub crashes: u64,
    pub target_exit: String,
    pub leftover_trampolines_server: u64,
    pub leftover_trampolines_agent: u64,
    pub leftover_slots_agent: u64,
    pub count_checks: u64,
    pub count_calls_checked: u64,
    pub count_mismatches: u64,
    pub trace_checks: u64,
    pub events_checked: u64,
    pub events_dropped: u64,
    pub trace_mismatches: u64,
    pub tally_checks: u64,
    pub tally_calls_checked: u64,
    pub tally_mismatches: u64,
    pub bound_checks: u64,
    pub bound_violations: u64,
    pub worst_detach_wait: Duration,
    pub worst_synchronize: Duration,
    pub worst_pending_gp: Duration,
    pub calls: u64,
    pub bad_args: u64,
    /// Program signal handler runs in the target, and those that interrupted
    /// trampoline code or a dispatch (the agent's `sigwrap` counter).
    pub program_signals: u64,
    pub signals_over_trampolines: u64,
    /// SIGRTMIN+3 (the agent's default quiescent-state signal) raised by the target
    /// itself, and its own handler's runs (equal when the agent keeps to its own).
    pub program_qs_sent: u64,
    pub program_qs_received: u64,
    pub errors: u64,
    pub error_messages: Vec<String>,
    /// The final checks ran (the target survived to the end).
    pub finished: bool,
}

impl Report {
    pub(super) fn error(&mut self, msg: String) {
        eprintln!("torture: ERROR: {msg}");
        self.errors += 1;
        if self.error_messages.len() < KEEP_ERRORS {
            self.error_messages.push(msg);
        }
    }

    /// Grace periods completed: one per freed trampoline, one per Synchronize.
    pub fn grace_periods(&self) -> u64 {
        self.trampolines_freed + self.synchronizes
    }

    /// The failed assertions of a clean run (empty: it passed).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut zero = |what: &str, v: u64| {
            if v != 0 {
                f.push(format!("{what} = {v}, expected 0"));
            }
        };
        zero("premature frees detected", self.premature_frees);
        zero("crashes", self.crashes);
        zero("count mismatches", self.count_mismatches);
        zero("trace mismatches", self.trace_mismatches);
        zero("tally mismatches", self.tally_mismatches);
        zero("count bound violations", self.bound_violations);
        zero("bad callback arguments", self.bad_args);
        zero("errors", self.errors);
        zero(
            "trampolines allocated at the end (server)",
            self.leftover_trampolines_server,
        );
        zero(
            "trampolines allocated at the end (agent)",
            self.leftover_trampolines_agent,
        );
        zero(
            "trampoline slots allocated at the end (agent)",
            self.leftover_slots_agent,
        );
        if !self.finished {
            f.push("the final checks did not run".into());
        }
        let mut min = |what: &str, v: u64| {
            if v == 0 {
                f.push(format!("{what} = 0: the run checked nothing"));
            }
        };
        min("cycles", self.cycles);
        min("trampolines freed", self.trampolines_freed);
        min("count checks", self.count_checks);
        min("trace checks", self.trace_checks);
        min("tally checks", self.tally_checks);
        f
    }

    pub fn print(&self) {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!("torture results ({:.1} s):", self.seconds);
        println!("  cycles (checked windows)        {}", self.cycles);
        println!(
            "  attaches / detaches (wait, nowait) / synchronizes  {} / {} ({} + {}) / {}",
            self.attaches,
            self.detaches_wait + self.detaches_nowait,
            self.detaches_wait,
            self.detaches_nowait,
            self.synchronizes
        );
        println!(
            "  grace periods                   {} ({} trampolines freed + {} synchronizes)",
            self.grace_periods(),
            self.trampolines_freed,
            self.synchronizes
        );
        println!(
            "  trampolines installed / freed   {} / {} ({} arena slots freed)",
            self.trampolines_installed, self.trampolines_freed, self.slots_freed
        );
        println!("  premature frees detected        {}", self.premature_frees);
        println!(
            "  crashes                         {}{}",
            self.crashes,
            if self.target_exit.is_empty() {
                String::new()
            } else {
                format!(" (target {})", self.target_exit)
            }
        );
        println!(
            "  allocated after the end         {} trampolines (server), {} trampolines / {} slots (agent)",
            self.leftover_trampolines_server,
            self.leftover_trampolines_agent,
            self.leftover_slots_agent
        );
        println!(
            "  count checks                    {} exact ({} calls), {} mismatches",
            self.count_checks, self.count_calls_checked, self.count_mismatches
        );
        println!(
            "  trace checks                    {} exact ({} events, {} dropped), {} mismatches",
            self.trace_checks, self.events_checked, self.events_dropped, self.trace_mismatches
        );
        println!(
            "  tally callback checks           {} exact ({} calls), {} mismatches",
            self.tally_checks, self.tally_calls_checked, self.tally_mismatches
        );
        println!(
            "  noise count bound checks        {}, {} violations",
            self.bound_checks, self.bound_violations
        );
        println!(
            "  worst grace-period latency      detach(wait) {}, synchronize {}, pending seen {}",
            ms(self.worst_detach_wait),
            ms(self.worst_synchronize),
            ms(self.worst_pending_gp)
        );
        println!("  traced-function calls made      {}", self.calls);
        println!(
            "  program signal handlers run     {} ({} over trampoline code or a dispatch)",
            self.program_signals, self.signals_over_trampolines
        );
        println!(
            "  program's own SIGRTMIN+3        {} raised, {} handled",
            self.program_qs_sent, self.program_qs_received
        );
        println!("  errors                          {}", self.errors);
        for m in &self.error_messages {
            println!("    - {m}");
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "seconds": self.seconds,
            "cycles": self.cycles,
            "attaches": self.attaches,
            "detaches_wait": self.detaches_wait,
            "detaches_nowait": self.detaches_nowait,
            "synchronizes": self.synchronizes,
            "grace_periods": self.grace_periods(),
            "trampolines_installed": self.trampolines_installed,
            "trampolines_freed": self.trampolines_freed,
            "slots_freed": self.slots_freed,
            "premature_frees": self.premature_frees,
            "crashes": self.crashes,
            "target_exit": self.target_exit,
            "leftover_trampolines_server": self.leftover_trampolines_server,
            "leftover_trampolines_agent": self.leftover_trampolines_agent,
            "leftover_slots_agent": self.leftover_slots_agent,
            "count_checks": self.count_checks,
            "count_calls_checked": self.count_calls_checked,
            "count_mismatches": self.count_mismatches,
            "trace_checks": self.trace_checks,
            "events_checked": self.events_checked,
            "events_dropped": self.events_dropped,
            "trace_mismatches": self.trace_mismatches,
            "tally_checks": self.tally_checks,
            "tally_calls_checked": self.tally_calls_checked,
            "tally_mismatches": self.tally_mismatches,
            "bound_checks": self.bound_checks,
            "bound_violations": self.bound_violations,
            "worst_detach_wait_us": self.worst_detach_wait.as_micros() as u64,
            "worst_synchronize_us": self.worst_synchronize.as_micros() as u64,
            "worst_pending_gp_ms": self.worst_pending_gp.as_millis() as u64,
            "calls": self.calls,
            "bad_args": self.bad_args,
            "program_signals": self.program_signals,
            "signals_over_trampolines": self.signals_over_trampolines,
            "program_qs_sent": self.program_qs_sent,
            "program_qs_received": self.program_qs_received,
            "errors": self.errors,
            "error_messages": self.error_messages,
            "finished": self.finished,
            "failures": self.failures(),
        })
    }
}
