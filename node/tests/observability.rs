//! Situational awareness on real processes: `/metrics` (checked by
//! Prometheus's own parser, `promtool check metrics`), counters that move
//! when a client writes, health endpoints, and the Grafana dashboard and
//! alert rules in `deploy/` referring only to metrics a live cluster serves.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use common::cluster::{wait_until, TestCluster};
use common::node::TestNode;
use common::{have_tool, text};

fn get(node: &TestNode, path: &str) -> (u16, String) {
    let url = format!("{}{path}", node.api_url());
    match ureq::get(&url)
        .set("authorization", &format!("Bearer {}", node.token()))
        .call()
    {
        Ok(response) => (response.status(), response.into_string().unwrap()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap_or_default()),
        Err(error) => panic!("GET {url}: {error}"),
    }
}

fn scrape(node: &TestNode) -> String {
    let (status, body) = get(node, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Samples of a scrape: "name{labels}" → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (key, value) = line.rsplit_once(' ').expect("name value");
            (key.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// Metric names (sample names without labels) of a scrape.
fn names(text: &str) -> BTreeSet<String> {
    samples(text)
        .keys()
        .map(|key| key.split('{').next().unwrap().to_owned())
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

/// Every `ballast_*` / `process_*` name a PromQL text mentions.
fn metric_names_in(query: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = query.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &query[at..];
        let starts = (rest.starts_with("ballast_") || rest.starts_with("process_"))
            && (at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_'));
        if starts {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            found.insert(rest[..len].to_owned());
            at += len;
        } else {
            at += 1;
        }
    }
    found
}

fn promtool_accepts(test: &str, scraped: &str) {
    if !have_tool(test, "promtool") {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(scraped.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    // A parse error fails. Lint findings are advice; the only one allowed is
    // that a counter's `_total` samples carry no HELP of their own (the
    // OpenMetrics format puts HELP on the family name, the classic parser
    // promtool uses looks for it under the sample name).
    let report = text(&output);
    assert!(
        !report.contains("error while") && !report.contains("parsing error"),
        "promtool check metrics: {report}\n{scraped}"
    );
    for finding in report.lines().filter(|line| !line.trim().is_empty()) {
        let counter_without_help = finding.ends_with("_total no help text");
        assert!(counter_without_help, "promtool check metrics: {finding}\n{report}");
    }
}

/// A real Prometheus scrapes the node until it holds `query`'s series.
fn prometheus_scrapes(test: &str, node: &TestNode, query: &str) {
    if !have_tool(test, "prometheus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = node.api_url().trim_start_matches("http://").to_owned();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ballast\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
        node.token_file().display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web = listener.local_addr().unwrap().to_string();
    drop(listener);
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://{web}/api/v1/query");
    let mut answer = String::new();
    let started = std::time::Instant::now();
    let found = loop {
        if let Ok(response) = ureq::get(&url).query("query", query).call() {
            answer = response.into_string().unwrap_or_default();
            let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            if parsed["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break true;
            }
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    assert!(found, "prometheus never held {query}: {answer}\n{log}");
}

#[test]
fn metrics_parse_move_with_client_io_and_cover_the_dashboard_and_alert_rules() {
    let test = "metrics_parse_move_with_client_io";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    for node in &cluster.nodes {
        assert_eq!(get(node, "/healthz").0, 200);
        wait_until("the node is ready", || get(node, "/readyz").0 == 200);
    }
    cluster.nodes[0].cli_ok(&["volume", "create", "m", "--size", "16MiB", "--repl", "3"]);
    let before = samples(&scrape(&cluster.nodes[0]));
    let output = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 7 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 7 0 1M",
            &cluster.nodes[0].uri("m"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success() && !text(&output).contains("failed"),
        "{}",
        text(&output)
    );
    let scraped = scrape(&cluster.nodes[0]);
    promtool_accepts(test, &scraped);
    let after = samples(&scraped);
    let moved = |key: &str| value(&after, key) - value(&before, key);
    assert!(
        moved(r#"ballast_volume_requests_total{volume="m",op="write"}"#) >= 1.0,
        "{scraped}"
    );
    assert!(
        moved(r#"ballast_volume_io_bytes_total{volume="m",op="write"}"#) >= 1048576.0,
        "{scraped}"
    );
    assert!(
        moved(r#"ballast_volume_io_bytes_total{volume="m",op="read"}"#) >= 1048576.0,
        "{scraped}"
    );
    assert!(
        moved(r#"ballast_volume_requests_total{volume="m",op="flush"}"#) >= 1.0,
        "{scraped}"
    );
    assert!(moved(r#"ballast_volume_request_duration_seconds_count{volume="m",op="write"}"#) >= 1.0);
    assert!(moved(r#"ballast_volume_replication_duration_seconds_count{volume="m"}"#) >= 1.0);
    assert_eq!(value(&after, r#"ballast_volume_replicas_in_sync{volume="m"}"#), 3.0);
    // The replicas serve the coordinator's peer connection on their reactors
    // (they have no client of their own to host).
    // and learn that those sockets are ready from the reactor's ring, as the
    // coordinator does for its NBD client's.
    for replica in &cluster.nodes[1..] {
        let scraped = samples(&scrape(replica));
        let hosted = value(&scraped, "ballast_reactor_guests_hosted_total");
        assert!(
            hosted >= 1.0,
            "peer connections served on a replica's reactor: {hosted}"
        );
        for counter in [
            "ballast_reactor_sockets_moved_total",
            "ballast_reactor_socket_polls_total",
        ] {
            let counted = value(&scraped, counter);
            assert!(counted >= 1.0, "{counter} on a replica: {counted}");
        }
    }
    for counter in [
        "ballast_reactor_sockets_moved_total",
        "ballast_reactor_socket_polls_total",
    ] {
        let counted = value(&after, counter);
        assert!(counted >= 1.0, "{counter} on the coordinator serving NBD: {counted}");
    }
    // One link to each replica's node, made for the reactor that serves the
    // volume (its disk's), not one shared by every core.
    let links: Vec<(&String, &f64)> = after
        .iter()
        .filter(|(name, _)| name.starts_with("ballast_peer_links{"))
        .collect();
    assert_eq!(links.len(), 2, "a link to each of the two replicas: {links:?}");
    for (name, count) in &links {
        assert_eq!(**count, 1.0, "{name}");
        assert!(
            !name.contains(r#"reactor="none""#),
            "a replicated volume's link belongs to its reactor: {name}"
        );
    }
    assert_eq!(
        value(&after, r#"ballast_volume_errors_total{volume="m",op="write"}"#),
        0.0
    );
    assert!(value(&after, "process_resident_memory_bytes") > 0.0);
    prometheus_scrapes(
        test,
        &cluster.nodes[0],
        r#"ballast_volume_requests_total{volume="m",op="write"} >= 1"#,
    );

    // Status has the depth an operator needs.
    let status = json_of(&cluster.nodes[1], &["status", "--json"]);
    let volume = &status["volumes"][0];
    assert!(volume["used_bytes"].as_u64().unwrap() >= 1 << 20, "{volume:#}");
    let nbd = volume["nbd_address"].as_str().unwrap();
    assert!(!nbd.is_empty() && cluster.nodes[0].uri("m").contains(nbd), "{volume:#}");
    for node in status["nodes"].as_array().unwrap() {
        assert!(!node["version"].as_str().unwrap().is_empty(), "{node:#}");
        assert!(node["cores"].as_u64().unwrap() >= 1, "{node:#}");
        assert_eq!(node["disks"].as_array().unwrap().len(), 1, "{node:#}");
    }
    let screen = cluster.nodes[1].cli_ok(&["status"]);
    assert!(
        screen.contains("HEALTHY") && screen.contains("no active alerts"),
        "{screen}"
    );
    let id = cluster.nodes[0].node_id().to_string();
    let inspected = json_of(&cluster.nodes[2], &["node", "inspect", &id, "--json"]);
    assert_eq!(
        inspected["replicas"][0],
        serde_json::json!(["m", "coordinator"]),
        "{inspected:#}"
    );
    assert!(!cluster.nodes[2].cli(&["node", "inspect", "12345"]).status.success());

    // Every metric the dashboard and the alert rules query is served by some node.
    let mut served = BTreeSet::new();
    for node in &cluster.nodes {
        served.extend(names(&scrape(node)));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/ballast.json")).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names_in(target["expr"].as_str().unwrap()));
        }
    }
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    for line in rules.lines().filter(|line| line.trim_start().starts_with("expr:")) {
        queried.extend(metric_names_in(line));
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}\nserved: {served:?}"
    );
}

/// A one-endpoint HTTP server on 127.0.0.1 that keeps every POSTed body.
struct Webhook {
    address: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&bodies);
        // Ends with the test process; accepts are bounded by what the nodes send.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; length.min(1 << 20)];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(value) = serde_json::from_slice(&body) {
                        kept.lock().unwrap().push(value);
                    }
                }
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        Self { address, bodies }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// Whether some POST listed `key` under `field` (raised: objects with a key; cleared: keys).
    fn saw(&self, field: &str, key: &str) -> bool {
        self.bodies.lock().unwrap().iter().any(|body| {
            body[field].as_array().is_some_and(|items| {
                items.iter().any(|item| {
                    item.as_str() == Some(key) || item["key"].as_str() == Some(key) || {
                        let kind = item["kind"].as_str().unwrap_or_default();
                        let subject = item["subject"].as_str().unwrap_or_default();
                        format!("{kind}:{subject}") == key
                    }
                })
            })
        })
    }
}

fn json_of(node: &TestNode, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(args)).unwrap()
}

fn active_alert_keys(node: &TestNode) -> Vec<String> {
    json_of(node, &["alerts", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|alert| alert["key"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_killed_node_shows_down_with_its_volume_degraded_and_alerts_raised_then_cleared_on_return() {
    let test = "a_killed_node_raises_alerts";
    let webhook = Webhook::start();
    let url = webhook.url();
    let extra: &[&str] = &["--alert-webhook", &url, "--log-format", "json", "--log-level", "debug"];
    let mut cluster = TestCluster::start(test, 3, &[extra, extra, extra]);
    let token = cluster.token(0, "10m");
    cluster.nodes[0].cli_ok(&["volume", "create", "a", "--size", "16MiB", "--repl", "3"]);
    let initial = active_alert_keys(&cluster.nodes[0]);
    assert!(initial.is_empty(), "{initial:?}");
    let down = cluster.nodes[2].node_id();

    cluster.nodes[2].kill9();
    let node_down = format!("node_down:{down}");
    wait_until("the node shows down, its volume degraded, alerts raised", || {
        let status = json_of(&cluster.nodes[0], &["status", "--json"]);
        let node_is_down = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|node| node["id"].as_u64() == Some(down) && node["up"] == false);
        let degraded = status["volumes"][0]["health"] == "degraded";
        let keys = active_alert_keys(&cluster.nodes[0]);
        node_is_down && degraded && keys.contains(&node_down) && keys.contains(&"volume_degraded:a".to_owned())
    });
    let screen = cluster.nodes[0].cli_ok(&["status"]);
    assert!(screen.contains("ACTIVE") && screen.contains(&node_down), "{screen}");
    let inspected = json_of(&cluster.nodes[0], &["volume", "inspect", "a", "--json"]);
    assert_eq!(inspected["health"], "degraded", "{inspected:#}");
    assert_eq!(inspected["replicas_down"], serde_json::json!([down]), "{inspected:#}");
    assert_eq!(inspected["alerts"][0]["key"], "volume_degraded:a", "{inspected:#}");
    let node_view = json_of(&cluster.nodes[0], &["node", "inspect", &down.to_string(), "--json"]);
    assert_eq!(node_view["alerts"][0]["key"], node_down.as_str(), "{node_view:#}");
    wait_until("the webhook heard of it", || webhook.saw("raised", &node_down));

    cluster.nodes[2].restart();
    wait_until("the alerts clear and the volume is healthy again", || {
        let status = json_of(&cluster.nodes[0], &["status", "--json"]);
        status["volumes"][0]["health"] == "healthy" && active_alert_keys(&cluster.nodes[0]).is_empty()
    });
    let all = json_of(&cluster.nodes[1], &["alerts", "--all", "--json"]);
    let recorded = all
        .as_array()
        .unwrap()
        .iter()
        .find(|alert| alert["key"] == node_down.as_str())
        .expect("the cleared alert is kept");
    assert!(recorded["cleared_unix"].as_u64().unwrap() >= recorded["first_seen_unix"].as_u64().unwrap());
    wait_until("the webhook heard it clear", || webhook.saw("cleared", &node_down));

    // Every log line is JSON, and no secret is in any log.
    let secret = token.rsplit('.').next().unwrap().to_owned();
    assert!(secret.len() >= 16, "{token}");
    for node in &cluster.nodes {
        let log = node.log_text();
        assert!(log.lines().count() > 10, "{log}");
        for line in log.lines().filter(|line| !line.trim().is_empty()) {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "not a JSON log line: {line}"
            );
        }
        assert!(!log.contains(&secret), "a join token's secret is in a log");
    }
}

#[test]
fn volume_latency_gives_server_side_percentiles_of_the_requests_served_and_resets_them() {
    let test = "volume_latency";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 2, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "lat", "--size", "16MiB", "--repl", "2"]);
    let coordinator = cluster.nodes[0].inspect("lat")["coordinator"].as_u64().unwrap();
    let serving_index = cluster.index_of(coordinator);
    let (serving, other) = (&cluster.nodes[serving_index], &cluster.nodes[1 - serving_index]);
    let empty = json_of(serving, &["volume", "latency", "lat", "--json"]);
    assert_eq!(empty["ops"].as_array().unwrap().len(), 0, "{empty}");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for block in 0..16 {
        args.extend(["-c".into(), format!("write -P 7 {} 4k", block * 4096)]);
    }
    args.extend(["-c".into(), "flush".into(), "-c".into(), "read -P 7 0 64k".into()]);
    args.push(serving.uri("lat"));
    let output = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(
        output.status.success() && !text(&output).contains("failed"),
        "{}",
        text(&output)
    );
    let latency = json_of(serving, &["volume", "latency", "lat", "--json"]);
    assert_eq!(latency["node_id"].as_u64(), Some(coordinator));
    let op = |name: &str| {
        latency["ops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|op| op["op"] == name)
            .unwrap_or_else(|| panic!("no {name} in {latency}"))
            .clone()
    };
    let write = op("write");
    assert_eq!(write["count"].as_u64(), Some(16), "{latency}");
    let micros = |key: &str| write[key].as_u64().unwrap();
    assert!(micros("p50_us") >= 1, "{write}");
    assert!(micros("p50_us") <= micros("p90_us") && micros("p90_us") <= micros("p99_us"));
    assert!(micros("p99_us") <= micros("p99_9_us") && micros("p99_9_us") <= micros("max_us"));
    assert!(op("flush")["count"].as_u64().unwrap() >= 1, "{latency}");
    assert!(op("read")["count"].as_u64().unwrap() >= 1, "{latency}");
    // The table, then a fresh start.
    let table = serving.cli_ok(&["volume", "latency", "lat", "--reset"]);
    assert!(
        table.contains("p99.9") && table.lines().any(|l| l.starts_with("write") && l.contains(" 16 ")),
        "{table}"
    );
    let after_reset = json_of(serving, &["volume", "latency", "lat", "--json"]);
    assert_eq!(after_reset["ops"].as_array().unwrap().len(), 0, "{after_reset}");
    // A node holding only a replica serves no requests, and says where to ask.
    let refused = other.cli(&["volume", "latency", "lat"]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("not served on this node"), "{}", text(&refused));
    let unknown = serving.cli(&["volume", "latency", "nope"]);
    assert!(!unknown.status.success(), "{}", text(&unknown));

    // I/O limits: set through the node that does not serve the volume
    // (kept in Raft), paced where it is served, counted as throttled.
    let refused = other.cli(&["volume", "update", "lat", "--iops-limit", "0"]);
    assert!(
        !refused.status.success() && text(&refused).contains("1 to"),
        "{}",
        text(&refused)
    );
    other.cli_ok(&["volume", "update", "lat", "--iops-limit", "50", "--io-priority", "high"]);
    let shown = serving.cli_ok(&["volume", "inspect", "lat"]);
    assert!(
        shown.contains("priority high; at most 50 IOPS, no MiB/s limit"),
        "{shown}"
    );
    let status = other.cli_ok(&["status"]);
    assert!(status.contains("high 50iops"), "{status}");
    let throttled = || {
        value(
            &samples(&scrape(serving)),
            "ballast_volume_throttled_requests_total{volume=\"lat\"}",
        )
    };
    // 40 writes at once at 50 per second: all but the burst's few wait (the
    // first round may begin before the serving node applied the limit).
    let writes = |count: u64| {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for block in 0..count {
            args.extend(["-c".into(), format!("aio_write -P 9 {} 4k", block * 4096)]);
        }
        args.extend(["-c".into(), "aio_flush".into(), serving.uri("lat")]);
        let output = Command::new("qemu-io").args(&args).output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
    };
    let mut held = 0.0;
    for _ in 0..5 {
        let before = throttled();
        writes(40);
        held = throttled() - before;
        if held >= 30.0 {
            break;
        }
    }
    assert!(held >= 30.0, "40 writes at 50 IOPS: only {held} waited");
    assert!(
        value(
            &samples(&scrape(serving)),
            "ballast_volume_throttled_seconds_total{volume=\"lat\"}"
        ) > 0.0,
        "the wait is counted"
    );
    // Lifted: no request waits any more.
    other.cli_ok(&["volume", "update", "lat", "--iops-limit", "none"]);
    let mut held = f64::MAX;
    for _ in 0..10 {
        let before = throttled();
        writes(40);
        held = throttled() - before;
        if held == 0.0 {
            break;
        }
    }
    assert_eq!(held, 0.0, "the lifted limit still holds requests back");
    let shown = serving.cli_ok(&["volume", "inspect", "lat"]);
    assert!(shown.contains("priority high; no IOPS limit"), "{shown}");

    // The priority reaches the disks' schedulers on every node holding a
    // copy: the writes since are the `high` class's there, on the replica
    // too (its copies of the writes), and the serving node counts their
    // queue wait (published every 100 ms).
    let class_bytes = |node: &TestNode, class: &str| -> f64 {
        samples(&scrape(node))
            .iter()
            .filter(|(key, _)| {
                key.starts_with("ballast_disk_class_bytes_total{") && key.contains(&format!("class=\"{class}\""))
            })
            .map(|(_, value)| value)
            .sum()
    };
    let scheduled = || {
        value(
            &samples(&scrape(serving)),
            "ballast_volume_scheduled_requests_total{volume=\"lat\"}",
        )
    };
    let mut counted = false;
    for _ in 0..50 {
        if class_bytes(serving, "high") >= 40.0 * 4096.0
            && class_bytes(other, "high") >= 40.0 * 4096.0
            && scheduled() >= 40.0
        {
            counted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        counted,
        "high-class bytes: serving {}, replica {}; scheduled requests {}",
        class_bytes(serving, "high"),
        class_bytes(other, "high"),
        scheduled()
    );
    let scraped = scrape(serving);
    for name in [
        "ballast_disk_class_requests_total",
        "ballast_disk_class_queue_wait_seconds_total",
        "ballast_volume_queue_wait_seconds_total",
    ] {
        assert!(scraped.contains(name), "{name} is missing");
    }
}
