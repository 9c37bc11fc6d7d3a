//! One module per subcommand: its arguments, the request it makes, and how the answer is
//! shown to people (tables) and to scripts (`--json`).

pub mod agents;
pub mod attach;
pub mod counts;
pub mod detach;
pub mod docs;
pub mod functions;
pub mod gp;
pub mod latency;
pub mod run;
pub mod sync;
pub mod tracers;
pub mod trampolines;
pub mod watch;
