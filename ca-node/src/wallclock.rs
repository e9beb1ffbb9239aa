//! Readings of this node's own clocks: the wall clock as `Cluster.Clock` reports it, and a
//! pair of wall and monotonic readings to tell whether the wall clock jumped between two
//! of them. Comparing with the other members is [`crate::clock`]'s job.

use std::time::Instant;

/// This node's time for `Cluster.Clock`, microseconds since the Unix epoch.
pub fn unix_time_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub use ca_authority::Checked;

/// Both clocks now.
pub fn checked_now() -> Checked {
    Checked {
        at: Instant::now(),
        wall_ms: unix_time_micros() / 1000,
    }
}

/// Whether the wall clock moved differently from the monotonic clock since `last` by more
/// than half of `max_skew_ms` (a jump, or a measurement never made). Pure, for the tests.
pub fn jumped(last: Option<Checked>, now: Checked, max_skew_ms: i64) -> bool {
    let Some(last) = last else {
        return true;
    };
    let mono =
        i64::try_from(now.at.saturating_duration_since(last.at).as_millis()).unwrap_or(i64::MAX);
    let wall = now.wall_ms - last.wall_ms;
    (wall - mono).abs() > max_skew_ms / 2
}
