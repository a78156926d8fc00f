//! Audit across nodes (design note §2.3.6): cluster nodes' logs witness each
//! other's heads, so a node whose tail was erased or whose chain was
//! rewritten is caught by the others' logs even when its own chain and
//! checkpoints verify. Real RocksDB logs, one per node; the heads a cluster
//! would exchange through etcd are handed over by the test.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kms_storage::{
    AuditLog, AuditRecord, Checkpoint, RECORD_FORMAT_V1, RECORD_FORMAT_WITNESS, Storage,
    VerifyOptions, VerifyReport, VerifyStart, WITNESS_OPERATION, WitnessBoard, WitnessOutcome,
    WitnessedHead, Witnessing, schema,
};

use crate::{MAC_KEY, config, event, mac_fn, open, raw_db, verify_mac};

const EVERY: u64 = 4;

struct Node {
    id: String,
    dir: tempfile::TempDir,
    storage: Option<Storage>,
    log: Option<AuditLog>,
    board: Arc<WitnessBoard>,
    /// What the writer handed over for publishing, in order.
    published: Arc<Mutex<Vec<Checkpoint>>>,
    next_event: u64,
}

impl Node {
    fn start(id: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path());
        let board = Arc::new(WitnessBoard::default());
        let published = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&published);
        let log = storage
            .open_audit_log_witnessed(
                config(EVERY),
                mac_fn(MAC_KEY),
                Some(Witnessing {
                    peers: Arc::clone(&board),
                    on_checkpoint: Box::new(move |cp: &Checkpoint| {
                        sink.lock().unwrap().push(cp.clone());
                    }),
                }),
            )
            .unwrap();
        Node {
            id: id.into(),
            dir,
            storage: Some(storage),
            log: Some(log),
            board,
            published,
            next_event: 1,
        }
    }

    fn append(&mut self, n: u64) {
        for _ in 0..n {
            self.log
                .as_ref()
                .unwrap()
                .append(event(self.next_event))
                .unwrap();
            self.next_event += 1;
        }
    }

    /// The head this node would publish now (its last checkpoint).
    fn published_head(&self) -> Option<WitnessedHead> {
        self.published
            .lock()
            .unwrap()
            .last()
            .map(|cp| WitnessedHead {
                node: self.id.clone(),
                seq: cp.seq,
                hash: cp.head_hash,
                published_ms: cp.time_micros / 1000,
                checkpoint_mac: cp.mac.clone(),
            })
    }

    fn stop(&mut self) {
        self.log = None;
        self.storage = None;
    }

    fn storage(&mut self) -> &Storage {
        if self.storage.is_none() {
            self.storage = Some(open(self.dir.path()));
        }
        self.storage.as_ref().unwrap()
    }

    fn verify(&mut self) -> VerifyReport {
        let options = VerifyOptions {
            start: VerifyStart::Genesis,
            max_records_between_checkpoints: Some(EVERY),
        };
        self.storage()
            .audit_reader()
            .verify(&options, &verify_mac)
            .unwrap()
    }
}

/// What every node's engine would return from `audit_heads()`, minus its own.
fn exchange(nodes: &[Node]) {
    let heads: Vec<WitnessedHead> = nodes.iter().filter_map(Node::published_head).collect();
    for n in nodes {
        n.board
            .replace(heads.iter().filter(|h| h.node != n.id).cloned().collect());
    }
}

/// Three nodes, each with two rounds of witnessing, then stopped.
fn three_witnessing_nodes() -> Vec<Node> {
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(Node::start)
        .collect();
    for _round in 0..3 {
        for n in &mut nodes {
            n.append(EVERY);
        }
        exchange(&nodes);
    }
    for n in &mut nodes {
        n.stop();
    }
    nodes
}

/// The cross-node check `kms audit verify --cluster` does: every node's
/// chain, and every head any node witnessed for node N against N's log.
/// Returns the problems found, naming node and sequence.
fn verify_cluster(nodes: &mut [Node]) -> Vec<String> {
    let reports: Vec<VerifyReport> = nodes.iter_mut().map(Node::verify).collect();
    let mut problems = Vec::new();
    for (n, r) in nodes.iter().zip(&reports) {
        if let Some(f) = &r.failure {
            problems.push(format!(
                "{}: chain fails at {}: {:?}",
                n.id, f.seq, f.reason
            ));
        }
    }
    for n in nodes.iter_mut() {
        let mut for_n: Vec<WitnessedHead> = reports
            .iter()
            .flat_map(|r| r.witnessed.iter())
            .filter(|h| h.node == n.id)
            .cloned()
            .collect();
        // Two nodes that witnessed the same head: check it once.
        for_n.sort_by_key(|h| (h.seq, h.hash));
        for_n.dedup_by_key(|h| (h.seq, h.hash));
        assert!(!for_n.is_empty(), "{} is witnessed by the others", n.id);
        for check in n.storage().audit_reader().check_witnessed(&for_n).unwrap() {
            if !check.is_ok() {
                problems.push(format!(
                    "{}: witnessed head {}: {:?}",
                    n.id, check.head.seq, check.outcome
                ));
            }
        }
    }
    problems
}

fn records(storage: &Storage) -> Vec<AuditRecord> {
    let reader = storage.audit_reader();
    (1..=reader.last_seq().unwrap())
        .map(|s| reader.get(s).unwrap().unwrap())
        .collect()
}

#[test]
fn nodes_witness_each_others_heads_and_the_cluster_verifies() {
    let mut nodes = three_witnessing_nodes();
    for n in &mut nodes {
        let recs = records(n.storage());
        // Round 1: records 1-4, checkpoint 4 (nothing to witness yet).
        // Round 2: records 5-8, witness 9, checkpoint 9. Round 3: 10-13, witness 14, checkpoint 14.
        assert_eq!(recs.len(), 14, "{}", n.id);
        let witnesses: Vec<u64> = recs
            .iter()
            .filter(|r| !r.witnessed.is_empty())
            .map(|r| r.seq)
            .collect();
        assert_eq!(witnesses, vec![9, 14], "{}", n.id);
        let w = &recs[13];
        assert_eq!(w.event.operation, WITNESS_OPERATION);
        assert_eq!(w.event.principal, "system");
        let mut others: Vec<(&str, u64)> = w
            .witnessed
            .iter()
            .map(|h| (h.node.as_str(), h.seq))
            .collect();
        others.sort_unstable();
        let expected: Vec<(&str, u64)> = ["node-a", "node-b", "node-c"]
            .into_iter()
            .filter(|id| *id != n.id)
            .map(|id| (id, 9))
            .collect();
        assert_eq!(others, expected, "{}", n.id);
        // Only witness records use the new format.
        n.stop();
        let raw = raw_db(n.dir.path());
        let cf = raw.cf_handle(schema::CF_AUDIT).unwrap();
        for r in &recs {
            let bytes = raw.get_cf(cf, r.seq.to_be_bytes()).unwrap().unwrap();
            let want = if r.witnessed.is_empty() {
                RECORD_FORMAT_V1
            } else {
                RECORD_FORMAT_WITNESS
            };
            assert_eq!(bytes[0], want, "{} seq {}", n.id, r.seq);
        }
        drop(raw);
        let report = n.verify();
        assert!(report.is_ok(), "{}: {report:?}", n.id);
        // The checkpoints certify the witness records: 4, 9, 14.
        assert_eq!(report.checkpoints_verified, 3, "{}", n.id);
        assert_eq!(report.uncheckpointed_tail, 0);
        // Every node published its checkpoints.
        let published: Vec<u64> = n.published.lock().unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(published, vec![4, 9, 14], "{}", n.id);
    }
    assert_eq!(verify_cluster(&mut nodes), Vec::<String>::new());
}

/// Deletes the records after `keep` and the checkpoints after the last one
/// at or below it, as someone erasing a node's tail would.
fn truncate(dir: &Path, keep: u64) {
    let db = raw_db(dir);
    let audit = db.cf_handle(schema::CF_AUDIT).unwrap();
    let cps = db.cf_handle(schema::CF_AUDIT_CHECKPOINTS).unwrap();
    for seq in keep + 1..=100 {
        db.delete_cf(audit, seq.to_be_bytes()).unwrap();
        db.delete_cf(cps, seq.to_be_bytes()).unwrap();
    }
}

#[test]
fn a_truncated_log_is_caught_ending_before_its_witnessed_head() {
    let mut nodes = three_witnessing_nodes();
    // node-b loses everything after record 8: its own chain and its
    // checkpoint at 4 still verify.
    truncate(nodes[1].dir.path(), 8);
    let report = nodes[1].verify();
    assert!(
        report.is_ok(),
        "the truncated chain alone verifies: {report:?}"
    );
    assert_eq!(report.last_good_seq, 8);
    // The others witnessed node-b's head at 9: caught, naming node and sequence.
    let problems = verify_cluster(&mut nodes);
    assert_eq!(
        problems,
        vec![format!(
            "node-b: witnessed head 9: {:?}",
            WitnessOutcome::LogEndsBefore { log_end: 8 }
        )]
    );
}

/// Rewrites a node's log from record `from` on, with a changed principal,
/// re-chaining every later record and re-MACing every checkpoint: what an
/// insider holding the node's disk *and* its HSM key could do.
fn rewrite(dir: &Path, from: u64) {
    let storage = open(dir);
    let recs = records(&storage);
    let cps = storage.audit_reader().checkpoints(None, 1000).unwrap();
    drop(storage);
    let db = raw_db(dir);
    let audit = db.cf_handle(schema::CF_AUDIT).unwrap();
    let cp_cf = db.cf_handle(schema::CF_AUDIT_CHECKPOINTS).unwrap();
    let mut prev = recs[usize::try_from(from).unwrap() - 2].hash;
    let mut hashes = std::collections::BTreeMap::new();
    for r in recs.iter().skip(usize::try_from(from).unwrap() - 1) {
        let mut e = r.event.clone();
        if r.seq == from {
            e.principal = "someone-else".into();
        }
        let (new, bytes) =
            AuditRecord::seal_with_witness(r.seq, r.time_micros, e, r.witnessed.clone(), prev)
                .unwrap();
        db.put_cf(audit, r.seq.to_be_bytes(), bytes).unwrap();
        prev = new.hash;
        hashes.insert(r.seq, new.hash);
    }
    for cp in cps.into_iter().filter(|c| c.seq >= from) {
        let head_hash = hashes[&cp.seq];
        let msg = Checkpoint::mac_message(cp.seq, cp.time_micros, &head_hash);
        let forged = Checkpoint {
            head_hash,
            mac: (mac_fn(MAC_KEY))(&msg).unwrap(),
            ..cp
        };
        db.put_cf(cp_cf, cp.seq.to_be_bytes(), forged.encode().unwrap())
            .unwrap();
    }
}

#[test]
fn a_rewritten_record_is_caught_by_the_witnessed_hash() {
    let mut nodes = three_witnessing_nodes();
    rewrite(nodes[2].dir.path(), 2);
    let report = nodes[2].verify();
    assert!(
        report.is_ok(),
        "the rewritten chain alone verifies: {report:?}"
    );
    assert_eq!(
        nodes[2]
            .storage()
            .audit_reader()
            .get(2)
            .unwrap()
            .unwrap()
            .event
            .principal,
        "someone-else"
    );
    let problems = verify_cluster(&mut nodes);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("node-c: witnessed head 9: HashMismatch"),
        "{problems:?}"
    );
}

#[test]
fn a_witness_record_never_splits_a_group() {
    let n = Node::start("node-a");
    n.board.replace(vec![WitnessedHead {
        node: "node-b".into(),
        seq: 3,
        hash: [7; 32],
        published_ms: 1,
        checkpoint_mac: vec![1; 32],
    }]);
    let log = n.log.as_ref().unwrap();
    // A checkpoint falls due at record 4, inside the group 1..=6.
    let last = log
        .submit_group((1..=6).map(event).collect())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(last, 6, "the group's records are 1..=6");
    assert_eq!(log.head().0, 7, "the witness record follows the group");
    // The same heads are not witnessed twice.
    for i in 7..=14 {
        log.append(event(i)).unwrap();
    }
    let recs = records(n.storage.as_ref().unwrap());
    assert_eq!(recs.len(), 15);
    for (i, r) in recs[..6].iter().enumerate() {
        assert_eq!(r.event, event(i as u64 + 1));
    }
    assert_eq!(recs[6].witnessed.len(), 1);
    assert!(recs[7..].iter().all(|r| r.witnessed.is_empty()));
    let published: Vec<u64> = n.published.lock().unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(published, vec![7, 11, 15]);
}

#[test]
fn a_cluster_node_without_peers_writes_what_a_single_node_writes() {
    // A single node (no Witnessing) and a cluster node that has read no
    // other head yet: the same records, all format 1, the same checkpoints.
    let single = tempfile::tempdir().unwrap();
    let lonely = Node::start("node-a");
    {
        let s = open(single.path());
        let log = s.open_audit_log(config(EVERY), mac_fn(MAC_KEY)).unwrap();
        for i in 1..=10 {
            log.append(event(i)).unwrap();
            lonely.log.as_ref().unwrap().append(event(i)).unwrap();
        }
    }
    let mut lonely = lonely;
    lonely.stop();
    let a = records(&open(single.path()));
    assert!(
        lonely.published.lock().unwrap().len() >= 2,
        "it still publishes its heads"
    );
    let b = records(lonely.storage());
    assert_eq!(a.len(), 10);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.seq, &x.event), (y.seq, &y.event));
        assert!(y.witnessed.is_empty());
    }
    let cps = |s: &Storage| -> Vec<u64> {
        s.audit_reader()
            .checkpoints(None, 100)
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect()
    };
    assert_eq!(cps(&open(single.path())), cps(lonely.storage()));
    lonely.stop();
    for dir in [single.path(), lonely.dir.path()] {
        let db = raw_db(dir);
        let cf = db.cf_handle(schema::CF_AUDIT).unwrap();
        for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            assert_eq!(item.unwrap().1[0], RECORD_FORMAT_V1);
        }
    }
}
