//! Compiles forwards and masquerade entries into the instance's table: a plain forward into
//! elements of the DNAT, mark and SNAT maps; any other into one chain per stage holding its
//! one rule, and map elements that jump there; the rules of the maps in use; masquerade rules
//! in `postrouting`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::table::{
    with_prefix, Base, Body, Data, Element, MapKind, MasqMark, MasqRule, NatRule, NatTo, Rule,
    SnatMatch, SnatRule, Stage, Table, Target,
};
use crate::model::{Action, Config, Forward, Proto, Snat, State};
use crate::ownership::{
    entry_comment, entry_prefix, parse_comment, StableHash, Tag, KIND_FLOW, KIND_FORWARD,
    KIND_MASQUERADE,
};

/// The chain of a forward at a stage (`pre-web`, `out-web`, `post-web`).
pub(crate) fn entry_chain(stage: Stage, name: &str) -> String {
    let prefix = match stage {
        Stage::Pre => "pre",
        Stage::Out => "out",
        Stage::Post => "post",
    };
    format!("{prefix}-{name}")
}

/// The comment of an object: its owner and a hash of where it is and what it says.
fn comment(instance: &str, tag: Tag, place: &str, text: &str) -> String {
    let hash = StableHash::new()
        .part(place.as_bytes())
        .part(text.as_bytes())
        .finish();
    entry_comment(instance, tag, hash)
}

struct Builder<'a> {
    instance: &'a str,
    table: Table,
    kinds: BTreeSet<MapKind>,
    /// The mark each mark set's rule sets.
    marks: BTreeMap<MapKind, u32>,
    /// Each map kind's name, made once.
    names: BTreeMap<MapKind, String>,
    /// An element's text, for its comment's hash: one buffer for all of them.
    scratch: String,
}

impl Builder<'_> {
    fn rule(&mut self, chain: &str, tag: Tag, body: Body) {
        let text = body.render().unwrap_or_default();
        let comment = comment(self.instance, tag, chain, &text);
        Arc::make_mut(&mut self.table.chains)
            .entry(chain.to_string())
            .or_default()
            .push(Rule { comment, body });
    }

    fn element(&mut self, kind: MapKind, tag: Tag, element: Element) {
        use std::fmt::Write as _;
        let text = &mut self.scratch;
        text.clear();
        element.write_key(text);
        let _ = match &element.target {
            Target::Jump(chain) => write!(text, " {chain}"),
            Target::To(addr, port) => write!(text, " {addr} {port}"),
            Target::Source(addr) => write!(text, " {addr}"),
            Target::Member => Ok(()),
        };
        let name = self.names.entry(kind).or_insert_with(|| kind.name());
        let comment = comment(self.instance, tag, name, text);
        self.kinds.insert(kind);
        let maps = Arc::make_mut(&mut self.table.maps);
        let elements = match maps.get_mut(name.as_str()) {
            Some(elements) => elements,
            None => maps.entry(name.clone()).or_default(),
        };
        elements.insert(comment, element);
    }

    /// A plain forward's elements: DNAT (and mark) per stage and protocol, SNAT by original
    /// port and backend.
    fn plain(&mut self, f: &Forward, addr: IpAddr, port: u16, mark: Option<u32>) {
        let tag = Tag {
            kind: KIND_FORWARD,
            name: &f.name,
            reset: f.reset_connections,
        };
        let element = |proto: Option<Proto>, backend, target| Element {
            addr: None,
            proto,
            ports: f.listen_port,
            backend,
            target,
        };
        let stages: &[Stage] = if f.local {
            &[Stage::Pre, Stage::Out]
        } else {
            &[Stage::Pre]
        };
        for &stage in stages {
            for &proto in &f.protos {
                let nat = MapKind::flat(stage, f.family, None, Data::Nat);
                self.element(nat, tag, element(Some(proto), None, Target::To(addr, port)));
                if let Some(mark) = mark {
                    let kind = MapKind::flat(stage, f.family, None, Data::Mark);
                    self.marks.insert(kind, mark);
                    self.element(kind, tag, element(Some(proto), None, Target::Member));
                }
            }
        }
        let Action::Dnat { snat, .. } = f.action else {
            return;
        };
        let (data, target) = match snat {
            Snat::None => return,
            Snat::Masquerade => (Data::Masq, Target::Member),
            Snat::To(ip) => (Data::Snat, Target::Source(ip)),
        };
        let tag = Tag {
            reset: false,
            ..tag
        };
        for &proto in &f.protos {
            let kind = MapKind::flat(Stage::Post, f.family, Some(proto), data);
            self.element(kind, tag, element(None, Some((addr, port)), target.clone()));
        }
    }

    fn forward(&mut self, f: &Forward, mark: u32, localnet_dev: Option<&String>) {
        let tag = Tag {
            kind: KIND_FORWARD,
            name: &f.name,
            reset: f.reset_connections,
        };
        let mark = (f.allow_forward && f.needs_forwarding()).then_some(mark);
        if let Some((addr, port)) = plain(f) {
            self.plain(f, addr, port, mark);
            self.guard(f, tag, localnet_dev);
            return;
        }
        let to = match &f.action {
            Action::Dnat { addr, port, .. } => NatTo::Dnat {
                addr: *addr,
                port: *port,
            },
            Action::Pool { pool, .. } => NatTo::Pool(pool.clone()),
            Action::Redirect { port } => NatTo::Redirect { port: *port },
        };
        let nat = |in_interface: Option<String>| NatRule {
            family: f.family,
            sources: f.sources.clone(),
            in_interface,
            protos: f.protos.clone(),
            mark,
            to: to.clone(),
        };
        let stages: &[Stage] = if f.local {
            &[Stage::Pre, Stage::Out]
        } else {
            &[Stage::Pre]
        };
        for &stage in stages {
            let chain = entry_chain(stage, &f.name);
            let iif = (stage == Stage::Pre)
                .then(|| f.in_interface.clone())
                .flatten();
            self.rule(&chain, tag, Body::Nat(nat(iif)));
            let kind = MapKind {
                stage,
                by_addr: f.listen_address.is_some(),
                family: f.family,
                proto: None,
                ranged: !f.listen_port.is_single(),
                data: Data::Verdict,
            };
            for &proto in &f.protos {
                let element = Element {
                    addr: f.listen_address,
                    proto: Some(proto),
                    ports: f.listen_port,
                    backend: None,
                    target: Target::Jump(chain.clone()),
                };
                self.element(kind, tag, element);
            }
        }
        self.guard(f, tag, localnet_dev);
        let Some(snat) = f.action.snat() else {
            return;
        };
        let to: Option<IpAddr> = match snat {
            Snat::None => return,
            Snat::Masquerade => None,
            Snat::To(ip) => Some(ip),
        };
        // Only this forward's DNATed flow: found by its original destination, then checked
        // for its backend, never `saddr backend` or plain traffic to the backend.
        let chain = entry_chain(Stage::Post, &f.name);
        let tag = Tag {
            reset: false,
            ..tag
        };
        let body = Body::Snat(SnatRule {
            family: f.family,
            backends: SnatMatch::of(&f.action.backends(), f.listen_port),
            to,
        });
        self.rule(&chain, tag, body);
        for &proto in &f.protos {
            let kind = MapKind {
                stage: Stage::Post,
                by_addr: f.listen_address.is_some(),
                family: f.family,
                proto: Some(proto),
                ranged: !f.listen_port.is_single(),
                data: Data::Verdict,
            };
            let element = Element {
                addr: f.listen_address,
                proto: None,
                ports: f.listen_port,
                backend: None,
                target: Target::Jump(chain.clone()),
            };
            self.element(kind, tag, element);
        }
    }

    /// The route_localnet guard of a forward to loopback.
    fn guard(&mut self, f: &Forward, tag: Tag, localnet_dev: Option<&String>) {
        if let (Some(dev), Action::Dnat { .. }) = (localnet_dev, &f.action) {
            let body = Body::LocalnetGuard {
                in_interface: dev.clone(),
            };
            self.rule(Base::Input.name(), tag, body);
        }
    }
}

/// The backend of a plain forward (None: the forward needs a chain of its own): one listen
/// port on any local address, for every client on every interface, to one address and port.
fn plain(f: &Forward) -> Option<(IpAddr, u16)> {
    let Action::Dnat {
        addr,
        port: Some(port),
        ..
    } = f.action
    else {
        return None;
    };
    let plain = f.listen_port.is_single()
        && f.listen_address.is_none()
        && f.sources.is_empty()
        && f.in_interface.is_none();
    plain.then_some((addr, port))
}

/// The table of the config's forwards and masquerade entries; empty for `state: absent` and
/// for a config without entries (the table is then deleted).
pub(crate) fn compile_table(config: &Config) -> Table {
    if config.state == State::Absent {
        return Table::default();
    }
    let mut b = Builder {
        instance: &config.instance,
        table: Table::default(),
        kinds: BTreeSet::new(),
        marks: BTreeMap::new(),
        names: BTreeMap::new(),
        scratch: String::new(),
    };
    let localnet = config.localnet_devices();
    for f in &config.forwards {
        b.forward(f, config.conn_mark, localnet.get(&f.name));
    }
    finish(b, config)
}

/// What `config` compiles to, from `base`: the table of a config that differs from it only in
/// the forwards named `changed`. The other forwards' elements and chains are taken from
/// `base` as they are (compiling 50,000 forwards again cost a change of one of them a fifth
/// of its time); the changed ones are compiled, the lookup rules made again.
pub(crate) fn recompile_table(base: &Table, config: &Config, changed: &BTreeSet<String>) -> Table {
    if config.state == State::Absent || base.is_empty() {
        return compile_table(config);
    }
    let instance = &config.instance;
    let theirs = |comment: &str| {
        parse_comment(comment, instance)
            .is_some_and(|t| t.kind == KIND_FORWARD && changed.contains(t.name))
    };
    let mut maps = BTreeMap::new();
    let mut kinds = BTreeSet::new();
    let mut marks = BTreeMap::new();
    let prefixes: Vec<String> = changed
        .iter()
        .map(|name| entry_prefix(instance, KIND_FORWARD, name))
        .collect();
    for (name, elements) in base.maps.iter() {
        let Some(kind) = MapKind::from_name(name) else {
            continue;
        };
        // A copy without the changed forwards' elements, found by their comments' prefix.
        let mut kept = elements.clone();
        for prefix in &prefixes {
            let doomed: Vec<String> = with_prefix(&kept, prefix)
                .map(|(comment, _)| comment)
                .filter(|comment| theirs(comment))
                .cloned()
                .collect();
            for comment in &doomed {
                kept.remove(comment);
            }
        }
        if !kept.is_empty() {
            kinds.insert(kind);
            if kind.data == Data::Mark {
                marks.insert(kind, config.conn_mark);
            }
            maps.insert(name.clone(), kept);
        }
    }
    // Forwards' own chains and guards; base chains' lookup and masquerade rules are made
    // again by `finish`.
    let mut chains = BTreeMap::new();
    for (name, rules) in base.chains.iter() {
        let kept: Vec<Rule> = match Base::from_name(name) {
            Some(Base::Input) => rules
                .iter()
                .filter(|r| matches!(r.body, Body::LocalnetGuard { .. }) && !theirs(&r.comment))
                .cloned()
                .collect(),
            Some(_) => continue,
            None if rules.iter().any(|r| theirs(&r.comment)) => continue,
            None => rules.clone(),
        };
        if !kept.is_empty() {
            chains.insert(name.clone(), kept);
        }
    }
    let mut b = Builder {
        instance,
        table: Table {
            maps: Arc::new(maps),
            chains: Arc::new(chains),
        },
        kinds,
        marks,
        names: BTreeMap::new(),
        scratch: String::new(),
    };
    let localnet = config.localnet_devices();
    for f in config.forwards.iter().filter(|f| changed.contains(&f.name)) {
        b.forward(f, config.conn_mark, localnet.get(&f.name));
    }
    finish(b, config)
}

/// The guards in order, the lookup rules of the maps in use and the masquerade entries.
fn finish(mut b: Builder, config: &Config) -> Table {
    // The guards in forward-name order, as `show` lists the forwards: applying its output
    // writes the same chain.
    if let Some(guards) = Arc::make_mut(&mut b.table.chains).get_mut(Base::Input.name()) {
        let name = |r: &Rule| {
            crate::ownership::parse_comment(&r.comment, &config.instance)
                .map(|t| t.name.to_string())
        };
        guards.sort_by_cached_key(name);
    }
    // The dispatch rules go first in their base chains, in a fixed order.
    let mut kinds: Vec<MapKind> = b.kinds.iter().copied().collect();
    kinds.sort_by_key(|k| (k.base(), k.rank()));
    let mut dispatch: Vec<(Base, Rule)> = Vec::new();
    for kind in kinds {
        let name = kind.name();
        let tag = Tag {
            kind: KIND_FLOW,
            name: &name,
            reset: false,
        };
        let body = match b.marks.get(&kind) {
            Some(&mark) => Body::Mark(kind, mark),
            None => Body::Dispatch(kind),
        };
        let text = body.render().unwrap_or_default();
        let comment = comment(&config.instance, tag, kind.base().name(), &text);
        dispatch.push((kind.base(), Rule { comment, body }));
    }
    for (base, rule) in dispatch.into_iter().rev() {
        Arc::make_mut(&mut b.table.chains)
            .entry(base.name().to_string())
            .or_default()
            .insert(0, rule);
    }
    for m in &config.masquerades {
        let tag = Tag {
            kind: KIND_MASQUERADE,
            name: &m.name,
            reset: false,
        };
        let body = Body::Masquerade(MasqRule {
            source: m.source,
            out_interface: m.out_interface.clone(),
            to: m.to_source,
        });
        b.rule(Base::Postrouting.name(), tag, body);
        if m.allow_forward {
            let body = Body::MasqMark(MasqMark {
                source: m.source,
                out_interface: m.out_interface.clone(),
                mark: config.conn_mark,
            });
            b.rule(Base::Forward.name(), tag, body);
        }
    }
    b.table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nftables::table::table_name;

    fn script(json: &str) -> String {
        let (config, _, _) = Config::from_json(json).expect("valid params");
        compile_table(&config).script(&table_name(&config.instance))
    }

    /// The guards come in forward-name order whatever the params order, so applying `show`'s
    /// output (forwards by name) writes the same table.
    #[test]
    fn guards_do_not_depend_on_the_order_of_the_params() {
        let table = |order: [&str; 2]| {
            let forwards: Vec<String> = order
                .iter()
                .map(|n| format!(r#"{{"name":"{n}","listen_port":{},"to":"127.0.0.1:22","in_interface":"eth-{n}"}}"#, if *n == "b" { 1 } else { 2 }))
                .collect();
            let json = format!(
                r#"{{"backend":"nftables","forwards":[{}]}}"#,
                forwards.join(",")
            );
            let (config, _, _) = Config::from_json(&json).expect("valid params");
            compile_table(&config)
        };
        let (ab, ba) = (table(["a", "b"]), table(["b", "a"]));
        assert_eq!(ab.chains.get("input").map(Vec::len), Some(2));
        assert_eq!(ab.chains.get("input"), ba.chains.get("input"));
    }

    #[test]
    fn cross_host_dnat_with_masquerade() {
        insta::assert_snapshot!(script(
            r#"{"backend":"nftables","forwards":[{"name":"web","listen_port":4321,"to":"172.100.102.101:1234"}]}"#
        ));
    }

    #[test]
    fn every_kind_of_entry() {
        insta::assert_snapshot!(script(
            r#"{"backend":"nftables","instance":"gw","forwards":[
                {"name":"db","proto":"both","listen_address":"1.2.3.4","listen_port":"81-90",
                 "in_interface":"eth+","sources":["6.7.8.0/24","9.9.9.9"],"to":"192.168.0.2","snat":"192.168.0.1","local":true},
                {"name":"r","listen_port":2222,"redirect_to_port":22},
                {"name":"v6","listen_port":80,"to":"[fd00:2::2]:8080","snat":"none","allow_forward":false,"reset_connections":true}],
               "masquerade":[{"name":"lan","source":"192.168.0.0/24","out_interface":"eth0"}]}"#
        ));
    }

    /// Recompiled from another config's table, a config's table is what compiling it gives:
    /// forwards added, removed and changed (plain, chained, guarded, local), masquerade kept.
    #[test]
    fn a_recompiled_table_is_the_compiled_one() {
        let base = r#"{"backend":"nftables","instance":"gw","masquerade":[{"name":"lan","source":"192.168.0.0/24"}],"forwards":[
            {"name":"a","listen_port":1,"to":"10.0.0.1:80"},
            {"name":"b","listen_port":2,"to":"10.0.0.2:80","sources":["10.1.0.0/16"]},
            {"name":"c","proto":"udp","listen_port":3,"to":"[fd00::3]:53","local":true},
            {"name":"d","listen_port":4,"to":"127.0.0.1:22","in_interface":"eth0"}]}"#;
        let edits = [
            (
                "a",
                r#"{"name":"a","listen_port":1,"to":"10.0.0.9:80","snat":"10.0.0.254"}"#,
            ),
            ("b", r#"{"name":"b","listen_port":2,"to":"10.0.0.2:80"}"#),
            (
                "c",
                r#"{"name":"c","proto":"both","listen_port":3,"to":"[fd00::3]:53"}"#,
            ),
            (
                "d",
                r#"{"name":"d","listen_port":4,"to":"127.0.0.1:23","in_interface":"eth1"}"#,
            ),
            ("e", r#"{"name":"e","listen_port":"5-6","to":"10.0.0.5"}"#),
        ];
        let parse = |json: &str| Config::from_json(json).expect("valid params").0;
        let from = parse(base);
        let table = compile_table(&from);
        for (name, edit) in edits {
            let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
            let list = v["forwards"].as_array_mut().unwrap();
            list.retain(|f| f["name"] != name);
            list.push(serde_json::from_str(edit).unwrap());
            let to = parse(&v.to_string());
            let changed: BTreeSet<String> = [name.to_string()].into();
            assert_eq!(
                recompile_table(&table, &to, &changed),
                compile_table(&to),
                "{edit}"
            );
            assert_eq!(
                recompile_table(&compile_table(&to), &from, &changed),
                table,
                "{edit} back"
            );
        }
        // Every forward removed: the masquerade entry is all that is left.
        let none = parse(
            r#"{"backend":"nftables","instance":"gw","masquerade":[{"name":"lan","source":"192.168.0.0/24"}]}"#,
        );
        let all: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        assert_eq!(recompile_table(&table, &none, &all), compile_table(&none));
    }

    #[test]
    fn absent_and_empty_compile_to_no_table() {
        let (config, _, _) =
            Config::from_json(r#"{"backend":"nftables","state":"absent"}"#).expect("valid params");
        assert!(compile_table(&config).is_empty());
    }

    #[test]
    fn a_changed_forward_changes_only_its_own_objects() {
        let table = |to: &str| {
            let json = format!(
                r#"{{"backend":"nftables","forwards":[{{"name":"a","listen_port":1,"to":"10.0.0.1:80"}},{{"name":"b","listen_port":2,"to":"{to}"}}]}}"#
            );
            let (config, _, _) = Config::from_json(&json).expect("valid params");
            compile_table(&config)
        };
        let objects = |t: &Table| -> BTreeSet<String> {
            let elements = t.maps.iter().flat_map(|(m, e)| {
                e.iter()
                    .map(move |(c, e)| format!("{m} {c} {} {:?}", e.key(), e.target))
            });
            let rules = t.chains.iter().flat_map(|(name, rules)| {
                rules
                    .iter()
                    .map(move |r| format!("{name} {} {:?}", r.comment, r.body))
            });
            elements.chain(rules).collect()
        };
        let (one, two) = (
            objects(&table("10.0.0.2:80")),
            objects(&table("10.0.0.3:80")),
        );
        let changed: Vec<&String> = one.symmetric_difference(&two).collect();
        // b's DNAT and SNAT elements, each one way and the other; nothing of a's, no rule.
        assert_eq!(changed.len(), 4, "{changed:#?}");
        assert!(
            changed.iter().all(|o| o.contains(":fwd:b:")),
            "{changed:#?}"
        );
    }

    /// Forwards that a map element cannot say keep a chain of their own: sources, an
    /// interface, a listen address or range, a redirect, a backend without a port.
    #[test]
    fn only_plain_forwards_are_map_elements() {
        let chained = [
            r#""listen_port":1,"to":"10.0.0.1:80","sources":["10.1.0.0/16"]"#,
            r#""listen_port":1,"to":"10.0.0.1:80","in_interface":"eth0""#,
            r#""listen_port":1,"to":"10.0.0.1:80","listen_address":"10.9.0.1""#,
            r#""listen_port":"1-2","to":"10.0.0.1""#,
            r#""listen_port":1,"redirect_to_port":22"#,
            r#""listen_port":1,"to":"10.0.0.1""#,
        ];
        for (i, forward) in chained
            .iter()
            .chain([&r#""listen_port":1,"to":"10.0.0.1:80""#])
            .enumerate()
        {
            let json = format!(r#"{{"backend":"nftables","forwards":[{{"name":"a",{forward}}}]}}"#);
            let (config, _, _) = Config::from_json(&json).expect("valid params");
            let table = compile_table(&config);
            let plain = i == chained.len();
            assert_eq!(table.chains.contains_key("pre-a"), !plain, "{forward}");
            assert_eq!(table.maps.contains_key("pre-port4-nat"), plain, "{forward}");
        }
    }
}
