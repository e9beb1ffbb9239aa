//! Keys that exist only in this process's memory (ring ECDSA). Used for "memory mode"
//! intermediates, whose compromise window is their short lifetime, and by the soft backend.

use std::fmt;

use async_trait::async_trait;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};

use crate::{Error, KeyAlgorithm, Result, SigningKey};

/// An ECDSA key held in RAM.
pub struct MemoryKey {
    name: String,
    alg: KeyAlgorithm,
    pair: EcdsaKeyPair,
    spki: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for MemoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryKey({}, {})", self.name, self.alg)
    }
}

fn ring_alg(alg: KeyAlgorithm, backend: &'static str) -> Result<&'static EcdsaSigningAlgorithm> {
    match alg {
        KeyAlgorithm::EcP256 => Ok(&ECDSA_P256_SHA256_ASN1_SIGNING),
        KeyAlgorithm::EcP384 => Ok(&ECDSA_P384_SHA384_ASN1_SIGNING),
        other => Err(Error::Unsupported {
            backend,
            what: format!("{other} keys (only ec-p256 and ec-p384)"),
        }),
    }
}

/// SPKI DER for an uncompressed EC point.
pub fn ec_spki(alg: KeyAlgorithm, point: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { id-ecPublicKey, namedCurve }
    let curve: &[u8] = match alg {
        KeyAlgorithm::EcP384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        _ => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
    };
    let ec_oid: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let mut alg_id = vec![0x30, (ec_oid.len() + curve.len()) as u8];
    alg_id.extend_from_slice(ec_oid);
    alg_id.extend_from_slice(curve);
    let mut bits = vec![0x03, (point.len() + 1) as u8, 0x00];
    bits.extend_from_slice(point);
    let body_len = alg_id.len() + bits.len();
    let mut out = vec![0x30, body_len as u8];
    out.extend(alg_id);
    out.extend(bits);
    out
}

impl MemoryKey {
    /// Generates a key, returning it and its PKCS#8 document (for backends that persist it;
    /// wiped from memory when dropped).
    pub fn generate(
        name: &str,
        alg: KeyAlgorithm,
        backend: &'static str,
    ) -> Result<(Self, zeroize::Zeroizing<Vec<u8>>)> {
        let ring_alg = ring_alg(alg, backend)?;
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(ring_alg, &rng)
            .map_err(|_| Error::Backend("key generation failed".into()))?;
        let key = Self::from_pkcs8(name, alg, pkcs8.as_ref(), backend)?;
        Ok((key, zeroize::Zeroizing::new(pkcs8.as_ref().to_vec())))
    }

    /// Loads a key from a PKCS#8 document.
    pub fn from_pkcs8(
        name: &str,
        alg: KeyAlgorithm,
        pkcs8: &[u8],
        backend: &'static str,
    ) -> Result<Self> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(ring_alg(alg, backend)?, pkcs8, &rng).map_err(|e| {
            Error::Backend(format!("key {name:?} is not a valid {alg} PKCS#8 key: {e}"))
        })?;
        let spki = ec_spki(alg, pair.public_key().as_ref());
        Ok(Self {
            name: name.to_owned(),
            alg,
            pair,
            spki,
            rng,
        })
    }

    /// Signs synchronously (the key is local).
    pub fn sign_now(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| Error::Backend("signing failed".into()))
    }
}

#[async_trait]
impl SigningKey for MemoryKey {
    fn name(&self) -> &str {
        &self.name
    }
    fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }
    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }
    async fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.sign_now(msg)
    }
}
