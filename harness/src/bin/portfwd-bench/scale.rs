//! The control plane at scale (`portfwd-bench control --scale 1000,10000,50000`): for each
//! backend, each N and each number of foreign iptables nat rules beside it, the first apply of
//! N forwards, a no-op, a change of one forward, a no-op right after another writer's commit
//! (a full read), `absent`, removing all but 2 of the N forwards in one run, and the peak RSS
//! of the first apply. Every figure is printed as a ratio to the same figure at the smallest N,
//! and to the same figure without foreign rules, measured in the same run. With iptables, the
//! change is also compared with a bare `iptables-restore --noflush` of the lines it writes. The
//! no-op, the change and the full read run with `PORTFWD_PHASES=1`, and the medians of their
//! phases are shown, with and without the foreign rules.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use portfwd_harness::{LabError, Netns, Portfwd};
use serde_json::{json, Value};

use super::{err, foreign_ruleset, forwards, median, run_ok};

/// The figures of one (backend, foreign rules, N).
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    first: f64,
    noop: f64,
    change: f64,
    full_read: f64,
    absent: f64,
    /// N forwards to 2 in one run.
    shrink: f64,
    /// KiB, the largest process of the first apply (portfwd or a tool it ran).
    rss: u64,
    /// iptables: the restores a change writes, run bare (`iptables-restore --noflush`).
    bare_restore: Option<f64>,
    /// Medians of the no-op's, the change's and the full read's seconds per phase
    /// ([`PHASES`]), as the runs report them with `PORTFWD_PHASES=1`.
    noop_phases: [f64; PHASES.len()],
    change_phases: [f64; PHASES.len()],
    full_read_phases: [f64; PHASES.len()],
}

/// The phases a run reports, in pipeline order (compile runs beside the read).
const PHASES: [&str; 9] = [
    "parse", "prelude", "compile", "earlier", "read", "plan", "report", "write", "flows",
];

const NAMES: [&str; 6] = [
    "first apply",
    "no-op",
    "change 1",
    "no-op, full read",
    "absent",
    "N -> 2",
];

impl Figures {
    fn times(&self) -> [f64; 6] {
        [
            self.first,
            self.noop,
            self.change,
            self.full_read,
            self.absent,
            self.shrink,
        ]
    }
}

/// The `iptables-restore` payloads of a report's `commands` (tool and input of each).
fn restores(report: &Value) -> Vec<(String, String)> {
    let lines: Vec<&str> = report["commands"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in lines {
        match &mut current {
            None if line.contains("-restore --noflush") && line.ends_with("<<'EOF'") => {
                let tool = line.split_whitespace().next().unwrap_or_default();
                current = Some((tool.to_string(), String::new()));
            }
            Some(_) if line == "EOF" => out.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

/// The change's restores (from a check-mode run), run bare and timed; the host then holds
/// the change, which the next run of `base` reads and undoes.
fn bare_restore(pf: &Portfwd, ns: &Netns, changed: &Value) -> Result<f64, LabError> {
    let check = pf.run(ns, &["apply", "--check"], &changed.to_string(), &[])?;
    let payloads = restores(&check.json);
    if payloads.is_empty() {
        return Err(err(format!(
            "no restore in the check run: {}",
            check.stdout
        )));
    }
    let t = Instant::now();
    for (tool, payload) in &payloads {
        run_ok(ns, &[tool, "--noflush", "-w", "10"], payload)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn params(backend: &str, n: usize, changed: Option<usize>) -> Value {
    let mut p = forwards(n, changed);
    p["backend"] = json!(backend);
    p
}

/// One timed `portfwd apply` and the seconds of each of its phases (0 where it had none).
fn timed_phases(
    pf: &Portfwd,
    ns: &Netns,
    params: &Value,
) -> Result<(f64, [f64; PHASES.len()]), LabError> {
    let t = Instant::now();
    let r = pf.run(
        ns,
        &["apply"],
        &params.to_string(),
        &[("PORTFWD_PHASES", "1")],
    )?;
    let took = t.elapsed().as_secs_f64();
    if r.failed() || r.code != 0 {
        return Err(err(format!("portfwd failed: {}", r.msg())));
    }
    let phases = PHASES.map(|p| r.json["phases"][p].as_f64().unwrap_or(0.0));
    Ok((took, phases))
}

/// Medians phase by phase.
fn median_phases(runs: &[[f64; PHASES.len()]]) -> [f64; PHASES.len()] {
    std::array::from_fn(|i| median(runs.iter().map(|r| r[i]).collect()))
}

/// One timed `portfwd apply` (wall time; it must not fail).
fn timed(pf: &Portfwd, ns: &Netns, params: &Value) -> Result<f64, LabError> {
    let t = Instant::now();
    let r = pf.apply(ns, params)?;
    let took = t.elapsed().as_secs_f64();
    if r.failed() || r.code != 0 {
        return Err(err(format!("portfwd failed: {}", r.msg())));
    }
    Ok(took)
}

/// Another writer's commit that touches nothing of portfwd's: the generation moves, so the
/// next run must read.
fn other_writer(ns: &Netns) -> Result<(), LabError> {
    run_ok(
        ns,
        &["nft", "-f", "-"],
        "add table inet bench-other\ndelete table inet bench-other\n",
    )
}

fn measure_one(
    pf: &Portfwd,
    backend: &str,
    n: usize,
    foreign: &str,
    reps: usize,
) -> Result<Figures, LabError> {
    let ns = Netns::new("scale")?;
    if !foreign.is_empty() {
        run_ok(&ns, &["iptables-restore"], foreign)?;
    }
    let base = params(backend, n, None);
    let changed = params(backend, n, Some(n - 1));
    let mut f = Figures::default();
    // The first apply, under GNU time for its peak RSS.
    let t = Instant::now();
    let r = pf.run_under(
        &ns,
        &["/usr/bin/time", "-f", "%M"],
        &["apply"],
        &base.to_string(),
        &[],
    )?;
    f.first = t.elapsed().as_secs_f64();
    if r.code != 0 {
        return Err(err(format!("first apply failed: {}", r.stdout)));
    }
    f.rss = r
        .stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| err("no RSS from /usr/bin/time (apt-get install time)"))?;
    // One more run before timing, so every backend starts from a record it wrote over its
    // own first apply (a read cache of the generation that apply led to).
    timed(pf, &ns, &base)?;
    let mut noops = Vec::new();
    let mut changes = Vec::new();
    let mut full = Vec::new();
    let (mut noop_phases, mut change_phases, mut full_phases) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (t, p) = timed_phases(pf, &ns, &base)?;
        noops.push(t);
        noop_phases.push(p);
        for params in [&changed, &base] {
            let (t, p) = timed_phases(pf, &ns, params)?;
            changes.push(t);
            change_phases.push(p);
        }
        timed(pf, &ns, &base)?;
        other_writer(&ns)?;
        let (t, p) = timed_phases(pf, &ns, &base)?;
        full.push(t);
        full_phases.push(p);
    }
    f.noop = median(noops);
    f.change = median(changes);
    f.noop_phases = median_phases(&noop_phases);
    f.change_phases = median_phases(&change_phases);
    f.full_read = median(full);
    f.full_read_phases = median_phases(&full_phases);
    if backend != "nftables" {
        let mut bare = Vec::new();
        for _ in 0..reps {
            bare.push(bare_restore(pf, &ns, &changed)?);
            timed(pf, &ns, &base)?;
            timed(pf, &ns, &base)?;
        }
        f.bare_restore = Some(median(bare));
    }
    f.absent = timed(pf, &ns, &json!({"backend": backend, "state": "absent"}))?;
    timed(pf, &ns, &base)?;
    timed(pf, &ns, &base)?;
    f.shrink = timed(pf, &ns, &params(backend, 2.min(n), None))?;
    Ok(f)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Runs the series and prints its table; writes the JSON and an SVG of time against N.
pub(super) fn run(
    pf: &Portfwd,
    scales: &[usize],
    reps: usize,
    out: &Path,
    svg: &Path,
) -> Result<(), LabError> {
    let mut scales: Vec<usize> = scales.iter().copied().filter(|&n| n >= 1).collect();
    scales.sort_unstable();
    let smallest = *scales
        .first()
        .ok_or_else(|| err("--scale needs a forward count"))?;
    let foreign_rules = 10_000;
    let foreign = foreign_ruleset(foreign_rules);
    let mut table = String::new();
    let mut results = Vec::new();
    let _ = writeln!(
        table,
        "control plane at scale: seconds (medians of {reps} runs; change 1 is the median of {} changes), peak RSS of the first apply",
        reps * 2
    );
    for backend in ["nftables", "iptables"] {
        let mut series: Vec<(usize, Figures, Figures)> = Vec::new();
        for &n in &scales {
            let bare = measure_one(pf, backend, n, "", reps)?;
            let loaded = measure_one(pf, backend, n, &foreign, reps)?;
            series.push((n, bare, loaded));
        }
        let _ = writeln!(
            table,
            "\n{backend}: without foreign rules | with {foreign_rules} foreign iptables nat rules"
        );
        let _ = writeln!(
            table,
            "{:>8} {:<18} {:>9} {:>9} {:>8} {:>8}",
            "N", "", "s", "s", "x N=min", "x bare"
        );
        let first = series[0];
        for &(n, bare, loaded) in &series {
            for (i, name) in NAMES.iter().enumerate() {
                let (b, l) = (bare.times()[i], loaded.times()[i]);
                let _ = writeln!(
                    table,
                    "{n:>8} {name:<18} {b:>9.3} {l:>9.3} {:>8.2} {:>8.2}",
                    ratio(b, first.1.times()[i]),
                    ratio(l, b)
                );
            }
            let _ = writeln!(
                table,
                "{n:>8} {:<18} {:>7} MB {:>6} MB",
                "peak RSS",
                bare.rss / 1024,
                loaded.rss / 1024
            );
            for (beside, figures) in [("", &bare), (" | foreign", &loaded)] {
                for (what, phases) in [
                    ("no-op", figures.noop_phases),
                    ("change 1", figures.change_phases),
                    ("full read", figures.full_read_phases),
                ] {
                    let shown: Vec<String> = PHASES
                        .iter()
                        .zip(phases)
                        .filter(|(_, s)| *s > 0.0)
                        .map(|(p, s)| format!("{p} {s:.3}"))
                        .collect();
                    let what = format!("{what}{beside}");
                    let _ = writeln!(table, "{n:>8} phases of {what:<19} {}", shown.join(", "));
                }
            }
            if let (Some(b), Some(l)) = (bare.bare_restore, loaded.bare_restore) {
                let _ = writeln!(
                    table,
                    "{n:>8} {:<18} {b:>9.3} {l:>9.3}   change 1 is {:.2}x | {:.2}x of it",
                    "bare restore",
                    ratio(bare.change, b),
                    ratio(loaded.change, l)
                );
            }
            results.push(json!({
                "backend": backend, "forwards": n,
                "bare": figures_json(&bare), "foreign": figures_json(&loaded),
            }));
        }
        if let (Some(&(_, small, _)), Some(&(largest, big, _))) = (series.first(), series.last()) {
            let _ = writeln!(
                table,
                "{backend}: change 1 of {largest} is {:.2}x change 1 of {smallest}",
                ratio(big.change, small.change)
            );
        }
    }
    print!("{table}");
    let json = json!({"reps": reps, "foreign_rules": foreign_rules, "series": results});
    write(
        out,
        &serde_json::to_string_pretty(&json).unwrap_or_default(),
    )?;
    write(svg, &plot(&results))?;
    println!("wrote {} and {}", out.display(), svg.display());
    Ok(())
}

fn figures_json(f: &Figures) -> Value {
    json!({"first_apply_s": f.first, "noop_s": f.noop, "change_1_s": f.change,
           "full_read_noop_s": f.full_read, "absent_s": f.absent, "shrink_to_2_s": f.shrink,
           "bare_restore_s": f.bare_restore, "peak_rss_kib": f.rss,
           "noop_phases_s": phases_json(&f.noop_phases),
           "change_1_phases_s": phases_json(&f.change_phases),
           "full_read_phases_s": phases_json(&f.full_read_phases)})
}

fn phases_json(phases: &[f64; PHASES.len()]) -> Value {
    PHASES
        .iter()
        .zip(phases)
        .map(|(p, s)| ((*p).to_string(), json!(s)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, text).map_err(err)
}

/// Seconds against N (log scales), one panel per backend, the series without foreign rules.
fn plot(results: &[Value]) -> String {
    let (w, h, pad) = (900.0_f64, 420.0_f64, 60.0_f64);
    let panel = (w - pad) / 2.0;
    let keys = [
        ("first_apply_s", "#1f77b4"),
        ("noop_s", "#2ca02c"),
        ("change_1_s", "#d62728"),
        ("full_read_noop_s", "#9467bd"),
        ("absent_s", "#ff7f0e"),
    ];
    let all: Vec<f64> = results
        .iter()
        .flat_map(|r| keys.iter().filter_map(move |(k, _)| r["bare"][k].as_f64()))
        .filter(|v| *v > 0.0)
        .collect();
    let ns: Vec<f64> = results
        .iter()
        .filter_map(|r| r["forwards"].as_f64())
        .collect();
    let (tmin, tmax) = (
        all.iter().copied().fold(f64::MAX, f64::min).max(0.001),
        all.iter().copied().fold(0.001_f64, f64::max),
    );
    let (nmin, nmax) = (
        ns.iter().copied().fold(f64::MAX, f64::min),
        ns.iter().copied().fold(1.0_f64, f64::max),
    );
    let lx = |n: f64, i: f64| {
        let span = (nmax.ln() - nmin.ln()).max(1e-9);
        pad + i * panel + 20.0 + (n.ln() - nmin.ln()) / span * (panel - 60.0)
    };
    let ly = |t: f64| {
        let span = (tmax.ln() - tmin.ln()).max(1e-9);
        h - pad - (t.max(tmin).ln() - tmin.ln()) / span * (h - 2.0 * pad)
    };
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">seconds against forwards (log scales), without foreign rules</text>", w / 2.0);
    for (i, backend) in ["nftables", "iptables"].iter().enumerate() {
        let i = i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"40\" text-anchor=\"middle\">{backend}</text>",
            pad + i * panel + panel / 2.0
        );
        let _ = writeln!(s, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/><line x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{1}\" stroke=\"black\"/>", pad + i * panel + 20.0, h - pad, pad + (i + 1.0) * panel - 40.0, pad);
        for &n in &ns {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
                lx(n, i),
                h - pad + 15.0
            );
        }
        for t in [0.01, 0.1, 1.0, 10.0] {
            if t >= tmin && t <= tmax {
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{t} s</text>",
                    pad + i * panel + 16.0,
                    ly(t) + 4.0
                );
            }
        }
        for (k, colour) in keys {
            let points: Vec<String> = results
                .iter()
                .filter(|r| r["backend"] == *backend)
                .filter_map(|r| Some((r["forwards"].as_f64()?, r["bare"][k].as_f64()?)))
                .map(|(n, t)| format!("{:.1},{:.1}", lx(n, i), ly(t)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
        }
    }
    for (j, ((_, colour), name)) in keys.iter().zip(NAMES).enumerate() {
        let x = pad + j as f64 * 160.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{name}</text>", h - 18.0, x + 16.0, h - 13.0);
    }
    s.push_str("</svg>\n");
    s
}
