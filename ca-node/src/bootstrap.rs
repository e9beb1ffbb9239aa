//! Bringing a node into a cluster: joining an existing one with a ca-node join token
//! (`ca-node join`): the token buys the node's first SVID from a member, the node starts
//! with it, is added as a learner, catches up and is promoted.

use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::TrustDomain;
use ca_proto::admin::cluster_client::ClusterClient;
use ca_proto::admin::*;
use ca_raft::{NodeId, Role};
use tonic::{Request, Status};

use crate::raft_tls;
use crate::registry::{
    has_state, io_err, read_marker, save_node_svid, write_marker, write_private, Marker, Origin,
    BUNDLE_FILE,
};
use crate::{Error, NodeConfig, NodeHandle};

/// How a node joins an existing cluster.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// A member's node API address, `host:port`.
    pub peer: String,
    /// The join token created for `spiffe://TD/ca-node/<this node id>`.
    pub token: String,
    /// The trust bundle's X.509 roots, PEM.
    pub bundle_pem: String,
    /// Become a voter once caught up (else stay a learner).
    pub promote: bool,
    /// How long to keep trying to be added and promoted.
    pub timeout: Duration,
}

/// Joins an existing cluster (`ca-node join`): gets a ca-node SVID with the token, starts
/// the node, has it added as a learner and (with `promote`) promoted once caught up.
/// Returns the running node. The data dir must be empty of state.
pub async fn join(config: NodeConfig, opts: JoinOptions) -> Result<NodeHandle, Error> {
    config.validate()?;
    if has_state(&config.data_dir) || read_marker(&config.data_dir)?.is_some() {
        return Err(Error::Config(format!(
            "data_dir {} already belongs to a node; start it with `ca-node run`, or wipe it (and `ca-node cluster remove` the old member) to join again",
            config.data_dir.display()
        )));
    }
    let td = config.trust_domain();
    let roots = ca_identity::bundle::certs_from_pem(&opts.bundle_pem)
        .map_err(|e| Error::Config(format!("the trust bundle: {e}")))?;
    if roots.is_empty() {
        return Err(Error::Config(
            "the trust bundle holds no certificate".into(),
        ));
    }
    let roots = LiveRoots::new(roots);
    // The node's TLS key (not a CA key).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Internal(format!("node key: {e}")))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| Error::Internal(format!("CSR: {e}")))?;
    let tls = raft_tls::any_node_tls(&SvidResolver::default(), &roots, td.clone());
    let channel = raft_tls::tls_channel(&opts.peer, tls)
        .map_err(|e| Error::Config(format!("peer {:?}: {e}", opts.peer)))?;
    let mut req = Request::new(JoinRequest {
        token: opts.token.clone(),
        csr: csr.der().to_vec(),
        node_id: config.node_id.clone(),
    });
    req.set_timeout(Duration::from_secs(30));
    let resp = ClusterClient::new(channel)
        .join(req)
        .await
        .map_err(|s| join_error(&opts.peer, s))?
        .into_inner();
    if resp.svid_chain.is_empty() {
        return Err(Error::Internal(
            "the member answered Join without an SVID".into(),
        ));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| io_err("cannot create", &config.data_dir, e))?;
    let key_der = key.serialize_der();
    save_node_svid(&config.data_dir, &resp.svid_chain, &key_der)?;
    let bundle_roots = resp
        .bundle
        .map(|b| b.x509_authorities)
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| roots.get().iter().map(|c| c.to_vec()).collect());
    let pem_text = pem::encode_many(
        &bundle_roots
            .iter()
            .map(|c| pem::Pem::new("CERTIFICATE", c.clone()))
            .collect::<Vec<_>>(),
    );
    write_private(&config.data_dir.join(BUNDLE_FILE), pem_text.as_bytes())?;
    write_marker(
        &config.data_dir,
        &Marker {
            raft_id: config.raft_id,
            origin: Origin::Join,
        },
    )?;
    tracing::info!(peer = %opts.peer, node = %config.node_id, "joined: received this node's first SVID; starting");

    let raft_id = config.raft_id;
    let node = crate::node::start_with(config, crate::node::Bootstrap::Join).await?;
    // AddMe presents the SVID Join issued (the node replaces its own once its CA is ready).
    let join_svid = SvidResolver::default();
    join_svid.set(&resp.svid_chain, &key_der)?;
    match add_me(&node, &join_svid, &roots, &td, &opts, raft_id).await {
        Ok(()) => Ok(node),
        Err(e) => {
            node.shutdown().await;
            Err(e)
        }
    }
}

fn join_error(peer: &str, s: Status) -> Error {
    let m = format!("joining through {peer}: {}", s.message());
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Error::PermissionDenied(m),
        tonic::Code::InvalidArgument => Error::InvalidArgument(m),
        tonic::Code::AlreadyExists => Error::AlreadyExists(m),
        _ => Error::Unavailable(m),
    }
}

async fn add_me(
    node: &NodeHandle,
    join_svid: &SvidResolver,
    roots: &LiveRoots,
    td: &TrustDomain,
    opts: &JoinOptions,
    raft_id: NodeId,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let tls = raft_tls::any_node_tls(join_svid, roots, td.clone());
    let channel = raft_tls::tls_channel(&opts.peer, tls)
        .map_err(|e| Error::Config(format!("peer {:?}: {e}", opts.peer)))?;
    let mut client = ClusterClient::new(channel);
    loop {
        let mut req = Request::new(AddMeRequest {
            raft_id,
            addr: node.core.advertise_addr.clone(),
            promote: opts.promote,
        });
        req.set_timeout(Duration::from_secs(90));
        match client.add_me(req).await {
            Ok(_) => break,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(status = %s.message(), "not added yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(join_error(&opts.peer, s)),
        }
    }
    // Wait until this node sees itself as it should be.
    let want = if opts.promote {
        Role::Follower
    } else {
        Role::Learner
    };
    loop {
        let st = node.core.raft.status();
        let me = st.members.get(&raft_id);
        let ok = match want {
            Role::Learner => me.is_some(),
            _ => me.is_some_and(|m| m.voter) && !st.joint,
        };
        if ok {
            tracing::info!(
                raft_id,
                voter = opts.promote,
                "this node is a member of the cluster"
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "this node was not {} within {:?}",
                if opts.promote {
                    "promoted to voter"
                } else {
                    "added"
                },
                opts.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its CA (intermediate, JWT key) now, rather than at the next maintenance tick.
    loop {
        match crate::node::tasks::ensure_ca(&node.core).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::info!(error = %e, "this node's CA is not ready yet; retrying"),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "this node joined but its CA was not ready within {:?}",
                opts.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
