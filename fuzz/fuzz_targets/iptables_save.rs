#![no_main]
//! iptables-save parser, owned-rule extraction, params view and planning: never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portfwd::fuzzing::iptables_save(&String::from_utf8_lossy(data));
});
