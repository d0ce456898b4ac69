//! The second stage: a validated [`Config`] in, the desired state out. The firewall objects
//! come from the backend ([`Firewall::compile`]); the addresses, policy routes, sysctls and
//! the stored params are compiled here, the same for every backend.

use std::collections::{BTreeMap, BTreeSet};

use crate::firewall::iptables::Iptables;
use crate::firewall::Firewall;
use crate::model::{Config, Forward, IpForward, Masquerade, State};
use crate::net::Family;
use crate::ownership::StableHash;
use crate::routing::{IfAddr, IpRoute, IpRule, Routing};

/// What should exist after the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Desired<F: Firewall = Iptables> {
    /// The backend's objects (iptables: the instance's chains and the jumps into them).
    pub firewall: F::Desired,
    /// sysctl path under `/proc/sys` → value to ensure.
    pub sysctls: BTreeMap<String, String>,
    /// Addresses, ip rules and routes.
    pub routing: Routing,
    /// What a read cache of these firewall objects is keyed by: their digest, the backend
    /// setting and portfwd's version (None: nothing to cache).
    pub read_key: Option<u32>,
    /// The params file `persist: true` keeps (None: no file).
    pub stored: Option<String>,
    /// The params these objects were compiled from, for the read cache (empty: absent).
    pub source: String,
    pub warnings: Vec<String>,
}

/// Compiles the whole config. `state: absent` compiles to nothing.
pub(crate) fn compile<F: Firewall>(config: &Config, firewall: &F) -> Desired<F> {
    let mut desired = Desired {
        firewall: firewall.compile(config),
        ..Desired::default()
    };
    desired.read_key = read_key(firewall, config, &desired.firewall);
    if let Some(alias) = config.backend_alias {
        desired.warnings.push(format!(
            "backend: {:?} is deprecated; write {:?} (the same backend)",
            alias.name(),
            config.backend.name()
        ));
    }
    if config.state == State::Absent {
        return desired;
    }
    desired.sysctls = sysctls(config);
    desired.routing = compile_routing(config);
    desired.stored = config.persisted.clone();
    desired.source = config.source.clone();
    desired.warnings.extend(static_warnings(config));
    desired
}

/// The firewall objects of `config` and their read key, from `base`'s: what a config
/// differing from it only in the forwards `changed` compiled to ([`Firewall::recompile`]).
pub(crate) fn recompile_firewall<F: Firewall>(
    config: &Config,
    firewall: &F,
    base: &F::Desired,
    changed: &BTreeSet<String>,
) -> (F::Desired, Option<u32>) {
    let objects = firewall.recompile(base, config, changed);
    let key = read_key(firewall, config, &objects);
    (objects, key)
}

/// What a read cache of `objects` is keyed by: their digest, the backend setting and
/// portfwd's version.
fn read_key<F: Firewall>(firewall: &F, config: &Config, objects: &F::Desired) -> Option<u32> {
    firewall.digest(objects).map(|digest| {
        let setting = format!("{:?} {}", config.backend, env!("CARGO_PKG_VERSION"));
        StableHash::new()
            .part(&digest.to_le_bytes())
            .part(setting.as_bytes())
            .finish()
    })
}

/// Addresses as given; one rule per policy route (a stable priority when none is given);
/// its routes in its table, shared tables merged.
pub(crate) fn compile_routing(config: &Config) -> Routing {
    let addresses = config
        .addresses
        .iter()
        .map(|a| IfAddr {
            addr: a.addr,
            prefix: a.prefix,
            dev: a.dev.clone(),
            label: a.label.clone(),
            secondary: false,
        })
        .collect();
    let mut rules = Vec::new();
    let mut routes: Vec<IpRoute> = Vec::new();
    for p in &config.policy_routes {
        let mut rule = IpRule {
            family: p.family,
            priority: 0,
            from: p.from,
            to: p.to,
            fwmark: p.fwmark,
            iif: p.iif.clone(),
            table: p.table,
        };
        rule.priority = p
            .priority
            .unwrap_or_else(|| stable_priority(&config.instance, &rule));
        rules.push(rule);
        for r in &p.routes {
            let route = IpRoute {
                family: p.family,
                table: p.table,
                to: r.to,
                via: r.via,
                dev: r.dev.clone(),
            };
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
    }
    Routing {
        addresses,
        rules,
        routes,
    }
}

/// The params entry an `ip -batch` line of this run was compiled from, with its `dev` and
/// `via` values (so a refusal names `policy_routes[0].routes[1].via: "192.0.2.1"`, not only
/// iproute2's text). None for a line that removes what the params no longer ask for.
pub(crate) fn routing_origin(config: &Config, line: &str) -> Option<Origin> {
    let spec = [
        "address add ",
        "address replace ",
        "route add ",
        "route replace ",
        "rule add ",
    ]
    .iter()
    .find_map(|verb| line.strip_prefix(verb))?;
    let spec = spec
        .rsplit_once(" proto")
        .map_or(spec, |(before, _)| before);
    let routing = compile_routing(config);
    if let Some(i) = routing.addresses.iter().position(|a| a.to_string() == spec) {
        return Some(Origin {
            path: format!("addresses[{i}]"),
            dev: Some(config.addresses[i].dev.clone()),
            via: None,
        });
    }
    if let Some(i) = routing.rules.iter().position(|r| r.to_string() == spec) {
        return Some(Origin {
            path: format!("policy_routes[{i}]"),
            dev: config.policy_routes[i].iif.clone(),
            via: None,
        });
    }
    for (i, p) in config.policy_routes.iter().enumerate() {
        for (j, r) in p.routes.iter().enumerate() {
            let route = IpRoute {
                family: p.family,
                table: p.table,
                to: r.to,
                via: r.via,
                dev: r.dev.clone(),
            };
            if route.to_string() == spec {
                return Some(Origin {
                    path: format!("policy_routes[{i}].routes[{j}]"),
                    dev: r.dev.clone(),
                    via: r.via,
                });
            }
        }
    }
    None
}

/// Where in the params an iproute2 object comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// `addresses[0]`, `policy_routes[1].routes[0]`.
    pub path: String,
    pub dev: Option<String>,
    pub via: Option<std::net::IpAddr>,
}

/// 10000-29999 from the rule's selector: stable across runs and list order, below main (32766).
fn stable_priority(instance: &str, rule: &IpRule) -> u32 {
    let hash = StableHash::new()
        .part(instance.as_bytes())
        .part(rule.to_string().as_bytes());
    10_000 + hash.finish() % 20_000
}

/// The sysctls the config manages (forwarding of the families it uses, route_localnet),
/// with the value each should have. Cheap, so a run knows what to read before compiling.
pub(crate) fn sysctls(config: &Config) -> BTreeMap<String, String> {
    let mut sysctls = BTreeMap::new();
    if config.state != State::Absent {
        compile_sysctls(config, &mut sysctls);
    }
    sysctls
}

/// The families whose forwarding sysctl the config manages, and the value each should have.
fn compile_sysctls(config: &Config, sysctls: &mut BTreeMap<String, String>) {
    let needing: BTreeSet<Family> = config
        .forwards
        .iter()
        .filter(|f| f.needs_forwarding())
        .map(|f| f.family)
        .chain(config.masquerades.iter().map(Masquerade::family))
        .collect();
    let mut used: BTreeSet<Family> = config
        .forwards
        .iter()
        .map(|f| f.family)
        .chain(config.masquerades.iter().map(Masquerade::family))
        .collect();
    if used.is_empty() {
        used.insert(Family::V4);
    }
    let (families, value) = match config.ip_forward {
        IpForward::Auto => (needing, "1"),
        IpForward::On => (used, "1"),
        IpForward::Off => (used, "0"),
    };
    for family in families {
        sysctls.insert(family.forwarding_sysctl().to_string(), value.to_string());
    }
    for dev in config.localnet_devices().values() {
        sysctls.insert(localnet_sysctl(dev), "1".to_string());
    }
}

/// `net/ipv4/conf/DEV/route_localnet`
pub(crate) fn localnet_sysctl(dev: &str) -> String {
    format!("net/ipv4/conf/{dev}/route_localnet")
}

fn static_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let needs_forwarding =
        config.forwards.iter().any(Forward::needs_forwarding) || !config.masquerades.is_empty();
    if config.ip_forward == IpForward::Off && needs_forwarding {
        warnings.push("ip_forward is false but forwards or masquerade entries route traffic between interfaces: they will not work until forwarding is enabled".to_string());
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::compiled as desired;

    #[test]
    fn absent_compiles_to_nothing() {
        let d = desired(
            r#"{"state":"absent","forwards":[{"name":"w","listen_port":1,"to":"1.2.3.4"}]}"#,
        );
        assert_eq!(d, Desired::default());
    }

    #[test]
    fn an_ip_batch_line_is_traced_back_to_its_params_entry() {
        let (config, _, _) = Config::from_json(
            r#"{"addresses":[{"address":"10.0.0.5/24","dev":"eth0"},{"address":"10.0.9.5/24","dev":"eth10"}],
                "policy_routes":[{"from":"10.0.2.2","table":100,"priority":100,
                  "routes":[{"to":"10.9.0.0/16","via":"10.0.1.2"},{"to":"default","via":"192.0.2.1","dev":"eth1"}]}]}"#,
        )
        .unwrap();
        let origin = |line: &str| routing_origin(&config, line).map(|o| o.path);
        assert_eq!(
            origin("address add 10.0.9.5/24 dev eth10").as_deref(),
            Some("addresses[1]")
        );
        assert_eq!(
            origin("address add 10.0.9.5/24 dev eth1"),
            None,
            "not a prefix match"
        );
        assert_eq!(
            origin("rule add priority 100 from 10.0.2.2/32 table 100 protocol 233").as_deref(),
            Some("policy_routes[0]")
        );
        let route = routing_origin(
            &config,
            "route add default via 192.0.2.1 dev eth1 table 100 proto 233",
        )
        .unwrap();
        assert_eq!(route.path, "policy_routes[0].routes[1]");
        assert_eq!(route.via, "192.0.2.1".parse().ok());
        assert_eq!(route.dev.as_deref(), Some("eth1"));
        assert_eq!(
            origin("route del default via 192.0.2.1 dev eth1 table 100 proto 233"),
            None
        );
    }

    #[test]
    fn ip_forward_off_with_forwards_warns() {
        let d = desired(
            r#"{"ip_forward":false,"forwards":[{"name":"w","listen_port":1,"to":"1.2.3.4"}]}"#,
        );
        assert_eq!(
            d.sysctls.get("net/ipv4/ip_forward").map(String::as_str),
            Some("0")
        );
        assert!(d.warnings[0].contains("ip_forward is false"));
    }
}
