//! End-to-end regression tests for the defects the convergence review found: each creates the
//! condition in namespaces, with real traffic where the defect is about traffic, and fails
//! without its fix.

use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

const BACKENDS: [&str; 3] = ["iptables-nft", "iptables-legacy", "nftables"];

/// The firewall and routing state other software sees (counters left out).
fn host_state(ns: &Netns) -> String {
    let mut out = String::new();
    for tool in ["iptables-save", "iptables-legacy-save", "ip6tables-save"] {
        let text = ns.stdout(&[tool]).unwrap_or_default();
        out += &portfwd_harness::topology::normalise_ruleset(&text);
    }
    out += &ns.stdout(&["nft", "-s", "list", "ruleset"]).unwrap();
    for args in [
        &["addr", "show"][..],
        &["rule", "show"],
        &["route", "show", "table", "all"],
    ] {
        out += &ns.stdout(&[&["ip"][..], args].concat()).unwrap();
    }
    out
}

fn findings(ns: &Netns, params: &Value) -> Vec<Value> {
    let doctor = portfwd()
        .run(ns, &["doctor", "--json"], &params.to_string(), &[])
        .unwrap();
    doctor.json["findings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// An address or a route on an interface the host lacks is refused by check mode, `plan` and
/// apply alike, naming the field, before anything changes; a forward's `in_interface` or a
/// masquerade's `out_interface` that does not exist (yet) is a warning and a doctor finding.
#[test]
fn interfaces_that_do_not_exist_are_named_before_anything_changes() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    for backend in BACKENDS {
        let refused = [
            (
                json!({"backend": backend,
                       "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}],
                       "addresses": [{"address": "10.0.1.9/24", "dev": "eth9"}]}),
                "addresses[0].dev: no interface \"eth9\"",
            ),
            (
                json!({"backend": backend,
                       "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}],
                       "policy_routes": [{"from": "10.0.2.2", "table": 100,
                                          "routes": [{"to": "default", "via": "10.0.1.2"},
                                                     {"to": "10.9.0.0/16", "dev": "eth7"}]}]}),
                "policy_routes[0].routes[1].dev: no interface \"eth7\"",
            ),
        ];
        for (params, needle) in refused {
            let before = host_state(&t.proxy);
            for args in [&["apply", "--check"][..], &["plan"], &["apply"]] {
                let r = portfwd()
                    .run(&t.proxy, args, &params.to_string(), &[])
                    .unwrap();
                assert_ne!(r.code, 0, "{backend} {args:?}: {}", r.stdout);
                let msg = r.json["msg"].as_str().unwrap_or_default();
                assert!(
                    msg.contains(needle) && msg.contains("nothing applied"),
                    "{backend} {args:?} names the field: {}",
                    r.stdout
                );
                assert_eq!(
                    host_state(&t.proxy),
                    before,
                    "{backend} {args:?} changed the host"
                );
            }
            let missing: Vec<Value> = findings(&t.proxy, &params)
                .into_iter()
                .filter(|f| f["id"] == "interface_missing")
                .collect();
            assert!(
                missing.iter().any(|f| f["severity"] == "error"),
                "{backend}: doctor reports it: {missing:?}"
            );
        }

        let params = json!({"backend": backend,
            "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
                         {"name": "later", "listen_port": 4322, "to": "10.0.2.2:1234", "in_interface": "wg0"}],
            "masquerade": [{"name": "lan", "source": "10.0.1.0/24", "out_interface": "ppp0"}]});
        let r = portfwd().apply(&t.proxy, &params).unwrap();
        assert_eq!(r.code, 0, "{backend}: {}", r.stdout);
        let warnings = r.json["warnings"].to_string();
        assert!(
            warnings.contains("forward \\\"later\\\" in_interface: no interface \\\"wg0\\\"")
                && warnings
                    .contains("masquerade \\\"lan\\\" out_interface: no interface \\\"ppp0\\\""),
            "{backend}: warned: {warnings}"
        );
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
        let missing: Vec<Value> = findings(&t.proxy, &params)
            .into_iter()
            .filter(|f| f["id"] == "interface_missing")
            .collect();
        assert_eq!(missing.len(), 2, "{backend}: {missing:?}");
        assert!(
            missing.iter().all(|f| f["severity"] == "warning"),
            "{missing:?}"
        );
        let r = portfwd()
            .apply(&t.proxy, &json!({"backend": backend, "state": "absent"}))
            .unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
    }
}

/// With `/proc/sys` read-only (a container), a run that must set `ip_forward` fails, puts back
/// the rules it wrote before, and says it rolled back: the sysctl that could not be written
/// changed nothing, so there is nothing to put back there (it used to say `rollback ALSO
/// failed`).
#[test]
fn a_sysctl_that_cannot_be_written_rolls_back_cleanly() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let read_only = [
        "unshare",
        "-m",
        "sh",
        "-c",
        "mount --bind /proc/sys /proc/sys && mount -o remount,ro,bind /proc/sys && exec \"$@\"",
        "sh",
    ];
    for backend in BACKENDS {
        t.proxy
            .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])
            .unwrap();
        // A legacy table, once used in a namespace, stays (empty): have them before.
        for table in ["nat", "filter"] {
            t.proxy
                .exec(&["iptables-legacy", "-t", table, "-S"])
                .unwrap();
        }
        let before = host_state(&t.proxy);
        let params = json!({"backend": backend,
            "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
        let r = portfwd()
            .run_under(&t.proxy, &read_only, &["apply"], &params.to_string(), &[])
            .unwrap();
        assert_ne!(r.code, 0, "{backend}: {}", r.stdout);
        let msg = r.json["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("net.ipv4.ip_forward")
                && msg.contains("rolled back every change of this run")
                && !msg.contains("ALSO"),
            "{backend}: {msg}"
        );
        assert_eq!(
            host_state(&t.proxy),
            before,
            "{backend}: the host is as before"
        );
    }
}
