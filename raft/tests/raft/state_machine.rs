//! State machine behaviour: rules, durability across reopen, idempotent replay.

use ca_raft::*;
use ca_state::{
    AgentRecord, AuthorityKind, AuthorityRecord, AuthorityState, Command, EntryRecord,
    JoinTokenRecord, RejectCode, Response, RotationRequest, SelectorRecord, CA_NODE_JOIN,
};

fn entry(id: &str, spiffe: &str, parent: &str) -> EntryRecord {
    EntryRecord {
        id: id.into(),
        spiffe_id: spiffe.into(),
        parent_id: parent.into(),
        selectors: vec![SelectorRecord {
            kind: "unix".into(),
            value: "uid:1001".into(),
        }],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        admin: false,
        hint: String::new(),
        created_at: 1,
        revision: 0,
    }
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.into(),
        attestation_type: "join_token".into(),
        x509_svid_serial: "01".into(),
        x509_svid_expires_at: 100,
        previous_x509_svid_serial: String::new(),
        banned: false,
        attested_at: 1,
        selectors: vec![],
    }
}

const AGENT: &str = "spiffe://td/agent/join_token/t1";

/// The IDs of `entries`, sorted.
fn sorted_ids(entries: Vec<EntryRecord>) -> Vec<String> {
    let mut ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn entries_tokens_agents_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let sm = StateMachine::open(&path).await.unwrap();
        let p = LocalProposer::new(sm.clone());
        let e = entry("e1", "spiffe://td/service/metald", AGENT);
        assert!(matches!(
            p.propose(Command::CreateEntry { entry: e.clone() })
                .await
                .unwrap(),
            Response::Entry(_)
        ));
        // The same create again (a retried write, applied twice): the same answer.
        assert_eq!(
            p.propose(Command::CreateEntry { entry: e.clone() })
                .await
                .unwrap(),
            Response::Entry(e.clone())
        );
        // Another entry under that ID: refused.
        let mut other = e.clone();
        other.spiffe_id = "spiffe://td/service/other".into();
        match p
            .propose(Command::CreateEntry { entry: other })
            .await
            .unwrap()
        {
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                message,
            } => assert!(message.contains("entry e1 exists"), "{message}"),
            other => panic!("{other:?}"),
        }
        // Same SPIFFE ID, parent and selectors under another ID: refused, nothing stored.
        let dup = entry("e2", "spiffe://td/service/metald", AGENT);
        match p
            .propose(Command::CreateEntry { entry: dup })
            .await
            .unwrap()
        {
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                message,
            } => assert!(message.contains("e1")),
            other => panic!("{other:?}"),
        }
        // Nested entry: authorized transitively.
        p.propose(Command::CreateEntry {
            entry: entry(
                "e3",
                "spiffe://td/service/child",
                "spiffe://td/service/metald",
            ),
        })
        .await
        .unwrap();
        p.propose(Command::CreateEntry {
            entry: entry("e4", "spiffe://td/service/other", "spiffe://td/agent/x"),
        })
        .await
        .unwrap();
        assert_eq!(
            sorted_ids(sm.authorized_entries(AGENT).await.unwrap()),
            vec!["e1", "e3"]
        );
        // A cycle (child -> metald -> child) ends the walk instead of looping.
        p.propose(Command::CreateEntry {
            entry: entry(
                "e5",
                "spiffe://td/service/metald",
                "spiffe://td/service/child",
            ),
        })
        .await
        .unwrap();
        assert_eq!(
            sorted_ids(sm.authorized_entries(AGENT).await.unwrap()),
            vec!["e1", "e3", "e5"]
        );
        p.propose(Command::DeleteEntry { id: "e5".into() })
            .await
            .unwrap();

        // Update bumps the revision; update of a missing entry is refused.
        let mut upd = e.clone();
        upd.dns_names = vec!["metald.local".into()];
        match p
            .propose(Command::UpdateEntry { entry: upd })
            .await
            .unwrap()
        {
            Response::Entry(x) => assert_eq!(x.revision, 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.propose(Command::UpdateEntry {
                entry: entry("nope", "spiffe://td/x", AGENT)
            })
            .await
            .unwrap(),
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));

        // Join token: used once, then refused; an expired one refused.
        p.propose(Command::CreateJoinToken {
            token: JoinTokenRecord {
                token: "t1".into(),
                spiffe_id: AGENT.into(),
                expires_at: 50,
                used_at: None,
            },
        })
        .await
        .unwrap();
        p.propose(Command::CreateJoinToken {
            token: JoinTokenRecord {
                token: "t2".into(),
                spiffe_id: "spiffe://td/agent/b".into(),
                expires_at: 5,
                used_at: None,
            },
        })
        .await
        .unwrap();
        assert!(matches!(
            p.propose(Command::AttestWithJoinToken {
                token: "t1".into(),
                now: 10,
                agent: agent(AGENT)
            })
            .await
            .unwrap(),
            Response::Agent(_)
        ));
        match p
            .propose(Command::AttestWithJoinToken {
                token: "t1".into(),
                now: 11,
                agent: agent(AGENT),
            })
            .await
            .unwrap()
        {
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                message,
            } => assert!(message.contains("already used")),
            other => panic!("{other:?}"),
        }
        match p
            .propose(Command::AttestWithJoinToken {
                token: "t2".into(),
                now: 10,
                agent: agent("spiffe://td/agent/b"),
            })
            .await
            .unwrap()
        {
            Response::Rejected { message, .. } => assert!(message.contains("expired")),
            other => panic!("{other:?}"),
        }
        assert!(
            sm.agent("spiffe://td/agent/b").await.unwrap().is_none(),
            "a refused attestation stores nothing"
        );
        // Ban: re-registration refused.
        p.propose(Command::BanAgent {
            spiffe_id: AGENT.into(),
        })
        .await
        .unwrap();
        assert!(matches!(
            p.propose(Command::RegisterAgent {
                agent: agent(AGENT)
            })
            .await
            .unwrap(),
            Response::Rejected {
                code: RejectCode::PermissionDenied,
                ..
            }
        ));
        assert!(matches!(
            p.propose(Command::RenewAgent {
                spiffe_id: AGENT.into(),
                serial: "02".into(),
                expires_at: 9,
                caller_serial: String::new(),
            })
            .await
            .unwrap(),
            Response::Rejected {
                code: RejectCode::PermissionDenied,
                ..
            }
        ));
    }
    // Everything survives a reopen.
    let sm = StateMachine::open(&path).await.unwrap();
    assert_eq!(sm.entries().await.unwrap().len(), 3);
    assert_eq!(
        sm.entry("e1").await.unwrap().unwrap().dns_names,
        vec!["metald.local"]
    );
    assert!(sm.agent(AGENT).await.unwrap().unwrap().banned);
    assert!(sm
        .join_token("t1")
        .await
        .unwrap()
        .unwrap()
        .used_at
        .is_some());
    let last = sm.last_applied();
    assert!(last >= 10);
    // Replaying an already-applied index is a no-op.
    let r = sm
        .apply(1, &Command::DeleteEntry { id: "e1".into() })
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    assert!(sm.entry("e1").await.unwrap().is_some());
    assert_eq!(sm.last_applied(), last);
}

fn root(id: &str, state: AuthorityState, not_after: i64) -> AuthorityRecord {
    AuthorityRecord {
        id: id.into(),
        kind: AuthorityKind::Root,
        state,
        node_id: String::new(),
        key_backend: "soft".into(),
        key_id: id.into(),
        cert_der: vec![1, 2, 3],
        public_key: vec![4],
        not_before: 1,
        not_after,
        key_destroyed: false,
    }
}

/// The answer's rejection message, or a panic if it was accepted.
fn rejection(r: Response) -> (RejectCode, String) {
    match r {
        Response::Rejected { code, message } => (code, message),
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test]
async fn authority_lifecycle_is_judged_at_the_decision_time() {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachine::open(&dir.path().join("s.db")).await.unwrap();
    let p = LocalProposer::new(sm.clone());
    let set = |id: &str, state, at| Command::SetAuthorityState {
        id: id.into(),
        state,
        at,
    };
    let destroy = |id: &str, at| Command::KeyDestroyed { id: id.into(), at };
    let put = |authority| Command::PutAuthority { authority };
    p.propose(put(root("root-1", AuthorityState::Active, 1000)))
        .await
        .unwrap();

    // The only active root is not retired, whatever the time says.
    let (code, why) = rejection(
        p.propose(set("root-1", AuthorityState::Retired, 5000))
            .await
            .unwrap(),
    );
    assert_eq!(code, RejectCode::FailedPrecondition);
    assert!(why.contains("only active root"), "{why}");
    // Nor is its key destroyed.
    let (_, why) = rejection(p.propose(destroy("root-1", 5000)).await.unwrap());
    assert!(why.contains("it is active"), "{why}");

    // A successor: not activated after it expired, activated before.
    p.propose(put(root("root-2", AuthorityState::Prepared, 2000)))
        .await
        .unwrap();
    let (_, why) = rejection(
        p.propose(set("root-2", AuthorityState::Active, 2000))
            .await
            .unwrap(),
    );
    assert!(why.contains("cannot be activated"), "{why}");
    assert_eq!(
        p.propose(set("root-2", AuthorityState::Active, 500))
            .await
            .unwrap(),
        Response::Ok
    );
    assert_eq!(
        p.propose(set("root-1", AuthorityState::Retired, 500))
            .await
            .unwrap(),
        Response::Ok
    );

    // A retired authority's key goes only once the authority has expired at the decision
    // time: a clock running ahead is what the leader refuses before this point; a decision
    // that reaches the log early is refused here.
    let (code, why) = rejection(p.propose(destroy("root-1", 999)).await.unwrap());
    assert_eq!(code, RejectCode::FailedPrecondition);
    assert!(why.contains("valid until 1000"), "{why}");
    assert!(!sm.authorities().await.unwrap()[0].key_destroyed);
    assert_eq!(
        p.propose(destroy("root-1", 1001)).await.unwrap(),
        Response::Ok
    );
    let got = sm.authorities().await.unwrap();
    let r1 = got.iter().find(|a| a.id == "root-1").unwrap();
    assert_eq!(r1.state, AuthorityState::Retired);
    assert!(r1.key_destroyed);

    for cmd in [set("x", AuthorityState::Active, 1), destroy("x", 1)] {
        assert_eq!(
            rejection(p.propose(cmd).await.unwrap()).0,
            RejectCode::NotFound
        );
    }
}

#[tokio::test]
async fn applied_log_id_and_membership_are_stored_with_the_batch() {
    use ca_raft::types::{Entry, EntryPayload, LogId, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let log_id = |term, index| LogId::new(openraft::CommittedLeaderId::new(term, 1), index);
    let members = BTreeMap::from([(
        1u64,
        NodeInfo {
            addr: "127.0.0.1:1".into(),
            node_id: "ca-1".into(),
        },
    )]);
    let membership = Membership::new(vec![BTreeSet::from([1u64])], members);
    let batch = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Membership(membership.clone()),
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Normal(Command::CreateEntry {
                entry: entry("e1", "spiffe://td/service/a", AGENT),
            }),
        },
        Entry {
            log_id: log_id(2, 3),
            payload: EntryPayload::Blank,
        },
    ];
    {
        let sm = StateMachine::open(&path).await.unwrap();
        let out = sm.apply_entries(batch.clone()).await.unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Response::Ok);
        assert!(matches!(out[1], Response::Entry(_)));
        assert_eq!(out[2], Response::Ok);
        assert_eq!(sm.last_applied(), 3);
        sm.commit_applied().await.unwrap();
    }
    // Committed with the batch, and a replay of the same entries changes nothing.
    let sm = StateMachine::open(&path).await.unwrap();
    let (last, stored) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(2, 3)));
    assert_eq!(stored.log_id(), &Some(log_id(1, 1)));
    assert_eq!(stored.membership(), &membership);
    let out = sm.apply_entries(batch[1..].to_vec()).await.unwrap();
    assert_eq!(out, vec![Response::Ok, Response::Ok]);
    assert_eq!(sm.entries().await.unwrap().len(), 1);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(2, 3)));
}

/// A batch is applied in order, each command answered on its own; a command that may not be
/// batched is refused inside it and the rest still apply.
#[tokio::test]
async fn batch_answers_each_command() {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachine::open(&dir.path().join("state.db"))
        .await
        .unwrap();
    let p = LocalProposer::new(sm.clone());
    let e1 = entry("e1", "spiffe://td/service/a", AGENT);
    let e1_twin = entry("e2", "spiffe://td/service/a", AGENT);
    let e3 = entry("e3", "spiffe://td/service/b", AGENT);
    let resp = p
        .propose(Command::Batch {
            commands: vec![
                Command::CreateEntry { entry: e1.clone() },
                Command::CreateEntry { entry: e1_twin },
                Command::Batch { commands: vec![] },
                Command::CreateEntry { entry: e3.clone() },
                Command::DeleteEntry { id: "e1".into() },
            ],
        })
        .await
        .unwrap();
    let Response::Batch(rs) = resp else {
        panic!("{resp:?}")
    };
    assert_eq!(rs.len(), 5);
    assert_eq!(rs[0], Response::Entry(e1));
    assert!(
        matches!(&rs[1], Response::Rejected { code: RejectCode::AlreadyExists, message } if message.contains("e1")),
        "{:?}",
        rs[1]
    );
    assert!(
        matches!(
            &rs[2],
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ),
        "{:?}",
        rs[2]
    );
    assert_eq!(rs[3], Response::Entry(e3));
    assert_eq!(rs[4], Response::Ok);
    assert_eq!(sorted_ids(sm.entries().await.unwrap()), vec!["e3"]);
}

/// The CA watch wakes on changes to the CA journal and rotation requests, not on entries.
#[tokio::test]
async fn ca_watch_ignores_entry_writes() {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachine::open(&dir.path().join("state.db"))
        .await
        .unwrap();
    let p = LocalProposer::new(sm.clone());
    let mut ca = sm.subscribe_ca();
    ca.mark_unchanged();
    p.propose(Command::CreateEntry {
        entry: entry("e1", "spiffe://td/service/a", AGENT),
    })
    .await
    .unwrap();
    assert!(
        !ca.has_changed().unwrap(),
        "an entry write woke the CA watch"
    );
    p.propose(Command::RequestRotation {
        request: RotationRequest {
            kind: AuthorityKind::Intermediate,
            node_id: "ca-1".into(),
            requested_at: 5,
            replaces: String::new(),
        },
    })
    .await
    .unwrap();
    assert!(ca.has_changed().unwrap());
    assert_eq!(*ca.borrow_and_update(), sm.last_applied());
}

/// Log ID `index` of term 1, leader 1.
fn log_id_at(index: u64) -> ca_raft::types::LogId {
    ca_raft::types::LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
}

/// The log entry at `index` that creates the entry `id`.
fn create_at(index: u64, id: &str) -> ca_raft::types::Entry {
    ca_raft::types::Entry {
        log_id: log_id_at(index),
        payload: ca_raft::types::EntryPayload::Normal(Command::CreateEntry {
            entry: entry(id, &format!("spiffe://td/service/{id}"), AGENT),
        }),
    }
}

/// How many entries the state file at `path` holds for another connection.
fn entries_on_disk(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM entries", [], |r| r.get(0))
        .unwrap()
}

/// Applied batches are committed in groups (see `ca_raft::store::state_machine`): a read sees every
/// batch applied before it, other connections (a backup copy, the next start) get them from
/// the checkpoint timer at the latest, and batches lost with the process are applied again
/// from the log to the same state.
#[tokio::test]
async fn grouped_commits_are_read_at_once_reach_the_disk_and_replay_to_the_same_state() {
    use ca_raft::types::Entry;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let create = |i: u64| create_at(i, &format!("e{i}"));
    let on_disk = || entries_on_disk(&path);

    let sm = StateMachine::open(&path).await.unwrap();
    // Each read right after its write sees it.
    for i in 1..=40 {
        sm.apply_entries(vec![create(i)]).await.unwrap();
        let id = format!("e{i}");
        assert!(sm.entry(&id).await.unwrap().is_some(), "{id} read back");
    }
    // With no read at all, another connection sees the rest soon.
    for i in 41..=60 {
        sm.apply_entries(vec![create(i)]).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_disk() != 60 {
        assert!(
            Instant::now() < deadline,
            "only {} of 60 on disk",
            on_disk()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_crash = sm.entries().await.unwrap();

    // A "crash" with batches applied but not committed: the process drops them, and the
    // log applies them again. Here the store is copied as it is on disk while batches are
    // open, which is what a SIGKILL leaves.
    for i in 61..=70 {
        sm.apply_entries(vec![create(i)]).await.unwrap();
    }
    let crashed = dir.path().join("crashed.db");
    {
        let c = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.execute("VACUUM INTO ?", [crashed.to_str().unwrap()])
            .unwrap();
    }
    sm.commit_applied().await.unwrap();
    let expected = sm.entries().await.unwrap();
    assert_eq!(expected.len(), 70);
    drop(sm);

    let sm = StateMachine::open(&crashed).await.unwrap();
    let (last, _) = sm.applied_state().await.unwrap();
    let last = last.map(|l| l.index).unwrap_or(0);
    assert!((60..=70).contains(&last), "the copy holds up to {last}");
    assert!(sm.entries().await.unwrap().len() >= before_crash.len());
    // openraft applies the log from the last applied entry on; an overlap is skipped.
    let replay: Vec<Entry> = (last.saturating_sub(3).max(1)..=70).map(create).collect();
    sm.apply_entries(replay).await.unwrap();
    assert_eq!(
        sorted_ids(sm.entries().await.unwrap()),
        sorted_ids(expected)
    );
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id_at(70)));
}

/// A batch that fails midway (here a trigger refuses one row, as a full disk or a damaged
/// page would) leaves nothing of itself in the group of uncommitted batches, the batches
/// applied before it stay, and the next batch applies on top of them.
#[tokio::test]
async fn a_failed_batch_in_a_group_leaves_nothing_and_keeps_the_ones_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let sm = StateMachine::open(&path).await.unwrap();
    sm.apply_entries(vec![create_at(1, "a")]).await.unwrap();
    sm.commit_applied().await.unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON entries WHEN NEW.id = 'boom'
             BEGIN SELECT RAISE(ABORT, 'refused for the test'); END;",
        )
        .unwrap();

    // Two batches in the open group, then one that fails after its first command applied.
    sm.apply_entries(vec![create_at(2, "b")]).await.unwrap();
    sm.apply_entries(vec![create_at(3, "c")]).await.unwrap();
    let err = sm
        .apply_entries(vec![create_at(4, "d"), create_at(5, "boom")])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused for the test"), "{err}");

    assert_eq!(
        sorted_ids(sm.entries().await.unwrap()),
        vec!["a", "b", "c"],
        "nothing of the failed batch, everything before it"
    );
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id_at(3)));
    // On disk as well, for other connections.
    assert_eq!(entries_on_disk(&path), 3);

    // The log applies it again (openraft would, after a restart); the next batch goes on top.
    sm.apply_entries(vec![create_at(4, "d"), create_at(5, "e")])
        .await
        .unwrap();
    sm.commit_applied().await.unwrap();
    drop(sm);
    let sm = StateMachine::open(&path).await.unwrap();
    assert_eq!(
        sorted_ids(sm.entries().await.unwrap()),
        vec!["a", "b", "c", "d", "e"]
    );
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id_at(5)));
}

#[tokio::test]
async fn join_token_kinds_and_final_revocation_hold_in_the_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachine::open(&dir.path().join("s.db")).await.unwrap();
    let p = LocalProposer::new(sm.clone());
    let token = |t: &str, id: &str| Command::CreateJoinToken {
        token: JoinTokenRecord {
            token: t.into(),
            spiffe_id: id.into(),
            expires_at: 1_000,
            used_at: None,
        },
    };
    const NODE: &str = "spiffe://td/ca-node/n-4";
    p.propose(token("node", NODE)).await.unwrap();
    p.propose(token("agent", AGENT)).await.unwrap();
    let attest = |t: &str, a: AgentRecord| Command::AttestWithJoinToken {
        token: t.into(),
        now: 10,
        agent: a,
    };
    let refused = |r: Response, want: &str| match r {
        Response::Rejected {
            code: RejectCode::PermissionDenied,
            message,
        } => assert!(message.contains(want), "{message}"),
        other => panic!("{other:?}"),
    };
    // A ca-node's token redeemed as an agent, an agent's as a ca-node, a token for another
    // ID: refused, and nothing consumed.
    refused(
        p.propose(attest("node", agent(NODE))).await.unwrap(),
        "for a ca-node",
    );
    let as_node = |id: &str| AgentRecord {
        attestation_type: CA_NODE_JOIN.into(),
        ..agent(id)
    };
    refused(
        p.propose(attest("agent", as_node(AGENT))).await.unwrap(),
        "for an agent",
    );
    refused(
        p.propose(attest("agent", agent("spiffe://td/agent/other")))
            .await
            .unwrap(),
        "not for spiffe://td/agent/other",
    );
    for t in ["node", "agent"] {
        assert_eq!(sm.join_token(t).await.unwrap().unwrap().used_at, None);
    }
    assert!(sm.agents().await.unwrap().is_empty());
    // Each for its own kind and ID: redeemed.
    assert!(matches!(
        p.propose(attest("node", as_node(NODE))).await.unwrap(),
        Response::Agent(_)
    ));
    assert!(matches!(
        p.propose(attest("agent", agent(AGENT))).await.unwrap(),
        Response::Agent(_)
    ));

    // Revocation is final: neither a state change nor a replacement undoes it.
    let a = AuthorityRecord {
        id: "int-1".into(),
        kind: AuthorityKind::Intermediate,
        state: AuthorityState::Active,
        node_id: "n-1".into(),
        key_backend: "soft".into(),
        key_id: "int-1".into(),
        cert_der: vec![1],
        public_key: vec![2],
        not_before: 1,
        not_after: 2,
        key_destroyed: false,
    };
    p.propose(Command::PutAuthority {
        authority: a.clone(),
    })
    .await
    .unwrap();
    p.propose(Command::SetAuthorityState {
        id: "int-1".into(),
        state: AuthorityState::Revoked,
        at: 1,
    })
    .await
    .unwrap();
    for cmd in [
        Command::SetAuthorityState {
            id: "int-1".into(),
            state: AuthorityState::Active,
            at: 1,
        },
        Command::PutAuthority { authority: a },
    ] {
        match p.propose(cmd).await.unwrap() {
            Response::Rejected { message, .. } => {
                assert!(message.contains("revocation is final"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        sm.authorities().await.unwrap()[0].state,
        AuthorityState::Revoked
    );
}
