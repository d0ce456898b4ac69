//! The data path through a pool: new connections per second and throughput through a
//! forward whose backends are a 16-backend pool, next to a forward with one `to`, measured
//! alternately in the same topology (medians of 5 rounds), so a noisy neighbour weighs on
//! both. Each backend: nftables (one map lookup per new connection) and iptables-nft (a
//! cascade of one rule per backend for these equal weights; no source hash there).

use std::path::Path;

use portfwd_harness::topology::Topology;
use portfwd_harness::{LabError, Portfwd};
use serde_json::{json, Value};

use super::scaling::{connections_per_second, Sink};
use super::{apply, daemon, err, iperf, median};

/// Backends of the pool.
const POOL: usize = 16;

/// Rounds per figure (the median is reported): handshake rates here swing by 2x between
/// runs seconds apart.
const ROUNDS: usize = 5;

fn params(backend: &str, balance: &str) -> Value {
    let pool = |port: u16| -> Vec<Value> {
        (0..POOL)
            .map(|i| json!({"to": format!("10.0.2.{}:{port}", 10 + i)}))
            .collect()
    };
    json!({"backend": backend, "forwards": [
        {"name": "one-conn", "listen_port": 21000, "to": "10.0.2.2:15202"},
        {"name": "pool-conn", "listen_port": 21001, "balance": balance, "backends": pool(15202)},
        {"name": "one-iperf", "listen_port": 21002, "to": "10.0.2.2:15201"},
        {"name": "pool-iperf", "listen_port": 21003, "balance": balance, "backends": pool(15201)},
    ]})
}

pub fn run(pf: &Portfwd, seconds: u32, out: &Path) -> Result<(), LabError> {
    let t = Topology::new()?;
    for i in 0..POOL {
        t.backend.ip(&[
            "addr",
            "add",
            &format!("10.0.2.{}/24", 10 + i),
            "dev",
            "eth0",
        ])?;
    }
    let _iperf = daemon(&t.backend, &["iperf3", "-s", "-p", "15201"])?;
    let _sink = Sink::start(&t.backend, "0.0.0.0:15202".parse().map_err(err)?)?;
    println!("\npool of {POOL} backends vs one `to` (medians of {ROUNDS} rounds: handshakes for 2 s, iperf3 {seconds}s)");
    println!(
        "  {:<13} {:<12} {:>10} {:>10} {:>6} {:>9} {:>9} {:>6}",
        "backend", "balance", "one conn/s", "pool", "ratio", "one Gb/s", "pool", "ratio"
    );
    let mut results = Vec::new();
    let runs = [
        ("nftables", "random"),
        ("nftables", "round-robin"),
        ("nftables", "source-hash"),
        ("iptables-nft", "random"),
        ("iptables-nft", "round-robin"),
    ];
    for (backend, balance) in runs {
        apply(pf, &t.proxy, &params(backend, balance))?;
        // Warm-up of both, not recorded: the first handshakes after set-up run slow.
        for port in [21000, 21001] {
            connections_per_second(&t, &format!("10.0.1.1:{port}"), 1)?;
        }
        iperf(&t, "10.0.1.1", 21003, 1)?;
        let mut s: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            s[0].push(connections_per_second(&t, "10.0.1.1:21000", 2)?);
            s[1].push(connections_per_second(&t, "10.0.1.1:21001", 2)?);
            s[2].push(iperf(&t, "10.0.1.1", 21002, seconds)?);
            s[3].push(iperf(&t, "10.0.1.1", 21003, seconds)?);
        }
        let [one_c, pool_c, one_g, pool_g] = s.map(median);
        println!(
            "  {backend:<13} {balance:<12} {one_c:>10.0} {pool_c:>10.0} {:>6.2} {one_g:>9.2} {pool_g:>9.2} {:>6.2}",
            pool_c / one_c,
            pool_g / one_g
        );
        results.push(
            json!({"backend": backend, "balance": balance, "backends": POOL,
            "one_conns_per_s": one_c, "pool_conns_per_s": pool_c, "conns_ratio": pool_c / one_c,
            "one_gbits": one_g, "pool_gbits": pool_g, "gbits_ratio": pool_g / one_g}),
        );
    }
    let text = serde_json::to_string_pretty(&json!({"pool": results})).map_err(err)?;
    std::fs::write(out, text).map_err(err)?;
    println!("  written: {}", out.display());
    Ok(())
}
