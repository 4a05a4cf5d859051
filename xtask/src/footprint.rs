//! A process's memory as the kernel counts it: resident now (VmRSS) and at
//! its peak (VmHWM), from /proc/PID/status. The README's footprint figure
//! and the lab's < 50 MB check come from here.

use anyhow::{Context, Result};

/// What an agent may keep resident on a Raspberry Pi with every subsystem
/// on (issue 11); a Pi 3 has 1 GB for the agent, Apache and PostgreSQL.
pub const AGENT_BUDGET_KB: u64 = 50 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Resident pages backed by files, the program's code above all.
    pub rss_file_kb: u64,
}

impl Memory {
    /// The peak without the program's file-backed pages: what the agent
    /// itself allocated. A debug build's code is several times the
    /// release build's, so the lab's debug agents are held to the budget
    /// on this; release builds (the Pi's) on `hwm_kb`.
    pub fn hwm_without_code_kb(&self) -> u64 {
        self.hwm_kb.saturating_sub(self.rss_file_kb)
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MB, VmHWM {:.1} MB, RssFile {:.1} MB",
            self.rss_kb as f64 / 1024.0,
            self.hwm_kb as f64 / 1024.0,
            self.rss_file_kb as f64 / 1024.0
        )
    }
}

/// Parses the VmRSS and VmHWM lines of a /proc/PID/status text.
pub fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        rss_file_kb: field("RssFile:").unwrap_or(0),
    })
}

/// The memory of a running process.
pub fn of_pid(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("no VmRSS/VmHWM in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak_from_proc_status() {
        let text = "Name:\tagent\nVmPeak:\t  900000 kB\nVmHWM:\t   21504 kB\nVmRSS:\t   20480 kB\nRssFile:\t    8192 kB\n";
        let memory = parse_status(text).unwrap();
        assert_eq!(
            memory,
            Memory {
                rss_kb: 20480,
                hwm_kb: 21504,
                rss_file_kb: 8192
            }
        );
        assert_eq!(memory.hwm_without_code_kb(), 21504 - 8192);
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
        let own = of_pid(std::process::id()).unwrap();
        assert!(own.rss_kb > 0 && own.hwm_kb >= own.rss_kb, "{own:?}");
    }
}
