//! Both I/O engines against real files opened with O_DIRECT: data round
//! trips, errors come back as errno, wakers interrupt waits, and many
//! requests in flight complete (more than the engine's slab holds).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use kernel_iface::engine::ENGINE_REQUESTS_MAX;
use kernel_iface::{open_engine, Completion, EngineChoice, IoEngine, IoKind, Submission};

/// A 4 KiB-aligned buffer made without unsafe (over-allocate, slice).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let mut storage = vec![fill; len + 4096];
        let start = storage.as_mut_ptr().align_offset(4096);
        Self { storage, start, len }
    }
}

impl AsMut<[u8]> for Aligned {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn engine(choice: EngineChoice, size: u64) -> (tempfile::TempDir, Box<dyn IoEngine<Aligned>>) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("disk");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    file.set_len(size).unwrap();
    let engine = open_engine(vec![file], choice).unwrap();
    (dir, engine)
}

fn wait_all(engine: &mut dyn IoEngine<Aligned>, count: usize) -> Vec<Completion<Aligned>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < count {
        assert!(Instant::now() < deadline, "completions did not arrive");
        engine.submit_and_wait(1, Some(Duration::from_millis(100))).unwrap();
        engine.drain(&mut out);
    }
    out
}

fn round_trip(choice: EngineChoice) {
    let (_dir, mut engine) = engine(choice, 16 << 20);
    for block in 0..64u64 {
        engine.push(Submission {
            file: 0,
            user_data: block,
            kind: IoKind::Write {
                offset_bytes: block * 8192,
                buf: Aligned::new(8192, u8::try_from(block).unwrap()),
            },
        });
    }
    let done = wait_all(engine.as_mut(), 64);
    assert!(done.iter().all(|c| c.status(8192).is_ok()), "writes failed");
    engine.push(Submission {
        file: 0,
        user_data: 999,
        kind: IoKind::Fsync,
    });
    let flushed = wait_all(engine.as_mut(), 1);
    assert_eq!(flushed[0].status(0), Ok(()));
    for block in 0..64u64 {
        engine.push(Submission {
            file: 0,
            user_data: block,
            kind: IoKind::Read {
                offset_bytes: block * 8192,
                buf: Aligned::new(8192, 0xFF),
            },
        });
    }
    for mut completion in wait_all(engine.as_mut(), 64) {
        assert_eq!(completion.status(8192), Ok(()));
        let expected = u8::try_from(completion.user_data).unwrap();
        let buf = completion.buf.as_mut().unwrap().as_mut();
        assert!(
            buf.iter().all(|&b| b == expected),
            "block {} read back wrong data",
            completion.user_data
        );
    }
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn io_uring_writes_read_back() {
    round_trip(EngineChoice::Auto);
}

#[test]
fn thread_pool_writes_read_back() {
    round_trip(EngineChoice::ThreadPool);
}

fn errors_are_errno(choice: EngineChoice) {
    let (_dir, mut engine) = engine(choice, 1 << 20);
    // A read beyond any file size the kernel accepts: EINVAL (negative offset).
    engine.push(Submission {
        file: 0,
        user_data: 1,
        kind: IoKind::Read {
            offset_bytes: u64::MAX - 4095,
            buf: Aligned::new(4096, 0),
        },
    });
    // Unknown file index.
    engine.push(Submission {
        file: 7,
        user_data: 2,
        kind: IoKind::Fsync,
    });
    // Past the end: a short (zero-byte) read.
    engine.push(Submission {
        file: 0,
        user_data: 3,
        kind: IoKind::Read {
            offset_bytes: 4 << 20,
            buf: Aligned::new(4096, 0),
        },
    });
    let mut done = wait_all(engine.as_mut(), 3);
    done.sort_by_key(|c| c.user_data);
    assert_eq!(done[0].status(4096), Err(libc::EINVAL));
    assert!(done[1].status(0).is_err(), "bad file index must fail");
    assert_eq!(done[2].status(4096), Err(libc::EIO), "short read must be an error");
}

#[test]
fn io_uring_reports_errors_as_errno() {
    errors_are_errno(EngineChoice::Auto);
}

#[test]
fn thread_pool_reports_errors_as_errno() {
    errors_are_errno(EngineChoice::ThreadPool);
}

fn waker_interrupts_wait(choice: EngineChoice) {
    let (_dir, mut engine) = engine(choice, 1 << 20);
    let waker = engine.waker();
    let started = Instant::now();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        waker.wake();
    });
    // Without the wake this would wait the full 20 s.
    engine.submit_and_wait(1, Some(Duration::from_secs(20))).unwrap();
    thread.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "wake did not interrupt the wait"
    );
}

#[test]
fn io_uring_waker_interrupts_a_wait() {
    waker_interrupts_wait(EngineChoice::Auto);
}

#[test]
fn thread_pool_waker_interrupts_a_wait() {
    waker_interrupts_wait(EngineChoice::ThreadPool);
}

fn more_than_slab(choice: EngineChoice) {
    let (_dir, mut engine) = engine(choice, 64 << 20);
    let count = ENGINE_REQUESTS_MAX * 3;
    for index in 0..count as u64 {
        engine.push(Submission {
            file: 0,
            user_data: index,
            kind: IoKind::Write {
                offset_bytes: (index % 8192) * 4096,
                buf: Aligned::new(4096, 1),
            },
        });
    }
    let done = wait_all(engine.as_mut(), count);
    assert_eq!(done.len(), count);
    assert!(done.iter().all(|c| c.status(4096).is_ok()));
}

#[test]
fn io_uring_accepts_more_requests_than_it_holds_at_once() {
    more_than_slab(EngineChoice::Auto);
}

#[test]
fn thread_pool_accepts_more_requests_than_it_holds_at_once() {
    more_than_slab(EngineChoice::ThreadPool);
}

#[test]
fn auto_choice_uses_io_uring_on_this_kernel() {
    let (_dir, engine) = engine(EngineChoice::Auto, 1 << 20);
    if engine.kind() != "io_uring" {
        println!("SKIP: io_uring unavailable here; the fallback is covered by the thread_pool tests");
        return;
    }
    assert_eq!(engine.kind(), "io_uring");
}

/// Blocks of `path` the filesystem holds (st_blocks is in 512-byte units).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Writes 8 MiB of ones at `offset`, discards the middle 4 MiB, and checks
/// the discarded range reads as zeroes while the rest keeps its data.
fn write_discard_read(engine: &mut dyn IoEngine<Aligned>, file: u32, offset: u64) {
    const MIB: u64 = 1 << 20;
    for piece in 0..8u64 {
        engine.push(Submission {
            file,
            user_data: piece,
            kind: IoKind::WriteDurable {
                offset_bytes: offset + piece * MIB,
                buf: Aligned::new(1 << 20, 1),
            },
        });
    }
    assert!(wait_all(engine, 8).iter().all(|c| c.status(1 << 20).is_ok()));
    engine.push(Submission {
        file,
        user_data: 100,
        kind: IoKind::Discard {
            offset_bytes: offset + 2 * MIB,
            len_bytes: 4 * MIB,
        },
    });
    let done = wait_all(engine, 1);
    assert_eq!(done[0].status(0), Ok(()), "discard failed: {}", done[0].result);
    for piece in 0..8u64 {
        engine.push(Submission {
            file,
            user_data: piece,
            kind: IoKind::Read {
                offset_bytes: offset + piece * MIB,
                buf: Aligned::new(1 << 20, 0xEE),
            },
        });
    }
    for mut completion in wait_all(engine, 8) {
        assert_eq!(completion.status(1 << 20), Ok(()));
        let discarded = (2..6).contains(&completion.user_data);
        let expected = if discarded { 0 } else { 1 };
        assert!(
            completion.buf.as_mut().unwrap().as_mut().iter().all(|&b| b == expected),
            "MiB {} read back wrong data after the discard",
            completion.user_data
        );
    }
}

fn discard_punches_a_hole_in_a_file(choice: EngineChoice) {
    let (dir, mut engine) = engine(choice, 16 << 20);
    write_discard_read(engine.as_mut(), 0, 0);
    let allocated = allocated_bytes(&dir.path().join("disk"));
    assert!(
        allocated <= 4 << 20,
        "{allocated} bytes still allocated after 4 of 8 MiB written were discarded"
    );
}

#[test]
fn io_uring_discard_punches_a_hole_in_a_regular_file() {
    discard_punches_a_hole_in_a_file(EngineChoice::Auto);
}

#[test]
fn thread_pool_discard_punches_a_hole_in_a_regular_file() {
    discard_punches_a_hole_in_a_file(EngineChoice::ThreadPool);
}

/// A loop device over a file passes discards on as punched holes, so the
/// backing file shows what the SSD would have been told.
/// How the engine of `discard_reaches_a_block_device` is made.
enum Made {
    Open(EngineChoice),
    /// io_uring with block discards on its helper thread (what kernels
    /// before 6.12 get).
    UringWithHelper,
}

fn discard_reaches_a_block_device(made: Made, test: &str) {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        kernel_iface::loopdev::record_skip(test, &why);
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing).unwrap().set_len(32 << 20).unwrap();
    let device = kernel_iface::loopdev::LoopDevice::attach(&backing, true).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device.path())
        .unwrap();
    let mut engine: Box<dyn IoEngine<Aligned>> = match made {
        Made::Open(choice) => open_engine(vec![file], choice).unwrap(),
        Made::UringWithHelper => {
            use std::os::fd::AsRawFd;
            let fds = vec![file.as_raw_fd()];
            let mut engine = kernel_iface::uring::UringEngine::new(fds, vec![file])
                .map_err(|(error, _)| error)
                .unwrap();
            engine.use_discard_helper().unwrap();
            Box::new(engine)
        }
    };
    write_discard_read(engine.as_mut(), 0, 8 << 20);
    assert_eq!(engine.in_flight(), 0);
    drop(engine);
    let allocated = allocated_bytes(&backing);
    assert!(
        allocated <= 4 << 20,
        "{allocated} bytes of the backing file still allocated after 4 of 8 MiB written were discarded"
    );
}

#[test]
fn io_uring_discard_reaches_a_loop_device_as_punched_holes() {
    discard_reaches_a_block_device(
        Made::Open(EngineChoice::Auto),
        "io_uring_discard_reaches_a_loop_device_as_punched_holes",
    );
}

#[test]
fn thread_pool_discard_reaches_a_loop_device_as_punched_holes() {
    discard_reaches_a_block_device(
        Made::Open(EngineChoice::ThreadPool),
        "thread_pool_discard_reaches_a_loop_device_as_punched_holes",
    );
}

#[test]
fn io_uring_without_the_block_discard_command_discards_through_its_helper_thread() {
    discard_reaches_a_block_device(
        Made::UringWithHelper,
        "io_uring_without_the_block_discard_command_discards_through_its_helper_thread",
    );
}
