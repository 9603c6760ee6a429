//! A small NBD client over TCP: fixed newstyle, `NBD_OPT_GO`, simple
//! replies, requests pipelined (the caller keeps many in flight and matches
//! replies by cookie). The checked load (`ballast debug nbd-write-load` and
//! `nbd-verify-load`) uses it; it is written against the protocol, not
//! against ballast's server, so it checks the server as any client would.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::proto::{self, Request};

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest option reply body read during the handshake.
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;
/// Most option replies one `NBD_OPT_GO` may get before its final one.
const OPTION_REPLIES_MAX: usize = 64;

/// What went wrong talking to an NBD server.
#[derive(Debug, Error)]
pub enum ClientError {
    /// the URI is not nbd://HOST[:PORT]/EXPORT
    #[error("{uri}: {reason} (expected nbd://HOST[:PORT]/EXPORT)")]
    BadUri { uri: String, reason: String },
    /// the server could not be reached
    #[error("cannot connect to {address}: {error}")]
    Connect { address: String, error: std::io::Error },
    /// the server refused the export (its own words follow)
    #[error("{address} refused export {export:?}: {message}")]
    Refused {
        address: String,
        export: String,
        message: String,
    },
    /// the server broke the protocol
    #[error("protocol error from {address}: {reason}")]
    Protocol { address: String, reason: String },
    /// the handshake took too long
    #[error("{address}: no handshake within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    /// the connection failed
    #[error("connection to {address}: {error}")]
    Io { address: String, error: std::io::Error },
}

/// Where an export is: `nbd://HOST[:PORT]/EXPORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportUri {
    /// host:port
    pub address: String,
    pub export: String,
}

impl ExportUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT` (IPv6 hosts in brackets).
    pub fn parse(uri: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = match uri.split_once("://") {
            Some(("nbd", rest)) => rest,
            Some(("nbds", _)) => {
                return Err(bad(
                    "TLS (nbds://) is not supported by this client; use a loopback listener",
                ))
            }
            _ => return Err(bad("the scheme must be nbd://")),
        };
        let (authority, export) = rest.split_once('/').ok_or_else(|| bad("no export name"))?;
        if export.is_empty() {
            return Err(bad("no export name"));
        }
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let has_port = match authority.rfind(']') {
            Some(bracket) => authority[bracket..].contains(':'),
            None => authority.contains(':'),
        };
        let address = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{DEFAULT_PORT}")
        };
        Ok(Self {
            address,
            export: export.to_owned(),
        })
    }
}

impl std::fmt::Display for ExportUri {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "nbd://{}/{}", self.address, self.export)
    }
}

/// One simple reply.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else an errno value (`proto::EIO`, ...).
    pub error: u32,
    /// A successful read's data.
    pub data: Vec<u8>,
}

/// An open export: its size and flags, and the two halves of the connection.
pub struct Connection {
    pub size_bytes: u64,
    pub flags: u16,
    pub sender: Sender,
    pub receiver: Receiver,
}

/// Sends requests.
pub struct Sender {
    address: String,
    stream: OwnedWriteHalf,
}

/// Reads replies.
pub struct Receiver {
    address: String,
    stream: BufReader<OwnedReadHalf>,
}

/// Connects to `uri` and opens its export with `NBD_OPT_GO`; gives up after `timeout`.
pub async fn connect(uri: &ExportUri, timeout: Duration) -> Result<Connection, ClientError> {
    let address = uri.address.clone();
    match tokio::time::timeout(timeout, handshake(uri)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout { address, timeout }),
    }
}

async fn handshake(uri: &ExportUri) -> Result<Connection, ClientError> {
    let address = uri.address.clone();
    let stream = TcpStream::connect(&address)
        .await
        .map_err(|error| ClientError::Connect {
            address: address.clone(),
            error,
        })?;
    let _ = stream.set_nodelay(true);
    let (read_half, write_half) = stream.into_split();
    let mut receiver = Receiver {
        address: address.clone(),
        stream: BufReader::with_capacity(256 * 1024, read_half),
    };
    let mut sender = Sender {
        address: address.clone(),
        stream: write_half,
    };
    let greeting = receiver.exact(18).await?;
    if greeting[0..8] != proto::NBD_MAGIC.to_be_bytes() || greeting[8..16] != proto::IHAVEOPT.to_be_bytes() {
        return Err(receiver.protocol("not a fixed-newstyle NBD server"));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(receiver.protocol("the server does not speak fixed newstyle"));
    }
    let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
    if server_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
    }
    let name_len = u32::try_from(uri.export.len()).map_err(|_| receiver.protocol("export name too long"))?;
    let mut option = Vec::with_capacity(32 + uri.export.len());
    option.extend_from_slice(&client_flags.to_be_bytes());
    option.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    option.extend_from_slice(&(name_len + 6).to_be_bytes());
    option.extend_from_slice(&name_len.to_be_bytes());
    option.extend_from_slice(uri.export.as_bytes());
    option.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    sender.send(&option).await?;
    let mut export = None;
    for _ in 0..OPTION_REPLIES_MAX {
        let head = receiver.exact(20).await?;
        let field = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        if head[0..8] != proto::OPTION_REPLY_MAGIC.to_be_bytes() || field(8) != proto::OPT_GO {
            return Err(receiver.protocol("bad option reply"));
        }
        let (reply_type, length) = (field(12), field(16));
        if length > OPTION_REPLY_BYTES_MAX {
            return Err(receiver.protocol(&format!("option reply of {length} bytes")));
        }
        let body = receiver.exact(length as usize).await?;
        match reply_type {
            proto::REP_ACK => {
                let (size_bytes, flags) =
                    export.ok_or_else(|| receiver.protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
                return Ok(Connection {
                    size_bytes,
                    flags,
                    sender,
                    receiver,
                });
            }
            proto::REP_INFO if body.len() == 12 && body[0..2] == proto::INFO_EXPORT.to_be_bytes() => {
                let size_bytes = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
                export = Some((size_bytes, u16::from_be_bytes([body[10], body[11]])));
            }
            proto::REP_INFO => {}
            error if error & proto::REP_ERROR_BIT != 0 => {
                return Err(ClientError::Refused {
                    address,
                    export: uri.export.clone(),
                    message: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            other => return Err(receiver.protocol(&format!("unexpected option reply type {other:#x}"))),
        }
    }
    Err(receiver.protocol("too many option replies"))
}

impl Sender {
    /// Sends one request; `payload` is a write's data (empty otherwise).
    pub async fn request(&mut self, request: &Request, payload: &[u8]) -> Result<(), ClientError> {
        debug_assert!(request.command != proto::CMD_WRITE || payload.len() == request.length_bytes as usize);
        let header = proto::encode_request(request);
        if payload.is_empty() {
            self.send(&header).await
        } else {
            let mut message = Vec::with_capacity(header.len() + payload.len());
            message.extend_from_slice(&header);
            message.extend_from_slice(payload);
            self.send(&message).await
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await.map_err(|error| ClientError::Io {
            address: self.address.clone(),
            error,
        })
    }
}

impl Receiver {
    /// Reads the next reply; `read_length` gives the length of the read a
    /// cookie belongs to (None: not a read), since a simple reply does not
    /// say how much data follows it. Not cancel-safe: run it on its own task.
    pub async fn reply(&mut self, read_length: impl Fn(u64) -> Option<u32>) -> Result<Reply, ClientError> {
        let head = self.exact(proto::SIMPLE_REPLY_BYTES).await?;
        if head[0..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(self.protocol("reply without the simple reply magic"));
        }
        let error = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        let data = match read_length(cookie) {
            Some(length) if error == 0 => self.exact(length as usize).await?,
            _ => Vec::new(),
        };
        Ok(Reply { cookie, error, data })
    }

    async fn exact(&mut self, count: usize) -> Result<Vec<u8>, ClientError> {
        let mut bytes = vec![0u8; count];
        self.stream
            .read_exact(&mut bytes)
            .await
            .map_err(|error| ClientError::Io {
                address: self.address.clone(),
                error,
            })?;
        Ok(bytes)
    }

    fn protocol(&self, reason: &str) -> ClientError {
        ClientError::Protocol {
            address: self.address.clone(),
            reason: reason.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_uri_takes_host_port_and_export_and_defaults_the_port() {
        assert_eq!(
            ExportUri::parse("nbd://127.0.0.2:10900/pg-data").unwrap(),
            ExportUri {
                address: "127.0.0.2:10900".into(),
                export: "pg-data".into()
            }
        );
        assert_eq!(ExportUri::parse("nbd://host/v").unwrap().address, "host:10809");
        assert_eq!(ExportUri::parse("nbd://[::1]/v").unwrap().address, "[::1]:10809");
        assert_eq!(ExportUri::parse("nbd://[::1]:7/v").unwrap().address, "[::1]:7");
        assert_eq!(ExportUri::parse("nbd://h/v").unwrap().to_string(), "nbd://h:10809/v");
    }

    #[test]
    fn export_uri_refuses_what_it_cannot_serve_with_the_reason() {
        for (uri, reason) in [
            ("nbds://h/v", "TLS"),
            ("http://h/v", "scheme"),
            ("nbd://h", "no export"),
            ("nbd://h/", "no export"),
            ("nbd:///v", "no host"),
        ] {
            let error = ExportUri::parse(uri).unwrap_err().to_string();
            assert!(error.contains(reason), "{uri}: {error}");
        }
    }
}
