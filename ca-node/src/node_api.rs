//! The node API served to agents over TLS: attestation (join token, x509pop), agent SVID
//! renewal, authorized entry sync, batch X.509-SVID signing, JWT-SVID minting, bundle.

use std::pin::Pin;
use std::sync::Arc;

use ca_identity::rate_limit::{refusal, RateLimiter};
use ca_identity::SpiffeId;
use ca_proto::node::node_server::Node;
use ca_proto::node::*;
use ca_state::{AgentRecord, Command, EntryRecord, SelectorRecord};
use futures::Stream;
use rcgen::CertificateSigningRequestParams;
use tokio_stream::StreamExt;

/// An authenticated agent calling the node API.
struct Caller {
    /// Its record.
    agent: AgentRecord,
    /// Serial (hex) of the SVID it presented.
    serial: String,
    /// When that SVID expires, Unix seconds.
    not_after: i64,
}
use tonic::{Request, Response, Status, Streaming};

use crate::config::MAX_BATCH_CSRS;
use crate::convert::{bundle_to_proto, entry_to_proto};
use crate::core::{propose, NodeCore};
use crate::Error;

/// CSRs of one `BatchNewX509Svid` call minted at the same time, at most: how many of its
/// key-manager signatures can be in flight together. A PKCS#11 manager's session pool caps
/// them further; the bound keeps one big batch (agents send up to 100) from flooding a KMS.
pub const BATCH_MINT_CONCURRENCY: usize = 32;

/// The node API service.
#[derive(Clone, Debug)]
pub struct NodeApi {
    core: Arc<NodeCore>,
    limits: Arc<Limits>,
}

/// The node API's rate limits (`[limits]` in the config).
#[derive(Debug)]
struct Limits {
    /// Attestations per source IP address.
    attestation: RateLimiter<std::net::IpAddr>,
    /// Signatures per agent SPIFFE ID.
    signing: RateLimiter<String>,
}

/// How long an attesting agent has to send its parameters, and to answer the x509pop
/// challenge.
const CHALLENGE_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Callers remembered per rate limit (about 100 bytes each).
const RATE_LIMIT_KEYS: usize = 65_536;

impl NodeApi {
    /// A service over the node core.
    pub fn new(core: Arc<NodeCore>) -> Self {
        let l = &core.config.limits;
        let limits = Arc::new(Limits {
            attestation: RateLimiter::new(l.attestation_rate(), RATE_LIMIT_KEYS),
            signing: RateLimiter::new(l.signing_rate(), RATE_LIMIT_KEYS),
        });
        Self { core, limits }
    }

    /// Takes `cost` signatures from `agent`'s signing budget.
    fn spend_signing(&self, agent: &str, cost: usize) -> Result<(), Error> {
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let who = format!("agent {agent}");
        self.spend(
            &self.limits.signing,
            &agent.to_owned(),
            cost,
            "signing",
            "signatures",
            &who,
        )
    }

    /// Takes `cost` from `key`'s bucket, or refuses: counted in
    /// `ca_node_api_rate_limited_total{limit=label}`, logged (at most once a second per
    /// limit) and answered with the time to retry.
    fn spend<K: Eq + std::hash::Hash + Clone>(
        &self,
        limiter: &RateLimiter<K>,
        key: &K,
        cost: u32,
        label: &'static str,
        what: &str,
        who: &str,
    ) -> Result<(), Error> {
        limiter.check(key, cost).map_err(|wait| {
            self.core
                .metrics
                .rate_limited
                .with_label_values(&[label])
                .inc();
            if limiter.log_refusal() {
                tracing::warn!(
                    limit = label,
                    caller = who,
                    cost,
                    "rate limit reached: refusing (logged at most once a second)"
                );
            }
            Error::ResourceExhausted(refusal(what, limiter.rate(), who, wait))
        })
    }

    /// The attested, unbanned agent calling with its SVID as client certificate.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Error> {
        let certs = crate::raft_tls::peer_certs(req.extensions()).ok_or_else(|| {
            Error::Unauthenticated(
                "this call needs the agent's X.509-SVID as TLS client certificate; attest first"
                    .into(),
            )
        })?;
        let id = ca_identity::tls::peer_id(&certs).ok_or_else(|| {
            Error::Unauthenticated("the client certificate has no SPIFFE ID".into())
        })?;
        if crate::config::is_reserved_path(&id) {
            return Err(Error::PermissionDenied(format!(
                "{id} is a ca-node identity; the node API serves agents only"
            )));
        }
        let info = certs
            .first()
            .and_then(|c| ca_identity::x509::cert_info(c.as_ref()).ok());
        let not_after = info.as_ref().map(|i| i.not_after).unwrap_or_default();
        let serial = info.map(|i| i.serial_hex).unwrap_or_default();
        let agent = self.core.agent_in_standing(id.as_str(), &serial).await?;
        Ok(Caller {
            agent,
            serial,
            not_after,
        })
    }

    fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, Error> {
        if csr.is_empty() {
            return Err(Error::InvalidArgument("the CSR is empty".into()));
        }
        // The key is checked first, so a weak or unsupported key is named as such rather
        // than reported as a bad signature (ring refuses to verify with small RSA keys).
        use x509_parser::prelude::FromDer;
        if let Ok((_, req)) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        {
            let spki = req.certification_request_info.subject_pki.raw;
            match ca_identity::pubkey::parse_spki(spki) {
                Ok(info) => {
                    if let ca_identity::pubkey::KeyKind::Rsa { bits } = info.kind {
                        if bits < 2048 {
                            return Err(Error::InvalidArgument(format!(
                                "the CSR has an RSA key of {bits} bits; use at least 2048 (or P-256)"
                            )));
                        }
                    }
                }
                Err(e) => return Err(Error::InvalidArgument(format!("CSR key: {e}"))),
            }
        }
        CertificateSigningRequestParams::from_der(&csr.to_vec().into()).map_err(|e| {
            Error::InvalidArgument(format!(
                "the CSR is not a valid, correctly signed PKCS#10 request: {e}"
            ))
        })
    }

    async fn mint_agent_svid(
        &self,
        id: &SpiffeId,
        csr: &CertificateSigningRequestParams,
    ) -> Result<(Vec<Vec<u8>>, String, i64), Error> {
        if crate::config::is_reserved_path(id) {
            return Err(Error::PermissionDenied(format!(
                "{id}: the /ca-node/ path is reserved for ca-nodes; no agent SVID carries it"
            )));
        }
        let chain = self
            .core
            .ca
            .mint_x509_svid(id, &csr.public_key, self.core.config.ttl.agent_svid, &[])
            .await?;
        let info = ca_identity::x509::cert_info(&chain[0])?;
        Ok((chain, info.serial_hex, info.not_after))
    }

    async fn attest_join_token(
        &self,
        params: &AttestParams,
        token: &str,
    ) -> Result<AttestResult, Error> {
        let csr = Self::parse_csr(&params.csr)?;
        let rec = self.core.sm.join_token(token).await?.ok_or_else(|| {
            Error::PermissionDenied(
                "unknown join token; generate one with `ca-node token generate`".into(),
            )
        })?;
        if ca_state::is_ca_node_id(&rec.spiffe_id) {
            // Not consumed: the token stays usable by the ca-node it was made for.
            return Err(Error::PermissionDenied(format!(
                "this join token is for a ca-node ({}); it is redeemed only by `ca-node join`, never by an agent",
                rec.spiffe_id
            )));
        }
        let id = SpiffeId::parse(&rec.spiffe_id)?;
        let (chain, serial, expires) = self.mint_agent_svid(&id, &csr).await?;
        let now = ca_identity::unix_now();
        let agent = AgentRecord {
            spiffe_id: id.to_string(),
            attestation_type: "join_token".into(),
            x509_svid_serial: serial,
            x509_svid_expires_at: expires,
            previous_x509_svid_serial: String::new(),
            banned: false,
            attested_at: now,
            selectors: vec![],
        };
        // Consumption is decided by the state machine, atomically, in log order.
        propose(
            self.core.proposer.as_ref(),
            Command::AttestWithJoinToken {
                token: token.to_owned(),
                now,
                agent,
            },
        )
        .await
        .map_err(|e| match e {
            Error::FailedPrecondition(m) | Error::NotFound(m) => Error::PermissionDenied(m),
            other => other,
        })?;
        Ok(AttestResult {
            spiffe_id: id.to_string(),
            svid_chain: chain,
            bundle: Some(bundle_to_proto(self.core.ca.bundle()?.as_ref())),
        })
    }

    /// Mints the SVID of one `BatchNewX509Svid` item for `agent`, whose authorized entries
    /// are `entries`: the result carries the chain or this item's error.
    /// Entry `entry_id`, if `agent` is authorized for it (from the entry index).
    fn authorized_entry(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
    ) -> Result<std::sync::Arc<EntryRecord>, Error> {
        self.core
            .sm
            .entries_index(|i| i.authorized_entry(&agent.spiffe_id, entry_id))
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "entry {entry_id:?} does not exist or is not authorized for agent {}",
                    agent.spiffe_id
                ))
            })
    }

    async fn mint_batch_item(
        &self,
        agent: &AgentRecord,
        p: &NewX509SvidParams,
    ) -> NewX509SvidResult {
        let start = std::time::Instant::now();
        let r: Result<Vec<Vec<u8>>, Error> = async {
            let entry = self.authorized_entry(agent, &p.entry_id)?;
            let csr = Self::parse_csr(&p.csr)?;
            let id = SpiffeId::parse(&entry.spiffe_id)?;
            let ttl = if entry.x509_svid_ttl > 0 {
                entry.x509_svid_ttl
            } else {
                self.core.config.ttl.x509_svid
            };
            self.core
                .ca
                .mint_x509_svid(&id, &csr.public_key, ttl, &entry.dns_names)
                .await
                .map_err(Error::from)
        }
        .await;
        self.core
            .metrics
            .x509_svid_seconds
            .with_label_values(&["workload"])
            .observe(start.elapsed().as_secs_f64());
        self.core
            .metrics
            .x509_svids
            .with_label_values(&[if r.is_ok() { "ok" } else { "error" }])
            .inc();
        match r {
            Ok(chain) => NewX509SvidResult {
                entry_id: p.entry_id.clone(),
                svid_chain: chain,
                error: String::new(),
            },
            Err(e) => NewX509SvidResult {
                entry_id: p.entry_id.clone(),
                svid_chain: vec![],
                error: e.to_string(),
            },
        }
    }

    fn verify_x509pop_chain(&self, chain: &[Vec<u8>]) -> Result<(), Error> {
        let path = self.core.config.x509pop_ca_bundle.as_ref().ok_or_else(|| {
            Error::PermissionDenied(
                "x509pop attestation is not enabled on this node (no x509pop_ca_bundle configured)"
                    .into(),
            )
        })?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Internal(format!("x509pop_ca_bundle: {e}")))?;
        let roots = ca_identity::bundle::certs_from_pem(&text)?;
        let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
            roots.into_iter().map(Into::into).collect();
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let leaf: rustls_pki_types::CertificateDer<'_> = chain[0].clone().into();
        let inter: Vec<rustls_pki_types::CertificateDer<'_>> =
            chain[1..].iter().cloned().map(Into::into).collect();
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| Error::InvalidArgument(format!("x509pop certificate: {e}")))?;
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &inter,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            Error::PermissionDenied(format!(
                "x509pop certificate does not chain to a provisioning CA: {e}"
            ))
        })?;
        Ok(())
    }
}

type AttestStream = Pin<Box<dyn Stream<Item = Result<AttestAgentResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEntriesResponse, Status>> + Send>>;

fn count<T>(core: &NodeCore, method: &str, r: &Result<T, Error>) {
    let code = match r {
        Ok(_) => "ok",
        Err(e) => e.code_name(),
    };
    core.metrics
        .node_api_requests
        .with_label_values(&[method, code])
        .inc();
}

#[tonic::async_trait]
impl Node for NodeApi {
    type AttestAgentStream = AttestStream;
    type WatchEntriesStream = WatchStream;

    async fn attest_agent(
        &self,
        req: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let source = crate::raft_tls::remote_addr(req.extensions())
            .map(|a| a.ip())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let who = format!("address {source}");
        self.spend(
            &self.limits.attestation,
            &source,
            1,
            "attestation",
            "attestations",
            &who,
        )?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(CHALLENGE_RESPONSE_TIMEOUT, inbound.next())
            .await
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "no attestation parameters within {}s",
                    CHALLENGE_RESPONSE_TIMEOUT.as_secs()
                ))
            })?
            .ok_or_else(|| {
                Status::invalid_argument("the stream closed before the attestation parameters")
            })??;
        let Some(attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first message must carry the attestation parameters",
            ));
        };
        let this = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let result: Result<AttestResult, Error> = async {
                match &params.data {
                    Some(attest_params::Data::JoinToken(token)) => {
                        let r = this.attest_join_token(&params, token).await;
                        this.core.metrics.attestations.with_label_values(&["join_token", if r.is_ok() { "ok" } else { "error" }]).inc();
                        r
                    }
                    Some(attest_params::Data::X509pop(chain)) => {
                        let r = async {
                            if chain.certificates.is_empty() {
                                return Err(Error::InvalidArgument("x509pop: no certificates".into()));
                            }
                            let csr = Self::parse_csr(&params.csr)?;
                            this.verify_x509pop_chain(&chain.certificates)?;
                            let challenge: [u8; 32] = rand::random();
                            tx.send(Ok(AttestAgentResponse { step: Some(attest_agent_response::Step::Challenge(challenge.to_vec())) }))
                                .await
                                .map_err(|_| Error::InvalidArgument("the agent went away".into()))?;
                            let resp = tokio::time::timeout(CHALLENGE_RESPONSE_TIMEOUT, inbound.next())
                                .await
                                .map_err(|_| Error::InvalidArgument(format!("x509pop: no challenge response within {}s", CHALLENGE_RESPONSE_TIMEOUT.as_secs())))?
                                .ok_or_else(|| Error::InvalidArgument("x509pop: no challenge response".into()))?
                                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                            let Some(attest_agent_request::Step::ChallengeResponse(sig)) = resp.step else {
                                return Err(Error::InvalidArgument("x509pop: expected the challenge response".into()));
                            };
                            let leaf = ca_identity::x509::cert_info(&chain.certificates[0])?;
                            ca_identity::pubkey::verify_x509_signature(&leaf.spki_der, &challenge, &sig)
                                .map_err(|_| Error::PermissionDenied("x509pop: the challenge signature does not verify with the certificate's key".into()))?;
                            let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, &chain.certificates[0]));
                            let id = this.core.config.trust_domain().id_with_path(&format!("/agent/x509pop/{fp}"))?;
                            let (svid, serial, expires) = this.mint_agent_svid(&id, &csr).await?;
                            let agent = AgentRecord {
                                spiffe_id: id.to_string(),
                                attestation_type: "x509pop".into(),
                                x509_svid_serial: serial,
                                x509_svid_expires_at: expires,
                                previous_x509_svid_serial: String::new(),
                                banned: false,
                                attested_at: ca_identity::unix_now(),
                                selectors: vec![SelectorRecord { kind: "x509pop".into(), value: format!("fingerprint:{fp}") }],
                            };
                            propose(this.core.proposer.as_ref(), Command::RegisterAgent { agent }).await?;
                            Ok(AttestResult { spiffe_id: id.to_string(), svid_chain: svid, bundle: Some(bundle_to_proto(this.core.ca.bundle()?.as_ref())) })
                        }
                        .await;
                        this.core.metrics.attestations.with_label_values(&["x509pop", if r.is_ok() { "ok" } else { "error" }]).inc();
                        r
                    }
                    None => Err(Error::InvalidArgument("no attestation data: send a join_token or an x509pop certificate chain".into())),
                }
            }
            .await;
            count(&this.core, "AttestAgent", &result);
            match result {
                Ok(r) => {
                    tracing::info!(agent = %r.spiffe_id, %source, "agent attested");
                    let _ = tx
                        .send(Ok(AttestAgentResponse {
                            step: Some(attest_agent_response::Step::Result(r)),
                        }))
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, %source, "agent attestation refused");
                    let _ = tx.send(Err(e.into())).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let r = async {
            let Caller {
                agent,
                serial: caller_serial,
                ..
            } = self.caller(&req).await?;
            self.spend_signing(&agent.spiffe_id, 1)?;
            let csr = Self::parse_csr(&req.get_ref().csr)?;
            let id = SpiffeId::parse(&agent.spiffe_id)?;
            let (chain, serial, expires_at) = self.mint_agent_svid(&id, &csr).await?;
            propose(
                self.core.proposer.as_ref(),
                Command::RenewAgent {
                    spiffe_id: agent.spiffe_id,
                    serial,
                    expires_at,
                    caller_serial,
                },
            )
            .await?;
            Ok(RenewAgentResponse { svid_chain: chain })
        }
        .await;
        count(&self.core, "RenewAgent", &r);
        Ok(Response::new(r?))
    }

    async fn sync_entries(
        &self,
        req: Request<SyncEntriesRequest>,
    ) -> Result<Response<SyncEntriesResponse>, Status> {
        let start = std::time::Instant::now();
        let r = async {
            let agent = self.caller(&req).await?.agent;
            let entries = self.core.sm.authorized(&agent.spiffe_id);
            let tainted = self.core.ca.tainted();
            Ok(SyncEntriesResponse {
                entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
                bundle: Some(bundle_to_proto(self.core.ca.bundle()?.as_ref())),
                tainted_x509_authority_key_ids: tainted.x509_authority_key_ids,
                tainted_jwt_key_ids: tainted.jwt_key_ids,
            })
        }
        .await;
        self.core
            .metrics
            .sync_seconds
            .observe(start.elapsed().as_secs_f64());
        count(&self.core, "SyncEntries", &r);
        Ok(Response::new(r?))
    }

    async fn watch_entries(
        &self,
        req: Request<WatchEntriesRequest>,
    ) -> Result<Response<Self::WatchEntriesStream>, Status> {
        let r = async {
            let caller = self.caller(&req).await?;
            let registration = crate::entry_watch::register(&self.core, &caller.agent.spiffe_id)?;
            Ok((caller, registration))
        }
        .await;
        count(&self.core, "WatchEntries", &r);
        let (caller, registration) = r?;
        let watcher = crate::entry_watch::Watcher {
            agent: caller.agent.spiffe_id,
            serial: caller.serial,
            not_after: caller.not_after,
            revision: req.get_ref().revision,
        };
        // A few messages of slack: a stream whose agent does not read holds one chunk, not
        // the whole set.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(crate::entry_watch::serve(
            self.core.clone(),
            watcher,
            registration,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn batch_new_x509_svid(
        &self,
        req: Request<BatchNewX509SvidRequest>,
    ) -> Result<Response<BatchNewX509SvidResponse>, Status> {
        let n = req.get_ref().params.len();
        let checked = async {
            if n > MAX_BATCH_CSRS {
                return Err(Error::InvalidArgument(format!(
                    "{n} CSRs in one BatchNewX509Svid; send at most {MAX_BATCH_CSRS} per call"
                )));
            }
            let agent = self.caller(&req).await?.agent;
            // Refused as a whole (UNAVAILABLE: the agent asks another node) rather than CSR
            // by CSR, while this node has no intermediate to sign with: after its own was
            // revoked, until its replacement is active.
            if self.core.ca.intermediate().is_none() {
                return Err(Error::Unavailable(
                    "this node has no active intermediate CA right now (it is starting, or replacing a revoked one); ask another node".into(),
                ));
            }
            self.spend_signing(&agent.spiffe_id, n)?;
            Ok(agent)
        }
        .await;
        count(&self.core, "BatchNewX509Svid", &checked);
        let agent = checked?;
        // The CSRs are minted concurrently, up to BATCH_MINT_CONCURRENCY at a time, so that a
        // key manager with a round trip per signature (KMS, a network HSM, a PKCS#11 session
        // pool) has this call's signatures in flight together instead of one after another.
        // `buffered` keeps the results in request order; each CSR fails on its own.
        let mut mints = Vec::with_capacity(req.get_ref().params.len());
        for p in &req.get_ref().params {
            mints.push(self.mint_batch_item(&agent, p));
        }
        let results: Vec<NewX509SvidResult> =
            futures::StreamExt::buffered(futures::stream::iter(mints), BATCH_MINT_CONCURRENCY)
                .collect()
                .await;
        Ok(Response::new(BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        req: Request<NewJwtSvidRequest>,
    ) -> Result<Response<NewJwtSvidResponse>, Status> {
        let r = async {
            let agent = self.caller(&req).await?.agent;
            self.spend_signing(&agent.spiffe_id, 1)?;
            let p = req.get_ref();
            ca_identity::jwt::check_audience(&p.audience)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let entry = self.authorized_entry(&agent, &p.entry_id)?;
            let ttl = if entry.jwt_svid_ttl > 0 {
                entry.jwt_svid_ttl
            } else {
                self.core.config.ttl.jwt_svid
            };
            let (token, expires_at) = self
                .core
                .ca
                .mint_jwt_svid(&SpiffeId::parse(&entry.spiffe_id)?, &p.audience, ttl)
                .await?;
            Ok::<_, Error>(NewJwtSvidResponse { token, expires_at })
        }
        .await;
        self.core
            .metrics
            .jwt_svids
            .with_label_values(&[if r.is_ok() { "ok" } else { "error" }])
            .inc();
        count(&self.core, "NewJwtSvid", &r);
        Ok(Response::new(r?))
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        let r = self.core.ca.bundle().map_err(Error::from);
        count(&self.core, "GetBundle", &r);
        Ok(Response::new(GetBundleResponse {
            bundle: Some(bundle_to_proto(r?.as_ref())),
        }))
    }
}

/// Fuzz target for the CSRs agents send (see `ca_identity`'s fuzz module for how it runs).
#[cfg(test)]
mod fuzz {
    use ca_test_support::fuzz::mutate;
    use rcgen::PublicKeyData;

    use super::NodeApi;

    #[test]
    fn fuzz_csrs() {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        NodeApi::parse_csr(&csr).expect("the seed is a valid CSR");
        let seed_key = key.der_bytes().to_vec();
        bolero::check!().for_each(|ops: &[u8]| {
            for der in [mutate(&csr, ops), ops.to_vec()] {
                if let Ok(p) = NodeApi::parse_csr(&der) {
                    // Accepted means correctly signed: the key is the seed's.
                    assert_eq!(p.public_key.der_bytes(), seed_key);
                }
            }
        });
    }

    /// Fuzz target: request messages of the node API and the Workload API as they arrive
    /// (protobuf bytes), decoded and put through the checks that need no node: the CSRs,
    /// audiences, SPIFFE IDs and tokens they carry.
    #[test]
    fn fuzz_request_messages() {
        use ca_proto::node::{
            attest_agent_request, AttestAgentRequest, BatchNewX509SvidRequest, NewJwtSvidRequest,
            RenewAgentRequest,
        };
        use ca_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};
        use prost::Message;
        bolero::check!().for_each(|b: &[u8]| {
            if let Ok(m) = AttestAgentRequest::decode(b) {
                if let Some(attest_agent_request::Step::Params(p)) = m.step {
                    let _ = NodeApi::parse_csr(&p.csr);
                }
            }
            if let Ok(m) = RenewAgentRequest::decode(b) {
                let _ = NodeApi::parse_csr(&m.csr);
            }
            if let Ok(m) = BatchNewX509SvidRequest::decode(b) {
                for p in m.params {
                    let _ = NodeApi::parse_csr(&p.csr);
                }
            }
            if let Ok(m) = NewJwtSvidRequest::decode(b) {
                let _ = ca_identity::jwt::check_audience(&m.audience);
            }
            if let Ok(m) = JwtsvidRequest::decode(b) {
                let _ = ca_identity::jwt::check_audience(&m.audience);
                let _ = ca_identity::SpiffeId::parse(&m.spiffe_id);
            }
            if let Ok(m) = ValidateJwtsvidRequest::decode(b) {
                let _ = ca_identity::jwt::decode_unverified(&m.svid);
            }
        });
    }
}
