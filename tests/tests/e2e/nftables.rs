//! End-to-end: the native nftables backend (`backend: nftables`) in namespaces, with real
//! traffic in both families: one table per instance and nothing outside it, a second run that
//! writes nothing, a change of one forward that touches only its objects, a Docker-like host
//! left byte-identical, moving an instance between backends both ways, and a fault at every
//! nft call (and after the nft transaction) leaving the host as it was.

use std::net::IpAddr;

use crate::common::{
    portfwd, prerequisites, ruleset, sa, warnings, FailNth, Topology, WriteRecorder,
};
use portfwd_harness::{probe, Netns, Proto, Server, TcpSession};
use serde_json::{json, Value};

const FOREIGN: &str = include_str!("../../data/docker-kube.rules");

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The whole nftables ruleset without counter values (`-s`): traffic moves counters.
fn nft_ruleset(ns: &Netns) -> String {
    ns.stdout(&["nft", "-s", "list", "ruleset"]).unwrap()
}

/// Every table but portfwd's own, listed without counter values: what other software sees.
fn foreign_nft(ns: &Netns) -> String {
    let tables = ns.stdout(&["nft", "list", "tables"]).unwrap();
    let mut out = String::new();
    for table in tables.lines().filter(|t| !t.contains(" portfwd-")) {
        let words: Vec<&str> = table.split_whitespace().collect();
        if let [_, family, name] = words.as_slice() {
            out.push_str(
                &ns.stdout(&["nft", "-s", "list", "table", family, name])
                    .unwrap(),
            );
        }
    }
    out
}

/// The lines of the nft script a run wrote (between `nft -f - <<'EOF'` and `EOF`).
fn nft_script(r: &portfwd_harness::RunResult) -> Vec<String> {
    let commands: Vec<&str> = r.json["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let Some(start) = commands.iter().position(|c| c.starts_with("nft -f -")) else {
        return Vec::new();
    };
    commands[start + 1..]
        .iter()
        .take_while(|c| **c != "EOF")
        .map(|c| c.to_string())
        .collect()
}

/// `portfwd apply` with `path` as PATH (shims in front of the real tools).
fn apply_with_path(ns: &Netns, params: &Value, path: &str) -> portfwd_harness::RunResult {
    portfwd()
        .run(ns, &["apply"], &params.to_string(), &[("PATH", path)])
        .unwrap()
}

/// A second run with the same params changes nothing and calls no writing tool (shims log
/// every restore, `ip -batch` and non-listing nft call).
fn writes_nothing(ns: &Netns, params: &Value) {
    let recorder = WriteRecorder::new().unwrap();
    let r = apply_with_path(ns, params, &recorder.path());
    assert!(!r.changed() && !r.failed(), "{}", r.stdout);
    assert_eq!(
        recorder.calls(),
        Vec::<String>::new(),
        "a second run writes nothing"
    );
}

/// Every kind of forward through the native backend, IPv4 and IPv6, TCP and UDP: the backend
/// sees the address the params say; the instance owns one table and nothing else; the second
/// run writes nothing; `show` round-trips; `absent` leaves an empty ruleset.
#[test]
fn every_kind_of_forward_works_in_both_families() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _servers: Vec<Server> = [
        (Proto::Tcp, "0.0.0.0:1234"),
        (Proto::Udp, "0.0.0.0:1234"),
        (Proto::Tcp, "[fd00:2::2]:1234"),
        (Proto::Udp, "[fd00:2::2]:1234"),
        (Proto::Tcp, "0.0.0.0:6005"),
    ]
    .into_iter()
    .map(|(p, a)| Server::start(&t.backend, p, sa(a)).unwrap())
    .collect();
    let _local = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:2222")).unwrap();
    // For `snat: none` the backend routes its replies back through the proxy.
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])
        .unwrap();
    let params = json!({"backend": "nftables", "forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        {"name": "dns", "proto": "udp", "listen_port": 5353, "to": "10.0.2.2:1234"},
        {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:1234"},
        {"name": "range", "listen_address": "10.0.1.1", "listen_port": "6000-6010", "to": "10.0.2.2", "snat": "10.0.2.1"},
        {"name": "ssh", "listen_port": 2223, "redirect_to_port": 2222},
        {"name": "mine", "listen_port": 4400, "to": "10.0.2.2:1234", "local": true},
        {"name": "closed", "listen_port": 4500, "to": "10.0.2.2:1234", "sources": ["10.9.9.0/24"], "in_interface": "eth0"},
        {"name": "keep", "listen_port": 4600, "to": "10.0.2.2:1234", "snat": "none", "sources": ["10.0.1.0/24"], "in_interface": "eth0"},
        {"name": "both6", "proto": "both", "listen_port": 4700, "to": "[fd00:2::2]:1234"}
    ]});
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    assert_eq!(first.json["backend"], "nftables");
    assert_eq!(
        t.proxy.stdout(&["nft", "list", "tables"]).unwrap().trim(),
        "table inet portfwd-portfwd",
        "one table, nothing else"
    );

    let proxy_side = ip("10.0.2.1");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        proxy_side
    );
    assert_eq!(
        probe(&t.client, Proto::Udp, sa("10.0.1.1:5353")).unwrap(),
        proxy_side
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("[fd00:1::1]:4321")).unwrap(),
        ip("fd00:2::1")
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:6005")).unwrap(),
        proxy_side
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:2223")).unwrap(),
        ip("10.0.1.2"),
        "REDIRECT reaches the proxy's own socket"
    );
    assert_eq!(
        probe(&t.proxy, Proto::Tcp, sa("10.0.1.1:4400")).unwrap(),
        proxy_side,
        "local: true forwards the proxy's own connections"
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4500")).is_err(),
        "a source outside `sources` is not forwarded"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4600")).unwrap(),
        ip("10.0.1.2"),
        "snat none (an allowed source on the named interface): the backend sees the client"
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        assert_eq!(
            probe(&t.client, proto, sa("[fd00:1::1]:4700")).unwrap(),
            ip("fd00:2::1"),
            "proto both over IPv6"
        );
    }

    writes_nothing(&t.proxy, &params);

    let shown = portfwd().run(&t.proxy, &["show"], "", &[]).unwrap();
    let shown_json: Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown_json["backend"], "nftables", "{}", shown.stdout);
    assert_eq!(shown_json["forwards"].as_array().unwrap().len(), 9);
    let again = portfwd()
        .run(&t.proxy, &["apply"], &shown.stdout, &[])
        .unwrap();
    assert!(
        !again.changed() && !again.failed(),
        "{}\n{}",
        shown.stdout,
        again.stdout
    );

    let absent = portfwd()
        .apply(&t.proxy, &json!({"backend": "nftables", "state": "absent"}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(nft_ruleset(&t.proxy), "", "absent deletes the table");
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
}

/// A masquerade entry (seed 002's gateway) through the native backend: the LAN reaches a host
/// that has no route back to it.
#[test]
fn a_masquerade_entry_works() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.client_default_route().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"backend": "nftables", "ip_forward": true,
        "masquerade": [{"name": "lan", "source": "10.0.1.0/24", "out_interface": "eth1"}]});
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert_eq!(r.json["masquerade"]["added"], json!(["lan"]));
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.2.2:1234")).unwrap(),
        ip("10.0.2.1")
    );
    assert!(!portfwd().apply(&t.proxy, &params).unwrap().changed());
}

fn many(n: usize, changed: Option<usize>) -> Value {
    let forwards: Vec<Value> = (0..n)
        .map(|i| {
            let port = if Some(i) == changed { 1235 } else { 1234 };
            json!({"name": format!("f{i}"), "proto": "both", "listen_port": 10000 + i, "to": format!("10.0.2.2:{port}")})
        })
        .collect();
    json!({"backend": "nftables", "forwards": forwards})
}

/// A topology with servers on the backend's 1234 and 1235, `many(40, None)` applied, and an
/// open session through f0.
fn forty_forwards() -> (Topology, [Server; 2], TcpSession) {
    let t = Topology::new().unwrap();
    let a = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let b = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1235")).unwrap();
    let first = portfwd().apply(&t.proxy, &many(40, None)).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    let mut session = TcpSession::connect(&t.client, sa("10.0.1.1:10000")).unwrap();
    assert_eq!(session.ask().unwrap(), ip("10.0.2.1"));
    (t, [a, b], session)
}

/// Removing most of many forwards in one run flushes their maps and writes the kept
/// elements again, in the one transaction: the kept forwards never stop forwarding (an open
/// connection through one lives on), the removed ones stop, and the next run has nothing to
/// do. A few removals still delete element by element.
#[test]
fn removing_most_forwards_flushes_their_maps_and_keeps_the_rest() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _tcp = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _udp = Server::start(&t.backend, Proto::Udp, sa("0.0.0.0:1234")).unwrap();
    let first = portfwd().apply(&t.proxy, &many(100, None)).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    let mut session = TcpSession::connect(&t.client, sa("10.0.1.1:10000")).unwrap();
    assert_eq!(session.ask().unwrap(), ip("10.0.2.1"));

    let mut few = many(100, None);
    few["forwards"].as_array_mut().unwrap().truncate(98);
    let r = portfwd().apply(&t.proxy, &few).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    let script = nft_script(&r);
    assert!(
        script.iter().any(|l| l.starts_with("delete element "))
            && !script.iter().any(|l| l.starts_with("flush ")),
        "two of a hundred go by key: {script:#?}"
    );

    let mut two = many(100, None);
    two["forwards"].as_array_mut().unwrap().truncate(2);
    let r = portfwd().apply(&t.proxy, &two).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert_eq!(
        r.json["forwards"]["removed"].as_array().map(Vec::len),
        Some(96)
    );
    let script = nft_script(&r);
    assert!(
        script
            .iter()
            .any(|l| l == "flush map inet portfwd-portfwd pre-port4-nat")
            && !script.iter().any(|l| l.starts_with("delete element ")),
        "{script:#?}"
    );
    assert_eq!(
        session.ask().unwrap(),
        ip("10.0.2.1"),
        "f0's connection lives on"
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        assert_eq!(
            probe(&t.client, proto, sa("10.0.1.1:10001")).unwrap(),
            ip("10.0.2.1"),
            "f1 ({proto:?}) still forwards"
        );
        assert!(
            probe(&t.client, proto, sa("10.0.1.1:10050")).is_err(),
            "f50 ({proto:?}) is gone"
        );
    }
    let again = portfwd().apply(&t.proxy, &two).unwrap();
    assert!(!again.changed() && !again.failed(), "{}", again.stdout);
    let listing = t
        .proxy
        .stdout(&["nft", "list", "table", "inet", "portfwd-portfwd"])
        .unwrap();
    assert!(
        listing.contains("10001") && !listing.contains("10002"),
        "{listing}"
    );
}

/// Changing one of 40 forwards writes only its map elements (at most 6 operations: out and in
/// again, in the DNAT map and the two protocols' SNAT sets), never a rule, chain or the
/// table, and the other forwards keep their connections.
#[test]
fn changing_one_forward_touches_only_its_objects() {
    if !prerequisites() {
        return;
    }
    let (t, _servers, mut session) = forty_forwards();
    let listing = || {
        t.proxy
            .stdout(&["nft", "-a", "list", "table", "inet", "portfwd-portfwd"])
            .unwrap()
    };
    let rules_before: Vec<String> = listing()
        .lines()
        .filter(|l| l.contains("# handle"))
        .map(String::from)
        .collect();

    let changed = portfwd().apply(&t.proxy, &many(40, Some(7))).unwrap();
    assert!(changed.changed() && !changed.failed(), "{}", changed.stdout);
    assert_eq!(changed.json["forwards"]["updated"], json!(["f7"]));
    let script = nft_script(&changed);
    assert!(
        !script.is_empty() && script.len() <= 6,
        "at most 6 operations: {script:#?}"
    );
    assert!(
        script
            .iter()
            .all(|l| l.contains(" element ") && l.contains("10007")),
        "only f7's elements: {script:#?}"
    );
    let rules_after: Vec<String> = listing()
        .lines()
        .filter(|l| l.contains("# handle"))
        .map(String::from)
        .collect();
    assert_eq!(
        rules_after, rules_before,
        "every rule stayed, with its handle"
    );
    assert_eq!(
        session.ask().unwrap(),
        ip("10.0.2.1"),
        "f0's connection lives on"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).unwrap(),
        ip("10.0.2.1"),
        "f7 reaches its new port"
    );
}

/// The `nft` calls of one apply that list the instance's table.
fn table_listings(calls: &[String]) -> usize {
    calls
        .iter()
        .filter(|c| c.contains(" list table inet portfwd-portfwd"))
        .count()
}

/// While nothing else has committed since portfwd's last run (the nf_tables generation is the
/// one its commits led to), a change is planned from the record and the table is not listed;
/// what it writes is what a full read expects (a run after another writer's commit, which
/// reads, finds nothing to do), and traffic takes the new way. Someone else's commit in
/// between (here a hand edit of another forward's element) makes the next change read, and
/// the edit is repaired with it. Those reads are netlink dumps of the table (its shape is the
/// recorded one), so neither lists it.
#[test]
fn a_change_is_planned_from_the_record_while_nobody_else_wrote() {
    if !prerequisites() {
        return;
    }
    let (t, _servers, mut session) = forty_forwards();

    let nft = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let changed = apply_with_path(&t.proxy, &many(40, Some(7)), &nft.path());
    assert!(changed.changed() && !changed.failed(), "{}", changed.stdout);
    assert_eq!(changed.json["forwards"]["updated"], json!(["f7"]));
    assert_eq!(table_listings(&nft.calls()), 0, "{:#?}", nft.calls());
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).unwrap(),
        ip("10.0.2.1"),
        "f7 reaches its new port"
    );
    assert_eq!(
        session.ask().unwrap(),
        ip("10.0.2.1"),
        "f0's connection lives on"
    );

    // Another writer's commit: the next run reads (a dump), and finds the table exactly as
    // wanted.
    t.proxy
        .stdout(&["nft", "add", "table", "inet", "other"])
        .unwrap();
    let nft = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let full = apply_with_path(&t.proxy, &many(40, Some(7)), &nft.path());
    assert!(!full.changed() && !full.failed(), "{}", full.stdout);
    assert_eq!(table_listings(&nft.calls()), 0, "{:#?}", nft.calls());

    // A hand edit moves the generation: the next change reads, and repairs the edit too.
    t.proxy
        .stdout(&[
            "nft",
            "delete",
            "element",
            "inet",
            "portfwd-portfwd",
            "pre-port4-nat",
            "{ tcp . 10003 }",
        ])
        .unwrap();
    let nft = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let repaired = apply_with_path(&t.proxy, &many(40, Some(8)), &nft.path());
    assert!(
        repaired.changed() && !repaired.failed(),
        "{}",
        repaired.stdout
    );
    assert_eq!(table_listings(&nft.calls()), 0, "{:#?}", nft.calls());
    assert_eq!(
        repaired.json["forwards"]["updated"],
        json!(["f3", "f7", "f8"]),
        "f3's deleted element is written again"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10003")).unwrap(),
        ip("10.0.2.1"),
        "f3 forwards again"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10008")).unwrap(),
        ip("10.0.2.1")
    );
    // Removing every forward is planned from the record too: one `delete table`.
    let nft = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let none = apply_with_path(
        &t.proxy,
        &json!({"backend": "nftables", "forwards": []}),
        &nft.path(),
    );
    assert!(none.changed() && !none.failed(), "{}", none.stdout);
    assert_eq!(table_listings(&nft.calls()), 0, "{:#?}", nft.calls());
    assert_eq!(
        nft_script(&none),
        vec!["delete table inet portfwd-portfwd".to_string()]
    );
    // And `absent`: the table from the record, the iptables flavours (which the record says
    // nothing about) read.
    let again = portfwd().apply(&t.proxy, &many(40, None)).unwrap();
    assert!(again.changed() && !again.failed(), "{}", again.stdout);
    let nft = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let absent = apply_with_path(
        &t.proxy,
        &json!({"backend": "nftables", "state": "absent"}),
        &nft.path(),
    );
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(table_listings(&nft.calls()), 0, "{:#?}", nft.calls());
    assert_eq!(
        absent.json["forwards"]["removed"].as_array().map(Vec::len),
        Some(40)
    );
    let tables = t.proxy.stdout(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("portfwd-portfwd"), "{tables}");
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:10000")).is_err());
}

/// A Docker-like host (iptables FORWARD policy DROP, foreign nat rules) and another nftables
/// table: portfwd's own table cannot override iptables' drop, so the run says which chain and
/// the one rule that fixes it; with that rule the forward works. Every foreign ruleset stays
/// byte-identical, and `absent` leaves the exact original.
fn docker_like_host(flavour: &str) {
    if !prerequisites() {
        return;
    }
    let (save, restore, tool) = match flavour {
        "legacy" => (
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-legacy",
        ),
        _ => ("iptables-nft-save", "iptables-nft-restore", "iptables-nft"),
    };
    let t = Topology::new().unwrap();
    let loaded = t.proxy.exec_with_input(&[restore], FOREIGN).unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    crate::common::nft(
        &t.proxy,
        &[
            "add table inet other",
            "add chain inet other input { type filter hook input priority 10; policy accept; }",
            "add rule inet other input tcp dport 9999 counter accept comment \"theirs\"",
        ],
    );
    t.proxy.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let (ipt_before, nft_before, all_before) = (
        ruleset(&t.proxy, save).unwrap(),
        foreign_nft(&t.proxy),
        nft_ruleset(&t.proxy),
    );

    let params = json!({"backend": "nftables", "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    let chain = if flavour == "legacy" {
        "`iptables-legacy filter FORWARD`"
    } else {
        "`iptables filter FORWARD`"
    };
    let warned = |r: &portfwd_harness::RunResult| {
        warnings(r)
            .into_iter()
            .any(|w| w.contains(chain) && w.contains("forward \"web\""))
    };
    assert!(warned(&first), "{:#?}", warnings(&first));
    let doctor = portfwd()
        .run(&t.proxy, &["doctor", "--json"], &params.to_string(), &[])
        .unwrap();
    let fix_tool = if flavour == "legacy" {
        "iptables-legacy"
    } else {
        "iptables"
    };
    let fix = format!("{fix_tool} -I FORWARD -m connmark --mark 0x2000/0x2000 -j ACCEPT");
    assert!(
        doctor.stdout.contains("forward_hook_drop") && doctor.stdout.contains(&fix),
        "{}",
        doctor.stdout
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "the warning is true: iptables' FORWARD drops the flow"
    );
    assert_eq!(
        ruleset(&t.proxy, save).unwrap(),
        ipt_before,
        "iptables untouched"
    );
    assert_eq!(
        foreign_nft(&t.proxy),
        nft_before,
        "other nftables tables untouched"
    );

    let rule = [
        "-I",
        "FORWARD",
        "-m",
        "connmark",
        "--mark",
        "0x2000/0x2000",
        "-j",
        "ACCEPT",
    ];
    let mut argv = vec![tool];
    argv.extend(rule);
    t.proxy.exec(&argv).unwrap();
    let fixed = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!fixed.changed() && !warned(&fixed), "{}", fixed.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1"),
        "the marked flow passes iptables' FORWARD"
    );
    argv[1] = "-D";
    t.proxy.exec(&argv).unwrap();

    let absent = portfwd()
        .apply(&t.proxy, &json!({"backend": "nftables", "state": "absent"}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(ruleset(&t.proxy, save).unwrap(), ipt_before);
    assert_eq!(
        nft_ruleset(&t.proxy),
        all_before,
        "the exact original nftables ruleset"
    );
}

#[test]
fn docker_like_host_nft() {
    docker_like_host("nft");
}

#[test]
fn docker_like_host_legacy() {
    docker_like_host("legacy");
}

fn iptables_objects(ns: &Netns) -> bool {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .any(|save| ruleset(ns, save).unwrap().contains("PFWD-"))
}

/// iptables → nftables → iptables: each move removes the old backend's objects in the same
/// run, after the new ones are in place; traffic flows after each; each is quiet the second
/// time.
#[test]
fn an_instance_moves_between_backends_both_ways() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _server6 = Server::start(&t.backend, Proto::Tcp, sa("[fd00:2::2]:1234")).unwrap();
    let forwards = json!([
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:1234"}
    ]);
    let works = || {
        assert_eq!(
            probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
            ip("10.0.2.1")
        );
        assert_eq!(
            probe(&t.client, Proto::Tcp, sa("[fd00:1::1]:4321")).unwrap(),
            ip("fd00:2::1")
        );
    };
    let on_iptables = json!({"forwards": forwards});
    let on_nftables = json!({"backend": "nftables", "forwards": forwards});

    let r = portfwd().apply(&t.proxy, &on_iptables).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    works();
    assert!(iptables_objects(&t.proxy));

    let moved = portfwd().apply(&t.proxy, &on_nftables).unwrap();
    assert!(moved.changed() && !moved.failed(), "{}", moved.stdout);
    assert_eq!(moved.json["backend"], "nftables");
    assert_eq!(
        moved.json["forwards"]["updated"],
        json!(["web", "web6"]),
        "{}",
        moved.stdout
    );
    let commands = moved.json["commands"].to_string();
    let (nft_at, restore_at) = (
        commands.find("nft -f -").unwrap(),
        commands.find("restore --noflush").unwrap(),
    );
    assert!(
        nft_at < restore_at,
        "the new objects go in before the old ones go: {commands}"
    );
    assert!(
        !iptables_objects(&t.proxy),
        "iptables holds nothing of it any more"
    );
    assert_eq!(
        t.proxy.stdout(&["nft", "list", "tables"]).unwrap().trim(),
        "table inet portfwd-portfwd",
        "the iptables-nft tables portfwd had created are gone too"
    );
    works();
    writes_nothing(&t.proxy, &on_nftables);

    let back = portfwd().apply(&t.proxy, &on_iptables).unwrap();
    assert!(back.changed() && !back.failed(), "{}", back.stdout);
    assert!(iptables_objects(&t.proxy));
    assert!(
        !t.proxy
            .stdout(&["nft", "list", "tables"])
            .unwrap()
            .contains("portfwd-"),
        "the nftables table is gone"
    );
    works();
    writes_nothing(&t.proxy, &on_iptables);
}

/// A fault at every nft call of a move from iptables (reads, the transaction, the drops of the
/// tables iptables-nft had), and a fault after the nft transaction committed (the sysctl that
/// turns forwarding on): each leaves iptables, nftables and the sysctls exactly as they were.
#[test]
fn a_fault_at_each_nft_call_leaves_the_host_as_it_was() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let web = json!({"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"});
    let r = portfwd()
        .apply(&t.proxy, &json!({"forwards": [web]}))
        .unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    t.proxy.sysctl("net.ipv6.conf.all.forwarding", "0").unwrap();
    // iptables as iptables-save shows it (nf_tables lists chains in creation order, which a
    // rollback that re-creates a chain cannot keep), which nftables tables exist, sysctls.
    let state = || {
        (
            ruleset(&t.proxy, "iptables-save").unwrap(),
            ruleset(&t.proxy, "ip6tables-save").unwrap(),
            {
                let tables = t.proxy.stdout(&["nft", "list", "tables"]).unwrap();
                let mut tables: Vec<String> = tables.lines().map(str::to_string).collect();
                tables.sort();
                tables
            },
            t.proxy
                .stdout(&["sysctl", "-n", "net.ipv6.conf.all.forwarding"])
                .unwrap(),
        )
    };
    let before = state();
    let target = json!({"backend": "nftables", "forwards": [web,
        {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:1234"}]});
    let mut n = 1;
    loop {
        let fail = FailNth::new("nft", n).unwrap();
        let r = apply_with_path(&t.proxy, &target, &fail.path());
        if fail.calls() < n {
            assert!(
                !r.failed(),
                "no call {n}: the run went through: {}",
                r.stdout
            );
            break;
        }
        assert!(
            r.failed(),
            "nft call {n} failed, so must the run: {}",
            r.stdout
        );
        assert_eq!(
            state(),
            before,
            "after a failure at nft call {n}: {}",
            r.stdout
        );
        n += 1;
        assert!(n < 20, "runaway");
    }
    assert!(
        n >= 3,
        "the read, the transaction and a table drop at least: {n}"
    );
    // Back to iptables, then a failure after the nft transaction committed.
    let r = portfwd()
        .apply(&t.proxy, &json!({"forwards": [web]}))
        .unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    t.proxy.sysctl("net.ipv6.conf.all.forwarding", "0").unwrap();
    assert_eq!(state(), before);
    let fail = FailNth::new("sysctl", 1).unwrap();
    let r = apply_with_path(&t.proxy, &target, &fail.path());
    assert!(r.failed() && fail.calls() >= 1, "{}", r.stdout);
    assert!(r.msg().contains("rolled back"), "{}", r.stdout);
    assert_eq!(
        state(),
        before,
        "the committed nft transaction was rolled back"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1")
    );
}

/// Check mode and `plan` write nothing and show the nft script; `persist` stores the params and
/// `portfwd restore` brings the table back after a reboot; `absent` without naming the backend
/// finds the instance in nftables (its record says so) and removes it.
#[test]
fn plan_persist_restore_and_absent() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let pf = portfwd();
    let params = json!({"backend": "nftables", "persist": true,
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let recorder = WriteRecorder::new().unwrap();
    let plan = pf
        .run(
            &t.proxy,
            &["plan", "--json"],
            &params.to_string(),
            &[("PATH", &recorder.path())],
        )
        .unwrap();
    assert_eq!(plan.code, 0, "{}", plan.stdout);
    assert!(plan.changed(), "{}", plan.stdout);
    assert!(
        plan.json["diff"]["after"]
            .as_str()
            .unwrap()
            .contains("forwards.web = "),
        "{}",
        plan.stdout
    );
    assert!(nft_script(&plan)
        .iter()
        .any(|l| l.starts_with("add table inet portfwd-portfwd")));
    assert_eq!(
        recorder.calls(),
        Vec::<String>::new(),
        "plan writes nothing"
    );
    assert_eq!(nft_ruleset(&t.proxy), "");

    let first = pf.apply(&t.proxy, &params).unwrap();
    assert!(
        first.changed() && first.msg().contains("params stored"),
        "{}",
        first.stdout
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1")
    );

    // The reboot: the table, forwarding and the runtime record are gone; the stored file stays.
    t.proxy
        .exec(&["nft", "delete", "table", "inet", "portfwd-portfwd"])
        .unwrap();
    t.proxy.sysctl("net.ipv4.ip_forward", "0").unwrap();
    std::fs::remove_dir_all(pf.run_dir(&t.proxy)).unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let restored = pf.run(&t.proxy, &["restore"], "", &[]).unwrap();
    assert_eq!(restored.json["changed"], json!(true), "{}", restored.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        ip("10.0.2.1")
    );
    let again = pf.run(&t.proxy, &["restore"], "", &[]).unwrap();
    assert_eq!(again.json["changed"], json!(false), "{}", again.stdout);

    let absent = pf
        .apply(&t.proxy, &json!({"state": "absent", "persist": true}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(
        absent.json["forwards"]["removed"],
        json!(["web"]),
        "{}",
        absent.stdout
    );
    assert_eq!(nft_ruleset(&t.proxy), "", "the nftables instance is gone");
    assert!(!pf.state_dir(&t.proxy).join("portfwd.json").exists());
}
