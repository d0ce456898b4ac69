//! End-to-end regression tests for the defects a review found (field-conditions issue,
//! section 3). Each one creates the condition in namespaces and fails without its fix.
//! (The corrupt record and stale records are in records.rs.)

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{portfwd, prerequisites, ruleset, sa, Topology};
use portfwd_harness::{link, probe, Netns, Proto, Server};
use serde_json::{json, Value};

const FLAVOURS: [&str; 2] = ["nft", "legacy"];

fn apply(ns: &Netns, params: &Value) -> Value {
    let r = portfwd().apply(ns, params).unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json
}

fn sysctl(ns: &Netns, key: &str) -> String {
    ns.stdout(&["sysctl", "-n", key])
        .unwrap()
        .trim()
        .to_string()
}

fn with_backend(flavour: &str, mut params: Value) -> Value {
    params["backend"] = json!(flavour);
    params
}

/// `routes[].to: "0.0.0.0/0"` is the default route: the second run is a no-op (it used to
/// re-add it, fail with `File exists` and roll back every time) and `absent` removes it.
#[test]
fn all_zero_route_prefixes_are_default_routes() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({"policy_routes": [
        {"from": "10.0.2.2", "to": "0.0.0.0/0", "table": 100,
         "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.1", "dev": "eth0"}]},
        {"from": "fd00:2::2", "table": 100, "routes": [{"to": "::/0", "via": "fd00:2::1"}]}
    ]});
    apply(&t.backend, &params);
    let again = apply(&t.backend, &params);
    assert_eq!(again["changed"], json!(false), "{again}");
    apply(&t.backend, &json!({"state": "absent"}));
    let left = t
        .backend
        .stdout(&["ip", "route", "show", "table", "100"])
        .unwrap()
        + &t.backend
            .stdout(&["ip", "-6", "route", "show", "table", "100"])
            .unwrap();
    assert_eq!(left.trim(), "", "absent removes the default routes");
}

/// A router sends a real router advertisement; the host learns its default route from it.
/// Turning IPv6 forwarding on must not drop that route (a cloud VM would lose IPv6 at once).
#[test]
fn enabling_ipv6_forwarding_keeps_the_router_advertised_default_route() {
    if !prerequisites() {
        return;
    }
    let router = Netns::new("router").unwrap();
    let host = Netns::new("rahost").unwrap();
    link(&router, "eth0", &host, "eth0").unwrap();
    let ra = r#"
import socket, struct, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
ra = struct.pack('!BBHBBHII', 134, 0, 0, 64, 0, 1800, 0, 0)
for _ in range(40):
    try:
        s.sendto(ra, ('ff02::1', 0, 0, socket.if_nametoindex('eth0')))
    except OSError:
        pass
    time.sleep(0.25)
"#;
    let deadline = Instant::now() + Duration::from_secs(15);
    let has_ra_route = |ns: &Netns| {
        ns.stdout(&["ip", "-6", "route", "show", "default", "proto", "ra"])
            .unwrap_or_default()
            .contains("default via fe80::")
    };
    while !has_ra_route(&host) {
        assert!(Instant::now() < deadline, "no RA default route learned");
        let _ = router.exec(&["python3", "-c", ra]);
    }
    assert_eq!(sysctl(&host, "net.ipv6.conf.eth0.accept_ra"), "1");
    let r = apply(
        &host,
        &json!({"forwards": [{"name": "v6", "listen_port": 80, "to": "[fd00:9::9]:80"}]}),
    );
    assert_eq!(sysctl(&host, "net.ipv6.conf.all.forwarding"), "1", "{r}");
    assert_eq!(sysctl(&host, "net.ipv6.conf.eth0.accept_ra"), "2", "{r}");
    assert!(has_ra_route(&host), "the RA default route survives: {r}");
    assert!(r["msg"].as_str().unwrap().contains("accept_ra"), "{r}");
}

/// `in_interface: all` would make portfwd set conf/all/route_localnet: refused, nothing applied.
/// A named interface gets route_localnet with kube-proxy's guard in INPUT, recorded, and put
/// back when the forward goes.
#[test]
fn route_localnet_is_never_global_and_is_put_back() {
    if !prerequisites() {
        return;
    }
    for flavour in FLAVOURS {
        let t = Topology::new().unwrap();
        let _local = Server::start(&t.proxy, Proto::Tcp, sa("127.0.0.1:8080")).unwrap();
        let before = ruleset(&t.proxy, &format!("iptables-{flavour}-save")).unwrap();
        for name in ["all", "default"] {
            let bad = json!({"backend": flavour, "forwards": [{"name": "l", "listen_port": 4321,
                "in_interface": name, "to": "127.0.0.1:8080"}]});
            let r = portfwd().apply(&t.proxy, &bad).unwrap();
            assert_eq!(r.code, 1, "{}", r.stdout);
            assert!(
                r.msg()
                    .contains(&format!("forwards[0].in_interface: \"{name}\"")),
                "{}",
                r.msg()
            );
        }
        assert_eq!(sysctl(&t.proxy, "net.ipv4.conf.all.route_localnet"), "0");
        let good = with_backend(
            flavour,
            json!({"forwards": [{"name": "l", "listen_port": 4321, "in_interface": "eth0",
                "to": "127.0.0.1:8080"}]}),
        );
        apply(&t.proxy, &good);
        assert_eq!(sysctl(&t.proxy, "net.ipv4.conf.eth0.route_localnet"), "1");
        assert_eq!(sysctl(&t.proxy, "net.ipv4.conf.all.route_localnet"), "0");
        let save = ruleset(&t.proxy, &format!("iptables-{flavour}-save")).unwrap();
        assert!(
            save.contains("-A PFWD-portfwd-IN -d 127.0.0.0/8 -i eth0 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT")
                || save.contains("-A PFWD-portfwd-IN -i eth0 -d 127.0.0.0/8"),
            "the guard: {save}"
        );
        assert_eq!(
            probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
            "10.0.1.2".parse::<std::net::IpAddr>().unwrap(),
            "DNAT to loopback from another host works"
        );
        let again = apply(&t.proxy, &good);
        assert_eq!(again["changed"], json!(false), "{again}");
        apply(&t.proxy, &json!({"backend": flavour, "state": "absent"}));
        assert_eq!(
            sysctl(&t.proxy, "net.ipv4.conf.eth0.route_localnet"),
            "0",
            "put back"
        );
        let after = ruleset(&t.proxy, &format!("iptables-{flavour}-save")).unwrap();
        if flavour == "nft" {
            assert_eq!(after, before);
        } else {
            // Legacy tables cannot be deleted: they stay, empty (a documented limit).
            assert!(!after.contains("PFWD") && !after.contains("-A "), "{after}");
        }
        // Without a named interface nothing sets it: the run warns.
        let unnamed = with_backend(
            flavour,
            json!({"forwards": [{"name": "l", "listen_port": 4321, "to": "127.0.0.1:8080"}]}),
        );
        let r = apply(&t.proxy, &unnamed);
        assert!(
            r["warnings"].to_string().contains("route_localnet=1"),
            "{r}"
        );
    }
}

/// `local: true` without listen_address must not take local connections to 127.0.0.0/8 (a
/// resolver on 127.0.0.53) and send them to a remote target the kernel cannot route to.
#[test]
fn local_forwards_leave_loopback_alone() {
    if !prerequisites() {
        return;
    }
    for flavour in FLAVOURS {
        let t = Topology::new().unwrap();
        t.proxy.ip(&["link", "set", "lo", "up"]).unwrap();
        let _resolver = Server::start(&t.proxy, Proto::Udp, sa("127.0.0.53:53")).unwrap();
        let _backend = Server::start(&t.backend, Proto::Udp, sa("0.0.0.0:1234")).unwrap();
        apply(
            &t.proxy,
            &with_backend(
                flavour,
                json!({"forwards": [{"name": "dns", "proto": "udp", "listen_port": 53,
                    "to": "10.0.2.2:1234", "local": true}]}),
            ),
        );
        assert_eq!(
            probe(&t.proxy, Proto::Udp, sa("127.0.0.53:53")).unwrap(),
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "the local resolver still answers"
        );
        assert_eq!(
            probe(&t.proxy, Proto::Udp, sa("10.0.1.1:53")).unwrap(),
            "10.0.2.1".parse::<std::net::IpAddr>().unwrap(),
            "local connections to this host's address are forwarded"
        );
    }
}

/// Behind FORWARD policy DROP, the ICMP error about a forwarded flow (here: port unreachable
/// from the backend) is RELATED to it and must get through, or path-MTU discovery breaks.
#[test]
fn related_icmp_of_a_forwarded_flow_passes_forward_drop() {
    if !prerequisites() {
        return;
    }
    for flavour in FLAVOURS {
        let t = Topology::new().unwrap();
        let tool = format!("iptables-{flavour}");
        let out = t.proxy.exec(&[&tool, "-P", "FORWARD", "DROP"]).unwrap();
        assert!(out.status.success());
        apply(
            &t.proxy,
            &with_backend(
                flavour,
                json!({"forwards": [{"name": "u", "proto": "udp", "listen_port": 5353,
                    "to": "10.0.2.2:1234"}]}),
            ),
        );
        // Nothing listens on the backend: it answers with ICMP port unreachable.
        let enter = t.client.enterer();
        let refused = std::thread::spawn(move || {
            enter().unwrap();
            let s = UdpSocket::bind("10.0.1.2:0").unwrap();
            s.connect("10.0.1.1:5353").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 64];
            (0..6).any(|_| {
                let _ = s.send(b"x");
                matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            })
        })
        .join()
        .unwrap();
        assert!(
            refused,
            "{flavour}: the port-unreachable reached the client"
        );
    }
}

/// Two forwards share the listen port and the backend but differ in listen_address and snat:
/// each keeps its own SNAT (the first one's used to take both).
#[test]
fn snat_matches_the_original_destination() {
    if !prerequisites() {
        return;
    }
    for flavour in FLAVOURS {
        let t = Topology::new().unwrap();
        t.proxy
            .ip(&["addr", "add", "10.0.1.3/24", "dev", "eth0"])
            .unwrap();
        t.backend
            .ip(&["route", "add", "10.0.1.0/24", "via", "10.0.2.1"])
            .unwrap();
        let _srv = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
        apply(
            &t.proxy,
            &with_backend(
                flavour,
                json!({"forwards": [
                    {"name": "masq", "listen_address": "10.0.1.1", "listen_port": 4321, "to": "10.0.2.2:1234"},
                    {"name": "keep", "listen_address": "10.0.1.3", "listen_port": 4321, "to": "10.0.2.2:1234", "snat": "none"}
                ]}),
            ),
        );
        let seen = |to: &str| probe(&t.client, Proto::Tcp, sa(to)).unwrap().to_string();
        assert_eq!(seen("10.0.1.1:4321"), "10.0.2.1", "{flavour}");
        assert_eq!(
            seen("10.0.1.3:4321"),
            "10.0.1.2",
            "{flavour}: snat none keeps the client"
        );
    }
}

/// Two instances share a protocol number. The second wants a route and a rule the first
/// already made: it uses them, never claims them, and its absent (or a rollback) never
/// deletes them. (A run used to claim them in the record written ahead, so the rollback
/// after `File exists` deleted the other instance's route.)
#[test]
fn objects_that_existed_are_never_claimed() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let routes = |i: &str, via: &str| {
        json!({"instance": i, "route_protocol": 201, "policy_routes": [{"from": "10.0.2.2",
            "priority": 500, "table": 100, "routes": [{"to": "default", "via": via}]}]})
    };
    apply(&t.backend, &routes("first", "10.0.2.1"));
    let state = || {
        t.backend.stdout(&["ip", "rule"]).unwrap()
            + &t.backend
                .stdout(&["ip", "route", "show", "table", "100"])
                .unwrap()
    };
    let before = state();
    let r = apply(&t.backend, &routes("second", "10.0.2.1"));
    assert_eq!(r["changed"], json!(false), "{r}");
    assert!(r["warnings"].to_string().contains("already exists"), "{r}");
    // A different gateway for the same destination: not replaced, not deleted.
    let r = apply(&t.backend, &routes("second", "10.0.2.9"));
    assert!(r["warnings"].to_string().contains("already exists"), "{r}");
    apply(
        &t.backend,
        &json!({"instance": "second", "route_protocol": 201, "state": "absent"}),
    );
    assert_eq!(
        state(),
        before,
        "the first instance's rule and route are intact"
    );
    apply(
        &t.backend,
        &json!({"instance": "first", "route_protocol": 201, "state": "absent"}),
    );
    assert!(!state().contains("proto 201") && !state().contains("lookup 100"));
}

/// `ip rule del` without a selector matches any value of it: deleting one instance's rule must
/// never delete another instance's rule of the same protocol listed first.
#[test]
fn rule_del_never_hits_another_instances_rule() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let rule = |i: &str, iif: Option<&str>, to: &str| {
        let mut p = json!({"from": "10.0.2.0/24", "priority": 600, "table": 100,
            "routes": [{"to": to, "via": "10.0.2.1"}]});
        if let Some(iif) = iif {
            p["iif"] = json!(iif);
        }
        json!({"instance": i, "route_protocol": 202, "policy_routes": [p]})
    };
    apply(&t.backend, &rule("first", Some("eth0"), "default"));
    apply(&t.backend, &rule("second", None, "10.77.0.0/16"));
    let r = apply(
        &t.backend,
        &json!({"instance": "second", "route_protocol": 202, "state": "absent"}),
    );
    assert!(r["warnings"].to_string().contains("would hit"), "{r}");
    let rules = t.backend.stdout(&["ip", "rule"]).unwrap();
    assert!(
        rules.contains("600:\tfrom 10.0.2.0/24 iif eth0 lookup 100 proto 202"),
        "the first instance's rule is intact: {rules}\n{r}"
    );
}

/// An address whose label is its device name used to churn on every run.
#[test]
fn a_label_equal_to_the_device_does_not_churn() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({"addresses": [{"address": "10.0.2.9/24", "dev": "eth0", "label": "eth0"}]});
    apply(&t.backend, &params);
    let again = apply(&t.backend, &params);
    assert_eq!(again["changed"], json!(false), "{again}");
    assert_eq!(again["commands"], json!([]));
}

/// `show` keeps 0.0.0.0/0 sources and masquerade sources: applying its output is a no-op.
#[test]
fn show_round_trips_everyone_sources() {
    if !prerequisites() {
        return;
    }
    for flavour in FLAVOURS {
        let t = Topology::new().unwrap();
        apply(
            &t.proxy,
            &with_backend(
                flavour,
                json!({"forwards": [{"name": "w", "listen_port": 80, "to": "10.0.2.2:80",
                        "sources": ["0.0.0.0/0"]}],
                    "masquerade": [{"name": "all", "source": "0.0.0.0/0", "out_interface": "eth1"},
                                   {"name": "all6", "source": "::/0", "out_interface": "eth1"}]}),
            ),
        );
        let shown = portfwd()
            .run(&t.proxy, &["show", "--backend", flavour], "", &[])
            .unwrap();
        assert_eq!(shown.code, 0, "{}", shown.stderr);
        assert_eq!(
            shown.json["masquerade"].as_array().map(Vec::len),
            Some(2),
            "{}",
            shown.stdout
        );
        let again = apply(&t.proxy, &with_backend(flavour, shown.json.clone()));
        assert_eq!(again["changed"], json!(false), "{flavour}: {again}");
    }
}

/// The stored params are fsynced before the rename, and the directory after it.
#[test]
fn stored_params_are_durable() {
    if !prerequisites() {
        return;
    }
    let Some(strace) = common::which("strace") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "strace missing under CI"
        );
        return;
    };
    let t = Topology::new().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let log_path = log.path().display().to_string();
    let strace = strace.display().to_string();
    let bin = portfwd().bin.display().to_string();
    let state = portfwd().state_dir(&t.proxy).display().to_string();
    let env_state = format!("PORTFWD_STATE_DIR={state}");
    let env_run = format!("PORTFWD_RUN_DIR={}", portfwd().run_dir(&t.proxy).display());
    let lock = format!("PORTFWD_LOCK_FILE={state}.lock");
    let out = t
        .proxy
        .exec_with_input(
            &[
                "env",
                &env_state,
                &env_run,
                &lock,
                &strace,
                "-f",
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2,openat",
                "-o",
                &log_path,
                &bin,
                "apply",
            ],
            &json!({"persist": true, "forwards": [{"name": "w", "listen_port": 80,
                "to": "10.0.2.2:80"}]})
            .to_string(),
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let trace = std::fs::read_to_string(log.path()).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let rename = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains("portfwd.json"))
        .unwrap_or_else(|| panic!("no rename of the stored file: {trace}"));
    assert!(
        lines[..rename].iter().any(|l| l.contains("fsync(")),
        "fsync before the rename: {trace}"
    );
    assert!(
        lines[rename..].iter().any(|l| l.contains("fsync(")),
        "fsync of the directory after it: {trace}"
    );
}
