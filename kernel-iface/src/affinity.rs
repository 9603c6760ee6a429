//! CPU pinning for reactor threads, and the `--cores` list syntax
//! ("0-3,5,7-8", as in `taskset -c` and /sys/devices/system/cpu/online).

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use thiserror::Error;

/// Highest core number accepted in a core list.
pub const CORES_MAX: usize = 4096;

/// Errors parsing core lists or pinning.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AffinityError {
    /// the list does not parse
    #[error("invalid core list {input:?}: {reason} (expected e.g. 0-3,5)")]
    BadList { input: String, reason: String },
    /// the kernel refused (the core is offline, beyond the kernel's CPU
    /// set, or outside this process's cgroup/affinity mask)
    #[error(
        "cannot pin thread to core {core}: {errno} (is it online and allowed for this process? see `taskset -cp $$`)"
    )]
    Pin { core: usize, errno: nix::errno::Errno },
}

/// Parses "0-3,5,7-8" into sorted, distinct core numbers.
pub fn parse_core_list(input: &str) -> Result<Vec<usize>, AffinityError> {
    let bad = |reason: &str| AffinityError::BadList {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let number = |text: &str| -> Result<usize, AffinityError> {
        let value: usize = text
            .trim()
            .parse()
            .map_err(|_| bad(&format!("{:?} is not a core number", text.trim())))?;
        if value >= CORES_MAX {
            return Err(bad(&format!("core {value} is beyond {}", CORES_MAX - 1)));
        }
        Ok(value)
    };
    if input.trim().is_empty() {
        return Err(bad("empty"));
    }
    let mut cores = Vec::new();
    for part in input.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(bad(&format!("range {first}-{last} runs backwards")));
                }
                cores.extend(first..=last);
            }
            None => cores.push(number(part)?),
        }
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

/// Cores this process may run on (its affinity mask, which cgroups and
/// `taskset` narrow), sorted. If the mask cannot be read, all
/// `available_parallelism` cores from 0 are assumed.
#[must_use]
pub fn available_cores() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count().min(CORES_MAX))
            .filter(|&core| set.is_set(core).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, usize::from)).collect(),
    }
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<(), AffinityError> {
    let mut set = CpuSet::new();
    set.set(core).map_err(|errno| AffinityError::Pin { core, errno })?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|errno| AffinityError::Pin { core, errno })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lists_and_ranges_parse_sorted_and_distinct() {
        assert_eq!(parse_core_list("0-3,5,7-8"), Ok(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(parse_core_list("3,1,1"), Ok(vec![1, 3]));
        assert_eq!(parse_core_list(" 2 "), Ok(vec![2]));
    }

    #[test]
    fn the_core_limit_is_4096_cores() {
        assert_eq!(parse_core_list("4095"), Ok(vec![4095]));
        assert_eq!(parse_core_list("0-4095").map(|cores| cores.len()), Ok(CORES_MAX));
        assert!(parse_core_list("4096").is_err());
        assert!(parse_core_list("0-4096").is_err());
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        for (input, needle) in [
            ("", "empty"),
            ("3-1", "backwards"),
            ("a", "not a core"),
            ("1,,2", "not a core"),
            ("5000", "beyond"),
            ("1-2-3", "not a core"),
            ("-1", "not a core"),
            ("1,", "not a core"),
            ("0x3", "not a core"),
        ] {
            let error = parse_core_list(input).unwrap_err();
            assert!(error.to_string().contains(needle), "{input}: {error}");
        }
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_core() {
        let core = available_cores()[0];
        let set = std::thread::spawn(move || {
            pin_current_thread(core).unwrap();
            sched_getaffinity(Pid::from_raw(0)).unwrap()
        })
        .join()
        .unwrap();
        let pinned: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        assert_eq!(pinned, vec![core]);
    }

    #[test]
    fn pinning_to_a_core_the_kernel_cannot_use_is_an_error_naming_the_core() {
        let error = std::thread::spawn(|| pin_current_thread(CORES_MAX - 1))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(matches!(error, AffinityError::Pin { core, .. } if core == CORES_MAX - 1));
        assert!(error.to_string().contains("core 4095"), "{error}");
    }

    #[test]
    fn available_cores_are_sorted_distinct_and_not_empty() {
        let cores = available_cores();
        assert!(!cores.is_empty());
        assert!(cores.windows(2).all(|pair| pair[0] < pair[1]), "{cores:?}");
    }

    /// Formats sorted cores the way `taskset -c` prints them ("0-3,5").
    fn as_ranges(cores: &[usize]) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut index = 0;
        while index < cores.len() {
            let start = cores[index];
            while index + 1 < cores.len() && cores[index + 1] == cores[index] + 1 {
                index += 1;
            }
            let end = cores[index];
            parts.push(if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            });
            index += 1;
        }
        parts.join(",")
    }

    proptest! {
        #[test]
        fn ranges_parse_back_to_the_same_cores(cores in proptest::collection::btree_set(0usize..CORES_MAX, 1..64)) {
            let cores: Vec<usize> = cores.into_iter().collect();
            prop_assert_eq!(parse_core_list(&as_ranges(&cores)).unwrap(), cores);
        }

        #[test]
        fn a_reversed_range_is_always_refused(first in 0usize..CORES_MAX, gap in 1usize..100) {
            let last = first.saturating_sub(gap);
            prop_assume!(last < first);
            let error = parse_core_list(&format!("{first}-{last}")).unwrap_err();
            prop_assert!(error.to_string().contains("backwards"));
        }

        #[test]
        fn formatted_sets_parse_back(cores in proptest::collection::btree_set(0usize..256, 1..20)) {
            let text: Vec<String> = cores.iter().map(ToString::to_string).collect();
            let parsed = parse_core_list(&text.join(",")).unwrap();
            prop_assert_eq!(parsed, cores.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,30}") {
            let _ = parse_core_list(&text);
        }
    }
}
