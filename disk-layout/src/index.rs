//! The in-memory extent index: (volume, LBA) -> (disk block address, crc32c).
//!
//! Each volume maps 4 KiB blocks through chunks of 1024 blocks (one per
//! 4 MiB of volume) created on first write: a volume uses memory only for
//! what has been written (thin). A chunk keeps runs of blocks that are
//! contiguous on disk as extents (16 bytes each) and turns into a plain
//! array when written at random (`chunk.rs`). Chunks are shared (`Arc`) and
//! copied on write, so cloning an `Index` to write a checkpoint or freeze a
//! snapshot costs one pointer per chunk, not a copy of the entries.
//!
//! Keeping each block's crc here lets every read be verified without reading
//! record headers: 4 bytes per 4 KiB block written (0.1 %), plus about
//! nothing for sequential data or 4 bytes of address for random data.

mod chunk;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::geometry::{ADDRESS_BITS, DISK_BLOCKS_MAX};

use chunk::{Chunk, CHUNK_LEN};

/// Volume blocks per index chunk.
pub const CHUNK_BLOCKS: u64 = 1024;
const _: () = assert!(CHUNK_LEN as u64 == CHUNK_BLOCKS);

/// Address meaning "never written or zeroed": reads return zeroes.
pub const ADDRESS_UNMAPPED: u64 = 0;
/// Address meaning "data found corrupt": reads fail until rewritten (the
/// highest address of `ADDRESS_BITS`, never a disk block).
pub const ADDRESS_BAD: u64 = (1 << ADDRESS_BITS) - 1;
const _: () = assert!(ADDRESS_BAD > DISK_BLOCKS_MAX);

/// Where one volume block lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub address: u64,
    pub crc: u32,
}

impl Entry {
    pub const UNMAPPED: Self = Self {
        address: ADDRESS_UNMAPPED,
        crc: 0,
    };
    pub const BAD: Self = Self {
        address: ADDRESS_BAD,
        crc: 0,
    };

    /// True when the entry points at data on disk.
    #[must_use]
    pub fn is_data(&self) -> bool {
        self.address != ADDRESS_UNMAPPED && self.address != ADDRESS_BAD
    }
}

/// The map of one volume.
#[derive(Clone, Default)]
pub struct VolumeIndex {
    chunks: BTreeMap<u64, Arc<Chunk>>,
    used_blocks: u64,
    /// Highest epoch and volume sequence of any record applied to the volume.
    pub epoch_max: u64,
    pub volume_sequence_max: u64,
    /// The volume was the source or the target of a clone, so other shared
    /// volumes may map the same disk blocks (at the same LBAs).
    shared: bool,
}

impl VolumeIndex {
    /// Entry of `lba`.
    #[must_use]
    pub fn get(&self, lba: u64) -> Entry {
        self.chunks
            .get(&(lba / CHUNK_BLOCKS))
            .map_or(Entry::UNMAPPED, |chunk| chunk.get(offset_in_chunk(lba)))
    }

    /// Entries of `count` blocks from `lba`, one chunk lookup per chunk.
    #[must_use]
    pub fn entries(&self, lba: u64, count: u64) -> Vec<Entry> {
        let mut out = Vec::with_capacity(usize::try_from(count).expect("a request's blocks"));
        let end = lba + count;
        let mut at = lba;
        while at < end {
            let key = at / CHUNK_BLOCKS;
            let stop = ((key + 1) * CHUNK_BLOCKS).min(end);
            match self.chunks.get(&key) {
                Some(chunk) => chunk.extend_entries(
                    offset_in_chunk(at),
                    offset_in_chunk(at) + usize::try_from(stop - at).expect("within a chunk"),
                    &mut out,
                ),
                None => out.extend(std::iter::repeat_n(
                    Entry::UNMAPPED,
                    usize::try_from(stop - at).expect("within a chunk"),
                )),
            }
            at = stop;
        }
        out
    }

    /// Sets `lba` to `entry` and returns the previous entry.
    pub fn set(&mut self, lba: u64, entry: Entry) -> Entry {
        let key = lba / CHUNK_BLOCKS;
        if entry == Entry::UNMAPPED {
            let Some(chunk) = self.chunks.get_mut(&key) else {
                return Entry::UNMAPPED;
            };
            if chunk.get(offset_in_chunk(lba)) == Entry::UNMAPPED {
                return Entry::UNMAPPED;
            }
            let chunk_mut = Arc::make_mut(chunk);
            let old = chunk_mut.set(offset_in_chunk(lba), entry);
            self.used_blocks -= 1;
            if chunk_mut.used() == 0 {
                self.chunks.remove(&key);
            }
            return old;
        }
        let chunk = self.chunks.entry(key).or_insert_with(|| Arc::new(Chunk::default()));
        let old = Arc::make_mut(chunk).set(offset_in_chunk(lba), entry);
        if old == Entry::UNMAPPED {
            self.used_blocks += 1;
        }
        old
    }

    /// Keys (lba / `CHUNK_BLOCKS`) of the chunks holding entries, ascending.
    pub fn chunk_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.keys().copied()
    }

    /// True when chunk `key` is one and the same in memory in both maps
    /// (a clone's chunk not written since), or absent from both.
    #[must_use]
    pub fn shares_chunk(&self, other: &VolumeIndex, key: u64) -> bool {
        match (self.chunks.get(&key), other.chunks.get(&key)) {
            (None, None) => true,
            (Some(mine), Some(theirs)) => Arc::ptr_eq(mine, theirs),
            _ => false,
        }
    }

    /// Appends to `runs` the runs `(lba, block_count)` of
    /// `lba_start..lba_end` where this map differs from `base` (None: an
    /// empty map: every mapped block), in LBA order, extending a run
    /// `runs` ends with. Chunks both maps share in memory (a snapshot's or
    /// clone's not written since) are skipped without looking inside.
    pub fn differences(&self, base: Option<&VolumeIndex>, lba_start: u64, lba_end: u64, runs: &mut Vec<(u64, u64)>) {
        if lba_start >= lba_end {
            return;
        }
        let (first, last) = (lba_start / CHUNK_BLOCKS, (lba_end - 1) / CHUNK_BLOCKS);
        let empty = BTreeMap::new();
        let base_chunks = base.map_or(&empty, |base| &base.chunks);
        let mut keys: Vec<u64> = self
            .chunks
            .range(first..=last)
            .chain(base_chunks.range(first..=last))
            .map(|(key, _)| *key)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            if let (Some(mine), Some(theirs)) = (self.chunks.get(&key), base_chunks.get(&key)) {
                if Arc::ptr_eq(mine, theirs) {
                    continue;
                }
            }
            let start = (key * CHUNK_BLOCKS).max(lba_start);
            let count = ((key + 1) * CHUNK_BLOCKS).min(lba_end) - start;
            let mine = self.entries(start, count);
            let theirs = match base {
                Some(base) => base.entries(start, count),
                None => vec![Entry::UNMAPPED; mine.len()],
            };
            for (lba, _) in (start..).zip(mine.iter().zip(&theirs)).filter(|(_, (a, b))| a != b) {
                match runs.last_mut() {
                    Some((run_start, run_count)) if *run_start + *run_count == lba => *run_count += 1,
                    _ => runs.push((lba, 1)),
                }
            }
        }
    }

    /// Unmaps every block and returns what was mapped (epochs are kept).
    pub fn clear(&mut self) -> Vec<(u64, Entry)> {
        let entries = self.iter().collect();
        self.chunks.clear();
        self.used_blocks = 0;
        entries
    }

    /// True when other volumes may map this volume's disk blocks (it was
    /// the source or the target of a clone).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Blocks that are not unmapped (data or bad).
    #[must_use]
    pub fn used_blocks(&self) -> u64 {
        self.used_blocks
    }

    /// Every non-unmapped entry in LBA order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Entry)> + '_ {
        self.chunks.iter().flat_map(|(key, chunk)| {
            chunk
                .iter()
                .map(move |(offset, entry)| (key * CHUNK_BLOCKS + offset as u64, entry))
        })
    }

    /// Non-unmapped entries in `lba_start..lba_end`, in LBA order.
    pub fn range(&self, lba_start: u64, lba_end: u64) -> impl Iterator<Item = (u64, Entry)> + '_ {
        let first = lba_start / CHUNK_BLOCKS;
        let last = lba_end.saturating_sub(1) / CHUNK_BLOCKS;
        self.chunks
            .range(first..=last)
            .flat_map(|(key, chunk)| {
                chunk
                    .iter()
                    .map(move |(offset, entry)| (key * CHUNK_BLOCKS + offset as u64, entry))
            })
            .filter(move |(lba, _)| (lba_start..lba_end).contains(lba))
    }
}

fn offset_in_chunk(lba: u64) -> usize {
    usize::try_from(lba % CHUNK_BLOCKS).expect("below 1024")
}

/// The index of every volume on one disk.
///
/// Clones share disk blocks: after `clone_volume` the source and the target
/// map the same addresses at the same LBAs until one of them is written.
/// Such volumes are *shared*; a disk block is referenced by every shared
/// volume that maps it, and is free only when none does (`shared_maps`,
/// `referrer`). Volumes never cloned skip every such check.
#[derive(Clone, Default)]
pub struct Index {
    volumes: HashMap<u64, VolumeIndex>,
    /// Ids of the shared volumes.
    shared: BTreeSet<u64>,
}

/// Bytes a map entry of a volume's chunk tree costs beside its chunk: key,
/// pointer and the B-tree node's share (about 1.5 times the 16 bytes).
const CHUNK_MAP_ENTRY_BYTES: u64 = 24;
/// An `Arc`'s two counts before its value.
const ARC_HEADER_BYTES: u64 = 16;

impl Index {
    /// Memory the index holds, in bytes: every chunk once however many
    /// volumes share it (clones, snapshots), and each volume's chunk map.
    /// An estimate of the allocator's view, exact in the chunks (which
    /// are nearly all of it).
    #[must_use]
    pub fn memory_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        for volume in self.volumes.values() {
            for chunk in volume.chunks.values() {
                bytes += CHUNK_MAP_ENTRY_BYTES;
                if seen.insert(Arc::as_ptr(chunk)) {
                    bytes += ARC_HEADER_BYTES + chunk.memory_bytes();
                }
            }
        }
        bytes
    }

    /// Entry of (`volume_id`, `lba`).
    #[must_use]
    pub fn get(&self, volume_id: u64, lba: u64) -> Entry {
        self.volumes
            .get(&volume_id)
            .map_or(Entry::UNMAPPED, |volume| volume.get(lba))
    }

    /// Entries of `count` blocks of a volume from `lba`.
    #[must_use]
    pub fn entries(&self, volume_id: u64, lba: u64, count: u64) -> Vec<Entry> {
        match self.volumes.get(&volume_id) {
            Some(volume) => volume.entries(lba, count),
            None => vec![Entry::UNMAPPED; usize::try_from(count).expect("a request's blocks")],
        }
    }

    /// The volume's map, if it has any data.
    #[must_use]
    pub fn volume(&self, volume_id: u64) -> Option<&VolumeIndex> {
        self.volumes.get(&volume_id)
    }

    /// The volume's map, created empty when missing.
    pub fn volume_mut(&mut self, volume_id: u64) -> &mut VolumeIndex {
        self.volumes.entry(volume_id).or_default()
    }

    /// Removes a volume and returns its map. Its blocks stay referenced by
    /// the shared volumes that map them too.
    pub fn remove_volume(&mut self, volume_id: u64) -> Option<VolumeIndex> {
        self.shared.remove(&volume_id);
        self.volumes.remove(&volume_id)
    }

    /// Drops the map of a volume that no longer holds any block.
    pub fn prune(&mut self, volume_id: u64) {
        if self
            .volumes
            .get(&volume_id)
            .is_some_and(|volume| volume.used_blocks() == 0 && volume.epoch_max == 0)
        {
            self.remove_volume(volume_id);
        }
    }

    /// Marks a volume shared (see the type's documentation); creates an
    /// empty map when missing.
    pub fn mark_shared(&mut self, volume_id: u64) {
        self.volume_mut(volume_id).shared = true;
        self.shared.insert(volume_id);
    }

    /// True when any volume on the disk is shared.
    #[must_use]
    pub fn has_shared(&self) -> bool {
        !self.shared.is_empty()
    }

    /// True when a shared volume other than `except` maps `lba` to the
    /// data block of `entry` (false for an entry without data).
    #[must_use]
    pub fn shared_maps(&self, except: u64, lba: u64, entry: Entry) -> bool {
        entry.is_data()
            && self
                .shared
                .iter()
                .filter(|&&other| other != except)
                .any(|other| self.get(*other, lba).address == entry.address)
    }

    /// A volume that maps `lba` to the data block at `address`: `hint` if
    /// it does, else any shared volume that does.
    #[must_use]
    pub fn referrer(&self, hint: u64, lba: u64, address: u64) -> Option<(u64, Entry)> {
        let entry = self.get(hint, lba);
        if entry.address == address {
            return Some((hint, entry));
        }
        self.shared.iter().find_map(|&other| {
            let entry = self.get(other, lba);
            (entry.address == address).then_some((other, entry))
        })
    }

    /// Re-points `lba` from the data block at `from` to `new` (not
    /// unmapped) in every volume of `candidates` that maps it there, and
    /// returns the entry replaced (None when no volume did). Volumes that
    /// shared the chunk in memory share the changed chunk after: a
    /// relocation by the cleaner must not turn one chunk that a volume and
    /// its snapshots share into a copy each.
    pub fn repoint(&mut self, candidates: &[u64], lba: u64, from: u64, new: Entry) -> Option<Entry> {
        assert_ne!(new, Entry::UNMAPPED, "a relocation maps the block somewhere");
        let key = lba / CHUNK_BLOCKS;
        // (chunk before, chunk after) of the volumes changed so far; the
        // chunks before are held so their addresses stay theirs.
        let mut changed: Vec<(Arc<Chunk>, Arc<Chunk>)> = Vec::new();
        let mut old = None;
        for id in candidates {
            let Some(volume) = self.volumes.get_mut(id) else {
                continue;
            };
            let Some(before) = volume.chunks.get(&key).map(Arc::clone) else {
                continue;
            };
            if before.get(offset_in_chunk(lba)).address != from {
                continue;
            }
            if let Some((_, after)) = changed.iter().find(|(known, _)| Arc::ptr_eq(known, &before)) {
                // Data or bad before and after: the volume's count is unchanged.
                volume.chunks.insert(key, Arc::clone(after));
                continue;
            }
            old = Some(volume.set(lba, new));
            let after = Arc::clone(volume.chunks.get(&key).expect("just set"));
            changed.push((before, after));
        }
        old
    }

    /// Volumes that may map `lba` to a block `volume_id`'s record placed:
    /// `volume_id` and every shared volume, each once.
    #[must_use]
    pub fn referrer_candidates(&self, volume_id: u64) -> Vec<u64> {
        let mut ids = vec![volume_id];
        ids.extend(self.shared.iter().copied().filter(|&id| id != volume_id));
        ids
    }

    /// Makes shared volumes' identical chunks one in memory again (after a
    /// restart each volume's map is decoded on its own, so a volume and its
    /// snapshots would otherwise hold a copy of every chunk each). Returns
    /// how many chunks were folded.
    pub fn share_identical_chunks(&mut self) -> usize {
        let mut seen: BTreeMap<u64, Vec<Arc<Chunk>>> = BTreeMap::new();
        let mut folded = 0;
        for id in self.shared.clone() {
            let Some(volume) = self.volumes.get_mut(&id) else {
                continue;
            };
            for (key, chunk) in &mut volume.chunks {
                let versions = seen.entry(*key).or_default();
                match versions
                    .iter()
                    .find(|known| Arc::ptr_eq(known, chunk) || **known == *chunk)
                {
                    Some(known) => {
                        if !Arc::ptr_eq(known, chunk) {
                            *chunk = Arc::clone(known);
                            folded += 1;
                        }
                    }
                    None => versions.push(Arc::clone(chunk)),
                }
            }
        }
        folded
    }

    /// Makes `target`'s map a copy of `source`'s (sharing its chunks, so
    /// this costs a pointer per 4 MiB) and marks both shared. `target`'s
    /// previous entries must have been cleared by the caller (so that their
    /// blocks could be released); its epoch and sequence are kept.
    pub fn clone_volume(&mut self, source: u64, target: u64) {
        assert_ne!(source, target, "a volume is not cloned onto itself");
        self.mark_shared(source);
        let source_index = self.volumes.get(&source).expect("marked above");
        let chunks = source_index.chunks.clone();
        let used_blocks = source_index.used_blocks;
        let target_index = self.volume_mut(target);
        assert_eq!(target_index.used_blocks, 0, "clone target cleared first");
        target_index.chunks = chunks;
        target_index.used_blocks = used_blocks;
        self.mark_shared(target);
    }

    /// Volumes with a map, sorted by id.
    #[must_use]
    pub fn volume_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.volumes.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Number of volumes with a map.
    #[must_use]
    pub fn volume_count(&self) -> usize {
        self.volumes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    #[test]
    fn unwritten_blocks_are_unmapped() {
        let index = Index::default();
        assert_eq!(index.get(1, 12345), Entry::UNMAPPED);
    }

    #[test]
    fn entries_across_chunks_and_holes_match_block_by_block_lookups() {
        let mut index = Index::default();
        for (lba, address) in [(1020, 7), (1023, 8), (1024, 9), (3100, 10)] {
            index.volume_mut(1).set(lba, Entry { address, crc: 1 });
        }
        for (lba, count) in [(1000, 100), (1023, 2), (2040, 1100), (0, 1)] {
            let expected: Vec<Entry> = (lba..lba + count).map(|at| index.get(1, at)).collect();
            assert_eq!(index.entries(1, lba, count), expected, "{lba}+{count}");
        }
        assert_eq!(index.entries(2, 5, 3), vec![Entry::UNMAPPED; 3]);
    }

    #[test]
    fn clearing_the_last_entry_frees_the_chunk() {
        let mut volume = VolumeIndex::default();
        volume.set(5, Entry { address: 9, crc: 1 });
        assert_eq!(volume.used_blocks(), 1);
        assert_eq!(volume.set(5, Entry::UNMAPPED), Entry { address: 9, crc: 1 });
        assert_eq!(volume.used_blocks(), 0);
        assert!(volume.chunks.is_empty());
    }

    #[test]
    fn memory_counts_each_chunk_once_however_many_volumes_share_it() {
        let mut index = Index::default();
        assert_eq!(index.memory_bytes(), 0);
        for lba in 0..2048 {
            index.volume_mut(1).set(
                lba,
                Entry {
                    address: 1 + lba,
                    crc: 1,
                },
            );
        }
        let one = index.memory_bytes();
        assert!(
            (2 * 4096..2 * 4096 + 2 * 256).contains(&one),
            "two chunks of one run each: their crcs and a little: {one}"
        );
        index.clone_volume(1, 2);
        assert_eq!(
            index.memory_bytes(),
            one + 2 * CHUNK_MAP_ENTRY_BYTES,
            "a clone shares the chunks"
        );
        index.volume_mut(2).set(0, Entry { address: 9999, crc: 2 });
        let copied = index.memory_bytes() - one - 2 * CHUNK_MAP_ENTRY_BYTES;
        assert!(
            (4096..4096 + 256).contains(&copied),
            "written: one chunk copied: {copied}"
        );
    }

    fn fill(volume: &mut VolumeIndex, lbas: impl Iterator<Item = u64>, first_address: u64) {
        for (n, lba) in lbas.enumerate() {
            volume.set(
                lba,
                Entry {
                    address: first_address + n as u64,
                    crc: 7,
                },
            );
        }
    }

    /// The chunk's bytes per mapped block, volume `volume`'s first chunk.
    fn bytes_per_block(volume: &VolumeIndex) -> f64 {
        let chunk = &volume.chunks[&0];
        chunk.memory_bytes() as f64 / f64::from(chunk.used())
    }

    #[test]
    fn sequential_data_costs_its_crcs_and_random_data_an_address_more() {
        let mut sequential = VolumeIndex::default();
        fill(&mut sequential, 0..1024, 100);
        assert!(!sequential.chunks[&0].is_dense());
        let cost = bytes_per_block(&sequential);
        assert!((4.0..4.2).contains(&cost), "sequential: {cost} bytes per block");
        // Every block once, in a scrambled order, at consecutive addresses (as
        // the log places random writes): no two neighbours are contiguous.
        let scrambled = (0..1024u64).map(|n| (n * 389) % 1024);
        let mut random = VolumeIndex::default();
        fill(&mut random, scrambled.clone(), 100);
        assert!(random.chunks[&0].is_dense());
        let cost = bytes_per_block(&random);
        assert!((8.0..8.2).contains(&cost), "random: {cost} bytes per block");
        let mut far = VolumeIndex::default();
        fill(&mut far, scrambled, 1 << 38);
        let cost = bytes_per_block(&far);
        assert!(
            (9.0..9.2).contains(&cost),
            "random beyond 16 TiB: {cost} bytes per block"
        );
        for lba in 0..1024 {
            assert_eq!(far.get(lba).address >> 32, 1 << 6, "{lba}");
        }
    }

    #[test]
    fn a_clone_is_a_frozen_snapshot() {
        let mut volume = VolumeIndex::default();
        volume.set(1, Entry { address: 10, crc: 1 });
        let frozen = volume.clone();
        volume.set(1, Entry { address: 11, crc: 2 });
        volume.set(2000, Entry { address: 12, crc: 3 });
        assert_eq!(frozen.get(1).address, 10);
        assert_eq!(frozen.get(2000), Entry::UNMAPPED);
        assert_eq!(volume.get(1).address, 11);
    }

    #[test]
    fn identical_chunks_of_shared_volumes_are_folded_into_one() {
        let mut index = Index::default();
        index.volume_mut(1).set(3, Entry { address: 10, crc: 1 });
        index.volume_mut(1).set(5000, Entry { address: 11, crc: 2 });
        index.clone_volume(1, 2);
        // As after a restart: volume 2 decoded on its own, chunks not shared.
        let decoded = index.volumes[&2].clone();
        let mut separate = VolumeIndex::default();
        for (lba, entry) in decoded.iter() {
            separate.set(lba, entry);
        }
        separate.shared = true;
        index.volumes.insert(2, separate);
        index.volume_mut(2).set(5000, Entry { address: 12, crc: 3 });
        assert_eq!(
            index.share_identical_chunks(),
            1,
            "the chunk of lba 3 is the same, that of 5000 differs"
        );
        let (one, two) = (&index.volumes[&1], &index.volumes[&2]);
        assert!(Arc::ptr_eq(&one.chunks[&0], &two.chunks[&0]));
        assert!(!Arc::ptr_eq(&one.chunks[&4], &two.chunks[&4]));
        assert_eq!(index.get(2, 5000).address, 12);
        assert_eq!(index.share_identical_chunks(), 0, "nothing left to fold");
    }

    /// Runs of the blocks of `0..end` where `a` and `b` differ, block by block.
    fn naive_differences(a: &VolumeIndex, b: Option<&VolumeIndex>, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for lba in start..end {
            if a.get(lba) != b.map_or(Entry::UNMAPPED, |b| b.get(lba)) {
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == lba => *count += 1,
                    _ => runs.push((lba, 1)),
                }
            }
        }
        runs
    }

    proptest! {
        /// A snapshot (a clone sharing every chunk) then writes, unmaps and
        /// bad blocks on the volume: the differences are exactly the blocks
        /// whose entries differ, in any window, and against nothing they
        /// are the mapped blocks.
        #[test]
        fn differences_from_a_snapshot_are_the_blocks_changed_since(
            before in proptest::collection::vec((0u64..5000, 1u64..64), 0..60),
            after in proptest::collection::vec((0u64..5000, 1u64..64, 0u8..4), 0..60),
            window in (0u64..5000, 0u64..5000),
        ) {
            let mut volume = VolumeIndex::default();
            for (at, (lba, len)) in (1u64..).zip(&before) {
                for offset in 0..*len {
                    volume.set(lba + offset, Entry { address: at * 100 + offset, crc: 1 });
                }
            }
            let snapshot = volume.clone();
            for (at, (lba, len, kind)) in (1000u64..).zip(&after) {
                for offset in 0..*len {
                    let entry = match kind {
                        0 => Entry::UNMAPPED,
                        1 => Entry::BAD,
                        _ => Entry { address: at * 100 + offset, crc: 2 },
                    };
                    volume.set(lba + offset, entry);
                }
            }
            let (start, end) = (window.0.min(window.1), window.0.max(window.1) + 64);
            let mut runs = Vec::new();
            volume.differences(Some(&snapshot), start, end, &mut runs);
            prop_assert_eq!(&runs, &naive_differences(&volume, Some(&snapshot), start, end));
            let mut runs = Vec::new();
            volume.differences(None, 0, 5100, &mut runs);
            prop_assert_eq!(&runs, &naive_differences(&volume, None, 0, 5100));
            let mut runs = Vec::new();
            snapshot.differences(Some(&snapshot.clone()), 0, 5100, &mut runs);
            prop_assert!(runs.is_empty(), "a map equals its clone");
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..5000, 0u32..4), 1..400)) {
            let mut volume = VolumeIndex::default();
            let mut model = Model::new();
            for (lba, address) in ops {
                let entry = Entry { address: u64::from(address), crc: address * 7 };
                let expected_old = model.get(&lba).copied().unwrap_or(Entry::UNMAPPED);
                if address == 0 { model.remove(&lba); } else { model.insert(lba, entry); }
                prop_assert_eq!(volume.set(lba, entry), expected_old);
            }
            prop_assert_eq!(volume.used_blocks(), model.len() as u64);
            let listed: Vec<_> = volume.iter().collect();
            let expected: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&listed, &expected);
            let ranged: Vec<_> = volume.range(1000, 3000).collect();
            let expected_range: Vec<_> = model.range(1000..3000).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(ranged, expected_range);
        }

        /// Writes of runs (consecutive blocks at consecutive addresses, as a
        /// record places them), overwrites of single blocks, bad blocks and
        /// unmaps, over three chunks: whatever form each chunk takes, the
        /// map answers as a plain map would.
        #[test]
        fn runs_and_dense_chunks_behave_like_a_map(
            ops in proptest::collection::vec((0u64..2048, 1u64..300, 0u8..16, 1u64..(1 << 40) - 400), 1..1200)
        ) {
            let mut volume = VolumeIndex::default();
            let mut model = Model::new();
            for (lba, len, kind, address) in ops {
                // Kind 0: a run; 1 to 13: a single block (enough of them
                // turn a chunk dense: about one case in seven ends dense
                // with operations after); 14: bad; 15: unmapped.
                let len = if kind == 0 { len } else { 1 };
                for offset in 0..len.min(2048 - lba) {
                    let entry = match kind {
                        14 => Entry::BAD,
                        15 => Entry::UNMAPPED,
                        _ => Entry { address: address + offset, crc: u32::try_from((lba + offset) % 977).unwrap() },
                    };
                    let expected_old = model.get(&(lba + offset)).copied().unwrap_or(Entry::UNMAPPED);
                    if entry == Entry::UNMAPPED {
                        model.remove(&(lba + offset));
                    } else {
                        model.insert(lba + offset, entry);
                    }
                    prop_assert_eq!(volume.set(lba + offset, entry), expected_old);
                }
            }
            prop_assert_eq!(volume.used_blocks(), model.len() as u64);
            let listed: Vec<_> = volume.iter().collect();
            let expected: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&listed, &expected);
            let all: Vec<_> = (0..2048).map(|lba| model.get(&lba).copied().unwrap_or(Entry::UNMAPPED)).collect();
            prop_assert_eq!(&volume.entries(0, 2048), &all);
            prop_assert_eq!(&volume.entries(1000, 1000), &all[1000..2000].to_vec());
            for lba in (0..2048).step_by(7) {
                prop_assert_eq!(volume.get(lba), all[usize::try_from(lba).unwrap()]);
            }
            let ranged: Vec<_> = volume.range(700, 1500).collect();
            let expected_range: Vec<_> = model.range(700..1500).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(ranged, expected_range);
        }
    }
}
