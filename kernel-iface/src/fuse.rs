//! FUSE plumbing: mounting a FUSE filesystem as root with mount(2) and a
//! /dev/fuse descriptor (no fusermount, no libfuse: the binary stays
//! static), more channels of one session (`FUSE_DEV_IOC_CLONE`: each clone
//! is a queue of its own; a request is answered on the channel it was read
//! from), reading requests and writing answers, aborting the connection and
//! unmounting. The protocol is the caller's (node/src/attach/fuse/).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// The FUSE device.
pub const DEVICE_PATH: &str = "/dev/fuse";
/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;
/// /dev/fuse is character device 10:229 (misc).
const FUSE_MAJOR: u32 = 10;
const FUSE_MINOR: u32 = 229;
/// The module parameter that allows FUSE over io_uring (Linux 6.14+).
pub const URING_PARAMETER: &str = "/sys/module/fuse/parameters/enable_uring";

/// One channel of a FUSE session: requests are read from it and answered on it.
#[derive(Debug)]
pub struct FuseChannel {
    file: File,
}

/// What a read from a channel gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A request of this many bytes is at the start of the buffer.
    Request(usize),
    /// Nothing this time (interrupted, or a request the kernel withdrew): read again.
    Again,
    /// The filesystem was unmounted or the connection aborted: stop.
    Ended,
}

impl FuseChannel {
    /// Reads one request into `buffer`, which must hold the largest request
    /// (the header, its arguments and `max_write` bytes of data).
    pub fn receive(&self, buffer: &mut [u8]) -> io::Result<Received> {
        match nix::unistd::read(self.file.as_fd(), buffer) {
            Ok(0) => Ok(Received::Ended),
            Ok(count) => Ok(Received::Request(count)),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOENT | nix::errno::Errno::EAGAIN) => {
                Ok(Received::Again)
            }
            Err(nix::errno::Errno::ENODEV) => Ok(Received::Ended),
            Err(error) => Err(io::Error::from(error)),
        }
    }

    /// Writes one answer, given in pieces (header, arguments, data). An
    /// answer to a request the kernel no longer waits for (interrupted,
    /// connection aborted) fails with ENOENT / ENODEV: the caller ignores it.
    pub fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        nix::sys::uio::writev(self.file.as_fd(), parts).map_err(io::Error::from)
    }

    /// Another channel of the same session (`FUSE_DEV_IOC_CLONE`).
    pub fn clone_channel(&self) -> io::Result<Self> {
        let file = open_device()?;
        let mut session = u32::try_from(self.file.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
        // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session's
        // descriptor) through the pointer, which points at `session`, a live
        // local of that type; the kernel writes nothing back.
        // The request's type is c_ulong on glibc and c_int on musl.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let done = unsafe { libc::ioctl(file.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &raw mut session) };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { file })
    }

    /// Gives the channel's descriptor up so that it survives `execve` (an
    /// upgrade in place): the session lives on in the new program, which
    /// takes it back with `from_inherited`. Requests the kernel queues
    /// meanwhile wait for it.
    /// On failure the channel is given back, still serving.
    pub fn into_inherited(self) -> Result<RawFd, (Self, io::Error)> {
        if let Err(error) = crate::process::keep_across_exec(self.file.as_raw_fd()) {
            return Err((self, error));
        }
        Ok(self.file.into_raw_fd())
    }

    /// The channel a previous program of this process handed over
    /// (`into_inherited`); refused unless `fd` is open on /dev/fuse and was
    /// not taken before (`process::take_inherited`). The caller names a
    /// descriptor it inherited across `execve` for this purpose, which
    /// nothing else in the process owns.
    pub fn from_inherited(fd: RawFd) -> io::Result<Self> {
        crate::process::take_inherited(fd)?;
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: borrowed only for this fstat; the caller vouches `fd` is open and ours.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let stat = nix::sys::stat::fstat(borrowed).map_err(io::Error::from)?;
        let is_fuse = (stat.st_mode & libc::S_IFMT) == libc::S_IFCHR
            && libc::major(stat.st_rdev) == FUSE_MAJOR
            && libc::minor(stat.st_rdev) == FUSE_MINOR;
        if !is_fuse {
            return Err(io::Error::other(format!(
                "descriptor {fd} is not a {DEVICE_PATH} channel"
            )));
        }
        crate::process::set_close_on_exec(fd, true)?;
        // SAFETY: an inherited descriptor, taken once (checked above), that
        // the caller says nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file })
    }

    /// Another descriptor of this channel (dup), for io_uring commands that name the session.
    pub fn duplicate(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

fn open_device() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(DEVICE_PATH)
        .map_err(|error| io::Error::new(error.kind(), format!("{DEVICE_PATH}: {error}")))
}

/// Mounts a FUSE filesystem named `name` at `target` (an existing empty
/// directory), for root only; the returned channel serves it. Needs
/// CAP_SYS_ADMIN.
pub fn mount(target: &Path, name: &str) -> io::Result<FuseChannel> {
    let file = open_device()?;
    let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", file.as_raw_fd());
    nix::mount::mount(
        Some(name),
        target,
        Some(format!("fuse.{name}").as_str()),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|error| {
        io::Error::new(
            io::Error::from(error).kind(),
            format!("mount FUSE at {}: {error}", target.display()),
        )
    })?;
    Ok(FuseChannel { file })
}

/// Aborts the FUSE connection mounted at `target` (through
/// /sys/fs/fuse/connections): every request waiting for an answer fails
/// and every channel reads `Ended`. For a session whose server stops.
pub fn abort(target: &Path) -> io::Result<()> {
    let device = std::fs::metadata(target)?.dev();
    let minor = libc::minor(device);
    std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1")
}

/// Detaches the filesystem at `target` (lazily: it goes when its last user does).
pub fn unmount(target: &Path) -> io::Result<()> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Whether this kernel can serve FUSE over io_uring (Some: the module
/// parameter exists) and whether it is switched on (the bool).
#[must_use]
pub fn uring_enabled() -> Option<bool> {
    let text = std::fs::read_to_string(URING_PARAMETER).ok()?;
    Some(matches!(text.trim(), "Y" | "y" | "1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clone_ioctl_number_is_the_kernels() {
        // _IOR(229, 0, uint32_t): dir read (2) << 30 | size 4 << 16 | type 229 << 8 | nr 0.
        assert_eq!(FUSE_DEV_IOC_CLONE, (2 << 30) | (4 << 16) | (229 << 8));
    }

    #[test]
    fn cloning_a_channel_that_is_not_mounted_gets_the_kernels_error() {
        if !Path::new(DEVICE_PATH).exists() {
            eprintln!("SKIP: no {DEVICE_PATH}");
            return;
        }
        // A /dev/fuse descriptor that belongs to no mount: the clone is refused (EPERM).
        let channel = FuseChannel {
            file: open_device().unwrap(),
        };
        let error = channel.clone_channel().unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EPERM), "{error}");
    }
}
