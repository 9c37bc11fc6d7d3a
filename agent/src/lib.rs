//! The in-process agent of patchbay (built out in the agent issue).

pub mod demangle;
pub mod link;
mod log;
pub mod procfs;
pub mod sites;
pub mod threads;
