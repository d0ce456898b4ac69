//! Stored params (`persist: true`) and the network namespace they belong to. The state dir
//! is shared by every namespace that shares the filesystem (`ip netns exec` keeps the host's
//! `/etc`), while the record is kept per namespace: without a mark, `restore` at boot (in the
//! host's namespace) would apply what was stored inside a namespace to the host itself.
//!
//! So each stored `<instance>.json` has a `<instance>.netns` beside it naming its namespace by
//! a name that outlives a reboot: `host` (the namespace of PID 1, a container's own included)
//! or the `ip netns` name. A run only sees, replaces or removes the stored params of its own
//! namespace; a file of another is left alone, and persisting over it is refused. A namespace
//! with no such name (made with `unshare -n`) cannot persist. A file without the mark was
//! written by an earlier portfwd on the host.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{remove_if_present, write_private, SystemError};

/// The name of the host's namespace in a `.netns` file.
pub(super) const HOST: &str = "host";

/// This process's network namespace by a name that outlives a reboot, if it has one.
pub(super) fn current_namespace() -> Result<Option<String>, SystemError> {
    let io = |path: &str| {
        let path = path.to_string();
        move |source| SystemError::Io { path, source }
    };
    let ours = std::fs::metadata("/proc/self/ns/net").map_err(io("/proc/self/ns/net"))?;
    let key = |m: &std::fs::Metadata| (m.dev(), m.ino());
    if std::fs::metadata("/proc/1/ns/net").is_ok_and(|init| key(&init) == key(&ours)) {
        return Ok(Some(HOST.to_string()));
    }
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(None);
    };
    Ok(entries.filter_map(Result::ok).find_map(|e| {
        let named = std::fs::metadata(e.path()).ok()?;
        (key(&named) == key(&ours)).then(|| e.file_name().to_string_lossy().into_owned())
    }))
}

fn mark_path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.netns"))
}

/// The namespace a stored file belongs to (`host` when it carries no mark).
pub(super) fn owner(dir: &Path, instance: &str) -> Result<String, SystemError> {
    let path = mark_path(dir, instance);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(HOST.to_string()),
        Err(source) => Err(SystemError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The stored params of `instance` when they belong to this namespace.
pub(super) fn read(dir: &Path, path: &Path, instance: &str) -> Result<Option<String>, SystemError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SystemError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let here = current_namespace()?;
    Ok((here.as_deref() == Some(owner(dir, instance)?.as_str())).then_some(text))
}

/// Stores (`Some`) or removes (`None`) this namespace's params of `instance`. Another
/// namespace's file is never replaced (an error says whose it is) nor removed.
pub(super) fn write(
    dir: &Path,
    path: &Path,
    instance: &str,
    params: Option<&str>,
) -> Result<(), SystemError> {
    let here = current_namespace()?;
    let exists = path.exists();
    let theirs = if exists {
        let owner = owner(dir, instance)?;
        (here.as_deref() != Some(owner.as_str())).then_some(owner)
    } else {
        None
    };
    match (params, theirs, here) {
        (None, Some(_), _) => Ok(()),
        (None, None, _) => {
            remove_if_present(path)?;
            remove_if_present(&mark_path(dir, instance))
        }
        (Some(_), Some(owner), _) => Err(refused(path, format!(
            "it holds the stored params of instance {instance:?} of network namespace {owner:?}, which share this state dir; use another instance name here, or a state dir of this namespace's own (--state-dir, PORTFWD_STATE_DIR)"
        ))),
        (Some(_), None, None) => Err(refused(path, "this network namespace has no name that outlives it (it is not the host's, nor one of `ip netns`), so its params could not be restored to it at boot; name it (ip netns attach NAME PID) or leave persist false".to_string())),
        (Some(text), None, Some(here)) => {
            write_private(dir, &mark_path(dir, instance), &format!("{here}\n"))?;
            write_private(dir, path, text)
        }
    }
}

fn refused(path: &Path, why: String) -> SystemError {
    SystemError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(ErrorKind::PermissionDenied, why),
    }
}
