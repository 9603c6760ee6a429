//! Bad input at the process level: random bytes to every port, and
//! hundreds of connections that send nothing (half-open, slowloris). The
//! node keeps serving real clients meanwhile, closes the silent
//! connections after its timeouts, and its memory stays bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::{run_with_timeout, TestNode};
use common::{have_tool, text};
use rand::RngCore;

/// Silent connections held on each port.
const SILENT_CONNECTIONS: usize = 300;
/// Connections that send random bytes, per port.
const NOISY_CONNECTIONS: usize = 40;

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn healthz(node: &TestNode) -> bool {
    ureq::get(&format!("{}/healthz", node.api_url()))
        .timeout(Duration::from_secs(5))
        .call()
        .is_ok_and(|response| response.status() == 200)
}

fn nbd_ok(node: &TestNode) -> bool {
    run_with_timeout(Command::new("nbdinfo").arg(node.uri("vol")), Duration::from_secs(60))
        .status
        .success()
}

/// Sends random bytes (some starting like the real protocol) to `address`.
fn spray(address: &str, rng: &mut impl RngCore) {
    for round in 0..NOISY_CONNECTIONS {
        let Ok(mut stream) = TcpStream::connect(address) else {
            continue;
        };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut bytes = vec![0u8; 64 + (round * 997) % 8192];
        rng.fill_bytes(&mut bytes);
        match round % 4 {
            // NBD's client flags, then garbage options.
            0 => bytes[..4].copy_from_slice(&1u32.to_be_bytes()),
            // An HTTP request line, then garbage headers.
            1 => bytes[..16].copy_from_slice(b"GET / HTTP/1.1\r\n"),
            // A TLS ClientHello record header, then garbage.
            2 => bytes[..3].copy_from_slice(&[0x16, 0x03, 0x01]),
            _ => {}
        }
        let _ = stream.write_all(&bytes);
        let mut sink = [0u8; 4096];
        let _ = stream.read(&mut sink);
    }
}

#[test]
fn random_bytes_and_hundreds_of_silent_connections_leave_the_node_serving() {
    let test = "random_bytes_and_hundreds_of_silent_connections";
    if !have_tool(test, "nbdinfo") {
        return;
    }
    // The test holds about a thousand sockets.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let node = TestNode::start(test, 256 << 20);
    node.create_volume("vol", "64MiB");
    assert!(nbd_ok(&node) && healthz(&node), "the control");
    let rss_before = resident_kib(node.pid());
    let addresses = [
        format!("{}:{}", node.host, node.api_port),
        format!("{}:{}", node.host, node.nbd_port),
        node.peer_address(),
    ];

    let mut rng = rand::thread_rng();
    for address in &addresses {
        spray(address, &mut rng);
    }
    assert!(nbd_ok(&node), "NBD after random bytes: {}", node.log_text());
    assert!(healthz(&node), "API after random bytes");

    // Silent connections on every port; real clients still get through.
    let mut silent = Vec::new();
    for address in &addresses {
        for _ in 0..SILENT_CONNECTIONS {
            if let Ok(stream) = TcpStream::connect(address) {
                silent.push(stream);
            }
        }
    }
    assert!(
        silent.len() >= 3 * SILENT_CONNECTIONS * 9 / 10,
        "{} connected",
        silent.len()
    );
    assert!(nbd_ok(&node), "NBD with {} silent connections open", silent.len());
    // The API admits at most 256 at once: once the silent ones time out
    // (10 s without request headers), it answers again.
    let started = Instant::now();
    while !healthz(&node) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the API never recovered from silent connections"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every silent connection is closed by the node within its timeouts
    // (API 10 s, peer and NBD handshakes 30 s): reads see EOF or a reset.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut still_open = 0;
    for stream in &mut silent {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        stream.set_read_timeout(Some(left)).unwrap();
        let mut bytes = [0u8; 512];
        loop {
            match stream.read(&mut bytes) {
                Ok(0) => break,
                // NBD greets first; keep reading until the node closes.
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    still_open += 1;
                    break;
                }
                Err(_) => break, // reset: closed
            }
        }
    }
    assert_eq!(still_open, 0, "silent connections still open past every timeout");
    drop(silent);

    assert!(nbd_ok(&node), "NBD at the end");
    assert!(healthz(&node), "API at the end");
    let rss_after = resident_kib(node.pid());
    assert!(
        rss_after < rss_before + 256 * 1024,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let status = node.cli(&["volume", "inspect", "vol"]);
    assert!(status.status.success(), "{}", text(&status));
}

/// Up to `count` connections to `address` that send nothing, opened
/// until `deadline` (each connect waits at most 5 s).
fn open_silent(address: &str, count: usize, deadline: Instant) -> Vec<TcpStream> {
    let address: std::net::SocketAddr = address.parse().unwrap();
    let mut silent = Vec::with_capacity(count);
    while silent.len() < count && Instant::now() < deadline {
        if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            silent.push(stream);
        }
    }
    silent
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
fn ten_thousand_silent_connections_do_not_lock_real_clients_out() {
    const FLOOD: usize = 10_000;
    /// Silent connections to the API port (its slots: 256).
    const API_FLOOD: usize = 2_000;
    let test = "ten_thousand_silent_connections";
    if !have_tool(test, "nbdinfo") {
        return;
    }
    // The test holds every connection open: it needs that many descriptors.
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let wanted = ((FLOOD + API_FLOOD) as u64 + 1024).min(hard);
    if soft < wanted {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, wanted, hard).unwrap();
    }
    let flood = usize::try_from(wanted)
        .unwrap()
        .saturating_sub(1024 + API_FLOOD)
        .min(FLOOD);
    if flood < FLOOD {
        common::record_skip(
            &format!("{test} (full flood)"),
            &format!("RLIMIT_NOFILE hard limit {hard}: flooding with {flood} connections"),
        );
    }
    let node = TestNode::start(test, 256 << 20);
    node.create_volume("vol", "16MiB");
    assert!(nbd_ok(&node), "the control");
    let rss_before = resident_kib(node.pid());
    let fds_before = open_fds(node.pid());
    let started = Instant::now();
    let silent = open_silent(
        &format!("127.0.0.1:{}", node.nbd_port),
        flood,
        started + Duration::from_secs(180),
    );
    assert!(
        silent.len() >= flood * 9 / 10,
        "only {} of {flood} connections opened",
        silent.len()
    );
    // Every slot is taken by silent connections, yet a real client gets in
    // (it evicts the oldest silent one) and is served.
    assert!(
        nbd_ok(&node),
        "NBD with {} silent connections: {}",
        silent.len(),
        node.log_text()
    );
    assert!(healthz(&node), "API during the flood");
    let rss_during = resident_kib(node.pid());
    assert!(
        rss_during < rss_before + 256 * 1024,
        "resident memory grew from {rss_before} KiB to {rss_during} KiB with {} connections",
        silent.len()
    );
    let fds_during = open_fds(node.pid());
    assert!(
        fds_during <= fds_before + 1100,
        "the node holds {fds_during} descriptors (had {fds_before}): more than its connection limit"
    );
    assert!(node.log_text().contains("closed the oldest one still in its handshake"));
    // The same on the API port: silent sockets past its slots, and a real request still answered.
    let api_silent = open_silent(
        node.api_url().trim_start_matches("http://"),
        API_FLOOD,
        started + Duration::from_secs(240),
    );
    assert!(
        api_silent.len() >= API_FLOOD * 9 / 10,
        "only {} API connections opened",
        api_silent.len()
    );
    assert!(healthz(&node), "API with {} silent API connections", api_silent.len());
    assert!(nbd_ok(&node), "NBD with both floods");
    drop(api_silent);
    drop(silent);
    // The flood's connections go (closed by the clients, evicted or timed out).
    common::cluster::wait_until("the node lets go of the flood's connections", || {
        open_fds(node.pid()) <= fds_before + 16
    });
    assert!(nbd_ok(&node), "NBD after the flood");
}
