//! Hand-written `Debug` for the generated messages that carry secret bytes
//! (plaintext, data keys, random bytes). build.rs turns their derived `Debug` off;
//! these impls print lengths instead of contents, so a `{:?}` in a log line or an
//! error chain can never leak them. Non-secret fields (key ids, versions, the
//! encryption context, which is not secret by contract) are printed normally.

use std::fmt;

use crate::v1::{
    BatchEncryptEntry, DecryptResponse, EncryptRequest, GenerateDataKeyResponse,
    GenerateRandomResponse,
};

/// Prints `[REDACTED; n bytes]` for a secret byte string.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED; {} bytes]", self.0)
    }
}

/// Prints only the length of a non-secret but bulky byte string (ciphertext).
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} bytes]", self.0)
    }
}

impl fmt::Debug for crate::kubernetes_v2::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("v2::EncryptRequest")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("uid", &self.uid)
            .finish()
    }
}

impl fmt::Debug for crate::kubernetes_v2::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("v2::DecryptResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .finish()
    }
}

impl fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("key_id", &self.key_id)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("encryption_context", &self.encryption_context)
            .finish()
    }
}

impl fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("ciphertext_blob", &Len(self.ciphertext_blob.len()))
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for GenerateRandomResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateRandomResponse")
            .field("random_bytes", &Redacted(self.random_bytes.len()))
            .finish()
    }
}

impl fmt::Debug for BatchEncryptEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchEncryptEntry")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("encryption_context", &self.encryption_context)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::{
        BatchDecryptResponse, BatchDecryptResult, BatchEncryptRequest,
        BatchGenerateDataKeyResponse, BatchGenerateDataKeyResult, batch_decrypt_result,
        batch_generate_data_key_result,
    };

    use super::*;

    const SECRET: &[u8] = b"TOP-SECRET-PLAINTEXT-7f3a";

    /// Fails if `out` contains the secret in any form `{:?}` of a byte string or a
    /// string could produce: raw text, the decimal list of a `Vec<u8>`, hex.
    fn assert_no_secret(out: &str) {
        let text = String::from_utf8_lossy(SECRET);
        let decimal = format!("{SECRET:?}");
        let decimal_inner = decimal.trim_start_matches('[').trim_end_matches(']');
        let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!out.contains(&*text), "raw secret in {out}");
        assert!(!out.contains(decimal_inner), "decimal secret in {out}");
        assert!(!out.contains(&hex), "hex secret in {out}");
        // Even a fragment of the decimal list would be a leak.
        assert!(!out.contains("84, 79, 80"), "secret bytes in {out}");
    }

    fn context() -> std::collections::HashMap<String, String> {
        [("tenant".to_owned(), "acme".to_owned())].into()
    }

    #[test]
    fn secret_carrying_messages_do_not_print_their_bytes() {
        let outputs = [
            format!(
                "{:?}",
                EncryptRequest {
                    key_id: "alias/app".into(),
                    plaintext: SECRET.to_vec(),
                    encryption_context: context(),
                }
            ),
            format!(
                "{:?}",
                DecryptResponse {
                    plaintext: SECRET.to_vec(),
                    key_id: "key-00".into(),
                    key_version: 3,
                }
            ),
            format!(
                "{:?}",
                GenerateDataKeyResponse {
                    ciphertext_blob: vec![1, 2, 3],
                    plaintext: SECRET.to_vec(),
                    key_id: "key-00".into(),
                    key_version: 1,
                }
            ),
            format!(
                "{:#?}",
                GenerateRandomResponse {
                    random_bytes: SECRET.to_vec(),
                }
            ),
            format!(
                "{:?}",
                BatchEncryptEntry {
                    plaintext: SECRET.to_vec(),
                    encryption_context: context(),
                }
            ),
        ];
        for out in &outputs {
            assert_no_secret(out);
            assert!(
                out.contains(&format!("[REDACTED; {} bytes]", SECRET.len())),
                "no redaction marker in {out}"
            );
        }
        let kubernetes = [
            format!(
                "{:?}",
                crate::kubernetes_v2::EncryptRequest {
                    plaintext: SECRET.to_vec(),
                    uid: "uid-1".into(),
                }
            ),
            format!(
                "{:?}",
                crate::kubernetes_v2::DecryptResponse {
                    plaintext: SECRET.to_vec(),
                }
            ),
        ];
        for out in &kubernetes {
            assert_no_secret(out);
            assert!(out.contains("[REDACTED; 25 bytes]"), "{out}");
        }
        assert!(kubernetes[0].contains("uid-1"));
        // Non-secret fields are still useful in logs.
        assert!(outputs[0].contains("alias/app") && outputs[0].contains("acme"));
        assert!(outputs[1].contains("key_version: 3"));
        assert!(outputs[2].contains("ciphertext_blob: [3 bytes]"));
    }

    #[test]
    fn containers_of_secret_messages_stay_redacted() {
        let batch_encrypt = BatchEncryptRequest {
            key_id: "key-00".into(),
            entries: vec![BatchEncryptEntry {
                plaintext: SECRET.to_vec(),
                encryption_context: context(),
            }],
        };
        let batch_decrypt = BatchDecryptResponse {
            results: vec![BatchDecryptResult {
                outcome: Some(batch_decrypt_result::Outcome::Result(DecryptResponse {
                    plaintext: SECRET.to_vec(),
                    key_id: "key-00".into(),
                    key_version: 1,
                })),
            }],
        };
        let batch_data_key = BatchGenerateDataKeyResponse {
            results: vec![BatchGenerateDataKeyResult {
                outcome: Some(batch_generate_data_key_result::Outcome::Result(
                    GenerateDataKeyResponse {
                        ciphertext_blob: vec![9; 60],
                        plaintext: SECRET.to_vec(),
                        key_id: "key-00".into(),
                        key_version: 1,
                    },
                )),
            }],
        };
        for out in [
            format!("{batch_encrypt:?}"),
            format!("{batch_decrypt:?}"),
            format!("{batch_data_key:#?}"),
        ] {
            assert_no_secret(&out);
            assert!(out.contains("REDACTED"), "no redaction marker in {out}");
        }
    }
}
