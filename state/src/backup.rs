//! Copies of the state database, and seeding a new cluster with one.
//!
//! - [`save_copy`]: a consistent copy (`VACUUM INTO`) of a database that is being written,
//!   what `ca-node snapshot save` writes.
//! - [`check_copy`]: whether a file is an intact copy of the state, with every table.
//! - [`reset_for_new_cluster`]: makes a copy the state of a **new** cluster. The replication
//!   layer's bookkeeping (last applied entry, old membership) is dropped; every node's
//!   intermediate and JWT key is retired (their keys may not exist where the restore
//!   happens; each node makes new ones, and retired JWT keys stay published until they
//!   expire); the old members' ca-node identities are forgotten. Entries, agents, join
//!   tokens and the roots are kept.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::schema::{self, TABLES};
use crate::{Error, Result};

fn file_err(what: &str, p: &Path, e: impl std::fmt::Display) -> Error {
    Error::File(format!("{what} {}: {e}", p.display()))
}

fn connect(p: &Path, read_only: bool) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    let c = Connection::open_with_flags(p, flags).map_err(|e| file_err("opening", p, e))?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| file_err("opening", p, e))?;
    Ok(c)
}

/// Writes a consistent copy of the state database `state` to `out` (which must not exist),
/// readable by its owner only, while others write `state`.
pub fn save_copy(state: &Path, out: &Path) -> Result<()> {
    let c = connect(state, true)?;
    let out_str = out
        .to_str()
        .ok_or_else(|| Error::File(format!("non-UTF-8 path {}", out.display())))?;
    c.execute("VACUUM INTO ?", [out_str])
        .map_err(|e| file_err("copying", state, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| file_err("setting permissions on", out, e))
}

/// The index of the last log entry applied to the state database at `p` (0 if none).
pub fn applied_index(p: &Path) -> Result<u64> {
    let c = connect(p, true)?;
    schema::applied_index(&c).map_err(|e| file_err("reading", p, e))
}

/// Checks that `p` is an intact copy of the state: SQLite's `quick_check` passes and every
/// table of [`TABLES`] is there. [`Error::NotState`] says what is wrong.
pub fn check_copy(p: &Path) -> Result<()> {
    let not_state = |e: &dyn std::fmt::Display| {
        Error::NotState(format!("{} is not a state backup: {e}", p.display()))
    };
    let c = connect(p, true).map_err(|e| not_state(&e))?;
    let check: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| not_state(&e))?;
    if check != "ok" {
        return Err(Error::NotState(format!(
            "{} is damaged: {check}",
            p.display()
        )));
    }
    for table in TABLES {
        let n: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                [table],
                |r| r.get(0),
            )
            .map_err(|e| file_err("reading", p, e))?;
        if n == 0 {
            return Err(not_state(&format!("it has no {table} table")));
        }
    }
    Ok(())
}

/// What [`reset_for_new_cluster`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    /// Intermediates and JWT keys retired.
    pub retired_authorities: u64,
    /// ca-node identities forgotten.
    pub forgotten_nodes: u64,
}

/// Resets the copy at `p` (not in use by anyone) to be the state of a new cluster (see the
/// module docs). The file is complete by itself afterwards (rollback journal, synced).
pub fn reset_for_new_cluster(p: &Path) -> Result<Reset> {
    let mut c = connect(p, false)?;
    let write = |e| file_err("writing", p, e);
    c.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))
        .map_err(write)?;
    c.pragma_update(None, "synchronous", "FULL")
        .map_err(write)?;
    let tx = c.transaction().map_err(write)?;
    let version = crate::query::authorities_version(&tx)?;
    let retired = tx
        .execute(
            "UPDATE authorities SET state = 'retired', updated = ? WHERE kind IN ('intermediate', 'jwt') AND state IN ('active', 'prepared')",
            [version + 1],
        )
        .map_err(write)?;
    let forgotten = tx
        .execute(
            "DELETE FROM agents WHERE spiffe_id LIKE 'spiffe://%/ca-node/%'",
            [],
        )
        .map_err(write)?;
    schema::clear_replication_values(&tx)?;
    schema::set_applied_index(&tx, None)?;
    tx.commit().map_err(write)?;
    Ok(Reset {
        retired_authorities: retired as u64,
        forgotten_nodes: forgotten as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{apply, AgentRecord, AuthorityKind, AuthorityRecord, AuthorityState, Command};

    fn authority(id: &str, kind: AuthorityKind) -> AuthorityRecord {
        AuthorityRecord {
            id: id.into(),
            kind,
            state: AuthorityState::Active,
            node_id: "ca-1".into(),
            key_backend: "memory".into(),
            key_id: id.into(),
            cert_der: vec![1],
            public_key: vec![2],
            not_before: 0,
            not_after: i64::MAX,
            key_destroyed: false,
        }
    }

    fn agent(id: &str) -> AgentRecord {
        AgentRecord {
            spiffe_id: id.into(),
            attestation_type: "join_token".into(),
            x509_svid_serial: "01".into(),
            x509_svid_expires_at: 1,
            previous_x509_svid_serial: String::new(),
            banned: false,
            attested_at: 0,
            selectors: vec![],
        }
    }

    #[test]
    fn a_reset_copy_keeps_roots_and_agents_and_retires_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("state.db");
        let c = Connection::open(&live).expect("open");
        schema::create(&c).expect("schema");
        for (i, cmd) in [
            Command::PutAuthority {
                authority: authority("root-1", AuthorityKind::Root),
            },
            Command::PutAuthority {
                authority: authority("int-1", AuthorityKind::Intermediate),
            },
            Command::RegisterAgent {
                agent: agent("spiffe://example.org/host/a"),
            },
            Command::RegisterAgent {
                agent: agent("spiffe://example.org/ca-node/ca-1"),
            },
        ]
        .iter()
        .enumerate()
        {
            apply(&c, cmd, i as u64 + 1).expect("apply");
        }
        schema::set_applied_index(&c, Some(4)).expect("applied");
        schema::set_replication_value(&c, "membership", "{}").expect("replication");

        let copy = dir.path().join("copy.db");
        save_copy(&live, &copy).expect("save");
        check_copy(&copy).expect("an intact copy");
        assert_eq!(applied_index(&copy).expect("index"), 4);
        let reset = reset_for_new_cluster(&copy).expect("reset");
        assert_eq!(
            reset,
            Reset {
                retired_authorities: 1,
                forgotten_nodes: 1
            }
        );
        let c = Connection::open(&copy).expect("open copy");
        let states: Vec<_> = crate::query::authorities(&c)
            .expect("authorities")
            .into_iter()
            .map(|a| (a.id, a.state))
            .collect();
        assert_eq!(
            states,
            [
                ("root-1".to_owned(), AuthorityState::Active),
                ("int-1".to_owned(), AuthorityState::Retired)
            ]
        );
        let agents = crate::query::agents_page(&c, None, None).expect("agents");
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].spiffe_id, "spiffe://example.org/host/a");
        assert_eq!(schema::applied_index(&c).expect("index"), 0);
        assert!(schema::replication_values(&c).expect("values").is_empty());
    }

    #[test]
    fn a_file_that_is_not_the_state_is_refused_with_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a database, just some words here").expect("write");
        let e = check_copy(&text).expect_err("a text file");
        assert!(matches!(e, Error::NotState(_)), "{e:?}");
        assert!(e.to_string().contains("is not a state backup"), "{e}");

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .and_then(|c| c.execute_batch("CREATE TABLE entries (id TEXT)"))
            .expect("other db");
        let e = check_copy(&other).expect_err("a database without the state's tables");
        assert!(e.to_string().contains("it has no meta table"), "{e}");
    }
}
