//! The chaos scenarios, one binary; each takes the one-at-a-time lock (`common::solo`), so timings are measured on a machine that runs nothing else of this binary.

mod common;
mod deploy_kit;
mod deploying;
mod join_token;
mod leader_kill;
mod observability;
mod parallel_joins;
mod partitions;
mod pause_restart_wipe;
