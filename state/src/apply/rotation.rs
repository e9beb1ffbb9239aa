//! Rotation requests: at most one per kind of authority and node; a newer one replaces it.

use rusqlite::{params, Connection};

use super::change;
use crate::command::Response;
use crate::records::RotationRequest;
use crate::Result;

pub(super) fn request(tx: &Connection, r: &RotationRequest) -> Result<Response> {
    change(
        tx,
        "INSERT OR REPLACE INTO rotation_requests(kind, node_id, requested_at, replaces) VALUES (?,?,?,?)",
        params![r.kind.as_str(), r.node_id, r.requested_at, r.replaces],
    )?;
    Ok(Response::Ok)
}
