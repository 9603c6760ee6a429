//! Is a history of reads and writes of a volume's blocks linearizable?
//!
//! Each block is a read/write register, and every write puts a value no
//! other write uses (the torture harness writes versions), so the check is
//! the polynomial one for registers with unique writes (Gibbons and
//! Korach; in the "zones" form of Golab, Li and Shah, PODC 2011). The
//! operations that wrote or read one value form its *cluster*; its zone
//! runs from the earliest completion in the cluster to the latest
//! invocation. When the earliest completion comes first the zone is
//! *forward* (the value must be held throughout it), otherwise *backward*.
//! A history is linearizable iff every read returns a value some write
//! began before the read ended, no two forward zones overlap, and no
//! backward zone lies inside a forward one.
//!
//! Operations that got no answer: a read is dropped (it returned nothing);
//! a write may have taken effect at any time after it began, or never, so
//! it counts as completing at the end of time, and is dropped when no read
//! saw its value. The block's value before any write is 0, written by a
//! virtual write at time 0.

use std::collections::BTreeMap;

/// One read or write of one block, as a client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// Who issued it (for messages).
    pub client: u32,
    pub block: u64,
    pub kind: Kind,
    /// When it was sent (microseconds on one clock shared by all clients).
    pub invoked_us: u64,
    /// When its answer came (None: it failed or never came).
    pub completed_us: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Wrote `value` (unique per block; never 0).
    Write { value: u64 },
    /// Read `value` (0: never written).
    Read { value: u64 },
}

/// The operations of a block that cannot be put in any order a single copy
/// would explain, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    pub why: String,
    /// The operations involved, by invocation.
    pub ops: Vec<Op>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "block {}: {}", self.block, self.why)?;
        for op in &self.ops {
            let what = match op.kind {
                Kind::Write { value } => format!("write {value}"),
                Kind::Read { value } => format!("read {value}"),
            };
            let done = op
                .completed_us
                .map_or_else(|| "no answer".to_owned(), |at| format!("{at} us"));
            writeln!(f, "  client {} {what}: {} us .. {done}", op.client, op.invoked_us)?;
        }
        Ok(())
    }
}

/// What a check covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub blocks: usize,
    pub reads: usize,
    pub writes: usize,
}

/// One value's operations and zone.
struct Cluster {
    value: u64,
    write: Option<Op>,
    reads: Vec<Op>,
    /// Earliest completion (u64::MAX: none), latest invocation.
    first_done: u64,
    last_start: u64,
}

impl Cluster {
    fn forward(&self) -> bool {
        self.first_done < self.last_start
    }

    /// (low, high) of the zone.
    fn zone(&self) -> (u64, u64) {
        if self.forward() {
            (self.first_done, self.last_start)
        } else {
            (self.last_start, self.first_done)
        }
    }

    fn ops(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = self.write.iter().chain(&self.reads).copied().collect();
        ops.sort_by_key(|op| op.invoked_us);
        ops
    }
}

/// Checks `history`; the first violation found, or what was checked.
pub fn check(history: &[Op]) -> Result<Checked, Violation> {
    let mut blocks: BTreeMap<u64, Vec<Op>> = BTreeMap::new();
    for op in history {
        blocks.entry(op.block).or_default().push(*op);
    }
    let mut checked = Checked::default();
    for (block, ops) in blocks {
        checked.blocks += 1;
        checked.reads += ops.iter().filter(|op| matches!(op.kind, Kind::Read { .. })).count();
        checked.writes += ops.iter().filter(|op| matches!(op.kind, Kind::Write { .. })).count();
        check_block(block, &ops)?;
    }
    Ok(checked)
}

fn check_block(block: u64, ops: &[Op]) -> Result<(), Violation> {
    let initial = Op {
        client: u32::MAX,
        block,
        kind: Kind::Write { value: 0 },
        invoked_us: 0,
        completed_us: Some(0),
    };
    let mut clusters: BTreeMap<u64, Cluster> = BTreeMap::new();
    let new_cluster = |value| Cluster {
        value,
        write: None,
        reads: Vec::new(),
        first_done: u64::MAX,
        last_start: 0,
    };
    clusters.insert(0, {
        let mut cluster = new_cluster(0);
        cluster.write = Some(initial);
        cluster
    });
    for op in ops {
        match op.kind {
            Kind::Write { value } => {
                let cluster = clusters.entry(value).or_insert_with(|| new_cluster(value));
                if let Some(other) = cluster.write {
                    return Err(Violation {
                        block,
                        why: format!("two writes of value {value}: the history's values must be unique"),
                        ops: vec![other, *op],
                    });
                }
                cluster.write = Some(*op);
            }
            Kind::Read { value } if op.completed_us.is_some() => {
                clusters
                    .entry(value)
                    .or_insert_with(|| new_cluster(value))
                    .reads
                    .push(*op);
            }
            Kind::Read { .. } => {}
        }
    }
    // Unobserved writes that got no answer may never have happened.
    clusters
        .retain(|_, cluster| !(cluster.reads.is_empty() && cluster.write.is_some_and(|w| w.completed_us.is_none())));
    for cluster in clusters.values_mut() {
        let Some(write) = cluster.write else {
            return Err(Violation {
                block,
                why: format!("a read returned value {}, which no write wrote", cluster.value),
                ops: cluster.ops(),
            });
        };
        if let Some(early) = cluster
            .reads
            .iter()
            .find(|read| read.completed_us.is_some_and(|done| done < write.invoked_us))
        {
            return Err(Violation {
                block,
                why: format!("a read returned value {} before its write began", cluster.value),
                ops: vec![write, *early],
            });
        }
        for op in cluster.write.iter().chain(&cluster.reads) {
            cluster.first_done = cluster.first_done.min(op.completed_us.unwrap_or(u64::MAX));
            cluster.last_start = cluster.last_start.max(op.invoked_us);
        }
    }
    let mut forward: Vec<&Cluster> = clusters.values().filter(|c| c.forward()).collect();
    forward.sort_by_key(|c| c.zone().0);
    for pair in forward.windows(2) {
        let (first, second) = (pair[0], pair[1]);
        if second.zone().0 < first.zone().1 {
            let why = format!(
                "values {} and {} each had to be the block's only value over overlapping times",
                first.value, second.value
            );
            return Err(overlap(block, first, second, why));
        }
    }
    for backward in clusters.values().filter(|c| !c.forward()) {
        let (low, high) = backward.zone();
        // The forward zone starting last before `low` is the only candidate (they are disjoint).
        let index = forward.partition_point(|c| c.zone().0 < low);
        if let Some(around) = index.checked_sub(1).map(|i| forward[i]) {
            if high < around.zone().1 {
                let why = format!(
                    "value {} had to be the block's only value while value {} was written and read",
                    around.value, backward.value
                );
                return Err(overlap(block, around, backward, why));
            }
        }
    }
    Ok(())
}

fn overlap(block: u64, first: &Cluster, second: &Cluster, why: String) -> Violation {
    let mut ops = first.ops();
    ops.extend(second.ops());
    ops.retain(|op| op.client != u32::MAX);
    ops.sort_by_key(|op| op.invoked_us);
    Violation { block, why, ops }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(client: u32, value: u64, invoked_us: u64, completed_us: Option<u64>) -> Op {
        Op {
            client,
            block: 7,
            kind: Kind::Write { value },
            invoked_us,
            completed_us,
        }
    }

    fn read(client: u32, value: u64, invoked_us: u64, completed_us: u64) -> Op {
        Op {
            client,
            block: 7,
            kind: Kind::Read { value },
            invoked_us,
            completed_us: Some(completed_us),
        }
    }

    #[test]
    fn sequential_and_overlapping_histories_a_single_copy_explains_pass() {
        // w1, then r1; w2 overlaps a read that sees either value.
        let history = [
            read(1, 0, 1, 2),
            write(0, 1, 10, Some(20)),
            read(1, 1, 25, 30),
            write(0, 2, 40, Some(60)),
            read(1, 1, 45, 50),
            read(2, 2, 55, 58),
            read(1, 2, 70, 80),
        ];
        assert_eq!(
            check(&history),
            Ok(Checked {
                blocks: 1,
                reads: 5,
                writes: 2
            })
        );
        // A write whose answer was lost, seen by a later read: fine; unseen: ignored.
        let history = [write(0, 1, 10, None), read(1, 1, 100, 110), write(0, 2, 120, None)];
        assert!(check(&history).is_ok());
    }

    #[test]
    fn a_stale_read_after_a_newer_write_completed_is_a_violation() {
        // w1 done, w2 done, then a read returns 1: what a deposed coordinator would answer.
        let history = [write(0, 1, 10, Some(20)), write(0, 2, 30, Some(40)), read(1, 1, 50, 60)];
        let violation = check(&history).unwrap_err();
        assert_eq!(violation.block, 7);
        assert!(violation.ops.contains(&read(1, 1, 50, 60)), "{violation}");
    }

    #[test]
    fn a_read_that_sees_a_write_then_a_later_read_that_does_not_is_a_violation() {
        // w2 is under way; one read sees it, a later read sees the value before it.
        let history = [
            write(0, 1, 10, Some(20)),
            write(0, 2, 30, None),
            read(1, 2, 40, 50),
            read(2, 1, 60, 70),
        ];
        assert!(check(&history).is_err());
    }

    #[test]
    fn reads_of_values_never_written_or_before_their_write_are_violations() {
        assert!(check(&[read(1, 9, 10, 20)]).is_err());
        assert!(check(&[read(1, 1, 10, 20), write(0, 1, 30, Some(40))]).is_err());
        // Zeroes after a write completed: a lost write.
        assert!(check(&[write(0, 1, 10, Some(20)), read(1, 0, 30, 40)]).is_err());
    }

    #[test]
    fn blocks_are_independent_registers() {
        let mut other = read(1, 0, 30, 40);
        other.block = 8;
        assert!(check(&[write(0, 1, 10, Some(20)), other]).is_ok());
    }
}
