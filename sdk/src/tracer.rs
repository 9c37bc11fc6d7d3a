//! The typed handle of an attached tracer: [`Tracer`], its [`TracerId`], the [`Detach`]
//! request and the [`EventStream`] of its events.

use std::fmt;
use std::future::IntoFuture;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use patchbay_proto as proto;
use proto::{
    AttachResponse, CallbackKind, CountsRequest, CountsResponse, DetachRequest, DetachResponse,
    EventBatchView, WatchEventsRequest,
};
use tokio_stream::Stream;

use crate::client::{BoxFuture, Client, DETACH_DEFAULT_WAIT, timeout_ms, with_deadline};
use crate::error::{Error, Result};
use crate::spec::{self, Target, TracerSpec};

/// The server's id of a tracer: stable for the tracer's life, kept across server restarts,
/// never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TracerId(u64);

impl TracerId {
    /// The tracer with this number (as shown by `patchbay tracers`).
    pub const fn new(id: u64) -> Self {
        TracerId(id)
    }

    /// The number on the wire.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TracerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TracerId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        s.parse().map(TracerId)
    }
}

impl From<TracerId> for u64 {
    fn from(id: TracerId) -> Self {
        id.0
    }
}

/// An attached tracer, as returned by [`Client::attach`] or reopened by
/// [`Client::tracer`].
///
/// A tracer lives in the server, not in this handle: dropping the handle does **not**
/// detach it (tracers persist by design, even across server restarts, and keep applying
/// to processes their target matches later). Call [`Tracer::detach`] to remove it, or
/// keep its [`id`](Tracer::id) to reopen it from another program.
///
/// The handle holds a clone of the client; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Tracer {
    client: Client,
    id: TracerId,
    attached: Option<AttachResponse>,
}

impl Tracer {
    /// A tracer that counts the calls of every function matching the glob `pattern` in
    /// `target`, exactly, per function (read them with [`Tracer::counts`]).
    pub fn count(target: Target, pattern: impl Into<String>) -> TracerSpec {
        TracerSpec::new(target, pattern, spec::callback(CallbackKind::Count))
    }

    /// A tracer that measures how long each call of a function matching `pattern` in
    /// `target` takes (per-function calls, total, min, max and a histogram; read them
    /// with [`Tracer::latency_figures`]).
    pub fn latency(target: Target, pattern: impl Into<String>) -> TracerSpec {
        TracerSpec::new(target, pattern, spec::callback(CallbackKind::Latency))
    }

    /// A tracer that records one event per call of a function matching `pattern` in
    /// `target` (stream them with [`Tracer::events`]); [`TracerSpec::args`] adds argument
    /// registers to each event.
    pub fn trace(target: Target, pattern: impl Into<String>) -> TracerSpec {
        TracerSpec::new(target, pattern, spec::callback(CallbackKind::Trace))
    }

    /// A tracer that runs the callback the traced program registered under `callback`
    /// (with `patchbay_agent::register_callback`) on every call of a function matching
    /// `pattern` in `target`.
    pub fn custom(
        target: Target,
        pattern: impl Into<String>,
        callback: impl Into<String>,
    ) -> TracerSpec {
        TracerSpec::new(target, pattern, spec::custom(callback.into()))
    }

    pub(crate) fn new(client: Client, id: TracerId, attached: Option<AttachResponse>) -> Self {
        Tracer {
            client,
            id,
            attached,
        }
    }

    /// The tracer's id.
    pub fn id(&self) -> TracerId {
        self.id
    }

    /// The server's answer to the attach that created this handle: the tracer as it was
    /// then and one result per connected agent it applied to (sites patched and skipped,
    /// or why that agent could not be attached). `None` for a handle from
    /// [`Client::tracer`].
    pub fn attach_response(&self) -> Option<&AttachResponse> {
        self.attached.as_ref()
    }

    /// The tracer as the server describes it now (state, agents, sites, dropped events).
    /// [`Error::NotFound`] once it is detached.
    pub async fn info(&self) -> Result<proto::Tracer> {
        self.client
            .tracers()
            .await?
            .into_iter()
            .find(|t| t.tracer_id == self.id.get())
            .ok_or_else(|| Error::NotFound(format!("no tracer {}", self.id).into()))
    }

    /// Call counts of a `count` tracer, per function summed over threads and agents.
    pub async fn counts(&self) -> Result<CountsResponse> {
        let request = CountsRequest {
            tracer_id: self.id.get(),
        };
        Ok(self.client.inner().counts(request).await?.into_inner())
    }

    /// Latency figures of a `latency` tracer per function (calls, total, min, max,
    /// percentiles, histogram buckets, abandoned frames), merged over threads and agents.
    pub async fn latency_figures(&self) -> Result<proto::LatencyResponse> {
        let request = proto::LatencyRequest {
            tracer_id: self.id.get(),
        };
        Ok(self.client.inner().latency(request).await?.into_inner())
    }

    /// The event batches of a `trace` tracer, as agents report them. Once this returns,
    /// the server has subscribed the stream: batches reported from then on are delivered
    /// (a reader that falls far behind skips some; the server logs it). The stream ends
    /// when the server ends it (for example after a detach).
    pub async fn events(&self) -> Result<EventStream> {
        let request = WatchEventsRequest {
            tracer_id: self.id.get(),
        };
        let inner = self
            .client
            .inner()
            .watch_events(request)
            .await?
            .into_inner();
        Ok(EventStream { inner })
    }

    /// Removes the tracer: its sites are unpatched and its trampolines retired. The
    /// returned [`Detach`] does nothing until awaited; by default it answers as soon as
    /// the sites are restored, [`Detach::wait`] makes it wait for the grace period too.
    pub fn detach(self) -> Detach {
        Detach {
            client: self.client,
            id: self.id,
            wait: false,
            timeout: None,
        }
    }
}

/// A pending detach of a tracer, from [`Tracer::detach`]; `.await` it to send it.
#[derive(Debug)]
#[must_use = "a detach does nothing until it is awaited"]
pub struct Detach {
    client: Client,
    id: TracerId,
    wait: bool,
    timeout: Option<Duration>,
}

impl Detach {
    /// Answers only once every trampoline the detach retired is authorized for freeing
    /// (a grace period over the threads of each agent).
    pub fn wait(mut self) -> Self {
        self.wait = true;
        self
    }

    /// With [`Detach::wait`]: gives up after `timeout` (default: the server's, 30 s) with
    /// [`Error::DeadlineExceeded`] naming the threads still waited for; the tracer is
    /// detached all the same and the grace period continues.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Detach {
    type Output = Result<DetachResponse>;
    type IntoFuture = BoxFuture<DetachResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let request = DetachRequest {
                tracer_id: self.id.get(),
                wait: self.wait,
                timeout_ms: timeout_ms(self.timeout),
            };
            let wire_ms = request.timeout_ms;
            let request = with_deadline(request, wire_ms, DETACH_DEFAULT_WAIT);
            Ok(self.client.inner().detach(request).await?.into_inner())
        })
    }
}

/// The event batches of one tracer, from [`Tracer::events`]: a [`Stream`] of
/// `Result<EventBatchView>` that ends when the server ends it.
pub struct EventStream {
    inner: tonic::Streaming<EventBatchView>,
}

impl EventStream {
    /// The next batch, or `None` at the end of the stream.
    pub async fn next_batch(&mut self) -> Result<Option<EventBatchView>> {
        Ok(self.inner.message().await?)
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Result<EventBatchView>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(|batch| batch.map_err(Error::from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_as_numbers() {
        let id = TracerId::new(42);
        assert_eq!(id.to_string(), "42");
        assert_eq!("42".parse::<TracerId>().unwrap(), id);
        assert!("x".parse::<TracerId>().is_err());
        assert_eq!(u64::from(id), 42);
        assert_eq!(id.get(), 42);
    }
}
