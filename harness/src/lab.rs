//! A scenario's topology, built: one namespace per node, veth links (bridged on switch nodes),
//! addresses, routes, sysctls, a foreign ruleset where asked, and echo servers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::netns::{addr, link, LabError, Netns, UP_PREFIX};
use crate::scenario::{Flavour, Scenario};
use crate::topology::normalise_ruleset;
use crate::traffic::Server;

/// How namespaces are named: per run (removed at drop) or for `portfwd-lab up` (kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    PerRun,
    Up,
}

/// A built topology. Dropping it stops the servers and removes the namespaces (per-run).
pub struct Lab {
    pub nodes: BTreeMap<String, Netns>,
    /// Addresses of each node, for `sees: NODE`.
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Each host's ruleset (no counters) right after set-up.
    pub original: BTreeMap<String, String>,
    pub flavours: BTreeMap<String, Flavour>,
    servers: Vec<Server>,
}

impl Lab {
    /// Builds the topology; with `servers` false the echo servers are not started.
    pub fn build(scenario: &Scenario, naming: Naming, servers: bool) -> Result<Lab, LabError> {
        let mut lab = Lab {
            nodes: BTreeMap::new(),
            addresses: BTreeMap::new(),
            original: BTreeMap::new(),
            flavours: BTreeMap::new(),
            servers: Vec::new(),
        };
        for (name, node) in &scenario.nodes {
            let ns = match naming {
                Naming::PerRun => Netns::new(name)?,
                Naming::Up => Netns::kept(&format!("{UP_PREFIX}{name}"))?,
            };
            for (key, value) in &node.sysctls {
                ns.sysctl(key, &value.text())?;
            }
            if node.switch {
                ns.ip(&["link", "add", "br0", "type", "bridge"])?;
                ns.ip(&["link", "set", "br0", "up"])?;
            }
            lab.flavours.insert(name.clone(), node.flavour);
            lab.nodes.insert(name.clone(), ns);
        }
        for pair in &scenario.links {
            let mut ends = pair.iter();
            let (Some((a, a_end)), Some((b, b_end))) = (ends.next(), ends.next()) else {
                continue;
            };
            link(&lab.nodes[a], &a_end.dev, &lab.nodes[b], &b_end.dev)?;
            for (node, end) in [(a, a_end), (b, b_end)] {
                if scenario.nodes[node].switch {
                    lab.nodes[node].ip(&["link", "set", &end.dev, "master", "br0"])?;
                }
                for cidr in &end.addresses {
                    addr(&lab.nodes[node], &end.dev, cidr)?;
                    if let Some(ip) = cidr.split('/').next().and_then(|a| a.parse().ok()) {
                        lab.addresses.entry(node.clone()).or_default().push(ip);
                    }
                }
            }
        }
        for (name, node) in &scenario.nodes {
            let ns = &lab.nodes[name];
            for route in &node.routes {
                let mut args: Vec<&str> = Vec::new();
                if route
                    .split_whitespace()
                    .any(|t| t.parse::<std::net::Ipv6Addr>().is_ok())
                {
                    args.push("-6");
                }
                args.extend(["route", "add"]);
                args.extend(route.split_whitespace());
                ns.ip(&args)?;
            }
            if let Some(file) = &node.ruleset {
                let path = scenario.dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| LabError::Traffic(format!("{}: {e}", path.display())))?;
                let out = ns.exec_with_input(&[node.flavour.restore()], &text)?;
                if !out.status.success() {
                    return Err(LabError::Command {
                        command: format!("{} < {}", node.flavour.restore(), path.display()),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
            }
            if let Some(file) = &node.nft {
                let path = scenario.dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| LabError::Traffic(format!("{}: {e}", path.display())))?;
                let out = ns.exec_with_input(&["nft", "-f", "-"], &text)?;
                if !out.status.success() {
                    return Err(LabError::Command {
                        command: format!("nft -f {}", path.display()),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
            }
            if !node.switch {
                lab.original.insert(name.clone(), lab.ruleset(name)?);
            }
            if servers {
                for spec in &node.servers {
                    // One dual-stack socket answers IPv4 and IPv6 clients.
                    let bind = SocketAddr::from((IpAddr::from([0u16; 8]), spec.port));
                    // Named after its node: a probe over a pool tells which node answered.
                    lab.servers
                        .push(Server::start_named(ns, spec.proto.into(), bind, name)?);
                }
            }
        }
        Ok(lab)
    }

    /// A node's iptables ruleset in its flavour, without counters or comments.
    pub fn ruleset(&self, node: &str) -> Result<String, LabError> {
        let flavour = self.flavours.get(node).copied().unwrap_or_default();
        let ns = self
            .nodes
            .get(node)
            .ok_or_else(|| LabError::Traffic(format!("no node {node}")))?;
        let mut text = normalise_ruleset(&ns.stdout(&[flavour.save()])?);
        // nftables tables other than iptables-nft's own (which the dump above shows), without
        // counter values: portfwd's native table, another firewall's.
        let tables = ns.stdout(&["nft", "list", "tables"]).unwrap_or_default();
        for line in tables.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [_, family, name] = words.as_slice() else {
                continue;
            };
            let iptables_nft = matches!(*family, "ip" | "ip6")
                && matches!(*name, "filter" | "nat" | "mangle" | "raw" | "security");
            if iptables_nft || name.starts_with("portfwd_trace_") {
                continue;
            }
            text.push_str(&ns.stdout(&["nft", "-s", "list", "table", family, name])?);
        }
        Ok(text)
    }

    /// The state of every host, for a failure report: rules, policy routing, conntrack.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (name, ns) in &self.nodes {
            let flavour = self.flavours.get(name).copied().unwrap_or_default();
            for argv in [
                vec![flavour.save()],
                vec!["ip6tables-save"],
                vec!["ip", "rule"],
                vec!["ip", "route", "show", "table", "all"],
                vec!["ip", "-br", "addr"],
                vec!["conntrack", "-L"],
            ] {
                let text = match ns.exec_with_input(&argv, "") {
                    Ok(o) => format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    Err(e) => e.to_string(),
                };
                out.push_str(&format!(
                    "--- {name}: {}\n{}\n",
                    argv.join(" "),
                    text.trim_end()
                ));
            }
        }
        out
    }
}
