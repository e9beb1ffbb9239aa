//! The dashboards and rules in `ops/` against a real cluster: three ca-node processes and an
//! agent, scraped by a real Prometheus (Debian's `prometheus`) that loads the project's
//! recording and alert rules. After issuance, a rotation of every intermediate and JWT key
//! and a revocation, every query of every dashboard panel and annotation must return data,
//! every rule must evaluate without error over metrics that exist, and the rotation events
//! must show as counter increases. `promtool` checks the rule files and runs their unit tests.
//! An agent that cannot sync turns not ready on `/readyz`, with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ca_proto::admin::{GetCaStatusRequest, RevokeAuthorityRequest, RotateAuthorityRequest};
use chaos_tests::cluster::admin_call;
use chaos_tests::report::say;
use chaos_tests::Cluster;
use serde_json::Value;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = ops().join("grafana/dashboards");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("ops/grafana/dashboards") {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.push((path.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 4, "four dashboards: {out:?}");
    out
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(ops().join("prometheus"))
        .output()
        .expect("promtool (Debian package prometheus) must be installed: these tests do not skip");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_and_every_alert_test_passes() {
    promtool(&["check", "rules", "rules.yml", "alerts.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    let out = promtool(&["test", "rules", "tests/alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a test in which it fires and one in which it does not.
    let alerts = std::fs::read_to_string(ops().join("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(ops().join("prometheus/tests/alerts_test.yml")).unwrap();
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 14, "{names:?}");
    for name in names {
        for case in ["fires", "stays quiet"] {
            assert!(
                tests.contains(&format!("name: {name} {case}")),
                "no promtool test in which {name} {case}"
            );
        }
    }
}

#[test]
fn dashboards_have_the_structure_grafana_imports() {
    for (file, d) in dashboards() {
        assert!(d["schemaVersion"].as_i64().unwrap() >= 39, "{file}");
        assert!(
            d["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty() && u.len() <= 40),
            "{file}"
        );
        assert!(d["title"].as_str().is_some(), "{file}");
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["type"] == "datasource"
                && v["query"] == "prometheus"
                && v["name"] == "datasource"),
            "{file}: a datasource template variable"
        );
        assert!(
            vars.iter()
                .any(|v| v["type"] == "query" && v["includeAll"] == true),
            "{file}: an instance variable"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap_or("?");
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{file}: duplicate panel id"
            );
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_i64().unwrap(), g["w"].as_i64().unwrap());
            assert!(
                w >= 1 && x >= 0 && x + w <= 24,
                "{file} {title}: gridPos {g}"
            );
            assert!(g["h"].as_i64().unwrap() >= 1, "{file} {title}");
            if p["type"] == "row" {
                continue;
            }
            assert!(
                ["timeseries", "stat", "table", "bargauge", "state-timeline"]
                    .contains(&p["type"].as_str().unwrap()),
                "{file} {title}: panel type"
            );
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file} {title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file} {title}: no query");
            for t in targets {
                assert!(t["refId"].as_str().is_some(), "{file} {title}");
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                    "{file} {title}"
                );
            }
        }
    }
}

/// Percent-encodes a query parameter.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.0 GET of `path` over `conn`: the whole response, headers included.
async fn get(conn: std::net::TcpStream, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.set_nonblocking(true)?;
    let mut s = tokio::net::TcpStream::from_std(conn)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Prometheus, listening on the agents' host.
struct Prom<'a> {
    cluster: &'a std::sync::Mutex<Cluster>,
    port: u16,
}

/// A GET of Prometheus's HTTP API; the `data` of a successful answer.
async fn prom(p: &Prom<'_>, path: &str) -> Result<Value> {
    let std = p.cluster.lock().unwrap().connect_beside_agents(p.port)?;
    let text = get(std, path).await?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: Value = serde_json::from_str(body).with_context(|| format!("{path}: {text}"))?;
    if v["status"] != "success" {
        bail!("{path}: {v}");
    }
    Ok(v["data"].clone())
}

/// The series `expr` returns over `[start, now]`.
async fn range(addr: &Prom<'_>, expr: &str, start: f64) -> Result<Vec<Value>> {
    let end = unix_now();
    let data = prom(
        addr,
        &format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step=2",
            enc(expr)
        ),
    )
    .await?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// The value of a query returning one number now.
async fn scalar(addr: &Prom<'_>, expr: &str) -> Result<f64> {
    let data = prom(addr, &format!("/api/v1/query?query={}", enc(expr))).await?;
    let r = data["result"].as_array().cloned().unwrap_or_default();
    match r.first() {
        Some(s) => Ok(s["value"][1].as_str().unwrap_or("nan").parse()?),
        None => Ok(0.0),
    }
}

/// The rotation events counted so far, by `kind event`.
async fn events(addr: &Prom<'_>) -> Result<BTreeMap<String, f64>> {
    let data = prom(
        addr,
        &format!(
            "/api/v1/query?query={}",
            enc("sum by (kind, event) (ca_authority_events_total)")
        ),
    )
    .await?;
    let mut out = BTreeMap::new();
    for s in data["result"].as_array().cloned().unwrap_or_default() {
        let key = format!(
            "{} {}",
            s["metric"]["kind"].as_str().unwrap_or("?"),
            s["metric"]["event"].as_str().unwrap_or("?")
        );
        out.insert(key, s["value"][1].as_str().unwrap_or("0").parse()?);
    }
    Ok(out)
}

/// Every panel and annotation query of every dashboard, its variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        let fill = |e: &str| {
            e.replace("$instance", ".*")
                .replace("$agent", ".*")
                .replace("$__rate_interval", "30s")
        };
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    format!("{file}: {}", p["title"].as_str().unwrap_or("?")),
                    fill(t["expr"].as_str().unwrap()),
                ));
            }
        }
        for a in d["annotations"]["list"].as_array().unwrap() {
            if let Some(e) = a["expr"].as_str() {
                out.push((
                    format!("{file}: annotation {}", a["name"].as_str().unwrap_or("?")),
                    fill(e),
                ));
            }
        }
    }
    out
}

/// The metric and recorded-series names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("ca_")
                || word.starts_with("ca:")
                || word.starts_with("process_")
                || word == "up"
            {
                out.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_query_and_rule_has_data_from_a_real_cluster() -> Result<()> {
    let _solo = crate::common::solo().await;
    let test = "observability";
    // A short propagation window, so that a requested JWT key rotation completes here.
    let mut c = Cluster::start_configured(
        test,
        3,
        crate::common::bins(),
        crate::common::mode(test),
        "\n[rotation]\npropagation_window = 3\n",
    )
    .await?;
    let agent = c.start_agent("a1", 0).await?;
    let id = c.register_workload(agent, "w1", 0).await?;
    let endpoint = c.agents[agent].endpoint();
    chaos_tests::load::wait_fetch(&endpoint, &id, Duration::from_secs(60)).await?;
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
    client.fetch_jwt_token(["dashboards"], None).await?;

    // Prometheus beside the agent (its health address is on that host's loopback).
    let prom_dir = c.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let nodes: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("{:?}", n.http_addr))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n  - {:?}\nscrape_configs:\n  - job_name: ca-node\n    static_configs:\n      - targets: [{}]\n  - job_name: agent\n    static_configs:\n      - targets: [{:?}]\n",
        ops().join("prometheus/rules.yml"),
        ops().join("prometheus/alerts.yml"),
        nodes.join(", "),
        c.agents[agent].health_addr,
    );
    std::fs::write(prom_dir.join("prometheus.yml"), config)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let program = which("prometheus")?;
    c.spawn_beside_agents(
        "prometheus",
        &program,
        &[
            format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ),
            format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
    )?;
    let sock = c.nodes[0].admin_socket();
    let c = std::sync::Mutex::new(c);
    let addr = Prom { cluster: &c, port };
    let start = unix_now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match scalar(&addr, "sum(up)").await {
            Ok(v) if v >= 4.0 => break,
            r if Instant::now() > deadline => bail!("Prometheus did not scrape 4 targets: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    say(&format!(
        "[{test}] Prometheus scrapes the 3 nodes and the agent"
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = events(&addr).await?;

    // Rotate every intermediate and JWT key, then revoke node 2's new intermediate.
    for kind in ["intermediate", "jwt"] {
        admin_call(&sock, Duration::from_secs(30), |mut a| async move {
            a.rotate_authority(RotateAuthorityRequest {
                kind: kind.into(),
                node_id: String::new(),
                all: true,
            })
            .await
        })
        .await?;
    }
    let want = [
        ("intermediate prepared", 3.0),
        ("intermediate activated", 3.0),
        ("intermediate retired", 3.0),
        ("jwt prepared", 3.0),
        ("jwt activated", 3.0),
        ("jwt retired", 3.0),
    ];
    wait_events(&addr, &before, &want, Duration::from_secs(90)).await?;
    let status = admin_call(&sock, Duration::from_secs(10), |mut a| async move {
        a.get_ca_status(GetCaStatusRequest {}).await
    })
    .await?;
    let victim = status
        .authorities
        .iter()
        .find(|a| a.kind == "intermediate" && a.state == "active" && a.node_id == "n2")
        .context("n2's active intermediate")?
        .id
        .clone();
    admin_call(&sock, Duration::from_secs(30), |mut a| {
        let id = victim.clone();
        async move {
            a.revoke_authority(RevokeAuthorityRequest {
                id,
                kind: "intermediate".into(),
            })
            .await
        }
    })
    .await?;
    wait_events(
        &addr,
        &before,
        &[
            ("intermediate revoked", 1.0),
            ("intermediate activated", 4.0),
        ],
        Duration::from_secs(60),
    )
    .await?;
    // Fresh data for the rate() windows and the recording rules.
    client.fetch_jwt_token(["dashboards-again"], None).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Every panel and annotation query returns data over the run.
    let mut empty = Vec::new();
    let queries = dashboard_queries();
    for (what, expr) in &queries {
        match range(&addr, expr, start).await {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => empty.push(format!("{what}: no data: {expr}")),
            Err(e) => empty.push(format!("{what}: {e}")),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    say(&format!(
        "[{test}] {} dashboard queries all return data",
        queries.len()
    ));

    // Every rule was loaded and evaluates without error, and every series a rule reads
    // exists.
    let rules = prom(&addr, "/api/v1/rules").await?;
    let mut n = 0;
    let mut problems = Vec::new();
    // Each series is asked for once, whichever rules read it.
    let mut readers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            n += 1;
            let name = r["name"].as_str().unwrap_or("?");
            if r["health"] != "ok" {
                problems.push(format!("{name}: health {} {}", r["health"], r["lastError"]));
            }
            let query = r["query"].as_str().unwrap_or("");
            for m in metric_names(query) {
                readers.entry(m).or_default().push(name.to_owned());
            }
            if r["type"] == "recording" && range(&addr, name, start).await?.is_empty() {
                problems.push(format!("recording rule {name} recorded nothing"));
            }
        }
    }
    for (m, names) in &readers {
        if range(&addr, &format!("count({m})"), start)
            .await?
            .is_empty()
        {
            problems.push(format!(
                "{}: read {m}, which has no series",
                names.join(", ")
            ));
        }
    }
    assert!(n >= 23, "{n} rules loaded");
    assert!(problems.is_empty(), "rules:\n{}", problems.join("\n"));
    say(&format!(
        "[{test}] {n} recording and alert rules evaluate over existing series"
    ));

    // Nothing fires on a healthy cluster.
    let alerts = prom(&addr, "/api/v1/alerts").await?;
    let firing: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );
    Ok(())
}

/// Waits until every `(kind event, n)` of `want` has grown by at least `n` since `before`.
async fn wait_events(
    addr: &Prom<'_>,
    before: &BTreeMap<String, f64>,
    want: &[(&str, f64)],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = events(addr).await?;
        let missing: Vec<String> = want
            .iter()
            .filter_map(|(k, n)| {
                let grown =
                    now.get(*k).copied().unwrap_or(0.0) - before.get(*k).copied().unwrap_or(0.0);
                (grown < *n).then(|| format!("{k}: +{grown}, want +{n}"))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("rotation events not seen by Prometheus: {missing:?} (all: {now:?})");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found: install the Debian package prometheus (these tests do not skip)"))
}

/// A GET of `path` on `127.0.0.1:port` of the agents' host: (status code, body).
async fn http_get(c: &mut Cluster, port: u16, path: &str) -> Result<(u16, String)> {
    let text = get(c.connect_beside_agents(port)?, path).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// An agent that cannot sync says so on `/readyz` (with how long and why) and in its
/// metrics, and is ready again once a node answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_sync_is_not_ready_and_says_why() -> Result<()> {
    let _solo = crate::common::solo().await;
    let test = "agent-readyz";
    let mut c = Cluster::start(test, 1, crate::common::bins(), crate::common::mode(test)).await?;
    let agent = c.start_agent("a1", 0).await?;
    let port: u16 = c.agents[agent]
        .health_addr
        .rsplit(':')
        .next()
        .unwrap()
        .parse()?;
    let mut seen = (0, String::new());
    for (want, needle) in [(200, "ready"), (503, "no successful sync"), (200, "ready")] {
        if want == 503 {
            c.stop(0)?;
        } else if seen.0 == 503 {
            c.restart(0).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            seen = http_get(&mut c, port, "/readyz").await?;
            if seen.0 == want && seen.1.contains(needle) {
                break;
            }
            if Instant::now() > deadline {
                bail!("/readyz never answered {want} with {needle:?}: last {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        say(&format!("[{test}] /readyz {}: {}", seen.0, seen.1.trim()));
        if want == 503 {
            assert!(seen.1.contains("entry sync"), "the reason: {}", seen.1);
            let (_, metrics) = http_get(&mut c, port, "/metrics").await?;
            assert!(
                metrics.contains("ca_agent_syncs_total{result=\"error\"}"),
                "{metrics}"
            );
        }
    }
    Ok(())
}
