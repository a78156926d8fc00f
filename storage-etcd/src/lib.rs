//! kms-storage-etcd: the etcd engine of the kms catalogue, for a cluster of
//! kms nodes sharing one catalogue (design note
//! `hierarchy-and-cluster.md` part 2, §2.3). The only crate that talks to
//! etcd.
//!
//! [`EtcdEngine`] implements [`kms_catalogue::CatalogueEngine`]: reads come
//! from an in-memory view of the catalogue kept current by an etcd watch;
//! every write is one etcd transaction that compares and bumps the
//! catalogue generation `meta/gen` (I1); a node may use keys only while a
//! linearizable read started less than the staleness bound Δ ago saw the
//! generation its view holds (I3); a revoking write returns only once every
//! registered node applied it or Δ + 500 ms passed (I4); GCM reservations
//! are compare-and-set counters (I5); background jobs are led through
//! lease-bound election keys whose `create_revision` fences their writes
//! (I6).

#![warn(missing_docs)]

mod config;
mod engine;
mod keyspace;
mod snapshot;
mod view;

pub use config::{ConfigError, EtcdAuth, EtcdConfig};
pub use engine::EtcdEngine;
pub use keyspace::{FORMAT_VERSION, MIN_FORMAT_VERSION};
pub use snapshot::{SnapshotInfo, save_snapshot};
