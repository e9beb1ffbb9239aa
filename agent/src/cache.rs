//! The SVID cache: which workload entries this agent serves, the X.509-SVIDs minted for
//! them (keys generated here; private keys never leave the host), the trust bundle, and
//! JWT-SVIDs per (entry, audience set).
//!
//! [`Cache`] publishes an immutable [`CacheState`] snapshot through a
//! `tokio::sync::watch` channel; Workload API streams subscribe and push a new message
//! whenever their part of it changes. [`CacheManager`] keeps it current: a periodic
//! `SyncEntries`, one `BatchNewX509Svid` for every entry that needs an SVID (new, revision
//! changed, or past half its lifetime), dropping SVIDs of entries that disappeared. When no
//! node is reachable it keeps what it has and retries with backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_identity::selector::matches;
use ca_identity::{Selector, SpiffeId, TrustBundle};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use tokio::sync::watch;
use tonic::Status;

use crate::node_client::{bundle_from_proto, describe, Backoff, NodeClient};
use crate::persist::Store;
use crate::Error;

/// Selector types the workload attestor produces; entries using only these are served.
pub const WORKLOAD_SELECTOR_TYPES: &[&str] = &["unix", "systemd"];

/// Most CSRs in one `BatchNewX509Svid` call.
const MAX_BATCH: usize = 100;

/// A registration entry this agent serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// Entry ID.
    pub id: String,
    /// The SPIFFE ID workloads matching it get.
    pub spiffe_id: SpiffeId,
    /// All must be among a workload's selectors.
    pub selectors: Vec<Selector>,
    /// Requested X.509-SVID lifetime in seconds (0 = server default).
    pub x509_svid_ttl: i64,
    /// Requested JWT-SVID lifetime in seconds (0 = server default).
    pub jwt_svid_ttl: i64,
    /// Hint passed to workloads.
    pub hint: String,
    /// Bumped on every update; an SVID minted at an older revision is re-minted.
    pub revision: i64,
}

impl WorkloadEntry {
    /// Converts an entry from the node API; `None` (with a reason) if it is not one the
    /// workload attestor can ever match or it is malformed.
    pub fn from_proto(e: &ca_proto::types::Entry) -> Result<Self, String> {
        if e.selectors.is_empty() {
            return Err("it has no selectors".into());
        }
        if let Some(s) = e
            .selectors
            .iter()
            .find(|s| !WORKLOAD_SELECTOR_TYPES.contains(&s.r#type.as_str()))
        {
            return Err(format!(
                "selector type {:?} is not a workload selector",
                s.r#type
            ));
        }
        let spiffe_id = SpiffeId::parse(&e.spiffe_id).map_err(|err| err.to_string())?;
        Ok(Self {
            id: e.id.clone(),
            spiffe_id,
            selectors: e
                .selectors
                .iter()
                .map(|s| Selector::new(s.r#type.clone(), s.value.clone()))
                .collect(),
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            hint: e.hint.clone(),
            revision: e.revision,
        })
    }

    /// Whether a workload with `have` selectors matches.
    pub fn matches(&self, have: &[Selector]) -> bool {
        matches(&self.selectors, have)
    }
}

/// An X.509-SVID minted for an entry, with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct CachedSvid {
    /// The entry it was minted for.
    pub entry_id: String,
    /// The entry revision it was minted at.
    pub revision: i64,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Hint for workloads.
    pub hint: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key (wiped from memory when dropped).
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// Leaf notBefore, Unix seconds.
    pub not_before: i64,
    /// Leaf notAfter, Unix seconds.
    pub not_after: i64,
    /// The leaf's authority key identifier: which intermediate signed it.
    pub authority_key_id: Option<Vec<u8>>,
}

impl std::fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CachedSvid {
    /// Builds from a chain and key, reading validity from the leaf.
    pub fn new(
        entry: &WorkloadEntry,
        chain: Vec<Vec<u8>>,
        key_pkcs8: Vec<u8>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Node("the node returned an empty SVID chain".into()))?;
        let info = ca_identity::x509::cert_info(leaf)?;
        Ok(Self {
            entry_id: entry.id.clone(),
            revision: entry.revision,
            spiffe_id: entry.spiffe_id.clone(),
            hint: entry.hint.clone(),
            chain,
            key_pkcs8: key_pkcs8.into(),
            not_before: info.not_before,
            not_after: info.not_after,
            authority_key_id: info.authority_key_id,
        })
    }

    /// Whether a revoked intermediate signed it.
    pub fn is_tainted(&self, tainted: &[Vec<u8>]) -> bool {
        self.authority_key_id
            .as_ref()
            .is_some_and(|aki| tainted.contains(aki))
    }

    /// When to re-mint: half-way through its lifetime.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) / 2
    }
}

/// One immutable snapshot of what the agent can serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheState {
    /// The trust bundle, once known.
    pub bundle: Option<TrustBundle>,
    /// Entries this agent serves.
    pub entries: Vec<WorkloadEntry>,
    /// Minted SVIDs by entry ID.
    pub svids: BTreeMap<String, CachedSvid>,
    /// Whether at least one entry sync succeeded (or the state was set directly).
    pub synced: bool,
    /// Subject key identifiers of revoked intermediates (from the last sync): SVIDs they
    /// signed are re-minted at once.
    pub tainted_x509_authority_key_ids: Vec<Vec<u8>>,
    /// Key IDs of revoked JWT keys (from the last sync): JWT-SVIDs they signed are dropped.
    pub tainted_jwt_key_ids: Vec<String>,
}

impl CacheState {
    /// Entries a workload with `selectors` matches.
    pub fn matching_entries(&self, selectors: &[Selector]) -> Vec<&WorkloadEntry> {
        self.entries
            .iter()
            .filter(|e| e.matches(selectors))
            .collect()
    }

    /// Unexpired SVIDs for a workload with `selectors`, ordered by entry ID.
    pub fn svids_for(&self, selectors: &[Selector], now: i64) -> Vec<&CachedSvid> {
        let mut out: Vec<&CachedSvid> = self
            .matching_entries(selectors)
            .into_iter()
            .filter_map(|e| self.svids.get(&e.id))
            .filter(|s| s.not_after > now)
            .collect();
        out.sort_by(|a, b| a.entry_id.cmp(&b.entry_id));
        out
    }
}

/// The published cache; cheap to clone.
#[derive(Clone, Debug)]
pub struct Cache {
    tx: Arc<watch::Sender<Arc<CacheState>>>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(CacheState::default()));
        Self { tx: Arc::new(tx) }
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheState>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<CacheState> {
        self.tx.borrow().clone()
    }

    /// Replaces the snapshot with an edited copy; subscribers are woken only if it changed.
    pub fn update(&self, f: impl FnOnce(&mut CacheState)) {
        self.tx.send_if_modified(|cur| {
            let mut next = (**cur).clone();
            f(&mut next);
            if next == **cur {
                false
            } else {
                *cur = Arc::new(next);
                true
            }
        });
    }

    /// Sets the bundle.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.update(|s| s.bundle = Some(bundle));
    }

    /// Adds or replaces an entry together with its SVID (test support and direct use).
    pub fn insert(&self, entry: WorkloadEntry, svid: CachedSvid) {
        self.update(|s| {
            s.entries.retain(|e| e.id != entry.id);
            s.svids.insert(entry.id.clone(), svid);
            s.entries.push(entry);
            s.synced = true;
        });
    }

    /// Removes an entry and its SVID.
    pub fn remove(&self, entry_id: &str) {
        self.update(|s| {
            s.entries.retain(|e| e.id != entry_id);
            s.svids.remove(entry_id);
        });
    }
}

/// Something that mints JWT-SVIDs: the node client, or a fake in tests.
#[async_trait::async_trait]
pub trait JwtMinter: Send + Sync {
    /// Mints a JWT-SVID for `entry_id` and `audience`: (token, expires_at Unix seconds).
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), Status>;
}

#[async_trait::async_trait]
impl JwtMinter for NodeClient {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), Status> {
        self.new_jwt_svid(entry_id, audience).await
    }
}

/// What a cached JWT-SVID is filed under: entry, its revision, and the audience set
/// (sorted, duplicates removed, so order and repetition do not matter).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JwtCacheKey {
    entry_id: String,
    revision: i64,
    audience: Vec<String>,
}

impl JwtCacheKey {
    /// The key of `entry` with `audience`.
    pub fn new(entry: &WorkloadEntry, audience: &[String]) -> Self {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        Self {
            entry_id: entry.id.clone(),
            revision: entry.revision,
            audience,
        }
    }
}

#[derive(Clone, Debug)]
struct CachedJwt {
    token: String,
    kid: String,
    issued_at: i64,
    expires_at: i64,
    /// When it was last handed out (a counter): the least recently used go first.
    used: u64,
}

/// JWT-SVIDs a [`JwtCache`] keeps unless configured otherwise (SPIRE's default too).
pub const DEFAULT_JWT_CACHE_SIZE: usize = 1000;

#[derive(Debug, Default)]
struct JwtTokens {
    map: HashMap<JwtCacheKey, CachedJwt>,
    clock: u64,
}

/// The `kid` in a JWT's header ("" if there is none or it does not parse).
fn jwt_kid(token: &str) -> String {
    use base64::Engine as _;
    token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h.get("kid").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// JWT-SVIDs reused until half their lifetime has passed, or until the key that signed
/// them is revoked. At most `capacity` are kept: a caller asking for ever new audiences
/// evicts the least recently used tokens instead of growing memory.
pub struct JwtCache {
    minter: Arc<dyn JwtMinter>,
    tokens: Mutex<JwtTokens>,
    state: Option<watch::Receiver<Arc<CacheState>>>,
    capacity: usize,
}

impl std::fmt::Debug for JwtCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtCache")
    }
}

impl JwtCache {
    /// A cache of [`DEFAULT_JWT_CACHE_SIZE`] tokens in front of `minter`.
    pub fn new(minter: Arc<dyn JwtMinter>) -> Self {
        Self {
            minter,
            tokens: Mutex::default(),
            state: None,
            capacity: DEFAULT_JWT_CACHE_SIZE,
        }
    }

    /// The same cache keeping at most `capacity` tokens (at least one).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Drops cached tokens signed by the revoked JWT keys `state` names.
    pub fn with_revocations(mut self, state: watch::Receiver<Arc<CacheState>>) -> Self {
        self.state = Some(state);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JwtTokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A JWT-SVID for `entry` and `audience`, cached or freshly minted.
    pub async fn get(&self, entry: &WorkloadEntry, audience: &[String]) -> Result<String, Status> {
        let key = JwtCacheKey::new(entry, audience);
        let now = ca_identity::unix_now();
        let revoked = self
            .state
            .as_ref()
            .map(|s| s.borrow().tainted_jwt_key_ids.clone())
            .unwrap_or_default();
        {
            let mut tokens = self.lock();
            tokens.clock += 1;
            let clock = tokens.clock;
            if let Some(t) = tokens.map.get_mut(&key) {
                if now < t.issued_at + (t.expires_at - t.issued_at) / 2 && !revoked.contains(&t.kid)
                {
                    t.used = clock;
                    return Ok(t.token.clone());
                }
            }
        }
        let (token, expires_at) = self.minter.mint(&entry.id, &key.audience).await?;
        let mut tokens = self.lock();
        tokens.map.retain(|_, t| t.expires_at > now);
        while tokens.map.len() >= self.capacity && !tokens.map.contains_key(&key) {
            let Some(oldest) = tokens
                .map
                .iter()
                .min_by_key(|(_, t)| t.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            tokens.map.remove(&oldest);
        }
        tokens.clock += 1;
        let used = tokens.clock;
        tokens.map.insert(
            key,
            CachedJwt {
                kid: jwt_kid(&token),
                token: token.clone(),
                issued_at: now,
                expires_at,
                used,
            },
        );
        Ok(token)
    }

    /// How many tokens are cached.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps the cache in sync with the nodes.
pub struct CacheManager {
    node: Arc<NodeClient>,
    cache: Cache,
    store: Store,
    interval: Duration,
    mode: SyncMode,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

/// How the agent learns its entries and the bundle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// One `WatchEntries` stream: a full set, then the changes as they happen (and a full
    /// set again every [`FULL_RESYNC`] as a safety net).
    #[default]
    Watch,
    /// `SyncEntries` every `sync_interval_secs`: the whole set each time.
    Poll,
}

/// In watch mode, how often the stream is opened again from nothing (a full set), in case
/// a delta was ever lost.
pub const FULL_RESYNC: Duration = Duration::from_secs(600);

impl std::fmt::Debug for CacheManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheManager")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

fn new_csr(spiffe_id: &SpiffeId) -> Result<(Vec<u8>, KeyPair), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Ok(uri) = spiffe_id.as_str().try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key))
}

/// Which entries need a (new) SVID now: new, changed, past half their lifetime, or signed
/// by a revoked intermediate.
pub fn entries_to_mint(state: &CacheState, now: i64) -> Vec<&WorkloadEntry> {
    state
        .entries
        .iter()
        .filter(|e| match state.svids.get(&e.id) {
            None => true,
            Some(s) => {
                s.revision != e.revision
                    || now >= s.renew_at()
                    || s.spiffe_id != e.spiffe_id
                    || s.is_tainted(&state.tainted_x509_authority_key_ids)
            }
        })
        .collect()
}

impl CacheManager {
    /// A manager syncing every `interval`.
    pub fn new(node: Arc<NodeClient>, cache: Cache, store: Store, interval: Duration) -> Self {
        Self {
            node,
            cache,
            store,
            interval,
            mode: SyncMode::Watch,
            metrics: Default::default(),
        }
    }

    /// Syncs in `mode` (watch by default).
    pub fn with_mode(mut self, mode: SyncMode) -> Self {
        self.mode = mode;
        self
    }

    /// The sync mode.
    pub fn mode(&self) -> SyncMode {
        self.mode
    }

    /// Counts syncs, mints and bundle updates in `metrics` (a private set otherwise).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Applies a new bundle: live TLS roots, the store, the cache.
    pub fn apply_bundle(&self, bundle: TrustBundle) {
        let cur = self.cache.current();
        if cur.bundle.as_ref() == Some(&bundle) {
            return;
        }
        if let Some(old) = &cur.bundle {
            if old.sequence_number > bundle.sequence_number {
                tracing::warn!(
                    old = old.sequence_number,
                    new = bundle.sequence_number,
                    "a node returned an older bundle than the one cached; ignoring it"
                );
                return;
            }
        }
        tracing::info!(
            sequence = bundle.sequence_number,
            roots = bundle.x509_authorities.len(),
            jwt_keys = bundle.jwt_authorities.len(),
            "trust bundle updated"
        );
        self.metrics.bundle_updates.inc();
        self.node.roots().set(bundle.x509_authorities.clone());
        if let Err(e) = self.store.save_bundle(&bundle) {
            tracing::warn!("cannot persist the trust bundle: {e}");
        }
        self.cache.set_bundle(bundle);
    }

    /// One sync: entries and bundle, then mint what is missing or due.
    pub async fn sync_once(&self) -> Result<(), Status> {
        let r = self.sync().await;
        self.record_sync(&r);
        r
    }

    async fn sync(&self) -> Result<(), Status> {
        let resp = self
            .node
            .call("SyncEntries", false, |mut c| async move {
                c.sync_entries(ca_proto::node::SyncEntriesRequest {}).await
            })
            .await?
            .into_inner();
        if let Some(b) = resp.bundle {
            match bundle_from_proto(b) {
                Ok(b) => self.apply_bundle(b),
                Err(e) => tracing::warn!("the node sent an unusable bundle: {e}"),
            }
        }
        let mut entries = Vec::new();
        for e in &resp.entries {
            match WorkloadEntry::from_proto(e) {
                Ok(w) => entries.push(w),
                Err(why) => tracing::debug!(entry = %e.id, "not serving entry: {why}"),
            }
        }
        let tainted = resp.tainted_x509_authority_key_ids;
        self.note_tainted(&tainted);
        self.cache.update(|s| {
            let ids: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            s.svids.retain(|id, _| ids.contains(id.as_str()));
            s.entries = entries;
            s.synced = true;
            s.tainted_x509_authority_key_ids = tainted;
            s.tainted_jwt_key_ids = resp.tainted_jwt_key_ids;
        });
        self.mint_due().await
    }

    /// Says so when an intermediate that signed SVIDs this agent holds is newly revoked.
    fn note_tainted(&self, tainted: &[Vec<u8>]) {
        let cur = self.cache.current();
        let newly_tainted = cur
            .svids
            .values()
            .any(|s| s.is_tainted(tainted) && !s.is_tainted(&cur.tainted_x509_authority_key_ids));
        if newly_tainted {
            tracing::warn!(
                "an intermediate that signed SVIDs this agent holds was revoked; re-minting them now"
            );
        }
    }

    /// Records the outcome of an entry sync (a poll, or a watch stream's update or end).
    fn record_sync(&self, r: &Result<(), Status>) {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics.syncs.with_label_values(&[result]).inc();
        if r.is_ok() {
            self.metrics.last_sync.set(ca_identity::unix_now());
        }
        *self
            .metrics
            .last_sync_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = r
            .as_ref()
            .err()
            .map(|s| crate::node_client::describe("entry sync", s));
    }

    async fn mint_due(&self) -> Result<(), Status> {
        let state = self.cache.current();
        let due: Vec<WorkloadEntry> = entries_to_mint(&state, ca_identity::unix_now())
            .into_iter()
            .cloned()
            .collect();
        for chunk in due.chunks(MAX_BATCH) {
            let mut params = Vec::with_capacity(chunk.len());
            let mut keys = HashMap::new();
            for e in chunk {
                let (csr, key) =
                    new_csr(&e.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
                params.push(ca_proto::node::NewX509SvidParams {
                    entry_id: e.id.clone(),
                    csr,
                });
                keys.insert(e.id.clone(), key);
            }
            let req = ca_proto::node::BatchNewX509SvidRequest { params };
            let resp = self
                .node
                .call("BatchNewX509Svid", false, |mut c| {
                    let req = req.clone();
                    async move { c.batch_new_x509_svid(req).await }
                })
                .await?
                .into_inner();
            let mut minted = Vec::new();
            for r in resp.results {
                let Some(entry) = chunk.iter().find(|e| e.id == r.entry_id) else {
                    continue;
                };
                if !r.error.is_empty() || r.svid_chain.is_empty() {
                    self.metrics
                        .svid_rotations
                        .with_label_values(&["error"])
                        .inc();
                    tracing::warn!(entry = %r.entry_id, spiffe_id = %entry.spiffe_id,
                        "the CA did not issue an SVID: {}", r.error);
                    continue;
                }
                let Some(key) = keys.remove(&r.entry_id) else {
                    continue;
                };
                match CachedSvid::new(entry, r.svid_chain, key.serialize_der()) {
                    Ok(s) => {
                        self.metrics.svid_rotations.with_label_values(&["ok"]).inc();
                        tracing::info!(entry = %s.entry_id, spiffe_id = %s.spiffe_id,
                            expires_at = s.not_after, "X.509-SVID minted");
                        minted.push(s);
                    }
                    Err(e) => {
                        self.metrics
                            .svid_rotations
                            .with_label_values(&["error"])
                            .inc();
                        tracing::warn!(entry = %r.entry_id, "unusable SVID from the CA: {e}")
                    }
                }
            }
            self.cache.update(|s| {
                let ids: HashSet<&str> = s.entries.iter().map(|e| e.id.as_str()).collect();
                let mut keep = Vec::new();
                for m in minted {
                    // The entry may have changed or gone while we were minting.
                    if ids.contains(m.entry_id.as_str()) {
                        keep.push(m);
                    }
                }
                for m in keep {
                    s.svids.insert(m.entry_id.clone(), m);
                }
            });
        }
        Ok(())
    }

    /// Keeps the entries and bundle current until `shutdown` fires, in the manager's
    /// [`SyncMode`]; on failure keeps what it has and retries with backoff.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        match self.mode {
            SyncMode::Poll => self.run_poll(shutdown).await,
            SyncMode::Watch => {
                let this = Arc::new(self);
                let minting = tokio::spawn(this.clone().run_minting(shutdown.clone()));
                this.run_watch(shutdown).await;
                let _ = minting.await;
            }
        }
    }

    /// Watch mode: one `WatchEntries` stream at a time, opened again (from the revision
    /// the agent has) when it ends, and from nothing every [`FULL_RESYNC`].
    async fn run_watch(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut revision = 0u64;
        let mut full_since = tokio::time::Instant::now();
        loop {
            if full_since.elapsed() >= FULL_RESYNC {
                revision = 0;
            }
            if revision == 0 {
                full_since = tokio::time::Instant::now();
            }
            let r = tokio::select! {
                r = self.watch_stream(&mut revision, full_since + FULL_RESYNC) => r,
                _ = shutdown.changed() => return,
            };
            self.metrics.entry_watch_connected.set(0);
            let delay = match r {
                Ok(()) => {
                    backoff.reset();
                    Duration::from_millis(50)
                }
                Err(status) => {
                    self.record_sync(&Err(status.clone()));
                    let msg = describe("entry watch", &status);
                    if status.code() == tonic::Code::PermissionDenied {
                        tracing::error!("{msg}");
                    } else {
                        tracing::warn!("{msg}; serving cached SVIDs");
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One stream: applies its updates until it ends (`Ok`) or fails, or `until`.
    async fn watch_stream(
        &self,
        revision: &mut u64,
        until: tokio::time::Instant,
    ) -> Result<(), Status> {
        let from = *revision;
        let mut stream = self
            .node
            .call("WatchEntries", false, |mut c| async move {
                c.watch_entries(ca_proto::node::WatchEntriesRequest { revision: from })
                    .await
            })
            .await?
            .into_inner();
        // A full set arriving in chunks, until its last one.
        let mut pending: Option<Vec<WorkloadEntry>> = None;
        let mut alive = tokio::time::interval(Duration::from_secs(1));
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = tokio::time::sleep_until(until) => return Ok(()),
                _ = alive.tick() => {
                    // The stream is open and the node pushes what changes: in sync.
                    if self.metrics.entry_watch_connected.get() == 1 {
                        self.metrics.last_sync.set(ca_identity::unix_now());
                    }
                    continue;
                }
            };
            let Some(m) = msg else {
                return Ok(()); // the node ended it (SVID expiry); open the next one
            };
            if let Some(b) = m.bundle.clone() {
                match bundle_from_proto(b) {
                    Ok(b) => self.apply_bundle(b),
                    Err(e) => tracing::warn!("the node sent an unusable bundle: {e}"),
                }
                self.note_tainted(&m.tainted_x509_authority_key_ids);
                let (x509, jwt) = (
                    m.tainted_x509_authority_key_ids.clone(),
                    m.tainted_jwt_key_ids.clone(),
                );
                self.cache.update(|s| {
                    s.tainted_x509_authority_key_ids = x509;
                    s.tainted_jwt_key_ids = jwt;
                });
            }
            let entries = m
                .entries
                .iter()
                .filter_map(|e| match WorkloadEntry::from_proto(e) {
                    Ok(w) => Some(w),
                    Err(why) => {
                        tracing::debug!(entry = %e.id, "not serving entry: {why}");
                        None
                    }
                });
            if m.full {
                pending = Some(entries.collect());
            } else if let Some(p) = pending.as_mut() {
                p.extend(entries);
            } else {
                let upserts: Vec<WorkloadEntry> = entries.collect();
                // Every entry the message names goes, then those it can serve come back: an
                // entry changed into one this agent cannot serve is not kept in its old form.
                let mut gone: HashSet<&str> =
                    m.removed_entry_ids.iter().map(String::as_str).collect();
                let served: HashSet<String> = upserts.iter().map(|e| e.id.clone()).collect();
                gone.extend(
                    m.entries
                        .iter()
                        .map(|e| e.id.as_str())
                        .filter(|id| !served.contains(*id)),
                );
                if !upserts.is_empty() || !gone.is_empty() {
                    self.cache.update(|s| {
                        s.entries
                            .retain(|e| !gone.contains(e.id.as_str()) && !served.contains(&e.id));
                        s.svids.retain(|id, _| !gone.contains(id.as_str()));
                        s.entries.extend(upserts);
                        s.entries.sort_by(|a, b| a.id.cmp(&b.id));
                    });
                }
            }
            if m.more {
                continue;
            }
            if let Some(set) = pending.take() {
                self.cache.update(|s| {
                    let ids: HashSet<&str> = set.iter().map(|e| e.id.as_str()).collect();
                    s.svids.retain(|id, _| ids.contains(id.as_str()));
                    s.entries = set;
                    s.synced = true;
                });
            }
            *revision = m.revision;
            self.metrics.entry_watch_connected.set(1);
            self.record_sync(&Ok(()));
        }
    }

    /// Watch mode: mints what is missing or due whenever the entries or the tainted
    /// authorities change, and every `interval` for renewals.
    async fn run_minting(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.cache.subscribe();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let delay = match self.mint_due().await {
                Ok(()) => {
                    backoff.reset();
                    self.interval
                }
                Err(status) => {
                    tracing::warn!("{}", describe("minting SVIDs", &status));
                    backoff
                        .next_delay()
                        .min(self.interval.max(Duration::from_secs(1)) * 6)
                }
            };
            changes.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Poll mode: syncs every interval.
    async fn run_poll(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let delay = match self.sync_once().await {
                Ok(()) => {
                    if backoff.failures() > 0 {
                        tracing::info!("entry sync works again");
                    }
                    backoff.reset();
                    self.interval
                }
                Err(status) => {
                    let msg = describe("entry sync", &status);
                    if status.code() == tonic::Code::PermissionDenied {
                        tracing::error!("{msg}");
                    } else {
                        tracing::warn!("{msg}; serving cached SVIDs");
                    }
                    backoff
                        .next_delay()
                        .min(self.interval.max(Duration::from_secs(1)) * 6)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn entry(id: &str, rev: i64) -> WorkloadEntry {
        WorkloadEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse("spiffe://example.org/w").unwrap(),
            selectors: vec![Selector::new("unix", "uid:1")],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            hint: String::new(),
            revision: rev,
        }
    }

    struct CountingMinter(AtomicUsize, i64);

    #[async_trait::async_trait]
    impl JwtMinter for CountingMinter {
        async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), Status> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Ok((
                format!("{entry_id}:{}:{n}", audience.join(",")),
                ca_identity::unix_now() + self.1,
            ))
        }
    }

    /// A caller asking for ever new audiences cannot grow the cache past its capacity
    /// (before the bound, 10,000 audiences added 360 MB); the least recently used token
    /// goes first, so a token in use stays cached.
    #[tokio::test]
    async fn jwt_cache_is_bounded_and_evicts_the_least_recently_used() {
        let minter = Arc::new(CountingMinter(AtomicUsize::new(0), 3600));
        let cache = JwtCache::new(minter.clone()).with_capacity(100);
        let e = entry("e1", 1);
        let hot = cache.get(&e, &["hot".into()]).await.unwrap();
        for i in 0..10_000 {
            cache.get(&e, &[format!("aud-{i}")]).await.unwrap();
            if i % 50 == 0 {
                assert_eq!(cache.get(&e, &["hot".into()]).await.unwrap(), hot);
            }
            assert!(cache.len() <= 100, "{} tokens cached", cache.len());
        }
        assert_eq!(cache.len(), 100);
        assert_eq!(cache.get(&e, &["hot".into()]).await.unwrap(), hot);
        // The first audiences were evicted: asking again mints.
        let before = minter.0.load(Ordering::SeqCst);
        cache.get(&e, &["aud-0".into()]).await.unwrap();
        assert_eq!(minter.0.load(Ordering::SeqCst), before + 1);
        assert_eq!(JwtCache::new(minter).with_capacity(0).capacity, 1);
    }

    #[test]
    fn jwt_cache_key_ignores_audience_order_and_duplicates() {
        let e = entry("e1", 1);
        let a = JwtCacheKey::new(&e, &["b".into(), "a".into()]);
        let b = JwtCacheKey::new(&e, &["a".into(), "b".into(), "a".into()]);
        assert_eq!(a, b);
        assert_ne!(a, JwtCacheKey::new(&e, &["a".into()]));
        assert_ne!(
            a,
            JwtCacheKey::new(&entry("e2", 1), &["a".into(), "b".into()])
        );
        assert_ne!(
            a,
            JwtCacheKey::new(&entry("e1", 2), &["a".into(), "b".into()])
        );
    }

    #[tokio::test]
    async fn jwt_cache_reuses_until_half_life() {
        let minter = Arc::new(CountingMinter(AtomicUsize::new(0), 3600));
        let cache = JwtCache::new(minter.clone());
        let e = entry("e1", 1);
        let t1 = cache.get(&e, &["x".into(), "y".into()]).await.unwrap();
        let t2 = cache.get(&e, &["y".into(), "x".into()]).await.unwrap();
        assert_eq!(t1, t2);
        assert_eq!(minter.0.load(Ordering::SeqCst), 1);
        let t3 = cache.get(&e, &["x".into()]).await.unwrap();
        assert_ne!(t1, t3);
        assert_eq!(cache.len(), 2);
        // A token whose half-life already passed is re-minted.
        let short = JwtCache::new(Arc::new(CountingMinter(AtomicUsize::new(0), 0)));
        let a = short.get(&e, &["x".into()]).await.unwrap();
        let b = short.get(&e, &["x".into()]).await.unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn mint_decisions() {
        let ca = crate::testing::TestCa::new("example.org");
        let mut state = CacheState::default();
        state.entries.push(entry("fresh", 1));
        state.entries.push(entry("new-revision", 2));
        state.entries.push(entry("missing", 1));
        state.entries.push(entry("old", 1));
        for (id, rev, ttl) in [("fresh", 1, 3600), ("new-revision", 1, 3600), ("old", 1, 1)] {
            let (chain, key) = ca.issue("spiffe://example.org/w", ttl);
            let mut s = CachedSvid::new(&entry(id, rev), chain, key).unwrap();
            if id == "old" {
                s.not_before -= 1000;
            }
            state.svids.insert(id.into(), s);
        }
        let due: Vec<&str> = entries_to_mint(&state, ca_identity::unix_now())
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(due, vec!["new-revision", "missing", "old"]);
    }

    #[test]
    fn non_workload_entries_are_skipped() {
        let mut e = ca_proto::types::Entry {
            id: "1".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            selectors: vec![ca_proto::types::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            ..Default::default()
        };
        assert!(WorkloadEntry::from_proto(&e).is_ok());
        e.selectors.push(ca_proto::types::Selector {
            r#type: "join_token".into(),
            value: "x".into(),
        });
        assert!(WorkloadEntry::from_proto(&e).is_err());
        e.selectors.clear();
        assert!(WorkloadEntry::from_proto(&e).is_err());
    }

    #[tokio::test]
    async fn updates_wake_subscribers_only_on_change() {
        let cache = Cache::new();
        let mut rx = cache.subscribe();
        rx.mark_unchanged();
        cache.update(|_| {});
        assert!(!rx.has_changed().unwrap());
        cache.update(|s| s.synced = true);
        assert!(rx.has_changed().unwrap());
    }
}
