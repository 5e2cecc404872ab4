//! A server process's resident memory and CPU time, from `/proc/PID`.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    /// Resident set size in bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// The peak resident set size since the process started (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// User plus system CPU time in seconds (`utime + stime`).
    pub cpu_seconds: f64,
    /// The system (kernel) part of it (`stime`): system calls, and on
    /// loopback also the receiving side's TCP input, which runs in the
    /// sender's system call.
    pub system_seconds: f64,
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

impl ProcStats {
    /// Reads process `pid`.
    pub fn read(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .context("no VmRSS")?;
        let peak_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(rss_kib);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces), which ends
        // at the last ')'. utime and stime are fields 14 and 15 of the line,
        // so 12 and 13 after it.
        let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).context("no utime")?.parse()?;
        let stime: u64 = fields.get(12).context("no stime")?.parse()?;
        Ok(Self {
            rss_bytes: rss_kib * 1024,
            peak_rss_bytes: peak_kib * 1024,
            cpu_seconds: (utime + stime) as f64 / clock_ticks(),
            system_seconds: stime as f64 / clock_ticks(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let stats = ProcStats::read(std::process::id()).expect("own stats");
        assert!(stats.rss_bytes > 0);
        assert!(stats.system_seconds <= stats.cpu_seconds);
    }
}
