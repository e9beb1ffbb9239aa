//! The schedule, rule by rule. Every authority here lives 1200 s from `not_before` (no
//! certificate, so no backdating): prepared at 600 s, activated at 1000 s; the propagation
//! window is 300 s (on schedule: min(300, (5/6 - 1/2) * 1200 = 400) = 300).

use super::*;

const ME: &str = "ca-1";

fn auth(
    id: &str,
    kind: AuthorityKind,
    state: AuthorityState,
    node: &str,
    born: i64,
) -> AuthorityRecord {
    AuthorityRecord {
        id: id.into(),
        kind,
        state,
        node_id: if kind == AuthorityKind::Root {
            String::new()
        } else {
            node.into()
        },
        key_backend: "soft".into(),
        key_id: format!("key-{id}"),
        cert_der: vec![],
        public_key: vec![],
        not_before: born,
        not_after: born + 1200,
        key_destroyed: false,
    }
}

use AuthorityKind::{Intermediate as Int, Jwt, Root};
use AuthorityState::{Active, Prepared, Retired, Revoked};

fn request(kind: AuthorityKind, node: &str, replaces: &str) -> RotationRequest {
    RotationRequest {
        kind,
        node_id: node.into(),
        requested_at: 0,
        replaces: replaces.into(),
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn keep(current: &str) -> Plan {
    Plan {
        current: Some(current.into()),
        step: None,
    }
}

fn plan(current: Option<&str>, step: Step) -> Plan {
    Plan {
        current: current.map(str::to_owned),
        step: Some(step),
    }
}

fn prepare(retire: &[&str], why: &'static str) -> Step {
    Step::Prepare {
        retire: ids(retire),
        why,
    }
}

fn activate(id: &str, retire: &[&str], why: &'static str) -> Step {
    Step::Activate {
        id: id.into(),
        retire: ids(retire),
        why,
    }
}

fn replace(retire: &[&str], why: &'static str) -> Step {
    Step::Replace {
        retire: ids(retire),
        why,
    }
}

struct Case {
    name: &'static str,
    kind: AuthorityKind,
    auths: Vec<AuthorityRecord>,
    requests: Vec<RotationRequest>,
    t: i64,
    leader: bool,
    usable: Usable,
    want: Plan,
}

fn case(
    name: &'static str,
    kind: AuthorityKind,
    auths: Vec<AuthorityRecord>,
    t: i64,
    want: Plan,
) -> Case {
    Case {
        name,
        kind,
        auths,
        requests: vec![],
        t,
        leader: true,
        usable: Usable::ALL,
        want,
    }
}

const NOT_USABLE: &str = "the active intermediate is not usable (signed by a root that is no longer active, or a memory-mode key lost with the previous process)";
const NO_JWT: &str = "this node had no usable active JWT key";

fn cases() -> Vec<Case> {
    vec![
        // ---- roots ----
        case("the first root is made, active at once", Root, vec![], 0,
            plan(None, replace(&[], "there is no active root"))),
        case("a fresh root just signs", Root, vec![auth("r1", Root, Active, "", 0)], 599, keep("r1")),
        case("a root half-way through its life gets a prepared successor", Root,
            vec![auth("r1", Root, Active, "", 0)], 600,
            plan(Some("r1"), prepare(&[], "scheduled: the active root reached rotation.prepare_fraction"))),
        Case { leader: false, ..case("only the leader rotates the root", Root,
            vec![auth("r1", Root, Active, "", 0)], 900, keep("r1")) },
        case("the prepared root waits for activate_fraction", Root,
            vec![auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 600)], 999, keep("r1")),
        case("at activate_fraction the published successor activates; the old root and strays retire", Root,
            vec![auth("r0", Root, Prepared, "", 300), auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 600)], 1001,
            plan(Some("r1"), activate("r2", &["r1", "r0"], "scheduled: the active root reached rotation.activate_fraction"))),
        case("a successor prepared late waits until it was published for the window", Root,
            vec![auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 800)], 1099, keep("r1")),
        case("... and then activates", Root,
            vec![auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 800)], 1100,
            plan(Some("r1"), activate("r2", &["r1"], "scheduled: the active root reached rotation.activate_fraction"))),
        Case { requests: vec![request(Root, "", "r1")], ..case("an operator's request prepares at once", Root,
            vec![auth("r1", Root, Active, "", 0)], 10,
            plan(Some("r1"), prepare(&[], "rotation requested by an operator"))) },
        Case { requests: vec![request(Root, "", "r1")], ..case("a requested root waits for the propagation window", Root,
            vec![auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 10)], 309, keep("r1")) },
        Case { requests: vec![request(Root, "", "r1")], ..case("... then activates", Root,
            vec![auth("r1", Root, Active, "", 0), auth("r2", Root, Prepared, "", 10)], 310,
            plan(Some("r1"), activate("r2", &["r1"], "rotation requested by an operator, published for the propagation window"))) },
        Case { requests: vec![request(Root, "", "r0")], ..case("a request for a root that is gone is done", Root,
            vec![auth("r1", Root, Active, "", 0)], 10, keep("r1")) },
        Case { leader: false, ..case("with no active root, any node activates the prepared one at once", Root,
            vec![auth("r1", Root, Active, "", -1200), auth("r2", Root, Prepared, "", -100)], 0,
            plan(None, activate("r2", &[], "there was no active root"))) },

        // ---- intermediates ----
        case("a node without an intermediate makes one", Int,
            vec![auth("r1", Root, Active, "", 0), auth("i-other", Int, Active, "ca-2", 0)], 5,
            plan(None, replace(&[], "this node has no active intermediate"))),
        case("a fresh intermediate just signs", Int, vec![auth("i1", Int, Active, ME, 0)], 599, keep("i1")),
        case("half-way, the next intermediate is prepared", Int, vec![auth("i1", Int, Active, ME, 0)], 600,
            plan(Some("i1"), prepare(&[], "scheduled: the active intermediate reached rotation.prepare_fraction"))),
        Case { usable: Usable { active: true, prepared: false }, ..case("a prepared one that cannot be used is retired and made again", Int,
            vec![auth("i1", Int, Active, ME, 0), auth("i2", Int, Prepared, ME, 600)], 700,
            plan(Some("i1"), prepare(&["i2"], "scheduled: the active intermediate reached rotation.prepare_fraction"))) },
        case("at activate_fraction the prepared one activates at once (intermediates are not published)", Int,
            vec![auth("i1", Int, Active, ME, 0), auth("i2", Int, Prepared, ME, 990)], 1001,
            plan(Some("i1"), activate("i2", &["i1"], "scheduled: the active intermediate reached rotation.activate_fraction"))),
        case("an expired intermediate is replaced by a new one", Int,
            vec![auth("i1", Int, Active, ME, 0)], 1200,
            plan(None, replace(&["i1"], "the active intermediate expired"))),
        Case { usable: Usable { active: false, prepared: true }, ..case("an unusable active one gives way to a usable prepared one", Int,
            vec![auth("i1", Int, Active, ME, 0), auth("i2", Int, Prepared, ME, 600)], 700,
            plan(None, activate("i2", &["i1"], NOT_USABLE))) },
        Case { usable: Usable { active: false, prepared: false }, ..case("... or to a new one", Int,
            vec![auth("i1", Int, Active, ME, 0), auth("i2", Int, Prepared, ME, 600)], 700,
            plan(None, replace(&["i1", "i2"], NOT_USABLE))) },
        Case { requests: vec![request(Int, ME, "i1")], ..case("an operator's request replaces it at once", Int,
            vec![auth("i1", Int, Active, ME, 0)], 10,
            plan(Some("i1"), replace(&["i1"], "rotation requested by an operator"))) },
        Case { requests: vec![request(Int, "ca-2", "i1")], ..case("a request for another node is not ours", Int,
            vec![auth("i1", Int, Active, ME, 0)], 10, keep("i1")) },
        case("a revoked intermediate is no candidate: a new one is made", Int,
            vec![auth("i1", Int, Revoked, ME, 0), auth("i0", Int, Retired, ME, -600)], 10,
            plan(None, replace(&[], "this node has no active intermediate"))),
        Case { leader: false, ..case("followers rotate their own intermediates", Int,
            vec![auth("i1", Int, Active, ME, 0)], 600,
            plan(Some("i1"), prepare(&[], "scheduled: the active intermediate reached rotation.prepare_fraction"))) },

        // ---- JWT keys ----
        case("a node without a JWT key makes one, active at once", Jwt, vec![], 0,
            plan(None, replace(&[], NO_JWT))),
        case("an expired JWT key is replaced by the prepared one at once", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0), auth("j2", Jwt, Prepared, ME, 1150)], 1200,
            plan(None, activate("j2", &["j1"], NO_JWT))),
        case("half-way, the next JWT key is prepared (and published)", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0)], 600,
            plan(Some("j1"), prepare(&[], "scheduled: the active JWT key reached rotation.prepare_fraction"))),
        case("at activate_fraction the published key activates", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0), auth("j2", Jwt, Prepared, ME, 600)], 1001,
            plan(Some("j1"), activate("j2", &["j1"], "scheduled: the active JWT key reached rotation.activate_fraction"))),
        case("a key prepared late is published for the window first", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0), auth("j2", Jwt, Prepared, ME, 900)], 1010, keep("j1")),
        case("... unless the active key expires within a second", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0), auth("j2", Jwt, Prepared, ME, 1100)], 1199,
            plan(Some("j1"), activate("j2", &["j1"], "the active JWT key expires"))),
        Case { requests: vec![request(Jwt, ME, "j1")], ..case("an operator's request prepares at once ...", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0)], 10,
            plan(Some("j1"), prepare(&[], "rotation requested by an operator"))) },
        Case { requests: vec![request(Jwt, ME, "j1")], ..case("... and activates after the propagation window", Jwt,
            vec![auth("j1", Jwt, Active, ME, 0), auth("j2", Jwt, Prepared, ME, 10)], 310,
            plan(Some("j1"), activate("j2", &["j1"], "rotation requested by an operator, published for the propagation window"))) },
        case("another node's JWT keys are not ours", Jwt,
            vec![auth("j9", Jwt, Active, "ca-2", 0)], 10,
            plan(None, replace(&[], NO_JWT))),
    ]
}

#[test]
fn every_rule_of_the_schedule() {
    let mut failed = Vec::new();
    for c in cases() {
        let policy = Policy {
            node_id: ME.into(),
            rotation: Rotation::default(),
            ttl: 1200,
            leader: c.leader,
        };
        let got = next_step(c.kind, &c.auths, &c.requests, c.t, &policy, c.usable);
        if got != c.want {
            failed.push(format!(
                "{}:\n  want {:?}\n  got  {:?}",
                c.name, c.want, got
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn candidates_are_the_newest_of_each_state() {
    let auths = [
        auth("i0", Int, Active, ME, -2000),
        auth("i1", Int, Active, ME, 0),
        auth("i2", Int, Prepared, ME, -1300),
        auth("i3", Int, Prepared, ME, 500),
        auth("i4", Int, Active, "ca-2", 100),
    ];
    let c = candidates(Int, &auths, ME, 600);
    assert_eq!(c.active.map(|a| a.id.as_str()), Some("i1"));
    assert_eq!(c.prepared.map(|a| a.id.as_str()), Some("i3"));
    // An expired active intermediate is still reported (its plan says it expired);
    // an expired prepared one is not a candidate.
    let c = candidates(Int, &auths[..3], ME, 1300);
    assert_eq!(c.active.map(|a| a.id.as_str()), Some("i1"));
    assert_eq!(c.prepared, None);
}
