//! A raw NBD client for tests (fixed newstyle, NBD_OPT_EXPORT_NAME, simple
//! replies) that reports failures as errors, so a test can tell a refused
//! or cut connection from a wrong answer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use node::nbd::proto::{self, Request};

pub struct NbdClient {
    stream: TcpStream,
    cookie: u64,
    /// The export's transmission flags (`proto::TFLAG_*`).
    pub flags: u16,
}

impl NbdClient {
    /// Connects to `address` (host:port) and opens `volume`; a node that
    /// does not serve the export closes the connection (an error here).
    /// Every socket operation gives up after `timeout`.
    pub fn connect(address: &str, volume: &str, timeout: Duration) -> std::io::Result<Self> {
        let socket_address = address
            .parse()
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{address}: {error}")))?;
        let mut stream = TcpStream::connect_timeout(&socket_address, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
        stream.write_all(&flags.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
        option.extend_from_slice(&u32::try_from(volume.len()).unwrap().to_be_bytes());
        option.extend_from_slice(volume.as_bytes());
        stream.write_all(&option)?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply)?;
        Ok(Self {
            stream,
            cookie: 0,
            flags: u16::from_be_bytes([reply[8], reply[9]]),
        })
    }

    /// Sends one request (`payload` follows the header: a write's data)
    /// and returns its simple reply's error and, for a successful read,
    /// the `length_bytes` read.
    pub fn request(
        &mut self,
        command: u16,
        offset_bytes: u64,
        length_bytes: u32,
        payload: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        let header = proto::encode_request(&Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset_bytes,
            length_bytes,
        });
        let mut message = header.to_vec();
        message.extend_from_slice(payload);
        self.stream.write_all(&message)?;
        let mut reply = [0u8; proto::SIMPLE_REPLY_BYTES];
        self.stream.read_exact(&mut reply)?;
        if reply[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes()
            || u64::from_be_bytes(reply[8..16].try_into().unwrap()) != self.cookie
        {
            return Err(std::io::Error::other(format!("bad simple reply {reply:?}")));
        }
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let mut data = Vec::new();
        if command == proto::CMD_READ && error == 0 {
            data = vec![0u8; length_bytes as usize];
            self.stream.read_exact(&mut data)?;
        }
        Ok((error, data))
    }
}

impl NbdClient {
    /// The connection itself, for tests that send and read raw bytes.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}
