//! Plans the sysctl writes: forwarding and route_localnet to their desired values, the old
//! value of route_localnet recorded and put back when no entry needs it any more, and the
//! `accept_ra=2` guard before IPv6 forwarding is turned on.

use std::collections::BTreeMap;

use super::SysctlChange;
use crate::firewall::Firewall;
use crate::net::Family;
use crate::observe::Observed;
use crate::ownership::{is_reverted_sysctl, Record};

/// The writes that bring the sysctls to `desired`, in order; warnings for sysctls the host
/// does not have. Sysctls portfwd owns the value of are noted in `record`.
pub(crate) fn plan_sysctls<F: Firewall>(
    desired: &BTreeMap<String, String>,
    observed: &Observed<F>,
    record: &mut Record,
    warnings: &mut Vec<String>,
) -> Vec<SysctlChange> {
    let mut changes: Vec<SysctlChange> = desired
        .iter()
        .filter_map(|(key, want)| match observed.sysctls.get(key) {
            Some(Some(have)) if have == want => None,
            Some(Some(have)) => Some(SysctlChange {
                key: key.clone(),
                from: Some(have.clone()),
                to: want.clone(),
            }),
            _ => {
                warnings.push(format!(
                    "sysctl {} does not exist on this host; not set",
                    key.replace('/', ".")
                ));
                None
            }
        })
        .collect();
    plan_sysctl_ownership(desired, observed, &mut changes, record);
    changes
}

/// Sysctls portfwd owns the value of: route_localnet is recorded with its old value when
/// set and put back once no entry needs it. Turning IPv6 forwarding on first sets
/// `accept_ra=2` on interfaces whose default route came from router advertisements: with
/// `accept_ra=1` the kernel drops those routes the moment forwarding is on.
fn plan_sysctl_ownership<F: Firewall>(
    desired: &BTreeMap<String, String>,
    observed: &Observed<F>,
    changes: &mut Vec<SysctlChange>,
    record: &mut Record,
) {
    for change in changes.iter() {
        if is_reverted_sysctl(&change.key) && !record.sysctls.contains_key(&change.key) {
            if let Some(old) = &change.from {
                record.sysctls.insert(change.key.clone(), old.clone());
            }
        }
    }
    let unneeded: Vec<(String, String)> = record
        .sysctls
        .iter()
        .filter(|(k, _)| !desired.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, old) in unneeded {
        record.sysctls.remove(&key);
        match observed.sysctls.get(&key) {
            Some(Some(now)) if *now != old => changes.push(SysctlChange {
                key,
                from: Some(now.clone()),
                to: old,
            }),
            _ => {}
        }
    }
    let v6 = Family::V6.forwarding_sysctl();
    let enabling = changes.iter().any(|c| c.key == v6 && c.to == "1");
    if enabling {
        let guards: Vec<SysctlChange> = observed
            .ra_default_routes
            .iter()
            .filter(|(_, accept_ra)| accept_ra.as_deref() == Some("1"))
            .map(|(dev, _)| SysctlChange {
                key: format!("net/ipv6/conf/{dev}/accept_ra"),
                from: Some("1".to_string()),
                to: "2".to_string(),
            })
            .collect();
        changes.splice(0..0, guards);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_changes_only_when_different() {
        let mut observed: Observed = Observed::default();
        observed
            .sysctls
            .insert("net/ipv4/ip_forward".into(), Some("0".into()));
        observed
            .sysctls
            .insert("net/ipv6/conf/all/forwarding".into(), Some("1".into()));
        let want = BTreeMap::from([
            ("net/ipv4/ip_forward".to_string(), "1".to_string()),
            ("net/ipv6/conf/all/forwarding".to_string(), "1".to_string()),
        ]);
        let changes = plan_sysctls(&want, &observed, &mut Record::default(), &mut Vec::new());
        assert_eq!(
            changes,
            vec![SysctlChange {
                key: "net/ipv4/ip_forward".into(),
                from: Some("0".into()),
                to: "1".into()
            }]
        );
    }
}
