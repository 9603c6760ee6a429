//! Recognising what is already on a disk, from its first and last bytes:
//! filesystems, partition tables, RAID/LVM/LUKS labels, ballast itself.
//! Pure functions over byte slices, so every kind is unit-tested.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read from each end of a device for probing.
pub const PROBE_BYTES: usize = 128 * 1024;

/// Something found on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signature {
    Ext,
    Xfs,
    Btrfs,
    Swap,
    LvmPhysicalVolume,
    MdRaid,
    Luks,
    Gpt,
    DosPartitionTable,
    Iso9660,
    Fat,
    Ntfs,
    Bcache,
    Ballast,
}

impl Signature {
    /// Human name for messages.
    #[must_use]
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Ext => "ext2/3/4 filesystem",
            Self::Xfs => "XFS filesystem",
            Self::Btrfs => "btrfs filesystem",
            Self::Swap => "swap space",
            Self::LvmPhysicalVolume => "LVM physical volume",
            Self::MdRaid => "Linux MD RAID member",
            Self::Luks => "LUKS encrypted volume",
            Self::Gpt => "GPT partition table",
            Self::DosPartitionTable => "DOS/MBR partition table",
            Self::Iso9660 => "ISO 9660 image",
            Self::Fat => "FAT filesystem",
            Self::Ntfs => "NTFS filesystem",
            Self::Bcache => "bcache device",
            Self::Ballast => "ballast disk",
        }
    }
}

fn at(bytes: &[u8], offset: usize, magic: &[u8]) -> bool {
    bytes.get(offset..offset + magic.len()) == Some(magic)
}

const MD_MAGIC: [u8; 4] = 0xa92b_4efc_u32.to_le_bytes();
const BCACHE_MAGIC: [u8; 16] = [
    0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
];

/// Identifies the first signature found. `head` is the first bytes of the
/// device, `tail` the last ones (ending at `size_bytes`).
#[must_use]
pub fn probe_signature_bytes(head: &[u8], tail: &[u8], size_bytes: u64) -> Option<Signature> {
    if at(head, 0, b"BLSTSUPR") || at(head, 4096, b"BLSTSUPR") {
        return Some(Signature::Ballast);
    }
    let head_checks: [(usize, &[u8], Signature); 12] = [
        (1080, &0xEF53u16.to_le_bytes(), Signature::Ext),
        (0, b"XFSB", Signature::Xfs),
        (0x10040, b"_BHRfS_M", Signature::Btrfs),
        (4096 - 10, b"SWAPSPACE2", Signature::Swap),
        (4096 - 10, b"SWAP-SPACE", Signature::Swap),
        (0, b"LUKS\xba\xbe", Signature::Luks),
        (512, b"EFI PART", Signature::Gpt),
        (0x8001, b"CD001", Signature::Iso9660),
        (3, b"NTFS    ", Signature::Ntfs),
        (0, &MD_MAGIC, Signature::MdRaid),
        (4096, &MD_MAGIC, Signature::MdRaid),
        (4096 + 24, &BCACHE_MAGIC, Signature::Bcache),
    ];
    for (offset, magic, signature) in &head_checks {
        if at(head, *offset, magic) {
            return Some(*signature);
        }
    }
    if (0..4).any(|sector| at(head, sector * 512, b"LABELONE") && at(head, sector * 512 + 24, b"LVM2 001")) {
        return Some(Signature::LvmPhysicalVolume);
    }
    let boot_signature = at(head, 510, &[0x55, 0xAA]);
    if boot_signature && (at(head, 0x36, b"FAT") || at(head, 0x52, b"FAT32")) {
        return Some(Signature::Fat);
    }
    if boot_signature && dos_partitions_present(head) {
        return Some(Signature::DosPartitionTable);
    }
    md_at_end(tail, size_bytes).then_some(Signature::MdRaid)
}

/// True when any of the four MBR partition entries is in use.
fn dos_partitions_present(head: &[u8]) -> bool {
    (0..4).any(|entry| {
        let start = 446 + entry * 16;
        head.get(start..start + 16)
            .is_some_and(|e| e[4] != 0 && e[8..16].iter().any(|&b| b != 0))
    })
}

/// MD superblocks 0.90 (last 64 KiB-aligned 64 KiB) and 1.0 (8 KiB from the end).
fn md_at_end(tail: &[u8], size_bytes: u64) -> bool {
    let tail_start = size_bytes.saturating_sub(tail.len() as u64);
    let offsets = [
        (size_bytes & !0xFFFF).saturating_sub(0x10000),
        (size_bytes.saturating_sub(8192)) & !0xFFF,
    ];
    offsets.iter().any(|&offset| {
        offset >= tail_start && usize::try_from(offset - tail_start).is_ok_and(|relative| at(tail, relative, &MD_MAGIC))
    })
}

/// Reads both ends of an open device and probes them.
pub fn probe_signature(file: &File, size_bytes: u64) -> std::io::Result<Option<Signature>> {
    let head_len = usize::try_from(size_bytes.min(PROBE_BYTES as u64)).expect("at most 128 KiB");
    let mut head = vec![0u8; head_len];
    file.read_exact_at(&mut head, 0)?;
    let tail_len = head_len;
    let mut tail = vec![0u8; tail_len];
    file.read_exact_at(&mut tail, size_bytes - tail_len as u64)?;
    Ok(probe_signature_bytes(&head, &tail, size_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; PROBE_BYTES];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    fn probe_head(head: &[u8]) -> Option<Signature> {
        probe_signature_bytes(head, &[0u8; PROBE_BYTES], 1 << 30)
    }

    #[test]
    fn an_all_zero_disk_has_no_signature() {
        assert_eq!(probe_head(&[0u8; PROBE_BYTES]), None);
    }

    #[test]
    fn each_known_signature_is_recognised() {
        let cases: Vec<(Vec<u8>, Signature)> = vec![
            (head_with(1080, &[0x53, 0xEF]), Signature::Ext),
            (head_with(0, b"XFSB"), Signature::Xfs),
            (head_with(0x10040, b"_BHRfS_M"), Signature::Btrfs),
            (head_with(4086, b"SWAPSPACE2"), Signature::Swap),
            (head_with(0, b"LUKS\xba\xbe"), Signature::Luks),
            (head_with(512, b"EFI PART"), Signature::Gpt),
            (head_with(0x8001, b"CD001"), Signature::Iso9660),
            (head_with(3, b"NTFS    "), Signature::Ntfs),
            (head_with(4096, &MD_MAGIC), Signature::MdRaid),
            (head_with(4096 + 24, &BCACHE_MAGIC), Signature::Bcache),
            (head_with(0, b"BLSTSUPR"), Signature::Ballast),
            (head_with(4096, b"BLSTSUPR"), Signature::Ballast),
        ];
        for (head, expected) in cases {
            assert_eq!(probe_head(&head), Some(expected), "{}", expected.describe());
        }
    }

    #[test]
    fn lvm_label_needs_both_magics() {
        let mut head = head_with(512, b"LABELONE");
        assert_eq!(probe_head(&head), None);
        head[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(probe_head(&head), Some(Signature::LvmPhysicalVolume));
    }

    #[test]
    fn an_empty_mbr_is_not_a_partition_table_but_one_with_an_entry_is() {
        let mut head = head_with(510, &[0x55, 0xAA]);
        assert_eq!(probe_head(&head), None);
        head[446 + 4] = 0x83; // Linux partition type
        head[446 + 8] = 0x00;
        head[446 + 12] = 0x10; // sector count
        assert_eq!(probe_head(&head), Some(Signature::DosPartitionTable));
        let mut fat = head_with(510, &[0x55, 0xAA]);
        fat[0x52..0x57].copy_from_slice(b"FAT32");
        assert_eq!(probe_head(&fat), Some(Signature::Fat));
    }

    #[test]
    fn md_superblocks_at_the_end_are_found() {
        let size: u64 = (1 << 30) + 12345 * 512;
        for offset in [(size & !0xFFFF) - 0x10000, (size - 8192) & !0xFFF] {
            let mut tail = vec![0u8; PROBE_BYTES];
            let relative = usize::try_from(offset - (size - PROBE_BYTES as u64)).unwrap();
            tail[relative..relative + 4].copy_from_slice(&MD_MAGIC);
            assert_eq!(
                probe_signature_bytes(&[0u8; PROBE_BYTES], &tail, size),
                Some(Signature::MdRaid)
            );
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(head in proptest::collection::vec(any::<u8>(), 0..70_000), tail in proptest::collection::vec(any::<u8>(), 0..9000), size in any::<u64>()) {
            let _ = probe_signature_bytes(&head, &tail, size);
        }
    }
}
