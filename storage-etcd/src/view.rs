//! This node's in-memory copy of the catalogue: every table, the
//! generation and the node registry, as of one etcd revision. Replaced
//! whole by a reload and changed by the watch one response at a time, each
//! under one write lock, so a reader never sees half of a transaction.

use std::collections::BTreeMap;
use std::ops::Bound;

use kms_catalogue::Table;

use crate::keyspace::{Entry, Keyspace, NodeRecord, prefix_end};

/// One etcd key-value change.
#[derive(Debug)]
pub(crate) enum Change {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

#[derive(Debug, Default)]
pub(crate) struct View {
    tables: [BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()],
    /// The value of `meta/gen` (0 before the first commit).
    pub(crate) generation: u64,
    /// The etcd revision this view is complete up to.
    pub(crate) revision: i64,
    /// Registered nodes and the generation each reports applied.
    pub(crate) nodes: BTreeMap<String, u64>,
}

fn index(table: Table) -> usize {
    match table {
        Table::Meta => 0,
        Table::Keys => 1,
        Table::Versions => 2,
        Table::Pending => 3,
        Table::Aliases => 4,
        Table::AliasesByKey => 5,
        Table::GcmCounters => 6,
    }
}

/// Decodes a `meta/gen` value (u64 BE).
pub(crate) fn decode_gen(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl View {
    pub(crate) fn table(&self, table: Table) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.tables[index(table)]
    }

    /// Applies one change; returns false for a malformed value (ignored).
    pub(crate) fn apply(&mut self, ks: &Keyspace, change: Change) -> bool {
        let (key, value) = match &change {
            Change::Put(k, v) => (k.as_slice(), Some(v.as_slice())),
            Change::Delete(k) => (k.as_slice(), None),
        };
        match ks.classify(key) {
            Entry::Gen => match value.map(decode_gen) {
                Some(Some(g)) => self.generation = g,
                // A deleted or malformed generation: keep the last one;
                // the next commit's compare-and-set fails on it (fail closed).
                _ => return false,
            },
            Entry::Table(table, k) => {
                let t = &mut self.tables[index(table)];
                match value {
                    Some(v) => {
                        t.insert(k.to_vec(), v.to_vec());
                    }
                    None => {
                        t.remove(k);
                    }
                }
            }
            Entry::Node(node) => match value {
                None => {
                    self.nodes.remove(node);
                }
                Some(v) => match serde_json::from_slice::<NodeRecord>(v) {
                    Ok(r) => {
                        self.nodes.insert(node.to_owned(), r.applied_gen);
                    }
                    Err(_) => return false,
                },
            },
            Entry::Format | Entry::Job | Entry::AuditHead | Entry::Usage | Entry::Other => {}
        }
        true
    }

    /// Up to `max` entries of `table` with keys starting with `prefix`,
    /// after `after` (exclusive) if given, in key order.
    pub(crate) fn chunk(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        max: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let upper = prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded);
        // BTreeMap::range panics on an empty (inverted) range.
        if let (Bound::Excluded(l) | Bound::Included(l), Bound::Excluded(u)) = (&lower, &upper)
            && l >= u
        {
            return Vec::new();
        }
        self.table(table)
            .range((lower, upper))
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The greatest key of `table` starting with `prefix`.
    pub(crate) fn last_key(&self, table: Table, prefix: &[u8]) -> Option<Vec<u8>> {
        let upper = prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded);
        self.table(table)
            .range((Bound::Included(prefix.to_vec()), upper))
            .next_back()
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_scan_last_key() {
        let ks = Keyspace::new("/p/");
        let mut v = View::default();
        for k in [&b"a1"[..], b"a2", b"a3", b"b1"] {
            assert!(v.apply(&ks, Change::Put(ks.table(Table::Keys, k), k.to_vec())));
        }
        assert!(v.apply(&ks, Change::Put(ks.gen_key(), 7u64.to_be_bytes().to_vec())));
        assert_eq!(v.generation, 7);
        assert!(!v.apply(&ks, Change::Put(ks.gen_key(), vec![1])));
        assert_eq!(v.generation, 7);
        let keys = |c: Vec<(Vec<u8>, Vec<u8>)>| c.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(v.chunk(Table::Keys, b"a", None, 10)),
            [b"a1", b"a2", b"a3"]
        );
        assert_eq!(keys(v.chunk(Table::Keys, b"a", Some(b"a1"), 1)), [b"a2"]);
        assert_eq!(keys(v.chunk(Table::Keys, b"", Some(b"a3"), 10)), [b"b1"]);
        assert!(v.chunk(Table::Keys, b"a", Some(b"z"), 10).is_empty());
        assert_eq!(v.last_key(Table::Keys, b"a"), Some(b"a3".to_vec()));
        assert_eq!(v.last_key(Table::Keys, b""), Some(b"b1".to_vec()));
        assert_eq!(v.last_key(Table::Versions, b""), None);
        assert!(v.apply(&ks, Change::Delete(ks.table(Table::Keys, b"a3"))));
        assert_eq!(v.last_key(Table::Keys, b"a"), Some(b"a2".to_vec()));
    }
}
