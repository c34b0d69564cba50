//! Readings from /proc: the gateway's resident memory and CPU time, loadgen's own CPU time, and
//! its open-files limit. Each is `None` where /proc cannot tell (a pid gone, another OS), so the
//! report shows "-" rather than the run failing.

/// CPU seconds (user + system) of the gateway and of loadgen: at a moment, or over a span.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct CpuPair {
    pub(super) gateway: Option<f64>,
    pub(super) loadgen: Option<f64>,
}

impl CpuPair {
    pub(super) fn now(gateway_pid: Option<u32>) -> Self {
        Self {
            gateway: gateway_pid.and_then(|pid| cpu_seconds(&pid.to_string())),
            loadgen: cpu_seconds("self"),
        }
    }

    pub(super) fn since(self, earlier: CpuPair) -> CpuPair {
        let minus = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        CpuPair {
            gateway: minus(self.gateway, earlier.gateway),
            loadgen: minus(self.loadgen, earlier.loadgen),
        }
    }
}

/// `VmRSS` of a process, in KiB.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (`self` or a pid), in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// This process's soft limit of open files.
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
}
