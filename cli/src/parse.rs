//! Command-line values clap cannot parse by itself: `KEY=VALUE` pairs (tags and
//! encryption context) and operation names, written as the CamelCase RPC names
//! (`Encrypt`, `CreateKey`, `ReEncrypt`) and mapped to the proto `Operation` enum.

use std::collections::HashMap;

use kms_proto::v1::Operation;

/// One `KEY=VALUE` argument. Splits at the first `=`, so values may contain `=`;
/// the key must not be empty, the value may be.
pub(crate) fn key_value(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("expected KEY=VALUE, got {text:?} (no '=')"));
    };
    if key.is_empty() {
        return Err(format!("expected KEY=VALUE, got {text:?} (empty key)"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Collects parsed pairs into a map; a key given twice is an error rather than a
/// silent choice between two values.
pub(crate) fn pairs_to_map(
    pairs: Vec<(String, String)>,
    what: &str,
) -> anyhow::Result<HashMap<String, String>> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        if map.contains_key(&key) {
            anyhow::bail!("{what} key {key:?} given more than once");
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// `CreateKey` -> `CREATE_KEY`, `GenerateDataKeyWithoutPlaintext` ->
/// `GENERATE_DATA_KEY_WITHOUT_PLAINTEXT`. A run of capitals stays one word
/// (`HSMStatus` -> `HSM_STATUS`).
fn camel_to_screaming_snake(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 8);
    for (i, &c) in chars.iter().enumerate() {
        if i > 0 && c.is_uppercase() {
            let previous = chars[i - 1];
            let next_is_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if previous.is_lowercase()
                || previous.is_ascii_digit()
                || (previous.is_uppercase() && next_is_lower)
            {
                out.push('_');
            }
        }
        out.extend(c.to_uppercase());
    }
    out
}

/// An operation name from the command line. Accepts the RPC name (`Encrypt`,
/// `CreateKey`), and also `create_key`, `create-key`, `CREATE_KEY` and the full
/// proto name `OPERATION_CREATE_KEY`.
pub(crate) fn operation(text: &str) -> Result<Operation, String> {
    let snake = if text.contains(['_', '-']) {
        text.replace('-', "_").to_uppercase()
    } else {
        camel_to_screaming_snake(text)
    };
    let full = if snake.starts_with("OPERATION_") {
        snake
    } else {
        format!("OPERATION_{snake}")
    };
    Operation::from_str_name(&full)
        .filter(|op| *op != Operation::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown operation {text:?}: expected an RPC name such as Encrypt, Decrypt, \
                 GenerateDataKey, ReEncrypt, CreateKey, RotateKey or ScheduleKeyDeletion"
            )
        })
}

/// The CamelCase RPC name of an operation (`OPERATION_RE_ENCRYPT` -> `ReEncrypt`),
/// as accepted by [`operation`]; an operation this client does not know keeps its
/// number.
pub(crate) fn operation_name(value: i32) -> String {
    let Ok(op) = Operation::try_from(value) else {
        return format!("Operation({value})");
    };
    let full = op.as_str_name();
    let words = full.strip_prefix("OPERATION_").unwrap_or(full);
    let mut out = String::with_capacity(words.len());
    for word in words.split('_') {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.push(first);
            out.extend(chars.flat_map(char::to_lowercase));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_splits_at_the_first_equals_sign() {
        assert_eq!(key_value("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(key_value("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(key_value("sp ace=x y"), Ok(("sp ace".into(), "x y".into())));
    }

    #[test]
    fn key_value_rejects_missing_equals_and_empty_keys() {
        assert!(
            key_value("novalue")
                .expect_err("rejected")
                .contains("no '='")
        );
        assert!(key_value("").expect_err("rejected").contains("no '='"));
        assert!(key_value("=v").expect_err("rejected").contains("empty key"));
    }

    #[test]
    fn pairs_to_map_rejects_duplicate_keys() {
        let map = pairs_to_map(
            vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            "tag",
        )
        .expect("distinct keys");
        assert_eq!(map.len(), 2);
        assert_eq!(map["a"], "1");
        let error = pairs_to_map(
            vec![("a".into(), "1".into()), ("a".into(), "1".into())],
            "context",
        )
        .expect_err("rejected");
        assert_eq!(error.to_string(), "context key \"a\" given more than once");
        assert!(pairs_to_map(Vec::new(), "tag").expect("empty").is_empty());
    }

    #[test]
    fn camel_case_becomes_screaming_snake() {
        assert_eq!(camel_to_screaming_snake("Encrypt"), "ENCRYPT");
        assert_eq!(camel_to_screaming_snake("ReEncrypt"), "RE_ENCRYPT");
        assert_eq!(
            camel_to_screaming_snake("GenerateDataKeyWithoutPlaintext"),
            "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT"
        );
        assert_eq!(camel_to_screaming_snake("HSMStatus"), "HSM_STATUS");
        assert_eq!(camel_to_screaming_snake("Aes256Key"), "AES256_KEY");
        assert_eq!(camel_to_screaming_snake("encrypt"), "ENCRYPT");
        assert_eq!(camel_to_screaming_snake(""), "");
    }

    #[test]
    fn operations_parse_from_rpc_names() {
        assert_eq!(operation("Encrypt"), Ok(Operation::Encrypt));
        assert_eq!(operation("CreateKey"), Ok(Operation::CreateKey));
        assert_eq!(operation("ReEncrypt"), Ok(Operation::ReEncrypt));
        assert_eq!(
            operation("GenerateDataKeyWithoutPlaintext"),
            Ok(Operation::GenerateDataKeyWithoutPlaintext)
        );
        assert_eq!(operation("ListAuditEvents"), Ok(Operation::ListAuditEvents));
        assert_eq!(
            operation("AutomaticRotation"),
            Ok(Operation::AutomaticRotation)
        );
    }

    #[test]
    fn operations_parse_from_other_spellings() {
        assert_eq!(operation("OPERATION_ENCRYPT"), Ok(Operation::Encrypt));
        assert_eq!(operation("create_key"), Ok(Operation::CreateKey));
        assert_eq!(
            operation("schedule-key-deletion"),
            Ok(Operation::ScheduleKeyDeletion)
        );
        assert_eq!(operation("encrypt"), Ok(Operation::Encrypt));
        assert_eq!(operation("ENCRYPT"), Ok(Operation::Encrypt));
    }

    #[test]
    fn unknown_and_unspecified_operations_are_rejected() {
        for bad in [
            "",
            "Frobnicate",
            "Unspecified",
            "OPERATION_UNSPECIFIED",
            "Encrypt2",
            "En crypt",
        ] {
            let error = operation(bad).expect_err("rejected");
            assert!(error.contains("unknown operation"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn every_operation_name_round_trips() {
        let mut seen = 0;
        for value in 1..200 {
            if Operation::try_from(value).is_err() {
                continue;
            }
            seen += 1;
            let name = operation_name(value);
            assert!(name.chars().all(char::is_alphanumeric), "{name}");
            assert_eq!(operation(&name).map(|op| op as i32), Ok(value), "{name}");
        }
        // Every operation of resources.proto (25 + 4 + 10 + 3 + 4 + 6 + 3, and AuditWitness).
        assert_eq!(seen, 56);
        assert_eq!(operation_name(Operation::ReEncrypt as i32), "ReEncrypt");
        assert_eq!(operation_name(Operation::CreateKey as i32), "CreateKey");
        assert_eq!(operation_name(199), "Operation(199)");
    }
}
