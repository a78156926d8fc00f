//! Errors of the typed client. Messages carry codes, server messages and
//! endpoints, never tokens, keys or plaintext.

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint URL or its TLS settings were refused by the transport.
    #[error("invalid endpoint {endpoint:?}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// An endpoint URL whose scheme is neither `http://` nor `https://`.
    #[error("invalid endpoint {endpoint:?}: it must start with http:// or https://")]
    EndpointScheme {
        /// The endpoint as configured.
        endpoint: String,
    },
    /// An `https://` endpoint without a CA certificate.
    #[error("an https endpoint needs a CA certificate (PEM)")]
    TlsNeedsCa,
    /// TLS settings for an `http://` endpoint.
    #[error("TLS settings need an https:// endpoint")]
    TlsNeedsHttps,
    /// A bearer token with a plaintext endpoint that is not on this machine.
    #[error(
        "refusing to send a bearer token over plaintext to a non-loopback endpoint: use https://"
    )]
    TokenNeedsTls,
    /// The connection could not be established.
    #[error("cannot connect to the kms server at {endpoint}")]
    Connect {
        /// The endpoint as configured.
        endpoint: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The bearer token is empty or not a valid header value.
    #[error("the bearer token must be non-empty visible ASCII")]
    InvalidToken,
    /// The server (or the transport) answered with a non-OK status.
    ///
    /// Display: `NOT_FOUND: key alias/x not found` (the code's gRPC name, then
    /// the server's message, which may contain any characters: escape it before
    /// writing it to a terminal), with ` (after N attempts)` when the call was
    /// retried.
    #[error("{}", display_rpc(*code, message, *attempts))]
    Rpc {
        /// The RPC name, e.g. `GenerateDataKey`.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message as the server wrote it, followed by the chain of
        /// causes of a transport failure (e.g. the TLS alert behind a bare
        /// "transport error").
        message: String,
        /// Attempts made (more than 1 only for retryable calls).
        attempts: u32,
    },
    /// A successful reply lacks a field the client needs.
    #[error("the server's {rpc} reply has no {field}")]
    MissingField {
        /// The RPC name.
        rpc: &'static str,
        /// The missing field.
        field: &'static str,
    },
}

impl Error {
    /// The gRPC status code of an [`Error::Rpc`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn display_rpc(code: tonic::Code, message: &str, attempts: u32) -> String {
    let mut text = kms_proto::code_name(code).to_owned();
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    if attempts > 1 {
        text.push_str(&format!(" (after {attempts} attempts)"));
    }
    text
}

/// The status message and, for a transport failure, its causes: tonic says
/// only "transport error", while the user needs the reason behind it (a TLS
/// alert such as `CertificateRequired` or `UnknownCA`, a refused connection).
pub(crate) fn status_message(status: &tonic::Status) -> String {
    let causes = std::iter::successors(std::error::Error::source(status), |cause| cause.source())
        .map(ToString::to_string);
    join_causes(std::iter::once(status.message().to_owned()).chain(causes))
}

/// An error and its causes as one line, `outer: inner: innermost`, saying
/// each thing once. Transport errors (hyper, rustls, std::io) often repeat
/// their source in their own message, so that the plain join reads
/// "tcp connect error: tcp connect error: Connection refused"; here a cause
/// already said by an earlier part is skipped, and a cause that extends the
/// part before it (contains it) replaces that part.
pub fn join_causes(texts: impl IntoIterator<Item = String>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for text in texts {
        let text = text.trim().to_owned();
        if text.is_empty() || parts.iter().any(|part| part.contains(&text)) {
            continue;
        }
        match parts.last_mut() {
            Some(last) if text.contains(last.as_str()) => *last = text,
            _ => parts.push(text),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: tonic::Code, message: &str, attempts: u32) -> Error {
        Error::Rpc {
            rpc: "DescribeKey",
            code,
            message: message.to_owned(),
            attempts,
        }
    }

    #[test]
    fn rpc_errors_display_the_code_name_and_the_message() {
        assert_eq!(
            rpc(tonic::Code::NotFound, "key alias/x not found", 1).to_string(),
            "NOT_FOUND: key alias/x not found"
        );
        assert_eq!(
            rpc(tonic::Code::Unavailable, "", 1).to_string(),
            "UNAVAILABLE"
        );
        assert_eq!(
            rpc(tonic::Code::Unavailable, "the HSM is unavailable", 3).to_string(),
            "UNAVAILABLE: the HSM is unavailable (after 3 attempts)"
        );
    }

    #[test]
    fn causes_are_said_once() {
        let join = |parts: &[&str]| join_causes(parts.iter().map(|p| (*p).to_owned()));
        assert_eq!(
            join(&[
                "transport error",
                "tcp connect error",
                "tcp connect error: Connection refused",
                "Connection refused"
            ]),
            "transport error: tcp connect error: Connection refused"
        );
        assert_eq!(
            join(&["UnknownIssuer", "invalid peer certificate: UnknownIssuer"]),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            join(&[
                "invalid URL, scheme is missing",
                "invalid URL, scheme is missing"
            ]),
            "invalid URL, scheme is missing"
        );
        assert_eq!(
            join(&[
                "cannot listen on 127.0.0.1:1",
                "Address already in use (os error 98)"
            ]),
            "cannot listen on 127.0.0.1:1: Address already in use (os error 98)"
        );
    }

    #[test]
    fn status_messages_keep_their_text() {
        let status = tonic::Status::invalid_argument("invalid ciphertext");
        assert_eq!(status_message(&status), "invalid ciphertext");
    }
}
