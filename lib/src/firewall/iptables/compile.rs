//! Compiles forwards and masquerade entries into the exact iptables rules of the instance's
//! chains: NAT dispatch by port bucket, SNAT of the forwarded flow only, and the FORWARD
//! chain's shared flow rules around the per-forward accepts.
//!
//! Every rule carries its owner's comment (see [`crate::ownership`]). The hash in it covers the
//! chain and the whole rule, so the comment alone identifies a rule: the diff never has to
//! guess how iptables canonicalises what we wrote, and an edited entry gets new keys.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::rules::{subchain_name, Hook, Jump, OwnedChain, OwnedRules, Rule, BUCKET_PORTS};
use crate::model::{
    Action, Balance, Config, Forward, Masquerade, Pool, PoolMember, Proto, Snat, State,
};
use crate::net::Family;
use crate::ownership::{
    jump_comment, parse_comment, weighted_comment, StableHash, Tag, FLOW_DISPATCH,
    FLOW_ESTABLISHED, FLOW_MARKED, FLOW_NOT_DNAT, KIND_FLOW, KIND_FORWARD, KIND_MASQUERADE,
};

/// The FORWARD chain's order: `flow:established` first (every later packet of a marked flow
/// stops there), then the masquerade accepts, `flow:not-dnat` (everything else that was not
/// DNATed returns), the forwards' mark rules, and `flow:marked` (the new packet just marked).
fn order_forward_chain(instance: &str, chain: &mut OwnedChain) {
    let rank = |rule: &Rule| -> u8 {
        let tag = rule.comment().and_then(|c| parse_comment(c, instance));
        match tag.map(|t| (t.kind, t.name)) {
            Some((KIND_FLOW, FLOW_ESTABLISHED)) => 0,
            Some((KIND_MASQUERADE, _)) => 1,
            Some((KIND_FLOW, FLOW_NOT_DNAT)) => 2,
            Some((KIND_FLOW, FLOW_MARKED)) => 4,
            _ => 3,
        }
    };
    // Stable: entries keep their order within each group.
    chain.rules.sort_by_cached_key(|r| rank(r));
}

/// The rules of the config's forwards and masquerade entries. `state: absent` compiles to
/// nothing.
pub(crate) fn compile_rules(config: &Config) -> OwnedRules {
    compile_split(config, SPLIT_FORWARDS)
}

/// From this many forwards on, the second half of them is compiled on a thread of its own:
/// a no-op of 50,000 forwards spent most of its time compiling them on one core while the
/// other waited. Smaller configs compile faster than a thread starts.
const SPLIT_FORWARDS: usize = 8192;

/// [`compile_rules`], the forwards split in two halves from `split` forwards on.
fn compile_split(config: &Config, split: usize) -> OwnedRules {
    if config.state == State::Absent {
        return OwnedRules::default();
    }
    let mark = conn_mark(config);
    let mut builder = Builder::new(config, &mark, config.forwards.len());
    // Per packet, the filter table is walked for every packet of every flow: one rule at the
    // top accepts the established and related packets of flows a forward marked, so their cost
    // does not grow with the number of forwards. Only a flow's first packet walks the
    // per-forward rules, which mark it; the rule after them accepts it.
    let marking = marking(config);
    for &family in &marking {
        builder.push(
            family,
            Hook::Forward,
            KIND_FLOW,
            FLOW_ESTABLISHED,
            strings([
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-m",
                "connmark",
                "--mark",
                &mark,
            ]),
            strings(["-j", "ACCEPT"]),
        );
    }
    let forwards = config.forwards.as_slice();
    let (head, tail) = forwards.split_at(if forwards.len() >= split {
        forwards.len() / 2
    } else {
        forwards.len()
    });
    let other = std::thread::scope(|s| {
        let other = (!tail.is_empty()).then(|| {
            s.spawn(|| {
                let mut other = Builder::new(config, &mark, tail.len());
                tail.iter().for_each(|f| other.forward(f));
                other
            })
        });
        head.iter().for_each(|f| builder.forward(f));
        other.map(|o| o.join())
    });
    match other {
        Some(Ok(other)) => builder.append(other),
        // A thread that could not finish: its half is compiled here.
        Some(Err(_)) => tail.iter().for_each(|f| builder.forward(f)),
        None => {}
    }
    // Before the masquerade entries: in POSTROUTING the forwards' SNAT comes first.
    builder.dispatch();
    for &family in &marking {
        builder.push(
            family,
            Hook::Forward,
            KIND_FLOW,
            FLOW_MARKED,
            strings(["-m", "connmark", "--mark", &mark]),
            strings(["-j", "ACCEPT"]),
        );
        // Traffic that was not DNATed (routed, masqueraded) is none of the forwards': it
        // leaves after the masquerade accepts, never walking the per-forward rules.
        builder.push(
            family,
            Hook::Forward,
            KIND_FLOW,
            FLOW_NOT_DNAT,
            strings(["-m", "conntrack", "!", "--ctstate", "DNAT"]),
            strings(["-j", "RETURN"]),
        );
    }
    for masquerade in &config.masquerades {
        builder.masquerade(masquerade);
    }
    let mut chains = builder.chains;
    for family in marking {
        if let Some(chain) = chains.get_mut(&(family, Hook::Forward)) {
            order_forward_chain(&config.instance, chain);
        }
    }
    for (&(_, hook), chain) in chains.iter_mut() {
        chain.jumps.push(Jump {
            position: 1,
            rule: jump_rule(&config.instance, hook),
        });
    }
    OwnedRules {
        chains: Arc::new(chains),
    }
}

/// `BIT/BIT`: the conntrack mark of forwarded flows.
fn conn_mark(config: &Config) -> String {
    format!("{:#x}/{:#x}", config.conn_mark, config.conn_mark)
}

/// The families whose forwarded flows are marked (and accepted by the shared flow rules).
fn marking(config: &Config) -> BTreeSet<Family> {
    config
        .forwards
        .iter()
        .filter(|f| {
            f.allow_forward && matches!(f.action, Action::Dnat { .. } | Action::Pool { .. })
        })
        .map(|f| f.family)
        .collect()
}

/// What [`compile_rules`] gives for `config`, from `base`, the rules of a config that
/// differs from it only in the forwards `changed`: only those are compiled, and their rules
/// take their places among the others'. A change of one forward among 50,000 compiled all
/// of the earlier params again (a third of a second). Whatever the changed forwards alter
/// beyond their own rules in the port buckets' sub-chains (a bucket that appears or empties,
/// the families whose flows are marked, a `route_localnet` guard) is compiled whole.
pub(crate) fn recompile_rules(
    base: &OwnedRules,
    config: &Config,
    changed: &BTreeSet<String>,
) -> OwnedRules {
    recompiled(base, config, changed).unwrap_or_else(|| compile_rules(config))
}

fn recompiled(
    base: &OwnedRules,
    config: &Config,
    changed: &BTreeSet<String>,
) -> Option<OwnedRules> {
    if config.state == State::Absent || base.chains.is_empty() {
        return None;
    }
    let instance = config.instance.as_str();
    fn owner<'r>(rule: &'r Rule, instance: &str) -> Option<&'r str> {
        let tag = parse_comment(rule.comment()?, instance)?;
        (tag.kind == KIND_FORWARD).then_some(tag.name)
    }
    let is_changed = |rule: &Rule| owner(rule, instance).is_some_and(|name| changed.contains(name));
    // The families marked, read back from base's shared flow rules.
    let base_marking: BTreeSet<Family> = base
        .chains
        .iter()
        .filter(|((_, hook), chain)| {
            *hook == Hook::Forward
                && chain.rules.iter().any(|r| {
                    r.comment()
                        .and_then(|c| parse_comment(c, instance))
                        .is_some_and(|t| (t.kind, t.name) == (KIND_FLOW, FLOW_ESTABLISHED))
                })
        })
        .map(|((family, _), _)| *family)
        .collect();
    if marking(config) != base_marking {
        return None;
    }
    let mark = conn_mark(config);
    let mut part = Builder::new(config, &mark, changed.len());
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(config.forwards.len());
    for (i, forward) in config.forwards.iter().enumerate() {
        index.insert(forward.name.as_str(), i);
        if changed.contains(&forward.name) {
            part.forward(forward);
        }
    }
    let mut chains = BTreeMap::new();
    for (&key, chain) in base.chains.iter() {
        // Only the sub-chains hold forwards' rules, but for the guards of `route_localnet`.
        if chain.rules.iter().any(is_changed) {
            return None;
        }
        // A sub-chain without a changed forward's rule is base's own.
        let subchains = (chain.subchains.iter())
            .map(|(name, rules)| {
                let kept = if rules.iter().any(is_changed) {
                    Arc::new(rules.iter().filter(|r| !is_changed(r)).cloned().collect())
                } else {
                    Arc::clone(rules)
                };
                (name.clone(), kept)
            })
            .collect();
        let chain = OwnedChain {
            rules: chain.rules.clone(),
            jumps: chain.jumps.clone(),
            subchains,
        };
        chains.insert(key, chain);
    }
    for (key, new) in part.chains {
        if !new.rules.is_empty() {
            return None;
        }
        let chain = chains.get_mut(&key)?;
        for (name, rules) in new.subchains {
            let into = Arc::make_mut(chain.subchains.get_mut(&name)?);
            let at = |rule: &Rule| owner(rule, instance).and_then(|n| index.get(n).copied());
            // Kept in the order of their forwards, each rule goes after the ones before it.
            if !into.iter().all(|r| at(r).is_some()) {
                return None;
            }
            for rule in rules.iter().cloned() {
                let i = at(&rule)?;
                // After every rule of the forwards before it (and its own rules so far).
                let pos = into.partition_point(|r| at(r).is_some_and(|j| j <= i));
                into.insert(pos, rule);
            }
        }
    }
    for chain in chains.values_mut() {
        chain.subchains.retain(|_, rules| !rules.is_empty());
    }
    // The same sub-chains as base: the dispatch rules, and so the chains' own rules, are
    // base's.
    let same_buckets = chains.iter().all(|(key, chain)| {
        base.chains
            .get(key)
            .is_some_and(|b| b.subchains.keys().eq(chain.subchains.keys()))
    });
    same_buckets.then(|| OwnedRules {
        chains: Arc::new(chains),
    })
}

/// The jump from a built-in chain into the instance's chain.
pub(crate) fn jump_rule(instance: &str, hook: Hook) -> Rule {
    Rule::new([
        "-m".to_string(),
        "comment".to_string(),
        "--comment".to_string(),
        jump_comment(instance),
        "-j".to_string(),
        hook.chain(instance),
    ])
}

struct Builder<'a> {
    instance: &'a str,
    chains: BTreeMap<(Family, Hook), OwnedChain>,
    /// The chain a rule of (hook, bucket) goes to, named once (a name per rule was two
    /// allocations for each of 200,000 rules).
    names: HashMap<(Hook, Option<(Proto, u16)>), String>,
    seen: HashSet<(Family, String)>,
    /// Forward name → the interface portfwd sets route_localnet on for it.
    localnet_devices: BTreeMap<String, String>,
    /// `BIT/BIT`: the conntrack mark of forwarded flows.
    conn_mark: &'a str,
    /// The (protocol, bucket) sub-chains each nat chain dispatches to.
    buckets: BTreeMap<(Family, Hook), BTreeSet<(Proto, u16)>>,
}

impl<'a> Builder<'a> {
    /// A builder for about `forwards` forwards of `config`.
    fn new(config: &'a Config, conn_mark: &'a str, forwards: usize) -> Builder<'a> {
        Builder {
            instance: &config.instance,
            chains: BTreeMap::new(),
            names: HashMap::new(),
            // Sized once: a forward makes several rules (growing it cost a twentieth of a
            // compile).
            seen: HashSet::with_capacity(forwards * 4 + 16),
            localnet_devices: config.localnet_devices(),
            conn_mark,
            buckets: BTreeMap::new(),
        }
    }

    /// Appends what `other` built from the forwards after this one's. Its keys are not
    /// merged: every key it has names one of its own forwards, which no rule built after
    /// this (shared flow rules, masquerade entries) can have.
    fn append(&mut self, other: Builder<'_>) {
        for (key, chain) in other.chains {
            let into = self.chains.entry(key).or_default();
            into.rules.extend(chain.rules);
            for (name, rules) in chain.subchains {
                match into.subchains.entry(name) {
                    Entry::Occupied(mut e) => {
                        Arc::make_mut(e.get_mut()).extend(Arc::unwrap_or_clone(rules));
                    }
                    Entry::Vacant(e) => {
                        e.insert(rules);
                    }
                }
            }
        }
        for (key, buckets) in other.buckets {
            self.buckets.entry(key).or_default().extend(buckets);
        }
    }

    /// Appends a rule, adding the comment key before the target.
    fn push(
        &mut self,
        family: Family,
        hook: Hook,
        kind: &str,
        name: &str,
        matches: Vec<Arg>,
        target: Vec<Arg>,
    ) {
        let owner = Tag {
            kind,
            name,
            reset: false,
        };
        self.place(family, hook, None, owner, None, &matches, &target);
    }

    /// Appends a rule to the hook's chain, or to its sub-chain for `bucket`; `weight` is a
    /// pool backend's, for its comment.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        family: Family,
        hook: Hook,
        bucket: Option<(Proto, u16)>,
        owner: Tag,
        weight: Option<u16>,
        matches: &[Arg],
        target: &[Arg],
    ) {
        let instance = self.instance;
        let chain_name = self
            .names
            .entry((hook, bucket))
            .or_insert_with(|| match bucket {
                Some((proto, b)) => subchain_name(&hook.chain(instance), proto, b),
                None => hook.chain(instance),
            });
        let hash = matches
            .iter()
            .chain(target)
            .fold(StableHash::new().part(chain_name.as_bytes()), |h, arg| {
                h.part(arg.as_bytes())
            });
        let key = weighted_comment(self.instance, owner, hash.finish(), weight);
        // Rendered from borrowed parts: owned copies of every argument cost compiling 50,000
        // forwards a fifth of its time.
        let comment = ["-m", "comment", "--comment", key.as_str()];
        let args = (matches.iter().map(|a| a.as_ref()))
            .chain(comment)
            .chain(target.iter().map(|a| a.as_ref()));
        let rule = Rule::new(args);
        // The key covers chain and rule, so it alone says whether the rule is already there
        // (in this family: an IPv4 and an IPv6 forward in one port bucket share the dispatch
        // rules' text, and each family needs its own).
        if !self.seen.insert((family, key)) {
            return;
        }
        let chain: &mut OwnedChain = self.chains.entry((family, hook)).or_default();
        match bucket {
            Some(b) => {
                match chain.subchains.get_mut(chain_name.as_str()) {
                    Some(rules) => Arc::make_mut(rules).push(rule),
                    None => {
                        chain
                            .subchains
                            .insert(chain_name.clone(), Arc::new(vec![rule]));
                    }
                }
                self.buckets.entry((family, hook)).or_default().insert(b);
            }
            None => chain.rules.push(rule),
        }
    }

    /// The dispatch rules of each nat chain with sub-chains: one per protocol and bucket, in
    /// port order, each jumping to its sub-chain.
    fn dispatch(&mut self) {
        for ((family, hook), buckets) in std::mem::take(&mut self.buckets) {
            for (proto, b) in buckets {
                let first = u32::from(b) * u32::from(BUCKET_PORTS);
                let last = first + u32::from(BUCKET_PORTS) - 1;
                let sub = subchain_name(&hook.chain(self.instance), proto, b);
                let ports = format!("{first}:{last}");
                // nat PREROUTING/OUTPUT see the listen port itself; POSTROUTING and FORWARD
                // the DNATed flow, whose original port conntrack keeps.
                let matches = match hook {
                    Hook::Prerouting | Hook::Output => port_match(proto, "--dport", &ports),
                    _ => strings([
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "DNAT",
                        "--ctproto",
                        proto.name(),
                        "--ctorigdstport",
                        &ports,
                    ]),
                };
                self.push(
                    family,
                    hook,
                    KIND_FLOW,
                    FLOW_DISPATCH,
                    matches,
                    strings(["-j", &sub]),
                );
            }
        }
    }

    fn forward(&mut self, f: &Forward) {
        // Each is (extra matches, target, a pool backend's weight): one for a single
        // backend or a redirect, one or more per backend for a pool.
        let targets: Vec<(Vec<Arg>, Vec<Arg>, Option<u16>)> = match &f.action {
            Action::Pool { pool, .. } => pool_rules(pool, &|b| recent_list(self.instance, f, b)),
            Action::Dnat { addr, port, .. } => vec![(Vec::new(), dnat_to(*addr, *port), None)],
            Action::Redirect { port } => {
                let mut t = strings(["-j", "REDIRECT", "--to-ports"]);
                t.push(port.to_string().into());
                vec![(Vec::new(), t, None)]
            }
        };
        // Written once for all of the forward's rules.
        let listen_port = f.listen_port.to_string();
        let listen_address = f.listen_address.map(|a| a.to_string());
        let sources: Vec<Option<String>> = if f.sources.is_empty() {
            vec![None]
        } else {
            f.sources.iter().map(|s| Some(s.to_string())).collect()
        };
        for &proto in &f.protos {
            for source in &sources {
                for hook in [Hook::Prerouting, Hook::Output] {
                    if hook == Hook::Output && !f.local {
                        continue;
                    }
                    // Sized for the longest: growing it was an allocation per match.
                    let mut m = Vec::with_capacity(16);
                    if let Some(s) = source {
                        m.extend(strings(["-s", s]));
                    }
                    if let Some(a) = &listen_address {
                        m.extend(strings(["-d", a]));
                    }
                    if let (Some(i), Hook::Prerouting) = (&f.in_interface, hook) {
                        m.extend(strings(["-i", i]));
                    }
                    m.extend(port_match(proto, "--dport", listen_port.as_str()));
                    if f.listen_address.is_none() {
                        // Only connections to this host: a router must not hijack transit traffic.
                        m.extend(strings(["-m", "addrtype", "--dst-type", "LOCAL"]));
                        if hook == Hook::Output {
                            // LOCAL includes loopback: never take local connections to a
                            // resolver on 127.0.0.53 and send them where the kernel cannot
                            // route them (a loopback listen_address must be named).
                            m.extend(strings(["!", "-d", loopback_net(f.family)]));
                        }
                    }
                    // Into the sub-chain of each bucket the listen ports touch: a new
                    // connection then visits the buckets and its bucket's rules only.
                    let owner = Tag {
                        kind: KIND_FORWARD,
                        name: &f.name,
                        reset: f.reset_connections,
                    };
                    let (first, last) = (
                        f.listen_port.first / BUCKET_PORTS,
                        f.listen_port.last / BUCKET_PORTS,
                    );
                    for bucket in first..=last {
                        for (extra, target, weight) in &targets {
                            let mut m = Cow::Borrowed(&m);
                            if !extra.is_empty() {
                                m.to_mut().extend(extra.iter().cloned());
                            }
                            let at = Some((proto, bucket));
                            self.place(f.family, hook, at, owner, *weight, &m, target);
                        }
                    }
                }
            }
            let Some(snat) = f.action.snat() else {
                continue;
            };
            if let Some(dev) = self.localnet_devices.get(&f.name).cloned() {
                // kube-proxy's guard: with route_localnet on, packets to 127.0.0.0/8 from
                // that interface reach local services; only DNATed ones may.
                self.push(
                    f.family,
                    Hook::Input,
                    KIND_FORWARD,
                    &f.name,
                    strings([
                        "-i",
                        &dev,
                        "-d",
                        "127.0.0.0/8",
                        "-m",
                        "conntrack",
                        "!",
                        "--ctstate",
                        "RELATED,ESTABLISHED,DNAT",
                    ]),
                    strings(["-j", "DROP"]),
                );
            }
            // Match only this forward's DNATed flow: never `-s backend`, never plain traffic to it.
            // The flow's original destination, so forwards that share a listen port and a
            // backend but differ in listen_address never share each other's SNAT or accepts.
            // A pool's drained backends keep theirs: their open connections continue.
            let backends: Vec<(String, String)> = (f.action.backends().into_iter())
                .map(|(addr, port)| (addr.to_string(), f.ports_at(port).to_string()))
                .collect();
            let flow = |backend, dir, port_flag| {
                dnated_flow(
                    backend,
                    dir,
                    port_flag,
                    proto,
                    &listen_address,
                    &listen_port,
                )
            };
            let snat_target = match snat {
                Snat::Masquerade => Some(strings(["-j", "MASQUERADE"])),
                Snat::To(ip) => Some(to_source(ip)),
                Snat::None => None,
            };
            // The SNAT and the FORWARD marks are dispatched by the flow's original port, like
            // the DNAT: a new connection never walks every forward in any chain.
            let buckets = f.listen_port.first / BUCKET_PORTS..=f.listen_port.last / BUCKET_PORTS;
            let owner = Tag {
                kind: KIND_FORWARD,
                name: &f.name,
                reset: false,
            };
            for bucket in buckets {
                let at = Some((proto, bucket));
                for backend in &backends {
                    if let Some(t) = &snat_target {
                        let m = flow(backend, "-d", "--dport");
                        self.place(f.family, Hook::Postrouting, at, owner, None, &m, t);
                    }
                    if f.allow_forward {
                        // Mark the flow (its first packet either way); `flow:marked` accepts
                        // the packet, `flow:established` every later one and the ICMP errors
                        // RELATED to it (fragmentation needed, port unreachable), so path-MTU
                        // discovery works behind policy DROP. Another tool's DNATed flows are
                        // never marked.
                        let set_mark = strings(["-j", "CONNMARK", "--set-xmark", self.conn_mark]);
                        for (dir, port_flag) in [("-d", "--dport"), ("-s", "--sport")] {
                            let m = flow(backend, dir, port_flag);
                            self.place(f.family, Hook::Forward, at, owner, None, &m, &set_mark);
                        }
                    }
                }
            }
        }
    }

    fn masquerade(&mut self, m: &Masquerade) {
        let family = m.family();
        let source = m.source.to_string();
        let mut matches = strings(["-s", &source]);
        if let Some(o) = &m.out_interface {
            matches.extend(strings(["-o", o]));
        }
        let target = match m.to_source {
            None => strings(["-j", "MASQUERADE"]),
            Some(ip) => to_source(ip),
        };
        self.push(
            family,
            Hook::Postrouting,
            KIND_MASQUERADE,
            &m.name,
            matches.clone(),
            target,
        );
        if m.allow_forward {
            self.push(
                family,
                Hook::Forward,
                KIND_MASQUERADE,
                &m.name,
                matches,
                strings(["-j", "ACCEPT"]),
            );
            let mut replies = strings(["-d", &source]);
            if let Some(o) = &m.out_interface {
                replies.extend(strings(["-i", o]));
            }
            replies.extend(strings([
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
            ]));
            self.push(
                family,
                Hook::Forward,
                KIND_MASQUERADE,
                &m.name,
                replies,
                strings(["-j", "ACCEPT"]),
            );
        }
    }
}

fn to_source(ip: IpAddr) -> Vec<Arg<'static>> {
    let mut t = strings(["-j", "SNAT", "--to-source"]);
    t.push(ip.to_string().into());
    t
}

/// The matches of one backend's DNATed flow of a forward: `dir` the backend's address
/// (`-d`/`-s`), the backend's ports by `port_flag`, and the flow's original destination.
fn dnated_flow<'a>(
    (addr, backend_ports): &'a (String, String),
    dir: &'static str,
    port_flag: &'static str,
    proto: Proto,
    listen_address: &'a Option<String>,
    listen_port: &'a str,
) -> Vec<Arg<'a>> {
    let mut m = Vec::with_capacity(18);
    m.extend(strings([dir, addr]));
    m.extend(port_match(proto, port_flag, backend_ports.as_str()));
    m.extend(strings(["-m", "conntrack", "--ctstate", "DNAT"]));
    if let Some(a) = listen_address {
        m.extend(strings(["--ctorigdst", a]));
    }
    m.extend(strings(["--ctorigdstport", listen_port]));
    m
}

/// `-j DNAT --to-destination` a backend (keeping the listen port without one).
fn dnat_to(addr: IpAddr, port: Option<u16>) -> Vec<Arg<'static>> {
    let dest = match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    };
    let mut t = strings(["-j", "DNAT", "--to-destination"]);
    t.push(dest.into());
    t
}

/// A pool's DNAT rules in the order a new connection meets them: each takes its share of
/// the connections that reach it, the last live backend's takes all that are left, and a
/// drained backend's (past it) none; every rule names its draw, so the pool reads back.
///
/// `random`: one rule per backend, `statistic --mode random` with probability weight / the
/// weights from it on. `round-robin`: [`crate::model::Pool::nth_cascade`]'s counters.
/// With `persistence`, each live backend's rule comes first that sends a client its
/// `recent` list (named by `list`) saw within that time, restarting the time; the draw
/// then records the client in the list of the backend it picked.
fn pool_rules(
    pool: &Pool,
    list: &dyn Fn(&PoolMember) -> String,
) -> Vec<(Vec<Arg<'static>>, Vec<Arg<'static>>, Option<u16>)> {
    let rule =
        |draw: Vec<Arg<'static>>, b: &PoolMember| (draw, dnat_to(b.addr, b.port), Some(b.weight));
    let mask = |b: &PoolMember| match b.addr {
        IpAddr::V4(_) => "255.255.255.255",
        IpAddr::V6(_) => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    };
    // Records the client in the picked backend's list.
    let remember = |mut draw: Vec<Arg<'static>>, b: &PoolMember| {
        if pool.persistence.is_some() {
            draw.extend(strings(["-m", "recent", "--set", "--name"]));
            draw.push(list(b).into());
            draw.extend(strings(["--mask", mask(b), "--rsource"]));
        }
        draw
    };
    let live = pool.backends.iter().filter(|b| b.weight > 0);
    let drained = pool.backends.iter().filter(|b| b.weight == 0);
    let mut rules = Vec::with_capacity(pool.backends.len() * 2);
    if let Some(seconds) = pool.persistence {
        for b in live.clone() {
            let mut m = strings(["-m", "recent", "--update", "--seconds"]);
            m.push(seconds.to_string().into());
            m.extend(strings(["--reap", "--name"]));
            m.push(list(b).into());
            m.extend(strings(["--mask", mask(b), "--rsource"]));
            rules.push((m, dnat_to(b.addr, b.port), None));
        }
    }
    match pool.balance {
        Balance::RoundRobin => {
            let nth = |every: u32, invert: bool| {
                let mut m = strings(["-m", "statistic", "--mode", "nth"]);
                if invert {
                    m.push("!".into());
                }
                m.extend(strings(["--every"]));
                m.push(every.to_string().into());
                m.extend(strings(["--packet", "0"]));
                m
            };
            for step in pool.nth_cascade() {
                let b = &pool.backends[step.backend];
                rules.push(rule(remember(nth(step.every, step.invert), b), b));
            }
            rules.extend(drained.map(|b| rule(nth(1, false), b)));
        }
        // Source hash is refused for this backend by the params' validation.
        Balance::Random | Balance::SourceHash => {
            let random = |probability: String| {
                let mut m = strings(["-m", "statistic", "--mode", "random", "--probability"]);
                m.push(probability.into());
                m
            };
            let mut rest = pool.total_weight();
            for b in live {
                let w = u32::from(b.weight);
                rules.push(rule(remember(random(probability(w, rest)), b), b));
                rest -= w;
            }
            rules.extend(drained.map(|b| rule(random(probability(0, 1)), b)));
        }
    }
    rules
}

/// The `recent` list of a persistent pool's backend: `PFWD-<instance>-<hash>`, the hash of
/// the forward's name and the backend, so a change of the weights keeps every client's
/// affinity (the kernel keeps a list while a rule names it).
fn recent_list(instance: &str, f: &Forward, b: &PoolMember) -> String {
    let backend = dnat_to(b.addr, b.port).concat();
    let hash = StableHash::new()
        .part(f.name.as_bytes())
        .part(backend.as_bytes())
        .finish();
    format!("PFWD-{instance}-{hash:08x}")
}

/// `part / whole` as `iptables-save` prints a random draw's probability: the kernel keeps
/// it in 31 bits, shown with 11 decimals (`0.33333333349`). Integer arithmetic rounding half
/// to even, as printf does, so what is written reads back as the same text.
fn probability(part: u32, whole: u32) -> String {
    const ONE: u128 = 1 << 31;
    let (part, whole) = (u128::from(part), u128::from(whole.max(1)));
    // The kernel's value: round(2^31 * part / whole).
    let stored = (2 * ONE * part + whole) / (2 * whole);
    let scaled = stored * 100_000_000_000;
    let (mut q, r) = (scaled / ONE, scaled % ONE);
    if 2 * r > ONE || (2 * r == ONE && q % 2 == 1) {
        q += 1;
    }
    format!("{}.{:011}", q / 100_000_000_000, q % 100_000_000_000)
}

fn loopback_net(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    }
}

/// One argument of a rule being compiled: most are words that live as long as the config
/// (one allocation per argument was a tenth of compiling 50,000 forwards).
type Arg<'a> = Cow<'a, str>;

fn port_match<'a>(proto: Proto, flag: &'a str, ports: impl Into<Arg<'a>>) -> Vec<Arg<'a>> {
    let mut m = strings(["-p", proto.name(), "-m", proto.name(), flag]);
    m.push(ports.into());
    m
}

fn strings<'a, const N: usize>(items: [&'a str; N]) -> Vec<Arg<'a>> {
    items.into_iter().map(Cow::Borrowed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The whole desired state: these tests also check the sysctls and warnings that come
    // with the rules.
    use crate::testing::compiled as desired;

    /// A random draw's probability is written as `iptables-save` prints what the kernel
    /// keeps (31 bits, `%.11f`, ties to even), so the rule reads back as written.
    #[test]
    fn a_probability_is_spelled_as_iptables_save_prints_it() {
        assert_eq!(probability(1, 3), "0.33333333349");
        assert_eq!(probability(1, 4), "0.25000000000");
        assert_eq!(probability(2, 2), "1.00000000000");
        assert_eq!(probability(0, 1), "0.00000000000");
        // 2^31 / 4096 is exact, and its 12th decimal a tie: printf rounds it to even.
        assert_eq!(probability(1, 4096), "0.00024414062");
        assert_eq!(probability(999, 1000), "0.99899999984");
    }

    /// The comment a compiled rule carries is the one a scan of its text finds (it is set
    /// when the rule is made, not scanned for).
    #[test]
    fn a_compiled_rules_comment_is_the_one_in_its_text() {
        let d = desired(include_str!("../nftables/testdata/params.json"));
        let mut count = 0;
        for chain in d.firewall.chains.values() {
            for rule in chain.all_rules() {
                let scanned = Rule::from_text(&rule.render());
                assert_eq!(rule.comment(), scanned.comment(), "{}", rule.render());
                assert!(rule.comment().is_some());
                count += 1;
            }
        }
        assert!(count > 10, "{count} rules");
    }

    #[test]
    fn cross_host_dnat_with_masquerade() {
        let d = desired(
            r#"{"forwards":[{"name":"web","listen_port":4321,"to":"172.100.102.101:1234"}]}"#,
        );
        insta::assert_snapshot!(d.firewall.listing("portfwd"));
        assert_eq!(
            d.sysctls.get("net/ipv4/ip_forward").map(String::as_str),
            Some("1")
        );
        assert!(d.warnings.is_empty());
    }

    #[test]
    fn redirect_needs_no_forwarding() {
        let d = desired(
            r#"{"forwards":[{"name":"r","listen_port":2222,"redirect_to_port":1111,"local":true}]}"#,
        );
        insta::assert_snapshot!(d.firewall.listing("portfwd"));
        assert!(d.sysctls.is_empty());
    }

    #[test]
    fn sources_interface_and_snat_none() {
        let d = desired(
            r#"{"instance":"gw","forwards":[{"name":"db","proto":"both","listen_address":"1.2.3.4","listen_port":81,
                "in_interface":"eth0","sources":["6.7.8.0/24","9.9.9.9"],"to":"192.168.0.2:8180","snat":"none"}]}"#,
        );
        insta::assert_snapshot!(d.firewall.listing("gw"));
        // The snat none reminder needs the host's addresses: a check, not compile's.
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn ipv6_masquerade_and_snat_to() {
        let d = desired(
            r#"{"ip_forward":true,"masquerade":[{"name":"vpn","source":"fd00:1::/64","out_interface":"eth0"},
               {"name":"lan","source":"192.168.0.0/24","to_source":"1.2.3.4","allow_forward":false}]}"#,
        );
        insta::assert_snapshot!(d.firewall.listing("portfwd"));
        assert_eq!(d.sysctls.len(), 2);
    }

    /// An IPv4 and an IPv6 forward in one port bucket: the dispatch rules read the same in
    /// both families, and each family's chain still needs its own (found by the nftables
    /// backend's migration test: the IPv6 forward was never reached).
    #[test]
    fn both_families_get_their_dispatch_rules() {
        let d = desired(
            r#"{"forwards":[{"name":"a","listen_port":4321,"to":"10.0.2.2:1234"},{"name":"b","listen_port":4321,"to":"[fd00:2::2]:1234"}]}"#,
        );
        for family in [Family::V4, Family::V6] {
            for hook in [Hook::Prerouting, Hook::Postrouting, Hook::Forward] {
                let chain = &d.firewall.chains[&(family, hook)];
                assert!(
                    chain.rules.iter().any(|r| r.render().contains("-T16")),
                    "{family:?} {hook:?}: {:?}",
                    chain.rules
                );
            }
        }
    }

    #[test]
    fn keys_change_with_the_rule_and_only_then() {
        let a = desired(r#"{"forwards":[{"name":"w","listen_port":1,"to":"1.2.3.4:80"}]}"#);
        let b = desired(r#"{"forwards":[{"name":"w","listen_port":1,"to":"1.2.3.4:80"}]}"#);
        let c = desired(r#"{"forwards":[{"name":"w","listen_port":1,"to":"1.2.3.5:80"}]}"#);
        let keys = |d: &crate::compile::Desired| {
            d.firewall
                .chains
                .values()
                .flat_map(|c| c.rules.iter().map(Rule::key))
                // The shared `flow:` rules serve every forward and never change with one.
                .filter(|k| k.contains(":fwd:"))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&a), keys(&b));
        assert!(keys(&a).iter().all(|k| !keys(&c).contains(k)));
    }

    /// Recompiled from another config's rules, a config's rules are what compiling it
    /// gives: forwards edited in their bucket, added to one, moved to a new one, removed
    /// (emptying a bucket), guarded by `route_localnet`, and the last forward of a family.
    /// The plain edits take the fast way.
    #[test]
    fn recompiled_rules_are_the_compiled_ones() {
        let base = r#"{"instance":"gw","masquerade":[{"name":"lan","source":"192.168.0.0/24"}],"forwards":[
            {"name":"a","listen_port":1,"to":"10.0.0.1:80"},
            {"name":"b","listen_port":2,"to":"10.0.0.2:80","sources":["10.1.0.0/16"]},
            {"name":"c","proto":"udp","listen_port":3,"to":"[fd00::3]:53","local":true},
            {"name":"d","listen_port":4,"to":"127.0.0.1:22","in_interface":"eth0"},
            {"name":"f","listen_port":5,"to":"10.0.0.6:80","snat":"none"},
            {"name":"g","listen_port":6000,"to":"10.0.0.7:80"}]}"#;
        let edits = [
            (
                "a",
                r#"{"name":"a","listen_port":1,"to":"10.0.0.9:80","snat":"10.0.0.254"}"#,
                true,
            ),
            (
                "b",
                r#"{"name":"b","listen_port":2,"to":"10.0.0.2:80"}"#,
                true,
            ),
            (
                "f",
                r#"{"name":"f","listen_port":7,"to":"10.0.0.6:81","allow_forward":false}"#,
                true,
            ),
            ("e", r#"{"name":"e","listen_port":8,"to":"10.0.0.5"}"#, true),
            (
                "e",
                r#"{"name":"e","listen_port":"250-260","to":"10.0.0.5"}"#,
                false,
            ),
            (
                "g",
                r#"{"name":"g","listen_port":6001,"to":"10.0.0.7:81"}"#,
                true,
            ),
            (
                "g",
                r#"{"name":"g","listen_port":9000,"to":"10.0.0.7:80"}"#,
                false,
            ),
            (
                "c",
                r#"{"name":"c","proto":"both","listen_port":3,"to":"[fd00::3]:53"}"#,
                false,
            ),
            (
                "d",
                r#"{"name":"d","listen_port":4,"to":"127.0.0.1:23","in_interface":"eth1"}"#,
                false,
            ),
        ];
        let parse = |json: &str| Config::from_json(json).expect("valid params").0;
        let from = parse(base);
        let rules = compile_rules(&from);
        for (name, edit, fast) in edits {
            let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
            let list = v["forwards"].as_array_mut().unwrap();
            match list.iter().position(|f| f["name"] == name) {
                Some(i) => list[i] = serde_json::from_str(edit).unwrap(),
                None => list.insert(2, serde_json::from_str(edit).unwrap()),
            }
            let to = parse(&v.to_string());
            let changed: BTreeSet<String> = [name.to_string()].into();
            assert_eq!(
                recompile_rules(&rules, &to, &changed),
                compile_rules(&to),
                "{edit}"
            );
            assert_eq!(recompiled(&rules, &to, &changed).is_some(), fast, "{edit}");
            // The sub-chains without the changed forward's rules are shared, not copied.
            let again = recompile_rules(&rules, &to, &changed);
            let prefix = format!("gw:fwd:{name}:");
            let mut shared = 0;
            for (key, chain) in rules.chains.iter() {
                for (sub, was) in &chain.subchains {
                    let now = again.chains.get(key).and_then(|c| c.subchains.get(sub));
                    let untouched = !was
                        .iter()
                        .chain(now.iter().flat_map(|r| r.iter()))
                        .any(|r| r.comment().is_some_and(|c| c.starts_with(&prefix)));
                    if fast && untouched {
                        assert!(now.is_some_and(|n| Arc::ptr_eq(n, was)), "{edit}: {sub}");
                        shared += 1;
                    }
                }
            }
            assert!(!fast || shared > 0, "{edit}");
            assert_eq!(
                recompile_rules(&compile_rules(&to), &from, &changed),
                rules,
                "{edit} back"
            );
        }
        // The only IPv6 forward removed: its family's flow rules go too.
        let no_v6 = parse(&base.replace(
            r#"{"name":"c","proto":"udp","listen_port":3,"to":"[fd00::3]:53","local":true},"#,
            "",
        ));
        let changed: BTreeSet<String> = ["c".to_string()].into();
        assert!(recompiled(&rules, &no_v6, &changed).is_none());
        assert_eq!(
            recompile_rules(&rules, &no_v6, &changed),
            compile_rules(&no_v6)
        );
    }

    /// Compiled in two halves, the rules are the same as in one: the sub-chains a bucket's
    /// forwards straddle, the `route_localnet` guards, the dispatch and the flow rules.
    #[test]
    fn rules_compiled_in_halves_are_the_rules_compiled_whole() {
        let mut forwards: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    r#"{{"name":"p{i}","listen_port":{},"to":"10.0.{i}.1:80"}}"#,
                    200 + i * 3
                )
            })
            .collect();
        forwards.insert(
            7,
            r#"{"name":"lo","listen_port":100,"to":"127.0.0.1:22","in_interface":"eth0"}"#.into(),
        );
        forwards.push(
            r#"{"name":"lo2","listen_port":101,"to":"127.0.0.1:23","in_interface":"eth1"}"#.into(),
        );
        forwards.push(r#"{"name":"v6","proto":"both","listen_port":"400-520","to":"[fd00::3]:53","local":true}"#.into());
        let json = format!(
            r#"{{"instance":"gw","masquerade":[{{"name":"lan","source":"192.168.0.0/24"}}],"forwards":[{}]}}"#,
            forwards.join(",")
        );
        for params in [
            json.as_str(),
            include_str!("../nftables/testdata/params.json"),
        ] {
            let config = Config::from_json(params).expect("valid params").0;
            let whole = compile_split(&config, usize::MAX);
            assert!(whole.rule_count() > 0);
            assert_eq!(compile_split(&config, 1), whole);
            assert_eq!(compile_rules(&config), whole);
        }
    }
}
