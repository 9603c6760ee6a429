//! What the benchmark ran on: CPU, cores, kernel, load, date; recorded in
//! every JSON result so numbers from different machines are not compared.

use std::process::Command;

use serde::Serialize;

/// The machine a benchmark ran on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    /// /proc/loadavg before the first server started and after the last
    /// stopped: other work on the machine makes every number noisier.
    pub load_average_before: String,
    pub load_average_after: String,
}

/// The trimmed stdout of a command, or "unknown".
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// CPU model, cores and kernel (load averages left empty for the caller).
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, name)| name.trim().to_owned());
    Machine {
        cores: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
        load_average_before: String::new(),
        load_average_after: String::new(),
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
