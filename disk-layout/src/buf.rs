//! `IoBuf`: a 4 KiB-aligned byte buffer that I/O backends can hand to O_DIRECT.
//!
//! Alignment is obtained without `unsafe`: the buffer over-allocates by one
//! alignment unit and exposes the aligned window. The heap allocation never
//! moves while the `IoBuf` lives, so the address handed to the kernel stays
//! valid for as long as the backend owns the buffer.
//!
//! Buffers of up to `POOL_BUFFER_BYTES_MAX` go back, when dropped, to a
//! small free list of the thread that drops them (at most
//! `POOL_BYTES_PER_THREAD` in all); `IoBuf::for_reading` takes from it. A
//! 4 KiB read otherwise costs an 8 KiB zeroed allocation (zeroing that the
//! read overwrites at once): 4-5 % of a reactor's time at 4 KiB random
//! reads, profiled.

use std::cell::RefCell;

use crate::geometry::BLOCK_BYTES;

const ALIGN_BYTES: usize = BLOCK_BYTES;
/// Largest buffer kept for reuse (one store request).
pub const POOL_BUFFER_BYTES_MAX: usize = 1 << 20;
/// Bytes of free buffers a thread keeps at most.
pub const POOL_BYTES_PER_THREAD: usize = 16 << 20;
/// Free buffers of one length a thread keeps at most.
const POOL_BUFFERS_PER_LENGTH: usize = 64;

/// One thread's free buffers, by length in blocks (index 0 is 1 block).
#[derive(Default)]
struct Pool {
    free: Vec<Vec<(Box<[u8]>, usize)>>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// The pool's class of a buffer of `capacity` bytes, if it keeps such.
fn class_of(capacity: usize) -> Option<usize> {
    (capacity > 0 && capacity <= POOL_BUFFER_BYTES_MAX && capacity.is_multiple_of(ALIGN_BYTES))
        .then(|| capacity / ALIGN_BYTES - 1)
}

/// An owned, 4 KiB-aligned buffer whose length is a multiple of 4 KiB.
pub struct IoBuf {
    storage: Box<[u8]>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A buffer of `len_bytes` (a multiple of 4096) that a read is about to
    /// fill whole: it may hold bytes of an earlier use on this thread (a
    /// read that does not fill it is a failed read, whose buffer is never
    /// answered with), so it is taken from the thread's free buffers when
    /// one of that length is there, without zeroing.
    #[must_use]
    pub fn for_reading(len_bytes: usize) -> Self {
        let reused = class_of(len_bytes).and_then(|class| {
            POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                let (storage, start) = pool.free.get_mut(class)?.pop()?;
                pool.bytes -= len_bytes;
                Some((storage, start))
            })
            .ok()
            .flatten()
        });
        match reused {
            Some((storage, start)) => Self {
                storage,
                start,
                len: len_bytes,
            },
            None => Self::new(len_bytes),
        }
    }

    /// Allocates a zeroed buffer of `len_bytes` (a multiple of 4096).
    #[must_use]
    pub fn new(len_bytes: usize) -> Self {
        assert!(
            len_bytes.is_multiple_of(ALIGN_BYTES),
            "IoBuf length {len_bytes} is not a multiple of {ALIGN_BYTES}"
        );
        let storage = vec![0u8; len_bytes + ALIGN_BYTES].into_boxed_slice();
        let start = storage.as_ptr().align_offset(ALIGN_BYTES);
        assert!(start < ALIGN_BYTES, "cannot align IoBuf");
        let buf = Self {
            storage,
            start,
            len: len_bytes,
        };
        debug_assert!((buf.as_slice().as_ptr() as usize).is_multiple_of(ALIGN_BYTES));
        buf
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (what `set_len` may grow to).
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.storage.len() - ALIGN_BYTES
    }

    /// Changes the visible length (a multiple of 4096, at most the capacity).
    pub fn set_len(&mut self, len_bytes: usize) {
        assert!(len_bytes.is_multiple_of(ALIGN_BYTES));
        assert!(len_bytes <= self.capacity());
        self.len = len_bytes;
    }

    /// The aligned bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The aligned bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Drop for IoBuf {
    /// Keeps the storage for `for_reading` while the thread's pool has room.
    fn drop(&mut self) {
        let capacity = self.capacity();
        let Some(class) = class_of(capacity) else {
            return;
        };
        let storage = std::mem::take(&mut self.storage);
        let start = self.start;
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.bytes + capacity > POOL_BYTES_PER_THREAD {
                return;
            }
            if pool.free.len() <= class {
                pool.free.resize_with(class + 1, Vec::new);
            }
            if pool.free[class].len() >= POOL_BUFFERS_PER_LENGTH {
                return;
            }
            pool.free[class].push((storage, start));
            pool.bytes += capacity;
        });
    }
}

impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_to_4096_whatever_the_size() {
        for blocks in [1usize, 2, 3, 17, 256] {
            let buf = IoBuf::new(blocks * ALIGN_BYTES);
            assert_eq!(buf.len(), blocks * ALIGN_BYTES);
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN_BYTES, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn set_len_shrinks_and_regrows_within_capacity() {
        let mut buf = IoBuf::new(4 * ALIGN_BYTES);
        buf.set_len(ALIGN_BYTES);
        assert_eq!(buf.as_slice().len(), ALIGN_BYTES);
        buf.set_len(4 * ALIGN_BYTES);
        assert_eq!(buf.as_mut_slice().len(), 4 * ALIGN_BYTES);
    }

    #[test]
    fn a_dropped_buffer_is_reused_by_the_next_read_of_its_length_on_the_thread() {
        // On a thread of its own: the pool is per thread.
        std::thread::spawn(|| {
            let mut first = IoBuf::for_reading(2 * ALIGN_BYTES);
            first.as_mut_slice().fill(7);
            let address = first.as_slice().as_ptr() as usize;
            drop(first);
            // Another length does not take it.
            let other = IoBuf::for_reading(ALIGN_BYTES);
            assert_ne!(other.as_slice().as_ptr() as usize, address);
            let again = IoBuf::for_reading(2 * ALIGN_BYTES);
            assert_eq!(again.as_slice().as_ptr() as usize, address, "storage reused");
            assert_eq!(again.as_slice().as_ptr() as usize % ALIGN_BYTES, 0);
            assert_eq!(again.len(), 2 * ALIGN_BYTES);
            // `new` is always zeroed, even with the pool holding dirty storage.
            drop(again);
            assert!(IoBuf::new(2 * ALIGN_BYTES).as_slice().iter().all(|&b| b == 0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_keeps_at_most_its_byte_budget_of_free_buffers() {
        std::thread::spawn(|| {
            let count = POOL_BYTES_PER_THREAD / POOL_BUFFER_BYTES_MAX + 8;
            let bufs: Vec<IoBuf> = (0..count).map(|_| IoBuf::for_reading(POOL_BUFFER_BYTES_MAX)).collect();
            drop(bufs);
            let kept = POOL.with(|pool| pool.borrow().bytes);
            assert_eq!(kept, POOL_BYTES_PER_THREAD);
            // Larger than the largest class: never kept.
            drop(IoBuf::new(POOL_BUFFER_BYTES_MAX + ALIGN_BYTES));
            assert_eq!(POOL.with(|pool| pool.borrow().bytes), POOL_BYTES_PER_THREAD);
        })
        .join()
        .unwrap();
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn unaligned_lengths_are_refused() {
        let _ = IoBuf::new(100);
    }
}
