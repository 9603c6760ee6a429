//! Backups and restores as jobs on the node that serves the volume: the
//! data is read from (or written to) the local copy, chunk by chunk, a few
//! chunks in flight, and the job's progress is kept for the API to report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::repo::{
    block_runs, Entry, Lock, Manifest, Patch, Repo, RepoError, CHUNK_BYTES, MANIFEST_FORMAT, PATCH_BLOCK,
};
use crate::volume::Volume;

/// Chunks read, sealed and sent at once.
const CHUNKS_IN_FLIGHT: usize = 4;
/// While the volume's clients are busy each chunk waits this long before
/// it is read (with `CHUNKS_IN_FLIGHT`: at most 4 MiB/s against busy clients).
const BUSY_PAUSE: Duration = Duration::from_millis(250);
/// A changed chunk is sent as a patch over its parent's chunk while the
/// blocks that differ from that base are at most this many (of 64): a
/// restore then reads at most 1.5x the chunk, and the target keeps at most
/// half a chunk more than the data.
const PATCH_MAX_BLOCKS: u32 = 32;
/// Finished jobs remembered for the API.
const FINISHED_KEPT: usize = 64;

/// A job as the API reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    /// `backup` or `restore`.
    pub kind: String,
    pub volume: String,
    /// The API address of the node running it (poll it there).
    pub node_api: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The backup made or restored.
    pub backup: String,
    /// The parent an incremental backup kept unchanged chunks of.
    pub parent: Option<String>,
    pub snapshot: String,
    /// Bytes of the volume to go through, and gone through.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes read from the volume (backup) or the target (restore).
    pub read_bytes: u64,
    /// Bytes sent to the target (after compression and deduplication).
    pub stored_bytes: u64,
    /// Chunks that waited for the volume's clients (a backup yields to them).
    #[serde(default)]
    pub yielded: u64,
    pub started_unix_seconds: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

/// One job's shared record.
pub struct Job {
    info: parking_lot::Mutex<JobInfo>,
    started: Instant,
}

impl Job {
    #[must_use]
    pub fn info(&self) -> JobInfo {
        let mut info = self.info.lock().clone();
        if info.state == "running" {
            info.seconds = self.started.elapsed().as_secs_f64();
        }
        info
    }

    fn update(&self, change: impl FnOnce(&mut JobInfo)) {
        change(&mut self.info.lock());
    }

    /// Ends the job with `outcome`.
    pub fn finish(&self, outcome: Result<(), String>) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.update(|info| {
            info.seconds = seconds;
            match outcome {
                Ok(()) => info.state = "done".into(),
                Err(error) => {
                    info.state = "failed".into();
                    info.error = Some(error);
                }
            }
        });
    }
}

/// The jobs of this node.
#[derive(Default)]
pub struct Jobs {
    jobs: parking_lot::Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    /// Registers a new running job described by `info` (its id is set here).
    pub fn start(&self, mut info: JobInfo) -> Arc<Job> {
        let mut jobs = self.jobs.lock();
        info.id = jobs.keys().next_back().map_or(1, |last| last + 1);
        info.state = "running".into();
        info.started_unix_seconds = crate::datadir::now_unix_seconds();
        let job = Arc::new(Job {
            info: parking_lot::Mutex::new(info.clone()),
            started: Instant::now(),
        });
        jobs.insert(info.id, Arc::clone(&job));
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, job)| job.info.lock().state != "running")
            .map(|(id, _)| *id)
            .collect();
        for id in finished.iter().take(finished.len().saturating_sub(FINISHED_KEPT)) {
            jobs.remove(id);
        }
        job
    }

    #[must_use]
    pub fn get(&self, id: u64) -> Option<JobInfo> {
        self.jobs.lock().get(&id).map(|job| job.info())
    }
}

/// Runs `work` on a blocking thread (target I/O, sealing).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RepoError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| format!("a backup worker ended: {error}"))?
        .map_err(|error| error.to_string())
}

/// Paces a job to `mib_per_s` (None: unbounded).
struct Pace {
    bytes_per_s: Option<f64>,
    started: Instant,
    bytes: u64,
}

impl Pace {
    fn new(mib_per_s: Option<u64>) -> Self {
        Self {
            bytes_per_s: mib_per_s.map(|mib| (mib * 1024 * 1024) as f64),
            started: Instant::now(),
            bytes: 0,
        }
    }

    async fn account(&mut self, bytes: u64) {
        self.bytes += bytes;
        if let Some(rate) = self.bytes_per_s {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// What a backup reads and keeps.
pub struct BackupPlan {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_id: u64,
    pub cluster_id: String,
    pub size_bytes: u64,
    /// The backup whose chunks are kept where `changed` says nothing changed.
    pub parent: Option<Manifest>,
    /// Byte ranges that differ from the parent's snapshot (or that hold
    /// data at all, with no parent), sorted.
    pub changed: Vec<(u64, u64)>,
    pub mib_per_s: Option<u64>,
}

/// The blocks of each chunk that `changed` touches (bit i: block i), for a
/// volume of `chunks` chunks; 0: the chunk is unchanged.
#[must_use]
pub fn touched_blocks(changed: &[(u64, u64)], chunks: usize) -> Vec<u64> {
    let mut touched = vec![0u64; chunks];
    let end_of_volume = chunks as u64 * CHUNK_BYTES;
    for (offset, len) in changed {
        let (mut at, end) = (*offset, offset.saturating_add(*len).min(end_of_volume));
        while at < end {
            let index = usize::try_from(at / CHUNK_BYTES).unwrap_or(usize::MAX);
            let chunk_end = (index as u64 + 1) * CHUNK_BYTES;
            let (first, last) = (
                (at % CHUNK_BYTES) / PATCH_BLOCK,
                ((end.min(chunk_end) - 1) % CHUNK_BYTES) / PATCH_BLOCK,
            );
            let bits = if last - first == 63 {
                u64::MAX
            } else {
                ((1u64 << (last - first + 1)) - 1) << first
            };
            touched[index] |= bits;
            at = chunk_end;
        }
    }
    touched
}

/// What one chunk of a backup became, and what it cost.
struct ChunkOutcome {
    entry: Entry,
    read: u64,
    sent: u64,
    yielded: bool,
}

/// Reads the byte `runs` of the chunk at `offset` from `copy`, in order.
async fn read_runs(copy: &Volume, offset: u64, runs: &[(u64, u64)]) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(usize::try_from(runs.iter().map(|(s, e)| e - s).sum::<u64>()).unwrap_or(0));
    for (start, end) in runs {
        let at = offset + start;
        let bytes = copy
            .read(at, end - start)
            .await
            .map_err(|error| format!("cannot read {} at {at}: {error}", copy.name))?;
        bytes.slices().for_each(|slice| data.extend_from_slice(slice));
    }
    Ok(data)
}

/// Backs up `copy` (the snapshot's local copy) into `repo` under `plan`;
/// the manifest is written last. While `live` (the volume itself) has
/// clients at work, each chunk first waits `BUSY_PAUSE`.
pub async fn run_backup(
    repo: Arc<Repo>,
    lock: Arc<Lock>,
    copy: Arc<Volume>,
    live: Arc<Volume>,
    plan: BackupPlan,
    job: &Job,
) -> Result<Manifest, String> {
    let clients = parking_lot::Mutex::new(crate::replication::resync::ClientActivity::new(&live));
    let chunks = usize::try_from(plan.size_bytes.div_ceil(CHUNK_BYTES)).map_err(|_| "volume too large")?;
    let touched = touched_blocks(&plan.changed, chunks);
    let mut pace = Pace::new(plan.mib_per_s);
    let size = plan.size_bytes;
    let parent = plan.parent.as_ref();
    let mut results = futures::stream::iter(0..chunks)
        .map(|index| {
            let (repo, copy, live, clients) = (Arc::clone(&repo), Arc::clone(&copy), Arc::clone(&live), &clients);
            let changed = touched[index];
            let before = parent.map(|p| p.entry(index));
            async move {
                let offset = index as u64 * CHUNK_BYTES;
                let len = CHUNK_BYTES.min(size - offset);
                if changed == 0 {
                    let entry = before.unwrap_or_default();
                    return Ok::<_, String>(ChunkOutcome {
                        entry,
                        read: 0,
                        sent: 0,
                        yielded: false,
                    });
                }
                let yielded = clients.lock().busy(&live);
                if yielded {
                    tokio::time::sleep(BUSY_PAUSE).await;
                }
                // Over a parent, few changed blocks go as a patch on its base.
                if let Some(before) = before {
                    let blocks = changed | before.patch.as_ref().map_or(0, |p| p.blocks);
                    if blocks.count_ones() <= PATCH_MAX_BLOCKS {
                        let data = read_runs(&copy, offset, &block_runs(blocks, len)).await?;
                        let read = data.len() as u64;
                        if before.base.is_none() && data.iter().all(|b| *b == 0) {
                            return Ok(ChunkOutcome {
                                entry: Entry::default(),
                                read,
                                sent: 0,
                                yielded,
                            });
                        }
                        let (id, sent) = blocking(move || repo.put_chunk(&data)).await?;
                        let chunk = u32::try_from(index).map_err(|_| "volume too large")?;
                        let entry = Entry {
                            base: before.base,
                            patch: Some(Patch { chunk, blocks, id }),
                        };
                        return Ok(ChunkOutcome {
                            entry,
                            read,
                            sent,
                            yielded,
                        });
                    }
                }
                let data = read_runs(&copy, offset, &[(0, len)]).await?;
                if data.iter().all(|b| *b == 0) {
                    return Ok(ChunkOutcome {
                        entry: Entry::default(),
                        read: len,
                        sent: 0,
                        yielded,
                    });
                }
                let (id, sent) = blocking(move || repo.put_chunk(&data)).await?;
                Ok(ChunkOutcome {
                    entry: Entry {
                        base: Some(id),
                        patch: None,
                    },
                    read: len,
                    sent,
                    yielded,
                })
            }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let (mut list, mut patches) = (Vec::with_capacity(chunks), Vec::new());
    let (mut read_bytes, mut stored_bytes) = (0, 0);
    while let Some(result) = results.next().await {
        let outcome = result?;
        let len = CHUNK_BYTES.min(size - list.len() as u64 * CHUNK_BYTES);
        list.push(outcome.entry.base);
        patches.extend(outcome.entry.patch);
        read_bytes += outcome.read;
        stored_bytes += outcome.sent;
        job.update(|info| {
            info.yielded += u64::from(outcome.yielded);
            info.done_bytes += len;
            info.read_bytes = read_bytes;
            info.stored_bytes = stored_bytes;
        });
        pace.account(outcome.read).await;
        if list.len().is_multiple_of(256) {
            let lock = Arc::clone(&lock);
            blocking(move || lock.refresh()).await?;
        }
    }
    drop(results);
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: plan.id,
        volume: plan.volume,
        size_bytes: plan.size_bytes,
        snapshot: plan.snapshot,
        snapshot_id: plan.snapshot_id,
        cluster_id: plan.cluster_id,
        created_unix_seconds: crate::datadir::now_unix_seconds(),
        parent: plan.parent.map(|parent| parent.id),
        chunk_bytes: CHUNK_BYTES,
        chunks: list,
        patches,
        read_bytes,
        stored_bytes,
        mac: String::new(),
    };
    let written = {
        let (repo, mut manifest) = (Arc::clone(&repo), manifest.clone());
        blocking(move || repo.put_manifest(&mut manifest).map(|()| manifest)).await?
    };
    manifest.mac = written.mac;
    Ok(manifest)
}

/// The chunks of `new` that differ from `old` (a standby's next backup
/// over the one it holds): only those are written.
#[must_use]
pub fn changed_chunks(old: &Manifest, new: &Manifest) -> Vec<bool> {
    (0..new.chunks.len())
        .map(|index| index >= old.chunks.len() || old.entry(index) != new.entry(index))
        .collect()
}

/// Writes backup `manifest` into `volume` (served here, no client on it):
/// every chunk, or those `only` marks.
pub async fn run_restore(
    repo: Arc<Repo>,
    lock: Arc<Lock>,
    volume: Arc<Volume>,
    manifest: &Manifest,
    only: Option<&[bool]>,
    mib_per_s: Option<u64>,
    job: &Job,
) -> Result<(), String> {
    let size = manifest.size_bytes;
    let mut pace = Pace::new(mib_per_s);
    let wanted = |index: usize| only.is_none_or(|only| only.get(index).copied().unwrap_or(true));
    let mut results = futures::stream::iter(0..manifest.chunks.len())
        .map(|index| {
            let (wanted, entry) = (wanted(index), manifest.entry(index));
            let (repo, volume) = (Arc::clone(&repo), Arc::clone(&volume));
            async move {
                let offset = index as u64 * CHUNK_BYTES;
                let len = CHUNK_BYTES.min(size - offset);
                if !wanted {
                    return Ok((0, len));
                }
                let data = if entry.is_zeros() {
                    None
                } else {
                    blocking(move || repo.chunk_data(&entry, len)).await?
                };
                let read = match data {
                    Some(data) => {
                        volume
                            .write(offset, data)
                            .await
                            .map_err(|error| format!("cannot write {} at {offset}: {error}", volume.name))?;
                        len
                    }
                    None => {
                        volume
                            .write_zeroes(offset, len, false)
                            .await
                            .map_err(|error| format!("cannot zero {} at {offset}: {error}", volume.name))?;
                        0
                    }
                };
                Ok::<_, String>((read, len))
            }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let mut done = 0usize;
    while let Some(result) = results.next().await {
        let (read, len) = result?;
        job.update(|info| {
            info.done_bytes += len;
            info.read_bytes += read;
        });
        pace.account(read).await;
        done += 1;
        if done.is_multiple_of(256) {
            let lock = Arc::clone(&lock);
            blocking(move || lock.refresh()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_marks_every_block_it_touches_and_no_other() {
        let (c, b) = (CHUNK_BYTES, PATCH_BLOCK);
        let touched = touched_blocks(&[(0, 1), (c * 2 - 1, 2), (c * 5, c), (c * 3 + b * 2, b * 3)], 7);
        assert_eq!(touched, vec![1, 1 << 63, 1, 0b11100, 0, u64::MAX, 0]);
        assert_eq!(
            touched_blocks(&[(c * 6 + b, c * 9)], 7)[6],
            u64::MAX - 1,
            "clamped to the volume"
        );
        assert!(touched_blocks(&[(c, 0)], 3).iter().all(|t| *t == 0));
        assert_eq!(block_runs(0b1101, c), vec![(0, b), (b * 2, b * 4)]);
        assert_eq!(
            block_runs(u64::MAX, b * 3 + 5),
            vec![(0, b * 3 + 5)],
            "a short last chunk"
        );
    }

    #[test]
    fn jobs_get_rising_ids_and_keep_their_outcome() {
        let jobs = Jobs::default();
        let one = jobs.start(JobInfo::default());
        let two = jobs.start(JobInfo::default());
        two.finish(Err("target full".into()));
        one.finish(Ok(()));
        assert_eq!(jobs.get(1).unwrap().state, "done");
        let failed = jobs.get(2).unwrap();
        assert_eq!(
            (failed.state.as_str(), failed.error.as_deref()),
            ("failed", Some("target full"))
        );
        assert!(jobs.get(3).is_none());
    }
}
