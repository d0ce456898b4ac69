//! End-to-end with the real `ansible-playbook` (ansible-core from PyPI in a virtualenv that
//! scripts/setup.sh creates): the collection built and installed, check/diff, apply with
//! traffic, idempotence, bad params, registered results, docs, and a multi-host run over SSH
//! into namespaces running sshd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{portfwd, prerequisites, ruleset, sa, Topology};
use portfwd_harness::{addr, link, probe, Netns, Proto, Server};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A private Ansible home with the collection built from this tree and installed, plus a
/// library directory holding the module by its short name.
struct Ansible {
    venv: PathBuf,
    dir: tempfile::TempDir,
}

impl Ansible {
    fn new(venv: PathBuf) -> Ansible {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dist");
        let galaxy = venv.join("bin/ansible-galaxy");
        let build = Command::new("bash")
            .arg(repo().join("scripts/build-collection.sh"))
            .arg(crate::common::module_binary())
            .arg(&out)
            .arg(&galaxy)
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "collection build: {}",
            String::from_utf8_lossy(&build.stderr)
        );
        let tarball = String::from_utf8_lossy(&build.stdout).trim().to_string();
        assert!(
            tarball.ends_with("portfwd-portfwd-0.1.0.tar.gz"),
            "{tarball}"
        );
        let install = Command::new(&galaxy)
            .args(["collection", "install", "--force", "-p"])
            .arg(dir.path().join("collections"))
            .arg(&tarball)
            .output()
            .unwrap();
        assert!(
            install.status.success(),
            "collection install: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let library = dir.path().join("library");
        std::fs::create_dir_all(&library).unwrap();
        std::fs::copy(crate::common::module_binary(), library.join("portfwd")).unwrap();
        std::fs::copy(
            repo().join("playbooks/library/portfwd.yml"),
            library.join("portfwd.yml"),
        )
        .unwrap();
        Ansible { venv, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Environment for Ansible and, through the local connection, for the module: every file
    /// portfwd writes goes under `host_dir`, never the host's /etc or /run.
    fn env(&self, host_dir: &Path) -> Vec<(String, String)> {
        let p = |name: &str| self.path(name).display().to_string();
        vec![
            (
                "PATH".into(),
                format!(
                    "{}:{}",
                    self.venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            ("ANSIBLE_COLLECTIONS_PATH".into(), p("collections")),
            ("ANSIBLE_LIBRARY".into(), p("library")),
            ("ANSIBLE_HOME".into(), p("home")),
            ("ANSIBLE_LOCAL_TEMP".into(), p("tmp")),
            ("ANSIBLE_REMOTE_TEMP".into(), p("remote-tmp")),
            ("ANSIBLE_SSH_CONTROL_PATH_DIR".into(), p("cp")),
            ("ANSIBLE_NOCOLOR".into(), "1".into()),
            ("ANSIBLE_HOST_KEY_CHECKING".into(), "False".into()),
            ("ANSIBLE_RETRY_FILES_ENABLED".into(), "0".into()),
            (
                "PORTFWD_LOCK_FILE".into(),
                host_dir.join("lock").display().to_string(),
            ),
            (
                "PORTFWD_STATE_DIR".into(),
                host_dir.join("state").display().to_string(),
            ),
            (
                "PORTFWD_RUN_DIR".into(),
                host_dir.join("run").display().to_string(),
            ),
        ]
    }

    /// Runs `ansible-playbook ARGS` inside `ns`; returns exit code and combined output.
    fn playbook(&self, ns: &Netns, host_dir: &Path, args: &[&str]) -> (i32, String) {
        let env: Vec<String> = self
            .env(host_dir)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let playbook = self.venv.join("bin/ansible-playbook").display().to_string();
        let mut argv: Vec<&str> = vec!["env"];
        argv.extend(env.iter().map(String::as_str));
        argv.push(&playbook);
        argv.extend_from_slice(args);
        let out = ns.exec_with_input(&argv, "").unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}

fn playbook(name: &str) -> String {
    repo().join("playbooks").join(name).display().to_string()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// `changed=N` of the PLAY RECAP line of `host`.
fn recap_changed(output: &str, host: &str) -> Option<u32> {
    output
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.starts_with(host))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("changed="))
        })
        .and_then(|n| n.parse().ok())
}

/// A lab proxy that Ansible drives with the local connection: the collection installed, a
/// backend answering on 1234, an inventory naming `proxy` (group `proxies`).
struct LocalProxy {
    venv: PathBuf,
    ansible: Ansible,
    t: Topology,
    _server: Server,
    host_dir: PathBuf,
    inventory: String,
}

/// None (a skip) without the Ansible virtualenv.
fn local_proxy() -> Option<LocalProxy> {
    let venv = common::venv("PORTFWD_ANSIBLE_VENV", "ansible-venv", "ansible-playbook")?;
    let ansible = Ansible::new(venv.clone());
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let host_dir = ansible.path("proxy-host");
    let inventory = write(
        &ansible.path("inventory.ini"),
        &format!(
            "[proxies]\nproxy ansible_connection=local ansible_python_interpreter={}\n",
            venv.join("bin/python").display()
        ),
    );
    Some(LocalProxy {
        venv,
        ansible,
        t,
        _server,
        host_dir,
        inventory,
    })
}

/// `ip netns exec <proxy> ansible-playbook -c local`: check, apply, re-run, bad params, a
/// registered result, the library layout, and ansible-doc for both layouts.
#[test]
fn local_playbook_runs_against_a_lab_proxy() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        venv,
        ansible,
        t,
        _server,
        host_dir,
        inventory,
    }) = local_proxy()
    else {
        return;
    };
    let vars = write(
        &ansible.path("vars.json"),
        &json!({"portfwd_forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}], "portfwd_masquerade": []}).to_string(),
    );
    let run = |args: &[&str]| {
        let mut full = vec!["-i", inventory.as_str()];
        full.extend_from_slice(args);
        ansible.playbook(&t.proxy, &host_dir, &full)
    };
    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    let timer = Instant::now();

    let (code, out) = run(&[
        &playbook("proxy.yml"),
        "-e",
        &format!("@{vars}"),
        "--check",
        "--diff",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    assert!(
        out.contains(
            "+forwards.web = {\"listen_port\":4321,\"proto\":\"tcp\",\"to\":\"10.0.2.2:1234\"}"
        ),
        "readable diff: {out}"
    );
    assert_eq!(
        ruleset(&t.proxy, "iptables-save").unwrap(),
        before,
        "check mode touched the host"
    );
    let check_time = timer.elapsed();

    let (code, out) = run(&[&playbook("proxy.yml"), "-e", &format!("@{vars}")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );
    let apply_time = timer.elapsed() - check_time;

    let (code, out) = run(&[&playbook("proxy.yml"), "-e", &format!("@{vars}")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(0), "second run: {out}");
    let total = timer.elapsed();
    eprintln!(
        "local playbook run: check {:.2}s, apply {:.2}s, re-run {:.2}s, total {:.2}s",
        check_time.as_secs_f64(),
        apply_time.as_secs_f64(),
        (total - check_time - apply_time).as_secs_f64(),
        total.as_secs_f64()
    );

    let (code, out) = run(&[&playbook("checks/bad-params.yml")]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("forwards[0].listen_port") && out.contains("is not a port (1-65535)"),
        "the module's message: {out}"
    );

    let api = ansible.path("api.json");
    let api = write(
        &api,
        &json!({"portfwd_forwards": [{"name": "api", "listen_port": 8443, "to": "10.0.2.2:1234"}]})
            .to_string(),
    );
    let (code, out) = run(&[
        &playbook("checks/registered-result.yml"),
        "-e",
        &format!("@{api}"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("All assertions passed"), "{out}");

    let (code, out) = run(&[&playbook("library-example.yml"), "-e", &format!("@{vars}")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        recap_changed(&out, "proxy"),
        Some(1),
        "short name from ANSIBLE_LIBRARY (api removed, web kept): {out}"
    );

    for module in ["portfwd.portfwd.portfwd", "portfwd"] {
        let env = ansible.env(&host_dir);
        let out = Command::new(venv.join("bin/ansible-doc"))
            .arg(module)
            .envs(env)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{module}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for needle in [
            "listen_port",
            "policy_routes",
            "EXAMPLES",
            "RETURN VALUES",
            "redirect_to_port",
        ] {
            assert!(text.contains(needle), "ansible-doc {module} lacks {needle}");
        }
    }
}

/// One playbook from a management namespace configures both sides of the source-preserving
/// forward over SSH; the backend then sees the real client.
#[test]
fn playbook_over_ssh_configures_proxy_and_backend() {
    if !prerequisites() {
        return;
    }
    let Some(venv) = common::venv("PORTFWD_ANSIBLE_VENV", "ansible-venv", "ansible-playbook")
    else {
        return;
    };
    let sshd = PathBuf::from("/usr/sbin/sshd");
    if !sshd.is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "sshd missing under CI=true"
        );
        eprintln!("skipping: no sshd");
        return;
    }
    let ansible = Ansible::new(venv);
    let t = Topology::new().unwrap();
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.254"])
        .unwrap();
    let mgmt = Netns::new("mgmt").unwrap();
    for (i, host) in [&t.proxy, &t.backend].into_iter().enumerate() {
        let mgmt_if = format!("m{i}");
        link(&mgmt, &mgmt_if, host, "mgmt0").unwrap();
        addr(&mgmt, &mgmt_if, &format!("10.9.{i}.1/30")).unwrap();
        addr(host, "mgmt0", &format!("10.9.{i}.2/30")).unwrap();
    }
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();

    let keys = ansible.path("keys");
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
    /// Stops and reaps the sshd processes, also when an assertion fails.
    struct Reap(Vec<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut sshds = Reap(Vec::new());
    for (i, (name, host)) in [("proxy", &t.proxy), ("backend", &t.backend)]
        .into_iter()
        .enumerate()
    {
        let host_dir = ansible.path(&format!("{name}-host"));
        let config = format!(
            "Port 22\nListenAddress 10.9.{i}.2\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {dir}/sshd-{name}.pid\nLogLevel ERROR\n\
             Subsystem sftp internal-sftp\n\
             SetEnv PORTFWD_LOCK_FILE={hd}/lock PORTFWD_STATE_DIR={hd}/state PORTFWD_RUN_DIR={hd}/run\n",
            hk = keys.join("host_key").display(),
            ak = keys.join("authorized_keys").display(),
            dir = ansible.dir.path().display(),
            hd = host_dir.display(),
        );
        let config_file = write(&ansible.path(&format!("sshd-{name}.conf")), &config);
        let sshd_path = sshd.display().to_string();
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                host.name(),
                &sshd_path,
                "-D",
                "-f",
                &config_file,
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        sshds.0.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe_tcp(&mgmt, &format!("10.9.{i}.2:22")).is_err() {
            assert!(Instant::now() < deadline, "sshd in {name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let inventory = write(
        &ansible.path("inventory.ini"),
        &format!(
            "[proxies]\nproxy ansible_host=10.9.0.2\n\n[backends]\nbackend ansible_host=10.9.1.2\n\n[all:vars]\n\
             ansible_user=root\nansible_ssh_private_key_file={key}\n\
             ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n\
             proxy_alias=10.10.10.10\nbackend_alias=10.10.10.11\nalias_prefix=24\nproxy_alias_dev=eth1\n\
             backend_alias_dev=eth0\nlisten_port=4321\nbackend_port=1234\npolicy_table=100\n",
            key = keys.join("client_key").display()
        ),
    );
    assert!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).is_err(),
        "nothing forwards yet"
    );
    let controller_dir = ansible.path("controller");
    let (code, out) = ansible.playbook(
        &mgmt,
        &controller_dir,
        &["-i", &inventory, &playbook("keep-client-address.yml")],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    assert_eq!(recap_changed(&out, "backend"), Some(1), "{out}");
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.1.2".parse::<std::net::IpAddr>().unwrap(),
        "the backend sees the real client"
    );
    assert!(
        ansible.path("backend-host/state/portfwd.json").is_file(),
        "persist stored the params on the backend"
    );
    let (code, out) = ansible.playbook(
        &mgmt,
        &controller_dir,
        &["-i", &inventory, &playbook("keep-client-address.yml")],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (recap_changed(&out, "proxy"), recap_changed(&out, "backend")),
        (Some(0), Some(0)),
        "{out}"
    );
}

fn probe_tcp(ns: &Netns, target: &str) -> Result<(), String> {
    let target = sa(target);
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

/// The collection's example role (roles/portfwd): its defaults plus the play's vars drive the
/// module; a second run changes nothing.
#[test]
fn the_example_role_forwards_and_is_idempotent() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        ansible,
        t,
        _server,
        host_dir,
        inventory,
        ..
    }) = local_proxy()
    else {
        return;
    };
    let play = write(
        &ansible.path("role.yml"),
        "- hosts: proxy\n  gather_facts: false\n  roles:\n    - role: portfwd.portfwd.portfwd\n      vars:\n        portfwd_forwards:\n          - {name: web, listen_port: 4321, to: \"10.0.2.2:1234\"}\n",
    );
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &play]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    probe_tcp(&t.client, "10.0.1.1:4321").unwrap();
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &play]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(0), "{out}");

    // The role passes every param: the backend (it used to be dropped, moving an nftables
    // host back to iptables) and conn_mark.
    let nft_play = write(
        &ansible.path("role-nft.yml"),
        "- hosts: proxy\n  gather_facts: false\n  roles:\n    - role: portfwd.portfwd.portfwd\n      vars:\n        portfwd_backend: nftables\n        portfwd_conn_mark: \"0x4000\"\n        portfwd_forwards:\n          - {name: web, listen_port: 4321, to: \"10.0.2.2:1234\"}\n",
    );
    for changed in [1, 0] {
        let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &nft_play]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(recap_changed(&out, "proxy"), Some(changed), "{out}");
    }
    let table = t
        .proxy
        .stdout(&["nft", "list", "table", "inet", "portfwd-portfwd"])
        .unwrap();
    assert!(table.contains("0x00004000"), "conn_mark passed: {table}");
    assert!(
        !ruleset(&t.proxy, "iptables-save")
            .unwrap()
            .contains("PFWD-"),
        "moved off iptables"
    );
    probe_tcp(&t.client, "10.0.1.1:4321").unwrap();
    // An unknown role variable value is refused by the role's argument spec.
    let bad = write(
        &ansible.path("role-bad.yml"),
        "- hosts: proxy\n  gather_facts: false\n  roles:\n    - role: portfwd.portfwd.portfwd\n      vars:\n        portfwd_backend: pf\n",
    );
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &bad]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("portfwd_backend"), "{out}");
}

/// The module with `backend: nftables`: the forward lives in the instance's own nftables table,
/// traffic flows, a re-run reports nothing changed, and `state: absent` leaves no table.
#[test]
fn a_playbook_applies_with_the_nftables_backend() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        ansible,
        t,
        _server,
        host_dir,
        inventory,
        ..
    }) = local_proxy()
    else {
        return;
    };
    let task = |state: &str| {
        format!(
            "- hosts: proxy\n  gather_facts: false\n  tasks:\n    - portfwd.portfwd.portfwd:\n        backend: nftables\n        state: {state}\n        forwards:\n          - {{name: web, listen_port: 4321, to: \"10.0.2.2:1234\"}}\n          - {{name: web6, listen_port: 4321, to: \"[fd00:2::2]:1234\"}}\n"
        )
    };
    let present = write(&ansible.path("nftables.yml"), &task("present"));
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &present]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    probe_tcp(&t.client, "10.0.1.1:4321").unwrap();
    assert_eq!(
        t.proxy.stdout(&["nft", "list", "tables"]).unwrap().trim(),
        "table inet portfwd-portfwd"
    );
    assert!(
        !ruleset(&t.proxy, "iptables-save").unwrap().contains("PFWD"),
        "nothing in iptables"
    );
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &present]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(0), "{out}");
    let absent = write(&ansible.path("nftables-absent.yml"), &task("absent"));
    let (code, out) = ansible.playbook(&t.proxy, &host_dir, &["-i", &inventory, &absent]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    assert_eq!(t.proxy.stdout(&["nft", "list", "ruleset"]).unwrap(), "");
}

/// Ansible hands `-e key=value` extra vars to a binary module as strings (`"True"`, `"no"`,
/// `"210"`); the module takes them as Ansible's own `bool` and `int` do.
#[test]
fn extra_vars_spelled_as_strings_are_booleans_and_integers() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        ansible,
        t,
        _server,
        host_dir,
        inventory,
        ..
    }) = local_proxy()
    else {
        return;
    };
    let play = write(
        &ansible.path("spelled.yml"),
        "- hosts: proxy\n  gather_facts: false\n  tasks:\n    - portfwd.portfwd.portfwd:\n        route_protocol: \"{{ proto }}\"\n        forwards:\n          - name: web\n            listen_port: \"{{ port }}\"\n            to: \"10.0.2.2:1234\"\n            allow_forward: \"{{ allow }}\"\n            reset_connections: \"{{ reset }}\"\n",
    );
    let run = |allow: &str| {
        ansible.playbook(
            &t.proxy,
            &host_dir,
            &[
                "-i",
                &inventory,
                &play,
                "-e",
                &format!("allow={allow}"),
                "-e",
                "reset=yes",
                "-e",
                "port=4321",
                "-e",
                "proto=210",
            ],
        )
    };
    let (code, out) = run("True");
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    probe_tcp(&t.client, "10.0.1.1:4321").unwrap();
    let saved = ruleset(&t.proxy, "iptables-save").unwrap();
    assert!(
        saved.contains("-j PFWD-portfwd-FWD"),
        "allow_forward \"True\" is true: {saved}"
    );

    let (code, out) = run("no");
    assert_eq!(code, 0, "{out}");
    assert_eq!(recap_changed(&out, "proxy"), Some(1), "{out}");
    let saved = ruleset(&t.proxy, "iptables-save").unwrap();
    assert!(
        !saved.contains("PFWD-portfwd-FWD"),
        "allow_forward \"no\" is false: {saved}"
    );
    probe_tcp(&t.client, "10.0.1.1:4321").unwrap();

    let (code, out) = run("maybe");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("forwards[0].allow_forward") && out.contains("\\\"maybe\\\""),
        "names the field and the value: {out}"
    );
}

/// `ansible-test sanity` on the collection as built (static binary, sidecar docs, role,
/// changelog fragment, meta/runtime.yml), in the Ansible virtualenv without containers.
#[test]
fn ansible_test_sanity_is_clean() {
    let Some(venv) = common::venv("PORTFWD_ANSIBLE_VENV", "ansible-venv", "ansible-test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("ansible_collections/portfwd/portfwd");
    let build = Command::new("bash")
        .arg(repo().join("scripts/build-collection.sh"))
        .arg(crate::common::module_binary())
        .arg(dir.path().join("dist"))
        .arg(venv.join("bin/ansible-galaxy"))
        .arg(&stage)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let runtime = std::fs::read_to_string(stage.join("meta/runtime.yml")).unwrap();
    assert!(runtime.contains("requires_ansible"), "{runtime}");
    assert!(stage.join("roles/portfwd/tasks/main.yml").is_file());
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(venv.join("bin/ansible-test"))
        .args(["sanity", "--local", "--python", "3.11", "--requirements"])
        .current_dir(&stage)
        .env("PATH", &path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Running sanity test \"validate-modules\"") && !text.contains("ERROR"),
        "{text}"
    );

    // The changelog is antsibull-changelog's: it lints, and regenerating it changes nothing.
    let changelog = |args: &[&str]| {
        let out = Command::new(venv.join("bin/antsibull-changelog"))
            .args(args)
            .current_dir(&stage)
            .env("PATH", &path)
            .env("ANSIBLE_COLLECTIONS_PATH", dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "antsibull-changelog {args:?}: {text}");
    };
    changelog(&["lint"]);
    changelog(&["generate"]);
    assert_eq!(
        std::fs::read_to_string(stage.join("CHANGELOG.rst")).unwrap(),
        std::fs::read_to_string(repo().join("collection/CHANGELOG.rst")).unwrap(),
        "CHANGELOG.rst is what antsibull-changelog generates from changelogs/"
    );
}

/// The sidecar documentation and `portfwd schema` describe the same options, types, defaults
/// and choices, recursively.
#[test]
fn sidecar_docs_match_the_json_schema() {
    let docs: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("playbooks/library/portfwd.yml")).unwrap(),
    )
    .unwrap();
    let out = Command::new(portfwd().bin).arg("schema").output().unwrap();
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    compare(
        &docs["DOCUMENTATION"]["options"],
        &schema,
        &schema,
        "options",
    );
    assert!(docs["EXAMPLES"]
        .as_str()
        .is_some_and(|e| e.contains("portfwd.portfwd.portfwd")));
    for key in [
        "changed",
        "msg",
        "commands",
        "warnings",
        "forwards",
        "masquerade",
        "diff",
    ] {
        assert!(docs["RETURN"].get(key).is_some(), "RETURN lacks {key}");
    }
}

/// Resolves `$ref` into `$defs`.
fn resolve<'a>(node: &'a Value, root: &'a Value) -> &'a Value {
    match node
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        Some(name) => &root["$defs"][name],
        None => node,
    }
}

fn compare(options: &Value, object: &Value, root: &Value, path: &str) {
    let object = resolve(object, root);
    let props = object["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{path}: no properties in schema"));
    let opts = options
        .as_object()
        .unwrap_or_else(|| panic!("{path}: no options in docs"));
    let mut doc_keys: Vec<&String> = opts.keys().collect();
    let mut schema_keys: Vec<&String> = props.keys().collect();
    doc_keys.sort();
    schema_keys.sort();
    assert_eq!(
        doc_keys, schema_keys,
        "{path}: documented options differ from the schema"
    );
    let required: Vec<&str> = object["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, doc) in opts {
        let here = format!("{path}.{name}");
        let prop = resolve(&props[name], root);
        assert_eq!(
            doc["required"].as_bool().unwrap_or(false),
            required.contains(&name.as_str()),
            "{here}: required"
        );
        // A boolean or integer that also takes Ansible's string spellings says so.
        let schema_type = prop["type"].as_str().or_else(|| {
            prop["type"]
                .as_array()
                .and_then(|t| t.iter().find_map(|x| x.as_str().filter(|s| *s != "null")))
        });
        let doc_type = doc["type"].as_str().unwrap_or_default();
        let expected = match prop["x-ansible-type"].as_str().or(schema_type) {
            Some(spelled @ ("bool" | "int")) => spelled,
            Some("string") => "str",
            Some("boolean") => "bool",
            Some("integer") => "int",
            Some("array") => "list",
            _ => "raw_or_enum",
        };
        match (expected, doc_type) {
            ("raw_or_enum", "raw" | "str") => {}
            (e, d) => assert_eq!(e, d, "{here}: type"),
        }
        let choices: Vec<String> = prop["enum"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .or_else(|| {
                prop["oneOf"].as_array().map(|c| {
                    c.iter()
                        .filter_map(|v| v["const"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default();
        if doc.get("choices").is_some() {
            let doc_choices: Vec<String> = doc["choices"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            assert_eq!(doc_choices, choices, "{here}: choices");
        }
        if let Some(default) = props[name].get("default").or_else(|| prop.get("default")) {
            assert_eq!(&doc["default"], default, "{here}: default");
        }
        if doc_type == "list" && doc.get("suboptions").is_some() {
            compare(&doc["suboptions"], &prop["items"], root, &here);
        }
    }
}

/// The collection's integration target (`tests/integration/targets/portfwd_module`, `needs/root`)
/// run by `ansible-test integration` inside the proxy namespace: check mode, apply, a real
/// connection through the forward, re-run unchanged, a round-robin pool beside it (a real
/// connection, re-run unchanged), bad params, absent. Every file the module
/// writes goes under a directory of the test's own.
#[test]
fn ansible_test_integration_runs_the_collection_target() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        venv,
        ansible,
        t,
        _server,
        host_dir,
        ..
    }) = local_proxy()
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("ansible_collections/portfwd/portfwd");
    let build = Command::new("bash")
        .arg(repo().join("scripts/build-collection.sh"))
        .arg(crate::common::module_binary())
        .arg(dir.path().join("dist"))
        .arg(venv.join("bin/ansible-galaxy"))
        .arg(&stage)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    // ansible-test runs the play with an environment of its own: the module's directories
    // come in through the target's variables.
    std::fs::write(
        stage.join("tests/integration/integration_config.yml"),
        format!("portfwd_it_dir: {}\n", host_dir.display()),
    )
    .unwrap();
    let host_files = ["/run/portfwd", "/run/portfwd.lock", "/etc/portfwd"];
    let existed: Vec<bool> = host_files.iter().map(|p| Path::new(p).exists()).collect();
    let env: Vec<String> = ansible
        .env(&host_dir)
        .into_iter()
        .filter(|(k, _)| k != "ANSIBLE_COLLECTIONS_PATH" && k != "ANSIBLE_LIBRARY")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let test = venv.join("bin/ansible-test").display().to_string();
    let stage_text = stage.display().to_string();
    let mut argv: Vec<&str> = vec!["env", "-C", &stage_text];
    argv.extend(env.iter().map(String::as_str));
    argv.extend([
        test.as_str(),
        "integration",
        "--local",
        "--python",
        "3.11",
        "--allow-destructive",
        "portfwd_module",
    ]);
    let out = t.proxy.exec_with_input(&argv, "").unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Running portfwd_module integration test role"),
        "{text}"
    );
    assert!(text.contains("failed=0"), "{text}");
    // The module ran with the test's state and run dirs, and `absent` left nothing.
    assert!(host_dir.join("run").exists(), "{text}");
    for (path, existed) in host_files.iter().zip(existed) {
        assert_eq!(
            Path::new(path).exists(),
            existed,
            "{path}: the host's own files are untouched"
        );
    }
    assert!(!ruleset(&t.proxy, "iptables-save")
        .unwrap()
        .contains("PFWD-"));
}

/// The commands playbooks/README.md gives work from where it says, with its local inventory:
/// check mode from the repository root and from playbooks/ (inside the proxy namespace).
#[test]
fn the_playbooks_readme_commands_work_with_the_local_inventory() {
    if !prerequisites() {
        return;
    }
    let Some(LocalProxy {
        venv,
        ansible,
        t,
        _server,
        host_dir,
        ..
    }) = local_proxy()
    else {
        return;
    };
    let readme = std::fs::read_to_string(repo().join("playbooks/README.md")).unwrap();
    let root = repo().canonicalize().unwrap();
    let playbook_bin = venv.join("bin/ansible-playbook").display().to_string();
    for (cwd, command) in [
        (
            root.clone(),
            "ansible-playbook -i playbooks/inventory/local.ini playbooks/proxy.yml --check --diff",
        ),
        (
            root.join("playbooks"),
            "ansible-playbook -i inventory/local.ini proxy.yml --check --diff",
        ),
    ] {
        assert!(readme.contains(command), "the README gives {command:?}");
        let env: Vec<String> = ansible
            .env(&host_dir)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let cwd_text = cwd.display().to_string();
        let mut argv: Vec<&str> = vec!["env", "-C", &cwd_text];
        argv.extend(env.iter().map(String::as_str));
        argv.push(&playbook_bin);
        argv.extend(command.split_whitespace().skip(1));
        let out = t.proxy.exec_with_input(&argv, "").unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{command} in {cwd_text}: {text}"
        );
        assert_eq!(recap_changed(&text, "localhost"), Some(1), "{text}");
        assert!(
            !ruleset(&t.proxy, "iptables-save")
                .unwrap()
                .contains("PFWD-"),
            "check mode changed nothing"
        );
    }
}
