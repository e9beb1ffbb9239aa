//! The rules: how each [`Command`] changes the state, one file per kind of record.
//!
//! [`apply`] runs in the caller's transaction (the replication layer's, which also records
//! the applied log position). A rule that refuses a command returns
//! [`Response::Rejected`] before it writes anything, so a refused command leaves the state
//! as it was; an `Err` is a storage failure, and the caller rolls the transaction back.

mod agents;
mod authorities;
mod entries;
mod join_tokens;
mod rotation;

use rusqlite::Connection;

use crate::command::{Command, RejectCode, Response};
use crate::Result;

/// Applies `cmd`, the command at log `index`, to the state in `tx`.
pub fn apply(tx: &Connection, cmd: &Command, index: u64) -> Result<Response> {
    match cmd {
        Command::Batch { commands } => Ok(Response::Batch(
            commands
                .iter()
                .map(|c| {
                    if c.batchable() {
                        apply(tx, c, index)
                    } else {
                        Ok(rejected(
                            RejectCode::FailedPrecondition,
                            "this command cannot be part of a batch",
                        ))
                    }
                })
                .collect::<Result<_>>()?,
        )),
        Command::CreateEntry { entry } => entries::create(tx, entry),
        Command::UpdateEntry { entry } => entries::update(tx, entry),
        Command::DeleteEntry { id } => entries::delete(tx, id),
        Command::CreateJoinToken { token } => join_tokens::create(tx, token),
        Command::AttestWithJoinToken { token, now, agent } => {
            join_tokens::attest(tx, token, *now, agent)
        }
        Command::RegisterAgent { agent } => agents::register(tx, agent),
        Command::RenewAgent {
            spiffe_id,
            serial,
            expires_at,
            caller_serial,
        } => agents::renew(tx, spiffe_id, serial, *expires_at, caller_serial),
        Command::EvictAgent { spiffe_id } => agents::evict(tx, spiffe_id),
        Command::BanAgent { spiffe_id } => agents::ban(tx, spiffe_id),
        Command::PutAuthority { authority } => authorities::put(tx, authority, index),
        Command::SetAuthorityState { id, state, at } => {
            authorities::set_state(tx, id, *state, *at, index)
        }
        Command::KeyDestroyed { id, at } => authorities::key_destroyed(tx, id, *at),
        Command::RequestRotation { request } => rotation::request(tx, request),
    }
}

fn rejected(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

/// Runs a one-statement change; the number of rows it changed.
fn change(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    Ok(tx.prepare_cached(sql)?.execute(params)?)
}

fn not_found_unless_changed(n: usize, message: impl FnOnce() -> String) -> Response {
    if n == 0 {
        rejected(RejectCode::NotFound, message())
    } else {
        Response::Ok
    }
}
