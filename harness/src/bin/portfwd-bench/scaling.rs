//! The data path at scale: throughput and new connections per second through the LAST of N
//! forwards (the one a linear rule walk reaches last), for each N and iptables flavour, each
//! next to the routed path measured in the same topology at the same moment. A cost that grows
//! with the number of forwards shows as a ratio to N = 1 falling below 1; each round measures
//! the smallest N right before the N in question, so a noisy neighbour weighs on both.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portfwd_harness::topology::Topology;
use portfwd_harness::{LabError, Netns, Portfwd};
use serde_json::{json, Value};

use super::{apply, daemon, err, iperf, median};

/// The first listen port: 20,000, or lower when N forwards would not fit below 65,536.
fn first_port(n: usize) -> usize {
    20_000.min(65_535usize.saturating_sub(n))
}

/// N forwards: N - 2 to other hosts on consecutive ports from [`first_port`], then the two
/// measured ones on the next ports (iperf3, then connection setup): the last port of the last
/// bucket, so the rule walk of a new connection is as long as it gets.
fn params(flavour: &str, n: usize) -> Value {
    let first = first_port(n);
    let others = n.saturating_sub(2);
    let mut list: Vec<Value> = (0..others)
        .map(|i| {
            json!({"name": format!("f{i}"), "listen_port": first + i,
                "to": format!("10.{}.{}.{}:8080", 100 + i / 64770, (i / 254) % 255, i % 254 + 1)})
        })
        .collect();
    list.push(json!({"name": "iperf", "listen_port": first + others, "to": "10.0.2.2:15201"}));
    list.push(json!({"name": "conn", "listen_port": first + 1 + others, "to": "10.0.2.2:15202"}));
    json!({"backend": flavour, "forwards": list})
}

/// The listen ports of the measured forwards for `n` forwards.
fn measured_ports(n: usize) -> (String, String) {
    let (first, others) = (first_port(n), n.saturating_sub(2));
    (
        format!("{}", first + others),
        format!("10.0.1.1:{}", first + 1 + others),
    )
}

/// Accepts and drops connections in `ns` until dropped.
pub(super) struct Sink {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub(super) fn start(ns: &Netns, bind: SocketAddr) -> Result<Sink, LabError> {
        let enter = ns.enterer();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let listener = enter().and_then(|()| {
                let l = TcpListener::bind(bind).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::SeqCst) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(3)).map_err(err)??;
        Ok(Sink {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Completed TCP handshakes per second from the client, one after another for `seconds`;
/// each connection is reset at once (SO_LINGER 0) so no TIME_WAIT piles up.
pub(super) fn connections_per_second(
    t: &Topology,
    target: &str,
    seconds: u32,
) -> Result<f64, LabError> {
    let target: SocketAddr = target.parse().map_err(err)?;
    let enter = t.client.enterer();
    std::thread::spawn(move || -> Result<f64, LabError> {
        enter()?;
        let linger = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let start = Instant::now();
        let (mut done, mut failed) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs(u64::from(seconds)) {
            // A lost SYN costs a 1 s retransmit: it counts against the rate, and a few are
            // tolerated on a busy machine.
            match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(stream) => {
                    let _ = nix::sys::socket::setsockopt(
                        &stream,
                        nix::sys::socket::sockopt::Linger,
                        &linger,
                    );
                    done += 1;
                }
                Err(e) if failed < 5 + done / 100 => {
                    failed += 1;
                    eprintln!("connect {target}: {e} (retrying)");
                }
                Err(e) => return Err(err(format!("connect {target}: {e}"))),
            }
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| err("connection thread panicked"))?
}

/// One row: N, then forward and routed throughput (Gbit/s) and connections per second.
struct Row {
    n: usize,
    fwd_gbits: f64,
    routed_gbits: f64,
    fwd_conns: f64,
    routed_conns: f64,
    /// The smallest N measured in the same rounds, alternating with this N (so a noisy
    /// neighbour weighs on both): the ratio's baseline.
    base_gbits: f64,
    base_conns: f64,
}

/// `nftables`, or the iptables flavour (`iptables-nft`).
fn label(backend: &str) -> String {
    match backend {
        "nftables" => backend.to_string(),
        flavour => format!("iptables-{flavour}"),
    }
}

pub fn run(
    pf: &Portfwd,
    flavours: &[String],
    counts: &[usize],
    seconds: u32,
    out: &Path,
    svg: &Path,
) -> Result<(), LabError> {
    let mut series = Vec::new();
    for flavour in flavours {
        let t = Topology::new()?;
        t.client_default_route()?;
        t.backend
            .ip(&["route", "add", "default", "via", "10.0.2.1"])?;
        t.proxy.sysctl("net.ipv4.ip_forward", "1")?;
        let _iperf = daemon(&t.backend, &["iperf3", "-s", "-p", "15201"])?;
        let _sink = Sink::start(&t.backend, "0.0.0.0:15202".parse().map_err(err)?)?;
        println!("\ndata path at scale, {}: through the last of N forwards (medians of 3 rounds: iperf3 {seconds}s, handshakes for 2 s), routed path beside it", label(flavour));
        // The ratios are to the smallest N, measured in the same rounds.
        let versus = format!("vs N={}", counts.first().copied().unwrap_or(2));
        println!(
            "  {:>6} {:>10} {:>8} {:>10} {:>10} {:>8} {:>10}",
            "N", "fwd Gb/s", versus, "routed", "fwd conn/s", versus, "routed"
        );
        // Warm-up, not recorded: the first transfer after set-up runs slow (neighbour and
        // route caches, CPU frequency).
        apply(pf, &t.proxy, &params(flavour, 2))?;
        let (iperf_port, conn_target) = measured_ports(2);
        iperf(&t, "10.0.1.1", iperf_port.parse().map_err(err)?, 1)?;
        connections_per_second(&t, &conn_target, 1)?;
        let mut rows: Vec<Row> = Vec::new();
        let base_n = counts.first().copied().unwrap_or(2);
        for &n in counts {
            // Three rounds, medians: single runs swing by ±20% on 2 shared cores. Each round
            // measures the smallest N and then this N right after it, so the ratio compares
            // moments minutes apart at most seconds.
            let mut samples: [Vec<f64>; 6] = Default::default();
            let (iperf_port, conn_target) = measured_ports(n);
            let iperf_port: u16 = iperf_port.parse().map_err(err)?;
            let (base_port, base_target) = measured_ports(base_n);
            let base_port: u16 = base_port.parse().map_err(err)?;
            for _ in 0..3 {
                for (count, port, target, slot) in [
                    (base_n, base_port, &base_target, 4),
                    (n, iperf_port, &conn_target, 0),
                ] {
                    apply(pf, &t.proxy, &params(flavour, count))?;
                    // From an empty connection table (the handshake runs leave tens of
                    // thousands of closed entries behind), throughput before handshakes.
                    let _ = t.proxy.exec(&["conntrack", "-F"]);
                    samples[slot].push(iperf(&t, "10.0.1.1", port, seconds)?);
                    samples[slot + 1].push(connections_per_second(&t, target, 2)?);
                }
                samples[2].push(iperf(&t, "10.0.2.2", 15201, seconds)?);
                samples[3].push(connections_per_second(&t, "10.0.2.2:15202", 2)?);
            }
            let [fwd_gbits, fwd_conns, routed_gbits, routed_conns, base_gbits, base_conns] =
                samples.map(median);
            let row = Row {
                n,
                fwd_gbits,
                routed_gbits,
                fwd_conns,
                routed_conns,
                base_gbits,
                base_conns,
            };
            println!(
                "  {:>6} {:>10.2} {:>7.2}x {:>10.2} {:>10.0} {:>7.2}x {:>10.0}",
                n,
                row.fwd_gbits,
                row.fwd_gbits / row.base_gbits,
                row.routed_gbits,
                row.fwd_conns,
                row.fwd_conns / row.base_conns,
                row.routed_conns
            );
            rows.push(row);
        }
        apply(
            pf,
            &t.proxy,
            &json!({"backend": flavour, "state": "absent"}),
        )?;
        series.push((flavour.clone(), rows));
    }
    let json_series: Vec<Value> = series
        .iter()
        .map(|(flavour, rows)| {
            json!({"flavour": flavour, "rows": rows.iter().map(|r| json!({
                "forwards": r.n,
                "gbit_s": r.fwd_gbits,
                "gbit_s_vs_1": r.fwd_gbits / r.base_gbits,
                "routed_gbit_s": r.routed_gbits,
                "conn_s": r.fwd_conns,
                "conn_s_vs_1": r.fwd_conns / r.base_conns,
                "routed_conn_s": r.routed_conns,
            })).collect::<Vec<_>>()})
        })
        .collect();
    let result = json!({"seconds": seconds, "series": json_series});
    std::fs::write(out, serde_json::to_string_pretty(&result).map_err(err)?).map_err(err)?;
    std::fs::write(svg, plot(&series)).map_err(err)?;
    println!("wrote {} and {}", out.display(), svg.display());
    Ok(())
}

/// Ratios to N = 1 against N (log scale), throughput solid, connections/s dashed.
fn plot(series: &[(String, Vec<Row>)]) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let max_n = series
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.n))
        .max()
        .unwrap_or(1) as f64;
    let x = |n: usize| m + (n as f64).max(1.0).log10() / max_n.log10().max(1.0) * (w - 2.0 * m);
    let y = |ratio: f64| h - m - ratio.clamp(0.0, 1.25) / 1.25 * (h - 2.0 * m);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(svg, "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">through the last of N forwards, relative to N = 1</text>", w / 2.0);
    let _ = writeln!(svg, "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>", h - m, w - m, h - m, h - m);
    for ratio in [0.0, 0.25, 0.5, 0.75, 1.0, 1.25] {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{ratio:.2}</text>",
            m - 6.0,
            y(ratio) + 4.0
        );
    }
    let _ = writeln!(svg, "<line x1=\"{m}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"2,3\"/>", y(0.9), w - m, y(0.9));
    if let Some((_, rows)) = series.first() {
        for r in rows {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                x(r.n),
                h - m + 18.0,
                r.n
            );
        }
    }
    let colours = ["#c0392b", "#2471a3", "#27ae60", "#8e44ad"];
    let mut legend = 0.0;
    for (i, (flavour, rows)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        for (what, dash, ratio) in [
            (
                "throughput",
                "",
                (|r: &Row| r.fwd_gbits / r.base_gbits) as fn(&Row) -> f64,
            ),
            ("connections/s", " stroke-dasharray=\"6,4\"", |r: &Row| {
                r.fwd_conns / r.base_conns
            }),
        ] {
            let points: Vec<String> = rows
                .iter()
                .map(|r| format!("{:.1},{:.1}", x(r.n), y(ratio(r))))
                .collect();
            let _ = writeln!(svg, "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash} points=\"{}\"/>", points.join(" "));
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{} {what}</text>",
                m + 10.0,
                h - m - 10.0 - legend,
                label(flavour)
            );
            legend += 16.0;
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">forwards (log scale)</text>",
        w / 2.0,
        h - 16.0
    );
    svg.push_str("</svg>\n");
    svg
}
