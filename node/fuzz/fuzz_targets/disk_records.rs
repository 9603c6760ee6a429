//! The on-disk decoders on arbitrary 4 KiB blocks (what a corrupted or
//! foreign disk holds): batch headers, superblocks, checkpoint headers.
//! Nothing panics; whatever decodes re-encodes to a block that decodes to
//! the same value.

#![no_main]

use disk_layout::checkpoint::CheckpointHeader;
use disk_layout::record::BatchHeader;
use disk_layout::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

const BLOCK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut block = vec![0u8; BLOCK];
    let take = data.len().min(BLOCK);
    block[..take].copy_from_slice(&data[..take]);
    if let Ok((header, _crc)) = BatchHeader::decode(&block) {
        let mut again = vec![0u8; BLOCK];
        header.encode_into(&mut again);
        let (decoded, _) = BatchHeader::decode(&again).expect("an encoded header decodes");
        assert_eq!(decoded, header);
    }
    if let Ok(superblock) = Superblock::decode(&block) {
        assert_eq!(Superblock::decode(&superblock.encode()).ok(), Some(superblock));
    }
    if let Ok(checkpoint) = CheckpointHeader::decode(&block) {
        assert_eq!(CheckpointHeader::decode(&checkpoint.encode()).ok(), Some(checkpoint));
    }
});
