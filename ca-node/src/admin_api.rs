//! The admin API on the node's Unix socket. Only the socket's owner (the node's user) or
//! root may call it: the socket is mode 0600, and every call passes the check of the
//! caller's uid ([`authorize`]) before it reaches a method: the service exists only behind
//! that check ([`AdminApi::server`]), so a new method cannot forget it.

use std::sync::Arc;

use ca_proto::admin::admin_server::{Admin, AdminServer};
use ca_proto::admin::*;
use ca_state::{Command, Response as SmResponse};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::convert::{agent_to_proto, bundle_to_proto, entry_to_proto};
use crate::core::{propose, NodeCore};
use crate::Error;
use std::pin::Pin;

/// The admin API service.
#[derive(Clone)]
pub struct AdminApi {
    core: Arc<NodeCore>,
    ready: Arc<dyn Fn() -> (bool, String) + Send + Sync>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminApi")
    }
}

/// The most entries one `BatchCreateEntries` call may carry.
pub const MAX_BATCH_ENTRIES: usize = 1000;

/// The most entries proposed in one log entry (one `Command::Batch`).
const ENTRIES_PER_PROPOSAL: usize = 256;

/// The result of one entry of a batch from a status (or success).
fn batch_result(r: Result<ca_proto::types::Entry, Status>) -> BatchEntryResult {
    match r {
        Ok(entry) => BatchEntryResult {
            entry: Some(entry),
            code: 0,
            message: String::new(),
        },
        Err(s) => BatchEntryResult {
            entry: None,
            code: s.code() as i32,
            message: s.message().to_owned(),
        },
    }
}

/// The most items one page may ask for.
pub const MAX_PAGE_SIZE: i32 = 10_000;

/// A list request's page size: None (everything) for 0.
fn page_size(n: i32) -> Result<Option<usize>, Status> {
    match n {
        0 => Ok(None),
        1..=MAX_PAGE_SIZE => Ok(Some(n as usize)),
        _ => Err(Status::invalid_argument(format!(
            "page_size must be between 1 and {MAX_PAGE_SIZE} (or 0 for everything), not {n}"
        ))),
    }
}

/// The opaque token of a page that ended at the item with sort key `key`.
fn page_token(key: &[&str]) -> String {
    hex::encode(key.join("\n"))
}

/// The sort key (`parts` strings) a page token carries; None for no token.
fn page_key(token: &str, parts: usize) -> Result<Option<Vec<String>>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Status::invalid_argument(
            "page_token is not one this API gave out: pass the next_page_token of the previous page, or none to start over",
        )
    };
    let text = hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let key: Vec<String> = text.split('\n').map(str::to_owned).collect();
    if key.len() != parts {
        return Err(bad());
    }
    Ok(Some(key))
}

/// Refuses a caller that is neither this process's user nor root (the peer credentials of
/// the Unix socket connection).
fn authorize(req: Request<()>) -> Result<Request<()>, Status> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
        .ok_or_else(|| Status::unauthenticated("cannot read the caller's credentials"))?;
    let me = nix::unistd::geteuid().as_raw();
    if uid != me && uid != 0 {
        return Err(Status::permission_denied(format!(
            "uid {uid} may not use the admin API; run the command as the node's user (uid {me}) or root"
        )));
    }
    Ok(req)
}

fn entry_of(r: SmResponse) -> Result<ca_proto::types::Entry, Error> {
    match r {
        SmResponse::Entry(e) => Ok(entry_to_proto(&e)),
        other => Err(Error::Internal(format!(
            "unexpected state machine response {other:?}"
        ))),
    }
}

/// The admin service as it is served: every call checked by [`authorize`] first.
pub type AuthorizedAdmin = InterceptedService<AdminServer<AdminApi>, Authorize>;

/// The check every admin call passes first.
pub type Authorize = fn(Request<()>) -> Result<Request<()>, Status>;

impl AdminApi {
    /// The service over the node core, behind the caller check; `ready` reports readiness
    /// for Health.
    pub fn server(
        core: Arc<NodeCore>,
        ready: Arc<dyn Fn() -> (bool, String) + Send + Sync>,
    ) -> AuthorizedAdmin {
        AdminServer::with_interceptor(Self { core, ready }, authorize as Authorize)
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_entry(
        &self,
        req: Request<CreateEntryRequest>,
    ) -> Result<Response<EntryResponse>, Status> {
        let e = req
            .get_ref()
            .entry
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        // UUIDv7 (RFC 9562): time-ordered, so new IDs land at the end of the state
        // machine's ID index instead of on a random page of it (one dirty page per write
        // rather than one per entry in the batch).
        let rec = self.core.validate_entry(
            e,
            uuid::Uuid::now_v7().to_string(),
            ca_identity::unix_now(),
        )?;
        let r = propose(
            self.core.proposer.as_ref(),
            Command::CreateEntry { entry: rec },
        )
        .await?;
        Ok(Response::new(EntryResponse {
            entry: Some(entry_of(r)?),
        }))
    }

    async fn batch_create_entries(
        &self,
        req: Request<BatchCreateEntriesRequest>,
    ) -> Result<Response<BatchCreateEntriesResponse>, Status> {
        let entries = req.into_inner().entries;
        if entries.len() > MAX_BATCH_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "{} entries in one batch: at most {MAX_BATCH_ENTRIES}; split the batch",
                entries.len()
            )));
        }
        let now = ca_identity::unix_now();
        // Each entry validated on its own; the valid ones proposed together, in order.
        let mut results: Vec<Option<BatchEntryResult>> = Vec::with_capacity(entries.len());
        // Where each valid entry's answer goes, and the entries, in the same order.
        let (mut valid, mut records) = (Vec::new(), Vec::new());
        for (i, e) in entries.iter().enumerate() {
            match self
                .core
                .validate_entry(e, uuid::Uuid::now_v7().to_string(), now)
            {
                Ok(rec) => {
                    results.push(None);
                    valid.push(i);
                    records.push(rec);
                }
                Err(err) => results.push(Some(batch_result(Err(err.into())))),
            }
        }
        let mut records = records.into_iter();
        for chunk in valid.chunks(ENTRIES_PER_PROPOSAL) {
            let commands = records
                .by_ref()
                .take(chunk.len())
                .map(|entry| Command::CreateEntry { entry })
                .collect();
            let answers =
                match propose(self.core.proposer.as_ref(), Command::Batch { commands }).await? {
                    SmResponse::Batch(a) if a.len() == chunk.len() => a,
                    other => {
                        return Err(Error::Internal(format!(
                            "unexpected state machine response to a batch: {other:?}"
                        ))
                        .into())
                    }
                };
            for (i, answer) in chunk.iter().zip(answers) {
                let r = match answer {
                    SmResponse::Rejected { code, message } => {
                        Err(crate::error::from_rejection(code, message).into())
                    }
                    other => entry_of(other).map_err(Status::from),
                };
                results[*i] = Some(batch_result(r));
            }
        }
        Ok(Response::new(BatchCreateEntriesResponse {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| batch_result(Err(Status::internal("no answer")))))
                .collect(),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<EntryResponse>, Status> {
        let e = req
            .get_ref()
            .entry
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        if e.id.is_empty() {
            return Err(Status::invalid_argument(
                "the entry ID is required to update an entry",
            ));
        }
        let rec = self.core.validate_entry(e, e.id.clone(), 0)?;
        let r = propose(
            self.core.proposer.as_ref(),
            Command::UpdateEntry { entry: rec },
        )
        .await?;
        Ok(Response::new(EntryResponse {
            entry: Some(entry_of(r)?),
        }))
    }

    async fn delete_entry(
        &self,
        req: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        propose(
            self.core.proposer.as_ref(),
            Command::DeleteEntry {
                id: req.get_ref().id.clone(),
            },
        )
        .await?;
        Ok(Response::new(DeleteEntryResponse {}))
    }

    async fn get_entry(
        &self,
        req: Request<GetEntryRequest>,
    ) -> Result<Response<EntryResponse>, Status> {
        // Reads answer with what the cluster acknowledged, not what this node applied so far.
        self.core.read_barrier().await?;
        let id = &req.get_ref().id;
        let e = self.core.sm.entry(id).await.map_err(Error::from)?;
        let e = e.ok_or_else(|| Status::not_found(format!("no entry with ID {id}")))?;
        Ok(Response::new(EntryResponse {
            entry: Some(entry_to_proto(&e)),
        }))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        // Reads answer with what the cluster acknowledged, not what this node applied so far.
        self.core.read_barrier().await?;
        let f = req.get_ref();
        let limit = page_size(f.page_size)?;
        let after = page_key(&f.page_token, 2)?.map(|mut k| (k.remove(0), k.remove(0)));
        let entries = self
            .core
            .sm
            .entries_page(&f.spiffe_id, &f.parent_id, after, limit)
            .await
            .map_err(Error::from)?;
        let next_page_token = match entries.last() {
            Some(last) if limit == Some(entries.len()) => page_token(&[&last.spiffe_id, &last.id]),
            _ => String::new(),
        };
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let r = req.get_ref();
        if r.ttl_seconds < 0 {
            return Err(Status::invalid_argument("ttl must be positive"));
        }
        let t = self
            .core
            .create_join_token(&r.spiffe_id, r.ttl_seconds)
            .await?;
        Ok(Response::new(CreateJoinTokenResponse {
            token: t.token,
            expires_at: t.expires_at,
            spiffe_id: t.spiffe_id,
        }))
    }

    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        // Reads answer with what the cluster acknowledged, not what this node applied so far.
        self.core.read_barrier().await?;
        let f = req.get_ref();
        let limit = page_size(f.page_size)?;
        let after = page_key(&f.page_token, 1)?.map(|mut k| k.remove(0));
        let agents = self
            .core
            .sm
            .agents_page(after, limit)
            .await
            .map_err(Error::from)?;
        let next_page_token = match agents.last() {
            Some(last) if limit == Some(agents.len()) => page_token(&[&last.spiffe_id]),
            _ => String::new(),
        };
        Ok(Response::new(ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_agent(
        &self,
        req: Request<GetAgentRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        // Reads answer with what the cluster acknowledged, not what this node applied so far.
        self.core.read_barrier().await?;
        let id = &req.get_ref().spiffe_id;
        let a = self.core.sm.agent(id).await.map_err(Error::from)?;
        let a = a.ok_or_else(|| Status::not_found(format!("no attested agent {id}")))?;
        Ok(Response::new(AgentResponse {
            agent: Some(agent_to_proto(&a)),
        }))
    }

    async fn evict_agent(
        &self,
        req: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        propose(
            self.core.proposer.as_ref(),
            Command::EvictAgent {
                spiffe_id: req.get_ref().spiffe_id.clone(),
            },
        )
        .await?;
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn ban_agent(
        &self,
        req: Request<BanAgentRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        let r = propose(
            self.core.proposer.as_ref(),
            Command::BanAgent {
                spiffe_id: req.get_ref().spiffe_id.clone(),
            },
        )
        .await?;
        match r {
            SmResponse::Agent(a) => Ok(Response::new(AgentResponse {
                agent: Some(agent_to_proto(&a)),
            })),
            other => Err(Error::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        let b = self.core.ca.bundle().map_err(Error::from)?;
        Ok(Response::new(GetBundleResponse {
            spiffe_bundle_json: b.to_spiffe_json().map_err(Error::from)?,
            pem: b.x509_pem(),
            bundle: Some(bundle_to_proto(&b)),
        }))
    }

    async fn get_ca_status(
        &self,
        _req: Request<GetCaStatusRequest>,
    ) -> Result<Response<GetCaStatusResponse>, Status> {
        // Reads answer with what the cluster acknowledged, not what this node applied so far.
        self.core.read_barrier().await?;
        let auths = self.core.sm.authorities().await.map_err(Error::from)?;
        let (counts, silent) = crate::cluster::issued_counts_everywhere(&self.core).await;
        let count_of = |a: &ca_state::AuthorityRecord| -> i64 {
            match counts.get(&a.id) {
                Some(n) => *n as i64,
                None if a.kind != ca_state::AuthorityKind::Root && silent.contains(&a.node_id) => {
                    -1
                }
                None if a.kind == ca_state::AuthorityKind::Root => {
                    // A root signs intermediates only: its valid intermediates.
                    let ski = crate::ca::subject_key_id(&a.cert_der);
                    let t = ca_identity::unix_now();
                    auths
                        .iter()
                        .filter(|i| {
                            i.kind == ca_state::AuthorityKind::Intermediate && i.not_after > t
                        })
                        .filter(|i| {
                            ca_identity::x509::cert_info(&i.cert_der)
                                .ok()
                                .and_then(|c| c.authority_key_id)
                                == ski
                        })
                        .count() as i64
                }
                None => 0,
            }
        };
        Ok(Response::new(GetCaStatusResponse {
            trust_domain: self.core.config.trust_domain.clone(),
            node_id: self.core.config.node_id.clone(),
            authorities: auths
                .iter()
                .map(|a| Authority {
                    id: a.id.clone(),
                    kind: a.kind.as_str().into(),
                    state: a.state.as_str().into(),
                    node_id: a.node_id.clone(),
                    key_id: a.key_id.clone(),
                    not_before: a.not_before,
                    not_after: a.not_after,
                    key_backend: a.key_backend.clone(),
                    approx_valid_svids: count_of(a),
                })
                .collect(),
        }))
    }

    async fn rotate_authority(
        &self,
        req: Request<RotateAuthorityRequest>,
    ) -> Result<Response<RotateAuthorityResponse>, Status> {
        let r = req.into_inner();
        let kind = match ca_state::AuthorityKind::parse(&r.kind) {
            Some(k) => k,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "kind {:?}: use intermediate, jwt or root",
                    r.kind
                ))
                .into())
            }
        };
        self.core.read_barrier().await?;
        let auths = self.core.sm.authorities().await.map_err(Error::from)?;
        let nodes: Vec<String> = if kind == ca_state::AuthorityKind::Root {
            if r.all || !r.node_id.is_empty() {
                return Err(Error::InvalidArgument(
                    "the root belongs to the whole cluster: rotate-root takes no --node or --all"
                        .into(),
                )
                .into());
            }
            vec![String::new()]
        } else if r.all {
            if !r.node_id.is_empty() {
                return Err(
                    Error::InvalidArgument("give either --node or --all, not both".into()).into(),
                );
            }
            let mut ns: Vec<String> = auths
                .iter()
                .filter(|a| a.kind == kind && a.state == ca_state::AuthorityState::Active)
                .map(|a| a.node_id.clone())
                .collect();
            ns.sort();
            ns.dedup();
            ns
        } else if r.node_id.is_empty() {
            vec![self.core.config.node_id.clone()]
        } else {
            let known = auths.iter().any(|a| a.node_id == r.node_id)
                || self
                    .core
                    .raft
                    .status()
                    .members
                    .values()
                    .any(|m| m.node.node_id == r.node_id);
            if !known {
                let mut members: Vec<String> = self
                    .core
                    .raft
                    .status()
                    .members
                    .values()
                    .map(|m| m.node.node_id.clone())
                    .collect();
                members.sort();
                return Err(Error::NotFound(format!(
                    "no node {:?} in this cluster (members: {})",
                    r.node_id,
                    members.join(", ")
                ))
                .into());
            }
            vec![r.node_id.clone()]
        };
        let mut out = Vec::new();
        for n in nodes {
            let q = self
                .core
                .ca
                .request_rotation(kind, &n)
                .await
                .map_err(Error::from)?;
            out.push(RotationRequested {
                kind: q.kind.as_str().into(),
                node_id: q.node_id,
                replaces: q.replaces,
                requested_at: q.requested_at,
            });
        }
        Ok(Response::new(RotateAuthorityResponse {
            requests: out,
            propagation_window: self.core.config.rotation.propagation_window,
        }))
    }

    async fn revoke_authority(
        &self,
        req: Request<RevokeAuthorityRequest>,
    ) -> Result<Response<RevokeAuthorityResponse>, Status> {
        let r = req.into_inner();
        let kind = match ca_state::AuthorityKind::parse(&r.kind) {
            Some(k @ (ca_state::AuthorityKind::Intermediate | ca_state::AuthorityKind::Jwt)) => k,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "kind {:?}: only intermediate and jwt authorities can be revoked",
                    r.kind
                ))
                .into())
            }
        };
        if r.id.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "give the ID of the authority to revoke (see `ca-node ca show`)".into(),
            )
            .into());
        }
        self.core.read_barrier().await?;
        let a = self
            .core
            .ca
            .revoke(r.id.trim(), kind)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(RevokeAuthorityResponse {
            authority: Some(Authority {
                id: a.id.clone(),
                kind: a.kind.as_str().into(),
                state: a.state.as_str().into(),
                node_id: a.node_id.clone(),
                key_id: a.key_id.clone(),
                not_before: a.not_before,
                not_after: a.not_after,
                key_backend: a.key_backend.clone(),
                approx_valid_svids: -1,
            }),
        }))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let (ready, detail) = (self.ready)();
        Ok(Response::new(HealthResponse { ready, detail }))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let st = self.core.raft.status();
        let members = st
            .members
            .iter()
            .map(|(id, m)| {
                let rep = st.replication.get(id);
                ClusterMember {
                    raft_id: *id,
                    node_id: m.node.node_id.clone(),
                    addr: m.node.addr.clone(),
                    voter: m.voter,
                    matched_index: rep.and_then(|r| r.matched).map(|l| l.index).unwrap_or(0),
                    lag: rep.map(|r| r.lag).unwrap_or(0),
                    has_replication: rep.is_some(),
                }
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            raft_id: st.id,
            node_id: self.core.config.node_id.clone(),
            role: st.role.as_str().into(),
            leader_id: st.leader.unwrap_or(0),
            term: st.term,
            last_log_index: st.last_log_index.unwrap_or(0),
            last_applied_index: st.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: st.snapshot.map(|l| l.index).unwrap_or(0),
            members,
            joint: st.joint,
            millis_since_quorum_ack: st.millis_since_quorum_ack.map(|m| m as i64).unwrap_or(-1),
        }))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let r = req.into_inner();
        if r.raft_id == 0 || !crate::config::valid_node_id(&r.node_id) {
            return Err(Status::invalid_argument(
                "add needs --raft-id (positive), --node-id (a-z 0-9 -) and --addr host:port",
            ));
        }
        if !r
            .addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        {
            return Err(Status::invalid_argument(format!(
                "addr {:?}: use host:port",
                r.addr
            )));
        }
        if let Some((id, m)) = self
            .core
            .raft
            .status()
            .members
            .into_iter()
            .find(|(id, m)| *id == r.raft_id || m.node.node_id == r.node_id)
        {
            return Err(Status::already_exists(format!(
                "raft id {id} (node {}) is a member already",
                m.node.node_id
            )));
        }
        let log = self
            .core
            .raft
            .add_learner(
                r.raft_id,
                ca_raft::NodeInfo {
                    addr: r.addr,
                    node_id: r.node_id,
                },
                false,
            )
            .await
            .map_err(Error::from)?;
        Ok(Response::new(MembershipResponse {
            log_index: log.index,
        }))
    }

    async fn promote_member(
        &self,
        req: Request<PromoteMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let id = req.get_ref().raft_id;
        match self.core.raft.status().members.get(&id) {
            None => {
                return Err(Status::not_found(format!(
                    "raft id {id} is not a member; add it first"
                )))
            }
            Some(m) if m.voter => {
                return Err(Status::already_exists(format!(
                    "raft id {id} is a voter already"
                )))
            }
            Some(_) => {}
        }
        let log = self.core.raft.promote(id).await.map_err(Error::from)?;
        Ok(Response::new(MembershipResponse {
            log_index: log.index,
        }))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let id = req.get_ref().raft_id;
        let log_index = crate::cluster::remove_member(&self.core, id).await?;
        Ok(Response::new(MembershipResponse { log_index }))
    }

    type SaveSnapshotStream =
        Pin<Box<dyn futures::Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

    async fn save_snapshot(
        &self,
        req: Request<SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        if !req.get_ref().allow_stale {
            // The copy holds at least everything acknowledged before the call.
            self.core.read_barrier().await?;
        }
        // Applied writes still in the state store's open transaction go into the copy.
        self.core.sm.commit_applied().await.map_err(Error::from)?;
        let dir = &self.core.config.data_dir;
        let tmp = dir.join(format!("backup-{}.db", uuid::Uuid::new_v4().simple()));
        crate::backup::save_copy(&dir.join(ca_raft::STATE_DB_FILE), &tmp).await?;
        let read = async {
            let applied = crate::backup::applied_index(&tmp).await?;
            let data = tokio::fs::read(&tmp)
                .await
                .map_err(|e| Error::Internal(format!("reading {}: {e}", tmp.display())))?;
            Ok::<_, Error>((applied, data))
        }
        .await;
        let _ = std::fs::remove_file(&tmp);
        let (applied, data) = read?;
        let chunks: Vec<Result<SnapshotChunk, Status>> = data
            .chunks(1024 * 1024)
            .enumerate()
            .map(|(i, c)| {
                Ok(SnapshotChunk {
                    data: c.to_vec(),
                    applied_index: if i == 0 { applied } else { 0 },
                })
            })
            .collect();
        tracing::info!(bytes = data.len(), applied, "state backup taken");
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
