//! Reading a service's `/metrics`, `/healthz` and `/readyz` in tests: a plain HTTP/1.1 GET
//! over a TCP stream (the endpoint is ours and answers with a Content-Length), and the
//! Prometheus text parsed by `prometheus-parse`.

use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET base + path`: the status code and the body, or an error if nothing answers.
pub async fn http_get(base: &str, path: &str) -> std::io::Result<(u16, String)> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let io = async {
        let mut stream = TcpStream::connect(host).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// Scrapes and parses `/metrics`; panics if it does not answer 200 or does not parse.
pub async fn scrape(base: &str) -> Metrics {
    let (status, body) = http_get(base, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("scraping {base}/metrics: {e}"));
    assert_eq!(status, 200, "{base}/metrics answered {status}: {body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = Scrape::parse(lines).unwrap_or_else(|e| panic!("unparseable metrics: {e}"));
    Metrics { scrape, text: body }
}

/// One parsed scrape.
pub struct Metrics {
    pub scrape: Scrape,
    /// The raw text, for failure messages.
    pub text: String,
}

impl Metrics {
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.scrape.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The value of a counter or gauge with these labels (summed over other labels); 0 when
    /// the series does not exist yet (counters appear on their first increment). Panics if
    /// the series exists with another type.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name} is not a counter or gauge: {other:?}"),
            })
            .sum()
    }

    /// Whether a series of this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.scrape.samples.iter().any(|s| s.metric == name)
    }

    /// How many observations a histogram holds (its `+Inf` bucket); 0 when absent. Panics if
    /// the series exists and is not a histogram.
    pub fn histogram_count(&self, name: &str) -> f64 {
        self.matching(name, &[])
            .map(|s| match &s.value {
                Value::Histogram(buckets) => {
                    assert!(buckets.len() > 2, "{name} has too few buckets: {buckets:?}");
                    buckets
                        .iter()
                        .find(|b| b.less_than.is_infinite())
                        .map_or(0.0, |b| b.count)
                }
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    }
}
