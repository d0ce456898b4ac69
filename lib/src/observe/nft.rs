//! Parsers for `nft -j list chains` and `nft -j list chain ...`: the base chains of other
//! tables at the forward hook. An accept in portfwd's chain does not stop a drop in another
//! table's chain at the same hook (firewalld's `filter_FORWARD` ends in a reject), so such
//! chains are found and the run warns.

use serde_json::Value;

/// A base chain at the forward hook, and what it does to a forwarded packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardChain {
    pub family: String,
    pub table: String,
    pub name: String,
    pub priority: i64,
    /// `policy drop`.
    pub policy_drop: bool,
    /// Its last rule drops or rejects with no match at all.
    pub ends_in_drop: bool,
    /// A rule accepts `ct status dnat` (DNATed flows pass, as firewalld does).
    pub accepts_dnat: bool,
}

impl ForwardChain {
    /// `inet firewalld filter_FORWARD`
    pub fn label(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.name)
    }

    /// Drops what reaches its end (policy or last rule).
    pub fn drops(&self) -> bool {
        self.policy_drop || self.ends_in_drop
    }
}

fn items(text: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("nftables").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// A name nft's own parser takes back as one word: nft joins its arguments into one command
/// line, so anything else is never passed to it.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The forward-hook filter chains of `nft -j list chains`, except `skip(family, table, name)`.
pub fn forward_chains(text: &str, skip: impl Fn(&str, &str, &str) -> bool) -> Vec<ForwardChain> {
    items(text)
        .iter()
        .filter_map(|item| item.get("chain"))
        .filter(|c| {
            c.get("hook").and_then(Value::as_str) == Some("forward")
                && c.get("type").and_then(Value::as_str) == Some("filter")
        })
        .filter_map(|c| {
            let field = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
            let chain = ForwardChain {
                family: field("family")?,
                table: field("table")?,
                name: field("name")?,
                priority: c.get("prio").and_then(Value::as_i64).unwrap_or(0),
                policy_drop: field("policy").as_deref() == Some("drop"),
                ..ForwardChain::default()
            };
            (!skip(&chain.family, &chain.table, &chain.name)).then_some(chain)
        })
        .collect()
}

/// Reads a chain's rules (`nft -j list chain FAMILY TABLE NAME`) into `chain`.
pub fn read_rules(text: &str, chain: &mut ForwardChain) {
    let rules: Vec<Vec<Value>> = items(text)
        .iter()
        .filter_map(|item| item.get("rule")?.get("expr")?.as_array().cloned())
        .collect();
    let is_verdict = |e: &Value, names: &[&str]| names.iter().any(|n| e.get(*n).is_some());
    chain.ends_in_drop = rules
        .last()
        .is_some_and(|last| last.len() == 1 && is_verdict(&last[0], &["drop", "reject"]));
    chain.accepts_dnat = rules.iter().any(|exprs| {
        let dnat_match = exprs.iter().any(|e| {
            let Some(m) = e.get("match") else {
                return false;
            };
            let left_is_status = m
                .get("left")
                .and_then(|l| l.get("ct")?.get("key")?.as_str())
                == Some("status");
            let right = m.get("right");
            let names_dnat = right.and_then(Value::as_str) == Some("dnat")
                || right
                    .and_then(Value::as_array)
                    .is_some_and(|set| set.iter().any(|v| v.as_str() == Some("dnat")))
                || right
                    .and_then(|r| r.get("set")?.as_array().cloned())
                    .is_some_and(|set| set.iter().any(|v| v.as_str() == Some("dnat")));
            left_is_status && names_dnat && m.get("op").and_then(Value::as_str) != Some("!=")
        });
        dnat_match && exprs.len() == 2 && exprs.iter().any(|e| is_verdict(e, &["accept"]))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from nft 1.0.6 on kernel 6.18: a firewalld-like table and iptables-nft's filter.
    const CHAINS: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}]}"#;
    const RULES: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 3, "expr": [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}]}}]}"#;

    #[test]
    fn finds_forward_filter_chains_and_what_they_do() {
        let mut chains = forward_chains(CHAINS, |f, t, _| f == "ip" && t == "filter");
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].label(), "inet fw forward");
        assert!(chains[0].policy_drop && chains[0].drops());
        read_rules(RULES, &mut chains[0]);
        assert!(chains[0].ends_in_drop && chains[0].accepts_dnat);
        let mut without = chains[0].clone();
        read_rules(&RULES.replace("\"dnat\"", "\"snat\""), &mut without);
        assert!(!without.accepts_dnat);
        assert!(!safe_name("a;flush ruleset") && !safe_name("") && safe_name("filter_FORWARD"));
    }
}
