//! Checks of certificate chains: signatures with this workspace's verifier, and a full path
//! validation by an independent implementation (the `openssl` CLI).

use std::process::Command;

/// Panics unless `child_der` is signed by the key of `issuer_der`.
pub fn verify_signed_by(child_der: &[u8], issuer_der: &[u8]) {
    let (_, child) = x509_parser::parse_x509_certificate(child_der).expect("child certificate");
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer_der).expect("issuer certificate");
    ca_identity::pubkey::verify_x509_signature(
        issuer.public_key().raw,
        child.tbs_certificate.as_ref(),
        &child.signature_value.data,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{} is not signed by {}: {e}",
            child.subject(),
            issuer.subject()
        )
    });
}

/// DER certificates as concatenated PEM.
pub fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// `openssl verify -x509_strict` of `chain[0]` through the rest of `chain` to `roots`, for
/// TLS clients and servers; and a control without the intermediates that must fail.
/// Panics with openssl's output when it does not verify.
pub fn openssl_verify(roots: &[Vec<u8>], chain: &[Vec<u8>]) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let bundle = dir.path().join("bundle.pem");
    let untrusted = dir.path().join("untrusted.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&bundle, pem_certs(roots)).expect("bundle.pem");
    std::fs::write(&untrusted, pem_certs(&chain[1..])).expect("untrusted.pem");
    std::fs::write(&leaf, pem_certs(&chain[..1])).expect("leaf.pem");
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl CLI (Debian package openssl)")
    };
    for purpose in ["sslclient", "sslserver"] {
        let out = run(&[
            "verify".as_ref(),
            "-x509_strict".as_ref(),
            "-purpose".as_ref(),
            purpose.as_ref(),
            "-CAfile".as_ref(),
            bundle.as_os_str(),
            "-untrusted".as_ref(),
            untrusted.as_os_str(),
            leaf.as_os_str(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": OK"),
            "openssl verify -purpose {purpose} failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if chain.len() > 1 {
        let out = run(&[
            "verify".as_ref(),
            "-CAfile".as_ref(),
            bundle.as_os_str(),
            leaf.as_os_str(),
        ]);
        assert!(
            !out.status.success(),
            "openssl verify succeeded without the intermediates"
        );
    }
}
