//! Page tokens of the List RPCs: opaque to clients, versioned, bound to one
//! listing and its filters, and checked on the way back in.
//!
//! Every listing here reads a set that grows while it is paged (the audit
//! log grows with every request, listing it included; keys, versions and
//! aliases are created concurrently). So that paging always terminates and
//! never returns what did not exist when it started (issue 13), the first
//! page fixes an upper bound and the token carries it, with the cursor, to
//! every later page.
//!
//! Format, version 1: `"v1." + base64url(listing ‖ scope ‖ fields)`, where
//! `listing` is one byte naming the RPC, `scope` the first 8 bytes of the
//! SHA-256 of the request's filters (a token is refused by a request with
//! other filters), and `fields` the cursor and bound, integers big-endian,
//! strings with a u16 length. Tokens are not authenticated: a client that
//! edits one can only choose another cursor or bound inside what its request
//! may list anyway, which the range fields let it do openly. Never holds a
//! secret.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::error::{KmsError, Result};

const PREFIX: &str = "v1.";
/// Longest page token accepted, in characters.
const MAX_TOKEN_CHARS: usize = 1024;
const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Which listing a token belongs to (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    AuditEvents = 1,
    Keys = 2,
    KeyVersions = 3,
    Aliases = 4,
}

/// The digest of a listing's filters that binds a token to them.
fn scope(listing: Listing, filters: &[&[u8]]) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update([listing as u8]);
    for filter in filters {
        // Length-prefixed, so ("ab", "") and ("a", "b") differ.
        hasher.update((filter.len() as u64).to_be_bytes());
        hasher.update(filter);
    }
    let digest = hasher.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Builds a token's fields.
#[derive(Debug)]
pub(crate) struct TokenWriter(Vec<u8>);

impl TokenWriter {
    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A string of at most 65 535 bytes (ids and alias names are far shorter;
    /// a longer one is cut, and then fails to decode as the id it was).
    pub(crate) fn str(&mut self, value: &str) -> &mut Self {
        let bytes = value.as_bytes();
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&bytes[..usize::from(len)]);
        self
    }
}

/// Reads a token's fields; every read fails on a short token.
#[derive(Debug)]
pub(crate) struct TokenReader<'a>(&'a [u8]);

impl<'a> TokenReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }

    pub(crate) fn str(&mut self) -> Option<&'a str> {
        let len = self.take(2)?.try_into().ok().map(u16::from_be_bytes)?;
        std::str::from_utf8(self.take(usize::from(len))?).ok()
    }
}

/// The token for the next page of `listing` with these `filters`.
pub(crate) fn encode(
    listing: Listing,
    filters: &[&[u8]],
    fields: impl FnOnce(&mut TokenWriter),
) -> String {
    let mut writer = TokenWriter(Vec::with_capacity(64));
    writer.0.push(listing as u8);
    writer.0.extend_from_slice(&scope(listing, filters));
    fields(&mut writer);
    let mut token = PREFIX.to_owned();
    BASE64.encode_string(&writer.0, &mut token);
    token
}

/// Decodes a token of `listing` issued for these `filters`; `fields` reads
/// the cursor and bound and may refuse values it cannot use (`None`).
///
/// # Errors
///
/// [`KmsError::InvalidArgument`] (field `page_token`) if the token is not one
/// this server issued for this listing and these filters: not version 1, not
/// base64url, another listing's, other filters', truncated or with bytes left
/// over.
pub(crate) fn decode<T>(
    token: &str,
    listing: Listing,
    filters: &[&[u8]],
    fields: impl FnOnce(&mut TokenReader<'_>) -> Option<T>,
) -> Result<T> {
    let invalid = || KmsError::invalid("page_token", "not a token from a previous page");
    // Our tokens are far shorter (a cursor of at most a 256-byte alias name);
    // do not decode megabytes to find that out.
    if token.len() > MAX_TOKEN_CHARS {
        return Err(invalid());
    }
    let bytes = token
        .strip_prefix(PREFIX)
        .and_then(|b64| BASE64.decode(b64).ok())
        .ok_or_else(invalid)?;
    let mut reader = TokenReader(&bytes);
    let header = reader.take(9).ok_or_else(invalid)?;
    if header[0] != listing as u8 {
        return Err(KmsError::invalid(
            "page_token",
            "a token of another listing",
        ));
    }
    if header[1..] != scope(listing, filters) {
        return Err(KmsError::invalid(
            "page_token",
            "the filters differ from those of the first page",
        ));
    }
    let value = fields(&mut reader).ok_or_else(invalid)?;
    if !reader.0.is_empty() {
        return Err(invalid());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn audit_token(filters: &[&[u8]], after: u64, until: u64) -> String {
        encode(Listing::AuditEvents, filters, |w| {
            w.u64(after).u64(until);
        })
    }

    fn read_audit(token: &str, filters: &[&[u8]]) -> Result<(u64, u64)> {
        decode(token, Listing::AuditEvents, filters, |r| {
            Some((r.u64()?, r.u64()?))
        })
    }

    #[test]
    fn a_token_round_trips_and_is_opaque() {
        let token = audit_token(&[b"key-1", b""], 7, 42);
        assert!(token.starts_with("v1."), "{token}");
        assert!(!token.contains("42"), "{token}");
        assert_eq!(read_audit(&token, &[b"key-1", b""]).unwrap(), (7, 42));
        let strings = encode(Listing::Aliases, &[], |w| {
            w.str("alias/a").str("alias/zz");
        });
        let back = decode(&strings, Listing::Aliases, &[], |r| {
            Some((r.str()?.to_owned(), r.str()?.to_owned()))
        })
        .unwrap();
        assert_eq!(back, ("alias/a".to_owned(), "alias/zz".to_owned()));
    }

    /// Version 1 is a wire format clients hold on to between calls (and
    /// across a server upgrade): changing it must be a deliberate act.
    #[test]
    fn version_1_golden_token() {
        let token = audit_token(&[b"key-1", b""], 7, 42);
        assert_eq!(token, GOLDEN_AUDIT_TOKEN);
        assert_eq!(
            read_audit(GOLDEN_AUDIT_TOKEN, &[b"key-1", b""]).unwrap(),
            (7, 42)
        );
    }

    /// Computed independently (Python: base64url of 0x01, the first 8 bytes of
    /// SHA-256(0x01 ‖ u64be(5) ‖ "key-1" ‖ u64be(0)), u64be(7), u64be(42)).
    const GOLDEN_AUDIT_TOKEN: &str = "v1.AQHWvjpGyu5KAAAAAAAAAAcAAAAAAAAAKg";

    #[test]
    fn foreign_damaged_or_rescoped_tokens_are_invalid_arguments() {
        let token = audit_token(&[b"key-1"], 7, 42);
        let invalid = |result: Result<(u64, u64)>| {
            matches!(
                result,
                Err(KmsError::InvalidArgument {
                    field: "page_token",
                    ..
                })
            )
        };
        // Other filters.
        assert!(invalid(read_audit(&token, &[b"key-2"])));
        assert!(invalid(read_audit(&token, &[b"key-1", b""])));
        // Another listing's token.
        let keys = encode(Listing::Keys, &[b"key-1"], |w| {
            w.u64(7).u64(42);
        });
        assert!(invalid(read_audit(&keys, &[b"key-1"])));
        // Damaged: unversioned, bad base64, truncated, extended.
        assert!(invalid(read_audit("7", &[b"key-1"])));
        assert!(invalid(read_audit(&token[3..], &[b"key-1"])));
        assert!(invalid(read_audit("v1.!!", &[b"key-1"])));
        assert!(invalid(read_audit(&token[..token.len() - 2], &[b"key-1"])));
        let longer = audit_token(&[b"key-1"], 7, 42) + "AAAA";
        assert!(invalid(read_audit(&longer, &[b"key-1"])));
        assert!(invalid(read_audit("v2.AAAA", &[b"key-1"])));
    }
}
