//! The principal of a client certificate. rustls has already verified the
//! chain against the configured client CA; this only reads the identity:
//! the first URI SAN (e.g. a SPIFFE id), else the first DNS SAN, else the
//! subject's CN.
//!
//! The certificate and its subjectAltName are read by `rustls-webpki` (the
//! parser rustls verified the chain with, already compiled: no new X.509 crate,
//! whose host dependencies would change the RocksDB build's feature set). webpki
//! exposes the subject only as raw DER, so the CN is read from it by a small
//! strict reader below. Anything unexpected is an error, never a guess.

use tonic::transport::CertificateDer;
use webpki::EndEntityCert;

/// The verified certificate chain (leaf first) a client presented on its
/// TLS connection: a request extension set by the server's connection layer.
#[derive(Debug, Clone)]
pub struct ClientCertificates(pub std::sync::Arc<Vec<CertificateDer<'static>>>);

impl ClientCertificates {
    /// The client's own (leaf) certificate, DER.
    pub fn leaf(&self) -> Option<&[u8]> {
        self.0.first().map(|c| c.as_ref())
    }
}

/// Why no principal could be read from a client certificate. Names nothing from
/// the certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// webpki refused the certificate, or its subject is not a DER Name.
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    /// The chosen name (see the module documentation) is missing or is not a
    /// valid principal (`super::is_valid_principal`).
    #[error("the client certificate names no usable principal")]
    NoPrincipal,
}

/// OID 2.5.4.3 (commonName), content bytes.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// Directory string types a CN may use.
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// The principal named by the DER certificate `der`: its first URI SAN, else its
/// first valid DNS SAN (as webpki's `valid_dns_names` reads them), else its
/// subject CN.
///
/// # Errors
/// [`CertError::Unparsable`] if webpki cannot parse the certificate or its subject
/// is malformed; [`CertError::NoPrincipal`] if it names none of the three or the
/// chosen one is not a valid principal.
pub fn principal_from_certificate(der: &[u8]) -> Result<String, CertError> {
    let der = CertificateDer::from(der);
    let cert = EndEntityCert::try_from(&der).map_err(|_| CertError::Unparsable)?;
    let san = cert
        .valid_uri_names()
        .next()
        .or_else(|| cert.valid_dns_names().next());
    let principal = match san {
        Some(name) => Some(name.to_owned()),
        None => common_name(cert.subject()).ok_or(CertError::Unparsable)?,
    };
    principal
        .filter(|p| super::is_valid_principal(p))
        .ok_or(CertError::NoPrincipal)
}

/// The first CN of a Name's contents (SEQUENCE OF SET OF AttributeTypeAndValue,
/// without the outer SEQUENCE header, as webpki's `Cert::subject` returns it).
/// `None` if malformed; `Some(None)` if there is no CN in a string type.
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

/// A cursor over DER TLVs with single-byte tags (all a Name uses) and definite
/// lengths; rejects anything else.
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
    fn the_first_san_of_a_kind_wins_and_other_san_kinds_are_ignored() {
        let two_uris = cert(
            vec![
                SanType::URI("spiffe://example.org/first".try_into().expect("uri")),
                SanType::URI("spiffe://example.org/second".try_into().expect("uri")),
            ],
            Some("billing"),
        );
        assert_eq!(
            principal_from_certificate(&two_uris).expect("uri"),
            "spiffe://example.org/first"
        );
        let ip_only = cert(
            vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())],
            Some("billing"),
        );
        assert_eq!(principal_from_certificate(&ip_only).expect("cn"), "billing");
        let ip_only_no_cn = cert(
            vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())],
            None,
        );
        assert_eq!(
            principal_from_certificate(&ip_only_no_cn),
            Err(CertError::NoPrincipal)
        );
    }

    #[test]
    fn certificates_without_an_identity_or_with_odd_names_are_refused() {
        assert!(principal_from_certificate(&cert(Vec::new(), None)).is_err());
        assert!(principal_from_certificate(&cert(Vec::new(), Some("two words"))).is_err());
        assert_eq!(
            principal_from_certificate(b"not a certificate"),
            Err(CertError::Unparsable)
        );
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
