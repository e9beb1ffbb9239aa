//! Join tokens: created once, redeemed once, before they expire, by the kind of caller
//! (agent or ca-node) and for the SPIFFE ID they were made for.

use rusqlite::{params, Connection};

use super::{agents, change, rejected};
use crate::command::{RejectCode, Response};
use crate::records::{AgentRecord, JoinTokenRecord};
use crate::schema::{query_one, upsert_agent};
use crate::{is_ca_node_id, Result, CA_NODE_JOIN};

pub(super) fn create(tx: &Connection, token: &JoinTokenRecord) -> Result<Response> {
    let n = change(
        tx,
        "INSERT OR IGNORE INTO join_tokens(token, spiffe_id, expires_at, used_at) VALUES (?,?,?,NULL)",
        params![token.token, token.spiffe_id, token.expires_at],
    )?;
    Ok(if n == 0 {
        rejected(RejectCode::AlreadyExists, "that join token exists")
    } else {
        Response::Ok
    })
}

/// Consumes `token` at `now` and registers `agent`, atomically.
pub(super) fn attest(
    tx: &Connection,
    token: &str,
    now: i64,
    agent: &AgentRecord,
) -> Result<Response> {
    let row = query_one(
        tx,
        "SELECT expires_at, used_at, spiffe_id FROM join_tokens WHERE token = ?",
        [token],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, String>(2)?,
            ))
        },
    )?;
    let Some((expires_at, used_at, token_id)) = row else {
        return Ok(rejected(RejectCode::NotFound, "unknown join token"));
    };
    if used_at.is_some() {
        return Ok(rejected(
            RejectCode::FailedPrecondition,
            "join token already used; generate a new one with `ca-node token generate`",
        ));
    }
    if expires_at <= now {
        return Ok(rejected(
            RejectCode::FailedPrecondition,
            "join token expired; generate a new one with `ca-node token generate`",
        ));
    }
    // Two kinds of token: one for a ca-node (`spiffe://TD/ca-node/<id>`, redeemed only by
    // `ca-node join`) and one for an agent; neither is redeemed as the other.
    let node_token = is_ca_node_id(&token_id);
    if node_token != (agent.attestation_type == CA_NODE_JOIN) {
        return Ok(rejected(
            RejectCode::PermissionDenied,
            if node_token {
                "this join token is for a ca-node (`ca-node join`), not for an agent"
            } else {
                "this join token is for an agent, not for a ca-node"
            },
        ));
    }
    if agent.spiffe_id != token_id {
        return Ok(rejected(
            RejectCode::PermissionDenied,
            format!(
                "this join token is for {token_id}, not for {}",
                agent.spiffe_id
            ),
        ));
    }
    if let Some(refused) = agents::refuse_banned(tx, &agent.spiffe_id)? {
        return Ok(refused);
    }
    change(
        tx,
        "UPDATE join_tokens SET used_at = ? WHERE token = ?",
        params![now, token],
    )?;
    upsert_agent(tx, agent)?;
    Ok(Response::Agent(agent.clone()))
}
