//! The catalogue's keys in etcd (design note §2.3.2), all under the
//! configured prefix:
//!
//! | key | value |
//! |---|---|
//! | `meta/format` | u32 BE: [`FORMAT_VERSION`] of this keyspace |
//! | `meta/gen` | u64 BE: the catalogue generation, bumped by every catalogue commit |
//! | `<table>/<key>` | a catalogue record, byte for byte as in RocksDB (`Table::name`) |
//! | `nodes/<node id>` | JSON [`NodeRecord`] (generation applied, address, root epochs held), bound to the node's lease |
//! | `jobs/<job>` | leader's node id, bound to its lease; `create_revision` = fence token |
//! | `audit/heads/<node id>` | JSON `AuditHead` |
//! | `usage/<key id><u32 BE version><node id>` | a node's `UsageRecord` of a version (catalogue record), plain puts by that node only |
//! | `usage-mark/<node id>` | u64 BE: the node's audit sequence its stored use records cover |

use kms_catalogue::{NodeRoots, Table};
use serde::{Deserialize, Serialize};

/// Format version of the etcd keyspace this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// Oldest format version of the etcd keyspace this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;

/// What a node publishes about itself in `nodes/<node id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    /// The catalogue generation the node's view has applied.
    pub(crate) applied_gen: u64,
    /// When it published this, ms since the Unix epoch (display only).
    pub(crate) heartbeat_ms: u64,
    /// The node's service address, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) address: Option<String>,
    /// The root epochs the node's HSM holds and the one it wraps under,
    /// once its service has opened the HSM (absent before, and from builds
    /// that do not publish them: such a node counts as holding no root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roots: Option<NodeRoots>,
}

/// A key of the keyspace, relative to the prefix.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    Format,
    Gen,
    Table(Table, &'a [u8]),
    Node(&'a str),
    Job,
    AuditHead,
    Usage,
    Other,
}

/// Builds full keys under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keyspace {
    prefix: Vec<u8>,
}

impl Keyspace {
    pub(crate) fn new(prefix: &str) -> Self {
        Keyspace {
            prefix: prefix.as_bytes().to_vec(),
        }
    }

    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        for p in parts {
            k.extend_from_slice(p);
        }
        k
    }

    pub(crate) fn format(&self) -> Vec<u8> {
        self.key(&[b"meta/format"])
    }

    pub(crate) fn gen_key(&self) -> Vec<u8> {
        self.key(&[b"meta/gen"])
    }

    pub(crate) fn table(&self, table: Table, key: &[u8]) -> Vec<u8> {
        self.key(&[table.name().as_bytes(), b"/", key])
    }

    pub(crate) fn node(&self, node: &str) -> Vec<u8> {
        self.key(&[b"nodes/", node.as_bytes()])
    }

    pub(crate) fn job(&self, job: &str) -> Vec<u8> {
        self.key(&[b"jobs/", job.as_bytes()])
    }

    pub(crate) fn audit_head(&self, node: &str) -> Vec<u8> {
        self.key(&[b"audit/heads/", node.as_bytes()])
    }

    pub(crate) fn audit_heads(&self) -> Vec<u8> {
        self.key(&[b"audit/heads/"])
    }

    /// A node's use record of a key version (the key id has a fixed
    /// length, so `usage/<key id>` is a safe prefix for one key).
    pub(crate) fn usage(&self, key_id: &str, version: u32, node: &str) -> Vec<u8> {
        self.key(&[
            b"usage/",
            key_id.as_bytes(),
            &version.to_be_bytes(),
            node.as_bytes(),
        ])
    }

    /// The prefix of every node's use records of one key.
    pub(crate) fn usage_of_key(&self, key_id: &str) -> Vec<u8> {
        self.key(&[b"usage/", key_id.as_bytes()])
    }

    /// A node's usage watermark.
    pub(crate) fn usage_mark(&self, node: &str) -> Vec<u8> {
        self.key(&[b"usage-mark/", node.as_bytes()])
    }

    /// What `full` (a key under the prefix) is.
    pub(crate) fn classify<'a>(&self, full: &'a [u8]) -> Entry<'a> {
        let Some(rest) = full.strip_prefix(self.prefix.as_slice()) else {
            return Entry::Other;
        };
        match rest {
            b"meta/format" => return Entry::Format,
            b"meta/gen" => return Entry::Gen,
            _ => {}
        }
        if let Some(node) = rest.strip_prefix(b"nodes/") {
            return std::str::from_utf8(node).map_or(Entry::Other, Entry::Node);
        }
        if rest.starts_with(b"jobs/") {
            return Entry::Job;
        }
        if rest.starts_with(b"audit/") {
            return Entry::AuditHead;
        }
        if rest.starts_with(b"usage/") || rest.starts_with(b"usage-mark/") {
            return Entry::Usage;
        }
        for table in Table::ALL {
            if let Some(k) = rest
                .strip_prefix(table.name().as_bytes())
                .and_then(|r| r.strip_prefix(b"/"))
            {
                return Entry::Table(table, k);
            }
        }
        Entry::Other
    }
}

/// The end of the range of keys starting with `prefix` (etcd's
/// `range_end`): `prefix` with its last byte below 0xFF incremented;
/// `None` if every key from `prefix` on qualifies.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_round_trips() {
        let ks = Keyspace::new("/kms/v1/");
        assert_eq!(ks.classify(&ks.gen_key()), Entry::Gen);
        assert_eq!(ks.classify(&ks.format()), Entry::Format);
        for t in Table::ALL {
            assert_eq!(
                ks.classify(&ks.table(t, b"k\xff/x")),
                Entry::Table(t, b"k\xff/x")
            );
        }
        // `aliases/` and `aliases_by_key/` do not shadow each other.
        assert_eq!(
            ks.classify(&ks.table(Table::AliasesByKey, b"a")),
            Entry::Table(Table::AliasesByKey, b"a")
        );
        assert_eq!(ks.classify(&ks.node("n-1")), Entry::Node("n-1"));
        assert_eq!(ks.classify(&ks.job("scheduler")), Entry::Job);
        assert_eq!(ks.classify(&ks.audit_head("n-1")), Entry::AuditHead);
        assert_eq!(ks.classify(&ks.usage("k", 1, "n-1")), Entry::Usage);
        assert_eq!(ks.classify(&ks.usage_mark("n-1")), Entry::Usage);
        assert!(ks.usage("k", 1, "n-1").starts_with(&ks.usage_of_key("k")));
        assert_eq!(ks.classify(b"/other/keys/x"), Entry::Other);
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
