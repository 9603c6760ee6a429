//! Per-volume I/O limits (issue 26): a client request waits until the
//! volume's IOPS and bandwidth budgets allow it to start.
//!
//! Each budget is paced by the generic cell rate algorithm (virtual
//! scheduling): a request of cost `c` (one operation, or its bytes) at
//! rate `r` moves the budget's theoretical arrival time `tat` on by `c/r`;
//! a request may start once `tat - BURST` is reached. Over any window the
//! volume gets at most `rate x (window + BURST)`, and a volume that was idle
//! gets no more than `BURST` of credit back. Requests are never reordered:
//! each reserves its slot when it arrives and sleeps until it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Credit a budget may build up while idle: a short burst, so a limit
/// holds within a few per cent over 10 s windows.
pub const BURST: Duration = Duration::from_millis(100);
/// Largest limits taken (beyond any device sold): 10 M IOPS, 1 TiB/s.
pub const IOPS_LIMIT_MAX: u64 = 10_000_000;
pub const MIB_PER_S_LIMIT_MAX: u64 = 1 << 20;

/// A volume's I/O priority class: its requests' weight and level in the
/// disk's scheduler (`engine::sched`), on every node holding a copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoPriority {
    High,
    #[default]
    Medium,
    Low,
}

impl IoPriority {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Medium => "medium",
            Self::Low => "low",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::High => 0,
            Self::Medium => 1,
            Self::Low => 2,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::High,
            2 => Self::Low,
            _ => Self::Medium,
        }
    }

    #[must_use]
    pub fn is_medium(&self) -> bool {
        *self == Self::Medium
    }
}

impl std::str::FromStr for IoPriority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "high" => Ok(Self::High),
            "medium" => Ok(Self::Medium),
            "low" => Ok(Self::Low),
            other => Err(format!("io priority {other:?}: give high, medium or low")),
        }
    }
}

/// A volume's limits; None: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per second (reads, writes, trims, write-zeroes; flushes are free).
    pub iops: Option<u64>,
    /// MiB per second read and written.
    pub mib_per_s: Option<u64>,
}

impl Limits {
    /// Err naming a limit of 0 or beyond any device.
    pub fn check(&self) -> Result<(), String> {
        if let Some(iops) = self.iops {
            if iops == 0 || iops > IOPS_LIMIT_MAX {
                return Err(format!(
                    "an IOPS limit of {iops}: give 1 to {IOPS_LIMIT_MAX}, or none to lift it"
                ));
            }
        }
        if let Some(mib) = self.mib_per_s {
            if mib == 0 || mib > MIB_PER_S_LIMIT_MAX {
                return Err(format!(
                    "a bandwidth limit of {mib} MiB/s: give 1 to {MIB_PER_S_LIMIT_MAX}, or none to lift it"
                ));
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn is_none(&self) -> bool {
        self.iops.is_none() && self.mib_per_s.is_none()
    }
}

/// The pacing state of one volume's limits.
#[derive(Debug)]
pub struct Pacer {
    limits: Limits,
    /// Theoretical arrival times of the operation and byte budgets.
    ops_tat: Instant,
    bytes_tat: Instant,
}

impl Pacer {
    #[must_use]
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            ops_tat: now,
            bytes_tat: now,
        }
    }

    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Reserves a request (`ops` operations, `bytes` bytes) arriving at
    /// `now`; returns how long it waits before it may start.
    pub fn reserve(&mut self, now: Instant, ops: u64, bytes: u64) -> Duration {
        let mut start = now;
        let per_byte = self.limits.mib_per_s.map(|mib| 1.0 / (mib as f64 * 1_048_576.0));
        let per_op = self.limits.iops.map(|iops| 1.0 / iops as f64);
        for (tat, per_unit, units) in [(&self.ops_tat, per_op, ops), (&self.bytes_tat, per_byte, bytes)] {
            if per_unit.is_some() && units > 0 {
                start = start.max(tat.checked_sub(BURST).unwrap_or(now));
            }
        }
        for (tat, per_unit, units) in [(&mut self.ops_tat, per_op, ops), (&mut self.bytes_tat, per_byte, bytes)] {
            if let Some(per_unit) = per_unit.filter(|_| units > 0) {
                *tat = (*tat).max(start) + Duration::from_secs_f64(per_unit * units as f64);
            }
        }
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests arriving back to back, each started when allowed: the
    /// number started within `window`.
    fn started_within(pacer: &mut Pacer, t0: Instant, window: Duration, bytes: u64) -> u64 {
        let mut now = t0;
        let mut count = 0;
        loop {
            now += pacer.reserve(now, 1, bytes);
            if now - t0 >= window {
                return count;
            }
            count += 1;
        }
    }

    #[test]
    fn an_iops_limit_holds_over_a_window_with_a_short_burst_at_most() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(
            Limits {
                iops: Some(1000),
                mib_per_s: None,
            },
            t0,
        );
        let count = started_within(&mut pacer, t0, Duration::from_secs(10), 4096);
        // 10 s at 1000/s, plus the 100-ms burst of a fresh budget.
        assert!((10_000..=10_101).contains(&count), "{count}");
    }

    #[test]
    fn a_bandwidth_limit_paces_large_requests_by_their_bytes() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(
            Limits {
                iops: None,
                mib_per_s: Some(8),
            },
            t0,
        );
        // 1-MiB requests at 8 MiB/s: 80 in 10 s, and one more from the burst.
        let count = started_within(&mut pacer, t0, Duration::from_secs(10), 1 << 20);
        assert!((80..=81).contains(&count), "{count}");
        // A fresh budget lets the first request go at once and the next
        // wait; a flush (nothing counted) never waits.
        let mut pacer = Pacer::new(
            Limits {
                iops: Some(1),
                mib_per_s: Some(1),
            },
            t0,
        );
        assert_eq!(pacer.reserve(t0, 1, 1 << 20), Duration::ZERO);
        assert!(pacer.reserve(t0, 1, 4096) > Duration::ZERO);
        assert_eq!(pacer.reserve(t0, 0, 0), Duration::ZERO);
    }

    #[test]
    fn an_idle_volume_earns_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(
            Limits {
                iops: Some(100),
                mib_per_s: None,
            },
            t0,
        );
        let later = t0 + Duration::from_secs(60);
        // After a minute idle: the one due and the burst's 10 (100 ms at
        // 100/s) go at once, then one per 10 ms.
        let waits: Vec<Duration> = (0..12).map(|_| pacer.reserve(later, 1, 0)).collect();
        assert!(waits[..11].iter().all(Duration::is_zero), "{waits:?}");
        let ten_ms = waits[11].as_secs_f64() * 1000.0;
        assert!((9.9..10.1).contains(&ten_ms), "{waits:?}");
    }

    #[test]
    fn limits_of_zero_or_beyond_any_device_are_refused() {
        assert!(Limits {
            iops: Some(0),
            mib_per_s: None
        }
        .check()
        .unwrap_err()
        .contains("1 to"));
        assert!(Limits {
            iops: None,
            mib_per_s: Some(0)
        }
        .check()
        .is_err());
        assert!(Limits {
            iops: Some(IOPS_LIMIT_MAX + 1),
            mib_per_s: None
        }
        .check()
        .is_err());
        assert!(Limits {
            iops: Some(5000),
            mib_per_s: Some(200)
        }
        .check()
        .is_ok());
        assert_eq!("high".parse::<IoPriority>(), Ok(IoPriority::High));
        assert!("urgent"
            .parse::<IoPriority>()
            .unwrap_err()
            .contains("high, medium or low"));
    }
}

/// A priority readable and settable from any thread without a lock.
#[derive(Debug, Default)]
pub struct PriorityCell(std::sync::atomic::AtomicU8);

impl PriorityCell {
    #[must_use]
    pub fn get(&self) -> IoPriority {
        IoPriority::from_code(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set(&self, priority: IoPriority) {
        self.0.store(priority.code(), std::sync::atomic::Ordering::Relaxed);
    }
}
