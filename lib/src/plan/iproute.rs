//! Plans the iproute2 edit: make (`adds`: addresses, routes, rules, run before the firewall)
//! before break (`dels`: rules, routes, addresses, run after). Only recorded objects are ever
//! removed; what exists without being ours is used, never replaced or claimed.

use std::collections::BTreeSet;

use crate::net::{Cidr, Family};
use crate::observe::RoutingObserved;
use crate::routing::{IfAddr, IpRule, Routing};

/// One `ip -4|-6 -batch -` script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IpBatch {
    pub family: Family,
    pub lines: Vec<String>,
}

/// Counts by kind, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutingChanges {
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    pub routes_added: usize,
    pub routes_replaced: usize,
    pub routes_removed: usize,
}

impl RoutingChanges {
    pub(crate) fn is_empty(&self) -> bool {
        *self == RoutingChanges::default()
    }
}

/// The iproute2 edit: make (`adds`, run before iptables) before break (`dels`, run after).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutingPlan {
    pub adds: Vec<IpBatch>,
    pub dels: Vec<IpBatch>,
    /// The ownership record to write, when it changes.
    pub record: Option<BTreeSet<String>>,
    /// Record keys of owned rules that could not be deleted safely, so stay recorded.
    pub kept_rules: Vec<String>,
    pub changes: RoutingChanges,
    pub warnings: Vec<String>,
}

/// Diffs desired iproute2 objects against the observed ones.
pub(crate) fn plan_routing(want: &Routing, have: &RoutingObserved, protocol: u8) -> RoutingPlan {
    let mut plan = RoutingPlan::default();
    let adoptable = super::record::adoptable(have);
    let mut adds: Vec<(Family, String)> = Vec::new();
    let mut dels: Vec<(Family, String)> = Vec::new();
    let mut record = have.recorded.clone();

    // Addresses first among adds (routes via them need them), last among deletes.
    for a in &want.addresses {
        match have.present.iter().find(|p| p.same_address(a)) {
            None => {
                adds.push((a.family(), format!("address add {a}")));
                record.insert(a.record_key());
                plan.changes.addresses_added += 1;
            }
            Some(p) if p.label != a.label => {
                if have.recorded.contains(&a.record_key()) {
                    adds.push((a.family(), format!("address replace {a}")));
                    plan.changes.addresses_added += 1;
                } else {
                    plan.warnings.push(format!("address {} already exists with label {:?}; it was not added by portfwd, so it is left as it is", a.record_key(), p.label.as_deref().unwrap_or(&p.dev)));
                }
            }
            Some(_) => {}
        }
    }
    let mut routes_seen = BTreeSet::new();
    for r in &want.routes {
        if !routes_seen.insert(r.key()) {
            continue;
        }
        match have.owned.routes.iter().find(|o| o.key() == r.key()) {
            Some(o) if o.satisfies(r) => {}
            Some(_) => {
                adds.push((r.family, format!("route replace {r} proto {protocol}")));
                plan.changes.routes_replaced += 1;
            }
            None if have.existing_routes.contains(&r.record_key()) => {
                plan.warnings.push(format!("route {} already exists and was not added by this instance: it is left as it is, never replaced or removed", r.record_key()));
            }
            None => {
                adds.push((r.family, format!("route add {r} proto {protocol}")));
                plan.changes.routes_added += 1;
            }
        }
    }
    let mut kept = vec![false; have.owned.rules.len()];
    let mut seen: Vec<&IpRule> = Vec::new();
    for r in &want.rules {
        if seen.contains(&r) {
            continue;
        }
        seen.push(r);
        match (0..have.owned.rules.len()).find(|&i| !kept[i] && have.owned.rules[i] == *r) {
            Some(i) => kept[i] = true,
            None if have.existing_rules.contains(&r.record_key()) => {
                plan.warnings.push(format!("ip rule {} already exists and was not added by this instance: it is used as it is, never removed", r.record_key()));
            }
            None => {
                adds.push((r.family, format!("rule add {r} protocol {protocol}")));
                plan.changes.rules_added += 1;
            }
        }
    }

    // Those the params do not ask for may be another program's (the number is not
    // portfwd's alone): named, left.
    for key in &adoptable {
        let wanted = want.rules.iter().any(|r| r.record_key() == *key)
            || want.routes.iter().any(|r| r.record_key() == *key);
        let taken = have.owned.rules.iter().any(|r| r.record_key() == *key)
            || have.owned.routes.iter().any(|r| r.record_key() == *key);
        if !wanted && !taken {
            plan.warnings.push(format!("{key} carries this instance's protocol {protocol}, but no record says it is this instance's (another program may use the number): it is left as it is; remove it by hand if it is"));
        }
    }
    let mut kept_rules = Vec::new();
    for (r, _) in have.owned.rules.iter().zip(&kept).filter(|(_, k)| !**k) {
        // The kernel deletes the FIRST rule matching a `rule del`, and a selector left out
        // matches anything: when another rule of our protocol would be hit first, keep ours.
        let first = have
            .protocol_rules
            .iter()
            .find(|q| q.family == r.family && r.deletes(q));
        if let Some(q) = first.filter(|q| *q != r) {
            plan.warnings.push(format!("ip rule {} is not removed: `ip rule del` would hit {} (same protocol {protocol}, listed first) instead; remove that one first", r.record_key(), q.record_key()));
            kept_rules.push(r.record_key());
            continue;
        }
        dels.push((r.family, format!("rule del {r} protocol {protocol}")));
        plan.changes.rules_removed += 1;
    }
    plan.kept_rules = kept_rules;
    for r in &have.owned.routes {
        if !want.routes.iter().any(|w| w.key() == r.key()) {
            dels.push((r.family, format!("route del {r} proto {protocol}")));
            plan.changes.routes_removed += 1;
        }
    }
    let mut kept_owned = Vec::new();
    let mut removing: Vec<IfAddr> = have
        .owned_addresses()
        .into_iter()
        .filter(|a| !want.addresses.iter().any(|w| w.same_address(a)))
        .collect();
    // Secondaries first: deleting a primary IPv4 address deletes the secondaries of its
    // subnet with it (unless promote_secondaries is set), and a later `del` of one would fail.
    removing.sort_by_key(|a| !a.secondary);
    for a in &removing {
        let subnet = Cidr {
            addr: a.addr,
            prefix: a.prefix,
        }
        .network();
        // Secondaries that stay: those may not be ours, so the primary waits.
        let secondaries: Vec<String> = have
            .present
            .iter()
            .filter(|p| {
                p.dev == a.dev
                    && p.family() == Family::V4
                    && !p.same_address(a)
                    && p.prefix == a.prefix
                    && subnet.contains(&p.addr)
                    && !removing.iter().any(|r| r.same_address(p))
            })
            .map(|p| p.addr.to_string())
            .collect();
        if a.family() == Family::V4 && !a.secondary && !secondaries.is_empty() {
            plan.warnings.push(format!(
                "address {} is not removed: it is the primary of {} on {}, which the kernel would delete with it; remove those first or set net.ipv4.conf.{}.promote_secondaries=1",
                a.record_key(),
                secondaries.join(", "),
                a.dev,
                a.dev
            ));
            kept_owned.push(a.record_key());
            continue;
        }
        dels.push((
            a.family(),
            format!("address del {}/{} dev {}", a.addr, a.prefix, a.dev),
        ));
        plan.changes.addresses_removed += 1;
    }
    // Unwanted recorded addresses are being deleted (or are gone already): forget them.
    record.retain(|key| {
        want.addresses.iter().any(|w| &w.record_key() == key) || kept_owned.contains(key)
    });
    plan.adds = batches(adds);
    plan.dels = batches(dels);
    if record != have.recorded {
        plan.record = Some(record);
    }
    plan
}

fn batches(lines: Vec<(Family, String)>) -> Vec<IpBatch> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter_map(|family| {
            let lines: Vec<String> = lines
                .iter()
                .filter(|(f, _)| *f == family)
                .map(|(_, l)| l.clone())
                .collect();
            (!lines.is_empty()).then_some(IpBatch { family, lines })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::IpRoute;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn alias() -> IfAddr {
        IfAddr {
            addr: "10.10.10.11".parse().unwrap(),
            prefix: 24,
            dev: "eth0".into(),
            label: Some("eth0:1".into()),
            secondary: false,
        }
    }

    fn rule() -> IpRule {
        IpRule {
            family: Family::V4,
            priority: 20000,
            from: cidr("10.10.10.11"),
            to: None,
            fwmark: None,
            iif: None,
            table: 1,
        }
    }

    fn route() -> IpRoute {
        IpRoute {
            family: Family::V4,
            table: 1,
            to: None,
            via: Some("10.10.10.10".parse().unwrap()),
            dev: Some("eth0".into()),
        }
    }

    fn lines(batches: &[IpBatch]) -> Vec<String> {
        batches.iter().flat_map(|b| b.lines.clone()).collect()
    }

    #[test]
    fn first_apply_adds_in_make_before_break_order() {
        let want = Routing {
            addresses: vec![alias()],
            rules: vec![rule()],
            routes: vec![route()],
        };
        let plan = plan_routing(&want, &RoutingObserved::default(), 201);
        assert_eq!(
            lines(&plan.adds),
            vec![
                "address add 10.10.10.11/24 dev eth0 label eth0:1",
                "route add default via 10.10.10.10 dev eth0 table 1 proto 201",
                "rule add priority 20000 from 10.10.10.11/32 table 1 protocol 201",
            ]
        );
        assert!(plan.dels.is_empty());
        assert_eq!(
            plan.record,
            Some(BTreeSet::from(["eth0 10.10.10.11/24".to_string()]))
        );
    }

    #[test]
    fn converged_state_plans_nothing() {
        let want = Routing {
            addresses: vec![alias()],
            rules: vec![rule()],
            routes: vec![route()],
        };
        let have = RoutingObserved {
            owned: Routing {
                addresses: vec![],
                rules: vec![rule()],
                routes: vec![IpRoute { ..route() }],
            },
            present: vec![alias()],
            recorded: BTreeSet::from(["eth0 10.10.10.11/24".to_string()]),
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&want, &have, 201);
        assert_eq!(plan, RoutingPlan::default());
    }

    #[test]
    fn absent_removes_only_owned_objects() {
        let foreign = IfAddr {
            addr: "10.10.20.12".parse().unwrap(),
            prefix: 24,
            dev: "eth0".into(),
            label: None,
            secondary: false,
        };
        let have = RoutingObserved {
            owned: Routing {
                addresses: vec![],
                rules: vec![rule()],
                routes: vec![route()],
            },
            present: vec![alias(), foreign],
            recorded: BTreeSet::from(["eth0 10.10.10.11/24".to_string()]),
            protocol_rules: vec![rule()],
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&Routing::default(), &have, 201);
        assert!(plan.adds.is_empty());
        assert_eq!(
            lines(&plan.dels),
            vec![
                "rule del priority 20000 from 10.10.10.11/32 table 1 protocol 201",
                "route del default via 10.10.10.10 dev eth0 table 1 proto 201",
                "address del 10.10.10.11/24 dev eth0",
            ]
        );
        assert_eq!(plan.record, Some(BTreeSet::new()));
    }

    #[test]
    fn a_primary_with_foreign_secondaries_is_kept() {
        let other = IfAddr {
            addr: "10.10.10.12".parse().unwrap(),
            prefix: 24,
            dev: "eth0".into(),
            label: None,
            secondary: true,
        };
        let have = RoutingObserved {
            present: vec![alias(), other],
            recorded: BTreeSet::from(["eth0 10.10.10.11/24".to_string()]),
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&Routing::default(), &have, 201);
        assert!(plan.dels.is_empty(), "{:?}", plan.dels);
        assert!(
            plan.warnings[0].contains("primary of 10.10.10.12"),
            "{:?}",
            plan.warnings
        );
        assert_eq!(plan.record, None, "still recorded: removed once it can be");
    }

    #[test]
    fn existing_address_is_used_but_never_owned() {
        let want = Routing {
            addresses: vec![alias()],
            ..Routing::default()
        };
        let have = RoutingObserved {
            present: vec![alias()],
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&want, &have, 201);
        assert_eq!(
            plan,
            RoutingPlan::default(),
            "present and not recorded: nothing to do, nothing to own"
        );
        let plan = plan_routing(&Routing::default(), &have, 201);
        assert!(
            plan.dels.is_empty(),
            "never remove an address portfwd did not add"
        );
    }

    #[test]
    fn changed_gateway_is_replaced_in_place() {
        let mut want_route = route();
        want_route.via = Some("10.10.10.1".parse().unwrap());
        let want = Routing {
            routes: vec![want_route],
            ..Routing::default()
        };
        let have = RoutingObserved {
            owned: Routing {
                routes: vec![route()],
                ..Routing::default()
            },
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&want, &have, 201);
        assert_eq!(
            lines(&plan.adds),
            vec!["route replace default via 10.10.10.1 dev eth0 table 1 proto 201"]
        );
        assert!(plan.dels.is_empty());
    }

    #[test]
    fn what_exists_without_being_ours_is_used_never_added_or_claimed() {
        let want = Routing {
            rules: vec![rule()],
            routes: vec![route()],
            ..Routing::default()
        };
        let have = RoutingObserved {
            existing_rules: BTreeSet::from([rule().record_key()]),
            existing_routes: BTreeSet::from([route().record_key()]),
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&want, &have, 201);
        assert!(plan.adds.is_empty(), "{:?}", plan.adds);
        assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    }

    #[test]
    fn a_rule_del_that_would_hit_another_rule_first_is_not_made() {
        // Another instance's rule with the same protocol, priority, source and table, but an
        // iif: `rule del` without iif matches it, and it is listed first.
        let theirs = IpRule {
            iif: Some("eth1".into()),
            ..rule()
        };
        let have = RoutingObserved {
            owned: Routing {
                rules: vec![rule()],
                ..Routing::default()
            },
            protocol_rules: vec![theirs.clone(), rule()],
            ..RoutingObserved::default()
        };
        let plan = plan_routing(&Routing::default(), &have, 201);
        assert!(plan.dels.is_empty(), "{:?}", plan.dels);
        assert_eq!(plan.kept_rules, vec![rule().record_key()]);
        assert!(
            plan.warnings[0].contains("would hit"),
            "{:?}",
            plan.warnings
        );
        // Listed after ours, it is safe: the kernel meets ours first.
        let have = RoutingObserved {
            protocol_rules: vec![rule(), theirs],
            ..have
        };
        let plan = plan_routing(&Routing::default(), &have, 201);
        assert_eq!(lines(&plan.dels).len(), 1);
    }

    #[test]
    fn ipv6_goes_in_its_own_batch() {
        let v6 = IpRule {
            family: Family::V6,
            from: cidr("fd00::11"),
            ..rule()
        };
        let plan = plan_routing(
            &Routing {
                rules: vec![rule(), v6],
                ..Routing::default()
            },
            &RoutingObserved::default(),
            7,
        );
        assert_eq!(plan.adds.len(), 2);
        assert_eq!(plan.adds[1].family, Family::V6);
        assert_eq!(
            plan.adds[1].lines,
            vec!["rule add priority 20000 from fd00::11/128 table 1 protocol 7"]
        );
    }
}
