//! `portfwd-bench`: benchmarks that print ratios measured side by side in one run (this
//! machine is shared and noisy, so absolute times mean little), and write a JSON result.
//!
//! - `control`: portfwd's own cost at scale against the bare reads it needs, a bare
//!   `iptables-restore`, and the per-rule approach of other tools.
//! - `data`: what the forward buys the user: throughput and latency through portfwd's kernel
//!   NAT against the routed path and userspace forwarders.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use portfwd_harness::topology::Topology;
use portfwd_harness::{LabError, Netns, Portfwd, Proto, Server, TcpSession};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "portfwd-bench",
    version,
    about = "portfwd benchmarks: ratios against baselines measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Control plane: 10,000 foreign rules, 100/1,000/5,000 managed forwards; with --scale,
    /// the series at scale instead (both backends, with and without the foreign rules).
    Control {
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Forward counts of the series at scale (`1,1000,10000,50000`): first apply, no-op,
        /// change 1, no-op after another writer's commit, absent, N -> 2, peak RSS, and with
        /// iptables a bare restore of the change's lines.
        #[arg(long, value_delimiter = ',')]
        scale: Vec<usize>,
        /// The series at scale as JSON and SVG.
        #[arg(long, default_value = "target/bench-control-scale.json")]
        scale_out: PathBuf,
        #[arg(long, default_value = "target/bench-control-scale.svg")]
        scale_svg: PathBuf,
        /// Write the results here as JSON.
        #[arg(long, default_value = "target/bench-control.json")]
        out: PathBuf,
        /// Also write the scaling curve as SVG here.
        #[arg(long, default_value = "target/bench-scaling.svg")]
        svg: PathBuf,
    },
    /// Data plane: iperf3 throughput and request latency through each forwarder, then the
    /// scaling series (throughput and connections/s through the last of N forwards).
    Data {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value = "target/bench-data.json")]
        out: PathBuf,
        /// Forward counts of the scaling series (at least 2: the two measured forwards).
        #[arg(long, value_delimiter = ',', default_value = "2,100,1000,1501,5000")]
        scale: Vec<usize>,
        /// Backends of the scaling series: iptables flavours (`nft`, `legacy`) and `nftables`.
        #[arg(long, value_delimiter = ',', default_value = "nft,legacy,nftables")]
        flavours: Vec<String>,
        /// Run only the scaling series.
        #[arg(long)]
        scaling_only: bool,
        #[arg(long, default_value = "target/bench-data-scaling.json")]
        scaling_out: PathBuf,
        #[arg(long, default_value = "target/bench-data-scaling.svg")]
        scaling_svg: PathBuf,
    },
    /// A 16-backend pool against a forward with one `to` (nftables and iptables-nft): new
    /// connections/s and throughput, each balance mode, measured alternately in the same run.
    Pool {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        #[arg(long, default_value = "target/bench-pool.json")]
        out: PathBuf,
    },
}

#[path = "portfwd-bench/pool.rs"]
mod pool;
#[path = "portfwd-bench/scale.rs"]
mod scale;
#[path = "portfwd-bench/scaling.rs"]
mod scaling;

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Bench::Control {
            reps,
            scale,
            scale_out,
            scale_svg,
            ..
        } if !scale.is_empty() => {
            Portfwd::locate().and_then(|pf| scale::run(&pf, &scale, reps, &scale_out, &scale_svg))
        }
        Bench::Control { reps, out, svg, .. } => control(reps, &out, &svg),
        Bench::Pool { seconds, out } => {
            Portfwd::locate().and_then(|pf| pool::run(&pf, seconds, &out))
        }
        Bench::Data {
            seconds,
            out,
            scale,
            flavours,
            scaling_only,
            scaling_out,
            scaling_svg,
        } => (if scaling_only {
            Ok(())
        } else {
            data(seconds, &out)
        })
        .and_then(|()| {
            scaling::run(
                &Portfwd::locate()?,
                &flavours,
                &scale,
                seconds,
                &scaling_out,
                &scaling_svg,
            )
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portfwd-bench: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn err(e: impl std::fmt::Display) -> LabError {
    LabError::Traffic(e.to_string())
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Median wall time of `reps` runs of `f` (after `setup` each time, not timed).
fn measure(
    reps: usize,
    mut setup: impl FnMut() -> Result<(), LabError>,
    mut f: impl FnMut() -> Result<(), LabError>,
) -> Result<f64, LabError> {
    let mut samples = Vec::new();
    for _ in 0..reps {
        setup()?;
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    Ok(median(samples))
}

fn run_ok(ns: &Netns, argv: &[&str], input: &str) -> Result<(), LabError> {
    let out = ns.exec_with_input(argv, input)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The reads portfwd makes, as bare commands.
fn bare_reads(ns: &Netns) -> Result<(), LabError> {
    for argv in [
        &["iptables-save"][..],
        &["ip6tables-save"],
        &["ip", "-N", "-j", "-4", "rule", "show"],
        &["ip", "-N", "-j", "-4", "route", "show", "table", "all"],
        &["ip", "-N", "-j", "-6", "rule", "show"],
        &["ip", "-N", "-j", "-6", "route", "show", "table", "all"],
        &["ip", "-N", "-j", "addr", "show"],
    ] {
        run_ok(ns, argv, "")?;
    }
    Ok(())
}

/// 10,000 nat rules of another tool (kube-proxy-like service DNATs).
fn foreign_ruleset(rules: usize) -> String {
    let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..rules {
        let _ = writeln!(
            text,
            "-A KUBE-SERVICES -d 172.{}.{}.{}/32 -p tcp -m comment --comment \"ns/svc-{i}:http\" -m tcp --dport 80 -j DNAT --to-destination 10.244.{}.{}:8080",
            16 + i / 65536,
            (i / 256) % 256,
            i % 256,
            (i / 256) % 256,
            i % 256
        );
    }
    text.push_str("COMMIT\n");
    text
}

fn forwards(n: usize, changed: Option<usize>) -> Value {
    let list: Vec<Value> = (0..n)
        .map(|i| {
            let port = if Some(i) == changed { 9090 } else { 8080 };
            json!({"name": format!("f{i}"), "listen_port": 10000 + i, "to": format!("10.{}.{}.{}:{port}", 100 + i / 64770, (i / 254) % 255, i % 254 + 1)})
        })
        .collect();
    json!({"forwards": list})
}

/// A proxy namespace pre-loaded with the foreign rules, portfwd absent.
fn loaded_host(foreign: &str) -> Result<Netns, LabError> {
    let ns = Netns::new("bench")?;
    run_ok(&ns, &["iptables-restore"], foreign)?;
    Ok(ns)
}

fn apply(pf: &Portfwd, ns: &Netns, params: &Value) -> Result<Value, LabError> {
    let r = pf.apply(ns, params)?;
    if r.failed() {
        return Err(err(format!("portfwd failed: {}", r.msg())));
    }
    Ok(r.json)
}

/// The `iptables-restore` payloads inside a result's `commands`.
fn payloads(result: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in result["commands"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some(cmd) = line.strip_suffix(" <<'EOF'") {
            current = Some((
                cmd.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                String::new(),
            ));
        } else if line == "EOF" {
            out.extend(current.take());
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.into_iter()
        .filter(|(tool, _)| tool.contains("restore"))
        .collect()
}

fn payload_lines(result: &Value) -> usize {
    payloads(result)
        .iter()
        .map(|(_, p)| p.lines().filter(|l| l.starts_with('-')).count())
        .sum()
}

/// Peak RSS (KiB) of one `portfwd` run, via GNU time.
fn peak_rss(pf: &Portfwd, ns: &Netns, params: &Value) -> Result<u64, LabError> {
    let bin = pf.bin.display().to_string();
    let out = ns.exec_with_input(
        &["/usr/bin/time", "-f", "%M", &bin, "apply", "--check"],
        &params.to_string(),
    )?;
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| err("no RSS from /usr/bin/time (apt-get install time)"))
}

/// Five rounds of `reps` pairs (`setup`, then a timed `noop`, then the timed `reads` right
/// after it); each round's median pair (portfwd s, reads s).
fn noop_rounds(
    reps: usize,
    setup: impl Fn() -> Result<(), LabError> + Copy,
    noop: impl Fn() -> Result<(), LabError> + Copy,
    reads: impl Fn() -> Result<(), LabError> + Copy,
) -> Result<Vec<(f64, f64)>, LabError> {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let mut pairs = Vec::new();
        for _ in 0..reps {
            let portfwd_s = measure(1, setup, noop)?;
            let reads_s = measure(1, || Ok(()), reads)?;
            pairs.push((portfwd_s, reads_s));
        }
        pairs.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
        rounds.push(pairs[pairs.len() / 2]);
    }
    Ok(rounds)
}

/// Prints the rounds and keeps them in the JSON under `key`.
fn report_rounds(
    table: &mut String,
    results: &mut serde_json::Map<String, Value>,
    label: &str,
    key: &str,
    rounds: &[(f64, f64)],
) {
    let _ = writeln!(
        table,
        "{label} (portfwd s / bare reads s = ratio): {}",
        rounds
            .iter()
            .map(|(n, r)| format!("{n:.3}/{r:.3}={:.2}x", n / r))
            .collect::<Vec<_>>()
            .join("  ")
    );
    results.insert(
        key.into(),
        json!(rounds
            .iter()
            .map(|(n, r)| json!({"noop_s": n, "bare_reads_s": r, "ratio": n / r}))
            .collect::<Vec<_>>()),
    );
}

/// `params` for the nftables backend.
fn native(mut params: Value) -> Value {
    params["backend"] = json!("nftables");
    params
}

/// The lines of the `nft -f` script a run wrote (its operations).
fn nft_operations(result: &Value) -> usize {
    let commands: Vec<&str> = result["commands"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    commands
        .iter()
        .position(|c| c.starts_with("nft -f -"))
        .map_or(0, |start| {
            commands[start + 1..]
                .iter()
                .take_while(|c| **c != "EOF")
                .count()
        })
}

/// The nftables backend's column: the same 10,000 foreign iptables rules, 1,000 forwards in
/// the instance's own table. Its no-op is measured against the bare iptables reads (what the
/// iptables backend would need) and against the same no-op on a host without foreign rules.
fn nftables_control(
    pf: &Portfwd,
    reps: usize,
    foreign: &str,
    table: &mut String,
    results: &mut serde_json::Map<String, Value>,
) -> Result<(), LabError> {
    let _ = writeln!(
        table,
        "\nnftables backend (table inet portfwd-portfwd; the same 10,000 foreign iptables rules):"
    );
    let loaded = loaded_host(foreign)?;
    let clean = Netns::new("bench-clean")?;
    let thousand = native(forwards(1000, None));
    let absent = native(json!({"state": "absent"}));
    let first = measure(
        reps,
        || apply(pf, &loaded, &absent).map(drop),
        || apply(pf, &loaded, &thousand).map(drop),
    )?;
    apply(pf, &loaded, &thousand)?;
    apply(pf, &clean, &thousand)?;
    let noop = || apply(pf, &loaded, &thousand).map(drop);
    let rounds = noop_rounds(reps, || Ok(()), noop, || bare_reads(&loaded))?;
    report_rounds(
        table,
        results,
        "nftables no-op rounds vs bare iptables reads",
        "nftables_noop_rounds",
        &rounds,
    );
    // The same no-op with and without the foreign rules, paired the same way.
    let clean_rounds = noop_rounds(
        reps,
        || Ok(()),
        noop,
        || apply(pf, &clean, &thousand).map(drop),
    )?;
    let _ = writeln!(
        table,
        "nftables no-op with / without 10,000 foreign rules: {}",
        clean_rounds
            .iter()
            .map(|(a, b)| format!("{a:.3}/{b:.3}={:.2}x", a / b))
            .collect::<Vec<_>>()
            .join("  ")
    );
    results.insert(
        "nftables_noop_vs_clean_rounds".into(),
        json!(clean_rounds
            .iter()
            .map(|(a, b)| json!({"loaded_s": a, "clean_s": b, "ratio": a / b}))
            .collect::<Vec<_>>()),
    );
    let changed = native(forwards(1000, Some(500)));
    let mut operations = 0;
    let change = measure(
        reps,
        || apply(pf, &loaded, &thousand).map(drop),
        || {
            let r = apply(pf, &loaded, &changed)?;
            operations = nft_operations(&r);
            Ok(())
        },
    )?;
    let worst = |rounds: &[(f64, f64)]| rounds.iter().map(|(a, b)| a / b).fold(f64::NAN, f64::max);
    let _ = writeln!(
        table,
        "{:<44} {first:>10.3}\n{:<44} {change:>10.3}\nworst no-op ratio: {:.2}x the bare iptables reads (target <= 0.25x), {:.2}x the no-op without foreign rules (target <= 1.3x)",
        "first apply, 1,000 forwards",
        format!("change 1 of 1,000 ({operations} nft operations)"),
        worst(&rounds),
        worst(&clean_rounds)
    );
    results.insert("nftables_first_apply_s".into(), json!(first));
    results.insert("nftables_change_one_s".into(), json!(change));
    results.insert("nftables_change_one_operations".into(), json!(operations));
    apply(pf, &loaded, &absent)?;
    apply(pf, &clean, &absent)?;
    Ok(())
}

fn control(reps: usize, out: &Path, svg: &Path) -> Result<(), LabError> {
    let pf = Portfwd::locate()?;
    let foreign = foreign_ruleset(10_000);
    let mut table = String::new();
    let mut results = serde_json::Map::new();
    let _ = writeln!(
        table,
        "control plane: 10,000 foreign nat rules, medians of {reps} runs\n"
    );
    let _ = writeln!(
        table,
        "{:<44} {:>10} {:>10} {:>8} {:>8}",
        "measurement", "portfwd s", "base s", "ratio", "target"
    );

    let ns = loaded_host(&foreign)?;
    let thousand = forwards(1000, None);
    let absent = json!({"state": "absent"});

    // First apply vs bare reads + bare restore of the same payload.
    let check = pf.run(&ns, &["apply", "--check"], &thousand.to_string(), &[])?;
    let payload = payloads(&check.json);
    let first = measure(
        reps,
        || apply(&pf, &ns, &absent).map(drop),
        || apply(&pf, &ns, &thousand).map(drop),
    )?;
    let bare_first = measure(
        reps,
        || apply(&pf, &ns, &absent).map(drop),
        || {
            bare_reads(&ns)?;
            for (tool, body) in &payload {
                run_ok(&ns, &[tool, "--noflush", "-w", "10"], body)?;
            }
            Ok(())
        },
    )?;
    apply(&pf, &ns, &absent)?;
    apply(&pf, &ns, &thousand)?;
    // Five rounds of `reps` pairs, each pair a no-op and the bare reads right after it (so
    // both see the same moment of a noisy machine); a round reports its median pair ratio.
    // Every round must stay at or under 1.0x, not just the best.
    let noop = || apply(&pf, &ns, &thousand).map(drop);
    let rounds = noop_rounds(reps, || Ok(()), noop, || bare_reads(&ns))?;
    report_rounds(
        &mut table,
        &mut results,
        "no-op rounds",
        "noop_rounds",
        &rounds,
    );
    let (noop_s, reads) = rounds
        .iter()
        .copied()
        .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)))
        .unwrap_or((f64::NAN, f64::NAN));
    // The same no-op when another writer has just committed something (a table added and
    // removed: the nf_tables generation moves), so portfwd cannot use its read cache and reads
    // the whole ruleset: the cost of a no-op on a busy host.
    let bump = || {
        run_ok(&ns, &["nft", "add", "table", "inet", "pfbench"], "")?;
        run_ok(&ns, &["nft", "delete", "table", "inet", "pfbench"], "")
    };
    let full_rounds = noop_rounds(reps, bump, noop, || bare_reads(&ns))?;
    report_rounds(
        &mut table,
        &mut results,
        "no-op after another writer's change, full read",
        "noop_full_read_rounds",
        &full_rounds,
    );
    let changed = forwards(1000, Some(500));
    let mut change_lines = 0;
    let change = measure(
        reps,
        || apply(&pf, &ns, &thousand).map(drop),
        || {
            let r = apply(&pf, &ns, &changed)?;
            change_lines = payload_lines(&r);
            Ok(())
        },
    )?;
    let rows = [
        ("no-op converge, 1,000 fwd (worst of 5)", noop_s, reads, 1.0),
        ("first apply, 1,000 forwards", first, bare_first, 1.5),
    ];
    for (name, a, b, target) in rows {
        let _ = writeln!(
            table,
            "{name:<44} {a:>10.3} {b:>10.3} {:>7.2}x {:>7}x",
            a / b,
            target
        );
    }
    let _ = writeln!(
        table,
        "{:<44} {change:>10.3} {:>10} {:>8} {:>8}",
        format!("change 1 of 1,000 ({change_lines} payload lines)"),
        "-",
        "-",
        "<=12 ln"
    );
    results.insert("noop_converge_s".into(), json!(noop_s));
    results.insert("bare_reads_s".into(), json!(reads));
    results.insert("noop_ratio".into(), json!(noop_s / reads));
    results.insert("first_apply_s".into(), json!(first));
    results.insert("bare_reads_plus_restore_s".into(), json!(bare_first));
    results.insert("first_apply_ratio".into(), json!(first / bare_first));
    results.insert("change_one_s".into(), json!(change));
    results.insert("change_one_payload_lines".into(), json!(change_lines));

    nftables_control(&pf, reps, &foreign, &mut table, &mut results)?;

    // The per-rule approach (iptables -C, then -A when missing), for 100 forwards' rules:
    // at ~0.1 s a call with 10,000 rules loaded, 1,000 forwards would take over ten minutes.
    apply(&pf, &ns, &absent)?;
    let hundred = forwards(100, None);
    let (chains, rules) = per_rule_commands(&pf, &ns, &hundred)?;
    let per_rule = measure(
        1,
        || apply(&pf, &ns, &absent).map(drop),
        || {
            for (table_name, chain) in &chains {
                run_ok(&ns, &["iptables", "-w", "-t", table_name, "-N", chain], "")?;
            }
            for (chain, table_name, spec) in &rules {
                let mut check = vec![
                    "iptables",
                    "-w",
                    "-t",
                    table_name.as_str(),
                    "-C",
                    chain.as_str(),
                ];
                check.extend(spec.iter().map(String::as_str));
                if ns.exec_with_input(&check, "")?.status.success() {
                    continue;
                }
                let mut add = vec![
                    "iptables",
                    "-w",
                    "-t",
                    table_name.as_str(),
                    "-A",
                    chain.as_str(),
                ];
                add.extend(spec.iter().map(String::as_str));
                run_ok(&ns, &add, "")?;
            }
            Ok(())
        },
    )?;
    // Flush every chain first: dispatch rules reference the sub-chains.
    for (table_name, chain) in &chains {
        let _ = ns.exec_with_input(&["iptables", "-w", "-t", table_name, "-F", chain], "");
    }
    for (table_name, chain) in &chains {
        let _ = ns.exec_with_input(&["iptables", "-w", "-t", table_name, "-X", chain], "");
    }
    let portfwd_hundred = measure(
        reps,
        || apply(&pf, &ns, &absent).map(drop),
        || apply(&pf, &ns, &hundred).map(drop),
    )?;
    let _ = writeln!(
        table,
        "{:<44} {portfwd_hundred:>10.3} {per_rule:>10.3} {:>7.1}x {:>8}",
        format!("per-rule -C/-A, 100 forwards ({} rules)", rules.len()),
        per_rule / portfwd_hundred,
        "~100x"
    );
    results.insert("per_rule_100_forwards_s".into(), json!(per_rule));
    results.insert("portfwd_100_forwards_s".into(), json!(portfwd_hundred));
    results.insert("per_rule_ratio".into(), json!(per_rule / portfwd_hundred));
    drop(ns);

    // Scaling: first apply and no-op converge for 100, 1,000 and 5,000 forwards.
    let _ = writeln!(table, "\nscaling (10,000 foreign rules): forwards, first apply s, no-op s, ms per forward (first apply)");
    let mut curve = Vec::new();
    for n in [100usize, 1000, 5000] {
        let ns = loaded_host(&foreign)?;
        let params = forwards(n, None);
        let first = measure(
            reps.min(3),
            || apply(&pf, &ns, &absent).map(drop),
            || apply(&pf, &ns, &params).map(drop),
        )?;
        let noop = measure(
            reps.min(3),
            || Ok(()),
            || apply(&pf, &ns, &params).map(drop),
        )?;
        let _ = writeln!(
            table,
            "  {n:>6} {first:>10.3} {noop:>10.3} {:>10.3}",
            first * 1000.0 / n as f64
        );
        curve.push(json!({"forwards": n, "first_apply_s": first, "noop_s": noop}));
        if n == 5000 {
            results.insert(
                "peak_rss_kib_5000_forwards".into(),
                json!(peak_rss(&pf, &ns, &params)?),
            );
        }
    }
    results.insert("scaling".into(), Value::Array(curve.clone()));

    // Size and start-up.
    let size = std::fs::metadata(&pf.bin).map(|m| m.len()).unwrap_or(0);
    let empty = Netns::new("empty")?;
    let startup = measure(
        20,
        || Ok(()),
        || pf.run(&empty, &["show"], "", &[]).map(drop),
    )?;
    let _ = writeln!(table, "\nbinary {} bytes ({}), `portfwd show` on an empty host: {:.1} ms, peak RSS applying 5,000 forwards: {} KiB", size, pf.bin.display(), startup * 1000.0, results["peak_rss_kib_5000_forwards"]);
    results.insert("binary_bytes".into(), json!(size));
    results.insert("show_startup_s".into(), json!(startup));

    print!("{table}");
    std::fs::write(
        out,
        serde_json::to_string_pretty(&Value::Object(results)).unwrap_or_default(),
    )
    .map_err(err)?;
    std::fs::write(svg, scaling_svg(&curve)).map_err(err)?;
    println!("wrote {} and {}", out.display(), svg.display());
    Ok(())
}

/// The chains (table, chain) and rules (chain, table, spec) portfwd would write for
/// `params`, for plain iptables commands.
type PerRule = (Vec<(String, String)>, Vec<(String, String, Vec<String>)>);

fn per_rule_commands(pf: &Portfwd, ns: &Netns, params: &Value) -> Result<PerRule, LabError> {
    let check = pf.run(ns, &["apply", "--check"], &params.to_string(), &[])?;
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for (tool, body) in payloads(&check.json) {
        if tool.starts_with("ip6") {
            continue;
        }
        let mut table_name = String::new();
        for line in body.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table_name = t.to_string();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let tokens = shlex::split(rest).unwrap_or_default();
                if let Some((chain, spec)) = tokens.split_first() {
                    rules.push((chain.clone(), table_name.clone(), spec.to_vec()));
                }
            } else if let Some(chain) = line.strip_prefix("-N ") {
                chains.push((table_name.clone(), chain.to_string()));
            }
        }
    }
    Ok((chains, rules))
}

/// A small line chart of first-apply time against forwards.
fn scaling_svg(curve: &[Value]) -> String {
    let points: Vec<(f64, f64, f64)> = curve
        .iter()
        .map(|p| {
            (
                p["forwards"].as_f64().unwrap_or(0.0),
                p["first_apply_s"].as_f64().unwrap_or(0.0),
                p["noop_s"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.1.max(p.2)).fold(0.001, f64::max);
    let (w, h, m) = (640.0, 400.0, 60.0);
    let x = |v: f64| m + v / max_x * (w - 2.0 * m);
    let y = |v: f64| h - m - v / max_y * (h - 2.0 * m);
    let line = |pick: fn(&(f64, f64, f64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(svg, "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">portfwd with 10,000 foreign rules: seconds against managed forwards</text>", w / 2.0);
    let _ = writeln!(svg, "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>", h - m, w - m, h - m, h - m);
    for p in &points {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(p.0),
            h - m + 18.0,
            p.0
        );
    }
    for i in 0..=4 {
        let v = max_y * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
            m - 6.0,
            y(v) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"2\" points=\"{}\"/>",
        line(|p| p.1)
    );
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"#2471a3\" stroke-width=\"2\" points=\"{}\"/>",
        line(|p| p.2)
    );
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" fill=\"#c0392b\">first apply</text><text x=\"{}\" y=\"{}\" fill=\"#2471a3\">no-op converge</text>", m + 10.0, m + 10.0, m + 10.0, m + 26.0);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">managed forwards</text>",
        w / 2.0,
        h - 16.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// A background process in a namespace, killed on drop with its whole process group (socat
/// and rinetd fork a child per connection, which must not outlive the measurement).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn daemon(ns: &Netns, argv: &[&str]) -> Result<Daemon, LabError> {
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(argv)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err)?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Daemon(child))
}

/// iperf3 throughput (Gbit/s) from the client to `target`.
fn iperf(t: &Topology, target: &str, port: u16, seconds: u32) -> Result<f64, LabError> {
    let out = t.client.exec(&[
        "iperf3",
        "-J",
        "-c",
        target,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
    ])?;
    let json: Value = serde_json::from_slice(&out.stdout).map_err(err)?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| {
            err(format!(
                "no iperf3 result to {target}:{port}: {}",
                json["error"]
            ))
        })
}

/// p50 and p99 round-trip (µs) of 2,000 one-line requests on one connection.
fn latency(t: &Topology, target: &str) -> Result<(f64, f64), LabError> {
    let addr: SocketAddr = target.parse().map_err(err)?;
    let mut session = TcpSession::connect(&t.client, addr)?;
    for _ in 0..200 {
        session.ask()?;
    }
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let start = Instant::now();
        session.ask()?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok((
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    ))
}

fn data(seconds: u32, out: &Path) -> Result<(), LabError> {
    let pf = Portfwd::locate()?;
    let t = Topology::new()?;
    // Routed path: the client reaches the backend through the proxy, and back.
    t.client_default_route()?;
    t.backend
        .ip(&["route", "add", "default", "via", "10.0.2.1"])?;
    t.proxy.sysctl("net.ipv4.ip_forward", "1")?;
    let _iperf = daemon(&t.backend, &["iperf3", "-s", "-p", "5201"])?;
    let _echo = Server::start(&t.backend, Proto::Tcp, "0.0.0.0:7000".parse().map_err(err)?)?;
    let mut rows: Vec<(String, f64, f64, f64)> = Vec::new();
    let mut record =
        |name: &str, iperf_target: &str, iperf_port: u16, echo: &str| -> Result<(), LabError> {
            let gbits = iperf(&t, iperf_target, iperf_port, seconds)?;
            let (p50, p99) = latency(&t, echo)?;
            println!("  {name:<34} {gbits:>8.2} Gbit/s  p50 {p50:>7.1} µs  p99 {p99:>7.1} µs");
            rows.push((name.to_string(), gbits, p50, p99));
            Ok(())
        };
    println!("data plane: client -> proxy -> backend over veth, iperf3 {seconds}s, 2,000 request round trips");
    record("routed, no NAT", "10.0.2.2", 5201, "10.0.2.2:7000")?;

    let fwd = |snat: &str| {
        json!({"forwards": [
        {"name": "iperf", "listen_port": 15201, "to": "10.0.2.2:5201", "snat": snat},
        {"name": "echo", "listen_port": 17000, "to": "10.0.2.2:7000", "snat": snat}]})
    };
    apply(&pf, &t.proxy, &fwd("masquerade"))?;
    record(
        "portfwd DNAT + masquerade",
        "10.0.1.1",
        15201,
        "10.0.1.1:17000",
    )?;
    apply(&pf, &t.proxy, &fwd("none"))?;
    record(
        "portfwd DNAT, snat none",
        "10.0.1.1",
        15201,
        "10.0.1.1:17000",
    )?;
    apply(&pf, &t.proxy, &json!({"state": "absent"}))?;
    let mut native = fwd("masquerade");
    native["backend"] = json!("nftables");
    apply(&pf, &t.proxy, &native)?;
    record(
        "portfwd nftables DNAT + masquerade",
        "10.0.1.1",
        15201,
        "10.0.1.1:17000",
    )?;
    apply(
        &pf,
        &t.proxy,
        &json!({"backend": "nftables", "state": "absent"}),
    )?;

    {
        let _a = daemon(
            &t.proxy,
            &[
                "socat",
                "TCP-LISTEN:25201,fork,reuseaddr",
                "TCP:10.0.2.2:5201",
            ],
        )?;
        let _b = daemon(
            &t.proxy,
            &[
                "socat",
                "TCP-LISTEN:27000,fork,reuseaddr",
                "TCP:10.0.2.2:7000",
            ],
        )?;
        record("socat", "10.0.1.1", 25201, "10.0.1.1:27000")?;
    }
    for (name, splice) in [
        ("haproxy tcp, no splice", false),
        ("haproxy tcp, splice", true),
    ] {
        let dir = tempfile::tempdir().map_err(err)?;
        let cfg = dir.path().join("haproxy.cfg");
        let splice_opt = if splice {
            "    option splice-auto\n"
        } else {
            ""
        };
        std::fs::write(
            &cfg,
            format!(
                "global\n    maxconn 1000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n{splice_opt}\
                 listen iperf\n    bind 10.0.1.1:35201\n    server b 10.0.2.2:5201\nlisten echo\n    bind 10.0.1.1:37000\n    server b 10.0.2.2:7000\n"
            ),
        )
        .map_err(err)?;
        let cfg = cfg.display().to_string();
        let _h = daemon(&t.proxy, &["haproxy", "-db", "-f", &cfg])?;
        record(name, "10.0.1.1", 35201, "10.0.1.1:37000")?;
    }
    {
        let dir = tempfile::tempdir().map_err(err)?;
        let cfg = dir.path().join("rinetd.conf");
        std::fs::write(
            &cfg,
            "10.0.1.1 45201 10.0.2.2 5201\n10.0.1.1 47000 10.0.2.2 7000\n",
        )
        .map_err(err)?;
        let cfg = cfg.display().to_string();
        let _r = daemon(&t.proxy, &["rinetd", "-f", "-c", &cfg])?;
        record("rinetd", "10.0.1.1", 45201, "10.0.1.1:47000")?;
    }

    let get = |name: &str| {
        rows.iter()
            .find(|r| r.0 == name)
            .map(|r| r.1)
            .unwrap_or(f64::NAN)
    };
    let fwd_gbits = get("portfwd DNAT + masquerade");
    println!("\nratios (throughput of portfwd DNAT + masquerade against):");
    let targets = [
        ("routed, no NAT", 0.85),
        ("socat", 5.0),
        ("haproxy tcp, splice", 1.2),
    ];
    for (name, target) in targets {
        println!(
            "  {name:<34} {:>6.2}x   target >= {target}x",
            fwd_gbits / get(name)
        );
    }
    let native_gbits = get("portfwd nftables DNAT + masquerade");
    println!(
        "  the nftables backend's forward: {:.2}x routed, {:.2}x the iptables backend's",
        native_gbits / get("routed, no NAT"),
        native_gbits / fwd_gbits
    );
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|(n, g, p50, p99)| json!({"name": n, "gbit_s": g, "p50_us": p50, "p99_us": p99}))
        .collect();
    let result = json!({"rows": json_rows, "ratios": targets.iter().map(|(n, target)| json!({"against": n, "ratio": fwd_gbits / get(n), "target": target})).collect::<Vec<_>>()});
    std::fs::write(
        out,
        serde_json::to_string_pretty(&result).unwrap_or_default(),
    )
    .map_err(err)?;
    println!("wrote {}", out.display());
    Ok(())
}
