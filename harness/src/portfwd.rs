//! Runs the real `portfwd` binary inside a namespace and reads its result JSON.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use serde_json::Value;

use crate::netns::{LabError, Netns};

/// The `portfwd` binary under test, run with its lock, record and state files in a private
/// temporary directory so the lab never touches the host's `/run/portfwd` or `/etc/portfwd`.
#[derive(Debug, Clone)]
pub struct Portfwd {
    pub bin: PathBuf,
    sandbox: Arc<tempfile::TempDir>,
}

/// One run: the parsed result JSON (Null if stdout was not JSON), exit code and raw output.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub json: Value,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl RunResult {
    pub fn changed(&self) -> bool {
        self.json["changed"] == Value::Bool(true)
    }
    pub fn failed(&self) -> bool {
        self.json["failed"] == Value::Bool(true)
    }
    pub fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or_default()
    }
}

impl Portfwd {
    /// `PORTFWD_BIN`, else `portfwd` next to the running executable or one directory up
    /// (where cargo puts it relative to test binaries in `deps/`).
    pub fn locate() -> Result<Portfwd, LabError> {
        if let Some(bin) = std::env::var_os("PORTFWD_BIN") {
            return Portfwd::at(Path::new(&bin));
        }
        let exe =
            std::env::current_exe().map_err(|e| LabError::Traffic(format!("current_exe: {e}")))?;
        let bin = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("portfwd"))
            .find(|p| p.is_file());
        match bin {
            Some(bin) => Portfwd::at(&bin),
            None => Err(LabError::Traffic(format!(
                "portfwd binary not found near {} (build it, or set PORTFWD_BIN)",
                exe.display()
            ))),
        }
    }

    pub fn at(bin: &Path) -> Result<Portfwd, LabError> {
        let sandbox = tempfile::Builder::new()
            .prefix("portfwd-lab-")
            .tempdir()
            .map_err(|e| LabError::Traffic(format!("tempdir: {e}")))?;
        Ok(Portfwd {
            bin: bin.to_path_buf(),
            sandbox: Arc::new(sandbox),
        })
    }

    /// The state dir `persist: true` writes to for the host `ns` (each namespace is a host
    /// of its own, with its own `/etc/portfwd`).
    pub fn state_dir(&self, ns: &Netns) -> PathBuf {
        self.sandbox.path().join(ns.name()).join("state")
    }

    /// The run dir (record of added addresses) of the host `ns`; remove it to simulate a reboot.
    pub fn run_dir(&self, ns: &Netns) -> PathBuf {
        self.sandbox.path().join(ns.name()).join("run")
    }

    /// Runs `portfwd ARGS...` in `ns` with `input` on stdin and `env` set.
    pub fn run(
        &self,
        ns: &Netns,
        args: &[&str],
        input: &str,
        env: &[(&str, &str)],
    ) -> Result<RunResult, LabError> {
        self.run_under(ns, &[], args, input, env)
    }

    /// [`Portfwd::run`] with `wrapper` before it (`unshare -m sh -c '...; exec "$@"' sh`, to
    /// change what the run sees).
    pub fn run_under(
        &self,
        ns: &Netns,
        wrapper: &[&str],
        args: &[&str],
        input: &str,
        env: &[(&str, &str)],
    ) -> Result<RunResult, LabError> {
        let bin = self.bin.display().to_string();
        let assignments: Vec<String> = self
            .env_for(ns)
            .iter()
            .map(|(k, v)| format!("{k}={}", v.display()))
            .chain(env.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.push("env");
        argv.extend(assignments.iter().map(String::as_str));
        argv.push(&bin);
        argv.extend_from_slice(args);
        let out: Output = ns.exec_with_input(&argv, input)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(RunResult {
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            code: out.status.code().unwrap_or(-1),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Starts `portfwd ARGS...` in `ns` without waiting, in a process group of its own (so a
    /// test can kill it and every tool it runs); stdin gets `input`.
    pub fn spawn(
        &self,
        ns: &Netns,
        args: &[&str],
        input: &str,
        env: &[(&str, &str)],
    ) -> Result<std::process::Child, LabError> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "env"]);
        for (k, v) in self.env_for(ns) {
            cmd.arg(format!("{k}={}", v.display()));
        }
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.arg(&self.bin).args(args).process_group(0);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: "portfwd".into(),
            source,
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input.as_bytes());
        }
        Ok(child)
    }

    /// The lock, state and run locations of host `ns` in the sandbox.
    fn env_for(&self, ns: &Netns) -> [(&'static str, PathBuf); 3] {
        [
            ("PORTFWD_LOCK_FILE", self.sandbox.path().join("lock")),
            ("PORTFWD_STATE_DIR", self.state_dir(ns)),
            ("PORTFWD_RUN_DIR", self.run_dir(ns)),
        ]
    }

    /// `portfwd apply` with params JSON on stdin.
    pub fn apply(&self, ns: &Netns, params: &Value) -> Result<RunResult, LabError> {
        self.run(ns, &["apply"], &params.to_string(), &[])
    }
}

impl Portfwd {
    /// Runs `portfwd trace --json` for `proto`/`target`'s port in `on`, sends one probe from
    /// `from` while it runs, and returns the traced packets (JSON objects, one per packet).
    pub fn traced(
        &self,
        on: &Netns,
        from: &Netns,
        proto: crate::traffic::Proto,
        target: std::net::SocketAddr,
    ) -> Result<Vec<Value>, LabError> {
        let proto_name = match proto {
            crate::traffic::Proto::Tcp => "tcp",
            crate::traffic::Proto::Udp => "udp",
        };
        let port = target.port().to_string();
        let args = ["--proto", proto_name, "--dport", &port];
        let child = self.start_trace(
            on,
            &[&args[..], &["--count", "1", "--timeout", "8", "--json"]].concat(),
        )?;
        let _ = crate::traffic::probe(from, proto, target);
        let out = child
            .wait_with_output()
            .map_err(|e| LabError::Traffic(format!("portfwd trace: {e}")))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

impl Portfwd {
    /// Starts `portfwd trace ARGS` in `on` (stdout and stderr piped) and returns once its
    /// table is in place (or after 5 s), so the traffic that follows is traced.
    pub fn start_trace(&self, on: &Netns, args: &[&str]) -> Result<std::process::Child, LabError> {
        use std::process::{Command, Stdio};
        let child = Command::new("ip")
            .args(["netns", "exec", on.name()])
            .arg(&self.bin)
            .arg("trace")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::Traffic(format!("portfwd trace: {e}")))?;
        let table = format!("portfwd_trace_{}", child.id());
        let started = std::time::Instant::now();
        while !on
            .stdout(&["nft", "list", "tables"])
            .unwrap_or_default()
            .contains(&table)
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(child)
    }
}

/// A traced packet as lines (`table chain: rule => verdict [entry]`), for failure reports.
pub fn format_packet(packet: &Value) -> String {
    let mut out = format!(
        "packet {}: {}\n",
        packet["packet"],
        packet["summary"].as_str().unwrap_or_default()
    );
    for hop in packet["hops"].as_array().into_iter().flatten() {
        let entry = hop["entry"]
            .as_str()
            .map(|e| format!("   [{e}]"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {} {}: {} => {}{entry}\n",
            hop["table"].as_str().unwrap_or_default(),
            hop["chain"].as_str().unwrap_or_default(),
            hop["rule"].as_str().unwrap_or_default(),
            hop["verdict"].as_str().unwrap_or_default()
        ));
    }
    if let Some(nat) = packet["nat"].as_str() {
        out.push_str(&format!("  nat: {nat}\n"));
    }
    out.push_str(&format!(
        "  verdict: {}\n",
        packet["verdict"].as_str().unwrap_or_default()
    ));
    out
}
