//! Reads forwards and masquerade entries back out of the instance's table (`show`, the
//! `before` side of `--diff`, the conntrack reset). Compiling the result gives the same table.

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::Value;

use super::compile::entry_chain;
use super::table::{Base, Body, Element, NatTo, Rule, Stage, Table};
use crate::firewall::Entries;
use crate::model::{ForwardParams, MasqueradeParams, ProtoParam, DEFAULT_CONN_MARK};
use crate::net::PortRange;
use crate::ownership::{has_reset_marker, parse_comment, KIND_FORWARD, KIND_MASQUERADE};

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
        elements.entry(element.chain.as_str()).or_insert(element);
    }
    for name in names {
        if let Some(f) = forward_from(table, &elements, name, instance, &mut entries) {
            entries.forwards.push(f);
        }
    }
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
    let (to, redirect_to_port) = match nat.to {
        NatTo::Dnat { addr, port } => (Some(dest_text(addr, port)), None),
        NatTo::Redirect { port } => (None, Some(Value::from(port))),
    };
    if let Some(mark) = nat.mark.filter(|&m| m != DEFAULT_CONN_MARK) {
        entries.conn_mark = Some(Value::from(format!("{mark:#x}")));
    }
    let snat = to.as_ref().and_then(|_| {
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
        redirect_to_port,
        snat,
        local: table.chains.contains_key(&entry_chain(Stage::Out, name)),
        allow_forward: nat.mark.is_some() || matches!(nat.to, NatTo::Redirect { .. }),
        reset_connections: has_reset_marker(&rule.comment),
        ignore_findings: Vec::new(),
    })
}
