//! `portfwd`: an Ansible binary module (`portfwd ARGS_FILE`) and a JSON-in/JSON-out CLI.
//!
//! Thin on purpose: it parses the command line, takes the run lock, calls the engine and prints
//! one JSON object. Exit codes: 0 success (changed or not), 1 the run failed, 2 usage error.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[cfg(target_env = "gnu")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portfwd::{line_diff, Backend, Config, RealSystem, Report, RunLock, RunMode};

#[derive(Parser)]
#[command(
    name = "portfwd",
    version,
    about = "Declarative NAT port forwarding for Linux: desired state in, minimal atomic change out",
    long_about = "Declarative NAT port forwarding for Linux: iptables NAT and FORWARD rules, interface \
        addresses, policy routing (ip rule / ip route) and forwarding sysctls.\n\n\
        Reads the current state (iptables-save, ip6tables-save, ip -j rule/route/addr, /proc/sys), diffs it \
        against the desired state given as JSON params, and applies the minimal change: ip -batch additions, \
        one iptables-restore --noflush transaction per table, sysctl writes, ip -batch removals, rolling \
        everything back if any step fails. After a committed change it deletes the conntrack entries the \
        change made stale (UDP flows; TCP connections of forwards with reset_connections), so live flows \
        follow the change.\n\n\
        As an Ansible binary module it is run as `portfwd ARGS_FILE`; ARGS_FILE holds the params plus \
        Ansible's _ansible_* keys (check and diff mode are honoured).\n\n\
        Exit codes: 0 success (changed or not), 1 the run failed (the JSON says failed: true and why), \
        2 usage error.",
    after_help = "Environment: PORTFWD_LOCK_FILE (default /run/portfwd.lock), PORTFWD_STATE_DIR (default /etc/portfwd), PORTFWD_RUN_DIR (default /run/portfwd: the record of what portfwd created), PORTFWD_NO_NETNS_COOKIE=1 (key that record as on kernels before 5.14). Tools are found on PATH (conntrack is optional: without it stale flows are only warned about)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Converge the host to the params (JSON from --file, or stdin) and print the result JSON.
    Apply {
        #[command(flatten)]
        input: Input,
        /// Report what would change without touching anything.
        #[arg(long)]
        check: bool,
        /// Include a before/after diff keyed by entry names.
        #[arg(long)]
        diff: bool,
    },
    /// Show what apply would change, as a readable diff (or the result JSON with --json).
    Plan {
        #[command(flatten)]
        input: Input,
        /// Print the result JSON (as `apply --check --diff`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the instance's current managed state as params JSON (applying it is a no-op).
    Show {
        /// The instance to read.
        #[arg(long, default_value = "portfwd")]
        instance: String,
        /// iptables flavour to read.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// The instance's route_protocol, when it set one.
        #[arg(long)]
        route_protocol: Option<u8>,
    },
    /// Re-apply every instance stored with `persist: true` (run at boot by portfwd-restore.service).
    Restore {
        /// Directory of stored params [default: $PORTFWD_STATE_DIR or /etc/portfwd].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds to wait for another portfwd run to finish.
        #[arg(long, default_value_t = 30)]
        lock_timeout: u64,
    },
    /// Print the JSON Schema of the params.
    Schema,
}

#[derive(Args)]
struct Input {
    /// Params JSON file; stdin when omitted.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Seconds to wait for another portfwd run to finish.
    #[arg(long, default_value_t = 30)]
    lock_timeout: u64,
    /// Where `persist: true` stores params [default: $PORTFWD_STATE_DIR or /etc/portfwd].
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Nft,
    Legacy,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Nft => Backend::Nft,
            BackendArg::Legacy => Backend::Legacy,
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

const SUBCOMMANDS: [&str; 6] = ["apply", "plan", "show", "schema", "restore", "help"];

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
        Command::Plan { input, json } => {
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
            if json || report.failed {
                return emit(&report);
            }
            print_plan(&report);
            ExitCode::SUCCESS
        }
        Command::Restore {
            state_dir,
            lock_timeout,
        } => restore(state_dir, lock_timeout),
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
            let mut sys = RealSystem::new(backend.into());
            match portfwd::show(&instance, route_protocol, &mut sys) {
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
    let (config, _, mode) = match Config::from_json(text) {
        Ok(parsed) => parsed,
        Err(e) => return Report::failure(e.to_string()),
    };
    let mode = RunMode {
        check: mode.check || flags.check,
        diff: mode.diff || flags.diff,
    };
    let _lock = match RunLock::acquire(&RunLock::default_path(), Duration::from_secs(lock_timeout))
    {
        Ok(lock) => lock,
        Err(e) => return Report::failure(e.to_string()),
    };
    let mut sys = RealSystem::new(config.backend());
    if let Some(dir) = state_dir {
        sys = sys.with_state_dir(dir);
    }
    portfwd::run(&config, mode, &mut sys)
}

/// Applies every stored instance; prints `{"failed", "changed", "msg", "instances": {name: result}}`.
fn restore(state_dir: Option<PathBuf>, lock_timeout: u64) -> ExitCode {
    let dir = state_dir.unwrap_or_else(portfwd::default_state_dir);
    let sys = RealSystem::new(Backend::Auto).with_state_dir(dir.clone());
    let names = match sys.stored_instances() {
        Ok(names) => names,
        Err(e) => return emit(&Report::failure(e.to_string())),
    };
    let mut results = serde_json::Map::new();
    let (mut failed, mut changed) = (false, false);
    for name in &names {
        let path = dir.join(format!("{name}.json"));
        let report = match std::fs::read_to_string(&path) {
            Ok(text) => converge(&text, RunMode::default(), lock_timeout, Some(dir.clone())),
            Err(e) => Report::failure(format!("cannot read {}: {e}", path.display())),
        };
        failed |= report.failed;
        changed |= report.changed;
        results.insert(name.clone(), report.to_json());
    }
    let summary = serde_json::json!({
        "changed": changed,
        "failed": failed,
        "msg": format!("restored {} stored instance(s) from {}{}", names.len(), dir.display(), if failed { ", some failed" } else { "" }),
        "instances": results,
    });
    say!("{summary}");
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn emit(report: &Report) -> ExitCode {
    say!("{}", report.to_json());
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
