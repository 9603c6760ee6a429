//! NBD_FLAG_CAN_MULTI_CONN promises that connections to one export see one
//! another's acknowledged writes, and that a FLUSH on any connection makes
//! every write acknowledged before it durable. Checked with raw connections
//! interleaved request by request, then across a kill -9.

mod common;

use std::time::Duration;

use common::nbd::NbdClient;
use common::node::TestNode;
use node::nbd::proto;

/// A raw connection; every request must get an answer.
struct Client(NbdClient);

impl Client {
    fn connect(node: &TestNode, volume: &str) -> Self {
        let client =
            NbdClient::connect(&format!("127.0.0.1:{}", node.nbd_port), volume, Duration::from_secs(10)).unwrap();
        assert_ne!(client.flags & proto::TFLAG_CAN_MULTI_CONN, 0);
        Self(client)
    }

    /// Sends one request and returns (error, data) of its simple reply.
    fn request(&mut self, command: u16, offset_bytes: u64, length_bytes: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.0.request(command, offset_bytes, length_bytes, payload).unwrap()
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) {
        let len = u32::try_from(data.len()).unwrap();
        assert_eq!(self.request(proto::CMD_WRITE, offset_bytes, len, data).0, 0);
    }

    fn read(&mut self, offset_bytes: u64, length_bytes: u32) -> Vec<u8> {
        let (error, data) = self.request(proto::CMD_READ, offset_bytes, length_bytes, &[]);
        assert_eq!(error, 0);
        data
    }
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| u8::try_from(i % 251).unwrap().wrapping_add(seed))
        .collect()
}

#[test]
fn connections_see_each_others_acknowledged_writes_and_flushes() {
    let mut node = TestNode::start("multi_conn_consistency", 256 << 20);
    node.create_volume("shared", "64MiB");
    let mut a = Client::connect(&node, "shared");
    let mut b = Client::connect(&node, "shared");
    let mut c = Client::connect(&node, "shared");
    for round in 0..64u8 {
        let offset = u64::from(round) * 8192;
        let writer = match round % 3 {
            0 => &mut a,
            1 => &mut b,
            _ => &mut c,
        };
        writer.write(offset, &block(round));
        // The very next request, on another connection, sees it.
        let reader = if round % 3 == 0 { &mut b } else { &mut a };
        assert!(reader.read(offset, 4096) == block(round), "round {round}");
    }
    // A trim on one connection is seen as zeroes on another.
    assert_eq!(a.request(proto::CMD_TRIM, 0, 8192, &[]).0, 0);
    assert!(c.read(0, 8192).iter().all(|&b| b == 0));
    // Unaligned write on one, read on the other.
    b.write(8192 + 1000, b"across connections");
    assert_eq!(&a.read(8192 + 1000, 18), b"across connections");
    // FLUSH on a connection that wrote nothing covers the others' writes.
    assert_eq!(c.request(proto::CMD_FLUSH, 0, 0, &[]).0, 0);
    drop((a, b, c));
    node.kill9();
    node.restart();
    let mut d = Client::connect(&node, "shared");
    for round in 1..64u8 {
        let offset = u64::from(round) * 8192;
        let expected = if round == 1 {
            let mut patched = block(1);
            patched[1000..1018].copy_from_slice(b"across connections");
            patched
        } else {
            block(round)
        };
        assert!(d.read(offset, 4096) == expected, "round {round} after kill -9");
    }
}
