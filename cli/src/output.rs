//! Output for people and scripts: aligned tables, label/value views, JSON
//! documents, and display names for the proto enums and status codes.
//!
//! Every string that came from the server goes through [`sanitize`] before it
//! reaches a terminal, so a hostile description or alias cannot drive it. Never
//! handles plaintext or data keys: crypto.rs writes those itself, from
//! zeroizing buffers.
#![allow(clippy::print_stdout)]

use std::io::{self, Write};

use kms_proto::v1 as pb;
use serde_json::Value;

/// Columns of text, each as wide as its widest cell, separated by two spaces.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are sanitized here.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.iter().map(String::as_str).map(sanitize).collect());
    }

    /// The table as text, one line per row after the header line, with no
    /// trailing spaces.
    pub(crate) fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain(std::iter::once(self.headers.len()))
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A vertical view of one resource: `Label  value` lines with aligned values.
pub(crate) fn render_pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in pairs {
        let line = format!("{label:<width$}  {}", sanitize(value));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Escapes control characters and bidirectional overrides (as `\u{1b}`), which
/// could move the cursor, clear the screen or reorder what the reader sees:
/// for any text that came from the network (server messages, descriptions,
/// tags) before it reaches a terminal.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let dangerous =
            c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if dangerous {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `-` for an empty value, so that table columns never look shifted.
pub(crate) fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// At most `max` characters of `text`, ending in `...` when cut (for long
/// descriptions in list tables; `describe` shows them whole).
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(max.saturating_sub(3)).collect();
        out.push_str("...");
        out
    }
}

/// Writes text to stdout. A closed pipe (`kms key list | head -1`) is not an error.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(anyhow::Error::from),
    }
}

/// Writes one pretty-printed JSON document (and a newline) to stdout.
pub(crate) fn emit_json(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    emit(&text)
}

/// `KEY_STATE_ENABLED` -> `ENABLED`; a value this client does not know keeps its
/// number.
fn short_enum_name(full: Option<&str>, prefix: &str, value: i32) -> String {
    match full {
        Some(full) => full.strip_prefix(prefix).unwrap_or(full).to_owned(),
        None => format!("UNKNOWN({value})"),
    }
}

pub(crate) fn key_state_name(value: i32) -> String {
    let full = pb::KeyState::try_from(value).ok().map(|s| s.as_str_name());
    short_enum_name(full, "KEY_STATE_", value)
}

pub(crate) fn key_origin_name(value: i32) -> String {
    let full = pb::KeyOrigin::try_from(value).ok().map(|s| s.as_str_name());
    short_enum_name(full, "KEY_ORIGIN_", value)
}

pub(crate) fn key_version_state_name(value: i32) -> String {
    let full = pb::KeyVersionState::try_from(value)
        .ok()
        .map(|s| s.as_str_name());
    short_enum_name(full, "KEY_VERSION_STATE_", value)
}

pub(crate) fn key_spec_name(value: i32) -> String {
    let full = pb::KeySpec::try_from(value).ok().map(|s| s.as_str_name());
    short_enum_name(full, "KEY_SPEC_", value)
}

/// A time for a table cell: RFC 3339 in whole seconds, UTC
/// (`2026-01-31T12:00:00Z`), `-` when unset.
pub(crate) fn time_cell(time: Option<&prost_types::Timestamp>) -> String {
    time.map_or_else(
        || "-".to_owned(),
        |t| {
            let mut whole = *t;
            whole.normalize();
            whole.nanos = 0;
            whole.to_string()
        },
    )
}

/// A time for JSON: RFC 3339 at full precision, UTC
/// (`2026-01-31T12:00:00.123Z`), null when unset.
pub(crate) fn time_json(time: Option<&prost_types::Timestamp>) -> Value {
    time.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// Parses a time on the command line (`--since`, `--until`): RFC 3339
/// (`2026-01-31T12:00:00Z`, `2026-01-31T14:00:00+02:00`; a time without an
/// offset is UTC) or a bare date (`2026-01-31`, midnight UTC), through
/// `prost_types::Timestamp`'s parser.
pub(crate) fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    text.trim().parse().map_err(|_| {
        format!("invalid time {text:?}: expected RFC 3339, e.g. 2026-01-31T12:00:00Z or 2026-01-31")
    })
}

/// A period in the unit it was most likely given in: `90 days`, `12 hours`, `90s`.
pub(crate) fn duration_cell(duration: Option<&prost_types::Duration>) -> String {
    const DAY: i64 = 86_400;
    const HOUR: i64 = 3_600;
    match duration {
        None => "-".to_owned(),
        Some(d) if d.nanos != 0 => format!("{}.{:09}s", d.seconds, d.nanos.unsigned_abs()),
        Some(d) if d.seconds == DAY => "1 day".to_owned(),
        Some(d) if d.seconds != 0 && d.seconds % DAY == 0 => format!("{} days", d.seconds / DAY),
        Some(d) if d.seconds == HOUR => "1 hour".to_owned(),
        Some(d) if d.seconds != 0 && d.seconds % HOUR == 0 => {
            format!("{} hours", d.seconds / HOUR)
        }
        Some(d) => format!("{}s", d.seconds),
    }
}

/// A period for JSON: whole seconds, null when unset.
pub(crate) fn duration_json(duration: Option<&prost_types::Duration>) -> Value {
    duration.map_or(Value::Null, |d| Value::from(d.seconds))
}

/// A latency in microseconds, in a unit that keeps it short.
pub(crate) fn latency_cell(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros}us")
    } else if micros < 1_000_000 {
        format!("{}.{:03}ms", micros / 1_000, micros % 1_000)
    } else {
        format!(
            "{}.{:03}s",
            micros / 1_000_000,
            (micros % 1_000_000) / 1_000
        )
    }
}

/// Tags or a context as `a=1, b=2`, sorted by key so that output is stable.
pub(crate) fn pairs_cell<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort();
    let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    dash(&text.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut table = Table::new(&["KEY ID", "STATE", "DESCRIPTION"]);
        table.row(vec!["key-1".into(), "ENABLED".into(), "first".into()]);
        table.row(vec!["key-22222".into(), "DISABLED".into(), String::new()]);
        table.row(vec!["k".into()]);
        assert_eq!(
            table.render(),
            "KEY ID     STATE     DESCRIPTION\n\
             key-1      ENABLED   first\n\
             key-22222  DISABLED\n\
             k\n"
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["héllo".into(), "x".into()]);
        table.row(vec!["hello!".into(), "y".into()]);
        assert_eq!(table.render(), "A       B\nhéllo   x\nhello!  y\n");
    }

    #[test]
    fn empty_table_renders_only_the_header() {
        let table = Table::new(&["ALIAS", "KEY ID"]);
        assert_eq!(table.render(), "ALIAS  KEY ID\n");
    }

    #[test]
    fn table_cells_are_sanitized() {
        let mut table = Table::new(&["D"]);
        table.row(vec!["a\x1b[31mred\nline\u{202E}".into()]);
        assert_eq!(table.render(), "D\na\\u{1b}[31mred\\nline\\u{202e}\n");
    }

    #[test]
    fn pairs_are_aligned_on_the_longest_label() {
        let text = render_pairs(&[("Key ID", "key-1".into()), ("Primary version", "2".into())]);
        assert_eq!(text, "Key ID           key-1\nPrimary version  2\n");
    }

    #[test]
    fn dash_marks_empty_values() {
        assert_eq!(dash(""), "-");
        assert_eq!(dash("x"), "x");
    }

    #[test]
    fn truncate_cuts_long_text_with_an_ellipsis() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("exactly10!", 10), "exactly10!");
        assert_eq!(truncate("this is too long", 10), "this is...");
        assert_eq!(truncate("ééééééééééé", 5), "éé...");
    }

    #[test]
    fn enum_names_lose_their_prefix_and_unknown_values_keep_their_number() {
        assert_eq!(
            key_state_name(pb::KeyState::PendingDeletion as i32),
            "PENDING_DELETION"
        );
        assert_eq!(
            key_version_state_name(pb::KeyVersionState::ScheduledDestruction as i32),
            "SCHEDULED_DESTRUCTION"
        );
        assert_eq!(key_spec_name(pb::KeySpec::Aes256Gcm as i32), "AES_256_GCM");
        assert_eq!(key_state_name(99), "UNKNOWN(99)");
    }

    #[test]
    fn durations_use_the_largest_whole_unit() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_cell(None), "-");
        assert_eq!(duration_cell(Some(&d(86_400, 0))), "1 day");
        assert_eq!(duration_cell(Some(&d(90 * 86_400, 0))), "90 days");
        assert_eq!(duration_cell(Some(&d(3_600, 0))), "1 hour");
        assert_eq!(duration_cell(Some(&d(7_200, 0))), "2 hours");
        assert_eq!(duration_cell(Some(&d(90, 0))), "90s");
        assert_eq!(duration_cell(Some(&d(0, 0))), "0s");
        assert_eq!(duration_cell(Some(&d(1, 500_000_000))), "1.500000000s");
        assert_eq!(duration_json(Some(&d(86_400, 0))), Value::from(86_400));
        assert_eq!(duration_json(None), Value::Null);
    }

    #[test]
    fn latencies_are_short() {
        assert_eq!(latency_cell(0), "0us");
        assert_eq!(latency_cell(999), "999us");
        assert_eq!(latency_cell(1_234), "1.234ms");
        assert_eq!(latency_cell(2_000_001), "2.000s");
    }

    #[test]
    fn pairs_cells_are_sorted() {
        let map: std::collections::HashMap<String, String> =
            [("b".into(), "2".into()), ("a".into(), "1".into())]
                .into_iter()
                .collect();
        assert_eq!(pairs_cell(&map), "a=1, b=2");
        assert_eq!(pairs_cell(&std::collections::HashMap::new()), "-");
    }

    #[test]
    fn times_are_formatted_or_marked_unset() {
        let t = prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 250_000_000,
        };
        assert_eq!(time_cell(Some(&t)), "2026-01-01T00:00:00Z");
        assert_eq!(time_cell(None), "-");
        assert_eq!(time_json(Some(&t)), Value::from("2026-01-01T00:00:00.250Z"));
        assert_eq!(time_json(None), Value::Null);
    }

    #[test]
    fn command_line_times_are_rfc3339_or_dates() {
        let at = |text| parse_time(text).map(|t| (t.seconds, t.nanos));
        assert_eq!(at("2026-01-01T00:00:00Z"), Ok((1_767_225_600, 0)));
        assert_eq!(at("2026-01-01"), Ok((1_767_225_600, 0)));
        assert_eq!(at(" 2026-01-01T02:00:00+02:00 "), Ok((1_767_225_600, 0)));
        assert_eq!(at("1970-01-01T00:00:00.5Z"), Ok((0, 500_000_000)));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-29",
            "2026-01-01T24:00:00Z",
        ] {
            let error = parse_time(bad).expect_err(bad);
            assert!(error.contains("expected RFC 3339"), "{error}");
        }
    }
}
