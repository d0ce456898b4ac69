//! End-to-end: keeping the client's address with alias addresses and policy routing (seed 000
//! case 3, seed 003), rollback at every injected failure, and persistence across a reboot.

use std::net::IpAddr;

use crate::common::{
    portfwd, prerequisites, ruleset, sa, warnings, FailNth, Topology, WriteRecorder,
};
use portfwd_harness::shims::SlowNth;
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn line_diff(a: &str, b: &str) -> String {
    let (old, new): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let gone = old
        .iter()
        .filter(|l| !new.contains(l))
        .map(|l| format!("- {l}"));
    let came = new
        .iter()
        .filter(|l| !old.contains(l))
        .map(|l| format!("+ {l}"));
    gone.chain(came).collect::<Vec<_>>().join("\n")
}

/// Everything iproute2 shows that portfwd may touch, as text.
fn ip_state(ns: &Netns) -> String {
    [
        vec!["ip", "-4", "rule"],
        vec!["ip", "-6", "rule"],
        vec!["ip", "-4", "route", "show", "table", "all"],
        vec!["ip", "-6", "route", "show", "table", "all"],
        vec!["ip", "addr"],
    ]
    .iter()
    .map(|argv| ns.stdout(argv).unwrap())
    .collect::<Vec<_>>()
    .join("----\n")
}

/// iptables of both families plus iproute2: the whole state a rollback must restore.
fn host_state(ns: &Netns) -> String {
    format!(
        "{}\n====\n{}\n====\n{}",
        ruleset(ns, "iptables-save").unwrap(),
        ruleset(ns, "ip6tables-save").unwrap(),
        ip_state(ns)
    )
}

fn proxy_params() -> Value {
    json!({
        "addresses": [{"address": "10.10.10.10/24", "dev": "eth1", "label": "eth1:1"}],
        "forwards": [{"name": "db", "listen_port": 4321, "to": "10.10.10.11:1234", "snat": "none"}]
    })
}

fn backend_params(with_policy_route: bool) -> Value {
    let mut params =
        json!({"addresses": [{"address": "10.10.10.11/24", "dev": "eth0", "label": "eth0:1"}]});
    if with_policy_route {
        params["policy_routes"] = json!([{"from": "10.10.10.11", "table": 100,
            "routes": [{"to": "default", "via": "10.10.10.10", "dev": "eth0"}]}]);
    }
    params
}

/// The proxy DNATs to an alias of the backend with no SNAT; the backend's
/// default route does not point at the proxy, and a policy route sends replies from the alias
/// back through it. The backend sees the real client.
#[test]
fn alias_and_policy_route_keep_the_client_address() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.254"])
        .unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let backend_before = ip_state(&t.backend);
    let backend_rules_before = ruleset(&t.backend, "iptables-save").unwrap();

    // Check mode reminds the reviewer of the return path the proxy cannot see.
    let planned = portfwd()
        .run(
            &t.proxy,
            &["apply", "--check"],
            &proxy_params().to_string(),
            &[],
        )
        .unwrap();
    assert!(
        warnings(&planned)
            .iter()
            .any(|w| w.contains("snat is none")),
        "reminds about the return path: {}",
        planned.stdout
    );
    let proxy = portfwd().apply(&t.proxy, &proxy_params()).unwrap();
    assert!(proxy.changed() && !proxy.failed(), "{}", proxy.stdout);
    let address_only = portfwd().apply(&t.backend, &backend_params(false)).unwrap();
    assert!(
        address_only.changed() && !address_only.failed(),
        "{}",
        address_only.stdout
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "replies follow the default route and are lost"
    );

    let backend = portfwd().apply(&t.backend, &backend_params(true)).unwrap();
    assert!(backend.changed() && !backend.failed(), "{}", backend.stdout);
    assert!(
        backend.msg().contains("ip rules: 1 added"),
        "{}",
        backend.msg()
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.1.2"),
        "the backend sees the real client"
    );

    // Same params again: no write at all, on either host.
    let recorder = WriteRecorder::new().unwrap();
    for (ns, params) in [
        (&t.proxy, proxy_params()),
        (&t.backend, backend_params(true)),
    ] {
        let again = portfwd()
            .run(
                ns,
                &["apply"],
                &params.to_string(),
                &[("PATH", &recorder.path())],
            )
            .unwrap();
        assert!(!again.changed() && !again.failed(), "{}", again.stdout);
        // A converged run of a correct recipe is silent: the client arrives on the other
        // link, and the backend's policy route brings the replies back.
        assert_eq!(warnings(&again), Vec::<String>::new(), "{}", again.stdout);
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());

    // `show` reads the rule, route and address back; applying it is a no-op.
    let shown = portfwd().run(&t.backend, &["show"], "", &[]).unwrap();
    assert!(shown.stdout.contains("\"table\": 100"), "{}", shown.stdout);
    let replay = portfwd()
        .run(&t.backend, &["apply"], &shown.stdout, &[])
        .unwrap();
    assert!(
        !replay.changed() && !replay.failed(),
        "{}\n{}",
        shown.stdout,
        replay.stdout
    );

    // absent removes rule, route and address, and nothing else.
    let absent = portfwd()
        .apply(&t.backend, &json!({"state": "absent"}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(ip_state(&t.backend), backend_before, "{}", absent.stdout);
    assert_eq!(
        ruleset(&t.backend, "iptables-save").unwrap(),
        backend_rules_before
    );
}

/// An address that already existed is used but never owned: absent leaves it.
#[test]
fn pre_existing_address_is_never_removed() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.backend
        .ip(&[
            "addr",
            "add",
            "10.10.10.11/24",
            "dev",
            "eth0",
            "label",
            "eth0:1",
        ])
        .unwrap();
    let before = ip_state(&t.backend);
    let first = portfwd().apply(&t.backend, &backend_params(false)).unwrap();
    assert!(
        !first.changed() && !first.failed(),
        "already there: {}",
        first.stdout
    );
    let absent = portfwd()
        .apply(&t.backend, &json!({"state": "absent"}))
        .unwrap();
    assert!(!absent.failed(), "{}", absent.stdout);
    assert_eq!(ip_state(&t.backend), before);
}

/// A dual-NIC gateway that is the backend's default route forwards with snat none.
#[test]
fn gateway_without_snat_keeps_the_client_address() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])
        .unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:9999")).unwrap();
    let params = json!({"forwards": [{"name": "lb", "listen_address": "10.0.1.1", "listen_port": 8888,
        "in_interface": "eth0", "to": "10.0.2.2:9999", "snat": "none"}]});
    let result = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(result.changed() && !result.failed(), "{}", result.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:8888")).unwrap(),
        ip("10.0.1.2")
    );
    // The backend is on-link, but the clients arrive on eth0, the other link, and traffic
    // works: no warning, the first time or the second.
    assert_eq!(warnings(&result), Vec::<String>::new(), "{}", result.stdout);
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!again.changed() && !again.failed(), "{}", again.stdout);
    assert_eq!(warnings(&again), Vec::<String>::new(), "{}", again.stdout);
}

fn baseline() -> Value {
    json!({
        "forwards": [
            {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
            {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:1234"}
        ],
        "addresses": [{"address": "10.10.10.10/24", "dev": "eth1", "label": "eth1:1"}],
        "policy_routes": [{"from": "10.10.10.10", "table": 100, "routes": [{"to": "default", "via": "10.0.2.2"}]}]
    })
}

/// A change touching IPv4 and IPv6 rules, masquerade, addresses, ip rules and routes.
fn target() -> Value {
    json!({
        "forwards": [
            {"name": "web", "listen_port": 4321, "to": "10.0.2.2:8080"},
            {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:8080"},
            {"name": "dns6", "proto": "udp", "listen_port": 53, "to": "[fd00:2::2]"}
        ],
        "masquerade": [{"name": "lan", "source": "10.0.1.0/24", "out_interface": "eth1"}],
        "addresses": [
            {"address": "10.10.10.20/24", "dev": "eth1"},
            {"address": "fd00:10::1/64", "dev": "eth1"}
        ],
        "policy_routes": [
            {"from": "10.10.10.20", "table": 100, "routes": [{"to": "default", "via": "10.0.2.2", "dev": "eth1"}]},
            {"from": "fd00:10::1", "table": 200, "routes": [{"to": "default", "via": "fd00:2::2"}]}
        ]
    })
}

/// Fails the Nth call of `tool` for every N an apply of `goal` reaches, starting each time
/// from `start` (applied first; `{"state": "absent"}` for a fresh host). Returns how many
/// failure points there were.
fn failure_matrix(t: &Topology, tool: &str, start: &Value, goal: &Value) -> usize {
    let reset = || {
        let r = portfwd().apply(&t.proxy, start).unwrap();
        assert!(!r.failed(), "{}", r.stdout);
        if start["state"] == "absent" {
            // A fresh host: forwarding off, so the apply has sysctls to write (and fail).
            t.proxy.sysctl("net.ipv4.ip_forward", "0").unwrap();
            t.proxy.sysctl("net.ipv6.conf.all.forwarding", "0").unwrap();
        }
    };
    reset();
    let before = host_state(&t.proxy);
    let forwarding = |ns: &Netns| {
        ns.stdout(&[
            "sysctl",
            "-n",
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
        ])
        .unwrap()
    };
    let sysctls_before = forwarding(&t.proxy);
    let mut n = 1;
    loop {
        let shim = FailNth::new(tool, n).unwrap();
        let run = portfwd()
            .run(
                &t.proxy,
                &["apply"],
                &goal.to_string(),
                &[("PATH", &shim.path())],
            )
            .unwrap();
        if shim.calls() < n {
            assert!(
                run.changed() && !run.failed(),
                "{tool} without failure: {}",
                run.stdout
            );
            reset();
            assert_eq!(host_state(&t.proxy), before, "resetting to the start");
            return n - 1;
        }
        assert_eq!(run.code, 1, "{tool} call {n}: {}", run.stdout);
        assert!(run.failed(), "{tool} call {n}: {}", run.stdout);
        assert!(
            run.msg().contains("injected failure"),
            "{tool} call {n}: {}",
            run.msg()
        );
        let observing = run.msg().starts_with("reading the current state failed");
        assert!(
            observing || run.msg().contains("rolled back every change"),
            "{tool} call {n}: {}",
            run.msg()
        );
        assert_eq!(
            host_state(&t.proxy),
            before,
            "{tool} call {n} left the host changed: {}",
            run.msg()
        );
        assert_eq!(
            forwarding(&t.proxy),
            sysctls_before,
            "{tool} call {n} left a sysctl changed"
        );
        n += 1;
    }
}

/// Shims fail the Nth call of every external tool portfwd writes with (iptables-restore,
/// ip6tables-restore, ip, sysctl, nft), for every N an apply reaches: from a configured host,
/// from a fresh one (portfwd creates the tables and turns forwarding on), and back to absent
/// (portfwd drops the tables it created). After each failure the host is byte-identical to
/// before and the result says it rolled back; past the last call the same apply succeeds.
#[test]
fn rollback_at_every_injected_failure_leaves_the_host_identical() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let absent = json!({"state": "absent"});
    let phases = [
        ("baseline -> target", baseline(), target()),
        ("fresh -> target", absent.clone(), target()),
        ("target -> absent", target(), absent),
    ];
    let tools = [
        "iptables-restore",
        "ip6tables-restore",
        "ip",
        "sysctl",
        "nft",
    ];
    let mut totals = [0usize; 5];
    for (label, start, goal) in &phases {
        if label.starts_with("target") {
            // The target state must be one portfwd built from a fresh host, so it owns the tables.
            assert!(!portfwd()
                .apply(&t.proxy, &json!({"state": "absent"}))
                .unwrap()
                .failed());
        }
        let points: Vec<usize> = tools
            .iter()
            .map(|tool| failure_matrix(&t, tool, start, goal))
            .collect();
        eprintln!(
            "failure points {label}: {:?}",
            tools.iter().zip(&points).collect::<Vec<_>>()
        );
        assert_eq!(points[0], 2, "{label}: filter + nat");
        assert_eq!(points[1], 2, "{label}: filter + nat");
        for (total, p) in totals.iter_mut().zip(&points) {
            *total += p;
        }
    }
    assert!(
        totals.iter().all(|n| *n > 0),
        "every tool was failed at least once: {totals:?}"
    );
}

/// A portfwd killed with SIGKILL in the middle of an apply (between the IPv4 and IPv6
/// transactions, after addresses were added) is repaired by the next normal run, which still
/// owns everything the killed run created.
#[test]
fn kill_9_in_the_middle_then_rerun_converges() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    // ip_forward "auto" turns forwarding on and never off (IPv6 forwarding adds anycast
    // routes), so start with it on: then "fresh" is what absent must come back to.
    t.proxy.sysctl("net.ipv4.ip_forward", "1").unwrap();
    t.proxy.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    let fresh = host_state(&t.proxy);
    assert!(portfwd().apply(&t.proxy, &target()).unwrap().changed());
    let expected = host_state(&t.proxy);
    assert!(portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap()
        .changed());
    let cleaned = host_state(&t.proxy);
    assert!(
        cleaned == fresh,
        "absent after a clean apply:\n{}",
        line_diff(&fresh, &cleaned)
    );

    let slow = SlowNth::new("ip6tables-restore", 1, 30).unwrap();
    let mut child = portfwd()
        .spawn(
            &t.proxy,
            &["apply"],
            &target().to_string(),
            &[("PATH", &slow.path())],
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !slow.sleeping() {
        assert!(
            Instant::now() < deadline,
            "the apply never reached ip6tables-restore"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = child.wait();
    let partial = host_state(&t.proxy);
    assert_ne!(partial, fresh, "the killed run had changed something");
    assert_ne!(partial, expected, "and not everything");

    let rerun = portfwd().apply(&t.proxy, &target()).unwrap();
    assert!(rerun.changed() && !rerun.failed(), "{}", rerun.stdout);
    assert_eq!(host_state(&t.proxy), expected, "the re-run converges");
    let absent = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert!(!absent.failed(), "{}", absent.stdout);
    assert_eq!(
        host_state(&t.proxy),
        fresh,
        "what the killed run created is still owned and removed"
    );
}

/// persist: true stores the params; after a simulated reboot (rules, addresses, sysctls and
/// the runtime record wiped) `portfwd restore` brings the forward back, and again is a no-op.
#[test]
fn persist_then_restore_after_reboot() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let pf = portfwd();
    let params = json!({"persist": true,
        "addresses": [{"address": "10.0.1.100/24", "dev": "eth0", "label": "eth0:fwd"}],
        "forwards": [{"name": "web", "listen_address": "10.0.1.100", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let first = pf.apply(&t.proxy, &params).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    assert!(first.msg().contains("params stored"), "{}", first.msg());
    let stored = pf.state_dir(&t.proxy).join("portfwd.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "stored params are private");
    let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode_of(&pf.state_dir(&t.proxy)),
        0o700,
        "the state dir is private"
    );
    assert_eq!(
        mode_of(&pf.run_dir(&t.proxy)),
        0o700,
        "the run dir is private"
    );
    for entry in std::fs::read_dir(pf.run_dir(&t.proxy)).unwrap() {
        assert_eq!(
            mode_of(&entry.unwrap().path()),
            0o600,
            "records are private"
        );
    }
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.100:4321")).unwrap(),
        ip("10.0.2.1")
    );

    // The reboot: everything runtime is gone, the stored file stays.
    for save in ["iptables", "ip6tables"] {
        for table in ["nat", "filter"] {
            t.proxy.exec(&[save, "-t", table, "-F"]).unwrap();
            t.proxy.exec(&[save, "-t", table, "-X"]).unwrap();
        }
    }
    t.proxy
        .ip(&["addr", "del", "10.0.1.100/24", "dev", "eth0"])
        .unwrap();
    t.proxy.sysctl("net.ipv4.ip_forward", "0").unwrap();
    std::fs::remove_dir_all(pf.run_dir(&t.proxy)).unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.100:4321")).is_err());

    let restored = pf.run(&t.proxy, &["restore"], "", &[]).unwrap();
    assert_eq!(restored.code, 0, "{}", restored.stdout);
    assert_eq!(restored.json["changed"], json!(true), "{}", restored.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.100:4321")).unwrap(),
        ip("10.0.2.1")
    );
    let again = pf.run(&t.proxy, &["restore"], "", &[]).unwrap();
    assert_eq!(again.json["changed"], json!(false), "{}", again.stdout);

    let absent = pf
        .apply(&t.proxy, &json!({"state": "absent", "persist": true}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert!(!stored.exists(), "absent removes the stored params");
    assert!(
        !ip_state(&t.proxy).contains("10.0.1.100"),
        "and the address portfwd added"
    );
}

/// Ownership of ip rules and routes is the instance's record, not just its protocol number:
/// instances "portfwd" and "db" share protocol 233 by the default mapping, and someone else's
/// route may carry it too. Neither is ever touched by the other.
#[test]
fn instances_sharing_a_protocol_number_never_touch_each_other() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    assert_eq!(
        ::portfwd::default_route_protocol("portfwd"),
        ::portfwd::default_route_protocol("db"),
        "the premise: both map to one protocol number"
    );
    let proto = ::portfwd::default_route_protocol("portfwd").to_string();
    t.backend
        .ip(&[
            "route",
            "add",
            "192.0.2.0/24",
            "dev",
            "eth0",
            "proto",
            &proto,
        ])
        .unwrap();
    let mine = json!({"policy_routes": [{"from": "10.0.2.2", "table": 100, "routes": [{"to": "default", "via": "10.0.2.1"}]}]});
    assert!(portfwd().apply(&t.backend, &mine).unwrap().changed());
    let with_mine = ip_state(&t.backend);
    let other = json!({"instance": "db", "policy_routes": [{"from": "10.0.2.2", "table": 200, "routes": [{"to": "default", "via": "10.0.2.1"}]}]});
    let r = portfwd().apply(&t.backend, &other).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert!(
        !r.stdout.contains("del"),
        "db deletes nothing: {}",
        r.stdout
    );
    let gone = portfwd()
        .apply(&t.backend, &json!({"instance": "db", "state": "absent"}))
        .unwrap();
    assert!(!gone.failed(), "{}", gone.stdout);
    assert_eq!(
        ip_state(&t.backend),
        with_mine,
        "db's absent removed only db's objects"
    );
    let absent = portfwd()
        .apply(&t.backend, &json!({"state": "absent"}))
        .unwrap();
    assert!(!absent.failed(), "{}", absent.stdout);
    let left = ip_state(&t.backend);
    assert!(
        left.contains(&format!("192.0.2.0/24 dev eth0 proto {proto}")),
        "a foreign route with our number stays: {left}"
    );
    assert!(!left.contains("lookup 100"), "{left}");
}
