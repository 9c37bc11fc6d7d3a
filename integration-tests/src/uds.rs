//! gRPC channels over the server's Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use patchbay_proto::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

/// Opens a gRPC channel to a Unix socket. The channel connects eagerly, so an error here
/// means the socket did not accept.
pub async fn uds_channel(path: &Path) -> anyhow::Result<Channel> {
    let path: PathBuf = path.to_path_buf();
    let channel = Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// Adds the protocol version metadata to every request.
pub type ProtocolInterceptor = fn(Request<()>) -> Result<Request<()>, Status>;

/// The raw generated Control client, over a Unix socket, announcing protocol version 1.
pub type Control = ControlClient<InterceptedService<Channel, ProtocolInterceptor>>;

fn add_protocol(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut().insert(
        patchbay_proto::PROTOCOL_METADATA_KEY,
        patchbay_proto::PROTOCOL_VERSION
            .to_string()
            .parse()
            .expect("ascii metadata"),
    );
    Ok(req)
}

/// Connects a raw Control client to the server at `path`, accepting answers as large
/// as the SDK does ([`patchbay_sdk::MAX_DECODING_MESSAGE_SIZE`], not tonic's 4 MiB).
pub async fn control_client(path: &Path) -> anyhow::Result<Control> {
    let channel = uds_channel(path).await?;
    Ok(
        ControlClient::with_interceptor(channel, add_protocol as ProtocolInterceptor)
            .max_decoding_message_size(patchbay_sdk::MAX_DECODING_MESSAGE_SIZE),
    )
}
