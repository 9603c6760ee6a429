//! The checker's model of the client's history: per block, every mutation
//! in issue order (the client never has two mutations of one block in
//! flight, so they are totally ordered), with when each was acknowledged.
//! Block contents name their write: a written block holds
//! `block_content(volume, lba, write id)`, a zeroed one zeroes.
//!
//! Rule 1 (no acknowledged write lost): a read returns, per block, the
//! newest write acknowledged before the read started, or a write issued
//! after it; never older, never bytes no write put there (foreign, torn).
//! Monotonic reads: no read returns a write older than one a read that
//! completed before it started returned (reads that overlap may be
//! ordered either way); a failure with `strict_monotonic`.

use super::disk::{BLOCK_BYTES, VOLUME_ID};

/// The bytes write `content` puts in block `lba` (0: zeroes).
pub fn block_content(lba: u64, content: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK_BYTES];
    if content == 0 {
        return block;
    }
    block[0..8].copy_from_slice(&VOLUME_ID.to_le_bytes());
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&content.to_le_bytes());
    let mut x = content.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba;
    for chunk in block[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    block
}

/// Which write a block's bytes came from, or None for bytes no write put there.
pub fn decode_content(lba: u64, block: &[u8]) -> Option<u64> {
    if block.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let content = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    (content != 0 && block == block_content(lba, content).as_slice()).then_some(content)
}

struct WriteRecord {
    write_id: u64,
    /// What the block holds after it (0: zeroes).
    content: u64,
    /// Logical time of the acknowledgement.
    acked_at: Option<u64>,
}

/// What a read returned that it must not have.
pub enum Violation {
    Corrupt(String),
    Lost(String),
    Monotonic(String),
}

pub struct History {
    clock: u64,
    blocks: Vec<Vec<WriteRecord>>,
    /// Per block: (logical time a read completed, the oldest history index
    /// its bytes match), for the monotonic check.
    observed: Vec<Vec<(u64, usize)>>,
    /// Blocks with a client mutation in flight.
    pub busy: Vec<bool>,
    next_write_id: u64,
}

impl History {
    pub fn new(volume_blocks: u64) -> Self {
        let count = usize::try_from(volume_blocks).expect("small volume");
        Self {
            clock: 1,
            blocks: (0..count)
                .map(|_| {
                    vec![WriteRecord {
                        write_id: 0,
                        content: 0,
                        acked_at: Some(0),
                    }]
                })
                .collect(),
            observed: vec![Vec::new(); count],
            busy: vec![false; count],
            next_write_id: 1,
        }
    }

    fn at(lba: u64) -> usize {
        usize::try_from(lba).expect("small volume")
    }

    /// Whether `[lba, lba + count)` has no mutation in flight.
    pub fn free(&self, lba: u64, count: u64) -> bool {
        (lba..lba + count).all(|block| !self.busy[Self::at(block)])
    }

    /// A new mutation: returns its id and, for a write, its data.
    pub fn issue(&mut self, lba: u64, count: u64, zero: bool) -> (u64, Option<Vec<u8>>) {
        let write_id = self.next_write_id;
        self.next_write_id += 1;
        self.clock += 1;
        let mut data = (!zero).then(|| Vec::with_capacity(usize::try_from(count).expect("small") * BLOCK_BYTES));
        for block in lba..lba + count {
            let content = if zero { 0 } else { write_id };
            self.blocks[Self::at(block)].push(WriteRecord {
                write_id,
                content,
                acked_at: None,
            });
            self.busy[Self::at(block)] = true;
            if let Some(data) = data.as_mut() {
                data.extend(block_content(block, content));
            }
        }
        (write_id, data)
    }

    /// The client heard back: acknowledged (`ok`) or failed / timed out.
    pub fn finish(&mut self, write_id: u64, lba: u64, count: u64, ok: bool) {
        self.clock += 1;
        for block in lba..lba + count {
            let history = &mut self.blocks[Self::at(block)];
            let record = history
                .iter_mut()
                .rev()
                .find(|record| record.write_id == write_id)
                .expect("an issued write");
            if ok {
                record.acked_at = Some(self.clock);
            }
            self.busy[Self::at(block)] = false;
        }
    }

    /// Logical time a read starts at.
    pub fn read_start(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Checks one block's bytes read at `started` (and notes them for the monotonic check).
    pub fn check_block(&mut self, started: u64, lba: u64, block: &[u8], note: bool) -> Result<(), Violation> {
        let Some(content) = decode_content(lba, block) else {
            return Err(Violation::Corrupt(format!(
                "block {lba} holds bytes no write put there (foreign or torn)"
            )));
        };
        let history = &self.blocks[Self::at(lba)];
        let floor = history
            .iter()
            .rposition(|record| record.acked_at.is_some_and(|at| at < started))
            .expect("the initial state counts as acknowledged");
        let Some(newest) = history[floor..]
            .iter()
            .rposition(|record| record.content == content)
            .map(|offset| floor + offset)
        else {
            let older = history[..floor].iter().rposition(|record| record.content == content);
            let what = |index: usize| format!("write {} (content {})", history[index].write_id, history[index].content);
            return Err(match older {
                Some(index) => Violation::Lost(format!(
                    "block {lba} returned {} although {} was acknowledged before the read started",
                    what(index),
                    what(floor)
                )),
                None => Violation::Corrupt(format!("block {lba} holds content {content}, never written there")),
            });
        };
        let at = Self::at(lba);
        if !note {
            return Ok(());
        }
        let earlier = self.observed[at]
            .iter()
            .filter(|(completed, _)| *completed < started)
            .map(|(_, index)| *index)
            .max()
            .unwrap_or(0);
        if newest < earlier {
            let seen = &history[earlier];
            let got = &history[newest];
            return Err(Violation::Monotonic(format!(
                "block {lba} went back in time: returned write {} after a read that completed before this one started returned the newer write {} (acked: {})",
                got.write_id,
                seen.write_id,
                seen.acked_at.is_some()
            )));
        }
        // Zeroes match every zeroing: note the oldest match, compare the newest.
        let oldest = history[floor..]
            .iter()
            .position(|record| record.content == content)
            .map_or(newest, |offset| floor + offset);
        self.clock += 1;
        let completed = self.clock;
        self.observed[at].push((completed, oldest));
        Ok(())
    }

    /// Id of the write that most recently touched `lba` and whether it was acked (trace).
    pub fn describe(&self, lba: u64) -> String {
        let history = &self.blocks[Self::at(lba)];
        history
            .iter()
            .map(|record| {
                format!(
                    "w{}{}",
                    record.write_id,
                    if record.acked_at.is_some() { "+" } else { "?" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}
