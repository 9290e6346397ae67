//! What the benchmark reads about the server process (and itself) from `/proc`.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times. This is the kernel's USER_HZ, which the
/// Linux ABI fixes at 100 on every architecture chatd targets (it is what `sysconf(_SC_CLK_TCK)`
/// returns), so 10 ms resolution over runs of several seconds.
const USER_HZ: f64 = 100.0;

/// One reading of a process's resource use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User plus system CPU time of all its threads, dead ones included.
    pub cpu: Duration,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far, in KiB.
    pub hwm_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` if the process is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may contain spaces: split after it.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the man page (utime, stime) are at 11 and 12 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Sample {
        cpu: Duration::from_secs_f64((utime + stime) as f64 / USER_HZ),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// The processes' samples summed (a cluster's nodes); `None` without pids or if any is gone.
pub fn sample_all(pids: &[u32]) -> Option<Sample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(Sample::default(), |sum, pid| {
        let s = sample(*pid)?;
        Some(Sample {
            cpu: sum.cpu + s.cpu,
            rss_kib: sum.rss_kib + s.rss_kib,
            hwm_kib: sum.hwm_kib + s.hwm_kib,
        })
    })
}

/// CPU time this process (the load generator) has used so far.
pub fn own_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(
                    u64::try_from(t.tv_sec()).unwrap_or(0),
                    u32::try_from(t.tv_usec()).unwrap_or(0) * 1000,
                )
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// The 1-minute load average, to record how busy the machine was during a run.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat`: (all of it, stolen), in
/// ticks. "Stolen" is time the hypervisor gave this virtual machine's CPUs to someone else while
/// they had work: on a shared host it delays the server and the generator alike, whatever the
/// load average says.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let total = ticks.iter().take(8).sum();
    Some((total, *ticks.get(7)?))
}

/// Percentage of the machine's CPU time stolen by the hypervisor between two [`cpu_ticks`].
pub fn steal_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
            (s1.saturating_sub(s0) as f64 * 1000.0 / (t1 - t0) as f64).round() / 10.0
        }
        _ => -1.0,
    }
}
