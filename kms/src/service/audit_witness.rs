//! Audit across nodes on a cluster node (design note §2.3.6): the audit
//! writer hands every checkpoint to a publisher thread, which publishes it
//! as this node's head through the catalogue engine
//! ([`kms_storage::CatalogueEngine::publish_audit_head`]) and then reads the
//! other nodes' heads for the writer to witness at its next checkpoint.
//!
//! Publishing never blocks or fails the audit writer: fail-closed applies to
//! the log itself, not to publishing. The writer's hand-off is a channel
//! send; a failed publish or read is logged, counted
//! (`kms_audit_head_publish_failures_total`) and retried at the next
//! checkpoint, whose head supersedes the one not published. A single node
//! (no `[cluster] node_id`) has no publisher at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use kms_storage::{AuditHead, Catalogue, Checkpoint, WitnessBoard, WitnessedHead, Witnessing};

/// Publishing totals since start, for metrics.
#[derive(Debug, Default)]
pub struct PublishStats {
    published: AtomicU64,
    publish_failures: AtomicU64,
    read_failures: AtomicU64,
}

/// A snapshot of [`PublishStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishCounts {
    /// Heads published.
    pub published: u64,
    /// Heads that could not be published (each retried by the next checkpoint's).
    pub publish_failures: u64,
    /// Failed reads of the other nodes' heads (or malformed heads skipped).
    pub read_failures: u64,
}

impl PublishStats {
    /// The totals now.
    pub fn counts(&self) -> PublishCounts {
        PublishCounts {
            published: self.published.load(Ordering::Relaxed),
            publish_failures: self.publish_failures.load(Ordering::Relaxed),
            read_failures: self.read_failures.load(Ordering::Relaxed),
        }
    }
}

/// The publisher thread; dropping it (after the audit log, whose writer
/// holds the other end of its channel) waits for it to finish.
#[derive(Debug)]
pub(crate) struct AuditPublisher {
    thread: Option<JoinHandle<()>>,
    pub(crate) stats: Arc<PublishStats>,
}

impl Drop for AuditPublisher {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("audit head publisher panicked");
        }
    }
}

/// Starts the publisher of node `node_id`; returns the writer's side
/// (to pass to [`kms_storage::Storage::open_audit_log_witnessed`]) and the thread.
///
/// # Errors
///
/// The I/O error if the thread cannot be spawned.
pub(crate) fn start(
    node_id: String,
    catalogue: Catalogue,
) -> std::io::Result<(Witnessing, AuditPublisher)> {
    let board = Arc::new(WitnessBoard::default());
    let stats = Arc::new(PublishStats::default());
    let (tx, rx) = mpsc::channel::<Checkpoint>();
    let publisher = Publisher {
        node_id,
        catalogue,
        board: Arc::clone(&board),
        stats: Arc::clone(&stats),
    };
    let thread = std::thread::Builder::new()
        .name("kms-audit-publisher".into())
        .spawn(move || publisher.run(rx))?;
    let witnessing = Witnessing {
        peers: board,
        // An unbounded send never blocks the writer; a send after the
        // publisher stopped has nobody to publish to.
        on_checkpoint: Box::new(move |cp: &Checkpoint| {
            let _ = tx.send(cp.clone());
        }),
    };
    Ok((
        witnessing,
        AuditPublisher {
            thread: Some(thread),
            stats,
        },
    ))
}

struct Publisher {
    node_id: String,
    /// The cluster's catalogue, whose engine stores the heads (etcd).
    catalogue: Catalogue,
    board: Arc<WitnessBoard>,
    stats: Arc<PublishStats>,
}

fn now_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Publisher {
    fn run(self, rx: Receiver<Checkpoint>) {
        // Heads to witness at the first checkpoint.
        self.read_heads();
        while let Ok(mut cp) = rx.recv() {
            // Only the newest head matters: a backlog collapses into it.
            while let Ok(newer) = rx.try_recv() {
                cp = newer;
            }
            self.publish(&cp);
            self.read_heads();
        }
    }

    fn publish(&self, cp: &Checkpoint) {
        let head = AuditHead {
            node: self.node_id.clone(),
            seq: cp.seq,
            hash: hex::encode(cp.head_hash),
            checkpoint_mac: hex::encode(&cp.mac),
            published_ms: now_ms(),
        };
        match self.catalogue.engine().publish_audit_head(&head) {
            Ok(()) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, seq = cp.seq, "audit head not published; the next checkpoint retries");
            }
        }
    }

    fn read_heads(&self) {
        let heads = match self.catalogue.engine().audit_heads() {
            Ok(heads) => heads,
            Err(e) => {
                self.stats.read_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "other nodes' audit heads not read; witnessing the last ones read");
                return;
            }
        };
        let mut others = Vec::with_capacity(heads.len());
        for h in heads.iter().filter(|h| h.node != self.node_id) {
            match WitnessedHead::from_published(h) {
                Ok(w) => others.push(w),
                Err(reason) => {
                    self.stats.read_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %h.node, reason, "malformed audit head skipped");
                }
            }
        }
        self.board.replace(others);
    }
}
