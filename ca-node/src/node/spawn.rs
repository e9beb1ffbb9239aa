//! Spawning a built node: the peer gate, the node port, the CA brought up to date with the
//! journal, the admin socket, `/metrics` `/healthz` `/readyz`, and the long-running tasks.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::build::Built;
use super::{health, node_port, tasks, NodeHandle};
use crate::admin_api::AdminApi;
use crate::core::NodeCore;
use crate::Error;

impl Built {
    /// Serves the built node and spawns its tasks; returns once every listener is bound.
    /// On an error everything spawned so far is stopped again.
    pub(crate) async fn spawn(self) -> Result<NodeHandle, Error> {
        let Built {
            core,
            listener,
            node_addr,
        } = self;
        let (shutdown, _) = watch::channel(false);
        let mut spawned = vec![tokio::spawn(core.gate.clone().run(shutdown.subscribe()))];
        // Served before the CA is ready: a member's peers need its Raft service first.
        spawned.extend(node_port::serve(&core, listener, &shutdown));
        let rest = async {
            let svid_validity = start_ca(&core).await?;
            let admin = serve_admin(&core, shutdown.subscribe()).await?;
            let http = serve_http(&core, shutdown.subscribe()).await?;
            Ok::<_, Error>((svid_validity, admin, http))
        };
        let (svid_validity, admin, http) = match rest.await {
            Ok(r) => r,
            Err(e) => {
                let _ = shutdown.send(true);
                let _ = core.raft.shutdown().await;
                return Err(e);
            }
        };
        spawned.push(admin);
        let http_addr = http.as_ref().map(|(addr, _)| *addr);
        spawned.extend(http.map(|(_, task)| task));

        // Clock offsets to the other members: a node whose clock a quorum disagrees with
        // stops minting.
        spawned.push(crate::clock::spawn(core.clone(), shutdown.subscribe()));
        spawned.push(tasks::spawn_raft_metrics(&core, shutdown.subscribe()));
        spawned.push(core.watch_hub.spawn(&core.sm, shutdown.subscribe()));
        let (svid_validity, svid_issuer) = svid_validity;
        spawned.push(tasks::spawn_svid_renewal(
            core.clone(),
            core.svid.clone(),
            svid_validity,
            svid_issuer,
            shutdown.subscribe(),
        ));
        spawned.push(tasks::spawn_maintenance(
            core.clone(),
            core.roots.clone(),
            shutdown.subscribe(),
        ));
        let (failed_tx, failed) = watch::channel(None);
        spawned.push(health::watch_storage(
            core.clone(),
            shutdown.clone(),
            failed_tx,
        ));
        let admin_socket = core.config.admin_socket.clone();
        tracing::info!(%node_addr, admin_socket = %admin_socket.display(), trust_domain = %core.config.trust_domain, node_id = %core.config.node_id, "ca-node started");
        Ok(NodeHandle {
            node_addr,
            admin_socket,
            http_addr,
            core,
            shutdown,
            failed,
            tasks: spawned,
        })
    }
}

/// Brings the CA up to date with the journal (root on the first node only, this node's
/// intermediate and JWT key) once the clock is compared with the other members', and
/// mints the node's serving SVID if the CA is ready. Returns that SVID's validity and
/// issuer for the renewal task. A key manager that is down and a cluster without a
/// quorum are waited for (the node starts not ready; the maintenance loop retries);
/// anything else (a wrong PIN, a bad config) is an error.
async fn start_ca(core: &NodeCore) -> Result<(Option<(i64, i64)>, String), Error> {
    // Nothing is minted or decided by the clock before it is compared with the others'.
    crate::clock::check(core).await;
    match tasks::ensure_ca_unless_clock_is_off(core).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!("waiting for the replicated log to bring the CA journal's root");
        }
        Err(Error::KeyManager(e @ ca_kms::Error::Unavailable(_))) => {
            tracing::error!(error = %e, "the key manager is unavailable at start; the node is NOT READY and retries every 5s");
        }
        Err(e @ (Error::State(ca_raft::Error::Unavailable(_)) | Error::Unavailable(_))) => {
            tracing::error!(error = %e, "no quorum at start; the node is NOT READY and retries every 5s");
        }
        Err(e) => return Err(e),
    }
    let issuer = core
        .ca
        .intermediate()
        .map(|i| i.record.id)
        .unwrap_or_default();
    let validity = match core.ca.intermediate() {
        Some(_) if core.ca.clock_problem().is_none() => {
            Some(tasks::renew_node_svid(core, &core.svid).await?)
        }
        // No serving certificate of its own until the CA is ready.
        _ => None,
    };
    if let Ok(b) = core.ca.bundle() {
        core.roots.set(b.x509_authorities.clone());
    }
    Ok((validity, issuer))
}

/// The admin API on its owner-only Unix socket.
async fn serve_admin(
    core: &Arc<NodeCore>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, Error> {
    let uds = ca_identity::unix_socket::bind(&core.config.admin_socket, 0o700, 0o600, "ca-node")
        .await
        .map_err(|e| Error::Config(format!("admin_socket: {e}")))?;
    let ready_core = core.clone();
    let admin = AdminApi::server(
        core.clone(),
        Arc::new(move || health::readiness(&ready_core)),
    );
    Ok(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(admin)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(uds),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin API server stopped");
        }
    }))
}

/// `/metrics`, `/healthz` and `/readyz` on `http_listen`, if it is set.
async fn serve_http(
    core: &Arc<NodeCore>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(std::net::SocketAddr, JoinHandle<()>)>, Error> {
    let Some(addr) = core.config.http_listen else {
        return Ok(None);
    };
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on http_listen {addr}: {e}")))?;
    let bound = l.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let m = core.metrics.clone();
    let ready_core = core.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let (ok, detail) = health::readiness(&ready_core);
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, detail)
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, detail)
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = stop.changed().await;
        };
        ca_identity::http_probe::serve(l, app, "node HTTP (metrics, health)", stop).await;
    });
    Ok(Some((bound, task)))
}
