//! The NBD wire protocol (fixed newstyle handshake, simple and structured
//! replies), as pure encoders and decoders over byte slices so they can be
//! property-tested and fuzzed apart from any socket.
//!
//! Numbers and layouts follow the upstream spec
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>);
//! everything on the wire is big-endian.

use thiserror::Error;

// Handshake.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERROR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERROR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR_BIT | 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Errors (errno values fixed by the spec).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Its id on every connection.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Longest export name or query string accepted (the spec's limit).
pub const NAME_BYTES_MAX: usize = 4096;

/// A malformed option or request body.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// the data ended before a field did
    #[error("truncated {what}")]
    Truncated { what: &'static str },
    /// a length field disagrees with the data
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// the request header does not start with the request magic
    #[error("bad request magic {found:#010x}")]
    BadMagic { found: u32 },
}

/// A cursor over big-endian fields.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < count {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > NAME_BYTES_MAX {
            return Err(ProtoError::Invalid {
                what: self.what,
                reason: format!("string of {len} bytes is over {NAME_BYTES_MAX}"),
            });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::Invalid {
            what: self.what,
            reason: "string is not UTF-8".into(),
        })
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Invalid {
                what: self.what,
                reason: format!("{} unexpected trailing bytes", self.bytes.len()),
            })
        }
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("wire lengths fit in u32")
}

/// The body of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub export_name: String,
    pub requests: Vec<u16>,
}

/// Parses an NBD_OPT_INFO / NBD_OPT_GO body.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut reader = Reader {
        bytes: data,
        what: "info request",
    };
    let name_len = reader.u32()? as usize;
    let export_name = reader.string(name_len)?;
    let count = reader.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        requests.push(reader.u16()?);
    }
    reader.finish()?;
    Ok(InfoRequest { export_name, requests })
}

/// The body of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

/// Most queries one meta-context option may carry.
pub const META_QUERIES_MAX: u32 = 64;

/// Parses a meta-context option body.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut reader = Reader {
        bytes: data,
        what: "meta context request",
    };
    let name_len = reader.u32()? as usize;
    let export_name = reader.string(name_len)?;
    let count = reader.u32()?;
    if count > META_QUERIES_MAX {
        return Err(ProtoError::Invalid {
            what: "meta context request",
            reason: format!("{count} queries, at most {META_QUERIES_MAX}"),
        });
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = reader.u32()? as usize;
        queries.push(reader.string(len)?);
    }
    reader.finish()?;
    Ok(MetaContextRequest { export_name, queries })
}

/// Parses the body of NBD_OPT_EXPORT_NAME (the whole body is the name).
pub fn parse_export_name(data: &[u8]) -> Result<String, ProtoError> {
    let mut reader = Reader {
        bytes: data,
        what: "export name",
    };
    reader.string(data.len())
}

/// Whether the meta-context `query` selects base:allocation.
#[must_use]
pub fn query_matches_base_allocation(query: &str) -> bool {
    query == META_BASE_ALLOCATION || query == "base:"
}

/// The header of an option the client sent (the body follows).
#[derive(Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub data_len: u32,
}

/// Parses the 16-byte option header.
pub fn parse_option_header(bytes: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let mut reader = Reader {
        bytes,
        what: "option header",
    };
    let magic = reader.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::Invalid {
            what: "option header",
            reason: format!("magic {magic:#x} is not IHAVEOPT"),
        });
    }
    Ok(OptionHeader {
        option: reader.u32()?,
        data_len: reader.u32()?,
    })
}

/// Encodes an option reply.
#[must_use]
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_REP_SERVER body for one export of NBD_OPT_LIST.
#[must_use]
pub fn list_entry(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// NBD_REP_INFO body of NBD_INFO_EXPORT.
#[must_use]
pub fn info_export(size_bytes: u64, transmission_flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// NBD_REP_INFO body of NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
#[must_use]
pub fn info_text(info: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// NBD_REP_INFO body of NBD_INFO_BLOCK_SIZE.
#[must_use]
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// NBD_REP_META_CONTEXT body.
#[must_use]
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and (unless the client
/// set NO_ZEROES) 124 zero bytes.
#[must_use]
pub fn export_name_reply(size_bytes: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0; 124]);
    }
    out
}

/// The server's first 18 bytes.
#[must_use]
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// A transmission-phase request header (a WRITE's payload follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset_bytes: u64,
    pub length_bytes: u32,
}

/// Parses the 28-byte request header.
pub fn parse_request(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<Request, ProtoError> {
    let mut reader = Reader { bytes, what: "request" };
    let magic = reader.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    Ok(Request {
        flags: reader.u16()?,
        command: reader.u16()?,
        cookie: reader.u64()?,
        offset_bytes: reader.u64()?,
        length_bytes: reader.u32()?,
    })
}

/// Encodes a request header (used by tests and the fuzz target's oracle).
#[must_use]
pub fn encode_request(request: &Request) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_be_bytes());
    out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset_bytes.to_be_bytes());
    out[24..].copy_from_slice(&request.length_bytes.to_be_bytes());
    out
}

/// A simple reply header (a READ's data follows it on success).
#[must_use]
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header; `payload_len` bytes follow.
#[must_use]
pub fn structured_header(
    cookie: u64,
    flags: u16,
    reply_type: u16,
    payload_len: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&reply_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// A complete NBD_REPLY_TYPE_ERROR chunk (with the DONE flag).
#[must_use]
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let payload_len = 6 + message.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + payload_len);
    out.extend_from_slice(&structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        len_u32(payload_len),
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&u16::try_from(message.len()).expect("<= 4096").to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk (with the DONE flag) for
/// `(length_bytes, flags)` extents.
#[must_use]
pub fn block_status_reply(cookie: u64, context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let payload_len = 4 + 8 * extents.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + payload_len);
    out.extend_from_slice(&structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        len_u32(payload_len),
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_body(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&len_u32(name.len()).to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
        for request in requests {
            body.extend_from_slice(&request.to_be_bytes());
        }
        body
    }

    #[test]
    fn info_request_round_trips() {
        let parsed = parse_info_request(&info_body("vol-1", &[INFO_BLOCK_SIZE, INFO_NAME])).unwrap();
        assert_eq!(parsed.export_name, "vol-1");
        assert_eq!(parsed.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
    }

    #[test]
    fn info_request_with_a_name_longer_than_its_data_is_truncated() {
        let mut body = info_body("vol", &[]);
        body[3] = 200;
        assert!(matches!(parse_info_request(&body), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn info_request_with_trailing_bytes_is_invalid() {
        let mut body = info_body("vol", &[1]);
        body.push(0);
        assert!(matches!(parse_info_request(&body), Err(ProtoError::Invalid { .. })));
    }

    #[test]
    fn meta_context_request_parses_queries_and_limits_their_count() {
        let mut body = Vec::new();
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(b"vol");
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&15u32.to_be_bytes());
        body.extend_from_slice(b"base:allocation");
        let parsed = parse_meta_context_request(&body).unwrap();
        assert_eq!(parsed.queries, vec!["base:allocation".to_owned()]);
        body[7..11].copy_from_slice(&(META_QUERIES_MAX + 1).to_be_bytes());
        assert!(matches!(
            parse_meta_context_request(&body),
            Err(ProtoError::Invalid { .. })
        ));
    }

    #[test]
    fn request_with_bad_magic_is_refused() {
        let mut bytes = encode_request(&Request {
            flags: 0,
            command: CMD_READ,
            cookie: 1,
            offset_bytes: 0,
            length_bytes: 4096,
        });
        bytes[0] ^= 1;
        assert!(matches!(parse_request(&bytes), Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn greeting_and_replies_have_the_spec_layout() {
        let greeting = server_greeting();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        let reply = simple_reply(0x0102_0304_0506_0708, EIO);
        assert_eq!(&reply[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&reply[4..8], &[0, 0, 0, 5]);
        assert_eq!(&reply[8..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
        let status = block_status_reply(9, 1, &[(4096, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(status.len(), 20 + 12);
        assert_eq!(&status[16..20], &12u32.to_be_bytes());
    }

    proptest! {
        #[test]
        fn request_headers_round_trip(flags: u16, command: u16, cookie: u64, offset_bytes: u64, length_bytes: u32) {
            let request = Request { flags, command, cookie, offset_bytes, length_bytes };
            prop_assert_eq!(parse_request(&encode_request(&request)).unwrap(), request);
        }

        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            let _ = parse_export_name(&data);
        }

        #[test]
        fn info_requests_round_trip(name in "[a-z0-9._-]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let parsed = parse_info_request(&info_body(&name, &requests)).unwrap();
            prop_assert_eq!(parsed.export_name, name);
            prop_assert_eq!(parsed.requests, requests);
        }
    }
}
