//! iptables rules of a test's own (in a chain named after the test process), removed on drop.

use std::process::Command;

use super::text;

/// An iptables chain of the test's own, removed on drop.
pub struct Firewall {
    chain: String,
}

impl Firewall {
    pub fn new() -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let chain = format!("BALLAST-T{}-{serial}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("iptables")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ok(&["-N", &chain]) {
            return None;
        }
        let firewall = Self { chain };
        if !ok(&["-I", "INPUT", "-j", &firewall.chain]) {
            return None;
        }
        Some(firewall)
    }

    pub fn drop_tcp(&self, source: Option<&str>, destination: &str, port: u16) {
        let port = port.to_string();
        let mut args = vec!["-A", &self.chain, "-p", "tcp", "-d", destination, "--dport", &port];
        if let Some(source) = source {
            args.extend(["-s", source]);
        }
        args.extend(["-j", "DROP"]);
        let output = Command::new("iptables").args(&args).output().unwrap();
        assert!(output.status.success(), "iptables {args:?}: {}", text(&output));
    }

    pub fn heal(&self) {
        let _ = Command::new("iptables").args(["-F", &self.chain]).output();
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.heal();
        let _ = Command::new("iptables")
            .args(["-D", "INPUT", "-j", &self.chain])
            .output();
        let _ = Command::new("iptables").args(["-X", &self.chain]).output();
    }
}
