//! End-to-end: the read cache (a run that finds the nf_tables generation where its record
//! says the last full read saw it skips that read) trusts only what it can prove. Each test
//! makes the condition under which a cached run would have said `no changes`, or kept a stale
//! warning, and checks the run reads the host instead.

use crate::common::{portfwd, prerequisites, sa, warnings, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::{json, Value};

const NO_COOKIE: (&str, &str) = ("PORTFWD_NO_NETNS_COOKIE", "1");

/// The namespace's nf_tables generation (`NFT_MSG_GETGEN`), read as portfwd reads it.
fn generation(ns: &Netns) -> u64 {
    let script = r#"
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.send(struct.pack('=IHHII', 20, (10 << 8) | 16, 1, 1, 0) + struct.pack('=BBH', 0, 0, 0))
data = s.recv(65536)
off = 20
while off + 4 <= len(data):
    ln, ty = struct.unpack_from('=HH', data, off)
    if ty & 0x7fff == 1:
        print(struct.unpack_from('>I', data, off + 4)[0])
        break
    off += (ln + 3) & ~3
"#;
    ns.stdout(&["python3", "-c", script])
        .unwrap()
        .trim()
        .parse()
        .expect("a generation")
}

fn run(ns: &Netns, params: &Value, env: &[(&str, &str)]) -> portfwd_harness::RunResult {
    let r = portfwd()
        .run(ns, &["apply"], &params.to_string(), env)
        .unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r
}

fn only_record(ns: &Netns) -> std::path::PathBuf {
    let dir = portfwd().run_dir(ns);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "record"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

/// A forward a namespace with only `lo` can prove with traffic: local connections to
/// 127.0.0.1:4321 go to the service on 2323.
fn local_redirect(backend: &str) -> Value {
    json!({"backend": backend, "forwards": [{"name": "ssh", "listen_port": 4321,
        "listen_address": "127.0.0.1", "local": true, "redirect_to_port": 2323}]})
}

/// Both backends keep a read cache.
const BACKENDS: [&str; 2] = ["iptables-nft", "nftables"];

/// Without the namespace cookie (before Linux 5.14) a record is keyed by inode, which the
/// kernel hands to the next namespace at once; with only `lo` there are no links to tell the
/// two apart, and every new namespace starts at the same generation. A gone namespace's record
/// whose cache lines up with this namespace's generation must not make the run say `no
/// changes` with nothing installed.
#[test]
fn a_record_without_links_proves_no_cache_on_the_fallback_key() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        without_links(backend);
    }
}

fn without_links(backend: &str) {
    let gone = Netns::new("gone").unwrap();
    gone.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    run(&gone, &local_redirect(backend), &[NO_COOKIE]);
    let again = run(&gone, &local_redirect(backend), &[NO_COOKIE]);
    assert_eq!(again.json["changed"], json!(false));
    let mut planted: Value =
        serde_json::from_str(&std::fs::read_to_string(only_record(&gone)).unwrap()).unwrap();
    assert!(planted["read_cache"].is_object(), "{planted}");
    drop(gone);

    let ns = Netns::new("reuse").unwrap();
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    let _ssh = Server::start(&ns, Proto::Tcp, sa("127.0.0.1:2323")).unwrap();
    // The gone record under this namespace's key, its generation lined up with this one's.
    let inode = ns
        .stdout(&["stat", "-L", "-c", "%i-%d", "/proc/self/ns/net"])
        .unwrap();
    let (ino, dev) = inode.trim().split_once('-').unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    planted["netns"]["ino"] = json!(ino.parse::<u64>().unwrap());
    planted["netns"]["dev"] = json!(dev.parse::<u64>().unwrap());
    planted["read_cache"]["generation"] = json!(generation(&ns));
    let dir = portfwd().run_dir(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("portfwd.netns-i{ino}-d{dev}-b{}.record", &boot[..8]);
    std::fs::write(dir.join(name), planted.to_string()).unwrap();

    let r = run(&ns, &local_redirect(backend), &[NO_COOKIE]);
    assert_eq!(
        r.json["changed"],
        json!(true),
        "nothing was installed here: {}",
        r.stdout
    );
    probe(&ns, Proto::Tcp, sa("127.0.0.1:4321")).unwrap();
}

/// A record on persistent storage outlives a reboot, and cookies start again at boot: a
/// record stamped with another boot id is ignored (with a warning) in the cookie mode too.
#[test]
fn a_record_of_another_boot_is_ignored_with_the_cookie() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        another_boot(backend);
    }
}

fn another_boot(backend: &str) {
    let ns = Netns::new("boot").unwrap();
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    let _ssh = Server::start(&ns, Proto::Tcp, sa("127.0.0.1:2323")).unwrap();
    run(&ns, &local_redirect(backend), &[]);
    run(&ns, &local_redirect(backend), &[]);
    let path = only_record(&ns);
    let mut record: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(record["read_cache"].is_object(), "{record}");
    // What the earlier boot left: its forward is gone with the reboot, the record is not.
    run(
        &ns,
        &json!({"backend": "iptables-nft", "state": "absent"}),
        &[],
    );
    record["netns"]["boot_id"] = json!("00000000-0000-4000-8000-000000000000");
    record["read_cache"]["generation"] = json!(generation(&ns));
    std::fs::write(&path, record.to_string()).unwrap();

    let r = run(&ns, &local_redirect(backend), &[]);
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("written before this boot")),
        "{}",
        r.stdout
    );
    assert_eq!(r.json["changed"], json!(true), "{}", r.stdout);
    probe(&ns, Proto::Tcp, sa("127.0.0.1:4321")).unwrap();
}

/// A table with `flags owner` vanishes with the process that made it, and the generation
/// does not move: the warning about its dropping forward chain is not kept for a cached run.
#[test]
fn a_warning_about_an_owner_table_does_not_outlive_it() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        owner_table(backend);
    }
}

fn owner_table(backend: &str) {
    let t = Topology::new().unwrap();
    // Owner tables came with Linux 5.12 and nft 0.9.9 (Debian 11 has neither): there no
    // other program can hold one, and there is nothing to test.
    if let Err(e) = t
        .proxy
        .exec(&["nft", "-c", "add table inet owned { flags owner; }"])
    {
        eprintln!("not applicable here: this kernel or nft has no owner tables ({e})");
        return;
    }
    let params = json!({"backend": backend,
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    run(&t.proxy, &params, &[]);
    // The owner keeps its netlink socket open while `nft -i` waits for more input.
    let mut owner = std::process::Command::new("ip")
        .args(["netns", "exec", t.proxy.name(), "nft", "-i"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = owner.stdin.as_mut().unwrap();
        writeln!(stdin, "add table inet owned {{ flags owner; }}").unwrap();
        writeln!(
            stdin,
            "add chain inet owned forward {{ type filter hook forward priority 0; policy drop; }}"
        )
        .unwrap();
        stdin.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !t
        .proxy
        .stdout(&["nft", "list", "tables"])
        .unwrap()
        .contains("inet owned")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner table appears"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = run(&t.proxy, &params, &[]);
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("inet owned forward")),
        "the full read warns: {}",
        r.stdout
    );
    let before = generation(&t.proxy);
    drop(owner.stdin.take());
    owner.wait().unwrap();
    assert!(!t
        .proxy
        .stdout(&["nft", "list", "tables"])
        .unwrap()
        .contains("inet owned"));
    assert_eq!(
        generation(&t.proxy),
        before,
        "the table went without a commit"
    );
    let r = run(&t.proxy, &params, &[]);
    assert!(
        !warnings(&r).iter().any(|w| w.contains("inet owned")),
        "the table is gone: {}",
        r.stdout
    );
}

/// iptables-legacy changes never move the nf_tables generation: a legacy DNAT that takes a
/// forward's port is reported by a run that uses the cache, as by one that reads everything.
#[test]
fn a_legacy_dnat_is_seen_by_a_cached_run() {
    if !prerequisites() || crate::common::which("iptables-legacy").is_none() {
        return;
    }
    for backend in BACKENDS {
        legacy_dnat(backend);
    }
}

fn legacy_dnat(backend: &str) {
    let t = Topology::new().unwrap();
    let params = json!({"backend": backend,
        "forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    run(&t.proxy, &params, &[]);
    let quiet = run(&t.proxy, &params, &[]);
    assert!(warnings(&quiet).is_empty(), "{}", quiet.stdout);
    let before = generation(&t.proxy);
    let out = t
        .proxy
        .exec(&[
            "iptables-legacy",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "4321",
            "-j",
            "DNAT",
            "--to-destination",
            "10.0.2.2:9",
        ])
        .unwrap();
    assert!(out.status.success());
    assert_eq!(generation(&t.proxy), before, "legacy rules do not move it");
    let r = run(&t.proxy, &params, &[]);
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("forward \"web\": another owner's NAT rule")
                && w.contains("iptables-legacy nat PREROUTING")),
        "{}",
        r.stdout
    );
}

/// 40 forwards through iptables-nft, f`changed` to the backend's 1235 instead of 1234.
fn forty_iptables(changed: Option<usize>, local: Option<usize>) -> Value {
    let forwards: Vec<Value> = (0..40)
        .map(|i| {
            let port = if Some(i) == changed { 1235 } else { 1234 };
            json!({"name": format!("f{i}"), "listen_port": 10000 + i,
                   "to": format!("10.0.2.2:{port}"), "local": Some(i) == local})
        })
        .collect();
    json!({"backend": "iptables-nft", "forwards": forwards})
}

/// One run, and the iptables dumps it made (`iptables-nft-save`, `ip6tables-nft-save`).
fn run_counting_saves(ns: &Netns, params: &Value) -> (portfwd_harness::RunResult, usize) {
    let log =
        portfwd_harness::shims::CallLog::new(&["iptables-nft-save", "ip6tables-nft-save"]).unwrap();
    let r = run(ns, params, &[("PATH", &log.path())]);
    (r, log.calls().len())
}

/// With iptables-nft, while nothing else has committed since portfwd's last run, a change
/// inside the instance's chains is planned from the record: no `iptables-save`, the rules
/// deleted by position as portfwd wrote them, and traffic takes the new way while a live
/// connection through another forward carries on. A change that places a new jump (a first
/// `local` forward: a jump in nat OUTPUT) reads; so does a change after someone else's edit of
/// portfwd's chain, which it repairs.
#[test]
fn an_iptables_change_is_planned_from_the_record_while_nobody_else_wrote() {
    if !prerequisites() {
        return;
    }
    use portfwd_harness::TcpSession;
    let t = Topology::new().unwrap();
    let _a = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let _b = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1235")).unwrap();
    let first = run(&t.proxy, &forty_iptables(None, None), &[]);
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    let mut session = TcpSession::connect(&t.client, sa("10.0.1.1:10000")).unwrap();
    let backend: std::net::IpAddr = "10.0.2.1".parse().unwrap();
    assert_eq!(session.ask().unwrap(), backend);

    let (changed, saves) = run_counting_saves(&t.proxy, &forty_iptables(Some(7), None));
    assert!(changed.changed() && !changed.failed(), "{}", changed.stdout);
    assert_eq!(changed.json["forwards"]["updated"], json!(["f7"]));
    assert_eq!(saves, 0, "no iptables-save");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).unwrap(),
        backend,
        "f7 reaches its new port"
    );
    assert_eq!(session.ask().unwrap(), backend, "f0's connection lives on");
    // What it wrote is what a full read expects: after another writer's commit the run
    // reads, and finds nothing to do.
    t.proxy
        .stdout(&["iptables-nft", "-t", "filter", "-N", "OTHER"])
        .unwrap();
    let (full, saves) = run_counting_saves(&t.proxy, &forty_iptables(Some(7), None));
    assert!(!full.changed() && !full.failed(), "{}", full.stdout);
    assert!(saves > 0, "a full read");

    // A new jump (nat OUTPUT) is placed among the chain's rules as they are: read.
    let (local, saves) = run_counting_saves(&t.proxy, &forty_iptables(Some(7), Some(9)));
    assert!(local.changed() && !local.failed(), "{}", local.stdout);
    assert!(saves > 0, "a new jump needs a read");
    let output = t
        .proxy
        .stdout(&["iptables-nft", "-t", "nat", "-S", "OUTPUT"])
        .unwrap();
    assert!(output.contains("-j PFWD-portfwd-OUT"), "{output}");

    // Someone deletes f3's DNAT rule: the next change reads and puts it back.
    let pre = t
        .proxy
        .stdout(&["iptables-nft", "-t", "nat", "-S", "PFWD-portfwd-PRE-T39"])
        .unwrap();
    let position = pre
        .lines()
        .filter(|l| l.starts_with("-A "))
        .position(|l| l.contains("--dport 10003 "))
        .expect("f3's rule");
    let position = (position + 1).to_string();
    t.proxy
        .stdout(&[
            "iptables-nft",
            "-t",
            "nat",
            "-D",
            "PFWD-portfwd-PRE-T39",
            &position,
        ])
        .unwrap();
    assert!(probe(&t.client, Proto::Tcp, sa("10.0.1.1:10003")).is_err());
    let (repaired, saves) = run_counting_saves(&t.proxy, &forty_iptables(Some(8), Some(9)));
    assert!(
        repaired.changed() && !repaired.failed(),
        "{}",
        repaired.stdout
    );
    assert!(saves > 0, "another writer's edit needs a read");
    assert_eq!(
        repaired.json["forwards"]["updated"],
        json!(["f3", "f7", "f8"]),
        "{}",
        repaired.stdout
    );
    for port in [10003, 10007, 10008] {
        let to = sa(&format!("10.0.1.1:{port}"));
        assert_eq!(probe(&t.client, Proto::Tcp, to).unwrap(), backend, "{port}");
    }
    assert_eq!(session.ask().unwrap(), backend, "f0's connection lives on");
}

/// `PORTFWD_PHASES=1` makes a run give its seconds per phase, and nothing else about it
/// changes: a first apply reads, plans and writes; a no-op writes nothing; a change while
/// nobody else wrote is planned from the record (`earlier`) and traffic takes the new way.
/// Without the variable there are no phases.
#[test]
fn a_run_gives_its_phases_when_asked() {
    if !prerequisites() {
        return;
    }
    const PHASES: (&str, &str) = ("PORTFWD_PHASES", "1");
    let t = Topology::new().unwrap();
    // Only the changed forward's new port listens: traffic proves the change took effect.
    let _b = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1235")).unwrap();
    let params = |changed: Option<usize>| {
        let mut p = forty_iptables(changed, None);
        p["backend"] = json!("nftables");
        p
    };
    let phases = |r: &portfwd_harness::RunResult| -> Vec<String> {
        let Some(map) = r.json["phases"].as_object() else {
            return Vec::new();
        };
        for (phase, seconds) in map {
            let s = seconds.as_f64().unwrap_or(-1.0);
            assert!((0.0..60.0).contains(&s), "{phase}: {seconds}");
        }
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort();
        names
    };
    let first = run(&t.proxy, &params(None), &[PHASES]);
    assert!(first.changed() && !first.failed(), "{}", first.stdout);
    let names = phases(&first);
    for phase in [
        "parse", "prelude", "compile", "read", "plan", "report", "write", "flows",
    ] {
        assert!(names.iter().any(|n| n == phase), "{phase} in {names:?}");
    }
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).is_err(),
        "nothing on 1234"
    );
    let noop = run(&t.proxy, &params(None), &[PHASES]);
    assert!(!noop.changed(), "{}", noop.stdout);
    let names = phases(&noop);
    assert!(names.iter().any(|n| n == "compile"), "{names:?}");
    assert!(
        !names.iter().any(|n| n == "write"),
        "a no-op writes nothing: {names:?}"
    );
    let change = run(&t.proxy, &params(Some(7)), &[PHASES]);
    assert_eq!(
        change.json["forwards"]["updated"],
        json!(["f7"]),
        "{}",
        change.stdout
    );
    let names = phases(&change);
    for phase in ["earlier", "write"] {
        assert!(names.iter().any(|n| n == phase), "{phase} in {names:?}");
    }
    let backend: std::net::IpAddr = "10.0.2.1".parse().unwrap();
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:10007")).unwrap(),
        backend,
        "f7 reaches its new port"
    );
    let plain = run(&t.proxy, &params(Some(7)), &[]);
    assert!(!plain.changed(), "{}", plain.stdout);
    assert!(plain.json.get("phases").is_none(), "{}", plain.stdout);
}

/// The nft calls of one run that listed the instance's table.
fn listings(log: &portfwd_harness::shims::CallLog) -> Vec<String> {
    log.calls()
        .into_iter()
        .filter(|c| c.contains("list table inet portfwd-"))
        .collect()
}

/// After another writer's commit (the generation proves nothing), a run of the nftables
/// backend dumps its table over netlink instead of listing it, when the dump's shape (all but
/// the elements, counters' values left out) is the one recorded while the table held what
/// portfwd wrote: nothing changed reads as `no changes` with no listing, traffic having moved
/// counters; an element edited or added by hand is read from the dump and repaired; a rule
/// added by hand changes the shape, so the table is listed and the rule removed.
#[test]
fn after_another_writers_commit_the_table_is_dumped_not_listed() {
    if !prerequisites() {
        return;
    }
    let t = Topology::new().unwrap();
    let _servers: Vec<Server> = [
        (Proto::Tcp, "0.0.0.0:1234"),
        (Proto::Udp, "0.0.0.0:1234"),
        (Proto::Tcp, "[fd00:2::2]:1234"),
        (Proto::Tcp, "0.0.0.0:6005"),
    ]
    .into_iter()
    .map(|(p, a)| Server::start(&t.backend, p, sa(a)).unwrap())
    .collect();
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])
        .unwrap();
    // Plain forwards (map elements), a range by listen address and a forward with sources
    // (chains of their own, with counters), both families.
    let params = json!({"backend": "nftables", "forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        {"name": "dns", "proto": "udp", "listen_port": 5353, "to": "10.0.2.2:1234"},
        {"name": "web6", "listen_port": 4321, "to": "[fd00:2::2]:1234"},
        {"name": "range", "listen_address": "10.0.1.1", "listen_port": "6000-6010", "to": "10.0.2.2", "snat": "10.0.2.1"},
        {"name": "keep", "listen_port": 4600, "to": "10.0.2.2:1234", "snat": "none", "sources": ["10.0.1.0/24"], "in_interface": "eth0"}
    ]});
    let first = run(&t.proxy, &params, &[]);
    assert!(first.changed(), "{}", first.stdout);
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(only_record(&t.proxy)).unwrap()).unwrap();
    assert!(
        record["read_cache"]["shape"].is_u64(),
        "the write recorded the table's shape: {record}"
    );
    let proxy_side: std::net::IpAddr = "10.0.2.1".parse().unwrap();
    let client: std::net::IpAddr = "10.0.1.2".parse().unwrap();
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4600")).unwrap(),
        client
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:6005")).unwrap(),
        proxy_side
    );

    t.proxy.exec(&["nft", "add table ip other"]).unwrap();
    let log = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let quiet = run(&t.proxy, &params, &[("PATH", &log.path())]);
    assert!(!quiet.changed() && !quiet.failed(), "{}", quiet.stdout);
    assert_eq!(listings(&log), Vec::<String>::new(), "dumped, not listed");

    // By hand: web's element now sends elsewhere, and an element nobody wrote.
    let table = "inet portfwd-portfwd";
    let nat = t
        .proxy
        .stdout(&[
            "nft",
            "list",
            "map",
            "inet",
            "portfwd-portfwd",
            "pre-port4-nat",
        ])
        .unwrap();
    let comment = nat
        .split('"')
        .find(|c| c.starts_with("portfwd:fwd:web:"))
        .expect("web's element")
        .to_string();
    t.proxy
        .exec(&[
            "nft",
            &format!("delete element {table} pre-port4-nat {{ tcp . 4321 }}"),
        ])
        .unwrap();
    t.proxy
        .exec(&["nft", &format!("add element {table} pre-port4-nat {{ tcp . 4321 comment \"{comment}\" : 10.0.2.2 . 9999 }}")])
        .unwrap();
    t.proxy
        .exec(&[
            "nft",
            &format!("add element {table} pre-port4-mark {{ udp . 7777 }}"),
        ])
        .unwrap();
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "broken by hand"
    );
    let log = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let repaired = run(&t.proxy, &params, &[("PATH", &log.path())]);
    assert!(repaired.changed(), "{}", repaired.stdout);
    let msg = repaired.json["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("element {comment} of map pre-port4-nat edited"))
            && msg.contains("element of map pre-port4-mark not written by portfwd"),
        "{msg}"
    );
    assert_eq!(listings(&log), Vec::<String>::new(), "dumped, not listed");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        proxy_side
    );
    let mark = t
        .proxy
        .stdout(&[
            "nft",
            "list",
            "set",
            "inet",
            "portfwd-portfwd",
            "pre-port4-mark",
        ])
        .unwrap();
    assert!(!mark.contains("7777"), "{mark}");

    // A rule by hand in a base chain: another shape, so the table is listed and repaired.
    t.proxy
        .exec(&[
            "nft",
            &format!("insert rule {table} prerouting tcp dport 4321 drop"),
        ])
        .unwrap();
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "broken by hand"
    );
    let log = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let listed = run(&t.proxy, &params, &[("PATH", &log.path())]);
    assert!(listed.changed(), "{}", listed.stdout);
    assert!(!listings(&log).is_empty(), "another shape is listed");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        proxy_side
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("[fd00:1::1]:4321")).unwrap(),
        "fd00:2::1".parse::<std::net::IpAddr>().unwrap()
    );
    // The repair recorded the shape again: the next commit by another writer is dumped.
    t.proxy.exec(&["nft", "add table ip other2"]).unwrap();
    let log = portfwd_harness::shims::CallLog::new(&["nft"]).unwrap();
    let quiet = run(&t.proxy, &params, &[("PATH", &log.path())]);
    assert!(!quiet.changed(), "{}", quiet.stdout);
    assert_eq!(listings(&log), Vec::<String>::new(), "dumped, not listed");
}
