use super::*;
use crate::compile::compile;
use crate::firewall::iptables::Iptables;
use crate::routing::IfAddr;

fn config(json: &str) -> Config {
    Config::from_json(json).unwrap().0
}

fn observed_with(addresses: &[(&str, u8, &str)], sysctls: &[(&str, &str)]) -> Observed {
    let mut o: Observed = Observed::default();
    o.routing.present = addresses
        .iter()
        .map(|(a, p, d)| IfAddr {
            addr: a.parse().unwrap(),
            prefix: *p,
            dev: d.to_string(),
            label: None,
            secondary: false,
        })
        .collect();
    o.sysctls = sysctls
        .iter()
        .map(|(k, v)| (k.to_string(), Some(v.to_string())))
        .collect();
    o
}

#[test]
fn mark_bit_users_are_recognised() {
    let bit = 0x2000;
    for (rule, touches) in [
        (
            "mangle PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            true,
        ),
        (
            "mangle PREROUTING -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff",
            false,
        ),
        ("mangle PREROUTING -j CONNMARK --save-mark", true),
        ("filter FORWARD -m connmark --mark 0x1/0x1 -j ACCEPT", false),
        ("filter FORWARD -m connmark --mark 0x1 -j ACCEPT", true),
        (
            "mangle OUTPUT -j CONNMARK --set-xmark 0x2000/0xffffffff",
            true,
        ),
        ("mangle OUTPUT -j CONNMARK --set-xmark 0x4000/0x4000", false),
        ("mangle OUTPUT -j CONNMARK --or-mark 0x2000", true),
    ] {
        assert_eq!(touches_mark_bit(rule, bit), touches, "{rule}");
    }
    let c = config(r#"{"forwards":[{"name":"w","listen_port":1,"to":"10.0.0.2"}]}"#);
    let mut o: Observed = Observed::default();
    o.firewall
        .connmark_rules
        .push("mangle PREROUTING -j CONNMARK --set-xmark 0x2000/0x2000".into());
    assert!(warnings(&c, &Iptables::default(), &o)[0].contains("conn_mark 0x2000"));
}

#[test]
fn snat_none_to_an_on_link_backend_warns_only_where_the_host_shows_the_bypass() {
    let forward = |extra: &str| {
        config(&format!(
            r#"{{"forwards":[{{"name":"db","listen_port":1,"to":"10.0.2.2:80","snat":"none"{extra}}}]}}"#
        ))
    };
    let single = observed_with(&[("10.0.2.1", 24, "eth1"), ("127.0.0.1", 8, "lo")], &[]);
    let dual = observed_with(&[("10.0.1.1", 24, "eth0"), ("10.0.2.1", 24, "eth1")], &[]);
    let warned = |c: &Config, o: &Observed| warnings(c, &Iptables::default(), o);
    // A single-NIC proxy: its clients share the backend's link.
    let w = warned(&forward(""), &single);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("on-link (10.0.2.1/24 on eth1)") && w[0].contains("only interface"),
        "{w:?}"
    );
    // Two links and nothing saying where clients come from: the host cannot tell.
    assert!(warned(&forward(""), &dual).is_empty());
    assert!(warned(&forward(r#","in_interface":"eth0""#), &dual).is_empty());
    assert!(warned(&forward(r#","listen_address":"10.0.1.1""#), &dual).is_empty());
    // Clients that arrive on (or come from) the backend's own link.
    for extra in [
        r#","in_interface":"eth1""#,
        r#","in_interface":"eth+""#,
        r#","listen_address":"10.0.2.1""#,
        r#","sources":["10.0.2.128/25"]"#,
    ] {
        assert_eq!(warned(&forward(extra), &dual).len(), 1, "{extra}");
    }
    assert!(warned(&forward(r#","sources":["10.0.9.0/24"]"#), &dual).is_empty());
    // Not on-link at all.
    let far = observed_with(&[("10.0.9.1", 24, "eth1")], &[]);
    assert!(warned(&forward(""), &far).is_empty());
    // The params' own policy route brings the backend's replies back.
    let routed = config(
        r#"{"forwards":[{"name":"db","listen_port":1,"to":"10.0.2.2:80","snat":"none"}],
            "policy_routes":[{"from":"10.0.2.2","table":7,"routes":[{"to":"default","via":"10.0.2.1"}]}]}"#,
    );
    assert!(warned(&routed, &single).is_empty());
    // An operator's ignore silences it, and doctor can list it.
    let ignoring = forward(r#","ignore_findings":["reply_bypass"]"#);
    let sifted = findings(&ignoring, &Iptables::default(), &single);
    assert!(sifted.kept.is_empty(), "{:?}", sifted.kept);
    assert_eq!(sifted.ignored.len(), 1);
    assert_eq!(sifted.ignored[0].id, "reply_bypass");
    assert!(reminders(&ignoring, &single).is_empty());
}

#[test]
fn the_snat_none_reminder_is_for_what_the_host_cannot_show() {
    let c = config(
        r#"{"forwards":[{"name":"db","listen_port":1,"to":"10.0.2.2:80","snat":"none"},
            {"name":"m","listen_port":2,"to":"10.0.2.2:80"}]}"#,
    );
    let dual = observed_with(&[("10.0.1.1", 24, "eth0"), ("10.0.2.1", 24, "eth1")], &[]);
    let r = reminders(&c, &dual);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("forward \"db\": snat is none"), "{r:?}");
    // Where reply_bypass is warned, the reminder would only repeat it.
    let single = observed_with(&[("10.0.2.1", 24, "eth1")], &[]);
    assert!(reminders(&c, &single).is_empty());
}

/// A pool with `snat: none` is checked backend by backend: the on-link one is warned about,
/// and the reminder names every backend.
#[test]
fn a_pool_with_snat_none_is_checked_for_each_backend() {
    let c = config(
        r#"{"forwards":[{"name":"db","listen_port":1,"snat":"none",
            "backends":[{"to":"10.0.9.2:80"},{"to":"10.0.2.3:80","weight":2}]}]}"#,
    );
    assert!(needs_addresses(&c));
    let single = observed_with(&[("10.0.2.1", 24, "eth1")], &[]);
    let w = warnings(&c, &Iptables::default(), &single);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("backend 10.0.2.3 is on-link"), "{w:?}");
    let dual = observed_with(&[("10.0.1.1", 24, "eth0"), ("10.0.2.1", 24, "eth1")], &[]);
    let r = reminders(&c, &dual);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("its backends (10.0.9.2, 10.0.2.3)"), "{r:?}");
}

#[test]
fn a_forward_hook_drop_names_only_the_entries_that_do_not_ignore_it() {
    let c = config(
        r#"{"forwards":[{"name":"a","listen_port":1,"to":"10.0.2.2:80"},
            {"name":"b","listen_port":2,"to":"10.0.2.2:80","ignore_findings":["forward_hook_drop"]}]}"#,
    );
    let mut o: Observed = Observed::default();
    o.forward_chains.push(crate::foreign::ForwardChain {
        family: "inet".into(),
        table: "fw".into(),
        name: "forward".into(),
        priority: 0,
        policy_drop: true,
        ..Default::default()
    });
    let sifted = findings(&c, &Iptables::default(), &o);
    let hook: Vec<&Finding> = sifted
        .kept
        .iter()
        .filter(|f| f.id == "forward_hook_drop")
        .collect();
    assert_eq!(hook.len(), 1, "{sifted:?}");
    assert_eq!(hook[0].entry.as_deref(), Some("forwards.a"));
    assert!(!hook[0].msg.contains("\"b\""), "{}", hook[0].msg);
    assert_eq!(sifted.ignored.len(), 1);
    assert_eq!(sifted.ignored[0].entry.as_deref(), Some("forwards.b"));
}

#[test]
fn strict_rp_filter_on_a_policy_route_device_warns() {
    let c = config(
        r#"{"policy_routes":[{"from":"10.10.10.11","table":1,"routes":[{"to":"default","via":"10.10.10.10","dev":"eth0"}]}]}"#,
    );
    let keys = sysctl_keys(&c, &compile(&c, &Iptables::default()).sysctls);
    assert!(
        keys.contains(&"net/ipv4/conf/eth0/rp_filter".to_string()),
        "{keys:?}"
    );
    let strict = observed_with(
        &[],
        &[
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/eth0/rp_filter", "1"),
        ],
    );
    assert!(
        warnings(&c, &Iptables::default(), &strict)[0].contains("rp_filter is 1 (strict) for eth0")
    );
    let loose = observed_with(
        &[],
        &[
            ("net/ipv4/conf/all/rp_filter", "2"),
            ("net/ipv4/conf/eth0/rp_filter", "1"),
        ],
    );
    assert!(
        warnings(&c, &Iptables::default(), &loose).is_empty(),
        "the higher of all and the device wins"
    );
}

#[test]
fn loopback_dnat_sets_route_localnet_when_auto_and_warns_otherwise() {
    let auto = config(
        r#"{"forwards":[{"name":"l","listen_port":1,"in_interface":"eth0","to":"127.0.0.1:8080"}]}"#,
    );
    let desired = compile(&auto, &Iptables::default());
    assert_eq!(
        desired
            .sysctls
            .get("net/ipv4/conf/eth0/route_localnet")
            .map(String::as_str),
        Some("1")
    );
    assert!(warnings(&auto, &Iptables::default(), &Observed::default()).is_empty());
    // No named interface: nothing sets route_localnet, so the run must say so.
    let unnamed = config(r#"{"forwards":[{"name":"l","listen_port":1,"to":"127.0.0.1:8080"}]}"#);
    assert!(!compile(&unnamed, &Iptables::default())
        .sysctls
        .keys()
        .any(|k| k.contains("route_localnet")));
    assert!(
        warnings(&unnamed, &Iptables::default(), &Observed::default())[0]
            .contains("route_localnet=1")
    );
    let manual = config(
        r#"{"ip_forward":true,"forwards":[{"name":"l","listen_port":1,"to":"127.0.0.1:8080"}]}"#,
    );
    assert!(!compile(&manual, &Iptables::default())
        .sysctls
        .keys()
        .any(|k| k.contains("route_localnet")));
    assert!(
        warnings(&manual, &Iptables::default(), &Observed::default())[0]
            .contains("route_localnet=1")
    );
    let set = observed_with(&[], &[("net/ipv4/conf/all/route_localnet", "1")]);
    assert!(warnings(&manual, &Iptables::default(), &set).is_empty());
}
