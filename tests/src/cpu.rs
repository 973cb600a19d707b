//! CPU time of processes (nexd, wireguard-go), for the benchmarks: what a
//! tunnel cost per byte moved, or with nothing to do.

use anyhow::Context as _;

/// User + system CPU seconds the processes `pids` have used so far.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("no CLK_TCK")? as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // The fields after the command name (which may contain spaces);
        // utime and stime are fields 14 and 15, i.e. 11 and 12 after the ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed /proc/PID/stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
            .sum();
        total += ticks / hz;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_none_is_none() -> anyhow::Result<()> {
        // Burn a little CPU so the tick count moves past zero.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(&[std::process::id()])? > 0.0);
        assert_eq!(cpu_seconds(&[])?, 0.0);
        assert!(cpu_seconds(&[u32::MAX]).is_err(), "no such process");
        Ok(())
    }
}
