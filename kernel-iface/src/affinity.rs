//! CPU pinning for reactor threads, and the `--cores` list syntax.

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
    /// the kernel refused
    #[error("cannot pin thread to core {core}: {errno}")]
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

/// Cores this process may run on.
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
    fn bad_lists_are_refused_with_the_reason() {
        for (input, needle) in [
            ("", "empty"),
            ("3-1", "backwards"),
            ("a", "not a core"),
            ("1,,2", "not a core"),
            ("5000", "beyond"),
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

    proptest! {
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
