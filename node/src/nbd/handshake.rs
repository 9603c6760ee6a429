//! The fixed-newstyle handshake: greeting, client flags, then options until
//! the client picks an export (NBD_OPT_GO / NBD_OPT_EXPORT_NAME), leaves, or
//! asks for TLS (NBD_OPT_STARTTLS: the caller wraps the stream and runs
//! `options` again over TLS). `Access` says whether TLS must come first
//! and which exports the client may see.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, *};
use super::tls::NbdSecurity;
use super::NbdError;
use crate::api::auth::Caller;
use crate::volume::{Volume, Volumes};

/// Most options one handshake may send.
pub const OPTIONS_MAX: usize = 256;
/// Largest option body read; larger ones are discarded and refused.
pub const OPTION_DATA_BYTES_MAX: u32 = 64 * 1024;
/// Largest option body discarded before the connection is dropped instead.
pub const OPTION_DISCARD_BYTES_MAX: u32 = 1 << 20;
/// Largest request advertised (NBD_INFO_BLOCK_SIZE maximum).
pub const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Preferred request alignment advertised.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;

/// Transmission flags of every export.
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_DF
    | TFLAG_CAN_MULTI_CONN
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;

/// The flags of one export: a snapshot's copy is read-only (writes get EPERM).
fn transmission_flags(volume: &crate::volume::Volume) -> u16 {
    if volume.read_only {
        TRANSMISSION_FLAGS | proto::TFLAG_READ_ONLY
    } else {
        TRANSMISSION_FLAGS
    }
}

/// What the handshake agreed on.
pub struct Session {
    pub volume: Arc<Volume>,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

#[derive(Default)]
struct Negotiated {
    structured_replies: bool,
    /// The export the meta context was set for (the context holds for it only).
    base_allocation_for: Option<String>,
}

/// How a handshake (or one phase of it) ended.
pub enum Negotiation {
    /// The client picked an export.
    Session(Session),
    /// The client aborted or left politely.
    Left,
    /// The client asked for TLS and was told yes: the caller runs the TLS
    /// handshake on the stream, then `options` again over it.
    StartTls {
        no_zeroes: bool,
        /// The TLS configuration the ACK was given for.
        config: std::sync::Arc<rustls::ServerConfig>,
    },
}

/// What the client may do: TLS first or not, and which exports.
pub struct Access<'a> {
    pub security: &'a NbdSecurity,
    /// Over TLS: who the client certificate names. None: plaintext.
    pub caller: Option<Caller>,
    /// The client's address.
    pub peer: &'a str,
}

impl Access<'_> {
    /// Records an export opened (`status` 200) or refused by policy (403)
    /// in the audit trail, when the node keeps one.
    pub fn audit(&self, volume: &str, status: u16) {
        let Some(log) = &self.security.audit else {
            return;
        };
        log.record(&crate::audit::Entry::now(
            self.caller.as_ref(),
            self.peer.to_owned(),
            "NBD open".to_owned(),
            volume.to_owned(),
            status,
        ));
    }

    fn tls_active(&self) -> bool {
        self.caller.is_some()
    }

    fn must_start_tls(&self) -> bool {
        self.security.required && !self.tls_active()
    }

    /// Ok if the client may see and open export `name`. Plaintext reaches
    /// here only on a loopback listener, whose host is trusted.
    fn may_open(&self, name: &str) -> Result<(), String> {
        match &self.caller {
            None => Ok(()),
            Some(caller) => {
                let (owner, group) = self.security.owner_of(name);
                caller
                    .may_use(name, &owner, &group)
                    .map_err(|reason| format!("{reason} (the client certificate names {})", caller.subject))
            }
        }
    }
}

/// Runs the handshake from the greeting on.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    volumes: &Volumes,
    access: &Access<'_>,
) -> Result<Negotiation, NbdError> {
    stream.write_all(&proto::server_greeting()).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("client does not speak fixed newstyle".into()));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    options(stream, volumes, access, no_zeroes).await
}

/// The option phase (again after STARTTLS, with a fresh state).
pub async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    volumes: &Volumes,
    access: &Access<'_>,
    no_zeroes: bool,
) -> Result<Negotiation, NbdError> {
    let mut state = Negotiated::default();
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await?;
        let header = proto::parse_option_header(&header).map_err(|e| NbdError::Protocol(e.to_string()))?;
        if header.data_len > OPTION_DATA_BYTES_MAX {
            if header.option == OPT_EXPORT_NAME || header.data_len > OPTION_DISCARD_BYTES_MAX {
                return Err(NbdError::Protocol(format!(
                    "option {} with {} bytes of data",
                    header.option, header.data_len
                )));
            }
            discard(stream, header.data_len).await?;
            reply_error(stream, header.option, REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; header.data_len as usize];
        stream.read_exact(&mut data).await?;
        let context = Context {
            volumes,
            access,
            no_zeroes,
        };
        if let Some(outcome) = handle_option(stream, &context, &mut state, header.option, &data).await? {
            return Ok(outcome);
        }
    }
    Err(NbdError::Protocol(format!("more than {OPTIONS_MAX} options")))
}

async fn discard<S: AsyncRead + Unpin>(stream: &mut S, len: u32) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut stream.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(NbdError::Protocol("connection closed inside an option".into()));
    }
    Ok(())
}

async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
    stream.write_all(&proto::option_reply(option, kind, data)).await?;
    Ok(())
}

async fn reply_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    message: &str,
) -> Result<(), NbdError> {
    reply(stream, option, kind, message.as_bytes()).await
}

struct Context<'a> {
    volumes: &'a Volumes,
    access: &'a Access<'a>,
    no_zeroes: bool,
}

/// The message of a refused export.
fn not_served(name: &str) -> String {
    format!("no volume named {name:?} is served by this node (`ballast volume inspect` shows which node serves it)")
}

/// `Some(outcome)` ends this phase of the handshake.
async fn handle_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    context: &Context<'_>,
    state: &mut Negotiated,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiation>, NbdError> {
    let Context {
        volumes,
        access,
        no_zeroes,
    } = *context;
    if access.must_start_tls() && option != OPT_STARTTLS && option != OPT_ABORT {
        const TLS_FIRST: &str = "this listener requires TLS: connect with nbds:// and a client certificate of the cluster (`ballast auth cert create`)";
        if option == OPT_EXPORT_NAME {
            // No error reply exists for it: the connection closes.
            return Err(NbdError::Protocol(format!(
                "NBD_OPT_EXPORT_NAME before TLS; {TLS_FIRST}"
            )));
        }
        reply_error(stream, option, REP_ERR_TLS_REQD, TLS_FIRST).await?;
        return Ok(None);
    }
    match option {
        OPT_EXPORT_NAME => {
            let name = proto::parse_export_name(data).map_err(|e| NbdError::Protocol(e.to_string()))?;
            // The protocol has no error reply here: an unknown export, or one
            // this node does not serve (another node coordinates it), closes
            // the connection, as NBD_OPT_GO refuses it.
            let volume = volumes
                .get_served(&name)
                .ok_or_else(|| NbdError::Protocol(format!("client asked for unknown export {name:?}")))?;
            access.may_open(&name).map_err(NbdError::Protocol)?;
            if let Some(reason) = volume.refusal() {
                return Err(NbdError::Protocol(reason));
            }
            if !volume.is_unlocked() {
                return Err(NbdError::Protocol(
                    crate::volume::VolumeIoError::Locked { volume: name }.to_string(),
                ));
            }
            let flags = transmission_flags(&volume);
            stream
                .write_all(&proto::export_name_reply(volume.size_bytes(), flags, no_zeroes))
                .await?;
            Ok(Some(Negotiation::Session(session(volume, state, &name))))
        }
        OPT_ABORT => {
            // The client may already be gone; the reply is a courtesy.
            let _ = reply(stream, option, REP_ACK, &[]).await;
            Ok(Some(Negotiation::Left))
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply_error(stream, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                return Ok(None);
            }
            for (name, _) in volumes.names() {
                if access.may_open(&name).is_ok() {
                    reply(stream, option, REP_SERVER, &proto::list_entry(&name, "")).await?;
                }
            }
            reply(stream, option, REP_ACK, &[]).await?;
            Ok(None)
        }
        OPT_INFO | OPT_GO => info_or_go(stream, context, state, option, data).await,
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply_error(
                    stream,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )
                .await?;
            } else {
                state.structured_replies = true;
                reply(stream, option, REP_ACK, &[]).await?;
            }
            Ok(None)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(stream, context, state, option, data).await?;
            Ok(None)
        }
        OPT_STARTTLS => {
            if !data.is_empty() {
                reply_error(stream, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data").await?;
                return Ok(None);
            }
            if access.tls_active() {
                reply_error(stream, option, REP_ERR_INVALID, "TLS is already on").await?;
                return Ok(None);
            }
            match access.security.server_config() {
                Ok(config) => {
                    reply(stream, option, REP_ACK, &[]).await?;
                    Ok(Some(Negotiation::StartTls { no_zeroes, config }))
                }
                Err(reason) => {
                    reply_error(
                        stream,
                        option,
                        REP_ERR_UNSUP,
                        &format!("TLS is not available: {reason}"),
                    )
                    .await?;
                    Ok(None)
                }
            }
        }
        _ => {
            reply_error(stream, option, REP_ERR_UNSUP, "option not supported").await?;
            Ok(None)
        }
    }
}

fn session(volume: Arc<Volume>, state: &Negotiated, name: &str) -> Session {
    Session {
        volume,
        structured_replies: state.structured_replies,
        base_allocation: state.structured_replies && state.base_allocation_for.as_deref() == Some(name),
    }
}

async fn info_or_go<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    context: &Context<'_>,
    state: &Negotiated,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiation>, NbdError> {
    let request = match proto::parse_info_request(data) {
        Ok(request) => request,
        Err(error) => {
            reply_error(stream, option, REP_ERR_INVALID, &error.to_string()).await?;
            return Ok(None);
        }
    };
    let Some(volume) = context.volumes.get_served(&request.export_name) else {
        reply_error(stream, option, REP_ERR_UNKNOWN, &not_served(&request.export_name)).await?;
        return Ok(None);
    };
    if let Err(reason) = context.access.may_open(&request.export_name) {
        tracing::warn!(volume = %request.export_name, %reason, "NBD export refused");
        context.access.audit(&request.export_name, 403);
        reply_error(stream, option, REP_ERR_POLICY, &reason).await?;
        return Ok(None);
    }
    if let Some(reason) = volume.refusal() {
        tracing::warn!(volume = %volume.name, %reason, "NBD export refused");
        reply_error(stream, option, REP_ERR_POLICY, &reason).await?;
        return Ok(None);
    }
    if !volume.is_unlocked() {
        let reason = crate::volume::VolumeIoError::Locked {
            volume: volume.name.clone(),
        }
        .to_string();
        tracing::warn!(volume = %volume.name, %reason, "NBD export refused");
        context.access.audit(&volume.name, 403);
        reply_error(stream, option, REP_ERR_POLICY, &reason).await?;
        return Ok(None);
    }
    reply(
        stream,
        option,
        REP_INFO,
        &proto::info_export(volume.size_bytes(), transmission_flags(&volume)),
    )
    .await?;
    for info in &request.requests {
        match *info {
            INFO_NAME => reply(stream, option, REP_INFO, &proto::info_text(INFO_NAME, &volume.name)).await?,
            INFO_BLOCK_SIZE => {
                let body = proto::info_block_size(volume.block_size_bytes, PREFERRED_BLOCK_BYTES, REQUEST_BYTES_MAX);
                reply(stream, option, REP_INFO, &body).await?;
            }
            _ => {}
        }
    }
    reply(stream, option, REP_ACK, &[]).await?;
    if option == OPT_GO {
        context.access.audit(&volume.name, 200);
        let name = request.export_name.clone();
        return Ok(Some(Negotiation::Session(session(volume, state, &name))));
    }
    Ok(None)
}

async fn meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    context: &Context<'_>,
    state: &mut Negotiated,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let request = match proto::parse_meta_context_request(data) {
        Ok(request) => request,
        Err(error) => return reply_error(stream, option, REP_ERR_INVALID, &error.to_string()).await,
    };
    if option == OPT_SET_META_CONTEXT && !state.structured_replies {
        return reply_error(
            stream,
            option,
            REP_ERR_INVALID,
            "negotiate structured replies before setting a meta context",
        )
        .await;
    }
    if context.volumes.get_served(&request.export_name).is_none() {
        return reply_error(stream, option, REP_ERR_UNKNOWN, &not_served(&request.export_name)).await;
    }
    if let Err(reason) = context.access.may_open(&request.export_name) {
        return reply_error(stream, option, REP_ERR_POLICY, &reason).await;
    }
    let selected = if option == OPT_LIST_META_CONTEXT && request.queries.is_empty() {
        true
    } else {
        request.queries.iter().any(|q| proto::query_matches_base_allocation(q))
    };
    if option == OPT_SET_META_CONTEXT {
        state.base_allocation_for = selected.then(|| request.export_name.clone());
    }
    if selected {
        let body = proto::meta_context_reply(META_BASE_ALLOCATION_ID, META_BASE_ALLOCATION);
        reply(stream, option, REP_META_CONTEXT, &body).await?;
    }
    reply(stream, option, REP_ACK, &[]).await
}
