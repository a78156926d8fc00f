//! `kms audit verify --cluster` and `kms audit list --endpoints`: the audit
//! logs of a cluster's nodes, one per node, verified and listed together
//! (design note §2.3.6). Each node answers for its own log; the cross-node
//! checks are assembled here, from heads the nodes' witness events hold.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use kms_proto::v1 as pb;
use serde_json::{Value, json};

use super::audit::{AuditListArgs, event_json, events_table, head_json, list_events, verify_json};
use super::output::{self, Table};
use super::{ClientOptions, connect};

/// The client options with another endpoint.
fn at(options: &ClientOptions, endpoint: &str) -> ClientOptions {
    let mut options = options.clone();
    endpoint.clone_into(&mut options.endpoint);
    options
}

/// One node's part of a cluster verification.
#[derive(Debug, Clone)]
pub(crate) struct NodeVerification {
    pub(crate) endpoint: String,
    /// The node's last answer (with the heads witnessed for it checked, if any).
    pub(crate) reply: pb::VerifyAuditLogResponse,
    /// The nodes that witnessed each head checked on this node, by (sequence, hash).
    pub(crate) witnesses: BTreeMap<(u64, Vec<u8>), BTreeSet<String>>,
}

/// The heads the nodes of `first` (their first answers) witnessed for node
/// `node`, once each, with who witnessed them.
fn heads_for(
    node: &str,
    first: &[(String, pb::VerifyAuditLogResponse)],
) -> BTreeMap<(u64, Vec<u8>), (pb::WitnessedHead, BTreeSet<String>)> {
    let mut heads: BTreeMap<(u64, Vec<u8>), (pb::WitnessedHead, BTreeSet<String>)> =
        BTreeMap::new();
    for (_, reply) in first {
        for head in reply.witnessed_heads.iter().filter(|h| h.node == node) {
            heads
                .entry((head.sequence, head.hash.clone()))
                .or_insert_with(|| (head.clone(), BTreeSet::new()))
                .1
                .insert(reply.node_id.clone());
        }
    }
    heads
}

/// What makes the cluster's audit log invalid, one line each, naming the
/// node and sequence: a chain that fails, a node without an id or with the
/// same id as another, a head witnessed for a node not among the endpoints,
/// a log that ends before a head witnessed for it, an event whose hash
/// differs from the one witnessed. Empty: VALID.
pub(crate) fn problems(nodes: &[NodeVerification]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    for n in nodes {
        let id = &n.reply.node_id;
        if id.is_empty() {
            out.push(format!(
                "{}: the node has no [cluster] node_id (a single node)",
                n.endpoint
            ));
        } else if !ids.insert(id.clone()) {
            out.push(format!(
                "{}: node id {id:?} answers at two endpoints",
                n.endpoint
            ));
        }
        if !n.reply.valid {
            out.push(format!(
                "node {id}: chain fails at sequence {}: {}",
                n.reply.first_invalid_sequence,
                output::sanitize(&n.reply.failure_reason)
            ));
        }
        for check in &n.reply.witness_checks {
            let Some(head) = &check.head else { continue };
            let by = n
                .witnesses
                .get(&(head.sequence, head.hash.clone()))
                .map(|w| w.iter().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            match pb::WitnessOutcome::try_from(check.outcome) {
                Ok(pb::WitnessOutcome::Matches) => {}
                Ok(pb::WitnessOutcome::LogEndsBefore) => out.push(format!(
                    "node {id}: log ends at sequence {}, before sequence {} witnessed by {by}",
                    check.log_end, head.sequence
                )),
                Ok(pb::WitnessOutcome::HashMismatch) => out.push(format!(
                    "node {id}: event {} has hash {}, but {by} witnessed {}",
                    head.sequence,
                    hex::encode(&check.found_hash),
                    hex::encode(&head.hash)
                )),
                _ => out.push(format!(
                    "node {id}: head {} witnessed by {by} was not checked",
                    head.sequence
                )),
            }
        }
    }
    // Heads witnessed for nodes nobody asked.
    let mut unknown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for n in nodes {
        for head in &n.reply.witnessed_heads {
            if !ids.contains(&head.node) {
                unknown
                    .entry(head.node.clone())
                    .or_default()
                    .insert(n.reply.node_id.clone());
            }
        }
    }
    for (node, by) in unknown {
        out.push(format!(
            "node {node}: witnessed by {} but not among the endpoints: its log is not checked",
            by.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    out
}

/// `kms audit verify --cluster --endpoints A,B,C`: asks every node for its
/// chain and the heads it witnesses, then asks each node to check the heads
/// the others witnessed for it; VALID only if nothing is wrong.
pub(crate) async fn verify_cluster(
    endpoints: &[String],
    options: &ClientOptions,
) -> anyhow::Result<()> {
    if endpoints.is_empty() {
        anyhow::bail!("--cluster needs --endpoints A,B,C");
    }
    let mut clients = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let client = connect(&at(options, endpoint))
            .await
            .with_context(|| format!("node at {endpoint}"))?;
        clients.push(client);
    }
    let mut first = Vec::with_capacity(clients.len());
    for (endpoint, client) in endpoints.iter().zip(&clients) {
        let reply = client
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await
            .with_context(|| format!("node at {endpoint}"))?;
        first.push((endpoint.clone(), reply));
    }
    let mut nodes = Vec::with_capacity(first.len());
    for ((endpoint, reply), client) in first.iter().zip(&clients) {
        let heads = if reply.node_id.is_empty() {
            BTreeMap::new()
        } else {
            heads_for(&reply.node_id, &first)
        };
        let (reply, witnesses) = if heads.is_empty() {
            (reply.clone(), BTreeMap::new())
        } else {
            let request = pb::VerifyAuditLogRequest {
                witnessed_for_node: heads.values().map(|(h, _)| h.clone()).collect(),
            };
            let reply = client
                .verify_audit_log(request)
                .await
                .with_context(|| format!("node at {endpoint}"))?;
            let witnesses = heads.into_iter().map(|(k, (_, by))| (k, by)).collect();
            (reply, witnesses)
        };
        nodes.push(NodeVerification {
            endpoint: endpoint.clone(),
            reply,
            witnesses,
        });
    }
    let problems = problems(&nodes);
    if options.json {
        output::emit_json(&cluster_json(&nodes, &problems))?;
    } else {
        output::emit(&cluster_text(&nodes, &problems))?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "the cluster's audit log is INVALID: {}",
            output::sanitize(&problems.join("; "))
        )
    }
}

fn cluster_text(nodes: &[NodeVerification], problems: &[String]) -> String {
    let mut text = output::render_pairs(&[(
        "Cluster audit log",
        if problems.is_empty() {
            "VALID"
        } else {
            "INVALID"
        }
        .to_owned(),
    )]);
    text.push('\n');
    let mut table = Table::new(&[
        "NODE",
        "ENDPOINT",
        "CHAIN",
        "EVENTS",
        "LAST SEQ",
        "WITNESSES",
        "HEADS CHECKED",
    ]);
    for n in nodes {
        table.row(vec![
            output::dash(&n.reply.node_id),
            n.endpoint.clone(),
            if n.reply.valid { "VALID" } else { "INVALID" }.to_owned(),
            n.reply.events_verified.to_string(),
            n.reply.last_sequence.to_string(),
            n.reply.witnessed_heads.len().to_string(),
            n.reply.witness_checks.len().to_string(),
        ]);
    }
    text.push_str(&table.render());
    for p in problems {
        text.push_str("\nproblem: ");
        text.push_str(&output::sanitize(p));
    }
    if !problems.is_empty() {
        text.push('\n');
    }
    text
}

fn check_json(check: &pb::WitnessCheck) -> Value {
    json!({
        "head": check.head.as_ref().map(head_json),
        "outcome": pb::WitnessOutcome::try_from(check.outcome)
            .map_or("UNKNOWN", |o| o.as_str_name().trim_start_matches("WITNESS_OUTCOME_")),
        "log_end": check.log_end,
        "found_hash": hex::encode(check.found_hash.as_slice()),
    })
}

fn cluster_json(nodes: &[NodeVerification], problems: &[String]) -> Value {
    json!({
        "valid": problems.is_empty(),
        "nodes": nodes.iter().map(|n| {
            let mut chain = verify_json(&n.reply);
            chain["node_id"] = n.reply.node_id.clone().into();
            chain["endpoint"] = n.endpoint.clone().into();
            chain["witnessed_heads"] =
                n.reply.witnessed_heads.iter().map(head_json).collect::<Vec<_>>().into();
            chain["witness_checks"] =
                n.reply.witness_checks.iter().map(check_json).collect::<Vec<_>>().into();
            chain
        }).collect::<Vec<_>>(),
        "problems": problems,
    })
}

/// Events of several nodes, merged by (time, node, sequence).
pub(crate) fn merge(per_node: Vec<(String, Vec<pb::AuditEvent>)>) -> Vec<(String, pb::AuditEvent)> {
    let mut all: Vec<(String, pb::AuditEvent)> = per_node
        .into_iter()
        .flat_map(|(node, events)| events.into_iter().map(move |e| (node.clone(), e)))
        .collect();
    all.sort_by(|(na, a), (nb, b)| {
        let time = |e: &pb::AuditEvent| e.time.map(|t| (t.seconds, t.nanos));
        (time(a), na, a.sequence).cmp(&(time(b), nb, b.sequence))
    });
    all
}

/// `kms audit list --endpoints A,B,C`: each node's matching events (at most
/// --limit from each, which is enough for the merged first --limit), merged
/// by (time, node, sequence), labelled with the node (its id, or the
/// endpoint of a node without one).
pub(crate) async fn list_merged(
    args: &AuditListArgs,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let mut per_node = Vec::with_capacity(args.endpoints.len());
    for endpoint in &args.endpoints {
        let client = connect(&at(options, endpoint))
            .await
            .with_context(|| format!("node at {endpoint}"))?;
        let (events, node_id) = list_events(&client, args)
            .await
            .with_context(|| format!("node at {endpoint}"))?;
        let label = if node_id.is_empty() {
            endpoint.clone()
        } else {
            node_id
        };
        per_node.push((label, events));
    }
    let mut merged = merge(per_node);
    if let Some(limit) = args.limit {
        merged.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    if options.json {
        output::emit_json(&Value::Array(
            merged
                .iter()
                .map(|(node, e)| {
                    let mut v = event_json(e);
                    v["node"] = node.clone().into();
                    v
                })
                .collect(),
        ))
    } else if merged.is_empty() {
        output::emit("No audit events.\n")
    } else {
        output::emit(&merged_table(&merged))
    }
}

/// The events table with a NODE column first.
fn merged_table(merged: &[(String, pb::AuditEvent)]) -> String {
    let events: Vec<pb::AuditEvent> = merged.iter().map(|(_, e)| e.clone()).collect();
    let rendered = events_table(&events).render();
    let width = merged
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0)
        .max("NODE".len());
    let mut out = String::new();
    for (i, line) in rendered.lines().enumerate() {
        let label = if i == 0 {
            "NODE"
        } else {
            merged[i - 1].0.as_str()
        };
        out.push_str(&format!("{label:<width$}  {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(node: &str, sequence: u64, hash: u8) -> pb::WitnessedHead {
        pb::WitnessedHead {
            node: node.into(),
            sequence,
            hash: vec![hash; 32],
            published_ms: 1,
            checkpoint_mac: vec![9; 32],
        }
    }

    fn reply(node: &str, heads: Vec<pb::WitnessedHead>) -> pb::VerifyAuditLogResponse {
        pb::VerifyAuditLogResponse {
            valid: true,
            events_verified: 10,
            last_sequence: 10,
            node_id: node.into(),
            witnessed_heads: heads,
            ..Default::default()
        }
    }

    #[test]
    fn heads_witnessed_by_several_nodes_are_checked_once_and_credited_to_all() {
        let first = vec![
            ("a".to_owned(), reply("node-a", vec![head("node-b", 9, 1)])),
            ("b".to_owned(), reply("node-b", vec![head("node-a", 4, 2)])),
            (
                "c".to_owned(),
                reply("node-c", vec![head("node-b", 9, 1), head("node-a", 4, 2)]),
            ),
        ];
        let for_b = heads_for("node-b", &first);
        assert_eq!(for_b.len(), 1);
        let (h, by) = &for_b[&(9, vec![1; 32])];
        assert_eq!(h.sequence, 9);
        assert_eq!(
            by.iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["node-a", "node-c"]
        );
        assert!(heads_for("node-c", &first).is_empty());
    }

    fn checked(node: &str, check: pb::WitnessCheck, by: &[&str]) -> NodeVerification {
        let h = check.head.clone().unwrap_or_default();
        let mut r = reply(node, Vec::new());
        r.witness_checks = vec![check];
        NodeVerification {
            endpoint: format!("http://{node}"),
            reply: r,
            witnesses: BTreeMap::from([(
                (h.sequence, h.hash),
                by.iter().map(|s| (*s).to_owned()).collect(),
            )]),
        }
    }

    #[test]
    fn problems_name_the_node_and_the_sequence() {
        let ok = checked(
            "node-a",
            pb::WitnessCheck {
                head: Some(head("node-a", 4, 2)),
                outcome: pb::WitnessOutcome::Matches as i32,
                ..Default::default()
            },
            &["node-b"],
        );
        assert!(problems(std::slice::from_ref(&ok)).is_empty());
        let truncated = checked(
            "node-b",
            pb::WitnessCheck {
                head: Some(head("node-b", 9, 1)),
                outcome: pb::WitnessOutcome::LogEndsBefore as i32,
                log_end: 8,
                ..Default::default()
            },
            &["node-a", "node-c"],
        );
        let rewritten = checked(
            "node-c",
            pb::WitnessCheck {
                head: Some(head("node-c", 9, 3)),
                outcome: pb::WitnessOutcome::HashMismatch as i32,
                found_hash: vec![4; 32],
                ..Default::default()
            },
            &["node-a"],
        );
        let p = problems(&[ok.clone(), truncated, rewritten]);
        assert_eq!(
            p,
            vec![
                "node node-b: log ends at sequence 8, before sequence 9 witnessed by node-a, node-c"
                    .to_owned(),
                format!(
                    "node node-c: event 9 has hash {}, but node-a witnessed {}",
                    "04".repeat(32),
                    "03".repeat(32)
                ),
            ]
        );
        // A node without an id, a duplicate id, a broken chain, an unlisted node.
        let mut single = reply("", Vec::new());
        single.valid = false;
        single.first_invalid_sequence = 3;
        single.failure_reason = "HashMismatch".into();
        let mut witness_of_ghost = ok.clone();
        witness_of_ghost.reply.witnessed_heads = vec![head("node-z", 1, 1)];
        let p = problems(&[
            witness_of_ghost,
            ok,
            NodeVerification {
                endpoint: "http://single".into(),
                reply: single,
                witnesses: BTreeMap::new(),
            },
        ]);
        assert_eq!(
            p,
            vec![
                "http://node-a: node id \"node-a\" answers at two endpoints".to_owned(),
                "http://single: the node has no [cluster] node_id (a single node)".to_owned(),
                "node : chain fails at sequence 3: HashMismatch".to_owned(),
                "node node-z: witnessed by node-a but not among the endpoints: its log is not checked"
                    .to_owned(),
            ]
        );
    }

    fn event_at(seconds: i64, sequence: u64) -> pb::AuditEvent {
        pb::AuditEvent {
            sequence,
            time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn listings_merge_by_time_then_node_then_sequence() {
        let merged = merge(vec![
            ("node-b".into(), vec![event_at(1, 1), event_at(3, 2)]),
            ("node-a".into(), vec![event_at(1, 7), event_at(2, 8)]),
        ]);
        let order: Vec<(&str, u64)> = merged
            .iter()
            .map(|(n, e)| (n.as_str(), e.sequence))
            .collect();
        assert_eq!(
            order,
            vec![("node-a", 7), ("node-b", 1), ("node-a", 8), ("node-b", 2)]
        );
        let table = merged_table(&merged);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NODE    SEQ"), "{table}");
        assert!(lines[1].starts_with("node-a  7 "), "{table}");
        assert!(lines[2].starts_with("node-b  1 "), "{table}");
    }
}
