//! The binary's contract that needs no root: help, schema, exit codes, input errors.

use std::io::Write;
use std::process::{Command, Stdio};

fn portfwd(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portfwd"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portfwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["apply", "plan", "show", "schema"] {
        let (code, out, _) = portfwd(&[sub, "--help"], "");
        assert_eq!(code, 0, "{sub}");
        assert!(out.contains("Usage: portfwd"), "{sub}: {out}");
    }
    let (code, out, _) = portfwd(&["--help"], "");
    assert_eq!(code, 0);
    assert!(
        out.contains("ARGS_FILE") && out.contains("Exit codes"),
        "{out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(portfwd(&["apply", "--bogus"], "").0, 2);
    assert_eq!(portfwd(&["frobnicate", "x"], "").0, 2);
}

#[test]
fn schema_is_json_schema_of_the_params() {
    let (code, out, _) = portfwd(&["schema"], "");
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).expect("schema is JSON");
    let props = &schema["properties"];
    for key in [
        "state",
        "instance",
        "ip_forward",
        "backend",
        "forwards",
        "masquerade",
    ] {
        assert!(props.get(key).is_some(), "{key} missing from {props}");
    }
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
}

#[test]
fn invalid_params_fail_with_json_before_touching_the_system() {
    let (code, out, _) = portfwd(
        &["apply"],
        r#"{"forwards":[{"name":"w","listen_port":99999,"to":"10.0.0.1"}]}"#,
    );
    assert_eq!(code, 1);
    let result: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(result["failed"], serde_json::json!(true));
    assert_eq!(result["changed"], serde_json::json!(false));
    assert!(
        result["msg"]
            .as_str()
            .unwrap()
            .contains("forwards[0].listen_port: 99999 is not a port"),
        "{out}"
    );
}

#[test]
fn ansible_args_file_mode_prints_one_json_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = dir.path().join("args");
    std::fs::write(&args, r#"{"_ansible_check_mode": true, "_ansible_version": "2.19.0", "forwards": [{"name": "x", "listen_port": 1, "to": "not-an-ip"}]}"#).expect("write");
    let (code, out, _) = portfwd(&[args.to_str().expect("utf8")], "");
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    let result: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(
        result["msg"].as_str().unwrap().contains("forwards[0].to"),
        "{out}"
    );
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `portfwd schema | head -1`: the reader goes away before portfwd is done writing.
    let mut child = Command::new(env!("CARGO_BIN_EXE_portfwd"))
        .arg("schema")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portfwd");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// `apply` and `plan` with neither `--file` nor piped input say so at once instead of waiting
/// for a terminal that nobody types into (run under `script`, which gives them a terminal).
#[test]
fn apply_on_a_terminal_without_input_says_so() {
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(script) = script else {
        eprintln!("skipped: util-linux script is not installed");
        return;
    };
    for sub in ["apply", "plan"] {
        let command = format!("{} {sub}", env!("CARGO_BIN_EXE_portfwd"));
        let out = Command::new("timeout")
            .args(["10", script, "-qec", &command, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("run script");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{sub} (124: it waited): {text}");
        assert!(
            text.contains("no params given: stdin is a terminal; pass --file FILE"),
            "{sub}: {text}"
        );
    }
}

/// `portfwd-assets --help` prints its usage and writes nothing (it used to take `--help` as
/// the output directory).
#[test]
fn assets_help_prints_usage_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_portfwd-assets"))
        .arg("--help")
        .current_dir(dir.path())
        .output()
        .expect("run portfwd-assets");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: portfwd-assets OUT_DIR"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "wrote files"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_portfwd-assets"))
        .arg("--out")
        .current_dir(dir.path())
        .output()
        .expect("run portfwd-assets");
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `name(N)` references in a rendered man page, with roff's escapes and fonts taken out.
fn page_references(page: &str) -> Vec<String> {
    let text = page
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "");
    let mut found = Vec::new();
    for (at, _) in text.match_indices("portfwd") {
        let rest = &text[at..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(rest.len());
        let after = &rest[name_len..];
        if let Some(section) = after.strip_prefix('(').and_then(|a| a.get(..2)) {
            if section.ends_with(')') && section.starts_with(|c: char| c.is_ascii_digit()) {
                found.push(format!("{}.{}", &rest[..name_len], &section[..1]));
            }
        }
    }
    found
}

/// Every page a man page names is generated, and `portfwd-params(5)` documents every field of
/// the schema, in every kind of entry.
#[test]
fn man_pages_have_no_dangling_references_and_document_every_param() {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_portfwd-assets"))
        .arg(dir.path())
        .status()
        .expect("run portfwd-assets");
    assert!(status.success());
    let mut pages = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".1") || name.ends_with(".5")) {
            continue;
        }
        pages += 1;
        let page = std::fs::read_to_string(&path).unwrap();
        for reference in page_references(&page) {
            assert!(
                dir.path().join(&reference).exists(),
                "{name} names {reference}, which is not generated"
            );
        }
    }
    assert!(
        pages >= 10,
        "portfwd.1, one page per subcommand, portfwd-params.5"
    );
    let main = std::fs::read_to_string(dir.path().join("portfwd.1")).unwrap();
    assert!(page_references(&main).contains(&"portfwd-params.5".to_string()));
    assert!(page_references(&main).contains(&"portfwd-list.1".to_string()));

    let params = std::fs::read_to_string(dir.path().join("portfwd-params.5")).unwrap();
    let (_, out, _) = portfwd(&["schema"], "");
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut objects = vec![("top level", &schema)];
    for (name, def) in schema["$defs"].as_object().unwrap() {
        if def["properties"].is_object() {
            objects.push((name.as_str(), def));
        }
    }
    assert_eq!(objects.len(), 7, "top level and six kinds of entry");
    let plain = params
        .replace("\\-", "-")
        .replace("\\fB", "\u{1}")
        .replace("\\fR", "");
    for (object, def) in objects {
        for field in def["properties"].as_object().unwrap().keys() {
            assert!(
                plain.contains(&format!("\u{1}{field} (")),
                "portfwd-params(5) lacks {object}.{field}"
            );
        }
    }
    assert!(params.contains("reply_bypass"));
}

/// Users never see the field reports this project started from: no message, doc or example
/// refers to them ("seed 003", "seeds 002/003"). Scans the user-facing files and every string
/// literal of the engine and the binaries.
#[test]
fn user_facing_text_never_refers_to_internal_documents() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    fn walk(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, files);
            } else {
                files.push(path);
            }
        }
    }
    for dir in [
        "playbooks",
        "collection",
        "integrations",
        "dist",
        "docs",
        "harness/scenarios",
        "lib/src",
        "module/src",
        "harness/src",
    ] {
        walk(&root.join(dir), &mut files);
    }
    files.extend(["README.md", "BENCHMARKS.md"].map(|f| root.join(f)));
    let mut found = Vec::new();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // binary files (the module copied into playbooks/library)
        };
        let rust = path.extension().is_some_and(|e| e == "rs");
        for (n, line) in text.lines().enumerate() {
            // In Rust sources only string literals reach users; comments are for developers.
            let checked: String = if rust {
                line.split('"')
                    .skip(1)
                    .step_by(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line.to_string()
            };
            let lower = checked.to_lowercase();
            if ["seed 0", "seeds 0", "seed-0", "seed0"]
                .iter()
                .any(|w| lower.contains(w))
            {
                found.push(format!("{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
