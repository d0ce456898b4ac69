//! End-to-end with real Salt (`salt-call --local`, from PyPI in a virtualenv that
//! scripts/setup.sh creates): the shipped native state (`portfwd.managed`) and execution
//! module (`portfwd.apply`, `portfwd.show`) in test mode and for real, a re-run with no
//! changes, bad params failing with the field named, and the one-liner for other tools.

use std::path::{Path, PathBuf};

use crate::common;
use crate::common::{portfwd, prerequisites, ruleset, sa, Topology};
use portfwd_harness::{probe, Netns, Proto, Server};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command in `ns` with portfwd (as `portfwd`) first on PATH and its files under `dir`.
fn run_in(ns: &Netns, dir: &Path, argv: &[&str]) -> (i32, String) {
    let bin_dir = portfwd().bin.parent().unwrap().display().to_string();
    let env = [
        format!(
            "PATH={bin_dir}:{}",
            std::env::var("PATH").unwrap_or_default()
        ),
        format!("PORTFWD_LOCK_FILE={}/lock", dir.display()),
        format!("PORTFWD_STATE_DIR={}/state", dir.display()),
        format!("PORTFWD_RUN_DIR={}/run", dir.display()),
    ];
    let mut full: Vec<&str> = vec!["env"];
    full.extend(env.iter().map(String::as_str));
    full.extend_from_slice(argv);
    let out = ns.exec_with_input(&full, "").unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The state result of `portfwd-apply` from `salt-call --out json` output.
fn apply_result(output: &str) -> Value {
    let start = output.find('{').unwrap_or(0);
    // The JSON document comes first; anything Salt logs to stderr follows it.
    let json: Value = serde_json::Deserializer::from_str(&output[start..])
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON in: {output}"));
    json["local"]
        .as_object()
        .and_then(|states| {
            states
                .iter()
                .find(|(k, _)| k.contains("portfwd-apply"))
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| panic!("no portfwd-apply state in {output}"))
}

#[test]
fn salt_state_applies_portfwd_statefully() {
    if !prerequisites() {
        return;
    }
    let Some(venv) = common::venv("PORTFWD_SALT_VENV", "salt-venv", "salt-call") else {
        return;
    };
    let t = Topology::new().unwrap();
    let _server = Server::start(&t.backend, Proto::Tcp, sa("0.0.0.0:1234")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let params_file = root.join("desired.json");
    std::fs::create_dir_all(root.join("pillar")).unwrap();
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::write(
        root.join("pillar/top.sls"),
        "base:\n  '*':\n    - portfwd\n",
    )
    .unwrap();
    std::fs::write(
        root.join("pillar/portfwd.sls"),
        "portfwd:\n  params:\n    forwards:\n      - name: web\n        listen_port: 4321\n        to: \"10.0.2.2:1234\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("config/minion"),
        format!(
            "file_client: local\nroot_dir: {root}/salt\nfile_roots:\n  base:\n    - {states}\npillar_roots:\n  base:\n    - {root}/pillar\nlog_level: error\n",
            root = root.display(),
            states = repo().join("integrations/salt").display()
        ),
    )
    .unwrap();
    let salt_call = venv.join("bin/salt-call").display().to_string();
    let config = root.join("config").display().to_string();
    // `salt-call --local ... ARGS` in the proxy, JSON out.
    let run = |argv: &[&str]| {
        let mut full = vec![
            salt_call.as_str(),
            "--local",
            "--config-dir",
            &config,
            "--out",
            "json",
        ];
        full.extend_from_slice(argv);
        run_in(&t.proxy, root, &full)
    };
    let salt = |extra: &[&str]| {
        let mut argv = vec!["state.apply", "portfwd"];
        argv.extend_from_slice(extra);
        run(&argv)
    };
    let (code, out) = run(&["saltutil.sync_all"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("states.portfwd") && out.contains("modules.portfwd"),
        "{out}"
    );

    let before = ruleset(&t.proxy, "iptables-save").unwrap();
    let (_, out) = salt(&["test=True"]);
    let test = apply_result(&out);
    assert_eq!(
        test["result"],
        Value::Null,
        "test mode reports a pending change: {out}"
    );
    assert_eq!(test["changes"]["forwards.web"]["old"], Value::Null, "{out}");
    assert!(
        test["changes"]["forwards.web"]["new"]
            .as_str()
            .is_some_and(|n| n.contains("4321")),
        "the diff keyed by entry name: {out}"
    );
    assert!(
        test["comment"]
            .as_str()
            .is_some_and(|c| c.starts_with("check mode, nothing applied")),
        "{out}"
    );
    assert_eq!(
        ruleset(&t.proxy, "iptables-save").unwrap(),
        before,
        "test mode touched nothing"
    );

    let (code, out) = salt(&[]);
    assert_eq!(code, 0, "{out}");
    let applied = apply_result(&out);
    assert_eq!(applied["result"], Value::Bool(true), "{out}");
    assert!(
        applied["changes"]["forwards.web"]["new"].is_string(),
        "{out}"
    );
    assert!(
        applied["comment"]
            .as_str()
            .is_some_and(|c| c.contains("forwards: 1 added")),
        "{out}"
    );
    assert_eq!(
        probe(&t.client, Proto::Tcp, sa("10.0.1.1:4321")).unwrap(),
        "10.0.2.1".parse::<std::net::IpAddr>().unwrap()
    );

    let (code, out) = salt(&[]);
    assert_eq!(code, 0, "{out}");
    let again = apply_result(&out);
    assert_eq!(again["result"], Value::Bool(true), "{out}");
    assert_eq!(
        again["changes"],
        serde_json::json!({}),
        "second run changes nothing: {out}"
    );
    assert_eq!(again["comment"], "no changes", "{out}");

    // The execution module reads the state back.
    let (code, out) = run(&["portfwd.show"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"listen_port\": 4321"), "{out}");

    // portfwd's warnings are kept in the state's result.
    let warned = r#"pillar={"portfwd": {"params": {"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234", "snat": "none"}]}}}"#;
    let (_, out) = salt(&[warned, "test=True"]);
    let pending = apply_result(&out);
    assert!(
        pending["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("snat is none")))),
        "{out}"
    );

    // Bad params: the state fails with portfwd's message naming the field and value, and
    // nothing is applied.
    let applied_rules = ruleset(&t.proxy, "iptables-save").unwrap();
    let bad = r#"pillar={"portfwd": {"params": {"forwards": [{"name": "web", "listen_port": 70000, "to": "10.0.2.2:1234"}]}}}"#;
    let (code, out) = salt(&[bad]);
    assert_ne!(code, 0, "{out}");
    let failed = apply_result(&out);
    assert_eq!(failed["result"], Value::Bool(false), "{out}");
    assert!(
        failed["comment"]
            .as_str()
            .is_some_and(|c| c.contains("forwards[0].listen_port") && c.contains("70000")),
        "{out}"
    );
    assert_eq!(ruleset(&t.proxy, "iptables-save").unwrap(), applied_rules);

    // The one-liner of integrations/README.md, for any other tool.
    std::fs::write(
        &params_file,
        r#"{"forwards":[{"name":"web","listen_port":4321,"to":"10.0.2.2:1234"}]}"#,
    )
    .unwrap();
    let one_liner = format!(
        "portfwd apply --file {} > {root}/result.json; rc=$?; grep -q '\"changed\":true' {root}/result.json && echo changed; exit $rc",
        params_file.display(),
        root = root.display()
    );
    let (code, out) = run_in(&t.proxy, root, &["bash", "-c", &one_liner]);
    assert_eq!((code, out.trim()), (0, ""), "no change, nothing printed");
    std::fs::write(
        &params_file,
        r#"{"forwards":[{"name":"web","listen_port":4322,"to":"10.0.2.2:1234"}]}"#,
    )
    .unwrap();
    let (code, out) = run_in(&t.proxy, root, &["bash", "-c", &one_liner]);
    assert_eq!((code, out.trim()), (0, "changed"));
}
