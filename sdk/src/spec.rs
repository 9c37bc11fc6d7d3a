//! What a tracer is: the processes it applies to ([`Target`]) and what it does there
//! ([`TracerSpec`], built by [`Tracer::count`](crate::Tracer::count) and its siblings).

use patchbay_proto as proto;
use proto::{CallbackKind, CallbackSpec, target};

/// The processes a tracer applies to.
///
/// ```
/// use patchbay_sdk::Target;
/// let one = Target::pid(4242);
/// let every_foo = Target::exe("/usr/bin/foo");
/// assert_ne!(one, every_foo);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(proto::Target);

impl Target {
    /// One running process.
    pub fn pid(pid: u32) -> Self {
        Target(proto::Target {
            target: Some(target::Target::Pid(pid)),
        })
    }

    /// Every process whose executable path is `path`, now and in future. Agents report
    /// the canonical path (`/proc/self/exe`): give an absolute, symlink-free path.
    pub fn exe(path: impl Into<String>) -> Self {
        Target(proto::Target {
            target: Some(target::Target::Exe(path.into())),
        })
    }

    /// A running process and all its descendants, at any depth, now and in future:
    /// children it forks or spawns and images they `exec`, as their agents connect
    /// (the root's agent must be connected; a pid recycled by an unrelated process is
    /// never taken for a descendant). A pattern that matches nothing in the root is no
    /// error: descendants may match.
    pub fn tree(root: u32) -> Self {
        Target(proto::Target {
            target: Some(target::Target::Tree(root)),
        })
    }

    /// Every agent, now and in future.
    pub fn all() -> Self {
        Target(proto::Target {
            target: Some(target::Target::All(true)),
        })
    }

    /// The wire message.
    pub fn as_proto(&self) -> &proto::Target {
        &self.0
    }
}

impl From<Target> for proto::Target {
    fn from(target: Target) -> Self {
        target.0
    }
}

/// A tracer to attach: its target, the glob over demangled function names it matches,
/// its callback and an optional label. Built by [`Tracer::count`](crate::Tracer::count),
/// [`Tracer::trace`](crate::Tracer::trace), [`Tracer::latency`](crate::Tracer::latency)
/// or [`Tracer::custom`](crate::Tracer::custom); pass it to
/// [`Client::attach`](crate::Client::attach).
///
/// Only the callbacks the agent runs today can be built here; `graph` arrives with exit
/// events.
///
/// ```
/// use patchbay_sdk::{Target, Tracer};
/// let spec = Tracer::trace(Target::exe("/usr/bin/foo"), "sqlite3_*")
///     .args(2)
///     .name("sqlite");
/// assert_eq!(spec.pattern(), "sqlite3_*");
/// assert_eq!(spec.as_proto().callback.as_ref().unwrap().arg_count, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracerSpec(proto::TracerSpec);

impl TracerSpec {
    pub(crate) fn new(target: Target, pattern: impl Into<String>, callback: CallbackSpec) -> Self {
        TracerSpec(proto::TracerSpec {
            target: Some(target.into()),
            pattern: pattern.into(),
            callback: Some(callback),
            name: String::new(),
        })
    }

    /// Sets a label for people (shown by `patchbay tracers`).
    pub fn name(mut self, label: impl Into<String>) -> Self {
        self.0.name = label.into();
        self
    }

    /// For a `trace` tracer: each event records the first `count` argument registers
    /// (`rdi, rsi, rdx, rcx, r8, r9`; 0 to 6, the server refuses more). The default is 0.
    /// Other callbacks record no arguments: for them this changes nothing.
    pub fn args(mut self, count: u32) -> Self {
        if let Some(callback) = &mut self.0.callback
            && callback.kind() == CallbackKind::Trace
        {
            callback.arg_count = count;
        }
        self
    }

    /// The glob over demangled function names.
    pub fn pattern(&self) -> &str {
        &self.0.pattern
    }

    /// The wire message.
    pub fn as_proto(&self) -> &proto::TracerSpec {
        &self.0
    }

    /// The wire message, by value.
    pub fn into_proto(self) -> proto::TracerSpec {
        self.0
    }
}

impl From<TracerSpec> for proto::TracerSpec {
    fn from(spec: TracerSpec) -> Self {
        spec.0
    }
}

pub(crate) fn callback(kind: CallbackKind) -> CallbackSpec {
    CallbackSpec {
        kind: kind as i32,
        ..CallbackSpec::default()
    }
}

pub(crate) fn custom(name: String) -> CallbackSpec {
    CallbackSpec {
        custom_name: name,
        ..callback(CallbackKind::Custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tracer;

    #[test]
    fn targets() {
        assert_eq!(Target::pid(7).0.target, Some(target::Target::Pid(7)));
        assert_eq!(Target::tree(7).0.target, Some(target::Target::Tree(7)));
        assert_eq!(
            Target::exe("/bin/x").as_proto().target,
            Some(target::Target::Exe("/bin/x".into()))
        );
        let all: proto::Target = Target::all().into();
        assert_eq!(all.target, Some(target::Target::All(true)));
    }

    #[test]
    fn callbacks() {
        let kind = |s: &TracerSpec| s.as_proto().callback.as_ref().unwrap().kind();
        assert_eq!(
            kind(&Tracer::count(Target::all(), "f")),
            CallbackKind::Count
        );
        let t = Tracer::trace(Target::all(), "f").args(3);
        let cb = t.as_proto().callback.as_ref().unwrap();
        assert_eq!((cb.kind(), cb.arg_count), (CallbackKind::Trace, 3));
        let c = Tracer::custom(Target::all(), "f", "mine").args(3);
        let cb = c.as_proto().callback.as_ref().unwrap();
        assert_eq!(
            (cb.kind(), cb.custom_name.as_str(), cb.arg_count),
            (CallbackKind::Custom, "mine", 0)
        );
        let counted = Tracer::count(Target::all(), "f").args(2);
        assert_eq!(counted.as_proto().callback.as_ref().unwrap().arg_count, 0);
    }

    #[test]
    fn specs_carry_every_field() {
        let s: proto::TracerSpec = Tracer::count(Target::pid(1), "f*").into();
        assert_eq!(s.callback, Some(callback(CallbackKind::Count)));
        assert_eq!(s.name, "");
        let s = Tracer::custom(Target::all(), "g", "cb").name("lbl");
        assert_eq!(s.pattern(), "g");
        let s = s.as_proto();
        assert_eq!(s.target, Some(Target::all().into()));
        assert_eq!(s.callback, Some(custom("cb".into())));
        assert_eq!(s.name, "lbl");
    }
}
