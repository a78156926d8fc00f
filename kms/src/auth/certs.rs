//! The principal of a client certificate. rustls has already verified the
//! chain against the configured client CA; this only reads the identity:
//! the first URI SAN (e.g. a SPIFFE id), else the first DNS SAN, else the
//! subject's CN.
//!
//! A small strict DER reader instead of a full X.509 crate: we need three
//! fields of a certificate that webpki has already parsed and verified, and
//! the usual parser crates change the feature set of the RocksDB build's
//! host dependencies (a 15-minute C++ rebuild on every fresh machine).
//! Anything unexpected is an error, never a guess.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    #[error("the client certificate names no usable principal")]
    NoPrincipal,
}

/// OID 2.5.29.17 (subjectAltName), content bytes.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// OID 2.5.4.3 (commonName), content bytes.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// [3] EXPLICIT, constructed: the extensions of a v3 certificate.
const EXTENSIONS_TAG: u8 = 0xa3;
/// GeneralName choices (context-specific, primitive, IMPLICIT IA5String).
const DNS_NAME: u8 = 0x82;
const URI: u8 = 0x86;
/// Directory string types a CN may use.
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

pub fn principal_from_certificate(der: &[u8]) -> Result<String, CertError> {
    let identity = identity_of(der).ok_or(CertError::Unparsable)?;
    identity
        .uri
        .or(identity.dns)
        .or(identity.common_name)
        .filter(|p| super::is_valid_principal(p))
        .ok_or(CertError::NoPrincipal)
}

#[derive(Debug, Default)]
struct Identity {
    uri: Option<String>,
    dns: Option<String>,
    common_name: Option<String>,
}

fn identity_of(der: &[u8]) -> Option<Identity> {
    let mut outer = Der::new(der);
    let certificate = outer.expect(SEQUENCE)?;
    if !outer.is_empty() {
        return None;
    }
    let mut certificate = Der::new(certificate);
    let mut tbs = Der::new(certificate.expect(SEQUENCE)?);
    // version [0] (optional), serialNumber, signature, issuer, validity.
    if tbs.peek_tag() == Some(0xa0) {
        tbs.any()?;
    }
    for _ in 0..4 {
        tbs.any()?;
    }
    let subject = tbs.expect(SEQUENCE)?;
    tbs.expect(SEQUENCE)?; // subjectPublicKeyInfo
    let mut identity = Identity {
        common_name: common_name(subject)?,
        ..Identity::default()
    };
    while !tbs.is_empty() {
        let (tag, value) = tbs.any()?;
        if tag == EXTENSIONS_TAG {
            subject_alt_names(value, &mut identity)?;
        }
    }
    Some(identity)
}

/// The first CN of a Name (SEQUENCE OF SET OF AttributeTypeAndValue).
fn common_name(name: &[u8]) -> Option<Option<String>> {
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let mut set = Der::new(rdns.expect(SET)?);
        while !set.is_empty() {
            let mut attribute = Der::new(set.expect(SEQUENCE)?);
            let oid = attribute.expect(OID)?;
            let (tag, value) = attribute.any()?;
            if oid == OID_COMMON_NAME {
                return match tag {
                    UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                        Some(Some(std::str::from_utf8(value).ok()?.to_owned()))
                    }
                    _ => Some(None),
                };
            }
        }
    }
    Some(None)
}

/// Reads the SAN extension, if present, from `[3] { SEQUENCE OF Extension }`.
fn subject_alt_names(explicit: &[u8], identity: &mut Identity) -> Option<()> {
    let mut wrapper = Der::new(explicit);
    let mut extensions = Der::new(wrapper.expect(SEQUENCE)?);
    while !extensions.is_empty() {
        let mut extension = Der::new(extensions.expect(SEQUENCE)?);
        let oid = extension.expect(OID)?;
        if extension.peek_tag() == Some(BOOLEAN) {
            extension.any()?;
        }
        let value = extension.expect(OCTET_STRING)?;
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        let mut names_outer = Der::new(value);
        let mut names = Der::new(names_outer.expect(SEQUENCE)?);
        while !names.is_empty() {
            let (tag, name) = names.any()?;
            let slot = match tag {
                URI => &mut identity.uri,
                DNS_NAME => &mut identity.dns,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(std::str::from_utf8(name).ok()?.to_owned());
            }
        }
    }
    Some(())
}

/// A cursor over DER TLVs with single-byte tags (all X.509 uses here) and
/// definite lengths; rejects anything else.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.any()? {
            (t, value) if t == tag => Some(value),
            _ => None,
        }
    }

    fn any(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        if tag & 0x1f == 0x1f {
            return None; // multi-byte tag
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return None; // indefinite or absurd length
            }
            let (bytes, after) = rest.split_at_checked(count)?;
            rest = after;
            bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
        };
        let (value, after) = rest.split_at_checked(len)?;
        self.rest = after;
        Some((tag, value))
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn uri_san_wins_then_dns_san_then_cn() {
        let spiffe = "spiffe://example.org/ns/prod/sa/billing";
        let all = cert(
            vec![
                SanType::DnsName("billing.internal".try_into().expect("dns")),
                SanType::URI(spiffe.try_into().expect("uri")),
            ],
            Some("billing"),
        );
        assert_eq!(principal_from_certificate(&all).expect("uri"), spiffe);
        let dns = cert(
            vec![SanType::DnsName(
                "billing.internal".try_into().expect("dns"),
            )],
            Some("billing"),
        );
        assert_eq!(
            principal_from_certificate(&dns).expect("dns"),
            "billing.internal"
        );
        let cn = cert(Vec::new(), Some("billing"));
        assert_eq!(principal_from_certificate(&cn).expect("cn"), "billing");
    }

    #[test]
    fn certificates_without_an_identity_or_with_odd_names_are_refused() {
        assert!(principal_from_certificate(&cert(Vec::new(), None)).is_err());
        assert!(principal_from_certificate(&cert(Vec::new(), Some("two words"))).is_err());
        assert!(principal_from_certificate(b"not a certificate").is_err());
    }

    #[test]
    fn every_truncation_and_corruption_is_refused_or_parsed_without_panic() {
        let der = cert(
            vec![SanType::URI(
                "spiffe://example.org/a".try_into().expect("uri"),
            )],
            Some("a"),
        );
        for len in 0..der.len() {
            assert!(
                principal_from_certificate(&der[..len]).is_err(),
                "truncated at {len}"
            );
        }
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            // Must not panic; rustls would have refused these anyway.
            let _ = principal_from_certificate(&bad);
        }
    }
}
