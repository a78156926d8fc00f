//! The raw-HSM baseline of `kms-bench` (feature `bench`): AES-256-GCM
//! straight to the token through cryptoki, without `Hsm`'s session pool,
//! handle cache or recovery policy, so that the bench can report the service
//! as a fraction of what the token itself does.
//!
//! Each worker owns one long-lived session and uses the object handle found
//! at start-up, which is the best case the service can hope to approach. The
//! calls are the ones `Hsm::encrypt`/`Hsm::decrypt` make (cryptoki's
//! `Session::encrypt`: C_EncryptInit, C_Encrypt for the length, C_Encrypt), so
//! the ratio measures our overhead and not a different call sequence.
//!
//! The baseline works on a key of its own: an AES-256 token object generated
//! from the service's KEK template under a random `kms-bench-baseline/…`
//! CKA_ID, which cannot collide with the service's `key-…/vN` objects, and
//! destroyed when the `Baseline` is dropped. Never used by the service.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::Pin;
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::hsm::{GCM_IV_LEN, GCM_TAG_LEN};
use crate::module::Module;
use crate::objects::{self, KeyPurpose, ObjectId};

/// Which AES-GCM operation a worker repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaselineOp {
    /// AES-256-GCM encryption under a fresh IV each call.
    Encrypt,
    /// AES-256-GCM decryption (and check) of the worker's own ciphertext.
    Decrypt,
}

/// A logged-in token with the baseline's own AES-256 key.
#[derive(Debug)]
pub struct Baseline {
    module: Arc<Module>,
    slot: Slot,
    /// Keeps the login alive for the workers' sessions, and owns the key.
    /// In a mutex so that workers can be made on their own threads (a
    /// session is Send, not Sync).
    anchor: Mutex<Session>,
    key: ObjectHandle,
    id: ObjectId,
    /// Numbers the workers: the first 4 bytes of their GCM IVs, so that no
    /// two workers of this key ever use the same IV.
    next_worker: AtomicU32,
}

impl Baseline {
    /// Loads the module (SoftHSM2 reads `SOFTHSM2_CONF` now: set it first),
    /// finds the token by label, logs in and generates the baseline key.
    ///
    /// # Errors
    /// `ModuleLoad`, `TokenNotFound`, `PinRejected`, `RngFailed` (the key id
    /// suffix comes from the host's generator), or the PKCS#11 error of the
    /// call that failed.
    pub fn open(module_path: &Path, token_label: &str, pin: &Pin) -> Result<Baseline> {
        let module = crate::module::module(module_path)?;
        let state = module.read();
        let context = state.context()?;
        let slot = crate::token::find_token(context, token_label, module_path)?;
        let anchor = context
            .open_rw_session(slot)
            .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
        crate::session_pool::login(&anchor, pin)?;

        let mut suffix = [0u8; 8];
        SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| HsmError::host_rng(Operation::GenerateKey))?;
        let id = ObjectId::new(format!("kms-bench-baseline/{}", hex::encode(suffix)))?;
        let key = anchor
            .generate_key(
                &Mechanism::AesKeyGen,
                &objects::template(KeyPurpose::Kek, &id),
            )
            .map_err(|e| from_cryptoki(Operation::GenerateKey, e))?;
        drop(state);
        Ok(Baseline {
            module,
            slot,
            anchor: Mutex::new(anchor),
            key,
            id,
            next_worker: AtomicU32::new(0),
        })
    }

    /// The CKA_ID of the baseline key (for messages).
    pub fn key_id(&self) -> &ObjectId {
        &self.id
    }

    /// A worker with its own session, for `plaintext_len`-byte messages.
    ///
    /// # Errors
    /// The PKCS#11 error of C_OpenSession or of the first encryption.
    pub fn worker(&self, op: BaselineOp, plaintext_len: usize) -> Result<BaselineWorker<'_>> {
        let index = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let state = self.module.read();
        let session = state
            .context()?
            .open_ro_session(self.slot)
            .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
        drop(state);
        let mut worker = BaselineWorker {
            baseline: self,
            session,
            op,
            iv_prefix: index.to_be_bytes(),
            counter: 0,
            plaintext: vec![0x5a; plaintext_len],
            sealed_iv: [0; GCM_IV_LEN],
            sealed: Vec::new(),
        };
        // A decrypting worker decrypts one ciphertext of its own, over and over.
        let (iv, sealed) = worker.encrypt_once()?;
        worker.sealed_iv = iv;
        worker.sealed = sealed;
        Ok(worker)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _state = self.module.read();
        // Best effort: a leftover bench key is harmless (its own CKA_ID) but untidy.
        if let Err(e) = self.anchor.get_mut().destroy_object(self.key) {
            tracing::warn!(id = %self.id, error = %e, "cannot destroy the baseline key");
        }
    }
}

/// One thread's session and operation. Not `Sync`: one thread at a time.
#[derive(Debug)]
pub struct BaselineWorker<'a> {
    baseline: &'a Baseline,
    session: Session,
    op: BaselineOp,
    iv_prefix: [u8; 4],
    counter: u64,
    plaintext: Vec<u8>,
    sealed_iv: [u8; GCM_IV_LEN],
    sealed: Vec<u8>,
}

impl BaselineWorker<'_> {
    /// One operation: an encryption under a fresh IV, or a decryption of the
    /// worker's ciphertext (which is checked, so a failure cannot pass as fast).
    ///
    /// # Errors
    /// The PKCS#11 error of the call; `InvalidCiphertext` if the decryption
    /// does not give back the plaintext.
    pub fn call(&mut self) -> Result<()> {
        match self.op {
            BaselineOp::Encrypt => self.encrypt_once().map(drop),
            BaselineOp::Decrypt => {
                let _state = self.baseline.module.read();
                let mut iv = self.sealed_iv;
                let params = GcmParams::new(&mut iv, &[], (GCM_TAG_LEN as u64 * 8).into())
                    .map_err(|e| from_cryptoki(Operation::Decrypt, e))?;
                let plaintext = self
                    .session
                    .decrypt(&Mechanism::AesGcm(params), self.baseline.key, &self.sealed)
                    .map_err(|e| from_cryptoki(Operation::Decrypt, e))?;
                if plaintext != self.plaintext {
                    return Err(HsmError::InvalidCiphertext);
                }
                Ok(())
            }
        }
    }

    fn encrypt_once(&mut self) -> Result<([u8; GCM_IV_LEN], Vec<u8>)> {
        // A counter IV (worker index, then count) instead of random bytes: no
        // RNG cost in the baseline, and still unique under the key.
        self.counter += 1;
        let mut iv = [0u8; GCM_IV_LEN];
        iv[..4].copy_from_slice(&self.iv_prefix);
        iv[4..].copy_from_slice(&self.counter.to_be_bytes());
        let chosen = iv;
        let _state = self.baseline.module.read();
        let params = GcmParams::new(&mut iv, &[], (GCM_TAG_LEN as u64 * 8).into())
            .map_err(|e| from_cryptoki(Operation::Encrypt, e))?;
        let sealed = self
            .session
            .encrypt(
                &Mechanism::AesGcm(params),
                self.baseline.key,
                &self.plaintext,
            )
            .map_err(|e| from_cryptoki(Operation::Encrypt, e))?;
        if sealed.len() != self.plaintext.len() + GCM_TAG_LEN {
            return Err(HsmError::Wrapper {
                operation: Operation::Encrypt,
                reason: "token returned an unexpected GCM output length".into(),
            });
        }
        Ok((chosen, sealed))
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    #[test]
    fn workers_encrypt_and_decrypt_on_a_fresh_token_and_the_key_goes_away() {
        let token = crate::testing::TestToken::new();
        let pin = token.pin_source().read().expect("pin");
        let baseline =
            Baseline::open(token.module_path(), token.label(), &pin).expect("open baseline");
        for op in [BaselineOp::Encrypt, BaselineOp::Decrypt] {
            let mut worker = baseline.worker(op, 32).expect("worker");
            for _ in 0..3 {
                worker.call().expect("call");
            }
        }
        let id = baseline.key_id().clone();
        drop(baseline);
        let hsm = token.open();
        assert!(
            !hsm.key_exists(&id).expect("search"),
            "baseline key left behind"
        );
    }
}
