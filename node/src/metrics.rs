//! Prometheus metrics: `GET /metrics` on the API port, in the OpenMetrics
//! text format (prometheus-client). Counters on the I/O path are plain
//! atomics (`IoStats`); everything is read at scrape time by one
//! `Collector`, so an idle node does no metrics work.
//!
//! Names follow Prometheus conventions: units in the name, counters end in
//! `_total`. Labels are bounded: `volume` (at most `VOLUMES_MAX` per
//! node), `op` (a fixed set), `disk` (the enrolled disks), `replica` (a
//! volume's replica nodes).
//!
//! Per volume, every node exports what it serves (requests, bytes,
//! latency, queue depth) and what it holds (size, used). The volume's
//! coordinator exports its replication view (in-sync count, resync bytes
//! remaining, round trips to replicas). The Raft leader exports the
//! cluster-wide counts (nodes up/down, volumes by health) so a dashboard
//! sums nothing twice.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

use crate::cluster::status::ClusterStatus;
use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::volume::Volumes;

/// Upper bounds of the latency buckets, in seconds (+Inf follows).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Kinds of client request, as the `op` label says them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    /// BLOCK_STATUS, CACHE.
    Other,
}

impl Op {
    pub const ALL: [Op; 6] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::Other];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Count, bytes, errors and a latency histogram of one kind of request.
#[derive(Default)]
pub struct OpStats {
    count: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
    /// One per bound of `LATENCY_BUCKETS_SECONDS`, then +Inf (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
    /// Fine-grained latencies for percentiles (`GET /v1/volumes/{name}/latency`).
    latency: LatencyHistogram,
}

/// Longest latency the percentiles tell apart (longer ones count as this).
pub const LATENCY_MICROS_MAX: u64 = 60_000_000;

/// An hdrhistogram of request latencies in microseconds, 2 significant
/// digits (1 % resolution, about 20 KB, allocated at the first request):
/// the server-side view to set beside a client's (fio's clat). Cumulative
/// until reset.
#[derive(Default)]
pub struct LatencyHistogram(parking_lot::Mutex<Option<hdrhistogram::Histogram<u64>>>);

/// Percentiles of one kind of request, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyPercentiles {
    pub op: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    pub max_us: u64,
}

impl LatencyHistogram {
    fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut histogram = self.0.lock();
        histogram
            .get_or_insert_with(|| {
                hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, 2).expect("valid bounds")
            })
            .saturating_record(micros);
    }

    /// Percentiles so far (`None` before the first request).
    fn percentiles(&self, op: Op) -> Option<LatencyPercentiles> {
        let histogram = self.0.lock();
        let histogram = histogram.as_ref().filter(|h| !h.is_empty())?;
        Some(LatencyPercentiles {
            op: op.label().to_owned(),
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.5),
            p90_us: histogram.value_at_quantile(0.9),
            p99_us: histogram.value_at_quantile(0.99),
            p99_9_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }

    fn reset(&self) {
        if let Some(histogram) = self.0.lock().as_mut() {
            histogram.reset();
        }
    }
}

impl OpStats {
    /// Records one request that moved `bytes` and took `elapsed`.
    pub fn record(&self, bytes: u64, elapsed: Duration, ok: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency.record(elapsed);
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// (sum in seconds, count, per-bucket counts with +Inf as f64::MAX).
    fn histogram(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' sum, so the histogram is consistent even mid-update.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let seconds = Duration::from_nanos(self.nanos.load(Ordering::Relaxed)).as_secs_f64();
        (seconds, count, buckets)
    }
}

/// What one volume's clients asked of this node.
#[derive(Default)]
pub struct IoStats {
    ops: [OpStats; Op::ALL.len()],
    in_flight: AtomicI64,
    /// Requests begun, ever (background work compares it over time).
    begun: std::sync::atomic::AtomicU64,
    /// Reads refused: the serving lease could not be confirmed in time.
    pub lease_refusals: std::sync::atomic::AtomicU64,
    /// Requests held back by the volume's limits, and for how long in all.
    throttled: std::sync::atomic::AtomicU64,
    throttled_nanos: std::sync::atomic::AtomicU64,
}

/// A request counted in the queue depth until dropped.
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IoStats {
    /// Counts a request as in flight until the guard drops.
    pub fn begin(&self) -> InFlight<'_> {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    #[must_use]
    pub fn op(&self, op: Op) -> &OpStats {
        &self.ops[op.index()]
    }

    /// Counts a request the volume's limits held back for `wait`.
    pub fn throttled(&self, wait: Duration) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.throttled_nanos
            .fetch_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Requests held back by the volume's limits, and the seconds they waited.
    #[must_use]
    pub fn throttled_total(&self) -> (u64, f64) {
        (
            self.throttled.load(Ordering::Relaxed),
            Duration::from_nanos(self.throttled_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        )
    }

    #[must_use]
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests begun since the volume was opened.
    #[must_use]
    pub fn begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// Latency percentiles of every kind of request served since the last
    /// reset (kinds never served are left out).
    #[must_use]
    pub fn latency(&self) -> Vec<LatencyPercentiles> {
        Op::ALL
            .iter()
            .filter_map(|op| self.op(*op).latency.percentiles(*op))
            .collect()
    }

    /// Starts the latency percentiles afresh (counters and the Prometheus
    /// histogram are cumulative and stay).
    pub fn reset_latency(&self) {
        for op in Op::ALL {
            self.op(op).latency.reset();
        }
    }
}

/// Everything `/metrics` reports, read at scrape time.
pub struct NodeMetrics {
    pub volumes: Arc<Volumes>,
    pub cluster: Arc<Cluster>,
    pub engine: Arc<Engine>,
    /// The cluster as this node saw it just before the scrape (async to get).
    pub status: ClusterStatus,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

/// Renders the metrics in the OpenMetrics text format.
pub fn render(metrics: NodeMetrics) -> Result<String, std::fmt::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(metrics));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The content type of `render`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type Samples = Vec<(Labels, i64)>;

fn gauges<V: Copy + prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync + 'static>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> std::fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, value)] = samples {
        if labels.is_empty() {
            return ConstGauge::new(*value).encode(metric);
        }
    }
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn counters<V: Copy + prometheus_client::encoding::EncodeCounterValue + std::fmt::Debug + Send + Sync + 'static>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, &OpStats)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, stats) in samples {
        let (sum, count, buckets) = stats.histogram();
        metric
            .encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for NodeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_volumes(&mut encoder)?;
        self.encode_replication(&mut encoder)?;
        self.encode_disks(&mut encoder)?;
        self.encode_cluster(&mut encoder)?;
        encode_process(&mut encoder)
    }
}

impl NodeMetrics {
    fn encode_volumes(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let live = self.volumes.live_volumes();
        let per_op = |pick: &dyn Fn(&OpStats) -> u64| -> Vec<(Labels, u64)> {
            live.iter()
                .flat_map(|volume| {
                    Op::ALL.iter().map(move |op| {
                        (
                            vec![("volume", volume.name.clone()), ("op", op.label().to_owned())],
                            pick(volume.stats.op(*op)),
                        )
                    })
                })
                .collect()
        };
        counters(
            encoder,
            "ballast_volume_requests",
            "Client requests served for the volume on this node, by kind.",
            &per_op(&|stats| stats.count.load(Ordering::Relaxed)),
        )?;
        counters(
            encoder,
            "ballast_volume_io_bytes",
            "Bytes read, written, trimmed or zeroed by clients of the volume on this node.",
            &per_op(&|stats| stats.bytes.load(Ordering::Relaxed)),
        )?;
        counters(
            encoder,
            "ballast_volume_errors",
            "Client requests that ended in an error, by kind.",
            &per_op(&|stats| stats.errors.load(Ordering::Relaxed)),
        )?;
        let latency: Vec<(Labels, &OpStats)> = live
            .iter()
            .flat_map(|volume| {
                [Op::Read, Op::Write, Op::Flush].into_iter().map(move |op| {
                    (
                        vec![("volume", volume.name.clone()), ("op", op.label().to_owned())],
                        volume.stats.op(op),
                    )
                })
            })
            .collect();
        histograms(
            encoder,
            "ballast_volume_request_duration_seconds",
            "Time from a client request's arrival to its answer, on this node.",
            &latency,
        )?;
        let labels = |volume: &crate::volume::Volume| vec![("volume", volume.name.clone())];
        gauges(
            encoder,
            "ballast_volume_queue_depth",
            "Client requests in flight on the volume on this node.",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.stats.in_flight()))
                .collect::<Vec<_>>(),
        )?;
        counters(
            encoder,
            "ballast_volume_throttled_requests",
            "Client requests the volume's I/O limits held back on this node (volume update --iops-limit / --mib-per-s-limit).",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.stats.throttled_total().0))
                .collect::<Vec<_>>(),
        )?;
        counters(
            encoder,
            "ballast_volume_throttled_seconds",
            "Seconds client requests of the volume waited for its I/O limits on this node, in all.",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.stats.throttled_total().1))
                .collect::<Vec<_>>(),
        )?;
        counters(
            encoder,
            "ballast_volume_queue_wait_seconds",
            "Seconds client requests of the volume waited in its disk's scheduler on this node (behind other volumes and background work), in all.",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.queue_wait().0))
                .collect::<Vec<_>>(),
        )?;
        counters(
            encoder,
            "ballast_volume_scheduled_requests",
            "Client requests of the volume its disk's scheduler handed to the store on this node (ballast_volume_queue_wait_seconds over this is the mean wait).",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.queue_wait().1))
                .collect::<Vec<_>>(),
        )?;
        counters(
            encoder,
            "ballast_volume_lease_refused_reads",
            "Client reads of a replicated volume refused because this node could not confirm with the Raft leader, within the wait, that it still serves the volume.",
            &live
                .iter()
                .map(|volume| (labels(volume), volume.stats.lease_refusals.load(Ordering::Relaxed)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            encoder,
            "ballast_volume_size_bytes",
            "Size of the volume.",
            &live
                .iter()
                .map(|volume| (labels(volume), i64_of(volume.size_bytes())))
                .collect::<Vec<_>>(),
        )?;
        let used: Vec<(Labels, i64)> = live
            .iter()
            .map(|volume| (labels(volume), i64_of(self.volumes.used_bytes(volume))))
            .collect();
        gauges(
            encoder,
            "ballast_volume_used_bytes",
            "Bytes of the volume's local replica that hold data (thin provisioning).",
            &used,
        )?;
        gauges(
            encoder,
            "ballast_volume_served",
            "1 if this node serves the volume to clients (is its coordinator).",
            &live
                .iter()
                .map(|volume| (labels(volume), i64::from(volume.is_served())))
                .collect::<Vec<_>>(),
        )
    }

    fn encode_replication(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let local = self.cluster.local.id;
        let coordinated: Vec<&crate::cluster::status::VolumeView> = self
            .status
            .volumes
            .iter()
            .filter(|volume| volume.coordinator == local)
            .collect();
        let labels = |name: &str| vec![("volume", name.to_owned())];
        gauges(
            encoder,
            "ballast_volume_replicas_wanted",
            "Copies wanted of the volume (exported by its coordinator).",
            &coordinated
                .iter()
                .map(|v| (labels(&v.name), i64::from(v.replicas)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            encoder,
            "ballast_volume_replicas_in_sync",
            "Replicas holding every acknowledged write (exported by the coordinator).",
            &coordinated
                .iter()
                .map(|v| (labels(&v.name), i64_of(v.in_sync.len() as u64)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            encoder,
            "ballast_volume_epoch",
            "Fencing epoch of the volume (exported by the coordinator).",
            &coordinated
                .iter()
                .map(|v| (labels(&v.name), i64_of(v.epoch)))
                .collect::<Vec<_>>(),
        )?;
        let mut remaining = Vec::new();
        let mut resynced = Vec::new();
        for volume in &coordinated {
            let resyncs = self.cluster.resyncs_of(&volume.name);
            for node in volume.replica_nodes.iter().filter(|node| **node != local) {
                let replica = vec![("volume", volume.name.clone()), ("replica", node.to_string())];
                let (left, moved) = resyncs.iter().find(|r| r.node == *node).map_or((0, 0), |resync| {
                    (resync.remaining_bytes(), resync.copied_bytes + resync.zeroed_bytes)
                });
                remaining.push((replica.clone(), i64_of(left)));
                resynced.push((replica, moved));
            }
        }
        gauges(
            encoder,
            "ballast_volume_resync_remaining_bytes",
            "Bytes a running resync of the replica still has to look at (0 when none runs).",
            &remaining,
        )?;
        counters(
            encoder,
            "ballast_volume_resync_bytes",
            "Bytes the last resync of the replica copied or zeroed.",
            &resynced,
        )?;
        let totals = &self.cluster.scrubs.totals;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, value) in [
            (
                "ballast_scrub_passes",
                "Scrub passes this node started as coordinator (verify and compare).",
                load(&totals.passes),
            ),
            (
                "ballast_scrub_verified_bytes",
                "Data a verifying scrub read and checked on this node's copies.",
                load(&totals.verified_bytes),
            ),
            (
                "ballast_scrub_checksum_errors",
                "Blocks a scrub found failing their checksum or unreadable, on any copy.",
                load(&totals.checksum_errors),
            ),
            (
                "ballast_scrub_divergent_blocks",
                "Blocks a scrub found a replica holding differently from the coordinator.",
                load(&totals.divergent_blocks),
            ),
            (
                "ballast_scrub_repaired_blocks",
                "Blocks a scrub rewrote from a good copy.",
                load(&totals.repaired_blocks),
            ),
            (
                "ballast_scrub_unrepairable_blocks",
                "Bad blocks no copy could repair (reads of them fail until rewritten).",
                load(&totals.unrepairable_blocks),
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        let round_trips: Vec<(Labels, Arc<crate::replication::VolumeReplication>)> = coordinated
            .iter()
            .filter_map(|v| self.cluster.replication(&v.name).map(|r| (labels(&v.name), r)))
            .collect();
        let samples: Vec<(Labels, &OpStats)> = round_trips
            .iter()
            .map(|(labels, replication)| (labels.clone(), replication.round_trips()))
            .collect();
        histograms(
            encoder,
            "ballast_volume_replication_duration_seconds",
            "Time for a mutation to be durable on every other in-sync replica (the replication lag of a write).",
            &samples,
        )
    }

    fn encode_disks(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut capacity = Vec::new();
        let mut used = Vec::new();
        let mut free_segments = Vec::new();
        let mut amplification = Vec::new();
        let mut user = Vec::new();
        let mut relocated = Vec::new();
        let mut resequenced = Vec::new();
        let mut background_reads = Vec::new();
        let mut cleaned = Vec::new();
        let mut checksum = Vec::new();
        let mut flushes = Vec::new();
        let mut discarded = Vec::new();
        let mut discard_failures = Vec::new();
        let mut checkpoints_refused = Vec::new();
        let (mut class_requests, mut class_bytes, mut class_wait) = (Vec::new(), Vec::new(), Vec::new());
        for (index, disk) in self.engine.disks().iter().enumerate() {
            if let Some(sched) = self.engine.sched_stats(index) {
                for class in crate::engine::IoClass::ALL {
                    let labels = vec![
                        ("disk", disk.path.display().to_string()),
                        ("class", class.as_str().to_owned()),
                    ];
                    let at = class.index();
                    class_requests.push((labels.clone(), sched.requests[at].load(Ordering::Relaxed)));
                    class_bytes.push((labels.clone(), sched.bytes[at].load(Ordering::Relaxed)));
                    let wait = Duration::from_nanos(sched.wait_ns[at].load(Ordering::Relaxed));
                    class_wait.push((labels, wait.as_secs_f64()));
                }
            }
            let Ok((space, stats)) = self.engine.query(index, |store| (store.space(), store.stats())) else {
                continue;
            };
            let labels = vec![("disk", disk.path.display().to_string())];
            capacity.push((labels.clone(), i64_of(space.capacity_blocks * 4096)));
            used.push((labels.clone(), i64_of(space.used_blocks * 4096)));
            free_segments.push((labels.clone(), i64::from(space.free_segments)));
            amplification.push((labels.clone(), stats.write_amplification()));
            user.push((labels.clone(), stats.user_blocks_written * 4096));
            relocated.push((labels.clone(), stats.relocated_blocks_written * 4096));
            resequenced.push((labels.clone(), stats.resequenced_blocks_written * 4096));
            background_reads.push((labels.clone(), stats.background_resequence_reads));
            cleaned.push((labels.clone(), stats.segments_cleaned));
            checksum.push((labels.clone(), stats.checksum_errors));
            discarded.push((labels.clone(), stats.discarded_bytes));
            discard_failures.push((labels.clone(), stats.discard_failures));
            checkpoints_refused.push((labels.clone(), stats.checkpoints_refused));
            flushes.push((labels, stats.flushes));
        }
        counters(
            encoder,
            "ballast_disk_class_requests",
            "Requests the disk's scheduler handed to the store, by class (high, medium, low: clients by their volume's priority; resync, scrub, drain, backup: background work).",
            &class_requests,
        )?;
        counters(
            encoder,
            "ballast_disk_class_bytes",
            "Data bytes the disk's scheduler handed to the store, by class: each class's share of the disk.",
            &class_bytes,
        )?;
        counters(
            encoder,
            "ballast_disk_class_queue_wait_seconds",
            "Seconds requests waited in the disk's scheduler, by class, in all.",
            &class_wait,
        )?;
        gauges(
            encoder,
            "ballast_disk_capacity_bytes",
            "Bytes of user data the disk may hold.",
            &capacity,
        )?;
        gauges(
            encoder,
            "ballast_disk_used_bytes",
            "Bytes of live data on the disk.",
            &used,
        )?;
        gauges(
            encoder,
            "ballast_disk_free_segments",
            "Log segments free for writing.",
            &free_segments,
        )?;
        gauges(
            encoder,
            "ballast_disk_write_amplification_ratio",
            "Blocks written to the device per block of user data since the node started.",
            &amplification,
        )?;
        counters(
            encoder,
            "ballast_disk_user_written_bytes",
            "User data written to the disk.",
            &user,
        )?;
        counters(
            encoder,
            "ballast_disk_cleaner_relocated_bytes",
            "Live data the cleaner moved to free segments.",
            &relocated,
        )?;
        counters(
            encoder,
            "ballast_disk_resequenced_bytes",
            "Data of large reads that lay scattered, written back in order so the next read of it is sequential.",
            &resequenced,
        )?;
        counters(
            encoder,
            "ballast_disk_background_resequence_reads",
            "Reads the idle disk made of scattered ranges that clients had read in large pieces, to write them back in order.",
            &background_reads,
        )?;
        counters(
            encoder,
            "ballast_disk_cleaner_segments",
            "Segments the cleaner freed.",
            &cleaned,
        )?;
        counters(
            encoder,
            "ballast_disk_discarded_bytes",
            "Freed disk space the device was told to discard (TRIM), so an SSD stops keeping dead data.",
            &discarded,
        )?;
        counters(
            encoder,
            "ballast_disk_discard_failures",
            "Discards the device failed or refused (a refusal turns discards off for the disk until it is opened again).",
            &discard_failures,
        )?;
        counters(
            encoder,
            "ballast_disk_checkpoints_refused",
            "Checkpoints not written because the volumes' maps outgrew the disk's checkpoint area (then clones are refused until volumes or snapshots are deleted); should stay 0.",
            &checkpoints_refused,
        )?;
        counters(
            encoder,
            "ballast_disk_checksum_errors",
            "Blocks read back whose checksum did not match.",
            &checksum,
        )?;
        counters(
            encoder,
            "ballast_disk_flushes",
            "Cache flushes sent to the disk.",
            &flushes,
        )?;
        let metric = encoder.encode_descriptor(
            "ballast_reactor_handoffs",
            "Requests served on one reactor (a FUSE io_uring queue) for a disk another reactor owns.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.engine.handoffs()).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "ballast_reactor_guests_hosted",
            "Connections (NBD, peer) and FUSE io_uring queues handed to the reactors to serve.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.engine.guests_hosted()).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "ballast_reactor_sockets_moved",
            "Connections that left the runtime's epoll for the ring of the reactor serving them.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::engine::socket::sockets_moved()).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "ballast_reactor_socket_polls",
            "Waits for a socket to be ready armed on a reactor's ring (each one without the runtime's I/O thread).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::engine::socket::polls_armed()).encode(metric)
    }

    fn encode_cluster(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let status = &self.status;
        let none: Labels = Vec::new();
        gauges(
            encoder,
            "ballast_raft_term",
            "Current Raft term.",
            &[(none.clone(), i64_of(status.term))],
        )?;
        gauges(
            encoder,
            "ballast_raft_leader_id",
            "Node id of the Raft leader this node knows (0: none).",
            &[(none.clone(), i64_of(status.leader.unwrap_or(0)))],
        )?;
        let is_leader = status.leader == Some(status.this_node);
        gauges(
            encoder,
            "ballast_raft_is_leader",
            "1 if this node is the Raft leader.",
            &[(none.clone(), i64::from(is_leader))],
        )?;
        let metrics = self.cluster.raft.metrics().borrow().clone();
        gauges(
            encoder,
            "ballast_raft_last_log_index",
            "Index of the last Raft log entry on this node.",
            &[(none.clone(), i64_of(metrics.last_log_index.unwrap_or(0)))],
        )?;
        gauges(
            encoder,
            "ballast_raft_applied_index",
            "Index of the last Raft entry applied on this node.",
            &[(none.clone(), i64_of(status.last_applied_index))],
        )?;
        let links: Samples = self
            .cluster
            .links()
            .into_iter()
            .map(|(peer, reactor)| {
                let reactor = reactor.map_or_else(|| "none".to_owned(), |reactor| reactor.to_string());
                (vec![("peer", peer), ("reactor", reactor)], 1)
            })
            .collect();
        gauges(
            encoder,
            "ballast_peer_links",
            "Data-path connections this node made to a peer, one per peer and reactor whose volumes replicate there (reactor \"none\": volumes no reactor runs).",
            &links,
        )?;
        // Cluster-wide counts come from the leader only (no double counting).
        let (nodes, volumes): (Samples, Samples) = if is_leader {
            let up = status.nodes.iter().filter(|node| node.up).count();
            let nodes = vec![
                (vec![("state", "up".to_owned())], i64_of(up as u64)),
                (
                    vec![("state", "down".to_owned())],
                    i64_of((status.nodes.len() - up) as u64),
                ),
            ];
            let volumes = ["healthy", "degraded", "unavailable"]
                .iter()
                .map(|health| {
                    let count = status.volumes.iter().filter(|v| v.health == *health).count();
                    (vec![("health", (*health).to_owned())], i64_of(count as u64))
                })
                .collect();
            (nodes, volumes)
        } else {
            (Vec::new(), Vec::new())
        };
        gauges(
            encoder,
            "ballast_cluster_nodes",
            "Cluster members by liveness (exported by the Raft leader).",
            &nodes,
        )?;
        gauges(
            encoder,
            "ballast_cluster_volumes",
            "Volumes by health: healthy, degraded (a replica out of sync or down), unavailable (coordinator down); exported by the Raft leader.",
            &volumes,
        )
    }
}

/// Standard process metrics from /proc/self.
fn encode_process(encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let none: Labels = Vec::new();
    let process = ProcessStats::read();
    gauges(
        encoder,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        &[(none.clone(), i64_of(process.resident_bytes))],
    )?;
    gauges(
        encoder,
        "process_open_fds",
        "Number of open file descriptors.",
        &[(none.clone(), i64_of(process.open_fds))],
    )?;
    gauges(
        encoder,
        "process_threads",
        "Number of OS threads in the process.",
        &[(none.clone(), i64_of(process.threads))],
    )?;
    let cpu = encoder.encode_descriptor(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds.",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(process.cpu_seconds).encode(cpu)?;
    gauges(
        encoder,
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        &[(none.clone(), i64_of(process.start_unix_seconds))],
    )?;
    // A gauge of 1 by convention (Prometheus's classic text parser has no info type).
    gauges(
        encoder,
        "ballast_build_info",
        "The ballast version this node runs (always 1).",
        &[(
            vec![("version", crate::peer::handshake::local().version.clone())],
            1_i64,
        )],
    )
}

fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What /proc says of this process.
#[derive(Debug, Default)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
    pub cpu_seconds: f64,
    pub start_unix_seconds: u64,
}

impl ProcessStats {
    /// Reads /proc/self (zeroes for what cannot be read).
    #[must_use]
    pub fn read() -> Self {
        let mut stats = Self::default();
        let page = page_bytes();
        let ticks = clock_ticks();
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(resident) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()) {
                stats.resident_bytes = resident * page;
            }
        }
        stats.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces) start at 3.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let (utime, stime) = (field(14), field(15));
                stats.cpu_seconds = (utime + stime) as f64 / ticks as f64;
                stats.threads = field(20);
                let start_ticks = field(22);
                stats.start_unix_seconds = boot_time_seconds() + start_ticks / ticks;
            }
        }
        stats
    }
}

fn sysconf(variable: nix::unistd::SysconfVar, default: u64) -> u64 {
    nix::unistd::sysconf(variable)
        .ok()
        .flatten()
        .and_then(|value| u64::try_from(value).ok())
        .filter(|value| *value > 0)
        .unwrap_or(default)
}

fn page_bytes() -> u64 {
    sysconf(nix::unistd::SysconfVar::PAGE_SIZE, 4096)
}

fn clock_ticks() -> u64 {
    sysconf(nix::unistd::SysconfVar::CLK_TCK, 100)
}

fn boot_time_seconds() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|line| line.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_bucket_and_the_histogram_counts_them_all() {
        let stats = OpStats::default();
        stats.record(4096, Duration::from_micros(30), true);
        stats.record(4096, Duration::from_micros(700), true);
        stats.record(0, Duration::from_secs(30), false);
        let (sum, count, buckets) = stats.histogram();
        assert_eq!(count, 3);
        assert!((sum - 30.00073).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.000_05, 1));
        assert_eq!(buckets[4], (0.001, 1));
        assert_eq!(buckets.last().copied(), Some((f64::MAX, 1)));
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 8192);
    }

    #[test]
    fn the_queue_depth_counts_requests_until_their_guard_drops() {
        let stats = IoStats::default();
        let first = stats.begin();
        let second = stats.begin();
        assert_eq!(stats.in_flight(), 2);
        drop(first);
        assert_eq!(stats.in_flight(), 1);
        drop(second);
        assert_eq!(stats.in_flight(), 0);
    }

    #[test]
    fn latency_percentiles_come_from_every_request_since_the_reset() {
        let stats = IoStats::default();
        assert!(stats.latency().is_empty(), "no request, no percentiles");
        for micros in 1..=1000 {
            stats.op(Op::Write).record(4096, Duration::from_micros(micros), true);
        }
        stats.op(Op::Read).record(4096, Duration::from_secs(600), true);
        let latency = stats.latency();
        assert_eq!(latency.len(), 2, "{latency:?}");
        let write = latency.iter().find(|p| p.op == "write").expect("writes");
        assert_eq!(write.count, 1000);
        // 2 significant digits: within 1 % of the exact quantile.
        for (value, exact) in [
            (write.p50_us, 500),
            (write.p90_us, 900),
            (write.p99_us, 990),
            (write.max_us, 1000),
        ] {
            assert!(value.abs_diff(exact) * 100 <= exact, "{value} vs {exact}: {write:?}");
        }
        assert!((write.mean_us - 500.5).abs() < 5.0, "{write:?}");
        let read = latency.iter().find(|p| p.op == "read").expect("reads");
        assert!(
            read.max_us >= LATENCY_MICROS_MAX * 99 / 100,
            "too long counts as the maximum: {read:?}"
        );
        stats.reset_latency();
        assert!(stats.latency().is_empty(), "reset starts afresh");
        stats.op(Op::Write).record(4096, Duration::from_micros(70), true);
        assert_eq!(stats.latency()[0].count, 1);
        assert_eq!(stats.op(Op::Write).count(), 1001, "the counters are not reset");
    }

    #[test]
    fn process_stats_are_read_from_proc() {
        let stats = ProcessStats::read();
        assert!(stats.resident_bytes > 0);
        assert!(stats.open_fds > 0);
        assert!(stats.threads >= 1);
        assert!(stats.start_unix_seconds > 1_600_000_000);
    }
}
