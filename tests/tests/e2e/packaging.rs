//! End-to-end: what ships. The module binary is static and runs on an older userland (a
//! Debian 11 root made with debootstrap: glibc 2.31, iptables 1.8.7), applying a real forward
//! in a namespace through chroot; the Debian package installs the binary, its man page,
//! completions and systemd unit, and each of them works.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{module_binary, prerequisites, sa, Topology};
use portfwd_harness::{probe, Proto, Server};
use serde_json::json;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Does this ELF file ask for a dynamic loader (a `PT_INTERP` program header)?
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes([elf[at], elf[at + 1], elf[at + 2], elf[at + 3]]) == 3
    })
}

#[test]
fn the_module_binary_is_static() {
    let bin = module_binary();
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} needs a dynamic loader: it would not run on an older glibc",
        bin.display()
    );
    // The check can fail: a glibc build of any tool has an interpreter.
    let dynamic = std::fs::read("/bin/sh").unwrap();
    assert!(has_interpreter(&dynamic));
}

/// The Debian 11 root scripts/setup.sh makes with debootstrap (`PORTFWD_DEBIAN11_ROOT`, else
/// ~/.cache/portfwd/debian11-root); None (a skip) when missing, a panic under `CI=true`.
fn debian11_root() -> Option<PathBuf> {
    let root = std::env::var_os("PORTFWD_DEBIAN11_ROOT")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/portfwd/debian11-root"))
        })?;
    if root.join("usr/sbin/iptables-save").exists() {
        return Some(root);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "no Debian 11 root at {} under CI=true (scripts/setup.sh --all makes it)",
            root.display()
        );
    }
    eprintln!("skipping: no Debian 11 root at {}", root.display());
    None
}

/// Runs `portfwd ARGS` chrooted into `root`, inside `ns`, in a mount namespace of its own
/// (so the /proc and binary mounts vanish with it).
fn in_chroot(ns: &str, root: &Path, args: &str, input: &str) -> std::process::Output {
    let bin = module_binary();
    let script = format!(
        "set -e; mount -t proc proc '{root}/proc'; mount --bind '{bin}' '{root}/usr/local/sbin/portfwd'; \
         exec chroot '{root}' /usr/local/sbin/portfwd {args}",
        root = root.display(),
        bin = bin.display()
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "unshare", "-m", "sh", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_debian_11_userland_runs_the_binary_and_forwards() {
    if !prerequisites() {
        return;
    }
    let Some(root) = debian11_root() else {
        return;
    };
    let glibc = Command::new("chroot")
        .arg(&root)
        .args(["ldd", "--version"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&glibc.stdout).contains("2.31"),
        "not Debian 11's glibc"
    );
    // The mount point for the binary (the root is a cache; this file stays empty).
    let mount_point = root.join("usr/local/sbin/portfwd");
    if !mount_point.exists() {
        std::fs::write(&mount_point, b"").unwrap();
    }
    let t = Topology::new().unwrap();
    let _tcp = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();

    let schema = in_chroot(t.proxy.name(), &root, "schema", "");
    assert!(
        schema.status.success(),
        "{}",
        String::from_utf8_lossy(&schema.stderr)
    );
    let schema: serde_json::Value = serde_json::from_slice(&schema.stdout).unwrap();
    assert_eq!(schema["title"], "portfwd params");

    let params = json!({"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]});
    let apply = in_chroot(t.proxy.name(), &root, "apply", &params.to_string());
    let result: serde_json::Value = serde_json::from_slice(&apply.stdout).unwrap_or_default();
    assert!(
        apply.status.success() && result["changed"] == true,
        "{} {}",
        String::from_utf8_lossy(&apply.stdout),
        String::from_utf8_lossy(&apply.stderr)
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );
    let again = in_chroot(t.proxy.name(), &root, "apply", &params.to_string());
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap_or_default();
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(
        again["backend"], "nf_tables",
        "Debian 11's iptables-nft: {again}"
    );
}

/// The package builds share `target/release/portfwd-assets` and `target/assets`: one at a
/// time (run side by side, one ran the helper while the other's cargo was replacing it).
static BUILDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs a package build script, one at a time, returning its stdout.
fn build(script: &str) -> String {
    let _one = BUILDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ok(&["bash", &repo().join(script).to_string_lossy()])
}

/// Runs a command, returning stdout; panics with its stderr when it fails.
fn ok(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}{}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "portfwd"]).output();
    }
}

#[test]
fn the_debian_package_installs_its_binary_man_page_completions_and_unit() {
    if !prerequisites() {
        return;
    }
    if crate::common::which("cargo-deb").is_none() && std::env::var_os("PORTFWD_DEB").is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("cargo-deb missing under CI=true (scripts/setup.sh --all installs it)");
        }
        eprintln!("skipping: no cargo-deb");
        return;
    }
    let deb = match std::env::var_os("PORTFWD_DEB") {
        Some(deb) => PathBuf::from(deb),
        None => {
            let out = build("scripts/build-deb.sh");
            repo().join(out.trim())
        }
    };
    assert!(
        Command::new("dpkg")
            .args(["-s", "portfwd"])
            .output()
            .unwrap()
            .status
            .code()
            != Some(0),
        "portfwd is already installed on this machine: not touching it"
    );
    let _installed = Installed;
    ok(&["dpkg", "-i", &deb.to_string_lossy()]);

    let installed = std::fs::read("/usr/sbin/portfwd").unwrap();
    assert_eq!(
        installed,
        std::fs::read(module_binary()).unwrap(),
        "the static binary"
    );
    let help = ok(&["/usr/sbin/portfwd", "--help"]);
    assert!(help.contains("Usage: portfwd <COMMAND>"), "{help}");
    let man = Command::new("man")
        .args(["portfwd"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    // Justified text: compare with runs of spaces collapsed.
    let man = String::from_utf8_lossy(&man.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(man.contains("NAME portfwd - Declarative NAT"), "{man}");
    for sub in ["apply", "plan", "show", "list", "restore", "schema"] {
        assert!(man.contains(sub), "man page lists {sub}: {man}");
    }
    // The pages it names are installed: one per subcommand, and the params reference.
    for (section, page, text) in [
        ("1", "portfwd-list", "instance"),
        ("5", "portfwd-params", "ignore_findings"),
    ] {
        let shown = Command::new("man")
            .args([section, page])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains(text), "man {section} {page}: {shown}");
    }
    let complete = ok(&[
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/portfwd && complete -p portfwd",
    ]);
    assert!(complete.contains("-F _portfwd portfwd"), "{complete}");
    let zsh = std::fs::read_to_string("/usr/share/zsh/vendor-completions/_portfwd").unwrap();
    assert!(zsh.starts_with("#compdef portfwd"), "{zsh}");
    let fish =
        std::fs::read_to_string("/usr/share/fish/vendor_completions.d/portfwd.fish").unwrap();
    assert!(fish.contains("complete -c portfwd"), "{fish}");
    let schema = std::fs::read_to_string("/usr/share/portfwd/schema.json").unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&schema).unwrap(),
        serde_json::from_str::<serde_json::Value>(&ok(&["/usr/sbin/portfwd", "schema"])).unwrap()
    );
    assert!(std::path::Path::new("/usr/share/doc/portfwd/README.md").is_file());
    let unit = "/lib/systemd/system/portfwd-restore.service";
    ok(&["systemd-analyze", "verify", unit]);
    assert!(std::fs::read_to_string(unit)
        .unwrap()
        .contains("ExecStart=/usr/sbin/portfwd restore"));
}

/// The RPM (cargo-generate-rpm): its file list and requirements, then an install into a
/// scratch root (`rpm --root`, never this machine's own database), where the binary is the
/// static one and runs, the man pages, completions and unit are in place, and an erase removes
/// them again.
#[test]
fn the_rpm_lists_and_installs_into_a_scratch_root() {
    let tools = ["rpm", "cargo-generate-rpm"];
    if let Some(missing) = tools.iter().find(|t| crate::common::which(t).is_none()) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{missing} missing under CI=true (scripts/setup.sh --all installs it)");
        }
        eprintln!("skipping: no {missing}");
        return;
    }
    let out = build("scripts/build-rpm.sh");
    let rpm = repo().join(out.trim());
    let rpm_text = rpm.to_string_lossy().into_owned();
    let files = ok(&["rpm", "-qpl", &rpm_text]);
    for path in [
        "/usr/sbin/portfwd",
        "/usr/lib/systemd/system/portfwd-restore.service",
        "/usr/share/man/man1/portfwd.1.gz",
        "/usr/share/man/man1/portfwd-apply.1.gz",
        "/usr/share/man/man1/portfwd-list.1.gz",
        "/usr/share/man/man5/portfwd-params.5.gz",
        "/usr/share/bash-completion/completions/portfwd",
        "/usr/share/zsh/site-functions/_portfwd",
        "/usr/share/fish/vendor_completions.d/portfwd.fish",
        "/usr/share/licenses/portfwd/LICENSE",
    ] {
        assert!(
            files.lines().any(|l| l == path),
            "the rpm holds {path}: {files}"
        );
    }
    let requires = ok(&["rpm", "-qp", "--requires", &rpm_text]);
    for dep in ["iptables", "iproute"] {
        assert!(requires.lines().any(|l| l.starts_with(dep)), "{requires}");
    }
    let info = ok(&["rpm", "-qpi", &rpm_text]);
    assert!(
        info.contains("Name        : portfwd") && info.contains("License     : MIT"),
        "{info}"
    );

    let root = tempfile::tempdir().unwrap();
    let root_text = root.path().to_string_lossy().into_owned();
    ok(&["rpm", "--root", &root_text, "--initdb"]);
    // --nodeps: the scratch root has no iptables; the requirements were checked above.
    ok(&[
        "rpm",
        "--root",
        &root_text,
        "-i",
        "--nodeps",
        "--noscripts",
        &rpm_text,
    ]);
    assert_eq!(
        ok(&["rpm", "--root", &root_text, "-q", "portfwd"]).trim(),
        ok(&["rpm", "-qp", &rpm_text]).trim()
    );
    let installed = root.path().join("usr/sbin/portfwd");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(crate::common::module_binary()).unwrap(),
        "the static binary"
    );
    assert!(
        !has_interpreter(&std::fs::read(&installed).unwrap()),
        "static"
    );
    let version = ok(&[&installed.to_string_lossy(), "--version"]);
    assert!(version.starts_with("portfwd "), "{version}");
    let unit = std::fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/system/portfwd-restore.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/sbin/portfwd restore"),
        "{unit}"
    );
    ok(&[
        "rpm",
        "--root",
        &root_text,
        "-e",
        "--nodeps",
        "--noscripts",
        "portfwd",
    ]);
    assert!(!installed.exists(), "erased");
}
