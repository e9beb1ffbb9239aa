//! The key manager tests against SoftHSM2 and a KMS emulator, one binary.

mod aws_kms;
mod common;
mod conformance;
mod pkcs11;
