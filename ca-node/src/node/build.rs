//! Building a node: its data dir checked, state and log opened, the node port bound, the
//! Raft member started and its membership settled, the key managers opened and the CA and
//! [`NodeCore`] assembled. Nothing is served here; [`Built::spawn`](super::Built) does that.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_kms::KeyManager;
use ca_raft::{
    LogStore, NodeInfo, RaftNode, RaftNodeConfig, RaftProposer, StateMachine, LOG_DB_FILE,
    STATE_DB_FILE,
};
use tokio::net::TcpListener;

use super::Bootstrap;
use crate::ca::keys::KeyManagers;
use crate::ca::{Ca, CaSettings};
use crate::cluster;
use crate::config::{KeyManagerConfig, NodeConfig};
use crate::core::NodeCore;
use crate::metrics::{MeteredProposer, Metrics};
use crate::peer_gate::{CheckedProposer, PeerGate};
use crate::raft_tls::TlsConnector;
use crate::registry::{Marker, Origin};
use crate::Error;

/// A node built but not serving: its core, and the node port bound for it.
pub(crate) struct Built {
    pub(crate) core: Arc<NodeCore>,
    pub(crate) listener: TcpListener,
    pub(crate) node_addr: SocketAddr,
}

/// Builds a node from `config` (validated here); see [`Bootstrap`]. On an error everything
/// opened so far is closed again.
pub(crate) async fn build(config: NodeConfig, bootstrap: Bootstrap) -> Result<Built, Error> {
    config.validate()?;
    mkdir_private(&config.data_dir)?;
    let marker = crate::registry::read_marker(&config.data_dir)?;
    if let Some(m) = &marker {
        if m.raft_id != config.raft_id {
            return Err(Error::Config(format!(
                "raft_id {} does not match data_dir {}, which belongs to raft id {}; raft IDs never change",
                config.raft_id,
                config.data_dir.display(),
                m.raft_id
            )));
        }
    }
    let (sm, log) = open_stores(&config.data_dir).await?;

    // The node API is bound first: its address is this node's address in the membership.
    let listener = TcpListener::bind(config.node_listen).await.map_err(|e| {
        Error::Config(format!(
            "cannot listen on node_listen {}: {e}",
            config.node_listen
        ))
    })?;
    let node_addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let advertise = advertise_addr(&config, node_addr);

    let svid = SvidResolver::default();
    if let Some((chain, key)) = crate::registry::load_node_svid(&config.data_dir) {
        if let Err(e) = svid.set(&chain, &key) {
            tracing::warn!(error = %e, "the saved node SVID is unusable; waiting for the CA");
        }
    }
    let roots = LiveRoots::new(initial_roots(&config, &sm).await?);
    let connector = Arc::new(TlsConnector::new(
        svid.clone(),
        roots.clone(),
        config.trust_domain(),
    ));
    let mut raft_config = RaftNodeConfig::new(
        config.raft_id,
        NodeInfo {
            addr: advertise.clone(),
            node_id: config.node_id.clone(),
        },
    );
    raft_config.raft.heartbeat_interval = config.raft.heartbeat_ms;
    raft_config.raft.election_timeout_min = config.raft.election_timeout_min_ms;
    raft_config.raft.election_timeout_max = config.raft.election_timeout_max_ms;
    // A data dir with CA state but no Raft log or marker is a restored backup.
    let restored = marker.is_none() && !sm.authorities().await?.is_empty();
    let raft = RaftNode::start(raft_config, log, sm.clone(), connector).await?;
    let parts = Parts {
        config,
        sm,
        raft: raft.clone(),
        svid,
        roots,
        advertise,
    };
    match assemble(parts, bootstrap, marker, restored).await {
        Ok(core) => Ok(Built {
            core,
            listener,
            node_addr,
        }),
        Err(e) => {
            let _ = raft.shutdown().await;
            Err(e)
        }
    }
}

/// What [`build`] has made before the Raft member's membership is settled.
struct Parts {
    config: NodeConfig,
    sm: StateMachine,
    raft: RaftNode,
    svid: SvidResolver,
    roots: LiveRoots,
    advertise: String,
}

/// Settles the membership, then opens the key managers and assembles the CA and the core.
async fn assemble(
    p: Parts,
    bootstrap: Bootstrap,
    marker: Option<Marker>,
    restored: bool,
) -> Result<Arc<NodeCore>, Error> {
    let Parts {
        config,
        sm,
        raft,
        svid,
        roots,
        advertise,
    } = p;
    settle_membership(&raft, &config, bootstrap, marker.as_ref(), restored).await?;
    if marker.is_none() {
        crate::registry::write_marker(
            &config.data_dir,
            &Marker {
                raft_id: config.raft_id,
                origin: if bootstrap == Bootstrap::Join {
                    Origin::Join
                } else {
                    Origin::Init
                },
            },
        )?;
    }

    let metrics = Metrics::new();
    let gate = PeerGate::new(config.clone(), raft.clone(), sm.clone()).await?;
    let proposer: Arc<dyn ca_raft::Proposer> = Arc::new(MeteredProposer::new(
        Arc::new(CheckedProposer::new(
            Arc::new(RaftProposer::new(raft.clone())),
            gate.clone(),
            config.node_id.clone(),
        )),
        sm.clone(),
        metrics.clone(),
    ));
    let [local_root, intermediate_km, jwt_km] = open_key_managers(&config).await?;
    let td = config.trust_domain();
    let peers = cluster::Peers::new(raft.clone(), svid.clone(), roots.clone(), td.clone());
    let root_km: Arc<dyn KeyManager> = Arc::new(cluster::ClusterRootKeyManager::new(
        local_root.clone(),
        sm.clone(),
        peers,
    ));
    for km in [&root_km, &intermediate_km, &jwt_km] {
        metrics.init_key_manager(km.backend());
    }
    let keys = KeyManagers::new(root_km, intermediate_km, jwt_km, Arc::new(metrics.clone()));
    let ca = Ca::new(
        CaSettings {
            trust_domain: td,
            node_id: config.node_id.clone(),
            root_ttl: config.ttl.root,
            intermediate_ttl: config.ttl.intermediate,
            jwt_key_ttl: config.ttl.jwt_key,
            intermediate_mode: config.intermediate_mode,
            key_algorithm: config.ca_key_algorithm,
            jwt_key_algorithm: config.jwt_key_algorithm,
            rotation: config.rotation.clone(),
        },
        keys,
        Arc::new(crate::ca::RaftJournal::new(sm.clone(), proposer.clone())),
    );
    Ok(Arc::new(NodeCore {
        config,
        sm,
        proposer,
        ca,
        metrics,
        raft,
        svid,
        roots,
        local_root_km: local_root,
        advertise_addr: advertise,
        gate,
        watch_hub: Arc::default(),
    }))
}

/// Opens the state and the Raft log in `data_dir`, refusing a log that cannot be read or
/// that was lost under applied state.
async fn open_stores(data_dir: &Path) -> Result<(StateMachine, LogStore), Error> {
    let log_path = data_dir.join(LOG_DB_FILE);
    let sm = StateMachine::open(&data_dir.join(STATE_DB_FILE)).await?;
    let log = match LogStore::open(&log_path).await {
        Ok(log) => log,
        Err(e) => {
            sm.close().await;
            return Err(Error::Config(format!(
                "the Raft log {} cannot be read ({e}); if it is damaged, restore the whole data dir from one backup, or empty the data dir and `ca-node join` the cluster again",
                log_path.display()
            )));
        }
    };
    if let Err(e) = refuse_lost_log(&sm, &log, &log_path).await {
        // Closed before the refusal reaches the caller, so that nothing of this attempt
        // writes the data dir after it (a closing connection checkpoints its WAL).
        sm.close().await;
        log.close().await;
        return Err(e);
    }
    Ok((sm, log))
}

/// Refuses a data dir whose state was applied from a Raft log that is now gone (deleted,
/// or truncated to nothing): the log held this node's vote and entries it acknowledged, so
/// starting would let it vote twice in one term and forget acknowledged writes. A restored
/// backup has no Raft bookkeeping and passes.
async fn refuse_lost_log(sm: &StateMachine, log: &LogStore, log_path: &Path) -> Result<(), Error> {
    let (applied, _) = sm.applied_state().await?;
    let Some(applied) = applied else {
        return Ok(());
    };
    if log.is_blank().await? {
        return Err(Error::Config(format!(
            "{} is missing or empty, but this data dir's state was applied from a Raft log up to index {}: the node's vote and the entries it acknowledged are lost, and starting would let it vote twice in a term. Restore the whole data dir from one backup (state and log together), or empty the data dir and `ca-node join` the cluster again (a lone node: `ca-node snapshot restore` a backup into an empty data dir)",
            log_path.display(),
            applied.index
        )));
    }
    Ok(())
}

/// Decides whether this node starts a new cluster ([`Bootstrap`]), initializes it if so,
/// and waits for the membership to be applied (a lone node: elected), so that the CA starts
/// at once rather than at the first maintenance tick. A restored backup that starts a new
/// cluster is snapshotted and its log purged, so that joining nodes receive it.
async fn settle_membership(
    raft: &RaftNode,
    config: &NodeConfig,
    bootstrap: Bootstrap,
    marker: Option<&Marker>,
    restored: bool,
) -> Result<(), Error> {
    let initialized = raft.is_initialized().await?;
    let joined = marker.map(|m| m.origin) == Some(Origin::Join);
    let new_cluster = match (bootstrap, initialized) {
        (Bootstrap::Init, true) => {
            return Err(Error::Config(format!(
                "data_dir {} is a member of a cluster already; start it with `ca-node run`",
                config.data_dir.display()
            )));
        }
        (Bootstrap::Init, false) => true,
        (Bootstrap::Auto, false) if !joined => {
            if restored {
                tracing::info!("restored state: initializing a new single-node cluster with it (other nodes join it with `ca-node join`)");
            } else {
                tracing::info!("empty data dir: initializing a new single-node cluster (use `ca-node join` to join an existing one instead)");
            }
            true
        }
        (Bootstrap::Auto, false) => {
            tracing::warn!("this node joined but was not added to the cluster yet; waiting for the leader (run `ca-node cluster add` on a member)");
            false
        }
        (Bootstrap::Join, _) | (Bootstrap::Auto, true) => false,
    };
    if new_cluster {
        raft.initialize().await?;
    }
    if new_cluster || initialized {
        let mut metrics = raft.metrics();
        let id = config.raft_id;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            metrics.wait_for(|m| {
                let ms = m.membership_config.membership();
                let alone = ms.voter_ids().all(|v| v == id);
                ms.get_node(&id).is_some() && (!alone || m.current_leader == Some(id))
            }),
        )
        .await;
    }
    if new_cluster && restored {
        // The restored state is in the state machine but in no log entry: a node that joins
        // would replay the new log from its start and never see it.
        let at = raft
            .snapshot_and_purge(Duration::from_secs(60))
            .await
            .map_err(|e| {
                Error::Internal(format!(
                    "the restored state could not be snapshotted for joining nodes: {e}"
                ))
            })?;
        tracing::info!(
            index = at.index,
            "restored state: snapshot built and log purged, so joining nodes receive it"
        );
    }
    Ok(())
}

/// The address members reach this node at: `advertise_addr`, else the bound node API
/// address.
fn advertise_addr(config: &NodeConfig, bound: SocketAddr) -> String {
    if let Some(a) = &config.advertise_addr {
        return a.clone();
    }
    if bound.ip().is_unspecified() {
        tracing::warn!(%bound, "node_listen is a wildcard address and advertise_addr is not set; other members will not be able to reach this node (set advertise_addr)");
        return SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string();
    }
    bound.to_string()
}

/// The X.509 roots to verify peers with before the CA is ready: the journal's, else the
/// bundle a joining node was given.
async fn initial_roots(config: &NodeConfig, sm: &StateMachine) -> Result<Vec<Vec<u8>>, Error> {
    let t = ca_identity::unix_now();
    let roots: Vec<Vec<u8>> = sm
        .authorities()
        .await?
        .into_iter()
        .filter(|a| {
            a.kind == ca_state::AuthorityKind::Root
                && a.state != ca_state::AuthorityState::Revoked
                && a.not_after > t
        })
        .map(|a| a.cert_der)
        .collect();
    if !roots.is_empty() {
        return Ok(roots);
    }
    match std::fs::read_to_string(config.data_dir.join(crate::registry::BUNDLE_FILE)) {
        Ok(text) => Ok(ca_identity::bundle::certs_from_pem(&text)?),
        Err(_) => Ok(Vec::new()),
    }
}

fn mkdir_private(p: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", p.display())))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Config(format!("cannot set permissions on {}: {e}", p.display())))
}

async fn open_key_manager(
    cfg: &NodeConfig,
    km: &KeyManagerConfig,
) -> Result<Arc<dyn KeyManager>, Error> {
    let km: Arc<dyn KeyManager> = match km {
        KeyManagerConfig::Soft { dir } => {
            let dir = dir.clone().unwrap_or_else(|| cfg.data_dir.join("keys"));
            tracing::warn!(
                dir = %dir.display(),
                "USING SOFTWARE KEYS: the CA's private keys are plain files. For development and tests only; use a PKCS#11 HSM or a KMS in production."
            );
            Arc::new(ca_kms::soft::SoftKeyManager::open(dir)?)
        }
        KeyManagerConfig::Pkcs11(c) => {
            let c = c.clone();
            // Loading the module and logging in talk to the token: off the async threads.
            let km =
                tokio::task::spawn_blocking(move || ca_kms::pkcs11::Pkcs11KeyManager::open(&c))
                    .await
                    .map_err(|e| Error::Internal(format!("opening the PKCS#11 token: {e}")))??;
            tracing::info!(token = km.token_label(), "PKCS#11 key manager ready");
            Arc::new(km)
        }
        KeyManagerConfig::AwsKms(c) => {
            let c = c
                .clone()
                .with_node_defaults(&cfg.trust_domain, &cfg.node_id);
            let prefix = c.alias_prefix.clone();
            let km = ca_kms::aws_kms::AwsKmsManager::connect(c).await?;
            tracing::info!(alias_prefix = %prefix, "AWS KMS key manager ready");
            Arc::new(km)
        }
    };
    Ok(km)
}

/// Opens the key manager of each role (root, intermediate, JWT); roles with the same
/// configuration share one.
async fn open_key_managers(cfg: &NodeConfig) -> Result<[Arc<dyn KeyManager>; 3], Error> {
    let mut opened: Vec<(&KeyManagerConfig, Arc<dyn KeyManager>)> = Vec::new();
    let mut per_role = Vec::new();
    for km_cfg in cfg.role_key_managers() {
        let km = match opened.iter().find(|(c, _)| *c == km_cfg) {
            Some((_, km)) => km.clone(),
            None => {
                let km = open_key_manager(cfg, km_cfg).await?;
                opened.push((km_cfg, km.clone()));
                km
            }
        };
        per_role.push(km);
    }
    <[Arc<dyn KeyManager>; 3]>::try_from(per_role)
        .map_err(|_| Error::Internal("three roles".into()))
}
