//! CPU time accounting: a process's user + system time from `/proc/<pid>/stat` (all its
//! threads, including those that already exited), and the calling thread's CPU clock.

use std::time::Duration;

/// Clock ticks per second of the `/proc` CPU counters (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map(|t| t as u64)
        .unwrap_or(100)
}

/// `(utime, stime)` in clock ticks from the text of a `/proc/<pid>/stat` file.
///
/// The command name (field 2) is in parentheses and may itself hold spaces and `)`, so the
/// fields are counted from the last `)`: utime and stime are fields 14 and 15.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // fields[0] is field 3 (state); utime is field 14, i.e. index 11.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// CPU time consumed so far by process `pid` (all threads): (user, system).
pub fn process_cpu_split(pid: u32) -> std::io::Result<(Duration, Duration)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (u, s) = parse_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("cannot read utime/stime from /proc/{pid}/stat"),
        )
    })?;
    let ticks = clock_ticks_per_second();
    let d = |t: u64| {
        Duration::from_secs(t / ticks) + Duration::from_nanos((t % ticks) * 1_000_000_000 / ticks)
    };
    Ok((d(u), d(s)))
}

/// User + system CPU time consumed so far by process `pid` (all threads).
pub fn process_cpu(pid: u32) -> std::io::Result<Duration> {
    process_cpu_split(pid).map(|(u, s)| u + s)
}

/// User + system CPU time consumed so far by this process.
pub fn own_cpu() -> std::io::Result<Duration> {
    process_cpu(std::process::id())
}

/// CPU time consumed so far by the calling thread (nanosecond resolution).
pub fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parentheses() {
        let line = "4242 (odd) name (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some((1234, 567)));
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn own_process_and_thread_cpu_advance() {
        let p0 = own_cpu().unwrap();
        let t0 = thread_cpu();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() > t0);
        assert!(own_cpu().unwrap() > p0);
        assert!(clock_ticks_per_second() >= 1);
    }
}
