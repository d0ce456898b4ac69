//! Reads the instance's table from `nft -j list table inet portfwd-<instance>` (and nothing
//! else of the ruleset): its maps and elements, chains and rules with their handles, each
//! read back into the shapes of [`super::table`] so a rollback can write them again and
//! `show` can turn them into params.
//!
//! The JSON is read with serde_json directly: the `nftables` crate (0.6.3) fails on map
//! elements that carry comments (`{"elem": {"val": .., "comment": ..}}`), which every element
//! of ours does.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use super::table::{
    Base, Body, Element, MapKind, MasqRule, NatRule, NatTo, Rule, SnatRule, Stage, Table,
};
use crate::model::Proto;
use crate::net::{Cidr, Family, PortRange};

/// What the read found of the instance's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftObserved {
    /// Whether the table exists.
    pub exists: bool,
    /// Its content (rules of shapes portfwd does not know read as [`Body::Unknown`]).
    pub table: Table,
    /// Each chain's rule handles, in the order of [`Table::chains`]' rules.
    pub handles: BTreeMap<String, Vec<u64>>,
    /// Each element's key as nft prints it, by (map, comment), for deleting it.
    pub keys: BTreeMap<(String, String), String>,
    /// The listing could not be parsed: the plan then changes nothing.
    pub unreadable: bool,
}

/// Parses the listing; an empty output (no table, or no nft) is an empty observation.
pub fn parse(output: &str) -> Result<NftObserved, String> {
    let mut observed = NftObserved::default();
    if output.trim().is_empty() {
        return Ok(observed);
    }
    let json: Value = serde_json::from_str(output).map_err(|e| format!("nft -j output: {e}"))?;
    let objects = json
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft -j output has no `nftables` list")?;
    for object in objects {
        if object.get("table").is_some() {
            observed.exists = true;
        } else if let Some(chain) = object.get("chain") {
            let name = text(chain.get("name")).to_string();
            observed.table.chains.entry(name.clone()).or_default();
            observed.handles.entry(name).or_default();
        } else if let Some(map) = object.get("map").or_else(|| object.get("set")) {
            read_map(map, &mut observed);
        } else if let Some(rule) = object.get("rule") {
            let chain = text(rule.get("chain")).to_string();
            let comment = text(rule.get("comment")).to_string();
            let handle = rule.get("handle").and_then(Value::as_u64).unwrap_or(0);
            let stmts: &[Value] = rule
                .get("expr")
                .and_then(Value::as_array)
                .map_or(&[], Vec::as_slice);
            let body = body_of(&chain, stmts).unwrap_or(Body::Unknown);
            observed
                .table
                .chains
                .entry(chain.clone())
                .or_default()
                .push(Rule { comment, body });
            observed.handles.entry(chain).or_default().push(handle);
        }
    }
    Ok(observed)
}

fn text(value: Option<&Value>) -> &str {
    value.and_then(Value::as_str).unwrap_or_default()
}

fn read_map(map: &Value, observed: &mut NftObserved) {
    let name = text(map.get("name")).to_string();
    let kind = MapKind::from_name(&name);
    let elements = observed.table.maps.entry(name.clone()).or_default();
    let items = map.get("elem").and_then(Value::as_array);
    for (i, item) in items.into_iter().flatten().enumerate() {
        // `[key, verdict]`; the key is `{"elem": {"val": .., "comment": ..}}` when commented.
        let (key, verdict) = match item.as_array().map(Vec::as_slice) {
            Some([key, verdict]) => (key, verdict),
            _ => (item, &Value::Null),
        };
        let (val, comment) = match key.get("elem") {
            Some(e) => (e.get("val").unwrap_or(&Value::Null), text(e.get("comment"))),
            None => (key, ""),
        };
        // An uncommented element is not ours to keep; a unique name lets the plan delete it.
        let comment = if comment.is_empty() {
            format!("?{i}")
        } else {
            comment.to_string()
        };
        let chain = ["jump", "goto"]
            .iter()
            .find_map(|v| verdict.get(v))
            .map(|t| text(t.get("target")).to_string())
            .unwrap_or_default();
        observed
            .keys
            .insert((name.clone(), comment.clone()), key_text(val));
        let element = kind
            .and_then(|k| element_of(k, val, chain))
            .unwrap_or(Element {
                addr: None,
                proto: None,
                ports: PortRange::single(0),
                chain: String::new(),
            });
        elements.insert(comment, element);
    }
}

/// A key as nft's language writes it (`10.0.0.1 . tcp . 8000-8010`).
fn key_text(val: &Value) -> String {
    match val {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(parts) = o.get("concat").and_then(Value::as_array) {
                parts.iter().map(key_text).collect::<Vec<_>>().join(" . ")
            } else if let Some([a, b]) = o.get("range").and_then(Value::as_array).map(Vec::as_slice)
            {
                format!("{}-{}", key_text(a), key_text(b))
            } else if let Some(p) = o.get("prefix") {
                format!(
                    "{}/{}",
                    text(p.get("addr")),
                    key_text(p.get("len").unwrap_or(&Value::Null))
                )
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

fn ports_of(val: &Value) -> Option<PortRange> {
    let port = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
    if let Some([a, b]) = val
        .get("range")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        return Some(PortRange {
            first: port(a)?,
            last: port(b)?,
        });
    }
    port(val).map(PortRange::single)
}

fn proto_of(val: &Value) -> Option<Proto> {
    match val.as_str()? {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

fn element_of(kind: MapKind, val: &Value, chain: String) -> Option<Element> {
    let single = [val.clone()];
    let parts = val
        .get("concat")
        .and_then(Value::as_array)
        .map_or(&single[..], Vec::as_slice);
    let mut parts = parts.iter();
    let addr = if kind.by_addr {
        Some(parts.next()?.as_str()?.parse::<IpAddr>().ok()?)
    } else {
        None
    };
    let proto = if kind.stage == Stage::Post {
        None
    } else {
        Some(proto_of(parts.next()?)?)
    };
    let ports = ports_of(parts.next()?)?;
    Some(Element {
        addr,
        proto,
        ports,
        chain,
    })
}

/// The matches and statements of a rule, by what they are.
#[derive(Default)]
struct Parts<'a> {
    saddr: Option<&'a Value>,
    daddr: Option<&'a Value>,
    dport: Option<&'a Value>,
    iifname: Option<&'a str>,
    oifname: Option<&'a str>,
    l4proto: Option<&'a Value>,
    family: Option<Family>,
    mark: Option<u32>,
    nat: Option<(&'a str, &'a Value)>,
    drop: bool,
    vmap: bool,
}

fn parts_of(stmts: &[Value]) -> Parts<'_> {
    let mut p = Parts::default();
    for stmt in stmts {
        if let Some(m) = stmt.get("match") {
            let (left, right) = (m.get("left"), m.get("right"));
            let Some(right) = right else { continue };
            if let Some(payload) = left.and_then(|l| l.get("payload")) {
                let protocol = text(payload.get("protocol"));
                match (protocol, text(payload.get("field"))) {
                    ("ip" | "ip6", field) => {
                        p.family = Some(if protocol == "ip" {
                            Family::V4
                        } else {
                            Family::V6
                        });
                        match field {
                            "saddr" => p.saddr = Some(right),
                            "daddr" => p.daddr = Some(right),
                            _ => {}
                        }
                    }
                    ("th", "dport") => p.dport = Some(right),
                    _ => {}
                }
            } else if let Some(meta) = left.and_then(|l| l.get("meta")) {
                match text(meta.get("key")) {
                    "iifname" => p.iifname = right.as_str(),
                    "oifname" => p.oifname = right.as_str(),
                    "l4proto" => p.l4proto = Some(right),
                    _ => {}
                }
            }
        } else if let Some(mangle) = stmt.get("mangle") {
            let value = mangle.get("value").and_then(|v| v.get("|"));
            p.mark = value
                .and_then(Value::as_array)
                .and_then(|v| v.get(1))
                .and_then(Value::as_u64)
                .and_then(|m| u32::try_from(m).ok());
        } else if stmt.get("vmap").is_some() {
            p.vmap = true;
        } else if stmt.get("drop").is_some() {
            p.drop = true;
        } else {
            for nat in ["dnat", "snat", "redirect", "masquerade"] {
                if let Some(v) = stmt.get(nat) {
                    p.nat = Some((nat, v));
                }
            }
        }
    }
    p
}

fn addrs_of(val: &Value) -> Option<Vec<Cidr>> {
    let one = |v: &Value| -> Option<Cidr> {
        if let Some(p) = v.get("prefix") {
            let addr: IpAddr = text(p.get("addr")).parse().ok()?;
            let prefix = u8::try_from(p.get("len")?.as_u64()?).ok()?;
            return Some(Cidr { addr, prefix });
        }
        let addr: IpAddr = v.as_str()?.parse().ok()?;
        Some(Cidr {
            addr,
            prefix: Family::of(&addr).host_prefix(),
        })
    };
    match val.get("set").and_then(Value::as_array) {
        Some(items) => items.iter().map(one).collect(),
        None => Some(vec![one(val)?]),
    }
}

fn interface_of(name: &str) -> String {
    match name.strip_suffix('*') {
        Some(prefix) => format!("{prefix}+"),
        None => name.to_string(),
    }
}

fn addr_of(nat: &Value) -> Option<IpAddr> {
    text(nat.get("addr")).parse().ok()
}

fn port_of(nat: &Value) -> Option<u16> {
    nat.get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
}

/// Reads a rule back into its shape by the chain it is in.
fn body_of(chain: &str, stmts: &[Value]) -> Option<Body> {
    let p = parts_of(stmts);
    if let Some(base) = Base::from_name(chain) {
        return match base {
            _ if p.vmap => {
                let map = stmts.iter().find_map(|s| s.get("vmap"))?;
                let name = text(map.get("data")).strip_prefix('@')?;
                Some(Body::Dispatch(MapKind::from_name(name)?))
            }
            Base::Input if p.drop => Some(Body::LocalnetGuard {
                in_interface: interface_of(p.iifname?),
            }),
            Base::Postrouting => {
                let (kind, nat) = p.nat?;
                let to = match kind {
                    "masquerade" => None,
                    "snat" => Some(addr_of(nat)?),
                    _ => return None,
                };
                Some(Body::Masquerade(MasqRule {
                    source: *addrs_of(p.saddr?)?.first()?,
                    out_interface: p.oifname.map(interface_of),
                    to,
                }))
            }
            _ => None,
        };
    }
    let (kind, nat) = p.nat?;
    if chain.starts_with("pre-") || chain.starts_with("out-") {
        let to = match kind {
            "dnat" => NatTo::Dnat {
                addr: addr_of(nat)?,
                port: port_of(nat),
            },
            "redirect" => NatTo::Redirect {
                port: port_of(nat)?,
            },
            _ => return None,
        };
        let family = match to {
            NatTo::Dnat { addr, .. } => Family::of(&addr),
            NatTo::Redirect { .. } => match text(nat.get("family")) {
                "ip6" => Family::V6,
                _ => p.family.unwrap_or(Family::V4),
            },
        };
        let protos = match p.l4proto? {
            Value::Object(o) => o
                .get("set")?
                .as_array()?
                .iter()
                .map(proto_of)
                .collect::<Option<Vec<_>>>()?,
            one => vec![proto_of(one)?],
        };
        return Some(Body::Nat(NatRule {
            family,
            sources: p.saddr.map(addrs_of).unwrap_or(Some(Vec::new()))?,
            in_interface: p.iifname.map(interface_of),
            protos,
            mark: p.mark,
            to,
        }));
    }
    if chain.starts_with("post-") {
        let to = match kind {
            "masquerade" => None,
            "snat" => Some(addr_of(nat)?),
            _ => return None,
        };
        return Some(Body::Snat(SnatRule {
            daddr: addrs_of(p.daddr?)?.first()?.addr,
            dports: ports_of(p.dport?)?,
            to,
        }));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nftables::compile::compile_table;
    use crate::model::Config;

    /// What nft 1.0.6 printed for a table portfwd wrote (`nft -j list table inet portfwd-gw`).
    const LISTING: &str = include_str!("testdata/list-table.json");

    #[test]
    fn a_listing_reads_back_as_what_was_compiled() {
        let (config, _, _) =
            Config::from_json(include_str!("testdata/params.json")).expect("valid params");
        let want = compile_table(&config);
        let observed = parse(LISTING).expect("parses");
        assert!(observed.exists);
        assert_eq!(observed.table, want);
        assert_eq!(
            observed.handles.values().map(Vec::len).sum::<usize>(),
            want.chains.values().map(Vec::len).sum::<usize>()
        );
    }

    #[test]
    fn no_table_is_an_empty_observation() {
        let observed = parse("").expect("parses");
        assert!(!observed.exists && observed.table.is_empty());
    }
}
