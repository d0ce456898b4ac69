//! End-to-end: the seed scenarios in fresh namespaces, proven with real TCP and UDP traffic.

use std::net::IpAddr;

use crate::common::{portfwd, prerequisites, ruleset, sa, Topology, WriteRecorder};
use portfwd_harness::{probe, Proto, Server, TcpSession};
use serde_json::{json, Value};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn sysctl(ns: &portfwd_harness::Netns, key: &str) -> String {
    ns.stdout(&["sysctl", "-n", key])
        .unwrap()
        .trim()
        .to_string()
}

/// Seed 000 #1: DNAT + SNAT across hosts. The backend has no route to the client, so only
/// masquerade makes replies come back, and the backend sees the proxy's address.
#[test]
fn cross_host_dnat_with_masquerade_tcp_and_udp() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _tcp = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _udp = Server::start(&t.backend, Proto::Udp, sa("0.0.0.0:1234")).unwrap();
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "nothing forwards yet"
    );
    assert_eq!(sysctl(&t.proxy, "net.ipv4.ip_forward"), "0");

    let params = json!({"forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        {"name": "dns", "proto": "udp", "listen_port": 5353, "to": "10.0.2.2:1234"}
    ]});
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(first.code, 0, "{}", first.stdout);
    assert!(first.changed(), "{}", first.stdout);
    assert_eq!(first.json["forwards"]["added"], json!(["web", "dns"]));
    assert_eq!(
        sysctl(&t.proxy, "net.ipv4.ip_forward"),
        "1",
        "ip_forward auto turns it on"
    );

    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1")
    );
    assert_eq!(
        probe(&t.client, Proto::Udp, sa("10.0.1.1:5353")).unwrap(),
        ip("10.0.2.1")
    );

    // Idempotence: the second run writes nothing at all, proven by shims that log every write.
    let recorder = WriteRecorder::new().unwrap();
    let second = portfwd()
        .run(
            &t.proxy,
            &["apply"],
            &params.to_string(),
            &[("PATH", &recorder.path())],
        )
        .unwrap();
    assert_eq!(second.code, 0, "{}", second.stdout);
    assert!(!second.changed(), "{}", second.stdout);
    assert_eq!(second.json["commands"], json!([]));
    assert_eq!(recorder.calls(), Vec::<String>::new());

    // What `show` prints is the same state: applying it changes nothing.
    let shown = portfwd().run(&t.proxy, &["show"], "", &[]).unwrap();
    let again = portfwd()
        .run(&t.proxy, &["apply"], &shown.stdout, &[])
        .unwrap();
    assert!(
        !again.changed() && !again.failed(),
        "{}\n{}",
        shown.stdout,
        again.stdout
    );
}

/// Check mode reports the change with a diff keyed by entry names and touches nothing.
#[test]
fn check_mode_shows_diff_and_touches_nothing() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let base = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    assert!(portfwd().apply(&t.proxy, &base).unwrap().changed());
    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    let forward_before = sysctl(&t.proxy, "net.ipv4.ip_forward");

    let changed = json!({
        "_ansible_check_mode": true, "_ansible_diff": true, "_ansible_verbosity": 3, "_ansible_new_thing": [1],
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:8080"},
                     {"name": "ssh", "listen_port": 2222, "to": "10.0.2.2:22"}]
    });
    let recorder = WriteRecorder::new().unwrap();
    let check = portfwd()
        .run(
            &t.proxy,
            &["apply"],
            &changed.to_string(),
            &[("PATH", &recorder.path())],
        )
        .unwrap();
    assert_eq!(check.code, 0, "{}", check.stdout);
    assert!(check.changed(), "{}", check.stdout);
    assert_eq!(check.json["forwards"]["added"], json!(["ssh"]));
    assert_eq!(check.json["forwards"]["updated"], json!(["web"]));
    let diff = &check.json["diff"];
    assert!(
        diff["before"].as_str().unwrap().contains(
            "forwards.web = {\"listen_port\":4321,\"proto\":\"tcp\",\"to\":\"10.0.2.2:1234\"}"
        ),
        "{diff}"
    );
    assert!(
        diff["after"].as_str().unwrap().contains("forwards.ssh = "),
        "{diff}"
    );
    assert!(check.json["commands"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.as_str().unwrap().contains("portfwd:fwd:ssh:")));
    assert_eq!(
        recorder.calls(),
        Vec::<String>::new(),
        "check mode must not write"
    );
    assert_eq!(ruleset(&t.proxy, "iptables-save").unwrap(), before);
    assert_eq!(sysctl(&t.proxy, "net.ipv4.ip_forward"), forward_before);

    // The CLI's --check --diff and `plan` say the same without Ansible keys.
    let cli = portfwd()
        .run(&t.proxy, &["plan"], &changed.to_string(), &[])
        .unwrap();
    assert_eq!(cli.code, 0);
    assert!(cli.stdout.contains("+ forwards.ssh = "), "{}", cli.stdout);
    assert!(cli.stdout.contains("- forwards.web = "), "{}", cli.stdout);
    assert_eq!(ruleset(&t.proxy, "iptables-save").unwrap(), before);
}

/// `plan --detailed-exitcode` gates CI on drift: 2 while a change is pending (text or JSON),
/// 0 once converged, 1 for params it refuses; it never writes.
#[test]
fn plan_detailed_exitcode_says_whether_changes_are_pending() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let plan = |args: &[&str], input: &Value| {
        portfwd()
            .run(&t.proxy, args, &input.to_string(), &[])
            .unwrap()
    };
    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    for args in [
        &["plan", "--detailed-exitcode"][..],
        &["plan", "--json", "--detailed-exitcode"],
    ] {
        let r = plan(args, &params);
        assert_eq!(r.code, 2, "{args:?}: changes pending: {}", r.stdout);
    }
    assert_eq!(plan(&["plan"], &params).code, 0, "without the flag: 0");
    assert_eq!(
        ruleset(&t.proxy, "iptables-save").unwrap(),
        before,
        "plan never writes"
    );
    assert_eq!(portfwd().apply(&t.proxy, &params).unwrap().code, 0);
    let r = plan(&["plan", "--detailed-exitcode"], &params);
    assert_eq!(r.code, 0, "converged: {}", r.stdout);
    let bad = json!({"forwards": [{"name": "web", "listen_port": 70000, "to": "10.0.2.2:1234"}]});
    let r = plan(&["plan", "--detailed-exitcode"], &bad);
    assert_eq!(r.code, 1, "refused params: {}", r.stdout);
}

/// Seed 000 #2: REDIRECT to a local port, for other hosts and (local: true) for this host.
#[test]
fn redirect_to_local_port() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:1111")).unwrap();
    let params = json!({"forwards": [{"name": "r", "listen_port": 2222, "redirect_to_port": 1111, "local": true}]});
    let result = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(result.changed() && !result.failed(), "{}", result.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:2222")).unwrap(),
        ip("10.0.1.2"),
        "the server sees the client"
    );
    assert_eq!(
        probe(&t.proxy, Proto::Tcp, sa("10.0.1.1:2222")).unwrap(),
        ip("10.0.1.1"),
        "local connections are redirected too"
    );
    assert_eq!(
        sysctl(&t.proxy, "net.ipv4.ip_forward"),
        "0",
        "REDIRECT needs no forwarding"
    );
    // The redirect only applies to this host's addresses: transit traffic is not hijacked.
    let rules = ruleset(&t.proxy, "iptables-save").unwrap();
    assert!(rules.contains("--dst-type LOCAL"), "{rules}");
}

/// Seed 002: a gateway masquerading a subnet, with FORWARD policy DROP on the gateway.
#[test]
fn subnet_masquerade_gateway() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.client_default_route().unwrap();
    t.proxy
        .exec(&["iptables", "-P", "FORWARD", "DROP"])
        .unwrap();
    t.proxy.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:80")).unwrap();
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.2.2:80")).is_err(),
        "dropped before portfwd"
    );

    let params =
        json!({"masquerade": [{"name": "lan", "source": "10.0.1.0/24", "out_interface": "eth1"}]});
    let result = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(result.changed() && !result.failed(), "{}", result.stdout);
    assert_eq!(result.json["masquerade"]["added"], json!(["lan"]));
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.2.2:80")).unwrap(),
        ip("10.0.2.1")
    );
    assert!(!portfwd().apply(&t.proxy, &params).unwrap().changed());
}

/// IPv6: the family follows the addresses; ip6tables and IPv6 forwarding are managed.
#[test]
fn ipv6_forward() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _tcp = Server::start(&t.backend, Proto::Tcp, sa("[::]:1234")).unwrap();
    let _udp = Server::start(&t.backend, Proto::Udp, sa("[::]:1234")).unwrap();
    let params = json!({"forwards": [{"name": "v6", "proto": "both", "listen_port": 4321, "to": "[fd00:2::2]:1234"}]});
    let result = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(result.changed() && !result.failed(), "{}", result.stdout);
    assert_eq!(sysctl(&t.proxy, "net.ipv6.conf.all.forwarding"), "1");
    assert_eq!(
        sysctl(&t.proxy, "net.ipv4.ip_forward"),
        "0",
        "IPv4 is not touched"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("[fd00:1::1]:4321")).unwrap(),
        ip("fd00:2::1")
    );
    assert_eq!(
        probe(&t.client, Proto::Udp, sa("[fd00:1::1]:4321")).unwrap(),
        ip("fd00:2::1")
    );
    assert!(
        !ruleset(&t.proxy, "iptables-save").unwrap().contains("PFWD"),
        "no IPv4 rules for an IPv6 forward"
    );
    assert!(!portfwd().apply(&t.proxy, &params).unwrap().changed());
}

fn fifty(changed: Option<usize>) -> Value {
    let forwards: Vec<Value> = (0..50)
        .map(|i| {
            let port = if Some(i) == changed { 1235 } else { 1234 };
            json!({"name": format!("f{i}"), "listen_port": 10000 + i, "to": format!("10.0.2.2:{port}")})
        })
        .collect();
    json!({"forwards": forwards})
}

/// Lines of `iptables-save -c` for rules, keyed without counters, with their counters.
fn counters(t: &Topology) -> Vec<(String, String)> {
    t.proxy
        .stdout(&["iptables-save", "-c"])
        .unwrap()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (count, rule) = rest.split_once("] ")?;
            Some((rule.to_string(), count.to_string()))
        })
        .collect()
}

/// Editing one forward among fifty rewrites only its rules: the others keep their packet
/// counters, and a connection through another forward survives the change.
#[test]
fn editing_one_of_fifty_keeps_other_counters_and_connections() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _a = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _b = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1235")).unwrap();
    assert!(portfwd().apply(&t.proxy, &fifty(None)).unwrap().changed());
    let mut session = TcpSession::connect(&t.client, sa("10.0.1.1:10000")).unwrap();
    assert_eq!(session.ask().unwrap(), ip("10.0.2.1"));
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10049")).unwrap(),
        ip("10.0.2.1")
    );
    let before = counters(&t);
    assert!(
        before
            .iter()
            .any(|(r, c)| r.contains(":f0:") && !c.starts_with("0:")),
        "traffic counted: {before:#?}"
    );

    let result = portfwd().apply(&t.proxy, &fifty(Some(7))).unwrap();
    assert!(result.changed() && !result.failed(), "{}", result.stdout);
    assert_eq!(result.json["forwards"]["updated"], json!(["f7"]));
    let payload: Vec<&str> = result.json["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|l| l.starts_with('-'))
        .collect();
    assert!(payload.len() <= 12, "{payload:#?}");
    assert!(
        payload
            .iter()
            .all(|l| l.contains(":f7:") || l.starts_with("-D PFWD-")),
        "{payload:#?}"
    );

    let after = counters(&t);
    let untouched: Vec<_> = before.iter().filter(|(r, _)| !r.contains(":f7:")).collect();
    for (rule, count) in &untouched {
        let now = after.iter().find(|(r, _)| r == rule).map(|(_, c)| c);
        assert_eq!(now, Some(count), "counter of {rule}");
    }
    assert_eq!(
        session.ask().unwrap(),
        ip("10.0.2.1"),
        "the open connection survives"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).unwrap(),
        ip("10.0.2.1")
    );
}

/// Bad input fails with a precise message naming field and value, and changes nothing.
#[test]
fn bad_input_is_refused_and_nothing_changes() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let base = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    assert!(portfwd().apply(&t.proxy, &base).unwrap().changed());
    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    let cases: [(Value, &str); 11] = [
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "10.0.2.2", "colour": "red"}]}),
            "forwards[0].colour: unknown field `colour`",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 0, "to": "10.0.2.2"}]}),
            "forwards[0].listen_port: 0 is not a port",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 70000, "to": "10.0.2.2"}]}),
            "forwards[0].listen_port: 70000 is not a port",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "10.0.2.300:80"}]}),
            "forwards[0].to: \"10.0.2.300\" is not an IP address",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "10.0.2.2", "sources": ["10.0.0.0/40"]}]}),
            "forwards[0].sources[0]: \"10.0.0.0/40\" has an invalid prefix length",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "backend.example:80"}]}),
            "hostnames are refused",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "10.0.2.2"}, {"name": "a", "listen_port": 2, "to": "10.0.2.2"}]}),
            "forwards[1].name: \"a\" is a duplicate name",
        ),
        (
            json!({"forwards": [{"name": "a\nb", "listen_port": 1, "to": "10.0.2.2"}]}),
            "forwards[0].name: \"a\\nb\" must match",
        ),
        (
            json!({"forwards": [{"name": "a\"b", "listen_port": 1, "to": "10.0.2.2"}]}),
            "forwards[0].name: \"a\\\"b\" must match",
        ),
        (
            json!({"forwards": [{"name": "a", "listen_port": 1, "to": "10.0.2.2", "in_interface": "eth0;reboot"}]}),
            "forwards[0].in_interface: \"eth0;reboot\" is not an interface name",
        ),
        (
            json!({"masquerade": [{"name": "m", "source": "10.0.1.0/24", "out_interface": "$(touch /tmp/pwned)"}]}),
            "masquerade[0].out_interface: \"$(touch /tmp/pwned)\" is not an interface name",
        ),
    ];
    for (params, expected) in cases {
        let result = portfwd().apply(&t.proxy, &params).unwrap();
        assert_eq!(result.code, 1, "{params}: {}", result.stdout);
        assert!(result.failed(), "{params}");
        assert!(!result.changed(), "{params}");
        assert!(
            result.msg().contains(expected),
            "{params}: {:?} lacks {expected:?}",
            result.msg()
        );
        assert_eq!(
            ruleset(&t.proxy, "iptables-save").unwrap(),
            before,
            "{params} changed the ruleset"
        );
    }
    let usage = portfwd()
        .run(&t.proxy, &["apply", "--no-such-flag"], "", &[])
        .unwrap();
    assert_eq!(usage.code, 2, "usage errors exit 2");
}

/// Eight concurrent runs with different params on one host, while another tool runs
/// `iptables -w` in a loop, are serialised by the lock: all succeed, no rule is duplicated, the
/// final state is exactly one of the param sets, and the other tool's rules are intact.
#[test]
fn concurrent_runs_are_serialised() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let sets: Vec<Value> = (0..8)
        .map(|i| {
            let forwards: Vec<Value> = (0..5)
                .map(|j| json!({"name": format!("f{j}"), "listen_port": 20000 + j, "to": format!("10.0.2.2:{}", 1000 + i)}))
                .collect();
            json!({"forwards": forwards})
        })
        .collect();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = sets
            .iter()
            .map(|p| scope.spawn(|| portfwd().apply(&t.proxy, p).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.code, 0, "{}", r.stdout);
        assert!(!r.failed(), "{}", r.stdout);
    }
    let rules = ruleset(&t.proxy, "iptables-save").unwrap();
    let lines: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A")).collect();
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), lines.len(), "duplicated rules:\n{rules}");
    let unchanged = |p: &Value| {
        !portfwd()
            .run(&t.proxy, &["apply", "--check"], &p.to_string(), &[])
            .unwrap()
            .changed()
    };
    let winners = sets.iter().filter(|p| unchanged(p)).count();
    assert_eq!(
        winners, 1,
        "the final state is exactly one of the param sets:\n{rules}"
    );
}

/// Shims that log every `iptables-save`/`ip6tables-save` call (any flavour) and run the tool.
struct SaveCounter(portfwd_harness::shims::CallLog);

impl SaveCounter {
    fn new() -> SaveCounter {
        SaveCounter(
            portfwd_harness::shims::CallLog::new(&[
                "iptables-save",
                "ip6tables-save",
                "iptables-legacy-save",
                "ip6tables-legacy-save",
            ])
            .unwrap(),
        )
    }

    fn path(&self) -> String {
        self.0.path()
    }

    /// Calls of the nf_tables save tools (`iptables-save`, `ip6tables-save`), and of the
    /// legacy ones (read on every run to see iptables-legacy's FORWARD beside nf_tables). A
    /// `--version` (how portfwd tells the flavour of a shim like these) reads no rules.
    fn calls(&self) -> (usize, usize) {
        let calls: Vec<String> = self
            .0
            .calls()
            .into_iter()
            .filter(|l| !l.ends_with(" --version"))
            .collect();
        let legacy = calls.iter().filter(|l| l.contains("legacy")).count();
        (calls.len() - legacy, legacy)
    }
}

/// A no-op whose firewall state is proven unchanged by the nf_tables generation skips the
/// `iptables-save` reads, right after portfwd's own change too (its commits lead to a known
/// generation); any other writer's change (here an `iptables -F` of our chain, or a chain of
/// its own) moves the generation, and the next run reads and repairs. The legacy flavour
/// never skips.
#[test]
fn the_firewall_read_is_skipped_only_while_nothing_changed() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _tcp = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    // (changed, nf_tables saves, legacy saves) of one apply.
    let counted = |params: &Value| {
        let counter = SaveCounter::new();
        let r = portfwd()
            .run(
                &t.proxy,
                &["apply"],
                &params.to_string(),
                &[("PATH", &counter.path())],
            )
            .unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        let (nft, legacy) = counter.calls();
        (r.changed(), nft, legacy)
    };
    let run = |params: &Value| {
        let (changed, nft, _) = counted(params);
        (changed, nft)
    };
    let legacy_reads = |params: &Value| counted(params).2;
    assert_eq!(run(&params), (true, 2), "a first run reads both families");
    // (The first run found no rules to tell the flavour by, so it proved no generation.)
    assert!(!run(&params).0);
    assert_eq!(
        run(&params),
        (false, 0),
        "nothing changed since the last full read: no iptables-save"
    );
    t.proxy
        .exec(&["iptables", "-t", "nat", "-F", "PFWD-portfwd-PRE"])
        .unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    assert_eq!(
        run(&params),
        (true, 2),
        "another writer's change is read and repaired"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1")
    );
    let changed =
        json!({"forwards": [{"name": "web", "listen_port": 4322, "to": "10.0.2.2:1234"}]});
    assert!(run(&changed).0);
    assert_eq!(
        run(&changed),
        (false, 0),
        "the no-op after a change: the generation is the one its commits led to"
    );
    // A commit by anyone else in between, even one that touches nothing of ours, and the
    // next run reads.
    t.proxy
        .exec(&["iptables", "-t", "filter", "-N", "SOMEONE-ELSE"])
        .unwrap();
    assert_eq!(run(&changed), (false, 2));
    assert_eq!(run(&changed), (false, 0));

    let legacy = json!({"backend": "legacy", "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    run(&json!({"state": "absent"}));
    for _ in 0..3 {
        // Its own saves, read every time (the check for legacy rules beside nf_tables reads
        // nothing more: it is the same tool).
        assert_eq!(
            legacy_reads(&legacy),
            2,
            "iptables-legacy does not move the generation: read every time"
        );
    }
}
