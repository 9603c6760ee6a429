//! A fault-injecting layer over an I/O engine, for tests only (the node
//! enables it with the hidden `node run --inject-faults FILE` flag and
//! warns loudly when it does): requests that match a rule of the plan
//! complete with EIO without reaching the disk, so the store above sees a
//! failing disk exactly as it would see a real one; or they wait, held
//! back, while a `stall` rule is in force, as on a disk that hangs for a
//! while and then recovers.
//!
//! The plan is a text file the test rewrites while the node runs (read
//! again every `RELOAD_INTERVAL`; a missing or empty file injects nothing).
//! One rule per line, `#` starts a comment:
//!
//! ```text
//! read  DISK [START END]    reads of disk DISK (the node's disk index) fail
//! write DISK [START END]    writes and flushes fail (a flush only for a whole-disk rule)
//! any   DISK [START END]    both
//! stall DISK [START END]    reads, writes (and flushes, for a whole-disk rule)
//!                           wait until the rule is gone, then go to the disk
//! ```
//!
//! START and END are byte offsets (END exclusive); without them the rule
//! covers the whole disk. A request fails when it overlaps the range.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::engine::{Completion, IoEngine, IoKind, Submission, Waker};

/// How often the plan file is read again.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(100);

/// Which requests a rule fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Any,
    /// Held back, not failed.
    Stall,
}

/// One rule of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub op: FaultOp,
    pub disk: usize,
    /// Byte range; None: the whole disk (and its flushes, for writes).
    pub range: Option<(u64, u64)>,
}

/// The rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub rules: Vec<FaultRule>,
}

impl FaultPlan {
    /// Parses a plan; the error names the line that is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| format!("fault plan line {}: {why}: {line:?}", number + 1);
            let words: Vec<&str> = line.split_whitespace().collect();
            let op = match words[0] {
                "read" => FaultOp::Read,
                "write" => FaultOp::Write,
                "any" => FaultOp::Any,
                "stall" => FaultOp::Stall,
                _ => return Err(bad("the first word is read, write, any or stall")),
            };
            let number_at = |at: usize| words.get(at).map(|word| word.parse::<u64>());
            let disk = match number_at(1) {
                Some(Ok(disk)) => usize::try_from(disk).map_err(|_| bad("disk index too large"))?,
                _ => return Err(bad("the second word is a disk index")),
            };
            let range = match (number_at(2), number_at(3), words.len()) {
                (None, None, 2) => None,
                (Some(Ok(start)), Some(Ok(end)), 4) if start < end => Some((start, end)),
                _ => return Err(bad("a range is START END in bytes, START < END")),
            };
            rules.push(FaultRule { op, disk, range });
        }
        Ok(Self { rules })
    }

    /// Whether a request of disk `disk` fails.
    #[must_use]
    pub fn fails<B>(&self, disk: usize, kind: &IoKind<B>, len_bytes: u64) -> bool {
        self.matches(disk, kind, len_bytes, false)
    }

    /// Whether a request of disk `disk` waits (a `stall` rule covers it).
    #[must_use]
    pub fn stalls<B>(&self, disk: usize, kind: &IoKind<B>, len_bytes: u64) -> bool {
        self.matches(disk, kind, len_bytes, true)
    }

    fn matches<B>(&self, disk: usize, kind: &IoKind<B>, len_bytes: u64, stall: bool) -> bool {
        let (is_read, span) = match kind {
            IoKind::Read { offset_bytes, .. } => (true, Some((*offset_bytes, *offset_bytes + len_bytes))),
            IoKind::Write { offset_bytes, .. } | IoKind::WriteDurable { offset_bytes, .. } => {
                (false, Some((*offset_bytes, *offset_bytes + len_bytes)))
            }
            IoKind::Fsync => (false, None),
            IoKind::Discard {
                offset_bytes,
                len_bytes,
            } => (false, Some((*offset_bytes, *offset_bytes + *len_bytes))),
        };
        self.rules.iter().any(|rule| {
            let op_matches = match rule.op {
                FaultOp::Read => !stall && is_read,
                FaultOp::Write => !stall && !is_read,
                FaultOp::Any => !stall,
                FaultOp::Stall => stall,
            };
            let range_matches = match (rule.range, span) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some((start, end)), Some((first, last))) => first < end && start < last,
            };
            rule.disk == disk && op_matches && range_matches
        })
    }
}

/// The plan of a file, kept current by a thread that reads it again every
/// `RELOAD_INTERVAL` (a plan that does not parse is logged and ignored).
#[derive(Clone, Debug)]
pub struct FaultSource {
    plan: Arc<RwLock<FaultPlan>>,
}

impl FaultSource {
    /// Starts watching `path`.
    #[must_use]
    pub fn watch(path: &Path) -> Self {
        let plan = Arc::new(RwLock::new(FaultPlan::default()));
        let (shared, path): (_, PathBuf) = (Arc::downgrade(&plan), path.to_owned());
        let _ = std::thread::Builder::new()
            .name("fault-plan".into())
            .spawn(move || {
                let mut last_text = String::new();
                while let Some(plan) = shared.upgrade() {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if text != last_text {
                        match FaultPlan::parse(&text) {
                            Ok(parsed) => {
                                tracing::warn!(path = %path.display(), rules = parsed.rules.len(), "fault injection: new plan");
                                *plan.write().unwrap_or_else(std::sync::PoisonError::into_inner) = parsed;
                            }
                            Err(error) => tracing::error!(%error, "fault injection: plan ignored"),
                        }
                        last_text = text;
                    }
                    drop(plan);
                    std::thread::sleep(RELOAD_INTERVAL);
                }
            });
        Self { plan }
    }

    /// A source with a fixed plan (unit tests; `replace` changes it).
    #[must_use]
    pub fn fixed(plan: FaultPlan) -> Self {
        Self {
            plan: Arc::new(RwLock::new(plan)),
        }
    }

    /// Puts `plan` in force (what a rewrite of the watched file does).
    pub fn replace(&self, plan: FaultPlan) {
        *self.plan.write().unwrap_or_else(std::sync::PoisonError::into_inner) = plan;
    }

    fn plan(&self) -> std::sync::RwLockReadGuard<'_, FaultPlan> {
        self.plan.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How often an engine holding stalled requests looks at the plan again.
pub const STALL_POLL: Duration = Duration::from_millis(10);

/// An engine whose requests fail as the plan says.
pub struct FaultyEngine<B> {
    inner: Box<dyn IoEngine<B>>,
    source: FaultSource,
    /// The node's disk index of each file number.
    disks: Vec<usize>,
    failed: Vec<Completion<B>>,
    /// Requests a `stall` rule holds back, in the order they came.
    held: Vec<Submission<B>>,
}

/// A request's byte length (0 for a flush).
fn len_bytes<B: AsMut<[u8]>>(kind: &mut IoKind<B>) -> u64 {
    match kind {
        IoKind::Read { buf, .. } | IoKind::Write { buf, .. } | IoKind::WriteDurable { buf, .. } => {
            buf.as_mut().len() as u64
        }
        IoKind::Fsync => 0,
        IoKind::Discard { len_bytes, .. } => *len_bytes,
    }
}

impl<B: AsMut<[u8]> + Send> FaultyEngine<B> {
    /// Wraps `inner`; `disks[file]` is the node's index of file `file`.
    #[must_use]
    pub fn new(inner: Box<dyn IoEngine<B>>, source: FaultSource, disks: Vec<usize>) -> Self {
        Self {
            inner,
            source,
            disks,
            failed: Vec::new(),
            held: Vec::new(),
        }
    }

    fn disk_of(&self, submission: &Submission<B>) -> usize {
        self.disks.get(submission.file as usize).copied().unwrap_or(usize::MAX)
    }

    /// Sends on the held requests no rule stalls any more, in order.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        for mut submission in held {
            let disk = self.disk_of(&submission);
            let len = len_bytes(&mut submission.kind);
            // A disk's requests keep their order: one still held holds the rest of its disk.
            let behind = self.held.iter().any(|waiting| self.disk_of(waiting) == disk);
            if behind || self.source.plan().stalls(disk, &submission.kind, len) {
                self.held.push(submission);
            } else {
                self.inner.push(submission);
            }
        }
    }
}

impl<B: AsMut<[u8]> + Send> IoEngine<B> for FaultyEngine<B> {
    fn push(&mut self, mut submission: Submission<B>) {
        let disk = self.disk_of(&submission);
        let len_bytes = len_bytes(&mut submission.kind);
        let (fails, stalls) = {
            let plan = self.source.plan();
            (
                plan.fails(disk, &submission.kind, len_bytes),
                plan.stalls(disk, &submission.kind, len_bytes),
            )
        };
        if !fails && (stalls || self.held.iter().any(|waiting| self.disk_of(waiting) == disk)) {
            self.held.push(submission);
            return;
        }
        if !fails {
            self.inner.push(submission);
            return;
        }
        self.failed.push(Completion {
            user_data: submission.user_data,
            result: -libc::EIO,
            buf: submission.kind.into_buf(),
        });
    }

    fn submit_and_wait(&mut self, min_complete: usize, timeout: Option<Duration>) -> std::io::Result<()> {
        self.release_held();
        if self.failed.len() >= min_complete {
            return self.inner.submit_and_wait(0, Some(Duration::ZERO));
        }
        // Held requests complete only after the stall: wake up to look again.
        let timeout = if self.held.is_empty() {
            timeout
        } else {
            Some(timeout.map_or(STALL_POLL, |timeout| timeout.min(STALL_POLL)))
        };
        self.inner.submit_and_wait(min_complete - self.failed.len(), timeout)
    }

    fn drain(&mut self, out: &mut Vec<Completion<B>>) {
        self.inner.drain(out);
        out.append(&mut self.failed);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len() + self.held.len()
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.inner.waker()
    }

    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.notify_fd()
    }

    fn poll_fd(&mut self, fd: std::os::fd::RawFd, events: u32, token: u64) -> bool {
        self.inner.poll_fd(fd, events, token)
    }

    fn drain_polls(&mut self, out: &mut Vec<(u64, i32)>) {
        self.inner.drain_polls(out);
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_rules_and_name_the_bad_line() {
        let plan = FaultPlan::parse("# comment\nread 0 4096 8192\nwrite 1\n\nany 2 0 1 # trailing\n").unwrap();
        assert_eq!(
            plan.rules,
            vec![
                FaultRule {
                    op: FaultOp::Read,
                    disk: 0,
                    range: Some((4096, 8192))
                },
                FaultRule {
                    op: FaultOp::Write,
                    disk: 1,
                    range: None
                },
                FaultRule {
                    op: FaultOp::Any,
                    disk: 2,
                    range: Some((0, 1))
                },
            ]
        );
        for bad in [
            "erase 0",
            "read",
            "read x",
            "read 0 10",
            "read 0 10 5",
            "read 0 1 2 3",
            "stall",
        ] {
            let error = FaultPlan::parse(&format!("write 0\n{bad}\n")).unwrap_err();
            assert!(error.contains("line 2"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_rule_fails_overlapping_requests_of_its_disk_and_kind_only() {
        let plan = FaultPlan::parse("read 0 8192 12288\nwrite 1\n").unwrap();
        let read = |offset_bytes| IoKind::Read { offset_bytes, buf: () };
        let write = |offset_bytes| IoKind::Write { offset_bytes, buf: () };
        assert!(plan.fails(0, &read(8192), 4096));
        assert!(plan.fails(0, &read(4096), 8192), "overlaps the start");
        assert!(!plan.fails(0, &read(12288), 4096), "END is exclusive");
        assert!(!plan.fails(0, &write(8192), 4096), "reads only");
        assert!(!plan.fails(2, &read(8192), 4096), "another disk");
        assert!(plan.fails(1, &write(0), 4096));
        assert!(
            plan.fails::<()>(1, &IoKind::Fsync, 0),
            "a whole-disk write rule fails flushes"
        );
        assert!(!plan.fails::<()>(0, &IoKind::Fsync, 0));
    }

    #[test]
    fn a_stall_rule_holds_requests_of_its_disk_until_it_is_gone_and_fails_none() {
        let plan = FaultPlan::parse("stall 1\n").unwrap();
        let write = |offset_bytes| IoKind::Write { offset_bytes, buf: () };
        assert!(plan.stalls(1, &write(0), 4096));
        assert!(plan.stalls::<()>(1, &IoKind::Fsync, 0));
        assert!(!plan.fails(1, &write(0), 4096), "stalled, not failed");
        assert!(!plan.stalls(0, &write(0), 4096), "another disk");

        let dir = tempfile::tempdir().unwrap();
        let files = (0..2)
            .map(|index| {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(dir.path().join(format!("disk{index}")))
                    .unwrap();
                file.set_len(1 << 20).unwrap();
                file
            })
            .collect();
        let inner: Box<dyn IoEngine<Vec<u8>>> = Box::new(crate::pool::PoolEngine::new(files).unwrap());
        let source = FaultSource::fixed(plan);
        let mut engine = FaultyEngine::new(inner, source.clone(), vec![0, 1]);
        let submit = |engine: &mut FaultyEngine<Vec<u8>>, file: u32, user_data: u64, offset_bytes: u64| {
            engine.push(Submission {
                file,
                user_data,
                kind: IoKind::Write {
                    offset_bytes,
                    buf: vec![7; 4096],
                },
            });
        };
        submit(&mut engine, 1, 10, 0);
        submit(&mut engine, 1, 11, 4096);
        submit(&mut engine, 0, 20, 0);
        let mut done = Vec::new();
        // Bounded: the other disk's write completes, the stalled ones wait.
        for _ in 0..100 {
            engine.submit_and_wait(1, Some(Duration::from_millis(20))).unwrap();
            engine.drain(&mut done);
            if !done.is_empty() {
                break;
            }
        }
        let tokens: Vec<u64> = done.iter().map(|completion| completion.user_data).collect();
        assert_eq!(tokens, vec![20], "only the disk without a stall answers");
        engine.submit_and_wait(1, Some(Duration::from_millis(50))).unwrap();
        engine.drain(&mut done);
        assert_eq!(done.len(), 1, "the stalled writes still wait");
        assert_eq!(engine.in_flight(), 2, "held requests count as in flight");

        source.replace(FaultPlan::default());
        for _ in 0..100 {
            if done.len() == 3 {
                break;
            }
            // No timeout: a wait must not sleep past the end of the stall.
            engine.submit_and_wait(1, None).unwrap();
            engine.drain(&mut done);
        }
        let mut tokens: Vec<(u64, i32)> = done
            .iter()
            .map(|completion| (completion.user_data, completion.result))
            .collect();
        tokens.sort_unstable();
        assert_eq!(tokens, vec![(10, 4096), (11, 4096), (20, 4096)], "released, not failed");
    }
}
