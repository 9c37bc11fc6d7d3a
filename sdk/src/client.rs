//! The typed async client of the Control service.

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use patchbay_proto::control_client::ControlClient;
use patchbay_proto::{
    AgentInfo, AttachRequest, GracePeriodInfo, GracePeriodsRequest, GraceTimeline,
    ListAgentsRequest, ListFunctionsRequest, ListFunctionsResponse, ListTracersRequest,
    ListTrampolinesRequest, PROTOCOL_METADATA_KEY, PROTOCOL_VERSION, SynchronizeRequest,
    SynchronizeResponse, TrampolineInfo,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::spec::TracerSpec;
use crate::target::ServerTarget;
use crate::tracer::{Tracer, TracerId};

/// The largest answer the client accepts (tonic's default is 4 MiB; `ListFunctions '*'`
/// on a process with many libraries is several MiB).
pub const MAX_DECODING_MESSAGE_SIZE: usize = 256 << 20;

/// The future of a request builder (`Attach`, `Detach`, ...) once it is awaited.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side defaults of the waiting calls (used when the caller passes no timeout).
const ATTACH_DEFAULT_WAIT: Duration = Duration::from_secs(10);
pub(crate) const DETACH_DEFAULT_WAIT: Duration = Duration::from_secs(30);
const SYNCHRONIZE_DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Slack given to the server beyond its own bound before the client gives up.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

/// Adds the protocol version, and the bearer token if any, to every request.
#[derive(Clone, Debug)]
pub(crate) struct RequestMetadata {
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
                            .into(),
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

pub(crate) type Inner = ControlClient<InterceptedService<Channel, RequestMetadata>>;

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
        Self::builder(ServerTarget::parse(target)?).connect().await
    }

    /// Connects to the default socket (see [`connect_socket_path`](crate::connect_socket_path)).
    pub async fn connect_default() -> Result<Self> {
        Self::builder(ServerTarget::default()).connect().await
    }

    /// Like [`Client::connect`], and sends `authorization: Bearer <token>` with every
    /// request (required by a TCP listener).
    pub async fn connect_with_token(target: &str, token: &str) -> Result<Self> {
        Self::builder(ServerTarget::parse(target)?)
            .token(token)
            .connect()
            .await
    }

    /// A connection to a parsed target, with options.
    pub fn builder(target: ServerTarget) -> ClientBuilder {
        ClientBuilder {
            target,
            token: None,
        }
    }

    /// The address this client is connected to.
    pub fn target(&self) -> &ServerTarget {
        &self.target
    }

    pub(crate) fn inner(&self) -> Inner {
        self.inner.clone()
    }

    /// Connected (and recently disconnected) agents visible to this user.
    pub async fn agents(&self) -> Result<Vec<AgentInfo>> {
        let response = self.inner().list_agents(ListAgentsRequest {}).await?;
        Ok(response.into_inner().agents)
    }

    /// The functions of process `pid` (all of them unless narrowed with
    /// [`Functions::pattern`] and [`Functions::limit`]); `.await` it.
    pub fn functions(&self, pid: u32) -> Functions {
        Functions {
            client: self.clone(),
            request: ListFunctionsRequest {
                pid,
                pattern: String::new(),
                limit: 0,
            },
        }
    }

    /// Creates a tracer and, once awaited, waits until it is live in every connected agent
    /// it applies to (at most 10 s unless [`Attach::timeout`] says otherwise). Agents that
    /// could not be attached are listed in [`Tracer::attach_response`]; the tracer stays.
    pub fn attach(&self, spec: TracerSpec) -> Attach {
        Attach {
            client: self.clone(),
            spec,
            timeout: None,
            inject: None,
        }
    }

    /// A handle on the existing tracer `id`, for example one attached by another program.
    /// Nothing is checked here: a tracer that does not exist makes every call fail with
    /// [`Error::NotFound`].
    pub fn tracer(&self, id: TracerId) -> Tracer {
        Tracer::new(self.clone(), id, None)
    }

    /// Tracers visible to this user.
    pub async fn tracers(&self) -> Result<Vec<patchbay_proto::Tracer>> {
        let response = self.inner().list_tracers(ListTracersRequest {}).await?;
        Ok(response.into_inner().tracers)
    }

    /// The trampolines the server knows (of every process unless narrowed with
    /// [`Trampolines::pid`]); `.await` it.
    pub fn trampolines(&self) -> Trampolines {
        Trampolines {
            client: self.clone(),
            request: ListTrampolinesRequest {
                pid: 0,
                include_freed: false,
            },
        }
    }

    /// Grace periods in progress, with their holdout threads and stalls.
    pub async fn grace_periods(&self) -> Result<Vec<GracePeriodInfo>> {
        let response = self
            .inner()
            .grace_periods(GracePeriodsRequest { timelines: 0 })
            .await?;
        Ok(response.into_inner().pending)
    }

    /// The timelines of the `n` most recent trampoline grace periods (in progress or
    /// done) of the processes the caller may see, newest first: every step the server
    /// and the agent recorded, with CLOCK_MONOTONIC timestamps (the server keeps 64).
    pub async fn grace_timelines(&self, n: u32) -> Result<Vec<GraceTimeline>> {
        let response = self
            .inner()
            .grace_periods(GracePeriodsRequest { timelines: n })
            .await?;
        Ok(response.into_inner().timelines)
    }

    /// A grace period over every thread of every agent (the `synchronize_rcu_tasks()` of
    /// patchbay); `.await` it. It waits at most 30 s unless [`Synchronize::timeout`] says
    /// otherwise.
    pub fn synchronize(&self) -> Synchronize {
        Synchronize {
            client: self.clone(),
            timeout: None,
        }
    }
}

/// Options of a connection, from [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    target: ServerTarget,
    token: Option<String>,
}

impl ClientBuilder {
    /// Sends `authorization: Bearer <token>` with every request (required by a TCP
    /// listener). Surrounding whitespace is ignored.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects (at most 5 s).
    pub async fn connect(self) -> Result<Client> {
        let target = self.target;
        let metadata = RequestMetadata::new(self.token.as_deref())?;
        let connect_error = |source| Error::Connect {
            target: target.to_string(),
            source,
        };
        let channel = match &target {
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
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            target,
        })
    }
}

/// A pending attach, from [`Client::attach`]; `.await` it to send it.
#[derive(Debug)]
#[must_use = "an attach does nothing until it is awaited"]
pub struct Attach {
    client: Client,
    spec: TracerSpec,
    timeout: Option<Duration>,
    inject: Option<std::path::PathBuf>,
}

impl Attach {
    /// When the target is a pid without an agent (`NO_AGENT`), injects the agent library
    /// `agent` into it with ptrace, in this process and with its credentials
    /// ([`crate::inject`]), waits for the agent to connect, then attaches.
    pub fn inject(mut self, agent: impl Into<std::path::PathBuf>) -> Self {
        self.inject = Some(agent.into());
        self
    }

    /// Waits at most `timeout` for the connected agents to go live (default: the server's,
    /// 10 s). An agent that is not live by then is reported in the answer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Attach {
    type Output = Result<Tracer>;
    type IntoFuture = BoxFuture<Tracer>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let pid = match self
                .spec
                .as_proto()
                .target
                .as_ref()
                .and_then(|t| t.target.as_ref())
            {
                Some(patchbay_proto::target::Target::Pid(pid)) => Some(*pid),
                _ => None,
            };
            let request = AttachRequest {
                spec: Some(self.spec.into()),
                timeout_ms: timeout_ms(self.timeout),
            };
            let wire_ms = request.timeout_ms;
            let send = |request: AttachRequest| {
                let client = self.client.clone();
                async move {
                    let request = with_deadline(request, wire_ms, ATTACH_DEFAULT_WAIT);
                    client.inner().attach(request).await
                }
            };
            let response = match (send(request.clone()).await, pid, &self.inject) {
                (Err(status), Some(pid), Some(agent))
                    if Error::from_status(status.clone()).reason() == Some("NO_AGENT") =>
                {
                    match inject_and_wait(&self.client, pid, agent).await {
                        // No such process: the server's NO_AGENT answer says it best.
                        Err(Error::Inject(crate::inject::InjectError::NoProcess(_))) => {
                            return Err(Error::from_status(status));
                        }
                        r => r?,
                    }
                    send(request).await?
                }
                (r, _, _) => r?,
            }
            .into_inner();
            let id = response
                .tracer
                .as_ref()
                .map(|t| TracerId::new(t.tracer_id))
                .ok_or_else(|| {
                    Error::UnexpectedResponse("the attach answer names no tracer".to_owned())
                })?;
            Ok(Tracer::new(self.client, id, Some(response)))
        })
    }
}

/// How long an injected agent may take to connect.
const INJECTED_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Injects the agent into `pid` and waits until it is connected to the client's server.
async fn inject_and_wait(client: &Client, pid: u32, agent: &std::path::Path) -> Result<()> {
    let socket = match client.target() {
        ServerTarget::Unix(path) => std::path::absolute(path).unwrap_or_else(|_| path.clone()),
        ServerTarget::Tcp(_) => return Err(crate::inject::InjectError::NeedsUnixSocket(pid).into()),
    };
    let agent = std::path::absolute(agent).unwrap_or_else(|_| agent.to_path_buf());
    let opts = crate::inject::InjectOptions {
        agent,
        socket: socket.clone(),
        timeout: Duration::from_secs(10),
    };
    let injected = tokio::task::spawn_blocking(move || crate::inject::inject(pid, &opts))
        .await
        .map_err(|e| Error::UnexpectedResponse(format!("the injection task failed: {e}")))??;
    tracing::debug!(pid, ?injected, "agent injected");
    let start = std::time::Instant::now();
    loop {
        if client
            .agents()
            .await?
            .iter()
            .any(|a| a.pid == pid && a.connected)
        {
            return Ok(());
        }
        if start.elapsed() >= INJECTED_CONNECT_WAIT {
            return Err(crate::inject::InjectError::NotConnected {
                pid,
                socket: socket.display().to_string(),
                waited_ms: start.elapsed().as_millis() as u64,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pending listing of a process's functions, from [`Client::functions`]; `.await` it.
#[derive(Debug)]
#[must_use = "a listing does nothing until it is awaited"]
pub struct Functions {
    client: Client,
    request: ListFunctionsRequest,
}

impl Functions {
    /// Only the functions whose demangled name matches the glob `pattern`.
    pub fn pattern(mut self, pattern: impl Into<String>) -> Self {
        self.request.pattern = pattern.into();
        self
    }

    /// At most `limit` functions (`total` in the answer still counts every match).
    pub fn limit(mut self, limit: u32) -> Self {
        self.request.limit = limit;
        self
    }
}

impl IntoFuture for Functions {
    type Output = Result<ListFunctionsResponse>;
    type IntoFuture = BoxFuture<ListFunctionsResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let response = self.client.inner().list_functions(self.request).await?;
            Ok(response.into_inner())
        })
    }
}

/// A pending listing of trampolines, from [`Client::trampolines`]; `.await` it.
#[derive(Debug)]
#[must_use = "a listing does nothing until it is awaited"]
pub struct Trampolines {
    client: Client,
    request: ListTrampolinesRequest,
}

impl Trampolines {
    /// Only the trampolines of process `pid`.
    pub fn pid(mut self, pid: u32) -> Self {
        self.request.pid = pid;
        self
    }

    /// Also the freed trampolines the server still remembers.
    pub fn include_freed(mut self) -> Self {
        self.request.include_freed = true;
        self
    }
}

impl IntoFuture for Trampolines {
    type Output = Result<Vec<TrampolineInfo>>;
    type IntoFuture = BoxFuture<Vec<TrampolineInfo>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let response = self.client.inner().list_trampolines(self.request).await?;
            Ok(response.into_inner().trampolines)
        })
    }
}

/// A pending grace period over every thread of every agent, from
/// [`Client::synchronize`]; `.await` it.
#[derive(Debug)]
#[must_use = "a synchronize does nothing until it is awaited"]
pub struct Synchronize {
    client: Client,
    timeout: Option<Duration>,
}

impl Synchronize {
    /// Gives up after `timeout` (default: the server's, 30 s) with
    /// [`Error::DeadlineExceeded`] naming the threads still waited for.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl IntoFuture for Synchronize {
    type Output = Result<SynchronizeResponse>;
    type IntoFuture = BoxFuture<SynchronizeResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let request = SynchronizeRequest {
                timeout_ms: timeout_ms(self.timeout),
            };
            let wire_ms = request.timeout_ms;
            let request = with_deadline(request, wire_ms, SYNCHRONIZE_DEFAULT_WAIT);
            Ok(self.client.inner().synchronize(request).await?.into_inner())
        })
    }
}

/// A wait bound in whole milliseconds for the wire; `None` means "server default" (0).
/// A `Some` bound is at least 1 ms so that it is never mistaken for the default.
pub(crate) fn timeout_ms(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => 0,
        Some(t) => u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1),
    }
}

/// A request whose client-side deadline leaves the server time to report its own timeout
/// (which names what it waited for) before the client gives up.
/// `wire_ms` is the bound sent to the server (0: `default_wait`).
pub(crate) fn with_deadline<T>(
    message: T,
    wire_ms: u32,
    default_wait: Duration,
) -> tonic::Request<T> {
    let server_wait = match wire_ms {
        0 => default_wait,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut request = tonic::Request::new(message);
    request.set_timeout(server_wait + DEADLINE_SLACK);
    request
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
