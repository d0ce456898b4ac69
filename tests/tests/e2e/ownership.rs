//! End-to-end: what is named for an instance is portfwd's whatever the record says. After the
//! record is lost (a wiped run dir, a reboot that restored a saved ruleset), `show` still
//! lists the instance's nftables forwards and `absent` with the default backend removes them;
//! an entry held by both backends at once is removed from both and named once.

use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

fn wipe_record(ns: &Netns) {
    let dir = portfwd().run_dir(ns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn show(ns: &Netns) -> Value {
    let r = portfwd().run(ns, &["show"], "", &[]).unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    r.json
}

fn nft_tables(ns: &Netns) -> String {
    ns.stdout(&["nft", "list", "tables"]).unwrap()
}

#[test]
fn objects_named_for_the_instance_are_found_without_the_record() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let web = json!({"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"});
    let works = || probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok();

    let r = portfwd()
        .apply(&t.proxy, &json!({"backend": "nftables", "forwards": [web]}))
        .unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    let saved = t
        .proxy
        .stdout(&["nft", "list", "table", "inet", "portfwd-portfwd"])
        .unwrap();
    wipe_record(&t.proxy);
    let shown = show(&t.proxy);
    assert_eq!(shown["backend"], "nftables", "{shown}");
    assert_eq!(shown["forwards"][0]["name"], "web", "{shown}");
    // `absent` names no backend (the default, iptables): the nftables table goes too.
    let gone = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert!(gone.changed() && !gone.failed(), "{}", gone.stdout);
    assert_eq!(gone.json["forwards"]["removed"], json!(["web"]));
    assert!(!nft_tables(&t.proxy).contains("portfwd-portfwd"));
    assert!(!works(), "nothing forwards after absent");

    // Held by both backends at once: iptables by a run, nftables by a restored ruleset.
    let r = portfwd()
        .apply(&t.proxy, &json!({"forwards": [web]}))
        .unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    t.proxy
        .exec_with_input(&["nft", "-f", "-"], &saved)
        .unwrap();
    wipe_record(&t.proxy);
    let shown = show(&t.proxy);
    assert_eq!(
        shown["forwards"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    let gone = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert!(gone.changed() && !gone.failed(), "{}", gone.stdout);
    assert_eq!(
        gone.json["forwards"]["removed"],
        json!(["web"]),
        "named once: {}",
        gone.stdout
    );
    assert!(!nft_tables(&t.proxy).contains("portfwd-portfwd"));
    let save = t.proxy.stdout(&["iptables-save"]).unwrap();
    assert!(!save.contains("PFWD-portfwd"), "{save}");
    assert!(!works(), "nothing forwards after absent");
}

/// Every iptables rule of the instance, in both flavours, as `iptables-save` shows them.
fn instance_rules(ns: &Netns) -> (String, String) {
    let ours = |tool: &str| {
        ns.stdout(&[tool])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("PFWD-portfwd"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    (ours("iptables-nft-save"), ours("iptables-legacy-save"))
}

/// The record names the iptables flavour that holds the instance: a move from any backend or
/// flavour to any other removes the old objects in the same run (the entry is `updated`, not
/// `added`), traffic flows through the new ones, and `absent` leaves nothing anywhere. Without
/// the record, `absent` with the default backend removes the instance from both flavours and
/// nftables.
#[test]
fn moves_between_iptables_flavours_and_nftables_leave_nothing_behind() {
    if !prerequisites() || crate::common::which("iptables-legacy-save").is_none() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let web = json!({"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"});
    let works = || probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok();
    let apply = |backend: &str| {
        let r = portfwd()
            .apply(&t.proxy, &json!({"backend": backend, "forwards": [web]}))
            .unwrap();
        assert!(!r.failed(), "{backend}: {}", r.stdout);
        r
    };

    let r = apply("iptables-legacy");
    assert_eq!(r.json["forwards"]["added"], json!(["web"]), "{}", r.stdout);
    let (nft, legacy) = instance_rules(&t.proxy);
    assert!(nft.is_empty() && !legacy.is_empty(), "{nft}\n{legacy}");
    assert!(works());

    for (to, holds) in [
        ("nftables", "nftables"),
        ("iptables-nft", "iptables-nft"),
        ("iptables-legacy", "iptables-legacy"),
        ("iptables", "iptables-nft"),
    ] {
        let r = apply(to);
        assert_eq!(
            r.json["forwards"]["updated"],
            json!(["web"]),
            "moved to {to}: {}",
            r.stdout
        );
        assert_eq!(r.json["forwards"]["added"], json!([]), "{}", r.stdout);
        let (nft, legacy) = instance_rules(&t.proxy);
        let table = nft_tables(&t.proxy).contains("portfwd-portfwd");
        assert_eq!(
            (!nft.is_empty(), !legacy.is_empty(), table),
            (
                holds == "iptables-nft",
                holds == "iptables-legacy",
                holds == "nftables"
            ),
            "only {holds} holds it after the move to {to}:\n{nft}\n{legacy}"
        );
        assert!(works(), "forwarding after the move to {to}");
        let again = apply(to);
        assert_eq!(again.json["changed"], json!(false), "{}", again.stdout);
    }
    let gone = portfwd()
        .apply(&t.proxy, &json!({"backend": "nftables", "state": "absent"}))
        .unwrap();
    assert_eq!(
        gone.json["forwards"]["removed"],
        json!(["web"]),
        "{}",
        gone.stdout
    );
    assert_eq!(instance_rules(&t.proxy), (String::new(), String::new()));
    assert!(!works());

    // Held by all three at once (saved rulesets restored at boot), the record lost: `absent`
    // with the default backend.
    apply("iptables-legacy");
    let legacy_saved = t.proxy.stdout(&["iptables-legacy-save"]).unwrap();
    apply("nftables");
    let nft_saved = t
        .proxy
        .stdout(&["nft", "list", "table", "inet", "portfwd-portfwd"])
        .unwrap();
    apply("iptables-nft");
    t.proxy
        .exec_with_input(&["iptables-legacy-restore"], &legacy_saved)
        .unwrap();
    t.proxy
        .exec_with_input(&["nft", "-f", "-"], &nft_saved)
        .unwrap();
    wipe_record(&t.proxy);
    let (nft, legacy) = instance_rules(&t.proxy);
    assert!(
        !nft.is_empty() && !legacy.is_empty() && nft_tables(&t.proxy).contains("portfwd-portfwd")
    );
    let shown = show(&t.proxy);
    assert_eq!(
        shown["forwards"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    let gone = portfwd()
        .apply(&t.proxy, &json!({"state": "absent"}))
        .unwrap();
    assert_eq!(
        gone.json["forwards"]["removed"],
        json!(["web"]),
        "named once: {}",
        gone.stdout
    );
    assert_eq!(instance_rules(&t.proxy), (String::new(), String::new()));
    assert!(!nft_tables(&t.proxy).contains("portfwd-portfwd"));
    assert!(!works(), "nothing forwards after absent");
}

/// Policy routing without the record: a rule and route carrying the instance's protocol that
/// the params ask for exactly, and that no other instance here recorded, are taken back (so a
/// later `absent` removes them); what the params do not ask for is named and left, since other
/// software may use the number (`routing::instances_sharing_a_protocol_number_never_touch_each_other`
/// and `defects::objects_that_existed_are_never_claimed` keep those safe).
#[test]
fn policy_routes_of_the_instance_are_taken_back_without_the_record() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let params = json!({"route_protocol": 213, "policy_routes": [{"from": "10.0.2.2", "table": 100,
        "routes": [{"to": "default", "via": "10.0.2.2", "dev": "eth1"}]}]});
    let rules = |ns: &Netns| {
        ns.stdout(&["ip", "rule", "show"])
            .unwrap()
            .lines()
            .filter(|l| l.contains("10.0.2.2"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let routes = |ns: &Netns| {
        ns.stdout(&["ip", "route", "show", "table", "100", "proto", "213"])
            .unwrap()
    };
    let r = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    wipe_record(&t.proxy);
    let again = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(!again.changed() && !again.failed(), "{}", again.stdout);
    let warned = crate::common::warnings(&again).join("\n");
    assert!(
        warned.contains("taken back as this instance's own"),
        "{warned}"
    );
    let gone = portfwd()
        .apply(&t.proxy, &json!({"route_protocol": 213, "state": "absent"}))
        .unwrap();
    assert!(gone.changed() && !gone.failed(), "{}", gone.stdout);
    assert_eq!(rules(&t.proxy), "", "absent removed the rule it took back");
    assert_eq!(routes(&t.proxy).trim(), "");

    // Lost with the params stored (`persist: true`): they declare the rule, so `absent`
    // takes it back and removes it.
    let mut stored = params.clone();
    stored["persist"] = json!(true);
    portfwd().apply(&t.proxy, &stored).unwrap();
    wipe_record(&t.proxy);
    let shown = portfwd()
        .run(&t.proxy, &["show", "--route-protocol", "213"], "", &[])
        .unwrap()
        .json;
    assert_eq!(
        shown["policy_routes"][0]["from"], "10.0.2.2/32",
        "show finds it: {shown}"
    );
    let gone = portfwd()
        .apply(&t.proxy, &json!({"route_protocol": 213, "state": "absent"}))
        .unwrap();
    assert!(gone.changed() && !gone.failed(), "{}", gone.stdout);
    let warned = crate::common::warnings(&gone).join("\n");
    assert!(warned.contains("its params declare it"), "{warned}");
    assert_eq!(rules(&t.proxy), "", "the stored params declared it");
    assert_eq!(routes(&t.proxy).trim(), "");

    // Lost again, and nothing asks for them: named, left.
    portfwd().apply(&t.proxy, &params).unwrap();
    wipe_record(&t.proxy);
    let left = portfwd()
        .apply(&t.proxy, &json!({"route_protocol": 213, "state": "absent"}))
        .unwrap();
    assert!(!left.failed(), "{}", left.stdout);
    let warned = crate::common::warnings(&left).join("\n");
    assert!(
        warned.contains(
            "from 10.0.2.2/32 table 100 carries this instance's protocol 213, but no record says"
        ),
        "{warned}"
    );
    assert!(rules(&t.proxy).contains("10.0.2.2"), "left as it was");
}
