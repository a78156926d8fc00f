//! `kms backup create` and `kms backup restore` (issue 15 item 4; design
//! note `hierarchy-and-cluster.md` §1.6).
//!
//! `create --out DIR` asks the running server (Admin.CreateBackup, through
//! kms-cli); `create --data-dir D --out DIR` copies the database of a
//! stopped server directly. `restore` acts on this machine: it needs the
//! server stopped, its configuration (for the HSM, to check the root
//! epochs) and the data directory.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use kms_storage::{Storage, StorageOptions};

use crate::backup::{self, RestoreOptions};
use crate::config::Config;

/// `kms backup` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Back up the catalogue and the audit log: a consistent copy (RocksDB
    /// checkpoint) plus manifest.json (audit head, root epochs referenced,
    /// SHA-256 of every file). Without --data-dir the running server writes
    /// it on its host under its `[backup] dir` (administrators only); with
    /// --data-dir, the database of a stopped server is copied here. The
    /// backup holds key blobs: usable only with the HSM's root keys, but
    /// keep it as protected as the catalogue.
    ///
    /// With --cluster: a cluster backup into one directory on a file system
    /// every node and this host share (inside every node's `[backup] dir`):
    /// each node's audit log (Admin.CreateBackup on every --endpoints node),
    /// then an etcd snapshot of the catalogue (etcd from --config's
    /// `[cluster]`), and cluster-manifest.json (etcd revision, nodes and
    /// their audit heads, root epochs, SHA-256 of every file).
    Create(CreateArgs),
    /// Restore a backup into the data directory of a STOPPED server: checks
    /// every file against the manifest and every referenced root epoch
    /// against the HSM (nothing is touched if either fails), keeps a
    /// non-empty data directory aside (--force-replace) and uses its audit
    /// log, and/or --audit-since, as the ledger: key destructions
    /// (DeleteKeyMaterial) recorded after the backup are replayed, version
    /// numbers used after it are never reused, and keys and versions created
    /// after it are put back from the replaced catalogue. The next start
    /// rotates every enabled key (restored GCM counters are not trusted) and
    /// records the restore in the audit log before it serves.
    ///
    /// With --cluster (every kms node stopped; etcd already restored from
    /// the backup's etcd/snapshot.db into fresh members, e.g. with
    /// scripts/etcd-snapshot-restore.sh, and running at --config's
    /// `[cluster] etcd_endpoints`): the same rules on the restored etcd
    /// catalogue, the ledger being every node's current audit log (--node
    /// ID=DATA_DIR for each node of the backup, or --node-export ID=FILE);
    /// keys and versions created after the backup are put back from the
    /// old etcd cluster if --replaced-etcd-endpoints names it. The first
    /// node to start rotates every enabled key once; the others wait for it.
    Restore(RestoreArgs),
}

/// Arguments of `kms backup create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The backup directory to create (or an empty one). Online: an absolute
    /// path on the server's host inside its `[backup] dir`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Copy the database in this data directory (the server must be
    /// stopped) instead of asking the running server.
    #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
    pub data_dir: Option<PathBuf>,
    /// Back up a cluster: needs --config (a node's configuration, for its
    /// `[cluster]` etcd settings) and --endpoints (every node).
    #[arg(long, requires_all = ["config", "endpoints"])]
    pub cluster: bool,
    /// With --cluster: a node's configuration file (its `[cluster]` etcd
    /// endpoints, TLS and credentials take the snapshot).
    #[arg(long, short, requires = "cluster")]
    pub config: Option<PathBuf>,
    /// With --cluster: every node's gRPC endpoint, comma-separated (the
    /// global TLS and token options apply to each).
    #[arg(long, value_delimiter = ',', value_name = "URL", requires = "cluster")]
    pub endpoints: Vec<String>,
}

/// Arguments of `kms backup restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup directory (manifest.json and db/).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The server's configuration file: its `[hsm]` is checked for the root
    /// epochs; its `[storage] data_dir` is restored unless --data-dir is given.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The data directory to restore into (default: the configuration's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Replace a non-empty data directory: it is renamed to
    /// `<data-dir>.replaced-<unix ms>` (kept, never deleted).
    #[arg(long)]
    pub force_replace: bool,
    /// An audit export (`kms audit export --out FILE`, JSON lines) covering
    /// the time since the backup, used as ledger of destructions as well
    /// (needed when the replaced data directory is lost).
    #[arg(long, value_name = "FILE", conflicts_with = "cluster")]
    pub audit_since: Option<PathBuf>,
    /// Restore a cluster backup into the etcd cluster --config names (see
    /// `kms backup restore --help`).
    #[arg(long)]
    pub cluster: bool,
    /// With --cluster: a node's id and its data directory (the node
    /// stopped), `ID=DIR`; repeat for every node.
    #[arg(long = "node", value_name = "ID=DIR", requires = "cluster")]
    pub nodes: Vec<String>,
    /// With --cluster: a node's id and its audit export, `ID=FILE`, for a
    /// node whose data directory is lost.
    #[arg(long = "node-export", value_name = "ID=FILE", requires = "cluster")]
    pub node_exports: Vec<String>,
    /// With --cluster: the old etcd cluster's endpoints (comma-separated),
    /// still readable, whose keys and versions created after the backup
    /// are put back.
    #[arg(long, value_delimiter = ',', value_name = "URL", requires = "cluster")]
    pub replaced_etcd_endpoints: Vec<String>,
}

/// Runs a `kms backup` command.
///
/// # Errors
/// Whatever refused the command: the server's answer (online create), a
/// damaged backup, a missing root epoch, a non-empty data directory, a
/// database or file system failure; the message names it.
pub fn run(command: BackupCommand, client: &kms_cli::ClientOptions) -> anyhow::Result<()> {
    match command {
        BackupCommand::Create(args) if args.cluster => create_cluster(args, client),
        BackupCommand::Restore(args) if args.cluster => restore_cluster(args, client.json),
        BackupCommand::Create(args) => match args.data_dir {
            None => {
                let out = args
                    .out
                    .to_str()
                    .context("--out must be UTF-8 to be sent to the server")?
                    .to_owned();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                runtime.block_on(kms_cli::run_backup_create(&out, client))
            }
            Some(data_dir) => create_offline(&data_dir, &args.out, client.json),
        },
        BackupCommand::Restore(args) => restore(args, client.json),
    }
}

fn create_offline(
    data_dir: &std::path::Path,
    out: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let storage = Storage::open(
        data_dir,
        &StorageOptions {
            create_if_missing: false,
            ..StorageOptions::default()
        },
    )
    .with_context(|| {
        format!(
            "cannot open the database in {} (is the server stopped?)",
            data_dir.display()
        )
    })?;
    let created = backup::create_backup(&storage, out, &backup::node_id(), None)
        .with_context(|| format!("backup to {} failed", out.display()))?;
    let manifest = &created.manifest;
    if json {
        emit_json(&serde_json::json!({
            "out_dir": created.dir.display().to_string(),
            "backup_id": created.id,
            "created_unix_ms": manifest.created_unix_ms,
            "audit_head_sequence": manifest.audit_head_seq,
            "audit_head_hash": manifest.audit_head_hash,
            "root_epochs": manifest.root_epochs,
            "files": manifest.files.len(),
            "bytes": created.bytes(),
        }))
    } else {
        eprintln!(
            "backup written to {} (id {}): audit head {}, root epochs {:?}, {} files, {} bytes",
            created.dir.display(),
            created.id,
            manifest.audit_head_seq,
            manifest.root_epochs,
            manifest.files.len(),
            created.bytes()
        );
        Ok(())
    }
}

fn restore(args: RestoreArgs, json: bool) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    anyhow::ensure!(
        config.cluster.is_none(),
        "{} has a [cluster] section: a cluster backup is restored with --cluster (its catalogue is in etcd)",
        args.config.display()
    );
    let data_dir = args.data_dir.unwrap_or_else(|| config.data_dir.clone());
    let report = backup::restore_backup(&RestoreOptions {
        from: args.from.clone(),
        data_dir: data_dir.clone(),
        force_replace: args.force_replace,
        audit_since: args.audit_since,
        hsm: config.hsm.clone(),
    })
    .with_context(|| format!("restore of {} failed", args.from.display()))?;
    if json {
        return emit_json(&serde_json::json!({
            "backup_id": report.backup_id,
            "data_dir": data_dir.display().to_string(),
            "replaced_dir": report.replaced_dir.as_ref().map(|p| p.display().to_string()),
            "audit_head_sequence": report.manifest.audit_head_seq,
            "ledger_records": report.ledger_records,
            "replayed_destructions": report.replayed_destructions,
            "keys_put_back": report.keys_put_back,
            "versions_put_back": report
                .versions_put_back
                .iter()
                .map(|(key, version)| serde_json::json!({"key_id": key, "version": version}))
                .collect::<Vec<_>>(),
        }));
    }
    eprintln!(
        "restored backup {} into {}{}.\n\
         Ledger: {} audit record(s) after the backup; destruction replayed for {} key(s){}; \
         {} key(s) and {} version(s) created after the backup put back.\n\
         Next: start the server; before serving it rotates every enabled key (restored GCM \
         counters are not trusted) and records the restore in the audit log.",
        report.backup_id,
        data_dir.display(),
        report
            .replaced_dir
            .as_ref()
            .map(|p| format!(" (the previous data directory is kept as {})", p.display()))
            .unwrap_or_default(),
        report.ledger_records,
        report.replayed_destructions.len(),
        if report.replayed_destructions.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.replayed_destructions.join(", "))
        },
        report.keys_put_back.len(),
        report.versions_put_back.len(),
    );
    Ok(())
}

fn emit_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The `[cluster]` section of `path`, required.
fn cluster_config(
    path: &std::path::Path,
) -> anyhow::Result<(Config, crate::config::ClusterConfig)> {
    let config = Config::load(path)?;
    let cluster = config.cluster.clone().with_context(|| {
        format!(
            "{} has no [cluster] section: --cluster needs a node's configuration",
            path.display()
        )
    })?;
    Ok((config, cluster))
}

fn create_cluster(args: CreateArgs, client: &kms_cli::ClientOptions) -> anyhow::Result<()> {
    let config_path = args.config.context("--cluster needs --config")?;
    let (_, cluster) = cluster_config(&config_path)?;
    let etcd = crate::cluster::etcd_config(&cluster, "")?;
    anyhow::ensure!(!args.endpoints.is_empty(), "--cluster needs --endpoints");
    anyhow::ensure!(
        args.out.is_absolute(),
        "--out must be an absolute path (the nodes write under it)"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let created =
        backup::create_cluster_backup(&args.out, &etcd, &args.endpoints, |endpoint, dir| {
            let mut options = client.clone();
            options.endpoint = endpoint.to_owned();
            let dir = dir
                .to_str()
                .ok_or("the backup path is not UTF-8")?
                .to_owned();
            runtime
                .block_on(kms_cli::request_backup(&dir, &options))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
        .with_context(|| format!("cluster backup to {} failed", args.out.display()))?;
    let manifest = &created.manifest;
    if client.json {
        return emit_json(&serde_json::json!({
            "out_dir": created.dir.display().to_string(),
            "backup_id": created.id,
            "created_unix_ms": manifest.created_unix_ms,
            "etcd_revision": manifest.etcd_revision,
            "root_epochs": manifest.root_epochs,
            "nodes": manifest.nodes.iter().map(|n| serde_json::json!({
                "node_id": n.node_id,
                "endpoint": n.endpoint,
                "audit_head_sequence": n.audit_head_seq,
            })).collect::<Vec<_>>(),
            "files": manifest.files.len(),
            "bytes": manifest.files.iter().map(|f| f.size).sum::<u64>(),
        }));
    }
    eprintln!(
        "cluster backup written to {} (id {}): etcd revision {}, nodes {}, root epochs {:?}, {} files",
        created.dir.display(),
        created.id,
        manifest.etcd_revision,
        manifest
            .nodes
            .iter()
            .map(|n| format!("{} (audit head {})", n.node_id, n.audit_head_seq))
            .collect::<Vec<_>>()
            .join(", "),
        manifest.root_epochs,
        manifest.files.len(),
    );
    Ok(())
}

/// `ID=PATH` pairs into a map, refusing a malformed or repeated id.
fn parse_pairs(
    pairs: &[String],
    flag: &str,
    into: &mut std::collections::BTreeMap<String, backup::NodeLedger>,
    make: fn(PathBuf) -> backup::NodeLedger,
) -> anyhow::Result<()> {
    for pair in pairs {
        let (id, path) = pair
            .split_once('=')
            .filter(|(id, path)| !id.is_empty() && !path.is_empty())
            .with_context(|| format!("{flag} {pair:?}: expected ID=PATH"))?;
        anyhow::ensure!(
            into.insert(id.to_owned(), make(PathBuf::from(path)))
                .is_none(),
            "{flag}: node {id} given twice"
        );
    }
    Ok(())
}

fn restore_cluster(args: RestoreArgs, json: bool) -> anyhow::Result<()> {
    let (config, cluster) = cluster_config(&args.config)?;
    let mut ledgers = std::collections::BTreeMap::new();
    parse_pairs(
        &args.nodes,
        "--node",
        &mut ledgers,
        backup::NodeLedger::DataDir,
    )?;
    parse_pairs(
        &args.node_exports,
        "--node-export",
        &mut ledgers,
        backup::NodeLedger::Export,
    )?;
    // A damaged or altered backup is refused before etcd is even
    // contacted (connecting registers this process as a node: a write).
    // `restore_cluster` verifies it again.
    backup::verify_cluster(&args.from)
        .with_context(|| format!("restore of {} failed", args.from.display()))?;
    // The restore connects as a node of its own (registered while it runs,
    // gone when it ends), so that it never shares a node's identity.
    let mut restore_node = cluster.clone();
    restore_node.node_id = format!("kms-restore-{}", std::process::id());
    let catalogue = crate::cluster::open_catalogue(&restore_node, "")
        .context("cannot open the restored etcd catalogue ([cluster] etcd_endpoints)")?;
    let replaced = if args.replaced_etcd_endpoints.is_empty() {
        None
    } else {
        let mut old = restore_node.clone();
        old.node_id = format!("kms-restore-old-{}", std::process::id());
        old.etcd_endpoints = args.replaced_etcd_endpoints.clone();
        Some(
            crate::cluster::open_catalogue(&old, "")
                .context("cannot open the replaced etcd catalogue (--replaced-etcd-endpoints)")?,
        )
    };
    let report = backup::restore_cluster(&backup::ClusterRestoreOptions {
        from: args.from.clone(),
        catalogue: &catalogue,
        replaced: replaced.as_ref(),
        ledgers,
        hsm: config.hsm.clone(),
    })
    .with_context(|| format!("restore of {} failed", args.from.display()))?;
    if json {
        return emit_json(&serde_json::json!({
            "backup_id": report.backup_id,
            "etcd_revision": report.manifest.etcd_revision,
            "ledger_records": report.ledger_records,
            "replayed_destructions": report.replayed_destructions,
            "keys_put_back": report.keys_put_back,
            "versions_put_back": report
                .versions_put_back
                .iter()
                .map(|(key, version)| serde_json::json!({"key_id": key, "version": version}))
                .collect::<Vec<_>>(),
        }));
    }
    eprintln!(
        "restored cluster backup {} into the etcd catalogue at {}.\n\
         Ledger: {} audit record(s) after the backup; destruction replayed for {} key(s); \
         {} key(s) and {} version(s) created after the backup put back.\n\
         Next: start the nodes; the first to lead the restore rotates every enabled key \
         (restored GCM counters are not trusted) and records the restore in its audit log; \
         the others wait for it before serving.",
        report.backup_id,
        cluster.etcd_endpoints.join(","),
        report.ledger_records,
        report.replayed_destructions.len(),
        report.keys_put_back.len(),
        report.versions_put_back.len(),
    );
    Ok(())
}
