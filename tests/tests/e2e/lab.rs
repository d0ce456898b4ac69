//! End-to-end tests of `portfwd-lab` itself: failure reports, JUnit, captures, Ctrl-C
//! clean-up, up/exec/down and clean.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{data, portfwd_lab, prerequisites};
use portfwd_harness::netns::all_namespaces;

fn lab(args: &[&str]) -> (i32, String) {
    let out = Command::new(portfwd_lab())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run portfwd-lab");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A probe that fails is run again under `portfwd trace`: the report shows where its packet
/// died.
#[test]
fn a_failed_probe_report_shows_where_the_packet_died() {
    if !prerequisites() {
        return;
    }
    let scenario = data("lab-dropped.yaml");
    let (code, out) = lab(&["run", scenario.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the probe again under `portfwd trace` on proxy"),
        "{out}"
    );
    assert!(
        out.contains("[portfwd:web]")
            && out.contains("verdict: drop in inet fwlike filter_FORWARD"),
        "{out}"
    );
}

/// A wrong expectation fails the step with every host's state in the report, a JUnit failure,
/// and packet captures of that step only.
#[test]
fn a_failed_probe_reports_state_junit_and_captures() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let pcap = dir.path().join("pcap");
    let scenario = data("lab-failing.yaml");
    let (code, out) = lab(&[
        "run",
        scenario.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
        "--pcap",
        pcap.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[1/2] nothing forwards yet ... ok"), "{out}");
    assert!(
        out.contains("[2/2] masquerade cannot show the client ... FAILED"),
        "{out}"
    );
    assert!(
        out.contains("the server saw 10.0.2.1, expected client"),
        "{out}"
    );
    for section in [
        "--- proxy: iptables-nft-save",
        "--- proxy: ip rule",
        "--- proxy: ip route show table all",
        "--- backend: conntrack -L",
    ] {
        assert!(out.contains(section), "missing {section}: {out}");
    }
    assert!(
        out.contains("portfwd:fwd:web:"),
        "the report shows the rules: {out}"
    );
    assert!(out.trim_end().ends_with("1 passed, 1 failed"), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"<testsuite name="lab-failing" tests="2" failures="1""#),
        "{xml}"
    );
    assert!(xml.contains("<failure message="), "{xml}");
    let mut captures: Vec<String> = std::fs::read_dir(&pcap)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    captures.sort();
    assert_eq!(
        captures,
        vec![
            "lab-failing-step2-backend.pcap",
            "lab-failing-step2-client.pcap",
            "lab-failing-step2-proxy.pcap"
        ]
    );
    let client = std::fs::metadata(pcap.join("lab-failing-step2-client.pcap"))
        .unwrap()
        .len();
    assert!(
        client > 24,
        "the capture holds packets, not just a header ({client} bytes)"
    );
}

/// Ctrl-C in the middle of a run removes every namespace the run made.
#[test]
fn interrupted_run_removes_its_namespaces() {
    if !prerequisites() {
        return;
    }
    let scenario = data("lab-slow.yaml");
    let mut child = Command::new(portfwd_lab())
        .args(["run", scenario.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("pfl-{}-", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_namespaces().iter().any(|n| n.starts_with(&prefix)) {
        assert!(
            Instant::now() < deadline,
            "the run never made its namespaces"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let left: Vec<String> = all_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `up` leaves a topology with servers running, `exec` reaches into it, `down` removes it;
/// `clean` removes only namespaces of dead runs.
#[test]
fn up_exec_down_and_clean() {
    if !prerequisites() {
        return;
    }
    /// Takes the topology down even when an assertion fails.
    struct Down;
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = lab(&["down"]);
        }
    }
    let _down = Down;
    let (code, out) = lab(&[
        "up",
        "cross-host-dnat-snat",
        "--dir",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../harness/scenarios"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        all_namespaces().contains(&"pfl-up-proxy".to_string()),
        "{out}"
    );
    let (code, out) = lab(&[
        "exec", "proxy", "--", "ip", "-br", "addr", "show", "dev", "eth1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10.0.2.1/24"), "{out}");
    // The echo server of the backend answers (started as a process inside the namespace).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, out) = lab(&[
            "exec",
            "backend",
            "--",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/127.0.0.1/1234",
        ]);
        if code == 0 || Instant::now() > deadline {
            assert_eq!(code, 0, "backend server reachable: {out}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = lab(&["exec", "nosuchnode", "--", "true"]);
    assert_eq!(code, 2, "{out}");

    // clean: a namespace of a dead run goes, the up topology stays.
    let stale = "pfl-999999999-0-stale";
    assert!(Command::new("ip")
        .args(["netns", "add", stale])
        .status()
        .unwrap()
        .success());
    let (code, out) = lab(&["clean"]);
    assert_eq!(code, 0, "{out}");
    assert!(!all_namespaces().contains(&stale.to_string()), "{out}");
    assert!(all_namespaces().contains(&"pfl-up-proxy".to_string()));

    let (code, out) = lab(&["down"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !all_namespaces().iter().any(|n| n.starts_with("pfl-up-")),
        "{out}"
    );
}
