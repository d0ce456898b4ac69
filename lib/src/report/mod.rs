//! The last stage: the result JSON (`changed`, `failed`, `msg`, `diff`, `commands`,
//! `warnings`, entry names by outcome) and the human-readable diff, keyed by the user's entry
//! names rather than raw rule text ([`decompile`] reads the state back as params).

pub(crate) mod decompile;

use serde::Serialize;
use serde_json::Value;

use crate::apply::{batch_command, drop_command, sysctl_command};
use crate::compile::Desired;
use crate::firewall::{EntryChanges, Firewall, Tool};
use crate::model::Params;
use crate::observe::Observed;
use crate::plan::{Plan, Step};
use crate::tools::restore_command;
use decompile::params_from_state;

/// The message of a failed apply: the params field the refused object came from first
/// (`addresses[0].dev: no interface "eth9" on this host`), then what the system said.
pub(crate) fn apply_failure(config: &crate::model::Config, e: &crate::apply::ApplyError) -> String {
    let Some((line, origin)) = e
        .failed_line()
        .and_then(|l| Some((l, crate::compile::routing_origin(config, l)?)))
    else {
        return e.to_string();
    };
    let said = e.to_string();
    let path = &origin.path;
    match (&origin.dev, origin.via) {
        (Some(dev), _) if said.contains("Cannot find device") => {
            format!("{path}.dev: no interface {dev:?} on this host; {said}")
        }
        (_, Some(via))
            if said.contains("Nexthop has invalid gateway")
                || said.contains("Network is unreachable") =>
        {
            format!("{path}.via: \"{via}\" is not reachable from this host (no interface has it on-link; give the route a dev, or a gateway on a connected subnet); {said}")
        }
        _ => format!("{path}: the system refused `{line}`; {said}"),
    }
}

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

/// The result of a run before it is applied: what changes, the commands, the warnings, and
/// the diff when asked for.
pub(crate) fn planned<F: Firewall>(
    view: &StateView<F>,
    plan: &Plan,
    warnings: Vec<String>,
    with_diff: bool,
) -> Report {
    Report {
        changed: !plan.is_empty(),
        failed: false,
        msg: if plan.is_empty() {
            "no changes".to_string()
        } else {
            summary(plan)
        },
        diff: with_diff.then(|| view.diff()),
        commands: commands(plan),
        warnings,
        forwards: plan.forwards().into(),
        masquerade: plan.masquerade().into(),
        backend: view
            .firewall
            .flavour(&view.observed.firewall)
            .map(|f| f.name().to_string()),
    }
}

/// What the diff compares: the desired state against the observed one.
pub(crate) struct StateView<'a, F: Firewall> {
    pub firewall: &'a F,
    pub instance: &'a str,
    pub protocol: u8,
    pub desired: &'a Desired<F>,
    pub observed: &'a Observed<F>,
}

impl<F: Firewall> StateView<'_, F> {
    /// Both sides as one line per entry, plus the managed sysctls.
    fn diff(&self) -> Diff {
        let (desired, observed) = (self.desired, self.observed);
        let current: Vec<(String, String)> = desired
            .sysctls
            .keys()
            .filter_map(|k| Some((k.clone(), observed.sysctls.get(k)?.clone()?)))
            .collect();
        let wanted: Vec<(String, String)> = desired
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let before = params_from_state(
            self.firewall
                .decompile(self.instance, &self.firewall.snapshot(&observed.firewall)),
            &observed.routing.owned,
            self.instance,
            self.protocol,
            observed.stored.is_some(),
        );
        let after = params_from_state(
            self.firewall.decompile(self.instance, &desired.firewall),
            &desired.routing,
            self.instance,
            self.protocol,
            desired.stored.is_some(),
        );
        Diff {
            before: state_text(&before, &current),
            after: state_text(&after, &wanted),
        }
    }
}

/// The commands a plan runs, shell-like, for the result's `commands` (also in check mode).
pub(crate) fn commands(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    for step in plan.steps() {
        match step {
            Step::IpBatch(b) => heredoc(
                &mut out,
                batch_command(&b),
                b.lines.iter().map(String::as_str),
            ),
            Step::Transaction(t) => heredoc(
                &mut out,
                match t.tool {
                    Tool::IptablesRestore(tool, family) => restore_command(tool, family),
                    Tool::Nft => "nft -f -".to_string(),
                },
                t.payload.lines(),
            ),
            Step::DropTable(d) => out.push(drop_command(&d)),
            Step::SysctlWrite(c) => out.push(sysctl_command(&c.key, &c.to)),
            Step::Store(Some(_)) => out.push("# store params for `portfwd restore`".to_string()),
            Step::Store(None) => out.push("# remove stored params".to_string()),
            Step::RecordAhead(_) | Step::Record(_) => {}
        }
    }
    out
}

/// `COMMAND <<'EOF'`, the body, `EOF`.
fn heredoc<'a>(out: &mut Vec<String>, command: String, body: impl Iterator<Item = &'a str>) {
    out.push(format!("{command} <<'EOF'"));
    out.extend(body.map(str::to_string));
    out.push("EOF".to_string());
}

/// `a, b, c` (the first eight, then `and N more`).
fn first_names(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut list = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        list.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    list
}

/// One-line summary: `forwards: 1 added, 1 updated, 0 removed; masquerade: 0 changed; ...`.
pub(crate) fn summary(plan: &Plan) -> String {
    let mut parts = Vec::new();
    for (label, changes) in [
        ("forwards", plan.forwards()),
        ("masquerade", plan.masquerade()),
    ] {
        if changes.count() == 0 {
            parts.push(format!("{label}: 0 changed"));
        } else {
            // A params file is the whole state of its instance: say why an entry goes.
            let why = if changes.removed.is_empty() {
                String::new()
            } else {
                format!(" (not in params: {})", first_names(&changes.removed))
            };
            parts.push(format!(
                "{label}: {} added, {} updated, {} removed{why}",
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
    let repaired = &plan.firewall.repaired;
    if !repaired.is_empty() {
        const SHOWN: usize = 8;
        let mut list = repaired
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if repaired.len() > SHOWN {
            list.push_str(&format!(" and {} more", repaired.len() - SHOWN));
        }
        parts.push(format!("owned objects repaired: {list}"));
    } else if !plan.firewall.transactions.is_empty()
        && plan.forwards().count() + plan.masquerade().count() == 0
    {
        parts.push("owned rules repaired (missing rules written again)".to_string());
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
pub(crate) fn state_text(params: &Params, sysctls: &[(String, String)]) -> String {
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

/// A line diff of two state texts: unchanged lines indented, others marked `-` / `+`; an entry
/// that is gone from `after` altogether says it is removed because the params lack it.
pub fn line_diff(before: &str, after: &str) -> String {
    let old: Vec<&str> = before.lines().collect();
    let new: Vec<&str> = after.lines().collect();
    let key = |line: &str| line.split_once(" = ").map_or(line, |(k, _)| k).to_string();
    let new_keys: std::collections::HashSet<String> = new.iter().map(|l| key(l)).collect();
    let mut out = String::new();
    for line in &old {
        if new.contains(line) {
            out.push_str(&format!("  {line}\n"));
        } else if new_keys.contains(&key(line)) {
            out.push_str(&format!("- {line}\n"));
        } else {
            out.push_str(&format!("- {line}   # removed: not in params\n"));
        }
    }
    for line in &new {
        if !old.contains(line) {
            out.push_str(&format!("+ {line}\n"));
        }
    }
    out
}
