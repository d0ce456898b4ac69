//! `portfwd`: an Ansible binary module (`portfwd ARGS_FILE`) and a JSON-in/JSON-out CLI.
//!
//! Thin on purpose: it parses the command line, takes the run lock, calls the engine and prints
//! one JSON object. Exit codes: 0 success (changed or not), 1 the run failed, 2 usage error.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

mod cli;
mod trace;
use cli::{BackendArg, Cli, Command, Input};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portfwd::{line_diff, Backend, Config, RealSystem, Report, RunLock, RunMode};

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::IptablesNft => Backend::IptablesNft,
            BackendArg::IptablesLegacy => Backend::IptablesLegacy,
            BackendArg::Nftables => Backend::Nftables,
        }
    }
}

/// Prints a line to stdout; a closed stdout (`portfwd show | head`) is not worth a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Like [`say!`] without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

const SUBCOMMANDS: [&str; 9] = [
    "apply", "plan", "show", "list", "schema", "restore", "doctor", "trace", "help",
];

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // Ansible runs a binary module as `MODULE ARGS_FILE`.
    if argv.len() == 2 && !argv[1].starts_with('-') && !SUBCOMMANDS.contains(&argv[1].as_str()) {
        let report = match std::fs::read_to_string(&argv[1]) {
            Ok(text) => converge(&text, RunMode::default(), 30, None),
            Err(e) => Report::failure(format!("cannot read args file {}: {e}", argv[1])),
        };
        return emit(&report);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Apply { input, check, diff } => {
            let report = match read_input(&input) {
                Ok(text) => converge(
                    &text,
                    RunMode { check, diff },
                    input.lock_timeout,
                    input.state_dir.clone(),
                ),
                Err(msg) => Report::failure(msg),
            };
            emit(&report)
        }
        Command::Plan {
            input,
            json,
            detailed_exitcode,
        } => {
            let report = match read_input(&input) {
                Ok(text) => converge(
                    &text,
                    RunMode {
                        check: true,
                        diff: true,
                    },
                    input.lock_timeout,
                    input.state_dir.clone(),
                ),
                Err(msg) => Report::failure(msg),
            };
            let code = if json || report.failed {
                emit(&report)
            } else {
                print_plan(&report);
                ExitCode::SUCCESS
            };
            // Terraform's convention: 2 means "changes pending".
            if detailed_exitcode && !report.failed && report.changed {
                return ExitCode::from(2);
            }
            code
        }
        Command::Restore {
            state_dir,
            lock_timeout,
        } => restore(state_dir, lock_timeout),
        Command::List { json, state_dir } => list(json, state_dir),
        Command::Show {
            instance,
            backend,
            route_protocol,
        } => {
            if !portfwd::valid_instance(&instance) {
                return emit(&Report::failure(format!(
                    "--instance: {instance:?} {}",
                    portfwd::INSTANCE_RULE
                )));
            }
            if !portfwd::has_net_admin() {
                return emit(&Report::failure(portfwd::NEEDS_ROOT));
            }
            let mut sys = RealSystem::new();
            match portfwd::show(&instance, route_protocol, backend.into(), &mut sys) {
                Ok(params) => {
                    say!(
                        "{}",
                        serde_json::to_string_pretty(&params).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => emit(&Report::failure(e.to_string())),
            }
        }
        Command::Doctor {
            file,
            json,
            instance,
            state_dir,
            probe,
        } => doctor(file, json, &instance, state_dir, probe),
        Command::Trace {
            proto,
            dport,
            src,
            dst,
            count,
            timeout,
            json,
            instance,
            clean,
        } => {
            if clean {
                return trace::clean();
            }
            let proto = match proto.as_deref() {
                Some("udp") => portfwd::Proto::Udp,
                _ => portfwd::Proto::Tcp,
            };
            let src = match src.map(|s| portfwd::Cidr::parse(&s).map_err(|e| (s, e.to_string()))) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err((s, e))) => {
                    return emit(&Report::failure(format!("--src: {s:?} {e}")));
                }
            };
            let dst = match dst.map(|d| d.parse::<std::net::IpAddr>().map_err(|_| d)) {
                None => None,
                Some(Ok(a)) => Some(a),
                Some(Err(d)) => {
                    return emit(&Report::failure(format!(
                        "--dst: {d:?} is not an IP address"
                    )));
                }
            };
            if !portfwd::valid_instance(&instance) {
                return emit(&Report::failure(format!(
                    "--instance: {instance:?} {}",
                    portfwd::INSTANCE_RULE
                )));
            }
            trace::run(trace::Options {
                filter: portfwd::trace::Filter {
                    proto,
                    dport: dport.unwrap_or_default(),
                    src,
                    dst,
                },
                count: count.max(1),
                timeout: Duration::from_secs(timeout),
                json,
                instance,
            })
        }
        Command::Schema => {
            say!(
                "{}",
                serde_json::to_string_pretty(&portfwd::schema()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
    }
}

/// The params text, or the message saying why it could not be read.
fn read_input(input: &Input) -> Result<String, String> {
    match &input.file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => Err(
            "no params given: stdin is a terminal; pass --file FILE or pipe the params JSON in (portfwd apply < forwards.json)".to_string(),
        ),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map(|_| text)
                .map_err(|e| format!("cannot read params from stdin: {e}"))
        }
    }
}

/// Validates everything, then runs the engine under the lock. Flags from the command line add
/// to the `_ansible_*` modes found in the params.
fn converge(text: &str, flags: RunMode, lock_timeout: u64, state_dir: Option<PathBuf>) -> Report {
    let (config, _, mode) = match portfwd::phases::timed("parse", || Config::from_json(text)) {
        Ok(parsed) => parsed,
        Err(e) => return Report::failure(e.to_string()),
    };
    let mode = RunMode {
        check: mode.check || flags.check,
        diff: mode.diff || flags.diff,
    };
    // Before the lock: without the privilege its path is the first thing to fail, with a
    // text that does not say why.
    if !portfwd::has_net_admin() {
        return Report::failure(portfwd::NEEDS_ROOT);
    }
    let _lock = match RunLock::acquire(&RunLock::default_path(), Duration::from_secs(lock_timeout))
    {
        Ok(lock) => lock,
        Err(e) => return Report::failure(e.to_string()),
    };
    let mut sys = RealSystem::new();
    if let Some(dir) = state_dir {
        sys = sys.with_state_dir(dir);
    }
    portfwd::run(&config, mode, &mut sys)
}

/// The params `doctor` diagnoses: --file, else piped stdin, else the instance's stored params,
/// else its installed state.
fn doctor_params(
    file: Option<PathBuf>,
    instance: &str,
    state_dir: Option<PathBuf>,
) -> Result<Config, String> {
    use std::io::IsTerminal as _;
    let text = match file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None if !std::io::stdin().is_terminal() => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read params from stdin: {e}"))?;
            text
        }
        None => String::new(),
    };
    if !text.trim().is_empty() {
        return Config::from_json(&text)
            .map(|(config, _, _)| config)
            .map_err(|e| e.to_string());
    }
    if !portfwd::valid_instance(instance) {
        return Err(format!(
            "--instance: {instance:?} {}",
            portfwd::INSTANCE_RULE
        ));
    }
    let dir = state_dir.unwrap_or_else(portfwd::default_state_dir);
    let mut sys = RealSystem::new().with_state_dir(dir);
    if let Some(stored) = sys.stored_params(instance).map_err(|e| e.to_string())? {
        return Config::from_json(&stored)
            .map(|(config, _, _)| config)
            .map_err(|e| e.to_string());
    }
    let installed =
        portfwd::show(instance, None, Backend::Iptables, &mut sys).map_err(|e| e.to_string())?;
    installed.validate().map_err(|e| e.to_string())
}

/// `portfwd doctor`: findings as lines (or JSON); exit 1 when one is an error.
fn doctor(
    file: Option<PathBuf>,
    json: bool,
    instance: &str,
    state_dir: Option<PathBuf>,
    probe: bool,
) -> ExitCode {
    if !portfwd::has_net_admin() {
        return emit(&Report::failure(portfwd::NEEDS_ROOT));
    }
    let config = match doctor_params(file, instance, state_dir) {
        Ok(config) => config,
        Err(msg) => return emit(&Report::failure(msg)),
    };
    let mut sys = RealSystem::new();
    let diagnosis = match portfwd::doctor(&config, probe, &mut sys) {
        Ok(d) => d,
        Err(e) => return emit(&Report::failure(e.to_string())),
    };
    if json {
        say!("{}", serde_json::to_string(&diagnosis).unwrap_or_default());
    } else {
        if diagnosis.findings.is_empty() {
            say!("ok: nothing found that keeps the forwards from working");
        }
        for f in &diagnosis.findings {
            let severity = serde_json::to_value(f.severity).unwrap_or_default();
            say!(
                "{} {}{}: {}",
                severity.as_str().unwrap_or("?"),
                f.id,
                entry_label(f),
                f.msg
            );
            say!("    fix: {}", f.fix);
        }
        for f in &diagnosis.ignored {
            say!("ignored {}{}: {}", f.id, entry_label(f), f.msg);
        }
    }
    if diagnosis.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// ` [forwards.web]` when the finding concerns one entry.
fn entry_label(f: &portfwd::Finding) -> String {
    f.entry
        .as_ref()
        .map(|e| format!(" [{e}]"))
        .unwrap_or_default()
}

/// `portfwd list`: one line per instance (or JSON).
fn list(json: bool, state_dir: Option<PathBuf>) -> ExitCode {
    if !portfwd::has_net_admin() {
        return emit(&Report::failure(portfwd::NEEDS_ROOT));
    }
    let mut sys = RealSystem::new();
    if let Some(dir) = state_dir {
        sys = sys.with_state_dir(dir);
    }
    let listed = match portfwd::list(&mut sys) {
        Ok(listed) => listed,
        Err(e) => return emit(&Report::failure(e.to_string())),
    };
    if json {
        say!("{}", serde_json::json!({ "instances": listed }));
        return ExitCode::SUCCESS;
    }
    if listed.is_empty() {
        say!("no portfwd instance on this host");
        return ExitCode::SUCCESS;
    }
    say!(
        "{:<12}  {:<15}  {:>8}  {:>10}  {:>9}  {:>13}  {:<7}  CONVERGED",
        "INSTANCE",
        "BACKEND",
        "FORWARDS",
        "MASQUERADE",
        "ADDRESSES",
        "POLICY_ROUTES",
        "PERSIST"
    );
    for l in &listed {
        let backend = serde_json::to_value(l.backend).unwrap_or_default();
        let converged = match l.converged {
            Some(true) => format!("yes ({})", l.compared_with),
            Some(false) => format!("no ({}): {}", l.compared_with, l.msg),
            None => format!("unknown: {}", l.msg),
        };
        say!(
            "{:<12}  {:<15}  {:>8}  {:>10}  {:>9}  {:>13}  {:<7}  {converged}",
            l.instance,
            backend.as_str().unwrap_or("?"),
            l.forwards,
            l.masquerade,
            l.addresses,
            l.policy_routes,
            if l.persist { "yes" } else { "no" },
        );
    }
    ExitCode::SUCCESS
}

/// Applies every stored instance; prints `{"failed", "changed", "msg", "counts": {"succeeded",
/// "changed", "failed"}, "instances": {name: result}}`.
fn restore(state_dir: Option<PathBuf>, lock_timeout: u64) -> ExitCode {
    let dir = state_dir.unwrap_or_else(portfwd::default_state_dir);
    let sys = RealSystem::new().with_state_dir(dir.clone());
    let names = match sys.stored_instances() {
        Ok(names) => names,
        Err(e) => return emit(&Report::failure(e.to_string())),
    };
    let mut results = serde_json::Map::new();
    let (mut succeeded, mut changed, mut failed) = (0usize, 0usize, Vec::new());
    let mut skipped = 0usize;
    for name in &names {
        // Params stored in another network namespace sharing this state dir are its own.
        match sys.stored_namespace(name) {
            Ok((_, true)) => {}
            Ok((owner, false)) => {
                skipped += 1;
                results.insert(name.clone(), serde_json::json!({
                    "skipped": true,
                    "changed": false,
                    "failed": false,
                    "msg": format!("stored for network namespace {owner:?}, not this one: it is restored there (ip netns exec {owner} portfwd restore)"),
                }));
                continue;
            }
            Err(e) => {
                failed.push(name.as_str());
                results.insert(name.clone(), Report::failure(e.to_string()).to_json());
                continue;
            }
        }
        let path = dir.join(format!("{name}.json"));
        let report = match std::fs::read_to_string(&path) {
            Ok(text) => converge(&text, RunMode::default(), lock_timeout, Some(dir.clone())),
            Err(e) => Report::failure(format!("cannot read {}: {e}", path.display())),
        };
        if report.failed {
            failed.push(name.as_str());
        } else {
            succeeded += 1;
        }
        changed += usize::from(report.changed);
        results.insert(name.clone(), report.to_json());
    }
    let failures = if failed.is_empty() {
        String::new()
    } else {
        format!(" ({})", failed.join(", "))
    };
    let summary = serde_json::json!({
        "changed": changed > 0,
        "failed": !failed.is_empty(),
        "msg": format!(
            "restored {} stored instance(s) from {}: {succeeded} succeeded ({changed} changed), {} failed{failures}, {skipped} of other network namespaces skipped",
            names.len() - skipped,
            dir.display(),
            failed.len()
        ),
        "counts": {"succeeded": succeeded, "changed": changed, "failed": failed.len(), "skipped": skipped},
        "instances": results,
    });
    say!("{summary}");
    if !failed.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn emit(report: &Report) -> ExitCode {
    let mut json = report.to_json();
    if let Some(phases) = portfwd::phases::json() {
        json["phases"] = phases;
    }
    say!("{json}");
    if report.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_plan(report: &Report) {
    say!("{}", report.msg);
    if let Some(diff) = &report.diff {
        say_raw!("{}", line_diff(&diff.before, &diff.after));
    }
    if !report.commands.is_empty() {
        say!("\nwould run:");
        for command in &report.commands {
            say!("  {command}");
        }
    }
    for warning in &report.warnings {
        say!("warning: {warning}");
    }
}
