//! The shapes of an instance's nftables table, `inet portfwd-<instance>`, and how each is
//! written in nft's language.
//!
//! A connection finds its forward by one map lookup per hook, whatever the number of forwards.
//! A plain forward (one listen port on any local address, to one address and port, for every
//! client) is map elements only: `pre-port4-nat` maps protocol and port to the backend
//! (`dnat ip addr . port to meta l4proto . th dport map @pre-port4-nat`), `pre-port4-mark`
//! holds the flows to mark for `allow_forward`, `post-tcp-port4-masq` (or `-snat`) the flows
//! to source-NAT, by original port and backend. Other forwards (sources, an interface, a
//! listen address or range, a redirect) keep a chain of their own (`pre-web`, one NAT rule)
//! that a verdict map element jumps to (`ip daddr . meta l4proto . th dport vmap @pre-addr4`).
//! Elements, not chains: nft lists, loads and changes 50,000 elements several times faster
//! than 100,000 chains, and a change never makes the kernel re-check jumps.
//! Every rule and element carries its owner's comment
//! ([`crate::ownership::entry_comment`]); the hash in it covers the whole object, so the comment
//! alone says whether an object is already there.
//!
//! Only validated values reach the text: addresses and ports are typed, names and interfaces
//! match `[A-Za-z0-9_.+-]` (checked again by [`quoted`]), and nft comments are quoted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use crate::model::{Pool, Proto};
use crate::net::{Cidr, Family, PortRange};

/// The address family of every portfwd table: both IP families in one table and one
/// transaction (inet NAT needs Linux 5.2; the maps below need 5.6).
pub(crate) const FAMILY: &str = "inet";

/// `portfwd-<instance>`.
pub(crate) fn table_name(instance: &str) -> String {
    format!("portfwd-{instance}")
}

/// A name or interface inside double quotes. Validation admits only `[A-Za-z0-9_.+*-]`; anything
/// else is refused here too, so a bug upstream can never put nft syntax into a script.
pub(crate) fn quoted(text: &str) -> Option<String> {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+' | '*' | ':'));
    safe.then(|| format!("\"{text}\""))
}

/// A chain name as nft's parser takes it: unquoted (nft 1.0 refuses quoted chain names), so
/// it must be one identifier: a letter, then `[A-Za-z0-9_.-]`.
pub(crate) fn ident(name: &str) -> Option<&str> {
    let mut chars = name.chars();
    let first = chars.next()?;
    let safe = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    safe.then_some(name)
}

/// An interface as nft matches it: iptables' trailing `+` wildcard is nft's `*`.
pub(crate) fn interface(name: &str) -> String {
    match name.strip_suffix('+') {
        Some(prefix) => format!("{prefix}*"),
        None => name.to_string(),
    }
}

/// The hooks the table attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Base {
    Prerouting,
    Output,
    Postrouting,
    Input,
    /// Marks masquerade entries' flows (`allow_forward`) before iptables' filter FORWARD
    /// (priority 0) sees them, so one connmark accept there lets them pass as it does the
    /// forwards' (whose DNAT rules mark them).
    Forward,
}

impl Base {
    pub(crate) const ALL: [Base; 5] = [
        Base::Prerouting,
        Base::Output,
        Base::Postrouting,
        Base::Input,
        Base::Forward,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Base::Prerouting => "prerouting",
            Base::Output => "output",
            Base::Postrouting => "postrouting",
            Base::Input => "input",
            Base::Forward => "forward",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Base> {
        Base::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Where it hooks in: NAT at the standard priorities, so iptables-nft's nat chains at the
    /// same hook keep their relative order with portfwd's as they had with iptables.
    pub(crate) fn declaration(self) -> &'static str {
        match self {
            Base::Prerouting => "type nat hook prerouting priority dstnat; policy accept;",
            Base::Output => "type nat hook output priority -100; policy accept;",
            Base::Postrouting => "type nat hook postrouting priority srcnat; policy accept;",
            Base::Input => "type filter hook input priority filter; policy accept;",
            Base::Forward => "type filter hook forward priority -10; policy accept;",
        }
    }
}

/// Where a dispatch map is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Stage {
    /// DNAT of arriving connections (prerouting).
    Pre,
    /// DNAT of locally made connections (`local: true`, output).
    Out,
    /// SNAT of forwarded flows, by their original destination (postrouting).
    Post,
}

/// One dispatch map: the stage, whether the key holds the listen address (else any local
/// address), the family, for SNAT the protocol (nft needs it to type `ct original
/// proto-dst`), and whether it holds port ranges.
///
/// Single ports and ranges live in separate maps: a map with `flags interval` is a tree (or,
/// with concatenated keys, pipapo) whose lookup and whose loading by nft grow with its
/// elements (50,000 single-port elements took nft 21 s to load into interval maps, 0.3 s
/// into hashed ones); a map without is a hash, one lookup whatever its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct MapKind {
    pub stage: Stage,
    pub by_addr: bool,
    pub family: Family,
    pub proto: Option<Proto>,
    pub ranged: bool,
    pub data: Data,
}

/// What a map's elements say; all but [`Data::Verdict`] belong to plain forwards, keyed by one
/// port on any local address (nft 0.9.8 cannot declare a three-part key with address-and-port
/// data, and a range is not one backend port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Data {
    /// Jump to the forward's own chain.
    Verdict,
    /// A set of the flows to mark (`allow_forward`); its rule precedes the DNAT, which ends
    /// the chain. (A data map cannot be looked up as a set before Linux 5.13.)
    Mark,
    /// The backend's address and port (DNAT).
    Nat,
    /// A set of flows to masquerade, by original port, backend address and port.
    Masq,
    /// The source address of such flows (`snat: IP`).
    Snat,
}

impl Data {
    fn suffix(self) -> &'static str {
        match self {
            Data::Verdict => "",
            Data::Mark => "-mark",
            Data::Nat => "-nat",
            Data::Masq => "-masq",
            Data::Snat => "-snat",
        }
    }

    /// A set, not a map.
    pub(crate) fn is_set(self) -> bool {
        matches!(self, Data::Mark | Data::Masq)
    }
}

fn family_digit(family: Family) -> char {
    match family {
        Family::V4 => '4',
        Family::V6 => '6',
    }
}

fn nfproto(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

impl MapKind {
    /// `pre-addr4`, `out-port6`, `post-tcp-addr4` (ranges), `pre-port4-exact` (single ports).
    pub(crate) fn name(&self) -> String {
        let stage = match self.stage {
            Stage::Pre => "pre",
            Stage::Out => "out",
            Stage::Post => "post",
        };
        let key = if self.by_addr { "addr" } else { "port" };
        let proto = self
            .proto
            .map(|p| format!("{}-", p.name()))
            .unwrap_or_default();
        let exact = match (self.data, self.ranged) {
            (Data::Verdict, false) => "-exact",
            _ => "",
        };
        format!(
            "{stage}-{proto}{key}{}{exact}{}",
            family_digit(self.family),
            self.data.suffix()
        )
    }

    /// The flat kinds of a stage and family: keyed by one port on any local address.
    pub(crate) fn flat(stage: Stage, family: Family, proto: Option<Proto>, data: Data) -> MapKind {
        MapKind {
            stage,
            by_addr: false,
            family,
            proto,
            ranged: false,
            data,
        }
    }

    /// Every map kind there can be, for reading names back.
    pub(crate) fn all() -> Vec<MapKind> {
        let mut kinds = Vec::new();
        for stage in [Stage::Pre, Stage::Out, Stage::Post] {
            let protos: Vec<Option<Proto>> = match stage {
                Stage::Post => vec![Some(Proto::Tcp), Some(Proto::Udp)],
                _ => vec![None],
            };
            let flat: &[Data] = match stage {
                Stage::Post => &[Data::Masq, Data::Snat],
                _ => &[Data::Mark, Data::Nat],
            };
            for family in [Family::V4, Family::V6] {
                for &proto in &protos {
                    for by_addr in [true, false] {
                        for ranged in [true, false] {
                            kinds.push(MapKind {
                                stage,
                                by_addr,
                                family,
                                proto,
                                ranged,
                                data: Data::Verdict,
                            });
                        }
                    }
                    for &data in flat {
                        kinds.push(MapKind::flat(stage, family, proto, data));
                    }
                }
            }
        }
        kinds
    }

    pub(crate) fn from_name(name: &str) -> Option<MapKind> {
        MapKind::all().into_iter().find(|k| k.name() == name)
    }

    pub(crate) fn base(&self) -> Base {
        match self.stage {
            Stage::Pre => Base::Prerouting,
            Stage::Out => Base::Output,
            Stage::Post => Base::Postrouting,
        }
    }

    /// The map's (or set's) declaration: the key type, the data type, and intervals (port
    /// ranges).
    pub(crate) fn declaration(&self) -> String {
        let flags = if self.ranged { " flags interval;" } else { "" };
        let key = self.key_types().join(" . ");
        match self.data_type() {
            Some(data) => format!("type {key} : {data};{flags}"),
            None => format!("type {key};{flags}"),
        }
    }

    /// `map` or `set`, as nft's commands name it.
    pub(crate) fn object(&self) -> &'static str {
        if self.data.is_set() {
            "set"
        } else {
            "map"
        }
    }

    /// The data type as nft lists it (None: a set).
    pub(crate) fn data_type(&self) -> Option<&'static str> {
        match (self.data, self.family) {
            (Data::Verdict, _) => Some("verdict"),
            (Data::Nat, Family::V4) => Some("ipv4_addr . inet_service"),
            (Data::Nat, Family::V6) => Some("ipv6_addr . inet_service"),
            (Data::Snat, family) => Some(addr_type(family)),
            (Data::Mark | Data::Masq, _) => None,
        }
    }

    /// The key's types, as nft lists them.
    pub(crate) fn key_types(&self) -> Vec<&'static str> {
        let mut types = Vec::new();
        if self.by_addr {
            types.push(addr_type(self.family));
        }
        if self.stage != Stage::Post {
            types.push("inet_proto");
        }
        types.push("inet_service");
        if matches!(self.data, Data::Masq | Data::Snat) {
            types.push(addr_type(self.family));
            types.push("inet_service");
        }
        types
    }

    /// The flow key a plain forward's rules look up: `meta l4proto . th dport` (DNAT), the
    /// original port and the backend, as conntrack's reply tuple holds it (SNAT). Conntrack's
    /// words, not `ip daddr . th dport`: nft lists that without the protocol match the port
    /// needs (`tcp dport`) and then cannot read its own listing back (a saved ruleset would
    /// not load at boot).
    fn flat_key(&self) -> String {
        match self.stage {
            Stage::Post => format!(
                "ct original proto-dst . ct reply {} saddr . ct reply proto-src",
                self.family.nft_family()
            ),
            _ => "meta l4proto . th dport".to_string(),
        }
    }

    /// The base chain's rule that looks a connection up in this map (a mark set's rule is
    /// [`Body::Mark`]'s).
    pub(crate) fn dispatch_rule(&self) -> String {
        let ip = self.family.nft_family();
        let nf = nfproto(self.family);
        let name = self.name();
        let proto = self.proto.map_or("tcp", Proto::name);
        match self.data {
            Data::Verdict => {}
            Data::Mark => return format!("{} {} @{name}", self.local_match(), self.flat_key()),
            Data::Nat => {
                return format!(
                    "{} dnat {ip} addr . port to {} map @{name}",
                    self.local_match(),
                    self.flat_key()
                )
            }
            Data::Masq => {
                return format!(
                    "meta nfproto {nf} meta l4proto {proto} ct status dnat {} @{name} masquerade",
                    self.flat_key()
                )
            }
            Data::Snat => {
                return format!(
                "meta nfproto {nf} meta l4proto {proto} ct status dnat snat {ip} to {} map @{name}",
                self.flat_key()
            )
            }
        }
        match (self.stage, self.by_addr) {
            (Stage::Pre | Stage::Out, true) => {
                format!("{ip} daddr . meta l4proto . th dport vmap @{name}")
            }
            (Stage::Pre, false) => format!(
                "fib daddr type local meta nfproto {nf} meta l4proto . th dport vmap @{name}"
            ),
            (Stage::Out, false) => {
                // Loopback is local too: never take a local connection to a resolver on
                // 127.0.0.53 (a loopback listen_address must be named).
                let lo = match self.family {
                    Family::V4 => "127.0.0.0/8",
                    Family::V6 => "::1",
                };
                format!("fib daddr type local meta nfproto {nf} {ip} daddr != {lo} meta l4proto . th dport vmap @{name}")
            }
            (Stage::Post, by_addr) => {
                let proto = self.proto.map_or("tcp", Proto::name);
                let key = if by_addr {
                    format!("ct original {ip} daddr . ct original proto-dst")
                } else {
                    "ct original proto-dst".to_string()
                };
                format!("meta nfproto {nf} meta l4proto {proto} ct status dnat {key} vmap @{name}")
            }
        }
    }

    /// What a plain forward's DNAT rules match before the lookup: a local destination of the
    /// family (never loopback for locally made connections: a resolver on 127.0.0.53), TCP
    /// or UDP (nft 0.9.8 types the port only after a protocol match).
    fn local_match(&self) -> String {
        let ip = self.family.nft_family();
        let nf = nfproto(self.family);
        let lo = match (self.stage, self.family) {
            (Stage::Out, Family::V4) => format!(" {ip} daddr != 127.0.0.0/8"),
            (Stage::Out, Family::V6) => format!(" {ip} daddr != ::1"),
            _ => String::new(),
        };
        format!("fib daddr type local meta nfproto {nf}{lo} meta l4proto {{ tcp, udp }}")
    }

    /// Rule order inside a base chain: listen addresses before any-address, IPv4 first,
    /// single ports before ranges, a mark before its DNAT.
    pub(crate) fn rank(&self) -> (bool, Family, Option<Proto>, bool, Data) {
        (
            !self.by_addr,
            self.family,
            self.proto,
            self.ranged,
            self.data,
        )
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// What a forward's NAT rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NatTo {
    Dnat {
        addr: IpAddr,
        port: Option<u16>,
    },
    /// DNAT to the backend a draw picks from the pool's map ([`super::pool`]).
    Pool(Arc<Pool>),
    Redirect {
        port: u16,
    },
}

/// A forward's DNAT or REDIRECT, in its own chain (`pre-<name>`, `out-<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatRule {
    pub family: Family,
    pub sources: Vec<Cidr>,
    pub in_interface: Option<String>,
    pub protos: Vec<Proto>,
    /// The conntrack mark bit set on the flow (`allow_forward`).
    pub mark: Option<u32>,
    pub to: NatTo,
}

/// A forward's source NAT (`post-<name>`): only the DNATed flow to its backend (any of a
/// pool's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnatRule {
    pub family: Family,
    pub backends: SnatMatch,
    /// None: masquerade.
    pub to: Option<IpAddr>,
}

/// Which backends an SNAT rule matches, each list in the order nft's listing is compared in
/// (by text: nft lists an anonymous set's elements in its hash order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SnatMatch {
    /// Addresses that all receive on the same ports (`ip daddr 10.0.0.1 th dport 80`).
    Addrs(Vec<IpAddr>, PortRange),
    /// Addresses each with its own port (`ip daddr . th dport { 10.0.0.1 . 80, ... }`).
    Pairs(Vec<(IpAddr, u16)>),
}

impl SnatMatch {
    /// The match for these backends (`port` None: the listen ports).
    pub(crate) fn of(backends: &[(IpAddr, Option<u16>)], listen: PortRange) -> SnatMatch {
        let ports: Vec<PortRange> = backends
            .iter()
            .map(|(_, p)| p.map_or(listen, PortRange::single))
            .collect();
        if ports.windows(2).all(|w| w[0] == w[1]) {
            let mut addrs: Vec<IpAddr> = backends.iter().map(|(a, _)| *a).collect();
            addrs.sort_by_cached_key(ToString::to_string);
            addrs.dedup();
            return SnatMatch::Addrs(addrs, ports.first().copied().unwrap_or(listen));
        }
        let mut pairs: Vec<(IpAddr, u16)> = backends
            .iter()
            .map(|&(a, p)| (a, p.unwrap_or(listen.first)))
            .collect();
        pairs.sort_by_cached_key(|(a, p)| format!("{a} . {p}"));
        SnatMatch::Pairs(pairs)
    }
}

/// A masquerade entry (in `postrouting`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MasqRule {
    pub source: Cidr,
    pub out_interface: Option<String>,
    pub to: Option<IpAddr>,
}

/// A masquerade entry's flows marked for the FORWARD accept (in `forward`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MasqMark {
    pub source: Cidr,
    pub out_interface: Option<String>,
    pub mark: u32,
}

/// What a rule is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// The rule of a map: a verdict map's dispatch, a plain forward's DNAT or SNAT lookup.
    Dispatch(MapKind),
    /// The rule of a mark set: marks the flows found in it.
    Mark(MapKind, u32),
    Nat(NatRule),
    Snat(SnatRule),
    Masquerade(MasqRule),
    MasqMark(MasqMark),
    /// kube-proxy's guard with route_localnet on: only DNATed packets to 127.0.0.0/8 from
    /// that interface reach local services.
    LocalnetGuard {
        in_interface: String,
    },
    /// One of ours whose shape portfwd does not know (edited by hand): it can be deleted, not
    /// written again.
    Unknown,
}

fn ports_text(ports: PortRange) -> String {
    ports.user_text()
}

/// `a` alone, or `{ a, b }`: how nft writes one value or a set.
pub(crate) fn set_text<T: ToString>(items: &[T]) -> String {
    match items {
        [one] => one.to_string(),
        many => format!(
            "{{ {} }}",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn dest_text(family: Family, addr: IpAddr, port: Option<u16>) -> String {
    match (family, port) {
        (Family::V6, Some(p)) => format!("[{addr}]:{p}"),
        (_, Some(p)) => format!("{addr}:{p}"),
        (_, None) => addr.to_string(),
    }
}

impl Body {
    /// The rule in nft's language, without its comment; None when it cannot be written
    /// ([`Body::Unknown`], or a name [`quoted`] refuses).
    pub(crate) fn render(&self) -> Option<String> {
        let mut out = String::new();
        match self {
            Body::Dispatch(kind) => out.push_str(&kind.dispatch_rule()),
            Body::Mark(kind, mark) => {
                let _ = write!(
                    out,
                    "{} ct mark set ct mark | {mark:#010x}",
                    kind.dispatch_rule()
                );
            }
            Body::Nat(n) => {
                let ip = n.family.nft_family();
                if !n.sources.is_empty() {
                    let _ = write!(out, "{ip} saddr {} ", set_text(&n.sources));
                }
                if let Some(i) = &n.in_interface {
                    let _ = write!(out, "iifname {} ", quoted(&interface(i))?);
                }
                let protos: Vec<&str> = n.protos.iter().map(|p| p.name()).collect();
                let _ = write!(out, "meta l4proto {} ", set_text(&protos));
                if let Some(mark) = n.mark {
                    let _ = write!(out, "ct mark set ct mark | {mark:#010x} ");
                }
                out.push_str("counter ");
                match &n.to {
                    NatTo::Dnat { addr, port } => {
                        let _ = write!(out, "dnat {ip} to {}", dest_text(n.family, *addr, *port));
                    }
                    NatTo::Pool(pool) => {
                        // nft 0.9.8 types concatenated data only when told: `addr . port`.
                        let to = match pool.backends.first().and_then(|b| b.port) {
                            Some(_) => "addr . port to",
                            None => "to",
                        };
                        let _ = write!(
                            out,
                            "dnat {ip} {to} {} map {}",
                            super::pool::draw(pool, n.family),
                            super::pool::map_text(pool)
                        );
                    }
                    NatTo::Redirect { port } => {
                        let _ = write!(out, "redirect to :{port}");
                    }
                }
            }
            Body::Snat(s) => {
                let ip = s.family.nft_family();
                let _ = match &s.backends {
                    SnatMatch::Addrs(addrs, ports) => write!(
                        out,
                        "{ip} daddr {} th dport {} counter ",
                        set_text(addrs),
                        ports_text(*ports)
                    ),
                    SnatMatch::Pairs(pairs) => {
                        let items: Vec<String> =
                            pairs.iter().map(|(a, p)| format!("{a} . {p}")).collect();
                        write!(out, "{ip} daddr . th dport {} counter ", set_text(&items))
                    }
                };
                match s.to {
                    None => out.push_str("masquerade"),
                    Some(to) => {
                        let _ = write!(out, "snat {ip} to {to}");
                    }
                }
            }
            Body::Masquerade(m) => {
                let ip = m.source.family().nft_family();
                let _ = write!(out, "{ip} saddr {} ", m.source);
                if let Some(o) = &m.out_interface {
                    let _ = write!(out, "oifname {} ", quoted(&interface(o))?);
                }
                out.push_str("counter ");
                match m.to {
                    None => out.push_str("masquerade"),
                    Some(to) => {
                        let _ = write!(out, "snat {ip} to {to}");
                    }
                }
            }
            Body::MasqMark(m) => {
                let ip = m.source.family().nft_family();
                let _ = write!(out, "{ip} saddr {} ", m.source);
                if let Some(o) = &m.out_interface {
                    let _ = write!(out, "oifname {} ", quoted(&interface(o))?);
                }
                let _ = write!(out, "ct mark set ct mark | {:#010x}", m.mark);
            }
            Body::LocalnetGuard { in_interface } => {
                let _ = write!(
                    out,
                    "iifname {} ip daddr 127.0.0.0/8 ct state & (established | related) == 0 ct status & dnat == 0 counter drop",
                    quoted(&interface(in_interface))?
                );
            }
            Body::Unknown => return None,
        }
        Some(out)
    }
}

/// A rule and its owner's comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub comment: String,
    pub body: Body,
}

/// A map or set element: the key and what it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    /// The listen address (maps keyed by address).
    pub addr: Option<IpAddr>,
    /// The protocol (pre/out maps; SNAT maps are per protocol).
    pub proto: Option<Proto>,
    pub ports: PortRange,
    /// The backend's address and port, the end of a plain forward's SNAT key.
    pub backend: Option<(IpAddr, u16)>,
    pub target: Target,
}

/// What an element maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A verdict map's jump to a forward's chain.
    Jump(String),
    /// A DNAT map's backend.
    To(IpAddr, u16),
    /// An SNAT map's source address.
    Source(IpAddr),
    /// A set's element: nothing.
    Member,
}

impl Element {
    /// The key in nft's language (`10.0.0.1 . tcp . 8000-8010`, `4321 . 10.0.0.2 . 1234`).
    pub(crate) fn key(&self) -> String {
        let mut out = String::new();
        self.write_key(&mut out);
        out
    }

    /// Appends the key to `out`: compiling 50,000 forwards writes it for each element, so
    /// without a string per part.
    pub(crate) fn write_key(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut sep = "";
        if let Some(a) = self.addr {
            let _ = write!(out, "{a}");
            sep = " . ";
        }
        if let Some(p) = self.proto {
            let _ = write!(out, "{sep}{}", p.name());
            sep = " . ";
        }
        let _ = write!(out, "{sep}{}", self.ports.first);
        if !self.ports.is_single() {
            let _ = write!(out, "-{}", self.ports.last);
        }
        if let Some((addr, port)) = self.backend {
            let _ = write!(out, " . {addr} . {port}");
        }
    }

    /// The chain a verdict element jumps to.
    pub(crate) fn chain(&self) -> Option<&str> {
        match &self.target {
            Target::Jump(chain) => Some(chain),
            _ => None,
        }
    }
}

/// A map's elements by comment: a persistent tree, so a copy shares every node with its
/// original until it is edited, and comparing the two visits only the nodes that differ (a
/// change among 50,000 forwards copied and walked 150,000 elements twice).
pub(crate) type Elements = imbl::OrdMap<String, Element>;

/// The elements whose comment starts with `prefix` (an entry's: `entry_prefix`), found by a
/// descent of the tree, not a scan.
pub(crate) fn with_prefix<'a>(
    elements: &'a Elements,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Element)> {
    elements
        .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(comment, _)| comment.starts_with(prefix))
}

/// An instance's table: maps (name → element comment → element) and chains (name → rules in
/// order). Base chains are named after their hook ([`Base`]); the others belong to one entry.
///
/// Shared, not copied: a current read cache makes the desired table the observed one too, and
/// a deep copy of 50,000 forwards' objects cost a tenth of a no-op run. Edits go through
/// [`Arc::make_mut`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Table {
    pub maps: Arc<BTreeMap<String, Elements>>,
    pub chains: Arc<BTreeMap<String, Vec<Rule>>>,
}

impl Table {
    pub(crate) fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.chains.is_empty()
    }

    /// Whether finding `entries` entries' elements by their comments' prefix (a descent of
    /// each map's tree per entry) costs less than a scan of every element.
    pub(crate) fn lookups_pay(&self, entries: usize) -> bool {
        let elements: usize = self.maps.values().map(Elements::len).sum();
        entries.saturating_mul(self.maps.len()).saturating_mul(8) <= elements
    }

    /// The whole table as one `nft -f` script (`nft list table` reads much the same).
    #[cfg(test)]
    pub(crate) fn script(&self, table: &str) -> String {
        let mut out = format!("table {FAMILY} {table} {{\n");
        for (name, elements) in self.maps.iter() {
            let decl = MapKind::from_name(name)
                .map(|k| k.declaration())
                .unwrap_or_default();
            let object = MapKind::from_name(name).map_or("map", |k| k.object());
            let _ = writeln!(out, "\t{object} {name} {{ {decl}");
            if !elements.is_empty() {
                let items: Vec<String> = elements
                    .iter()
                    .filter_map(|(comment, e)| element_text(comment, e))
                    .collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(", "));
            }
            out.push_str("\t}\n");
        }
        for (name, rules) in self.chains.iter() {
            let _ = writeln!(out, "\tchain {} {{", ident(name).unwrap_or_default());
            if let Some(base) = Base::from_name(name) {
                let _ = writeln!(out, "\t\t{}", base.declaration());
            }
            for rule in rules {
                if let Some(text) = rule_text(rule) {
                    let _ = writeln!(out, "\t\t{text}");
                }
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }
}

/// `<body> comment "<comment>"`.
pub(crate) fn rule_text(rule: &Rule) -> Option<String> {
    Some(format!(
        "{} comment {}",
        rule.body.render()?,
        quoted(&rule.comment)?
    ))
}

/// `<key> comment "<comment>"`, then ` : jump <chain>`, ` : <addr> . <port>`, ` : <addr>`
/// or nothing (a set).
pub(crate) fn element_text(comment: &str, element: &Element) -> Option<String> {
    let data = match &element.target {
        Target::Jump(chain) => format!(" : jump {}", ident(chain)?),
        Target::To(addr, port) => format!(" : {addr} . {port}"),
        Target::Source(addr) => format!(" : {addr}"),
        Target::Member => String::new(),
    };
    Some(format!(
        "{} comment {}{data}",
        element.key(),
        quoted(comment)?
    ))
}
