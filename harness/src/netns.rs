//! Network namespaces that clean up after themselves, created natively (nix: `unshare` plus a
//! bind mount under `/run/netns`, as `ip netns add` does), so `ip netns exec` and `ip -n` work
//! on them.
//!
//! Names carry a per-process prefix (`pfl-<pid>-<n>-<role>`) so parallel runs never collide,
//! and [`Netns`] deletes its namespace on drop, which also runs while a failing test unwinds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Every name this crate creates starts with this, so `clean` finds only ours.
pub const PREFIX: &str = "pfl-";

/// Namespaces of `portfwd-lab up`, which outlive the process that made them.
pub const UP_PREFIX: &str = "pfl-up-";

const NETNS_DIR: &str = "/run/netns";

/// Commands run in a namespace are killed after this long: a hung tool never hangs a run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`link`] waits for a new link to settle before going on regardless.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("namespace {name}: {message}")]
    Enter { name: String, message: String },
    #[error("{0}")]
    Traffic(String),
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One network namespace, deleted (with every process in it) when dropped unless kept.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates `pfl-<pid>-<n>-<role>` with loopback up and IPv6 DAD off.
    pub fn new(role: &str) -> Result<Netns, LabError> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Netns::create(format!("{PREFIX}{}-{n}-{role}", std::process::id()), false)
    }

    /// Creates a namespace with an exact name that stays after drop (`portfwd-lab up`).
    pub fn kept(name: &str) -> Result<Netns, LabError> {
        Netns::create(name.to_string(), true)
    }

    fn create(name: String, keep: bool) -> Result<Netns, LabError> {
        let err = |message: String| LabError::Enter {
            name: name.clone(),
            message,
        };
        let path = PathBuf::from(NETNS_DIR).join(&name);
        prepare_netns_dir().map_err(|e| err(format!("preparing {NETNS_DIR}: {e}")))?;
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(format!("creating {}: {e}", path.display())))?;
        let target = path.clone();
        // unshare moves only this thread into the new namespace; the bind mount keeps it alive.
        let made = std::thread::spawn(move || -> Result<(), String> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind mount: {e}"))
        })
        .join()
        .map_err(|_| err("namespace thread panicked".into()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(err(e));
        }
        let ns = Netns { name, keep };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection: addresses are usable at once and `ip addr` output
        // does not change on its own a moment later (no "tentative" flags coming and going).
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        Ok(ns)
    }

    /// An existing namespace by name (not deleted on drop).
    pub fn existing(name: &str) -> Result<Netns, LabError> {
        if !Path::new(NETNS_DIR).join(name).exists() {
            return Err(LabError::Enter {
                name: name.into(),
                message: "no such namespace".into(),
            });
        }
        Ok(Netns {
            name: name.to_string(),
            keep: true,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its output; fails on non-zero exit.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, LabError> {
        let out = self.exec_with_input(argv, "")?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: argv.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out)
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
        let out = run_with_input(&full, "")?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: full.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Writes a sysctl (`net.ipv4.ip_forward`) inside the namespace, natively: a thread enters
    /// the namespace and writes `/proc/sys`, which resolves `net/` against its namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let enter = self.enterer();
        let name = self.name.clone();
        std::thread::spawn(move || -> Result<(), LabError> {
            enter()?;
            std::fs::write(&path, value).map_err(|e| LabError::Enter {
                name,
                message: format!("{path}: {e}"),
            })
        })
        .join()
        .map_err(|_| LabError::Traffic("sysctl thread panicked".into()))?
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
            let file = File::open(Path::new(NETNS_DIR).join(&name))
                .map_err(|e| enter_err(e.to_string()))?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| enter_err(e.to_string()))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            delete_namespace(&self.name);
        }
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so a later `ip netns add`
/// by anyone does not bind-mount over it and hide the namespaces already there.
fn prepare_netns_dir() -> Result<(), nix::Error> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|_| nix::Error::EIO)?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>) {
        Ok(()) => Ok(()),
        Err(nix::Error::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>)
        }
        Err(e) => Err(e),
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
    let path = Path::new(NETNS_DIR).join(name);
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&path);
}

/// Every namespace name under `/run/netns`.
pub fn all_namespaces() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces left by crashed runs: ours by prefix, whose creating process is gone. The
/// namespaces of `portfwd-lab up` are not leftovers; `portfwd-lab down` removes them.
pub fn leftovers() -> Vec<String> {
    all_namespaces()
        .into_iter()
        .filter(|name| name.starts_with(PREFIX) && !name.starts_with(UP_PREFIX))
        .filter(|name| {
            let pid = name[PREFIX.len()..].split('-').next().unwrap_or("");
            pid.is_empty() || !Path::new(&format!("/proc/{pid}")).exists()
        })
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
    b.ip(&["link", "set", b_if, "up"])?;
    settle(a, a_if)?;
    settle(b, b_if)
}

/// Waits (at most [`SETTLE_TIMEOUT`]) until a link just set up has its carrier and, where IPv6
/// is on, its link-local address with its routes: the kernel adds them a moment after `ip
/// link set up` (much later on a slow VM), and a test that snapshots the namespace first sees
/// them appear on their own, as if something had changed it.
fn settle(ns: &Netns, dev: &str) -> Result<(), LabError> {
    let ipv6 = ns
        .stdout(&["sysctl", "-n", &format!("net.ipv6.conf.{dev}.disable_ipv6")])
        .is_ok_and(|v| v.trim() == "0");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let link = ns.stdout(&["ip", "-o", "link", "show", "dev", dev])?;
        let carrier = !link.contains("NO-CARRIER") && !link.contains(" state DOWN ");
        let local = !ipv6 || {
            let addr = ns.stdout(&[
                "ip", "-o", "-6", "addr", "show", "dev", dev, "scope", "link",
            ])?;
            let routes = ns.stdout(&["ip", "-6", "route", "show", "table", "all", "dev", dev])?;
            addr.contains("fe80:")
                && !addr.contains("tentative")
                && routes.contains("fe80::/64")
                && routes.contains("local fe80:")
        };
        if (carrier && local) || Instant::now() >= deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds an address.
pub fn addr(ns: &Netns, dev: &str, cidr: &str) -> Result<(), LabError> {
    ns.ip(&["addr", "add", cidr, "dev", dev])
}

/// Runs a command with stdin, killing it after [`COMMAND_TIMEOUT`].
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
    // Drain output on threads so a chatty child cannot block on a full pipe while we wait.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(spawn_err)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Command {
                    command: argv.join(" "),
                    stderr: format!("killed after {}s", COMMAND_TIMEOUT.as_secs()),
                });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn drain<R: std::io::Read + Send + 'static>(mut reader: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}
