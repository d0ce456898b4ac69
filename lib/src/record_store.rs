//! Where the record of created objects ([`Record`]) lives on disk, and how a run finds the one
//! of its own network namespace.
//!
//! Records sit in one run dir (`/run/portfwd`) shared by every namespace, so each file is keyed
//! by namespace. The key must never be inherited by a later namespace: that one would take the
//! addresses of a gone namespace's record for portfwd's own and delete them.
//! - Linux 5.14+: the namespace cookie (`SO_NETNS_COOKIE`), never reused until reboot.
//! - Older kernels (RHEL 8's 4.18, Ubuntu 20.04's 5.4, Debian 11's 5.10): the namespace's
//!   inode and device plus the boot id. The kernel reuses a freed namespace inode at once, so a
//!   record read under this key is also checked against a fingerprint of the namespace taken
//!   when it was written (the index and MAC of its links; veth MACs are random per creation):
//!   when none of them is here any more, the record belongs to a gone namespace and is ignored.
//!
//! Every file carries a stamp (inode, device, boot id), so a run that writes can sweep the
//! records of namespaces that no longer exist: no process, thread, open descriptor or bind
//! mount holds their inode any more. A record that cannot be parsed is never taken as empty
//! silently: the run warns, and the next write moves the file aside for inspection.

use std::collections::{BTreeSet, HashSet};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ownership::{valid_instance, Record};
use crate::system::{write_private, FileId, RealSystem, System, SystemError};

/// Where a run keeps and finds the record: the real host's run dir ([`RealSystem`]), or the
/// fake host's memory. Apart from [`System`], which knows nothing of records.
pub(crate) trait Records {
    /// What this instance created in this network namespace (see [`Record`]), and a warning
    /// when the stored record could not be trusted (corrupt, or another namespace's).
    fn read_record(&mut self, instance: &str) -> Result<(Record, Option<String>), SystemError>;
    fn write_record(&mut self, instance: &str, record: &Record) -> Result<(), SystemError>;
    /// The records of the other instances in this network namespace (what they created).
    fn other_records(&mut self, instance: &str) -> Result<Vec<Record>, SystemError>;
}

/// The host as the pipeline uses it: its commands and files, and its records.
pub(crate) trait Host: System + Records {}

impl<T: System + Records> Host for T {}

impl Records for RealSystem {
    fn read_record(&mut self, instance: &str) -> Result<(Record, Option<String>), SystemError> {
        let id = NetnsId::current(self.use_cookie())?;
        let path = self.run_dir().join(id.file_name(instance));
        let loaded = load(&path, &id, &links(self, &id)?)?;
        match loaded.parsed {
            Some(parsed) => self.parsed_records.insert(path, parsed),
            None => self.parsed_records.remove(&path),
        };
        Ok((loaded.record, loaded.warning))
    }

    fn other_records(&mut self, instance: &str) -> Result<Vec<Record>, SystemError> {
        let id = NetnsId::current(self.use_cookie())?;
        let links = links(self, &id)?;
        let mut records = Vec::new();
        for (other, path) in namespace_files(self, &id)? {
            if other != instance {
                records.push(load(&path, &id, &links)?.record);
            }
        }
        Ok(records)
    }

    fn write_record(&mut self, instance: &str, record: &Record) -> Result<(), SystemError> {
        let id = NetnsId::current(self.use_cookie())?;
        let path = self.run_dir().join(id.file_name(instance));
        let stamp = Stamp {
            links: links(self, &id)?,
            dev: id.dev,
            ino: id.ino,
            boot_id: id.boot_id,
        };
        let parsed = self.parsed_records.remove(&path);
        store(
            self.run_dir(),
            &path,
            record,
            stamp,
            parsed.as_ref(),
            write_private,
        )
    }
}

/// Instances with a record of this network namespace in the run dir, sorted.
pub(crate) fn recorded_instances(sys: &RealSystem) -> Result<Vec<String>, SystemError> {
    let id = NetnsId::current(sys.use_cookie())?;
    let mut names: Vec<String> = namespace_files(sys, &id)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    Ok(names)
}

/// The record files of this network namespace in the run dir: (instance, path).
fn namespace_files(sys: &RealSystem, id: &NetnsId) -> Result<Vec<(String, PathBuf)>, SystemError> {
    let dir = sys.run_dir();
    let suffix = id.file_name("");
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&dir.display().to_string())(e)),
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(&suffix)?.to_string();
            valid_instance(&name).then(|| (name, e.path()))
        })
        .collect())
}

/// The link fingerprint the fallback key is checked with (empty with a cookie).
fn links(sys: &RealSystem, id: &NetnsId) -> Result<BTreeSet<String>, SystemError> {
    if id.cookie.is_some() {
        return Ok(BTreeSet::new());
    }
    Ok(link_fingerprint(&sys.links_json()?))
}

/// The identity of the calling thread's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetnsId {
    /// None before Linux 5.14 (or when simulated).
    pub cookie: Option<u64>,
    pub dev: u64,
    pub ino: u64,
    pub boot_id: String,
}

/// What a record file says about the namespace that wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub boot_id: String,
    /// `ifindex/mac` of the namespace's links when written (fallback key only).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub links: BTreeSet<String>,
}

/// The file: the record plus the stamp, read each straight from the text. (A struct with
/// the record flattened into it would buffer the whole file first: the params of every
/// forward, a tenth of a change among 50,000.)
struct RecordFile {
    netns: Option<Stamp>,
    record: Record,
}

/// A record file's stamp, the rest skipped.
#[derive(serde::Deserialize)]
struct Stamped {
    #[serde(default)]
    netns: Option<Stamp>,
}

impl RecordFile {
    fn parse(text: &str) -> serde_json::Result<RecordFile> {
        let record: Record = serde_json::from_str(text)?;
        let Stamped { netns } = serde_json::from_str(text)?;
        Ok(RecordFile { netns, record })
    }
}

/// The file as written: the record borrowed, not copied (it holds the params of every
/// forward).
#[derive(serde::Serialize)]
struct RecordFileOut<'a> {
    netns: &'a Stamp,
    #[serde(flatten)]
    record: &'a Record,
}

fn io_error(path: &str) -> impl Fn(std::io::Error) -> SystemError + '_ {
    move |source| SystemError::Io {
        path: path.to_string(),
        source,
    }
}

impl NetnsId {
    /// The calling thread's namespace. `use_cookie: false` simulates an old kernel.
    pub(crate) fn current(use_cookie: bool) -> Result<NetnsId, SystemError> {
        let ns = "/proc/thread-self/ns/net";
        let meta = std::fs::metadata(ns).map_err(io_error(ns))?;
        let cookie = if use_cookie {
            match netns_cookie() {
                Ok(c) => Some(c),
                Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => None,
                Err(e) => return Err(io_error("SO_NETNS_COOKIE")(e)),
            }
        } else {
            None
        };
        Ok(NetnsId {
            cookie,
            dev: meta.dev(),
            ino: meta.ino(),
            boot_id: boot_id()?,
        })
    }

    /// `<instance>.netns-<cookie>.record`, or `<instance>.netns-i<ino>-d<dev>-b<boot>.record`.
    pub(crate) fn file_name(&self, instance: &str) -> String {
        match self.cookie {
            Some(c) => format!("{instance}.netns-{c:016x}.record"),
            None => format!(
                "{instance}.netns-i{}-d{}-b{}.record",
                self.ino,
                self.dev,
                self.boot_id.get(..8).unwrap_or(&self.boot_id)
            ),
        }
    }
}

fn boot_id() -> Result<String, SystemError> {
    let path = "/proc/sys/kernel/random/boot_id";
    Ok(std::fs::read_to_string(path)
        .map_err(io_error(path))?
        .trim()
        .to_string())
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+),
/// read from a throwaway Unix socket.
fn netns_cookie() -> std::io::Result<u64> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `sock`; `cookie` and `len` are valid for writes
    // of the sizes given, which is all getsockopt(2) writes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `ifindex/mac` of every link with a link-layer address (`ip -j link show` output).
pub(crate) fn link_fingerprint(ip_link_json: &str) -> BTreeSet<String> {
    let Ok(serde_json::Value::Array(links)) = serde_json::from_str(ip_link_json) else {
        return BTreeSet::new();
    };
    links
        .iter()
        .filter_map(|l| {
            let index = l.get("ifindex")?.as_u64()?;
            let mac = l.get("address")?.as_str()?;
            (l.get("link_type")?.as_str()? == "ether" && mac != "00:00:00:00:00:00")
                .then(|| format!("{index}/{mac}"))
        })
        .collect()
}

/// A record read from disk, with what the run should be told about it.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub record: Record,
    pub warning: Option<String>,
    /// The file as it was when it parsed (None: absent or corrupt).
    pub parsed: Option<FileId>,
}

/// Reads the record at `path`. `links` is the current fingerprint (checked with the fallback
/// key only, where `id.cookie` is None).
pub(crate) fn load(
    path: &Path,
    id: &NetnsId,
    links: &BTreeSet<String>,
) -> Result<Loaded, SystemError> {
    let shown = path.display().to_string();
    let (text, id_of_file) = match read_with_id(path) {
        Ok(read) => read,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(io_error(&shown)(e)),
    };
    let file = match RecordFile::parse(&text) {
        Ok(file) => file,
        Err(e) => {
            return Ok(Loaded {
                record: Record::default(),
                warning: Some(format!("the record {shown} is corrupt ({e}); nothing in it is taken for portfwd's own, and it is kept for inspection (moved to {shown}.corrupt on the next write)")),
                parsed: None,
            })
        }
    };
    let parsed = Some(id_of_file);
    let mut record = file.record;
    if let Some(stamp) = &file.netns {
        // Cookies and inodes both start again at boot: a run dir on persistent storage keeps
        // another boot's records under names this boot's namespaces may get.
        if stamp.boot_id != id.boot_id {
            return Ok(Loaded {
                record: Record::default(),
                warning: Some(format!(
                    "the record {shown} was written before this boot; it is ignored"
                )),
                parsed,
            });
        }
        if id.cookie.is_none() {
            if !stamp.links.is_empty() && stamp.links.is_disjoint(links) {
                return Ok(Loaded {
                    record: Record::default(),
                    warning: Some(format!("the record {shown} was written by an earlier network namespace with the same inode (none of its links is here); it is ignored")),
                    parsed,
                });
            }
            // Without links nothing tells this namespace from an earlier one with the same
            // inode, and every new namespace starts at the same nf_tables generation: the
            // read cache proves nothing here.
            if stamp.links.is_empty() {
                record.read_cache = None;
            }
        }
    }
    Ok(Loaded {
        record,
        warning: None,
        parsed,
    })
}

/// A file's text and its [`FileId`] from the same open file.
fn read_with_id(path: &Path) -> std::io::Result<(String, FileId)> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let id = FileId::of(&file.metadata()?);
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok((text, id))
}

/// Writes (or, for an empty record, removes) the record at `path`, moving a corrupt file aside
/// first (unless it is still the file `parsed` says this run read whole: parsing a record of
/// 50,000 forwards again cost a change of one a tenth of its time), then sweeps the records
/// of namespaces that no longer exist from `dir`.
pub(crate) fn store(
    dir: &Path,
    path: &Path,
    record: &Record,
    stamp: Stamp,
    parsed: Option<&FileId>,
    write: impl Fn(&Path, &Path, &str) -> Result<(), SystemError>,
) -> Result<(), SystemError> {
    let shown = path.display().to_string();
    let unchanged =
        |parsed: &FileId| std::fs::metadata(path).is_ok_and(|meta| FileId::of(&meta) == *parsed);
    if parsed.is_some_and(unchanged) {
        // Read and parsed whole by this run, and the same file still.
    } else if let Ok(text) = std::fs::read_to_string(path) {
        if RecordFile::parse(&text).is_err() {
            let aside = PathBuf::from(format!("{shown}.corrupt"));
            std::fs::rename(path, &aside).map_err(io_error(&shown))?;
        }
    }
    if record.is_empty() {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&shown)(e)),
        }
    } else {
        let file = RecordFileOut {
            netns: &stamp,
            record,
        };
        let text = serde_json::to_string(&file).map_err(|e| SystemError::Io {
            path: shown.clone(),
            source: std::io::Error::other(e),
        })?;
        write(dir, path, &text)?;
    }
    sweep(dir, path, &stamp);
    Ok(())
}

/// Removes records whose namespace is gone: another boot's, or one whose inode no process,
/// thread, descriptor or bind mount holds. A namespace kept alive only by the kernel (a
/// socket) is missed and its record removed: portfwd then forgets, never takes, objects.
fn sweep(dir: &Path, keep: &Path, ours: &Stamp) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let candidates: Vec<(PathBuf, Stamp)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != keep && p.extension().is_some_and(|x| x == "record"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let stamp = serde_json::from_str::<Stamped>(&text).ok()?.netns?;
            Some((p, stamp))
        })
        .collect();
    if candidates.is_empty() {
        return;
    }
    let live = live_namespaces(ours.dev);
    for (path, stamp) in candidates {
        let gone =
            stamp.boot_id != ours.boot_id || (stamp.dev == ours.dev && !live.contains(&stamp.ino));
        if gone {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Inodes of every network namespace something holds: the namespaces of all threads, the
/// targets of all open descriptors, and nsfs bind mounts (in every mount namespace).
fn live_namespaces(nsfs_dev: u64) -> HashSet<u64> {
    let mut live = HashSet::new();
    let mut mount_namespaces = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return live;
    };
    let held = |path: &Path| -> Option<u64> {
        let meta = std::fs::metadata(path).ok()?;
        (meta.dev() == nsfs_dev).then_some(meta.ino())
    };
    for pid in procs.filter_map(Result::ok).map(|e| e.path()) {
        if !pid
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        if let Ok(tasks) = std::fs::read_dir(pid.join("task")) {
            for task in tasks.filter_map(Result::ok) {
                live.extend(held(&task.path().join("ns/net")));
            }
        }
        if let Ok(fds) = std::fs::read_dir(pid.join("fd")) {
            for fd in fds.filter_map(Result::ok) {
                let is_net = std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("net:["));
                if is_net {
                    live.extend(held(&fd.path()));
                }
            }
        }
        let mnt = std::fs::metadata(pid.join("ns/mnt")).map(|m| m.ino());
        if mnt.is_ok_and(|m| mount_namespaces.insert(m)) {
            if let Ok(text) = std::fs::read_to_string(pid.join("mountinfo")) {
                live.extend(nsfs_mounts(&text));
            }
        }
    }
    live
}

/// Inodes of network namespaces bind-mounted (`ip netns add`), from a `mountinfo` text.
fn nsfs_mounts(mountinfo: &str) -> Vec<u64> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let root = l.split_whitespace().nth(3)?;
            root.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookie_is_stable_within_a_namespace() {
        let a = netns_cookie().unwrap();
        assert_eq!(a, netns_cookie().unwrap());
        assert_ne!(a, 0);
    }

    #[test]
    fn fallback_key_names_inode_device_and_boot() {
        let id = NetnsId {
            cookie: None,
            dev: 4,
            ino: 4026532,
            boot_id: "0123456789abcdef".into(),
        };
        assert_eq!(
            id.file_name("web"),
            "web.netns-i4026532-d4-b01234567.record"
        );
        let with = NetnsId {
            cookie: Some(0x1f),
            ..id
        };
        assert_eq!(with.file_name("web"), "web.netns-000000000000001f.record");
    }

    #[test]
    fn fingerprint_takes_ether_links_only() {
        let text = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00"},{"ifindex":7,"ifname":"eth0","link_type":"ether","address":"3a:1b:aa:00:00:01"}]"#;
        assert_eq!(
            link_fingerprint(text),
            BTreeSet::from(["7/3a:1b:aa:00:00:01".to_string()])
        );
        assert!(link_fingerprint("garbage").is_empty());
    }

    #[test]
    fn mountinfo_nsfs_roots() {
        let text = "612 28 0:4 net:[4026532921] /run/netns/pfl-1 rw shared:1 - nsfs nsfs rw\n30 1 8:1 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(nsfs_mounts(text), vec![4026532921]);
    }

    fn id(cookie: Option<u64>) -> NetnsId {
        NetnsId {
            cookie,
            dev: 4,
            ino: 99,
            boot_id: "boot".into(),
        }
    }

    fn written(links: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.record");
        let mut record = Record::default();
        record.addresses.insert("eth0 10.9.9.9/24".into());
        let stamp = Stamp {
            dev: 4,
            ino: 99,
            boot_id: "boot".into(),
            links: links.iter().map(|l| l.to_string()).collect(),
        };
        store(dir.path(), &path, &record, stamp, None, |_, p, t| {
            std::fs::write(p, t).map_err(io_error("test"))
        })
        .unwrap();
        (dir, path)
    }

    #[test]
    fn fallback_record_of_a_gone_namespace_with_the_same_inode_is_ignored() {
        let (_dir, path) = written(&["2/aa:aa:aa:aa:aa:aa"]);
        let here = BTreeSet::from(["2/aa:aa:aa:aa:aa:aa".to_string()]);
        let other = BTreeSet::from(["2/bb:bb:bb:bb:bb:bb".to_string()]);
        assert_eq!(
            load(&path, &id(None), &here)
                .unwrap()
                .record
                .addresses
                .len(),
            1
        );
        let reused = load(&path, &id(None), &other).unwrap();
        assert!(reused.record.is_empty());
        assert!(reused
            .warning
            .unwrap()
            .contains("earlier network namespace"));
        // The cookie key is never reused: no fingerprint check there.
        assert_eq!(
            load(&path, &id(Some(1)), &other)
                .unwrap()
                .record
                .addresses
                .len(),
            1
        );
    }

    #[test]
    fn a_corrupt_record_warns_and_is_kept_aside_on_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.record");
        std::fs::write(&path, "{not json").unwrap();
        let loaded = load(&path, &id(Some(1)), &BTreeSet::new()).unwrap();
        assert!(loaded.record.is_empty());
        assert!(loaded.warning.unwrap().contains("corrupt"), "warns");
        store(
            dir.path(),
            &path,
            &Record::default(),
            Stamp::default(),
            None,
            |_, _, _| Ok(()),
        )
        .unwrap();
        let aside = dir.path().join("x.record.corrupt");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "{not json");
    }

    /// A record this run parsed is not parsed again before it is replaced, unless the file
    /// changed since: a hand edit that corrupts it after the read is still kept aside.
    #[test]
    fn a_record_edited_since_it_was_read_is_checked_again_before_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.record");
        let write = |_: &Path, p: &Path, t: &str| std::fs::write(p, t).map_err(io_error("test"));
        let mut record = Record::default();
        record.tables.insert("inet portfwd-x".into());
        let rewrite = |parsed: Option<&FileId>| {
            store(dir.path(), &path, &record, Stamp::default(), parsed, write).unwrap();
        };
        let parsed_now = || load(&path, &id(Some(1)), &BTreeSet::new()).unwrap().parsed;
        rewrite(None);
        let parsed = parsed_now();
        assert!(parsed.is_some(), "a record that parses is known as parsed");
        rewrite(parsed.as_ref());
        assert!(!dir.path().join("x.record.corrupt").exists());
        let parsed = parsed_now();
        std::fs::write(&path, "{edited by hand").unwrap();
        rewrite(parsed.as_ref());
        let aside = dir.path().join("x.record.corrupt");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "{edited by hand");
        assert!(parsed_now().is_some());
    }

    /// Every field of a record, the read cache's included, reads back as written.
    #[test]
    fn a_record_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.record");
        let mut record = Record::default();
        record.tables.insert("inet portfwd-x".into());
        record
            .sysctls
            .insert("net/ipv4/conf/eth0/route_localnet".into(), "0".into());
        record.backend = Some(crate::tools::Backend::Nftables);
        record.read_cache = Some(crate::ownership::ReadCache {
            digest: 7,
            read: crate::ownership::FirewallRead {
                generation: 42,
                warnings: vec!["a \"quoted\" warning".into()],
                facts: serde_json::json!({"marks": [1, 2]}),
                other: Some(crate::ownership::OtherTables::default()),
                shape: Some(u64::MAX - 1),
            },
            params: Some(r#"{"forwards":[{"name":"a","to":"10.0.0.1:80"}]}"#.into()),
        });
        let stamp = Stamp {
            dev: 4,
            ino: 99,
            boot_id: "boot".into(),
            links: BTreeSet::new(),
        };
        store(dir.path(), &path, &record, stamp, None, |_, p, t| {
            std::fs::write(p, t).map_err(io_error("test"))
        })
        .unwrap();
        let loaded = load(&path, &id(Some(1)), &BTreeSet::new()).unwrap();
        assert_eq!(loaded.warning, None);
        assert_eq!(loaded.record, record);
    }
}
