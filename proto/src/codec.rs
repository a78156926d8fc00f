//! The protobuf codec of every kms.v1 service (and of the Kubernetes KMS v2
//! plugin service, whose messages follow the same naming rule): tonic-prost's, except that a
//! request that does not decode is the caller's mistake.
//!
//! tonic-prost answers any decode failure with INTERNAL (following gRPC's
//! status-code table, which files parse errors under "the server is broken").
//! For a *request* that is wrong: the server is fine, the bytes the caller
//! sent are not a valid message (truncated varint, wrong wire type, a string
//! that is not UTF-8), and retrying the same bytes never helps, which is what
//! INVALID_ARGUMENT says. A *response* that does not decode (this codec also
//! serves the generated clients) stays INTERNAL: there the peer is broken.
//!
//! Requests and responses are told apart by the message name: every kms.v1
//! RPC takes a `...Request` and returns a `...Response` (checked by a test
//! over the descriptor set).

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Codec for kms.v1 services and clients (set through `codec_path` in
/// build.rs): encodes like [`ProstCodec`]; decoding a request message that is
/// not valid protobuf yields INVALID_ARGUMENT ("malformed request: ...",
/// naming prost's reason, never the bytes) instead of INTERNAL.
#[derive(Debug, Clone)]
pub struct KmsCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for KmsCodec<T, U> {
    fn default() -> Self {
        KmsCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for KmsCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = KmsDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        KmsDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// Decoder of [`KmsCodec`].
#[derive(Debug)]
pub struct KmsDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default + Send + 'static> Decoder for KmsDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            if is_request::<U>() && status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!("malformed request: {}", status.message()))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Whether `U` is a request message (by the naming rule in the module doc).
fn is_request<U>() -> bool {
    std::any::type_name::<U>().ends_with("Request")
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::is_request;
    use crate::FILE_DESCRIPTOR_SET;
    use crate::v1 as pb;

    #[test]
    fn every_rpc_takes_a_request_and_returns_a_response() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut methods = 0;
        for file in fds.file.iter().filter(|f| f.package() == "kms.v1") {
            for service in &file.service {
                for method in &service.method {
                    methods += 1;
                    assert!(
                        method.input_type().ends_with("Request"),
                        "{}: {}",
                        method.name(),
                        method.input_type()
                    );
                    assert!(
                        !method.output_type().ends_with("Request"),
                        "{}: {}",
                        method.name(),
                        method.output_type()
                    );
                }
            }
        }
        assert!(methods > 20, "{methods}");
    }

    #[test]
    fn rust_type_names_follow_the_proto_names() {
        assert!(is_request::<pb::EncryptRequest>());
        assert!(!is_request::<pb::EncryptResponse>());
        assert!(!is_request::<pb::KeyMetadata>());
        use crate::kubernetes_v2 as k8s;
        assert!(is_request::<k8s::StatusRequest>());
        assert!(is_request::<k8s::DecryptRequest>());
        assert!(!is_request::<k8s::StatusResponse>());
        assert!(!is_request::<k8s::EncryptResponse>());
    }
}
