//! Shared set-up for the end-to-end tests: the freshly built binary, prerequisites, the
//! client/proxy/backend topology and a write-command recorder.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub use portfwd_harness::shims::{FailNth, WriteRecorder};
pub use portfwd_harness::topology::{ruleset, Topology};
use portfwd_harness::Portfwd;

/// Root, iproute2 and iptables are needed. Without them a test skips, except under `CI=true`
/// where it fails: CI must never report green for tests it did not run.
pub fn prerequisites() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = [
        "ip",
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "iptables-legacy-save",
    ]
    .iter()
    .all(|t| which(t).is_some());
    if root && tools {
        return true;
    }
    let why = format!("needs root ({root}) and iproute2 + iptables on PATH ({tools})");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("end-to-end prerequisites missing under CI=true: {why}");
    }
    eprintln!("skipping end-to-end test: {why}");
    false
}

/// A virtualenv that scripts/setup.sh creates (`env_var`, else ~/.cache/portfwd/`name`) holding
/// `bin/<binary>`; None (a skip) when missing, a panic under `CI=true`.
pub fn venv(env_var: &str, name: &str, binary: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(env_var).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/portfwd").join(name))
    })?;
    if dir.join("bin").join(binary).is_file() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{binary} virtualenv missing at {} under CI=true (scripts/setup.sh creates it)",
            dir.display()
        );
    }
    eprintln!("skipping: no {binary} virtualenv at {}", dir.display());
    None
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// Builds the workspace's binaries once per test process, so tests never run a stale build.
fn build_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root).args([
            "build",
            "-q",
            "-p",
            "portfwd-module",
            "-p",
            "portfwd-harness",
            "--bins",
        ]);
        if exe.components().any(|c| c.as_os_str() == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
}

/// The portfwd binary under test (`PORTFWD_BIN`, or the fresh build).
pub fn portfwd() -> Portfwd {
    static BIN: OnceLock<Portfwd> = OnceLock::new();
    BIN.get_or_init(|| {
        if std::env::var_os("PORTFWD_BIN").is_none() {
            build_binaries();
        }
        Portfwd::locate().expect("locate portfwd")
    })
    .clone()
}

/// The static release binary Ansible and the Debian package ship: `PORTFWD_MODULE_BIN` (set by
/// scripts/test.sh), else built once by scripts/build-release.sh (which fails loudly without
/// the musl target).
pub fn module_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PORTFWD_MODULE_BIN") {
            return PathBuf::from(bin);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("bash")
            .arg(root.join("scripts/build-release.sh"))
            .output()
            .expect("run scripts/build-release.sh");
        assert!(
            out.status.success(),
            "scripts/build-release.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The portfwd-lab binary: `PORTFWD_LAB_BIN` (a prebuilt one, as in the test VMs), else the
/// fresh build.
pub fn portfwd_lab() -> PathBuf {
    if let Some(bin) = std::env::var_os("PORTFWD_LAB_BIN") {
        return PathBuf::from(bin);
    }
    build_binaries();
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("portfwd-lab"))
        .find(|p| p.is_file())
        .expect("portfwd-lab next to the test binary")
}

/// A file in tests/data.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

pub fn sa(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

/// Runs nft commands (one each) inside `ns`.
pub fn nft(ns: &portfwd_harness::Netns, commands: &[&str]) {
    for command in commands {
        ns.exec(&["sh", "-c", &format!("nft '{command}'")])
            .unwrap_or_else(|e| panic!("nft {command}: {e}"));
    }
}

/// Another owner's firewall shaped like firewalld's: `inet fw filter_FORWARD` ends in a reject
/// (an accept in any other table does not get a packet past it).
pub fn firewalld_like(ns: &portfwd_harness::Netns) {
    nft(
        ns,
        &[
            "add table inet fw",
            "add chain inet fw filter_FORWARD { type filter hook forward priority filter + 10; policy accept; }",
            "add rule inet fw filter_FORWARD reject with icmpx type admin-prohibited",
        ],
    );
}

/// The warnings of a run's result.
pub fn warnings(r: &portfwd_harness::RunResult) -> Vec<String> {
    r.json["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
