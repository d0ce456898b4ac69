//! Addresses, ip rules and routes: the shapes of the iproute2 half of the state, shared by
//! compile, observe and plan.
//!
//! Ownership: rules and routes carry the instance's `protocol` number and must be in its
//! [`crate::ownership::Record`]; `ip addr` has no such field in iproute2 6.1, so the record
//! alone says which addresses portfwd added. Nothing else is ever removed.

use std::fmt;
use std::net::IpAddr;

use crate::net::{Cidr, Family};

/// An `ip rule` (desired, or observed with our protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IpRule {
    pub family: Family,
    pub priority: u32,
    pub from: Cidr,
    pub to: Option<Cidr>,
    /// (mark, mask); mask `u32::MAX` when none was given.
    pub fwmark: Option<(u32, u32)>,
    pub iif: Option<String>,
    pub table: u32,
}

impl IpRule {
    /// The identity in the record: `ipv4 priority ... table N`.
    pub(crate) fn record_key(&self) -> String {
        format!("{} {}", self.family.label(), self.selector())
    }

    /// Arguments after `rule add` / `rule del`, without the protocol.
    fn selector(&self) -> String {
        let mut s = format!("priority {} from {}", self.priority, self.from);
        if let Some(to) = &self.to {
            s.push_str(&format!(" to {to}"));
        }
        if let Some((mark, mask)) = self.fwmark {
            s.push_str(&format!(" fwmark {mark:#x}/{mask:#x}"));
        }
        if let Some(iif) = &self.iif {
            s.push_str(&format!(" iif {iif}"));
        }
        s.push_str(&format!(" table {}", self.table));
        s
    }
}

impl IpRule {
    /// Would `rule del <self's selector> protocol N` match `other` (a rule of protocol N)?
    /// The kernel treats every selector left out, and a `from`/`to` of length 0, as "any".
    pub(crate) fn deletes(&self, other: &IpRule) -> bool {
        self.priority == other.priority
            && self.table == other.table
            && (self.from.prefix == 0 || self.from == other.from)
            && self.to.is_none_or(|t| t.prefix == 0 || Some(t) == other.to)
            && self.fwmark.is_none_or(|m| Some(m) == other.fwmark)
            && self
                .iif
                .as_ref()
                .is_none_or(|i| Some(i) == other.iif.as_ref())
    }
}

impl fmt::Display for IpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.selector())
    }
}

/// A route in a policy table (desired, or observed with our protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IpRoute {
    pub family: Family,
    pub table: u32,
    /// None is `default`.
    pub to: Option<Cidr>,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
}

impl IpRoute {
    /// The identity in the record: `ipv4 table N DEST`.
    pub(crate) fn record_key(&self) -> String {
        let to = self
            .to
            .map_or_else(|| "default".to_string(), |c| c.to_string());
        format!("{} table {} {to}", self.family.label(), self.table)
    }

    /// What the kernel keys a route by (one route per key and table).
    pub(crate) fn key(&self) -> (Family, u32, Option<Cidr>) {
        (self.family, self.table, self.to)
    }

    /// Does this (observed) route do what `want` asks? A `dev` left open matches any.
    pub(crate) fn satisfies(&self, want: &IpRoute) -> bool {
        self.key() == want.key()
            && self.via == want.via
            && (want.dev.is_none() || self.dev == want.dev)
    }

    fn spec(&self) -> String {
        let mut s = match &self.to {
            None => "default".to_string(),
            Some(c) => c.to_string(),
        };
        if let Some(via) = &self.via {
            s.push_str(&format!(" via {via}"));
        }
        if let Some(dev) = &self.dev {
            s.push_str(&format!(" dev {dev}"));
        }
        s.push_str(&format!(" table {}", self.table));
        s
    }
}

impl fmt::Display for IpRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec())
    }
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IfAddr {
    pub addr: IpAddr,
    pub prefix: u8,
    pub dev: String,
    /// IPv4 label, None when it is just the device name.
    pub label: Option<String>,
    /// A secondary IPv4 address (another address of the same subnet is the primary).
    pub secondary: bool,
}

impl IfAddr {
    pub(crate) fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// The identity used by the ownership record: `dev addr/prefix`.
    pub(crate) fn record_key(&self) -> String {
        format!("{} {}/{}", self.dev, self.addr, self.prefix)
    }

    pub(crate) fn same_address(&self, other: &IfAddr) -> bool {
        self.addr == other.addr && self.prefix == other.prefix && self.dev == other.dev
    }

    fn spec(&self) -> String {
        let mut s = format!("{}/{} dev {}", self.addr, self.prefix, self.dev);
        if let Some(label) = &self.label {
            s.push_str(&format!(" label {label}"));
        }
        s
    }
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec())
    }
}

/// What an instance wants (or had) in iproute2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Routing {
    pub addresses: Vec<IfAddr>,
    pub rules: Vec<IpRule>,
    pub routes: Vec<IpRoute>,
}
