//! End-to-end: live flows follow every change. A UDP client that keeps sending from one
//! source port reaches the new target right after `to` changes, a flow that began before the
//! forward existed is forwarded after apply, `absent` stops forwarding it, and
//! `reset_connections` decides whether an open TCP connection is cut. Each in both iptables
//! flavours; nothing of another forward's flows is deleted.

use crate::common;
use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{Netns, Proto, Server, TcpSession, UdpFlow};
use serde_json::{json, Value};

/// Two named UDP and TCP targets on the backend: `old` on 1234, `new` on 1235.
fn targets(t: &Topology) -> Vec<Server> {
    let mut servers = Vec::new();
    for (port, name) in [(1234, "old"), (1235, "new")] {
        for proto in [Proto::Udp, Proto::Tcp] {
            let bind = sa(&format!("0.0.0.0:{port}"));
            servers.push(Server::start_named(&t.backend, proto, bind, name).unwrap());
        }
    }
    servers
}

fn params(flavour: &str, to: &str, reset: bool) -> Value {
    json!({"backend": flavour, "forwards": [
        {"name": "game", "proto": "both", "listen_port": 5353, "to": to,
         "reset_connections": reset},
        {"name": "other", "proto": "udp", "listen_port": 5454, "to": "10.0.2.2:1234"}
    ]})
}

fn apply(t: &Topology, p: &Value) -> Value {
    let r = portfwd().apply(&t.proxy, p).unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json
}

/// The conntrack id of the entry from the client's `sport`, to show it was never replaced.
fn entry_id(ns: &Netns, sport: u16) -> Option<String> {
    let out = ns
        .stdout(&["conntrack", "-L", "-p", "udp", "-o", "id"])
        .unwrap_or_default();
    out.lines()
        .find(|l| l.contains(&format!("sport={sport} ")))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("id=")))
        .map(str::to_string)
}

/// A typical host firewall rule of another owner; it also makes the kernel track
/// connections in this namespace before portfwd adds anything (as on any real host).
fn host_firewall(ns: &Netns, flavour: &str) {
    // The native nftables backend beside an iptables-nft host firewall.
    let tool = match flavour {
        "nftables" => "iptables-nft".to_string(),
        other => format!("iptables-{other}"),
    };
    let out = ns
        .exec(&[
            &tool,
            "-A",
            "INPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn answer(flow: &UdpFlow) -> Option<String> {
    flow.ask().unwrap()
}

fn udp_flows_follow_every_change(flavour: &str) {
    let t = Topology::new().unwrap();
    let _servers = targets(&t);
    host_firewall(&t.proxy, flavour);
    let game = UdpFlow::open(&t.client, sa("10.0.1.2:40001"), sa("10.0.1.1:5353")).unwrap();
    let other = UdpFlow::open(&t.client, sa("10.0.1.2:40002"), sa("10.0.1.1:5454")).unwrap();

    // A flow that began before the forward existed: the proxy itself answers nothing, and
    // conntrack holds an un-NATed entry for it.
    assert_eq!(answer(&game), None, "nothing forwards yet");
    assert!(
        entry_id(&t.proxy, 40001).is_some(),
        "the early flow has an entry"
    );
    let first = apply(&t, &params(flavour, "10.0.2.2:1234", false));
    assert!(
        first["msg"]
            .as_str()
            .unwrap()
            .contains("conntrack: 1 udp flow reset"),
        "{first}"
    );
    assert_eq!(answer(&game).as_deref(), Some("10.0.2.1 old"), "{first}");
    assert_eq!(answer(&other).as_deref(), Some("10.0.2.1 old"));
    let other_id = entry_id(&t.proxy, 40002);
    assert!(other_id.is_some());

    // Change the target: the same client flow reaches the new one at once.
    let changed = apply(&t, &params(flavour, "10.0.2.2:1235", false));
    let msg = changed["msg"].as_str().unwrap();
    assert!(msg.contains("conntrack: 1 udp flow reset"), "{changed}");
    let commands = changed["commands"].to_string();
    assert!(
        commands.contains("--orig-port-src 40001 --orig-port-dst 5353"),
        "{commands}"
    );
    assert_eq!(answer(&game).as_deref(), Some("10.0.2.1 new"));
    assert_eq!(
        entry_id(&t.proxy, 40002),
        other_id,
        "another forward's flow keeps its entry"
    );
    assert_eq!(answer(&other).as_deref(), Some("10.0.2.1 old"));

    // A second identical run is a no-op and deletes nothing.
    let again = apply(&t, &params(flavour, "10.0.2.2:1235", false));
    assert_eq!(again["changed"], json!(false), "{again}");
    assert_eq!(again["commands"], json!([]));

    // Check mode deletes nothing.
    let r = portfwd()
        .run(
            &t.proxy,
            &["apply", "--check"],
            &json!({"backend": flavour, "state": "absent"}).to_string(),
            &[],
        )
        .unwrap();
    assert!(!r.stdout.contains("conntrack -D"), "{}", r.stdout);
    assert_eq!(answer(&game).as_deref(), Some("10.0.2.1 new"));

    // Absent: the flow is no longer forwarded.
    let gone = apply(&t, &json!({"backend": flavour, "state": "absent"}));
    assert!(
        gone["msg"].as_str().unwrap().contains("udp flows reset"),
        "{gone}"
    );
    assert_eq!(
        answer(&game),
        None,
        "after absent nothing forwards the flow"
    );
    assert_eq!(answer(&other), None);
}

#[test]
fn udp_flows_follow_every_change_nft() {
    if prerequisites() {
        udp_flows_follow_every_change("nft");
    }
}

#[test]
fn udp_flows_follow_every_change_nftables() {
    if prerequisites() {
        udp_flows_follow_every_change("nftables");
    }
}

#[test]
fn udp_flows_follow_every_change_legacy() {
    if prerequisites() {
        udp_flows_follow_every_change("legacy");
    }
}

fn tcp_connections_survive_unless_reset(flavour: &str) {
    let t = Topology::new().unwrap();
    let _servers = targets(&t);
    apply(&t, &params(flavour, "10.0.2.2:1234", false));
    let mut kept = TcpSession::connect(&t.client, sa("10.0.1.1:5353")).unwrap();
    kept.ask().unwrap();

    // Without reset_connections the open connection finishes on the old target.
    let r = apply(&t, &params(flavour, "10.0.2.2:1235", false));
    assert!(!r["msg"].as_str().unwrap().contains("tcp"), "{r}");
    assert!(kept.ask().is_ok(), "the open connection survives: {r}");
    let mut fresh = TcpSession::connect(&t.client, sa("10.0.1.1:5353")).unwrap();
    fresh.ask().unwrap();

    // With it, the next change cuts the connection; new ones reach the new target.
    let r = apply(&t, &params(flavour, "10.0.2.2:1234", true));
    assert!(
        r["msg"]
            .as_str()
            .unwrap()
            .contains("1 tcp connection reset"),
        "{r}"
    );
    assert!(fresh.ask().is_err(), "the connection was cut: {r}");
    let mut after = TcpSession::connect(&t.client, sa("10.0.1.1:5353")).unwrap();
    assert!(after.ask().is_ok());
    // The marker round-trips through show, so applying show's output is a no-op.
    let shown = portfwd()
        .run(&t.proxy, &["show", "--backend", flavour], "", &[])
        .unwrap();
    assert_eq!(
        shown.json["forwards"][0]["reset_connections"],
        json!(true),
        "{}",
        shown.stdout
    );
    // Removal honours the flag the forward had: both connections it still carries go.
    let r = apply(&t, &json!({"backend": flavour, "state": "absent"}));
    assert!(
        r["msg"]
            .as_str()
            .unwrap()
            .contains("2 tcp connections reset"),
        "{r}"
    );
    assert!(after.ask().is_err());
    assert!(kept.ask().is_err());
}

#[test]
fn tcp_connections_survive_unless_reset_nft() {
    if prerequisites() {
        tcp_connections_survive_unless_reset("nft");
    }
}

#[test]
fn tcp_connections_survive_unless_reset_nftables() {
    if prerequisites() {
        tcp_connections_survive_unless_reset("nftables");
    }
}

#[test]
fn tcp_connections_survive_unless_reset_legacy() {
    if prerequisites() {
        tcp_connections_survive_unless_reset("legacy");
    }
}

#[test]
fn a_missing_conntrack_tool_is_a_warning() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    // A PATH with every tool but conntrack.
    let dir = tempfile::tempdir().unwrap();
    for tool in [
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
        "ip",
        "sysctl",
        "nft",
    ] {
        let real = common::which(tool).unwrap();
        std::os::unix::fs::symlink(real, dir.path().join(tool)).unwrap();
    }
    let path = dir.path().display().to_string();
    let r = portfwd()
        .run(
            &t.proxy,
            &["apply"],
            &params("auto", "10.0.2.2:1234", false).to_string(),
            &[("PATH", &path)],
        )
        .unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stdout.contains("conntrack is not installed"),
        "{}",
        r.stdout
    );
}
