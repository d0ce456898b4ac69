//! End-to-end: the record of created objects on kernels without `SO_NETNS_COOKIE` (before
//! 5.14, simulated with `PORTFWD_NO_NETNS_COOKIE=1`), a namespace that reuses a gone one's
//! inode, the sweep of records of gone namespaces, and a corrupt record. (The whole routing
//! suite also runs with the fallback key: see scripts/test.sh.)

use std::path::{Path, PathBuf};

use crate::common::{portfwd, prerequisites};
use portfwd_harness::{link, Netns};
use serde_json::{json, Value};

const NO_COOKIE: (&str, &str) = ("PORTFWD_NO_NETNS_COOKIE", "1");

/// A host with one veth `eth0` (its peer in `peer`).
fn host() -> (Netns, Netns) {
    let ns = Netns::new("rec").unwrap();
    let peer = Netns::new("peer").unwrap();
    link(&ns, "eth0", &peer, "eth0").unwrap();
    (ns, peer)
}

fn apply_with(ns: &Netns, params: &Value, env: &[(&str, &str)]) -> Value {
    let r = portfwd()
        .run(ns, &["apply"], &params.to_string(), env)
        .unwrap();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json
}

fn alias() -> Value {
    json!({"addresses": [{"address": "10.9.9.9/24", "dev": "eth0"}]})
}

fn records(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn addresses(ns: &Netns) -> String {
    ns.stdout(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap()
}

#[test]
fn without_the_cookie_records_are_keyed_by_inode_device_and_boot() {
    if !prerequisites() {
        return;
    }
    let (ns, _peer) = host();
    let run_dir = portfwd().run_dir(&ns);
    apply_with(&ns, &alias(), &[NO_COOKIE]);
    let names = records(&run_dir);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("portfwd.netns-i")
            && names[0].contains("-d")
            && names[0].contains("-b"),
        "{names:?}"
    );
    let again = apply_with(&ns, &alias(), &[NO_COOKIE]);
    assert_eq!(again["changed"], json!(false), "{again}");
    apply_with(&ns, &json!({"state": "absent"}), &[NO_COOKIE]);
    assert!(
        !addresses(&ns).contains("10.9.9.9"),
        "the owned address went"
    );
    assert!(records(&run_dir).is_empty());
}

/// The kernel hands a freed namespace inode to the next namespace at once. A record left by
/// a gone namespace under the same inode must not make portfwd take this namespace's own
/// address for one it created.
#[test]
fn a_namespace_reusing_an_inode_does_not_inherit_the_record() {
    if !prerequisites() {
        return;
    }
    let (gone, _gone_peer) = host();
    let gone_dir = portfwd().run_dir(&gone);
    apply_with(&gone, &alias(), &[NO_COOKIE]);
    let written: PathBuf = gone_dir.join(&records(&gone_dir)[0]);
    let text = std::fs::read_to_string(&written).unwrap();

    // The new namespace has the same address of its own (an admin's), and finds the old
    // record under its own key, exactly as after an inode reuse.
    let (ns, _peer) = host();
    ns.ip(&["addr", "add", "10.9.9.9/24", "dev", "eth0"])
        .unwrap();
    apply_with(&ns, &json!({}), &[NO_COOKIE]);
    let dir = portfwd().run_dir(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let inode = ns
        .stdout(&["stat", "-L", "-c", "%i-%d", "/proc/self/ns/net"])
        .unwrap();
    let (ino, dev) = inode.trim().split_once('-').unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let name = format!("portfwd.netns-i{ino}-d{dev}-b{}.record", &boot[..8]);
    let mut planted: Value = serde_json::from_str(&text).unwrap();
    planted["netns"]["ino"] = json!(ino.parse::<u64>().unwrap());
    std::fs::write(dir.join(&name), planted.to_string()).unwrap();

    let r = apply_with(&ns, &json!({"state": "absent"}), &[NO_COOKIE]);
    assert!(
        r["warnings"]
            .to_string()
            .contains("earlier network namespace with the same inode"),
        "{r}"
    );
    assert!(
        addresses(&ns).contains("10.9.9.9"),
        "the admin's address is not portfwd's: {r}"
    );
}

#[test]
fn records_of_gone_namespaces_are_swept() {
    if !prerequisites() {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let run_dir = shared.path().display().to_string();
    let env = [("PORTFWD_RUN_DIR", run_dir.as_str())];
    let (a, a_peer) = host();
    let (b, _b_peer) = host();
    apply_with(&a, &alias(), &env);
    apply_with(&b, &alias(), &env);
    assert_eq!(records(shared.path()).len(), 2);
    drop(a);
    drop(a_peer);
    // The next run that writes sweeps the gone namespace's record, and keeps its own.
    apply_with(&b, &json!({"addresses": []}), &env);
    apply_with(&b, &alias(), &env);
    let left = records(shared.path());
    assert_eq!(left.len(), 1, "{left:?}");
    // Another live namespace's record is never swept.
    let (c, _c_peer) = host();
    apply_with(&c, &alias(), &env);
    apply_with(&b, &json!({"addresses": []}), &env);
    assert_eq!(records(shared.path()).len(), 1, "c's record stays");
    apply_with(&c, &json!({"state": "absent"}), &env);
}

#[test]
fn a_corrupt_record_warns_and_is_kept_for_inspection() {
    if !prerequisites() {
        return;
    }
    let (ns, _peer) = host();
    apply_with(&ns, &alias(), &[]);
    let dir = portfwd().run_dir(&ns);
    let path = dir.join(&records(&dir)[0]);
    std::fs::write(&path, "{\"addresses\": [\"eth0 10.9").unwrap();
    let r = apply_with(&ns, &json!({"state": "absent"}), &[]);
    assert!(r["warnings"].to_string().contains("is corrupt"), "{r}");
    assert!(
        addresses(&ns).contains("10.9.9.9"),
        "nothing of a corrupt record is taken for ours"
    );
    // The next write moves it aside instead of overwriting it.
    apply_with(
        &ns,
        &json!({"addresses": [{"address": "10.9.8.8/24", "dev": "eth0"}]}),
        &[],
    );
    let names = records(&dir);
    assert!(
        names.iter().any(|n| n.ends_with(".record.corrupt")),
        "{names:?}"
    );
}
