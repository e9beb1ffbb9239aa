//! The load: one agent attested with a join token over the node API, entries parented to
//! it registered through the admin API, and `BatchNewX509Svid` calls driven by concurrent
//! workers over mTLS with the agent's SVID, exactly as agents call the node.
//!
//! CSRs (fresh P-256 keys) and the request messages are made before any measurement, so
//! the load process spends its CPU on transport only. Every result is checked (no error,
//! the entry asked for, a chain); a sample of the certificates is verified in full: X.509-SVID
//! rules, the SPIFFE ID of the entry, the CSR's public key, and a path to the bundle's roots.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ca_agent::config::AttestationMethod;
use ca_agent::node_client::NodeClient;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::TrustDomain;
use ca_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest};
use ca_proto::node::{BatchNewX509SvidRequest, NewX509SvidParams};
use ca_proto::types::{Entry, Selector};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::node::{NodeProcess, TRUST_DOMAIN};

/// A registered entry the load asks SVIDs for.
#[derive(Clone, Debug)]
pub struct EntryRef {
    /// Entry ID.
    pub id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
}

/// An attested agent, its entries and its connections to the node.
#[derive(Debug)]
pub struct Target {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// Entries parented to the agent.
    pub entries: Vec<EntryRef>,
    /// The bundle's X.509 roots as trust anchors.
    pub anchors: Vec<TrustAnchor<'static>>,
    /// One client per TLS connection, all presenting the agent's SVID.
    pub clients: Vec<Arc<NodeClient>>,
}

/// Attests an agent with a fresh join token (trusting the bundle read from the admin
/// socket, not blindly), registers `entries` entries under it, and opens `connections`
/// node API clients with its SVID.
pub async fn prepare(
    node: &NodeProcess,
    entries: usize,
    connections: usize,
) -> anyhow::Result<Target> {
    let mut admin = node.admin().await?;
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .context("admin GetBundle")?
        .into_inner()
        .bundle
        .context("the node returned no bundle")?;
    let roots = bundle.x509_authorities;
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            spiffe_id: String::new(),
            ttl_seconds: 600,
        })
        .await
        .context("admin CreateJoinToken")?
        .into_inner();
    let td = TrustDomain::new(TRUST_DOMAIN).map_err(|e| anyhow!("{e}"))?;
    let live = LiveRoots::new(roots.clone());
    let svid = SvidResolver::default();
    let addrs = vec![node.node_addr.to_string()];
    let attester = NodeClient::new(addrs.clone(), td.clone(), live.clone(), svid.clone());
    let (agent_svid, _) =
        ca_agent::attest::attest(&attester, &AttestationMethod::JoinToken(token.token), false)
            .await
            .map_err(|e| anyhow!("agent attestation over the node API: {e}"))?;
    svid.set(&agent_svid.chain, &agent_svid.key_pkcs8)
        .map_err(|e| anyhow!("installing the agent SVID: {e}"))?;
    let agent_id = agent_svid.spiffe_id.to_string();

    let mut refs = Vec::with_capacity(entries);
    for i in 0..entries {
        let e = admin
            .create_entry(CreateEntryRequest {
                entry: Some(Entry {
                    spiffe_id: format!("spiffe://{TRUST_DOMAIN}/bench/workload-{i}"),
                    parent_id: agent_id.clone(),
                    selectors: vec![Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{}", 10_000 + i),
                    }],
                    ..Default::default()
                }),
            })
            .await
            .context("admin CreateEntry")?
            .into_inner()
            .entry
            .context("CreateEntry returned no entry")?;
        refs.push(EntryRef {
            id: e.id,
            spiffe_id: e.spiffe_id,
        });
    }

    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| anyhow!("bundle root: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let clients = (0..connections.max(1))
        .map(|_| {
            Arc::new(NodeClient::new(
                addrs.clone(),
                td.clone(),
                live.clone(),
                svid.clone(),
            ))
        })
        .collect();
    Ok(Target {
        agent_id,
        entries: refs,
        anchors,
        clients,
    })
}

/// Pre-generated CSRs: DER PKCS#10 and the SPKI DER of each key.
#[derive(Debug)]
pub struct CsrPool {
    /// DER CSRs.
    pub csrs: Vec<Vec<u8>>,
    /// SubjectPublicKeyInfo DER of each CSR's key.
    pub spkis: Vec<Vec<u8>>,
}

impl CsrPool {
    /// `n` CSRs, each for a fresh P-256 key (as the agent makes them).
    pub fn generate(n: usize) -> anyhow::Result<Self> {
        let mut csrs = Vec::with_capacity(n);
        let mut spkis = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let (csr, key) =
                ca_agent::attest::new_key_and_csr().map_err(|e| anyhow!("making a CSR: {e}"))?;
            csrs.push(csr);
            spkis.push(rcgen::PublicKeyData::subject_public_key_info(&key));
        }
        Ok(Self { csrs, spkis })
    }
}

/// A prepared request and, per CSR in it, (entry index, CSR index).
#[derive(Debug)]
struct Prepared {
    req: BatchNewX509SvidRequest,
    slots: Vec<(usize, usize)>,
}

/// When a phase ends.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// After this long (no new request starts later; in-flight ones finish).
    Time(Duration),
    /// After this many SVIDs were asked for (rounded up to whole batches).
    Count(u64),
}

/// What one phase did.
#[derive(Debug, Default)]
pub struct PhaseResult {
    /// Batch requests completed.
    pub requests: u64,
    /// SVIDs issued and checked.
    pub issued: u64,
    /// Failed calls and failed results (each CSR of a failed call counts).
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Certificates verified in full.
    pub verified: u64,
    /// Latency of each batch call, µs.
    pub latencies_us: Vec<f64>,
    /// Wall time from the first request to the last answer.
    pub wall: Duration,
    /// One issued leaf certificate (DER), for the baseline's message size.
    pub sample_leaf: Option<Vec<u8>>,
}

/// The load generator over a [`Target`].
#[derive(Debug)]
pub struct Load {
    target: Arc<Target>,
    pool: Arc<CsrPool>,
    requests: Arc<Vec<Prepared>>,
    batch: usize,
    concurrency: usize,
    verify_every: u64,
}

impl Load {
    /// Prepares the request messages: batches of `batch` CSRs cycling through the entries
    /// and the CSR pool; `concurrency` requests in flight; one certificate in
    /// `verify_every` verified in full (0: none).
    pub fn new(
        target: Target,
        pool: CsrPool,
        batch: usize,
        concurrency: usize,
        verify_every: u64,
    ) -> anyhow::Result<Self> {
        if target.entries.is_empty() || batch == 0 || concurrency == 0 {
            bail!("entries, batch and concurrency must be at least 1");
        }
        let slots_total = pool.csrs.len().max(target.entries.len()).max(batch);
        let n_requests = slots_total.div_ceil(batch);
        let mut requests = Vec::with_capacity(n_requests);
        for r in 0..n_requests {
            let slots: Vec<(usize, usize)> = (0..batch)
                .map(|k| {
                    let s = r * batch + k;
                    (s % target.entries.len(), s % pool.csrs.len())
                })
                .collect();
            let params = slots
                .iter()
                .map(|(e, c)| NewX509SvidParams {
                    entry_id: target.entries[*e].id.clone(),
                    csr: pool.csrs[*c].clone(),
                })
                .collect();
            requests.push(Prepared {
                req: BatchNewX509SvidRequest { params },
                slots,
            });
        }
        Ok(Self {
            target: Arc::new(target),
            pool: Arc::new(pool),
            requests: Arc::new(requests),
            batch,
            concurrency,
            verify_every,
        })
    }

    /// SVIDs per request.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Runs one phase until `limit`; returns once every request has been answered.
    pub async fn run(&self, limit: Limit) -> PhaseResult {
        let shared = Arc::new(Shared {
            next: AtomicUsize::new(0),
            claimed: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            serials: Mutex::new(HashSet::new()),
        });
        let start = Instant::now();
        let deadline = match limit {
            Limit::Time(d) => Some(start + d),
            Limit::Count(_) => None,
        };
        let count = match limit {
            Limit::Count(n) => Some(n),
            Limit::Time(_) => None,
        };
        let mut tasks = Vec::with_capacity(self.concurrency);
        for w in 0..self.concurrency {
            let worker = Worker {
                id: w,
                target: self.target.clone(),
                pool: self.pool.clone(),
                requests: self.requests.clone(),
                shared: shared.clone(),
                batch: self.batch as u64,
                verify_every: self.verify_every,
                deadline,
                count,
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        let mut total = PhaseResult::default();
        for t in tasks {
            match t.await {
                Ok(r) => {
                    total.requests += r.requests;
                    total.issued += r.issued;
                    total.errors += r.errors;
                    total.verified += r.verified;
                    total.latencies_us.extend(r.latencies_us);
                    for e in r.error_samples {
                        if total.error_samples.len() < 5 {
                            total.error_samples.push(e);
                        }
                    }
                    if total.sample_leaf.is_none() {
                        total.sample_leaf = r.sample_leaf;
                    }
                }
                Err(e) => {
                    total.errors += 1;
                    total
                        .error_samples
                        .push(format!("a load worker failed: {e}"));
                }
            }
        }
        total.wall = start.elapsed();
        total
    }
}

#[derive(Debug)]
struct Shared {
    next: AtomicUsize,
    claimed: AtomicU64,
    seq: AtomicU64,
    serials: Mutex<HashSet<String>>,
}

struct Worker {
    id: usize,
    target: Arc<Target>,
    pool: Arc<CsrPool>,
    requests: Arc<Vec<Prepared>>,
    shared: Arc<Shared>,
    batch: u64,
    verify_every: u64,
    deadline: Option<Instant>,
    count: Option<u64>,
}

impl Worker {
    fn done(&self) -> bool {
        if let Some(d) = self.deadline {
            if Instant::now() >= d {
                return true;
            }
        }
        if let Some(n) = self.count {
            if self.shared.claimed.fetch_add(self.batch, Ordering::Relaxed) >= n {
                return true;
            }
        }
        false
    }

    async fn run(self) -> PhaseResult {
        let mut out = PhaseResult::default();
        let client = self.target.clients[self.id % self.target.clients.len()].clone();
        let fail = |out: &mut PhaseResult, n: u64, msg: String| {
            out.errors += n;
            if out.error_samples.len() < 5 {
                out.error_samples.push(msg);
            }
        };
        while !self.done() {
            let r = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.requests.len();
            let prepared = &self.requests[r];
            let t0 = Instant::now();
            let resp = client
                .call("BatchNewX509Svid", false, |mut c| {
                    let req = prepared.req.clone();
                    async move { c.batch_new_x509_svid(req).await }
                })
                .await;
            out.latencies_us.push(t0.elapsed().as_secs_f64() * 1e6);
            out.requests += 1;
            let resp = match resp {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    fail(
                        &mut out,
                        self.batch,
                        format!("BatchNewX509Svid failed: {:?}: {}", s.code(), s.message()),
                    );
                    continue;
                }
            };
            if resp.results.len() != prepared.slots.len() {
                fail(
                    &mut out,
                    self.batch,
                    format!(
                        "asked for {} SVIDs, got {} results",
                        prepared.slots.len(),
                        resp.results.len()
                    ),
                );
                continue;
            }
            for (res, (e, c)) in resp.results.iter().zip(&prepared.slots) {
                let entry = &self.target.entries[*e];
                if !res.error.is_empty() {
                    fail(&mut out, 1, format!("entry {}: {}", entry.id, res.error));
                    continue;
                }
                if res.entry_id != entry.id || res.svid_chain.len() < 2 {
                    fail(
                        &mut out,
                        1,
                        format!(
                            "entry {}: answer for {:?} with a chain of {} certificates",
                            entry.id,
                            res.entry_id,
                            res.svid_chain.len()
                        ),
                    );
                    continue;
                }
                let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
                if self.verify_every > 0 && seq.is_multiple_of(self.verify_every) {
                    match verify_svid(
                        &res.svid_chain,
                        &entry.spiffe_id,
                        &self.pool.spkis[*c],
                        &self.target.anchors,
                    ) {
                        Ok(serial) => {
                            let fresh = self
                                .shared
                                .serials
                                .lock()
                                .expect("serials lock")
                                .insert(serial.clone());
                            if !fresh {
                                fail(&mut out, 1, format!("serial {serial} issued twice"));
                                continue;
                            }
                            out.verified += 1;
                        }
                        Err(msg) => {
                            fail(&mut out, 1, format!("entry {}: {msg}", entry.id));
                            continue;
                        }
                    }
                }
                if out.sample_leaf.is_none() {
                    out.sample_leaf = Some(res.svid_chain[0].clone());
                }
                out.issued += 1;
            }
        }
        out
    }
}

/// Verifies an issued chain in full; returns the leaf's serial (hex).
pub fn verify_svid(
    chain: &[Vec<u8>],
    want_id: &str,
    want_spki: &[u8],
    anchors: &[TrustAnchor<'static>],
) -> Result<String, String> {
    let leaf = chain.first().ok_or("empty chain")?;
    let id = ca_identity::x509::check_leaf_svid(leaf)
        .map_err(|e| format!("not a valid X.509-SVID: {e}"))?;
    if id.as_str() != want_id {
        return Err(format!("SVID for {id}, expected {want_id}"));
    }
    let info = ca_identity::x509::cert_info(leaf).map_err(|e| e.to_string())?;
    if info.spki_der != want_spki {
        return Err("the SVID does not certify the CSR's public key".into());
    }
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| e.to_string())?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| format!("the SVID does not chain to the bundle: {e:?}"))?;
    Ok(info.serial_hex)
}

/// The TBSCertificate of a DER certificate.
pub fn tbs_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    Some(cert.tbs_certificate.as_ref().to_vec())
}

/// Latency percentile (`q` in 0..=1) of a sorted slice, µs.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
