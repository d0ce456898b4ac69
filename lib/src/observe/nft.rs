//! Parsers for `nft -j list chains` and `nft -j list chain ...`: the base chains of other
//! tables at the forward hook. An accept in portfwd's chain does not stop a drop in another
//! table's chain at the same hook (firewalld's `filter_FORWARD` ends in a reject), so such
//! chains are found and the run warns.

use serde_json::Value;

use crate::foreign::{ForeignNat, ForwardChain};
use crate::model::Proto;
use crate::net::{Family, PortRange};

fn items(text: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("nftables").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// A name nft's own parser takes back as one word: nft joins its arguments into one command
/// line, so anything else is never passed to it.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Does `nft -j list chains` list a chain of table `family table`?
pub(crate) fn has_chains_in(text: &str, family: &str, table: &str) -> bool {
    items(text).iter().filter_map(|i| i.get("chain")).any(|c| {
        c.get("family").and_then(Value::as_str) == Some(family)
            && c.get("table").and_then(Value::as_str) == Some(table)
    })
}

/// The forward-hook filter chains of `nft -j list chains`, except `skip(family, table, name)`.
pub(crate) fn forward_chains(
    text: &str,
    skip: impl Fn(&str, &str, &str) -> bool,
) -> Vec<ForwardChain> {
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
pub(crate) fn read_rules(text: &str, chain: &mut ForwardChain) {
    let rules: Vec<Vec<Value>> = items(text)
        .iter()
        .filter_map(|item| item.get("rule")?.get("expr")?.as_array().cloned())
        .collect();
    let is_verdict = |e: &Value, names: &[&str]| names.iter().any(|n| e.get(*n).is_some());
    // iptables-nft's targets list as `xt` (`REJECT`, `DROP`), and every one of its rules
    // carries a counter: neither is a match.
    let is_drop = |e: &Value| {
        is_verdict(e, &["drop", "reject"])
            || e.get("xt").is_some_and(|x| {
                x.get("type").and_then(Value::as_str) == Some("target")
                    && matches!(
                        x.get("name").and_then(Value::as_str),
                        Some("REJECT" | "DROP")
                    )
            })
    };
    let uncounted = |exprs: &[Value]| -> Vec<Value> {
        exprs
            .iter()
            .filter(|e| e.get("counter").is_none())
            .cloned()
            .collect()
    };
    chain.ends_in_drop = rules
        .last()
        .map(|last| uncounted(last))
        .is_some_and(|last| last.len() == 1 && is_drop(&last[0]));
    chain.accepts_dnat = false;
    chain.accepted_marks.clear();
    for exprs in rules.iter().map(|r| uncounted(r)) {
        let [m, verdict] = exprs.as_slice() else {
            continue;
        };
        if !is_verdict(verdict, &["accept"]) {
            continue;
        }
        let Some(m) = m.get("match") else {
            continue;
        };
        if m.get("op").and_then(Value::as_str) == Some("!=") {
            continue;
        }
        let (left, right) = (m.get("left"), m.get("right"));
        let left_is_status = left.and_then(|l| l.get("ct")?.get("key")?.as_str()) == Some("status");
        let names_dnat = right.and_then(Value::as_str) == Some("dnat")
            || right
                .and_then(Value::as_array)
                .is_some_and(|set| set.iter().any(|v| v.as_str() == Some("dnat")))
            || right
                .and_then(|r| r.get("set")?.as_array().cloned())
                .is_some_and(|set| set.iter().any(|v| v.as_str() == Some("dnat")));
        if left_is_status && names_dnat {
            chain.accepts_dnat = true;
        }
        if let Some(mark) = ct_mark_match(left, right) {
            chain.accepted_marks.push(mark);
        }
    }
}

/// `ct mark & M == V` or `ct mark V` as (V, M).
fn ct_mark_match(left: Option<&Value>, right: Option<&Value>) -> Option<(u32, u32)> {
    let number = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let value = number(right?)?;
    let is_ct_mark = |v: &Value| v.get("ct")?.get("key")?.as_str().map(|k| k == "mark");
    let left = left?;
    if is_ct_mark(left) == Some(true) {
        return Some((value, u32::MAX));
    }
    match left.get("&")?.as_array()?.as_slice() {
        [ct, mask] if is_ct_mark(ct) == Some(true) => Some((value, number(mask)?)),
        _ => None,
    }
}

/// Another table's NAT chain that runs at a hook before (or with) portfwd's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatChain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// Output (locally made connections) rather than prerouting.
    pub local: bool,
}

/// The nat chains at prerouting or output with a priority at or before `limit` (iptables'
/// NAT runs at -100, dstnat), except `skip(family, table, name)`.
pub(crate) fn nat_chains_before(
    text: &str,
    limit: i64,
    skip: impl Fn(&str, &str, &str) -> bool,
) -> Vec<NatChain> {
    items(text)
        .iter()
        .filter_map(|item| item.get("chain"))
        .filter(|c| c.get("type").and_then(Value::as_str) == Some("nat"))
        .filter(|c| c.get("prio").and_then(Value::as_i64).unwrap_or(0) <= limit)
        .filter_map(|c| {
            let field = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
            let local = match field("hook")?.as_str() {
                "prerouting" => false,
                "output" => true,
                _ => return None,
            };
            let chain = NatChain {
                family: field("family")?,
                table: field("table")?,
                name: field("name")?,
                local,
            };
            (!skip(&chain.family, &chain.table, &chain.name)).then_some(chain)
        })
        .collect()
}

/// The DNAT and REDIRECT rules of a NAT chain (`nft -j list chain ...`), with the protocol
/// and destination ports they match.
pub(crate) fn nat_rules(text: &str, chain: &NatChain) -> Vec<ForeignNat> {
    let families: &[Family] = match Family::from_nft(&chain.family) {
        Some(Family::V4) => &[Family::V4],
        Some(Family::V6) => &[Family::V6],
        None => &[Family::V4, Family::V6],
    };
    let mut out = Vec::new();
    for item in items(text) {
        let Some(exprs) = item
            .get("rule")
            .and_then(|r| r.get("expr"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        // iptables-nft's DNAT and REDIRECT list as `xt` targets (their arguments unread).
        let nat = exprs.iter().find_map(|e| {
            ["dnat", "redirect"]
                .into_iter()
                .find(|k| e.get(*k).is_some())
                .or_else(|| {
                    let x = e.get("xt")?;
                    if x.get("type").and_then(Value::as_str) != Some("target") {
                        return None;
                    }
                    match x.get("name").and_then(Value::as_str) {
                        Some("DNAT") => Some("dnat"),
                        Some("REDIRECT") => Some("redirect"),
                        _ => None,
                    }
                })
        });
        let Some(nat) = nat else {
            continue;
        };
        let mut proto = None;
        let mut ports = None;
        for e in exprs {
            let Some(m) = e.get("match") else { continue };
            if m.get("op").and_then(Value::as_str) == Some("!=") {
                continue;
            }
            let left = m.get("left");
            let right = m.get("right");
            if let Some(p) = left.and_then(|l| l.get("payload")) {
                if p.get("field").and_then(Value::as_str) == Some("dport") {
                    proto = match p.get("protocol").and_then(Value::as_str) {
                        Some("tcp") => Some(Proto::Tcp),
                        Some("udp") => Some(Proto::Udp),
                        _ => proto,
                    };
                    ports = right.and_then(port_range);
                }
            }
            if left.and_then(|l| l.get("meta")?.get("key")?.as_str()) == Some("l4proto") {
                proto = match right.and_then(Value::as_str) {
                    Some("tcp") => Some(Proto::Tcp),
                    Some("udp") => Some(Proto::Udp),
                    _ => proto,
                };
            }
        }
        let what = match (proto, ports) {
            (Some(p), Some(r)) => format!("{} dport {} {nat}", p.name(), r.user_text()),
            (Some(p), None) => format!("{} {nat}", p.name()),
            (None, Some(r)) => format!("dport {} {nat}", r.user_text()),
            (None, None) => nat.to_string(),
        };
        for &family in families {
            out.push(ForeignNat {
                family,
                place: format!("{} {} {}", chain.family, chain.table, chain.name),
                rule: what.clone(),
                proto,
                ports,
                local: chain.local,
            });
        }
    }
    out
}

/// A port (`4321`) or a range (`{"range": [5000, 5100]}`).
fn port_range(value: &Value) -> Option<PortRange> {
    if let Some(p) = value.as_u64() {
        return Some(PortRange::single(u16::try_from(p).ok()?));
    }
    let range = value.get("range")?.as_array()?;
    let first = u16::try_from(range.first()?.as_u64()?).ok()?;
    let last = u16::try_from(range.get(1)?.as_u64()?).ok()?;
    (first <= last).then_some(PortRange { first, last })
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
        // iptables-nft's rules carry a counter and list REJECT as an `xt` target; a native
        // connmark accept names its mask (captured from nft 1.0.6).
        let xt = r#"{"nftables": [{"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 8192]}, "right": 8192}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 1}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 3, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "REJECT"}}]}}]}"#;
        let mut marked = chains[0].clone();
        read_rules(xt, &mut marked);
        assert!(marked.ends_in_drop && !marked.accepts_dnat);
        assert!(marked.accepts_mark(0x2000) && !marked.accepts_mark(0x4000));
        let counted_drop = r#"{"nftables": [{"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 5, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;
        let mut dropping = chains[0].clone();
        read_rules(counted_drop, &mut dropping);
        assert!(dropping.ends_in_drop, "counter drop ends the chain");
        assert!(!safe_name("a;flush ruleset") && !safe_name("") && safe_name("filter_FORWARD"));
    }

    #[test]
    fn finds_nat_rules_of_chains_that_run_first() {
        let chains = r#"{"nftables": [{"chain": {"family": "inet", "table": "dock", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -150, "policy": "accept"}}, {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}, {"chain": {"family": "inet", "table": "late", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": 100, "policy": "accept"}}]}"#;
        let found = nat_chains_before(chains, -100, |f, t, _| f == "ip" && t == "nat");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].table, "dock");
        // Captured from nft 1.0.6.
        let rules = r#"{"nftables": [{"rule": {"family": "inet", "table": "dock", "chain": "pre", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 4321}}, {"dnat": {"family": "ip", "addr": "10.0.2.2", "port": 9}}]}}, {"rule": {"family": "inet", "table": "dock", "chain": "pre", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": {"range": [5000, 5100]}}}, {"redirect": {"port": 53}}]}}]}"#;
        let nat = nat_rules(rules, &found[0]);
        assert_eq!(nat.len(), 4, "two rules, inet: both families");
        assert_eq!(nat[0].rule, "tcp dport 4321 dnat");
        assert_eq!(nat[0].ports, Some(PortRange::single(4321)));
        assert_eq!(nat[2].rule, "udp dport 5000-5100 redirect");
        assert_eq!(nat[2].place, "inet dock pre");
    }
}
