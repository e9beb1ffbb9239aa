//! The raw cost of the cryptography an X.509-SVID cannot do without: one P-256 ECDSA
//! signature (the issuing key signs the certificate) and one verification (the CA checks
//! the CSR's self-signature), measured with `ring` — the primitive the `soft` and in-memory
//! key managers use — on the calling thread, i.e. on one core.
//!
//! A later backend (PKCS#11, a KMS) gets its own raw rate next to this one; see
//! [`RawCost`], which is backend-neutral.

use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::Serialize;

use crate::procstat::thread_cpu;

/// Per-operation cost of signing and verifying, measured on one thread.
#[derive(Clone, Debug, Serialize)]
pub struct RawCost {
    /// What was measured, e.g. `ring ECDSA P-256 SHA-256`.
    pub primitive: String,
    /// Bytes of the signed message.
    pub message_bytes: usize,
    /// Signatures made.
    pub sign_ops: u64,
    /// Thread CPU time per signature, µs.
    pub sign_cpu_us: f64,
    /// Wall time per signature, µs.
    pub sign_wall_us: f64,
    /// Verifications made.
    pub verify_ops: u64,
    /// Thread CPU time per verification, µs.
    pub verify_cpu_us: f64,
    /// Wall time per verification, µs.
    pub verify_wall_us: f64,
}

impl RawCost {
    /// CPU µs of one signature plus one verification.
    pub fn sign_plus_verify_cpu_us(&self) -> f64 {
        self.sign_cpu_us + self.verify_cpu_us
    }

    /// Signatures per second on one core (CPU time).
    pub fn signs_per_core_second(&self) -> f64 {
        if self.sign_cpu_us > 0.0 {
            1e6 / self.sign_cpu_us
        } else {
            0.0
        }
    }
}

/// Runs `op` in rounds of 64 until `budget` of wall time has passed (at least one round);
/// returns (ops, CPU per op µs, wall per op µs).
fn measure(budget: Duration, mut op: impl FnMut()) -> (u64, f64, f64) {
    let (c0, w0) = (thread_cpu(), Instant::now());
    let mut ops = 0u64;
    loop {
        for _ in 0..64 {
            op();
        }
        ops += 64;
        if w0.elapsed() >= budget {
            break;
        }
    }
    let cpu = (thread_cpu() - c0).as_secs_f64() * 1e6 / ops as f64;
    let wall = w0.elapsed().as_secs_f64() * 1e6 / ops as f64;
    (ops, cpu, wall)
}

/// Measures P-256 ECDSA (SHA-256, ASN.1 signatures) signing and verifying `msg` with `ring`,
/// spending about `budget` in total (half each), after a short warm-up.
pub fn p256_ring(msg: &[u8], budget: Duration) -> anyhow::Result<RawCost> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("P-256 key generation failed"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("P-256 key parsing failed"))?;
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let sig = key
        .sign(&rng, msg)
        .map_err(|_| anyhow::anyhow!("P-256 signing failed"))?;
    public
        .verify(msg, sig.as_ref())
        .map_err(|_| anyhow::anyhow!("P-256 verification failed"))?;
    let half = budget / 2;
    let warm = (half / 10).min(Duration::from_millis(200));
    let sign = || {
        let s = key.sign(&rng, std::hint::black_box(msg)).expect("sign");
        std::hint::black_box(s);
    };
    let verify = || {
        let r = public.verify(std::hint::black_box(msg), sig.as_ref());
        assert!(r.is_ok());
    };
    measure(warm, sign);
    let (sign_ops, sign_cpu_us, sign_wall_us) = measure(half, sign);
    measure(warm, verify);
    let (verify_ops, verify_cpu_us, verify_wall_us) = measure(half, verify);
    Ok(RawCost {
        primitive: "ring ECDSA P-256 SHA-256".into(),
        message_bytes: msg.len(),
        sign_ops,
        sign_cpu_us,
        sign_wall_us,
        verify_ops,
        verify_cpu_us,
        verify_wall_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something_plausible() {
        let c = p256_ring(&[7u8; 400], Duration::from_millis(100)).unwrap();
        assert!(c.sign_ops >= 64 && c.verify_ops >= 64);
        assert!(c.sign_wall_us > 0.0 && c.verify_wall_us > 0.0);
        assert!(c.sign_plus_verify_cpu_us() >= 0.0);
    }
}
