//! `portfwd trace`: the path of real packets through netfilter. A temporary nftables table of
//! its own marks matching packets with `meta nftrace set 1` before every other chain; the
//! kernel then reports each table, chain, rule and verdict the packet meets (`nft monitor
//! trace`), iptables-nft's included. This module writes that table and reads the reports; the
//! binary runs the processes.

use std::collections::HashMap;

use crate::model::Proto;
use crate::net::{Cidr, PortRange};

/// The prefix of the trace tables: `inet portfwd_trace_<pid>`. Instance names are
/// `[a-z0-9-]`, so no instance's table (`portfwd-<instance>`) can ever carry it.
pub const TABLE_PREFIX: &str = "portfwd_trace_";

/// What to trace.
#[derive(Debug, Clone)]
pub struct Filter {
    pub proto: Proto,
    pub dport: u16,
    pub src: Option<Cidr>,
    pub dst: Option<std::net::IpAddr>,
}

/// The `nft -f` script that adds the trace table (priority -350: before conntrack, raw and
/// every NAT or filter chain).
pub fn table_script(table: &str, filter: &Filter) -> String {
    let mut matches = format!(
        "meta l4proto {} th dport {}",
        filter.proto.name(),
        filter.dport
    );
    if let Some(src) = &filter.src {
        let ip = if src.addr.is_ipv4() { "ip" } else { "ip6" };
        matches.push_str(&format!(" {ip} saddr {src}"));
    }
    if let Some(dst) = &filter.dst {
        let ip = if dst.is_ipv4() { "ip" } else { "ip6" };
        matches.push_str(&format!(" {ip} daddr {dst}"));
    }
    let mut out = format!("add table inet {table}\n");
    // Not `out`: nft 0.9.8 takes it for a keyword.
    for (chain, hook) in [("mark_pre", "prerouting"), ("mark_out", "output")] {
        out.push_str(&format!(
            "add chain inet {table} {chain} {{ type filter hook {hook} priority -350; policy accept; }}\n"
        ));
        out.push_str(&format!(
            "add rule inet {table} {chain} {matches} meta nftrace set 1\n"
        ));
    }
    out
}

/// One step of a packet: a rule it matched (or a chain's policy) and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    /// `ip nat`
    pub table: String,
    pub chain: String,
    /// The rule as nft prints it (`policy` for a chain's policy).
    pub rule: String,
    pub verdict: String,
    /// `portfwd:web` for the rules of a portfwd instance's chains, when the entry is known
    /// (null otherwise).
    pub entry: Option<String>,
}

/// One traced packet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Packet {
    pub packet: usize,
    /// `tcp 10.0.1.2:44880 -> 10.0.1.1:4321 iif eth0`
    pub summary: String,
    pub hops: Vec<Hop>,
    /// The NAT it got, every translation in order (`dnat to 10.0.2.2:1234, masquerade`), null
    /// if none.
    pub nat: Option<String>,
    /// `accept`, or `drop` with where (`drop in inet fw filter_FORWARD`).
    pub verdict: String,
    /// Where the flow went (`10.0.2.3:8080`), as conntrack says after the trace: for a pool,
    /// the backend it chose. Null when the flow was not DNATed or its entry is gone.
    pub backend: Option<String>,
    /// The packet's original tuple, to find its conntrack entry.
    #[serde(skip)]
    pub flow: Option<FlowKey>,
}

/// A traced packet's protocol, source and destination, as it arrived (before any NAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub proto: Proto,
    pub src: std::net::IpAddr,
    pub sport: u16,
    pub dst: std::net::IpAddr,
    pub dport: u16,
}

impl Packet {
    /// Names the backend `reply` says the flow went to (a conntrack entry's reply source
    /// address and port); a pool's `dnat to one of ...` becomes `dnat to <it> (one of ...)`.
    pub fn chose(&mut self, reply: (std::net::IpAddr, u16)) {
        let backend = match reply.0 {
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", reply.1),
            a => format!("{a}:{}", reply.1),
        };
        if let Some(nat) = &mut self.nat {
            if let Some(rest) = nat.strip_prefix("dnat to one of ") {
                let parts: Vec<&str> = rest.split(", ").collect();
                let is_target = |p: &&&str| {
                    p.parse::<std::net::SocketAddr>().is_ok()
                        || p.parse::<std::net::IpAddr>().is_ok()
                };
                let pool = parts.iter().take_while(is_target).count();
                let chosen = format!("dnat to {backend} (one of {})", parts[..pool].join(", "));
                *nat = std::iter::once(chosen.as_str())
                    .chain(parts[pool..].iter().copied())
                    .collect::<Vec<_>>()
                    .join(", ");
            }
        }
        self.backend = Some(backend);
    }
}

/// A forward of a portfwd instance, to label its rules and to name the translations that a
/// map lookup does (`dnat ip addr . port to meta l4proto . th dport map @pre-port4-nat` says
/// nothing of the address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub instance: String,
    pub name: String,
    pub protos: Vec<Proto>,
    pub ports: PortRange,
    /// `dnat to 10.0.2.2:1234`
    pub dnat: Option<String>,
    /// `snat to 10.0.2.1` (None: masquerade or none)
    pub snat: Option<String>,
}

/// The forwards of portfwd instances.
pub type Entries = Vec<Entry>;

/// Groups `nft monitor trace` lines into packets.
#[derive(Default)]
pub struct Tracker {
    table: String,
    entries: Entries,
    open: HashMap<String, Packet>,
    /// The original destination port of each open packet, for labelling.
    dports: HashMap<String, (Option<Proto>, u16)>,
    count: usize,
}

impl Tracker {
    pub fn new(table: &str, entries: Entries) -> Tracker {
        Tracker {
            table: table.to_string(),
            entries,
            ..Tracker::default()
        }
    }

    /// Takes one line; returns the packet it completes (a new packet with the same trace id
    /// completes the one before).
    pub fn line(&mut self, line: &str) -> Option<Packet> {
        let rest = line.strip_prefix("trace id ")?;
        let (id, rest) = rest.split_once(' ')?;
        let mut words = rest.splitn(4, ' ');
        let family = words.next()?;
        let table = words.next()?;
        let chain = words.next()?;
        let event = words.next().unwrap_or_default();
        let ours = table == self.table;
        if let Some(packet) = event.strip_prefix("packet: ") {
            if !ours {
                return None;
            }
            let done = self.open.remove(id).map(finish);
            self.count += 1;
            let (summary, proto, dport, flow) = summarize(packet);
            self.dports.insert(id.to_string(), (proto, dport));
            self.open.insert(
                id.to_string(),
                Packet {
                    packet: self.count,
                    summary,
                    hops: Vec::new(),
                    nat: None,
                    verdict: String::new(),
                    backend: None,
                    flow,
                },
            );
            return done;
        }
        if ours {
            return None;
        }
        let (rule, verdict) = if let Some(policy) = event.strip_prefix("policy ") {
            ("policy".to_string(), policy.trim().to_string())
        } else if let Some(rule) = event.strip_prefix("rule ") {
            match rule.rsplit_once(" (verdict ") {
                Some((text, verdict)) => (
                    text.trim().to_string(),
                    verdict.trim_end_matches(')').to_string(),
                ),
                None => (rule.trim().to_string(), String::new()),
            }
        } else {
            return None;
        };
        let entry = self.entry_of(id, table, chain, &rule);
        // A lookup in one of portfwd's maps translates as the forward says.
        let looked_up = match lookup_of(&rule) {
            Some(kind) => self
                .forward_by_port(id, table.strip_prefix("portfwd-"))
                .and_then(|f| match kind {
                    "dnat" => f.dnat.clone(),
                    _ => f.snat.clone(),
                }),
            None => None,
        };
        let packet = self.open.get_mut(id)?;
        // Every translation, in order: the DNAT at prerouting, then the SNAT or masquerade at
        // postrouting (the first packet of a flow meets both).
        if let Some(nat) = looked_up.or_else(|| nat_of(&rule)) {
            packet.nat = Some(match packet.nat.take() {
                Some(before) if !before.split(", ").any(|n| n == nat) => format!("{before}, {nat}"),
                Some(before) => before,
                None => nat,
            });
        }
        packet.hops.push(Hop {
            table: format!("{family} {table}"),
            chain: chain.to_string(),
            rule: clean(&rule),
            verdict,
            entry,
        });
        None
    }

    /// Every packet still open (at the end of the trace).
    pub fn finish_all(&mut self) -> Vec<Packet> {
        let mut out: Vec<Packet> = self.open.drain().map(|(_, p)| finish(p)).collect();
        out.sort_by_key(|p| p.packet);
        out
    }

    /// Packets seen so far.
    pub fn seen(&self) -> usize {
        self.count
    }

    /// `portfwd:web` for a hop in a chain of instance `portfwd` on the forward whose listen
    /// ports hold the packet's original destination port.
    /// The nftables backend's rules say it in their comment (`comment "web:fwd:web:1a2b3c4d"`).
    fn entry_of(&self, id: &str, table: &str, chain: &str, rule: &str) -> Option<String> {
        if let Some(instance) = table.strip_prefix("portfwd-") {
            let named = rule
                .split_once("comment \"")
                .and_then(|(_, c)| crate::ownership::parse_comment(c.split('"').next()?, instance))
                .filter(|tag| tag.kind != crate::ownership::KIND_FLOW)
                .map(|tag| format!("{instance}:{}", tag.name));
            return named.or_else(|| self.entry_by_port(id, instance));
        }
        self.entry_by_port(id, crate::ownership::instance_of_chain(chain)?)
    }

    /// `instance:entry` of the forward whose listen ports hold the packet's destination port.
    fn entry_by_port(&self, id: &str, instance: &str) -> Option<String> {
        let name = self
            .forward_by_port(id, Some(instance))
            .map(|f| f.name.as_str());
        Some(match name {
            Some(name) => format!("{instance}:{name}"),
            None => instance.to_string(),
        })
    }

    /// The forward (of `instance`) whose listen ports hold the packet's destination port.
    fn forward_by_port(&self, id: &str, instance: Option<&str>) -> Option<&Entry> {
        let (proto, dport) = *self.dports.get(id)?;
        self.entries.iter().find(|f| {
            instance.is_none_or(|i| f.instance == i)
                && f.ports.contains(dport)
                && proto.is_none_or(|p| f.protos.contains(&p))
        })
    }
}

/// The verdict of a finished packet: the first drop or reject, else accept.
fn finish(mut packet: Packet) -> Packet {
    let dropped = packet.hops.iter().find(|h| {
        let v = h.verdict.as_str();
        v == "drop" || v.starts_with("reject") || (h.rule.starts_with("reject") && v.is_empty())
    });
    packet.verdict = match dropped {
        Some(h) => format!("drop in {} {}", h.table, h.chain),
        None => "accept".to_string(),
    };
    packet
}

/// `dnat` or `snat` when a rule's translation is a map lookup (`... to <key> map @m`, or a
/// pool's anonymous `... to numgen inc mod 2 map { 0 : ... }`).
fn lookup_of(rule: &str) -> Option<&'static str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    // The statement, not the `ct status dnat` match.
    let nat = words.windows(2).position(|w| {
        matches!(w[0], "dnat" | "snat") && matches!(w[1], "ip" | "ip6" | "to" | "addr")
    })?;
    let mapped = words[nat..]
        .windows(2)
        .any(|w| w[0] == "map" && (w[1].starts_with('@') || w[1] == "{"));
    mapped.then(|| if words[nat] == "dnat" { "dnat" } else { "snat" })
}

/// `dnat to 10.0.2.2:1234`, `redirect to :8080`, `masquerade`, `snat to ...` in a rule; nft's
/// own NAT statements name the family (`dnat ip to ...`, `snat ip6 to ...`), which is left out.
fn nat_of(rule: &str) -> Option<String> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        match *word {
            "masquerade" => return Some("masquerade".to_string()),
            "dnat" | "snat" | "redirect" => {
                let rest = &words[i + 1..];
                let rest = match rest {
                    ["ip" | "ip6", tail @ ..] => tail,
                    tail => tail,
                };
                if let ["to", target, ..] = rest {
                    return Some(format!("{word} to {target}"));
                }
            }
            _ => {}
        }
    }
    None
}

/// A rule without its counter (`counter packets 0 bytes 0`), which says nothing here.
fn clean(rule: &str) -> String {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "counter" && words.get(1 + i) == Some(&"packets") {
            i += 5;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

/// `tcp 10.0.1.2:44880 -> 10.0.1.1:4321 iif "eth0"`, the protocol and destination port.
fn summarize(packet: &str) -> (String, Option<Proto>, u16, Option<FlowKey>) {
    let words: Vec<&str> = packet.split_whitespace().collect();
    let after = |key: &[&str]| -> Option<&str> {
        words
            .windows(key.len() + 1)
            .find(|w| w[..key.len()] == *key)
            .map(|w| w[key.len()])
    };
    let (proto, sport, dport) = if let Some(d) = after(&["tcp", "dport"]) {
        (Some(Proto::Tcp), after(&["tcp", "sport"]), d)
    } else if let Some(d) = after(&["udp", "dport"]) {
        (Some(Proto::Udp), after(&["udp", "sport"]), d)
    } else {
        (None, None, "?")
    };
    let src = after(&["ip", "saddr"])
        .or_else(|| after(&["ip6", "saddr"]))
        .unwrap_or("?");
    let dst = after(&["ip", "daddr"])
        .or_else(|| after(&["ip6", "daddr"]))
        .unwrap_or("?");
    let iif = after(&["iif"])
        .map(|i| format!(" iif {}", i.trim_matches('"')))
        .unwrap_or_default();
    let name = proto.map_or("?", |p| p.name());
    let flow = (|| {
        Some(FlowKey {
            proto: proto?,
            src: src.parse().ok()?,
            sport: sport?.parse().ok()?,
            dst: dst.parse().ok()?,
            dport: dport.parse().ok()?,
        })
    })();
    (
        format!(
            "{name} {src}:{} -> {dst}:{dport}{iif}",
            sport.unwrap_or("?")
        ),
        proto,
        dport.parse().unwrap_or(0),
        flow,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool's `dnat to one of ...` names the backend conntrack says the flow reached; the
    /// translations after it stay.
    #[test]
    fn a_pools_dnat_names_the_backend_chosen() {
        let mut p = Packet {
            packet: 1,
            summary: String::new(),
            hops: Vec::new(),
            nat: Some("dnat to one of 10.0.2.2:80, [fd00::3]:80, masquerade".to_string()),
            verdict: "accept".to_string(),
            backend: None,
            flow: None,
        };
        p.chose(("fd00::3".parse().unwrap(), 80));
        assert_eq!(p.backend.as_deref(), Some("[fd00::3]:80"));
        assert_eq!(
            p.nat.as_deref(),
            Some("dnat to [fd00::3]:80 (one of 10.0.2.2:80, [fd00::3]:80), masquerade")
        );
        p.nat = Some("dnat to 10.0.2.2:80".to_string());
        p.chose(("10.0.2.2".parse().unwrap(), 80));
        assert_eq!(p.nat.as_deref(), Some("dnat to 10.0.2.2:80"));
    }

    // Captured from `nft monitor trace` (nft 1.0.6, kernel 6.18): the first packet of a TCP
    // connection through a portfwd forward, and the second packet of the same connection.
    const TRACE: &str = "trace id e869f546 inet portfwd_trace_7 mark_pre packet: iif \"trp0\" ether saddr f2:91:0e:34:46:8a ether daddr 86:8f:1c:ec:ec:fe ip saddr 10.0.1.2 ip daddr 10.0.1.1 ip dscp cs0 ip ecn not-ect ip ttl 64 ip id 4135 ip protocol tcp ip length 60 tcp sport 44880 tcp dport 4321 tcp flags == syn tcp window 64240
trace id e869f546 inet portfwd_trace_7 mark_pre rule meta l4proto tcp th dport 4321 meta nftrace set 1 (verdict continue)
trace id e869f546 inet portfwd_trace_7 mark_pre policy accept
trace id e869f546 ip nat PREROUTING packet: iif \"trp0\" ip saddr 10.0.1.2 ip daddr 10.0.1.1 tcp sport 44880 tcp dport 4321
trace id e869f546 ip nat PREROUTING rule  counter packets 0 bytes 0 jump PFWD-portfwd-PRE (verdict jump PFWD-portfwd-PRE)
trace id e869f546 ip nat PFWD-portfwd-PRE rule tcp dport 4096-4351  counter packets 0 bytes 0 jump PFWD-portfwd-PRE-T16 (verdict jump PFWD-portfwd-PRE-T16)
trace id e869f546 ip nat PFWD-portfwd-PRE-T16 rule tcp dport 4321 fib daddr type local  counter packets 0 bytes 0 dnat to 10.0.2.2:1234 (verdict accept)
trace id e869f546 ip filter FORWARD rule  counter packets 0 bytes 0 jump PFWD-portfwd-FWD (verdict jump PFWD-portfwd-FWD)
trace id e869f546 ip filter PFWD-portfwd-FWD rule ct mark and 0x2000 == 0x2000  counter packets 0 bytes 0 accept (verdict accept)
trace id e869f546 inet fw filter_FORWARD rule reject with icmpx admin-prohibited (verdict drop)
trace id e869f546 inet portfwd_trace_7 mark_pre packet: iif \"trp0\" ip saddr 10.0.1.2 ip daddr 10.0.1.1 ip protocol tcp tcp sport 44880 tcp dport 4321 tcp flags == ack
trace id e869f546 ip filter FORWARD rule  counter packets 0 bytes 0 jump PFWD-portfwd-FWD (verdict jump PFWD-portfwd-FWD)";

    fn entry(instance: &str, name: &str) -> Entry {
        Entry {
            instance: instance.to_string(),
            name: name.to_string(),
            protos: vec![Proto::Tcp],
            ports: PortRange::single(4321),
            dnat: Some("dnat to 10.0.2.2:1234".to_string()),
            snat: Some("snat to 10.0.2.1".to_string()),
        }
    }

    /// A plain forward's DNAT and SNAT are map lookups: the forward names the translation.
    #[test]
    fn a_map_lookup_translates_as_its_forward_says() {
        let mut tracker = Tracker::new("portfwd_trace_7", vec![entry("gw", "web")]);
        let lines = "trace id bb inet portfwd_trace_7 mark_pre packet: iif \"eth0\" ip saddr 10.0.1.2 ip daddr 10.0.1.1 ip protocol tcp tcp sport 40000 tcp dport 4321
trace id bb inet portfwd-gw prerouting rule fib daddr type local meta nfproto ipv4 meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @pre-port4-nat comment \"gw:flow:pre-port4-nat:501c0dde\" (verdict accept)
trace id bb inet portfwd-gw postrouting rule meta nfproto ipv4 meta l4proto tcp ct status dnat snat ip to ct original proto-dst . ct reply ip saddr . ct reply proto-src map @post-tcp-port4-snat comment \"gw:flow:post-tcp-port4-snat:1\" (verdict accept)";
        let mut done: Vec<Packet> = lines.lines().filter_map(|l| tracker.line(l)).collect();
        done.extend(tracker.finish_all());
        assert_eq!(
            done[0].nat.as_deref(),
            Some("dnat to 10.0.2.2:1234, snat to 10.0.2.1")
        );
        assert_eq!(done[0].hops[0].entry.as_deref(), Some("gw:web"));
        assert_eq!(lookup_of("dnat ip to 10.0.2.2:1234"), None);
        assert_eq!(
            lookup_of("dnat ip to numgen inc mod 2 map { 0 : 10.0.2.2 . 80, 1 : 10.0.2.3 . 80 }"),
            Some("dnat")
        );
    }

    #[test]
    fn groups_lines_into_packets_labels_portfwd_rules_and_finds_the_drop() {
        let entries = vec![entry("portfwd", "web")];
        let mut tracker = Tracker::new("portfwd_trace_7", entries);
        let mut done: Vec<Packet> = TRACE.lines().filter_map(|l| tracker.line(l)).collect();
        done.extend(tracker.finish_all());
        assert_eq!(done.len(), 2);
        let first = &done[0];
        assert_eq!(
            first.summary,
            "tcp 10.0.1.2:44880 -> 10.0.1.1:4321 iif trp0"
        );
        assert_eq!(first.nat.as_deref(), Some("dnat to 10.0.2.2:1234"));
        assert_eq!(first.verdict, "drop in inet fw filter_FORWARD");
        let dnat = &first.hops[2];
        assert_eq!(dnat.chain, "PFWD-portfwd-PRE-T16");
        assert_eq!(
            dnat.rule,
            "tcp dport 4321 fib daddr type local dnat to 10.0.2.2:1234"
        );
        assert_eq!(dnat.entry.as_deref(), Some("portfwd:web"));
        assert_eq!(first.hops[0].entry, None, "ip nat PREROUTING is not ours");
        assert_eq!(done[1].verdict, "accept");
        assert_eq!(done[1].hops.len(), 1);
    }

    #[test]
    fn the_table_marks_only_the_asked_packets() {
        let filter = Filter {
            proto: Proto::Udp,
            dport: 53,
            src: Cidr::parse("10.0.1.0/24").ok(),
            dst: "10.0.1.1".parse().ok(),
        };
        let script = table_script("portfwd_trace_9", &filter);
        assert!(script.contains("add chain inet portfwd_trace_9 mark_pre { type filter hook prerouting priority -350; policy accept; }"));
        assert!(script.contains("add rule inet portfwd_trace_9 mark_out meta l4proto udp th dport 53 ip saddr 10.0.1.0/24 ip daddr 10.0.1.1 meta nftrace set 1"));
    }

    /// The nftables backend's DNAT names its family (`dnat ip to`), and an instance may have
    /// `-` in its name: both are read right.
    #[test]
    fn nft_nat_statements_and_instances_with_dashes_are_read() {
        assert_eq!(
            nat_of("meta l4proto tcp counter packets 1 bytes 60 dnat ip to 10.0.2.2:1234 comment \"x\""),
            Some("dnat to 10.0.2.2:1234".to_string())
        );
        assert_eq!(
            nat_of("dnat ip6 to [fd00:2::2]:80"),
            Some("dnat to [fd00:2::2]:80".to_string())
        );
        assert_eq!(
            nat_of("redirect to :22"),
            Some("redirect to :22".to_string())
        );
        let entries = vec![entry("web-1", "site")];
        let mut tracker = Tracker::new("portfwd_trace_7", entries);
        let lines = "trace id aa inet portfwd_trace_7 mark_pre packet: iif \"eth0\" ip saddr 10.0.1.2 ip daddr 10.0.1.1 ip protocol tcp tcp sport 40000 tcp dport 4321
trace id aa ip nat PFWD-web-1-PRE-T16 rule tcp dport 4321 counter packets 0 bytes 0 dnat to 10.0.2.2:1234 (verdict accept)";
        let mut done: Vec<Packet> = lines.lines().filter_map(|l| tracker.line(l)).collect();
        done.extend(tracker.finish_all());
        let hop = done[0]
            .hops
            .iter()
            .find(|h| h.chain == "PFWD-web-1-PRE-T16")
            .unwrap();
        assert_eq!(hop.entry.as_deref(), Some("web-1:site"));
    }
}
