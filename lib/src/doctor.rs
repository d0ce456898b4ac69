//! `portfwd doctor`: why a forward does not work, found before the user has to ask. It reads
//! the host as a check-mode run does (always the full reads, never the read cache) and turns
//! what it sees into findings; it changes nothing.

use crate::checks::{self, Finding, Severity};
use crate::compile;
use crate::firewall::Firewall;
use crate::model::Config;
use crate::net::Family;
use crate::observe::{self, Observed, Scope};
use crate::plan;
use crate::report;
use crate::system::System;
use crate::Error;

/// The result of `portfwd doctor`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Diagnosis {
    /// No finding is an error.
    pub ok: bool,
    pub findings: Vec<Finding>,
}

const CONNTRACK_COUNT: &str = "net/netfilter/nf_conntrack_count";
const CONNTRACK_MAX: &str = "net/netfilter/nf_conntrack_max";

/// Diagnoses the host against `config` (the params, or the installed state as params).
pub fn diagnose<F: Firewall>(
    firewall: &F,
    config: &Config,
    sys: &mut dyn System,
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
        forward_hook: checks::forwards_traffic(config),
    };
    let prelude = observe::prelude(sys, &config.instance)?;
    let observed = observe::observe(
        firewall,
        sys,
        prelude,
        None,
        &config.instance,
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
    findings.extend(forwarding_off(config, &observed));
    findings.extend(checks::findings(config, firewall, &observed));
    findings.extend(firewall.findings(&observed.firewall));
    findings.extend(router_advertisements(config, &observed));
    findings.extend(conntrack_table(&observed));
    Ok(Diagnosis {
        ok: findings.iter().all(|f| f.severity != Severity::Error),
        findings,
    })
}

/// A DNAT forward or masquerade entry of a family whose forwarding sysctl is 0 (the trap of
/// every seed: nothing crosses the host).
fn forwarding_off<F: Firewall>(config: &Config, observed: &Observed<F>) -> Vec<Finding> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter_map(|family| {
            let key = family.forwarding_sysctl();
            let off = observed.sysctls.get(key).and_then(|v| v.as_deref()) == Some("0");
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
            (off && !users.is_empty()).then(|| Finding {
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
            })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::iptables::Iptables;
    use crate::testing::FakeHost;

    /// A namespace cannot set nf_conntrack_max (only the initial one can), so this finding is
    /// shown on the fake host: found at 90%, not below.
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
            let d = diagnose(&Iptables, &config, &mut host).unwrap();
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
