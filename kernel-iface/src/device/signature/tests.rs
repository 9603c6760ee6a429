//! Tests of the signature prober: each kind at its offset (and not one byte
//! off), precedence between kinds, both ends of a real file, and fuzzing.

use super::*;
use proptest::prelude::*;

const DEVICE_BYTES: u64 = 1 << 30;

fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
    let mut head = vec![0u8; PROBE_BYTES];
    head[offset..offset + magic.len()].copy_from_slice(magic);
    head
}

fn probe_head(head: &[u8]) -> Option<Signature> {
    probe_signature_bytes(head, &[0u8; PROBE_BYTES], DEVICE_BYTES)
}

/// Asserts the magic is recognised where it belongs and nowhere else
/// nearby, so a wrong offset in the table fails the test.
fn assert_found_only_at(offset: usize, magic: &[u8], expected: Signature) {
    assert_eq!(
        probe_head(&head_with(offset, magic)),
        Some(expected),
        "{}",
        expected.describe()
    );
    for shifted in [offset + 1, offset.saturating_sub(1)] {
        if shifted != offset {
            assert_ne!(
                probe_head(&head_with(shifted, magic)),
                Some(expected),
                "{} found at {shifted} instead of {offset}",
                expected.describe()
            );
        }
    }
}

#[test]
fn an_all_zero_disk_has_no_signature() {
    assert_eq!(probe_head(&[0u8; PROBE_BYTES]), None);
    assert_eq!(probe_signature_bytes(&[], &[], 0), None);
}

#[test]
fn ext_is_recognised_by_0xef53_at_1080() {
    assert_found_only_at(1080, &[0x53, 0xef], Signature::Ext);
}

#[test]
fn xfs_is_recognised_by_xfsb_at_0() {
    assert_found_only_at(0, b"XFSB", Signature::Xfs);
}

#[test]
fn btrfs_is_recognised_by_its_magic_at_0x10040() {
    assert_found_only_at(0x10040, b"_BHRfS_M", Signature::Btrfs);
}

#[test]
fn swap_is_recognised_at_the_end_of_the_first_page_for_each_page_size() {
    for page in SWAP_PAGE_BYTES {
        assert_found_only_at(page - 10, b"SWAPSPACE2", Signature::Swap);
    }
    assert_found_only_at(4086, b"SWAP-SPACE", Signature::Swap);
}

#[test]
fn lvm_is_recognised_in_any_of_the_first_four_sectors_only_with_both_magics() {
    for sector in 0..4 {
        let mut head = head_with(sector * 512, b"LABELONE");
        assert_eq!(probe_head(&head), None, "LABELONE alone in sector {sector}");
        head[sector * 512 + 24..sector * 512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(probe_head(&head), Some(Signature::LvmPhysicalVolume), "sector {sector}");
    }
    let mut fifth = head_with(4 * 512, b"LABELONE");
    fifth[4 * 512 + 24..4 * 512 + 32].copy_from_slice(b"LVM2 001");
    assert_eq!(probe_head(&fifth), None, "LVM never writes its label in sector 4");
}

#[test]
fn md_raid_1_1_and_1_2_are_recognised_at_0_and_4096() {
    assert_found_only_at(0, &MD_MAGIC, Signature::MdRaid);
    assert_found_only_at(4096, &MD_MAGIC, Signature::MdRaid);
}

/// Places `magic` at absolute `offset` of a device of `size` bytes, in its tail.
fn tail_with(size: u64, offset: u64, magic: &[u8]) -> Vec<u8> {
    let mut tail = vec![0u8; PROBE_BYTES];
    let relative = usize::try_from(offset - (size - PROBE_BYTES as u64)).unwrap();
    tail[relative..relative + magic.len()].copy_from_slice(magic);
    tail
}

/// Like `assert_found_only_at`, for metadata at the end of the device.
fn assert_found_in_tail_only_at(size: u64, offset: u64, magic: &[u8], expected: Signature) {
    let probe = |tail: &[u8]| probe_signature_bytes(&[0u8; PROBE_BYTES], tail, size);
    assert_eq!(probe(&tail_with(size, offset, magic)), Some(expected), "at {offset}");
    for shifted in [offset - 1, offset + 1] {
        assert_ne!(probe(&tail_with(size, shifted, magic)), Some(expected), "at {shifted}");
    }
}

#[test]
fn md_raid_0_90_and_1_0_are_recognised_at_the_end() {
    // Not a multiple of 64 KiB, so both roundings matter.
    let size: u64 = DEVICE_BYTES + 12345 * 512;
    assert_found_in_tail_only_at(size, size / 65536 * 65536 - 65536, &MD_MAGIC, Signature::MdRaid);
    assert_found_in_tail_only_at(size, (size - 8192) / 4096 * 4096, &MD_MAGIC, Signature::MdRaid);
}

#[test]
fn intel_imsm_raid_is_recognised_in_the_second_to_last_sector() {
    let size: u64 = DEVICE_BYTES + 7 * 4096;
    assert_found_in_tail_only_at(size, size - 1024, b"Intel Raid ISM Cfg Sig. ", Signature::IntelRaid);
    assert_found_in_tail_only_at(size, size - 8192, b"Intel Raid ISM Cfg Sig. ", Signature::IntelRaid);
}

#[test]
fn a_ddf_anchor_is_recognised_in_the_last_sector() {
    let size: u64 = DEVICE_BYTES;
    assert_found_in_tail_only_at(size, size - 512, &[0xde, 0x11, 0xde, 0x11], Signature::DdfRaid);
}

#[test]
fn drbd_metadata_is_recognised_in_the_last_4k_block_aligned_or_not() {
    // Not 4 KiB-aligned, and far enough from alignment that the two
    // candidate positions are not within a byte of each other.
    let size: u64 = DEVICE_BYTES + 2048;
    for magic in DRBD_MAGICS {
        assert_found_in_tail_only_at(size, size - 4096 + 60, &magic, Signature::Drbd);
        assert_found_in_tail_only_at(size, DEVICE_BYTES - 4096 + 60, &magic, Signature::Drbd);
    }
}

#[test]
fn a_tail_shorter_than_the_distance_to_the_md_superblock_finds_nothing() {
    assert_eq!(probe_signature_bytes(&[], &MD_MAGIC, DEVICE_BYTES), None);
    assert_eq!(
        probe_signature_bytes(&[], &[0u8; 16], 8),
        None,
        "a tail longer than the device"
    );
}

#[test]
fn luks_is_recognised_at_0() {
    assert_found_only_at(0, b"LUKS\xba\xbe", Signature::Luks);
}

#[test]
fn gpt_is_recognised_after_512_and_4096_byte_protective_sectors() {
    assert_found_only_at(512, b"EFI PART", Signature::Gpt);
    assert_found_only_at(4096, b"EFI PART", Signature::Gpt);
}

#[test]
fn an_empty_mbr_is_not_a_partition_table_but_one_with_an_entry_is() {
    let mut head = head_with(510, &[0x55, 0xaa]);
    assert_eq!(probe_head(&head), None);
    head[446 + 16 * 2 + 4] = 0x83; // Linux partition type, third entry
    assert_eq!(probe_head(&head), None, "a type without a start or length is empty");
    head[446 + 16 * 2 + 12] = 0x10; // sector count
    assert_eq!(probe_head(&head), Some(Signature::DosPartitionTable));
    head[510] = 0;
    assert_eq!(probe_head(&head), None, "no 55AA, no partition table");
}

#[test]
fn iso9660_is_recognised_at_0x8001() {
    assert_found_only_at(0x8001, b"CD001", Signature::Iso9660);
}

#[test]
fn fat_needs_its_name_and_the_boot_signature() {
    for (offset, name) in [(0x36, &b"FAT"[..]), (0x52, &b"FAT32"[..])] {
        let mut head = head_with(offset, name);
        assert_eq!(probe_head(&head), None, "no 55AA");
        head[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(probe_head(&head), Some(Signature::Fat), "at {offset:#x}");
    }
}

#[test]
fn ntfs_and_exfat_are_recognised_by_their_oem_name_at_3() {
    assert_found_only_at(3, b"NTFS    ", Signature::Ntfs);
    assert_found_only_at(3, b"EXFAT   ", Signature::Exfat);
}

#[test]
fn f2fs_is_recognised_at_1024() {
    assert_found_only_at(1024, &[0x10, 0x20, 0xf5, 0xf2], Signature::F2fs);
}

#[test]
fn bcache_and_bcachefs_are_recognised_at_4096_plus_24() {
    assert_found_only_at(4096 + 24, &BCACHE_MAGIC, Signature::Bcache);
    assert_found_only_at(4096 + 24, &BCACHEFS_MAGIC, Signature::Bcachefs);
}

#[test]
fn squashfs_and_vdo_are_recognised_at_0() {
    assert_found_only_at(0, b"hsqs", Signature::Squashfs);
    assert_found_only_at(0, b"sqsh", Signature::Squashfs);
    assert_found_only_at(0, b"dmvdo001", Signature::Vdo);
}

#[test]
fn udf_is_recognised_by_its_volume_recognition_sequence_at_0x8001() {
    assert_found_only_at(0x8001, b"BEA01", Signature::Udf);
}

#[test]
fn erofs_is_recognised_at_1024() {
    assert_found_only_at(1024, &[0xe2, 0xe1, 0xf5, 0xe0], Signature::Erofs);
}

#[test]
fn ocfs2_is_recognised_at_each_block_size() {
    for offset in [1024, 2048, 4096, 8192] {
        assert_found_only_at(offset, b"OCFSV2", Signature::Ocfs2);
    }
}

#[test]
fn jfs_gfs2_and_reiserfs_are_recognised_at_their_offsets() {
    assert_found_only_at(32 * 1024, b"JFS1", Signature::Jfs);
    assert_found_only_at(64 * 1024, &[0x01, 0x16, 0x19, 0x70], Signature::Gfs2);
    assert_found_only_at(8 * 1024 + 0x34, b"ReIsErFs", Signature::Reiserfs);
    assert_found_only_at(64 * 1024 + 0x34, b"ReIsEr2Fs", Signature::Reiserfs);
    assert_found_only_at(64 * 1024 + 0x34, b"ReIsEr3Fs", Signature::Reiserfs);
    assert_found_only_at(64 * 1024, b"ReIsEr4", Signature::Reiserfs);
}

#[test]
fn ceph_bluestore_is_recognised_at_0() {
    assert_found_only_at(0, b"bluestore block device", Signature::CephBluestore);
}

#[test]
fn a_ballast_superblock_is_recognised_from_either_copy() {
    assert_found_only_at(0, b"BLSTSUPR", Signature::Ballast);
    assert_found_only_at(4096, b"BLSTSUPR", Signature::Ballast);
}

#[test]
fn a_ballast_superblock_wins_over_stale_bytes_behind_it() {
    let mut head = head_with(4096, b"BLSTSUPR");
    head[1080..1082].copy_from_slice(&[0x53, 0xef]);
    head[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
    assert_eq!(probe_head(&head), Some(Signature::Ballast));
}

#[test]
fn an_md_superblock_wins_over_a_stale_ext_magic() {
    let mut head = head_with(4096, &MD_MAGIC);
    head[1080..1082].copy_from_slice(&[0x53, 0xef]);
    assert_eq!(probe_head(&head), Some(Signature::MdRaid));
}

#[test]
fn a_partition_table_wins_over_a_stale_ext_magic() {
    let mut head = head_with(510, &[0x55, 0xaa]);
    head[446 + 4] = 0x83;
    head[446 + 12] = 0x10;
    head[1080..1082].copy_from_slice(&[0x53, 0xef]);
    assert_eq!(probe_head(&head), Some(Signature::DosPartitionTable));
}

#[test]
fn every_kind_has_a_distinct_description() {
    let mut names: Vec<&str> = Signature::ALL.iter().map(Signature::describe).collect();
    assert!(names.iter().all(|name| !name.is_empty()));
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Signature::ALL.len());
}

#[test]
fn probing_a_file_reads_both_ends() {
    let file = tempfile::tempfile().unwrap();
    let size: u64 = 3 * PROBE_BYTES as u64 + 4096;
    file.set_len(size).unwrap();
    let v10_offset = (size - 8192) / 4096 * 4096;
    std::os::unix::fs::FileExt::write_all_at(&file, &MD_MAGIC, v10_offset).unwrap();
    assert_eq!(probe_signature(&file, size).unwrap(), Some(Signature::MdRaid));
    std::os::unix::fs::FileExt::write_all_at(&file, b"XFSB", 0).unwrap();
    assert_eq!(probe_signature(&file, size).unwrap(), Some(Signature::Xfs));
}

#[test]
fn probing_a_file_smaller_than_the_probe_works() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(2048).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x53, 0xef], 1080).unwrap();
    assert_eq!(probe_signature(&file, 2048).unwrap(), Some(Signature::Ext));
    assert_eq!(probe_signature(&file, 0).unwrap(), None);
}

proptest! {
    #[test]
    fn random_bytes_never_panic_the_prober(
        head in proptest::collection::vec(any::<u8>(), 0..PROBE_BYTES),
        tail in proptest::collection::vec(any::<u8>(), 0..PROBE_BYTES),
        size in any::<u64>(),
    ) {
        let _ = probe_signature_bytes(&head, &tail, size);
    }

    #[test]
    fn a_zfs_like_nvlist_of_random_bytes_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut head = vec![0u8; PROBE_BYTES];
        head[16 * 1024] = 1;
        head[16 * 1024 + 1] = 1;
        head[16 * 1024 + 12..16 * 1024 + 12 + body.len()].copy_from_slice(&body);
        let _ = probe_signature_bytes(&head, &[], DEVICE_BYTES);
    }
}
