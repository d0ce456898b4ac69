//! `portfwd-lab`: builds namespace topologies, applies desired states with the real `portfwd`
//! binary and proves with traffic what the backend sees.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use portfwd_harness::netns::{delete_namespace, leftovers, PREFIX};
use portfwd_harness::topology::{ruleset, Topology};
use portfwd_harness::{probe, LabError, Portfwd, Proto, Server};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "portfwd-lab",
    version,
    about = "Network-namespace lab for portfwd: topologies, the real binary, real traffic",
    after_help = "Needs root, iproute2 and iptables. Namespaces are named pfl-<pid>-<n>-<role> and removed on exit, failure and Ctrl-C. The portfwd binary is taken from PORTFWD_BIN or found next to portfwd-lab."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Narrated run of seed 000: a cross-host forward, then one that keeps the client address.
    Demo,
    /// Remove namespaces left behind by crashed portfwd-lab runs (only portfwd-lab's own).
    Clean,
}

fn main() -> ExitCode {
    guard_signals();
    match Cli::parse().command {
        Command::Clean => {
            let stale = leftovers();
            for name in &stale {
                delete_namespace(name);
            }
            println!("removed {} leftover namespace(s)", stale.len());
            ExitCode::SUCCESS
        }
        Command::Demo => match demo() {
            Ok(0) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(e) => {
                eprintln!("portfwd-lab: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// On Ctrl-C or SIGTERM, delete this process's namespaces before exiting. The signals are
/// blocked in every thread and taken synchronously by one thread, so cleanup is not limited
/// to async-signal-safe calls.
fn guard_signals() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            let own = format!("{PREFIX}{}-", std::process::id());
            if let Ok(out) = std::process::Command::new("ip")
                .args(["netns", "list"])
                .output()
            {
                for name in String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                {
                    if name.starts_with(&own) {
                        delete_namespace(name);
                    }
                }
            }
            eprintln!("portfwd-lab: interrupted, namespaces removed");
            std::process::exit(130);
        }
    });
}

/// Counts checks and prints one line each.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: &str) {
        if ok {
            self.passed += 1;
            println!("  ok   {what}{detail}");
        } else {
            self.failed += 1;
            println!("  FAIL {what}{detail}");
        }
    }

    fn seen(&mut self, t: &Topology, proto: Proto, target: &str, expect: &str, meaning: &str) {
        let name = if proto == Proto::Tcp { "tcp" } else { "udp" };
        let label = format!("client -> {target}/{name}");
        match sock(target).and_then(|target| probe(&t.client, proto, target)) {
            Ok(ip) => self.check(
                &label,
                ip.to_string() == expect,
                &format!(": the backend saw {ip} (expected {expect}, {meaning})"),
            ),
            Err(e) => self.check(&label, false, &format!(": {e}")),
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show_run(label: &str, run: &portfwd_harness::RunResult) {
    println!("$ {label}");
    println!(
        "  changed={} failed={} msg={:?}",
        run.changed(),
        run.failed(),
        run.msg()
    );
    for w in run.json["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", w.as_str().unwrap_or_default());
    }
}

fn demo() -> Result<usize, LabError> {
    let portfwd = Portfwd::locate()?;
    let mut checks = Checks::default();
    step("topology (network namespaces, removed at exit)");
    let t = Topology::new()?;
    println!("  client 10.0.1.2 --- 10.0.1.1 proxy 10.0.2.1 --- 10.0.2.2 backend");
    println!("  the backend has no route to the client; it runs echo servers on tcp+udp 1234");
    println!("  that answer with the source address they saw");
    let _tcp = Server::start(&t.backend, Proto::Tcp, sock("0.0.0.0:1234")?)?;
    let _udp = Server::start(&t.backend, Proto::Udp, sock("0.0.0.0:1234")?)?;
    let before = probe(&t.client, Proto::Tcp, sock("10.0.1.1:4321")?);
    checks.check(
        "before portfwd: client -> 10.0.1.1:4321 does not reach the backend",
        before.is_err(),
        "",
    );

    step("seed 000 #1: DNAT + masquerade across hosts");
    let params = json!({"forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"},
        {"name": "dns", "proto": "udp", "listen_port": 5353, "to": "10.0.2.2:1234"}
    ]});
    println!(
        "desired state on the proxy:\n{}",
        serde_json::to_string_pretty(&params).unwrap_or_default()
    );
    let plan = portfwd.run(&t.proxy, &["plan"], &params.to_string(), &[])?;
    println!("$ portfwd plan\n{}", indent(&plan.stdout));
    let first = portfwd.apply(&t.proxy, &params)?;
    show_run("portfwd apply", &first);
    checks.check(
        "apply succeeded and changed the host",
        first.changed() && !first.failed(),
        "",
    );
    checks.seen(
        &t,
        Proto::Tcp,
        "10.0.1.1:4321",
        "10.0.2.1",
        "the proxy: masquerade",
    );
    checks.seen(
        &t,
        Proto::Udp,
        "10.0.1.1:5353",
        "10.0.2.1",
        "the proxy: masquerade",
    );
    let second = portfwd.apply(&t.proxy, &params)?;
    show_run("portfwd apply   (same params again)", &second);
    checks.check(
        "second run is a no-op",
        !second.changed() && second.json["commands"] == json!([]),
        "",
    );

    step("keep the client's address: snat none, the proxy is the backend's gateway (seed 003)");
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])?;
    let keep = json!({"forwards": [
        {"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234", "snat": "none"},
        {"name": "dns", "proto": "udp", "listen_port": 5353, "to": "10.0.2.2:1234"}
    ]});
    let changed = portfwd.run(&t.proxy, &["apply", "--diff"], &keep.to_string(), &[])?;
    show_run("portfwd apply --diff   (web: snat none)", &changed);
    checks.check(
        "only the edited forward changed",
        changed.json["forwards"]["updated"] == json!(["web"]),
        "",
    );
    checks.seen(
        &t,
        Proto::Tcp,
        "10.0.1.1:4321",
        "10.0.1.2",
        "the client itself",
    );
    checks.seen(
        &t,
        Proto::Udp,
        "10.0.1.1:5353",
        "10.0.2.1",
        "still masqueraded",
    );

    step("state: absent removes everything portfwd owns");
    let absent = portfwd.apply(&t.proxy, &json!({"state": "absent"}))?;
    show_run("portfwd apply   {\"state\": \"absent\"}", &absent);
    let left = ruleset(&t.proxy, "iptables-save")?;
    checks.check(
        "no portfwd rule is left",
        absent.changed() && !left.contains("PFWD"),
        "",
    );
    checks.check(
        "the forward is gone",
        probe(&t.client, Proto::Tcp, sock("10.0.1.1:4321")?).is_err(),
        "",
    );

    println!("\n{} passed, {} failed", checks.passed, checks.failed);
    Ok(checks.failed)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sock(text: &str) -> Result<SocketAddr, LabError> {
    text.parse()
        .map_err(|_| LabError::Traffic(format!("{text} is not a socket address")))
}
