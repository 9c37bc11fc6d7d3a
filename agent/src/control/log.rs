//! The agent's diagnostics. A traced program's output must not change because of the
//! agent, so nothing is printed unless `PATCHBAY_AGENT_LOG` is set (to `warn` or
//! `debug`). Never called from a signal handler or a trampoline.

use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Off,
    Warn,
    Debug,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("PATCHBAY_AGENT_LOG").as_deref() {
        Ok("debug") | Ok("trace") => Level::Debug,
        Ok("") | Err(_) => Level::Off,
        Ok(_) => Level::Warn,
    })
}

pub fn warn(msg: &str) {
    if level() >= Level::Warn {
        eprintln!("patchbay-agent[{}]: {msg}", std::process::id());
    }
}

pub fn debug(msg: &str) {
    if level() >= Level::Debug {
        eprintln!("patchbay-agent[{}]: {msg}", std::process::id());
    }
}
