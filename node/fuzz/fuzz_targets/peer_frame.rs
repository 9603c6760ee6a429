//! The peer protocol's decoders on arbitrary bytes (what another host may
//! send to the peer port once TLS is up): a frame header, its checksum
//! check, and the replication payloads. Nothing panics; whatever decodes
//! re-encodes to the same meaning.

#![no_main]

use libfuzzer_sys::fuzz_target;
use node::peer::frame::{decode_header, encode, verify, HEADER_BYTES, PAYLOAD_BYTES_MAX};
use node::replication::wire;

fuzz_target!(|data: &[u8]| {
    if let Some(header_bytes) = data.first_chunk::<HEADER_BYTES>() {
        if let Ok(header) = decode_header(header_bytes) {
            assert!(header.payload_bytes <= PAYLOAD_BYTES_MAX, "a header past the payload limit");
            let rest = &data[HEADER_BYTES..];
            if let Some(payload) = rest.get(..header.payload_bytes) {
                if verify(header_bytes, &header, payload).is_ok() {
                    let again = encode(header.kind, header.request_id, payload).expect("within the limit");
                    assert_eq!(&again[..HEADER_BYTES], header_bytes, "a valid header re-encodes differently");
                }
            }
        }
    }
    // A replication request payload: a mutation, or a read of blocks.
    if let Ok(op) = wire::decode(data.to_vec()) {
        let again = wire::encode(&op);
        // The two parts a link sends, joined, are the one buffer.
        let (header, body) = wire::encode_parts(&op);
        assert_eq!([&header[..], &body].concat(), again, "encode_parts differs from encode");
        assert_eq!(wire::decode(again).as_ref(), Ok(&op), "decode(encode(op)) differs");
    }
    if let Ok((volume_id, lba, block_count)) = wire::decode_read(data) {
        let again = wire::encode_read(volume_id, lba, block_count);
        assert_eq!(wire::decode_read(&again), Ok((volume_id, lba, block_count)));
    }
    // A scrub request, and a replica's answer to one (of 1..=8 blocks).
    if let Ok(request) = wire::decode_scrub(data) {
        assert_eq!(wire::decode_scrub(&wire::encode_scrub(&request)), Ok(request));
    }
    if let Some((&blocks, answer)) = data.split_first() {
        let block_count = u64::from(blocks % 8) + 1;
        if let Ok(states) = wire::decode_scrub_reply(answer, block_count) {
            let again = wire::encode_scrub_reply(states.as_deref());
            assert_eq!(wire::decode_scrub_reply(&again, block_count), Ok(states));
        }
    }
});
