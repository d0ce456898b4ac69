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
use std::sync::Arc;

use serde_json::Value;

use super::pool;
use super::table::{
    set_text, Base, Body, Data, Element, MapKind, MasqMark, MasqRule, NatRule, NatTo, Rule,
    SnatMatch, SnatRule, Stage, Table, Target,
};
use crate::model::{Balance, Pool, Proto};
use crate::net::{Cidr, Family, PortRange};

/// What the read found of the instance's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NftObserved {
    /// Whether the table exists.
    pub exists: bool,
    /// Its content (rules of shapes portfwd does not know read as [`Body::Unknown`]).
    pub table: Table,
    /// Each chain's rule handles, in the order of [`Table::chains`]' rules.
    pub handles: BTreeMap<String, Vec<u64>>,
    /// Each element's key as nft prints it, by (map, comment), for deleting it (none when
    /// [`NftObserved::assumed`]: then the key is as portfwd writes it, [`Element::key`]).
    pub keys: BTreeMap<(String, String), String>,
    /// The listing could not be parsed: the plan then changes nothing.
    pub unreadable: bool,
    /// The table carries flags (`dormant` turns every chain off; portfwd sets none).
    pub flagged: bool,
    /// Each chain's hook declaration as listed (None: a regular chain).
    pub hooks: BTreeMap<String, Option<Hooked>>,
    /// Each map's declaration as listed.
    pub map_decls: BTreeMap<String, MapDecl>,
    /// Not read but known (what was last written, [`NftObserved::as_written`]): no rule
    /// handles, so a rule can only go by flushing its chain.
    pub assumed: bool,
}

impl NftObserved {
    /// What a read of `table` finds right after portfwd wrote it (chains and maps declared
    /// as portfwd declares them, elements keyed as portfwd writes them, but no rule
    /// handles); the read cache stands for such a read.
    pub(crate) fn as_written(table: Table) -> NftObserved {
        // Base chains only: a regular chain without an entry is what `hook` says it is.
        let hooks = table
            .chains
            .keys()
            .filter_map(|name| Some((name.clone(), Some(Hooked::of(Base::from_name(name)?)))))
            .collect();
        let map_decls = table
            .maps
            .keys()
            .filter_map(|name| Some((name.clone(), MapDecl::of(MapKind::from_name(name)?))))
            .collect();
        NftObserved {
            exists: true,
            table,
            hooks,
            map_decls,
            assumed: true,
            ..NftObserved::default()
        }
    }
    /// A chain's hook declaration as found (`Some(None)`: a regular chain; None: no such
    /// chain). Assumed, regular chains have no entry in [`NftObserved::hooks`]: 50,000 of
    /// them cost a no-op run 10 MB for nothing.
    pub(crate) fn hook(&self, chain: &str) -> Option<Option<&Hooked>> {
        match self.hooks.get(chain) {
            Some(hooked) => Some(hooked.as_ref()),
            None if self.assumed && self.table.chains.contains_key(chain) => Some(None),
            None => None,
        }
    }
}

/// A base chain's attributes: what a hand edit (`policy drop`, another priority) changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hooked {
    pub kind: String,
    pub hook: String,
    pub prio: i64,
    pub policy: String,
}

impl Hooked {
    /// What portfwd declares for `base`.
    pub(crate) fn of(base: Base) -> Hooked {
        let (kind, prio) = match base {
            Base::Prerouting | Base::Output => ("nat", -100),
            Base::Postrouting => ("nat", 100),
            Base::Input => ("filter", 0),
            Base::Forward => ("filter", -10),
        };
        Hooked {
            kind: kind.into(),
            hook: base.name().into(),
            prio,
            policy: "accept".into(),
        }
    }
}

impl std::fmt::Display for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} hook {} priority {} policy {}",
            self.kind, self.hook, self.prio, self.policy
        )
    }
}

/// A map's (or set's) key types, data type (empty: a set) and flags, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapDecl {
    pub key: Vec<String>,
    pub data: String,
    pub flags: Vec<String>,
}

impl MapDecl {
    /// What portfwd declares for `kind`.
    pub(crate) fn of(kind: MapKind) -> MapDecl {
        MapDecl {
            key: kind.key_types().iter().map(|t| t.to_string()).collect(),
            data: kind.data_type().unwrap_or_default().into(),
            flags: if kind.ranged {
                vec!["interval".into()]
            } else {
                Vec::new()
            },
        }
    }
}

/// Does a listing that could not be parsed show the table's `flags`? (nft 0.9.8 prints a
/// dormant table's flags wrongly in JSON, at times cutting the output off right there.)
pub(crate) fn flags_seen(output: &str) -> bool {
    output.split_once("\"table\": {").is_some_and(|(_, rest)| {
        rest.split('}')
            .next()
            .is_some_and(|t| t.contains("\"flags\""))
    })
}

/// Parses the listing; an empty output (no table, or no nft) is an empty observation.
pub(crate) fn parse(output: &str) -> Result<NftObserved, String> {
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
        if let Some(table) = object.get("table") {
            observed.exists = true;
            // nft 1.0.6 prints the flags' value garbled; that there are any is what counts.
            observed.flagged = table
                .get("flags")
                .is_some_and(|f| !f.is_null() && f.as_array().is_none_or(|a| !a.is_empty()));
        } else if let Some(chain) = object.get("chain") {
            let name = text(chain.get("name")).to_string();
            let hooked = chain.get("hook").map(|hook| Hooked {
                kind: text(chain.get("type")).to_string(),
                hook: hook.as_str().unwrap_or_default().to_string(),
                prio: chain
                    .get("prio")
                    .and_then(Value::as_i64)
                    .unwrap_or(i64::MIN),
                policy: text(chain.get("policy")).to_string(),
            });
            observed.hooks.insert(name.clone(), hooked);
            Arc::make_mut(&mut observed.table.chains)
                .entry(name.clone())
                .or_default();
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
            // A rule is read as a known shape only if that shape, written again, says exactly
            // what the listing says: anything added, dropped or changed by hand is Unknown.
            let body = body_of(&chain, stmts)
                .filter(|b| faithful(b, stmts))
                .unwrap_or(Body::Unknown);
            Arc::make_mut(&mut observed.table.chains)
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
    let words = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().map(|w| text(Some(w)).to_string()).collect(),
            _ => Vec::new(),
        }
    };
    observed.map_decls.insert(
        name.clone(),
        MapDecl {
            key: words(map.get("type")),
            data: text(map.get("map")).to_string(),
            flags: words(map.get("flags")),
        },
    );
    let elements = Arc::make_mut(&mut observed.table.maps)
        .entry(name.clone())
        .or_default();
    let items = map.get("elem").and_then(Value::as_array);
    for (i, item) in items.into_iter().flatten().enumerate() {
        // `[key, data]` (a set: the key alone); the key is `{"elem": {"val": .., "comment":
        // ..}}` when commented.
        let (key, data) = match item.as_array().map(Vec::as_slice) {
            Some([key, data]) => (key, Some(data)),
            _ => (item, None),
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
        observed
            .keys
            .insert((name.clone(), comment.clone()), key_text(val));
        let element = kind
            .and_then(|k| element_of(k, val, target_of(k.data, data)?))
            .unwrap_or(Element {
                addr: None,
                proto: None,
                ports: PortRange::single(0),
                backend: None,
                target: Target::Member,
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

/// What an element of a map of `data` maps to, if it is of that kind's shape (only a jump is
/// what portfwd writes: a goto skips the base chain's later rules).
fn target_of(data: Data, listed: Option<&Value>) -> Option<Target> {
    let addr = |v: &Value| v.as_str()?.parse::<IpAddr>().ok();
    match (data, listed) {
        (Data::Verdict, Some(v)) => {
            Some(Target::Jump(text(v.get("jump")?.get("target")).to_string()))
        }
        (Data::Nat, Some(v)) => match v.get("concat")?.as_array()?.as_slice() {
            [a, p] => Some(Target::To(addr(a)?, u16::try_from(p.as_u64()?).ok()?)),
            _ => None,
        },
        (Data::Snat, Some(v)) => Some(Target::Source(addr(v)?)),
        (Data::Mark | Data::Masq, None) => Some(Target::Member),
        _ => None,
    }
}

fn element_of(kind: MapKind, val: &Value, target: Target) -> Option<Element> {
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
    let backend = match kind.data {
        Data::Masq | Data::Snat => {
            let addr = parts.next()?.as_str()?.parse::<IpAddr>().ok()?;
            Some((addr, u16::try_from(parts.next()?.as_u64()?).ok()?))
        }
        _ => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Element {
        addr,
        proto,
        ports,
        backend,
        target,
    })
}

/// The matches and statements of a rule, by what they are.
#[derive(Default)]
struct Parts<'a> {
    saddr: Option<&'a Value>,
    daddr: Option<&'a Value>,
    dport: Option<&'a Value>,
    /// `ip daddr . th dport { ... }`: a pool's backends with their ports.
    daddr_dport: Option<&'a Value>,
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
            if let Some(parts) = left.and_then(|l| l.get("concat")).and_then(Value::as_array) {
                fn field(v: &Value) -> Option<(&str, &str)> {
                    v.get("payload")
                        .map(|p| (text(p.get("protocol")), text(p.get("field"))))
                }
                if let [a, b] = parts.as_slice() {
                    if matches!(field(a), Some(("ip" | "ip6", "daddr")))
                        && field(b) == Some(("th", "dport"))
                    {
                        p.daddr_dport = Some(right);
                    }
                }
            } else if let Some(payload) = left.and_then(|l| l.get("payload")) {
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

/// An address match's right side (a host, a prefix, a range, or a set of them) as the fewest
/// prefixes (nft lists adjacent networks of a set merged, as a range when no prefix fits).
fn addrs_of(val: &Value) -> Option<Vec<Cidr>> {
    let one = |v: &Value| -> Option<(Family, u128, u128)> {
        if let Some(p) = v.get("prefix") {
            let addr: IpAddr = text(p.get("addr")).parse().ok()?;
            let prefix = u8::try_from(p.get("len")?.as_u64()?).ok()?;
            return Some(crate::net::cidr_bits(&Cidr { addr, prefix }));
        }
        if let Some([a, b]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice) {
            let first: IpAddr = a.as_str()?.parse().ok()?;
            let last: IpAddr = b.as_str()?.parse().ok()?;
            return crate::net::interval_bits(&first, &last);
        }
        let addr: IpAddr = v.as_str()?.parse().ok()?;
        Some(crate::net::cidr_bits(&Cidr {
            addr,
            prefix: Family::of(&addr).host_prefix(),
        }))
    };
    let items: Vec<(Family, u128, u128)> = match val.get("set").and_then(Value::as_array) {
        Some(items) => items.iter().map(one).collect::<Option<_>>()?,
        None => vec![one(val)?],
    };
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let mut intervals: Vec<(u128, u128)> = items
            .iter()
            .filter(|(f, _, _)| *f == family)
            .map(|&(_, a, b)| (a, b))
            .collect();
        intervals.sort_unstable();
        for (a, b) in crate::net::merged(&intervals) {
            out.extend(crate::net::cover_interval(family, a, b));
        }
    }
    Some(out)
}

/// A pool's DNAT (`dnat ip to numgen random mod 4 map { ... }`) read back, None unless its
/// draw and map are what portfwd writes for some pool ([`pool::read`]).
fn pool_of(nat: &Value) -> Option<Pool> {
    let map = nat.get("addr")?.get("map")?;
    let key = map.get("key")?;
    let (balance, modulus) = if let Some(n) = key.get("numgen") {
        let balance = match text(n.get("mode")) {
            "random" => Balance::Random,
            "inc" => Balance::RoundRobin,
            _ => return None,
        };
        (balance, n.get("mod")?.as_u64()?)
    } else {
        (Balance::SourceHash, key.get("jhash")?.get("mod")?.as_u64()?)
    };
    let entries: Vec<(u32, u32, IpAddr, Option<u16>)> = map
        .get("data")?
        .get("set")?
        .as_array()?
        .iter()
        .map(|pair| {
            let [k, d] = pair.as_array()?.as_slice() else {
                return None;
            };
            let (first, last) = match k.get("range").and_then(Value::as_array) {
                Some(r) => match r.as_slice() {
                    [a, b] => (a.as_u64()?, b.as_u64()?),
                    _ => return None,
                },
                None => (k.as_u64()?, k.as_u64()?),
            };
            let (addr, port) = match d.get("concat").and_then(Value::as_array) {
                Some(c) => match c.as_slice() {
                    [a, p] => (a.as_str()?, Some(u16::try_from(p.as_u64()?).ok()?)),
                    _ => return None,
                },
                None => (d.as_str()?, None),
            };
            Some((
                u32::try_from(first).ok()?,
                u32::try_from(last).ok()?,
                addr.parse().ok()?,
                port,
            ))
        })
        .collect::<Option<_>>()?;
    pool::read(balance, u32::try_from(modulus).ok()?, &entries)
}

/// A match's right side as its items: a set's, or the one value.
fn items_of(val: &Value) -> Vec<&Value> {
    match val.get("set").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None => vec![val],
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
        if let Some(kind) = flat_kind(stmts) {
            return match kind.data {
                Data::Mark => Some(Body::Mark(kind, p.mark?)),
                _ => Some(Body::Dispatch(kind)),
            };
        }
        return match base {
            _ if p.vmap => {
                let map = stmts.iter().find_map(|s| s.get("vmap"))?;
                let name = text(map.get("data")).strip_prefix('@')?;
                Some(Body::Dispatch(MapKind::from_name(name)?))
            }
            Base::Input if p.drop => Some(Body::LocalnetGuard {
                in_interface: interface_of(p.iifname?),
            }),
            Base::Forward => Some(Body::MasqMark(MasqMark {
                source: *addrs_of(p.saddr?)?.first()?,
                out_interface: p.oifname.map(interface_of),
                mark: p.mark?,
            })),
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
            "dnat" if nat.get("addr").is_some_and(|a| a.get("map").is_some()) => {
                NatTo::Pool(Arc::new(pool_of(nat)?))
            }
            "dnat" => NatTo::Dnat {
                addr: addr_of(nat)?,
                port: port_of(nat),
            },
            "redirect" => NatTo::Redirect {
                port: port_of(nat)?,
            },
            _ => return None,
        };
        let family = match &to {
            NatTo::Dnat { addr, .. } => Family::of(addr),
            NatTo::Pool(pool) => Family::of(&pool.backends.first()?.addr),
            NatTo::Redirect { .. } => match Family::from_nft(text(nat.get("family"))) {
                Some(Family::V6) => Family::V6,
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
        let backends = match (p.daddr_dport, p.daddr, p.dport) {
            (Some(pairs), None, None) => {
                let mut pairs: Vec<(IpAddr, u16)> = items_of(pairs)
                    .iter()
                    .map(|v| match v.get("concat")?.as_array()?.as_slice() {
                        [a, port] => Some((
                            a.as_str()?.parse().ok()?,
                            u16::try_from(port.as_u64()?).ok()?,
                        )),
                        _ => None,
                    })
                    .collect::<Option<_>>()?;
                pairs.sort_by_cached_key(|(a, p)| format!("{a} . {p}"));
                SnatMatch::Pairs(pairs)
            }
            (None, Some(addrs), Some(ports)) => {
                let mut addrs: Vec<IpAddr> = items_of(addrs)
                    .iter()
                    .map(|v| v.as_str()?.parse().ok())
                    .collect::<Option<_>>()?;
                addrs.sort_by_cached_key(ToString::to_string);
                SnatMatch::Addrs(addrs, ports_of(ports)?)
            }
            _ => return None,
        };
        let family = match &backends {
            SnatMatch::Addrs(addrs, _) => Family::of(addrs.first()?),
            SnatMatch::Pairs(pairs) => Family::of(&pairs.first()?.0),
        };
        return Some(Body::Snat(SnatRule {
            family,
            backends,
            to,
        }));
    }
    None
}

/// The plain forwards' map or set a rule looks up (`... @pre-port4-mark`, `dnat ... map
/// @pre-port4-nat`), if any.
fn flat_kind(stmts: &[Value]) -> Option<MapKind> {
    stmts.iter().find_map(|stmt| {
        let name = match stmt.get("match") {
            Some(m) => m.get("right")?.as_str()?,
            None => {
                let nat = stmt.get("dnat").or_else(|| stmt.get("snat"))?;
                nat.get("addr")?.get("map")?.get("data")?.as_str()?
            }
        };
        MapKind::from_name(name.strip_prefix('@')?).filter(|k| k.data != Data::Verdict)
    })
}

/// Does `body`, written again, say what the listed statements say? Both sides are put in
/// nft's language: `stmts` by [`stmt_text`], the body by its renderer, minus the one
/// redundancy nft drops on its own (a `meta nfproto` that a following `ip`/`ip6` match implies).
fn faithful(body: &Body, stmts: &[Value]) -> bool {
    let Some(written) = body.render() else {
        return false;
    };
    let listed: Option<Vec<String>> = stmts.iter().map(stmt_text).collect();
    listed
        .is_some_and(|l| implied_nfproto_dropped(&l.join(" ")) == implied_nfproto_dropped(&written))
}

fn implied_nfproto_dropped(text: &str) -> String {
    text.replace("meta nfproto ipv4 ip ", "ip ")
        .replace("meta nfproto ipv6 ip6 ", "ip6 ")
}

/// One statement of a listed rule in nft's language, as portfwd writes it (None: a statement
/// portfwd never writes).
fn stmt_text(stmt: &Value) -> Option<String> {
    let obj = stmt.as_object()?;
    let (key, v) = obj.iter().next().filter(|_| obj.len() == 1)?;
    Some(match key.as_str() {
        "match" => {
            let left = expr_text(v.get("left")?)?;
            let right = v.get("right")?;
            let iface = matches!(left.as_str(), "iifname" | "oifname");
            // Sources are written as the fewest CIDRs (`9.9.9.9/32`); nft lists a host bare
            // and merges adjacent networks (as a range when no prefix fits).
            let source = left.ends_with(" saddr");
            let right_text = |r: &Value| match r {
                Value::String(s) if iface => Some(format!("\"{s}\"")),
                _ if source => Some(set_text(&addrs_of(r)?)),
                _ => expr_text(r),
            };
            // A masked value is compared out loud: `ct status & dnat == 0`.
            let masked = v.get("left").is_some_and(|l| l.get("&").is_some());
            match text(v.get("op")) {
                "==" if masked => format!("{left} == {}", right_text(right)?),
                "==" | "in" => format!("{left} {}", right_text(right)?),
                "!=" => format!("{left} != {}", right_text(right)?),
                // `ct state & (established | related) == 0` lists as `ct state ! established,related`.
                "!" => {
                    let flags: Vec<String> = match right {
                        Value::Array(items) => {
                            items.iter().map(expr_text).collect::<Option<_>>()?
                        }
                        one => vec![expr_text(one)?],
                    };
                    match flags.as_slice() {
                        [one] => format!("{left} & {one} == 0"),
                        many => format!("{left} & ({}) == 0", many.join(" | ")),
                    }
                }
                _ => return None,
            }
        }
        "vmap" => format!(
            "{} vmap {}",
            expr_text(v.get("key")?)?,
            v.get("data")?.as_str()?
        ),
        "counter" => "counter".to_string(),
        "mangle" => format!(
            "{} set {}",
            expr_text(v.get("key")?)?,
            expr_text(v.get("value")?)?
        ),
        // A pool's draw and its anonymous map, entries in key order.
        "dnat"
            if v.get("addr")
                .and_then(|a| a.get("map"))
                .is_some_and(|m| m.get("data").is_some_and(Value::is_object)) =>
        {
            let family = v.get("family")?.as_str()?;
            let map = v.get("addr")?.get("map")?;
            let mut concat = false;
            let mut entries: Vec<(u64, String)> = map
                .get("data")?
                .get("set")?
                .as_array()?
                .iter()
                .map(|pair| match pair.as_array()?.as_slice() {
                    [k, d] => {
                        let first = match k.get("range") {
                            Some(r) => r.get(0)?.as_u64()?,
                            None => k.as_u64()?,
                        };
                        concat |= d.get("concat").is_some();
                        Some((first, format!("{} : {}", expr_text(k)?, expr_text(d)?)))
                    }
                    _ => None,
                })
                .collect::<Option<_>>()?;
            entries.sort_unstable_by_key(|e| e.0);
            let items: Vec<String> = entries.into_iter().map(|e| e.1).collect();
            if !only_family_and_map(v)? {
                return None;
            }
            format!(
                "dnat {family} {}to {} map {{ {} }}",
                if concat { "addr . port " } else { "" },
                expr_text(map.get("key")?)?,
                items.join(", ")
            )
        }
        "dnat" | "snat" if v.get("addr").is_some_and(|a| a.get("map").is_some()) => {
            let family = v.get("family")?.as_str()?;
            let map = v.get("addr")?.get("map")?;
            let lookup = format!(
                "{} map {}",
                expr_text(map.get("key")?)?,
                map.get("data")?.as_str()?
            );
            if !only_family_and_map(v)? {
                return None;
            }
            match key.as_str() {
                "dnat" => format!("dnat {family} addr . port to {lookup}"),
                _ => format!("snat {family} to {lookup}"),
            }
        }
        "dnat" | "snat" => {
            let family = v.get("family")?.as_str()?;
            let addr = v.get("addr")?.as_str()?;
            let to = match (v.get("port").and_then(Value::as_u64), family) {
                (Some(p), "ip6") => format!("[{addr}]:{p}"),
                (Some(p), _) => format!("{addr}:{p}"),
                (None, _) => addr.to_string(),
            };
            let extra = v
                .as_object()?
                .keys()
                .any(|k| !matches!(k.as_str(), "family" | "addr" | "port"));
            if extra {
                return None;
            }
            format!("{key} {family} to {to}")
        }
        "redirect" => {
            let port = v.get("port")?.as_u64()?;
            if v.as_object()?.len() != 1 {
                return None;
            }
            format!("redirect to :{port}")
        }
        "masquerade" | "drop" if v.is_null() => key.clone(),
        _ => return None,
    })
}

/// Does a map-fed NAT statement say nothing but its family and its map? nft 0.9.8 also says
/// the data is concatenated (`type_flags`); 1.0.6 does not.
fn only_family_and_map(v: &Value) -> Option<bool> {
    Some(!v.as_object()?.iter().any(|(k, val)| {
        !matches!(
            (k.as_str(), val.as_str()),
            ("family" | "addr", _) | ("type_flags", Some("concat"))
        )
    }))
}

/// An expression in nft's language (the subset portfwd writes).
fn expr_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            let (key, inner) = o.iter().next().filter(|_| o.len() == 1)?;
            match key.as_str() {
                "payload" => format!(
                    "{} {}",
                    inner.get("protocol")?.as_str()?,
                    inner.get("field")?.as_str()?
                ),
                "meta" => match inner.get("key")?.as_str()? {
                    k @ ("iifname" | "oifname") => k.to_string(),
                    k => format!("meta {k}"),
                },
                "fib" => {
                    let flags = inner.get("flags")?.as_array()?;
                    let flags: Vec<&str> =
                        flags.iter().map(Value::as_str).collect::<Option<_>>()?;
                    format!(
                        "fib {} {}",
                        flags.join(" . "),
                        inner.get("result")?.as_str()?
                    )
                }
                "ct" => {
                    let mut words = vec!["ct".to_string()];
                    if let Some(dir) = inner.get("dir") {
                        words.push(dir.as_str()?.to_string());
                    }
                    if let Some(family) = inner.get("family") {
                        words.push(family.as_str()?.to_string());
                    }
                    words.push(inner.get("key")?.as_str()?.to_string());
                    words.join(" ")
                }
                "concat" => inner
                    .as_array()?
                    .iter()
                    .map(expr_text)
                    .collect::<Option<Vec<_>>>()?
                    .join(" . "),
                // In text order, as portfwd writes a set: nft lists an anonymous set in its
                // hash order.
                "set" => {
                    let mut items = inner
                        .as_array()?
                        .iter()
                        .map(expr_text)
                        .collect::<Option<Vec<_>>>()?;
                    items.sort_unstable();
                    set_text(&items)
                }
                "numgen" => {
                    if inner.get("offset").and_then(Value::as_u64).unwrap_or(0) != 0 {
                        return None;
                    }
                    format!(
                        "numgen {} mod {}",
                        inner.get("mode")?.as_str()?,
                        inner.get("mod")?.as_u64()?
                    )
                }
                "jhash" => {
                    if inner.get("offset").is_some() {
                        return None;
                    }
                    let seed = match inner.get("seed") {
                        Some(s) => format!(" seed {:#x}", s.as_u64()?),
                        None => String::new(),
                    };
                    format!(
                        "jhash {} mod {}{seed}",
                        expr_text(inner.get("expr")?)?,
                        inner.get("mod")?.as_u64()?
                    )
                }
                "prefix" => format!(
                    "{}/{}",
                    inner.get("addr")?.as_str()?,
                    inner.get("len")?.as_u64()?
                ),
                "range" => match inner.as_array()?.as_slice() {
                    [a, b] => format!("{}-{}", expr_text(a)?, expr_text(b)?),
                    _ => return None,
                },
                // `ct mark | 0x00002000`: the mark bit as portfwd writes it; `established |
                // related`: flags, as nft 0.9.8 lists them in `ct state & (...) == 0`.
                "|" => match inner.as_array()?.as_slice() {
                    [a, Value::Number(n)] => format!("{} | {:#010x}", expr_text(a)?, n.as_u64()?),
                    flags => flags
                        .iter()
                        .map(|f| f.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()?
                        .join(" | "),
                },
                // nft 0.9.8 lists `ct state & (established | related) == 0` as this `&`
                // (1.0 as a `!` match).
                "&" => match inner.as_array()?.as_slice() {
                    [a, b @ Value::Object(_)] => format!("{} & ({})", expr_text(a)?, expr_text(b)?),
                    [a, b] => format!("{} & {}", expr_text(a)?, expr_text(b)?),
                    _ => return None,
                },
                _ => return None,
            }
        }
        _ => return None,
    })
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

    /// nft 1.0 lists the route_localnet guard's flag tests as `!` matches, nft 0.9.8 (Debian
    /// 11) as masked `==` comparisons; both read back as the guard portfwd writes.
    #[test]
    fn the_guard_reads_back_from_both_nft_spellings() {
        let written = "ct state & (established | related) == 0 ct status & dnat == 0";
        let v1 = r#"[{"match": {"op": "!", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}}]"#;
        let v098 = r#"[{"match": {"op": "==", "left": {"&": [{"ct": {"key": "state"}}, {"|": ["established", "related"]}]}, "right": 0}},
            {"match": {"op": "==", "left": {"&": [{"ct": {"key": "status"}}, "dnat"]}, "right": 0}}]"#;
        for listing in [v1, v098] {
            let stmts: Vec<Value> = serde_json::from_str(listing).expect("json");
            let text: Vec<String> = stmts.iter().map(|s| stmt_text(s).expect("known")).collect();
            assert_eq!(text.join(" "), written, "{listing}");
        }
    }

    #[test]
    fn no_table_is_an_empty_observation() {
        let observed = parse("").expect("parses");
        assert!(!observed.exists && observed.table.is_empty());
    }
}
