//! One NBD connection with many requests in flight: requests that arrive
//! split at every byte boundary, more at once than the connection runs
//! (it stops reading, then goes on), replies out of order, a write over
//! the maximum. Every request is answered once, with the right data.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::nbd::NbdClient;
use common::node::TestNode;
use node::nbd::proto::{self, Request};
use node::nbd::transmission::IN_FLIGHT_REQUESTS_MAX;

const BLOCK: u32 = 4096;

fn block_of(index: u64) -> Vec<u8> {
    (0..u64::from(BLOCK))
        .map(|i| u8::try_from((i * 7 + index * 13) % 251).unwrap())
        .collect()
}

fn request(command: u16, cookie: u64, offset_bytes: u64, length_bytes: u32) -> Vec<u8> {
    proto::encode_request(&Request {
        flags: 0,
        command,
        cookie,
        offset_bytes,
        length_bytes,
    })
    .to_vec()
}

/// Sends `bytes` in pieces of 1 to 97 bytes, each its own TCP segment.
fn send_in_pieces(stream: &mut TcpStream, bytes: &[u8]) {
    stream.set_nodelay(true).unwrap();
    let mut at = 0;
    let mut size = 1;
    while at < bytes.len() {
        let end = (at + size).min(bytes.len());
        stream.write_all(&bytes[at..end]).unwrap();
        at = end;
        size = size % 97 + 1;
    }
}

/// Reads `expected.len()` simple replies, in whatever order they come;
/// returns each cookie's error and read data. A cookie answered twice or
/// never asked for fails the test.
fn read_replies(stream: &mut TcpStream, expected: &HashMap<u64, (u16, u32)>) -> HashMap<u64, (u32, Vec<u8>)> {
    let mut answers = HashMap::new();
    while answers.len() < expected.len() {
        let mut reply = [0u8; proto::SIMPLE_REPLY_BYTES];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        let &(command, length) = expected
            .get(&cookie)
            .unwrap_or_else(|| panic!("cookie {cookie} never sent"));
        let mut data = Vec::new();
        if command == proto::CMD_READ && error == 0 {
            data = vec![0u8; length as usize];
            stream.read_exact(&mut data).unwrap();
        }
        assert!(
            answers.insert(cookie, (error, data)).is_none(),
            "cookie {cookie} answered twice"
        );
    }
    answers
}

#[test]
fn requests_split_at_every_byte_and_more_than_the_connection_runs_at_once_are_each_answered_once() {
    let node = TestNode::start("nbd_pipelining", 512 << 20);
    node.create_volume("piped", "64MiB");
    let mut client = NbdClient::connect(
        &format!("127.0.0.1:{}", node.nbd_port),
        "piped",
        Duration::from_secs(30),
    )
    .unwrap();
    let stream = client.stream();
    let blocks = u64::from(IN_FLIGHT_REQUESTS_MAX) + 44;
    // Writes: one block each, then one of 1 MiB after them, all sent before any reply is read.
    let big_offset = blocks * u64::from(BLOCK);
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| u8::try_from(i % 253).unwrap()).collect();
    let mut message = Vec::new();
    let mut expected = HashMap::new();
    for index in 0..blocks {
        let cookie = 1 + index;
        message.extend(request(proto::CMD_WRITE, cookie, index * u64::from(BLOCK), BLOCK));
        message.extend(block_of(index));
        expected.insert(cookie, (proto::CMD_WRITE, BLOCK));
    }
    message.extend(request(proto::CMD_WRITE, 10_000, big_offset, 1 << 20));
    message.extend(&big);
    expected.insert(10_000, (proto::CMD_WRITE, 1 << 20));
    send_in_pieces(stream, &message);
    let answers = read_replies(stream, &expected);
    assert!(answers.values().all(|(error, _)| *error == 0), "every write succeeded");

    // Reads of all of it, pipelined the same way; the big one comes back from its block buffers.
    let mut message = Vec::new();
    let mut expected = HashMap::new();
    for index in 0..blocks {
        let cookie = 20_000 + index;
        message.extend(request(proto::CMD_READ, cookie, index * u64::from(BLOCK), BLOCK));
        expected.insert(cookie, (proto::CMD_READ, BLOCK));
    }
    message.extend(request(proto::CMD_READ, 30_000, big_offset, 1 << 20));
    expected.insert(30_000, (proto::CMD_READ, 1 << 20));
    send_in_pieces(stream, &message);
    let answers = read_replies(stream, &expected);
    for index in 0..blocks {
        let (error, data) = &answers[&(20_000 + index)];
        assert_eq!(*error, 0);
        assert!(*data == block_of(index), "block {index} reads back what was written");
    }
    assert_eq!(answers[&30_000].0, 0);
    assert!(answers[&30_000].1 == big, "the 1 MiB write reads back");
}

#[test]
fn a_write_over_the_maximum_is_refused_and_the_connection_keeps_serving() {
    let node = TestNode::start("nbd_oversized_write", 256 << 20);
    node.create_volume("big", "64MiB");
    let mut client =
        NbdClient::connect(&format!("127.0.0.1:{}", node.nbd_port), "big", Duration::from_secs(30)).unwrap();
    let over = node::nbd::handshake::REQUEST_BYTES_MAX + BLOCK;
    let stream = client.stream();
    let mut message = request(proto::CMD_WRITE, 1, 0, over);
    message.extend(vec![0x5a; over as usize]);
    // Followed at once by a valid write: the payload above must be skipped exactly.
    message.extend(request(proto::CMD_WRITE, 2, 0, BLOCK));
    message.extend(block_of(9));
    stream.write_all(&message).unwrap();
    let expected = HashMap::from([(1, (proto::CMD_WRITE, over)), (2, (proto::CMD_WRITE, BLOCK))]);
    let answers = read_replies(stream, &expected);
    assert_eq!(
        answers[&1].0,
        proto::EINVAL,
        "over the maximum: EINVAL (simple replies)"
    );
    assert_eq!(answers[&2].0, 0, "the next request is served");
    let (error, data) = client.request(proto::CMD_READ, 0, BLOCK, &[]).unwrap();
    assert_eq!(error, 0);
    assert!(
        data == block_of(9),
        "the refused write changed nothing; the next one landed"
    );
}
