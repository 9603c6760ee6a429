//! One chunk of a volume's map: `CHUNK_LEN` consecutive volume blocks.
//!
//! A chunk keeps its blocks in the cheaper of two forms:
//! - **runs** (the form a chunk starts in): stretches of blocks at
//!   consecutive offsets whose data lies at consecutive disk addresses, 16
//!   bytes each, plus every mapped block's crc (4 bytes). Data written
//!   sequentially costs about 4 bytes per block, sparse data 20.
//! - **dense**: an address and a crc per block (8 bytes per block, 9 on
//!   disks beyond 16 TiB), for chunks written at random. A chunk turns dense
//!   when its runs would cost more than that, and stays dense until it is
//!   emptied.
//!
//! Both forms hold the same entries; every operation gives the same answer
//! whichever form a chunk is in (the tests check them against a plain map).

use super::{Entry, ADDRESS_BAD, ADDRESS_UNMAPPED};

/// Volume blocks per chunk.
pub(super) const CHUNK_LEN: usize = 1024;

/// Blocks `offset..offset + len` live at `address..address + len`; their
/// crcs are `crcs[crc_at..crc_at + len]`. A bad block is a run of one at
/// `ADDRESS_BAD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    offset: u16,
    len: u16,
    crc_at: u16,
    address: u64,
}

impl Run {
    fn end(&self) -> usize {
        usize::from(self.offset) + usize::from(self.len)
    }

    fn is_data(&self) -> bool {
        self.address != ADDRESS_BAD
    }

    fn entry(&self, crcs: &[u32], offset: usize) -> Entry {
        let step = offset - usize::from(self.offset);
        Entry {
            address: if self.is_data() {
                self.address + step as u64
            } else {
                ADDRESS_BAD
            },
            crc: crcs[usize::from(self.crc_at) + step],
        }
    }
}

#[derive(Clone, Default, PartialEq, Eq)]
pub(super) struct Runs {
    /// Sorted by offset, not overlapping.
    runs: Vec<Run>,
    /// Crcs of the runs' blocks, in run order.
    crcs: Vec<u32>,
}

#[derive(Clone, PartialEq, Eq)]
pub(super) struct Dense {
    /// Address bits 0..32 of each block (0 with `high` 0: unmapped).
    low: [u32; CHUNK_LEN],
    crcs: [u32; CHUNK_LEN],
    /// Address bits 32..40, allocated when an address needs them.
    high: Option<Box<[u8; CHUNK_LEN]>>,
    used: u32,
}

/// Bytes of a chunk in dense form, the bound runs are kept under.
const DENSE_BYTES: usize = std::mem::size_of::<Dense>();

#[derive(Clone, PartialEq, Eq)]
pub(super) enum Chunk {
    Runs(Runs),
    Dense(Box<Dense>),
}

impl Default for Chunk {
    fn default() -> Self {
        Self::Runs(Runs::default())
    }
}

impl Chunk {
    /// Blocks that are not unmapped (data or bad).
    pub(super) fn used(&self) -> u32 {
        match self {
            Self::Runs(runs) => u32::try_from(runs.crcs.len()).expect("at most CHUNK_LEN"),
            Self::Dense(dense) => dense.used,
        }
    }

    /// Bytes this chunk holds on the heap and inline.
    pub(super) fn memory_bytes(&self) -> u64 {
        let inline = std::mem::size_of::<Self>();
        let heap = match self {
            Self::Runs(runs) => {
                runs.runs.capacity() * std::mem::size_of::<Run>() + runs.crcs.capacity() * std::mem::size_of::<u32>()
            }
            Self::Dense(dense) => DENSE_BYTES + dense.high.as_ref().map_or(0, |_| CHUNK_LEN),
        };
        (inline + heap) as u64
    }

    /// True when the chunk is in dense form (for tests).
    #[cfg(test)]
    pub(super) fn is_dense(&self) -> bool {
        matches!(self, Self::Dense(_))
    }

    pub(super) fn get(&self, offset: usize) -> Entry {
        match self {
            Self::Runs(runs) => runs.find(offset).map_or(Entry::UNMAPPED, |at| {
                let run = &runs.runs[at];
                run.entry(&runs.crcs, offset)
            }),
            Self::Dense(dense) => dense.get(offset),
        }
    }

    /// Appends the entries of `from..to` to `out`.
    pub(super) fn extend_entries(&self, from: usize, to: usize, out: &mut Vec<Entry>) {
        match self {
            Self::Dense(dense) => out.extend((from..to).map(|offset| dense.get(offset))),
            Self::Runs(runs) => {
                let start = out.len();
                out.resize(start + (to - from), Entry::UNMAPPED);
                let first = runs.runs.partition_point(|run| run.end() <= from);
                for run in runs.runs[first..].iter().take_while(|run| usize::from(run.offset) < to) {
                    for offset in usize::from(run.offset).max(from)..run.end().min(to) {
                        out[start + offset - from] = run.entry(&runs.crcs, offset);
                    }
                }
            }
        }
    }

    /// Sets block `offset` to `entry` and returns the previous entry.
    pub(super) fn set(&mut self, offset: usize, entry: Entry) -> Entry {
        match self {
            Self::Dense(dense) => dense.set(offset, entry),
            Self::Runs(runs) => {
                if let Some(old) = runs.move_to_previous(offset, entry) {
                    return old;
                }
                let old = runs.unset(offset);
                if entry != Entry::UNMAPPED {
                    runs.insert(offset, entry);
                    if runs.bytes() > DENSE_BYTES {
                        *self = Self::Dense(Box::new(Dense::from_runs(runs)));
                    }
                }
                old
            }
        }
    }

    /// Every entry that is not unmapped, in offset order.
    pub(super) fn iter(&self) -> ChunkIter<'_> {
        match self {
            Self::Runs(runs) => ChunkIter::Runs { runs, run: 0, step: 0 },
            Self::Dense(dense) => ChunkIter::Dense { dense, offset: 0 },
        }
    }
}

/// Iterator over a chunk's mapped entries: (offset, entry).
pub(super) enum ChunkIter<'a> {
    Runs { runs: &'a Runs, run: usize, step: u16 },
    Dense { dense: &'a Dense, offset: usize },
}

impl Iterator for ChunkIter<'_> {
    type Item = (usize, Entry);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Runs { runs, run, step } => {
                let current = runs.runs.get(*run)?;
                let offset = usize::from(current.offset) + usize::from(*step);
                let entry = current.entry(&runs.crcs, offset);
                *step += 1;
                if *step == current.len {
                    *run += 1;
                    *step = 0;
                }
                Some((offset, entry))
            }
            Self::Dense { dense, offset } => {
                while *offset < CHUNK_LEN {
                    let at = *offset;
                    *offset += 1;
                    let entry = dense.get(at);
                    if entry != Entry::UNMAPPED {
                        return Some((at, entry));
                    }
                }
                None
            }
        }
    }
}

fn offset_u16(offset: usize) -> u16 {
    u16::try_from(offset).expect("an offset within a chunk")
}

impl Runs {
    fn bytes(&self) -> usize {
        self.runs.len() * std::mem::size_of::<Run>() + self.crcs.len() * std::mem::size_of::<u32>()
    }

    /// Index of the run holding `offset`.
    fn find(&self, offset: usize) -> Option<usize> {
        let at = self.runs.partition_point(|run| usize::from(run.offset) <= offset);
        (at > 0 && self.runs[at - 1].end() > offset).then(|| at - 1)
    }

    /// Moves the crcs of runs from `from` on by `delta` (+1 or -1).
    fn shift_crcs(&mut self, from: usize, delta: i32) {
        for run in &mut self.runs[from..] {
            run.crc_at = u16::try_from(i32::from(run.crc_at) + delta).expect("crc index in range");
        }
    }

    /// A sequential overwrite's step: `offset` is the first block of a run
    /// and `entry` continues the run before it. The block moves from one
    /// run to the other and its crc is replaced where it is (no run or crc
    /// is inserted or removed). Returns the old entry, or None (nothing
    /// done) when the case does not apply.
    fn move_to_previous(&mut self, offset: usize, entry: Entry) -> Option<Entry> {
        let at = self.find(offset)?;
        let run = self.runs[at];
        if at == 0 || usize::from(run.offset) != offset || !run.is_data() || !entry.is_data() {
            return None;
        }
        let previous = &mut self.runs[at - 1];
        if !(previous.is_data()
            && previous.end() == offset
            && previous.address + u64::from(previous.len) == entry.address)
        {
            return None;
        }
        debug_assert_eq!(previous.crc_at + previous.len, run.crc_at, "crcs in run order");
        previous.len += 1;
        let old = run.entry(&self.crcs, offset);
        self.crcs[usize::from(run.crc_at)] = entry.crc;
        if run.len == 1 {
            self.runs.remove(at);
        } else {
            let rest = &mut self.runs[at];
            rest.offset += 1;
            rest.len -= 1;
            rest.address += 1;
            rest.crc_at += 1;
        }
        Some(old)
    }

    /// Unmaps `offset` and returns what it held.
    fn unset(&mut self, offset: usize) -> Entry {
        let Some(at) = self.find(offset) else {
            return Entry::UNMAPPED;
        };
        let run = self.runs[at];
        let old = run.entry(&self.crcs, offset);
        let step = offset - usize::from(run.offset);
        self.crcs.remove(usize::from(run.crc_at) + step);
        if run.len == 1 {
            self.runs.remove(at);
            self.shift_crcs(at, -1);
            return old;
        }
        if step == 0 {
            let first = &mut self.runs[at];
            first.offset += 1;
            first.len -= 1;
            first.address += u64::from(first.is_data());
        } else if step + 1 == usize::from(run.len) {
            self.runs[at].len -= 1;
        } else {
            let step16 = offset_u16(step);
            self.runs[at].len = step16;
            let right = Run {
                offset: offset_u16(offset + 1),
                len: run.len - step16 - 1,
                crc_at: run.crc_at + step16,
                address: run.address + step as u64 + 1,
            };
            self.runs.insert(at + 1, right);
            self.shift_crcs(at + 2, -1);
            return old;
        }
        self.shift_crcs(at + 1, -1);
        old
    }

    /// Maps the unmapped `offset` to `entry` (not unmapped).
    fn insert(&mut self, offset: usize, entry: Entry) {
        let data = entry.is_data();
        // The run that would be before the block.
        let next = self.runs.partition_point(|run| usize::from(run.offset) < offset);
        let joins_previous = next > 0 && {
            let previous = &self.runs[next - 1];
            data && previous.is_data()
                && previous.end() == offset
                && previous.address + u64::from(previous.len) == entry.address
        };
        let joins_next = self.runs.get(next).is_some_and(|following| {
            data && following.is_data()
                && usize::from(following.offset) == offset + 1
                && following.address == entry.address + 1
        });
        match (joins_previous, joins_next) {
            (true, true) => {
                // The block fills the gap between two runs: one run now.
                let following = self.runs.remove(next);
                let previous = &mut self.runs[next - 1];
                self.crcs
                    .insert(usize::from(previous.crc_at) + usize::from(previous.len), entry.crc);
                previous.len += 1 + following.len;
                // The following run's crcs moved up by one with the insert:
                // they now continue the merged run's.
                self.shift_crcs(next, 1);
            }
            (true, false) => {
                let previous = &mut self.runs[next - 1];
                self.crcs
                    .insert(usize::from(previous.crc_at) + usize::from(previous.len), entry.crc);
                previous.len += 1;
                self.shift_crcs(next, 1);
            }
            (false, true) => {
                let following = &mut self.runs[next];
                self.crcs.insert(usize::from(following.crc_at), entry.crc);
                following.offset -= 1;
                following.len += 1;
                following.address -= 1;
                self.shift_crcs(next + 1, 1);
            }
            (false, false) => {
                let crc_at = if next == 0 {
                    0
                } else {
                    let previous = &self.runs[next - 1];
                    previous.crc_at + previous.len
                };
                self.crcs.insert(usize::from(crc_at), entry.crc);
                self.runs.insert(
                    next,
                    Run {
                        offset: offset_u16(offset),
                        len: 1,
                        crc_at,
                        address: entry.address,
                    },
                );
                self.shift_crcs(next + 1, 1);
            }
        }
    }
}

impl Dense {
    fn from_runs(runs: &Runs) -> Self {
        let mut dense = Self {
            low: [0; CHUNK_LEN],
            crcs: [0; CHUNK_LEN],
            high: None,
            used: 0,
        };
        for run in &runs.runs {
            for offset in usize::from(run.offset)..run.end() {
                dense.set(offset, run.entry(&runs.crcs, offset));
            }
        }
        dense
    }

    fn get(&self, offset: usize) -> Entry {
        let high = self.high.as_ref().map_or(0, |high| u64::from(high[offset]));
        Entry {
            address: (high << 32) | u64::from(self.low[offset]),
            crc: self.crcs[offset],
        }
    }

    fn set(&mut self, offset: usize, entry: Entry) -> Entry {
        let old = self.get(offset);
        let high = u8::try_from(entry.address >> 32).expect("addresses have 40 bits");
        if high != 0 {
            self.high.get_or_insert_with(|| Box::new([0; CHUNK_LEN]))[offset] = high;
        } else if let Some(highs) = &mut self.high {
            highs[offset] = 0;
        }
        self.low[offset] = crate::codec::low_32(entry.address);
        self.crcs[offset] = entry.crc;
        match (old.address == ADDRESS_UNMAPPED, entry.address == ADDRESS_UNMAPPED) {
            (true, false) => self.used += 1,
            (false, true) => self.used -= 1,
            _ => {}
        }
        old
    }
}
