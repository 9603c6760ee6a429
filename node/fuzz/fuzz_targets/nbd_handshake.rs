//! The whole option phase (`handshake::negotiate`) over an in-memory stream:
//! the input is everything the client sends (client flags, then options),
//! followed by end-of-stream. The node has no disks and so no volumes, which
//! needs no storage engine and pins down what the server may answer:
//! - it never panics or hangs, and never agrees on an export;
//! - it sends the greeting, then only whole option replies, one per option
//!   it read, in order, each naming that option;
//! - it only ever acknowledges ABORT, LIST and STRUCTURED_REPLY (every
//!   other option names an export or is unsupported, so it is refused);
//! - it ends politely only after acknowledging ABORT.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use node::engine::{Engine, EngineConfig};
use node::nbd::handshake::{self, OPTIONS_MAX};
use node::nbd::proto::{
    self, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_LIST,
    OPT_STRUCTURED_REPLY, REP_ACK,
};
use node::volume::meta::MetaStore;
use node::volume::Volumes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The in-memory pipe's buffer in each direction.
const PIPE_BYTES: usize = 64 * 1024;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    volumes: Volumes,
}

/// A node with no disks: an engine without reactors and an empty metadata
/// database (unlinked at once; the open file keeps it alive).
fn fixture() -> Fixture {
    let engine = Engine::start(&[], &EngineConfig::new([0; 16])).expect("engine without disks");
    let dir = std::env::temp_dir().join(format!("ballast-fuzz-handshake-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("metadata directory");
    let meta = MetaStore::open(&dir).expect("metadata database");
    std::fs::remove_dir_all(&dir).expect("remove metadata directory");
    let volumes = Volumes::open(Arc::new(engine), meta).expect("volumes of a node without disks");
    assert!(volumes.names().is_empty());
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    Fixture { runtime, volumes }
}

thread_local! {
    static FIXTURE: Fixture = fixture();
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

/// The option codes of the options in `input`, in the order the server
/// reads them (whether or not it gets that far).
fn options_sent(input: &[u8]) -> Vec<u32> {
    let mut rest = input.get(4..).unwrap_or_default();
    let mut options = Vec::new();
    while let Some(header) = rest.first_chunk::<16>() {
        options.push(be_u32(&header[8..12]));
        let data_len = usize::try_from(be_u32(&header[12..16])).expect("u32 fits usize");
        rest = rest.get(16 + data_len..).unwrap_or_default();
    }
    options
}

/// Splits what the server sent after its greeting into (option, reply type) pairs.
fn option_replies(mut output: &[u8]) -> Vec<(u32, u32)> {
    let mut replies = Vec::new();
    while !output.is_empty() {
        let header = output.first_chunk::<20>().expect("a whole option reply header");
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        assert_eq!(magic, OPTION_REPLY_MAGIC, "option reply without its magic");
        let data_len = usize::try_from(be_u32(&header[16..20])).expect("u32 fits usize");
        assert!(output.len() >= 20 + data_len, "option reply cut short");
        replies.push((be_u32(&header[8..12]), be_u32(&header[12..16])));
        output = &output[20 + data_len..];
    }
    replies
}

fuzz_target!(|input: &[u8]| {
    let (outcome, output) = FIXTURE.with(|fixture| {
        fixture.runtime.block_on(async {
            let (client, mut server) = tokio::io::duplex(PIPE_BYTES);
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let serve = async move {
                let security = node::nbd::tls::NbdSecurity::plaintext();
                let access = handshake::Access {
                    security: &security,
                    caller: None,
                    peer: "fuzz",
                };
                let outcome = handshake::negotiate(&mut server, &fixture.volumes, &access).await;
                drop(server); // end of stream for the client
                outcome
            };
            let send = async move {
                // The server may stop reading early; a broken pipe is expected then.
                let _ = to_server.write_all(input).await;
                let _ = to_server.shutdown().await;
            };
            let receive = async move {
                let mut output = Vec::new();
                from_server
                    .read_to_end(&mut output)
                    .await
                    .expect("read from an in-memory pipe");
                output
            };
            let (outcome, (), output) = tokio::join!(serve, send, receive);
            (outcome, output)
        })
    });

    let greeting = proto::server_greeting();
    assert!(
        output.starts_with(&greeting),
        "the server did not start with its greeting"
    );
    let replies = option_replies(&output[greeting.len()..]);
    let options = options_sent(input);
    assert!(replies.len() <= OPTIONS_MAX, "{} replies", replies.len());
    assert!(replies.len() <= options.len(), "more replies than options");
    let flags_valid = input.first_chunk::<4>().is_some_and(|flags| {
        let flags = be_u32(flags);
        flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0 && flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) == 0
    });
    assert!(
        flags_valid || replies.is_empty(),
        "options answered after bad client flags"
    );
    for (&(option, reply_type), &sent) in replies.iter().zip(&options) {
        assert_eq!(option, sent, "reply names another option than the one it answers");
        assert_ne!(option, OPT_EXPORT_NAME, "NBD_OPT_EXPORT_NAME has no option reply");
        if reply_type == REP_ACK {
            assert!(
                [OPT_ABORT, OPT_LIST, OPT_STRUCTURED_REPLY].contains(&option),
                "option {option} acknowledged on a node with no volumes"
            );
        } else {
            assert!(
                reply_type & (1 << 31) != 0,
                "option {option} answered with {reply_type:#x}"
            );
        }
    }
    match outcome {
        Ok(handshake::Negotiation::Session(_)) => panic!("agreed on an export of a node with no volumes"),
        Ok(handshake::Negotiation::StartTls { .. }) => panic!("started TLS on a listener that offers none"),
        Ok(handshake::Negotiation::Left) => assert_eq!(
            replies.last(),
            Some(&(OPT_ABORT, REP_ACK)),
            "the handshake ended politely without an acknowledged ABORT"
        ),
        Err(_) => {}
    }
});
