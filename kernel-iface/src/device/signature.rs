//! Recognising what is already on a disk, from its first and last bytes:
//! filesystems, partition tables, RAID/LVM/LUKS/bcache labels, ballast itself.
//!
//! `probe_signature_bytes` is a pure function over byte slices, so every
//! kind is unit-tested with synthetic buffers and fuzzed with random ones;
//! `probe_signature` only reads the two ends of a file and calls it.
//!
//! A false positive makes a blank disk ineligible (the operator wipes it or
//! uses `--force`); a false negative lets ballast format over data. So the
//! checks are deliberately loose: a bare magic is enough, and kinds beyond
//! the common ones are recognised too. The offsets follow libblkid and were
//! checked against util-linux's blkid test images.
//!
//! ```text
//! where (bytes)                  magic                        kind
//! head 0 or 4096                 "BLSTSUPR"                   ballast superblock (copy A or B)
//! head page-10 (4K,8K,16K,64K)   "SWAPSPACE2"/"SWAP-SPACE"    swap
//! head 0                         "XFSB"                       XFS
//! head 0                         "LUKS\xba\xbe"               LUKS
//! head 0                         "bluestore block device"     Ceph BlueStore
//! head 0                         "dmvdo001"                   VDO
//! head 0                         "hsqs" / "sqsh"              squashfs
//! head 0 or 4096                 fc 4e 2b a9                  MD RAID 1.1 / 1.2
//! head 4096+24                   bcache / bcachefs magic      bcache / bcachefs
//! head 0x10040                   "_BHRfS_M"                   btrfs
//! head 512 or 4096               "EFI PART"                   GPT (512- or 4096-byte sectors)
//! head 0x8001                    "CD001" / "BEA01"            ISO 9660 / UDF
//! head 3                         "NTFS    " / "EXFAT   "      NTFS / exFAT
//! head 1024                      10 20 f5 f2 / e2 e1 f5 e0    F2FS / EROFS
//! head 1K, 2K, 4K, 8K            "OCFSV2"                     OCFS2
//! head 32K                       "JFS1"                       JFS
//! head 64K                       01 16 19 70                  GFS2
//! head 8K+0x34, 64K(+0x34)       "ReIsEr..."                  ReiserFS 3 / 4
//! head 512*n (n<4), +24          "LABELONE", "LVM2 001"       LVM2 physical volume
//! head 16K..128K                 XDR nvlist of label 0        ZFS (see `zfs_label`)
//! head 0x36 / 0x52 (+55AA@510)   "FAT" / "FAT32"              FAT
//! head 446..510 (+55AA@510)      a non-empty entry            DOS/MBR partition table
//! head 1080                      53 ef                        ext2/3/4
//! tail (size&~64K)-64K           fc 4e 2b a9                  MD RAID 0.90
//! tail (size-8K)&~4K             fc 4e 2b a9                  MD RAID 1.0
//! tail size-2*sector (512, 4K)   "Intel Raid ISM Cfg Sig. "   Intel IMSM RAID (mdadm, VROC)
//! tail size-512                  de 11 de 11                  DDF RAID anchor
//! tail size-4K+60, (size&~4K)-4K+60  83 74 02 6b/6c/6d        DRBD 8 / 8.4 / 9 internal metadata
//! ```
//!
//! Checks run in that order and the first match wins: ours first, then
//! long distinctive magics, then structures, then the two-byte ext magic,
//! then the tail (a stale 0xEF53 under, say, an MD superblock must not hide
//! the RAID member; an MBR in front of a partition must not look like ext).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::zfs_label;

/// Bytes read from each end of a device for probing.
pub const PROBE_BYTES: usize = 128 * 1024;

/// Something found on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signature {
    Ext,
    Xfs,
    Btrfs,
    Swap,
    LvmPhysicalVolume,
    MdRaid,
    IntelRaid,
    DdfRaid,
    Drbd,
    Luks,
    Gpt,
    DosPartitionTable,
    Iso9660,
    Udf,
    Fat,
    Exfat,
    Ntfs,
    F2fs,
    Erofs,
    Squashfs,
    Jfs,
    Reiserfs,
    Gfs2,
    Ocfs2,
    Zfs,
    Bcache,
    Bcachefs,
    CephBluestore,
    Vdo,
    Ballast,
}

impl Signature {
    /// Every kind, for exhaustive tests and documentation.
    pub const ALL: [Signature; 30] = [
        Self::Ext,
        Self::Xfs,
        Self::Btrfs,
        Self::Swap,
        Self::LvmPhysicalVolume,
        Self::MdRaid,
        Self::IntelRaid,
        Self::DdfRaid,
        Self::Drbd,
        Self::Luks,
        Self::Gpt,
        Self::DosPartitionTable,
        Self::Iso9660,
        Self::Udf,
        Self::Fat,
        Self::Exfat,
        Self::Ntfs,
        Self::F2fs,
        Self::Erofs,
        Self::Squashfs,
        Self::Jfs,
        Self::Reiserfs,
        Self::Gfs2,
        Self::Ocfs2,
        Self::Zfs,
        Self::Bcache,
        Self::Bcachefs,
        Self::CephBluestore,
        Self::Vdo,
        Self::Ballast,
    ];

    /// Human name for messages ("ext2/3/4 filesystem", "ballast disk").
    #[must_use]
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Ext => "ext2/3/4 filesystem",
            Self::Xfs => "XFS filesystem",
            Self::Btrfs => "btrfs filesystem",
            Self::Swap => "swap space",
            Self::LvmPhysicalVolume => "LVM physical volume",
            Self::MdRaid => "Linux MD RAID member",
            Self::IntelRaid => "Intel IMSM RAID member",
            Self::DdfRaid => "DDF RAID member",
            Self::Drbd => "DRBD metadata",
            Self::Luks => "LUKS encrypted volume",
            Self::Gpt => "GPT partition table",
            Self::DosPartitionTable => "DOS/MBR partition table",
            Self::Iso9660 => "ISO 9660 image",
            Self::Udf => "UDF filesystem",
            Self::Fat => "FAT filesystem",
            Self::Exfat => "exFAT filesystem",
            Self::Ntfs => "NTFS filesystem",
            Self::F2fs => "F2FS filesystem",
            Self::Erofs => "EROFS image",
            Self::Squashfs => "squashfs image",
            Self::Jfs => "JFS filesystem",
            Self::Reiserfs => "ReiserFS filesystem",
            Self::Gfs2 => "GFS2 filesystem",
            Self::Ocfs2 => "OCFS2 filesystem",
            Self::Zfs => "ZFS pool member",
            Self::Bcache => "bcache device",
            Self::Bcachefs => "bcachefs filesystem",
            Self::CephBluestore => "Ceph BlueStore device",
            Self::Vdo => "VDO volume",
            Self::Ballast => "ballast disk",
        }
    }
}

/// Ballast's superblock magic (disk-layout `SUPERBLOCK_MAGIC`), at byte 0
/// (copy A) or 4096 (copy B); either copy alone marks the disk as ours.
pub const BALLAST_MAGIC: [u8; 8] = *b"BLSTSUPR";
const BALLAST_OFFSETS: [usize; 2] = [0, 4096];

const MD_MAGIC: [u8; 4] = 0xa92b_4efc_u32.to_le_bytes();
const BCACHE_MAGIC: [u8; 16] = [
    0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
];
const BCACHEFS_MAGIC: [u8; 16] = [
    0xc6, 0x85, 0x73, 0xf6, 0x66, 0xce, 0x90, 0xa9, 0xd9, 0x6a, 0x60, 0xcf, 0x80, 0x3d, 0xf7, 0xef,
];
/// bcache and bcachefs superblocks start at 4096; the magic is 24 bytes in.
const BCACHE_MAGIC_OFFSET: usize = 4096 + 24;
const REISERFS_MAGIC_OFFSET: usize = 0x34;
const EXT_MAGIC_OFFSET: usize = 1080;
const EXT_MAGIC: [u8; 2] = 0xef53_u16.to_le_bytes();
/// The swap header ends each page with its magic; page sizes in use on
/// Linux servers (x86 4K, arm64 4K/16K/64K, ppc64 64K).
const SWAP_PAGE_BYTES: [usize; 4] = [4096, 8192, 16384, 65536];
const SWAP_MAGIC_BYTES: usize = 10;
/// LVM2 writes its label in one of the first four 512-byte sectors.
const LVM_LABEL_SECTORS: usize = 4;
const BOOT_SIGNATURE_OFFSET: usize = 510;
const MBR_ENTRIES_OFFSET: usize = 446;
const MBR_ENTRY_BYTES: usize = 16;
const MBR_ENTRY_COUNT: usize = 4;
/// MD 0.90 reserves the last 64 KiB-aligned 64 KiB of the device.
const MD_090_RESERVED_BYTES: u64 = 64 * 1024;
/// MD 1.0 sits 8 KiB from the end, rounded down to 4 KiB.
const MD_10_FROM_END_BYTES: u64 = 8 * 1024;
const MD_10_ALIGN_BYTES: u64 = 4 * 1024;
const INTEL_RAID_MAGIC: &[u8] = b"Intel Raid ISM Cfg Sig. ";
/// Intel IMSM metadata is the second-to-last sector (of 512 or 4096 bytes).
const INTEL_RAID_FROM_END_BYTES: [u64; 2] = [2 * 512, 2 * 4096];
const DDF_MAGIC: [u8; 4] = 0xde11_de11_u32.to_be_bytes();
/// The DDF anchor header is the last 512-byte sector.
const DDF_ANCHOR_FROM_END_BYTES: u64 = 512;
/// DRBD 8.0, 8.4 (unclean) and 9 internal metadata magics, big-endian.
const DRBD_MAGICS: [[u8; 4]; 3] = [
    [0x83, 0x74, 0x02, 0x6b],
    [0x83, 0x74, 0x02, 0x6c],
    [0x83, 0x74, 0x02, 0x6d],
];
/// DRBD's superblock is the last 4 KiB block (drbdmeta aligns the size
/// down to 4 KiB first; libblkid does not, so both are checked).
const DRBD_FROM_END_BYTES: u64 = 4096;
const DRBD_MAGIC_OFFSET: u64 = 60;

/// A fixed magic at a fixed offset from the start of the device.
struct HeadMagic {
    offset: usize,
    bytes: &'static [u8],
    signature: Signature,
}

const fn head(offset: usize, bytes: &'static [u8], signature: Signature) -> HeadMagic {
    HeadMagic {
        offset,
        bytes,
        signature,
    }
}

/// Distinctive magics of four bytes or more, checked in order.
const HEAD_MAGICS: [HeadMagic; 30] = [
    head(0, b"XFSB", Signature::Xfs),
    head(0, b"LUKS\xba\xbe", Signature::Luks),
    head(0, b"bluestore block device", Signature::CephBluestore),
    head(0, b"dmvdo001", Signature::Vdo),
    head(0, b"hsqs", Signature::Squashfs),
    head(0, b"sqsh", Signature::Squashfs),
    head(0, &MD_MAGIC, Signature::MdRaid),
    head(4096, &MD_MAGIC, Signature::MdRaid),
    head(BCACHE_MAGIC_OFFSET, &BCACHE_MAGIC, Signature::Bcache),
    head(BCACHE_MAGIC_OFFSET, &BCACHEFS_MAGIC, Signature::Bcachefs),
    head(0x10040, b"_BHRfS_M", Signature::Btrfs),
    head(512, b"EFI PART", Signature::Gpt),
    head(4096, b"EFI PART", Signature::Gpt),
    head(0x8001, b"CD001", Signature::Iso9660),
    head(0x8001, b"BEA01", Signature::Udf),
    head(3, b"NTFS    ", Signature::Ntfs),
    head(3, b"EXFAT   ", Signature::Exfat),
    head(1024, &[0x10, 0x20, 0xf5, 0xf2], Signature::F2fs),
    head(1024, &[0xe2, 0xe1, 0xf5, 0xe0], Signature::Erofs),
    head(1024, b"OCFSV2", Signature::Ocfs2),
    head(2048, b"OCFSV2", Signature::Ocfs2),
    head(4096, b"OCFSV2", Signature::Ocfs2),
    head(8192, b"OCFSV2", Signature::Ocfs2),
    head(32 * 1024, b"JFS1", Signature::Jfs),
    head(64 * 1024, &[0x01, 0x16, 0x19, 0x70], Signature::Gfs2),
    head(8 * 1024 + REISERFS_MAGIC_OFFSET, b"ReIsErFs", Signature::Reiserfs),
    head(64 * 1024 + REISERFS_MAGIC_OFFSET, b"ReIsErFs", Signature::Reiserfs),
    head(64 * 1024 + REISERFS_MAGIC_OFFSET, b"ReIsEr2Fs", Signature::Reiserfs),
    head(64 * 1024 + REISERFS_MAGIC_OFFSET, b"ReIsEr3Fs", Signature::Reiserfs),
    head(64 * 1024, b"ReIsEr4", Signature::Reiserfs),
];

fn at(bytes: &[u8], offset: usize, magic: &[u8]) -> bool {
    offset
        .checked_add(magic.len())
        .and_then(|end| bytes.get(offset..end))
        .is_some_and(|found| found == magic)
}

/// Identifies what is on a device. `head` is its first bytes (up to
/// `PROBE_BYTES`), `tail` its last ones, ending at `size_bytes`. Shorter
/// slices are fine: checks that fall outside them simply do not match.
#[must_use]
pub fn probe_signature_bytes(head: &[u8], tail: &[u8], size_bytes: u64) -> Option<Signature> {
    if BALLAST_OFFSETS.iter().any(|&offset| at(head, offset, &BALLAST_MAGIC)) {
        return Some(Signature::Ballast);
    }
    if swap_header_present(head) {
        return Some(Signature::Swap);
    }
    if let Some(magic) = HEAD_MAGICS.iter().find(|m| at(head, m.offset, m.bytes)) {
        return Some(magic.signature);
    }
    if lvm_label_present(head) {
        return Some(Signature::LvmPhysicalVolume);
    }
    if zfs_label::present(head) {
        return Some(Signature::Zfs);
    }
    // FAT boot sectors also end in 55AA, so FAT is checked before MBR.
    if at(head, BOOT_SIGNATURE_OFFSET, &[0x55, 0xaa]) {
        if at(head, 0x36, b"FAT") || at(head, 0x52, b"FAT32") {
            return Some(Signature::Fat);
        }
        if dos_partitions_present(head) {
            return Some(Signature::DosPartitionTable);
        }
    }
    if at(head, EXT_MAGIC_OFFSET, &EXT_MAGIC) {
        return Some(Signature::Ext);
    }
    tail_signature(tail, size_bytes)
}

/// The swap magic ends the first page, whichever page size made it
/// ("SWAP-SPACE" is the old version 0 header).
fn swap_header_present(head: &[u8]) -> bool {
    SWAP_PAGE_BYTES.iter().any(|&page| {
        let offset = page - SWAP_MAGIC_BYTES;
        at(head, offset, b"SWAPSPACE2") || at(head, offset, b"SWAP-SPACE")
    })
}

/// "LABELONE" at the start of one of the first four sectors, with the
/// "LVM2 001" label type 24 bytes further on.
fn lvm_label_present(head: &[u8]) -> bool {
    (0..LVM_LABEL_SECTORS).any(|sector| {
        let start = sector * 512;
        at(head, start, b"LABELONE") && at(head, start + 24, b"LVM2 001")
    })
}

/// True when any of the four MBR partition entries is in use (a type and
/// a non-zero start or length), so an all-zero MBR is not flagged.
fn dos_partitions_present(head: &[u8]) -> bool {
    (0..MBR_ENTRY_COUNT).any(|entry| {
        let start = MBR_ENTRIES_OFFSET + entry * MBR_ENTRY_BYTES;
        head.get(start..start + MBR_ENTRY_BYTES)
            .is_some_and(|entry| entry[4] != 0 && entry[8..16].iter().any(|&byte| byte != 0))
    })
}

/// Where metadata kept at the end of a device of `size_bytes` lives, by
/// absolute offset; `None` where the device is too small to hold it.
fn tail_magics(size_bytes: u64) -> [(Option<u64>, &'static [u8], Signature); 11] {
    let md_090 = (size_bytes & !(MD_090_RESERVED_BYTES - 1)).checked_sub(MD_090_RESERVED_BYTES);
    let md_10 = size_bytes
        .checked_sub(MD_10_FROM_END_BYTES)
        .map(|offset| offset & !(MD_10_ALIGN_BYTES - 1));
    let [intel_512, intel_4096] = INTEL_RAID_FROM_END_BYTES.map(|from_end| size_bytes.checked_sub(from_end));
    let drbd = |size: u64| {
        size.checked_sub(DRBD_FROM_END_BYTES)
            .map(|block| block + DRBD_MAGIC_OFFSET)
    };
    let (drbd_unaligned, drbd_aligned) = (drbd(size_bytes), drbd(size_bytes & !(DRBD_FROM_END_BYTES - 1)));
    [
        (md_090, &MD_MAGIC, Signature::MdRaid),
        (md_10, &MD_MAGIC, Signature::MdRaid),
        (intel_512, INTEL_RAID_MAGIC, Signature::IntelRaid),
        (intel_4096, INTEL_RAID_MAGIC, Signature::IntelRaid),
        (
            size_bytes.checked_sub(DDF_ANCHOR_FROM_END_BYTES),
            &DDF_MAGIC,
            Signature::DdfRaid,
        ),
        (drbd_unaligned, &DRBD_MAGICS[0], Signature::Drbd),
        (drbd_unaligned, &DRBD_MAGICS[1], Signature::Drbd),
        (drbd_unaligned, &DRBD_MAGICS[2], Signature::Drbd),
        (drbd_aligned, &DRBD_MAGICS[0], Signature::Drbd),
        (drbd_aligned, &DRBD_MAGICS[1], Signature::Drbd),
        (drbd_aligned, &DRBD_MAGICS[2], Signature::Drbd),
    ]
}

/// Metadata at the end of the device, looked for in `tail` (which ends at `size_bytes`).
fn tail_signature(tail: &[u8], size_bytes: u64) -> Option<Signature> {
    let tail_start = size_bytes.checked_sub(u64::try_from(tail.len()).ok()?)?;
    tail_magics(size_bytes)
        .into_iter()
        .find_map(|(offset, magic, signature)| {
            let relative = usize::try_from(offset?.checked_sub(tail_start)?).ok()?;
            at(tail, relative, magic).then_some(signature)
        })
}

/// Reads both ends of `file` (plain buffered reads; no alignment needed)
/// and probes them. `size_bytes` is the device or file size.
pub fn probe_signature(file: &File, size_bytes: u64) -> std::io::Result<Option<Signature>> {
    let probe_bytes = u64::try_from(PROBE_BYTES).unwrap_or(u64::MAX);
    let length_bytes = size_bytes.min(probe_bytes);
    // At most PROBE_BYTES, so it fits.
    let length = usize::try_from(length_bytes).unwrap_or(PROBE_BYTES);
    debug_assert!(length <= PROBE_BYTES);
    let mut head = vec![0u8; length];
    file.read_exact_at(&mut head, 0)?;
    let mut tail = vec![0u8; length];
    file.read_exact_at(&mut tail, size_bytes - length_bytes)?;
    Ok(probe_signature_bytes(&head, &tail, size_bytes))
}

#[cfg(test)]
mod tests;
