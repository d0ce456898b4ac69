#![no_main]
//! `ip -j` parsers (rules, routes, addresses): never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portfwd::fuzzing::ip_json(&String::from_utf8_lossy(data));
});
