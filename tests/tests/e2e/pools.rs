//! End-to-end: pools of weighted backends (`backends`, `balance`) with the nftables and the
//! iptables backends, with real traffic in both families. Named servers on the backend host (`a`, `b`, `c`, `d`
//! on 10.0.2.2-5 and fd00:2::2-5) say which backend each connection reached: `random` spreads
//! 1,000 connections by weight, `round-robin` exactly, `source-hash` keeps each of 100 clients
//! on one backend and moves few of them when a backend is added; a drained backend keeps its
//! open connection and takes no new one; a removed backend's UDP flow moves at once; a second
//! run and `show`'s output change nothing; a weight change rewrites only that pool's rule; a
//! pool takes a forward's options (listen address, `sources`, `local`, `snat`); `doctor` checks
//! every backend. The iptables backend refuses `source-hash` and installs nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::common::{portfwd, prerequisites, sa, Topology};
use portfwd_harness::{Proto, Server, TcpSession, UdpFlow};
use serde_json::{json, Value};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// The backend address of `name` in `family` (4 or 6).
fn backend(family: u8, name: &str) -> String {
    let i = NAMES.iter().position(|n| *n == name).unwrap() + 2;
    match family {
        4 => format!("10.0.2.{i}"),
        _ => format!("fd00:2::{i}"),
    }
}

/// `IP:8080` (`[IPv6]:8080`) of a backend.
fn to(family: u8, name: &str) -> String {
    match family {
        4 => format!("{}:8080", backend(4, name)),
        _ => format!("[{}]:8080", backend(6, name)),
    }
}

/// The proxy's front address and `port`.
fn front(family: u8, port: u16) -> SocketAddr {
    match family {
        4 => sa(&format!("10.0.1.1:{port}")),
        _ => sa(&format!("[fd00:1::1]:{port}")),
    }
}

/// The four named backends, TCP and UDP on port 8080 of their own addresses, both families.
fn servers(t: &Topology) -> Vec<Server> {
    let mut out = Vec::new();
    for name in NAMES {
        for family in [4, 6] {
            let addr = backend(family, name);
            if name != "a" {
                let prefix = if family == 4 { 24 } else { 64 };
                t.backend
                    .ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"])
                    .unwrap();
            }
            for proto in [Proto::Tcp, Proto::Udp] {
                let bind = sa(&to(family, name));
                out.push(Server::start_named(&t.backend, proto, bind, name).unwrap());
            }
        }
    }
    out
}

/// Client addresses `10.0.1.<i>` (`fd00:1::<i in hex>`) for each `i`, added to the client.
fn client_addresses(t: &Topology, family: u8, ids: std::ops::Range<u16>) -> Vec<String> {
    let clients: Vec<String> = ids
        .map(|i| match family {
            4 => format!("10.0.1.{i}"),
            _ => format!("fd00:1::{i:x}"),
        })
        .collect();
    for c in &clients {
        let prefix = if family == 4 { 24 } else { 64 };
        t.client
            .ip(&["addr", "add", &format!("{c}/{prefix}"), "dev", "eth0"])
            .unwrap();
    }
    clients
}

fn pool(name: &str, port: u16, balance: &str, members: &[(u8, &str, u32)]) -> Value {
    let backends: Vec<Value> = members
        .iter()
        .map(|(family, b, weight)| json!({"to": to(*family, b), "weight": weight}))
        .collect();
    json!({"name": name, "proto": "both", "listen_port": port, "balance": balance, "backends": backends})
}

/// The backends every test runs with (round-robin also with `iptables-legacy`).
const BACKENDS: [&str; 2] = ["nftables", "iptables-nft"];

fn params(backend: &str, forwards: Vec<Value>) -> Value {
    json!({"backend": backend, "forwards": forwards})
}

fn apply(t: &Topology, p: &Value) -> Value {
    let r = portfwd().apply(&t.proxy, p).unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json
}

/// The backend name in a server's answer (`PEER NAME`).
fn name_of(answer: &str) -> String {
    answer.split_whitespace().nth(1).unwrap_or("?").to_string()
}

/// Which backend each of `n` new TCP connections to `target` reached.
fn tally(t: &Topology, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let answer = TcpSession::connect(&t.client, target)
            .and_then(|mut s| s.ask_text())
            .unwrap();
        *out.entry(name_of(&answer)).or_default() += 1;
    }
    out
}

/// Applying `p` again, and applying what `show` prints, change nothing; `show` gives the pool
/// back (its backends, weights and balance).
fn converged(t: &Topology, p: &Value) {
    let again = apply(t, p);
    assert_eq!(again["changed"], false, "{again}");
    let shown = portfwd().run(&t.proxy, &["show"], "", &[]).unwrap();
    let shown_json: Value = serde_json::from_str(&shown.stdout).unwrap();
    for want in p["forwards"].as_array().unwrap() {
        let got = shown_json["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == want["name"])
            .unwrap_or_else(|| panic!("{} not shown: {}", want["name"], shown.stdout));
        let members = |f: &Value| -> Vec<(String, u64)> {
            let mut m: Vec<(String, u64)> = f["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let w = b["weight"].as_u64().unwrap_or(1);
                    (b["to"].as_str().unwrap().to_string(), w)
                })
                .collect();
            m.sort();
            m
        };
        assert_eq!(members(got), members(want), "{}", shown.stdout);
        assert_eq!(got["to"], want["to"], "{}", shown.stdout);
        let balance = |f: &Value| f["balance"].as_str().unwrap_or("random").to_string();
        assert_eq!(balance(got), balance(want));
        assert_eq!(got["persistence"], want["persistence"], "{}", shown.stdout);
    }
    let applied = portfwd()
        .run(&t.proxy, &["apply"], &shown.stdout, &[])
        .unwrap();
    assert!(
        !applied.changed() && !applied.failed(),
        "{}\n{}",
        shown.stdout,
        applied.stdout
    );
}

/// `random` over weights 1:1:2: 1,000 connections land within 5 points of 25/25/50 %.
#[test]
fn a_random_pool_spreads_connections_by_weight() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        random_pool_spreads_connections_by_weight(backend);
    }
}

fn random_pool_spreads_connections_by_weight(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    for family in [4, 6] {
        let p = params(
            backend,
            vec![pool(
                "web",
                4000,
                "random",
                &[(family, "a", 1), (family, "b", 1), (family, "c", 2)],
            )],
        );
        apply(&t, &p);
        let seen = tally(&t, front(family, 4000), 1000);
        eprintln!("{backend} IPv{family} random 1:1:2, 1,000 connections: {seen:?}");
        for (name, want) in [("a", 25.0), ("b", 25.0), ("c", 50.0)] {
            let share = *seen.get(name).unwrap_or(&0) as f64 / 10.0;
            assert!(
                (share - want).abs() <= 5.0,
                "{backend} IPv{family}: {name} got {share} % of 1,000 connections, not {want} +- 5: {seen:?}"
            );
        }
        assert_eq!(seen.values().sum::<usize>(), 1000, "{seen:?}");
        converged(&t, &p);
    }
}

/// `round-robin` over weights 1:1:2 is exact: 250, 250 and 500 of 1,000 connections.
#[test]
fn a_round_robin_pool_is_exact() {
    if !prerequisites() {
        return;
    }
    for backend in ["nftables", "iptables-nft", "iptables-legacy"] {
        round_robin_pool_is_exact(backend);
    }
}

fn round_robin_pool_is_exact(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    for family in [4, 6] {
        let p = params(
            backend,
            vec![pool(
                "rr",
                4001,
                "round-robin",
                &[(family, "a", 1), (family, "b", 1), (family, "c", 2)],
            )],
        );
        apply(&t, &p);
        let seen = tally(&t, front(family, 4001), 1000);
        let want: BTreeMap<String, usize> = [("a", 250), ("b", 250), ("c", 500)]
            .map(|(n, c)| (n.to_string(), c))
            .into();
        assert_eq!(seen, want, "{backend} IPv{family}");
        converged(&t, &p);
    }
}

/// `source-hash`: each of 100 client addresses reaches one backend over new flows; adding a
/// fourth backend moves at most 1.6/4 of the clients (Maglev moves about a quarter).
#[test]
fn a_source_hash_pool_keeps_clients_and_moves_few_when_a_backend_is_added() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    // The iptables backend refuses it, naming the field, and installs nothing.
    let refused = portfwd()
        .apply(
            &t.proxy,
            &params(
                "iptables-nft",
                vec![pool("sh", 4002, "source-hash", &[(4, "a", 1), (4, "b", 1)])],
            ),
        )
        .unwrap();
    assert!(
        refused.failed() && refused.stdout.contains("forwards[0].balance"),
        "{}",
        refused.stdout
    );
    let saved = t.proxy.stdout(&["iptables-nft-save"]).unwrap();
    assert!(!saved.contains("PFWD"), "{saved}");
    let _servers = servers(&t);
    for family in [4u8, 6] {
        let clients = client_addresses(&t, family, 100..200);
        let three = [(family, "a", 1), (family, "b", 1), (family, "c", 1)];
        let p = params("nftables", vec![pool("sh", 4002, "source-hash", &three)]);
        apply(&t, &p);
        // A new flow from each client (a fresh source port) reaches the backend it did.
        let picks = |t: &Topology| -> Vec<String> {
            clients
                .iter()
                .map(|c| {
                    let bind = match family {
                        4 => sa(&format!("{c}:0")),
                        _ => sa(&format!("[{c}]:0")),
                    };
                    let flow = UdpFlow::open(&t.client, bind, front(family, 4002)).unwrap();
                    name_of(&flow.ask().unwrap().expect("an answer"))
                })
                .collect()
        };
        let before = picks(&t);
        for _ in 0..2 {
            assert_eq!(picks(&t), before, "IPv{family}: a client changed backends");
        }
        let used: std::collections::BTreeSet<&String> = before.iter().collect();
        assert_eq!(
            used.len(),
            3,
            "IPv{family}: 100 clients over 3 backends: {before:?}"
        );
        converged(&t, &p);

        let four = [three.as_slice(), &[(family, "d", 1)]].concat();
        apply(
            &t,
            &params("nftables", vec![pool("sh", 4002, "source-hash", &four)]),
        );
        let after = picks(&t);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        eprintln!("IPv{family} source-hash, a fourth backend added: {moved} of 100 clients moved");
        assert!(
            moved <= 40,
            "IPv{family}: adding a fourth backend moved {moved} of 100 clients (at most 1.6/4 may)"
        );
        assert!(
            after.iter().any(|b| b == "d"),
            "IPv{family}: nobody reached d"
        );
        assert_eq!(picks(&t), after, "IPv{family}: a client changed backends");
    }
}

/// `persistence` (the iptables backends): a client that returns within the time reaches the
/// backend it reached, whatever the draw; once the time has passed it meets the draw again;
/// a drained backend does not keep its clients. Three client addresses over UDP (each flow a
/// new connection) through a round-robin pool of two.
#[test]
fn persistence_keeps_a_client_on_its_backend_until_the_time_passes() {
    if !prerequisites() {
        return;
    }
    for backend in ["iptables-nft", "iptables-legacy"] {
        persistence_keeps_a_client(backend);
    }
}

fn persistence_keeps_a_client(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    for family in [4u8, 6] {
        let port = 4010 + u16::from(family);
        let clients = client_addresses(&t, family, 12..15);
        let sticky = |weights: [u32; 2]| {
            let mut p = pool(
                "sticky",
                port,
                "round-robin",
                &[(family, "a", weights[0]), (family, "b", weights[1])],
            );
            p["persistence"] = json!(3);
            params(backend, vec![p])
        };
        let p = sticky([1, 1]);
        apply(&t, &p);
        let ask = |client: &str| -> String {
            let bind = match family {
                4 => sa(&format!("{client}:0")),
                _ => sa(&format!("[{client}]:0")),
            };
            let flow = UdpFlow::open(&t.client, bind, front(family, port)).unwrap();
            name_of(&flow.ask().unwrap().expect("an answer"))
        };
        let (x, y, z) = (&clients[0], &clients[1], &clients[2]);
        let at = format!("{backend} IPv{family}");
        assert_eq!(ask(x), "a", "{at}: x, the first draw");
        for _ in 0..3 {
            assert_eq!(ask(x), "a", "{at}: x returns within the time");
        }
        assert_eq!(ask(y), "b", "{at}: y, the second draw");
        assert_eq!(ask(z), "a", "{at}: z, the third draw");
        assert_eq!(ask(y), "b", "{at}: y returns");
        assert_eq!(ask(x), "a", "{at}: x returns");
        std::thread::sleep(std::time::Duration::from_millis(4500));
        assert_eq!(ask(x), "b", "{at}: x after the time meets the fourth draw");
        assert_eq!(ask(x), "b", "{at}: and stays there");
        converged(&t, &p);
        // Drained, b keeps none of its clients; its open flows are not this test's subject.
        apply(&t, &sticky([1, 0]));
        assert_eq!(ask(x), "a", "{at}: x, whose backend was drained");
        assert_eq!(ask(y), "a", "{at}: y, whose backend was drained");
    }
}

/// Weight 0 drains: an open TCP connection to the drained backend keeps working while no new
/// connection reaches it, and the rule rewritten is that pool's alone.
#[test]
fn a_drained_backend_keeps_its_connections_and_takes_no_new_ones() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        drained_backend_keeps_its_connections(backend);
    }
}

/// The lines of the firewall script a run wrote (`nft -f -` or `iptables-restore`).
fn script(r: &Value) -> Vec<&str> {
    r["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .skip_while(|c| !c.starts_with("nft -f -") && !c.contains("-restore"))
        .skip(1)
        .take_while(|c| *c != "EOF")
        .collect()
}

fn drained_backend_keeps_its_connections(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    let other = json!({"name": "other", "listen_port": 4100, "to": to(4, "d")});
    let live = [(4, "a", 1), (4, "b", 1), (4, "c", 1)];
    apply(
        &t,
        &params(
            backend,
            vec![pool("web", 4003, "random", &live), other.clone()],
        ),
    );
    let target = front(4, 4003);
    let mut open = None;
    for _ in 0..200 {
        let mut s = TcpSession::connect(&t.client, target).unwrap();
        if name_of(&s.ask_text().unwrap()) == "c" {
            open = Some(s);
            break;
        }
    }
    let mut open = open.expect("a connection reached c");
    let drained = [(4, "a", 1), (4, "b", 1), (4, "c", 0)];
    let p = params(backend, vec![pool("web", 4003, "random", &drained), other]);
    let r = apply(&t, &p);
    assert_eq!(r["changed"], true, "{r}");
    let script = script(&r);
    // nftables: the pool's rule in its chain; iptables: the pool's DNAT rules in the
    // sub-chains of its port (4003 is in bucket 15, the other forward's 4100 in 16).
    let ours = |l: &&str| match backend {
        "nftables" => l.split_whitespace().any(|w| w == "pre-web"),
        _ => {
            let mut words = l.split_whitespace();
            let (op, chain) = (words.next(), words.next().unwrap_or_default());
            matches!(op, Some("*nat" | "COMMIT"))
                || ((chain.ends_with("-PRE-T15") || chain.ends_with("-PRE-U15"))
                    && (op == Some("-D") || l.contains(":fwd:web:")))
        }
    };
    assert!(
        !script.is_empty() && script.iter().all(ours),
        "{backend}: only the pool's own rules are rewritten: {script:#?}"
    );
    assert_eq!(
        name_of(&open.ask_text().unwrap()),
        "c",
        "the open connection"
    );
    let seen = tally(&t, target, 200);
    assert!(
        !seen.contains_key("c"),
        "{backend}: new connections reached the drained backend: {seen:?}"
    );
    assert_eq!(
        name_of(&open.ask_text().unwrap()),
        "c",
        "the open connection"
    );
    converged(&t, &p);
}

/// A removed backend's UDP flow reaches another backend at once (its conntrack entry goes).
#[test]
fn a_removed_backends_udp_flow_moves_at_once() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        removed_backends_udp_flow_moves_at_once(backend);
    }
}

fn removed_backends_udp_flow_moves_at_once(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    let two = [(4, "a", 1), (4, "b", 1)];
    apply(
        &t,
        &params(backend, vec![pool("dns", 4004, "random", &two)]),
    );
    let mut pinned = None;
    for port in 20000..20100 {
        let flow =
            UdpFlow::open(&t.client, sa(&format!("10.0.1.2:{port}")), front(4, 4004)).unwrap();
        if name_of(&flow.ask().unwrap().unwrap()) == "b" {
            pinned = Some(flow);
            break;
        }
    }
    let flow = pinned.expect("a flow reached b");
    assert_eq!(
        name_of(&flow.ask().unwrap().unwrap()),
        "b",
        "the flow stays on b"
    );
    apply(
        &t,
        &params(backend, vec![pool("dns", 4004, "random", &[(4, "a", 1)])]),
    );
    assert_eq!(
        name_of(&flow.ask().unwrap().expect("an answer after the change")),
        "a",
        "{backend}: the same flow right after b was removed"
    );
}

/// A pool with the rest of a forward's options: a listen address, `sources`, `local` (a
/// connection made on the proxy itself), `snat` to a fixed address and `snat: none` (the
/// backend sees the client).
#[test]
fn a_pool_takes_the_options_of_a_forward() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        pool_takes_the_options_of_a_forward(backend);
    }
}

fn pool_takes_the_options_of_a_forward(backend: &str) {
    let t = Topology::new().unwrap();
    let _servers = servers(&t);
    // Replies to the clients' own addresses go back through the proxy (for `snat: none`).
    for net in ["10.0.1.0/24", "10.0.3.0/24"] {
        t.backend
            .ip(&["route", "add", net, "via", "10.0.2.1"])
            .unwrap();
    }
    let members = |f: &mut Value| {
        f["listen_address"] = json!("10.0.1.1");
        f["sources"] = json!(["10.0.1.0/24"]);
        f["local"] = json!(true);
    };
    let mut fixed = pool("fixed", 4005, "round-robin", &[(4, "a", 1), (4, "b", 1)]);
    members(&mut fixed);
    fixed["snat"] = json!("10.0.2.1");
    let mut kept = pool("kept", 4006, "round-robin", &[(4, "c", 1), (4, "d", 1)]);
    members(&mut kept);
    kept["snat"] = json!("none");
    let p = params(backend, vec![fixed, kept]);
    apply(&t, &p);
    for (port, names, seen) in [
        (4005, ["a", "b"], "10.0.2.1"),
        (4006, ["c", "d"], "10.0.1.2"),
    ] {
        let mut reached = Vec::new();
        for _ in 0..2 {
            let answer = TcpSession::connect(&t.client, front(4, port))
                .and_then(|mut s| s.ask_text())
                .unwrap();
            assert_eq!(answer.split_whitespace().next(), Some(seen), "{answer}");
            reached.push(name_of(&answer));
        }
        reached.sort();
        assert_eq!(
            reached, names,
            "{backend}: round-robin over the pool on port {port}"
        );
        // Made on the proxy itself (`local`), to its listen address.
        let answer = TcpSession::connect(&t.proxy, front(4, port))
            .and_then(|mut s| s.ask_text())
            .unwrap();
        assert!(
            names.contains(&name_of(&answer).as_str()),
            "local: {answer}"
        );
    }
    // Another source is not let in (were it DNATed, the backend's answer would come back).
    t.client
        .ip(&["addr", "add", "10.0.3.2/24", "dev", "eth0"])
        .unwrap();
    t.proxy
        .ip(&["addr", "add", "10.0.3.1/24", "dev", "eth0"])
        .unwrap();
    let outsider = UdpFlow::open(&t.client, sa("10.0.3.2:0"), front(4, 4006)).unwrap();
    assert_eq!(outsider.ask().unwrap(), None, "a client outside `sources`");
    converged(&t, &p);
}

/// `doctor` checks every backend of a pool: the one without a route is named
/// (`no_route_to_backend`), and with `--probe` the one nobody listens on
/// (`backend_unreachable`).
#[test]
fn doctor_checks_every_backend_of_a_pool() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        doctor_checks_every_backend(backend);
    }
}

fn doctor_checks_every_backend(backend: &str) {
    let t = Topology::new().unwrap();
    let doctor = |p: &Value, probe: bool| -> Value {
        let args: &[&str] = if probe {
            &["doctor", "--json", "--probe"]
        } else {
            &["doctor", "--json"]
        };
        portfwd()
            .run(&t.proxy, args, &p.to_string(), &[])
            .unwrap()
            .json
    };
    let ids = |report: &Value| -> Vec<(String, String)> {
        report["findings"]
            .as_array()
            .unwrap_or_else(|| panic!("{report}"))
            .iter()
            .map(|f| {
                let id = f["id"].as_str().unwrap_or_default().to_string();
                (id, f["msg"].as_str().unwrap_or_default().to_string())
            })
            .collect()
    };
    let far = json!({"name": "web", "listen_port": 4007, "backends": [
        {"to": "10.0.2.2:8080"}, {"to": "10.99.0.1:8080"}]});
    let p = params(backend, vec![far]);
    apply(&t, &p);
    let found = ids(&doctor(&p, false));
    assert!(
        found.len() == 1 && found[0].0 == "no_route_to_backend" && found[0].1.contains("10.99.0.1"),
        "{found:?}"
    );

    let near = params(
        backend,
        vec![pool("web", 4007, "random", &[(4, "a", 1), (4, "b", 1)])],
    );
    apply(&t, &near);
    assert_eq!(ids(&doctor(&near, false)), Vec::new());
    let _a = Server::start_named(&t.backend, Proto::Tcp, sa("10.0.2.2:8080"), "a").unwrap();
    t.backend
        .ip(&["addr", "add", "10.0.2.3/24", "dev", "eth0"])
        .unwrap();
    let dead = ids(&doctor(&near, true));
    assert!(
        dead.len() == 1
            && dead[0].0 == "backend_unreachable"
            && dead[0].1.contains("10.0.2.3:8080"),
        "{dead:?}"
    );
    let _b = Server::start_named(&t.backend, Proto::Tcp, sa("10.0.2.3:8080"), "b").unwrap();
    assert_eq!(ids(&doctor(&near, true)), Vec::new());
}
