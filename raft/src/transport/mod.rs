//! How replicas talk: the client side ([`network`], one unary gRPC call per Raft RPC on a
//! cached channel per peer), the server side ([`service`], [`crate::RaftGrpc`]), who may
//! call it ([`policy`]), and the protobuf conversions (`pb`).

pub mod network;
pub(crate) mod pb;
pub mod policy;
pub mod service;
