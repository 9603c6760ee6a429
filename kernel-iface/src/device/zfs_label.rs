//! Recognising a ZFS vdev label in the first 128 KiB of a device.
//!
//! ZFS keeps four 256 KiB labels, two at the start and two at the end.
//! Label 0 starts at byte 0, and its configuration (an XDR-encoded nvlist,
//! "vdev_phys") lies at 16 KiB..128 KiB, inside the probe's head. Its
//! uberblocks (at 128 KiB) and labels 2 and 3 (whose position depends on
//! the size modulo 256 KiB) fall outside the 128 KiB head and tail, so only
//! label 0 is checked: a pool member whose label 0 was wiped is missed.
//! The rules follow libblkid's `zfs.c`:
//!
//! ```text
//! 16K +0  u8  encoding (1 = XDR)      +1  u8 endian (0 or 1)   +2 2 reserved
//!     +4  u32 nvlist version          +8  u32 nvlist flags
//!     +12 nvpairs, all big-endian u32s, until a pair of size 0:
//!         +0 size (whole pair, bytes)  +4 decoded size  +8 name length
//!         +12 name (padded to 4)       then: u32 type, u32 count, value
//!         type 8 (uint64): value is a u64; type 19 (nvlist): a nested
//!         list follows, 16 bytes of header, ended by an 8-byte zero pair.
//! ```
//!
//! A label counts when its top level has a non-zero `guid`, a known
//! `state`, and a non-zero `txg` (or the state of a spare or cache device,
//! which have no txg).

/// Offset of label 0's nvlist from the start of the device.
const NVLIST_OFFSET_BYTES: usize = 16 * 1024;
/// Size of the nvlist area ("vdev_phys") of a label.
const NVLIST_BYTES: usize = 112 * 1024;
const ENCODING_XDR: u8 = 1;
/// Bytes before the first pair: encoding, endian, 2 reserved, version, flags.
const PAIRS_OFFSET_BYTES: usize = 12;
/// Size, decoded size and name length, each a u32.
const PAIR_HEADER_BYTES: usize = 12;
const TYPE_UINT64: u32 = 8;
const TYPE_NVLIST: u32 = 19;
/// A nested list's value: type, count and two reserved u32s.
const NESTED_LIST_VALUE_BYTES: usize = 16;
/// The zero pair that ends a nested list.
const NESTED_LIST_END_BYTES: usize = 8;
/// A bound on the walk; real labels hold a few dozen pairs, and every
/// step advances by at least 8 bytes, so 112 KiB allows at most 14336.
const PAIRS_MAX: usize = NVLIST_BYTES / NESTED_LIST_END_BYTES;
/// Highest pool state (POOL_STATE_POTENTIALLY_ACTIVE).
const STATE_MAX: u64 = 7;
const STATE_SPARE: u64 = 3;
const STATE_L2CACHE: u64 = 4;

fn be32(bytes: &[u8], offset: usize) -> Option<u32> {
    let word = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes(word.try_into().ok()?))
}

fn be64(bytes: &[u8], offset: usize) -> Option<u64> {
    let word = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_be_bytes(word.try_into().ok()?))
}

/// The top-level values a label must carry.
#[derive(Default)]
struct LabelFields {
    guid: u64,
    state: Option<u64>,
    txg: u64,
}

impl LabelFields {
    fn is_label(&self) -> bool {
        let Some(state) = self.state else {
            return false;
        };
        self.guid != 0 && state <= STATE_MAX && (state == STATE_SPARE || state == STATE_L2CACHE || self.txg > 0)
    }
}

/// True when `head` (the first bytes of a device) holds ZFS label 0.
#[must_use]
pub fn present(head: &[u8]) -> bool {
    let Some(area) = head.get(NVLIST_OFFSET_BYTES..) else {
        return false;
    };
    let area = &area[..area.len().min(NVLIST_BYTES)];
    let (Some(&encoding), Some(&endian)) = (area.first(), area.get(1)) else {
        return false;
    };
    if encoding != ENCODING_XDR || endian > 1 || be32(area, PAIRS_OFFSET_BYTES).is_none_or(|size| size == 0) {
        return false;
    }
    walk(area).is_some_and(|fields| fields.is_label())
}

/// Reads the top-level pairs; `None` if the list is malformed.
fn walk(area: &[u8]) -> Option<LabelFields> {
    let mut fields = LabelFields::default();
    let mut position = PAIRS_OFFSET_BYTES;
    let mut depth: usize = 0;
    for _ in 0..PAIRS_MAX {
        let Some(size) = be32(area, position) else {
            break;
        };
        let size = usize::try_from(size).ok()?;
        if size == 0 {
            if depth == 0 {
                return Some(fields);
            }
            depth -= 1;
            position = position.checked_add(NESTED_LIST_END_BYTES)?;
            continue;
        }
        let name_bytes = usize::try_from(be32(area, position + 8)?).ok()?;
        let name_padded_bytes = name_bytes.checked_add(3)? & !3;
        let value_offset = position + PAIR_HEADER_BYTES + name_padded_bytes;
        if size > area.len() - position || value_offset + 4 > position + size {
            return None;
        }
        let name = &area[position + PAIR_HEADER_BYTES..position + PAIR_HEADER_BYTES + name_bytes];
        let value_type = be32(area, value_offset)?;
        let step = match value_type {
            0 => return None,
            TYPE_NVLIST => {
                depth += 1;
                PAIR_HEADER_BYTES + name_padded_bytes + NESTED_LIST_VALUE_BYTES
            }
            TYPE_UINT64 if depth == 0 => {
                // The u64 follows the type and the element count.
                let value = be64(area, value_offset + 8).filter(|_| value_offset + 16 <= position + size)?;
                match name {
                    b"guid" => fields.guid = value,
                    b"state" => fields.state = Some(value),
                    b"txg" => fields.txg = value,
                    _ => {}
                }
                size
            }
            _ => size,
        };
        position = position.checked_add(step)?;
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes one XDR nvpair holding a u64.
    fn uint64_pair(name: &str, value: u64) -> Vec<u8> {
        let padded = (name.len() + 3) & !3;
        let size = PAIR_HEADER_BYTES + padded + 16;
        let mut pair = Vec::new();
        pair.extend_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
        pair.extend_from_slice(&u32::try_from(size - 4).unwrap().to_be_bytes());
        pair.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        pair.extend_from_slice(name.as_bytes());
        pair.resize(PAIR_HEADER_BYTES + padded, 0);
        pair.extend_from_slice(&TYPE_UINT64.to_be_bytes());
        pair.extend_from_slice(&1u32.to_be_bytes());
        pair.extend_from_slice(&value.to_be_bytes());
        pair
    }

    /// Encodes an empty nested list named `name` (with its end marker).
    fn nested_list_pair(name: &str) -> Vec<u8> {
        let padded = (name.len() + 3) & !3;
        let size = PAIR_HEADER_BYTES + padded + NESTED_LIST_VALUE_BYTES;
        let mut pair = Vec::new();
        pair.extend_from_slice(&u32::try_from(size + 64).unwrap().to_be_bytes());
        pair.extend_from_slice(&0u32.to_be_bytes());
        pair.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        pair.extend_from_slice(name.as_bytes());
        pair.resize(PAIR_HEADER_BYTES + padded, 0);
        pair.extend_from_slice(&TYPE_NVLIST.to_be_bytes());
        pair.extend_from_slice(&[0u8; 12]);
        // Inside the nested list: a "guid" that must not count as the top-level one.
        pair.extend_from_slice(&uint64_pair("guid", 99));
        pair.extend_from_slice(&[0u8; NESTED_LIST_END_BYTES]);
        pair
    }

    fn head_with_pairs(pairs: &[Vec<u8>]) -> Vec<u8> {
        let mut head = vec![0u8; 128 * 1024];
        let mut list = vec![ENCODING_XDR, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        for pair in pairs {
            list.extend_from_slice(pair);
        }
        list.extend_from_slice(&[0u8; 8]);
        head[NVLIST_OFFSET_BYTES..NVLIST_OFFSET_BYTES + list.len()].copy_from_slice(&list);
        head
    }

    #[test]
    fn a_label_with_guid_state_and_txg_is_recognised() {
        let head = head_with_pairs(&[
            uint64_pair("version", 5000),
            uint64_pair("state", 0),
            uint64_pair("txg", 4),
            uint64_pair("guid", 0x1234),
        ]);
        assert!(present(&head));
    }

    #[test]
    fn a_spare_needs_no_txg() {
        let head = head_with_pairs(&[uint64_pair("state", STATE_SPARE), uint64_pair("guid", 7)]);
        assert!(present(&head));
    }

    #[test]
    fn a_label_without_guid_or_txg_is_not_recognised() {
        let no_guid = head_with_pairs(&[uint64_pair("state", 0), uint64_pair("txg", 4)]);
        assert!(!present(&no_guid));
        let no_txg = head_with_pairs(&[uint64_pair("state", 0), uint64_pair("guid", 7)]);
        assert!(!present(&no_txg));
        let bad_state = head_with_pairs(&[uint64_pair("state", 9), uint64_pair("guid", 7), uint64_pair("txg", 1)]);
        assert!(!present(&bad_state));
    }

    #[test]
    fn a_guid_inside_a_nested_list_does_not_count() {
        let head = head_with_pairs(&[
            uint64_pair("state", 0),
            uint64_pair("txg", 4),
            nested_list_pair("vdev_tree"),
        ]);
        assert!(!present(&head));
        let with_top_guid = head_with_pairs(&[
            uint64_pair("state", 0),
            uint64_pair("txg", 4),
            nested_list_pair("vdev_tree"),
            uint64_pair("guid", 5),
        ]);
        assert!(present(&with_top_guid));
    }

    #[test]
    fn a_pair_larger_than_the_area_is_rejected() {
        let mut head = head_with_pairs(&[uint64_pair("state", 0), uint64_pair("guid", 7), uint64_pair("txg", 1)]);
        let first = NVLIST_OFFSET_BYTES + PAIRS_OFFSET_BYTES;
        head[first..first + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(!present(&head));
    }

    #[test]
    fn zeroes_and_short_heads_are_not_labels() {
        assert!(!present(&[0u8; 128 * 1024]));
        assert!(!present(&[0u8; 100]));
        assert!(!present(&[]));
    }
}
