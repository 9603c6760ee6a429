//! A checked load over NBD: a writer that records every write it sends and
//! every acknowledgement it gets (`write_load`), and a checker that reads
//! every block the writer touched back from any node and proves that each
//! holds its newest acknowledged write or a newer one that was sent
//! (`verify_load`). Blocks are self-describing (`pattern`), so a verdict
//! names the exact write a block holds.
//!
//! This is the demo's proof of no lost write across a failover. fio's saved
//! verify state cannot serve there: fio 3.33 (Debian 12) counts every write
//! issued more than `iodepth` writes before the state is saved as completed,
//! and a server may complete writes out of order by more than that (fio
//! issue #1950, fixed in fio 3.41); fio then "verifies" writes that were
//! never acknowledged. See `book` for the log's format.

pub mod book;
mod run;

pub use run::{verify_load, write_load, Ended, VerifySummary, WriteLoad, WriteSummary};
