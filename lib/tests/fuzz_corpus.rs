//! Replays the committed fuzz corpora (fuzz/corpus/<target>/) through the same entry points the
//! cargo-fuzz targets use, on stable Rust: every input that ever reached new code still does
//! not panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        run(&data);
        count += 1;
    }
    count
}

#[test]
fn params_corpus() {
    let n = replay("params", |d| {
        if let Ok(text) = std::str::from_utf8(d) {
            portfwd::fuzzing::params(text);
        }
    });
    assert!(n >= 2, "{n} inputs");
}

#[test]
fn iptables_save_corpus() {
    let n = replay("iptables_save", |d| {
        portfwd::fuzzing::iptables_save(&String::from_utf8_lossy(d))
    });
    assert!(n >= 2, "{n} inputs");
}

#[test]
fn ip_json_corpus() {
    let n = replay("ip_json", |d| {
        portfwd::fuzzing::ip_json(&String::from_utf8_lossy(d))
    });
    assert!(n >= 3, "{n} inputs");
}
