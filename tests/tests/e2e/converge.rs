//! End-to-end regression tests for the defects the convergence review found: each creates the
//! condition in namespaces, with real traffic where the defect is about traffic, and fails
//! without its fix.

use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

const BACKENDS: [&str; 3] = ["iptables-nft", "iptables-legacy", "nftables"];

/// The firewall and routing state other software sees (counters left out, and a link's
/// operational state: a veth reports UNKNOWN until its carrier is seen, which a slow VM sees
/// late).
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
        let text = ns.stdout(&[&["ip"][..], args].concat()).unwrap();
        out += &text
            .replace(" state UNKNOWN ", " state ")
            .replace(" state UP ", " state ");
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

/// What only the kernel refuses (a gateway no interface reaches) fails the run, rolls back,
/// and names the params field and value before iproute2's own text.
#[test]
fn a_route_the_kernel_refuses_names_its_field_and_rolls_back() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}],
        "addresses": [{"address": "10.0.1.9/24", "dev": "eth0"}],
        "policy_routes": [{"from": "10.0.2.2", "table": 100,
                           "routes": [{"to": "10.9.0.0/16", "via": "10.0.1.2"},
                                      {"to": "default", "via": "192.0.2.1"}]}]});
    let before = host_state(&t.proxy);
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(r.code, 1, "{}", r.stdout);
    let msg = r.json["msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("policy_routes[0].routes[1].via: \"192.0.2.1\" is not reachable"),
        "{msg}"
    );
    assert!(
        msg.contains("Nexthop has invalid gateway") && msg.contains("rolled back"),
        "iproute2's text and the rollback are kept: {msg}"
    );
    assert_eq!(host_state(&t.proxy), before, "rolled back");
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

/// Runs a shell command in `ns` (a neighbour's rule), failing the test if it fails.
fn sh(ns: &Netns, command: &str) {
    let out = ns.exec(&["sh", "-c", command]).unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hook_drops(ns: &Netns, params: &Value) -> Vec<Value> {
    findings(ns, params)
        .into_iter()
        .filter(|f| f["id"] == "forward_hook_drop")
        .collect()
}

/// With the nftables backend, iptables-nft's FORWARD is another filter: RHEL's final
/// `-j REJECT` (an `xt` target to nft), a plain `-j DROP` (nft lists it as `counter drop`) and
/// a policy DROP are found and reported by the run and by doctor (a connmark accept's mask is
/// read with iptables-nft-save); the fix the finding gives
/// (one connmark accept) makes traffic flow, for DNAT forwards and for masquerade entries alike
/// (their flows are marked too); an accept of another bit is no fix. iptables-nft's DNAT on the
/// port in nat PREROUTING is reported as taking the connections first.
#[test]
fn iptables_nft_neighbours_are_seen_by_the_nftables_backend() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    t.client_default_route().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"backend": "nftables",
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}],
        "masquerade": [{"name": "lan", "source": "10.0.1.0/24", "out_interface": "eth1"}]});
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    let forwarded = || probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok();
    let masqueraded = || probe(&t.client, Proto::Tcp, sa("10.0.2.2:1234")).is_ok();
    assert!(
        forwarded() && masqueraded(),
        "both work before any neighbour"
    );

    for (what, rule) in [
        (
            "RHEL's reject",
            "iptables-nft -A FORWARD -j REJECT --reject-with icmp-host-prohibited",
        ),
        ("a plain drop", "iptables-nft -A FORWARD -j DROP"),
        ("policy drop", "iptables-nft -P FORWARD DROP"),
    ] {
        sh(&t.proxy, rule);
        assert!(!forwarded() && !masqueraded(), "{what} drops both");
        let r = portfwd().apply(&t.proxy, &params).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        let warned = crate::common::warnings(&r).join("\n");
        assert!(
            warned.contains("iptables filter FORWARD")
                && warned.contains("forward \"web\"")
                && warned.contains("masquerade \"lan\""),
            "{what}: the run warns: {warned}"
        );
        let drops = hook_drops(&t.proxy, &params);
        assert_eq!(drops.len(), 1, "{what}: {drops:?}");
        let fix = drops[0]["fix"].as_str().unwrap().to_string();
        assert!(
            fix.starts_with("iptables -I FORWARD -m connmark --mark 0x2000/0x2000 -j ACCEPT"),
            "{what}: {fix}"
        );

        // Another bit is no fix.
        sh(
            &t.proxy,
            "iptables-nft -I FORWARD -m connmark --mark 0x1/0x1 -j ACCEPT",
        );
        assert_eq!(
            hook_drops(&t.proxy, &params).len(),
            1,
            "{what}: mask 0x1 is not the fix"
        );
        assert!(!forwarded());

        // The fix as given.
        let command = fix.split(" (").next().unwrap();
        sh(&t.proxy, command);
        assert!(forwarded() && masqueraded(), "{what}: the given fix works");
        assert!(
            hook_drops(&t.proxy, &params).is_empty(),
            "{what}: doctor is content"
        );
        sh(
            &t.proxy,
            "iptables-nft -F FORWARD && iptables-nft -P FORWARD ACCEPT",
        );
    }

    // A masquerade entry without allow_forward is not marked: the accept does not cover it.
    sh(&t.proxy, "iptables-nft -P FORWARD DROP && iptables-nft -A FORWARD -m connmark --mark 0x2000/0x2000 -j ACCEPT");
    let mut unmarked = params.clone();
    unmarked["masquerade"][0]["allow_forward"] = json!(false);
    let r = portfwd().apply(&t.proxy, &unmarked).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(forwarded() && !masqueraded());
    let drops = hook_drops(&t.proxy, &unmarked);
    assert!(
        drops.len() == 1
            && drops[0]["entry"] == "masquerade.lan"
            && drops[0]["fix"]
                .as_str()
                .unwrap()
                .starts_with("set allow_forward: true on masquerade \"lan\""),
        "{drops:?}"
    );
    sh(
        &t.proxy,
        "iptables-nft -F FORWARD && iptables-nft -P FORWARD ACCEPT",
    );
    portfwd().apply(&t.proxy, &params).unwrap();

    sh(&t.proxy, "iptables-nft -t nat -A PREROUTING -p tcp -m tcp --dport 4321 -j DNAT --to-destination 10.0.2.2:9");
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    let warned = crate::common::warnings(&r).join("\n");
    assert!(
        warned.contains("forward \"web\": another owner's NAT rule")
            && warned.contains("iptables nat PREROUTING: -p tcp -m tcp --dport 4321 -j DNAT --to-destination 10.0.2.2:9"),
        "iptables-nft's DNAT is named in iptables' spelling: {warned}"
    );
    assert!(
        findings(&t.proxy, &params)
            .iter()
            .any(|f| f["id"] == "foreign_nat_first"),
        "doctor names it"
    );
    // In a chain PREROUTING jumps to, as Docker's DOCKER chain is.
    sh(&t.proxy, "iptables-nft -t nat -F PREROUTING && iptables-nft -t nat -N LIKE-DOCKER && iptables-nft -t nat -A PREROUTING -j LIKE-DOCKER && iptables-nft -t nat -A LIKE-DOCKER -p tcp -m tcp --dport 4321 -j DNAT --to-destination 10.0.2.2:9");
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    let warned = crate::common::warnings(&r).join("\n");
    assert!(
        warned.contains("iptables nat LIKE-DOCKER: -p tcp -m tcp --dport 4321"),
        "a DNAT in a chain reached by a jump is named: {warned}"
    );
}

/// iptables-legacy's FORWARD with policy DROP beside the nftables backend: an accept of
/// another connmark bit is not taken for the fix (it used to be, whatever its mask).
#[test]
fn a_connmark_accept_of_another_bit_is_no_fix() {
    if !prerequisites() || crate::common::which("iptables-legacy").is_none() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"backend": "nftables",
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    assert_eq!(portfwd().apply(&t.proxy, &params).unwrap().code, 0);
    sh(&t.proxy, "iptables-legacy -P FORWARD DROP && iptables-legacy -A FORWARD -m connmark --mark 0x4000/0x4000 -j ACCEPT");
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let drops = hook_drops(&t.proxy, &params);
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert!(drops[0]["msg"]
        .as_str()
        .unwrap()
        .contains("iptables-legacy filter FORWARD"));
    sh(
        &t.proxy,
        "iptables-legacy -I FORWARD -m connmark --mark 0x2000/0x2000 -j ACCEPT",
    );
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    assert!(hook_drops(&t.proxy, &params).is_empty());
}

/// `show` (nftables) reads a forward whose chain has another rule first (an admin's `log`),
/// and a masquerade entry's `allow_forward: false`; applying show's output keeps every forward
/// installed and working (it used to drop the forward, so applying it deleted the forward).
#[test]
fn show_reads_a_forward_behind_someone_elses_rule() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let params = json!({"backend": "nftables",
        // Its sources give web chains of its own.
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234", "sources": ["10.0.1.0/24"]},
                     {"name": "api", "listen_port": 4322, "to": "10.0.2.2:1234", "snat": "none"}],
        "masquerade": [{"name": "lan", "source": "10.0.1.0/24", "allow_forward": false}]});
    assert_eq!(portfwd().apply(&t.proxy, &params).unwrap().code, 0);
    crate::common::nft(
        &t.proxy,
        &[
            "insert rule inet portfwd-portfwd pre-web log prefix \"seen \"",
            "insert rule inet portfwd-portfwd post-web counter",
        ],
    );
    let shown = portfwd()
        .run(&t.proxy, &["show", "--backend", "nftables"], "", &[])
        .unwrap();
    assert_eq!(shown.code, 0, "{}", shown.stdout);
    let names: Vec<&str> = shown.json["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["api", "web"], "{}", shown.stdout);
    let web = &shown.json["forwards"][1];
    assert!(
        web.get("snat").is_none(),
        "web masquerades (the default): {web}"
    );
    assert_eq!(shown.json["masquerade"][0]["allow_forward"], json!(false));
    let r = portfwd().apply(&t.proxy, &shown.json).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.json["forwards"]["removed"], json!([]), "{}", r.stdout);
    assert_eq!(r.json["masquerade"]["updated"], json!([]), "{}", r.stdout);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    let again = portfwd().apply(&t.proxy, &shown.json).unwrap();
    assert_eq!(again.json["changed"], json!(false), "{}", again.stdout);
}

/// nftables: adjacent `sources` (nft merges them in its set) and route_localnet guards in any
/// params order read back as written: the second run changes nothing, and applying `show`'s
/// output changes nothing (both used to rewrite rules on every run).
#[test]
fn nftables_sources_and_guards_read_back_as_written() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _local = Server::start(&t.proxy, Proto::Tcp, sa("127.0.0.1:2323")).unwrap();
    let params = json!({"backend": "nftables", "forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234",
         "sources": ["10.0.1.128/25", "10.0.1.0/25", "192.0.2.0/24", "192.0.2.7"]},
        {"name": "z-ssh", "listen_port": 4323, "to": "127.0.0.1:2323", "in_interface": "eth0"},
        {"name": "a-ssh", "listen_port": 4324, "to": "127.0.0.1:2323", "in_interface": "eth1"}]});
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4323")).unwrap();
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert_eq!(again.json["changed"], json!(false), "{}", again.stdout);
    let shown = portfwd()
        .run(&t.proxy, &["show", "--backend", "nftables"], "", &[])
        .unwrap();
    assert_eq!(
        shown.json["forwards"][1]["sources"],
        json!(["10.0.1.0/24", "192.0.2.0/24"]),
        "{}",
        shown.stdout
    );
    let from_show = portfwd().apply(&t.proxy, &shown.json).unwrap();
    assert_eq!(
        from_show.json["changed"],
        json!(false),
        "{}",
        from_show.stdout
    );
}

/// Where the proxy's conntrack entry of the UDP flow from `sport` sends replies (the client,
/// or the address masquerade put in its place).
fn reply_dst(ns: &Netns, sport: u16) -> Option<String> {
    let out = ns
        .stdout(&["conntrack", "-L", "-p", "udp"])
        .unwrap_or_default();
    let line = out
        .lines()
        .find(|l| l.contains(&format!("sport={sport} ")))?;
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix("dst="))
        .nth(1)
        .map(str::to_string)
}

/// A live UDP flow follows a change of `snat` as it follows a change of `to`: masqueraded
/// before, it reaches the backend with the client's own address right after `snat: none`
/// (its conntrack entry is reset), and masqueraded again after the change back. On every
/// backend; the backend routes its replies through the proxy.
#[test]
fn udp_flows_follow_a_change_of_snat() {
    if !prerequisites() || crate::common::which("conntrack").is_none() {
        return;
    }
    let t = Topology::new().unwrap();
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])
        .unwrap();
    let _server = Server::start(&t.backend, Proto::Udp, sa("0.0.0.0:1234")).unwrap();
    for (i, backend) in BACKENDS.into_iter().enumerate() {
        let sport = 40100 + i as u16;
        let params = |snat: &str| {
            json!({"backend": backend, "forwards": [{"name": "game", "proto": "udp",
                "listen_port": 5353, "to": "10.0.2.2:1234", "snat": snat}]})
        };
        let r = portfwd().apply(&t.proxy, &params("masquerade")).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        let flow = portfwd_harness::UdpFlow::open(
            &t.client,
            sa(&format!("10.0.1.2:{sport}")),
            sa("10.0.1.1:5353"),
        )
        .unwrap();
        assert!(flow.ask().unwrap().is_some(), "{backend}: the flow works");
        assert_eq!(
            reply_dst(&t.proxy, sport).as_deref(),
            Some("10.0.2.1"),
            "{backend}"
        );

        let r = portfwd().apply(&t.proxy, &params("none")).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        assert!(
            r.json["msg"].as_str().unwrap().contains("1 udp flow reset"),
            "{backend}: {}",
            r.stdout
        );
        assert!(
            flow.ask().unwrap().is_some(),
            "{backend}: the flow still works"
        );
        assert_eq!(
            reply_dst(&t.proxy, sport).as_deref(),
            Some("10.0.1.2"),
            "{backend}: the backend now sees the client"
        );

        let r = portfwd().apply(&t.proxy, &params("masquerade")).unwrap();
        assert!(
            r.json["msg"].as_str().unwrap().contains("1 udp flow reset"),
            "{}",
            r.stdout
        );
        assert!(flow.ask().unwrap().is_some());
        assert_eq!(
            reply_dst(&t.proxy, sport).as_deref(),
            Some("10.0.2.1"),
            "{backend}"
        );
        let r = portfwd()
            .apply(&t.proxy, &json!({"backend": backend, "state": "absent"}))
            .unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
    }
}

/// `local: true` on a loopback `listen_address` with another host as the target is refused,
/// naming the field and why, and nothing is applied (it used to be installed and time out
/// silently: a packet from 127.0.0.1 or ::1 may not leave the host); a loopback target is fine.
#[test]
fn loopback_listen_addresses_are_not_forwarded_off_the_host() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _local = Server::start(&t.proxy, Proto::Tcp, sa("127.0.0.1:2323")).unwrap();
    for backend in BACKENDS {
        for (listen, to, why) in [
            ("127.0.0.1", "10.0.2.2:1234", "may not leave this host"),
            (
                "::1",
                "[fd00:2::2]:1234",
                "never routes a packet from ::1 off this host",
            ),
        ] {
            let before = host_state(&t.proxy);
            let params = json!({"backend": backend, "forwards": [{"name": "web",
                "listen_port": 4321, "listen_address": listen, "local": true, "to": to}]});
            let r = portfwd().apply(&t.proxy, &params).unwrap();
            assert_ne!(r.code, 0, "{backend} {listen}: {}", r.stdout);
            let msg = r.json["msg"].as_str().unwrap_or_default();
            assert!(
                msg.contains("forwards[0].listen_address") && msg.contains(why),
                "{backend} {listen}: {msg}"
            );
            assert_eq!(host_state(&t.proxy), before, "{backend}: nothing applied");
        }
        let params = json!({"backend": backend, "forwards": [{"name": "ssh",
            "listen_port": 4321, "listen_address": "127.0.0.1", "local": true, "to": "127.0.0.1:2323"}]});
        let r = portfwd().apply(&t.proxy, &params).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        probe(&t.proxy, Proto::Tcp, sa("127.0.0.1:4321")).unwrap();
        portfwd()
            .apply(&t.proxy, &json!({"backend": backend, "state": "absent"}))
            .unwrap();
    }
}

/// Two forwards on overlapping ports of one listen key are refused on every backend, naming
/// both (the iptables backends used to install both; the second never got a connection), and
/// an IPv6 target written without brackets that may hold a port is refused with the spelling
/// to use; nothing is applied.
#[test]
fn ambiguous_forwards_are_refused_before_anything_changes() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    for backend in BACKENDS {
        for (forwards, needle) in [
            (
                json!([{"name": "wide", "listen_port": "8000-8100", "to": "10.0.2.2:1234"},
                       {"name": "one", "listen_port": 8080, "to": "10.0.2.2:1235"}]),
                "forwards[1].listen_port: \"8080\" overlaps forward \"wide\"",
            ),
            (
                json!([{"name": "v6", "listen_port": 8080, "to": "fd10:2::2:1234"}]),
                "write \"[fd10:2::2]:1234\"",
            ),
        ] {
            let before = host_state(&t.proxy);
            let params = json!({"backend": backend, "forwards": forwards});
            let r = portfwd().apply(&t.proxy, &params).unwrap();
            assert_ne!(r.code, 0, "{backend}: {}", r.stdout);
            let msg = r.json["msg"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{backend}: {msg}");
            assert_eq!(host_state(&t.proxy), before, "{backend}: nothing applied");
        }
    }
}

/// Without CAP_NET_ADMIN (not root, no `become: true`), every command that reads or changes the
/// host says so and what to do, instead of the first tool's failure (`/run/portfwd.lock:
/// Permission denied`), and changes nothing.
#[test]
fn without_root_the_message_says_what_to_do() {
    if !prerequisites() || crate::common::which("setpriv").is_none() {
        return;
    }
    let t = Topology::new().unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    // A copy nobody can reach (the checkout may sit under a directory only root enters).
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("portfwd");
    std::fs::copy(&portfwd().bin, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let unprivileged = portfwd_harness::Portfwd::at(&bin).unwrap();
    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let before = host_state(&t.proxy);
    for args in [
        &["apply"][..],
        &["apply", "--check"],
        &["plan"],
        &["show"],
        &["doctor", "--json"],
    ] {
        let r = unprivileged
            .run_under(&t.proxy, &nobody, args, &params.to_string(), &[])
            .unwrap();
        assert_ne!(r.code, 0, "{args:?}: {}{}", r.stdout, r.stderr);
        let msg = r.json["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("portfwd needs root (CAP_NET_ADMIN)") && msg.contains("become: true"),
            "{args:?}: {}",
            r.stdout
        );
    }
    assert_eq!(host_state(&t.proxy), before);
}

/// A masquerade entry with `allow_forward: false` behind iptables' FORWARD policy DROP can
/// never pass: apply warns and doctor reports `forward_hook_drop` for it (both said nothing
/// while traffic timed out); with `allow_forward: true` it passes and nothing is reported.
#[test]
fn a_masquerade_behind_a_dropping_forward_without_allow_forward_is_reported() {
    if !prerequisites() {
        return;
    }
    for backend in ["iptables-nft", "iptables-legacy"] {
        let t = Topology::new().unwrap();
        t.client_default_route().unwrap();
        let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
        let tool = backend;
        sh(&t.proxy, &format!("{tool} -P FORWARD DROP"));
        let params = |allow: bool| {
            json!({"backend": backend, "masquerade": [{"name": "lan", "source": "10.0.1.0/24",
                   "out_interface": "eth1", "allow_forward": allow}]})
        };
        let r = portfwd().apply(&t.proxy, &params(false)).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        assert!(
            probe(&t.client, Proto::Tcp, sa("10.0.2.2:1234")).is_err(),
            "{backend}: dropped"
        );
        let warned = crate::common::warnings(&r).join("\n");
        assert!(
            warned.contains("masquerade \"lan\": allow_forward is false"),
            "{backend}: {warned}"
        );
        let drops = hook_drops(&t.proxy, &params(false));
        assert!(
            drops
                .iter()
                .any(|f| f["entry"] == "masquerade.lan" && f["severity"] == "error"),
            "{backend}: {drops:?}"
        );
        let r = portfwd().apply(&t.proxy, &params(true)).unwrap();
        assert_eq!(r.code, 0, "{}", r.stdout);
        probe(&t.client, Proto::Tcp, sa("10.0.2.2:1234")).unwrap();
        assert!(hook_drops(&t.proxy, &params(true)).is_empty(), "{backend}");
    }
}
