//! Scenario files: YAML that an Ansible user can read. A scenario names its nodes and links,
//! then walks through steps: apply params per node with the real `portfwd`, re-apply (must be
//! a no-op), and probe with real traffic, checking which address the server saw.
//!
//! ```yaml
//! name: cross-host-dnat
//! nodes:
//!   client: {}
//!   proxy: {}
//!   backend:
//!     servers: [{proto: tcp, port: 1234}]
//! links:
//!   - client: {dev: eth0, addresses: [10.0.1.2/24]}
//!     proxy: {dev: eth0, addresses: [10.0.1.1/24]}
//!   - proxy: {dev: eth1, addresses: [10.0.2.1/24]}
//!     backend: {dev: eth0, addresses: [10.0.2.2/24]}
//! steps:
//!   - name: forward
//!     apply:
//!       proxy: {forwards: [{name: web, listen_port: 4321, to: "10.0.2.2:1234"}]}
//!     probes:
//!       - {from: client, to: "10.0.1.1:4321", sees: proxy}
//!   - name: second run changes nothing
//!     reapply: true
//!     doctor: {proxy: []}                 # portfwd doctor finds nothing
//!     trace:                              # the probe's first packet, under portfwd trace
//!       - {on: proxy, from: client, to: "10.0.1.1:4321", through: [web], verdict: accept}
//! ```
//!
//! A step may also `run` shell commands on a node first (another tool's change, an operator's
//! fix), and a node may load an `nft` script at start (another tool's nftables tables).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::netns::LabError;
use crate::traffic::Proto;

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub nodes: BTreeMap<String, Node>,
    #[serde(default)]
    pub links: Vec<BTreeMap<String, Endpoint>>,
    pub steps: Vec<Step>,
    /// The directory the file was read from (rulesets are relative to it).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// A host (a network namespace) or, with `switch: true`, a bridge joining its links.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default)]
    pub switch: bool,
    /// `ip route add` arguments, e.g. `default via 10.0.1.1`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// sysctls set before anything else, e.g. `net.ipv4.ip_forward: 1`.
    #[serde(default)]
    pub sysctls: BTreeMap<String, SysctlValue>,
    /// Echo servers answering with the peer address they saw.
    #[serde(default)]
    pub servers: Vec<ServerSpec>,
    /// A file in iptables-save format loaded at start (another tool's rules).
    #[serde(default)]
    pub ruleset: Option<String>,
    /// The iptables flavour of `ruleset` and of this node's checks.
    #[serde(default)]
    pub flavour: Flavour,
    /// An `nft -f` script loaded at start (another tool's nftables tables, e.g. firewalld's).
    #[serde(default)]
    pub nft: Option<String>,
}

/// sysctl values may be written as numbers or strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SysctlValue {
    Number(i64),
    Text(String),
}

impl SysctlValue {
    pub fn text(&self) -> String {
        match self {
            SysctlValue::Number(n) => n.to_string(),
            SysctlValue::Text(s) => s.clone(),
        }
    }
}

/// nf_tables or legacy iptables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    #[default]
    Nft,
    Legacy,
}

impl Flavour {
    pub fn save(self) -> &'static str {
        match self {
            Flavour::Nft => "iptables-nft-save",
            Flavour::Legacy => "iptables-legacy-save",
        }
    }

    pub fn restore(self) -> &'static str {
        match self {
            Flavour::Nft => "iptables-nft-restore",
            Flavour::Legacy => "iptables-legacy-restore",
        }
    }
}

/// One end of a link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub dev: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// An echo server listening on every address of its node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    #[serde(default)]
    pub proto: ProtoSpec,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtoSpec {
    #[default]
    Tcp,
    Udp,
}

impl From<ProtoSpec> for Proto {
    fn from(p: ProtoSpec) -> Proto {
        match p {
            ProtoSpec::Tcp => Proto::Tcp,
            ProtoSpec::Udp => Proto::Udp,
        }
    }
}

/// What an apply must report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Changed,
    Unchanged,
    Failed,
}

/// One step: applies, then checks, then probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// Params per node, applied with `portfwd apply` inside that node.
    #[serde(default)]
    pub apply: BTreeMap<String, Value>,
    /// Apply every node's last params again: each must report changed=false and no commands.
    #[serde(default)]
    pub reapply: bool,
    /// What each apply of this step must report (default: changed).
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Per node, a text the apply's `msg` must contain.
    #[serde(default)]
    pub expect_msg: BTreeMap<String, String>,
    /// Per node, a text one of the apply's warnings must contain.
    #[serde(default)]
    pub expect_warning: BTreeMap<String, String>,
    /// Nodes whose apply in this step must warn about nothing (a correct recipe is quiet).
    #[serde(default)]
    pub quiet: Vec<String>,
    /// Nodes whose whole ruleset must equal the one they started with.
    #[serde(default)]
    pub ruleset_is_original: Vec<String>,
    /// Nodes whose rules that are not portfwd's must equal the ones they started with.
    #[serde(default)]
    pub foreign_rules_unchanged: Vec<String>,
    #[serde(default)]
    pub probes: Vec<ProbeSpec>,
    /// Shell commands per node, run first (an operator's fix, another tool's change).
    #[serde(default)]
    pub run: BTreeMap<String, Vec<String>>,
    /// Per node, the ids of the findings `portfwd doctor` must report (exactly these; `[]`:
    /// none), with the node's last applied params.
    #[serde(default)]
    pub doctor: BTreeMap<String, Vec<String>>,
    /// Probes run under `portfwd trace`, with the path they must take.
    #[serde(default)]
    pub trace: Vec<TraceSpec>,
}

/// A probe traced on a node: the portfwd entries its first packet must pass, and its fate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    /// The node that traces (where the packet is forwarded).
    pub on: String,
    pub from: String,
    /// `IP:PORT`.
    pub to: String,
    #[serde(default)]
    pub proto: ProtoSpec,
    /// Entry names (`web`) the packet must pass, in any order.
    #[serde(default)]
    pub through: Vec<String>,
    /// `accept`
    #[serde(default)]
    pub verdict: Option<String>,
    /// `TABLE/CHAIN` where it must be dropped, e.g. `inet fw/filter_FORWARD`.
    #[serde(default)]
    pub dropped_in: Option<String>,
}

/// Traffic from a node to an address, and what must happen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    pub from: String,
    /// `IP:PORT` or `[IPv6]:PORT`.
    pub to: String,
    #[serde(default)]
    pub proto: ProtoSpec,
    /// The source address the server must have seen: an IP, or a node name (any of its
    /// addresses).
    #[serde(default)]
    pub sees: Option<String>,
    /// The probe must get no answer.
    #[serde(default)]
    pub fails: bool,
    /// Over a pool: how many of `connections` new TCP connections each node's server must
    /// answer (exactly; a node not named here must answer none).
    #[serde(default)]
    pub reaches: BTreeMap<String, usize>,
    /// How many connections a `reaches` probe makes (default: the sum of its counts).
    #[serde(default)]
    pub connections: Option<usize>,
}

impl ProbeSpec {
    pub fn target(&self) -> Result<SocketAddr, LabError> {
        self.to
            .parse()
            .map_err(|_| LabError::Traffic(format!("probe target {:?} is not IP:PORT", self.to)))
    }
}

fn invalid(scenario: &str, message: String) -> LabError {
    LabError::Traffic(format!("scenario {scenario}: {message}"))
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 12
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Scenario {
    /// Sets `backend` in every params object of the scenario that does not name one.
    pub fn default_backend(&mut self, backend: &str) {
        for step in &mut self.steps {
            for params in step.apply.values_mut() {
                if let Some(map) = params.as_object_mut() {
                    map.entry("backend").or_insert_with(|| Value::from(backend));
                }
            }
        }
    }

    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, LabError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LabError::Traffic(format!("{}: {e}", path.display())))?;
        let mut scenario = Scenario::parse(&text)
            .map_err(|e| LabError::Traffic(format!("{}: {e}", path.display())))?;
        scenario.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(scenario)
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Scenario, LabError> {
        let scenario: Scenario =
            serde_yaml_ng::from_str(text).map_err(|e| LabError::Traffic(e.to_string()))?;
        scenario.check()?;
        Ok(scenario)
    }

    /// Every reference names a node, every link joins two, every probe has a target.
    fn check(&self) -> Result<(), LabError> {
        let name = &self.name;
        let known = |node: &str, what: &str| -> Result<(), LabError> {
            if self.nodes.contains_key(node) {
                Ok(())
            } else {
                Err(invalid(name, format!("{what} names unknown node {node:?}")))
            }
        };
        for node in self.nodes.keys() {
            if !valid_node_name(node) {
                return Err(invalid(
                    name,
                    format!("node name {node:?} must match [a-z0-9]{{1,12}}"),
                ));
            }
        }
        for (i, link) in self.links.iter().enumerate() {
            if link.len() != 2 {
                return Err(invalid(
                    name,
                    format!("links[{i}] must join exactly two nodes"),
                ));
            }
            for node in link.keys() {
                known(node, &format!("links[{i}]"))?;
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            let what = format!("steps[{i}] ({})", step.name);
            for node in step
                .apply
                .keys()
                .chain(&step.ruleset_is_original)
                .chain(&step.foreign_rules_unchanged)
                .chain(step.run.keys())
                .chain(step.doctor.keys())
                .chain(&step.quiet)
            {
                known(node, &what)?;
            }
            for trace in &step.trace {
                known(&trace.on, &what)?;
                known(&trace.from, &what)?;
                if trace.to.parse::<SocketAddr>().is_err() {
                    return Err(invalid(
                        name,
                        format!("{what}: trace target {:?} is not IP:PORT", trace.to),
                    ));
                }
            }
            for probe in &step.probes {
                known(&probe.from, &what)?;
                probe
                    .target()
                    .map_err(|e| invalid(name, format!("{what}: {e}")))?;
                if probe.fails && probe.sees.is_some() {
                    return Err(invalid(
                        name,
                        format!("{what}: a probe cannot both fail and see an address"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name: t
nodes:
  client: {}
  proxy: {sysctls: {net.ipv4.ip_forward: 1}}
links:
  - client: {dev: eth0, addresses: [10.0.1.2/24]}
    proxy: {dev: eth0, addresses: [10.0.1.1/24]}
steps:
  - name: apply
    apply:
      proxy: {forwards: [{name: r, listen_port: 2222, redirect_to_port: 1111}]}
    probes:
      - {from: client, to: "10.0.1.1:2222", sees: client}
"#;

    #[test]
    fn parses_a_minimal_scenario() {
        let s = Scenario::parse(MINIMAL).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes["proxy"].sysctls["net.ipv4.ip_forward"].text(), "1");
        assert_eq!(
            s.steps[0].apply["proxy"]["forwards"][0]["listen_port"],
            2222
        );
        assert_eq!(s.steps[0].probes[0].proto, ProtoSpec::Tcp);
    }

    #[test]
    fn refuses_unknown_nodes_fields_and_bad_links() {
        for (text, needle) in [
            (
                MINIMAL.replace("from: client", "from: nobody"),
                "unknown node \"nobody\"",
            ),
            (
                MINIMAL.replace("sees: client", "sees: client, colour: red"),
                "unknown field `colour`",
            ),
            (
                MINIMAL.replace("    proxy: {dev: eth0, addresses: [10.0.1.1/24]}\n", ""),
                "exactly two nodes",
            ),
            (
                MINIMAL.replace("10.0.1.1:2222", "somewhere"),
                "is not IP:PORT",
            ),
            (
                MINIMAL.replace("  client: {}", "  Client: {}"),
                "must match",
            ),
        ] {
            let err = Scenario::parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Scenario::load(&path).unwrap();
                count += 1;
            }
        }
        assert!(count >= 10, "{count} scenarios");
    }
}
