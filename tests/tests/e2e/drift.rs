//! End-to-end: portfwd's own objects edited behind its back (by hand, by another tool) are
//! found by comparing every attribute with what portfwd writes, not by name or comment: each
//! edit breaks real traffic, `doctor` reports `owned_object_drift`, check mode reports it and
//! changes nothing, the next run repairs it (naming what it repaired) and traffic flows again,
//! and the run after that changes nothing.

use crate::common::{nft, portfwd, prerequisites, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

fn params(backend: &str) -> Value {
    json!({"backend": backend, "forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        // Its backend port is closed: a connection sent there is refused.
        {"name": "closed", "listen_port": 4322, "to": "10.0.2.2:9"}
    ]})
}

/// The forward reaches the backend, and a service of the proxy's own (not forwarded) is
/// reachable too: a NAT chain with policy drop breaks the second.
fn works(t: &Topology) -> bool {
    probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_ok()
        && probe(&t.client, Proto::Tcp, sa("10.0.1.1:2222")).is_ok()
}

/// The firewall as other software sees it, both tools (counters left out).
fn state(ns: &Netns) -> String {
    let save = |tool: &str| ns.stdout(&[tool]).unwrap_or_default();
    let strip = |text: String| {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    strip(save("iptables-save"))
        + &strip(save("iptables-legacy-save"))
        + &ns.stdout(&["nft", "-s", "list", "ruleset"]).unwrap()
}

/// After `edit` broke the forward: doctor and check mode see the drift and change nothing;
/// the next run repairs it, traffic works, the run after changes nothing.
fn repaired(t: &Topology, params: &Value, what: &str, edit: impl Fn(&Netns)) {
    assert!(works(t), "{what}: the forward works before the edit");
    edit(&t.proxy);
    assert!(!works(t), "{what}: the edit breaks the forward");
    let before = state(&t.proxy);
    let doctor = portfwd()
        .run(&t.proxy, &["doctor", "--json"], &params.to_string(), &[])
        .unwrap();
    assert_ne!(doctor.code, 0, "{what}: {}", doctor.stdout);
    let drift = doctor.json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "owned_object_drift")
        .unwrap_or_else(|| panic!("{what}: no owned_object_drift in {}", doctor.stdout));
    assert!(drift["msg"].as_str().is_some_and(|m| !m.is_empty()));
    let check = portfwd()
        .run(&t.proxy, &["apply", "--check"], &params.to_string(), &[])
        .unwrap();
    assert!(
        check.changed() && !check.failed(),
        "{what}: {}",
        check.stdout
    );
    assert!(
        check.msg().contains("owned objects repaired: "),
        "{what}: {}",
        check.msg()
    );
    assert_eq!(
        state(&t.proxy),
        before,
        "{what}: check mode changes nothing"
    );
    let run = portfwd().apply(&t.proxy, params).unwrap();
    assert!(run.changed() && !run.failed(), "{what}: {}", run.stdout);
    assert!(
        run.msg().contains("owned objects repaired: "),
        "{what}: {}",
        run.msg()
    );
    assert!(
        !run.json["commands"].as_array().unwrap().is_empty(),
        "{what}: the repair is in `commands`"
    );
    assert!(works(t), "{what}: traffic flows again after the repair");
    let again = portfwd().apply(&t.proxy, params).unwrap();
    assert!(
        !again.changed() && !again.failed(),
        "{what}: {}",
        again.stdout
    );
}

/// The line and position of the first rule of `chain` in nat holding `needle`.
fn iptables_rule(ns: &Netns, save: &str, needle: &str) -> (String, usize, String) {
    let dump = ns.stdout(&[save, "-t", "nat"]).unwrap();
    let mut positions = std::collections::HashMap::new();
    for line in dump.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let (chain, args) = rest.split_once(' ').unwrap();
        let n = positions.entry(chain.to_string()).or_insert(0);
        *n += 1;
        if args.contains(needle) {
            return (chain.to_string(), *n, args.to_string());
        }
    }
    panic!("no rule with {needle} in {dump}");
}

/// `iptables -t nat -R CHAIN N ...` keeping portfwd's comment, sending the forward to a
/// closed port; then an edited jump (`-i eth9` added under the jump comment).
#[test]
fn iptables_rules_edited_in_place_are_repaired() {
    if !prerequisites() {
        return;
    }
    for flavour in ["iptables-nft", "iptables-legacy"] {
        let t = Topology::new().unwrap();
        let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
        let _own = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:2222")).unwrap();
        let params = params(flavour);
        let first = portfwd().apply(&t.proxy, &params).unwrap();
        assert!(first.changed() && !first.failed(), "{}", first.stdout);
        let tool = flavour.to_string();
        let save = format!("{flavour}-save");
        repaired(&t, &params, &format!("{flavour} -R"), |ns| {
            let (chain, n, args) = iptables_rule(ns, &save, "--to-destination 10.0.2.2:1234");
            let edited = args.replace("10.0.2.2:1234", "10.0.2.2:9");
            ns.exec(&[
                "sh",
                "-c",
                &format!("{tool} -t nat -R {chain} {n} {edited}"),
            ])
            .unwrap();
        });
        repaired(&t, &params, &format!("{flavour} jump"), |ns| {
            let (chain, n, args) = iptables_rule(ns, &save, "-j PFWD-portfwd-PRE");
            assert_eq!(chain, "PREROUTING");
            ns.exec(&[
                "sh",
                "-c",
                &format!("{tool} -t nat -R {chain} {n} -i eth9 {args}"),
            ])
            .unwrap();
        });
    }
}

/// The nft handle of the rule in `chain` whose text contains `needle`.
fn nft_handle(ns: &Netns, chain: &str, needle: &str) -> String {
    let listing = ns
        .stdout(&[
            "nft",
            "-a",
            "list",
            "chain",
            "inet",
            "portfwd-portfwd",
            chain,
        ])
        .unwrap();
    let line = listing
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle} in {listing}"));
    line.rsplit("# handle ").next().unwrap().trim().to_string()
}

/// The comment of the first rule or element of `object` holding `needle`.
fn nft_comment(ns: &Netns, object: &[&str], needle: &str) -> String {
    let mut argv = vec!["nft", "list"];
    argv.extend_from_slice(object);
    let listing = ns.stdout(&argv).unwrap();
    let line = listing
        .lines()
        .chain(listing.split(',').map(str::trim))
        .find(|l| l.contains(needle) && l.contains("comment \""))
        .unwrap_or_else(|| panic!("no {needle} in {listing}"));
    let after = line.split("comment \"").nth(1).unwrap();
    after.split('"').next().unwrap().to_string()
}

/// Every hand edit that leaves names and comments in place: a dormant table, a base chain's
/// policy or priority, a rule replaced under its comment, a map element pointing elsewhere,
/// an element or a rule of someone else's in an owned map or chain; for plain forwards (map
/// elements) and for forwards with chains of their own.
#[test]
fn nftables_objects_edited_behind_portfwds_back_are_repaired() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _own = Server::start(&t.proxy, Proto::Tcp, sa("0.0.0.0:2222")).unwrap();
    let params = params("nftables");
    let first = portfwd().apply(&t.proxy, &params).unwrap();
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    const T: &str = "inet portfwd-portfwd";
    repaired(&t, &params, "dormant table", |ns| {
        nft(ns, &[&format!("add table {T} {{ flags dormant; }}")]);
    });
    repaired(&t, &params, "policy drop", |ns| {
        nft(ns, &[&format!("add chain {T} prerouting {{ type nat hook prerouting priority dstnat; policy drop; }}")]);
    });
    repaired(&t, &params, "another priority", |ns| {
        // A NAT chain at another priority cannot be changed in place: deleted and made again
        // (with a dispatch rule that no longer finds the forward).
        nft(
            ns,
            &[
                &format!("flush chain {T} prerouting"),
                &format!("delete chain {T} prerouting"),
                &format!("add chain {T} prerouting {{ type nat hook prerouting priority 10; policy accept; }}"),
                &format!("add rule {T} prerouting tcp dport 4321 counter"),
            ],
        );
    });
    // A plain forward is map elements looked up by the base chains' rules.
    repaired(
        &t,
        &params,
        "lookup rule replaced under its comment",
        |ns| {
            let handle = nft_handle(ns, "prerouting", "@pre-port4-nat");
            let comment = nft_comment(
                ns,
                &["chain", "inet", "portfwd-portfwd", "prerouting"],
                "@pre-port4-nat",
            );
            nft(ns, &[&format!(
            "replace rule {T} prerouting handle {handle} meta l4proto tcp dnat ip to 10.0.2.2:9 comment \"{comment}\""
        )]);
        },
    );
    repaired(&t, &params, "element pointing elsewhere", |ns| {
        let comment = nft_comment(
            ns,
            &["map", "inet", "portfwd-portfwd", "pre-port4-nat"],
            "4321",
        );
        nft(
            ns,
            &[
                &format!("delete element {T} pre-port4-nat {{ tcp . 4321 }}"),
                &format!("add element {T} pre-port4-nat {{ tcp . 4321 comment \"{comment}\" : 10.0.2.2 . 9 }}"),
            ],
        );
    });
    repaired(
        &t,
        &params,
        "someone else's element in an owned map",
        |ns| {
            nft(
                ns,
                &[&format!(
                    "add element {T} pre-port4-nat {{ tcp . 2222 : 10.0.2.2 . 9 }}"
                )],
            );
        },
    );
    repaired(&t, &params, "someone else's rule in a base chain", |ns| {
        nft(
            ns,
            &[&format!("insert rule {T} prerouting tcp dport 4321 drop")],
        );
    });
    // A forward limited to some sources has a chain of its own, and a verdict map's element
    // jumps there.
    let mut chained = params.clone();
    chained["forwards"][0]["sources"] = json!(["10.0.1.0/24"]);
    chained["forwards"][1]["sources"] = json!(["10.0.1.0/24"]);
    let moved = portfwd().apply(&t.proxy, &chained).unwrap();
    assert!(moved.changed() && !moved.failed(), "{}", moved.stdout);
    repaired(&t, &chained, "rule replaced under its comment", |ns| {
        let handle = nft_handle(ns, "pre-web", "dnat");
        let comment = nft_comment(ns, &["chain", "inet", "portfwd-portfwd", "pre-web"], "dnat");
        nft(ns, &[&format!(
            "replace rule {T} pre-web handle {handle} meta l4proto tcp counter dnat ip to 10.0.2.2:9 comment \"{comment}\""
        )]);
    });
    repaired(&t, &chained, "verdict element pointing elsewhere", |ns| {
        let comment = nft_comment(
            ns,
            &["map", "inet", "portfwd-portfwd", "pre-port4-exact"],
            "4321",
        );
        nft(
            ns,
            &[
                &format!("delete element {T} pre-port4-exact {{ tcp . 4321 }}"),
                &format!("add element {T} pre-port4-exact {{ tcp . 4321 comment \"{comment}\" : jump pre-closed }}"),
            ],
        );
    });
    repaired(
        &t,
        &chained,
        "someone else's rule in an owned chain",
        |ns| {
            nft(
                ns,
                &[&format!("insert rule {T} pre-web tcp dport 4321 drop")],
            );
        },
    );
}
