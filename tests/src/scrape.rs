//! Reading a broker's `/metrics` in a test: one `GET` over HTTP/1.1 with a deadline, parsed
//! by a real Prometheus parser.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest one scrape may take.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(30);

/// `GET /metrics` at `addr`, parsed; an error for anything but a 200 answer.
pub async fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: rill\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, anyhow::Error>(String::from_utf8(raw)?)
    };
    let response = tokio::time::timeout(SCRAPE_DEADLINE, fetch)
        .await
        .with_context(|| format!("scraping {addr} within {SCRAPE_DEADLINE:?}"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scraping {addr}: {head}");
    }
    Ok(Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?)
}

/// The sum of the counter or gauge `name` over the samples whose labels include `labels`
/// (0 when there is none).
pub fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a counter or gauge: {other:?}"),
        })
        .sum()
}
