//! Where a run's time goes, phase by phase (parse, compile, read, plan, write, ...): with
//! `PORTFWD_PHASES=1` in its environment a run's result carries `phases`, seconds per phase in
//! the order they ended. For the benchmarks; off otherwise (then nothing is timed).

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static PHASES: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

/// Is `PORTFWD_PHASES=1` set?
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PORTFWD_PHASES").is_some_and(|v| v == "1"))
}

/// Runs `f`, timing it as `phase` when timing is on. Phases on other threads (compile runs
/// beside the read) are timed the same way: their times may overlap.
pub fn timed<T>(phase: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let seconds = start.elapsed().as_secs_f64();
    if let Ok(mut phases) = PHASES.lock() {
        phases.push((phase, seconds));
    }
    out
}

/// The phases timed so far as a JSON object (phases timed twice are summed), None when
/// timing is off.
pub fn json() -> Option<serde_json::Value> {
    if !enabled() {
        return None;
    }
    let mut out = serde_json::Map::new();
    for (phase, seconds) in PHASES.lock().ok()?.iter() {
        let sum = out
            .get(*phase)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
            + seconds;
        out.insert((*phase).to_string(), sum.into());
    }
    Some(out.into())
}
