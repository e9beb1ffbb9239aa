//! A small Workload API client over the Unix socket, used by the CLI's `api` and
//! `healthcheck` commands (and by tests). Adds the `workload.spiffe.io: true` header.

use std::path::{Path, PathBuf};

use ca_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use hyper_util::rt::TokioIo;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::workload_api::SECURITY_HEADER;
use crate::Error;

/// The environment variable naming the Workload API socket.
pub const SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// A Workload API client whose calls carry the security header.
pub type Client = SpiffeWorkloadApiClient<
    InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>,
>;

fn add_header(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

/// Parses an endpoint address: `unix:///abs/path`, `unix:/abs/path` or a plain absolute path.
pub fn parse_socket_addr(s: &str) -> Result<PathBuf, Error> {
    let path = if let Some(rest) = s.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = s.strip_prefix("unix:") {
        rest
    } else if s.contains("://") {
        return Err(Error::Config(format!(
            "Workload API address {s:?}: only unix:///path addresses are supported"
        )));
    } else {
        s
    };
    if !path.starts_with('/') {
        return Err(Error::Config(format!(
            "Workload API address {s:?}: the socket path must be absolute, e.g. unix:///run/spiffe-agent/agent.sock"
        )));
    }
    Ok(PathBuf::from(path))
}

/// The socket to use: the explicit one, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
pub fn resolve_socket_path(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = explicit {
        return parse_socket_addr(&p.to_string_lossy());
    }
    match std::env::var(SOCKET_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_socket_addr(v.trim()),
        _ => Ok(PathBuf::from(crate::config::DEFAULT_SOCKET_PATH)),
    }
}

/// Connects to the Workload API at `path`.
pub async fn connect(path: &Path) -> Result<Client, Error> {
    let hint = "is the agent running? set --socket-path or SPIFFE_ENDPOINT_SOCKET";
    // Probe first for a clear I/O error (tonic's would be wrapped in transport errors).
    if let Err(e) = tokio::net::UnixStream::connect(path).await {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            std::io::ErrorKind::ConnectionRefused => "connection refused (stale socket)".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            _ => e.to_string(),
        };
        return Err(Error::WorkloadApi(format!(
            "cannot connect to {}: {why}; {hint}",
            path.display()
        )));
    }
    let p = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| Error::WorkloadApi(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| {
            Error::WorkloadApi(format!("cannot connect to {}: {e}; {hint}", path.display()))
        })?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        add_header as fn(Request<()>) -> Result<Request<()>, Status>,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_socket_addr("unix:///tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_socket_addr("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_socket_addr("/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(parse_socket_addr("tcp://127.0.0.1:1").is_err());
        assert!(parse_socket_addr("rel.sock").is_err());
    }

    #[tokio::test]
    async fn missing_socket_says_what_to_do() {
        let err = connect(Path::new("/nonexistent/agent.sock"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot connect to /nonexistent/agent.sock: no such file"),
            "{err}"
        );
        assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
    }
}
