//! `--metrics-listen` read as Prometheus reads it: every line of a scrape
//! is a valid line of the text format 0.0.4, label values are escaped (a
//! cluster id with a quote, a backslash and a newline comes back intact),
//! counters end in `_total` and only grow, and the endpoint stops with the
//! broker (in process, and the real binary after SIGTERM).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use credstream_broker::metrics::{self, MetricsServer};
use credstream_proto::v1::{CredentialKind, publish_request, publish_response};
use credstream_tests::broker::{TestBroker, aws_update};
use credstream_tests::processes::BrokerProcess;
use credstream_tests::wait::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One sample: its series (name and labels, unescaped) and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, checked line by line.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn counters(&self) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(|s| self.types.get(&s.name).map(String::as_str) == Some("counter"))
    }
}

fn is_name(name: &str, first: impl Fn(char) -> bool) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(first)
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_metric_name(name: &str) -> bool {
    is_name(name, |c| c.is_ascii_alphabetic() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    is_name(name, |c| c.is_ascii_alphabetic() || c == '_') && !name.contains(':')
}

/// Reads a quoted label value from the start of `text` (after its opening
/// quote); returns it unescaped and the rest after the closing quote.
fn label_value(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[at + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                other => return Err(format!("bad escape {other:?}")),
            },
            '\n' => return Err("raw newline in a label value".into()),
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// Parses a scrape strictly: `# HELP name text`, `# TYPE name type` (once
/// per name, before its samples), and samples of the family last typed,
/// with valid names, escaped label values, a float value, and no series
/// twice. Panics naming the first bad line.
fn parse(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    let mut family: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        let fail = |why: &str| -> ! { panic!("{why}: {line:?}\nin\n{text}") };
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| fail("HELP text"));
            if !is_metric_name(name) {
                fail("HELP name");
            }
            let mut chars = help.chars();
            while let Some(c) = chars.next() {
                if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                    fail("bad escape in HELP");
                }
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| fail("TYPE kind"));
            if !is_metric_name(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                fail("TYPE line");
            }
            if kind == "counter" && !name.ends_with("_total") {
                fail("a counter not named ..._total");
            }
            if exposition
                .types
                .insert(name.to_owned(), kind.to_owned())
                .is_some()
            {
                fail("TYPE twice");
            }
            family = Some(name.to_owned());
        } else if line.starts_with('#') || line.is_empty() {
            fail("neither HELP, TYPE nor a sample");
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
            let name = &line[..name_end];
            if !is_metric_name(name) || family.as_deref() != Some(name) {
                fail("a sample outside its family");
            }
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(mut list) = rest.strip_prefix('{') {
                loop {
                    if let Some(after) = list.strip_prefix('}') {
                        rest = after;
                        break;
                    }
                    let (key, after) = list.split_once("=\"").unwrap_or_else(|| fail("label"));
                    if !is_label_name(key) {
                        fail("label name");
                    }
                    let (value, after) = label_value(after).unwrap_or_else(|e| fail(&e));
                    if labels.insert(key.to_owned(), value).is_some() {
                        fail("label twice");
                    }
                    list = after.strip_prefix(',').unwrap_or(after);
                }
            }
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| fail("space before the value"));
            let value: f64 = value.parse().unwrap_or_else(|_| fail("value"));
            if !seen.insert((name.to_owned(), labels.clone())) {
                fail("series twice");
            }
            exposition.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
    }
    exposition
}

/// `GET /metrics` on a connection of its own; the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// A connection that has been answered once and is left open (keep-alive),
/// as Prometheus leaves its scrape connections.
async fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    stream
}

/// Waits until the connection is closed by the server (EOF or reset).
async fn closed_by_server(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(credstream_tests::broker::WAIT, stream.read(&mut buf))
        .await
        .expect("the metrics server closes its idle connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the idle connection received data: {read:?}"
    );
}

async fn serve(broker: &TestBroker) -> MetricsServer {
    metrics::serve("127.0.0.1:0".parse().unwrap(), broker.broker.hub.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_scrape_is_strict_exposition_with_escaped_labels_and_growing_counters() {
    let broker = TestBroker::start().await;
    let addr = serve(&broker).await.local_addr;
    // Every punctuation mark a cluster id may carry, through the service.
    let cluster = "team.a_b-1";
    let mut publisher = broker
        .publisher(cluster, &[CredentialKind::Aws], false)
        .await;
    let request = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::RefreshRequest(r)) => Some(r.clone()),
            _ => None,
        })
        .await;
    let mut update = aws_update("exposition", Duration::from_secs(3600));
    update.refresh_request_id = request.id;
    publisher
        .send(publish_request::Message::Credential(update))
        .await;
    // The service refuses ids like this one; the exposition must still
    // escape whatever the hub holds.
    let hostile = "quote\"back\\slash\nnew line}";
    broker.broker.hub.cluster(hostile);

    let fulfilled = [
        ("cluster", cluster),
        ("reason", "missing"),
        ("outcome", "fulfilled"),
    ];
    let first = eventually("the credential counted as fulfilled", || async {
        let first = parse(&scrape(addr).await);
        first
            .value("credstream_refresh_total", &fulfilled)
            .is_some()
            .then_some(first)
    })
    .await;
    assert_eq!(first.value("credstream_clusters", &[]), Some(2.0));
    assert_eq!(
        first.value("credstream_agents_connected", &[("cluster", hostile)]),
        Some(0.0),
        "the hostile id comes back intact: {first:?}"
    );
    assert_eq!(
        first.value("credstream_publisher_connected", &[("cluster", cluster)]),
        Some(1.0)
    );
    assert!(
        first
            .value(
                "credstream_credential_expiry_timestamp_seconds",
                &[("cluster", cluster), ("kind", "aws")]
            )
            .is_some_and(|at| at > 1.0e9),
        "{first:?}"
    );
    for (name, kind) in [
        ("credstream_clusters", "gauge"),
        ("credstream_clusters_dropped_total", "counter"),
        ("credstream_takeovers_total", "counter"),
        ("credstream_takeovers_refused_total", "counter"),
        ("credstream_refresh_total", "counter"),
        ("credstream_cluster_version", "gauge"),
        ("credstream_access_end_timestamp_seconds", "gauge"),
    ] {
        assert_eq!(
            first.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    assert_eq!(
        first.value("credstream_takeovers_total", &[("cluster", cluster)]),
        Some(0.0)
    );

    // A second publisher takes the cluster over: the takeover counter
    // grows, and no counter goes down.
    let _second = broker
        .publisher(cluster, &[CredentialKind::Aws], false)
        .await;
    publisher.ended_with().await;
    let second = eventually("the takeover counted", || async {
        let second = parse(&scrape(addr).await);
        (second.value("credstream_takeovers_total", &[("cluster", cluster)]) == Some(1.0))
            .then_some(second)
    })
    .await;
    for counter in first.counters() {
        let labels: Vec<(&str, &str)> = counter
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let now = second.value(&counter.name, &labels);
        assert!(
            now.is_some_and(|now| now >= counter.value),
            "{} {:?} went from {} to {now:?}",
            counter.name,
            counter.labels,
            counter.value
        );
    }
}

#[tokio::test]
async fn the_metrics_endpoint_closes_when_the_broker_shuts_down() {
    let broker = TestBroker::start().await;
    let metrics = serve(&broker).await;
    let addr = metrics.local_addr;
    parse(&scrape(addr).await);
    let idle = idle_connection(addr).await;

    broker.broker.shutdown().await;
    // The listener closes on the broker's shutdown signal, not when this
    // test drops the server handle (it holds it until the end).
    eventually("the metrics port to refuse connections", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    closed_by_server(idle).await;
    metrics.stopped(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_closes_its_metrics_port_on_sigterm() {
    let mut broker = BrokerProcess::start_dev_with(&["--metrics-listen", "127.0.0.1:0"]).await;
    let addr: SocketAddr = broker
        .process
        .stdout()
        .lines()
        .find_map(|l| {
            l.strip_prefix("metrics on http://")
                .and_then(|rest| rest.strip_suffix("/metrics"))
                .map(str::to_owned)
        })
        .expect("the broker prints the metrics address")
        .parse()
        .unwrap();
    parse(&scrape(addr).await);
    let idle = idle_connection(addr).await;

    broker.process.signal("TERM");
    closed_by_server(idle).await;
    let status = broker.process.exit().await;
    assert!(status.success(), "{}", broker.process.output());
    // It stopped on the signal, before the process ended.
    assert!(
        broker
            .process
            .stderr()
            .lines()
            .any(|l| l.contains("metrics endpoint stopped")),
        "{}",
        broker.process.output()
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the metrics port still accepts connections"
    );
}
