//! PATH shims put in front of the tools portfwd runs: one that records every write, one that
//! fails the Nth call of a tool. They prove "zero writes" and "rollback at every step".

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::netns::LabError;

/// The restore tools portfwd may write with, in every flavour.
pub const RESTORE_TOOLS: [&str; 6] = [
    "iptables-restore",
    "ip6tables-restore",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
];

fn real_tool(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn write_script(dir: &Path, tool: &str, body: &str) -> Result<(), LabError> {
    let io = |e: std::io::Error| LabError::Traffic(format!("writing shim {tool}: {e}"));
    let path = dir.join(tool);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)
}

/// Shell lines that count this call in `counter` into `$c`, under a lock: portfwd runs its
/// reads concurrently, and an unlocked read-increment-write would lose calls.
fn count_call(counter: &Path) -> String {
    let c = counter.display();
    format!(
        "exec 9>>'{c}.lock'; flock 9; c=$(cat '{c}' 2>/dev/null || echo 0); c=$((c+1)); echo $c > '{c}'; flock -u 9; exec 9>&-\n"
    )
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Logs every write (restore calls, `ip -batch`, nft calls other than listings), then runs the
/// real tool.
pub struct WriteRecorder {
    dir: tempfile::TempDir,
}

/// A shim that appends `TOOL ARGS` to `log` when the call matches the shell `case` pattern
/// `logged` (every call when None), then runs the real tool.
fn logging_shim(
    dir: &Path,
    log: &Path,
    tool: &str,
    real: &Path,
    logged: Option<&str>,
) -> Result<(), LabError> {
    let line = format!("echo \"{tool} $*\" >> '{}'", log.display());
    let record = match logged {
        None => line,
        Some(pattern) => format!("case \" $* \" in {pattern}) {line};; esac"),
    };
    write_script(
        dir,
        tool,
        &format!("{record}\nexec '{}' \"$@\"\n", real.display()),
    )
}

/// The lines of a shim log so far.
fn read_log(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

impl WriteRecorder {
    pub fn new() -> Result<WriteRecorder, LabError> {
        let dir = tempfile::tempdir().map_err(|e| LabError::Traffic(format!("tempdir: {e}")))?;
        let log = dir.path().join("calls.log");
        // Every restore call writes; nft writes unless it lists; ip writes with `-batch`.
        let writers = RESTORE_TOOLS.iter().map(|tool| (*tool, None)).chain([
            ("nft", Some("*\" list \"*) ;; *")),
            ("ip", Some("*\" -batch \"*")),
        ]);
        for (tool, logged) in writers {
            if let Some(real) = real_tool(tool) {
                logging_shim(dir.path(), &log, tool, &real, logged)?;
            }
        }
        Ok(WriteRecorder { dir })
    }

    /// PATH with the shims first.
    pub fn path(&self) -> String {
        path_with(self.dir.path())
    }

    /// The write calls seen so far.
    pub fn calls(&self) -> Vec<String> {
        read_log(self.dir.path())
    }
}

/// Logs every call of the given tools (one line each: the tool's name and its arguments), then
/// runs the real tool. Reads can be counted this way too (how many `iptables-save` a run made).
pub struct CallLog {
    dir: tempfile::TempDir,
}

impl CallLog {
    pub fn new(tools: &[&str]) -> Result<CallLog, LabError> {
        let dir = tempfile::tempdir().map_err(|e| LabError::Traffic(format!("tempdir: {e}")))?;
        let log = dir.path().join("calls.log");
        for tool in tools {
            let real =
                real_tool(tool).ok_or_else(|| LabError::Traffic(format!("{tool} not on PATH")))?;
            logging_shim(dir.path(), &log, tool, &real, None)?;
        }
        Ok(CallLog { dir })
    }

    /// PATH with the shims first.
    pub fn path(&self) -> String {
        path_with(self.dir.path())
    }

    /// The calls seen so far.
    pub fn calls(&self) -> Vec<String> {
        read_log(self.dir.path())
    }
}

/// Fails the Nth call of one tool (exit 1, message on stderr, nothing run); every other call
/// runs the real tool.
pub struct FailNth {
    dir: tempfile::TempDir,
}

impl FailNth {
    pub fn new(tool: &str, n: usize) -> Result<FailNth, LabError> {
        let dir = tempfile::tempdir().map_err(|e| LabError::Traffic(format!("tempdir: {e}")))?;
        let real =
            real_tool(tool).ok_or_else(|| LabError::Traffic(format!("{tool} not on PATH")))?;
        let counter = dir.path().join("count");
        // nft also answers portfwd's best-effort looks at other tables (`-j list chains`,
        // `-j list chain ...`, `-j list tables`), which never fail a run: they are passed
        // through, not counted.
        let pass = if tool == "nft" {
            format!(
                "case \"$*\" in \"-j list chains\"|\"-j list tables\"|\"-j list chain \"*) exec '{}' \"$@\";; esac\n",
                real.display()
            )
        } else {
            String::new()
        };
        let body = format!(
            "{pass}{count}if [ \"$c\" -eq {n} ]; then echo \"injected failure of {tool} call $c\" >&2; exit 1; fi\n\
             exec '{real}' \"$@\"\n",
            count = count_call(&counter),
            real = real.display(),
        );
        write_script(dir.path(), tool, &body)?;
        Ok(FailNth { dir })
    }

    pub fn path(&self) -> String {
        path_with(self.dir.path())
    }

    /// How many times the tool was called.
    pub fn calls(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("count"))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Makes the Nth call of one tool sleep before running the real tool, and says so by creating
/// a marker file: the moment to kill portfwd in the middle of an apply.
pub struct SlowNth {
    dir: tempfile::TempDir,
}

impl SlowNth {
    pub fn new(tool: &str, n: usize, seconds: u32) -> Result<SlowNth, LabError> {
        let dir = tempfile::tempdir().map_err(|e| LabError::Traffic(format!("tempdir: {e}")))?;
        let real =
            real_tool(tool).ok_or_else(|| LabError::Traffic(format!("{tool} not on PATH")))?;
        let counter = dir.path().join("count");
        let marker = dir.path().join("sleeping");
        let body = format!(
            "{count}if [ \"$c\" -eq {n} ]; then touch '{marker}'; sleep {seconds}; fi\n\
             exec '{real}' \"$@\"\n",
            count = count_call(&counter),
            marker = marker.display(),
            real = real.display(),
        );
        write_script(dir.path(), tool, &body)?;
        Ok(SlowNth { dir })
    }

    pub fn path(&self) -> String {
        path_with(self.dir.path())
    }

    /// True once the Nth call is sleeping.
    pub fn sleeping(&self) -> bool {
        self.dir.path().join("sleeping").exists()
    }
}
