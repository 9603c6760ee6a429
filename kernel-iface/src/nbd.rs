//! The kernel NBD client's ioctls (`linux/nbd.h`): `_IO(0xab, nr)`, each
//! taking an integer argument or none.

use std::os::fd::AsRawFd;

/// `_IO(0xab, nr)`: the nbd ioctls carry no size in their number.
const fn nbd_ioctl(nr: u64) -> u64 {
    (0xab << 8) | nr
}
pub const NBD_SET_SOCK: u64 = nbd_ioctl(0);
pub const NBD_SET_BLKSIZE: u64 = nbd_ioctl(1);
pub const NBD_DO_IT: u64 = nbd_ioctl(3);
pub const NBD_CLEAR_SOCK: u64 = nbd_ioctl(4);
pub const NBD_CLEAR_QUE: u64 = nbd_ioctl(5);
pub const NBD_SET_SIZE_BLOCKS: u64 = nbd_ioctl(7);
pub const NBD_DISCONNECT: u64 = nbd_ioctl(8);
pub const NBD_SET_TIMEOUT: u64 = nbd_ioctl(9);
pub const NBD_SET_FLAGS: u64 = nbd_ioctl(10);

/// Issues nbd ioctl `request` (one of the constants above) with `arg`.
pub fn ioctl(fd: &impl AsRawFd, request: u64, arg: u64) -> std::io::Result<()> {
    if request >> 8 != 0xab || request & 0xff > 10 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{request:#x} is not an nbd ioctl"),
        ));
    }
    let arg = libc::c_ulong::try_from(arg)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "ioctl argument too large"))?;
    // SAFETY: every nbd ioctl (checked above) takes an integer argument or
    // none, never a pointer, so no memory is read or written through `arg`.
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if done < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // linux/nbd.h: #define NBD_SET_SOCK _IO(0xab, 0) ... NBD_SET_FLAGS _IO(0xab, 10)
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_CLEAR_QUE, 0xab05);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn other_requests_are_refused_and_a_non_nbd_file_gets_the_kernels_error() {
        let file = tempfile::tempfile().unwrap();
        let refused = ioctl(&file, 0x5401, 0).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        // A regular file does not know the nbd ioctls: ENOTTY, nothing else happens.
        let error = ioctl(&file, NBD_SET_BLKSIZE, 4096).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOTTY));
    }
}
