//! Pitfalls a run can see from the desired and the observed state, reported as warnings.
//! They never block a run: the operator may know better, but should be told.

use std::net::IpAddr;

use std::collections::{BTreeMap, BTreeSet};

use crate::findings::{Finding, Severity};
use crate::firewall::Firewall;
use crate::foreign::ForeignNat;
use crate::model::{Config, Forward, IpForward, Snat};
use crate::net::{Cidr, Family};
use crate::observe::Observed;

/// Sysctls a run reads: those it manages, plus those its warnings look at.
pub(crate) fn sysctl_keys(config: &Config, managed: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<String> = managed.keys().cloned().collect();
    for f in config.forwards.iter().filter(|f| f.dnats_to_loopback()) {
        keys.push(localnet_key("all"));
        if let Some(i) = f.in_interface.as_ref().filter(|i| !i.ends_with('+')) {
            keys.push(localnet_key(i));
        }
    }
    for dev in policy_route_devices(config) {
        keys.push(rp_filter_key("all"));
        keys.push(rp_filter_key(&dev));
    }
    keys.sort();
    keys.dedup();
    keys
}

fn localnet_key(dev: &str) -> String {
    format!("net/ipv4/conf/{dev}/route_localnet")
}

fn rp_filter_key(dev: &str) -> String {
    format!("net/ipv4/conf/{dev}/rp_filter")
}

/// IPv4 interfaces that policy routes send through or match on (`routes[].dev`, `iif`).
fn policy_route_devices(config: &Config) -> Vec<String> {
    let mut devs: Vec<String> = config
        .policy_routes
        .iter()
        .filter(|p| p.family == Family::V4)
        .flat_map(|p| {
            p.routes
                .iter()
                .filter_map(|r| r.dev.clone())
                .chain(p.iif.clone())
        })
        .filter(|d| !d.ends_with('+'))
        .collect();
    devs.sort();
    devs.dedup();
    devs
}

/// Do the warnings need the host's addresses (`snat: none` checks whether the backend is
/// on-link)?
pub(crate) fn needs_addresses(config: &Config) -> bool {
    (config.forwards.iter()).any(|f| f.action.snat() == Some(Snat::None))
}

/// Do the params name an interface (which the run then checks exists)?
pub(crate) fn names_interfaces(config: &Config) -> bool {
    !config.addresses.is_empty()
        || config.forwards.iter().any(|f| f.in_interface.is_some())
        || config.masquerades.iter().any(|m| m.out_interface.is_some())
        || config
            .policy_routes
            .iter()
            .any(|p| p.iif.is_some() || p.routes.iter().any(|r| r.dev.is_some()))
}

/// Interfaces the params name that the host does not have. An address or a route cannot be
/// put on a missing device (an error: the run refuses before it changes anything, check mode
/// and `plan` included); a match on an incoming or outgoing interface, and an ip rule's `iif`,
/// take effect when it appears (a warning). `eth+` patterns are never missing.
pub(crate) fn missing_interfaces<F: Firewall>(
    config: &Config,
    observed: &Observed<F>,
) -> Vec<Finding> {
    if !observed.addresses_read {
        return Vec::new();
    }
    let missing = |dev: &str| !dev.ends_with('+') && !observed.routing.links.contains(dev);
    let mut out = Vec::new();
    let mut refuse = |field: String, entry: Option<String>, dev: &str| {
        out.push(Finding {
            id: "interface_missing",
            severity: Severity::Error,
            entry,
            msg: format!("{field}: no interface {dev:?} on this host"),
            fix: format!("create {dev:?} first, or name an interface the host has"),
        });
    };
    for (i, a) in config.addresses.iter().enumerate() {
        if missing(&a.dev) {
            refuse(format!("addresses[{i}].dev"), None, &a.dev);
        }
    }
    for (i, p) in config.policy_routes.iter().enumerate() {
        for (j, r) in p.routes.iter().enumerate() {
            if let Some(dev) = r.dev.as_deref().filter(|d| missing(d)) {
                refuse(format!("policy_routes[{i}].routes[{j}].dev"), None, dev);
            }
        }
    }
    let warn = |what: String, entry: Option<String>, dev: &str| Finding {
        id: "interface_missing",
        severity: Severity::Warning,
        entry,
        msg: format!(
            "{what}: no interface {dev:?} on this host; the rule matches nothing until it appears"
        ),
        fix: format!("check the name, or ignore this until {dev:?} is created"),
    };
    for f in &config.forwards {
        if let Some(dev) = f.in_interface.as_deref().filter(|d| missing(d)) {
            let entry = format!("forwards.{}", f.name);
            out.push(warn(
                format!("forward {:?} in_interface", f.name),
                Some(entry),
                dev,
            ));
        }
    }
    for m in &config.masquerades {
        if let Some(dev) = m.out_interface.as_deref().filter(|d| missing(d)) {
            let entry = format!("masquerade.{}", m.name);
            out.push(warn(
                format!("masquerade {:?} out_interface", m.name),
                Some(entry),
                dev,
            ));
        }
    }
    for (i, p) in config.policy_routes.iter().enumerate() {
        if let Some(dev) = p.iif.as_deref().filter(|d| missing(d)) {
            out.push(warn(format!("policy_routes[{i}].iif"), None, dev));
        }
    }
    out
}

/// Are other filters on the host worth reading (their forward-hook drops, their NAT taking
/// a forward's port first)? Whenever there is a forward or a masquerade entry.
pub(crate) fn reads_other_filters(config: &Config) -> bool {
    !config.forwards.is_empty() || !config.masquerades.is_empty()
}

/// Findings split by the params' `ignore_findings`.
#[derive(Debug, Default)]
pub(crate) struct Sifted {
    pub kept: Vec<Finding>,
    /// What the operator silenced (doctor lists it).
    pub ignored: Vec<Finding>,
}

impl Sifted {
    /// Sorts `findings` into kept and ignored: a finding about one entry is ignored when that
    /// entry's `ignore_findings` names its id.
    pub(crate) fn add(&mut self, config: &Config, findings: impl IntoIterator<Item = Finding>) {
        for f in findings {
            match &f.entry {
                Some(entry) if config.ignores(entry, f.id) => self.ignored.push(f),
                _ => self.kept.push(f),
            }
        }
    }
}

/// Splits the entries one finding would name (`forwards.web`, ...) into those that report it
/// and those whose `ignore_findings` silence it.
pub(crate) fn split_entries<T>(
    config: &Config,
    id: &str,
    entries: Vec<T>,
    entry: impl Fn(&T) -> &str,
) -> (Vec<T>, Vec<T>) {
    entries
        .into_iter()
        .partition(|e| !config.ignores(entry(e), id))
}

/// Warnings that need the observed state (without those the params silence).
pub(crate) fn warnings<F: Firewall>(
    config: &Config,
    firewall: &F,
    observed: &Observed<F>,
) -> Vec<String> {
    findings(config, firewall, observed)
        .kept
        .into_iter()
        .map(|f| f.msg)
        .collect()
}

/// The pitfalls a run can see from the desired and the observed state.
pub(crate) fn findings<F: Firewall>(
    config: &Config,
    firewall: &F,
    observed: &Observed<F>,
) -> Sifted {
    let mut sifted = Sifted::default();
    let out = pitfalls(config, firewall, observed, &mut sifted);
    sifted.add(config, out);
    sifted
}

fn pitfalls<F: Firewall>(
    config: &Config,
    firewall: &F,
    observed: &Observed<F>,
    sifted: &mut Sifted,
) -> Vec<Finding> {
    let sysctl =
        |key: String| -> Option<u32> { observed.sysctls.get(&key)?.as_deref()?.parse().ok() };
    let mut out = missing_interfaces(config, observed);
    for f in config.forwards.iter().filter(|f| f.dnats_to_loopback()) {
        let named = f.in_interface.as_ref().filter(|i| !i.ends_with('+'));
        if config.ip_forward == IpForward::Auto && named.is_some() {
            continue; // compile sets route_localnet on it
        }
        let on = sysctl(localnet_key("all")) == Some(1)
            || named.is_some_and(|i| sysctl(localnet_key(i)) == Some(1));
        if !on {
            out.push(Finding::forward(
                "route_localnet",
                Severity::Error,
                f,
                format!("forward {:?}: DNAT to a loopback address only works for connections from other hosts when route_localnet=1 on the ingress interface; portfwd sets it only on a named in_interface with ip_forward \"auto\"", f.name),
                "give the forward an in_interface (with ip_forward \"auto\" portfwd sets route_localnet=1 on it and guards it), or set net.ipv4.conf.<in_interface>.route_localnet=1 yourself",
            ));
        }
    }
    out.extend(
        config
            .forwards
            .iter()
            .filter_map(|f| reply_bypass(config, f, observed)),
    );
    let bit = config.conn_mark;
    for rule in firewall.mark_users(&observed.firewall) {
        if touches_mark_bit(rule, bit) {
            out.push(Finding {
                id: "conn_mark_collision",
                severity: Severity::Warning,
                entry: None,
                msg: format!("conn_mark {bit:#x}: another rule uses this conntrack mark bit ({rule}); set conn_mark to a bit nobody else uses, or portfwd's forwarded flows and that rule will disturb each other"),
                fix: "set conn_mark to a bit no other rule reads or writes".into(),
            });
        }
    }
    out.extend(forward_hook_findings(config, observed, sifted));
    for f in config
        .forwards
        .iter()
        .filter(|f| f.needs_forwarding() && !f.allow_forward)
    {
        if let Some(chain) = firewall.forward_drop(&observed.firewall, f.family) {
            out.push(Finding::forward(
                "forward_hook_drop",
                Severity::Error,
                f,
                format!("forward {:?}: allow_forward is false and {chain}: the forwarded packets are dropped there (a FORWARD chain with policy DROP)", f.name),
                "set allow_forward: true (portfwd then accepts exactly the forwarded flow and its replies), or accept the flow in that chain yourself",
            ));
        }
    }
    for m in config.masquerades.iter().filter(|m| !m.allow_forward) {
        if let Some(chain) = firewall.forward_drop(&observed.firewall, m.family()) {
            out.push(Finding {
                id: "forward_hook_drop",
                severity: Severity::Error,
                entry: Some(format!("masquerade.{}", m.name)),
                msg: format!("masquerade {:?}: allow_forward is false and {chain}: the subnet's traffic is dropped there (a FORWARD chain with policy DROP)", m.name),
                fix: "set allow_forward: true (portfwd then accepts exactly the subnet's traffic and its replies), or accept it in that chain yourself".into(),
            });
        }
    }
    let mut foreign = firewall.foreign_nat(&observed.firewall).to_vec();
    foreign.extend(observed.foreign_nat.iter().cloned());
    out.extend(foreign_nat_findings(config, &foreign));
    for dev in policy_route_devices(config) {
        let strict = sysctl(rp_filter_key("all")).max(sysctl(rp_filter_key(&dev))) == Some(1);
        if strict {
            out.push(Finding {
                id: "rp_filter",
                severity: Severity::Warning,
                entry: None,
                msg: format!("rp_filter is 1 (strict) for {dev}, which a policy route uses: packets routed asymmetrically through it may be dropped; set net.ipv4.conf.{dev}.rp_filter=2 (loose)"),
                fix: format!("sysctl -w net.ipv4.conf.{dev}.rp_filter=2"),
            });
        }
    }
    out
}

/// Another owner's DNAT or REDIRECT met before portfwd's jump, on a forward's protocol and
/// port, takes its connections first (NAT is decided once, by the first rule that applies).
fn foreign_nat_findings(config: &Config, foreign: &[ForeignNat]) -> Vec<Finding> {
    if foreign.is_empty() {
        return Vec::new();
    }
    // Forwards by first port, so each foreign rule looks only at forwards that may overlap.
    let mut by_port: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, f) in config.forwards.iter().enumerate() {
        by_port.entry(f.listen_port.first).or_default().push(i);
    }
    let mut hits: BTreeMap<usize, (usize, &ForeignNat)> = BTreeMap::new();
    for rule in foreign {
        let (low, high) = rule.ports.map_or((1, u16::MAX), |p| (p.first, p.last));
        for i in by_port.range(..=high).flat_map(|(_, v)| v) {
            let f = &config.forwards[*i];
            let takes = f.family == rule.family
                && f.listen_port.last >= low
                && rule.proto.is_none_or(|p| f.protos.contains(&p))
                && (!rule.local || f.local);
            if takes {
                hits.entry(*i).or_insert((0, rule)).0 += 1;
            }
        }
    }
    hits.into_iter()
        .map(|(i, (count, rule))| {
            let f = &config.forwards[i];
            let more = if count > 1 {
                format!(" (and {} more)", count - 1)
            } else {
                String::new()
            };
            Finding::forward(
                "foreign_nat_first",
                Severity::Warning,
                f,
                format!(
                    "forward {:?}: another owner's NAT rule comes before portfwd's and matches its port, so it takes those connections first: {}: {}{more}",
                    f.name, rule.place, rule.rule
                ),
                "move the forward to another listen_port, or narrow or remove that rule (its owner's tool may put it back)",
            )
        })
        .collect()
}

/// Another table's chain at the forward hook that drops what reaches its end also drops what
/// portfwd accepts in its own chain (an accept ends a packet's walk of one base chain only).
/// DNAT forwards pass a chain that accepts `ct status dnat` first (firewalld's does);
/// masquerade entries route traffic that is not DNATed.
fn forward_hook_findings<F: Firewall>(
    config: &Config,
    observed: &Observed<F>,
    sifted: &mut Sifted,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let bit = config.conn_mark;
    // Which flows portfwd marks with the bit: DNAT forwards with allow_forward (both
    // backends), and with the nftables backend masquerade entries with allow_forward.
    let masquerade_marked = config.backend.is_nftables();
    for chain in observed.forward_chains.iter().filter(|c| c.drops()) {
        let mark_accepted = chain.accepts_mark(bit);
        let mut affected: Vec<(String, String)> = Vec::new();
        affected.extend(
            config
                .forwards
                .iter()
                .filter(|f| f.needs_forwarding())
                .filter(|f| !(chain.accepts_dnat || (mark_accepted && f.allow_forward)))
                .map(|f| {
                    (
                        format!("forward {:?}", f.name),
                        format!("forwards.{}", f.name),
                    )
                }),
        );
        let unmarked_masquerade: Vec<&crate::model::Masquerade> = config
            .masquerades
            .iter()
            .filter(|m| !(mark_accepted && masquerade_marked && m.allow_forward))
            .collect();
        affected.extend(unmarked_masquerade.iter().map(|m| {
            (
                format!("masquerade {:?}", m.name),
                format!("masquerade.{}", m.name),
            )
        }));
        let (affected, silenced) =
            split_entries(config, "forward_hook_drop", affected, |a| a.1.as_str());
        if affected.is_empty() && silenced.is_empty() {
            continue;
        }
        let how = if chain.policy_drop {
            "has policy drop"
        } else {
            "ends in a drop or reject"
        };
        let mut fix = match (config.backend.is_nftables(), chain.tool()) {
            // iptables' own FORWARD (Docker's, RHEL's): one rule accepts exactly the flows
            // portfwd's table marks.
            (true, Some(tool)) => format!(
                "{tool} -I FORWARD -m connmark --mark {bit:#x}/{bit:#x} -j ACCEPT (accepts exactly the flows portfwd marks: its forwards' and, with allow_forward, its masquerade entries'), or use backend: iptables, which owns an accept in that chain"
            ),
            (true, None) => format!(
                "nft insert rule {} ct mark and {bit:#x} == {bit:#x} accept (accepts exactly the flows portfwd marks: its forwards' and, with allow_forward, its masquerade entries'), or let the owner of `{}` accept them",
                chain.label(),
                chain.label()
            ),
            (false, Some(tool)) => format!(
                "{tool} -I FORWARD -m conntrack --ctstate DNAT -j ACCEPT (for DNAT forwards), or manage those tables with backend: iptables-legacy"
            ),
            (false, None) => format!(
                "nft insert rule {} ct status dnat accept (or let the owner of `{}` accept the flow)",
                chain.label(),
                chain.label()
            ),
        };
        let not_allowed: Vec<String> = unmarked_masquerade
            .iter()
            .filter(|m| masquerade_marked && !m.allow_forward)
            .map(|m| format!("{:?}", m.name))
            .collect();
        if !not_allowed.is_empty() {
            fix = format!(
                "set allow_forward: true on masquerade {} (only then are its flows marked), and {fix}",
                not_allowed.join(", ")
            );
        }
        let ours = if config.backend.is_nftables() {
            format!("portfwd's table only marks the flows it forwards (conntrack mark {bit:#x}) and cannot accept them in another chain")
        } else {
            "an accept in portfwd's own chain does not override it".to_string()
        };
        let finding = |affected: &[(String, String)]| {
            let names: Vec<&str> = affected.iter().map(|a| a.0.as_str()).collect();
            Finding {
                id: "forward_hook_drop",
                severity: Severity::Error,
                entry: (affected.len() == 1).then(|| affected[0].1.clone()),
                msg: format!(
                    "{}: the {} chain `{}` (hook forward, priority {}) {how}, and {ours}: forwarded packets are dropped there unless that chain accepts them (firewalld: add the forward to its zone or policy)",
                    names.join(", "),
                    chain.owner(),
                    chain.label(),
                    chain.priority
                ),
                fix: fix.clone(),
            }
        };
        if !silenced.is_empty() {
            sifted.ignored.push(finding(&silenced));
        }
        if !affected.is_empty() {
            out.push(finding(&affected));
        }
    }
    out
}

/// Does a rule using `connmark`/`CONNMARK` read or write `bit`? Each mark option names the
/// bits it covers: `V/M` covers M; `--or-mark V` and `--xor-mark V` cover V; a bare value
/// (`--mark V`, `--set-mark V`) and `--and-mark`, `--save-mark`, `--restore-mark` without
/// `--ctmask`/`--mask` cover every bit.
fn touches_mark_bit(rule: &str, bit: u32) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let number = |t: &str| -> Option<u32> {
        match t.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => t.parse().ok(),
        }
    };
    let mut masked_copy = false;
    for (i, w) in words.iter().enumerate() {
        let value = words.get(i + 1).copied().unwrap_or("");
        let (v, m) = match value.split_once('/') {
            Some((v, m)) => (number(v), number(m)),
            None => (number(value), None),
        };
        let covered = match *w {
            "--mark" | "--set-mark" | "--set-xmark" | "--and-mark" => m.unwrap_or(u32::MAX),
            "--or-mark" | "--xor-mark" => v.unwrap_or(u32::MAX),
            "--ctmask" | "--mask" => {
                masked_copy = true;
                v.unwrap_or(u32::MAX)
            }
            _ => 0,
        };
        if covered & bit != 0 {
            return true;
        }
    }
    let copies = rule.contains("--save-mark") || rule.contains("--restore-mark");
    copies && !masked_copy
}

/// The local address and device whose subnet contains `addr`, if any: the host's addresses,
/// and those the params add (the alias a source-preserving forward targets).
fn on_link<F: Firewall>(
    config: &Config,
    addr: &IpAddr,
    observed: &Observed<F>,
) -> Option<(Cidr, String)> {
    let wanted = config.addresses.iter().map(|a| (a.addr, a.prefix, &a.dev));
    let present = observed
        .routing
        .present
        .iter()
        .map(|a| (a.addr, a.prefix, &a.dev));
    present.chain(wanted).find_map(|(local, prefix, dev)| {
        let net = Cidr {
            addr: local,
            prefix,
        };
        (local != *addr
            && prefix < Family::of(&local).host_prefix()
            && net.network().contains(addr))
        .then(|| (net, dev.clone()))
    })
}

/// With `snat: none` an on-link backend answers the client itself. That bypasses this host
/// when the host shows the client is on the backend's link too: the forward's clients arrive
/// on that interface (`in_interface`, the device of `listen_address`, or the only interface
/// there is: a single-NIC proxy), or its `sources` are on that subnet. A policy route in the
/// params for the backend's address or link brings the replies back: then nothing is said.
/// Where the host cannot tell (clients may arrive on another interface, and the backend's
/// gateway is not visible from here), the run says nothing and check mode reminds.
fn reply_bypass<F: Firewall>(
    config: &Config,
    f: &Forward,
    observed: &Observed<F>,
) -> Option<Finding> {
    if f.action.snat() != Some(Snat::None) {
        return None;
    }
    // A pool: the first of its backends whose replies would bypass this host.
    (f.action.backends().into_iter()).find_map(|(addr, _)| bypass_to(config, f, addr, observed))
}

/// [`reply_bypass`] for one backend of the forward.
fn bypass_to<F: Firewall>(
    config: &Config,
    f: &Forward,
    addr: IpAddr,
    observed: &Observed<F>,
) -> Option<Finding> {
    let (net, dev) = on_link(config, &addr, observed)?;
    let routed_back = config
        .policy_routes
        .iter()
        .any(|p| p.from.contains(&addr) || p.iif.as_deref() == Some(dev.as_str()));
    if routed_back {
        return None;
    }
    let arrives_on = |d: &str| match d.strip_suffix('+') {
        Some(prefix) => dev.starts_with(prefix),
        None => d == dev,
    };
    let listen_dev = f.listen_address.and_then(|l| {
        let present = observed.routing.present.iter().map(|a| (a.addr, &a.dev));
        let wanted = config.addresses.iter().map(|a| (a.addr, &a.dev));
        present
            .chain(wanted)
            .find(|(a, _)| *a == l)
            .map(|(_, d)| d.as_str())
    });
    let interfaces: BTreeSet<&str> = observed
        .routing
        .present
        .iter()
        .filter(|a| !a.addr.is_loopback() && !is_link_local(&a.addr))
        .map(|a| a.dev.as_str())
        .collect();
    let why = if let Some(i) = f.in_interface.as_deref().filter(|i| arrives_on(i)) {
        format!("its clients arrive on {i}, the same link")
    } else if let Some(d) = listen_dev.filter(|d| *d == dev) {
        format!("its listen_address is on {d}, the same link")
    } else if let Some(s) = f.sources.iter().find(|s| net.network().overlaps(s)) {
        format!("its sources include {s}, on the same link")
    } else if f.in_interface.is_none()
        && listen_dev.is_none()
        && f.sources.is_empty()
        && interfaces.len() == 1
        && interfaces.contains(dev.as_str())
    {
        format!("{dev} is this host's only interface, so its clients share the link")
    } else {
        return None;
    };
    Some(Finding::forward(
        "reply_bypass",
        Severity::Warning,
        f,
        format!("forward {:?}: backend {addr} is on-link ({net} on {dev}) and {why}: with snat none its replies go straight back to the client and bypass this host", f.name),
        format!("use snat: masquerade (or an address of this host), or policy-route {addr}'s replies back here (an alias address on each side and an ip rule on the backend)"),
    ))
}

/// fe80::/10: every IPv6 interface has one; it says nothing about which links a host is on.
fn is_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

/// The `snat: none` reminder check mode (and `plan`) gives for forwards whose replies the
/// host cannot see coming back: the backend must route them through this host.
pub(crate) fn reminders<F: Firewall>(config: &Config, observed: &Observed<F>) -> Vec<String> {
    config
        .forwards
        .iter()
        .filter(|f| !config.ignores(&format!("forwards.{}", f.name), "reply_bypass"))
        .filter(|f| reply_bypass(config, f, observed).is_none())
        .filter(|f| f.action.snat() == Some(Snat::None))
        .filter_map(|f| match f.action.backends().as_slice() {
            [] => None,
            [(addr, _)] => Some(format!("forward {:?}: snat is none, so {addr} sees the client's address and must send its replies back through this host (make this host its gateway, or use policy routing on it)", f.name)),
            pool => {
                let addrs: Vec<String> = pool.iter().map(|(a, _)| a.to_string()).collect();
                Some(format!("forward {:?}: snat is none, so its backends ({}) see the client's address and must send their replies back through this host (make this host their gateway, or use policy routing on them)", f.name, addrs.join(", ")))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
