//! Every check of the params, collected rather than stopping at the first: each problem is a
//! typed value (`path`, `value`, `reason`) rendered once, so the user fixes everything in one go
//! and nothing reaches the system unless the whole input is valid.

use std::collections::HashSet;
use std::fmt::{self, Display};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::Value;

use super::config::*;
use super::params::*;
use super::spelling::integer_of;
use super::Invalid;
use crate::net::{Cidr, CidrError, Family, PortRange};
use crate::ownership::{valid_instance, INSTANCE_RULE};
use routing::{validate_addresses, validate_policy_routes};

mod routing;

impl Params {
    /// Checks every field and returns the typed config, or every problem found.
    pub fn validate(&self) -> Result<Config, Invalid> {
        let mut errors = Errors::default();
        if !valid_instance(&self.instance) {
            errors.push("instance", &self.instance, INSTANCE_RULE.into());
        }
        let mut ignored = std::collections::BTreeSet::new();
        for (i, f) in self.forwards.iter().enumerate() {
            if f.ignore_findings.is_empty() {
                continue;
            }
            let path = format!("forwards[{i}].ignore_findings");
            ignored.extend(
                validate_ignored(&path, &f.ignore_findings, &mut errors)
                    .map(|id| (format!("forwards.{}", f.name), id)),
            );
        }
        for (i, m) in self.masquerade.iter().enumerate() {
            if m.ignore_findings.is_empty() {
                continue;
            }
            let path = format!("masquerade[{i}].ignore_findings");
            ignored.extend(
                validate_ignored(&path, &m.ignore_findings, &mut errors)
                    .map(|id| (format!("masquerade.{}", m.name), id)),
            );
        }
        let mut names = HashSet::new();
        let forwards: Vec<Forward> = self
            .forwards
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let path = At("forwards", i);
                if !names.insert(f.name.as_str()) {
                    errors.push(
                        format_args!("{path}.name"),
                        &f.name,
                        "is a duplicate name".into(),
                    );
                }
                validate_forward(path, f, &mut errors)
            })
            .collect();
        check_dispatch_overlaps(&forwards, &self.forwards, &mut errors);
        if self.backend.canonical().is_nftables() {
            for (i, f) in self.forwards.iter().enumerate() {
                if f.persistence.is_some()
                    && !f.backends.is_empty()
                    && f.balance != Balance::SourceHash
                {
                    errors.field(
                        format_args!("{}.persistence", At("forwards", i)),
                        "is not built for the nftables backend yet: use `backend: iptables`, or `balance: source-hash` (each client address always reaches one backend)",
                    );
                }
            }
        } else {
            let backend = self.backend.canonical().name();
            for f in &forwards {
                if let Action::Pool { pool, .. } = &f.action {
                    let i = (self.forwards.iter().position(|p| p.name == f.name)).unwrap_or(0);
                    if let Some(why) = iptables_pool_refusal(pool, backend) {
                        errors.field(format_args!("{}.balance", At("forwards", i)), &why);
                    }
                }
            }
        }
        let mut names = HashSet::new();
        let masquerades = self
            .masquerade
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let path = At("masquerade", i);
                if !names.insert(m.name.as_str()) {
                    errors.push(
                        format_args!("{path}.name"),
                        &m.name,
                        "is a duplicate name".into(),
                    );
                }
                validate_masquerade(path, m, &mut errors)
            })
            .collect();
        let addresses = validate_addresses(&self.addresses, &mut errors);
        let policy_routes = validate_policy_routes(&self.policy_routes, &mut errors);
        let route_protocol = match self.route_protocol {
            Some(p) if p <= 4 => {
                errors.push_json(
                    "route_protocol",
                    &Value::from(p),
                    "is reserved by the kernel (use 5-255)".into(),
                );
                0
            }
            Some(p) => p,
            None => default_route_protocol(&self.instance),
        };
        let conn_mark = match &self.conn_mark {
            None => DEFAULT_CONN_MARK,
            Some(v) => match parse_conn_mark(v, &mut errors) {
                Some(bit) if bit.is_power_of_two() => bit,
                Some(bit) => {
                    errors.push(
                        "conn_mark",
                        &format!("{bit:#x}"),
                        "must be exactly one bit (a power of two, like 0x2000)".into(),
                    );
                    DEFAULT_CONN_MARK
                }
                None => DEFAULT_CONN_MARK,
            },
        };
        errors.finish()?;
        Ok(Config {
            state: self.state,
            instance: self.instance.clone(),
            ip_forward: self.ip_forward,
            backend: self.backend.canonical(),
            backend_alias: (self.backend.canonical() != self.backend).then_some(self.backend),
            forwards,
            masquerades,
            addresses,
            policy_routes,
            persist: self.persist,
            route_protocol,
            conn_mark,
            persisted: (self.persist && self.state == State::Present)
                .then(|| serde_json::to_string_pretty(self).unwrap_or_default()),
            source: serde_json::to_string(self).unwrap_or_default(),
            ignored,
        })
    }
}

/// The known finding ids of an `ignore_findings` list; an unknown one is a problem naming the
/// ids it may be.
fn validate_ignored<'a>(
    path: &'a str,
    ids: &'a [String],
    errors: &mut Errors,
) -> impl Iterator<Item = &'static str> + 'a {
    let mut known = Vec::new();
    for (j, id) in ids.iter().enumerate() {
        match ENTRY_FINDINGS.iter().find(|k| **k == id.as_str()) {
            Some(k) => known.push(*k),
            None => errors.push(
                format_args!("{path}[{j}]"),
                id,
                format!(
                    "is not a finding about one entry; use one of {}",
                    ENTRY_FINDINGS.join(", ")
                ),
            ),
        }
    }
    known.into_iter()
}

/// One thing wrong with the input: where, the value found (when there is one), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field path, `forwards[2].to`; empty for the input as a whole.
    pub path: String,
    /// The value found as a message shows it: a string quoted and escaped, a number bare.
    pub value: Option<String>,
    pub reason: String,
}

impl Problem {
    /// A problem with the input as a whole (not JSON, not an object).
    pub fn whole(reason: impl Into<String>) -> Problem {
        Problem {
            path: String::new(),
            value: None,
            reason: reason.into(),
        }
    }
}

/// Rendered once, as `path: "value" reason` (`path: 70000 reason` for a number). Debug
/// formatting of a string value escapes quotes, newlines and NULs, so a message stays one line
/// whatever the user wrote.
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.value, self.path.is_empty()) {
            (Some(value), _) => write!(f, "{}: {value} {}", self.path, self.reason),
            (None, false) => write!(f, "{}: {}", self.path, self.reason),
            (None, true) => f.write_str(&self.reason),
        }
    }
}

/// An entry's place in the params (`forwards[3]`), written out only for a problem: 50,000
/// valid forwards spent a tenth of their parsing formatting the paths of fields that had none.
#[derive(Clone, Copy)]
struct At(&'static str, usize);

impl Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// The problems found so far.
#[derive(Default)]
struct Errors(Vec<Problem>);

impl Errors {
    fn push(&mut self, path: impl Display, value: &str, reason: String) {
        self.0.push(Problem {
            path: path.to_string(),
            value: Some(format!("{value:?}")),
            reason,
        });
    }

    /// A problem with a JSON value as written: a number stays a number in the message.
    fn push_json(&mut self, path: impl Display, value: &Value, reason: String) {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        self.0.push(Problem {
            path: path.to_string(),
            value: Some(shown),
            reason,
        });
    }

    /// A problem of a field as a whole (a missing or conflicting part), no single value.
    fn field(&mut self, path: impl Display, reason: &str) {
        self.0.push(Problem {
            path: path.to_string(),
            value: None,
            reason: reason.to_string(),
        });
    }

    fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid(self.0))
        }
    }
}

/// Two forwards may not claim the same (family, listen address, protocol, port): the nftables
/// backend finds a connection's forward by one map lookup (a key has one forward), and with
/// iptables the later one would never see a connection the earlier one takes.
/// (family, listen address, protocol): the part of a dispatch key that must match exactly.
type ListenKey = (Family, Option<std::net::IpAddr>, Proto);

fn check_dispatch_overlaps(forwards: &[Forward], params: &[ForwardParams], errors: &mut Errors) {
    let mut keys: Vec<(ListenKey, u16, u16, &str)> = forwards
        .iter()
        .flat_map(|f| {
            f.protos.iter().map(move |&p| {
                let key = (f.family, f.listen_address, p);
                (
                    key,
                    f.listen_port.first,
                    f.listen_port.last,
                    f.name.as_str(),
                )
            })
        })
        .collect();
    keys.sort_unstable();
    let mut reported = HashSet::new();
    // The entry reaching furthest so far among those of the same key.
    let mut covering: Option<(ListenKey, u16, &str)> = None;
    for &(key, first, last, name) in &keys {
        let (_, addr, proto) = key;
        match covering {
            Some((ckey, clast, other)) if ckey == key && first <= clast => {
                if other != name && reported.insert(name) {
                    let index = params.iter().position(|p| p.name == name).unwrap_or(0);
                    let addr = addr.map_or("(any local address)".to_string(), |a| a.to_string());
                    errors.push(
                        format!("forwards[{index}].listen_port"),
                        &PortRange { first, last }.user_text(),
                        format!("overlaps forward {other:?} on {} {addr}: each port of a listen address goes to one forward, so one of them would never get a connection (merge them, or give them other ports or listen addresses)", proto.name()),
                    );
                }
                if last > clast {
                    covering = Some((key, last, name));
                }
            }
            _ => covering = Some((key, last, name)),
        }
    }
}

fn valid_token(text: &str, max: usize, allowed: impl Fn(char) -> bool) -> bool {
    !text.is_empty() && text.len() <= max && text.chars().all(allowed)
}

fn valid_name(name: &str) -> bool {
    valid_token(name, 32, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
    })
}

/// Linux interface names: at most 15 bytes, no slash or whitespace; we also refuse anything
/// outside `[A-Za-z0-9_.-]` (plus iptables' trailing `+` wildcard) so no shell or restore
/// metacharacter can ever reach a payload.
fn valid_interface(name: &str) -> bool {
    let body = name.strip_suffix('+').unwrap_or(name);
    valid_token(body, 15, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
    }) && body != "."
        && body != ".."
}

fn parse_ip(path: impl Display + Copy, text: &str, errors: &mut Errors) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            let hint = if text.chars().any(|c| c.is_ascii_alphabetic()) && !text.contains(':') {
                " (hostnames are refused: DNS at apply time is not idempotent)"
            } else {
                ""
            };
            errors.push(path, text, format!("is not an IP address{hint}"));
            None
        }
    }
}

fn parse_cidr(path: impl Display + Copy, text: &str, errors: &mut Errors) -> Option<Cidr> {
    match Cidr::parse(text) {
        Ok(c) => Some(c),
        Err(CidrError::Syntax) => {
            errors.push(path, text, "is not an IP address or CIDR".into());
            None
        }
        Err(CidrError::Prefix) => {
            errors.push(path, text, "has an invalid prefix length".into());
            None
        }
        Err(CidrError::HostBits(net)) => {
            errors.push(
                path,
                text,
                format!("has host bits set (did you mean {net}?)"),
            );
            None
        }
    }
}

fn parse_port_number(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p >= 1)
}

fn parse_port_value(path: impl Display + Copy, value: &Value, errors: &mut Errors) -> Option<u16> {
    let port = match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p >= 1),
        Value::String(s) => parse_port_number(s),
        _ => None,
    };
    if port.is_none() {
        errors.push_json(path, value, "is not a port (1-65535)".into());
    }
    port
}

fn parse_port_range(
    path: impl Display + Copy,
    value: &Value,
    errors: &mut Errors,
) -> Option<PortRange> {
    if let Value::String(s) = value {
        if let Some((a, b)) = s.split_once('-') {
            let range = parse_port_number(a)
                .zip(parse_port_number(b))
                .map(|(first, last)| PortRange { first, last });
            return match range {
                Some(r) if r.first <= r.last => Some(r),
                Some(_) => {
                    errors.push(
                        path,
                        s,
                        "is a reversed range (first port above last)".into(),
                    );
                    None
                }
                None => {
                    errors.push(path, s, "is not a port range FIRST-LAST (1-65535)".into());
                    None
                }
            };
        }
    }
    parse_port_value(path, value, errors).map(PortRange::single)
}

/// Parses `IP:PORT`, `[IPv6]:PORT`, `IP` or `[IPv6]`.
fn parse_target(
    path: impl Display + Copy,
    text: &str,
    errors: &mut Errors,
) -> Option<(IpAddr, Option<u16>)> {
    let (addr_text, port_text) = if let Some(rest) = text.strip_prefix('[') {
        match rest.split_once(']') {
            Some((a, "")) => (a, None),
            Some((a, p)) if p.starts_with(':') => (a, Some(&p[1..])),
            _ => {
                errors.push(path, text, "is not IP:PORT, [IPv6]:PORT or IP".into());
                return None;
            }
        }
    } else if text.matches(':').count() == 1 {
        let (a, p) = text.split_once(':')?;
        (a, Some(p))
    } else {
        // `fd10:2::2:1234` is an IPv6 address, and also `fd10:2::2` with port 1234: refused
        // rather than guessed.
        let split = text.rsplit_once(':').filter(|(a, p)| {
            a.parse::<std::net::Ipv6Addr>().is_ok() && parse_port_number(p).is_some()
        });
        if let Some((a, p)) = split {
            errors.push(
                path,
                text,
                format!("is ambiguous: write \"[{a}]:{p}\" for an IPv6 address with a port, or \"[{text}]\" for the address alone"),
            );
            return None;
        }
        (text, None)
    };
    let addr = parse_ip(path, addr_text, errors)?;
    if text.starts_with('[') && addr.is_ipv4() {
        errors.push(path, text, "uses brackets around an IPv4 address".into());
        return None;
    }
    let port = match port_text {
        None => None,
        Some(p) => match parse_port_number(p) {
            Some(p) => Some(p),
            None if p.split_once('-').is_some_and(|(a, b)| {
                parse_port_number(a).is_some() && parse_port_number(b).is_some()
            }) =>
            {
                errors.push(path, text, "has a port range: translating a listen range to another range is not supported; give one port (every listen port goes to it) or the address alone (each connection keeps its listen port)".into());
                return None;
            }
            None => {
                errors.push(path, text, "has an invalid port (1-65535)".into());
                return None;
            }
        },
    };
    Some((addr, port))
}

fn check_interface(path: impl Display + Copy, name: &Option<String>, errors: &mut Errors) {
    if let Some(name) = name {
        if name == "all" || name == "default" {
            errors.push(
                path,
                name,
                "is not an interface: `all` and `default` name every interface in sysctl paths (conf/all, conf/default)".into(),
            );
        } else if !valid_interface(name) {
            errors.push(
                path,
                name,
                "is not an interface name ([A-Za-z0-9_.-], at most 15 characters, optional trailing +)"
                    .into(),
            );
        }
    }
}

/// Records the family each address implies and reports the first one that disagrees.
struct FamilyCheck<P> {
    path: P,
    seen: Option<(Family, String)>,
}

impl<P: Display> FamilyCheck<P> {
    fn note(&mut self, field: &str, family: Family, errors: &mut Errors, value: &str) {
        match &self.seen {
            None => self.seen = Some((family, field.to_string())),
            Some((f, first)) if *f != family => errors.push(
                format_args!("{}.{field}", self.path),
                value,
                format!(
                    "is {} but {first} is {}: one entry cannot mix address families",
                    family.label(),
                    f.label()
                ),
            ),
            Some(_) => {}
        }
    }
}

/// Forward `index` of params already known valid as a whole (an earlier run's): the forward
/// alone, None if it has a problem.
pub(crate) fn forward_of(index: usize, f: &ForwardParams) -> Option<Forward> {
    let mut errors = Errors::default();
    let forward = validate_forward(At("forwards", index), f, &mut errors);
    forward.filter(|_| errors.0.is_empty())
}

fn validate_forward(
    path: impl Display + Copy,
    f: &ForwardParams,
    errors: &mut Errors,
) -> Option<Forward> {
    let before = errors.0.len();
    if !valid_name(&f.name) {
        errors.push(
            format_args!("{path}.name"),
            &f.name,
            "must match [A-Za-z0-9_.-]{1,32}".into(),
        );
    }
    let listen_port = parse_port_range(format_args!("{path}.listen_port"), &f.listen_port, errors);
    let mut families = FamilyCheck { path, seen: None };
    let listen_address = f.listen_address.as_ref().and_then(|a| {
        let ip = parse_ip(format_args!("{path}.listen_address"), a, errors)?;
        families.note("listen_address", Family::of(&ip), errors, a);
        Some(ip)
    });
    check_interface(format_args!("{path}.in_interface"), &f.in_interface, errors);
    let mut sources = Vec::new();
    for (j, s) in f.sources.iter().enumerate() {
        if let Some(c) = parse_cidr(format_args!("{path}.sources[{j}]"), s, errors) {
            families.note(&format!("sources[{j}]"), c.family(), errors, s);
            if sources.contains(&c) {
                errors.push(
                    format_args!("{path}.sources[{j}]"),
                    s,
                    "is listed twice".into(),
                );
            }
            sources.push(c);
        }
    }
    // `0.0.0.0/0` (or `::/0`) lets everyone in, which is what no `sources` says: iptables
    // prints no `-s` for it, so keeping it would make `show` disagree with the params.
    if sources.iter().any(|c| c.prefix == 0) {
        sources.clear();
    }
    // The fewest prefixes for the same addresses: nft merges adjacent networks, so this is
    // the form that reads back as written (and iptables needs fewer rules).
    let sources = crate::net::minimal_cover(&sources);
    if f.balance != Balance::Random && f.backends.is_empty() {
        errors.push(
            format_args!("{path}.balance"),
            f.balance.name(),
            "applies only to a pool: give `backends` instead of `to`".into(),
        );
    }
    let pool = !f.backends.is_empty();
    if f.persistence.is_some() && !pool {
        errors.field(
            format_args!("{path}.persistence"),
            "applies only to a pool: give `backends` instead of `to`",
        );
    }
    let action = match (&f.to, &f.redirect_to_port, pool) {
        (Some(_), Some(_), _) => {
            errors.push(
                format_args!("{path}.to"),
                f.to.as_deref().unwrap_or_default(),
                "and redirect_to_port are exclusive: give exactly one".into(),
            );
            None
        }
        (Some(_), None, true) | (None, Some(_), true) => {
            let other = if f.to.is_some() {
                "to"
            } else {
                "redirect_to_port"
            };
            errors.field(
                format_args!("{path}.backends"),
                &format!(
                    "and `{other}` are exclusive: give `to` for one backend, `backends` for a pool"
                ),
            );
            None
        }
        (None, None, false) => {
            errors.field(
                path,
                "one of `to`, `backends` or `redirect_to_port` is required",
            );
            None
        }
        (Some(to), None, false) => {
            let target = parse_target(format_args!("{path}.to"), to, errors);
            if let Some((addr, _)) = target {
                families.note("to", Family::of(&addr), errors, to);
            }
            target
                .zip(parse_snat(path, f, &mut families, errors))
                .map(|((addr, port), snat)| Action::Dnat { addr, port, snat })
        }
        (None, None, true) => {
            let pool = validate_pool(path, f, &mut families, errors);
            pool.zip(parse_snat(path, f, &mut families, errors))
                .map(|(pool, snat)| Action::Pool {
                    pool: Arc::new(pool),
                    snat,
                })
        }
        (None, Some(port), _) => {
            if let Some(snat) = &f.snat {
                errors.push(
                    format_args!("{path}.snat"),
                    snat,
                    "applies only to `to` forwards, not to redirect_to_port".into(),
                );
            }
            parse_port_value(format_args!("{path}.redirect_to_port"), port, errors)
                .map(|port| Action::Redirect { port })
        }
    };
    // A connection of this host's own to a loopback address, DNATed to another host, keeps its
    // loopback source: the kernel drops it on the way out (IPv4 unless route_localnet is set
    // on the outgoing interface, IPv6 always). Nothing would say so: refuse it.
    let elsewhere = action.as_ref().and_then(|a| {
        a.backends()
            .into_iter()
            .find(|(addr, _)| !addr.is_loopback())
    });
    if let (true, Some(listen), Some((addr, _))) = (f.local, listen_address, elsewhere) {
        if listen.is_loopback() {
            let why = match listen {
                std::net::IpAddr::V6(_) => "the kernel never routes a packet from ::1 off this host (IPv6 has no route_localnet)".to_string(),
                std::net::IpAddr::V4(_) => format!("a packet from {listen} may not leave this host (the kernel drops it unless net.ipv4.conf.<outgoing interface>.route_localnet=1, which also opens this host's loopback services to that interface's neighbours)"),
            };
            errors.push(
                format_args!("{path}.listen_address"),
                &listen.to_string(),
                format!("with local: true cannot be forwarded to {addr}, another host: {why}; listen on one of this host's own addresses (or leave listen_address out), or forward to a port on loopback"),
            );
        }
    }
    if errors.0.len() != before {
        return None;
    }
    let protos = match f.proto {
        ProtoParam::Tcp => vec![Proto::Tcp],
        ProtoParam::Udp => vec![Proto::Udp],
        ProtoParam::Both => vec![Proto::Tcp, Proto::Udp],
    };
    Some(Forward {
        name: f.name.clone(),
        family: families.seen.map_or(Family::V4, |(f, _)| f),
        protos,
        listen_port: listen_port?,
        listen_address,
        in_interface: f.in_interface.clone(),
        sources,
        action: action?,
        local: f.local,
        allow_forward: f.allow_forward,
        reset_connections: f.reset_connections,
    })
}

/// A `to` forward's or pool's `snat`.
fn parse_snat<P: Display + Copy>(
    path: P,
    f: &ForwardParams,
    families: &mut FamilyCheck<P>,
    errors: &mut Errors,
) -> Option<Snat> {
    match f.snat.as_deref() {
        None | Some("masquerade") => Some(Snat::Masquerade),
        Some("none") => Some(Snat::None),
        Some(text) => match text.parse::<IpAddr>() {
            Ok(ip) => {
                families.note("snat", Family::of(&ip), errors, text);
                Some(Snat::To(ip))
            }
            Err(_) => {
                errors.push(
                    format_args!("{path}.snat"),
                    text,
                    "is not one of \"masquerade\" (the default), \"none\" (the backend sees the client) or an IP address to SNAT to".into(),
                );
                None
            }
        },
    }
}

/// Most backends a pool may have: the nftables backend picks one with one map lookup, the
/// iptables backend walks a rule per backend (more for some round-robin weights, see
/// [`Pool::nth_cascade`], and a lookup per live backend with `persistence`).
pub(crate) const MAX_BACKENDS: usize = 256;

/// Most rules an iptables round-robin pool's cascade may put on a new connection's path: one
/// per backend of the largest pool (`persistence` adds a lookup per live backend before it).
const MAX_NTH_RULES: usize = MAX_BACKENDS;

/// Why the iptables backend cannot install a pool (None: it can).
///
/// A source hash would take one `-m cluster` rule per bucket, and `iptables-save` prints
/// those rules in a form `iptables-restore` refuses (a node mask above 32): a saved ruleset
/// of the host would no longer load. A round-robin whose weights make a long cascade (see
/// [`Pool::nth_cascade`]) would walk a rule per unit of weight.
fn iptables_pool_refusal(pool: &Pool, backend: &str) -> Option<String> {
    match pool.balance {
        Balance::SourceHash => Some(format!(
            "is \"source-hash\", which the {backend} backend cannot install safely (iptables-save prints its per-bucket cluster rules in a form iptables-restore refuses); set `backend: nftables`, or use `random` or `round-robin`"
        )),
        Balance::RoundRobin if pool.nth_cascade().len() > MAX_NTH_RULES => Some(format!(
            "is \"round-robin\" with weights that take {} rules with the {backend} backend (at most {MAX_NTH_RULES}): use weights where each backend's share of the ones from it on is 1/k or (k-1)/k (such as 1:1:2 or 3:1), `random`, or `backend: nftables`",
            pool.nth_cascade().len()
        )),
        _ => None,
    }
}

/// A whole number in `min..=max`, as a number or a decimal string (Ansible's `int`).
fn bounded(value: &Value, min: u64, max: u64) -> Option<u64> {
    integer_of(value)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| (min..=max).contains(n))
}

/// Longest client affinity a pool may keep (a day, as kube-proxy allows).
const MAX_PERSISTENCE: u64 = 86_400;

/// A pool's `persistence`: seconds 1-86400 (a number, or digits in a string as Ansible's
/// extra vars give it), with `random` or `round-robin`.
fn validate_persistence<P: Display + Copy>(
    path: P,
    f: &ForwardParams,
    errors: &mut Errors,
) -> Option<u32> {
    let value = f.persistence.as_ref()?;
    let seconds = bounded(value, 1, MAX_PERSISTENCE).and_then(|s| u32::try_from(s).ok());
    if seconds.is_none() {
        errors.push_json(
            format_args!("{path}.persistence"),
            value,
            format!("is not a number of seconds (1-{MAX_PERSISTENCE})"),
        );
    }
    if f.balance == Balance::SourceHash {
        errors.field(
            format_args!("{path}.persistence"),
            "does not apply to `source-hash`, which keeps each client on one backend already: remove it, or use `random` or `round-robin`",
        );
    }
    seconds
}

/// Most a backend's weight may be.
const MAX_WEIGHT: u64 = 1000;

/// A pool's backends: one family (with the rest of the forward), a port on all or none, none
/// twice, weights 0-1000.
fn validate_pool<P: Display + Copy>(
    path: P,
    f: &ForwardParams,
    families: &mut FamilyCheck<P>,
    errors: &mut Errors,
) -> Option<Pool> {
    let before = errors.0.len();
    if f.backends.len() > MAX_BACKENDS {
        errors.field(
            format_args!("{path}.backends"),
            &format!(
                "has {} entries; a pool has at most {MAX_BACKENDS}",
                f.backends.len()
            ),
        );
    }
    let mut backends: Vec<PoolMember> = Vec::with_capacity(f.backends.len());
    let mut first_port: Option<Option<u16>> = None;
    for (j, b) in f.backends.iter().enumerate() {
        let target = parse_target(format_args!("{path}.backends[{j}].to"), &b.to, errors);
        let weight = match &b.weight {
            None => Some(1),
            Some(value) => {
                let w = bounded(value, 0, MAX_WEIGHT).and_then(|w| u16::try_from(w).ok());
                if w.is_none() {
                    errors.push_json(
                        format_args!("{path}.backends[{j}].weight"),
                        value,
                        format!("is not a weight (0-{MAX_WEIGHT}; 0 drains the backend)"),
                    );
                }
                w
            }
        };
        let (Some((addr, port)), Some(weight)) = (target, weight) else {
            continue;
        };
        families.note(
            &format!("backends[{j}].to"),
            Family::of(&addr),
            errors,
            &b.to,
        );
        match first_port {
            None => first_port = Some(port),
            Some(first) if first.is_some() != port.is_some() => {
                errors.push(
                    format_args!("{path}.backends[{j}].to"),
                    &b.to,
                    "and backends[0].to differ in giving a port: give every backend of a pool a port, or none (each connection then keeps its listen port)".into(),
                );
            }
            Some(_) => {}
        }
        if backends.iter().any(|o| o.addr == addr && o.port == port) {
            errors.push(
                format_args!("{path}.backends[{j}].to"),
                &b.to,
                "is listed twice: give each backend once, with the weight it should have".into(),
            );
        }
        backends.push(PoolMember { addr, port, weight });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        errors.field(
            format_args!("{path}.backends"),
            "has every weight 0: give at least one backend a weight above 0 (to take no new connections at all, remove the forward: open TCP connections still finish)",
        );
    }
    // Live backends first, in the order given: how the pool's map lists them back (drained
    // ones hold keys past the live ones), so the installed pool reads back equal.
    backends.sort_by_key(|b| b.weight == 0);
    let persistence = validate_persistence(path, f, errors);
    (errors.0.len() == before).then_some(Pool {
        backends,
        balance: f.balance,
        persistence,
    })
}

fn validate_masquerade(
    path: impl Display + Copy,
    m: &MasqueradeParams,
    errors: &mut Errors,
) -> Option<Masquerade> {
    let before = errors.0.len();
    if !valid_name(&m.name) {
        errors.push(
            format_args!("{path}.name"),
            &m.name,
            "must match [A-Za-z0-9_.-]{1,32}".into(),
        );
    }
    let source = parse_cidr(format_args!("{path}.source"), &m.source, errors);
    check_interface(
        format_args!("{path}.out_interface"),
        &m.out_interface,
        errors,
    );
    let to_source = m
        .to_source
        .as_ref()
        .and_then(|t| parse_ip(format_args!("{path}.to_source"), t, errors));
    if let (Some(s), Some(t)) = (source, to_source) {
        if s.family() != Family::of(&t) {
            errors.push(
                format_args!("{path}.to_source"),
                &t.to_string(),
                format!(
                    "is {} but source is {}: one entry cannot mix address families",
                    Family::of(&t).label(),
                    s.family().label()
                ),
            );
        }
    }
    if errors.0.len() != before {
        return None;
    }
    Some(Masquerade {
        name: m.name.clone(),
        source: source?,
        out_interface: m.out_interface.clone(),
        to_source,
        allow_forward: m.allow_forward,
    })
}

/// 200-249, from the instance name: stable across runs and releases.
pub fn default_route_protocol(instance: &str) -> u8 {
    let hash = crate::ownership::StableHash::new().bytes(instance.as_bytes());
    200 + (hash.finish() % 50) as u8
}

fn parse_u32(
    path: impl Display + Copy,
    value: &Value,
    what: &str,
    errors: &mut Errors,
) -> Option<u32> {
    let n = match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s)
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()
        }
        _ => None,
    };
    if n.is_none() {
        errors.push_json(path, value, format!("is not {what}"));
    }
    n
}

fn parse_mark_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 8 => u32::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty()
            && text.len() <= 10
            && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            text.parse().ok()
        }
        None => None,
    }
}

fn parse_conn_mark(value: &Value, errors: &mut Errors) -> Option<u32> {
    let bit = match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => parse_mark_number(s),
        _ => None,
    };
    if bit.is_none() {
        errors.push_json(
            "conn_mark",
            value,
            "is not a mark bit (8192 or \"0x2000\")".into(),
        );
    }
    bit
}
