//! End-to-end: the operator's command line around apply: `portfwd list`, `show` of an
//! instance that does not exist, apply on a terminal, `restore`'s counts.

use crate::common::{nft, portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Proto, Server};
use serde_json::{json, Value};

/// `list --json`'s instances by name.
fn listed(t: &Topology) -> std::collections::BTreeMap<String, Value> {
    let r = portfwd()
        .run(&t.proxy, &["list", "--json"], "", &[])
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    r.json["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no instances in {}", r.stdout))
        .iter()
        .map(|i| {
            (
                i["instance"].as_str().unwrap_or_default().to_string(),
                i.clone(),
            )
        })
        .collect()
}

/// Every instance, whichever backend holds it and whether its record survived, with its
/// counts; `converged` follows the host: false as soon as traffic is broken by a hand edit.
#[test]
fn list_shows_every_instance_and_whether_it_is_converged() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let empty = portfwd().run(&t.proxy, &["list"], "", &[]).unwrap();
    assert_eq!(
        (empty.code, empty.stdout.trim()),
        (0, "no portfwd instance on this host")
    );
    let web = json!({"instance": "web", "backend": "nftables", "persist": true,
        "forwards": [{"name": "a", "listen_port": 4321, "to": "10.0.2.2:1234"},
                     {"name": "b", "listen_port": 4322, "to": "10.0.2.2:1234", "proto": "udp"}]});
    let gw = json!({"instance": "gw-1",
        "forwards": [{"name": "c", "listen_port": 4323, "to": "10.0.2.2:1234"}],
        "masquerade": [{"name": "lan", "source": "10.0.1.0/24"}]});
    for params in [&web, &gw] {
        let r = portfwd().apply(&t.proxy, params).unwrap();
        assert!(r.changed() && !r.failed(), "{}", r.stdout);
    }
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    let all = listed(&t);
    assert_eq!(all.keys().collect::<Vec<_>>(), ["gw-1", "web"], "{all:?}");
    let w = &all["web"];
    assert_eq!(
        (
            &w["backend"],
            &w["forwards"],
            &w["masquerade"],
            &w["persist"]
        ),
        (&json!("nftables"), &json!(2), &json!(0), &json!(true)),
        "{w}"
    );
    assert_eq!(
        (&w["converged"], &w["compared_with"]),
        (&json!(true), &json!("stored params")),
        "{w}"
    );
    let g = &all["gw-1"];
    assert_eq!(
        (
            &g["backend"],
            &g["forwards"],
            &g["masquerade"],
            &g["persist"],
            &g["converged"]
        ),
        (
            &json!("iptables"),
            &json!(1),
            &json!(1),
            &json!(false),
            &json!(true)
        ),
        "{g}"
    );
    assert_eq!(g["compared_with"], "installed state");

    // A lost record (a wiped run dir): both are still found by their names.
    std::fs::remove_dir_all(portfwd().run_dir(&t.proxy)).unwrap();
    assert_eq!(listed(&t).len(), 2);

    // A hand edit breaks the forward: list says so, naming what apply would change.
    nft(&t.proxy, &["flush table inet portfwd-web"]);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let w = &listed(&t)["web"];
    assert_eq!(w["converged"], false, "{w}");
    assert!(
        w["msg"].as_str().unwrap_or_default().contains("check mode"),
        "{w}"
    );
    let text = portfwd().run(&t.proxy, &["list"], "", &[]).unwrap();
    assert!(
        text.stdout.lines().any(|l| l.starts_with("web ")
            && l.contains("nftables")
            && l.contains("no (stored params)")),
        "{}",
        text.stdout
    );
    let r = portfwd().apply(&t.proxy, &web).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    assert_eq!(listed(&t)["web"]["converged"], true);
    for instance in ["web", "gw-1"] {
        let r = portfwd()
            .apply(&t.proxy, &json!({"instance": instance, "state": "absent"}))
            .unwrap();
        assert!(!r.failed(), "{}", r.stdout);
    }
    assert!(listed(&t).is_empty());
}

/// `show` of an instance the host has nothing of fails and names the instances there are;
/// one that exists with nothing in it (a record, no entries) is shown.
#[test]
fn show_of_a_missing_instance_names_the_ones_there_are() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let r = portfwd()
        .run(&t.proxy, &["show", "--instance", "web"], "", &[])
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("no instance \"web\" on this host: there is none"),
        "{}",
        r.stdout
    );
    for instance in ["edge", "gw"] {
        let params = json!({"instance": instance,
            "forwards": [{"name": "a", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
        assert!(!portfwd().apply(&t.proxy, &params).unwrap().failed());
    }
    let r = portfwd()
        .run(&t.proxy, &["show", "--instance", "web"], "", &[])
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("the instances here are edge, gw"),
        "{}",
        r.stdout
    );
    // doctor without params reads the installed state: the same answer.
    let r = portfwd()
        .run(&t.proxy, &["doctor", "--instance", "web"], "", &[])
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stdout.contains("the instances here are edge, gw"),
        "{}",
        r.stdout
    );
    let r = portfwd()
        .run(&t.proxy, &["show", "--instance", "gw"], "", &[])
        .unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.json["forwards"][0]["name"], "a");
    // An instance with stored params and no entries exists: it is shown.
    let sysctl_only = json!({"instance": "fwd", "ip_forward": true, "persist": true});
    assert!(!portfwd().apply(&t.proxy, &sysctl_only).unwrap().failed());
    let r = portfwd()
        .run(&t.proxy, &["show", "--instance", "fwd"], "", &[])
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// `restore` counts what succeeded, changed and failed, and names the failures; one stored
/// instance that fails does not stop the others, and the run exits 1.
#[test]
fn restore_counts_what_succeeded_and_what_failed() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let pf = portfwd();
    for (instance, port) in [("a", 4321), ("b", 4322)] {
        let params = json!({"instance": instance, "persist": true,
            "forwards": [{"name": "web", "listen_port": port, "to": "10.0.2.2:1234"}]});
        assert!(!pf.apply(&t.proxy, &params).unwrap().failed());
    }
    // A stored file the kernel will refuse (its gateway is on no link of this host).
    let bad = json!({"instance": "c", "persist": true,
        "policy_routes": [{"from": "10.0.2.2", "table": 100,
                           "routes": [{"to": "default", "via": "192.0.2.1"}]}]});
    let dir = pf.state_dir(&t.proxy);
    let mark = format!("{}\n", t.proxy.name());
    std::fs::write(dir.join("c.json"), bad.to_string()).unwrap();
    std::fs::write(dir.join("c.netns"), &mark).unwrap();
    // "b" lost its rules (a reboot of the firewall only): restore puts them back.
    let r = pf
        .apply(&t.proxy, &json!({"instance": "b", "state": "absent"}))
        .unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    let b = json!({"instance": "b", "persist": true,
        "forwards": [{"name": "web", "listen_port": 4322, "to": "10.0.2.2:1234"}]});
    std::fs::write(dir.join("b.json"), b.to_string()).unwrap();
    std::fs::write(dir.join("b.netns"), &mark).unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4322")).is_err());

    let restored = pf.run(&t.proxy, &["restore"], "", &[]).unwrap();
    assert_eq!(restored.code, 1, "{}", restored.stdout);
    assert_eq!(
        restored.json["counts"],
        json!({"succeeded": 2, "changed": 1, "failed": 1, "skipped": 0}),
        "{}",
        restored.stdout
    );
    let msg = restored.json["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(": 2 succeeded (1 changed), 1 failed (c)"),
        "{msg}"
    );
    assert!(
        restored.json["instances"]["c"]["msg"]
            .as_str()
            .unwrap_or_default()
            .starts_with("policy_routes[0].routes[0].via"),
        "{}",
        restored.stdout
    );
    // Rolled back: it changed nothing.
    assert_eq!(restored.json["instances"]["c"]["changed"], false);
    // Another instance marking with the same conn_mark bit is not a collision.
    assert_eq!(
        restored.json["instances"]["b"]["warnings"],
        json!([]),
        "{}",
        restored.stdout
    );
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4322")).unwrap();
}

/// A params file is the whole state of its instance: an entry left out is removed, and the
/// run says that is why (in `msg` and in `plan`'s diff).
#[test]
fn an_entry_left_out_of_the_params_is_removed_and_says_why() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let a = json!({"name": "a", "listen_port": 4321, "to": "10.0.2.2:1234"});
    let b = json!({"name": "b", "listen_port": 4322, "to": "10.0.2.2:1234"});
    let both = json!({"forwards": [a, b]});
    assert!(!portfwd().apply(&t.proxy, &both).unwrap().failed());
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4322")).unwrap();
    let only_a = json!({"forwards": [a]});
    let plan = portfwd()
        .run(&t.proxy, &["plan"], &only_a.to_string(), &[])
        .unwrap();
    assert_eq!(plan.code, 0, "{}", plan.stdout);
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("- forwards.b = ") && l.ends_with("# removed: not in params")),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("  forwards.a = ")),
        "a stays: {}",
        plan.stdout
    );
    let r = portfwd().apply(&t.proxy, &only_a).unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert!(
        r.msg()
            .contains("forwards: 0 added, 0 updated, 1 removed (not in params: b)"),
        "{}",
        r.msg()
    );
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4322")).is_err());
}

/// `show` reads the installed order back, the same every time: iptables keeps the params'
/// order (its rule order), nftables lists forwards by name; applying either is a no-op.
#[test]
fn show_order_is_the_installed_one_and_stable() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    for (backend, expected) in [("iptables", ["z", "a", "m"]), ("nftables", ["a", "m", "z"])] {
        let forwards: Vec<Value> = [("z", 4321), ("a", 4322), ("m", 4323)]
            .iter()
            .map(|(name, port)| json!({"name": name, "listen_port": port, "to": "10.0.2.2:1234"}))
            .collect();
        let params = json!({"backend": backend, "forwards": forwards,
            "masquerade": [{"name": "wide", "source": "10.0.0.0/8"}, {"name": "narrow", "source": "10.0.1.0/24"}]});
        assert!(!portfwd().apply(&t.proxy, &params).unwrap().failed());
        let shown = |_: ()| {
            let r = portfwd()
                .run(&t.proxy, &["show", "--backend", backend], "", &[])
                .unwrap();
            assert_eq!(r.code, 0, "{}", r.stdout);
            r.stdout
        };
        let first = shown(());
        assert_eq!(first, shown(()), "{backend}: the same every time");
        let json: Value = serde_json::from_str(&first).unwrap();
        let names: Vec<&str> = json["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, expected, "{backend}");
        let masq: Vec<&str> = json["masquerade"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            masq,
            ["wide", "narrow"],
            "{backend}: rule order, first match wins"
        );
        let again = portfwd().run(&t.proxy, &["apply"], &first, &[]).unwrap();
        assert!(
            !again.changed() && !again.failed(),
            "{backend}: {}",
            again.stdout
        );
        let absent = json!({"backend": backend, "state": "absent"});
        assert!(!portfwd().apply(&t.proxy, &absent).unwrap().failed());
    }
}

/// Stored params belong to the network namespace that stored them: namespaces sharing one
/// state dir (as `ip netns exec` does with the host's /etc) never restore, replace or remove
/// each other's, and a namespace whose name does not outlive it cannot persist.
#[test]
fn stored_params_belong_to_the_namespace_that_stored_them() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let pf = portfwd();
    let shared = pf.state_dir(&t.proxy);
    let shared_env = shared.display().to_string();
    let env = [("PORTFWD_STATE_DIR", shared_env.as_str())];
    let web = json!({"instance": "web", "persist": true,
        "forwards": [{"name": "a", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let r = pf
        .run(&t.proxy, &["apply"], &web.to_string(), &env)
        .unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(shared.join("web.netns"))
            .unwrap()
            .trim(),
        t.proxy.name()
    );
    let stored = std::fs::read_to_string(shared.join("web.json")).unwrap();

    // Another namespace, the same state dir, the same instance name.
    let elsewhere = json!({"instance": "web", "persist": true,
        "forwards": [{"name": "b", "listen_port": 80, "to": "10.0.1.1:4321"}]});
    let before = crate::common::ruleset(&t.client, "iptables-save").unwrap();
    let r = pf
        .run(&t.client, &["apply"], &elsewhere.to_string(), &env)
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!(
                "holds the stored params of instance \"web\" of network namespace \"{}\"",
                t.proxy.name()
            )),
        "{}",
        r.stdout
    );
    assert_eq!(
        crate::common::ruleset(&t.client, "iptables-save").unwrap(),
        before,
        "rolled back"
    );
    // Without persist it works there, and leaves the other namespace's file alone.
    let r = pf
        .run(
            &t.client,
            &["apply"],
            &json!({"instance": "web", "forwards": elsewhere["forwards"]}).to_string(),
            &env,
        )
        .unwrap();
    assert!(r.changed() && !r.failed(), "{}", r.stdout);
    let r = pf
        .run(
            &t.client,
            &["apply"],
            &json!({"instance": "web", "state": "absent"}).to_string(),
            &env,
        )
        .unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(shared.join("web.json")).unwrap(),
        stored
    );

    // restore applies only this namespace's.
    let r = pf.run(&t.client, &["restore"], "", &env).unwrap();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.json["counts"]["skipped"], 1, "{}", r.stdout);
    assert_eq!(r.json["instances"]["web"]["skipped"], true, "{}", r.stdout);
    assert_eq!(
        crate::common::ruleset(&t.client, "iptables-save").unwrap(),
        before
    );
    let r = pf
        .run(
            &t.proxy,
            &["apply"],
            &json!({"instance": "web", "state": "absent", "persist": true}).to_string(),
            &[("PORTFWD_STATE_DIR", "/nonexistent-portfwd-test")],
        )
        .unwrap();
    assert!(!r.failed(), "{}", r.stdout);
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err());
    let r = pf.run(&t.proxy, &["restore"], "", &env).unwrap();
    assert_eq!(r.json["counts"]["succeeded"], 1, "{}", r.stdout);
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap();

    // A namespace with no lasting name (unshare -n inside the proxy's) cannot persist.
    let r = pf
        .run_under(
            &t.proxy,
            &["unshare", "-n"],
            &["apply"],
            &json!({"instance": "tmp", "persist": true}).to_string(),
            &env,
        )
        .unwrap();
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("has no name that outlives it"),
        "{}",
        r.stdout
    );
    assert!(!shared.join("tmp.json").exists());
}
