//! The typed async client of the Control service.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use patchbay_proto::control_client::ControlClient;
use patchbay_proto::{
    AgentInfo, AttachRequest, AttachResponse, CountsRequest, CountsResponse, DetachRequest,
    DetachResponse, EventBatchView, GracePeriodInfo, GracePeriodsRequest, ListAgentsRequest,
    ListFunctionsRequest, ListFunctionsResponse, ListTracersRequest, ListTrampolinesRequest,
    PROTOCOL_METADATA_KEY, PROTOCOL_VERSION, SynchronizeRequest, SynchronizeResponse, Tracer,
    TracerSpec, TrampolineInfo, WatchEventsRequest,
};
use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::target::ServerTarget;

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side defaults of the waiting calls (used when the caller passes no timeout).
const ATTACH_DEFAULT_WAIT: Duration = Duration::from_secs(10);
const DETACH_DEFAULT_WAIT: Duration = Duration::from_secs(30);
const SYNCHRONIZE_DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Slack given to the server beyond its own bound before the client gives up.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

/// Adds the protocol version, and the bearer token if any, to every request.
#[derive(Clone, Debug)]
struct RequestMetadata {
    protocol: MetadataValue<Ascii>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl RequestMetadata {
    fn new(token: Option<&str>) -> Result<Self> {
        let protocol = MetadataValue::try_from(PROTOCOL_VERSION.to_string())
            .expect("a decimal number is valid metadata");
        let authorization = token
            .map(|token| {
                MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                    Error::InvalidArgument(
                        "the token contains characters that cannot be sent in a header \
                         (only visible ASCII is allowed)"
                            .to_owned(),
                    )
                })
            })
            .transpose()?;
        Ok(RequestMetadata {
            protocol,
            authorization,
        })
    }
}

impl Interceptor for RequestMetadata {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        metadata.insert(PROTOCOL_METADATA_KEY, self.protocol.clone());
        if let Some(auth) = &self.authorization {
            metadata.insert("authorization", auth.clone());
        }
        Ok(request)
    }
}

type Inner = ControlClient<InterceptedService<Channel, RequestMetadata>>;

/// A connection to `patchbayd`'s Control service. Cloning is cheap and clones share the
/// connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Inner,
    target: ServerTarget,
}

impl Client {
    /// Connects to `target`: a Unix socket path (plain or `unix:PATH`) or `http://HOST:PORT`.
    pub async fn connect(target: &str) -> Result<Self> {
        Self::connect_to(&ServerTarget::parse(target)?, None).await
    }

    /// Like [`Client::connect`], and sends `authorization: Bearer <token>` with every
    /// request (required by a TCP listener).
    pub async fn connect_with_token(target: &str, token: &str) -> Result<Self> {
        Self::connect_to(&ServerTarget::parse(target)?, Some(token)).await
    }

    /// Connects to a parsed target, with an optional bearer token.
    pub async fn connect_to(target: &ServerTarget, token: Option<&str>) -> Result<Self> {
        let metadata = RequestMetadata::new(token)?;
        let connect_error = |source| Error::Connect {
            target: target.to_string(),
            source,
        };
        let channel = match target {
            ServerTarget::Unix(path) => {
                let path: PathBuf = path.clone();
                Endpoint::from_static("http://[::]:50051")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
                    .map_err(connect_error)?
            }
            ServerTarget::Tcp(uri) => Endpoint::from_shared(uri.clone())
                .map_err(|e| Error::InvalidTarget {
                    target: uri.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await
                .map_err(connect_error)?,
        };
        tracing::debug!(%target, "connected to patchbayd");
        Ok(Client {
            inner: ControlClient::with_interceptor(channel, metadata)
                .max_decoding_message_size(256 << 20),
            target: target.clone(),
        })
    }

    /// The address this client is connected to.
    pub fn target(&self) -> &ServerTarget {
        &self.target
    }

    /// Connected (and recently disconnected) agents visible to this user.
    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>> {
        let response = self.inner.clone().list_agents(ListAgentsRequest {}).await?;
        Ok(response.into_inner().agents)
    }

    /// Functions of process `pid` whose demangled name matches the glob `pattern` (empty:
    /// all), at most `limit` of them (`None`: no limit). `total` in the answer counts the
    /// matches before the limit.
    pub async fn list_functions(
        &self,
        pid: u32,
        pattern: &str,
        limit: Option<u32>,
    ) -> Result<ListFunctionsResponse> {
        let request = ListFunctionsRequest {
            pid,
            pattern: pattern.to_owned(),
            limit: limit.unwrap_or(0),
        };
        Ok(self
            .inner
            .clone()
            .list_functions(request)
            .await?
            .into_inner())
    }

    /// Creates a tracer and waits until it is live in every connected target agent, at most
    /// `timeout` (`None`: the server's default, 10 s).
    pub async fn attach(
        &self,
        spec: impl Into<TracerSpec>,
        timeout: Option<Duration>,
    ) -> Result<AttachResponse> {
        let request = AttachRequest {
            spec: Some(spec.into()),
            timeout_ms: timeout_ms(timeout),
        };
        let wire_ms = request.timeout_ms;
        let request = with_deadline(request, wire_ms, ATTACH_DEFAULT_WAIT);
        Ok(self.inner.clone().attach(request).await?.into_inner())
    }

    /// Removes a tracer. With `wait`, answers only once every trampoline it retired is
    /// authorized for freeing, or fails with [`Error::DeadlineExceeded`] after `timeout`
    /// (`None`: the server's default, 30 s); the grace period then continues.
    pub async fn detach(
        &self,
        tracer: u64,
        wait: bool,
        timeout: Option<Duration>,
    ) -> Result<DetachResponse> {
        let request = DetachRequest {
            tracer_id: tracer,
            wait,
            timeout_ms: timeout_ms(timeout),
        };
        let wire_ms = request.timeout_ms;
        let request = with_deadline(request, wire_ms, DETACH_DEFAULT_WAIT);
        Ok(self.inner.clone().detach(request).await?.into_inner())
    }

    /// Tracers visible to this user.
    pub async fn list_tracers(&self) -> Result<Vec<Tracer>> {
        let response = self
            .inner
            .clone()
            .list_tracers(ListTracersRequest {})
            .await?;
        Ok(response.into_inner().tracers)
    }

    /// Trampolines the server knows, of process `pid` only (`None`: all), including freed
    /// ones it still remembers when `include_freed`.
    pub async fn list_trampolines(
        &self,
        pid: Option<u32>,
        include_freed: bool,
    ) -> Result<Vec<TrampolineInfo>> {
        let request = ListTrampolinesRequest {
            pid: pid.unwrap_or(0),
            include_freed,
        };
        Ok(self
            .inner
            .clone()
            .list_trampolines(request)
            .await?
            .into_inner()
            .trampolines)
    }

    /// Grace periods in progress, with their holdout threads and stalls.
    pub async fn grace_periods(&self) -> Result<Vec<GracePeriodInfo>> {
        let response = self
            .inner
            .clone()
            .grace_periods(GracePeriodsRequest {})
            .await?;
        Ok(response.into_inner().pending)
    }

    /// Waits for a grace period over every thread of every agent, at most `timeout`
    /// (`None`: the server's default, 30 s).
    pub async fn synchronize(&self, timeout: Option<Duration>) -> Result<SynchronizeResponse> {
        let request = SynchronizeRequest {
            timeout_ms: timeout_ms(timeout),
        };
        let wire_ms = request.timeout_ms;
        let request = with_deadline(request, wire_ms, SYNCHRONIZE_DEFAULT_WAIT);
        Ok(self.inner.clone().synchronize(request).await?.into_inner())
    }

    /// Streams the events of a tracer as agents report them.
    pub async fn watch_events(&self, tracer: u64) -> Result<EventStream> {
        let request = WatchEventsRequest { tracer_id: tracer };
        let inner = self.inner.clone().watch_events(request).await?.into_inner();
        Ok(EventStream { inner })
    }

    /// Call counts of a `count` tracer, summed over threads and agents.
    pub async fn counts(&self, tracer: u64) -> Result<CountsResponse> {
        let request = CountsRequest { tracer_id: tracer };
        Ok(self.inner.clone().counts(request).await?.into_inner())
    }
}

/// A wait bound in whole milliseconds for the wire; `None` means "server default" (0).
/// A `Some` bound is at least 1 ms so that it is never mistaken for the default.
fn timeout_ms(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => 0,
        Some(t) => u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1),
    }
}

/// A request whose client-side deadline leaves the server time to report its own timeout
/// (which names what it waited for) before the client gives up.
/// `wire_ms` is the bound sent to the server (0: `default_wait`).
fn with_deadline<T>(message: T, wire_ms: u32, default_wait: Duration) -> tonic::Request<T> {
    let server_wait = match wire_ms {
        0 => default_wait,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut request = tonic::Request::new(message);
    request.set_timeout(server_wait + DEADLINE_SLACK);
    request
}

/// The event batches of one tracer, as returned by [`Client::watch_events`]. It ends when
/// the server ends the stream (for example after the tracer is detached).
pub struct EventStream {
    inner: tonic::Streaming<EventBatchView>,
}

impl EventStream {
    /// The next batch, or `None` at the end of the stream.
    pub async fn next_batch(&mut self) -> Result<Option<EventBatchView>> {
        Ok(self.inner.message().await?)
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    fn interceptor_adds_protocol_and_token() {
        let mut md = RequestMetadata::new(Some(" s3cret\n")).unwrap();
        let request = md.call(tonic::Request::new(())).unwrap();
        let meta = request.metadata();
        assert_eq!(meta.get(PROTOCOL_METADATA_KEY).unwrap(), "1");
        assert_eq!(meta.get("authorization").unwrap(), "Bearer s3cret");
    }

    #[test]
    fn interceptor_without_token_sends_no_authorization() {
        let mut md = RequestMetadata::new(None).unwrap();
        let request = md.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get(PROTOCOL_METADATA_KEY).unwrap(),
            &PROTOCOL_VERSION.to_string()
        );
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn unsendable_token_is_rejected() {
        let err = RequestMetadata::new(Some("bad\ntoken")).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn timeouts_map_to_wire_milliseconds() {
        assert_eq!(timeout_ms(None), 0);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 1);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1500))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_secs(2))), 2000);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), u32::MAX);
    }

    #[test]
    fn deadline_leaves_slack() {
        let header = |r: &tonic::Request<()>| r.metadata().get("grpc-timeout").cloned().unwrap();
        // tonic writes the most precise unit with at most 8 digits.
        let r = with_deadline((), 1000, Duration::from_secs(99));
        assert_eq!(header(&r), "6000000u");
        let r = with_deadline((), 0, Duration::from_secs(10));
        assert_eq!(header(&r), "15000000u");
        let r = with_deadline((), u32::MAX, Duration::from_secs(10));
        assert!(!header(&r).is_empty());
    }
}
