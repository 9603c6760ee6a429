//! Self-describing block contents for load generators and checkers: each
//! 4 KiB block names its volume, LBA and generation and fills the rest from
//! them, so a checker can tell exactly which write (if any) a block holds
//! and that no byte of it is foreign or torn.

/// Bytes of one pattern block.
pub const PATTERN_BLOCK_BYTES: usize = 4096;
const MAGIC: u64 = 0x424C_5354_5041_5454; // "BLSTPATT"

/// Fills `block` (4096 bytes) with the pattern of (volume, lba, generation).
pub fn fill(block: &mut [u8], volume: u64, lba: u64, generation: u64) {
    assert_eq!(block.len(), PATTERN_BLOCK_BYTES);
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&volume.to_le_bytes());
    block[16..24].copy_from_slice(&lba.to_le_bytes());
    block[24..32].copy_from_slice(&generation.to_le_bytes());
    let mut state = generation.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.rotate_left(17) ^ volume;
    for chunk in block[32..].chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
}

/// What a block holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// All zeroes: never written (or trimmed).
    Zero,
    /// A whole, intact pattern block of this generation.
    Written { generation: u64 },
    /// Anything else: torn, foreign or corrupt data.
    Garbage,
}

/// Decodes a block expected to belong to (volume, lba).
#[must_use]
pub fn decode(block: &[u8], volume: u64, lba: u64) -> Decoded {
    if block.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    let field = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
    if block.len() != PATTERN_BLOCK_BYTES || field(0) != MAGIC || field(8) != volume || field(16) != lba {
        return Decoded::Garbage;
    }
    let generation = field(24);
    let mut expected = vec![0u8; PATTERN_BLOCK_BYTES];
    fill(&mut expected, volume, lba, generation);
    if expected == block {
        Decoded::Written { generation }
    } else {
        Decoded::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_block_decodes_to_its_generation() {
        let mut block = vec![0u8; PATTERN_BLOCK_BYTES];
        fill(&mut block, 3, 99, 12345);
        assert_eq!(decode(&block, 3, 99), Decoded::Written { generation: 12345 });
        assert_eq!(decode(&block, 3, 98), Decoded::Garbage, "block of another LBA");
        assert_eq!(decode(&vec![0u8; PATTERN_BLOCK_BYTES], 3, 99), Decoded::Zero);
    }

    #[test]
    fn one_flipped_bit_or_a_torn_sector_is_garbage() {
        let mut block = vec![0u8; PATTERN_BLOCK_BYTES];
        fill(&mut block, 1, 2, 3);
        let mut flipped = block.clone();
        flipped[2000] ^= 4;
        assert_eq!(decode(&flipped, 1, 2), Decoded::Garbage);
        let mut torn = block.clone();
        let mut other = vec![0u8; PATTERN_BLOCK_BYTES];
        fill(&mut other, 1, 2, 4);
        torn[512..1024].copy_from_slice(&other[512..1024]);
        assert_eq!(decode(&torn, 1, 2), Decoded::Garbage);
    }
}
