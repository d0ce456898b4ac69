//! End-to-end: `portfwd trace` follows real packets through netfilter in namespaces: the path
//! through portfwd's chains labelled with the entry, the NAT, and where a packet dies; it
//! stops on its count, on its timeout and on SIGTERM, and always removes its table; `--clean`
//! removes only dead traces' tables.

use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server, TcpSession};
use serde_json::{json, Value};

/// One TCP packet to port 4321, as JSON, within 15 s.
const ONE_TCP_PACKET: [&str; 9] = [
    "--proto",
    "tcp",
    "--dport",
    "4321",
    "--count",
    "1",
    "--timeout",
    "15",
    "--json",
];

fn start(ns: &Netns, args: &[&str]) -> Child {
    let child = portfwd().start_trace(ns, args).unwrap();
    assert!(
        trace_tables(ns)
            .iter()
            .any(|t| t.ends_with(&child.id().to_string())),
        "no trace table"
    );
    child
}

fn trace_tables(ns: &Netns) -> Vec<String> {
    ns.stdout(&["nft", "list", "tables"])
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("portfwd_trace_"))
        .map(str::to_string)
        .collect()
}

/// Exit code and the JSON packets printed.
fn finish(child: Child) -> (i32, Vec<Value>, String) {
    let out = child.wait_with_output().unwrap();
    let packets = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        out.status.code().unwrap_or(-1),
        packets,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn trace_shows_the_path_through_portfwd_and_where_a_packet_dies() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!r.failed(), "{}", r.stdout);

    let tracing = start(&t.proxy, &ONE_TCP_PACKET);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    let (code, packets, stderr) = finish(tracing);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("tracing tcp packets to port 4321: make the connection now; it stops after 1 packet(s) or 15 s"),
        "says what it waits for: {stderr}"
    );
    assert_eq!(packets.len(), 1, "{packets:?}");
    let p = &packets[0];
    assert_eq!(p["verdict"], "accept", "{p}");
    assert_eq!(p["nat"], "dnat to 10.0.2.2:1234, masquerade", "{p}");
    let hops = p["hops"].as_array().unwrap();
    let dnat = hops
        .iter()
        .find(|h| h["rule"].as_str().unwrap_or_default().contains("dnat to"))
        .unwrap_or_else(|| panic!("{p}"));
    assert_eq!(dnat["table"], "ip nat");
    assert_eq!(dnat["entry"], "portfwd:web", "{p}");
    assert!(
        hops.iter()
            .any(|h| h["chain"] == "PFWD-portfwd-FWD" && h["verdict"] == "accept"),
        "{p}"
    );
    assert_eq!(
        trace_tables(&t.proxy),
        Vec::<String>::new(),
        "table removed"
    );

    // Another table rejects forwarded traffic: the trace says where the packet died.
    crate::common::firewalld_like(&t.proxy);
    let tracing = start(&t.proxy, &ONE_TCP_PACKET);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let (code, packets, stderr) = finish(tracing);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        packets[0]["verdict"], "drop in inet fw filter_FORWARD",
        "{packets:?}"
    );
    assert_eq!(trace_tables(&t.proxy), Vec::<String>::new());
}

#[test]
fn trace_stops_on_timeout_and_sigterm_and_clean_removes_only_dead_traces() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let quiet = start(
        &t.proxy,
        &["--proto", "udp", "--dport", "9", "--timeout", "1"],
    );
    let (code, packets, stderr) = finish(quiet);
    assert_eq!((code, packets.len()), (1, 0), "{stderr}");
    assert!(stderr.contains("no matching packet"), "{stderr}");
    assert_eq!(trace_tables(&t.proxy), Vec::<String>::new());

    let long = start(
        &t.proxy,
        &["--proto", "tcp", "--dport", "9", "--timeout", "60"],
    );
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(long.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, _, stderr) = finish(long);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it stopped at once"
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        trace_tables(&t.proxy),
        Vec::<String>::new(),
        "removed on SIGTERM"
    );

    // A crashed trace's table (no such process) and someone else's table.
    t.proxy
        .exec(&["nft", "add", "table", "inet", "portfwd_trace_999999"])
        .unwrap();
    t.proxy
        .exec(&["nft", "add", "table", "inet", "keep"])
        .unwrap();
    // An instance named like a trace table once was (`trace-1` owns `portfwd-trace-1`).
    let instance = json!({"instance": "trace-1", "backend": "nftables",
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let applied = portfwd().apply(&t.proxy, &instance).unwrap();
    assert!(applied.changed() && !applied.failed(), "{}", applied.stdout);
    let r = portfwd()
        .run(&t.proxy, &["trace", "--clean"], "", &[])
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json["removed"], json!(["portfwd_trace_999999"]));
    assert_eq!(trace_tables(&t.proxy), Vec::<String>::new());
    assert!(t
        .proxy
        .stdout(&["nft", "list", "tables"])
        .unwrap()
        .contains("table inet keep"));
    assert!(
        t.proxy
            .stdout(&["nft", "list", "tables"])
            .unwrap()
            .contains("table inet portfwd-trace-1"),
        "an instance's table is never taken for a trace's"
    );
}

/// Where `iptables-save` is the legacy tool, trace says its rules cannot be traced.
#[test]
fn trace_says_when_iptables_is_legacy() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let shims = tempfile::tempdir().unwrap();
    let legacy = crate::common::which("iptables-legacy-save").unwrap();
    std::os::unix::fs::symlink(
        std::fs::canonicalize(legacy).unwrap(),
        shims.path().join("iptables-save"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        shims.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let r = portfwd()
        .run(
            &t.proxy,
            &["trace", "--proto", "udp", "--dport", "9", "--timeout", "1"],
            "",
            &[("PATH", &path)],
        )
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("legacy flavour") && r.stderr.contains("cannot be traced"),
        "{}",
        r.stderr
    );
    assert!(!t
        .proxy
        .stdout(&["nft", "list", "tables"])
        .unwrap()
        .contains("portfwd_trace_"));
}

/// The nftables backend's DNAT (nft prints `dnat ip to`) is the packet's `nat`, and a rule of
/// an instance with a dash in its name is labelled with the whole instance name.
#[test]
fn trace_labels_the_nftables_backend_and_dashed_instances() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"instance": "edge-1", "backend": "nftables",
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    let args = [ONE_TCP_PACKET.as_slice(), &["--instance", "edge-1"]].concat();
    let tracing = start(&t.proxy, &args);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    let (code, packets, stderr) = finish(tracing);
    assert_eq!(code, 0, "{stderr}");
    let p = &packets[0];
    assert_eq!(p["nat"], "dnat to 10.0.2.2:1234, masquerade", "{p}");
    let hops = p["hops"].as_array().unwrap();
    let dnat = hops
        .iter()
        .find(|h| h["rule"].as_str().unwrap_or_default().contains("dnat ip"))
        .unwrap_or_else(|| panic!("{p}"));
    assert_eq!(dnat["entry"], "edge-1:web", "{p}");
    assert_eq!(trace_tables(&t.proxy), Vec::<String>::new());
}

/// A pool's trace names the backend its new connection reached, on both backends: two
/// connections in turn through a round-robin pool, each traced, each answered by the backend
/// the trace names.
#[test]
fn trace_names_the_backend_a_pool_chose() {
    if !prerequisites() {
        return;
    }
    for backend in ["nftables", "iptables-nft"] {
        let t = Topology::new().unwrap();
        t.backend
            .ip(&["addr", "add", "10.0.2.3/24", "dev", "eth0"])
            .unwrap();
        let servers = [("a", "10.0.2.2:1234"), ("b", "10.0.2.3:1234")];
        let _servers: Vec<Server> = servers
            .iter()
            .map(|(name, at)| Server::start_named(&t.backend, Proto::Tcp, sa(at), name).unwrap())
            .collect();
        let params = json!({"backend": backend, "forwards": [{"name": "web", "listen_port": 4321,
            "balance": "round-robin", "backends": [{"to": "10.0.2.2:1234"}, {"to": "10.0.2.3:1234"}]}]});
        let r = portfwd().apply(&t.proxy, &params).unwrap();
        assert!(!r.failed(), "{}", r.stdout);
        let mut reached = Vec::new();
        for _ in 0..2 {
            let tracing = start(&t.proxy, &ONE_TCP_PACKET);
            let answer = TcpSession::connect(&t.client, sa("10.0.1.1:4321"))
                .and_then(|mut s| s.ask_text())
                .unwrap();
            let (code, packets, stderr) = finish(tracing);
            assert_eq!(code, 0, "{backend}: {stderr}");
            let name = answer.split_whitespace().nth(1).unwrap_or_default();
            let (_, at) = servers.iter().find(|(n, _)| *n == name).unwrap();
            let p = &packets[0];
            assert_eq!(p["backend"], *at, "{backend}: {p}");
            let nat = p["nat"].as_str().unwrap_or_default();
            assert!(nat.starts_with(&format!("dnat to {at}")), "{backend}: {p}");
            reached.push(name.to_string());
        }
        assert_eq!(reached, ["a", "b"], "{backend}: round-robin");
    }
}
