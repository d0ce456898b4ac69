//! The boundary to the host: every read and write the engine makes goes through [`System`].
//!
//! [`RealSystem`] runs the real tools, found through `PATH` so tests can put shims in front of
//! them. It executes and reads; it decides nothing (what a read means is the observe stage's
//! business, whether a step runs the plan's). Unit tests use the fake host in `testing`.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::net::{Family, Proto};
use crate::tools::{IptablesTool, NftDump, Read};

mod nfdump;
mod nfgen;
mod stored;

/// A failure talking to the host.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{tool} not found on PATH: {source}")]
    NotFound { tool: String, source: which::Error },
    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "timed out after {seconds}s waiting for the lock {path} (another portfwd run holds it)"
    )]
    LockTimeout { path: String, seconds: u64 },
}

/// Reads and writes of host state, each a single call the engine can count and fake.
pub(crate) trait System {
    /// Runs independent reads, results in order. The default runs them one by one; the real
    /// host runs them concurrently (each is a process of its own).
    fn read_batch(&mut self, reads: &[Read]) -> Vec<Result<(String, String), SystemError>> {
        reads
            .iter()
            .map(|read| match read {
                Read::Save(tool, family) => self.save(*tool, *family),
                Read::IpJson(args) => self.ip_json(args).map(|out| (out, String::new())),
                Read::SaveTool(tool, family) => self
                    .save_tool(*tool, *family)
                    .map(|out| (out, String::new())),
                Read::NftJson(args) => self.nft_json(args).map(|out| (out, String::new())),
                Read::NftTable(name) => self.nft_table(name).map(|out| (out, String::new())),
                Read::LegacySave(family, in_use) => self
                    .legacy_save(*family, *in_use)
                    .map(|out| (out, String::new())),
                Read::NftSave(family, table) => self
                    .nft_save(*family, table)
                    .map(|out| (out, String::new())),
            })
            .collect()
    }
    /// `iptables-save` (or `ip6tables-save`): stdout and stderr.
    fn save(&mut self, tool: IptablesTool, family: Family)
        -> Result<(String, String), SystemError>;
    /// `ss -H -l -n -t -u`: the listening TCP and bound UDP sockets of this namespace.
    fn listening_sockets(&mut self) -> Result<String, SystemError>;
    /// Opens a TCP connection to `target` and closes it (doctor's opt-in `--probe`).
    fn connect(&mut self, target: std::net::SocketAddr) -> Result<(), SystemError>;
    /// `iptables-legacy-save` for `family` (a read); empty when not installed or when it is
    /// `in_use`'s save tool.
    fn legacy_save(&mut self, family: Family, in_use: IptablesTool) -> Result<String, SystemError>;
    /// The nftables tables that carry flags (`owner`, `dormant`), as (family, name).
    fn nft_flagged_tables(&mut self) -> Result<Vec<(String, String)>, SystemError>;
    /// `iptables-nft-save -t TABLE` for `family` (a read); empty when not installed.
    fn nft_save(&mut self, family: Family, table: &'static str) -> Result<String, SystemError>;
    /// `nft -j ARGS...` (a read); empty output when `nft` is not installed.
    fn nft_json(&mut self, args: &[String]) -> Result<String, SystemError>;
    /// `nft -j list table inet NAME` (empty when there is no such table).
    fn nft_table(&mut self, name: &str) -> Result<String, SystemError>;
    /// The netlink dump of `inet NAME` ([`NftDump`]), with its elements when its shape is
    /// `elements_if`; None when it could not be made at one generation, or at all (the
    /// caller lists the table).
    fn nft_dump(
        &mut self,
        name: &str,
        elements_if: Option<u64>,
    ) -> Result<Option<NftDump>, SystemError>;
    /// One `nft -f -` transaction.
    fn nft_apply(&mut self, script: &str) -> Result<(), SystemError>;
    /// Is this tool on PATH (a backend that is not installed holds nothing)?
    fn has_tool(&mut self, name: &str) -> bool;
    /// The nf_tables ruleset generation of this network namespace (bumped by every committed
    /// nftables transaction); None when the kernel has no nf_tables or the host cannot say.
    fn nft_generation(&mut self) -> Result<Option<u32>, SystemError>;
    /// Where `iptables-save` (or `ip6tables-save`) resolves to, links followed (see
    /// [`Read::SaveTool`]).
    fn save_tool(&mut self, tool: IptablesTool, family: Family) -> Result<String, SystemError>;
    /// One `iptables-restore --noflush` transaction (one table per payload).
    fn restore(
        &mut self,
        tool: IptablesTool,
        family: Family,
        payload: &str,
    ) -> Result<(), SystemError>;
    /// A sysctl under `/proc/sys` (`net/ipv4/ip_forward`); None when it does not exist.
    fn read_sysctl(&mut self, key: &str) -> Result<Option<String>, SystemError>;
    /// Sets a sysctl (`sysctl -w net/ipv4/ip_forward=1`).
    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), SystemError>;
    /// `ip -N -j ARGS...`: a read, JSON on stdout.
    fn ip_json(&mut self, args: &[&str]) -> Result<String, SystemError>;
    /// `ip -4|-6 -batch -` with the script on stdin.
    fn ip_batch(&mut self, family: Family, script: &str) -> Result<(), SystemError>;
    fn list_nft_table(&mut self, family: Family, table: &str) -> Result<String, SystemError>;
    /// `nft delete table ip|ip6 TABLE`.
    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), SystemError>;
    /// The params stored by `persist: true`, if any.
    fn read_stored(&mut self, instance: &str) -> Result<Option<String>, SystemError>;
    /// Stores params (`Some`) or removes the stored file (`None`).
    fn write_stored(&mut self, instance: &str, params: Option<&str>) -> Result<(), SystemError>;
    /// `conntrack -L -f FAMILY -p PROTO`; None when the `conntrack` tool is not installed.
    fn conntrack_list(
        &mut self,
        family: Family,
        proto: Proto,
    ) -> Result<Option<String>, SystemError>;
    /// `conntrack ARGS` (a `-D` naming one entry); false when the entry was already gone.
    fn conntrack_delete(&mut self, args: &[String]) -> Result<bool, SystemError>;
}

/// Where `persist: true` stores params: `--state-dir`, else `PORTFWD_STATE_DIR`, else `/etc/portfwd`.
/// Does this process hold CAP_NET_ADMIN (root, or a capability granted to it)? Every read of
/// the firewall and every change needs it; without it the tools fail one by one with their
/// own texts.
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// What to tell an operator who ran portfwd without it.
pub const NEEDS_ROOT: &str = "portfwd needs root (CAP_NET_ADMIN) to read and change the firewall, addresses and routes: run it as root (sudo portfwd ...); with Ansible set `become: true` on the task or play";

pub fn default_state_dir() -> PathBuf {
    std::env::var_os("PORTFWD_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/portfwd"))
}

/// Where runtime records live: `PORTFWD_RUN_DIR`, else `/run/portfwd` (tmpfs, so the record
/// of added addresses is forgotten at reboot, exactly when the addresses themselves vanish).
pub(crate) fn default_run_dir() -> PathBuf {
    std::env::var_os("PORTFWD_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/portfwd"))
}

/// Set to `1` to act as on a kernel without `SO_NETNS_COOKIE` (before 5.14): files in the run
/// dir are then keyed by inode, device and boot id. Used by the tests; harmless anywhere.
pub(crate) const NO_COOKIE_ENV: &str = "PORTFWD_NO_NETNS_COOKIE";

/// A file's identity and last change: while these are the same, so is its content (the run
/// holds the lock, and every write replaces the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileId {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// The host, through real commands, `/proc/sys` and portfwd's own files.
pub struct RealSystem {
    sysctl_root: PathBuf,
    state_dir: PathBuf,
    run_dir: PathBuf,
    /// False simulates a kernel without `SO_NETNS_COOKIE` ([`NO_COOKIE_ENV`]).
    use_cookie: bool,
    /// The records this run read and parsed whole, as they were then.
    pub(crate) parsed_records: std::collections::BTreeMap<PathBuf, FileId>,
}

impl Default for RealSystem {
    fn default() -> RealSystem {
        RealSystem::new()
    }
}

impl RealSystem {
    pub fn new() -> RealSystem {
        RealSystem {
            sysctl_root: PathBuf::from("/proc/sys"),
            state_dir: default_state_dir(),
            run_dir: default_run_dir(),
            use_cookie: std::env::var(NO_COOKIE_ENV).as_deref() != Ok("1"),
            parsed_records: std::collections::BTreeMap::new(),
        }
    }

    pub fn with_state_dir(mut self, dir: PathBuf) -> RealSystem {
        self.state_dir = dir;
        self
    }

    /// The network namespace a stored instance belongs to, and whether that is this one.
    pub fn stored_namespace(&self, instance: &str) -> Result<(String, bool), SystemError> {
        let owner = stored::owner(&self.state_dir, instance)?;
        let here = stored::current_namespace()?;
        let ours = here.as_deref() == Some(owner.as_str());
        Ok((owner, ours))
    }

    /// This namespace's stored params of `instance` (see [`stored`]).
    pub fn stored_params(&self, instance: &str) -> Result<Option<String>, SystemError> {
        stored::read(&self.state_dir, &self.stored_path(instance), instance)
    }

    /// Instances with stored params, of every namespace sharing the state dir, sorted, for
    /// `portfwd restore` (see [`RealSystem::stored_namespace`]).
    pub fn stored_instances(&self) -> Result<Vec<String>, SystemError> {
        let io = |source| SystemError::Io {
            path: self.state_dir.display().to_string(),
            source,
        };
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// The run dir, shared by every network namespace (see [`default_run_dir`]).
    pub(crate) fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Whether this namespace's `SO_NETNS_COOKIE` may key its files (see [`NO_COOKIE_ENV`]).
    pub(crate) fn use_cookie(&self) -> bool {
        self.use_cookie
    }

    /// `ip -j link show`: the links of this namespace.
    pub(crate) fn links_json(&self) -> Result<String, SystemError> {
        self.run("ip", &["-j", "link", "show"], None)
            .map(|(out, _)| out)
    }

    fn stored_path(&self, instance: &str) -> PathBuf {
        self.state_dir.join(format!("{instance}.json"))
    }

    fn read_one(&self, read: &Read) -> Result<(String, String), SystemError> {
        match read {
            Read::Save(tool, family) => self.run(&tool.command(*family, "save"), &[], None),
            Read::IpJson(args) => self.ip_json_text(args).map(|out| (out, String::new())),
            Read::LegacySave(family, in_use) => {
                let tool = IptablesTool::Legacy.command(*family, "save");
                let resolve = |name: &str| {
                    which::which(name)
                        .ok()
                        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
                };
                let Some(legacy) = resolve(&tool) else {
                    return Ok((String::new(), String::new()));
                };
                // When the save in use is that same tool, `Read::Save` already reads it.
                let in_use = in_use.command(*family, "save");
                if resolve(&in_use) == Some(legacy) {
                    return Ok((String::new(), String::new()));
                }
                self.run(&tool, &[], None)
            }
            Read::NftSave(family, table) => {
                let tool = IptablesTool::Nft.command(*family, "save");
                if which::which(&tool).is_err() {
                    return Ok((String::new(), String::new()));
                }
                self.run(&tool, &["-t", table], None)
            }
            Read::NftJson(args) => {
                if which::which("nft").is_err() {
                    return Ok((String::new(), String::new()));
                }
                let mut full = vec!["-j"];
                full.extend(args.iter().map(String::as_str));
                self.run("nft", &full, None)
            }
            Read::NftTable(name) => {
                if which::which("nft").is_err() {
                    return Ok((String::new(), String::new()));
                }
                // A name is one word (validated instance); nft joins its argv into one line.
                match self.run("nft", &["-j", "list", "table", "inet", name], None) {
                    Err(SystemError::Failed { stderr, .. })
                        if stderr.contains("No such file or directory") =>
                    {
                        Ok((String::new(), String::new()))
                    }
                    other => other,
                }
            }
            Read::SaveTool(tool, family) => {
                let tool = tool.command(*family, "save");
                let path = which::which(&tool).map_err(|source| SystemError::NotFound {
                    tool: tool.clone(),
                    source,
                })?;
                let real = std::fs::canonicalize(&path).unwrap_or(path);
                let mut named = real.display().to_string();
                let file = real.file_name().unwrap_or_default().to_string_lossy();
                if !file.contains("-nft") && !file.contains("-legacy") {
                    // Best-effort: a tool that cannot say stays of unknown flavour.
                    if let Ok((version, _)) = self.run(&named, &["--version"], None) {
                        for flavour in ["nf_tables", "legacy"] {
                            if version.contains(&format!("({flavour})")) {
                                named = format!("{named} ({flavour})");
                            }
                        }
                    }
                }
                Ok((named, String::new()))
            }
        }
    }

    fn ip_json_text(&self, args: &[&str]) -> Result<String, SystemError> {
        let mut full = vec!["-N", "-j"];
        full.extend_from_slice(args);
        self.run("ip", &full, None).map(|(out, _)| out)
    }

    fn run(
        &self,
        tool: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(String, String), SystemError> {
        let path = which::which(tool).map_err(|source| SystemError::NotFound {
            tool: tool.to_string(),
            source,
        })?;
        let mut child = Command::new(&path)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SystemError::Spawn {
                tool: tool.to_string(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that dies early closes the pipe; its exit status tells the real story.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| SystemError::Spawn {
                tool: tool.to_string(),
                source,
            })?;
        // No copy when it is UTF-8, as it is (a save of 10,000 rules is over a megabyte).
        let stdout = String::from_utf8(out.stdout)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(SystemError::Failed {
                tool: tool.to_string(),
                status: out.status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok((stdout, stderr))
    }
}

impl System for RealSystem {
    fn read_batch(&mut self, reads: &[Read]) -> Vec<Result<(String, String), SystemError>> {
        let this: &RealSystem = self;
        std::thread::scope(|scope| {
            let handles: Vec<_> = reads
                .iter()
                .map(|read| scope.spawn(move || this.read_one(read)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SystemError::Io {
                            path: "read thread".into(),
                            source: std::io::Error::other("a read thread panicked"),
                        })
                    })
                })
                .collect()
        })
    }

    fn save(
        &mut self,
        tool: IptablesTool,
        family: Family,
    ) -> Result<(String, String), SystemError> {
        self.read_one(&Read::Save(tool, family))
    }

    fn listening_sockets(&mut self) -> Result<String, SystemError> {
        self.run("ss", &["-H", "-l", "-n", "-t", "-u"], None)
            .map(|(out, _)| out)
    }

    fn connect(&mut self, target: std::net::SocketAddr) -> Result<(), SystemError> {
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .map(drop)
            .map_err(|source| SystemError::Io {
                path: format!("connect {target}"),
                source,
            })
    }

    fn legacy_save(&mut self, family: Family, in_use: IptablesTool) -> Result<String, SystemError> {
        self.read_one(&Read::LegacySave(family, in_use))
            .map(|(out, _)| out)
    }

    fn nft_save(&mut self, family: Family, table: &'static str) -> Result<String, SystemError> {
        self.read_one(&Read::NftSave(family, table))
            .map(|(out, _)| out)
    }

    fn nft_flagged_tables(&mut self) -> Result<Vec<(String, String)>, SystemError> {
        let family = |f: u8| match f {
            1 => "inet",
            2 => "ip",
            3 => "arp",
            5 => "netdev",
            7 => "bridge",
            10 => "ip6",
            _ => "unknown",
        };
        nfgen::flagged_tables()
            .map(|tables| {
                tables
                    .into_iter()
                    .map(|(f, name)| (family(f).to_string(), name))
                    .collect()
            })
            .map_err(|source| SystemError::Io {
                path: "netlink NFT_MSG_GETTABLE".into(),
                source,
            })
    }

    fn nft_json(&mut self, args: &[String]) -> Result<String, SystemError> {
        self.read_one(&Read::NftJson(args.to_vec()))
            .map(|(out, _)| out)
    }

    fn nft_table(&mut self, name: &str) -> Result<String, SystemError> {
        self.read_one(&Read::NftTable(name.to_string()))
            .map(|(out, _)| out)
    }

    /// A dump that fails (netlink refused, an answer not understood) is no dump: the table
    /// is listed instead.
    fn nft_dump(
        &mut self,
        name: &str,
        elements_if: Option<u64>,
    ) -> Result<Option<NftDump>, SystemError> {
        Ok(nfdump::dump(name, elements_if).ok().flatten())
    }

    fn nft_apply(&mut self, script: &str) -> Result<(), SystemError> {
        self.run("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn has_tool(&mut self, name: &str) -> bool {
        which::which(name).is_ok()
    }

    /// A host that will not say (no nf_tables, netlink refused in a container) gives None:
    /// the cache is an optimisation, never a reason to fail.
    fn nft_generation(&mut self) -> Result<Option<u32>, SystemError> {
        Ok(nfgen::generation().ok().flatten())
    }

    fn save_tool(&mut self, tool: IptablesTool, family: Family) -> Result<String, SystemError> {
        self.read_one(&Read::SaveTool(tool, family))
            .map(|(path, _)| path)
    }

    fn restore(
        &mut self,
        tool: IptablesTool,
        family: Family,
        payload: &str,
    ) -> Result<(), SystemError> {
        let wait = crate::tools::RESTORE_WAIT_SECONDS.to_string();
        self.run(
            &tool.command(family, "restore"),
            &["--noflush", "-w", &wait],
            Some(payload),
        )
        .map(drop)
    }

    fn read_sysctl(&mut self, key: &str) -> Result<Option<String>, SystemError> {
        let path = self.sysctl_root.join(key);
        match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Some(v.trim().to_string())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SystemError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Through `sysctl -w` (slash-separated keys, so interface names with dots stay intact):
    /// every write is a command on PATH, like every other write, and can be fault-injected.
    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), SystemError> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")], None)
            .map(drop)
    }

    fn ip_json(&mut self, args: &[&str]) -> Result<String, SystemError> {
        self.ip_json_text(args)
    }

    fn ip_batch(&mut self, family: Family, script: &str) -> Result<(), SystemError> {
        let flag = format!("-{}", family.ip_flag());
        self.run("ip", &[&flag, "-batch", "-"], Some(script))
            .map(drop)
    }

    fn list_nft_table(&mut self, family: Family, table: &str) -> Result<String, SystemError> {
        let args = ["-j", "list", "table", family.nft_family(), table];
        self.run("nft", &args, None).map(|(out, _)| out)
    }

    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), SystemError> {
        self.run(
            "nft",
            &["delete", "table", family.nft_family(), table],
            None,
        )
        .map(drop)
    }

    fn read_stored(&mut self, instance: &str) -> Result<Option<String>, SystemError> {
        stored::read(&self.state_dir, &self.stored_path(instance), instance)
    }

    fn write_stored(&mut self, instance: &str, params: Option<&str>) -> Result<(), SystemError> {
        stored::write(
            &self.state_dir,
            &self.stored_path(instance),
            instance,
            params,
        )
    }

    fn conntrack_list(
        &mut self,
        family: Family,
        proto: Proto,
    ) -> Result<Option<String>, SystemError> {
        if which::which("conntrack").is_err() {
            return Ok(None);
        }
        let args = ["-L", "-f", family.conntrack_name(), "-p", proto.name()];
        self.run("conntrack", &args, None).map(|(out, _)| Some(out))
    }

    fn conntrack_delete(&mut self, args: &[String]) -> Result<bool, SystemError> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.run("conntrack", &args, None) {
            Ok(_) => Ok(true),
            // The flow ended (or was replaced) between listing and deleting.
            Err(SystemError::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn remove_if_present(path: &Path) -> Result<(), SystemError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SystemError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Writes `text` to `path` atomically and durably (temp file, fsync, rename, fsync of the
/// directory) with mode 0600, creating `dir`
/// with mode 0700 when missing.
pub(crate) fn write_private(dir: &Path, path: &Path, text: &str) -> Result<(), SystemError> {
    let io = |source| SystemError::Io {
        path: path.display().to_string(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    // Durable before it is visible, and the rename durable too: a crash right after a run
    // must leave the old file or the new one, never an empty one.
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// An exclusive lock held for a whole run, so concurrent runs are serialised, not interleaved.
pub struct RunLock {
    _lock: Flock<File>,
}

impl RunLock {
    /// Default lock file; `PORTFWD_LOCK_FILE` overrides it.
    pub fn default_path() -> PathBuf {
        std::env::var_os("PORTFWD_LOCK_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/portfwd.lock"))
    }

    /// Waits up to `timeout` for the lock. The file is created with mode 0600.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<RunLock, SystemError> {
        let io = |source| SystemError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let start = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(RunLock { _lock: lock }),
                Err((returned, errno)) => {
                    if errno != nix::errno::Errno::EWOULDBLOCK && errno != nix::errno::Errno::EINTR
                    {
                        return Err(io(std::io::Error::from(errno)));
                    }
                    if start.elapsed() >= timeout {
                        return Err(SystemError::LockTimeout {
                            path: path.display().to_string(),
                            seconds: timeout.as_secs(),
                        });
                    }
                    file = returned;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_times_out() {
        let dir = std::env::temp_dir().join(format!("portfwd-lock-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("lock");
        let held = RunLock::acquire(&path, Duration::from_secs(1)).unwrap();
        let err = RunLock::acquire(&path, Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(err.to_string().contains("timed out"), "{err}");
        drop(held);
        assert!(RunLock::acquire(&path, Duration::from_millis(100)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
