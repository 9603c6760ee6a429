//! Process-wide settings for a server that may serve this host's own block
//! devices.

/// `PR_SET_IO_FLUSHER` (Linux 5.6): the caller's memory allocations may
/// not start I/O to reclaim memory, and it is not throttled as a writer.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread, and the threads it starts afterwards, as an
/// I/O flusher: when this host writes back dirty pages of a filesystem on
/// a device this process serves (host attach), reclaim inside the process
/// must not wait on that same writeback (a deadlock), as for qemu-nbd and
/// nbd-client. Needs CAP_SYS_RESOURCE.
pub fn set_io_flusher() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) takes only integers and
    // touches no memory of this process.
    let result = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
    fn has_cap_sys_resource() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        effective & (1 << 24) != 0
    }

    #[test]
    fn with_cap_sys_resource_the_process_becomes_an_io_flusher_and_without_it_gets_eperm() {
        let result = super::set_io_flusher();
        if has_cap_sys_resource() {
            result.expect("CAP_SYS_RESOURCE on Linux >= 5.6");
        } else {
            assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EPERM));
        }
    }
}
