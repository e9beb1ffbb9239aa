//! Where a replica keeps its state: the Raft log ([`log_store`]), the state machine over
//! the CA's state database ([`state_machine`]: grouped commits around `ca_state::apply`),
//! and the snapshot folder (`snapshot_dir`; the files are [`crate::snapshot`]'s), each SQLite connection on a thread of its own (`db`).

pub(crate) mod db;
pub mod log_store;
pub(crate) mod sm_store;
pub(crate) mod snapshot_dir;
pub mod state_machine;
