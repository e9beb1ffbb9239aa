//! Smoke runs of the load binaries, one binary.

mod smoke;
mod write_smoke;
