//! Ready-made topologies shared by the e2e tests and `portfwd-lab demo`.

use crate::netns::{addr, link, LabError, Netns};

/// client (eth0) ── (eth0) proxy (eth1) ── (eth0) backend
///
/// 10.0.1.2 / fd00:1::2 ─ 10.0.1.1 / fd00:1::1 │ 10.0.2.1 / fd00:2::1 ─ 10.0.2.2 / fd00:2::2
///
/// The backend has no route towards the client's network; the client only reaches the proxy
/// on-link unless a test gives it a default route.
pub struct Topology {
    pub client: Netns,
    pub proxy: Netns,
    pub backend: Netns,
}

impl Topology {
    pub fn new() -> Result<Topology, LabError> {
        let client = Netns::new("client")?;
        let proxy = Netns::new("proxy")?;
        let backend = Netns::new("backend")?;
        link(&client, "eth0", &proxy, "eth0")?;
        link(&proxy, "eth1", &backend, "eth0")?;
        for (ns, dev, cidrs) in [
            (&client, "eth0", ["10.0.1.2/24", "fd00:1::2/64"]),
            (&proxy, "eth0", ["10.0.1.1/24", "fd00:1::1/64"]),
            (&proxy, "eth1", ["10.0.2.1/24", "fd00:2::1/64"]),
            (&backend, "eth0", ["10.0.2.2/24", "fd00:2::2/64"]),
        ] {
            for cidr in cidrs {
                addr(ns, dev, cidr)?;
            }
        }
        Ok(Topology {
            client,
            proxy,
            backend,
        })
    }

    /// Lets the client reach the backend's network through the proxy (a gateway set-up).
    pub fn client_default_route(&self) -> Result<(), LabError> {
        self.client
            .ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])
    }
}

/// `iptables-save` of a namespace without counters or `#` lines: what must stay byte-identical.
pub fn ruleset(ns: &Netns, save: &str) -> Result<String, LabError> {
    Ok(normalise_ruleset(&ns.stdout(&[save])?))
}

/// Drops `#` lines and the counters of chain declarations from `iptables-save` output.
pub fn normalise_ruleset(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            Some(decl) => format!(":{}", decl.split(" [").next().unwrap_or(decl)),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
