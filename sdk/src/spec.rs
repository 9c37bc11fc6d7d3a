//! Builders for what a tracer is: its [`Target`], its [`CallbackSpec`] and the
//! [`TracerSpec`] that combines them with a pattern.

use patchbay_proto::{CallbackKind, CallbackSpec, Target, TracerSpec, target};

/// One running process.
pub fn pid(pid: u32) -> Target {
    Target {
        target: Some(target::Target::Pid(pid)),
    }
}

/// Every process whose executable path is `path`, now and in future.
pub fn exe(path: impl Into<String>) -> Target {
    Target {
        target: Some(target::Target::Exe(path.into())),
    }
}

/// Every agent, now and in future.
pub fn all() -> Target {
    Target {
        target: Some(target::Target::All(true)),
    }
}

fn callback(kind: CallbackKind) -> CallbackSpec {
    CallbackSpec {
        kind: kind as i32,
        ..CallbackSpec::default()
    }
}

/// Exact call counts per function.
pub fn count() -> CallbackSpec {
    callback(CallbackKind::Count)
}

/// One entry event per call, recording `arg_count` argument registers (0 to 6).
pub fn trace(arg_count: u32) -> CallbackSpec {
    CallbackSpec {
        arg_count,
        ..callback(CallbackKind::Trace)
    }
}

/// Entry and exit: latency histograms per function.
pub fn latency() -> CallbackSpec {
    callback(CallbackKind::Latency)
}

/// Entry and exit events: the call tree.
pub fn graph() -> CallbackSpec {
    callback(CallbackKind::Graph)
}

/// A callback the traced program registered under `name`.
pub fn custom(name: impl Into<String>) -> CallbackSpec {
    CallbackSpec {
        custom_name: name.into(),
        ..callback(CallbackKind::Custom)
    }
}

/// Builds a [`TracerSpec`]. The callback defaults to [`count`].
///
/// ```
/// use patchbay_sdk::{TracerSpecBuilder, spec};
/// let s = TracerSpecBuilder::new(spec::exe("/usr/bin/foo"), "sqlite3_*")
///     .trace(2)
///     .name("sqlite")
///     .build();
/// assert_eq!(s.pattern, "sqlite3_*");
/// assert_eq!(s.callback.unwrap().arg_count, 2);
/// ```
#[derive(Debug, Clone)]
pub struct TracerSpecBuilder {
    spec: TracerSpec,
}

impl TracerSpecBuilder {
    /// A tracer of the functions matching the glob `pattern` in `target`.
    pub fn new(target: Target, pattern: impl Into<String>) -> Self {
        TracerSpecBuilder {
            spec: TracerSpec {
                target: Some(target),
                pattern: pattern.into(),
                callback: Some(count()),
                name: String::new(),
            },
        }
    }

    /// Uses this callback.
    pub fn callback(mut self, callback: CallbackSpec) -> Self {
        self.spec.callback = Some(callback);
        self
    }

    /// Uses the `count` callback.
    pub fn count(self) -> Self {
        self.callback(count())
    }

    /// Uses the `trace` callback with `arg_count` argument registers.
    pub fn trace(self, arg_count: u32) -> Self {
        self.callback(trace(arg_count))
    }

    /// Uses the `latency` callback.
    pub fn latency(self) -> Self {
        self.callback(latency())
    }

    /// Uses the `graph` callback.
    pub fn graph(self) -> Self {
        self.callback(graph())
    }

    /// Uses the custom callback the program registered as `name`.
    pub fn custom(self, name: impl Into<String>) -> Self {
        self.callback(custom(name))
    }

    /// Sets a label for people.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.spec.name = name.into();
        self
    }

    /// The spec.
    pub fn build(self) -> TracerSpec {
        self.spec
    }
}

impl From<TracerSpecBuilder> for TracerSpec {
    fn from(builder: TracerSpecBuilder) -> Self {
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(pid(7).target, Some(target::Target::Pid(7)));
        assert_eq!(
            exe("/bin/x").target,
            Some(target::Target::Exe("/bin/x".into()))
        );
        assert_eq!(all().target, Some(target::Target::All(true)));
    }

    #[test]
    fn callbacks() {
        assert_eq!(count().kind(), CallbackKind::Count);
        assert_eq!(latency().kind(), CallbackKind::Latency);
        assert_eq!(graph().kind(), CallbackKind::Graph);
        let t = trace(3);
        assert_eq!((t.kind(), t.arg_count), (CallbackKind::Trace, 3));
        let c = custom("mine");
        assert_eq!(
            (c.kind(), c.custom_name.as_str()),
            (CallbackKind::Custom, "mine")
        );
    }

    #[test]
    fn builder_defaults_to_count_and_sets_fields() {
        let s = TracerSpecBuilder::new(pid(1), "f*").build();
        assert_eq!(s.callback, Some(count()));
        assert_eq!(s.name, "");
        let s: TracerSpec = TracerSpecBuilder::new(all(), "g")
            .custom("cb")
            .name("lbl")
            .into();
        assert_eq!(s.target, Some(all()));
        assert_eq!(s.pattern, "g");
        assert_eq!(s.callback, Some(custom("cb")));
        assert_eq!(s.name, "lbl");
    }
}
