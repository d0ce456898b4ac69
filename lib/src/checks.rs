//! Pitfalls a run can see from the desired and the observed state, reported as warnings.
//! They never block a run: the operator may know better, but should be told.

use std::net::IpAddr;

use crate::compile::Desired;
use crate::model::{Action, Config, IpForward, Snat};
use crate::net::{Cidr, Family};
use crate::observe::Observed;

/// Sysctls a run reads: those it manages, plus those its warnings look at.
pub fn sysctl_keys(config: &Config, desired: &Desired) -> Vec<String> {
    let mut keys: Vec<String> = desired.sysctls.keys().cloned().collect();
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

/// Warnings that need the observed state.
pub fn warnings(config: &Config, observed: &Observed) -> Vec<String> {
    let sysctl =
        |key: String| -> Option<u32> { observed.sysctls.get(&key)?.as_deref()?.parse().ok() };
    let mut out = Vec::new();
    if config.ip_forward != IpForward::Auto {
        for f in config.forwards.iter().filter(|f| f.dnats_to_loopback()) {
            let on = sysctl(localnet_key("all")) == Some(1)
                || f.in_interface
                    .as_ref()
                    .is_some_and(|i| sysctl(localnet_key(i)) == Some(1));
            if !on {
                out.push(format!("forward {:?}: DNAT to a loopback address only works for connections from other hosts when route_localnet=1 on the ingress interface (portfwd sets it when ip_forward is \"auto\")", f.name));
            }
        }
    }
    for f in &config.forwards {
        let Action::Dnat {
            addr,
            snat: Snat::None,
            ..
        } = f.action
        else {
            continue;
        };
        if let Some(local) = on_link(&addr, observed) {
            out.push(format!("forward {:?}: backend {addr} is on-link ({} on {}): with snat none its replies go straight back to the client and bypass this host, unless this host is its default gateway or it policy-routes them here", f.name, local.0, local.1));
        }
    }
    for dev in policy_route_devices(config) {
        let strict = sysctl(rp_filter_key("all")).max(sysctl(rp_filter_key(&dev))) == Some(1);
        if strict {
            out.push(format!("rp_filter is 1 (strict) for {dev}, which a policy route uses: packets routed asymmetrically through it may be dropped; set net.ipv4.conf.{dev}.rp_filter=2 (loose)"));
        }
    }
    out
}

/// The local address and device whose subnet contains `addr`, if any.
fn on_link(addr: &IpAddr, observed: &Observed) -> Option<(String, String)> {
    observed.routing.present.iter().find_map(|a| {
        let net = Cidr {
            addr: a.addr,
            prefix: a.prefix,
        }
        .network();
        (a.addr != *addr && a.prefix < Family::of(&a.addr).host_prefix() && net.contains(addr))
            .then(|| (format!("{}/{}", a.addr, a.prefix), a.dev.clone()))
    })
}
