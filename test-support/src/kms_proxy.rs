//! A fault-injecting HTTP proxy in front of the KMS emulator, for the faults the emulator
//! cannot produce: throttling, refused credentials, failures, slow answers (by [`Rule`]s on
//! KMS actions), and an outage ([`Proxy::stop`], then [`Proxy::restart`] on the same
//! address). It records every request it sees (action and body).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What the proxy does with some requests of one KMS action.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The KMS action (`Sign`, `CreateAlias`, ...), from `X-Amz-Target`; `*`: every action.
    pub action: &'static str,
    /// Requests of that action let through untouched before the rule applies.
    pub skip: u32,
    /// How many requests it applies to; `None`: all.
    pub times: Option<u32>,
    /// Wait this long first.
    pub delay: Duration,
    /// Then answer with this status and JSON body; `None`: forward to the emulator.
    pub answer: Option<(u16, String)>,
}

impl Rule {
    /// Answers `times` requests (`None`: all) of `action` with HTTP `status` and a KMS error
    /// `code` and `msg`.
    pub fn error(
        action: &'static str,
        times: Option<u32>,
        status: u16,
        code: &str,
        msg: &str,
    ) -> Rule {
        Rule {
            action,
            skip: 0,
            times,
            delay: Duration::ZERO,
            answer: Some((
                status,
                serde_json::json!({"__type": code, "message": msg}).to_string(),
            )),
        }
    }

    /// Throttles the next `n` requests of `action` (`ThrottlingException`, which clients
    /// retry with backoff).
    pub fn throttle(action: &'static str, n: u32) -> Rule {
        Rule::error(action, Some(n), 400, "ThrottlingException", "Rate exceeded")
    }

    /// Fails every request of `action` with HTTP `status` and KMS error `code`.
    pub fn fail_always(action: &'static str, status: u16, code: &str, msg: &str) -> Rule {
        Rule::error(action, None, status, code, msg)
    }

    /// Refuses the credentials of `times` requests (`None`: all) of `action`
    /// (`UnrecognizedClientException`, as KMS answers an unknown access key).
    pub fn refuse_credentials(action: &'static str, times: Option<u32>) -> Rule {
        Rule::error(
            action,
            times,
            400,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    }

    /// Delays `times` requests (`None`: all) of `action` by `delay`, then forwards them.
    pub fn slow(action: &'static str, times: Option<u32>, delay: Duration) -> Rule {
        Rule {
            action,
            skip: 0,
            times,
            delay,
            answer: None,
        }
    }

    /// Lets the first `n` matching requests through before applying.
    pub fn after(mut self, n: u32) -> Rule {
        self.skip = n;
        self
    }
}

/// Ports of proxies of this process that were stopped (they may listen again).
static STOPPED_PORTS: Mutex<std::collections::BTreeSet<u16>> =
    Mutex::new(std::collections::BTreeSet::new());

/// The rules and what the proxy saw.
#[derive(Debug, Default)]
struct ProxyState {
    rules: Mutex<Vec<Rule>>,
    /// Every request seen: action and body.
    seen: Mutex<Vec<(String, Bytes)>>,
}

/// The proxy; it listens on 127.0.0.1 until dropped or [`Proxy::stop`]ped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: u16,
    state: Arc<ProxyState>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:<upstream>` on a free port (inside a tokio runtime).
    pub async fn start(upstream: u16) -> Proxy {
        // Never the port of a stopped proxy of this process: a test that stopped its proxy
        // to make KMS unreachable would reach this one instead.
        let mut skipped = Vec::new();
        let listener = loop {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a port for the proxy");
            let port = l.local_addr().expect("proxy address").port();
            if STOPPED_PORTS.lock().expect("ports").contains(&port) {
                skipped.push(l); // held until a free port is found, so it is not offered again
                continue;
            }
            break l;
        };
        drop(skipped);
        let p = Proxy {
            addr: listener.local_addr().expect("proxy address"),
            upstream,
            state: Arc::default(),
            task: Mutex::new(None),
        };
        p.serve(listener);
        p
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule; rules are tried in the order they were added, the first one of the
    /// request's action that still applies wins.
    pub fn rule(&self, r: Rule) {
        self.state.rules.lock().expect("rules").push(r);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.state.rules.lock().expect("rules").clear();
    }

    /// How many requests of `action` it has seen (answered by a rule or forwarded).
    pub fn count(&self, action: &str) -> usize {
        self.state
            .seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|(a, _)| a == action)
            .count()
    }

    /// Every request seen so far: action and body.
    pub fn seen(&self) -> Vec<(String, Bytes)> {
        self.state.seen.lock().expect("seen").clone()
    }

    /// The body of the last request of `action`.
    pub fn last_body(&self, action: &str) -> Option<Bytes> {
        self.state
            .seen
            .lock()
            .expect("seen")
            .iter()
            .rev()
            .find(|(a, _)| a == action)
            .map(|(_, b)| b.clone())
    }

    /// Stops listening and drops every open connection: the endpoint is gone.
    pub fn stop(&self) {
        STOPPED_PORTS
            .lock()
            .expect("ports")
            .insert(self.addr.port());
        if let Some(t) = self.task.lock().expect("task").take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let state = self.state.clone();
        let upstream = self.upstream;
        let task = tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            // Dropped with this task when it is aborted: every connection ends with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let client = client.clone();
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, state.clone(), client.clone(), upstream)
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.task.lock().expect("task") = Some(task);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// The rule that applies to a request of `action`, consuming one use of it (or one skip).
fn take_rule(state: &ProxyState, action: &str) -> Option<Rule> {
    let mut rules = state.rules.lock().expect("rules");
    let r = rules
        .iter_mut()
        .find(|r| (r.action == action || r.action == "*") && r.times != Some(0))?;
    if r.skip > 0 {
        r.skip -= 1;
        return None;
    }
    if let Some(n) = r.times.as_mut() {
        *n -= 1;
    }
    Some(r.clone())
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ProxyState>,
    client: HttpClient,
    upstream: u16,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let action = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    state
        .seen
        .lock()
        .expect("seen")
        .push((action.clone(), body.clone()));
    if let Some(r) = take_rule(&state, &action) {
        tokio::time::sleep(r.delay).await;
        if let Some((status, body)) = &r.answer {
            return Ok(Response::builder()
                .status(*status)
                .header("content-type", "application/x-amz-json-1.1")
                .header("x-amzn-requestid", "fault-injected")
                .body(Full::new(Bytes::from(body.clone())))
                .expect("a valid response"));
        }
    }
    let uri = format!(
        "http://127.0.0.1:{upstream}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut fwd = Request::builder().method(parts.method).uri(uri);
    for (k, v) in &parts.headers {
        fwd = fwd.header(k, v);
    }
    let fwd = fwd.body(Full::new(body)).expect("a valid request");
    let answer = match client.request(fwd).await {
        Ok(a) => a,
        Err(e) => {
            return Ok(Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("upstream: {e}"))))
                .expect("a valid response"))
        }
    };
    let (aparts, abody) = answer.into_parts();
    let abody = abody
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = Response::builder().status(aparts.status);
    for (k, v) in &aparts.headers {
        if !matches!(
            k.as_str(),
            "transfer-encoding" | "connection" | "content-length"
        ) {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Full::new(abody)).expect("a valid response"))
}
