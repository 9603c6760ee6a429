//! The option-phase parsers on arbitrary bytes: the first 16 bytes go to
//! `parse_option_header`, the rest (or all of a shorter input) to every
//! option body parser. None may panic; every accepted value respects the
//! documented limits (`NAME_BYTES_MAX`, `META_QUERIES_MAX`) and re-encodes
//! to exactly the bytes it was parsed from (the parsers refuse trailing
//! bytes, so nothing may be silently dropped).

#![no_main]

use libfuzzer_sys::fuzz_target;
use node::nbd::proto::{
    parse_export_name, parse_info_request, parse_meta_context_request, parse_option_header,
    query_matches_base_allocation, InfoRequest, MetaContextRequest, IHAVEOPT, META_QUERIES_MAX, NAME_BYTES_MAX,
};

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

fn check_header(header: &[u8; 16]) {
    let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    match parse_option_header(header) {
        Ok(parsed) => {
            assert_eq!(magic, IHAVEOPT, "accepted an option header without IHAVEOPT");
            assert_eq!(parsed.option, be_u32(&header[8..12]));
            assert_eq!(parsed.data_len, be_u32(&header[12..16]));
        }
        Err(_) => assert_ne!(magic, IHAVEOPT, "refused an option header with IHAVEOPT"),
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    assert!(text.len() <= NAME_BYTES_MAX, "accepted a {}-byte string", text.len());
    out.extend_from_slice(&u32::try_from(text.len()).expect("<= NAME_BYTES_MAX").to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn encode_info(request: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_string(&mut out, &request.export_name);
    let count = u16::try_from(request.requests.len()).expect("count came from a u16");
    out.extend_from_slice(&count.to_be_bytes());
    for info in &request.requests {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

fn encode_meta_context(request: &MetaContextRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_string(&mut out, &request.export_name);
    let count = u32::try_from(request.queries.len()).expect("count came from a u32");
    assert!(count <= META_QUERIES_MAX, "accepted {count} queries");
    out.extend_from_slice(&count.to_be_bytes());
    for query in &request.queries {
        put_string(&mut out, query);
        let _ = query_matches_base_allocation(query);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let body = match data.first_chunk::<16>() {
        Some(header) => {
            check_header(header);
            &data[16..]
        }
        None => data,
    };
    if let Ok(request) = parse_info_request(body) {
        assert_eq!(
            encode_info(&request),
            body,
            "info request does not re-encode to its input"
        );
    }
    if let Ok(request) = parse_meta_context_request(body) {
        assert_eq!(
            encode_meta_context(&request),
            body,
            "meta context request does not re-encode to its input"
        );
    }
    match parse_export_name(body) {
        Ok(name) => {
            assert!(
                name.len() <= NAME_BYTES_MAX,
                "accepted a {}-byte export name",
                name.len()
            );
            assert_eq!(name.as_bytes(), body, "export name differs from its body");
        }
        Err(_) => assert!(
            body.len() > NAME_BYTES_MAX || std::str::from_utf8(body).is_err(),
            "refused a short UTF-8 export name"
        ),
    }
});
