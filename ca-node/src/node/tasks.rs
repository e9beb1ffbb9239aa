//! The node's upkeep: bringing its CA up to date with the journal ([`ensure_ca`]), renewing
//! its own serving SVID, and the long-running tasks [`crate::node::start_with`] spawns
//! once the node is built besides serving its ports (the Raft and snapshot gauges, the
//! SVID renewal timer, the CA maintenance loop).

use std::sync::Arc;
use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_raft::{Role, StateMachine};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::NodeCore;
use crate::Error;

/// Keeps the Raft gauges (role, term, indexes, lag, leader changes) and the snapshot
/// counters current from openraft's metrics and the state machine's snapshot activity,
/// until `stop` changes.
pub(crate) fn spawn_raft_metrics(
    core: &Arc<NodeCore>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn({
        let metrics = core.metrics.clone();
        let mut raft_metrics = core.raft.metrics();
        let mut snapshots = core.sm.subscribe_snapshots();
        async move {
            let mut before = None;
            let mut snapshots_before = ca_raft::SnapshotActivity::default();
            loop {
                let now = ca_raft::node::status_from_metrics(&raft_metrics.borrow_and_update());
                metrics.set_raft(before.as_ref(), &now);
                before = Some(now);
                let activity = *snapshots.borrow_and_update();
                metrics.set_snapshots(&snapshots_before, &activity);
                snapshots_before = activity;
                tokio::select! {
                    r = raft_metrics.changed() => if r.is_err() { return },
                    r = snapshots.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
        }
    })
}

/// Renews the node's serving SVID when half of its remaining life is gone (on its own
/// timer: short lifetimes must not wait for the maintenance tick), as soon as the
/// intermediate changed (rotated or revoked, checked every second), and as soon as the
/// clock is right again after it minted one from the future. `svid_validity` and
/// `svid_issuer` describe the SVID made at start, if one was.
pub(crate) fn spawn_svid_renewal(
    core: Arc<NodeCore>,
    svid: SvidResolver,
    svid_validity: Option<(i64, i64)>,
    svid_issuer: String,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Not renewed above: renew as soon as possible (`not_after` 0), but know whether
        // the SVID saved by the last run is from the future.
        let (mut not_before, mut not_after) =
            svid_validity.unwrap_or_else(|| (current_not_before(&svid).unwrap_or(0), 0));
        let mut issuer = svid_issuer;
        let mut renew_at_ms = 0i64;
        loop {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            if renew_at_ms == 0 {
                renew_at_ms = if not_after == 0 {
                    now_ms + 1000
                } else {
                    now_ms + ((not_after * 1000 - now_ms) / 2).max(200)
                };
            }
            let wait_ms = (renew_at_ms - now_ms).clamp(0, 1000);
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            }
            let Some(int) = core.ca.intermediate() else {
                continue;
            };
            let now_ms = now_ms + wait_ms;
            if core.ca.clock_problem().is_some() {
                continue;
            }
            // A certificate minted while this node's clock ran ahead is not valid yet for
            // anyone else: replace it as soon as the clock is right.
            let from_the_future = not_before * 1000 > now_ms;
            if now_ms < renew_at_ms && int.record.id == issuer && !from_the_future {
                continue;
            }
            match renew_node_svid(&core, &svid).await {
                Ok((nb, na)) => {
                    not_before = nb;
                    not_after = na;
                    issuer = int.record.id;
                    renew_at_ms = 0;
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the node's serving SVID failed; will retry");
                    renew_at_ms = now_ms + 1000;
                }
            }
        }
    })
}

/// The CA maintenance loop: the authorities' lifecycle, expired key destruction, bundle
/// refresh (into `roots`), and the per-authority gauges, every 5 s and at once when the CA
/// journal or the rotation requests change.
pub(crate) fn spawn_maintenance(
    core: Arc<NodeCore>,
    roots: LiveRoots,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        // Besides every 5 s, a round runs as soon as the CA journal or the rotation requests
        // change (a revocation or a rotation request takes effect at once on its node).
        // Other writes (entries, agents) do not wake it.
        let mut applied = core.sm.subscribe_ca();
        let mut seen = ca_fingerprint(&core.sm).await;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
                changed = applied.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if ca_fingerprint(&core.sm).await == seen {
                        continue;
                    }
                    // Revocations reach agents now (pushed with the bundle), not after the
                    // round below, which may first make a new intermediate. The round sets
                    // the TLS roots from the bundle afterwards (roots are never revoked).
                    if core.ca.bundle().is_ok() {
                        if let Err(e) = core.ca.refresh_bundle().await {
                            tracing::warn!(error = %e, "refreshing the bundle failed; the maintenance round retries");
                        }
                    }
                    // Let a burst of entries (a rotation is several) land first.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            seen = ca_fingerprint(&core.sm).await;
            let current = match ensure_ca_unless_clock_is_off(&core).await {
                Ok(started) => started,
                Err(e @ (Error::State(ca_raft::Error::Unavailable(_)) | Error::Unavailable(_))) => {
                    tracing::warn!(error = %e, "CA maintenance skipped: no leader with a quorum; will retry in 5s");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "CA maintenance failed; will retry in 5s");
                    false
                }
            };
            core.ca.probe_key_managers().await;
            if current {
                if let Err(e) = core.ca.destroy_expired_keys().await {
                    tracing::warn!(error = %e, "destroying expired authority keys failed; will retry");
                }
            } else if core.ca.bundle().is_ok() {
                // Without a quorum the journal may still have changed here (applied late).
                let _ = core.ca.refresh_bundle().await;
            }
            if let Ok(b) = core.ca.bundle() {
                if !b.x509_authorities.is_empty() {
                    roots.set(b.x509_authorities.clone());
                }
            }
            if let Ok(auths) = core.sm.authorities().await {
                core.metrics.set_authorities(
                    &auths,
                    &core.config.node_id,
                    &core.config.rotation,
                    ca_identity::unix_now(),
                );
            }
        }
    })
}

/// Issues (or renews) the node's own serving SVID `spiffe://TD/ca-node/<id>`, with the
/// longest X.509-SVID lifetime the configuration allows (half the intermediate's); returns
/// its (notBefore, notAfter), Unix seconds.
pub(crate) async fn renew_node_svid(
    core: &NodeCore,
    resolver: &SvidResolver,
) -> Result<(i64, i64), Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Internal(format!("node key: {e}")))?;
    let id = crate::raft_tls::ca_node_id(&core.config.trust_domain(), &core.config.node_id)?;
    let chain = core
        .ca
        .mint_x509_svid(&id, &key, core.config.max_x509_svid_ttl(), &[])
        .await?;
    let key_der = zeroize::Zeroizing::new(key.serialize_der());
    resolver.set(&chain, &key_der)?;
    // Connections to other members keep the certificate they were opened with: open new
    // ones, so that peers see this one (an older one may come from a revoked intermediate).
    core.raft.reconnect();
    // Kept for the next start: a restarted node talks to its peers with it before its CA is
    // ready (a memory-mode intermediate, for one, needs the cluster to be replaced).
    if let Err(e) = crate::registry::save_node_svid(&core.config.data_dir, &chain, &key_der) {
        tracing::warn!(error = %e, "could not save the node SVID");
    }
    let info = ca_identity::x509::cert_info(&chain[0])?;
    Ok((info.not_before, info.not_after))
}

/// Whether this node may run its CA now: the journal has an active root, or this node is
/// the whole cluster and leads it (it creates the root). A node that joined waits for the
/// log to bring the root.
async fn ca_may_start(core: &NodeCore) -> Result<bool, Error> {
    let has_root = core.sm.authorities().await?.iter().any(|a| {
        a.kind == ca_state::AuthorityKind::Root && a.state == ca_state::AuthorityState::Active
    });
    if has_root {
        return Ok(true);
    }
    let st = core.raft.status();
    Ok(st.role == Role::Leader && st.members.len() == 1 && st.members.contains_key(&st.id))
}

/// One round of CA upkeep on the current journal: read barrier, then
/// [`Ca::ensure_authorities`]. `Ok(false)`: not yet (no root replicated here yet).
pub(crate) async fn ensure_ca(core: &NodeCore) -> Result<bool, Error> {
    let st = core.raft.status();
    if !st.members.contains_key(&st.id) {
        return Ok(false); // not added to the cluster yet
    }
    core.read_barrier().await?;
    if !ca_may_start(core).await? {
        return Ok(false);
    }
    core.ca
        .ensure_authorities(core.raft.status().role == Role::Leader)
        .await?;
    Ok(true)
}

/// [`ensure_ca`], unless this node's clock disagrees with the cluster's: the authorities'
/// lifecycle is decided by the clock, so with a wrong one nothing is decided (`Ok(false)`).
pub(crate) async fn ensure_ca_unless_clock_is_off(core: &NodeCore) -> Result<bool, Error> {
    crate::clock::recheck_if_jumped(core).await;
    if let Some(p) = core.ca.clock_problem() {
        tracing::warn!("CA maintenance skipped: {p}");
        return Ok(false);
    }
    ensure_ca(core).await
}

/// When the serving SVID in `svid` starts to be valid (Unix seconds), if there is one.
pub(crate) fn current_not_before(svid: &SvidResolver) -> Option<i64> {
    let key = svid.current()?;
    let leaf = key.cert.first()?;
    ca_identity::x509::cert_info(leaf.as_ref())
        .ok()
        .map(|i| i.not_before)
}

/// What the maintenance loop reacts to at once: the CA journal's version and the rotation
/// requests.
pub(crate) async fn ca_fingerprint(
    sm: &StateMachine,
) -> Option<(i64, Vec<ca_state::RotationRequest>)> {
    Some((
        sm.authorities_version().await.ok()?,
        sm.rotation_requests().await.ok()?,
    ))
}
