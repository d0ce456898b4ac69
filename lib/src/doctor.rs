//! `portfwd doctor`: why a forward does not work, found before the user has to ask. It reads
//! the host as a check-mode run does (always the full reads, never the read cache) and turns
//! what it sees into findings; it changes nothing.

use crate::backends::{self, WithBackends};
use crate::checks;
use crate::compile;
use crate::error::Error;
use crate::findings::{Finding, Severity};
use crate::firewall::Firewall;
use crate::model::{Action, Config, Forward, Proto};
use crate::net::Family;
use crate::observe::{self, Observed, Prelude, Scope};
use crate::plan;
use crate::record_store::Host;
use crate::report;
use crate::tools::IptablesTool;

/// The result of `portfwd doctor`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Diagnosis {
    /// No finding is an error.
    pub ok: bool,
    pub findings: Vec<Finding>,
    /// What the params' `ignore_findings` silenced: not counted in `ok`, listed so an ignore
    /// never hides a problem unseen.
    pub ignored: Vec<Finding>,
}

const CONNTRACK_COUNT: &str = "net/netfilter/nf_conntrack_count";
const CONNTRACK_MAX: &str = "net/netfilter/nf_conntrack_max";

/// Diagnoses the host against `config` with the backends a run would read, so what another
/// backend or flavour still holds is reported (`not_applied`) as the run would move it.
pub(crate) fn run(config: &Config, probe: bool, sys: &mut dyn Host) -> Result<Diagnosis, Error> {
    let prelude = observe::prelude(sys, &config.instance)?;
    backends::with_backends(config, prelude, sys, Doctor { config, probe })
}

/// Doctor once its backends are picked.
struct Doctor<'a> {
    config: &'a Config,
    probe: bool,
}

impl WithBackends for Doctor<'_> {
    type Out = Result<Diagnosis, Error>;
    fn with<F: Firewall>(self, firewall: &F, sys: &mut dyn Host, _: Prelude) -> Self::Out {
        diagnose(firewall, self.config, self.probe, sys)
    }
}

/// Diagnoses the host against `config` (the params, or the installed state as params).
/// With `probe`, also connects to every TCP backend (this sends traffic).
pub(crate) fn diagnose<F: Firewall>(
    firewall: &F,
    config: &Config,
    probe: bool,
    sys: &mut dyn Host,
) -> Result<Diagnosis, Error> {
    let desired = compile::compile(config, firewall);
    let mut keys = checks::sysctl_keys(config, &desired.sysctls);
    keys.extend([CONNTRACK_COUNT, CONNTRACK_MAX].map(String::from));
    for family in [Family::V4, Family::V6] {
        keys.push(family.forwarding_sysctl().to_string());
    }
    keys.sort();
    keys.dedup();
    let scope = Scope {
        routing: true,
        addresses: true,
        other_filters: checks::reads_other_filters(config),
        iptables_in_use: IptablesTool::of(config.backend),
    };
    let prelude = observe::prelude(sys, &config.instance)?;
    let observed = observe::observe(
        firewall,
        sys,
        prelude,
        observe::Known::Nothing,
        config.route_protocol,
        &keys,
        scope,
    )?;
    let plan = plan::plan(
        firewall,
        &config.instance,
        config.route_protocol,
        &desired,
        &observed,
    );
    let mut findings = Vec::new();
    if !plan.is_empty() {
        findings.push(Finding {
            id: "not_applied",
            severity: Severity::Error,
            entry: None,
            msg: format!(
                "the host differs from the params: applying them would change {}",
                report::summary(&plan)
            ),
            fix: "portfwd apply (see `portfwd plan` for the exact change)".into(),
        });
    }
    if !plan.firewall.repaired.is_empty() {
        findings.push(Finding {
            id: "owned_object_drift",
            severity: Severity::Error,
            entry: None,
            msg: format!(
                "portfwd's own objects were changed since it wrote them (by hand or by another tool): {}",
                plan.firewall.repaired.join(", ")
            ),
            fix: "portfwd apply writes them again as the params say".into(),
        });
    }
    let mut sifted = checks::findings(config, firewall, &observed);
    let (forwarding, silenced) = forwarding_off(config, &observed);
    findings.extend(forwarding);
    sifted.ignored.extend(silenced);
    findings.append(&mut sifted.kept);
    findings.extend(firewall.findings(&observed.firewall));
    findings.extend(router_advertisements(config, &observed));
    findings.extend(conntrack_table(&observed));
    findings.extend(backend_routes(config, sys));
    let sockets = listening(&sys.listening_sockets().unwrap_or_default());
    findings.extend(listeners(config, &sockets));
    if probe {
        findings.extend(probes(config, sys));
    }
    sifted.add(config, findings);
    Ok(Diagnosis {
        ok: sifted.kept.iter().all(|f| f.severity != Severity::Error),
        findings: sifted.kept,
        ignored: sifted.ignored,
    })
}

/// A DNAT forward or masquerade entry of a family whose forwarding sysctl is 0 (the trap of
/// every hand-made forward: nothing crosses the host). Reported, and silenced.
fn forwarding_off<F: Firewall>(
    config: &Config,
    observed: &Observed<F>,
) -> (Vec<Finding>, Vec<Finding>) {
    let mut found = (Vec::new(), Vec::new());
    for family in [Family::V4, Family::V6] {
        let key = family.forwarding_sysctl();
        if observed.sysctls.get(key).and_then(|v| v.as_deref()) != Some("0") {
            continue;
        }
        let users: Vec<String> = config
            .forwards
            .iter()
            .filter(|f| f.family == family && f.needs_forwarding())
            .map(|f| format!("forwards.{}", f.name))
            .chain(
                config
                    .masquerades
                    .iter()
                    .filter(|m| m.family() == family)
                    .map(|m| format!("masquerade.{}", m.name)),
            )
            .collect();
        let (users, silenced) = checks::split_entries(config, "ip_forward_off", users, |u| u);
        let finding = |users: &[String]| {
            Finding {
            id: "ip_forward_off",
            severity: Severity::Error,
            entry: (users.len() == 1).then(|| users[0].clone()),
            msg: format!(
                "{} is 0, so nothing is forwarded between interfaces ({} need it)",
                key.replace('/', "."),
                users.join(", ")
            ),
            fix: format!(
                "ip_forward: \"auto\" (the default) or true in the params, then portfwd apply; by hand: sysctl -w {}=1",
                key.replace('/', ".")
            ),
        }
        };
        if !users.is_empty() {
            found.0.push(finding(&users));
        }
        if !silenced.is_empty() {
            found.1.push(finding(&silenced));
        }
    }
    found
}

/// Interfaces whose IPv6 default route came from router advertisements while `accept_ra` is
/// not 2: enabling IPv6 forwarding drops that route.
fn router_advertisements<F: Firewall>(config: &Config, observed: &Observed<F>) -> Vec<Finding> {
    let v6_forwarding = config
        .forwards
        .iter()
        .any(|f| f.family == Family::V6 && f.needs_forwarding())
        || config.masquerades.iter().any(|m| m.family() == Family::V6);
    if !v6_forwarding {
        return Vec::new();
    }
    observed
        .ra_default_routes
        .iter()
        .filter(|(_, accept_ra)| accept_ra.as_deref() != Some("2"))
        .map(|(dev, _)| Finding {
            id: "ipv6_ra_default_route",
            severity: Severity::Warning,
            entry: None,
            msg: format!("{dev} has its IPv6 default route from router advertisements with accept_ra != 2: turning IPv6 forwarding on drops that route"),
            fix: format!("portfwd apply sets net.ipv6.conf.{dev}.accept_ra=2 before it turns forwarding on; by hand: sysctl -w net.ipv6.conf.{dev}.accept_ra=2"),
        })
        .collect()
}

/// The conntrack table at 90% or more: new flows (forwarded ones included) get dropped when
/// it is full.
fn conntrack_table<F: Firewall>(observed: &Observed<F>) -> Option<Finding> {
    let value =
        |key: &str| -> Option<u64> { observed.sysctls.get(key)?.as_deref()?.trim().parse().ok() };
    let (count, max) = (value(CONNTRACK_COUNT)?, value(CONNTRACK_MAX)?);
    (max > 0 && count * 10 >= max * 9).then(|| Finding {
        id: "conntrack_near_full",
        severity: Severity::Warning,
        entry: None,
        msg: format!("the conntrack table holds {count} of at most {max} entries: when it is full, new connections are dropped"),
        fix: "raise net.netfilter.nf_conntrack_max (and the hash size), or find what opens so many flows".into(),
    })
}

/// A backend the routing table cannot reach (`ip route get` fails): the DNATed packet is
/// dropped on this host.
fn backend_routes(config: &Config, sys: &mut dyn Host) -> Vec<Finding> {
    let mut out = Vec::new();
    for f in &config.forwards {
        // Every backend of a pool.
        for (addr, _) in f.action.backends() {
            let target = addr.to_string();
            if let Err(e) = sys.ip_json(&["route", "get", &target]) {
                out.push(Finding::forward(
                    "no_route_to_backend",
                    Severity::Error,
                    f,
                    format!(
                        "forward {:?}: this host has no route to the backend {addr} ({e})",
                        f.name
                    ),
                    format!("add a route to {addr} (ip route add {addr} via GATEWAY), or fix `to` (a pool's `backends`)"),
                ));
            }
        }
    }
    out
}

/// A listening TCP or bound UDP socket: protocol, address (None: any), port.
type Socket = (Proto, Option<std::net::IpAddr>, u16);

/// Parses `ss -H -l -n -t -u` (`tcp LISTEN 0 128 0.0.0.0:4321 0.0.0.0:*`, `udp UNCONN 0 0
/// [::1]%lo:53 [::]:*`).
fn listening(text: &str) -> Vec<Socket> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let proto = match *words.first()? {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return None,
            };
            let (host, port) = words.get(4)?.rsplit_once(':')?;
            let host = host
                .split('%')
                .next()?
                .trim_start_matches('[')
                .trim_end_matches(']');
            let addr = match host {
                "*" | "0.0.0.0" | "::" => None,
                other => Some(other.parse().ok()?),
            };
            Some((proto, addr, port.parse().ok()?))
        })
        .collect()
}

/// Is something of `proto` listening on a port of `ports` at `addr` (or on any address)?
fn listens(
    sockets: &[Socket],
    proto: Proto,
    addr: Option<std::net::IpAddr>,
    first: u16,
    last: u16,
) -> bool {
    sockets.iter().any(|(p, a, port)| {
        *p == proto
            && (first..=last).contains(port)
            && (a.is_none() || addr.is_none() || *a == addr)
    })
}

/// REDIRECT targets nobody listens on; forwarded ports a local process also listens on.
fn listeners(config: &Config, sockets: &[Socket]) -> Vec<Finding> {
    let mut out = Vec::new();
    for f in &config.forwards {
        let entry = Some(format!("forwards.{}", f.name));
        match f.action {
            Action::Redirect { port } => {
                for &proto in &f.protos {
                    if !listens(sockets, proto, f.listen_address, port, port) {
                        out.push(Finding {
                            id: "redirect_target_not_listening",
                            severity: Severity::Error,
                            entry: entry.clone(),
                            msg: format!("forward {:?}: nothing listens on {} port {port} on this host, where it redirects", f.name, proto.name()),
                            fix: format!("start the service on {} port {port}, or fix redirect_to_port", proto.name()),
                        });
                    }
                }
            }
            Action::Dnat { .. } | Action::Pool { .. } => {
                for &proto in &f.protos {
                    let (first, last) = (f.listen_port.first, f.listen_port.last);
                    if listens(sockets, proto, f.listen_address, first, last) {
                        out.push(shadowed(f, proto));
                    }
                }
            }
        }
    }
    out
}

fn shadowed(f: &Forward, proto: Proto) -> Finding {
    let who = if f.local {
        "nobody reaches it: every connection, local ones too, goes to the backend"
    } else {
        "connections from other hosts go to the backend, connections made on this host reach that process"
    };
    Finding::forward(
        "listen_port_shadowed",
        Severity::Warning,
        f,
        format!(
            "forward {:?}: a local process listens on {} port {}: {who}",
            f.name,
            proto.name(),
            f.listen_port.user_text()
        ),
        "move the local service to another port, or the forward to another listen_port",
    )
}

/// `--probe`: a TCP connection from this host to every TCP backend.
fn probes(config: &Config, sys: &mut dyn Host) -> Vec<Finding> {
    let mut out = Vec::new();
    for f in config
        .forwards
        .iter()
        .filter(|f| f.protos.contains(&Proto::Tcp))
    {
        for (addr, port) in f.action.backends() {
            let target = std::net::SocketAddr::new(addr, port.unwrap_or(f.listen_port.first));
            if let Err(e) = sys.connect(target) {
                out.push(Finding::forward(
                "backend_unreachable",
                Severity::Error,
                f,
                format!("forward {:?}: connecting from this host to the backend {target} failed: {e}", f.name),
                format!("check that the service runs on {target} and that the path to it (firewalls on the way, the backend's own) accepts the connection"),
            ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::iptables::Iptables;
    use crate::testing::FakeHost;

    /// The threshold: found at 90%, not below (the e2e test fills a real table).
    #[test]
    fn reads_ss_output() {
        let text = "udp UNCONN 0      0            *:53         *:*\ntcp LISTEN 0      128    0.0.0.0:4321 0.0.0.0:*\ntcp LISTEN 0 4096 [::1]%lo:8080 [::]:*\ntcp LISTEN 0 5 10.0.1.1:22 0.0.0.0:*\n";
        let sockets = listening(text);
        assert_eq!(sockets.len(), 4);
        assert!(listens(&sockets, Proto::Udp, None, 53, 53));
        assert!(listens(&sockets, Proto::Tcp, None, 4000, 5000));
        assert!(!listens(&sockets, Proto::Udp, None, 4321, 4321));
        assert!(listens(
            &sockets,
            Proto::Tcp,
            "::1".parse().ok(),
            8080,
            8080
        ));
        assert!(!listens(
            &sockets,
            Proto::Tcp,
            "10.0.1.2".parse().ok(),
            22,
            22
        ));
    }

    #[test]
    fn a_conntrack_table_at_ninety_percent_is_found() {
        let (config, _, _) = Config::from_json("{}").unwrap();
        for (count, found) in [("899", false), ("900", true), ("1000", true)] {
            let mut host = FakeHost::new();
            host.state
                .sysctls
                .insert(CONNTRACK_COUNT.into(), count.into());
            host.state
                .sysctls
                .insert(CONNTRACK_MAX.into(), "1000".into());
            let d = diagnose(&Iptables::default(), &config, false, &mut host).unwrap();
            let ids: Vec<&str> = d.findings.iter().map(|f| f.id).collect();
            assert_eq!(
                ids.contains(&"conntrack_near_full"),
                found,
                "{count}: {ids:?}"
            );
            assert!(d.ok, "a warning, not an error");
            assert_eq!(
                host.writes(),
                Vec::<&String>::new(),
                "doctor writes nothing"
            );
        }
    }
}
