//! The grant language and the roles, evaluated without I/O.
//!
//! Default deny: a request on a key is allowed only when a grant of the key's
//! policy (or, for keys without one, of the configured default policy)
//! matches the principal, includes the permission and finds its required
//! encryption-context entries in the request. Administrators may always
//! describe, rotate and manage keys, create keys and change policies, but use
//! no key for cryptography unless a grant says so (separation of duties).
//! Auditors (and administrators) read and verify the audit log.

use std::sync::Arc;

use kms_storage::{KeyPolicy, Permission};
use parking_lot::RwLock;

use crate::encryption_context::EncryptionContext;

/// `*` matches any run of characters (including none); everything else
/// matches itself. Iterative, linear in practice, no backtracking blow-up.
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and where in `text` it currently resumes.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Roles and the default policy, from configuration: one consistent set.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    pub admins: Vec<String>,
    pub auditors: Vec<String>,
    /// Applies to keys whose policy is unset. Empty by default: deny.
    pub default_policy: KeyPolicy,
}

/// The roles in force, shared by the service and the configuration reload
/// (`server::reload`). Clones share one set: [`AccessControl::replace`]
/// swaps it for every holder at once. Each check reads one consistent
/// snapshot, so a request never sees half of an old and half of a new set.
#[derive(Debug, Clone, Default)]
pub struct AccessControl {
    current: Arc<RwLock<Arc<Roles>>>,
}

impl AccessControl {
    pub fn new(roles: Roles) -> Self {
        AccessControl {
            current: Arc::new(RwLock::new(Arc::new(roles))),
        }
    }

    /// The roles in force now (a snapshot; later replacements do not change it).
    pub fn roles(&self) -> Arc<Roles> {
        Arc::clone(&self.current.read())
    }

    /// Puts `roles` in force for every later check.
    pub fn replace(&self, roles: Roles) {
        *self.current.write() = Arc::new(roles);
    }

    pub fn is_admin(&self, principal: &str) -> bool {
        self.roles().is_admin(principal)
    }

    pub fn may_read_audit(&self, principal: &str) -> bool {
        self.roles().may_read_audit(principal)
    }

    /// The policy of keys that have none.
    pub fn default_policy(&self) -> KeyPolicy {
        self.roles().default_policy.clone()
    }

    /// See [`Roles::allows`].
    pub fn allows(
        &self,
        policy: Option<&KeyPolicy>,
        principal: &str,
        permission: Permission,
        context: Option<&EncryptionContext>,
    ) -> bool {
        self.roles().allows(policy, principal, permission, context)
    }
}

impl Roles {
    pub fn is_admin(&self, principal: &str) -> bool {
        self.admins.iter().any(|p| pattern_matches(p, principal))
    }

    pub fn may_read_audit(&self, principal: &str) -> bool {
        self.is_admin(principal) || self.auditors.iter().any(|p| pattern_matches(p, principal))
    }

    /// Whether `principal` may do `permission` on a key with `policy`.
    /// `context` is the request's encryption context (None for operations
    /// that have none: describe, rotate, manage).
    pub fn allows(
        &self,
        policy: Option<&KeyPolicy>,
        principal: &str,
        permission: Permission,
        context: Option<&EncryptionContext>,
    ) -> bool {
        let administrative = matches!(
            permission,
            Permission::Describe | Permission::Rotate | Permission::Manage
        );
        if administrative && self.is_admin(principal) {
            return true;
        }
        let policy = policy.unwrap_or(&self.default_policy);
        policy.grants.iter().any(|grant| {
            grant.permissions.contains(&permission)
                && pattern_matches(&grant.principal, principal)
                && grant
                    .required_context
                    .iter()
                    .all(|(key, value)| context.and_then(|c| c.get(key)) == Some(value.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kms_storage::Grant;

    use super::*;
    use crate::encryption_context::DEFAULT_MAX_ENCODED_LEN;

    #[test]
    fn patterns() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("abc*", "abcd", true),
            ("*bcd", "abcd", true),
            ("a*d", "abcd", true),
            ("a*c*e", "abXcYe", true),
            ("a*c*e", "abXcY", false),
            ("spiffe://example.org/*", "spiffe://example.org/ns/a", true),
            (
                "spiffe://example.org/*",
                "spiffe://example.org.evil/ns/a",
                false,
            ),
            ("**a", "bba", true),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("", "", true),
            ("", "x", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                pattern_matches(pattern, text),
                expected,
                "{pattern} ~ {text}"
            );
        }
    }

    fn ctx(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(entries.iter().copied(), DEFAULT_MAX_ENCODED_LEN).expect("ctx")
    }

    fn access() -> Roles {
        Roles {
            admins: vec!["ops-*".into()],
            auditors: vec!["auditor".into()],
            default_policy: KeyPolicy::default(),
        }
    }

    fn policy() -> KeyPolicy {
        KeyPolicy {
            grants: vec![
                Grant {
                    principal: "svc-a".into(),
                    permissions: [Permission::Encrypt].into(),
                    required_context: BTreeMap::new(),
                },
                Grant {
                    principal: "svc-b".into(),
                    permissions: [Permission::Decrypt].into(),
                    required_context: BTreeMap::from([("tenant".into(), "acme".into())]),
                },
            ],
        }
    }

    #[test]
    fn grants_are_least_privilege() {
        let a = access();
        let p = policy();
        assert!(a.allows(Some(&p), "svc-a", Permission::Encrypt, None));
        assert!(!a.allows(Some(&p), "svc-a", Permission::Decrypt, None));
        assert!(!a.allows(Some(&p), "svc-c", Permission::Encrypt, None));
        // Without a policy the default (empty) policy denies everything.
        assert!(!a.allows(None, "svc-a", Permission::Encrypt, None));
    }

    #[test]
    fn required_context_entries_must_be_present_with_their_value() {
        let a = access();
        let p = policy();
        let d = Permission::Decrypt;
        assert!(a.allows(
            Some(&p),
            "svc-b",
            d,
            Some(&ctx(&[("tenant", "acme"), ("x", "y")]))
        ));
        assert!(!a.allows(Some(&p), "svc-b", d, Some(&ctx(&[("tenant", "other")]))));
        assert!(!a.allows(Some(&p), "svc-b", d, Some(&ctx(&[]))));
        assert!(!a.allows(Some(&p), "svc-b", d, None));
    }

    #[test]
    fn administrators_manage_but_do_not_use_keys() {
        let a = access();
        let p = policy();
        for permission in [Permission::Describe, Permission::Rotate, Permission::Manage] {
            assert!(a.allows(Some(&p), "ops-alice", permission, None));
        }
        for permission in [
            Permission::Encrypt,
            Permission::Decrypt,
            Permission::GenerateDataKey,
            Permission::ReEncryptFrom,
            Permission::ReEncryptTo,
        ] {
            assert!(!a.allows(Some(&p), "ops-alice", permission, None));
        }
        assert!(a.may_read_audit("ops-alice"));
        assert!(a.may_read_audit("auditor"));
        assert!(!a.may_read_audit("svc-a"));
    }
}
