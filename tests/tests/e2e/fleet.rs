//! A fleet over SSH: N namespaces running sshd, one `ansible-playbook` with forks driving
//! portfwd on all of them, 100 forwards each. The test converges 20 hosts, proves traffic on
//! some, and re-runs with `changed=0` everywhere. `fleet_benchmark` times the same fleet
//! against the same forwards written as `ansible.builtin.iptables` tasks, in the same run.
//! The benchmark is ignored (scripts/bench-fleet.sh runs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, prerequisites, ruleset, sa};
use portfwd_harness::{addr, link, probe, Netns, Proto, Server};

const FORWARDS: usize = 100;

/// Stops and reaps the sshd processes, also when an assertion fails.
struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Fleet {
    venv: PathBuf,
    dir: tempfile::TempDir,
    mgmt: Netns,
    hosts: Vec<Netns>,
    _servers: Vec<Server>,
    _sshds: Reap,
    inventory: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Host `i`'s management address (sshd listens there) and its peer in the controller's
/// namespace (where the backends of its forwards answer).
fn host_addr(i: usize) -> String {
    format!("10.{}.{}.2", 64 + i / 64, (i % 64) * 4)
}

fn peer_addr(i: usize) -> String {
    format!("10.{}.{}.1", 64 + i / 64, (i % 64) * 4)
}

/// The controller namespace, `n` hosts linked to it each running sshd, the collection
/// installed under a private Ansible home, and an inventory of group `fleet`.
fn fleet(n: usize) -> Option<Fleet> {
    let venv = common::venv("PORTFWD_ANSIBLE_VENV", "ansible-venv", "ansible-playbook")?;
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "sshd missing under CI=true"
        );
        eprintln!("skipping: no sshd");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let build = Command::new("bash")
        .arg(repo().join("scripts/build-collection.sh"))
        .arg(common::module_binary())
        .arg(p("dist"))
        .arg(venv.join("bin/ansible-galaxy"))
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let tarball = String::from_utf8_lossy(&build.stdout).trim().to_string();
    let install = Command::new(venv.join("bin/ansible-galaxy"))
        .args(["collection", "install", "--force", "-p"])
        .arg(p("collections"))
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let keys = p("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for name in ["client_key", "host_key"] {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(keys.join(name))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    std::fs::copy(keys.join("client_key.pub"), keys.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();

    let mgmt = Netns::new("fleet").unwrap();
    let mut hosts = Vec::new();
    let mut servers = Vec::new();
    let mut sshds = Reap(Vec::new());
    let mut inventory = String::from("[fleet]\n");
    for i in 0..n {
        let host = Netns::new(&format!("h{i}")).unwrap();
        let mgmt_if = format!("m{i}");
        link(&mgmt, &mgmt_if, &host, "mgmt0").unwrap();
        addr(&mgmt, &mgmt_if, &format!("{}/30", peer_addr(i))).unwrap();
        addr(&host, "mgmt0", &format!("{}/30", host_addr(i))).unwrap();
        let host_dir = p(&format!("h{i}"));
        // A home of its own: root's login shell on a developer's machine may run a version
        // manager's init (and its lock) on every SSH command, which would time the machine.
        std::fs::create_dir_all(host_dir.join("home")).unwrap();
        let config = format!(
            "Port 22\nListenAddress {listen}\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {hd}.sshd.pid\nLogLevel ERROR\n\
             MaxStartups 100\nSubsystem sftp internal-sftp\n\
             SetEnv HOME={hd}/home PORTFWD_LOCK_FILE={hd}/lock PORTFWD_STATE_DIR={hd}/state PORTFWD_RUN_DIR={hd}/run\n",
            listen = host_addr(i),
            hk = keys.join("host_key").display(),
            ak = keys.join("authorized_keys").display(),
            hd = host_dir.display(),
        );
        let config_file = p(&format!("sshd-h{i}.conf"));
        std::fs::write(&config_file, config).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", host.name()])
            .arg(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config_file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        sshds.0.push(child);
        inventory.push_str(&format!(
            "h{i} ansible_host={} peer={}\n",
            host_addr(i),
            peer_addr(i)
        ));
        hosts.push(host);
    }
    // The backends: one server in the controller's namespace answers every host's forwards.
    servers.push(Server::start(&mgmt, Proto::Tcp, sa("0.0.0.0:1234")).unwrap());
    for i in 0..n {
        let target = sa(&format!("{}:22", host_addr(i)));
        let deadline = Instant::now() + Duration::from_secs(20);
        while probe_tcp(&mgmt, target).is_err() {
            assert!(Instant::now() < deadline, "sshd on h{i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    inventory.push_str(&format!(
        "\n[fleet:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n\
         ansible_python_interpreter=/usr/bin/python3\n",
        keys.join("client_key").display()
    ));
    let inventory_file = p("inventory.ini");
    std::fs::write(&inventory_file, inventory).unwrap();
    Some(Fleet {
        venv,
        dir,
        mgmt,
        hosts,
        _servers: servers,
        _sshds: sshds,
        inventory: inventory_file,
    })
}

fn probe_tcp(ns: &Netns, target: std::net::SocketAddr) -> Result<(), String> {
    let enter = ns.enterer();
    std::thread::spawn(move || {
        enter().map_err(|e| e.to_string())?;
        std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("panicked".into()))
}

impl Fleet {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ansible-playbook -f FORKS PLAY` from the controller's namespace: exit code, output and
    /// wall time.
    fn playbook(&self, play: &Path, forks: usize) -> (i32, String, Duration) {
        let p = |name: &str| self.path(name).display().to_string();
        let env = [
            format!(
                "PATH={}:{}",
                self.venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            format!("ANSIBLE_COLLECTIONS_PATH={}", p("collections")),
            format!("ANSIBLE_HOME={}", p("home")),
            format!("ANSIBLE_LOCAL_TEMP={}", p("tmp")),
            format!("ANSIBLE_SSH_CONTROL_PATH_DIR={}", p("cp")),
            "ANSIBLE_NOCOLOR=1".to_string(),
            "ANSIBLE_HOST_KEY_CHECKING=False".to_string(),
            "ANSIBLE_RETRY_FILES_ENABLED=0".to_string(),
        ];
        let playbook = self.venv.join("bin/ansible-playbook").display().to_string();
        let inventory = self.inventory.display().to_string();
        let forks = forks.to_string();
        let play = play.display().to_string();
        let mut argv: Vec<&str> = vec!["env"];
        argv.extend(env.iter().map(String::as_str));
        argv.extend([playbook.as_str(), "-i", &inventory, "-f", &forks, &play]);
        // Not Netns::exec: that kills a command after a minute, and the per-rule way takes
        // longer. stdin stays a pipe (with /dev/null, or under `timeout`, Ansible's SSH
        // connections ran ten times slower here).
        let start = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", self.mgmt.name()])
            .args(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let took = start.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text, took)
    }
}

/// `changed=N` of every host in the PLAY RECAP.
fn recap(output: &str) -> Vec<(String, u32)> {
    output
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .skip(1)
        .filter_map(|l| {
            let host = l.split_whitespace().next()?.to_string();
            let changed = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("changed="))?;
            Some((host, changed.parse().ok()?))
        })
        .collect()
}

/// One portfwd task with 100 forwards per host (each to its peer's backend, masqueraded).
fn portfwd_play(dir: &Path) -> PathBuf {
    let mut play = String::from(
        "- hosts: fleet\n  gather_facts: false\n  tasks:\n    - name: 100 forwards\n      portfwd.portfwd.portfwd:\n        forwards:\n",
    );
    for i in 0..FORWARDS {
        play.push_str(&format!(
            "          - {{name: f{i}, listen_port: {}, to: \"{{{{ peer }}}}:1234\"}}\n",
            10000 + i
        ));
    }
    let path = dir.join("portfwd.yml");
    std::fs::write(&path, play).unwrap();
    path
}

/// The same forwards the per-rule way: a DNAT and a masquerade rule per forward, each an
/// `ansible.builtin.iptables` task (what portfwd also does beyond that, the FORWARD accepts
/// and ip_forward, is left out, in the per-rule way's favour).
fn iptables_play(dir: &Path) -> PathBuf {
    let mut play = String::from("- hosts: fleet\n  gather_facts: false\n  tasks:\n");
    for i in 0..FORWARDS {
        let port = 10000 + i;
        play.push_str(&format!(
            "    - ansible.builtin.iptables:\n        table: nat\n        chain: PREROUTING\n        protocol: tcp\n        destination_port: \"{port}\"\n        jump: DNAT\n        to_destination: \"{{{{ peer }}}}:1234\"\n        comment: \"fwd {i}\"\n\
             \x20   - ansible.builtin.iptables:\n        table: nat\n        chain: POSTROUTING\n        protocol: tcp\n        destination: \"{{{{ peer }}}}\"\n        destination_port: \"1234\"\n        ctstate: [DNAT]\n        jump: MASQUERADE\n        comment: \"fwd {i}\"\n"
        ));
    }
    let path = dir.join("iptables.yml");
    std::fs::write(&path, play).unwrap();
    path
}

/// 20 hosts over SSH, 100 forwards each: the first run changes every host, traffic flows
/// through the first and last forward of some hosts, and a re-run changes none.
#[test]
fn a_fleet_of_20_hosts_over_ssh_converges_and_reruns_unchanged() {
    if !prerequisites() {
        return;
    }
    let Some(fleet) = fleet(20) else {
        return;
    };
    let play = portfwd_play(fleet.dir.path());
    let (code, out, first) = fleet.playbook(&play, 20);
    assert_eq!(code, 0, "{out}");
    let changed = recap(&out);
    assert_eq!(changed.len(), 20, "{out}");
    assert!(changed.iter().all(|(_, c)| *c == 1), "{changed:?}");
    for i in [0, 7, 19] {
        let dump = ruleset(&fleet.hosts[i], "iptables-save").unwrap();
        assert_eq!(dump.matches("-j DNAT").count(), FORWARDS, "h{i}");
        for port in [10000, 10000 + FORWARDS - 1] {
            let seen = probe(
                &fleet.mgmt,
                Proto::Tcp,
                sa(&format!("{}:{port}", host_addr(i))),
            )
            .unwrap_or_else(|e| panic!("h{i}:{port}: {e}"));
            assert_eq!(seen.to_string(), host_addr(i), "masqueraded by h{i}");
        }
    }
    let (code, out, again) = fleet.playbook(&play, 20);
    assert_eq!(code, 0, "{out}");
    let changed = recap(&out);
    assert_eq!(changed.len(), 20, "{out}");
    assert!(changed.iter().all(|(_, c)| *c == 0), "re-run: {changed:?}");
    eprintln!(
        "fleet: 20 hosts x {FORWARDS} forwards over SSH, forks 20: converge {:.1} s, re-run {:.1} s",
        first.as_secs_f64(),
        again.as_secs_f64()
    );
}

/// The numbers of BENCHMARKS.md's fleet section: the same fleet, the same forwards, portfwd
/// against `ansible.builtin.iptables` tasks, converge and re-run, in one run.
/// `scripts/bench-fleet.sh` runs it (`FLEET_HOSTS` hosts, default 20).
#[test]
#[ignore = "a benchmark: scripts/bench-fleet.sh runs it"]
fn fleet_benchmark() {
    if !prerequisites() {
        return;
    }
    let n: usize = std::env::var("FLEET_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some(fleet) = fleet(n) else {
        return;
    };
    let mut times = Vec::new();
    for (label, play) in [
        ("portfwd, 1 task", portfwd_play(fleet.dir.path())),
        (
            "ansible.builtin.iptables, 200 tasks",
            iptables_play(fleet.dir.path()),
        ),
    ] {
        let (code, out, converge) = fleet.playbook(&play, n);
        assert_eq!(code, 0, "{out}");
        let (code, out, rerun) = fleet.playbook(&play, n);
        assert_eq!(code, 0, "{out}");
        let rerun_changed: u32 = recap(&out).iter().map(|(_, c)| c).sum();
        times.push((label, converge, rerun, rerun_changed));
        // The next way starts from clean hosts.
        for host in &fleet.hosts {
            for table in ["nat", "filter"] {
                host.exec(&["iptables", "-t", table, "-F"]).unwrap();
                host.exec(&["iptables", "-t", table, "-X"]).unwrap();
            }
        }
        for i in 0..n {
            for dir in ["state", "run"] {
                let _ = std::fs::remove_dir_all(fleet.path(&format!("h{i}/{dir}")));
            }
        }
    }
    println!("{n} hosts x {FORWARDS} forwards, ansible-playbook over SSH, forks {n}:");
    for (label, converge, rerun, changed) in &times {
        println!(
            "  {label:<38} converge {:6.1} s   re-run {:6.1} s (changed on re-run: {changed})",
            converge.as_secs_f64(),
            rerun.as_secs_f64()
        );
    }
    let ratio = |f: fn(&(&str, Duration, Duration, u32)) -> Duration| {
        f(&times[1]).as_secs_f64() / f(&times[0]).as_secs_f64()
    };
    println!(
        "  ratio (iptables tasks / portfwd):      converge {:6.1}x   re-run {:6.1}x",
        ratio(|t| t.1),
        ratio(|t| t.2)
    );
}
