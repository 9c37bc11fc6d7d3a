//! The agent's own thread: the session with the server, the runtime that plans and
//! applies installs and removes, the quiescent-state observer, the patcher, the
//! trampoline arena, site discovery, thread scans, counters, the ring drain, and the
//! callback registry. Code here may allocate, lock and do I/O; program threads never
//! wait on it (they touch only their own block, see `hot/`).

pub(crate) mod arena;
pub(crate) mod callbacks;
pub(crate) mod counters;
pub(crate) mod demangle;
pub(crate) mod drain;
pub(crate) mod hold;
pub(crate) mod init;
pub(crate) mod link;
pub(crate) mod loads;
pub(crate) mod log;
pub(crate) mod observer;
pub(crate) mod patch;
pub(crate) mod runtime;
pub mod sites;
pub(crate) mod threads;
pub(crate) mod timeline;
pub(crate) mod trapwindow;
pub(crate) mod unmapped;
