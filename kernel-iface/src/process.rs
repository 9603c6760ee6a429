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

/// Lets descriptor `fd` survive `execve` (clears FD_CLOEXEC): an upgrade in
/// place hands its sockets and FUSE session to the new binary this way.
pub fn keep_across_exec(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    set_close_on_exec(fd, false)
}

/// Sets (or clears) FD_CLOEXEC on `fd`.
pub fn set_close_on_exec(fd: std::os::fd::RawFd, close: bool) -> std::io::Result<()> {
    // SAFETY: fcntl(2) F_GETFD / F_SETFD on an integer descriptor touches no
    // memory of ours; a descriptor that is not open fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let wanted = if close {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, wanted) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Claims `fd`, a descriptor inherited across `execve`, for one owner:
/// refused when it is not open, or was claimed before.
pub fn take_inherited(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    static TAKEN: std::sync::Mutex<Vec<std::os::fd::RawFd>> = std::sync::Mutex::new(Vec::new());
    // SAFETY: F_GETFD on an integer descriptor reads no memory of ours.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if taken.contains(&fd) {
        return Err(std::io::Error::other(format!(
            "inherited descriptor {fd} was taken already"
        )));
    }
    taken.push(fd);
    Ok(())
}

/// Closes `fd`, a descriptor inherited across `execve` that is no longer
/// needed (see `take_inherited`).
pub fn close_inherited(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    take_inherited(fd)?;
    // SAFETY: inherited, claimed once (above), and not owned elsewhere.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Takes an inherited listening socket (see `take_inherited`); refused
/// unless it is a socket.
pub fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    take_inherited(fd)?;
    let mut kind: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt(2) writes one c_int into `kind` (a live local) and its
    // length into `len`.
    let done = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut kind).cast(),
            &raw mut len,
        )
    };
    if done != 0 || kind == 0 {
        return Err(std::io::Error::other(format!(
            "inherited descriptor {fd} is not a listening socket"
        )));
    }
    set_close_on_exec(fd, true)?;
    // SAFETY: a listening socket inherited across execve, claimed once
    // (above); the caller says nothing else owns it.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

/// Runs `hook` when the process exits through exit(3) (a return from
/// main, `std::process::exit`), not on a signal or an abort.
pub fn at_exit(hook: extern "C" fn()) -> std::io::Result<()> {
    // SAFETY: atexit(3) stores a plain function pointer; the hook is an
    // `extern "C" fn()` with no arguments, as it wants.
    if unsafe { libc::atexit(hook) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other("atexit refused the hook"))
    }
}

/// The signal `wake_thread` sends.
pub const WAKE_SIGNAL: i32 = libc::SIGUSR2;

extern "C" fn ignore_wake(_: libc::c_int) {}

/// Installs a handler for `WAKE_SIGNAL` that does nothing, without
/// SA_RESTART: a thread blocked in a read(2) that gets the signal returns
/// EINTR and can look at what changed (a FUSE channel reader asked to stop
/// without ending its session). Idempotent.
pub fn install_wake_handler() -> std::io::Result<()> {
    // SAFETY: sigaction(2) with a zeroed struct whose handler is an
    // `extern "C" fn(c_int)` that touches nothing (async-signal-safe), an
    // empty mask and no flags; the old action is not read.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_wake as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&raw mut action.sa_mask);
        action.sa_flags = 0;
        if libc::sigaction(WAKE_SIGNAL, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Interrupts a blocking system call of `thread` (see `install_wake_handler`).
pub fn wake_thread(thread: std::os::unix::thread::RawPthread) -> std::io::Result<()> {
    // std's thread id is a u64; libc's pthread_t is a u64 on glibc and a
    // pointer on musl: the same value either way.
    #[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
    let thread = thread as libc::pthread_t;
    // SAFETY: pthread_kill(3) on a thread id the caller holds a join handle
    // of (so it has not been reaped); the handler installed does nothing.
    let done = unsafe { libc::pthread_kill(thread, WAKE_SIGNAL) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(done))
    }
}

#[cfg(test)]
mod tests {
    /// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
    fn has_cap_sys_resource() -> bool {
        super::has_capability(24)
    }

    #[test]
    fn a_descriptor_kept_across_exec_loses_its_close_on_exec_flag_and_gets_it_back() {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = file.as_raw_fd();
        // SAFETY: F_GETFD on a descriptor this test owns.
        let cloexec = || unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0;
        assert!(cloexec(), "std opens with O_CLOEXEC");
        super::keep_across_exec(fd).unwrap();
        assert!(!cloexec());
        super::set_close_on_exec(fd, true).unwrap();
        assert!(cloexec());
        assert!(super::keep_across_exec(-1).is_err());
    }

    #[test]
    fn a_woken_thread_blocked_in_a_read_returns_eintr_and_is_not_killed() {
        use std::os::fd::AsRawFd;
        use std::os::unix::thread::JoinHandleExt;
        super::install_wake_handler().unwrap();
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            // SAFETY: read(2) into a live local buffer of its length.
            let read = unsafe { libc::read(reader.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
            (read, std::io::Error::last_os_error().raw_os_error())
        });
        let id = thread.as_pthread_t();
        for _ in 0..500 {
            if thread.is_finished() {
                break;
            }
            super::wake_thread(id).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(thread.join().unwrap(), (-1, Some(libc::EINTR)));
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
