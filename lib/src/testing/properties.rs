//! Property tests of the whole engine against the fake host, over random params (forwards of
//! both families, masquerade entries, addresses, policy routes, persist) on both backends
//! (and moves between them):
//! - applying, then applying again, changes nothing the second time (at most the record gains
//!   the read cache) and writes nothing at all the third time, which skips the firewall read;
//! - the read cache never hides a change: another writer's edit is repaired;
//! - a change planned from the record (nothing written since the last run) writes exactly
//!   what a change planned from a full read writes;
//! - a failure injected at any write step leaves the host exactly as it was before the run,
//!   foreign rules included;
//! - a hand edit of owned objects (a rule deleted, altered or added, a chain's policy, the
//!   table flagged dormant, a map element altered; iptables: a rule replaced under its
//!   comment) is repaired by the next run, and nothing foreign changes.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::FakeHost;
use crate::model::{Config, RunMode};
use crate::net::Family;

/// Another owner's rules: a Docker-like nat chain and a FORWARD policy DROP.
const FOREIGN: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j RETURN\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n-A DOCKER -i docker0 -j RETURN\nCOMMIT\n";

fn forward(i: usize) -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        1u16..1000,
        0u8..4,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(six, port, kind, udp, reset)| {
            let to = if six {
                format!("[fd00:2::{}]:80", i + 1)
            } else {
                format!("10.0.2.{}:80", i + 1)
            };
            let mut f = json!({"name": format!("f{i}"), "listen_port": port + 1000 * i as u16,
                               "proto": if udp { "both" } else { "tcp" }, "to": to,
                               "reset_connections": reset});
            match kind {
                0 => f["snat"] = json!("none"),
                1 => {
                    f.as_object_mut().map(|o| o.remove("to"));
                    f["redirect_to_port"] = json!(8080);
                }
                2 => f["local"] = json!(true),
                _ => f["sources"] = json!([if six { "fd00:9::/64" } else { "10.9.0.0/16" }]),
            }
            f
        })
}

fn params() -> impl Strategy<Value = Value> {
    (0usize..5, any::<bool>(), 0usize..3, any::<bool>(), any::<bool>(), any::<bool>()).prop_flat_map(
        |(n, masq, routes, persist, absent, nftables)| {
            let forwards: Vec<_> = (0..n).map(forward).collect();
            (forwards, Just((masq, routes, persist, absent, nftables))).prop_map(
                |(forwards, (masq, routes, persist, absent, nftables))| {
                    let backend = if nftables { "nftables" } else { "iptables" };
                    let mut p = json!({"forwards": forwards, "persist": persist, "backend": backend});
                    if masq {
                        p["masquerade"] = json!([{"name": "lan", "source": "192.168.0.0/24", "out_interface": "eth1"}]);
                    }
                    let addresses: Vec<Value> = (0..routes)
                        .map(|i| json!({"address": format!("10.10.10.{}/24", 10 + i), "dev": "eth0", "label": format!("eth0:{i}")}))
                        .collect();
                    let policy: Vec<Value> = (0..routes)
                        .map(|i| json!({"from": format!("10.10.10.{}", 10 + i), "table": 100 + i,
                                        "routes": [{"to": "default", "via": "10.10.10.1", "dev": "eth0"}]}))
                        .collect();
                    p["addresses"] = json!(addresses);
                    p["policy_routes"] = json!(policy);
                    if absent {
                        p["state"] = json!("absent");
                    }
                    p
                },
            )
        },
    )
}

fn config(p: &Value) -> Config {
    Config::from_json(&p.to_string())
        .expect("generated params are valid")
        .0
}

/// Another owner's nftables table.
const FOREIGN_NFT: &str = "add table inet other\nadd chain inet other input { type filter hook input priority 10; policy accept; }\nadd rule inet other input tcp dport 9999 counter accept comment \"theirs\"\n";

/// A host with another owner's rules, after `base` was applied.
fn host_with(base: &Value) -> FakeHost {
    let mut host = FakeHost::new();
    host.set_dump(Family::V4, FOREIGN);
    host.state
        .nft
        .apply(FOREIGN_NFT)
        .expect("the foreign table applies");
    let report = crate::converge::run(&config(base), RunMode::default(), &mut host);
    assert!(!report.failed, "{report:?}");
    host.calls.clear();
    host.writes = 0;
    host
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_second_run_changes_nothing_and_a_third_writes_nothing(base in params(), p in params()) {
        let mut host = host_with(&base);
        let first = crate::converge::run(&config(&p), RunMode::default(), &mut host);
        prop_assert!(!first.failed, "{:?}", first);
        let after_first = host.state.clone();
        host.calls.clear();
        let second = crate::converge::run(&config(&p), RunMode::default(), &mut host);
        prop_assert!(!second.changed && !second.failed, "{:?}", second);
        prop_assert!(second.commands.is_empty(), "{:?}", second.commands);
        prop_assert!(host.writes().iter().all(|w| w.starts_with("write-record")), "{:#?}", host.writes());
        let mut without_cache = host.state.clone();
        without_cache.record.read_cache = after_first.record.read_cache.clone();
        prop_assert_eq!(&without_cache, &after_first);
        host.calls.clear();
        let third = crate::converge::run(&config(&p), RunMode::default(), &mut host);
        prop_assert!(!third.changed && !third.failed, "{:?}", third);
        prop_assert_eq!(host.writes(), Vec::<&String>::new());
        prop_assert_eq!(&third.warnings, &second.warnings);
        let has_rules = host.state.tables.values().any(|t| t.render().contains("PFWD-portfwd"))
            || host.state.nft.tables.contains_key("portfwd-portfwd");
        let read = host
            .calls
            .iter()
            .any(|c| c.starts_with("save ") || c.starts_with("read-nft list table inet portfwd-"));
        prop_assert_eq!(read, !has_rules, "the cached read is used exactly when there are rules: {:#?}", host.calls);
    }

    #[test]
    fn the_read_cache_never_hides_another_writers_change(p in params()) {
        let mut host = host_with(&json!({}));
        let c = config(&p);
        for _ in 0..3 {
            let report = crate::converge::run(&c, RunMode::default(), &mut host);
            prop_assert!(!report.failed, "{:?}", report);
        }
        let converged = host.state.clone();
        // Someone flushes our FORWARD or prerouting chain (a committed transaction: the
        // generation moves).
        let iptables = host
            .state
            .tables
            .get_mut(&Family::V4)
            .is_some_and(|t| t.restore("*filter\n-F PFWD-portfwd-FWD\nCOMMIT\n").is_ok());
        let nft = host
            .state
            .nft
            .apply("flush chain inet portfwd-portfwd prerouting\n")
            .is_ok();
        prop_assume!(iptables || nft);
        host.generation = host.generation.map(|g| g + 1);
        let repair = crate::converge::run(&c, RunMode::default(), &mut host);
        prop_assert!(repair.changed && !repair.failed, "{:?}", repair);
        prop_assert_eq!(&host.state.tables, &converged.tables);
        prop_assert_eq!(&host.state.nft, &converged.nft);
    }

    #[test]
    fn a_change_planned_from_the_record_writes_what_a_full_read_would(base in params(), p in params()) {
        // One host plans the change from its record (nothing has written since its last
        // run), the other from a full read (its record's cache is dropped).
        let mut from_record = host_with(&base);
        let mut from_read = from_record.clone();
        from_read.state.record.read_cache = None;
        let a = crate::converge::run(&config(&p), RunMode::default(), &mut from_record);
        let b = crate::converge::run(&config(&p), RunMode::default(), &mut from_read);
        prop_assert!(!a.failed && !b.failed, "{:?} {:?}", a, b);
        prop_assert_eq!(&from_record.state.tables, &from_read.state.tables);
        prop_assert_eq!(&from_record.state.nft, &from_read.state.nft, "{:#?}", a.commands);
        prop_assert_eq!(a.changed, b.changed);
        prop_assert_eq!(&a.msg, &b.msg);
        // Whichever way it was planned, the next run has nothing to do, and reads nothing
        // when the change's commits could be counted (no table dropped only if empty).
        let counted = !a.commands.iter().any(|c| c.starts_with("nft delete table ip"));
        from_record.calls.clear();
        let again = crate::converge::run(&config(&p), RunMode::default(), &mut from_record);
        prop_assert!(!again.changed && !again.failed, "{:?}", again);
        let listed = from_record.calls.iter().any(|c| c.starts_with("read-nft list table inet portfwd-"));
        let held = from_record.state.nft.tables.contains_key("portfwd-portfwd");
        prop_assert!(!(counted && listed && held), "{:#?}", from_record.calls);
    }

    #[test]
    fn a_failure_at_any_step_leaves_the_host_as_it_was(base in params(), p in params()) {
        let pristine = host_with(&base);
        let mut probe = pristine.clone();
        let report = crate::converge::run(&config(&p), RunMode::default(), &mut probe);
        prop_assert!(!report.failed, "{:?}", report);
        let steps = probe.writes;
        for k in 1..=steps {
            let mut host = pristine.clone();
            host.fail_at = Some(k);
            let report = crate::converge::run(&config(&p), RunMode::default(), &mut host);
            prop_assert!(report.failed, "write {} of {}: {:?}", k, steps, report);
            prop_assert!(report.msg.contains("rolled back every change"), "write {} of {}: {}", k, steps, report.msg);
            let (now, was) = (&host.state, &pristine.state);
            prop_assert_eq!(&now.tables, &was.tables, "write {} of {}: {:#?}", k, steps, host.calls);
            prop_assert_eq!(&now.legacy, &was.legacy, "write {} of {}: {:#?}", k, steps, host.calls);
            prop_assert_eq!(&now.nft, &was.nft, "write {} of {}: {:#?}", k, steps, host.calls);
            prop_assert_eq!(&now.ip, &was.ip, "write {} of {}: {:#?}", k, steps, host.calls);
            prop_assert_eq!(&now.sysctls, &was.sysctls, "write {} of {}", k, steps);
            prop_assert_eq!(&now.record, &was.record, "write {} of {}: {:#?}", k, steps, host.calls);
            prop_assert_eq!(&now.stored, &was.stored, "write {} of {}", k, steps);
        }
    }

    #[test]
    fn a_hand_edit_of_owned_objects_is_repaired(p in params(), edit in 0usize..6, pick in any::<usize>()) {
        let mut host = host_with(&json!({}));
        let c = config(&p);
        for _ in 0..3 {
            let report = crate::converge::run(&c, RunMode::default(), &mut host);
            prop_assert!(!report.failed, "{:?}", report);
        }
        let converged = host.state.clone();
        let edited = if c.backend().is_nftables() {
            nft_edit(&mut host, edit, pick)
        } else {
            iptables_edit(&mut host, edit, pick)
        };
        prop_assume!(edited.is_some());
        prop_assert_ne!(&host.state, &converged, "the edit changed something: {:?}", edited);
        host.generation = host.generation.map(|g| g + 1);
        let repair = crate::converge::run(&c, RunMode::default(), &mut host);
        prop_assert!(repair.changed && !repair.failed, "{:?}: {:?}", edited, repair);
        prop_assert_eq!(&host.state.tables, &converged.tables, "{:?}: {:#?}", edited, repair.commands);
        prop_assert_eq!(&host.state.nft, &converged.nft, "{:?}: {:#?}", edited, repair.commands);
        let again = crate::converge::run(&c, RunMode::default(), &mut host);
        prop_assert!(!again.changed && !again.failed, "{:?}: {:?}", edited, again);
    }
}

/// One hand edit of an owned iptables rule (`pick` chooses which), as another tool makes it:
/// a rule deleted, replaced under its comment (`-R`, as a delete and an insert at its place),
/// or someone else's rule put first in an owned chain.
fn iptables_edit(host: &mut FakeHost, edit: usize, pick: usize) -> Option<String> {
    let dump = host.dump(Family::V4);
    let mut table = "";
    let mut owned: Vec<(String, String, usize, String)> = Vec::new();
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter" };
        }
        if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, rule) = rest.split_once(' ')?;
            let n = seen.entry(chain.to_string()).or_default();
            *n += 1;
            if chain.starts_with("PFWD-portfwd-") {
                owned.push((table.to_string(), chain.to_string(), *n, rule.to_string()));
            }
        }
    }
    let (table, chain, n, rule) = owned.get(pick % owned.len().max(1))?.clone();
    let payload = match edit % 3 {
        0 => format!("*{table}\n-D {chain} {n}\nCOMMIT\n"),
        1 => {
            format!("*{table}\n-D {chain} {n}\n-I {chain} {n} -s 198.51.100.0/24 {rule}\nCOMMIT\n")
        }
        _ => format!("*{table}\n-I {chain} 1 -s 203.0.113.1/32 -j RETURN\nCOMMIT\n"),
    };
    let tables = host.state.tables.get_mut(&Family::V4)?;
    tables.restore(&payload).ok()?;
    Some(payload)
}

/// One hand edit of the instance's nft table: a rule deleted, its body replaced under its
/// comment, a `log` rule put first, a base chain's policy set to drop, the table flagged
/// dormant, or a map element pointed at another chain.
fn nft_edit(host: &mut FakeHost, edit: usize, pick: usize) -> Option<String> {
    let t = "portfwd-portfwd";
    let table = host.state.nft.tables.get(t)?.clone();
    let rules: Vec<(&String, &super::nft::FakeRule)> = table
        .chains
        .iter()
        .flat_map(|(c, chain)| chain.rules.iter().map(move |r| (c, r)))
        .collect();
    let pick_rule = || rules.get(pick % rules.len().max(1)).copied();
    let script = match edit {
        0 => {
            let (c, r) = pick_rule()?;
            format!("delete rule inet {t} {c} handle {}", r.handle)
        }
        1 => {
            let (c, r) = pick_rule()?;
            let comment = r.comment.clone().unwrap_or_default();
            format!("replace rule inet {t} {c} handle {} ip saddr 198.51.100.0/24 counter accept comment \"{comment}\"", r.handle)
        }
        2 => {
            let (c, _) = pick_rule()?;
            format!("insert rule inet {t} {c} log")
        }
        3 => {
            let bases: Vec<(&String, &super::nft::BaseDecl)> = table
                .chains
                .iter()
                .filter_map(|(c, chain)| Some((c, chain.base.as_ref()?)))
                .collect();
            let (c, b) = bases.get(pick % bases.len().max(1))?;
            format!(
                "add chain inet {t} {c} {{ type {} hook {} priority {}; policy drop; }}",
                b.kind, b.hook, b.prio
            )
        }
        4 => format!("add table inet {t} {{ flags dormant; }}"),
        _ => {
            let elements: Vec<(&String, &super::nft::FakeElement)> = table
                .maps
                .iter()
                .flat_map(|(m, map)| map.elements.iter().map(move |e| (m, e)))
                .collect();
            let (m, e) = elements.get(pick % elements.len().max(1))?;
            let comment = e.comment.clone().unwrap_or_default();
            let delete = format!("delete element inet {t} {m} {{ {} }}", e.key);
            // Another chain, another backend or source, or (a set's) no element at all.
            let data = match (e.chain(), table.maps.get(*m)?.data.as_deref()) {
                (Some(chain), _) => {
                    let other = table
                        .chains
                        .iter()
                        .find(|(c, have)| have.base.is_none() && c.as_str() != chain)?
                        .0;
                    format!("jump {other}")
                }
                (None, Some(data)) => {
                    let addr = if data.contains("ipv6") {
                        "fd00:9::9"
                    } else {
                        "192.0.2.9"
                    };
                    if data.contains("inet_service") {
                        format!("{addr} . 9")
                    } else {
                        addr.to_string()
                    }
                }
                (None, None) => return Some(delete).filter(|d| host.state.nft.apply(d).is_ok()),
            };
            format!(
                "{delete}\nadd element inet {t} {m} {{ {key} comment \"{comment}\" : {data} }}",
                key = e.key
            )
        }
    };
    host.state.nft.apply(&script).ok()?;
    Some(script)
}
