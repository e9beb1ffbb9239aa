//! Test support: a throwaway in-memory CA that issues X.509-SVIDs and JWT-SVIDs, so the
//! Workload API and the cache can be exercised without a CA node. Not for production use.

use ca_identity::{JwtAuthority, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

/// A self-signed root for one trust domain, plus a JWT signing key.
pub struct TestCa {
    trust_domain: TrustDomain,
    issuer: CertifiedIssuer<'static, KeyPair>,
    jwt_key: EcdsaKeyPair,
    jwt_kid: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestCa({})", self.trust_domain)
    }
}

fn at(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).expect("valid time")
}

impl TestCa {
    /// A new CA for `trust_domain`. Panics on bad input (test code).
    pub fn new(trust_domain: &str) -> Self {
        let td = TrustDomain::new(trust_domain).expect("trust domain");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into().expect("uri"))];
        let now = ca_identity::unix_now();
        params.not_before = at(now - 60);
        params.not_after = at(now + 86_400);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("root");
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("jwt key");
        let jwt_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .expect("jwt key");
        Self {
            trust_domain: td,
            issuer,
            jwt_key,
            jwt_kid: format!("kid-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// The bundle: the root and the JWT key.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: vec![self.root_der()],
            jwt_authorities: vec![JwtAuthority {
                key_id: self.jwt_kid.clone(),
                public_key: p256_spki(self.jwt_key.public_key().as_ref()),
                expires_at: ca_identity::unix_now() + 86_400,
            }],
            sequence_number: 1,
            refresh_hint: 60,
        }
    }

    /// Issues a leaf X.509-SVID for `spiffe_id` valid for `ttl_secs`: (chain DER, PKCS#8 key DER).
    pub fn issue(&self, spiffe_id: &str, ttl_secs: i64) -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let chain = self.issue_for(spiffe_id, ttl_secs, &key);
        (chain, key.serialize_der())
    }

    /// Issues a leaf SVID for a public key (a key pair, or the key of a parsed CSR). A
    /// negative `ttl_secs` gives an already expired certificate.
    pub fn issue_for(
        &self,
        spiffe_id: &str,
        ttl_secs: i64,
        key: &impl rcgen::PublicKeyData,
    ) -> Vec<Vec<u8>> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        let now = ca_identity::unix_now();
        params.not_before = at((now - 10).min(now + ttl_secs - 60));
        params.not_after = at(now + ttl_secs);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            uuid::Uuid::new_v4().as_bytes(),
        ));
        let cert = params.signed_by(key, &self.issuer).expect("leaf");
        vec![cert.der().to_vec()]
    }

    /// Signs a DER PKCS#10 CSR: a leaf SVID for `spiffe_id` with the CSR's key (the CSR's
    /// own subject and SANs are ignored, as a CA node does).
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        spiffe_id: &str,
        ttl_secs: i64,
    ) -> Result<Vec<Vec<u8>>, String> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let csr =
            rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| e.to_string())?;
        Ok(self.issue_for(spiffe_id, ttl_secs, &csr.public_key))
    }

    /// Mints a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl_secs`.
    pub fn jwt(&self, spiffe_id: &str, audience: &[String], ttl_secs: i64) -> String {
        let id = SpiffeId::parse(spiffe_id).expect("spiffe id");
        let now = ca_identity::unix_now();
        let input = ca_identity::jwt::signing_input(
            ca_identity::pubkey::KeyKind::EcP256,
            &self.jwt_kid,
            &id,
            audience,
            now,
            now + ttl_secs,
        );
        let sig = self
            .jwt_key
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        ca_identity::jwt::assemble(&input, sig.as_ref())
    }
}

/// Wraps an uncompressed P-256 point in a SubjectPublicKeyInfo.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut out = PREFIX.to_vec();
    out.extend_from_slice(point);
    out
}
