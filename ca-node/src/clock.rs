//! Clock offsets between members, and refusing to mint on a node whose clock disagrees
//! with the cluster's.
//!
//! An SVID's validity starts at the minting node's "now": a node whose clock runs ahead
//! mints certificates that verifiers reject as not yet valid, one that runs behind mints
//! shorter lives than asked. Every [`INTERVAL`] each node asks every other member for its
//! time (`Cluster.Clock`, answered without a client certificate, so a node whose own SVID
//! looks not-yet-valid to the others can still ask) and estimates the offset from the
//! round trip's midpoint. When as many members as a quorum disagree with it by more than
//! `max_clock_skew_secs`, the clock at fault is this node's: it reports not ready and
//! refuses to mint (agents fail over to another node) until the clocks agree again. With
//! fewer answers nobody can tell whose clock is wrong, and nothing changes.
//!
//! A clock that jumps between two measurements is caught before the next lifecycle
//! decision: the maintenance round first compares how far the wall clock moved since the
//! last measurement with how far the monotonic clock did ([`crate::wallclock::jumped`]), and measures again
//! at once if they differ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_proto::admin::cluster_client::ClusterClient;
use ca_proto::admin::ClockRequest;
use tonic::Request;

use crate::cluster::Peers;
use crate::core::NodeCore;
use crate::wallclock::{checked_now, jumped, unix_time_micros};

/// How often offsets are measured.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One member's clock as measured from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerClock {
    /// The member's node ID.
    pub node_id: String,
    /// Its clock minus ours, milliseconds (at the midpoint of the round trip).
    pub offset_ms: i64,
    /// The round trip, milliseconds (the offset is uncertain by half of it).
    pub rtt_ms: i64,
}

/// Why this node's clock is at fault, if it is: `voters` members in all (this one
/// included), `peers` measured. A quorum disagreeing decides. So does any disagreement
/// with no member agreeing when this node is `suspect` (its wall clock just jumped, or it
/// was found off before): then a member that is down cannot hide the fault. Pure, for the
/// tests.
pub fn judge(
    peers: &[PeerClock],
    voters: usize,
    max_skew_ms: i64,
    suspect: bool,
) -> Option<String> {
    let quorum = voters / 2 + 1;
    let off: Vec<&PeerClock> = peers
        .iter()
        .filter(|p| p.offset_ms.abs() - p.rtt_ms / 2 > max_skew_ms)
        .collect();
    let faulty = off.len() >= quorum || (suspect && !off.is_empty() && off.len() == peers.len());
    if max_skew_ms <= 0 || !faulty || voters < 2 {
        return None;
    }
    // Their clock minus ours: negative everywhere means ours runs ahead.
    let how = if off.iter().all(|p| p.offset_ms < 0) {
        "ahead of"
    } else if off.iter().all(|p| p.offset_ms > 0) {
        "behind"
    } else {
        "off from"
    };
    let least = off.iter().map(|p| p.offset_ms.abs()).min().unwrap_or(0);
    let names: Vec<&str> = off.iter().map(|p| p.node_id.as_str()).collect();
    Some(format!(
        "this node's clock is {how} {} by at least {:.1} s (more than max_clock_skew_secs = {}); fix its time synchronization (NTP); it mints nothing until then",
        names.join(", "),
        least as f64 / 1000.0,
        max_skew_ms / 1000
    ))
}

/// Asks every other member for its time (at most 2 s each, in parallel).
async fn measure(core: &NodeCore) -> Vec<PeerClock> {
    let td = core.config.trust_domain();
    let peers = Peers::new(
        core.raft.clone(),
        ca_identity::tls::SvidResolver::default(),
        core.roots.clone(),
        td.clone(),
    );
    let calls = peers.others().into_iter().map(|(_, node)| {
        let (roots, td) = (core.roots.clone(), td.clone());
        async move {
            // No client certificate, and the member's certificate checked at its own start
            // time: a node whose clock jumped past every certificate's validity (or whose
            // SVID the others cannot accept) still learns that its clock is the one off.
            let expected = crate::raft_tls::ca_node_id(&td, &node.node_id).ok()?;
            let authorize: ca_identity::tls::Authorizer = Arc::new(move |id| *id == expected);
            let tls = ca_identity::tls::any_time_client_config(roots, authorize);
            let channel = crate::raft_tls::tls_channel(&node.addr, Arc::new(tls)).ok()?;
            let mut client = ClusterClient::new(channel);
            let mut req = Request::new(ClockRequest {});
            req.set_timeout(Duration::from_secs(2));
            let sent = Instant::now();
            let t0 = unix_time_micros();
            let r = tokio::time::timeout(Duration::from_secs(2), client.clock(req))
                .await
                .ok()?
                .ok()?
                .into_inner();
            let rtt = sent.elapsed();
            let mid = t0 + i64::try_from(rtt.as_micros()).unwrap_or(i64::MAX) / 2;
            Some(PeerClock {
                node_id: node.node_id.clone(),
                offset_ms: (r.unix_time_micros - mid) / 1000,
                rtt_ms: i64::try_from(rtt.as_millis()).unwrap_or(i64::MAX),
            })
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn max_skew_ms(core: &NodeCore) -> i64 {
    i64::try_from(core.config.max_clock_skew_secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

/// Before a lifecycle decision: measures the offsets again if the wall clock jumped since
/// the last measurement, so that the decision never runs on a clock not compared with the
/// others' since it jumped.
pub async fn recheck_if_jumped(core: &NodeCore) {
    if core.config.max_clock_skew_secs == 0 {
        return;
    }
    let max_skew_ms = max_skew_ms(core);
    if jumped(core.ca.clock_checked(), checked_now(), max_skew_ms) {
        tracing::warn!("the wall clock moved unlike the monotonic clock since the last comparison with the other members: comparing again before any lifecycle decision");
        check_with(core, true).await;
    }
}

/// Measures the offsets once: exports them (`ca_node_clock_offset_seconds{peer}`) and
/// tells the CA whether to refuse minting. A node runs this before it mints anything at
/// start, then every [`INTERVAL`] ([`spawn`]).
pub async fn check(core: &NodeCore) {
    check_with(core, false).await;
}

/// [`check`], with `jumped` when this node's wall clock has just been seen to jump.
async fn check_with(core: &NodeCore, jumped: bool) {
    if core.config.max_clock_skew_secs == 0 {
        return;
    }
    let max_skew_ms = max_skew_ms(core);
    let started = checked_now();
    let measured = measure(core).await;
    core.metrics.clock_offset.reset();
    for p in &measured {
        core.metrics
            .clock_offset
            .with_label_values(&[&p.node_id])
            .set(p.offset_ms as f64 / 1000.0);
    }
    let voters = core
        .raft
        .status()
        .members
        .values()
        .filter(|m| m.voter)
        .count();
    let before = core.ca.clock_problem();
    let problem = judge(&measured, voters, max_skew_ms, jumped || before.is_some());
    match (&problem, before) {
        (Some(p), None) => tracing::error!(offsets = ?measured, "{p}"),
        (None, Some(_)) => {
            tracing::info!(offsets = ?measured, "this node's clock agrees with the cluster's again; minting resumes")
        }
        _ => {}
    }
    core.ca.set_clock_problem(problem);
    core.ca.set_clock_checked(started);
}

/// Runs [`check`] every [`INTERVAL`] until `shutdown` changes.
pub fn spawn(
    core: Arc<NodeCore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            check(&core).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallclock::Checked;

    fn peer(id: &str, offset_ms: i64, rtt_ms: i64) -> PeerClock {
        PeerClock {
            node_id: id.into(),
            offset_ms,
            rtt_ms,
        }
    }

    #[test]
    fn a_quorum_of_disagreeing_members_puts_the_fault_here() {
        let max = 10_000;
        for (peers, voters, faulty) in [
            // Three voters: both others 2 min behind us: our clock runs ahead.
            (
                vec![peer("a", -120_000, 2), peer("b", -119_000, 3)],
                3,
                true,
            ),
            // Only one disagrees: it is that one's clock, not ours.
            (vec![peer("a", -120_000, 2), peer("b", 5, 3)], 3, false),
            // One answer of two others: cannot tell.
            (vec![peer("a", -120_000, 2)], 3, false),
            // Within the bound.
            (vec![peer("a", 9_000, 2), peer("b", -9_999, 3)], 3, false),
            // Over it only by less than the round trip's uncertainty.
            (
                vec![peer("a", 10_400, 1000), peer("b", 10_400, 1000)],
                3,
                false,
            ),
            // Five voters: three of four others disagree.
            (
                vec![
                    peer("a", 60_000, 1),
                    peer("b", 61_000, 1),
                    peer("c", 59_000, 1),
                    peer("d", 0, 1),
                ],
                5,
                true,
            ),
            (
                vec![peer("a", 60_000, 1), peer("b", 61_000, 1), peer("d", 0, 1)],
                5,
                false,
            ),
            // A single node has nobody to disagree with.
            (vec![], 1, false),
        ] {
            let got = judge(&peers, voters, max, false);
            assert_eq!(got.is_some(), faulty, "{peers:?} of {voters}: {got:?}");
        }
        let msg = judge(
            &[peer("a", -120_000, 2), peer("b", -119_000, 3)],
            3,
            max,
            false,
        )
        .unwrap();
        for want in [
            "ahead of a, b",
            "119.0 s",
            "max_clock_skew_secs = 10",
            "NTP",
        ] {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        // A jump is the wall clock moving unlike the monotonic one.
        let t0 = Instant::now();
        let then = Checked {
            at: t0,
            wall_ms: 1_000_000,
        };
        let later = |mono_ms: u64, wall_ms: i64| Checked {
            at: t0 + Duration::from_millis(mono_ms),
            wall_ms: 1_000_000 + wall_ms,
        };
        assert!(jumped(None, later(0, 0), max));
        assert!(!jumped(Some(then), later(10_000, 10_003), max));
        assert!(jumped(
            Some(then),
            later(10_000, 10_000 + 400 * 86_400_000),
            max
        ));
        assert!(jumped(Some(then), later(10_000, 10_000 - 6_000), max));
        // 0 turns the check off.
        assert!(judge(
            &[peer("a", -1_000_000, 1), peer("b", -1_000_000, 1)],
            3,
            0,
            false
        )
        .is_none());
        // A suspect node (its clock just jumped, or it was off before) with a member down:
        // the one member that answers disagrees and none agrees, so the fault is here...
        let one = [peer("a", -120_000, 2)];
        assert!(judge(&one, 3, max, true).is_some());
        assert!(judge(&one, 3, max, false).is_none());
        // ...but not when another member agrees with it.
        assert!(judge(&[peer("a", -120_000, 2), peer("b", 3, 2)], 3, max, true).is_none());
        // Nobody answering proves nothing.
        assert!(judge(&[], 3, max, true).is_none());
    }
}
