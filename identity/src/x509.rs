//! Reading certificates: the SPIFFE ID in a URI SAN, and the X509-SVID standard's rules
//! for leaf SVIDs and signing certificates.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{Error, SpiffeId};

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::InvalidX509Svid(format!("not a DER certificate: {e}")))
}

/// What the CA and its tests need to know of a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// The SPIFFE ID of its one URI SAN, if it has exactly one.
    pub spiffe_id: Option<SpiffeId>,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
    /// Whether basicConstraints says cA=true.
    pub is_ca: bool,
    /// SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
    /// Subject Key Identifier, if present.
    pub subject_key_id: Option<Vec<u8>>,
    /// Authority Key Identifier, if present.
    pub authority_key_id: Option<Vec<u8>>,
}

/// Reads the basics of a certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, Error> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    let spiffe_id = match uris.as_slice() {
        [one] => SpiffeId::parse(one).ok(),
        _ => None,
    };
    let mut ski = None;
    let mut aki = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                ski = Some(k.0.to_vec())
            }
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => {}
        }
    }
    Ok(CertInfo {
        spiffe_id,
        serial_hex: hex_lower(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert
            .basic_constraints()
            .ok()
            .flatten()
            .map(|b| b.value.ca)
            .unwrap_or(false),
        spki_der: cert.public_key().raw.to_vec(),
        subject_key_id: ski,
        authority_key_id: aki,
    })
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Result<Vec<&'a str>, Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::InvalidX509Svid(format!("bad subjectAltName: {e}")))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID of a certificate: its one and only URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, Error> {
    let cert = parse(der)?;
    match uri_sans(&cert)?.as_slice() {
        [one] => SpiffeId::parse(one),
        [] => Err(Error::InvalidX509Svid(
            "the certificate has no URI SAN".into(),
        )),
        many => Err(Error::InvalidX509Svid(format!(
            "the certificate has {} URI SANs; an SVID has exactly one",
            many.len()
        ))),
    }
}

/// Checks a leaf X.509-SVID against the X509-SVID standard and returns its SPIFFE ID:
/// exactly one URI SAN holding a SPIFFE ID with a non-empty path; basicConstraints with
/// cA=false; a critical keyUsage with digitalSignature and neither keyCertSign nor cRLSign.
pub fn check_leaf_svid(der: &[u8]) -> Result<SpiffeId, Error> {
    let id = spiffe_id_of(der)?;
    if id.path().is_empty() {
        return Err(Error::InvalidX509Svid(
            "a leaf SVID's SPIFFE ID must have a path".into(),
        ));
    }
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| Error::InvalidX509Svid(e.to_string()))?
        .ok_or_else(|| Error::InvalidX509Svid("no basicConstraints extension".into()))?;
    if bc.value.ca {
        return Err(Error::InvalidX509Svid(
            "a leaf SVID must have cA=false".into(),
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| Error::InvalidX509Svid(e.to_string()))?
        .ok_or_else(|| Error::InvalidX509Svid("no keyUsage extension".into()))?;
    if !ku.critical {
        return Err(Error::InvalidX509Svid("keyUsage must be critical".into()));
    }
    if !ku.value.digital_signature() {
        return Err(Error::InvalidX509Svid(
            "a leaf SVID's keyUsage must include digitalSignature".into(),
        ));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(Error::InvalidX509Svid(
            "a leaf SVID's keyUsage must not include keyCertSign or cRLSign".into(),
        ));
    }
    Ok(id)
}

/// Checks a signing (CA) certificate against the X509-SVID standard: cA=true, a critical
/// keyUsage with keyCertSign, and if it has a SPIFFE ID, one without a path.
pub fn check_signing_cert(der: &[u8]) -> Result<(), Error> {
    let cert = parse(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| Error::InvalidX509Svid(e.to_string()))?
        .ok_or_else(|| Error::InvalidX509Svid("no basicConstraints extension".into()))?;
    if !bc.value.ca || !bc.critical {
        return Err(Error::InvalidX509Svid(
            "a signing certificate needs a critical basicConstraints with cA=true".into(),
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| Error::InvalidX509Svid(e.to_string()))?
        .ok_or_else(|| Error::InvalidX509Svid("no keyUsage extension".into()))?;
    if !ku.critical || !ku.value.key_cert_sign() {
        return Err(Error::InvalidX509Svid(
            "a signing certificate needs a critical keyUsage with keyCertSign".into(),
        ));
    }
    if let Ok(id) = spiffe_id_of(der) {
        if !id.path().is_empty() {
            return Err(Error::InvalidX509Svid(
                "a signing certificate's SPIFFE ID must not have a path".into(),
            ));
        }
    }
    Ok(())
}

/// Splits a DER chain given as concatenated certificates.
pub fn split_concatenated_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = X509Certificate::from_der(bytes)
            .map_err(|e| Error::InvalidX509Svid(format!("bad certificate in chain: {e}")))?;
        let used = bytes.len() - rest.len();
        out.push(bytes[..used].to_vec());
        bytes = rest;
    }
    Ok(out)
}
