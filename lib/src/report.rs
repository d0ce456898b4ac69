//! The result JSON (`changed`, `failed`, `msg`, `diff`, `commands`, `warnings`) and the
//! human-readable diff, keyed by the user's entry names rather than raw rule text.

use serde::Serialize;
use serde_json::Value;

use crate::model::Params;
use crate::plan::{EntryChanges, Plan};

/// What a run did, as printed on stdout.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub changed: bool,
    pub failed: bool,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<Diff>,
    pub commands: Vec<String>,
    pub warnings: Vec<String>,
    /// Entry names by outcome, for playbooks that branch on them.
    pub forwards: Changes,
    pub masquerade: Changes,
    /// The iptables flavour found (`nf_tables` or `legacy`); absent when no table exists yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// Ansible's diff shape: texts it shows as a unified diff.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diff {
    pub before: String,
    pub after: String,
}

/// Serialisable copy of [`EntryChanges`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

impl From<&EntryChanges> for Changes {
    fn from(c: &EntryChanges) -> Changes {
        Changes {
            added: c.added.clone(),
            updated: c.updated.clone(),
            removed: c.removed.clone(),
        }
    }
}

impl Report {
    /// A failed run: nothing else is claimed.
    pub fn failure(msg: impl Into<String>) -> Report {
        Report {
            failed: true,
            msg: msg.into(),
            ..Report::default()
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self)
            .unwrap_or_else(|e| serde_json::json!({"failed": true, "msg": e.to_string()}))
    }
}

/// One-line summary: `forwards: 1 added, 1 updated, 0 removed; masquerade: 0 changed; ...`.
pub fn summary(plan: &Plan) -> String {
    let mut parts = Vec::new();
    for (label, changes) in [
        ("forwards", &plan.forwards),
        ("masquerade", &plan.masquerade),
    ] {
        if changes.count() == 0 {
            parts.push(format!("{label}: 0 changed"));
        } else {
            parts.push(format!(
                "{label}: {} added, {} updated, {} removed",
                changes.added.len(),
                changes.updated.len(),
                changes.removed.len()
            ));
        }
    }
    let r = &plan.routing.changes;
    if !r.is_empty() {
        parts.push(format!(
            "addresses: {} added, {} removed; ip rules: {} added, {} removed; routes: {} added, {} replaced, {} removed",
            r.addresses_added, r.addresses_removed, r.rules_added, r.rules_removed, r.routes_added, r.routes_replaced, r.routes_removed
        ));
    }
    for change in &plan.sysctls {
        parts.push(format!(
            "{} {} -> {}",
            change.key.replace('/', "."),
            change.from.as_deref().unwrap_or("?"),
            change.to
        ));
    }
    match &plan.store {
        Some(Some(_)) => parts.push("params stored for portfwd restore".to_string()),
        Some(None) => parts.push("stored params removed".to_string()),
        None => {}
    }
    let moved = !plan.tables.is_empty() && plan.forwards.count() + plan.masquerade.count() == 0;
    if moved {
        parts.push("owned rules repaired (order, jumps or stray rules)".to_string());
    }
    parts.join("; ")
}

fn entry_line<T: Serialize>(out: &mut String, key: &str, entry: &T, drop: &[&str]) {
    let mut v = serde_json::to_value(entry).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        for field in drop {
            map.remove(*field);
        }
    }
    out.push_str(&format!("{key} = {v}\n"));
}

/// The state as one line per entry (`forwards.web = {...}`), plus managed sysctls.
pub fn state_text(params: &Params, sysctls: &[(String, String)]) -> String {
    let mut out = String::new();
    for f in &params.forwards {
        entry_line(&mut out, &format!("forwards.{}", f.name), f, &["name"]);
    }
    for m in &params.masquerade {
        entry_line(&mut out, &format!("masquerade.{}", m.name), m, &["name"]);
    }
    for a in &params.addresses {
        entry_line(
            &mut out,
            &format!("addresses[{} {}]", a.dev, a.address),
            a,
            &["dev", "address"],
        );
    }
    for p in &params.policy_routes {
        entry_line(
            &mut out,
            &format!("policy_routes[from {} table {}]", p.from, p.table),
            p,
            &["from", "table"],
        );
    }
    for (key, value) in sysctls {
        out.push_str(&format!("sysctl {} = {value}\n", key.replace('/', ".")));
    }
    if params.persist {
        out.push_str("persist = true\n");
    }
    out
}

/// A line diff of two state texts: unchanged lines indented, others marked `-` / `+`.
pub fn line_diff(before: &str, after: &str) -> String {
    let old: Vec<&str> = before.lines().collect();
    let new: Vec<&str> = after.lines().collect();
    let mut out = String::new();
    for line in &old {
        let mark = if new.contains(line) { ' ' } else { '-' };
        out.push_str(&format!("{mark} {line}\n"));
    }
    for line in &new {
        if !old.contains(line) {
            out.push_str(&format!("+ {line}\n"));
        }
    }
    out
}
