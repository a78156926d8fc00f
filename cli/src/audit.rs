//! `kms audit list|verify|export|tail`: reading, following and verifying the
//! audit log through the Audit service. Audit events never contain plaintext, keys or context
//! values (only the context's SHA-256), so all of an event may be printed.
#![allow(clippy::print_stdout)]

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kms_client::KmsClient;
use kms_proto::v1 as pb;
use serde_json::{Value, json};

use super::output::{self, Table};
use super::{ClientOptions, connect, next_page_token, parse};

/// `kms audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// List audit events matching the filters, oldest first.
    List(AuditListArgs),
    /// Verify the whole hash chain and every checkpoint MAC; fails if the log is invalid.
    /// With --cluster, verify every node's log and the heads the nodes witnessed for
    /// each other.
    Verify(AuditVerifyArgs),
    /// Export every event as JSON lines (one event per line).
    Export(AuditExportArgs),
    /// Print events as JSON lines (one object per line, for log shippers such
    /// as Vector or Fluent Bit), from a sequence number on; with --follow, keep
    /// printing new events as they are committed.
    Tail(AuditTailArgs),
}

/// Arguments of `kms audit verify`.
#[derive(Debug, clap::Args)]
pub struct AuditVerifyArgs {
    /// Verify a cluster: every node's chain, and every head any node witnessed
    /// for another (it must not be beyond that node's log end and must match
    /// its event's hash). VALID only if all of it holds. Needs --endpoints.
    #[arg(long, requires = "endpoints")]
    pub cluster: bool,
    /// The cluster's nodes (gRPC endpoints, comma-separated), every one of them:
    /// a head witnessed for a node not listed cannot be checked and makes the
    /// result INVALID. The other client options (token, TLS) apply to each.
    #[arg(
        long,
        value_name = "A,B,C",
        value_delimiter = ',',
        requires = "cluster"
    )]
    pub endpoints: Vec<String>,
}

/// Arguments of `kms audit tail`.
#[derive(Debug, clap::Args)]
pub struct AuditTailArgs {
    /// Keep running and print each new event as soon as it is committed. When
    /// the server is unavailable (restarting) or the connection breaks,
    /// reconnect and resume after the last event printed: no event is printed
    /// twice or skipped.
    #[arg(long)]
    pub follow: bool,
    /// Start at the event with this sequence number (default 1: the whole log).
    /// To resume a shipper, pass the last sequence it shipped + 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub since_sequence: Option<u64>,
}

/// Filters of `kms audit list`; they combine with AND.
#[derive(Debug, clap::Args)]
pub struct AuditListArgs {
    /// Only events for this key (key id, or an alias resolved to its key now).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Only events by exactly this principal ("anonymous", "system", ...).
    #[arg(long, value_name = "PRINCIPAL")]
    pub principal: Option<String>,
    /// Only events of this operation, by RPC name (Encrypt, CreateKey, ReEncrypt, ...).
    #[arg(long, value_name = "NAME", value_parser = parse::operation)]
    pub operation: Option<pb::Operation>,
    /// Only events at or after this time (RFC 3339, e.g. 2026-01-31T12:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = output::parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Only events strictly before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = output::parse_time)]
    pub until: Option<prost_types::Timestamp>,
    /// Show at most N events (default: all that match).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// List the events of several nodes (gRPC endpoints, comma-separated),
    /// merged by (time, node, sequence) and labelled with the node.
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    pub endpoints: Vec<String>,
}

/// Arguments of `kms audit export`.
#[derive(Debug, clap::Args)]
pub struct AuditExportArgs {
    /// Write to FILE; "-" or absent: stdout.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub(crate) async fn run(command: AuditCommand, options: &ClientOptions) -> anyhow::Result<()> {
    if let AuditCommand::Tail(args) = command {
        let client = if args.follow {
            connect_patiently(options).await?
        } else {
            connect(options).await?
        };
        return tail(&client, args).await;
    }
    if let AuditCommand::Verify(args) = &command
        && args.cluster
    {
        return super::audit_cluster::verify_cluster(&args.endpoints, options).await;
    }
    if let AuditCommand::List(args) = &command
        && !args.endpoints.is_empty()
    {
        return super::audit_cluster::list_merged(args, options).await;
    }
    let client = connect(options).await?;
    match command {
        AuditCommand::List(args) => list(&client, args, options).await,
        AuditCommand::Verify(_) => verify(&client, options).await,
        AuditCommand::Export(args) => export(&client, args).await,
        AuditCommand::Tail(args) => tail(&client, args).await,
    }
}

/// First connection of `kms audit tail --follow`: a shipper started before
/// the server (at boot, in the same pod) waits for it, retrying with the
/// stream's backoff, instead of exiting; settings that can never work
/// (scheme, TLS files, token) fail at once.
async fn connect_patiently(options: &ClientOptions) -> anyhow::Result<KmsClient> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match KmsClient::connect(super::client_config(options)?).await {
            Ok(client) => return Ok(client),
            Err(e @ kms_client::Error::Connect { .. }) => {
                eprintln!(
                    "kms audit tail: {}; retrying in {} ms",
                    output::sanitize(&kms_client::join_causes(
                        anyhow::Error::new(e).chain().map(ToString::to_string)
                    )),
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Backoff of `kms audit tail --follow` between attempts: doubling from
/// 100 ms to 5 s.
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes one event as a compact JSON line to stdout and flushes it (a shipper
/// reading the pipe sees each event at once).
fn print_line(event: &pb::AuditEvent) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &event_json(event))?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Whether a failed stream is worth reopening: the server is unavailable
/// (shutting down, restarting, unreachable) or the connection broke mid-stream
/// (which the transport reports as CANCELLED or UNKNOWN).
fn reconnectable(error: &kms_client::Error) -> bool {
    matches!(
        error.code(),
        Some(tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown)
    )
}

/// `kms audit tail`: without --follow, the events from --since-sequence to the
/// end of the log as it is when the command starts (ListAuditEvents by
/// sequence range); with --follow, a WatchAuditEvents stream, reopened after
/// the last event printed whenever it fails for a reason that may pass.
async fn tail(client: &KmsClient, args: AuditTailArgs) -> anyhow::Result<()> {
    let mut next = args.since_sequence.unwrap_or(1);
    if !args.follow {
        let mut page_token = String::new();
        loop {
            let reply = client
                .list_audit_events(pb::ListAuditEventsRequest {
                    from_sequence: next,
                    // The server's largest page (larger sizes are clamped).
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await?;
            for event in &reply.events {
                print_line(event)?;
            }
            match next_page_token(&page_token, reply.next_page_token)? {
                Some(token) => page_token = token,
                None => return Ok(()),
            }
        }
    }
    let mut backoff = FIRST_BACKOFF;
    loop {
        let failure = match client.watch_audit_events(next).await {
            Err(e) => e,
            Ok(mut stream) => loop {
                match stream.next().await {
                    Ok(Some(event)) => {
                        // The server promises no gaps and no duplicates; a
                        // shipper must not be handed either silently.
                        if event.sequence != next {
                            anyhow::bail!(
                                "the server sent audit event {} where {next} was expected",
                                event.sequence
                            );
                        }
                        print_line(&event)?;
                        next += 1;
                        backoff = FIRST_BACKOFF;
                    }
                    // A stream the server ended cleanly: reopen it as well.
                    Ok(None) => {
                        break kms_client::Error::Rpc {
                            rpc: "WatchAuditEvents",
                            code: tonic::Code::Unavailable,
                            message: "the server ended the stream".to_owned(),
                            attempts: 1,
                        };
                    }
                    Err(e) => break e,
                }
            },
        };
        if !reconnectable(&failure) {
            return Err(failure.into());
        }
        eprintln!(
            "kms audit tail: {}; reconnecting in {} ms (resuming at sequence {next})",
            output::sanitize(&failure.to_string()),
            backoff.as_millis()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn list(
    client: &KmsClient,
    args: AuditListArgs,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let (events, _) = list_events(client, &args).await?;
    if options.json {
        output::emit_json(&Value::Array(events.iter().map(event_json).collect()))
    } else if events.is_empty() {
        output::emit("No audit events.\n")
    } else {
        output::emit(&events_table(&events).render())
    }
}

/// The events `kms audit list` shows, oldest first, and the answering node's
/// id (empty on a single node).
pub(crate) async fn list_events(
    client: &KmsClient,
    args: &AuditListArgs,
) -> anyhow::Result<(Vec<pb::AuditEvent>, String)> {
    let limit = args.limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut node_id = String::new();
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let remaining = limit.map(|limit| limit.saturating_sub(events.len()));
        let request = pb::ListAuditEventsRequest {
            start_time: args.since,
            end_time: args.until,
            key_id: args.key.clone().unwrap_or_default(),
            principal: args.principal.clone().unwrap_or_default(),
            operation: args
                .operation
                .map_or(pb::Operation::Unspecified as i32, |op| op as i32),
            page_size: remaining.map_or(0, |n| i32::try_from(n).unwrap_or(i32::MAX)),
            page_token: page_token.clone(),
            ..Default::default()
        };
        let reply = client.list_audit_events(request).await?;
        // Every page comes from the same node.
        if node_id.is_empty() {
            node_id = reply.node_id;
        }
        events.extend(reply.events);
        if let Some(limit) = limit
            && events.len() >= limit
        {
            events.truncate(limit);
            break;
        }
        match next_page_token(&page_token, reply.next_page_token)? {
            Some(next) => page_token = next,
            None => break,
        }
    }
    Ok((events, node_id))
}

pub(crate) fn events_table(events: &[pb::AuditEvent]) -> Table {
    let mut table = Table::new(&[
        "SEQ",
        "TIME",
        "PRINCIPAL",
        "OPERATION",
        "KEY",
        "VERSION",
        "RESULT",
        "LATENCY",
    ]);
    for event in events {
        table.row(vec![
            event.sequence.to_string(),
            output::time_cell(event.time.as_ref()),
            output::dash(&event.principal),
            parse::operation_name(event.operation),
            output::dash(&event.key_id),
            if event.key_version == 0 {
                "-".to_owned()
            } else {
                event.key_version.to_string()
            },
            kms_proto::numeric_code_name(event.result_code),
            output::latency_cell(event.latency_us),
        ]);
    }
    table
}

async fn verify(client: &KmsClient, options: &ClientOptions) -> anyhow::Result<()> {
    let reply = client
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await?;
    if options.json {
        output::emit_json(&verify_json(&reply))?;
    } else {
        output::emit(&output::render_pairs(&verify_pairs(&reply)))?;
    }
    if reply.valid {
        Ok(())
    } else {
        anyhow::bail!(
            "the audit log is INVALID: verification failed at sequence {}: {}",
            reply.first_invalid_sequence,
            output::sanitize(&reply.failure_reason)
        )
    }
}

fn verify_pairs(reply: &pb::VerifyAuditLogResponse) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        (
            "Audit log",
            if reply.valid { "VALID" } else { "INVALID" }.to_owned(),
        ),
        ("Events verified", reply.events_verified.to_string()),
        (
            "Checkpoints verified",
            reply.checkpoints_verified.to_string(),
        ),
        ("Last sequence", reply.last_sequence.to_string()),
        (
            "Head hash",
            output::dash(&hex::encode(reply.head_hash.as_slice())),
        ),
    ];
    if !reply.valid {
        pairs.push((
            "First invalid sequence",
            reply.first_invalid_sequence.to_string(),
        ));
        pairs.push(("Failure", output::dash(&reply.failure_reason)));
    }
    pairs
}

pub(crate) fn verify_json(reply: &pb::VerifyAuditLogResponse) -> Value {
    json!({
        "valid": reply.valid,
        "events_verified": reply.events_verified,
        "checkpoints_verified": reply.checkpoints_verified,
        "last_sequence": reply.last_sequence,
        "head_hash": hex::encode(reply.head_hash.as_slice()),
        "first_invalid_sequence": (!reply.valid).then_some(reply.first_invalid_sequence),
        "failure_reason": (!reply.valid).then_some(&reply.failure_reason),
    })
}

/// Pages through the whole log and writes one compact JSON event per line, page
/// by page, so that memory use does not grow with the log.
async fn export(client: &KmsClient, args: AuditExportArgs) -> anyhow::Result<()> {
    let to_file = args.output.as_deref().filter(|p| p.as_os_str() != "-");
    // Send (no StdoutLock): the writer lives across awaits.
    let sink: Box<dyn Write + Send> = match to_file {
        Some(path) => Box::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(io::stdout()),
    };
    let mut writer = BufWriter::new(sink);
    let describe =
        |path: Option<&Path>| path.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
    let mut count: u64 = 0;
    let mut page_token = String::new();
    loop {
        let request = pb::ListAuditEventsRequest {
            page_token: page_token.clone(),
            ..Default::default()
        };
        let reply = client.list_audit_events(request).await?;
        for event in &reply.events {
            serde_json::to_writer(&mut writer, &event_json(event))?;
            writer
                .write_all(b"\n")
                .with_context(|| format!("cannot write {}", describe(to_file)))?;
            count += 1;
        }
        match next_page_token(&page_token, reply.next_page_token)? {
            Some(next) => page_token = next,
            None => break,
        }
    }
    writer
        .flush()
        .with_context(|| format!("cannot write {}", describe(to_file)))?;
    if let Some(path) = to_file {
        eprintln!("Exported {count} audit events to {}.", path.display());
    }
    Ok(())
}

/// The JSON form of an audit event: digests and the chain hash in lowercase hex,
/// the operation by RPC name, the result code with its name, the time in RFC 3339
/// at full precision.
pub(crate) fn event_json(event: &pb::AuditEvent) -> Value {
    let mut value = json!({
        "sequence": event.sequence,
        "time": output::time_json(event.time.as_ref()),
        "principal": event.principal,
        "peer": event.peer,
        "request_id": event.request_id,
        "operation": parse::operation_name(event.operation),
        "key_id": event.key_id,
        "key_version": event.key_version,
        "context_digest": hex::encode(event.context_digest.as_slice()),
        "result_code": event.result_code,
        "result": kms_proto::numeric_code_name(event.result_code),
        "latency_us": event.latency_us,
        "hash": hex::encode(event.hash.as_slice()),
    });
    // Only witness events (cluster nodes) have heads: other events' JSON is
    // what it always was.
    if !event.witnessed_heads.is_empty() {
        value["witnessed_heads"] = event
            .witnessed_heads
            .iter()
            .map(head_json)
            .collect::<Vec<_>>()
            .into();
    }
    value
}

/// The JSON form of a witnessed head: hashes in lowercase hex.
pub(crate) fn head_json(head: &pb::WitnessedHead) -> Value {
    json!({
        "node": head.node,
        "sequence": head.sequence,
        "hash": hex::encode(head.hash.as_slice()),
        "published_ms": head.published_ms,
        "checkpoint_mac": hex::encode(head.checkpoint_mac.as_slice()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, operation: pb::Operation, result_code: i32) -> pb::AuditEvent {
        pb::AuditEvent {
            sequence,
            time: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 123_456_000,
            }),
            principal: "anonymous".into(),
            peer: "127.0.0.1:5000".into(),
            request_id: "req-1".into(),
            operation: operation as i32,
            key_id: if operation == pb::Operation::ListKeys {
                String::new()
            } else {
                "key-0123456789abcdef0123456789abcdef".into()
            },
            key_version: if operation == pb::Operation::Encrypt {
                2
            } else {
                0
            },
            context_digest: vec![0xab; 32],
            result_code,
            latency_us: 1_500,
            hash: vec![0x01, 0xff],
            witnessed_heads: Vec::new(),
        }
    }

    /// `kms audit ...` as the binary parses it.
    #[derive(Debug, clap::Parser)]
    struct AuditCli {
        #[command(subcommand)]
        command: AuditCommand,
    }

    fn parse_tail(args: &[&str]) -> Result<AuditTailArgs, clap::Error> {
        use clap::Parser as _;
        let cli =
            AuditCli::try_parse_from(["audit", "tail"].into_iter().chain(args.iter().copied()))?;
        match cli.command {
            AuditCommand::Tail(args) => Ok(args),
            other => panic!("not tail: {other:?}"),
        }
    }

    #[test]
    fn tail_takes_follow_and_a_positive_since_sequence() {
        let args = parse_tail(&["--follow", "--since-sequence", "42"]).expect("parses");
        assert!(args.follow);
        assert_eq!(args.since_sequence, Some(42));
        let args = parse_tail(&[]).expect("parses");
        assert!(!args.follow);
        assert_eq!(args.since_sequence, None);
        // Sequence numbers start at 1.
        assert!(parse_tail(&["--since-sequence", "0"]).is_err());
        assert!(parse_tail(&["--since-sequence", "-1"]).is_err());
    }

    #[test]
    fn only_transient_stream_failures_reconnect() {
        let failure = |code| kms_client::Error::Rpc {
            rpc: "WatchAuditEvents",
            code,
            message: String::new(),
            attempts: 1,
        };
        assert!(reconnectable(&failure(tonic::Code::Unavailable)));
        assert!(reconnectable(&failure(tonic::Code::Unknown)));
        assert!(!reconnectable(&failure(tonic::Code::PermissionDenied)));
        assert!(!reconnectable(&failure(tonic::Code::Unauthenticated)));
        assert!(!reconnectable(&kms_client::Error::InvalidToken));
    }

    #[test]
    fn events_table_shows_names_not_numbers() {
        let text = events_table(&[
            event(1, pb::Operation::Encrypt, 0),
            event(12, pb::Operation::ListKeys, 5),
        ])
        .render();
        assert_eq!(
            text,
            "SEQ  TIME                  PRINCIPAL  OPERATION  KEY                                   VERSION  RESULT     LATENCY\n\
             1    2026-01-01T00:00:00Z  anonymous  Encrypt    key-0123456789abcdef0123456789abcdef  2        OK         1.500ms\n\
             12   2026-01-01T00:00:00Z  anonymous  ListKeys   -                                     -        NOT_FOUND  1.500ms\n"
        );
    }

    #[test]
    fn event_json_has_hex_digests_and_names() {
        let value = event_json(&event(7, pb::Operation::ReEncrypt, 3));
        assert_eq!(value["sequence"], 7);
        assert_eq!(value["time"], "2026-01-01T00:00:00.123456Z");
        assert_eq!(value["operation"], "ReEncrypt");
        assert_eq!(value["result_code"], 3);
        assert_eq!(value["result"], "INVALID_ARGUMENT");
        assert_eq!(value["context_digest"], "ab".repeat(32));
        assert_eq!(value["hash"], "01ff");
        // One line per event in exports.
        assert!(
            !serde_json::to_string(&value)
                .expect("serializes")
                .contains('\n')
        );
    }

    #[test]
    fn verify_output_reports_failures_only_when_invalid() {
        let mut reply = pb::VerifyAuditLogResponse {
            valid: true,
            events_verified: 10,
            checkpoints_verified: 2,
            last_sequence: 10,
            head_hash: vec![0xaa, 0xbb],
            first_invalid_sequence: 0,
            failure_reason: String::new(),
            ..Default::default()
        };
        let value = verify_json(&reply);
        assert_eq!(value["valid"], true);
        assert_eq!(value["head_hash"], "aabb");
        assert_eq!(value["first_invalid_sequence"], Value::Null);
        assert_eq!(verify_pairs(&reply).len(), 5);

        reply.valid = false;
        reply.first_invalid_sequence = 4;
        reply.failure_reason = "hash mismatch".into();
        let value = verify_json(&reply);
        assert_eq!(value["first_invalid_sequence"], 4);
        assert_eq!(value["failure_reason"], "hash mismatch");
        let text = output::render_pairs(&verify_pairs(&reply));
        assert!(
            text.starts_with("Audit log               INVALID\n"),
            "{text}"
        );
        assert!(text.contains("First invalid sequence  4\n"), "{text}");
    }
}
