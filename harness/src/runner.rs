//! Runs scenarios: builds the lab, executes each step with the real `portfwd`, checks what it
//! reported and what the traffic saw, and on failure reports every host's state (and packet
//! captures with `--pcap`). Writes JUnit XML for CI.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{Lab, Naming};
use crate::netns::LabError;
use crate::portfwd::{Portfwd, RunResult};
use crate::scenario::{Expect, ProbeSpec, Scenario, Step, TraceSpec};
use crate::traffic::probe;

/// Options of `portfwd-lab run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write packet captures of the failing steps here.
    pub pcap: Option<PathBuf>,
}

/// How one step went.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub name: String,
    pub failures: Vec<String>,
    pub seconds: f64,
    pub diagnostics: Option<String>,
}

impl StepOutcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// How one scenario went (a set-up failure is reported as a failed first step).
#[derive(Debug, Clone)]
pub struct ScenarioOutcome {
    pub name: String,
    pub steps: Vec<StepOutcome>,
}

/// Runs one scenario, printing a line per step through `say`.
pub fn run_scenario(
    scenario: &Scenario,
    portfwd: &Portfwd,
    options: &RunOptions,
    say: &mut dyn FnMut(&str),
) -> ScenarioOutcome {
    let mut outcome = ScenarioOutcome {
        name: scenario.name.clone(),
        steps: Vec::new(),
    };
    say(&format!(
        "== {}: {}",
        scenario.name,
        scenario.description.trim()
    ));
    let started = Instant::now();
    let lab = match Lab::build(scenario, Naming::PerRun, true) {
        Ok(lab) => lab,
        Err(e) => {
            let step = StepOutcome {
                name: "set up topology".into(),
                failures: vec![e.to_string()],
                seconds: started.elapsed().as_secs_f64(),
                diagnostics: None,
            };
            say(&format!(
                "  [0/{}] set up topology ... FAILED: {e}",
                scenario.steps.len()
            ));
            outcome.steps.push(step);
            return outcome;
        }
    };
    let mut last_params: Vec<(String, Value)> = Vec::new();
    let total = scenario.steps.len();
    for (i, step) in scenario.steps.iter().enumerate() {
        let started = Instant::now();
        let captures = options
            .pcap
            .as_ref()
            .map(|dir| Captures::start(&lab, dir, &scenario.name, i + 1));
        let failures = run_step(step, &lab, portfwd, &mut last_params);
        let passed = failures.is_empty();
        if let Some(captures) = captures {
            captures.finish(passed);
        }
        let seconds = started.elapsed().as_secs_f64();
        let diagnostics = (!passed).then(|| lab.diagnostics());
        say(&format!(
            "  [{}/{total}] {} ... {} ({seconds:.2}s)",
            i + 1,
            step.name,
            if passed { "ok" } else { "FAILED" }
        ));
        for failure in &failures {
            say(&format!("        {failure}"));
        }
        if let Some(d) = &diagnostics {
            say(&indent(d, "        | "));
        }
        outcome.steps.push(StepOutcome {
            name: step.name.clone(),
            failures,
            seconds,
            diagnostics,
        });
    }
    outcome
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Executes one step and returns what went wrong (empty: passed).
fn run_step(
    step: &Step,
    lab: &Lab,
    portfwd: &Portfwd,
    last_params: &mut Vec<(String, Value)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (node, commands) in &step.run {
        for command in commands {
            match lab.nodes[node].exec(&["sh", "-c", command]) {
                Ok(_) => {}
                Err(e) => failures.push(format!("{node}: `{command}`: {e}")),
            }
        }
    }
    for (node, params) in &step.apply {
        let expect = step.expect.unwrap_or(Expect::Changed);
        match portfwd.apply(&lab.nodes[node], params) {
            Ok(run) => {
                failures.extend(check_run(node, &run, expect, step));
                last_params.retain(|(n, _)| n != node);
                last_params.push((node.clone(), params.clone()));
            }
            Err(e) => failures.push(format!("{node}: portfwd did not run: {e}")),
        }
    }
    if step.reapply {
        for (node, params) in last_params.iter() {
            match portfwd.apply(&lab.nodes[node], params) {
                Ok(run) => {
                    failures.extend(check_run(node, &run, Expect::Unchanged, step));
                    if run.json["commands"]
                        .as_array()
                        .is_some_and(|c| !c.is_empty())
                    {
                        failures.push(format!(
                            "{node}: re-apply ran commands: {}",
                            run.json["commands"]
                        ));
                    }
                }
                Err(e) => failures.push(format!("{node}: portfwd did not run: {e}")),
            }
        }
    }
    for node in &step.ruleset_is_original {
        match lab.ruleset(node) {
            Ok(now) if Some(&now) == lab.original.get(node) => {}
            Ok(now) => failures.push(format!(
                "{node}: ruleset differs from the original:\n{}",
                line_changes(lab.original.get(node).map_or("", String::as_str), &now)
            )),
            Err(e) => failures.push(format!("{node}: {e}")),
        }
    }
    for node in &step.foreign_rules_unchanged {
        match lab.ruleset(node) {
            Ok(now) => {
                let original_text = lab.original.get(node).map_or("", String::as_str);
                let foreign = foreign_lines(&now, original_text);
                let original: Vec<&str> = original_text.lines().collect();
                if foreign != original {
                    failures.push(format!(
                        "{node}: foreign rules changed:\n{}",
                        line_changes(&original.join("\n"), &foreign.join("\n"))
                    ));
                }
            }
            Err(e) => failures.push(format!("{node}: {e}")),
        }
    }
    for p in &step.probes {
        if let Err(e) = check_probe(p, lab) {
            failures.push(format!("{e}{}", trace_of_failed_probe(p, lab, portfwd)));
        }
    }
    for (node, expected) in &step.doctor {
        failures.extend(check_doctor(node, expected, lab, portfwd, last_params));
    }
    for spec in &step.trace {
        failures.extend(check_trace(spec, lab, portfwd));
    }
    failures
}

/// `portfwd doctor --json` on `node` (with its last applied params) must report exactly the
/// `expected` finding ids.
fn check_doctor(
    node: &str,
    expected: &[String],
    lab: &Lab,
    portfwd: &Portfwd,
    last_params: &[(String, Value)],
) -> Vec<String> {
    let params = last_params
        .iter()
        .find(|(n, _)| n == node)
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let run = match portfwd.run(&lab.nodes[node], &["doctor", "--json"], &params, &[]) {
        Ok(run) => run,
        Err(e) => return vec![format!("{node}: portfwd doctor did not run: {e}")],
    };
    let mut found: Vec<String> = run.json["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["id"].as_str().map(str::to_string))
        .collect();
    found.sort();
    let mut want = expected.to_vec();
    want.sort();
    let mut failures = Vec::new();
    if found != want {
        failures.push(format!(
            "{node}: doctor found {found:?}, expected {want:?}: {}",
            run.stdout.trim()
        ));
    }
    let errors = run.json["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f["severity"] == "error");
    if (run.code == 0) == errors {
        failures.push(format!(
            "{node}: doctor exited {} with{} error findings",
            run.code,
            if errors { "" } else { "out" }
        ));
    }
    failures
}

/// A probe under `portfwd trace` must pass the named entries and end as asked.
fn check_trace(spec: &TraceSpec, lab: &Lab, portfwd: &Portfwd) -> Vec<String> {
    let label = format!("trace on {} of {} -> {}", spec.on, spec.from, spec.to);
    let Ok(target) = spec.to.parse::<std::net::SocketAddr>() else {
        return vec![format!("{label}: {:?} is not IP:PORT", spec.to)];
    };
    let packets = match portfwd.traced(
        &lab.nodes[&spec.on],
        &lab.nodes[&spec.from],
        spec.proto.into(),
        target,
    ) {
        Ok(p) => p,
        Err(e) => return vec![format!("{label}: {e}")],
    };
    let Some(packet) = packets.first() else {
        return vec![format!("{label}: no packet was traced")];
    };
    let shown = crate::portfwd::format_packet(packet);
    let mut failures = Vec::new();
    let entries: Vec<&str> = packet["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["entry"].as_str())
        .filter_map(|e| e.split_once(':').map(|(_, name)| name))
        .collect();
    for name in &spec.through {
        if !entries.contains(&name.as_str()) {
            failures.push(format!("{label}: did not pass entry {name:?}:\n{shown}"));
        }
    }
    let verdict = packet["verdict"].as_str().unwrap_or_default();
    if let Some(want) = &spec.verdict {
        if verdict != want {
            failures.push(format!(
                "{label}: verdict {verdict:?}, expected {want:?}:\n{shown}"
            ));
        }
    }
    if let Some(place) = &spec.dropped_in {
        let want = format!("drop in {}", place.replacen('/', " ", 1));
        if verdict != want {
            failures.push(format!(
                "{label}: verdict {verdict:?}, expected {want:?}:\n{shown}"
            ));
        }
    }
    failures
}

/// Where a failed probe's packet went: the probe again, under `portfwd trace` on the node that
/// owns the target address (empty when none does, or nothing was traced).
fn trace_of_failed_probe(p: &ProbeSpec, lab: &Lab, portfwd: &Portfwd) -> String {
    let Ok(target) = p.target() else {
        return String::new();
    };
    let Some(owner) = lab
        .addresses
        .iter()
        .find(|(_, addrs)| addrs.contains(&target.ip()))
        .map(|(node, _)| node)
    else {
        return String::new();
    };
    match portfwd.traced(
        &lab.nodes[owner],
        &lab.nodes[&p.from],
        p.proto.into(),
        target,
    ) {
        Ok(packets) if !packets.is_empty() => format!(
            "\n  the probe again under `portfwd trace` on {owner}:\n{}",
            packets
                .iter()
                .map(crate::portfwd::format_packet)
                .collect::<String>()
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        _ => String::new(),
    }
}

/// The lines of `now` that are not portfwd's. A table that did not exist in `original` and holds
/// nothing but built-in chains (portfwd created it) is left out entirely.
fn foreign_lines<'a>(now: &'a str, original: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    for line in now.lines().filter(|l| !l.contains("PFWD-")) {
        block.push(line);
        if line == "COMMIT" {
            let header = block.first().copied().unwrap_or_default();
            let existed = original.lines().any(|l| l == header);
            let empty = block.iter().all(|l| {
                l.starts_with('*')
                    || *l == "COMMIT"
                    || (l.starts_with(':') && l.ends_with(" ACCEPT"))
            });
            if existed || !empty {
                out.append(&mut block);
            }
            block.clear();
        }
    }
    out.extend(block);
    out
}

fn line_changes(before: &str, after: &str) -> String {
    let old: Vec<&str> = before.lines().collect();
    let new: Vec<&str> = after.lines().collect();
    let mut out = String::new();
    for l in old.iter().filter(|l| !new.contains(l)) {
        let _ = writeln!(out, "- {l}");
    }
    for l in new.iter().filter(|l| !old.contains(l)) {
        let _ = writeln!(out, "+ {l}");
    }
    out
}

fn check_run(node: &str, run: &RunResult, expect: Expect, step: &Step) -> Vec<String> {
    let mut failures = Vec::new();
    let state = if run.failed() {
        Expect::Failed
    } else if run.changed() {
        Expect::Changed
    } else {
        Expect::Unchanged
    };
    if state != expect {
        failures.push(format!(
            "{node}: expected {expect:?}, portfwd reported {state:?} (exit {}): {}",
            run.code,
            run.msg()
        ));
    }
    if let Some(text) = step.expect_msg.get(node) {
        if !run.msg().contains(text.as_str()) {
            failures.push(format!("{node}: msg {:?} lacks {text:?}", run.msg()));
        }
    }
    let warnings = run.json["warnings"].as_array().map_or(0, Vec::len);
    if step.quiet.iter().any(|n| n == node) && warnings > 0 {
        failures.push(format!(
            "{node}: expected no warning, got {}",
            run.json["warnings"]
        ));
    }
    if let Some(text) = step.expect_warning.get(node) {
        let warned = run.json["warnings"].as_array().is_some_and(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .any(|w| w.contains(text.as_str()))
        });
        if !warned {
            failures.push(format!(
                "{node}: no warning contains {text:?}: {}",
                run.json["warnings"]
            ));
        }
    }
    failures
}

fn check_probe(p: &ProbeSpec, lab: &Lab) -> Result<(), String> {
    let label = format!("probe {} -> {}/{:?}", p.from, p.to, p.proto);
    let target = p.target().map_err(|e| e.to_string())?;
    if !p.reaches.is_empty() {
        return check_spread(p, lab, target, &label);
    }
    let result = probe(&lab.nodes[&p.from], p.proto.into(), target);
    match (result, p.fails, &p.sees) {
        (Err(_), true, _) => Ok(()),
        (Ok(seen), true, _) => Err(format!(
            "{label}: expected no answer, but the server saw {seen}"
        )),
        (Err(e), false, _) => Err(format!("{label}: {e}")),
        (Ok(_), false, None) => Ok(()),
        (Ok(seen), false, Some(expected)) => {
            let allowed: Vec<IpAddr> = match expected.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => lab.addresses.get(expected).cloned().unwrap_or_default(),
            };
            if allowed.contains(&seen) {
                Ok(())
            } else {
                Err(format!(
                    "{label}: the server saw {seen}, expected {expected} ({allowed:?})"
                ))
            }
        }
    }
}

/// A `reaches` probe: new TCP connections, counted by the node whose server answered.
fn check_spread(
    p: &ProbeSpec,
    lab: &Lab,
    target: std::net::SocketAddr,
    label: &str,
) -> Result<(), String> {
    let n = p.connections.unwrap_or_else(|| p.reaches.values().sum());
    let mut seen: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for _ in 0..n {
        let answer = crate::traffic::TcpSession::connect(&lab.nodes[&p.from], target)
            .and_then(|mut s| s.ask_text())
            .map_err(|e| format!("{label}: {e}"))?;
        let node = answer.split_whitespace().nth(1).unwrap_or("?").to_string();
        *seen.entry(node).or_default() += 1;
    }
    let want: std::collections::BTreeMap<String, usize> = p
        .reaches
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(n, c)| (n.clone(), *c))
        .collect();
    if seen == want {
        Ok(())
    } else {
        Err(format!(
            "{label}: {n} connections reached {seen:?}, expected {want:?}"
        ))
    }
}

/// tcpdump on every interface of every node for the length of one step.
struct Captures {
    running: Vec<(Child, PathBuf)>,
}

impl Captures {
    fn start(lab: &Lab, dir: &Path, scenario: &str, step: usize) -> Captures {
        let _ = std::fs::create_dir_all(dir);
        let mut running = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        for (name, ns) in &lab.nodes {
            let file = dir.join(format!("{scenario}-step{step}-{name}.pcap"));
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns.name(),
                    "tcpdump",
                    "-i",
                    "any",
                    "--immediate-mode",
                    "-U",
                    "-n",
                    "-w",
                ])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn();
            let Ok(mut child) = child else { continue };
            // tcpdump says "listening on" once packets are being captured; a capture that
            // misses the first packets of the step would hide exactly what failed.
            if let Some(stderr) = child.stderr.take() {
                let ready = ready_tx.clone();
                std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(stderr)
                        .lines()
                        .map_while(Result::ok)
                    {
                        if line.contains("listening on") {
                            let _ = ready.send(());
                        }
                    }
                });
            }
            running.push((child, file));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for _ in 0..running.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        Captures { running }
    }

    /// Stops the captures; keeps the files only for a failed step.
    fn finish(self, passed: bool) {
        for (mut child, file) in self.running {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            // tcpdump flushes and exits on SIGINT; never wait for it forever.
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            if passed {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: a testsuite per scenario, a testcase per step.
pub fn junit(outcomes: &[ScenarioOutcome]) -> String {
    let tests: usize = outcomes.iter().map(|o| o.steps.len()).sum();
    let failures: usize = outcomes
        .iter()
        .map(|o| o.steps.iter().filter(|s| !s.passed()).count())
        .sum();
    let mut xml = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"portfwd-lab\" tests=\"{tests}\" failures=\"{failures}\">\n");
    for o in outcomes {
        let failed = o.steps.iter().filter(|s| !s.passed()).count();
        let time: f64 = o.steps.iter().map(|s| s.seconds).sum();
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" time=\"{time:.3}\">",
            xml_escape(&o.name),
            o.steps.len()
        );
        for s in &o.steps {
            let _ = write!(
                xml,
                "    <testcase classname=\"portfwd-lab.{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(&o.name),
                xml_escape(&s.name),
                s.seconds
            );
            if s.passed() {
                xml.push_str("/>\n");
            } else {
                let message = s.failures.first().map(String::as_str).unwrap_or_default();
                let body = format!(
                    "{}\n{}",
                    s.failures.join("\n"),
                    s.diagnostics.as_deref().unwrap_or_default()
                );
                let _ = write!(
                    xml,
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    xml_escape(message),
                    xml_escape(&body)
                );
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

/// Resolves `run` arguments: paths, or scenario names (the `name:` in a file of `dir`).
pub fn find_scenarios(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, LabError> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LabError::Traffic(format!("{}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    all.sort();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            let path = PathBuf::from(n);
            if path.is_file() {
                return Ok(path);
            }
            all.iter()
                .find(|p| Scenario::load(p).is_ok_and(|s| &s.name == n))
                .cloned()
                .ok_or_else(|| {
                    LabError::Traffic(format!(
                        "no scenario named {n:?} in {} (and no such file)",
                        dir.display()
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_lines_ignore_tables_portfwd_created() {
        let original = "*filter\n:INPUT ACCEPT\n:FORWARD DROP\nCOMMIT";
        let now = "*filter\n:INPUT ACCEPT\n:FORWARD DROP\n:PFWD-p-FWD -\n-A FORWARD -j PFWD-p-FWD\nCOMMIT\n*nat\n:PREROUTING ACCEPT\n:PFWD-p-PRE -\nCOMMIT";
        assert_eq!(
            foreign_lines(now, original),
            original.lines().collect::<Vec<_>>()
        );
        let tampered = now.replace(":PREROUTING ACCEPT", ":PREROUTING DROP");
        assert_ne!(
            foreign_lines(&tampered, original),
            original.lines().collect::<Vec<_>>()
        );
    }

    #[test]
    fn junit_escapes_and_counts() {
        let outcomes = vec![ScenarioOutcome {
            name: "a&b".into(),
            steps: vec![
                StepOutcome {
                    name: "ok".into(),
                    failures: vec![],
                    seconds: 0.5,
                    diagnostics: None,
                },
                StepOutcome {
                    name: "<bad>".into(),
                    failures: vec!["saw \"x\"".into()],
                    seconds: 1.0,
                    diagnostics: Some("rule 'y'".into()),
                },
            ],
        }];
        let xml = junit(&outcomes);
        assert!(
            xml.contains(r#"<testsuites name="portfwd-lab" tests="2" failures="1">"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<testsuite name="a&amp;b" tests="2" failures="1" time="1.500">"#),
            "{xml}"
        );
        assert!(xml.contains(r#"name="&lt;bad&gt;""#), "{xml}");
        assert!(
            xml.contains(r#"<failure message="saw &quot;x&quot;">saw &quot;x&quot;"#),
            "{xml}"
        );
        assert!(xml.contains("rule &apos;y&apos;"), "{xml}");
    }
}
