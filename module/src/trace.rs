//! `portfwd trace`: runs `nft monitor trace`, adds the trace table (see `portfwd::trace`),
//! prints each packet's path, and removes the table on exit, Ctrl-C and SIGTERM. `--clean`
//! removes the tables of traces that died (only `portfwd_trace_<pid>` tables whose process is
//! gone).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use portfwd::trace::{table_script, Filter, Packet, Tracker, TABLE_PREFIX};

pub struct Options {
    pub filter: Filter,
    pub count: usize,
    pub timeout: Duration,
    pub json: bool,
    pub instance: String,
}

/// Runs `nft ARGS` with `input` on stdin; the error carries nft's message.
fn nft(args: &[&str], input: &str) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

pub fn run(opts: Options) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("portfwd trace: cannot watch signal {signal}: {e}");
            return ExitCode::from(1);
        }
    }
    let table = format!("{TABLE_PREFIX}{}", std::process::id());
    let mut monitor = match Command::new("nft")
        .args(["monitor", "trace"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("portfwd trace: cannot run nft monitor trace: {e}");
            return ExitCode::from(1);
        }
    };
    let (lines, received) = mpsc::channel();
    if let Some(stdout) = monitor.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    // The monitor subscribes before any packet is marked.
    std::thread::sleep(Duration::from_millis(200));
    if let Err(e) = nft(&["-f", "-"], &table_script(&table, &opts.filter)) {
        eprintln!("portfwd trace: cannot add the trace table: {e}");
        let _ = monitor.kill();
        return ExitCode::from(1);
    }
    // What the trace waits for, on stderr (stdout carries only packets).
    let f = &opts.filter;
    let src = f.src.map(|s| format!(", source {s}")).unwrap_or_default();
    let dst = f
        .dst
        .map(|d| format!(", destination {d}"))
        .unwrap_or_default();
    eprintln!(
        "portfwd trace: tracing {} packets to port {}{src}{dst}: make the connection now; it stops after {} packet(s) or {} s (Ctrl-C stops it sooner)",
        f.proto.name(),
        f.dport,
        opts.count,
        opts.timeout.as_secs()
    );
    let mut host = portfwd::RealSystem::new();
    if portfwd::iptables_is_legacy(&mut host) {
        eprintln!("portfwd trace: note: iptables here is the legacy flavour; its rules are not part of nftables and cannot be traced (only nftables tables, iptables-nft's included, show up)");
    }
    let entries = portfwd::trace_entries(&opts.instance, &mut host).unwrap_or_default();
    let mut tracker = Tracker::new(&table, entries);
    let mut packets: Vec<Packet> = Vec::new();
    let deadline = Instant::now() + opts.timeout;
    let mut last_line = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        match received.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                last_line = Instant::now();
                packets.extend(tracker.line(&line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let quiet = last_line.elapsed() > Duration::from_millis(400);
                if tracker.seen() >= opts.count && quiet {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    if let Err(e) = nft(&["delete", "table", "inet", &table], "") {
        eprintln!(
            "portfwd trace: could not remove inet {table}: {e} (portfwd trace --clean removes it)"
        );
    }
    packets.extend(tracker.finish_all());
    packets.sort_by_key(|p| p.packet);
    packets.truncate(opts.count);
    portfwd::name_backends(&mut packets, &mut host);
    for packet in &packets {
        print_packet(packet, opts.json);
    }
    if packets.is_empty() {
        eprintln!("portfwd trace: no matching packet seen");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_packet(packet: &Packet, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(packet).unwrap_or_default());
        return;
    }
    let _ = writeln!(out, "packet {}: {}", packet.packet, packet.summary);
    for hop in &packet.hops {
        let entry = hop
            .entry
            .as_ref()
            .map(|e| format!("   [{e}]"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {}: {} => {}{entry}",
            hop.table, hop.chain, hop.rule, hop.verdict
        );
    }
    if let Some(nat) = &packet.nat {
        let _ = writeln!(out, "  nat: {nat}");
    }
    if let Some(backend) = &packet.backend {
        let _ = writeln!(out, "  backend: {backend}");
    }
    let _ = writeln!(out, "  verdict: {}", packet.verdict);
}

/// Removes the trace tables whose process is gone; prints what it removed.
pub fn clean() -> ExitCode {
    let listing = match nft(&["-j", "list", "tables"], "") {
        Ok(text) => text,
        Err(e) => {
            eprintln!("portfwd trace --clean: {e}");
            return ExitCode::from(1);
        }
    };
    let value: serde_json::Value = serde_json::from_str(&listing).unwrap_or_default();
    let mut removed = Vec::new();
    for item in value["nftables"].as_array().into_iter().flatten() {
        let table = &item["table"];
        let (Some("inet"), Some(name)) = (table["family"].as_str(), table["name"].as_str()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(TABLE_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "portfwd" {
            continue; // a trace still running
        }
        match nft(&["delete", "table", "inet", name], "") {
            Ok(_) => removed.push(name.to_string()),
            Err(e) => eprintln!("portfwd trace --clean: inet {name}: {e}"),
        }
    }
    println!(
        "{}",
        serde_json::json!({"removed": removed, "msg": format!("removed {} leftover trace table(s)", removed.len())})
    );
    ExitCode::SUCCESS
}
