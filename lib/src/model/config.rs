//! The validated desired state: typed values the rest of the pipeline can trust (addresses
//! parsed, ports in range, names checked). Built only by [`super::validate`].

use std::net::IpAddr;
use std::sync::Arc;

pub use crate::net::Proto;
use crate::net::{Cidr, Family, PortRange};
use crate::tools::Backend;

use super::params::{Balance, IpForward, State};

/// A validated interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    pub addr: IpAddr,
    pub prefix: u8,
    pub dev: String,
    pub label: Option<String>,
}

/// A validated policy route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyRoute {
    pub family: Family,
    pub from: Cidr,
    pub to: Option<Cidr>,
    pub table: u32,
    pub priority: Option<u32>,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub iif: Option<String>,
    pub routes: Vec<Route>,
}

/// A validated route; `to: None` is the default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub to: Option<Cidr>,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
}

/// How a DNAT forward rewrites the source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snat {
    Masquerade,
    None,
    To(IpAddr),
}

/// What a forward does with a matching connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// DNAT to `addr`, to `port` or keeping the listen port when `None`.
    Dnat {
        addr: IpAddr,
        port: Option<u16>,
        snat: Snat,
    },
    /// DNAT to one backend of a pool, picked per new connection.
    Pool { pool: Arc<Pool>, snat: Snat },
    /// REDIRECT to a local port.
    Redirect { port: u16 },
}

impl Action {
    /// How the source is rewritten (None: a redirect, which keeps it).
    pub fn snat(&self) -> Option<Snat> {
        match self {
            Action::Dnat { snat, .. } | Action::Pool { snat, .. } => Some(*snat),
            Action::Redirect { .. } => None,
        }
    }

    /// Every address a connection may be sent to (none for a redirect).
    pub fn backends(&self) -> Vec<(IpAddr, Option<u16>)> {
        match self {
            Action::Dnat { addr, port, .. } => vec![(*addr, *port)],
            Action::Pool { pool, .. } => pool.backends.iter().map(|b| (b.addr, b.port)).collect(),
            Action::Redirect { .. } => Vec::new(),
        }
    }
}

/// A validated pool: its backends in the order given, one family, all with a port or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub backends: Vec<PoolMember>,
    pub balance: Balance,
    /// Seconds a client keeps reaching the backend it reached (`persistence`).
    pub persistence: Option<u32>,
}

impl Pool {
    /// The sum of the weights (0: every backend drained).
    pub fn total_weight(&self) -> u32 {
        self.backends.iter().map(|b| u32::from(b.weight)).sum()
    }

    /// The pool's exact weighted round-robin as a cascade of counters, each taking one of
    /// every `every` new connections that reach it (all but one of them with `invert`), the
    /// rest passing to the next: what iptables' `statistic --mode nth` can say. Over one
    /// cycle (the weights' sum over their greatest common divisor) each backend gets its
    /// weight exactly. A backend whose share of what reaches it is 1/k or (k-1)/k takes one
    /// step; any other takes one step per unit of weight.
    pub fn nth_cascade(&self) -> Vec<NthStep> {
        let live: Vec<(usize, u32)> = (self.backends.iter().enumerate())
            .filter(|(_, b)| b.weight > 0)
            .map(|(i, b)| (i, u32::from(b.weight)))
            .collect();
        let gcd = live.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
        let mut rest: u32 = live.iter().map(|(_, w)| w / gcd).sum();
        let mut steps = Vec::new();
        for (backend, w) in live {
            let w = w / gcd;
            let step = |every, invert| NthStep {
                backend,
                every,
                invert,
            };
            if rest.is_multiple_of(w) {
                steps.push(step(rest / w, false));
            } else if rest.is_multiple_of(rest - w) {
                steps.push(step(rest / (rest - w), true));
            } else {
                for taken in 0..w {
                    steps.push(step(rest - taken, false));
                }
            }
            rest -= w;
        }
        steps
    }
}

/// One rule of [`Pool::nth_cascade`]: backend `backend` takes one of every `every`
/// connections reaching it, or with `invert` all but that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NthStep {
    pub backend: usize,
    pub every: u32,
    pub invert: bool,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One backend of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMember {
    pub addr: IpAddr,
    /// None: the connection keeps its listen port.
    pub port: Option<u16>,
    /// 0-1000; 0 takes no new connections.
    pub weight: u16,
}

/// A validated forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub name: String,
    pub family: Family,
    pub protos: Vec<Proto>,
    pub listen_port: PortRange,
    pub listen_address: Option<IpAddr>,
    pub in_interface: Option<String>,
    pub sources: Vec<Cidr>,
    pub action: Action,
    pub local: bool,
    pub allow_forward: bool,
    pub reset_connections: bool,
}

impl Forward {
    /// The ports a backend given `port` (None: it keeps the listen port) receives on.
    pub fn ports_at(&self, port: Option<u16>) -> PortRange {
        port.map_or(self.listen_port, PortRange::single)
    }

    /// DNAT to 127.0.0.0/8 (needs route_localnet for traffic from other hosts).
    pub fn dnats_to_loopback(&self) -> bool {
        self.action
            .backends()
            .iter()
            .any(|(addr, _)| matches!(addr, IpAddr::V4(a) if a.is_loopback()))
    }

    /// Does this forward route packets between interfaces (so it needs ip_forward)?
    pub fn needs_forwarding(&self) -> bool {
        matches!(self.action, Action::Dnat { .. } | Action::Pool { .. })
    }
}

/// A validated masquerade entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Masquerade {
    pub name: String,
    pub source: Cidr,
    pub out_interface: Option<String>,
    pub to_source: Option<IpAddr>,
    pub allow_forward: bool,
}

impl Masquerade {
    pub(crate) fn family(&self) -> Family {
        self.source.family()
    }
}

/// The ids of the findings that concern one forward or masquerade entry: what its
/// `ignore_findings` may name.
pub(crate) const ENTRY_FINDINGS: &[&str] = &[
    "backend_unreachable",
    "foreign_nat_first",
    "forward_hook_drop",
    "interface_missing",
    "ip_forward_off",
    "listen_port_shadowed",
    "no_route_to_backend",
    "redirect_target_not_listening",
    "reply_bypass",
    "route_localnet",
];

/// The whole validated desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) state: State,
    pub(crate) instance: String,
    pub(crate) ip_forward: IpForward,
    /// Always a current name (see [`Backend::canonical`]).
    pub(crate) backend: Backend,
    /// The deprecated name the params used, for the warning.
    pub(crate) backend_alias: Option<Backend>,
    pub(crate) forwards: Vec<Forward>,
    pub(crate) masquerades: Vec<Masquerade>,
    pub(crate) addresses: Vec<Address>,
    pub(crate) policy_routes: Vec<PolicyRoute>,
    pub(crate) persist: bool,
    pub(crate) route_protocol: u8,
    /// The conntrack mark bit of forwarded flows (exactly one bit set).
    pub(crate) conn_mark: u32,
    /// The params as `persist: true` stores them (None when not persisting).
    pub(crate) persisted: Option<String>,
    /// The params as compact JSON, kept with the read cache (see
    /// [`crate::ownership::ReadCache::params`]).
    pub(crate) source: String,
    /// (entry, finding id) pairs the params silence: `forwards.web` → `reply_bypass`.
    pub(crate) ignored: std::collections::BTreeSet<(String, &'static str)>,
}

impl Config {
    /// The backend the params ask for (the binary builds its host with it).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Has the operator silenced finding `id` about `entry` (`forwards.web`)?
    pub(crate) fn ignores(&self, entry: &str, id: &str) -> bool {
        self.ignored.iter().any(|(e, i)| e == entry && *i == id)
    }
}

/// Options the caller passes next to the params (Ansible's `_ansible_*` keys or CLI flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunMode {
    pub check: bool,
    pub diff: bool,
}

impl Config {
    /// DNAT to 127.0.0.0/8 from other hosts needs route_localnet on the ingress interface.
    /// Only a named interface gets it: on `all` it would expose every localhost-only service to
    /// every neighbour (CVE-2020-8558); without in_interface the run warns instead.
    pub fn localnet_devices(&self) -> std::collections::BTreeMap<String, String> {
        if self.ip_forward != IpForward::Auto || self.state == State::Absent {
            return std::collections::BTreeMap::new();
        }
        self.forwards
            .iter()
            .filter(|f| f.dnats_to_loopback())
            .filter_map(|f| {
                let dev = f.in_interface.as_deref().filter(|i| !i.ends_with('+'))?;
                Some((f.name.clone(), dev.to_string()))
            })
            .collect()
    }
}
