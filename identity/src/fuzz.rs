//! Fuzz targets for everything this crate parses on behalf of a hostile caller: SPIFFE
//! IDs, selectors, JWT-SVIDs, certificates and chains, public keys, PEM bundles. Each
//! target feeds arbitrary bytes (and mutations of a valid input, which reach deeper) and
//! checks that nothing panics and that what is accepted is consistent.
//!
//! Under `cargo test` each target first replays its committed corpus
//! (`src/__fuzz__/<target>/corpus/`, grown coverage-guided with libFuzzer by
//! `ops/scripts/fuzz-corpus.sh`; a `crashes/` directory beside it is replayed too), then
//! runs bolero's random engine for one second (`BOLERO_RANDOM_TEST_TIME_MS` or
//! `BOLERO_RANDOM_ITERATIONS` to change it; a failure prints the `BOLERO_RANDOM_SEED` that
//! reproduces it).

use ca_test_support::fuzz::mutate;

use crate::{jwt, pubkey, x509, Selector, SpiffeId, TrustDomain};

#[test]
fn fuzz_spiffe_ids_and_trust_domains() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let s = String::from_utf8_lossy(bytes);
        if let Ok(id) = SpiffeId::parse(&s) {
            let again = SpiffeId::parse(id.as_str()).expect("an accepted ID parses again");
            assert_eq!(again, id);
            assert!(id.as_str().len() <= 2048);
        }
        if let Ok(td) = TrustDomain::new(&s) {
            assert_eq!(TrustDomain::new(td.as_str()).unwrap(), td);
        }
    });
}

#[test]
fn fuzz_selectors() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let s = String::from_utf8_lossy(bytes);
        if let Ok(sel) = Selector::parse(&s) {
            sel.validate().expect("a parsed selector validates");
            assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        }
    });
}

#[test]
fn fuzz_jwt_svids() {
    let signer = jwt::tests::signer();
    let good = signer.sign(&jwt::tests::header(), &jwt::tests::claims());
    bolero::check!().for_each(|ops: &[u8]| {
        for token in [
            String::from_utf8_lossy(&mutate(good.as_bytes(), ops)).into_owned(),
            String::from_utf8_lossy(ops).into_owned(),
        ] {
            let _ = jwt::decode_unverified(&token);
            if let Ok(v) = jwt::validate(&token, "example.org", &signer.keys, "aud", 1000) {
                // Only the signed claims can pass (base64 may spell them differently).
                assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/w");
            }
        }
        let auds: Vec<String> = ops
            .split(|b| *b == b',')
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let _ = jwt::check_audience(&auds);
    });
}

#[test]
fn fuzz_certificates_and_chains() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/w".try_into().unwrap(),
    )];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let leaf = params.self_signed(&key).unwrap().der().to_vec();
    x509::check_leaf_svid(&leaf).expect("the seed is a valid leaf");
    bolero::check!().for_each(|ops: &[u8]| {
        for der in [mutate(&leaf, ops), ops.to_vec()] {
            let _ = x509::cert_info(&der);
            let _ = x509::spiffe_id_of(&der);
            let _ = x509::check_leaf_svid(&der);
            let _ = x509::check_signing_cert(&der);
            if let Ok(parts) = x509::split_concatenated_der(&der) {
                assert_eq!(parts.concat(), der, "a split chain covers every byte");
            }
            if let Ok(info) = x509::cert_info(&der) {
                let _ = pubkey::parse_spki(&info.spki_der);
            }
        }
        let _ = pubkey::parse_spki(ops);
        let _ = pubkey::ecdsa_der_to_fixed(ops, 32);
        let _ = crate::bundle::certs_from_pem(&String::from_utf8_lossy(ops));
    });
}
