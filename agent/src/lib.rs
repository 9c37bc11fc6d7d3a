//! The in-process agent of patchbay (built out in the agent issue).

pub mod demangle;
pub mod sites;
