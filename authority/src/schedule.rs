//! What to do next about one kind of authority: [`next_step`].

use ca_state::{AuthorityKind, AuthorityRecord, AuthorityState, RotationRequest};
use serde::Deserialize;

use crate::{age_fraction, issued_at};

/// When authorities are prepared and activated (the node config's `[rotation]`).
///
/// The next authority is *prepared* (made, and published if it is a root or a JWT key) once
/// the current one has used `prepare_fraction` of its lifetime, and *activated* (signs from
/// then on; the current one is retired) at `activate_fraction`. The defaults are SPIRE's,
/// 1/2 and 5/6. An SVID must fit into what is left of its issuer when the next one
/// activates, so `ttl.x509_svid` and `ttl.agent_svid` may be at most
/// `(1 - activate_fraction) * ttl.intermediate` (and likewise for JWT-SVIDs and
/// intermediates under the root).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Rotation {
    /// Fraction of the current authority's lifetime at which the next one is prepared.
    pub prepare_fraction: f64,
    /// Fraction of the current authority's lifetime at which the next one is activated.
    pub activate_fraction: f64,
    /// Seconds a new root or JWT key is published before it is used when it was prepared on
    /// request (`rotate-root`, `rotate-jwt-key`) rather than on schedule: long enough for
    /// every agent (sync every few seconds) and every relying party (bundle refresh hint:
    /// 60 s) to fetch the bundle that has it.
    pub propagation_window: i64,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            prepare_fraction: 0.5,
            activate_fraction: 5.0 / 6.0,
            propagation_window: 300,
        }
    }
}

impl Rotation {
    /// What is left of an authority of lifetime `ttl` when its successor activates: the
    /// longest lifetime anything it signs can have in full.
    pub fn left_at_activation(&self, ttl: i64) -> i64 {
        // (The epsilon keeps 5/6 of 86400 s at exactly 14400 s despite binary fractions.)
        ((1.0 - self.activate_fraction) * ttl as f64 + 1e-6).floor() as i64
    }
}

/// Who decides, and with what settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// This node (intermediates and JWT keys are per node; roots are the cluster's).
    pub node_id: String,
    /// When to prepare and activate.
    pub rotation: Rotation,
    /// Lifetime (s) of a new authority of the kind in question.
    pub ttl: i64,
    /// Whether this node is the Raft leader: only the leader rotates the root on schedule
    /// or on request (any node activates a prepared root when none is active, and makes
    /// the first).
    pub leader: bool,
}

/// Facts about the [`candidates`] that only the caller can know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usable {
    /// The active candidate can sign: its key is at hand (a memory-mode key lives only in
    /// the process that made it) and, for an intermediate, it was signed by the active root.
    pub active: bool,
    /// The same for the prepared candidate.
    pub prepared: bool,
}

impl Usable {
    /// Both candidates usable (what roots and JWT keys assume: a key that cannot be loaded
    /// is an error where it is loaded).
    pub const ALL: Usable = Usable {
        active: true,
        prepared: true,
    };
}

/// The authority that signs now and the one that is to follow, as the schedule sees them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidates<'a> {
    /// The newest active authority of the kind (this node's, but for roots); unexpired,
    /// except for intermediates, where an expired one is reported so the plan can say so.
    pub active: Option<&'a AuthorityRecord>,
    /// The newest unexpired prepared one.
    pub prepared: Option<&'a AuthorityRecord>,
}

/// The [`Candidates`] of `kind` for `node_id` in `auths` (the journal, oldest first) at `t`.
pub fn candidates<'a>(
    kind: AuthorityKind,
    auths: &'a [AuthorityRecord],
    node_id: &str,
    t: i64,
) -> Candidates<'a> {
    let ours = |a: &AuthorityRecord| kind == AuthorityKind::Root || a.node_id == node_id;
    let newest = |state: AuthorityState, unexpired: bool| {
        auths.iter().rev().find(|a| {
            a.kind == kind && a.state == state && ours(a) && (!unexpired || a.not_after > t)
        })
    };
    Candidates {
        active: newest(AuthorityState::Active, kind != AuthorityKind::Intermediate),
        prepared: newest(AuthorityState::Prepared, true),
    }
}

/// What the schedule decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The authority that signs unless (and until) the step succeeds; None if nothing can
    /// sign before it does.
    pub current: Option<String>,
    /// What to do, if anything.
    pub step: Option<Step>,
}

/// One change to the journal (and the key managers) the schedule asks for. A successor is
/// always made before what it replaces is retired: if the step fails, `current` stays.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Make a prepared successor, after retiring `retire` (a prepared one that cannot be
    /// used: signed by a root that is no longer active, or its memory-mode key lost).
    Prepare {
        /// Retired first.
        retire: Vec<String>,
        /// Why, for the log.
        why: &'static str,
    },
    /// Activate the prepared authority `id`, then retire `retire`.
    Activate {
        /// The prepared authority.
        id: String,
        /// Retired once `id` is active.
        retire: Vec<String>,
        /// Why, for the log.
        why: &'static str,
    },
    /// Make a new authority and activate it at once (nothing usable is prepared), then
    /// retire `retire`.
    Replace {
        /// Retired once the new one is active.
        retire: Vec<String>,
        /// Why, for the log.
        why: &'static str,
    },
}

/// Whether a rotation of `active` (of `kind`, on `node_id`) was requested and not yet done.
fn requested(
    requests: &[RotationRequest],
    kind: AuthorityKind,
    node_id: &str,
    active: &AuthorityRecord,
) -> bool {
    requests
        .iter()
        .any(|r| r.kind == kind && r.node_id == node_id && r.replaces == active.id)
}

/// The next step for `kind` at `t` (Unix seconds), given the journal `auths` (oldest first),
/// the rotation `requests`, and whether the [`candidates`] are `usable`.
pub fn next_step(
    kind: AuthorityKind,
    auths: &[AuthorityRecord],
    requests: &[RotationRequest],
    t: i64,
    policy: &Policy,
    usable: Usable,
) -> Plan {
    let c = candidates(kind, auths, &policy.node_id, t);
    match kind {
        AuthorityKind::Root => root(auths, requests, t, policy, c),
        AuthorityKind::Intermediate => intermediate(auths, requests, t, policy, c, usable),
        AuthorityKind::Jwt => jwt(auths, requests, t, policy, c),
    }
}

/// This node's active and prepared authorities of `kind` other than `keep`.
fn others(
    auths: &[AuthorityRecord],
    kind: AuthorityKind,
    node_id: &str,
    keep: &str,
) -> Vec<String> {
    auths
        .iter()
        .filter(|a| {
            a.kind == kind
                && a.node_id == node_id
                && a.id != keep
                && matches!(a.state, AuthorityState::Active | AuthorityState::Prepared)
        })
        .map(|a| a.id.clone())
        .collect()
}

/// How long a prepared root or JWT key must have been published before it activates:
/// the propagation window on request; on schedule at most the time between preparing and
/// activating.
fn window(was_requested: bool, policy: &Policy) -> i64 {
    let r = &policy.rotation;
    if was_requested {
        r.propagation_window
    } else {
        let scheduled = ((r.activate_fraction - r.prepare_fraction) * policy.ttl as f64) as i64;
        r.propagation_window.min(scheduled)
    }
}

fn keep(active: &AuthorityRecord) -> Plan {
    Plan {
        current: Some(active.id.clone()),
        step: None,
    }
}

fn root(
    auths: &[AuthorityRecord],
    requests: &[RotationRequest],
    t: i64,
    policy: &Policy,
    c: Candidates<'_>,
) -> Plan {
    let Some(active) = c.active else {
        // Nothing can sign intermediates: a prepared root activates at once, else a new
        // one is made (the cluster's first).
        let step = match c.prepared {
            Some(p) => Step::Activate {
                id: p.id.clone(),
                retire: vec![],
                why: "there was no active root",
            },
            None => Step::Replace {
                retire: vec![],
                why: "there is no active root",
            },
        };
        return Plan {
            current: None,
            step: Some(step),
        };
    };
    if !policy.leader {
        return keep(active);
    }
    let was_requested = requested(requests, AuthorityKind::Root, "", active);
    let frac = age_fraction(active, t);
    let r = &policy.rotation;
    let step = match c.prepared {
        None if was_requested || frac >= r.prepare_fraction => Some(Step::Prepare {
            retire: vec![],
            why: if was_requested {
                "rotation requested by an operator"
            } else {
                "scheduled: the active root reached rotation.prepare_fraction"
            },
        }),
        Some(p) => {
            let due = was_requested || frac >= r.activate_fraction;
            (due && t - issued_at(p) >= window(was_requested, policy)).then(|| {
                let strays = auths.iter().filter(|a| {
                    a.kind == AuthorityKind::Root
                        && a.state == AuthorityState::Prepared
                        && a.id != p.id
                });
                Step::Activate {
                    id: p.id.clone(),
                    retire: std::iter::once(active.id.clone())
                        .chain(strays.map(|a| a.id.clone()))
                        .collect(),
                    why: if was_requested {
                        "rotation requested by an operator, published for the propagation window"
                    } else {
                        "scheduled: the active root reached rotation.activate_fraction"
                    },
                }
            })
        }
        None => None,
    };
    Plan {
        current: Some(active.id.clone()),
        step,
    }
}

fn intermediate(
    auths: &[AuthorityRecord],
    requests: &[RotationRequest],
    t: i64,
    policy: &Policy,
    c: Candidates<'_>,
    usable: Usable,
) -> Plan {
    let kind = AuthorityKind::Intermediate;
    let node = policy.node_id.as_str();
    let r = &policy.rotation;
    let usable_active = c.active.filter(|a| a.not_after > t && usable.active);
    let usable_prepared = c.prepared.filter(|_| usable.prepared);
    let why = match (usable_active, c.active) {
        (None, None) => Some("this node has no active intermediate"),
        (None, Some(a)) if a.not_after <= t => Some("the active intermediate expired"),
        (None, Some(_)) => Some(
            "the active intermediate is not usable (signed by a root that is no longer active, or a memory-mode key lost with the previous process)",
        ),
        (Some(a), _) if requested(requests, kind, node, a) => {
            Some("rotation requested by an operator")
        }
        (Some(a), _) if age_fraction(a, t) >= r.activate_fraction => {
            Some("scheduled: the active intermediate reached rotation.activate_fraction")
        }
        _ => None,
    };
    let current = usable_active.map(|a| a.id.clone());
    if let Some(why) = why {
        // Intermediates are not in the trust bundle (SVID chains carry them): the next one
        // may sign as soon as it exists.
        let step = match usable_prepared {
            Some(p) => Step::Activate {
                id: p.id.clone(),
                retire: others(auths, kind, node, &p.id),
                why,
            },
            None => Step::Replace {
                retire: others(auths, kind, node, ""),
                why,
            },
        };
        return Plan {
            current,
            step: Some(step),
        };
    }
    let active = usable_active.expect("no reason to replace it: it is usable");
    let step =
        (usable_prepared.is_none() && age_fraction(active, t) >= r.prepare_fraction).then(|| {
            Step::Prepare {
                retire: c.prepared.map(|p| p.id.clone()).into_iter().collect(),
                why: "scheduled: the active intermediate reached rotation.prepare_fraction",
            }
        });
    Plan { current, step }
}

fn jwt(
    auths: &[AuthorityRecord],
    requests: &[RotationRequest],
    t: i64,
    policy: &Policy,
    c: Candidates<'_>,
) -> Plan {
    let kind = AuthorityKind::Jwt;
    let node = policy.node_id.as_str();
    let r = &policy.rotation;
    let Some(active) = c.active else {
        // Nothing signs JWT-SVIDs here: the prepared key (published already) or a new one
        // activates at once.
        let why = "this node had no usable active JWT key";
        let step = match c.prepared {
            Some(p) => Step::Activate {
                id: p.id.clone(),
                retire: others(auths, kind, node, &p.id),
                why,
            },
            None => Step::Replace {
                retire: others(auths, kind, node, ""),
                why,
            },
        };
        return Plan {
            current: None,
            step: Some(step),
        };
    };
    let was_requested = requested(requests, kind, node, active);
    let frac = age_fraction(active, t);
    let step = match c.prepared {
        None if was_requested || frac >= r.prepare_fraction => Some(Step::Prepare {
            retire: vec![],
            why: if was_requested {
                "rotation requested by an operator"
            } else {
                "scheduled: the active JWT key reached rotation.prepare_fraction"
            },
        }),
        Some(p) => {
            let due = was_requested || frac >= r.activate_fraction;
            let published = t - issued_at(p) >= window(was_requested, policy);
            // A key about to expire is replaced by the prepared one, published or not.
            ((due && published) || active.not_after - t <= 1).then(|| Step::Activate {
                id: p.id.clone(),
                retire: others(auths, kind, node, &p.id),
                why: if active.not_after - t <= 1 {
                    "the active JWT key expires"
                } else if was_requested {
                    "rotation requested by an operator, published for the propagation window"
                } else {
                    "scheduled: the active JWT key reached rotation.activate_fraction"
                },
            })
        }
        None => None,
    };
    Plan {
        current: Some(active.id.clone()),
        step,
    }
}

#[cfg(test)]
mod tests;
