//! End-to-end: a host already managed by other software (a Docker/kube-proxy-like ruleset with
//! FORWARD policy DROP), in both iptables flavours. portfwd must make forwarding work, leave
//! every foreign line byte-identical, and on `state: absent` restore the exact original.

use crate::common::{portfwd, prerequisites, ruleset, sa, Topology};
use portfwd_harness::{probe, Proto, Server};
use serde_json::json;

const FOREIGN: &str = include_str!("../../data/docker-kube.rules");

fn foreign_ruleset_survives(flavour: &str) {
    if !prerequisites() {
        return;
    }
    let (save, restore) = match flavour {
        "legacy" => ("iptables-legacy-save", "iptables-legacy-restore"),
        _ => ("iptables-nft-save", "iptables-nft-restore"),
    };
    let t = Topology::new().unwrap();
    let loaded = t.proxy.exec_with_input(&[restore], FOREIGN).unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    t.proxy.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "nothing forwards yet"
    );
    let original = ruleset(&t.proxy, save).unwrap();

    let params = json!({"backend": flavour, "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let applied = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(applied.changed() && !applied.failed(), "{}", applied.stdout);
    let found = if flavour == "legacy" {
        "legacy"
    } else {
        "nf_tables"
    };
    assert_eq!(
        applied.json["backend"],
        json!(found),
        "the result names the flavour found"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap(),
        "works through FORWARD policy DROP"
    );

    let with_ours = ruleset(&t.proxy, save).unwrap();
    let foreign_now: Vec<&str> = with_ours.lines().filter(|l| !l.contains("PFWD-")).collect();
    let foreign_before: Vec<&str> = original.lines().collect();
    assert_eq!(
        foreign_now, foreign_before,
        "every foreign line byte-identical, in order"
    );
    assert!(
        !portfwd().apply(&t.proxy, &params).unwrap().changed(),
        "second run is a no-op"
    );

    let absent = portfwd()
        .apply(&t.proxy, &json!({"backend": flavour, "state": "absent"}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    assert_eq!(absent.json["forwards"]["removed"], json!(["web"]));
    assert_eq!(
        ruleset(&t.proxy, save).unwrap(),
        original,
        "absent restores the exact original ruleset"
    );
}

#[test]
fn foreign_ruleset_with_forward_drop_nft() {
    foreign_ruleset_survives("nft");
}

#[test]
fn foreign_ruleset_with_forward_drop_legacy() {
    foreign_ruleset_survives("legacy");
}

/// Someone else's rule that jumps into portfwd's chain is theirs: it is never deleted, and a
/// removal that would need it gone fails and rolls back instead. A table portfwd created keeps
/// existing when another tool put something in it that iptables-save cannot show (an nft set).
#[test]
fn foreign_jumps_and_nft_objects_in_our_tables_are_left_alone() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    assert!(portfwd().apply(&t.proxy, &params).unwrap().changed());
    t.proxy
        .exec(&[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-i",
            "eth9",
            "-j",
            "PFWD-portfwd-FWD",
        ])
        .unwrap();
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!again.changed() && !again.failed(), "{}", again.stdout);
    let rules = ruleset(&t.proxy, "iptables-save").unwrap();
    assert!(
        rules.contains("-A FORWARD -i eth9 -j PFWD-portfwd-FWD"),
        "{rules}"
    );
    assert!(
        rules.contains("-A FORWARD -m comment --comment \"portfwd:jump\" -j PFWD-portfwd-FWD"),
        "{rules}"
    );

    let blocked = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert!(
        blocked.failed() && blocked.msg().contains("rolled back"),
        "{}",
        blocked.stdout
    );
    assert_eq!(
        ruleset(&t.proxy, "iptables-save").unwrap(),
        rules,
        "nothing changed"
    );

    t.proxy
        .exec(&[
            "iptables",
            "-D",
            "FORWARD",
            "-i",
            "eth9",
            "-j",
            "PFWD-portfwd-FWD",
        ])
        .unwrap();
    t.proxy
        .exec(&[
            "nft",
            "add",
            "set",
            "ip",
            "nat",
            "blocklist",
            "{ type ipv4_addr; }",
        ])
        .unwrap();
    let absent = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert!(absent.changed() && !absent.failed(), "{}", absent.stdout);
    let nat = t
        .proxy
        .stdout(&["nft", "list", "table", "ip", "nat"])
        .unwrap();
    assert!(
        nat.contains("set blocklist"),
        "the table with another tool's set stays: {nat}"
    );
    assert!(!ruleset(&t.proxy, "iptables-save").unwrap().contains("PFWD"));
}

/// Behind FORWARD policy DROP, another owner's DNAT to the same backend and port, whose own
/// accept is missing, is not let through by portfwd's chain (only flows a forward marked are),
/// while portfwd's own flow is, with its RELATED ICMP. A foreign rule using portfwd's conntrack
/// mark bit is warned about, and `conn_mark` moves portfwd to another bit.
fn only_marked_flows_are_accepted(flavour: &str) {
    let t = Topology::new().unwrap();
    let tool = format!("iptables-{flavour}");
    for rule in [
        &["-P", "FORWARD", "DROP"][..],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            "10.0.2.2:1234",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-j",
            "CONNMARK",
            "--restore-mark",
        ],
    ] {
        let mut argv = vec![tool.as_str()];
        argv.extend_from_slice(rule);
        assert!(t.proxy.exec(&argv).unwrap().status.success(), "{argv:?}");
    }
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])
        .unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = |mark: Option<&str>| {
        let mut p = json!({"backend": flavour, "forwards": [
            {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234", "snat": "none"}]});
        if let Some(m) = mark {
            p["conn_mark"] = json!(m);
        }
        p
    };
    let r = portfwd().apply(&t.proxy, &params(None)).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        r.json["warnings"].to_string().contains("conn_mark 0x2000"),
        "the foreign CONNMARK --restore-mark covers every bit: {}",
        r.stdout
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.1.2".parse::<std::net::IpAddr>().unwrap(),
        "{flavour}: portfwd's flow passes FORWARD DROP"
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:8080")).is_err(),
        "{flavour}: the other owner's DNATed flow is not accepted by portfwd's chain"
    );
    // Another bit: the flow still works, and show round-trips it.
    let r = portfwd().apply(&t.proxy, &params(Some("0x1000"))).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok());
    let shown = portfwd()
        .run(&t.proxy, &["show", "--backend", flavour], "", &[])
        .unwrap();
    assert_eq!(shown.json["conn_mark"], json!("0x1000"), "{}", shown.stdout);
}

#[test]
fn only_marked_flows_are_accepted_nft() {
    if prerequisites() {
        only_marked_flows_are_accepted("nft");
    }
}

#[test]
fn only_marked_flows_are_accepted_legacy() {
    if prerequisites() {
        only_marked_flows_are_accepted("legacy");
    }
}

/// Another nftables table whose forward chain ends in a reject (as firewalld's does) drops
/// what portfwd accepts in its own chain: the run says so, naming the chain and the forward,
/// and traffic indeed fails. Once that chain accepts DNATed flows, the warning goes and
/// traffic flows. iptables' own `filter FORWARD` with policy DROP (Docker) is not warned
/// about: portfwd's accept comes first there.
#[test]
fn a_drop_in_another_table_at_the_forward_hook_is_warned() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    t.proxy
        .exec(&["iptables", "-P", "FORWARD", "DROP"])
        .unwrap();
    crate::common::firewalld_like(&t.proxy);
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let warned = |r: &portfwd_harness::RunResult| {
        let mut found = crate::common::warnings(r);
        found.retain(|w| w.contains("nftables chain"));
        found
    };
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!first.failed(), "{}", first.stdout);
    let warnings = warned(&first);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("`inet fw filter_FORWARD`")
            && warnings[0].contains("forward \"web\"")
            && warnings[0].contains("ends in a drop or reject"),
        "{warnings:?}"
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "the warning is true: the other table drops the flow"
    );
    t.proxy
        .exec(&[
            "nft",
            "insert",
            "rule",
            "inet",
            "fw",
            "filter_FORWARD",
            "ct",
            "status",
            "dnat",
            "accept",
        ])
        .unwrap();
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!again.changed(), "{}", again.stdout);
    assert_eq!(warned(&again), Vec::<String>::new());
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );
}

/// iptables-legacy's FORWARD with policy DROP on a host portfwd manages through iptables-nft:
/// both filter every packet, so the accept in nf_tables does not help. The run says so; with
/// the legacy policy ACCEPT the warning goes and traffic flows.
#[test]
fn a_legacy_forward_drop_beside_nf_tables_is_warned() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    t.proxy
        .exec(&["iptables-legacy", "-P", "FORWARD", "DROP"])
        .unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let legacy_warning = |r: &portfwd_harness::RunResult| {
        crate::common::warnings(r)
            .iter()
            .any(|w| w.contains("iptables-legacy chain `iptables-legacy filter FORWARD`"))
    };
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!first.failed(), "{}", first.stdout);
    assert_eq!(
        first.json["backend"], "nf_tables",
        "a fresh host: the flavour the installed tools drive, before any table tells it"
    );
    assert!(legacy_warning(&first), "{}", first.stdout);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    t.proxy
        .exec(&["iptables-legacy", "-P", "FORWARD", "ACCEPT"])
        .unwrap();
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(again.json["backend"], "nf_tables", "{}", again.stdout);
    assert!(!legacy_warning(&again), "{}", again.stdout);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok());
}

/// The other-filter checks are best effort: with an `nft` that fails (an older nft, a
/// container that refuses netlink) the run still applies, and the forward works.
#[test]
fn a_failing_nft_does_not_fail_the_run() {
    if !prerequisites() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let shims = tempfile::tempdir().unwrap();
    let nft = shims.path().join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\necho 'Error: Operation not permitted' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        shims.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let r = portfwd()
        .run(
            &t.proxy,
            &["apply"],
            &params.to_string(),
            &[("PATH", &path)],
        )
        .unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );
}
