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

/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

/// Whether this process holds capability number `bit` (its effective set).
#[must_use]
pub fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|effective| effective & (1 << bit) != 0)
}

/// Locks this process's memory in RAM, every page now mapped and every
/// page it touches from now on (`mlockall(MCL_CURRENT | MCL_FUTURE |
/// MCL_ONFAULT)`: pages are locked as they are first used, so reserved but
/// untouched address space costs nothing). A server of this host's own
/// block devices must never wait on reclaim that writes back through
/// itself: its code, stacks and buffers stay resident.
///
/// Refused without CAP_IPC_LOCK (an `Err`, nothing locked): past
/// RLIMIT_MEMLOCK, MCL_FUTURE would make the process's own allocations fail.
pub fn lock_memory() -> std::io::Result<()> {
    if !has_capability(CAP_IPC_LOCK) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "no CAP_IPC_LOCK: memory not locked",
        ));
    }
    // SAFETY: mlockall takes flags only and changes no memory contents.
    let result = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Restores the default action of SIGPIPE, which the Rust runtime sets to
/// ignored: a one-shot command whose output goes into a pipe (`| head`)
/// then ends quietly when the reader is gone, as other Unix tools do,
/// instead of panicking on its next print. Not for servers (a write to a
/// closed unix socket would end them); call it before starting threads.
pub fn default_sigpipe() {
    // SAFETY: signal(2) installing SIG_DFL runs no code of ours; nothing
    // else of this process changes signal dispositions concurrently.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Sends `signal` to process `pid` (a child the caller started).
pub fn send_signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
    fn has_cap_sys_resource() -> bool {
        super::has_capability(24)
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
