//! `IoBuf`: a 4 KiB-aligned byte buffer that I/O backends can hand to O_DIRECT.
//!
//! Alignment is obtained without `unsafe`: the buffer over-allocates by one
//! alignment unit and exposes the aligned window. The heap allocation never
//! moves while the `IoBuf` lives, so the address handed to the kernel stays
//! valid for as long as the backend owns the buffer.

use crate::geometry::BLOCK_BYTES;

const ALIGN_BYTES: usize = BLOCK_BYTES;

/// An owned, 4 KiB-aligned buffer whose length is a multiple of 4 KiB.
pub struct IoBuf {
    storage: Box<[u8]>,
    start: usize,
    len: usize,
}

impl IoBuf {
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
    #[should_panic(expected = "not a multiple")]
    fn unaligned_lengths_are_refused() {
        let _ = IoBuf::new(100);
    }
}
