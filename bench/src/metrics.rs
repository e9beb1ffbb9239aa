//! A scrape of the node's Prometheus `/metrics`: enough of the text format to read
//! counters and histogram sums, and a minimal HTTP/1.1 GET to fetch it.

use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One scrape: `(metric name, label text without braces, value)` per sample.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    /// Parses the Prometheus text exposition format (comments and blank lines skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_owned(), labels.to_owned(), value))
            })
            .collect();
        Self { samples }
    }

    /// The sum of every sample of `name` whose labels contain `label` (e.g.
    /// `result="ok"`; empty matches all).
    pub fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// GETs `http://addr/metrics` and parses it.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the node's metrics at {addr}"))?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer from /metrics")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "/metrics answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(Scrape::parse(&dechunk(body)));
    }
    Ok(Scrape::parse(body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_and_histogram_sums() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE ca_x509_svids_issued_total counter\n\
             ca_x509_svids_issued_total{result=\"ok\"} 120\n\
             ca_x509_svids_issued_total{result=\"error\"} 3\n\
             ca_keymanager_sign_seconds_sum{backend=\"soft\"} 0.25\n\
             up 1\n",
        );
        assert_eq!(s.sum("ca_x509_svids_issued_total", "result=\"ok\""), 120.0);
        assert_eq!(s.sum("ca_x509_svids_issued_total", ""), 123.0);
        assert_eq!(s.sum("ca_keymanager_sign_seconds_sum", ""), 0.25);
        assert_eq!(s.sum("up", ""), 1.0);
        assert_eq!(s.sum("missing", ""), 0.0);
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
