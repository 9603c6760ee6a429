//! Backups and restores as jobs on the node that serves the volume: the
//! data is read from (or written to) the local copy, chunk by chunk, a few
//! chunks in flight, and the job's progress is kept for the API to report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::repo::{Lock, Manifest, Repo, RepoError, CHUNK_BYTES, FORMAT};
use crate::volume::Volume;

/// Chunks read, sealed and sent at once.
const CHUNKS_IN_FLIGHT: usize = 4;
/// While the volume's clients are busy each chunk waits this long before
/// it is read (with `CHUNKS_IN_FLIGHT`: at most 4 MiB/s against busy clients).
const BUSY_PAUSE: Duration = Duration::from_millis(250);
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

/// Which chunks `changed` touches, for a volume of `chunks` chunks.
#[must_use]
pub fn touched_chunks(changed: &[(u64, u64)], chunks: usize) -> Vec<bool> {
    let mut touched = vec![false; chunks];
    for (offset, len) in changed {
        if *len == 0 {
            continue;
        }
        let first = usize::try_from(offset / CHUNK_BYTES).unwrap_or(usize::MAX);
        let last = usize::try_from((offset + len - 1) / CHUNK_BYTES).unwrap_or(usize::MAX);
        for slot in touched.iter_mut().take(last.saturating_add(1)).skip(first) {
            *slot = true;
        }
    }
    touched
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
    let touched = touched_chunks(&plan.changed, chunks);
    let kept = plan.parent.as_ref().map(|parent| parent.chunks.clone());
    let mut pace = Pace::new(plan.mib_per_s);
    let size = plan.size_bytes;
    let mut results = futures::stream::iter(0..chunks)
        .map(|index| {
            let (repo, copy, live, clients) = (Arc::clone(&repo), Arc::clone(&copy), Arc::clone(&live), &clients);
            let unchanged = !touched[index];
            let from_parent = kept.as_ref().and_then(|k| k.get(index).cloned().flatten());
            async move {
                let offset = index as u64 * CHUNK_BYTES;
                let len = CHUNK_BYTES.min(size - offset);
                if unchanged {
                    return Ok::<_, String>((None, from_parent, 0, 0, len, false));
                }
                let yielded = clients.lock().busy(&live);
                if yielded {
                    tokio::time::sleep(BUSY_PAUSE).await;
                }
                let data = copy
                    .read(offset, len)
                    .await
                    .map_err(|error| format!("cannot read {} at {offset}: {error}", copy.name))?
                    .to_vec();
                if data.iter().all(|b| *b == 0) {
                    return Ok((None, None, len, 0, len, yielded));
                }
                let (id, sent) = blocking(move || repo.put_chunk(&data)).await?;
                Ok((Some(id), None, len, sent, len, yielded))
            }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let mut list = Vec::with_capacity(chunks);
    let (mut read_bytes, mut stored_bytes) = (0, 0);
    while let Some(result) = results.next().await {
        let (stored, parents, read, sent, len, yielded) = result?;
        list.push(stored.or(parents));
        read_bytes += read;
        stored_bytes += sent;
        job.update(|info| {
            info.yielded += u64::from(yielded);
            info.done_bytes += len;
            info.read_bytes = read_bytes;
            info.stored_bytes = stored_bytes;
        });
        pace.account(read).await;
        if list.len().is_multiple_of(256) {
            let lock = Arc::clone(&lock);
            blocking(move || lock.refresh()).await?;
        }
    }
    let mut manifest = Manifest {
        format: FORMAT,
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
    new.chunks
        .iter()
        .enumerate()
        .map(|(index, chunk)| old.chunks.get(index) != Some(chunk))
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
    let mut results = futures::stream::iter(manifest.chunks.iter().cloned().enumerate())
        .map(|(index, chunk)| {
            let wanted = wanted(index);
            let (repo, volume) = (Arc::clone(&repo), Arc::clone(&volume));
            async move {
                let offset = index as u64 * CHUNK_BYTES;
                let len = CHUNK_BYTES.min(size - offset);
                if !wanted {
                    return Ok((0, len));
                }
                let read = match chunk {
                    Some(id) => {
                        let data = blocking(move || repo.get_chunk(&id)).await?;
                        if data.len() as u64 != len {
                            return Err(format!(
                                "chunk {index} holds {} bytes, the backup says {len}",
                                data.len()
                            ));
                        }
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
    fn a_change_marks_every_chunk_it_touches_and_no_other() {
        let c = CHUNK_BYTES;
        let touched = touched_chunks(&[(0, 1), (c * 2 - 1, 2), (c * 5, c)], 7);
        assert_eq!(touched, vec![true, true, true, false, false, true, false]);
        assert!(touched_chunks(&[(c * 6, c * 9)], 7)[6], "clamped to the volume");
        assert!(touched_chunks(&[(c, 0)], 3).iter().all(|t| !t));
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
