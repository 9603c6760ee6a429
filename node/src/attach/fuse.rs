//! The FUSE backend of host attach: one filesystem, mounted by the node at
//! `DATA_DIR/attach/`, holds one file per attached volume, the size of the
//! volume; its reads, writes and fsyncs go straight to the volume (no NBD
//! hop). A loop device with direct I/O over that file is the host's block
//! device. Works on any Linux with FUSE (fusermount3), where ublk and the
//! kernel NBD client may be missing.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request,
};
use parking_lot::RwLock;

use crate::volume::Volume;

const ROOT: u64 = 1;
/// Attributes may be cached this long (sizes change only on resize).
const TTL: Duration = Duration::from_secs(1);
/// Bypass the page cache: the loop device above does its own caching.
const FOPEN_DIRECT_IO: u32 = 1;

/// The files of the attach filesystem, shared with the node.
#[derive(Default)]
pub struct Files {
    /// Inode → volume; inode = volume id + 1 (ids are never reused).
    by_inode: RwLock<BTreeMap<u64, Arc<Volume>>>,
}

impl Files {
    pub fn insert(&self, volume: Arc<Volume>) {
        self.by_inode.write().insert(volume.id + 1, volume);
    }

    pub fn remove(&self, name: &str) {
        self.by_inode.write().retain(|_, volume| volume.name != name);
    }

    /// The volume attached under `name`, if any.
    pub fn named(&self, name: &str) -> Option<Arc<Volume>> {
        self.by_inode
            .read()
            .values()
            .find(|volume| volume.name == name)
            .cloned()
    }

    fn get(&self, inode: u64) -> Option<Arc<Volume>> {
        self.by_inode.read().get(&inode).cloned()
    }

    /// The volume of `inode` for I/O: only while this node serves it (after
    /// a forced failover elsewhere, its old host gets errors, not stale data).
    fn serving(&self, inode: u64) -> Result<Arc<Volume>, i32> {
        let volume = self.get(inode).ok_or(libc::ENOENT)?;
        if volume.is_served() {
            Ok(volume)
        } else {
            tracing::warn!(volume = %volume.name, "I/O on an attached device of a volume this node no longer serves: refused");
            Err(libc::EIO)
        }
    }

    fn by_name(&self, name: &OsStr) -> Option<Arc<Volume>> {
        self.by_inode
            .read()
            .values()
            .find(|volume| OsStr::new(&volume.name) == name)
            .cloned()
    }
}

/// The filesystem the FUSE session serves.
pub struct AttachFs {
    pub files: Arc<Files>,
    pub runtime: tokio::runtime::Handle,
}

fn attr(inode: u64, size: u64, directory: bool) -> FileAttr {
    FileAttr {
        ino: inode,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if directory {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if directory { 0o700 } else { 0o600 },
        nlink: if directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The errno a failed volume request answers (every backend).
pub(crate) fn errno(error: &crate::volume::VolumeIoError) -> i32 {
    match error {
        crate::volume::VolumeIoError::OutOfRange { .. } => libc::EINVAL,
        crate::volume::VolumeIoError::Locked { .. } => libc::EACCES,
        _ => libc::EIO,
    }
}

impl Filesystem for AttachFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.files.by_name(name).filter(|_| parent == ROOT) {
            Some(volume) => reply.entry(&TTL, &attr(volume.id + 1, volume.size_bytes(), false), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, inode: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if inode == ROOT {
            return reply.attr(&TTL, &attr(ROOT, 0, true));
        }
        match self.files.get(inode) {
            Some(volume) => reply.attr(&TTL, &attr(inode, volume.size_bytes(), false)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, inode: u64, _flags: i32, reply: ReplyOpen) {
        match self.files.get(inode) {
            Some(_) => reply.opened(0, FOPEN_DIRECT_IO),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        inode: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let volume = match self.files.serving(inode) {
            Ok(volume) => volume,
            Err(errno) => return reply.error(errno),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        // Reads past the end return what there is (a file's semantics).
        let len = u64::from(size).min(volume.size_bytes().saturating_sub(offset));
        if len == 0 {
            return reply.data(&[]);
        }
        match self.runtime.block_on(volume.read(offset, len)) {
            Ok(data) => reply.data(&data.to_vec()),
            Err(error) => {
                tracing::warn!(volume = %volume.name, %error, "attached device read failed");
                reply.error(errno(&error));
            }
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        inode: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let volume = match self.files.serving(inode) {
            Ok(volume) => volume,
            Err(errno) => return reply.error(errno),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        // Every acknowledged write is durable (and replicated): FUA is implicit.
        match self.runtime.block_on(volume.write(offset, data.to_vec())) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(error) => {
                tracing::warn!(volume = %volume.name, %error, "attached device write failed");
                reply.error(errno(&error));
            }
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _inode: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, inode: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let Some(volume) = self.files.get(inode) else {
            return reply.error(libc::ENOENT);
        };
        match self.runtime.block_on(volume.flush()) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, inode: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if inode != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        for (inode, volume) in self.files.by_inode.read().iter() {
            entries.push((*inode, FileType::RegularFile, volume.name.clone()));
        }
        let skip = usize::try_from(offset).unwrap_or(0);
        for (index, (inode, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            let next = i64::try_from(index + 1).unwrap_or(i64::MAX);
            if reply.add(inode, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
