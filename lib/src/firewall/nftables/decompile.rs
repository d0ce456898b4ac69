//! Reads forwards and masquerade entries back out of the instance's table (`show`, the
//! `before` side of `--diff`, the conntrack reset): forwards with a chain of their own from
//! the chain, plain forwards from their map elements. Compiling the result gives the same
//! table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::Value;

use super::compile::entry_chain;
use super::table::{
    with_prefix, Base, Body, Data, Element, Elements, MapKind, NatTo, Rule, Stage, Table, Target,
};
use crate::firewall::Entries;
use crate::model::{
    BackendParams, Balance, ForwardParams, MasqueradeParams, ProtoParam, DEFAULT_CONN_MARK,
};
use crate::net::PortRange;
use crate::ownership::{
    entry_prefix, has_reset_marker, parse_comment, KIND_FORWARD, KIND_MASQUERADE,
};

fn port_value(ports: PortRange) -> Value {
    if ports.is_single() {
        Value::from(ports.first)
    } else {
        Value::from(ports.user_text())
    }
}

fn host_text(cidr: &crate::net::Cidr) -> String {
    if cidr.prefix == cidr.family().host_prefix() {
        cidr.addr.to_string()
    } else {
        cidr.to_string()
    }
}

fn dest_text(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

/// The part of `table` that holds the forwards `names`: their elements (found by their
/// comments' prefix) and own chains, and the base chains. It decompiles to those forwards as
/// the whole table does, at the cost of their objects: a change among 50,000 forwards follows
/// the live flows of a handful. None when the forwards are so many that decompiling the
/// whole table costs less than finding their part (a descent of each map's tree per name:
/// removing all 50,000 forwards spent 0.34 s on it).
pub(crate) fn part_of(table: &Table, instance: &str, names: &HashSet<&str>) -> Option<Table> {
    if !table.lookups_pay(names.len()) {
        return None;
    }
    let prefixes: Vec<String> = names
        .iter()
        .map(|name| entry_prefix(instance, KIND_FORWARD, name))
        .collect();
    let mut maps = BTreeMap::new();
    for (map, elements) in table.maps.iter() {
        let mut part = Elements::new();
        for prefix in &prefixes {
            let theirs = with_prefix(elements, prefix);
            part.extend(theirs.map(|(c, e)| (c.clone(), e.clone())));
        }
        if !part.is_empty() {
            maps.insert(map.clone(), part);
        }
    }
    let own = names.iter().flat_map(|name| {
        [Stage::Pre, Stage::Out, Stage::Post].map(|stage| entry_chain(stage, name))
    });
    let chains = Base::ALL
        .iter()
        .map(|base| base.name().to_string())
        .chain(own)
        .filter_map(|chain| Some((chain.clone(), table.chains.get(&chain)?.clone())))
        .collect();
    Some(Table {
        maps: Arc::new(maps),
        chains: Arc::new(chains),
    })
}

/// The entries of a table: forwards by name, masquerade entries in rule order.
pub(crate) fn entries_from_table(table: &Table, instance: &str) -> Entries {
    let mut entries = Entries::default();
    let mut names: Vec<&str> = table
        .chains
        .iter()
        .filter_map(|(name, rules)| {
            let rest = name.strip_prefix("pre-")?;
            // Any rule of the chain may carry the forward's comment (someone may have put a
            // `log` rule first).
            rules
                .iter()
                .filter_map(|r| parse_comment(&r.comment, instance))
                .any(|tag| tag.kind == KIND_FORWARD)
                .then_some(rest)
        })
        .collect();
    names.sort_unstable();
    // Each chain's first element (the key a forward listens on), found in one pass.
    let mut elements: HashMap<&str, &Element> = HashMap::new();
    for element in table.maps.values().flat_map(|elements| elements.values()) {
        if let Some(chain) = element.chain() {
            elements.entry(chain).or_insert(element);
        }
    }
    for name in names {
        if let Some(f) = forward_from(table, &elements, name, instance, &mut entries) {
            entries.forwards.push(f);
        }
    }
    let plain = plain_forwards(table, instance, &mut entries);
    entries.forwards.extend(plain);
    entries.forwards.sort_by(|a, b| a.name.cmp(&b.name));
    let owned = |base: Base| {
        table
            .chains
            .get(base.name())
            .into_iter()
            .flatten()
            .filter_map(|rule| Some((parse_comment(&rule.comment, instance)?, rule)))
    };
    let marked: Vec<&str> = owned(Base::Forward)
        .filter(|(tag, rule)| tag.kind == KIND_MASQUERADE && matches!(rule.body, Body::MasqMark(_)))
        .map(|(tag, _)| tag.name)
        .collect();
    for rule in table
        .chains
        .get(Base::Postrouting.name())
        .into_iter()
        .flatten()
    {
        let Some(tag) = parse_comment(&rule.comment, instance) else {
            continue;
        };
        if let (KIND_MASQUERADE, Body::Masquerade(m)) = (tag.kind, &rule.body) {
            entries.masquerade.push(MasqueradeParams {
                name: tag.name.to_string(),
                source: m.source.to_string(),
                out_interface: m.out_interface.clone(),
                to_source: m.to.map(|ip| ip.to_string()),
                // portfwd's table never drops; it marks the entry's flows for an accept in
                // iptables' FORWARD (or another table's forward chain).
                allow_forward: marked.contains(&tag.name),
                ignore_findings: Vec::new(),
            });
        }
    }
    entries
}

/// The rule of a forward's chain that carries its comment (other rules may sit before it).
fn owned_rule<'a>(table: &'a Table, chain: &str, instance: &str) -> Option<&'a Rule> {
    table
        .chains
        .get(chain)?
        .iter()
        .find(|r| parse_comment(&r.comment, instance).is_some_and(|tag| tag.kind == KIND_FORWARD))
}

fn forward_from(
    table: &Table,
    elements: &HashMap<&str, &Element>,
    name: &str,
    instance: &str,
    entries: &mut Entries,
) -> Option<ForwardParams> {
    let pre_chain = entry_chain(Stage::Pre, name);
    let rule = owned_rule(table, &pre_chain, instance)?;
    let Body::Nat(nat) = &rule.body else {
        return None;
    };
    let element = *elements.get(pre_chain.as_str())?;
    let (to, backends, balance, redirect_to_port) = match &nat.to {
        NatTo::Dnat { addr, port } => (
            Some(dest_text(*addr, *port)),
            Vec::new(),
            Balance::Random,
            None,
        ),
        NatTo::Pool(pool) => {
            let backends = pool
                .backends
                .iter()
                .map(|b| BackendParams {
                    to: dest_text(b.addr, b.port),
                    weight: (b.weight != 1).then(|| Value::from(b.weight)),
                })
                .collect();
            (None, backends, pool.balance, None)
        }
        NatTo::Redirect { port } => (None, Vec::new(), Balance::Random, Some(Value::from(*port))),
    };
    let translated = to.is_some() || !backends.is_empty();
    if let Some(mark) = nat.mark.filter(|&m| m != DEFAULT_CONN_MARK) {
        entries.conn_mark = Some(Value::from(format!("{mark:#x}")));
    }
    let snat = translated.then_some(()).and_then(|()| {
        match owned_rule(table, &entry_chain(Stage::Post, name), instance).map(|r| &r.body) {
            None => Some("none".to_string()),
            Some(Body::Snat(s)) => s.to.map(|ip| ip.to_string()),
            Some(_) => None,
        }
    });
    let proto = match nat.protos.as_slice() {
        [crate::model::Proto::Tcp] => ProtoParam::Tcp,
        [crate::model::Proto::Udp] => ProtoParam::Udp,
        _ => ProtoParam::Both,
    };
    Some(ForwardParams {
        name: name.to_string(),
        proto,
        listen_port: port_value(element.ports),
        listen_address: element.addr.map(|a| a.to_string()),
        in_interface: nat.in_interface.clone(),
        sources: nat.sources.iter().map(host_text).collect(),
        to,
        backends,
        balance,
        persistence: None,
        redirect_to_port,
        snat,
        local: table.chains.contains_key(&entry_chain(Stage::Out, name)),
        allow_forward: nat.mark.is_some() || matches!(nat.to, NatTo::Redirect { .. }),
        reset_connections: has_reset_marker(&rule.comment),
        ignore_findings: Vec::new(),
    })
}

/// What the elements of one plain forward say, gathered over the maps.
#[derive(Default)]
struct Plain<'a> {
    /// The DNAT elements (prerouting): their comment, protocol, port and backend.
    nat: Vec<(&'a str, &'a Element)>,
    marked: bool,
    local: bool,
    /// None: masquerade; Some: the source address; not seen: none.
    snat: Option<Option<std::net::IpAddr>>,
}

/// The plain forwards: those whose DNAT is an element of a `-nat` map.
fn plain_forwards(table: &Table, instance: &str, entries: &mut Entries) -> Vec<ForwardParams> {
    let mut found: BTreeMap<&str, Plain> = BTreeMap::new();
    for (map, elements) in table.maps.iter() {
        let Some(kind) = MapKind::from_name(map).filter(|k| k.data != Data::Verdict) else {
            continue;
        };
        for (comment, element) in elements {
            let Some(tag) = parse_comment(comment, instance).filter(|t| t.kind == KIND_FORWARD)
            else {
                continue;
            };
            let plain = found.entry(tag.name).or_default();
            match (kind.data, kind.stage, &element.target) {
                (Data::Nat, Stage::Pre, Target::To(..)) => plain.nat.push((comment, element)),
                (Data::Nat, Stage::Out, _) => plain.local = true,
                (Data::Mark, Stage::Pre, _) => plain.marked = true,
                (Data::Masq, _, _) => plain.snat = Some(None),
                (Data::Snat, _, Target::Source(ip)) => plain.snat = Some(Some(*ip)),
                _ => {}
            }
        }
    }
    if let Some(mark) = marks(table).filter(|&m| m != DEFAULT_CONN_MARK) {
        entries.conn_mark = Some(Value::from(format!("{mark:#x}")));
    }
    found
        .into_iter()
        .filter_map(|(name, plain)| {
            let (comment, first) = *plain.nat.first()?;
            let Target::To(addr, port) = first.target else {
                return None;
            };
            let mut protos: Vec<crate::model::Proto> =
                plain.nat.iter().filter_map(|(_, e)| e.proto).collect();
            protos.sort();
            protos.dedup();
            let proto = match protos.as_slice() {
                [crate::model::Proto::Tcp] => ProtoParam::Tcp,
                [crate::model::Proto::Udp] => ProtoParam::Udp,
                _ => ProtoParam::Both,
            };
            let snat = match plain.snat {
                None => Some("none".to_string()),
                Some(to) => to.map(|ip| ip.to_string()),
            };
            Some(ForwardParams {
                name: name.to_string(),
                proto,
                listen_port: port_value(first.ports),
                listen_address: None,
                in_interface: None,
                sources: Vec::new(),
                to: Some(dest_text(addr, Some(port))),
                backends: Vec::new(),
                balance: Balance::Random,
                persistence: None,
                redirect_to_port: None,
                snat,
                local: plain.local,
                allow_forward: plain.marked,
                reset_connections: has_reset_marker(comment),
                ignore_findings: Vec::new(),
            })
        })
        .collect()
}

/// The mark the mark sets' rules set.
fn marks(table: &Table) -> Option<u32> {
    table
        .chains
        .values()
        .flatten()
        .find_map(|rule| match rule.body {
            Body::Mark(_, mark) => Some(mark),
            _ => None,
        })
}
