//! Reads forwards and masquerade entries back out of the rules an instance owns, for
//! `portfwd show`, the `before` side of `--diff` and the conntrack reset. Compiling the
//! result reproduces the same rules, so applying what `show` prints is a no-op.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::rules::{Hook, OwnedRules, Rule};
use crate::firewall::Entries;
use crate::model::{
    BackendParams, Balance, ForwardParams, MasqueradeParams, ProtoParam, DEFAULT_CONN_MARK,
};
use crate::net::{Family, PortRange};
use crate::ownership::{
    comment_weight, has_reset_marker, parse_comment, FLOW_ESTABLISHED, KIND_FLOW, KIND_FORWARD,
    KIND_MASQUERADE,
};

/// The `(kind, name)` of one of the instance's rules (see [`crate::ownership`]).
pub(crate) fn entry_of<'a>(rule: &'a Rule, instance: &str) -> Option<(&'a str, &'a str)> {
    let tag = parse_comment(rule.comment()?, instance)?;
    Some((tag.kind, tag.name))
}

/// Does this owned rule carry the `reset_connections` marker?
fn resets_connections(rule: &Rule) -> bool {
    rule.comment().is_some_and(has_reset_marker)
}

/// Rebuilds the entries from owned rules, in rule order (IPv4 chains first); with `only`,
/// just the entries of those names (the rest is never split into arguments).
pub(crate) fn entries_from_rules(
    owned: &OwnedRules,
    instance: &str,
    only: Option<&HashSet<&str>>,
) -> Entries {
    let mut params = Entries {
        conn_mark: conn_mark_of(owned, instance),
        ..Entries::default()
    };
    const HOOKS: [Hook; 4] = [
        Hook::Prerouting,
        Hook::Output,
        Hook::Postrouting,
        Hook::Forward,
    ];
    for family in [Family::V4, Family::V6] {
        // One pass over the rules: each entry's rules per hook (sub-chains included), and the
        // entries' order as every chain shows it.
        let mut sequences: Vec<Vec<(&str, &str)>> = Vec::new();
        let mut by_entry: HashMap<(&str, &str), [Vec<&Rule>; 4]> = HashMap::new();
        for (slot, hook) in HOOKS.iter().enumerate() {
            let Some(chain) = owned.chains.get(&(family, *hook)) else {
                continue;
            };
            let lists = std::iter::once(chain.rules.as_slice())
                .chain(chain.subchains.values().map(|r| r.as_slice()));
            for rules in lists {
                let mut sequence = Vec::new();
                for rule in rules {
                    let entry = entry_of(rule, instance)
                        .filter(|e| only.is_none_or(|names| names.contains(e.1)));
                    if let Some(entry) = entry {
                        by_entry.entry(entry).or_default()[slot].push(rule);
                        if sequence.last() != Some(&entry) {
                            sequence.push(entry);
                        }
                    }
                }
                sequences.push(sequence);
            }
        }
        // Forwards and masquerade entries are two lists: merged apart (their rules interleave
        // differently in the SNAT and FORWARD chains).
        let of_kind = |kind: &str| -> Vec<Vec<(&str, &str)>> {
            sequences
                .iter()
                .map(|seq| seq.iter().copied().filter(|e| e.0 == kind).collect())
                .collect()
        };
        let mut order = merge_orders(&of_kind(KIND_FORWARD));
        order.extend(merge_orders(&of_kind(KIND_MASQUERADE)));
        for entry in order {
            let Some([pre, out, post, fwd]) = by_entry.get(&entry) else {
                continue;
            };
            match entry {
                (KIND_FORWARD, name) => {
                    if let Some(f) = forward_from(name, pre, out, post, fwd) {
                        params.forwards.push(f);
                    }
                }
                (KIND_MASQUERADE, name) => {
                    if let Some(m) = masquerade_from(name, family, post, fwd) {
                        params.masquerade.push(m);
                    }
                }
                _ => {}
            }
        }
    }
    params
}

/// One order of entries that keeps the relative order every chain shows (the params' own
/// order is one such): the DNAT rules sit in per-port sub-chains, the SNAT and FORWARD rules
/// in one chain each, and compiling the result must reproduce every chain. Kahn's algorithm,
/// preferring the entry seen first; linear in the number of rules.
fn merge_orders<'a>(sequences: &[Vec<(&'a str, &'a str)>]) -> Vec<(&'a str, &'a str)> {
    let mut first_seen: Vec<(&str, &str)> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for entry in sequences.iter().flatten() {
        index.entry(*entry).or_insert_with(|| {
            first_seen.push(*entry);
            first_seen.len() - 1
        });
    }
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); first_seen.len()];
    let mut waiting = vec![0usize; first_seen.len()];
    for sequence in sequences {
        for pair in sequence.windows(2) {
            let (a, b) = (index[&pair[0]], index[&pair[1]]);
            after[a].push(b);
            waiting[b] += 1;
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..first_seen.len()).filter(|&i| waiting[i] == 0).collect();
    let mut out = Vec::with_capacity(first_seen.len());
    let mut done = vec![false; first_seen.len()];
    while let Some(i) = ready.pop_first() {
        out.push(first_seen[i]);
        done[i] = true;
        for &j in &after[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    // Chains that disagree (edited by hand) cannot all be kept: the rest in first-seen order.
    out.extend(
        (0..first_seen.len())
            .filter(|&i| !done[i])
            .map(|i| first_seen[i]),
    );
    out
}

/// The conntrack mark bit of the `flow:established` rule, when it is not the default.
fn conn_mark_of(owned: &OwnedRules, instance: &str) -> Option<Value> {
    let bit = owned
        .chains
        .iter()
        .filter(|((_, hook), _)| *hook == Hook::Forward)
        .flat_map(|(_, chain)| &chain.rules)
        .find(|r| entry_of(r, instance) == Some((KIND_FLOW, FLOW_ESTABLISHED)))?
        .option("--mark")?
        .split('/')
        .next()?;
    let bit = u32::from_str_radix(bit.trim_start_matches("0x"), 16).ok()?;
    (bit != DEFAULT_CONN_MARK).then(|| Value::from(format!("{bit:#x}")))
}

/// `10.0.0.1/32` → `10.0.0.1`: iptables-save adds the host prefix to plain addresses.
fn host(text: &str) -> String {
    text.strip_suffix("/32")
        .or_else(|| text.strip_suffix("/128"))
        .unwrap_or(text)
        .to_string()
}

fn port_value(ports: &str) -> Option<Value> {
    let range = PortRange::parse_iptables(ports)?;
    Some(if range.is_single() {
        Value::from(range.first)
    } else {
        Value::from(range.user_text())
    })
}

fn forward_from(
    name: &str,
    pre: &[&Rule],
    out: &[&Rule],
    post: &[&Rule],
    fwd: &[&Rule],
) -> Option<ForwardParams> {
    let first = pre.first().or(out.first())?;
    let mut sources = Vec::new();
    let mut protos = Vec::new();
    for rule in pre.iter().chain(out) {
        if let Some(s) = rule.option("-s") {
            if !sources.iter().any(|x| x == s) {
                sources.push(s.to_string());
            }
        }
        if let Some(p) = rule.option("-p") {
            if !protos.contains(&p) {
                protos.push(p);
            }
        }
    }
    let proto = match protos.as_slice() {
        ["udp"] => ProtoParam::Udp,
        ["tcp"] => ProtoParam::Tcp,
        _ => ProtoParam::Both,
    };
    let nat = if pre.is_empty() { out } else { pre };
    // A pool's rules draw (`--mode`), or with persistence first look the client up (`--update`).
    let pool = first.option("--mode").is_some() || first.option("--update").is_some();
    let (to, redirect_to_port) = match first.option("-j")? {
        "DNAT" if pool => (None, None),
        "DNAT" => (Some(first.option("--to-destination")?.to_string()), None),
        "REDIRECT" => (None, Some(port_value(first.option("--to-ports")?)?)),
        _ => return None,
    };
    let (backends, balance, persistence) = if pool {
        pool_from(first, nat)?
    } else {
        (Vec::new(), Balance::Random, None)
    };
    let snat = (to.is_some() || pool).then(|| match post.first() {
        None => "none".to_string(),
        Some(r) => match (r.option("-j"), r.option("--to-source")) {
            (Some("SNAT"), Some(ip)) => ip.to_string(),
            _ => "masquerade".to_string(),
        },
    });
    let allow_forward = redirect_to_port.is_some() || !fwd.is_empty();
    Some(ForwardParams {
        name: name.to_string(),
        proto,
        listen_port: port_value(first.option("--dport")?)?,
        listen_address: first.option("-d").map(host),
        in_interface: pre.first().and_then(|r| r.option("-i")).map(str::to_string),
        sources,
        to,
        backends,
        balance,
        persistence,
        redirect_to_port,
        // "masquerade" is the default; leave it implicit like a user would.
        snat: snat.filter(|s| s != "masquerade"),
        local: !out.is_empty(),
        allow_forward,
        reset_connections: resets_connections(first),
        ignore_findings: Vec::new(),
    })
}

/// A pool's backends, weights, draw and persistence from its DNAT rules: those of the first
/// protocol and source, in order (a round-robin backend may hold several in a row; meeting an
/// earlier backend again is the next bucket's copy). The weights are in the comments; the
/// client lookups (`recent --update`) that come first with persistence say its seconds.
fn pool_from(
    first: &Rule,
    rules: &[&Rule],
) -> Option<(Vec<BackendParams>, Balance, Option<Value>)> {
    let mut backends: Vec<BackendParams> = Vec::new();
    let (mut balance, mut persistence) = (None, None);
    for rule in rules {
        if rule.option("-p") != first.option("-p") || rule.option("-s") != first.option("-s") {
            break;
        }
        if rule.option("--update").is_some() {
            let seconds: u32 = rule.option("--seconds")?.parse().ok()?;
            persistence.get_or_insert(Value::from(seconds));
            continue;
        }
        let mode = match rule.option("--mode")? {
            "random" => Balance::Random,
            "nth" => Balance::RoundRobin,
            _ => return None,
        };
        if *balance.get_or_insert(mode) != mode {
            break;
        }
        let to = rule.option("--to-destination")?;
        if backends.last().is_some_and(|b| b.to == to) {
            continue;
        }
        if backends.iter().any(|b| b.to == to) {
            break;
        }
        let weight = comment_weight(rule.comment()?)?;
        backends.push(BackendParams {
            to: to.to_string(),
            weight: (weight != 1).then(|| Value::from(weight)),
        });
    }
    Some((backends, balance?, persistence))
}

/// iptables prints no `-s` for `0.0.0.0/0` (`::/0`): that is the source then.
fn masquerade_from(
    name: &str,
    family: Family,
    post: &[&Rule],
    fwd: &[&Rule],
) -> Option<MasqueradeParams> {
    let rule = post.first()?;
    let everyone = match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    };
    Some(MasqueradeParams {
        name: name.to_string(),
        source: rule.option("-s").unwrap_or(everyone).to_string(),
        out_interface: rule.option("-o").map(str::to_string),
        to_source: rule.option("--to-source").map(str::to_string),
        allow_forward: !fwd.is_empty(),
        ignore_findings: Vec::new(),
    })
}
