//! End-to-end: `portfwd doctor` in namespaces. Each finding is made to appear by creating its
//! condition on a client/proxy/backend topology, and to go away once the condition is gone;
//! doctor itself never changes the host.

use crate::common::{portfwd, prerequisites, ruleset, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

/// `(exit code, ids of the findings)` of `portfwd doctor --json` with `params` on stdin.
fn doctor(ns: &Netns, params: &Value) -> (i32, Vec<String>, Value) {
    let r = portfwd()
        .run(ns, &["doctor", "--json"], &params.to_string(), &[])
        .unwrap();
    let ids = r.json["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings in {}{}", r.stdout, r.stderr))
        .iter()
        .map(|f| f["id"].as_str().unwrap_or_default().to_string())
        .collect();
    (r.code, ids, r.json)
}

fn apply(ns: &Netns, params: &Value) {
    let r = portfwd().apply(ns, params).unwrap();
    assert!(!r.failed(), "{}", r.stdout);
}

/// Once another owner's table is gone, doctor finds nothing and the forward works.
fn fixed_by_deleting(t: &Topology, table: &str, params: &Value) {
    crate::common::nft(&t.proxy, &[&format!("delete table inet {table}")]);
    assert_eq!(doctor(&t.proxy, params).1, Vec::<String>::new());
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok());
}

const WEB: &str = r#"{"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]}"#;

/// not_applied, ip_forward_off and forward_hook_drop: the seeds' traps, and firewalld's.
#[test]
fn doctor_finds_drift_forwarding_off_and_a_foreign_drop() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params: Value = serde_json::from_str(WEB).unwrap();

    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!(code, 1, "{report}");
    assert_eq!(ids, ["not_applied", "ip_forward_off"], "{report}");
    assert_eq!(report["ok"], false);
    let f = &report["findings"][1];
    assert_eq!(f["severity"], "error");
    assert_eq!(f["entry"], "forwards.web");
    assert!(
        f["fix"].as_str().unwrap().contains("ip_forward"),
        "{report}"
    );
    assert_eq!(
        ruleset(&t.proxy, "iptables-save").unwrap(),
        before,
        "doctor changes nothing"
    );

    apply(&t.proxy, &params);
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!((code, ids.len()), (0, 0), "{report}");
    assert_eq!(report["ok"], true);
    // Without params: the installed state is what doctor checks.
    let r = portfwd().run(&t.proxy, &["doctor"], "", &[]).unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("ok:"), "{}", r.stdout);

    t.proxy
        .exec(&["sysctl", "-w", "net.ipv4.ip_forward=0"])
        .unwrap();
    let (code, ids, _) = doctor(&t.proxy, &params);
    assert_eq!(
        (code, ids),
        (1, vec!["not_applied".to_string(), "ip_forward_off".into()])
    );
    apply(&t.proxy, &params);
    assert_eq!(doctor(&t.proxy, &params).1, Vec::<String>::new());

    crate::common::firewalld_like(&t.proxy);
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!((code, ids), (1, vec!["forward_hook_drop".to_string()]));
    assert!(
        report["findings"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("`inet fw filter_FORWARD`"),
        "{report}"
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "it is true"
    );
    fixed_by_deleting(&t, "fw", &params);
}

/// reply_bypass, route_localnet and mixed_iptables_flavours.
#[test]
fn doctor_finds_bypassing_replies_loopback_dnat_and_mixed_flavours() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    // Clients that arrive on eth1, the backend's own link (the backend itself, here): its
    // replies go straight back to them and the connection fails.
    let forward = |interface: &str, extra: Value| {
        let mut f = json!({"name": "db", "listen_port": 4321, "in_interface": interface,
            "to": "10.0.2.2:1234", "snat": "none"});
        if let Value::Object(more) = extra {
            f.as_object_mut().unwrap().extend(more);
        }
        json!({"forwards": [f]})
    };
    let bypass = forward("eth1", json!({}));
    apply(&t.proxy, &bypass);
    let (code, ids, report) = doctor(&t.proxy, &bypass);
    assert_eq!(
        (code, ids),
        (0, vec!["reply_bypass".to_string()]),
        "{report}"
    );
    assert_eq!(report["findings"][0]["severity"], "warning");
    assert!(
        probe(&t.backend, Proto::Tcp, sa("10.0.2.1:4321")).is_err(),
        "the bypass is real"
    );
    let applied = portfwd().apply(&t.proxy, &bypass).unwrap();
    assert!(
        crate::common::warnings(&applied)
            .iter()
            .any(|w| w.contains("is on-link")),
        "{}",
        applied.stdout
    );
    // The operator has judged it: apply is silent, doctor lists what it ignored.
    let judged = forward("eth1", json!({"ignore_findings": ["reply_bypass"]}));
    let applied = portfwd().apply(&t.proxy, &judged).unwrap();
    assert!(
        !applied.changed() && !applied.failed(),
        "{}",
        applied.stdout
    );
    assert_eq!(crate::common::warnings(&applied), Vec::<String>::new());
    let (code, ids, report) = doctor(&t.proxy, &judged);
    assert_eq!((code, ids), (0, Vec::<String>::new()), "{report}");
    assert_eq!(report["ignored"][0]["id"], "reply_bypass", "{report}");
    assert_eq!(report["ignored"][0]["entry"], "forwards.db", "{report}");
    // Clients on the other link: the host shows no bypass (the backend's route decides).
    let other = forward("eth0", json!({}));
    apply(&t.proxy, &other);
    assert_eq!(doctor(&t.proxy, &other).1, Vec::<String>::new());
    let masq: Value = serde_json::from_str(&WEB.replace("web", "db")).unwrap();
    apply(&t.proxy, &masq);
    assert_eq!(doctor(&t.proxy, &masq).1, Vec::<String>::new());

    let local = json!({"forwards": [{"name": "admin", "listen_port": 8080, "to": "127.0.0.1:80"}]});
    apply(&t.proxy, &local);
    let (code, ids, report) = doctor(&t.proxy, &local);
    assert_eq!(
        (code, ids),
        (1, vec!["route_localnet".to_string()]),
        "{report}"
    );
    let named = json!({"forwards": [{"name": "admin", "listen_port": 8080, "to": "127.0.0.1:80", "in_interface": "eth0"}]});
    apply(&t.proxy, &named);
    assert_eq!(doctor(&t.proxy, &named).1, Vec::<String>::new());

    // Legacy tables cannot be removed again: their absence was shown by every check above.
    t.proxy
        .exec(&["iptables-legacy", "-t", "nat", "-N", "OTHER"])
        .unwrap();
    let (code, ids, _) = doctor(&t.proxy, &named);
    assert_eq!(
        (code, ids),
        (0, vec!["mixed_iptables_flavours".to_string()])
    );
}

/// rp_filter on a policy-route device and an IPv6 default route from router advertisements.
#[test]
fn doctor_finds_strict_rp_filter_and_router_advertised_routes() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let routed = json!({"policy_routes": [{"from": "10.0.2.0/24", "table": 100,
        "routes": [{"to": "default", "via": "10.0.1.2", "dev": "eth0"}]}]});
    apply(&t.proxy, &routed);
    t.proxy
        .exec(&["sysctl", "-w", "net.ipv4.conf.eth0.rp_filter=1"])
        .unwrap();
    let (code, ids, _) = doctor(&t.proxy, &routed);
    assert_eq!((code, ids), (0, vec!["rp_filter".to_string()]));
    t.proxy
        .exec(&["sysctl", "-w", "net.ipv4.conf.eth0.rp_filter=2"])
        .unwrap();
    t.proxy
        .exec(&["sysctl", "-w", "net.ipv4.conf.all.rp_filter=0"])
        .unwrap();
    assert_eq!(doctor(&t.proxy, &routed).1, Vec::<String>::new());

    let six = json!({"forwards": [{"name": "v6", "listen_port": 80, "to": "[fd00:2::2]:80"}]});
    t.proxy
        .exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:1::2",
            "dev",
            "eth0",
            "proto",
            "ra",
        ])
        .unwrap();
    t.proxy
        .exec(&["sysctl", "-w", "net.ipv6.conf.eth0.accept_ra=1"])
        .unwrap();
    let (_, ids, report) = doctor(&t.proxy, &six);
    assert!(
        ids.contains(&"ipv6_ra_default_route".to_string()),
        "{report}"
    );
    t.proxy
        .exec(&["sysctl", "-w", "net.ipv6.conf.eth0.accept_ra=2"])
        .unwrap();
    let (_, ids, report) = doctor(&t.proxy, &six);
    assert!(
        !ids.contains(&"ipv6_ra_default_route".to_string()),
        "{report}"
    );
}

/// no_route_to_backend, redirect_target_not_listening, listen_port_shadowed, and with
/// `--probe` backend_unreachable.
#[test]
fn doctor_finds_unroutable_backends_idle_redirects_shadowed_ports_and_dead_backends() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let nowhere = json!({"forwards": [{"name": "far", "listen_port": 4321, "to": "10.99.0.1:80"}]});
    apply(&t.proxy, &nowhere);
    let (code, ids, report) = doctor(&t.proxy, &nowhere);
    assert_eq!(
        (code, ids),
        (1, vec!["no_route_to_backend".to_string()]),
        "{report}"
    );
    assert!(report["findings"][0]["msg"]
        .as_str()
        .unwrap()
        .contains("unreachable"));
    let params: Value = serde_json::from_str(WEB).unwrap();
    apply(&t.proxy, &params);
    assert_eq!(doctor(&t.proxy, &params).1, Vec::<String>::new());

    let redirect =
        json!({"forwards": [{"name": "r", "listen_port": 2222, "redirect_to_port": 1111}]});
    apply(&t.proxy, &redirect);
    let (code, ids, _) = doctor(&t.proxy, &redirect);
    assert_eq!(
        (code, ids),
        (1, vec!["redirect_target_not_listening".to_string()])
    );
    {
        let _service = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:1111")).unwrap();
        assert_eq!(doctor(&t.proxy, &redirect).1, Vec::<String>::new());
    }

    apply(&t.proxy, &params);
    {
        let _local = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:4321")).unwrap();
        let (code, ids, _) = doctor(&t.proxy, &params);
        assert_eq!((code, ids), (0, vec!["listen_port_shadowed".to_string()]));
    }
    assert_eq!(doctor(&t.proxy, &params).1, Vec::<String>::new());

    let probe_run = |args: &[&str]| {
        portfwd()
            .run(&t.proxy, args, &params.to_string(), &[])
            .unwrap()
    };
    let dead = probe_run(&["doctor", "--json", "--probe"]);
    assert_eq!(dead.code, 1, "{}", dead.stdout);
    assert_eq!(
        dead.json["findings"][0]["id"], "backend_unreachable",
        "{}",
        dead.stdout
    );
    let _backend = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let alive = probe_run(&["doctor", "--json", "--probe"]);
    assert_eq!(alive.code, 0, "{}", alive.stdout);
    assert_eq!(alive.json["findings"], json!([]));
}

/// foreign_nat_first: another owner's DNAT on the same port, met before portfwd's jump (a
/// Docker-like chain inserted at the top of PREROUTING), takes the connections; every apply
/// warns, doctor finds it, and both stop once the rule is gone.
#[test]
fn doctor_finds_a_foreign_dnat_that_takes_the_port_first() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _ours = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params: Value = serde_json::from_str(WEB).unwrap();
    apply(&t.proxy, &params);
    for rule in [
        "-N OTHER",
        "-A OTHER -p tcp -m tcp --dport 4000:4400 -j DNAT --to-destination 10.0.2.2:9",
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -j OTHER",
    ] {
        let mut argv = vec!["iptables", "-t", "nat"];
        argv.extend(rule.split(' '));
        t.proxy.exec(&argv).unwrap();
    }
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "the other DNAT (to a closed port) takes it"
    );
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!(
        (code, ids),
        (0, vec!["foreign_nat_first".to_string()]),
        "{report}"
    );
    assert!(
        report["findings"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("nat OTHER: -p tcp -m tcp --dport 4000:4400 -j DNAT"),
        "{report}"
    );
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(
        again.json["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap_or_default()
            .contains("takes those connections first")),
        "{}",
        again.stdout
    );
    t.proxy
        .exec(&["iptables", "-t", "nat", "-D", "PREROUTING", "1"])
        .unwrap();
    assert_eq!(doctor(&t.proxy, &params).1, Vec::<String>::new());
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok());
}

/// foreign_nat_first from another nftables table: its NAT chain runs at priority -150, before
/// iptables' (-100), and DNATs the forward's port elsewhere.
#[test]
fn doctor_finds_an_earlier_nat_chain_of_another_nftables_table() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _ours = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params: Value = serde_json::from_str(WEB).unwrap();
    apply(&t.proxy, &params);
    crate::common::nft(
        &t.proxy,
        &[
            "add table inet dock",
            "add chain inet dock pre { type nat hook prerouting priority -150; }",
            "add rule inet dock pre tcp dport 4321 dnat ip to 10.0.2.2:9",
        ],
    );
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!(
        (code, ids),
        (0, vec!["foreign_nat_first".to_string()]),
        "{report}"
    );
    assert!(
        report["findings"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("inet dock pre: tcp dport 4321 dnat"),
        "{report}"
    );
    fixed_by_deleting(&t, "dock", &params);
}

/// conntrack_near_full: the proxy's conntrack table is filled past 90% of nf_conntrack_max
/// (a limit a namespace cannot lower, so it is filled for real: one UDP packet from the client
/// to each of ~240,000 address and port pairs of the proxy, each an entry), then flushed.
#[test]
fn doctor_finds_a_conntrack_table_near_full() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params: Value = serde_json::from_str(WEB).unwrap();
    apply(&t.proxy, &params);
    let max: usize = t
        .proxy
        .stdout(&["cat", "/proc/sys/net/netfilter/nf_conntrack_max"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let needed = max * 9 / 10 + 1000;
    let per_address = 60_000;
    let addresses: Vec<String> = (0..needed.div_ceil(per_address))
        .map(|i| format!("10.0.1.{}", 100 + i))
        .collect();
    for a in &addresses {
        t.proxy
            .exec(&["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
    let enter = t.client.enterer();
    let targets = addresses.clone();
    std::thread::spawn(move || {
        enter().unwrap();
        let socket = std::net::UdpSocket::bind("10.0.1.2:0").unwrap();
        for a in &targets {
            let ip: std::net::Ipv4Addr = a.parse().unwrap();
            for port in 1..=per_address as u16 {
                let _ = socket.send_to(b"x", (ip, port));
            }
        }
    })
    .join()
    .unwrap();
    let count: usize = t
        .proxy
        .stdout(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(count * 10 >= max * 9, "filled {count} of {max}");
    let (code, ids, report) = doctor(&t.proxy, &params);
    assert_eq!(
        (code, ids),
        (0, vec!["conntrack_near_full".to_string()]),
        "{report}"
    );
    t.proxy.exec(&["conntrack", "-F"]).unwrap();
    assert_eq!(doctor(&t.proxy, &params).1, Vec::<String>::new());
}
