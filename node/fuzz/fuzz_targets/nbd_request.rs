//! `parse_request` on arbitrary 28-byte headers: it never panics, accepts
//! exactly the headers that carry the request magic, reads every field from
//! its documented offset, and `encode_request` is its exact inverse.

#![no_main]

use libfuzzer_sys::fuzz_target;
use node::nbd::proto::{encode_request, parse_request, ProtoError, REQUEST_HEADER_BYTES, REQUEST_MAGIC};

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.first_chunk::<REQUEST_HEADER_BYTES>() else {
        return;
    };
    let magic = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
    match parse_request(header) {
        Ok(request) => {
            assert_eq!(magic, REQUEST_MAGIC, "accepted a header without the request magic");
            assert_eq!(
                request.flags,
                u16::from_be_bytes(header[4..6].try_into().expect("2 bytes"))
            );
            assert_eq!(
                request.command,
                u16::from_be_bytes(header[6..8].try_into().expect("2 bytes"))
            );
            assert_eq!(
                request.cookie,
                u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"))
            );
            assert_eq!(
                request.offset_bytes,
                u64::from_be_bytes(header[16..24].try_into().expect("8 bytes"))
            );
            assert_eq!(
                request.length_bytes,
                u32::from_be_bytes(header[24..28].try_into().expect("4 bytes"))
            );
            // Every bit of the header is a field, so encoding gives back the input...
            let encoded = encode_request(&request);
            assert_eq!(&encoded, header, "encode(parse(header)) differs from header");
            // ...and parsing that gives back the request.
            assert_eq!(parse_request(&encoded), Ok(request), "parse(encode(request)) differs");
        }
        Err(ProtoError::BadMagic { found }) => {
            assert_ne!(magic, REQUEST_MAGIC, "refused a header with the request magic");
            assert_eq!(found, magic, "BadMagic reports a different magic than was sent");
        }
        Err(error) => panic!("a full-length header can only fail on its magic, got {error:?}"),
    }
});
