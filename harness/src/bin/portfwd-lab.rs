//! `portfwd-lab`: builds namespace topologies, applies desired states with the real `portfwd`
//! binary and proves with traffic what the backend sees.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portfwd_harness::lab::{Lab, Naming};
use portfwd_harness::netns::{all_namespaces, delete_namespace, leftovers, PREFIX, UP_PREFIX};
use portfwd_harness::runner::{find_scenarios, junit, run_scenario, RunOptions};
use portfwd_harness::scenario::{ProtoSpec, Scenario};
use portfwd_harness::topology::{ruleset, Topology};
use portfwd_harness::{probe, LabError, Portfwd, Proto, Server};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(
    name = "portfwd-lab",
    version,
    about = "Network-namespace lab for portfwd: topologies, the real binary, real traffic",
    after_help = "Needs root, iproute2 and iptables (tcpdump for --pcap, conntrack for failure reports). \
        Namespaces are named pfl-<pid>-<n>-<node> and removed on exit, failure and Ctrl-C; `up` uses pfl-up-<node> \
        until `down`. The portfwd binary is taken from PORTFWD_BIN or found next to portfwd-lab; its lock, \
        state and record files live in a temporary directory, never in /etc or /run/portfwd."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios (all in the scenario directory when none are named); ends with "N passed, N failed" (steps).
    Run {
        /// Scenario names (in --dir) or paths to YAML files.
        scenarios: Vec<String>,
        /// Directory of scenario files [default: ./harness/scenarios, else the one shipped with the source].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Capture each node's interfaces (tcpdump) during every step; keep the captures of failing steps here.
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// Apply with this backend wherever a scenario does not pin one (`backend:` in its params).
        #[arg(long, value_parser = ["iptables", "iptables-nft", "iptables-legacy", "nftables"])]
        backend: Option<String>,
    },
    /// Narrated run: a cross-host forward, then one that keeps the client address.
    Demo,
    /// Build a scenario's topology and leave it running (namespaces pfl-up-<node>, echo servers started).
    Up {
        scenario: String,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Remove the topology made by `up`.
    Down,
    /// Run a command inside a node of the topology made by `up`: exec NODE -- CMD...
    Exec {
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove namespaces left behind by crashed portfwd-lab runs (only portfwd-lab's own).
    Clean,
    /// Run an echo server in the current namespace until killed (used by `up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        udp: bool,
        #[arg(long)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. } | Command::Exec { .. }) {
        guard_signals();
    }
    let result = match cli.command {
        Command::Run {
            scenarios,
            dir,
            junit,
            pcap,
            backend,
        } => run(&scenarios, dir, junit, pcap, backend.as_deref()),
        Command::Demo => demo(),
        Command::Up { scenario, dir } => up(&scenario, dir),
        Command::Down => {
            let ours: Vec<String> = all_namespaces()
                .into_iter()
                .filter(|n| n.starts_with(UP_PREFIX))
                .collect();
            for name in &ours {
                delete_namespace(name);
            }
            println!("removed {} namespace(s)", ours.len());
            Ok(true)
        }
        Command::Exec { node, command } => return exec(&node, &command),
        Command::Clean => {
            let stale = leftovers();
            for name in &stale {
                delete_namespace(name);
            }
            println!("removed {} leftover namespace(s)", stale.len());
            Ok(true)
        }
        Command::Serve { udp, port } => serve(udp, port),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("portfwd-lab: {e}");
            ExitCode::from(1)
        }
    }
}

/// On Ctrl-C or SIGTERM, delete this process's namespaces before exiting. signal-hook's
/// handler only wakes a thread through a pipe, so the clean-up runs outside signal context,
/// and no signal mask is changed that child processes (tcpdump, portfwd) would inherit.
fn guard_signals() {
    let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let own = format!("{PREFIX}{}-", std::process::id());
            for name in all_namespaces().iter().filter(|n| n.starts_with(&own)) {
                delete_namespace(name);
            }
            eprintln!("portfwd-lab: interrupted, namespaces removed");
            std::process::exit(130);
        }
    });
}

fn scenario_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| {
        let local = PathBuf::from("harness/scenarios");
        if local.is_dir() {
            local
        } else {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios"))
        }
    })
}

fn run(
    names: &[String],
    dir: Option<PathBuf>,
    junit_file: Option<PathBuf>,
    pcap: Option<PathBuf>,
    backend: Option<&str>,
) -> Result<bool, LabError> {
    let portfwd = Portfwd::locate()?;
    let paths = find_scenarios(&scenario_dir(dir), names)?;
    let mut scenarios = paths
        .iter()
        .map(|p| Scenario::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(backend) = backend {
        println!("backend: {backend} (where a scenario does not pin one)");
        for scenario in &mut scenarios {
            scenario.default_backend(backend);
        }
    }
    let options = RunOptions { pcap };
    let mut outcomes = Vec::new();
    for scenario in &scenarios {
        outcomes.push(run_scenario(scenario, &portfwd, &options, &mut |line| {
            println!("{line}")
        }));
    }
    let steps = outcomes.iter().flat_map(|o| &o.steps);
    let (passed, failed) = steps.fold(
        (0, 0),
        |(p, f), s| if s.passed() { (p + 1, f) } else { (p, f + 1) },
    );
    for o in &outcomes {
        let bad = o.steps.iter().filter(|s| !s.passed()).count();
        println!(
            "{:<32} {}",
            o.name,
            if bad == 0 {
                "ok".to_string()
            } else {
                format!("{bad} step(s) FAILED")
            }
        );
    }
    if let Some(file) = junit_file {
        std::fs::write(&file, junit(&outcomes))
            .map_err(|e| LabError::Traffic(format!("{}: {e}", file.display())))?;
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

fn up(name: &str, dir: Option<PathBuf>) -> Result<bool, LabError> {
    if all_namespaces().iter().any(|n| n.starts_with(UP_PREFIX)) {
        return Err(LabError::Traffic(
            "a topology is already up: run `portfwd-lab down` first".into(),
        ));
    }
    let paths = find_scenarios(&scenario_dir(dir), &[name.to_string()])?;
    let scenario = Scenario::load(&paths[0])?;
    let lab = match Lab::build(&scenario, Naming::Up, false) {
        Ok(lab) => lab,
        Err(e) => {
            for n in all_namespaces().iter().filter(|n| n.starts_with(UP_PREFIX)) {
                delete_namespace(n);
            }
            return Err(e);
        }
    };
    let me = std::env::current_exe().map_err(|e| LabError::Traffic(e.to_string()))?;
    for (node, spec) in &scenario.nodes {
        for server in &spec.servers {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", lab.nodes[node].name()])
                .arg(&me)
                .args(["serve", "--port", &server.port.to_string()]);
            if server.proto == ProtoSpec::Udp {
                cmd.arg("--udp");
            }
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            cmd.spawn()
                .map_err(|e| LabError::Traffic(format!("starting server: {e}")))?;
        }
    }
    println!("{} is up:", scenario.name);
    for (node, ns) in &lab.nodes {
        let addrs: Vec<String> = lab
            .addresses
            .get(node)
            .map(|a| a.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        println!("  {node:<10} {}  {}", ns.name(), addrs.join(" "));
    }
    println!("try: portfwd-lab exec proxy -- iptables-save    then: portfwd-lab down");
    Ok(true)
}

fn exec(node: &str, command: &[String]) -> ExitCode {
    let ns = format!("{UP_PREFIX}{node}");
    if !all_namespaces().contains(&ns) {
        eprintln!("portfwd-lab: no node {node:?} is up (run `portfwd-lab up SCENARIO`)");
        return ExitCode::from(2);
    }
    match std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(command)
        .status()
    {
        Ok(status) => ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ),
        Err(e) => {
            eprintln!("portfwd-lab: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(udp: bool, port: u16) -> Result<bool, LabError> {
    let proto = if udp { Proto::Udp } else { Proto::Tcp };
    let _server = Server::start_here(proto, SocketAddr::from(([0u16; 8], port)))?;
    loop {
        std::thread::park();
    }
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

fn demo() -> Result<bool, LabError> {
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

    step("DNAT + masquerade across hosts");
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

    step("keep the client's address: snat none, the proxy is the backend's gateway");
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
    Ok(checks.failed == 0)
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
