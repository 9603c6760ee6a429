//! Adapts a kernel-iface I/O engine to the store's `BlockIo` trait for one
//! disk: tokens carry the disk's file number in their top 8 bits so one
//! engine serves every disk of a reactor.

use disk_layout::io::{BlockIo, IoCompletion, IoOp, IoRequest, TOKEN_BITS};
use disk_layout::{IoBuf, IoFault};
use kernel_iface::{Completion, IoEngine, IoKind, Submission};

/// The view of one disk on a shared engine.
pub struct DiskIo<'a> {
    pub engine: &'a mut dyn IoEngine<IoBuf>,
    pub file: u32,
}

/// The disk (file number) a completion belongs to.
#[must_use]
pub fn file_of(user_data: u64) -> u32 {
    u32::try_from(user_data >> TOKEN_BITS).expect("8 bits")
}

/// Converts an engine completion into the store's form.
#[must_use]
pub fn to_store_completion(completion: Completion<IoBuf>) -> IoCompletion {
    let wanted = completion.buf.as_ref().map_or(0, IoBuf::len);
    let result = match completion.status(wanted) {
        Ok(()) => Ok(()),
        Err(errno) if completion.result >= 0 => {
            debug_assert_eq!(errno, libc::EIO);
            Err(IoFault::Short {
                done_bytes: u64::try_from(completion.result).unwrap_or(0),
                wanted_bytes: wanted as u64,
            })
        }
        Err(errno) => Err(IoFault::Errno { errno }),
    };
    IoCompletion {
        token: completion.user_data & ((1 << TOKEN_BITS) - 1),
        result,
        buf: completion.buf,
    }
}

impl BlockIo for DiskIo<'_> {
    fn submit(&mut self, request: IoRequest) {
        debug_assert!(request.token < 1 << TOKEN_BITS);
        let kind = match request.op {
            IoOp::Read { offset_bytes, buf } => IoKind::Read { offset_bytes, buf },
            IoOp::Write { offset_bytes, buf } => IoKind::Write { offset_bytes, buf },
            IoOp::WriteDurable { offset_bytes, buf } => IoKind::WriteDurable { offset_bytes, buf },
            IoOp::Flush => IoKind::Fsync,
            IoOp::Discard {
                offset_bytes,
                len_bytes,
            } => IoKind::Discard {
                offset_bytes,
                len_bytes,
            },
        };
        self.engine.push(Submission {
            file: self.file,
            user_data: (u64::from(self.file) << TOKEN_BITS) | request.token,
            kind,
        });
    }

    fn wait(&mut self, out: &mut Vec<IoCompletion>) {
        let mut raw = Vec::new();
        while raw.is_empty() {
            if let Err(error) = self.engine.submit_and_wait(1, None) {
                tracing::error!(%error, "I/O engine wait failed");
            }
            self.engine.drain(&mut raw);
        }
        for completion in raw {
            assert_eq!(
                file_of(completion.user_data),
                self.file,
                "completion of another disk during open"
            );
            out.push(to_store_completion(completion));
        }
    }
}
