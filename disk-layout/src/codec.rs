//! Little-endian field access at fixed offsets of on-disk byte slices.
//!
//! Every on-disk structure is encoded with these helpers so that offsets are
//! explicit consts in the structure's own file and nothing depends on Rust's
//! struct layout. All integers are little-endian.

/// Reads a `u16` at `offset`.
#[must_use]
pub fn get_u16(bytes: &[u8], offset: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[offset..offset + 2]);
    u16::from_le_bytes(raw)
}

/// Reads a `u32` at `offset`.
#[must_use]
pub fn get_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

/// Reads a `u64` at `offset`.
#[must_use]
pub fn get_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(raw)
}

/// Reads 16 raw bytes (a UUID) at `offset`.
#[must_use]
pub fn get_bytes16(bytes: &[u8], offset: usize) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&bytes[offset..offset + 16]);
    raw
}

/// Bits 0..32 of `value` (a 40-bit address's low word).
#[must_use]
pub fn low_32(value: u64) -> u32 {
    u32::try_from(value & 0xFFFF_FFFF).expect("masked to 32 bits")
}

/// Writes a `u16` at `offset`.
pub fn put_u16(bytes: &mut [u8], offset: usize, value: u16) {
    bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

/// Writes a `u32` at `offset`.
pub fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes a `u64` at `offset`.
pub fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// crc32c of `bytes` computed as if the 4 bytes at `crc_offset` were zero.
///
/// Headers store their own checksum inside the checksummed block; this avoids
/// copying the block to zero the field.
#[must_use]
pub fn crc32c_with_hole(bytes: &[u8], crc_offset: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..crc_offset]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &bytes[crc_offset + 4..])
}

/// Rounds `value` up to a multiple of `align` (a power of two).
#[must_use]
pub const fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_little_endian() {
        let mut bytes = [0u8; 16];
        put_u16(&mut bytes, 0, 0xBEEF);
        put_u32(&mut bytes, 2, 0xDEAD_BEEF);
        put_u64(&mut bytes, 6, 0x0102_0304_0506_0708);
        assert_eq!(bytes[0], 0xEF, "little-endian low byte first");
        assert_eq!(get_u16(&bytes, 0), 0xBEEF);
        assert_eq!(get_u32(&bytes, 2), 0xDEAD_BEEF);
        assert_eq!(get_u64(&bytes, 6), 0x0102_0304_0506_0708);
    }

    #[test]
    fn crc_with_hole_ignores_the_stored_checksum() {
        let mut block = vec![7u8; 64];
        let before = crc32c_with_hole(&block, 8);
        put_u32(&mut block, 8, 0x1234_5678);
        assert_eq!(crc32c_with_hole(&block, 8), before);
        block[9 + 4] ^= 1;
        assert_ne!(crc32c_with_hole(&block, 8), before);
    }
}
