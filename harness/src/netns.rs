//! Network namespaces that clean up after themselves.
//!
//! Names carry a per-process prefix (`pfl-<pid>-<n>-<role>`) so parallel runs never collide,
//! and [`Netns`] deletes its namespace on drop, which also runs while a failing test unwinds.

use std::fs::File;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{setns, CloneFlags};

/// Every name this crate creates starts with this, so `clean` finds only ours.
pub const PREFIX: &str = "pfl-";

/// A failure setting up or using a namespace.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("entering namespace {name}: {message}")]
    Enter { name: String, message: String },
    #[error("{0}")]
    Traffic(String),
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One network namespace, deleted (with every process in it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `pfl-<pid>-<n>-<role>` with loopback up.
    pub fn new(role: &str) -> Result<Netns, LabError> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection: addresses are usable at once and `ip addr` output
        // does not change on its own a moment later (no "tentative" flags coming and going).
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its output; fails on non-zero exit.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, LabError> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// Like [`Netns::exec`] with stdin, returning the output whatever the exit status.
    pub fn exec_with_input(&self, argv: &[&str], input: &str) -> Result<Output, LabError> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run_with_input(&full, input)
    }

    /// Stdout of a command in the namespace.
    pub fn stdout(&self, argv: &[&str]) -> Result<String, LabError> {
        self.exec(argv)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<(), LabError> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full).map(drop)
    }

    /// Writes a sysctl (`net.ipv4.ip_forward`) inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// A closure that moves the thread calling it into this namespace. `setns` is per
    /// thread, so it is meant for a fresh thread; sockets created there afterwards stay here.
    pub fn enterer(&self) -> impl FnOnce() -> Result<(), LabError> + Send + 'static {
        let name = self.name.clone();
        move || {
            let enter_err = |message: String| LabError::Enter {
                name: name.clone(),
                message,
            };
            let file =
                File::open(format!("/run/netns/{name}")).map_err(|e| enter_err(e.to_string()))?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| enter_err(e.to_string()))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// Kills every process in the namespace (it lives while any is inside), then deletes it.
pub fn delete_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Namespaces left by crashed runs: ours by prefix, whose creating process is gone.
pub fn leftovers() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .filter(|name| {
            let pid = name[PREFIX.len()..].split('-').next().unwrap_or("");
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
        .map(str::to_string)
        .collect()
}

/// Connects `a:a_if` and `b:b_if` with a veth pair created inside the namespaces (no name in
/// the host namespace, so parallel runs cannot clash), and brings both ends up.
pub fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), LabError> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// Adds an address; IPv6 ones skip duplicate address detection so they work at once.
pub fn addr(ns: &Netns, dev: &str, cidr: &str) -> Result<(), LabError> {
    if cidr.contains(':') {
        ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ns.ip(&["addr", "add", cidr, "dev", dev])
    }
}

fn run(argv: &[&str]) -> Result<Output, LabError> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: argv.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: argv.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn run_with_input(argv: &[&str], input: &str) -> Result<Output, LabError> {
    use std::io::Write;
    let spawn_err = |source| LabError::Spawn {
        command: argv.join(" "),
        source,
    };
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().map_err(spawn_err)
}
